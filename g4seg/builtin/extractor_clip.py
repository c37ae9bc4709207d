"""Extractor ``clip``: dense, L2-normalised patch features from an open_clip ViT image tower.

Dense-feature recipe (option ``recipe``). CLIP's plain last-layer patch tokens are spatially noisy:
the last block's query-key attention pulls every token toward a few global "sink" tokens, so
nearby and far-away patches look alike, which is exactly what a pixel correspondence must not do.

- ``csa`` (default, SCLIP): the last block's attention weights become softmax(q q^T) + softmax(k k^T)
  (correlative self-attention); residual, MLP, ``ln_post`` and the projection are kept as SCLIP does.
  Each token then mixes with tokens that look like itself, which keeps features local yet smooth
  within a region. Of the training-free CLIP baselines the paper refines (Table I), SCLIP's features
  segment best (VOC12 59.1 mIoU vs 38.8 for MaskCLIP), so it is the default for matching.
- ``value`` (MaskCLIP): each token's own value vector through the attention output projection, with
  no residual and no MLP, then ``ln_post`` and the projection. Most local, noisiest.
- ``tokens``: the unmodified last-layer patch tokens after ``ln_post`` and the projection (baseline).

Images are resized to ``input_size`` (the position embeddings are interpolated to the larger patch
grid by open_clip when the checkpoint is loaded) and normalised with the model's mean/std.

Weights (option ``pretrained``): an open_clip tag (``openai``), a local checkpoint file
(``.safetensors`` preferred; ``.bin``/``.pt`` are read with ``weights_only=True``), or ``none`` for
random weights. ``model`` is an open_clip name, the path of an open_clip model config ``.json``
(for architectures open_clip does not ship), or a ``local-dir:``/``hf-hub:`` folder/repo holding
``open_clip_config.json`` and its weights (``pretrained`` then only matters as ``none``). Offline,
tags and ``hf-hub:`` repos are read from the local Hugging Face cache only; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    import torch

_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_LOCAL_HINT = "-o extractor.pretrained=/path/to/open_clip_model.safetensors"


class ClipOptions(Options):
    """Which open_clip model and weights, the input side, and the dense-feature recipe."""

    model: str = "ViT-B-16-quickgelu"
    pretrained: str = "openai"
    input_size: int = Field(512, ge=1, description="square side images are resized to")
    recipe: Literal["csa", "value", "tokens"] = "csa"
    cache_dir: str | None = Field(None, description="open_clip / Hugging Face cache folder; None = default")


class ClipExtractor:
    """Callable (B, 3, H, W) in [0, 1] -> L2-normalised (B, C, h, w) patch features."""

    def __init__(self, visual: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 input_size: int, recipe: str, device: str, dtype: torch.dtype) -> None:
        import torch

        self.visual = visual
        self.input_size = input_size
        self.recipe = recipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if images.ndim != 4 or images.shape[1] != 3:
            raise G4SegError(f"clip extractor expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        with torch.inference_mode():
            x = images.to(self.device, torch.float32)
            size = (self.input_size, self.input_size)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            x = ((x - self.mean) / self.std).to(self.dtype)
            tokens = self._last_block(self._blocks(self._embed(x)))
            feats = self.visual.ln_post(tokens[:, 1:]) @ self.visual.proj
            feats = F.normalize(feats.float(), dim=-1)
            h, w = self.grid
            return feats.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Every block but the last, unchanged (batch-first in, batch-first out)."""
        transformer = self.visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in transformer.resblocks[:-1]:
            x = block(x)
        return x if transformer.batch_first else x.transpose(0, 1)

    def _last_block(self, x: torch.Tensor) -> torch.Tensor:
        block = self.visual.transformer.resblocks[-1]
        if self.recipe == "tokens":
            batch_first = self.visual.transformer.batch_first
            return block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        mixed = _attention_mix(block.attn, block.ln_1(x), self.recipe)
        if self.recipe == "value":
            return mixed
        x = x + block.ls_1(mixed)
        return x + block.ls_2(block.mlp(block.ln_2(x)))


def _attention_mix(attn: torch.nn.MultiheadAttention, y: torch.Tensor, recipe: str) -> torch.Tensor:
    """The last block's token mixing for ``csa`` (q-q + k-k attention) or ``value`` (own value only)."""
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


def _schema(model: str) -> str | None:
    for prefix in ("local-dir:", "hf-hub:"):
        if model.startswith(prefix):
            return prefix[:-1]
    return None


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


def _tag_file(name: str, tag: str, cache_dir: str | None, offline: bool) -> tuple[str, dict[str, Any]]:
    """Resolve an open_clip pretrained tag to a local checkpoint file (downloading only when online)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise G4SegError(f"unknown pretrained tag '{tag}' for CLIP model '{name}' (known tags: {known}); "
                         f"or give a checkpoint file ({_LOCAL_HINT}) or pretrained=none")
    model_cfg = open_clip.get_model_config(name) or {}
    wanted = bool(cfg.get("quick_gelu", False))
    if wanted != bool(model_cfg.get("quick_gelu", False)):
        fix = f"{name}-quickgelu" if wanted else name.removesuffix("-quickgelu")
        raise G4SegError(f"pretrained '{tag}' was trained with quick_gelu={wanted} but model '{name}' builds "
                         f"quick_gelu={not wanted}; use model '{fix}'")
    if offline:
        path = _cached_tag_file(cfg, cache_dir)
        if path is None:
            raise G4SegError(f"CLIP weights for model '{name}' pretrained '{tag}' are not in the local cache and "
                             f"offline mode is on; download them once with network access, or point at a local "
                             f"checkpoint file: {_LOCAL_HINT}")
        return path, cfg
    try:
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir), cfg
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one user-facing line
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise G4SegError(f"cannot download CLIP weights for model '{name}' pretrained '{tag}' ({reason}); "
                         f"point at a local checkpoint file instead: {_LOCAL_HINT}") from None


def _offline_hub_folder(model: str, cache_dir: str | None) -> str:
    """``hf-hub:org/name`` -> ``local-dir:`` of its cached snapshot, so offline runs never reach the Hub."""
    from huggingface_hub import snapshot_download

    repo = model[len("hf-hub:"):]
    try:
        return "local-dir:" + snapshot_download(repo, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (any flavour of the Hub's "not found")
        raise G4SegError(f"CLIP model '{model}' is not in the local Hugging Face cache and offline mode is on; "
                         f"download it once with network access, or use model=local-dir:FOLDER or a checkpoint "
                         f"file ({_LOCAL_HINT})") from None


def _create_model(options: ClipOptions, offline: bool) -> torch.nn.Module:
    import open_clip

    model, pretrained = options.model, options.pretrained
    if model.endswith(".json"):
        model = _register_config(model)
    schema = _schema(model)
    if schema == "hf-hub" and offline:
        model = _offline_hub_folder(model, options.cache_dir)
        schema = "local-dir"
    common: dict[str, Any] = {"precision": "fp32", "device": "cpu", "force_image_size": options.input_size,
                              "cache_dir": options.cache_dir, "pretrained_text": False, "weights_only": True}
    if pretrained.lower() == "none":
        return open_clip.create_model(model, pretrained=None, load_weights=False, **common)
    if _looks_like_file(pretrained):
        if schema:
            raise G4SegError(f"pretrained='{pretrained}' cannot be combined with model '{options.model}' "
                             f"({schema}: brings its own weights); give an open_clip model name or config .json")
        if not os.path.isfile(pretrained):
            raise G4SegError(f"CLIP checkpoint file not found: {pretrained}")
        return open_clip.create_model(model, pretrained=pretrained, **common)
    if schema:
        return open_clip.create_model(model, **common)
    path, cfg = _tag_file(model, pretrained, options.cache_dir, offline)
    norm = {key: cfg[key] for key in ("mean", "std") if key in cfg}
    return open_clip.create_model(model, pretrained=path, force_preprocess_cfg=norm, **common)


def _visual_tower(model: torch.nn.Module, options: ClipOptions) -> torch.nn.Module:
    import torch
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.proj is None:
        raise G4SegError(f"CLIP model '{options.model}' has no plain ViT image tower; dense features need one "
                         f"(e.g. ViT-B-16-quickgelu)")
    last = visual.transformer.resblocks[-1]
    if options.recipe != "tokens" and not isinstance(getattr(last, "attn", None), torch.nn.MultiheadAttention):
        raise G4SegError(f"recipe '{options.recipe}' needs standard attention blocks, which CLIP model "
                         f"'{options.model}' does not have; use -o extractor.recipe=tokens")
    if options.input_size < visual.patch_size[0]:
        raise G4SegError(f"input_size {options.input_size} is smaller than the patch size {visual.patch_size[0]}")
    return visual


def _build(options: ClipOptions, runtime: Runtime) -> ClipExtractor:
    from g4seg.runtime import is_offline, set_offline

    set_offline(runtime.offline)  # before open_clip imports huggingface_hub
    import torch

    offline = runtime.offline or is_offline()
    try:
        model = _create_model(options, offline)
    except G4SegError:
        raise
    except Exception as exc:  # noqa: BLE001 - open_clip raises many types for a bad name/file/checkpoint
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise G4SegError(f"cannot load CLIP model '{options.model}' pretrained '{options.pretrained}': "
                         f"{reason}") from None
    visual = _visual_tower(model, options)
    dtype = getattr(torch, runtime.dtype)
    visual = visual.to(device=runtime.device, dtype=dtype).eval().requires_grad_(False)
    cfg = visual.preprocess_cfg
    return ClipExtractor(visual, tuple(cfg["mean"]), tuple(cfg["std"]), options.input_size, options.recipe,
                         runtime.device, dtype)


@hookimpl
def register_extractors(register):
    register(ComponentSpec(kind="extractor", name="clip", aliases=("open_clip",), factory=_build,
                           options=ClipOptions, tags=frozenset({"features:dense"}),
                           description="open_clip ViT dense patch features (SCLIP/MaskCLIP recipes)"))
