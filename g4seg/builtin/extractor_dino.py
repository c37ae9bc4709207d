"""Extractor ``dino``: dense, L2-normalised patch tokens of a timm DINO / DINOv2 ViT.

Model (option ``model``): a timm model name, default ``vit_base_patch14_dinov2.lvd142m`` (DESIGN.md
section 5); any timm ``VisionTransformer`` works, e.g. ``vit_small_patch14_reg4_dinov2.lvd142m`` (with
register tokens) or ``vit_small_patch16_224.dino`` (DINO v1). timm's own ``hf-hub:org/name`` and
``local-dir:FOLDER`` forms name a repo or folder holding timm's ``config.json`` (architecture, model
arguments, mean/std) and ``model.safetensors``.

Weights (option ``pretrained``):

- ``default``: timm's pretrained weights of the model (the tag in its name, else timm's default tag),
  loaded by timm from the Hugging Face Hub and its cache; for ``hf-hub:``/``local-dir:`` the weights
  in the repo or folder. Offline (``--offline``, the Hub's offline variables, or a Hub that does not
  answer) only the local cache is read, and a model that is not cached is one error line.
- a timm pretrained tag (``lvd142m``) for a model name given without one.
- a checkpoint file: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``;
  timm's layout or the original DINO/DINOv2 one (timm's ViT checkpoint filter converts it and resizes
  the position embeddings), loaded strictly into the architecture ``model`` names.
- ``none``: random weights (tests, smoke runs).

Input geometry. The model is built with ``dynamic_img_size=True``, so timm interpolates its position
embeddings to any patch grid; the image only has to be a whole number of patches. *Decision:* each
side is resized (bicubic with antialiasing, DINOv2's ``pretrained_cfg`` interpolation) to the
*nearest* multiple of the patch size, after scaling the short side to ``short_side`` (aspect kept)
when that option is set. Rounding moves a side by at most half a patch (7 px for patch 14) instead of
cropping content away or padding it with pixels that are not the image; the refiner's 512 x 512 input
becomes 518 x 518, DINOv2's own 37 x 37 grid. An input side smaller than one patch is an error:
resizing it up would invent the patch. Pixels are then normalised with the model's own mean/std
(its ``pretrained_cfg``).

Output: the patch tokens of block ``layer`` (default -1, the last; negative counts from the end) after
the model's final LayerNorm, i.e. for the last block exactly timm's ``forward_features`` with the CLS
and register tokens dropped, L2-normalised over channels: (B, C, H' / p, W' / p) float32. The last
layer is the standard DINOv2 dense feature; earlier layers are an option for ablations.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import Field

from g4seg.console import loading
from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.model_ref import hub_unreachable, no_hub_message
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "vit_base_patch14_dinov2.lvd142m"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a Hub repo, in order


class DinoOptions(Options):
    """Which timm ViT and weights, the input's short side, and the block whose tokens are used."""

    model: str = Field(DEFAULT_MODEL, description="timm ViT name, hf-hub:org/name or local-dir:FOLDER")
    pretrained: str = Field("default", description="default (timm's weights), a timm tag, a checkpoint file, "
                                                   "or none (random weights)")
    short_side: int | None = Field(None, ge=1, description="resize the short side to this first; None = keep "
                                                            "the size (each side goes to the nearest patch multiple)")
    layer: int = Field(-1, description="block whose patch tokens are used; -1 = the last, negative from the end")
    cache_dir: str | None = Field(None, description="Hugging Face cache folder; None = the default")


class DinoExtractor:
    """Callable (B, 3, H, W) in [0, 1] -> L2-normalised (B, C, h, w) patch tokens of one block."""

    def __init__(self, model: torch.nn.Module, block: int, short_side: int | None = None) -> None:
        import torch

        param = next(model.parameters())
        self.model, self.block, self.short_side = model, block, short_side
        self.device, self.dtype = param.device, param.dtype
        cfg = model.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def patch(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The model input's (H, W): the short side scaled to ``short_side`` if set, then each side rounded to
        the nearest multiple of the patch (at least one patch)."""
        scale = self.short_side / min(height, width) if self.short_side else 1.0
        return tuple(max(1, int(side * scale / p + 0.5)) * p for side, p in zip((height, width), self.patch))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if images.ndim != 4 or images.shape[1] != 3:
            raise G4SegError(f"dino extractor expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        (height, width), (ph, pw) = images.shape[-2:], self.patch
        if height < ph or width < pw:
            raise G4SegError(f"dino extractor: input {height}x{width} is smaller than one {ph}x{pw} patch")
        with torch.inference_mode():
            x = images.to(self.device, torch.float32)
            size = self.input_size(height, width)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            x = ((x - self.mean) / self.std).to(self.dtype)
            (tokens,) = self.model.forward_intermediates(x, indices=[self.block], norm=True, stop_early=True,
                                                         output_fmt="NCHW", intermediates_only=True)
            return F.normalize(tokens.float(), dim=1)


def build_dino_extractor(options: DinoOptions, runtime: Runtime) -> DinoExtractor:
    from g4seg.clip_model import on_runtime

    model = load_dino(options, runtime)
    depth = len(model.blocks)
    if not -depth <= options.layer < depth:
        raise G4SegError(f"dino extractor: layer {options.layer} does not exist; model '{options.model}' has "
                         f"{depth} blocks (use 0..{depth - 1} or -1..-{depth})")
    return DinoExtractor(on_runtime(model, runtime), options.layer % depth, options.short_side)


# ----- loading -----------------------------------------------------------------------------------

def load_dino(options: DinoOptions, runtime: Runtime) -> torch.nn.Module:
    """The timm ViT of ``options`` on the CPU in float32; every failure is one G4SegError line."""
    from g4seg.runtime import is_offline, set_offline

    set_offline(runtime.offline)  # before timm imports huggingface_hub
    offline = runtime.offline or is_offline()
    try:
        with loading("the DINO model of the extractor", _source(options, offline)):
            model = _create_model(options, offline)
    except G4SegError:
        raise
    except Exception as exc:  # noqa: BLE001 - timm raises many types for a bad name/file/checkpoint
        if isinstance(exc, TypeError) and "dynamic_img_size" in str(exc):  # a CNN or another non-ViT family
            raise G4SegError(_not_a_vit(options.model)) from None
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise G4SegError(f"cannot load DINO model '{options.model}' pretrained '{options.pretrained}': "
                         f"{reason}") from None
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise G4SegError(_not_a_vit(options.model))
    return model


def _not_a_vit(model: str) -> str:
    return (f"timm model '{model}' is not a VisionTransformer; the dino extractor needs a ViT's patch tokens "
            f"(e.g. {DEFAULT_MODEL})")


def _schema(model: str) -> str | None:
    for prefix in ("local-dir:", "hf-hub:"):
        if model.startswith(prefix):
            return prefix[:-1]
    return None


def _looks_like_file(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith(_CHECKPOINT_SUFFIXES) or os.path.isfile(value)


def _source(options: DinoOptions, offline: bool) -> str:
    """Where the weights come from, for the loading status."""
    model, pretrained = options.model, options.pretrained
    if pretrained.lower() == "none":
        return "random weights"
    if _looks_like_file(pretrained):
        return f"local file {pretrained}"
    if _schema(model) == "local-dir":
        return f"local folder {model[len('local-dir:'):]}"
    return f"the Hub cache ({model})" if offline else f"the Hugging Face Hub or its cache ({model})"


def _create_model(options: DinoOptions, offline: bool) -> torch.nn.Module:
    import timm

    name, weights = options.model, options.pretrained
    schema = _schema(name)
    if schema == "local-dir" and not os.path.isdir(name[len("local-dir:"):]):
        raise G4SegError(f"DINO model folder '{name[len('local-dir:'):]}' (from extractor.model) does not exist")
    if schema == "hf-hub" and (offline or hub_unreachable()):
        name = _offline_hub_folder(name, options.cache_dir, offline)
        schema = "local-dir"
    common: dict[str, Any] = {"dynamic_img_size": True, "cache_dir": options.cache_dir}
    if weights.lower() == "none":
        return timm.create_model(name, pretrained=False, **common)
    if _looks_like_file(weights):
        if not os.path.isfile(weights):
            raise G4SegError(f"DINO checkpoint file not found: {weights}")
        model = timm.create_model(name, pretrained=False, **common)
        _load_file(model, weights, options.model)
        return model
    if weights != "default":  # a timm pretrained tag
        arch, _, tag = name.partition(".")
        if schema or (tag and tag != weights):
            raise G4SegError(f"pretrained='{weights}' is a tag, but model '{options.model}' already names its "
                             f"weights; use pretrained=default, a checkpoint file, or none")
        name = f"{arch}.{weights}"
    if schema or not (offline or hub_unreachable()):
        return timm.create_model(name, pretrained=True, **common)
    cached = _cached_weights(name, options.cache_dir, offline)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **common)


def _load_file(model: torch.nn.Module, path: str, label: str) -> None:
    """Load a checkpoint strictly (timm's ViT filter converts original DINO/DINOv2 keys first)."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(load_state_dict(path, weights_only=True), model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: torch lists them one per line after a header
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise G4SegError(f"checkpoint {path} does not fit DINO model '{label}': "
                         f"{'; '.join(lines[:2]) or exc}{' ...' if len(lines) > 2 else ''}") from None
    if missing or unexpected:
        details = "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise G4SegError(f"checkpoint {path} does not fit DINO model '{label}': {details}")


def _offline_message(what: str, offline: bool, local_copy: str) -> str:
    unreachable = None if offline else hub_unreachable()
    if unreachable:
        return no_hub_message(what, unreachable, local_copy)
    return (f"{what} is not in the local Hugging Face cache and offline mode is on; download it once with network "
            f"access, or use a local copy ({local_copy})")


def _offline_hub_folder(model: str, cache_dir: str | None, offline: bool) -> str:
    """``hf-hub:org/name`` -> ``local-dir:`` of its cached snapshot, so offline runs never reach the Hub."""
    from huggingface_hub import snapshot_download

    try:
        return "local-dir:" + snapshot_download(model[len("hf-hub:"):], cache_dir=cache_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (any flavour of the Hub's "not found")
        raise G4SegError(_offline_message(f"DINO model '{model}'", offline,
                                          "-o extractor.model=local-dir:/path/to/folder")) from None


def _cached_weights(name: str, cache_dir: str | None, offline: bool) -> str:
    """The cached checkpoint of a timm model's pretrained weights (Hub repo, else torch hub's folder)."""
    import torch
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise G4SegError(f"timm model '{name}' has no pretrained weights; give a checkpoint file or pretrained=none")
    if cfg.hf_hub_id:
        for filename in _HUB_WEIGHT_FILES:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if cfg.url:
        target = os.path.join(cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints"), os.path.basename(cfg.url))
        if os.path.isfile(target):
            return target
    raise G4SegError(_offline_message(f"the weights of DINO model '{name}'", offline,
                                      "-o extractor.pretrained=/path/to/checkpoint.safetensors"))


@hookimpl
def register_extractors(register):
    register(ComponentSpec(kind="extractor", name="dino", aliases=("dinov2",), factory=build_dino_extractor,
                           options=DinoOptions, tags=frozenset({"features:dense"}),
                           description="timm DINO / DINOv2 ViT patch tokens"))
