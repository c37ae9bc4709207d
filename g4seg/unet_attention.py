"""Where each attention layer of a diffusers ``UNet2DConditionModel`` attends, for a given latent size.

Injectors need, per processor name, whether the layer is self- or cross-attention and the (h, w)
token grid its queries live on, so masks can be resized to that grid. Both are read from the UNet's
structure, not from a table per model family: ``down_blocks[i]`` attend at the latent halved once
per downsampler before them (ceil division, like the stride-2 padded convs), the mid block at the
lowest level, and ``up_blocks[i]`` at the mirrored level (the UNet upsamples to the skip's size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from g4seg.components import AttentionLayer

if TYPE_CHECKING:
    import torch

_SUFFIX = ".processor"


def level_grids(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Token grid of each down level: entry i is the feature size seen by ``down_blocks[i]``."""
    h, w = latent_hw
    grids = []
    for block in unet.down_blocks:
        grids.append((h, w))
        if getattr(block, "downsamplers", None):
            h, w = -(-h // 2), -(-w // 2)
    return grids


def _level(name: str, depth: int) -> int:
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return depth - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return depth - 1
    raise ValueError(f"cannot place attention processor '{name}': not inside down_blocks, mid_block or up_blocks")


def attention_layers(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> list[AttentionLayer]:
    """One :class:`AttentionLayer` per key of ``unet.attn_processors``, in the UNet's own order.

    The kind comes from the attention module itself (``is_cross_attention``): ``attn1`` is "self"
    and ``attn2`` is "cross" in every SD/SDXL UNet, and odd configurations are still reported right.
    """
    model = getattr(unet, "_orig_mod", unet)  # a torch.compile wrapper keeps the structure inside
    grids = level_grids(model, latent_hw)
    layers = []
    for name in model.attn_processors:
        module = model.get_submodule(name[: -len(_SUFFIX)])
        kind = "cross" if module.is_cross_attention else "self"
        layers.append(AttentionLayer(name=name, kind=kind, grid=grids[_level(name, len(grids))]))
    return layers
