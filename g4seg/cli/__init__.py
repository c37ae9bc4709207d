"""The ``g4seg`` command line (Typer). Each command lives in its own module of this package.

Every command is wrapped by :func:`user_errors`, so a :class:`G4SegError` (bad input, missing model,
unsupported pair) prints one line on stderr and exits 1 instead of a traceback. Any other exception
is one line too (``g4seg: error: <Type>: <message> (rerun with --debug for the traceback)``); the
global ``g4seg --debug`` option (or ``G4SEG_DEBUG=1``) prints its traceback instead.
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Any, Callable

import typer
from rich.console import Console

from g4seg.errors import G4SegError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
_debug = {"on": False}  # set by the global --debug option

app = typer.Typer(
    name="g4seg",
    help="Refine coarse segmentation masks with one mask-injected diffusion step (G4Seg).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from g4seg import __version__

        typer.echo(f"g4seg {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", envvar="G4SEG_VERBOSE",
                                 help="Show other libraries' warnings and progress bars (loading, downloads)."),
    debug: bool = typer.Option(False, "--debug", envvar="G4SEG_DEBUG",
                               help="Show the traceback of an unexpected error instead of one line."),
) -> None:
    _debug["on"] = debug
    # before any command imports a model library (see g4seg/console.py)
    from g4seg.console import configure

    configure(verbose)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any exception into one stderr line and exit code 1; keep the command's signature for Typer.

    A G4SegError prints its message; another exception its type and first line, or with ``--debug``
    its traceback. Ctrl-C prints ``g4seg: interrupted`` and exits 130.
    """
    import click

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except G4SegError as exc:
            err_console.print(f"g4seg: error: {_one_line(str(exc))}", markup=False, emoji=False)
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            err_console.print("g4seg: interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback unless asked to
            if _debug["on"]:
                traceback.print_exc(file=sys.stderr)
                raise typer.Exit(1) from None
            first = (str(exc).strip().splitlines() or [""])[0].strip()
            described = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            err_console.print(f"g4seg: error: {described} (rerun with --debug for the traceback)", markup=False,
                              emoji=False)
            raise typer.Exit(1) from None

    return wrapper


def _register() -> None:
    from g4seg.cli.ablate import ablate_command
    from g4seg.cli.bench import bench_command
    from g4seg.cli.doctor import doctor_command
    from g4seg.cli.eval import eval_command
    from g4seg.cli.listing import compat_command, list_command
    from g4seg.cli.panoptic import refine_panoptic_command
    from g4seg.cli.plugins import list_plugins, new_command, plugins_app
    from g4seg.cli.refine import refine_command
    from g4seg.cli.serve import serve_command

    for name, command in (
        ("refine", refine_command),
        ("eval", eval_command),
        ("ablate", ablate_command),
        ("list", list_command),
        ("compat", compat_command),
        ("doctor", doctor_command),
        ("bench", bench_command),
        ("refine-panoptic", refine_panoptic_command),
        ("serve", serve_command),
    ):
        app.command(name)(user_errors(command))
    from g4seg.cli.toy import demo_command, toy_app, toy_commands

    app.command("demo")(user_errors(demo_command))

    for name, command in toy_commands():
        toy_app.command(name)(user_errors(command))
    app.add_typer(toy_app)
    from g4seg.cli.controlnet import controlnet_app, train_command

    controlnet_app.command("train")(user_errors(train_command))
    app.add_typer(controlnet_app)
    plugins_app.callback()(user_errors(list_plugins))
    plugins_app.command("new")(user_errors(new_command))
    app.add_typer(plugins_app)
    from g4seg.plugins import register_commands

    before = len(app.registered_commands)
    register_commands(app)  # third-party commands (hook register_commands), fail-soft
    for info in app.registered_commands[before:]:  # their errors are one line too
        info.callback = user_errors(info.callback)


_register()


def main() -> None:
    app()
