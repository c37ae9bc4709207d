"""A tiny random DINOv2 ViT (timm's real ``VisionTransformer``) saved as timm's local model folder.

The folder holds timm's ``config.json`` (architecture ``vit_base_patch14_dinov2`` with small model
arguments, and a ``pretrained_cfg`` with its own mean/std) and ``model.safetensors``: the ``dino``
extractor loads it with ``model=local-dir:<folder>`` exactly as a user's local timm model, and
``model.safetensors`` doubles as a checkpoint file for ``pretrained=<file>``. The mean/std are not
ImageNet's, so a test can tell which normalisation was applied; the linear weights and layer scales
are re-drawn at unit gain (timm initialises them at std 0.02 and 1e-5), so every block changes the tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCHITECTURE = "vit_base_patch14_dinov2"
WEIGHTS_NAME = "model.safetensors"
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
TINY_ARGS: dict[str, Any] = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 56}  # patch 14: 4 x 4 grid


def tiny_dino_config(registers: int = 0) -> dict[str, Any]:
    """timm's ``config.json`` for the tiny model (``registers`` > 0 adds DINOv2 register tokens)."""
    args = {**TINY_ARGS, **({"reg_tokens": registers, "no_embed_class": True} if registers else {})}
    return {"architecture": ARCHITECTURE, "num_classes": 0, "model_args": args,
            "pretrained_cfg": {"input_size": [3, TINY_ARGS["img_size"], TINY_ARGS["img_size"]],
                               "interpolation": "bicubic", "mean": list(MEAN), "std": list(STD), "num_classes": 0,
                               "first_conv": "patch_embed.proj", "classifier": "head"}}


def save_tiny_dino(path: str | Path, seed: int = 0, registers: int = 0) -> dict[str, str]:
    """Write a tiny random DINOv2 ViT into ``path``; return the ``dino`` extractor options that load it
    (strings, ready for ``-o extractor.model=...``)."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_dino_config(registers)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(ARCHITECTURE, pretrained=False, **config["model_args"])
        for module in model.modules():  # timm's ViT init (std 0.02, layer scales 1e-5) makes blocks near no-ops
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                torch.nn.init.uniform_(param, 0.5, 1.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))
    return {"model": f"local-dir:{folder}"}
