"""What the ``g4seg`` command shows besides its own output: other libraries quiet, one loading status.

The model libraries are loud by default: diffusers and transformers log warnings and advisories,
transformers draws a "Loading weights" bar for every text encoder it loads, the Hub draws download
bars, and some of them raise ``FutureWarning``/``UserWarning`` about their own internals. None of it
is the user's concern, so the CLI silences it with the libraries' own switches, in two steps:

1. :func:`configure` (the CLI's app callback, before any command runs and before any model library
   is imported) sets the environment variables these libraries read at import time
   (``DIFFUSERS_VERBOSITY``, ``TRANSFORMERS_VERBOSITY``, ``HF_HUB_VERBOSITY``,
   ``TRANSFORMERS_NO_ADVISORY_WARNINGS``, ``HF_HUB_DISABLE_PROGRESS_BARS``) and adds ``warnings``
   filters scoped to those libraries' modules. It imports nothing heavy, so ``g4seg plugins`` stays
   fast. A variable the user has set is left as it is.
2. :func:`quiet_libraries` (called right before models load, by :func:`loading` and by the loading
   helpers) applies the libraries' functions to those already imported (``set_verbosity_error``,
   ``disable_progress_bar``, ``disable_progress_bars``); diffusers' bars have no variable.

``g4seg --verbose`` (or ``G4SEG_VERBOSE=1``) keeps every library's default output instead and
prints a plain "loading ..." line per model. Errors are never hidden: the libraries still log at
error level, and g4seg's own failures are one ``g4seg: error:`` line either way.

The loading status (:func:`loading`) is a rich spinner on stderr naming the model and where it
comes from (a local folder, the Hub cache, a download from the Hub). It is shown only when the CLI
configured the console and stderr is a terminal, so redirected logs, ``CliRunner`` output and the
Python API see nothing. Without this module configured (library use), nothing is changed at all.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

VERBOSE_ENV = "G4SEG_VERBOSE"
QUIET_ENV = {
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# warnings attributed to these libraries' modules are theirs, not the user's
QUIET_MODULES = r"(diffusers|transformers|huggingface_hub|accelerate|open_clip|timm|safetensors)(\.|$)"


class _State:
    configured = False  # the CLI called configure(): status lines on, libraries quiet unless verbose
    verbose = False
    quieted = False  # quiet_libraries() changed the libraries' own settings
    env_set: dict[str, str] = {}  # variables configure() set (not the user's), to undo them
    status: Any = None  # the active rich Status, if any (nested loads update its text)
    status_text = ""


def configure(verbose: bool = False) -> None:
    """The CLI's console settings; call before model libraries are imported. Imports nothing heavy."""
    _State.configured, _State.verbose = True, verbose
    if verbose:
        for name, value in _State.env_set.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        _State.env_set = {}
        warnings.filters[:] = [f for f in warnings.filters if not _is_ours(f)]
        getattr(warnings, "_filters_mutated", lambda: None)()  # as filterwarnings() does after a change
        if _State.quieted:
            _restore_libraries()
        return
    for name, value in QUIET_ENV.items():
        if name not in os.environ:
            os.environ[name] = value
            _State.env_set[name] = value
    warnings.filterwarnings("ignore", module=QUIET_MODULES)


def is_configured() -> bool:
    return _State.configured


def is_quiet() -> bool:
    """True when the CLI asked for quiet libraries (configured and not ``--verbose``)."""
    return _State.configured and not _State.verbose


def _is_ours(entry: tuple[Any, ...]) -> bool:
    action, _, _, module, _ = entry
    return action == "ignore" and module is not None and getattr(module, "pattern", None) == QUIET_MODULES


def quiet_libraries() -> None:
    """Apply the quiet settings to the model libraries already imported (cheap; call before each load)."""
    if not is_quiet():
        return
    modules = sys.modules
    if "huggingface_hub" in modules:
        from huggingface_hub.utils import disable_progress_bars, logging as hub_logging

        disable_progress_bars()
        if "HF_HUB_VERBOSITY" in _State.env_set:
            hub_logging.set_verbosity_error()
    if "diffusers" in modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        if "DIFFUSERS_VERBOSITY" in _State.env_set:
            diffusers_logging.set_verbosity_error()
    if "transformers" in modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        if "TRANSFORMERS_VERBOSITY" in _State.env_set:
            transformers_logging.set_verbosity_error()
    _State.quieted = True


def _restore_libraries() -> None:
    """Undo :func:`quiet_libraries` (a ``--verbose`` command after a quiet one in the same process)."""
    modules = sys.modules
    if "huggingface_hub" in modules:
        from huggingface_hub.utils import enable_progress_bars, logging as hub_logging

        enable_progress_bars()
        hub_logging.set_verbosity_warning()
    if "diffusers" in modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity_warning()
    if "transformers" in modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.enable_progress_bar()
        transformers_logging.set_verbosity_warning()
    _State.quieted = False


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """Inside a model library's loading call: its warnings are ignored when the console is quiet."""
    if not is_quiet():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def loading(what: str, where: str) -> Iterator[None]:
    """"loading WHAT from WHERE" while the block runs: a spinner on a terminal's stderr, a plain line
    with ``--verbose``, nothing otherwise (or when the CLI did not configure the console)."""
    if not _State.configured:
        yield
        return
    quiet_libraries()
    text = f"loading {what} from {where}"
    if _State.status is not None:  # nested (e.g. a standalone VAE inside a backbone): reuse the spinner
        outer = _State.status
        outer.update(_escape(text))
        try:
            yield
        finally:
            outer.update(_State.status_text)
        return
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if _State.verbose:
        console.print(text, markup=False)
        yield
        return
    if not console.is_terminal:
        yield
        return
    from rich.errors import LiveError

    status = console.status(_escape(text))
    try:
        status.start()
    except LiveError:  # another live display (e.g. a progress bar) owns the terminal
        yield
        return
    _State.status, _State.status_text = status, _escape(text)
    try:
        yield
    finally:
        _State.status = None
        status.stop()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
