"""Latent Consistency Model backbone (an SD1.5-architecture UNet distilled with a guidance input).

LCM has no classifier-free guidance branch: the guidance scale w enters the UNet as ``timestep_cond``,
a sinusoidal embedding of (w - 1) * 1000, exactly as diffusers' LatentConsistencyModelPipeline builds it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

from pydantic import Field

from g4seg.builtin.backbone_sd import MODEL_HELP, SDBackbone, SDOptions
from g4seg.components import Conditioning
from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Runtime

if TYPE_CHECKING:
    import torch


class LCMOptions(SDOptions):
    model: str = Field("SimianLuo/LCM_Dreamshaper_v7", description=MODEL_HELP)
    guidance_scale: float = Field(8.0, ge=1.0, description="guidance scale w, embedded as the UNet's timestep_cond")


def guidance_embedding(w: float, dim: int) -> torch.Tensor:
    """(1, dim) sinusoidal embedding of w * 1000: sines then cosines, frequencies 10000^(-i/(dim/2 - 1))."""
    import torch

    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angles = w * 1000.0 * freqs
    emb = torch.cat([torch.sin(angles), torch.cos(angles)])
    return torch.nn.functional.pad(emb, (0, dim % 2))[None]


class LCMBackbone(SDBackbone):
    """An LCM-distilled SD UNet: the guidance embedding is part of every prompt's conditioning."""

    scheduler_class = "LCMScheduler"

    def __init__(self, options: LCMOptions, runtime: Runtime) -> None:
        super().__init__(options, runtime)
        self.guidance_scale = options.guidance_scale
        if self.unet.config.time_cond_proj_dim is None:
            raise G4SegError(f"model '{self.model_ref}' has no guidance input (time_cond_proj_dim): it is not an "
                             f"LCM-distilled UNet; use the sd15 backbone for it")

    def encode_prompts(self, prompts: Sequence[str], image_hw: tuple[int, int]) -> Conditioning:
        cond = super().encode_prompts(prompts, image_hw)
        w_emb = guidance_embedding(self.guidance_scale - 1, self.unet.config.time_cond_proj_dim)
        cond.unet_kwargs["timestep_cond"] = w_emb.to(self.device, self.dtype).repeat(len(prompts), 1)
        return cond


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    register(ComponentSpec(
        kind="backbone", name="lcm", factory=LCMBackbone, options=LCMOptions,
        tags=frozenset({"unet-attention", "family:lcm", "guidance:embedded"}),
        description="Latent Consistency Model (LCM_Dreamshaper_v7, 512 px, guidance via timestep_cond)"))
