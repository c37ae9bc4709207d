"""Stable Diffusion XL backbone: two text encoders and the added text/time conditions.

Conditioning follows StableDiffusionXLPipeline without classifier-free guidance: the penultimate
hidden states of both encoders concatenated, the pooled projection of the second as ``text_embeds``,
and ``time_ids`` = (original size, crop top-left (0, 0), target size), all passed to the UNet through
``added_cond_kwargs``. The SDXL VAE overflows in float16, so a VAE whose config asks for
``force_upcast`` runs in float32 when the runtime dtype is float16 (or pass ``vae`` =
``madebyollin/sdxl-vae-fp16-fix``, whose config does not ask for it).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pydantic import Field

from g4seg.builtin.backbone_sd import MODEL_HELP, TAESD_HELP, SDBackbone, SDOptions
from g4seg.components import Conditioning
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec


class SDXLOptions(SDOptions):
    model: str = Field("stabilityai/stable-diffusion-xl-base-1.0", description=MODEL_HELP)
    taesd_model: str | None = Field("madebyollin/taesdxl", description=TAESD_HELP)


class SDXLBackbone(SDBackbone):
    """SDXL base: CLIPTextModel + CLIPTextModelWithProjection, 'text_time' added conditions."""

    def _load_text(self, load: Callable[..., Any]) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        super()._load_text(load)
        self.tokenizer_2 = load(CLIPTokenizer, subfolder="tokenizer_2")
        self.text_encoder_2 = self._ready(
            load(CLIPTextModelWithProjection, subfolder="text_encoder_2", dtype=self.dtype))

    def _offloaded(self) -> dict[str, Any]:
        return {"text_encoder_2": self.text_encoder_2, **super()._offloaded()}

    def _upcast_vae(self, vae: Any) -> bool:
        import torch

        return self.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))

    def encode_prompts(self, prompts: Sequence[str], image_hw: tuple[int, int]) -> Conditioning:
        import torch

        first = self.text_encoder(self._token_ids(self.tokenizer, prompts), output_hidden_states=True)
        second = self.text_encoder_2(self._token_ids(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        height, width = image_hw
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        added = {"text_embeds": second.text_embeds.to(self.dtype), "time_ids": time_ids.repeat(len(prompts), 1)}
        return Conditioning(hidden.to(self.dtype), {"added_cond_kwargs": added})


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    register(ComponentSpec(
        kind="backbone", name="sdxl", factory=SDXLBackbone, options=SDXLOptions,
        tags=frozenset({"unet-attention", "family:sdxl"}),
        description="Stable Diffusion XL base 1.0 (1024 px, epsilon, two text encoders)"))
