"""The pluggy hook specifications: one ``register_*`` hook per component kind.

Each component hook receives a ``register`` callback taking a :class:`g4seg.registry.ComponentSpec`;
``register_commands`` receives the Typer app.
Built-in components use exactly these hooks (see :mod:`g4seg.plugins`), as do third parties
through the ``g4seg`` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import typer

hookspec = pluggy.HookspecMarker("g4seg")
hookimpl = pluggy.HookimplMarker("g4seg")

Register = Callable[..., None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register diffusion backbones (encode, noise, one-step x~0, decode)."""


@hookspec
def register_injectors(register: Register) -> None:
    """Register mask injectors (condition the one UNet call on the coarse mask)."""


@hookspec
def register_extractors(register: Register) -> None:
    """Register dense feature extractors used for the correspondence step."""


@hookspec
def register_mask_sources(register: Register) -> None:
    """Register coarse-mask sources (files, training-free segmenters)."""


@hookspec
def register_postprocessors(register: Register) -> None:
    """Register optional post-processors applied after refinement."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register dataset layouts (image list, labels, class names) for dataset runs and evaluation."""


@hookspec
def register_commands(app: "typer.Typer") -> None:
    """Add subcommands to the ``g4seg`` command line (``@app.command()``); called once when the CLI starts."""
