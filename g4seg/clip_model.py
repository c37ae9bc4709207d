"""open_clip models shared by the ``clip`` extractor and the ``sclip`` mask source.

One loading path for both (so that a model that works for one works for the other, offline rules
included), plus the two pieces of SCLIP's method they share: the dense-feature forward of a ViT image
tower (:func:`dense_features`) and SCLIP's sliding-window positions (:func:`window_boxes`).

Weights (option ``pretrained``): an open_clip tag (``openai``), a local checkpoint file
(``.safetensors`` preferred; ``.bin``/``.pt`` are read with ``weights_only=True``), or ``none`` for
random weights. ``model`` is an open_clip name, the path of an open_clip model config ``.json``
(for architectures open_clip does not ship), or a ``local-dir:``/``hf-hub:`` folder/repo holding
``open_clip_config.json`` and its weights (``pretrained`` then only matters as ``none``). Offline,
tags and ``hf-hub:`` repos are read from the local Hugging Face cache only; nothing is downloaded.

Dense-feature recipes (the extractor's option ``recipe``; SCLIP uses ``csa``):

- ``csa`` (SCLIP, ``clip/model.py`` ``VisionTransformer.forward`` + ``custom_attn(csa=True)``): the
  last block's attention weights become softmax(q q^T) + softmax(k k^T); residual, MLP, ``ln_post``
  and the projection are kept.
- ``value`` (MaskCLIP, ``mmseg/models/backbones/vit.py`` lines 94-108 and 430-437 with
  ``configs/_base_/models/maskclip_vit16.py`` ``final_norm=True, return_qkv=True``, head
  ``maskclip_head.py`` line 80 ``feat = self.proj(v)``): each token's own value vector through the
  attention output projection, plus the residual (``v += x``) and the MLP
  (``v = ffn(norm2(v), identity=v)``), then ``ln_post`` and the projection.
- ``tokens``: the unmodified last-layer tokens after ``ln_post`` and the projection (baseline).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from g4seg.console import loading
from g4seg.errors import G4SegError
from g4seg.model_ref import hub_unreachable, no_hub_message
from g4seg.registry import Options, Runtime

if TYPE_CHECKING:
    import torch

Recipe = Literal["csa", "value", "tokens"]
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ClipModelOptions(Options):
    """Which open_clip model and weights (shared by every component that loads an open_clip model)."""

    model: str = Field("ViT-B-16-quickgelu", description="open_clip name, config .json, local-dir: or hf-hub:")
    pretrained: str = Field("openai", description="open_clip tag, checkpoint file, or none (random weights)")
    cache_dir: str | None = Field(None, description="open_clip / Hugging Face cache folder; None = default")


@dataclass
class LoadedClip:
    """A CLIP model on the CPU in float32, the open_clip name that builds it, and its mean/std."""

    model: torch.nn.Module
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_clip(options: ClipModelOptions, runtime: Runtime, kind: str, image_size: int | None = None) -> LoadedClip:
    """Build the model of ``options``; ``image_size`` forces another input side (open_clip then
    interpolates the position embeddings). Every failure is one G4SegError line; ``kind`` is the
    component kind named in its hints (``-o extractor.pretrained=...``)."""
    from g4seg.runtime import is_offline, set_offline

    set_offline(runtime.offline)  # before open_clip imports huggingface_hub
    offline = runtime.offline or is_offline()
    hint = f"-o {kind}.pretrained=/path/to/open_clip_model.safetensors"
    try:
        with loading(f"the CLIP model of the {kind.replace('_', ' ')}", _source(options, offline)):
            model, name = _create_model(options, offline, image_size, hint)
    except G4SegError:
        raise
    except Exception as exc:  # noqa: BLE001 - open_clip raises many types for a bad name/file/checkpoint
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise G4SegError(f"cannot load CLIP model '{options.model}' pretrained '{options.pretrained}': "
                         f"{reason}") from None
    cfg = model.visual.preprocess_cfg
    return LoadedClip(model, name, tuple(cfg["mean"]), tuple(cfg["std"]))


def plain_vit(model: torch.nn.Module, label: str, recipe: Recipe, kind: str) -> torch.nn.Module:
    """The model's image tower, checked to be a plain ViT that ``recipe`` can run on."""
    import torch
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.proj is None:
        raise G4SegError(f"CLIP model '{label}' has no plain ViT image tower; dense features need one "
                         f"(e.g. ViT-B-16-quickgelu)")
    last = visual.transformer.resblocks[-1]
    if recipe != "tokens" and not isinstance(getattr(last, "attn", None), torch.nn.MultiheadAttention):
        fix = "; use -o extractor.recipe=tokens" if kind == "extractor" else ""
        raise G4SegError(f"recipe '{recipe}' needs standard attention blocks, which CLIP model "
                         f"'{label}' does not have{fix}")
    return visual


def on_runtime(module: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """``module`` moved to the runtime's device and dtype, in eval mode, without gradients."""
    import torch

    return module.to(device=runtime.device, dtype=getattr(torch, runtime.dtype)).eval().requires_grad_(False)


def tokenizer(loaded: LoadedClip, cache_dir: str | None) -> Any:
    """The model's own tokenizer (CLIP's BPE ships inside the open_clip wheel: works offline)."""
    import open_clip

    try:
        return open_clip.get_tokenizer(loaded.name, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - e.g. an HF tokenizer that is not cached offline
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise G4SegError(f"cannot load the tokenizer of CLIP model '{loaded.name}': {reason}") from None


# ----- dense features ----------------------------------------------------------------------------

def dense_features(visual: torch.nn.Module, x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Normalised images (B, 3, H, W) at the tower's image size -> L2-normalised (B, C, h, w) float32."""
    import torch.nn.functional as F

    tokens = _last_block(visual, _blocks(visual, _embed(visual, x)), recipe)
    feats = F.normalize((visual.ln_post(tokens[:, 1:]) @ visual.proj).float(), dim=-1)
    h, w = visual.grid_size
    return feats.transpose(1, 2).reshape(x.shape[0], -1, h, w)


def _embed(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    import torch

    x = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def _blocks(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every block but the last, unchanged (batch-first in, batch-first out)."""
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[:-1]:
        x = block(x)
    return x if transformer.batch_first else x.transpose(0, 1)


def _last_block(visual: torch.nn.Module, x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The last block with its token mixing replaced by the recipe's; residual and MLP kept (both
    SCLIP and MaskCLIP keep them)."""
    block = visual.transformer.resblocks[-1]
    if recipe == "tokens":
        batch_first = visual.transformer.batch_first
        return block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    x = x + block.ls_1(_attention_mix(block.attn, block.ln_1(x), recipe))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _attention_mix(attn: torch.nn.MultiheadAttention, y: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """``csa``: q-q + k-k attention (SCLIP ``custom_attn``); ``value``: each token's own value."""
    import torch.nn.functional as F

    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if recipe == "value":
        return attn.out_proj(v)
    batch, length, width = y.shape
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, length, heads, width // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    mixed = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    return attn.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))


def window_boxes(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, ...]]:
    """SCLIP's sliding windows (``clip_segmentor.py`` ``forward_slide``, lines 96-107): (y1, y2, x1, x2)
    for every window, row by row; the last window of a row/column is shifted back to end at the edge."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * h_stride + h_crop, height), min(w_idx * w_stride + w_crop, width)
            boxes.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return boxes


# ----- loading -----------------------------------------------------------------------------------

def _schema(model: str) -> str | None:
    for prefix in ("local-dir:", "hf-hub:"):
        if model.startswith(prefix):
            return prefix[:-1]
    return None


def _source(options: ClipModelOptions, offline: bool) -> str:
    """Where the weights come from, for the loading status."""
    model, pretrained = options.model, options.pretrained
    if pretrained.lower() == "none" and not _schema(model):
        return "random weights"
    if _schema(model) == "local-dir":
        return f"local folder {model[len('local-dir:'):]}"
    if _looks_like_file(pretrained) and not _schema(model):
        return f"local file {pretrained}"
    label = model[len("hf-hub:"):] if _schema(model) else f"{model} {pretrained}"
    return f"the Hub cache ({label})" if offline else f"the Hugging Face Hub or its cache ({label})"


def _looks_like_file(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith(_CHECKPOINT_SUFFIXES) or os.path.isfile(value)


def _register_config(path: str) -> str:
    """Make a model config ``.json`` known to open_clip under its file stem; returns that name."""
    import open_clip

    file = Path(path)
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise G4SegError(f"CLIP model config not found: {file}") from None
    except (OSError, ValueError) as exc:
        raise G4SegError(f"cannot read CLIP model config {file}: {exc}") from None
    if not isinstance(config, dict) or not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise G4SegError(f"{file} is not an open_clip model config (needs embed_dim, vision_cfg and text_cfg; "
                         f"for a folder with open_clip_config.json use model=local-dir:FOLDER)")
    if open_clip.get_model_config(file.stem) != config:
        open_clip.add_model_config(file)
    return file.stem


def _cached_tag_file(cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The checkpoint of a pretrained tag from the local cache only (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            names.insert(0, filename[: -len(".bin")] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if target.is_file():
            return str(target)
    return None


def _tag_file(name: str, tag: str, cache_dir: str | None, offline: bool, hint: str) -> tuple[str, dict[str, Any]]:
    """Resolve an open_clip pretrained tag to a local checkpoint file (downloading only when online)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise G4SegError(f"unknown pretrained tag '{tag}' for CLIP model '{name}' (known tags: {known}); "
                         f"or give a checkpoint file ({hint}) or pretrained=none")
    model_cfg = open_clip.get_model_config(name) or {}
    wanted = bool(cfg.get("quick_gelu", False))
    if wanted != bool(model_cfg.get("quick_gelu", False)):
        fix = f"{name}-quickgelu" if wanted else name.removesuffix("-quickgelu")
        raise G4SegError(f"pretrained '{tag}' was trained with quick_gelu={wanted} but model '{name}' builds "
                         f"quick_gelu={not wanted}; use model '{fix}'")
    if not offline and cfg.get("hf_hub") and hub_unreachable():
        path = _cached_tag_file(cfg, cache_dir)  # no Hub: the cached file, or one line at once (no retry loop)
        if path is None:
            raise G4SegError(no_hub_message(f"CLIP weights for model '{name}' pretrained '{tag}'", hub_unreachable(),
                                            hint))
        return path, cfg
    if offline:
        path = _cached_tag_file(cfg, cache_dir)
        if path is None:
            raise G4SegError(f"CLIP weights for model '{name}' pretrained '{tag}' are not in the local cache and "
                             f"offline mode is on; download them once with network access, or point at a local "
                             f"checkpoint file: {hint}")
        return path, cfg
    try:
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir), cfg
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one user-facing line
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise G4SegError(f"cannot download CLIP weights for model '{name}' pretrained '{tag}' ({reason}); "
                         f"point at a local checkpoint file instead: {hint}") from None


def _offline_hub_folder(model: str, cache_dir: str | None, hint: str) -> str:
    """``hf-hub:org/name`` -> ``local-dir:`` of its cached snapshot, so offline runs never reach the Hub."""
    from huggingface_hub import snapshot_download

    repo = model[len("hf-hub:"):]
    try:
        return "local-dir:" + snapshot_download(repo, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (any flavour of the Hub's "not found")
        raise G4SegError(f"CLIP model '{model}' is not in the local Hugging Face cache and offline mode is on; "
                         f"download it once with network access, or use model=local-dir:FOLDER or a checkpoint "
                         f"file ({hint})") from None


def _create_model(options: ClipModelOptions, offline: bool, image_size: int | None,
                  hint: str) -> tuple[torch.nn.Module, str]:
    import open_clip

    model, pretrained = options.model, options.pretrained
    if model.endswith(".json"):
        model = _register_config(model)
    schema = _schema(model)
    if schema == "hf-hub" and not offline and hub_unreachable():
        try:
            model = _offline_hub_folder(model, options.cache_dir, hint)
        except G4SegError:
            local_copy = hint.split("=")[0].replace(".pretrained", ".model") + "=local-dir:/path/to/folder"
            raise G4SegError(no_hub_message(f"CLIP model '{model}'", hub_unreachable(), local_copy)) from None
        schema = "local-dir"
    if schema == "hf-hub" and offline:
        model = _offline_hub_folder(model, options.cache_dir, hint)
        schema = "local-dir"
    common: dict[str, Any] = {"precision": "fp32", "device": "cpu", "force_image_size": image_size,
                              "cache_dir": options.cache_dir, "pretrained_text": False, "weights_only": True}
    if pretrained.lower() == "none":
        return open_clip.create_model(model, pretrained=None, load_weights=False, **common), model
    if _looks_like_file(pretrained):
        if schema:
            raise G4SegError(f"pretrained='{pretrained}' cannot be combined with model '{options.model}' "
                             f"({schema}: brings its own weights); give an open_clip model name or config .json")
        if not os.path.isfile(pretrained):
            raise G4SegError(f"CLIP checkpoint file not found: {pretrained}")
        return open_clip.create_model(model, pretrained=pretrained, **common), model
    if schema:
        return open_clip.create_model(model, **common), model
    path, cfg = _tag_file(model, pretrained, options.cache_dir, offline, hint)
    norm = {key: cfg[key] for key in ("mean", "std") if key in cfg}
    return open_clip.create_model(model, pretrained=path, force_preprocess_cfg=norm, **common), model
