"""The injector ``none``: the UNet call runs unconditioned on the mask (the ablation baseline)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Runtime


class NoneOptions(Options):
    """No options."""


class NoInjection:
    """Leaves the backbone untouched and adds nothing to the UNet call."""

    @contextmanager
    def inject(self, backbone: Any, masks: Any, token_indices: Sequence[Sequence[int]],
               timestep: int, *, guided: bool = False) -> Iterator[dict[str, Any]]:
        """Nothing to install; ``guided`` (classifier-free guidance) is accepted and ignored."""
        yield {}


def _build(options: NoneOptions, runtime: Runtime) -> NoInjection:
    return NoInjection()


@hookimpl
def register_injectors(register):
    register(ComponentSpec(kind="injector", name="none", factory=_build, options=NoneOptions,
                           description="no mask injection (ablation baseline)"))
