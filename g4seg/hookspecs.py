"""The pluggy hook specifications: one ``register_*`` hook per component kind.

Each hook receives a ``register`` callback taking a :class:`g4seg.registry.ComponentSpec`.
Built-in components use exactly these hooks (see :mod:`g4seg.plugins`), as do third parties
through the ``g4seg`` entry-point group.
"""

from __future__ import annotations

from typing import Callable

import pluggy

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
