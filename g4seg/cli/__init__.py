"""The ``g4seg`` command line (Typer). Each command lives in its own module of this package.

Every command is wrapped by :func:`user_errors`, so a :class:`G4SegError` (bad input, missing model,
unsupported pair) prints one line on stderr and exits 1 instead of a traceback.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import typer
from rich.console import Console

from g4seg.errors import G4SegError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    name="g4seg",
    help="Refine coarse segmentation masks with one mask-injected diffusion step (G4Seg).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn G4SegError into one stderr line and exit code 1; keep the command's signature for Typer."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except G4SegError as exc:
            err_console.print(f"g4seg: error: {exc}", markup=False)
            raise typer.Exit(1) from None

    return wrapper


def _register() -> None:
    from g4seg.cli.ablate import ablate_command
    from g4seg.cli.doctor import doctor_command
    from g4seg.cli.eval import eval_command
    from g4seg.cli.listing import compat_command, list_command, plugins_command
    from g4seg.cli.refine import refine_command

    for name, command in (
        ("refine", refine_command),
        ("eval", eval_command),
        ("ablate", ablate_command),
        ("plugins", plugins_command),
        ("list", list_command),
        ("compat", compat_command),
        ("doctor", doctor_command),
    ):
        app.command(name)(user_errors(command))


_register()


def main() -> None:
    app()
