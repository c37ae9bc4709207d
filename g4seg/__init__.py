"""g4seg: training-free refinement of coarse segmentation masks with one diffusion step (G4Seg).

Two lines::

    refiner = g4seg.Refiner.from_names("sd21", "attn", "clip")
    result = refiner.refine(image, coarse_probs, ["cat"])

Heavy modules are imported on first use so that ``import g4seg`` and the CLI start fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
# the plugin API: hook names and signatures, ComponentSpec, Options, Runtime and the component protocols;
# raised when one of them changes incompatibly (docs/plugins.md)
PLUGIN_API = 1
__all__ = ["PLUGIN_API", "RefineConfig", "RefineItem", "RefineResult", "Refiner", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Refiner", "RefineResult", "RefineItem"):
        from g4seg import refiner

        return getattr(refiner, name)
    if name == "RefineConfig":
        from g4seg.config import RefineConfig

        return RefineConfig
    raise AttributeError(name)
