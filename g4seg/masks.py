"""Coarse masks around the refinement: the signed-distance ramp for hard masks and the merge rules.

The identity principle (DESIGN.md section 2): refinement may change pixels only inside the confidence
band and only through Eq. 9; everything around it is exactly neutral. With ``beta = 1`` the output
label map equals the input label map, for every input form and merge rule:

- **Soft inputs** (probability stacks) are refined as given and merged by the rule of the baseline
  that produced them (a :class:`MergeRule`); Eq. 9 with beta = 1 returns them bit for bit, so the
  same rule gives the same labels.
- **Hard inputs** (binary masks, label maps, 0/1 stacks) are labels already. Each class gets a
  signed-distance ramp ``p = clip(0.5 + sd / (2 r), 0, 1)`` (``sd`` the distance to the class
  boundary, positive inside), measured between pixel centres so that every pixel inside is at
  least half a pixel from the boundary: ``p > 0.5`` inside and ``p < 0.5`` outside, for any shape
  down to single pixels and one-pixel lines. Their rule is therefore fixed to ``threshold`` at 0.5,
  which gives back the input exactly; the ``merge`` settings describe baselines' probability stacks
  and do not apply to hard inputs. (A Gaussian blur, used before, erased small objects and rounded
  corners before any refinement.)

Merge rules (``mode``), each checked in the tests against the baseline's published code:

- ``threshold``: background where the best class is below ``bg_threshold``, else 1 + argmax.
- ``argmax-bg``: argmax over the background channel and the classes (background first, wins ties).
- ``sclip``: SCLIP's ``postprocess_result``: classes whose argmax area is at most ``area_thd`` of
  the whole foreground area are zeroed (when ``area_thd`` is set), then argmax, then background
  where the best score is below ``prob_thd``.
- ``pow``: CLIP-ES's ``eval_cam.py``: background score ``(1 - max_k S_k) ** power``, then argmax.

Without a background channel, ``sclip`` uses a zero channel in its place (background only by
``prob_thd``), and ``pow`` always computes its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from g4seg.errors import G4SegError

if TYPE_CHECKING:
    from g4seg.config import RefineConfig

IGNORE_LABEL = 255
MergeMode = Literal["threshold", "argmax-bg", "sclip", "pow"]
MERGE_MODES: tuple[str, ...] = get_args(MergeMode)
RAMP_CENTRE = 0.5


@dataclass(frozen=True)
class MergeRule:
    """How per-class scores become a label map: a baseline's rule and its parameters."""

    mode: MergeMode = "threshold"
    bg_threshold: float = 0.5  # threshold
    prob_thd: float = 0.0  # sclip (SCLIP's default)
    area_thd: float | None = None  # sclip (None = no area filter, SCLIP's default)
    power: float = 1.0  # pow

    def labels(self, probs: np.ndarray, background: np.ndarray | None = None,
               ignore: np.ndarray | None = None) -> np.ndarray:
        """(K, H, W) class scores and an optional (H, W) background channel -> (H, W) uint8 labels."""
        if self.mode == "threshold":
            labels = merge_threshold(probs, self.bg_threshold)
        elif self.mode == "argmax-bg":
            if background is None:
                raise G4SegError("merge 'argmax-bg' needs a background channel (a K+1 stack, background first)")
            labels = merge_argmax(probs, background)
        elif self.mode == "sclip":
            labels = merge_sclip(probs, background, self.prob_thd, self.area_thd)
        elif self.mode == "pow":
            labels = merge_pow(probs, self.power)
        else:
            raise G4SegError(f"unknown merge mode '{self.mode}' (use {', '.join(MERGE_MODES)})")
        if ignore is not None:
            labels[ignore] = IGNORE_LABEL
        return labels


HARD_RULE = MergeRule("threshold", bg_threshold=RAMP_CENTRE)


def resolve_rule(config: RefineConfig, hint: MergeRule | None, has_background: bool) -> MergeRule:
    """The rule for a soft input: ``config.merge`` (``auto``: the mask source's own rule when it gave
    one, else ``argmax-bg`` with a background channel and ``threshold`` without), with each parameter
    from the config when set there, else from the source's rule of the same mode, else the default.
    """
    mode = config.merge
    if mode == "auto":
        mode = hint.mode if hint is not None else ("argmax-bg" if has_background else "threshold")
    base = hint if hint is not None and hint.mode == mode else MergeRule(mode)
    explicit = {name: getattr(config, setting) for name, setting in
                (("prob_thd", "prob_thd"), ("area_thd", "area_thd"), ("power", "bg_power"))
                if getattr(config, setting) is not None}
    return replace(base, mode=mode, bg_threshold=config.bg_threshold, **explicit)


def _with_background(probs: np.ndarray, background: np.ndarray | None) -> np.ndarray:
    bg = np.zeros(probs.shape[1:], probs.dtype) if background is None else background.astype(probs.dtype)
    return np.concatenate([bg[None], probs], axis=0)


def merge_threshold(probs: np.ndarray, bg_threshold: float) -> np.ndarray:
    """0 where no class reaches ``bg_threshold``, else 1 + argmax."""
    if probs.shape[0] == 0:
        return np.zeros(probs.shape[1:], dtype=np.uint8)
    fast = _argmax_max(list(probs), first=1)
    if fast is None:
        labels = (probs.argmax(axis=0) + 1).astype(np.uint8)
        labels[probs.max(axis=0) < bg_threshold] = 0
        return labels
    labels, best = fast
    labels[best < bg_threshold] = 0
    return labels


def merge_argmax(probs: np.ndarray, background: np.ndarray) -> np.ndarray:
    """argmax over (background, classes); the background wins ties."""
    fast = _argmax_max([background.astype(probs.dtype), *probs], first=0)
    if fast is None:
        return _with_background(probs, background).argmax(axis=0).astype(np.uint8)
    return fast[0]


def _argmax_max(maps: list[np.ndarray], first: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(``first`` + argmax as uint8, max) over equally shaped maps, one map at a time (no (K, H, W)
    temporaries): the first of equal maxima wins, as with numpy's argmax. None (the caller then uses
    numpy's argmax) when the labels would not fit uint8 or a value is NaN, where argmax has its own rule."""
    if first + len(maps) > 256 or not np.issubdtype(maps[0].dtype, np.floating):
        return None
    best = np.array(maps[0], copy=True)
    labels = np.full(best.shape, first, np.uint8)
    for i, values in enumerate(maps[1:], start=first + 1):
        np.copyto(labels, i, where=values > best)
        np.maximum(best, values, out=best)
    if np.isnan(best).any():  # maximum propagates NaN, so one check covers every map
        return None
    return labels, best


def merge_sclip(probs: np.ndarray, background: np.ndarray | None, prob_thd: float,
                area_thd: float | None) -> np.ndarray:
    """SCLIP's rule on softmax scores (background first): area filter, argmax, probability threshold."""
    scores = _with_background(probs, background)
    if area_thd is not None:
        winners = scores.argmax(axis=0)
        area = np.bincount(winners.ravel(), minlength=scores.shape[0])[1:].astype(np.float64)
        keep = area > area_thd * area.sum()
        scores = scores.copy()
        scores[1:] *= keep[:, None, None].astype(scores.dtype)
    labels = scores.argmax(axis=0).astype(np.uint8)
    labels[scores.max(axis=0) < prob_thd] = 0
    return labels


def merge_pow(probs: np.ndarray, power: float) -> np.ndarray:
    """CLIP-ES: background score (1 - max_k S_k) ** power, then argmax over (background, classes)."""
    if probs.shape[0] == 0:
        return np.zeros(probs.shape[1:], dtype=np.uint8)
    background = np.power(1 - probs.max(axis=0), power)
    return merge_argmax(probs, background)


# ----- hard inputs -------------------------------------------------------------------------------

def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, H, W) float32 0/1 maps of classes 1..K of a label map (0 background; other values in no map)."""
    return (labels[None] == np.arange(1, num_classes + 1)[:, None, None]).astype(np.float32)


def is_hard(probs: np.ndarray, background: np.ndarray | None = None) -> bool:
    """True when every value (background channel included) is exactly 0 or 1."""
    hard = bool(np.isin(probs, (0.0, 1.0)).all())
    return hard and (background is None or bool(np.isin(background, (0.0, 1.0)).all()))


def hard_labels(probs: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """The label map a 0/1 stack stands for: the first class holding 1, else background.

    With a background channel, a pixel whose background is 1 is background (argmax, background first).
    """
    if background is not None:
        return merge_argmax(probs, background)
    return merge_threshold(probs, RAMP_CENTRE)


def ramp(labels: np.ndarray, num_classes: int, width: float) -> np.ndarray:
    """(K, H, W) float32 signed-distance ramps of classes 1..K of a label map, ``width`` in pixels.

    ``sd`` is the Euclidean distance between pixel centres to the nearest pixel on the other side,
    minus half a pixel, positive inside: the pixels next to the boundary are at +-0.5, so inside
    values are at least 0.5 + 1 / (4 width) and outside values at most 0.5 - 1 / (4 width).
    ``width = 0`` keeps the 0/1 masks. Classes absent from the map are all 0, a class covering the
    whole map is all 1.
    """
    out = np.zeros((num_classes, *labels.shape), np.float32)
    present = np.bincount(labels.ravel(), minlength=num_classes + 1) if labels.dtype == np.uint8 else None
    for k in range(num_classes):
        if present is not None and present[k + 1] == 0:
            continue  # absent: all 0
        inside = labels == k + 1
        if not inside.any() or inside.all() or width <= 0:
            out[k] = inside
            continue
        margin = int(np.ceil(width)) + 1 if np.isfinite(width) else max(labels.shape)
        outer, inner = _ramp_box(inside, margin), _ramp_box(inside, 1)
        out[(k, *outer)] = _signed_ramp(inside, outer, inner, width)
    return out


def _ramp_box(inside: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The class's bounding box grown by ``margin`` pixels on each side (within the image)."""
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    height, width = inside.shape
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, height)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, width)))


def _signed_ramp(inside: np.ndarray, outer: tuple[slice, slice], inner: tuple[slice, slice],
                 width: float) -> np.ndarray:
    """The ramp clip(0.5 + sd / (2 width), 0, 1) of the ``outer`` box, in float64 as on the whole map.

    Only boxes are transformed, and each distance is still exact: every class pixel lies in the
    class's bounding box, so an outside pixel's nearest class pixel is in any box around it; a class
    pixel's nearest outside pixel is never farther than the ring just outside the bounding box (move
    any farther one onto that ring: no coordinate gets farther), so the ``inner`` box (margin 1) holds
    it or the image edge stops both searches alike. Outside ``outer`` (margin ceil(width) + 1) every
    pixel is at least ceil(width) + 2 from the class, where the ramp is exactly 0.
    """
    from scipy.ndimage import distance_transform_edt

    crop = inside[outer]
    sd = distance_transform_edt(~crop)  # outside: distance to the class
    np.subtract(0.5, sd, out=sd)
    inner_crop = inside[inner]
    within = (slice(inner[0].start - outer[0].start, inner[0].stop - outer[0].start),
              slice(inner[1].start - outer[1].start, inner[1].stop - outer[1].start))
    depth = distance_transform_edt(inner_crop)  # inside: distance to the nearest outside pixel
    depth -= 0.5
    np.copyto(sd[within], depth, where=inner_crop)
    sd /= 2.0 * width
    sd += RAMP_CENTRE
    return np.clip(sd, 0.0, 1.0, out=sd)


def ramp_pixels(width_fraction: float, hw: tuple[int, int]) -> float:
    """The ramp width in pixels: ``ramp_width`` x the short side of the image."""
    return width_fraction * min(hw)
