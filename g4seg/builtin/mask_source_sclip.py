"""Mask source ``sclip``: coarse masks from class names alone, by SCLIP's training-free segmentation.

SCLIP (Wang et al., ECCV 2024; github.com/wangf3014/SCLIP, ``clip_segmentor.py``) reproduced on an
open_clip model loaded exactly like the ``clip`` extractor's (:mod:`g4seg.clip_model`):

1. Query features (``__init__``, lines 35-44): for every query word, the text features of each
   template filled with the word, L2-normalised, averaged, L2-normalised again. ``templates =
   "imagenet"`` is SCLIP's list (CLIP's 80 ImageNet templates, shipped in ``g4seg/data/sclip``);
   ``"single"`` is "a photo of a {}." alone (cheap; for tests and quick looks).
2. Resize (the configs' ``Resize(scale=(2048, 336), keep_ratio=True)``): short side -> ``short_side``,
   sizes rounded as mmcv's ``rescale_size`` does (``int(x * scale + 0.5)``), bilinear, result rounded to
   whole 0..255 values as cv2 returns uint8; then normalised with the model's mean/std.
3. Sliding windows (``forward_slide``, lines 80-125, and ``forward_feature``, lines 59-78): windows of
   ``window`` pixels every ``stride`` pixels; per window the CSA dense features (SCLIP's last block,
   see :mod:`g4seg.clip_model`), L2-normalised, times the query features, bilinearly upsampled to the
   window; summed, divided by the per-pixel window count, bilinearly resized to the image's own size.
4. Scores (``postprocess_result``, lines 148-159): logits x ``logit_scale``, softmax over all queries,
   then the max over each class's queries (its synonyms; line 0 of a class file, the background words,
   is class 0). ``probs`` are the classes' scores, ``background`` the background words' score.
5. Labels: the returned :class:`~g4seg.masks.MergeRule` ``sclip`` carries ``prob_thd`` and ``area_thd``;
   :func:`g4seg.masks.merge_sclip` applies them as lines 162-170 do.

Presets (option ``preset``) are SCLIP's own class files and settings: ``voc21`` (``cls_voc21.txt``;
``logit_scale`` 65, ``prob_thd`` 0.1, ``area_thd`` 0.1), ``context60`` (50, 0.1, no area filter),
``coco-object`` (50, 0.1, no area filter); and ours, ``toy`` (the toy world's six classes, 50, 0.1, no
area filter), which also makes the shipped toy CLIP, 64 px geometry (windows every 16 px) and the single
template the defaults (docs/quality.md); ``auto`` never picks it. A given class is looked up among a
preset's classes (line 0, the background words, excluded) by any of its names, ignoring case, spaces and punctuation
("potted plant" = "pottedplant"); its names are its comma-separated parts ("boat, ship") and, when its
first name is a class of one of g4seg's dataset class files (``g4seg/data/voc12.txt`` etc.), that
line's synonyms, so the dataset names "boat" and "dining table" find SCLIP's "ship" and "table". Its
queries are then all synonyms of the preset's line. ``auto`` picks, among the presets that hold every
given class, the one with the fewest classes (VOC's 20 classes -> ``voc21``, PASCAL Context's 59 ->
``context60``, COCO's 80 -> ``coco-object``), else ``none``. With ``none`` each class's queries are its
comma-separated parts.

Background words (option ``background``): the preset's line 0; without a preset SCLIP's VOC21 words.
An empty list means no background queries (no background channel; background then only by
``prob_thd``, as SCLIP's background-free configs do).

Defaults of ``logit_scale``/``prob_thd``/``area_thd`` (None = these): the preset's; without a preset
and with background words 50 / 0.1 / none, the setting SCLIP's configs share for its datasets with a
background class (context60, coco-object); without background words SCLIP's class defaults 40 / 0.0 /
none, which its background-free configs (voc20, context59, ADE20K, ...) use. ``area_thd = 0`` turns
the area filter off.

Approximations (see docs/mask-sources.md): torch's bilinear resize instead of cv2's (same sampling
grid, no antialiasing; cv2 rounds its fixed-point weights, so pixels can differ by one grey level);
no cap of the long side at 2048 px (SCLIP's Resize caps it, which only matters for images more than
2048/336 = 6.1 times wider than tall); arithmetic in float32 where SCLIP runs CLIP in float16 on GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from g4seg.clip_model import (ClipModelOptions, LoadedClip, dense_features, load_clip, on_runtime, plain_vit,
                              tokenizer, window_boxes)
from g4seg.components import CoarseMask
from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.masks import MergeRule
from g4seg.registry import ComponentSpec, Runtime

if TYPE_CHECKING:
    import torch

_WINDOWS_PER_CALL = 16
_TEXTS_PER_CALL = 1024
_DATASET_CLASS_FILES = ("voc12.txt", "context59.txt", "coco_object.txt")
SINGLE_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Preset:
    """One of SCLIP's class files with the settings of its config (``configs/cfg_<name>.py``)."""

    file: str
    logit_scale: float
    prob_thd: float
    area_thd: float | None


PRESETS: dict[str, Preset] = {
    "voc21": Preset("cls_voc21.txt", 65.0, 0.1, 0.1),
    "context60": Preset("cls_context60.txt", 50.0, 0.1, None),
    "coco-object": Preset("cls_coco_object.txt", 50.0, 0.1, None),
    "toy": Preset("cls_toy.txt", 50.0, 0.1, None),  # ours: the toy world (docs/quality.md)
}
_WITH_BACKGROUND = Preset("", 50.0, 0.1, None)  # no preset: SCLIP's configs for datasets with a background
_WITHOUT_BACKGROUND = Preset("", 40.0, 0.0, None)  # no preset, no background words: SCLIP's class defaults


class SclipOptions(ClipModelOptions):
    """The CLIP model (as the ``clip`` extractor's), SCLIP's preset, prompts, thresholds and geometry."""

    preset: Literal["auto", "none", "voc21", "context60", "coco-object", "toy"] = Field(
        "auto", description="SCLIP class file and settings; auto = the smallest of SCLIP's presets holding "
                            "every class; toy = the toy world's classes and CLIP")
    background: list[str] | None = Field(None, description="background query words (comma-separated); "
                                                           "None = the preset's (VOC21's without one)")
    templates: Literal["imagenet", "single"] = Field("imagenet", description="imagenet = SCLIP's 80 prompts, "
                                                                             "single = 'a photo of a {}.'")
    logit_scale: float | None = Field(None, gt=0, description="softmax temperature; None = the preset's")
    prob_thd: float | None = Field(None, ge=0, le=1, description="background below this score; None = preset's")
    area_thd: float | None = Field(None, ge=0, le=1, description="drop classes under this share of the "
                                                                 "foreground area; None = preset's")
    short_side: int | None = Field(None, ge=1, description="short side images are resized to; "
                                                            "None = 1.5 x window (336)")
    stride: int | None = Field(None, ge=1, description="window stride in pixels; None = half the window (112)")
    window: int | None = Field(None, ge=1, description="window side; None = the model's image size (224)")

    @model_validator(mode="after")
    def _toy_model(self) -> "SclipOptions":
        """``preset=toy`` selects the shipped toy CLIP and its 64 px geometry, unless given otherwise."""
        if self.preset == "toy":
            from g4seg.builtin.toy import TOY_CLIP

            for key, value in (("model", TOY_CLIP), ("pretrained", "toy"), ("short_side", 64), ("stride", 16),
                               ("templates", "single")):
                if key not in self.model_fields_set:
                    setattr(self, key, value)
        return self

    @field_validator("background", mode="before")
    @classmethod
    def _split_words(cls, value: Any) -> Any:
        """``-o mask_source.background="sky, wall"`` arrives as one string."""
        if isinstance(value, str):
            return [word.strip() for word in value.split(",") if word.strip()]
        return value


@dataclass(frozen=True)
class Plan:
    """What SCLIP runs for one class list: query words, their class (0 = background), the settings."""

    preset: str | None
    words: tuple[str, ...]
    index: tuple[int, ...]
    logit_scale: float
    rule: MergeRule


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _data(name: str) -> str:
    from importlib import resources

    return resources.files("g4seg").joinpath("data", "sclip", name).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def preset_lines(preset: str) -> tuple[tuple[str, ...], ...]:
    """SCLIP's class file as ``get_cls_idx`` reads it: line i = class i, ', '-separated synonyms."""
    return tuple(tuple(word.strip() for word in line.split(",")) for line in _data(PRESETS[preset].file).splitlines()
                 if line.strip())


@lru_cache(maxsize=None)
def templates(kind: str) -> tuple[str, ...]:
    if kind == "single":
        return (SINGLE_TEMPLATE,)
    return tuple(line for line in _data("imagenet_templates.txt").splitlines() if line and not line.startswith("#"))


@lru_cache(maxsize=1)
def _dataset_synonyms() -> dict[str, tuple[str, ...]]:
    """First name (key) -> the synonyms of g4seg's dataset class files, the first file winning."""
    from g4seg.datasets import read_class_file

    table: dict[str, tuple[str, ...]] = {}
    for file in _DATASET_CLASS_FILES:
        for names in read_class_file(file):
            table.setdefault(_key(names[0]), tuple(names))
    return table


def class_names(name: str) -> list[str]:
    """A given class's names: its comma-separated parts, then its dataset synonyms (lookup order)."""
    own = [part.strip() for part in name.split(",") if part.strip()]
    extra = _dataset_synonyms().get(_key(own[0]), ()) if own else ()
    return own + [word for word in extra if word not in own]


@lru_cache(maxsize=None)
def _preset_index(preset: str) -> dict[str, int]:
    """Name key -> line of the preset (line 0, the background words, excluded; the first line wins)."""
    index: dict[str, int] = {}
    for line, words in enumerate(preset_lines(preset)[1:], start=1):
        for word in words:
            index.setdefault(_key(word), line)
    return index


def find(preset: str, name: str) -> int | None:
    """The preset line (>= 1) of class ``name``, or None; the first of its names found wins."""
    index = _preset_index(preset)
    return next((index[_key(n)] for n in class_names(name) if _key(n) in index), None)


def choose_preset(classes: Sequence[str], preset: str) -> str | None:
    """``auto``: the preset with the fewest classes among those holding every class, else None."""
    if preset == "none":
        return None
    if preset != "auto":
        unknown = [c for c in classes if find(preset, c) is None]
        if unknown:
            raise G4SegError(f"mask source 'sclip': preset '{preset}' has no class {', '.join(map(repr, unknown))} "
                             f"(see g4seg/data/sclip/{PRESETS[preset].file}); use -o mask_source.preset=none")
        return preset
    holding = [p for p in PRESETS if p != "toy" and all(find(p, c) is not None for c in classes)]
    return min(holding, key=lambda p: len(preset_lines(p)), default=None)


def plan(classes: Sequence[str], options: SclipOptions) -> Plan:
    """Resolve the preset, the query words of every class and the settings for ``classes``."""
    classes = list(classes)
    if not classes or any(not c.strip(", ") for c in classes):
        raise G4SegError(f"mask source 'sclip' needs non-empty class names, got {classes}")
    preset = choose_preset(classes, options.preset)
    lines = preset_lines(preset or "voc21")
    background = list(lines[0]) if options.background is None else options.background
    words, index = list(background), [0] * len(background)
    for k, name in enumerate(classes, start=1):
        queries = lines[find(preset, name)] if preset else [part.strip() for part in name.split(",") if part.strip()]
        words += queries
        index += [k] * len(queries)
    defaults = PRESETS[preset] if preset else _WITH_BACKGROUND if background else _WITHOUT_BACKGROUND
    rule = MergeRule("sclip", prob_thd=_given(options.prob_thd, defaults.prob_thd),
                     area_thd=_given(options.area_thd, defaults.area_thd))
    return Plan(preset, tuple(words), tuple(index), _given(options.logit_scale, defaults.logit_scale), rule)


def _given(value: float | None, default: float | None) -> float | None:
    return default if value is None else value


class SclipMaskSource:
    """SCLIP's per-class scores for an image; see the module docstring."""

    def __init__(self, loaded: LoadedClip, options: SclipOptions, runtime: Runtime) -> None:
        import torch

        self.options = options
        self.model = on_runtime(loaded.model, runtime)
        self.visual = plain_vit(self.model, options.model, "csa", "mask_source")
        self.tokenizer = tokenizer(loaded, options.cache_dir)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.window = tuple(self.visual.image_size)
        self.short_side = options.short_side or round(1.5 * min(self.window))
        self.stride = options.stride or min(self.window) // 2
        if self.short_side < max(self.window):
            raise G4SegError(f"mask source 'sclip': short_side {self.short_side} is smaller than the window "
                             f"{max(self.window)}")
        if self.stride > min(self.window):
            raise G4SegError(f"mask source 'sclip': stride {self.stride} is larger than the window "
                             f"{min(self.window)} (windows would leave gaps)")
        self.mean = torch.tensor(loaded.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(loaded.std, device=self.device).view(1, 3, 1, 1)
        self._queries: dict[tuple[str, ...], torch.Tensor] = {}
        self._plans: dict[tuple[str, ...], Plan] = {}

    def load(self, image_path: Path, mask_path: Path | None, classes: Sequence[str],
             image_hw: tuple[int, int]) -> CoarseMask:
        from g4seg.io import load_image

        image = load_image(image_path)
        if image.shape[:2] != tuple(image_hw):
            raise G4SegError(f"image {image_path} is {image.shape[0]}x{image.shape[1]} but "
                             f"{image_hw[0]}x{image_hw[1]} was expected")
        return self.segment(image, classes)

    def segment(self, image: np.ndarray, classes: Sequence[str]) -> CoarseMask:
        """(H, W, 3) uint8 RGB image and class names -> SCLIP's scores as a CoarseMask."""
        import torch

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise G4SegError(f"mask source 'sclip' expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        key = tuple(classes)
        if key not in self._plans:
            self._plans[key] = plan(classes, self.options)
        p = self._plans[key]
        has_background = 0 in p.index
        with torch.inference_mode():
            scores = (self.logits(image, self.query_features(p.words)) * p.logit_scale).softmax(dim=0)
            index = torch.tensor(p.index, device=scores.device)
            per_class = torch.stack([scores[index == k].amax(dim=0)  # max over the class's synonyms
                                     for k in range(0 if has_background else 1, len(classes) + 1)])
            per_class = per_class.float().cpu().numpy()
        return CoarseMask(probs=np.ascontiguousarray(per_class[1:] if has_background else per_class),
                          background=per_class[0] if has_background else None, merge=p.rule)

    def query_features(self, words: Sequence[str]) -> torch.Tensor:
        """(Q, C) float32: per word, the mean of its L2-normalised template features, re-normalised."""
        import torch
        import torch.nn.functional as F

        key = (self.options.templates, *words)
        if key not in self._queries:
            texts = [t.format(word) for word in words for t in templates(self.options.templates)]
            with torch.inference_mode():
                feats = torch.cat([self.model.encode_text(self.tokenizer(texts[i:i + _TEXTS_PER_CALL]).to(self.device))
                                   for i in range(0, len(texts), _TEXTS_PER_CALL)]).float()
            feats = F.normalize(feats, dim=-1).view(len(words), -1, feats.shape[-1]).mean(dim=1)
            self._queries[key] = F.normalize(feats, dim=-1)
        return self._queries[key]

    def logits(self, image: np.ndarray, queries: torch.Tensor) -> torch.Tensor:
        """(Q, H, W) float32 sliding-window logits at the image's own size (SCLIP's ``forward_slide``)."""
        import torch
        import torch.nn.functional as F

        height, width = image.shape[:2]
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float()
        scale = self.short_side / min(height, width)
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
        x = ((x / 255 - self.mean) / self.std).to(self.dtype)
        preds = torch.zeros(len(queries), *size, device=self.device)
        count = torch.zeros(1, *size, device=self.device)
        boxes = window_boxes(*size, self.window, (self.stride, self.stride))
        for start in range(0, len(boxes), _WINDOWS_PER_CALL):
            chunk = boxes[start:start + _WINDOWS_PER_CALL]
            crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
            window_logits = torch.einsum("nchw,qc->nqhw", dense_features(self.visual, crops, "csa"), queries)
            window_logits = F.interpolate(window_logits, size=self.window, mode="bilinear", align_corners=False)
            for logit, (y1, y2, x1, x2) in zip(window_logits, chunk):
                preds[:, y1:y2, x1:x2] += logit
                count[:, y1:y2, x1:x2] += 1
        preds = preds / count
        return F.interpolate(preds[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def _build(options: SclipOptions, runtime: Runtime) -> SclipMaskSource:
    return SclipMaskSource(load_clip(options, runtime, "mask_source", image_size=options.window), options, runtime)


@hookimpl
def register_mask_sources(register):
    register(ComponentSpec(kind="mask_source", name="sclip", factory=_build, options=SclipOptions,
                           tags=frozenset({"no-mask-file"}),
                           description="SCLIP training-free segmentation from class names (open_clip; no mask file)"))
