"""Extractor ``clip``: dense, L2-normalised patch features from an open_clip ViT image tower.

Dense-feature recipe (option ``recipe``; the math lives in :mod:`g4seg.clip_model`). CLIP's plain
last-layer patch tokens are spatially noisy: the last block's query-key attention pulls every token
toward a few global "sink" tokens, so nearby and far-away patches look alike, which is exactly what a
pixel correspondence must not do.

- ``csa`` (default, SCLIP): the last block's attention weights become softmax(q q^T) + softmax(k k^T)
  (correlative self-attention); residual, MLP, ``ln_post`` and the projection are kept as SCLIP does.
  Each token then mixes with tokens that look like itself, which keeps features local yet smooth
  within a region. Of the training-free CLIP baselines the paper refines (Table I), SCLIP's features
  segment best (VOC12 59.1 mIoU vs 38.8 for MaskCLIP), so it is the default for matching.
- ``value`` (MaskCLIP, exactly as the official code: ``mmseg/models/backbones/vit.py`` lines 94-108,
  ``TransformerEncoderLayer.forward`` with ``return_qkv``, and lines 430-437, final norm on ``v``):
  each token's own value vector through the attention output projection, plus the residual
  (``v += x``) and the MLP (``v = ffn(norm2(v), identity=v)``), then ``ln_post`` and the projection.
- ``tokens``: the unmodified last-layer patch tokens after ``ln_post`` and the projection (baseline).

Input geometry (option ``geometry``):

- ``sliding`` (default, SCLIP's geometry; DESIGN.md section 2): the image is resized, bilinear without
  antialiasing as SCLIP's mmcv ``Resize`` (cv2 ``INTER_LINEAR``) does, so that its short side is
  ``short_side`` (default 1.5 x the model's native image size: 336 for ViT-B/16, SCLIP's VOC setting)
  keeping the aspect ratio. Windows of the model's native size (224 for ViT-B/16; no position-embedding
  interpolation, the model is built at its own size) slide with ``stride`` (default half the window,
  112), placed exactly as SCLIP's ``forward_slide`` places them. Each window's features (the recipe's,
  L2-normalised per window) are averaged where windows overlap and L2-normalised again; the output is
  the patch grid of the resized image. *Small decision:* both resized sides are rounded to a multiple
  of the patch size (SCLIP rounds to whole pixels). Then every window offset, including the last one
  shifted back to the edge, lands on the patch grid, so overlapping windows describe the same patches
  and averaging them needs no resampling; the aspect ratio changes by less than half a patch.
- ``whole``: the image is resized to ``input_size`` x ``input_size`` (bicubic, antialiased) and run
  once; open_clip interpolates the position embeddings to that grid when the model is loaded.

Images are normalised with the model's mean/std. Weights and model names: see :mod:`g4seg.clip_model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from g4seg.clip_model import ClipModelOptions, Recipe, dense_features, load_clip, on_runtime, plain_vit, window_boxes
from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Runtime

if TYPE_CHECKING:
    import torch

_WINDOWS_PER_CALL = 16  # windows (of every image in the batch) run through the tower at once


class ClipOptions(ClipModelOptions):
    """Which open_clip model and weights, the input geometry, and the dense-feature recipe."""

    recipe: Recipe = Field("csa", description="last-block recipe: csa (SCLIP), value (MaskCLIP), tokens")
    geometry: Literal["sliding", "whole"] = Field("sliding", description="SCLIP's sliding windows, or one "
                                                                          "whole-image pass at input_size")
    short_side: int | None = Field(None, ge=1, description="sliding: short side images are resized to; "
                                                            "None = 1.5 x the model's image size (336)")
    stride: int | None = Field(None, ge=1, description="sliding: window stride in pixels, a multiple of the "
                                                        "patch size; None = half the window (112)")
    input_size: int = Field(512, ge=1, description="whole: square side images are resized to")


class ClipExtractor:
    """Callable (B, 3, H, W) in [0, 1] -> L2-normalised (B, C, h, w) patch features.

    ``short_side``/``stride`` given = sliding geometry (windows of the tower's own image size),
    None = one whole pass at the tower's (forced) image size.
    """

    def __init__(self, visual: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...], recipe: Recipe,
                 short_side: int | None = None, stride: int | None = None) -> None:
        import torch

        param = next(visual.parameters())
        self.visual, self.recipe = visual, recipe
        self.device, self.dtype = param.device, param.dtype
        self.short_side, self.stride = short_side, stride
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._dense = dense_features  # the tower's forward with the recipe; compile_models() compiles it

    def compile_models(self, backend: str | None = None) -> list[str]:
        """``torch.compile`` (static shapes) of the tower's forward with the recipe (it calls the tower's blocks
        one by one, so the function is compiled, not the module). Returns what was compiled."""
        from g4seg.acceleration import compile_function

        self._dense = compile_function(dense_features, backend)
        return ["extractor"]

    @property
    def window(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def patch(self) -> int:
        return self.visual.patch_size[0]

    @property
    def sliding(self) -> bool:
        return self.short_side is not None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Sliding geometry: short side -> ``short_side``, aspect kept, both sides rounded to patches."""
        scale, p = self.short_side / min(height, width), self.patch
        return tuple(max(1, int(side * scale / p + 0.5)) * p for side in (height, width))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if images.ndim != 4 or images.shape[1] != 3:
            raise G4SegError(f"clip extractor expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        with torch.inference_mode():
            x = images.to(self.device, torch.float32)
            if self.sliding:
                size = self.resized_size(*x.shape[-2:])
                if tuple(x.shape[-2:]) != size:
                    x = F.interpolate(x, size=size, mode="bilinear", antialias=False, align_corners=False)
                return self._slide(((x - self.mean) / self.std).to(self.dtype))
            size = self.window
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            return self._dense(self.visual, ((x - self.mean) / self.std).to(self.dtype), self.recipe)

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        """Average each window's features on the patch grid of ``x``, then L2-normalise."""
        import torch
        import torch.nn.functional as F

        batch, p = x.shape[0], self.patch
        boxes = window_boxes(x.shape[2], x.shape[3], self.window, (self.stride, self.stride))
        total = torch.zeros(batch, self.visual.proj.shape[1], x.shape[2] // p, x.shape[3] // p, device=self.device)
        count = torch.zeros(1, 1, *total.shape[2:], device=self.device)
        for start in range(0, len(boxes), _WINDOWS_PER_CALL):
            chunk = boxes[start:start + _WINDOWS_PER_CALL]
            crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
            feats = self._dense(self.visual, crops, self.recipe)
            for i, (y1, y2, x1, x2) in enumerate(chunk):
                total[:, :, y1 // p:y2 // p, x1 // p:x2 // p] += feats[i * batch:(i + 1) * batch]
                count[:, :, y1 // p:y2 // p, x1 // p:x2 // p] += 1
        return F.normalize(total / count, dim=1)


def _geometry(options: ClipOptions, visual: torch.nn.Module) -> tuple[int | None, int | None]:
    """(short_side, stride) for sliding, (None, None) for whole; checked against the tower."""
    patch, window = visual.patch_size[0], min(visual.image_size)
    if options.geometry == "whole":
        if options.input_size < patch:
            raise G4SegError(f"input_size {options.input_size} is smaller than the patch size {patch}")
        return None, None
    if window % patch:
        raise G4SegError(f"the model's image size {window} is not a multiple of its patch size {patch}; "
                         f"use geometry=whole")
    short_side = options.short_side or round(1.5 * window)
    stride = options.stride or max(patch, window // 2 // patch * patch)  # half the window, on the patch grid
    if short_side < window:
        raise G4SegError(f"short_side {short_side} is smaller than the model's window {window}; "
                         f"use short_side >= {window} or geometry=whole")
    if stride % patch or stride > window:
        raise G4SegError(f"stride {stride} must be a multiple of the patch size {patch} and at most the "
                         f"window {window}")
    return short_side, stride


def build_clip_extractor(options: ClipOptions, runtime: Runtime) -> ClipExtractor:
    image_size = options.input_size if options.geometry == "whole" else None
    loaded = load_clip(options, runtime, "extractor", image_size=image_size)
    visual = plain_vit(loaded.model, options.model, options.recipe, "extractor")
    short_side, stride = _geometry(options, visual)
    return ClipExtractor(on_runtime(visual, runtime), loaded.mean, loaded.std, options.recipe, short_side, stride)


@hookimpl
def register_extractors(register):
    register(ComponentSpec(kind="extractor", name="clip", aliases=("open_clip",), factory=build_clip_extractor,
                           options=ClipOptions, tags=frozenset({"features:dense"}),
                           description="open_clip ViT dense patch features (SCLIP/MaskCLIP recipes)"))
