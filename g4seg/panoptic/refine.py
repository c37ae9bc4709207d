"""Refining a panoptic prediction per segment: segments become the refiner's classes and come back as segments.

How segments map to classes and back (docs/panoptic.md):

- **Segment -> class.** Each segment of the PNG is one class of the :class:`~g4seg.refiner.Refiner`, its
  coarse map the segment's 0/1 mask (a hard input: it gets the signed-distance ramp, and the identity
  principle holds, DESIGN.md section 2). Its class name, and so its prompt (``a photo of {}``), is its
  category's ``name`` as written in the categories.
- **Two segments of one category** (two persons) would be two classes with the same name, which the
  refiner refuses (names are its keys and are bound to prompt tokens). They are refined in separate
  *rounds* instead: round r holds the r-th segment of each category (names compared as the class-name
  check does: ignoring case and repeated spaces; at most 254 per round, what a uint8 label map holds),
  so every segment keeps the plain category prompt. The rounds are items of one
  :meth:`~g4seg.refiner.Refiner.refine_many` call on the same image: their classes share UNet calls, and
  each class's generation depends only on its own prompt and mask, so splitting changes nothing but the
  bookkeeping. (Numbering the names, "person 2", would change the prompt and bind the number's tokens too.)
- **Classes -> segments.** The refined per-segment probabilities of all rounds are merged as a hard input
  is: each pixel goes to the segment of highest probability, if that reaches 0.5 (the ramp's centre);
  a pixel no segment claims is VOID (``unclaimed = "void"``, as ``g4seg refine`` leaves it background) or
  keeps its input segment (``"keep"``: segments can then only grow into VOID and into each other).
  Segment ids and category ids are kept, a segment left with no pixels is removed from segments_info,
  and ``area`` and ``bbox`` are recomputed; other keys of each entry are kept as they were.

With beta = 1 every round returns its ramps unchanged, each ramp is above 0.5 exactly on its segment,
and the merge gives back the input PNG pixel for pixel (tests/test_panoptic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from g4seg.errors import G4SegError
from g4seg.masks import IGNORE_LABEL, RAMP_CENTRE
from g4seg.panoptic.format import VOID, segment_box

if TYPE_CHECKING:
    from g4seg.refiner import Refiner

Unclaimed = Literal["void", "keep"]
ROUND_LIMIT = IGNORE_LABEL - 1  # classes 1..254 of the refiner's uint8 label map


def name_key(name: str) -> str:
    """A class name as the class-name check compares names (g4seg.checks.check_class_names)."""
    return " ".join(name.lower().split())


def rounds(names: list[str]) -> list[list[int]]:
    """Indices of ``names`` split into rounds with no name twice (by :func:`name_key`) and at most
    :data:`ROUND_LIMIT` each: a segment goes to the first round that can take it."""
    out: list[list[int]] = []
    keys: list[set[str]] = []
    for i, name in enumerate(names):
        key = name_key(name)
        for members, seen in zip(out, keys):
            if key not in seen and len(members) < ROUND_LIMIT:
                members.append(i)
                seen.add(key)
                break
        else:
            out.append([i])
            keys.append({key})
    return out


@dataclass(frozen=True)
class RefinedPanoptic:
    """The refined id map (H, W) and its segments_info (input order, vanished segments removed)."""

    ids: np.ndarray
    segments_info: list[dict[str, Any]]
    vanished: list[int]  # ids of input segments left with no pixels


def refine_segments(refiner: "Refiner", image: np.ndarray, ids: np.ndarray, segments_info: list[dict[str, Any]],
                    categories: dict[int, dict[str, Any]], unclaimed: Unclaimed = "void") -> RefinedPanoptic:
    """Refine each segment of a checked panoptic id map ``ids`` (H, W) of ``image`` (H, W, 3) uint8."""
    if ids.shape != image.shape[:2]:
        raise G4SegError(f"the panoptic PNG is {ids.shape[1]}x{ids.shape[0]}, its image {image.shape[1]}x"
                         f"{image.shape[0]} (width x height); they must have the same size")
    segment_ids = [int(s["id"]) for s in segments_info]
    names = [str(categories[s["category_id"]]["name"]) for s in segments_info]
    probs = np.zeros((len(segment_ids), *ids.shape), np.float32)
    if segment_ids:
        from g4seg.refiner import RefineItem

        groups = rounds(names)
        items = [RefineItem(image, np.stack([(ids == segment_ids[i]).astype(np.float32) for i in group]),
                            [names[i] for i in group]) for group in groups]
        for group, outcome in zip(groups, refiner.refine_many(items)):
            if isinstance(outcome, Exception):
                raise outcome
            probs[group] = outcome.probs
    merged = merge_segments(probs, segment_ids, ids, unclaimed)
    kept, vanished = [], []
    for sid, segment in zip(segment_ids, segments_info):
        mask = merged == sid
        area = int(mask.sum())
        if area == 0:
            vanished.append(sid)
            continue
        kept.append({**segment, "area": area, "bbox": segment_box(mask)})
    return RefinedPanoptic(merged, kept, vanished)


def merge_segments(probs: np.ndarray, segment_ids: list[int], before: np.ndarray, unclaimed: Unclaimed) -> np.ndarray:
    """(K, H, W) refined segment probabilities -> (H, W) ids: the segment of highest probability (the first
    on ties) where that reaches 0.5, elsewhere VOID or, with ``unclaimed = "keep"``, the id ``before``."""
    if not segment_ids:
        return before.copy() if unclaimed == "keep" else np.zeros_like(before)
    lookup = np.asarray(segment_ids, dtype=np.int64)
    merged = lookup[probs.argmax(axis=0)]
    free = probs.max(axis=0) < RAMP_CENTRE
    merged[free] = before[free] if unclaimed == "keep" else VOID
    return merged
