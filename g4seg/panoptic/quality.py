"""Panoptic quality (PQ = SQ x RQ) of COCO panoptic predictions, as cocodataset/panopticapi computes it.

Per image (panopticapi/evaluation.py ``pq_compute_single_core``), pixels are counted per (ground-truth
segment, predicted segment) pair. A ground-truth segment that is not crowd and a predicted segment of
the same category match when IoU > 0.5 (which makes matches unique), where

    union = pred_area + gt_area - intersection - (pixels of the predicted segment on ground-truth VOID).

Each match is a TP adding its IoU. Unmatched non-crowd ground-truth segments are FN (crowd ones never
are). An unmatched prediction is a FP unless more than half of its pixels lie on VOID or on the crowd
region of its own category (with several crowd segments of one category, the last in segments_info,
as panopticapi's ``crowd_labels_dict`` keeps). Per category (``PQStat.pq_average``):
PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP), RQ = TP / (TP + FP/2 + FN/2);
categories with no TP, FP or FN are left out of the means, and All / Things / Stuff are means over all
categories, those with ``isthing`` 1, and the others. Scores are in percent.

Decisions where panopticapi is silent or where g4seg differs:

- Crowd regions are not removed from the union when matching; only VOID is (panopticapi's line 132 and
  the PQ paper's "group labels" rule: crowd only excuses unmatched predictions).
- Areas are counted in the PNGs, ground truth included (panopticapi reads the ground truth's ``area``
  from its JSON; the two agree for COCO's files). Ground truth is checked like predictions.
- A split with no scored category (e.g. no stuff categories) has ``None`` scores instead of
  panopticapi's division by zero; a category with no TP, FP or FN has ``None`` per-class scores
  instead of panopticapi's 0.0 (it is not in the mean either way).
- Predictions for images that are not in the ground truth are ignored, as panopticapi does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g4seg.errors import G4SegError
from g4seg.panoptic.format import (VOID, Annotation, annotations_of, categories_of, check_ids, read_ids,
                                   read_json)

MATCH_IOU = 0.5
IGNORED_SHARE = 0.5  # an unmatched prediction more than this much on VOID or same-category crowd is no FP


@dataclass
class CategoryStat:
    """Per-category sums over images: IoU of the matches, TP, FP, FN (panopticapi's ``PQStatCat``)."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: "CategoryStat") -> None:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    def scores(self) -> dict[str, float] | None:
        """PQ, SQ, RQ in percent; None when the category has no TP, FP or FN."""
        if self.tp + self.fp + self.fn == 0:
            return None
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return {"PQ": 100 * self.iou / denominator, "SQ": 100 * self.iou / self.tp if self.tp else 0.0,
                "RQ": 100 * self.tp / denominator}


def image_stats(gt_ids: np.ndarray, gt_segments: dict[int, dict[str, Any]], pred_ids: np.ndarray,
                pred_segments: dict[int, dict[str, Any]]) -> dict[int, CategoryStat]:
    """Category id -> this image's :class:`CategoryStat`, for checked id maps of equal size."""
    gt_area = {int(v): int(c) for v, c in zip(*np.unique(gt_ids, return_counts=True))}
    pred_area = {int(v): int(c) for v, c in zip(*np.unique(pred_ids, return_counts=True))}
    pairs = np.unique(gt_ids.astype(np.uint64) * np.uint64(2 ** 24) + pred_ids.astype(np.uint64), return_counts=True)
    overlap = {(int(v) >> 24, int(v) & (2 ** 24 - 1)): int(c) for v, c in zip(*pairs)}
    stats: dict[int, CategoryStat] = {}
    gt_matched, pred_matched = set(), set()
    for (gt, pred), intersection in overlap.items():
        if gt not in gt_segments or pred not in pred_segments or gt_segments[gt].get("iscrowd", 0) == 1:
            continue
        category = gt_segments[gt]["category_id"]
        if category != pred_segments[pred]["category_id"]:
            continue
        union = pred_area[pred] + gt_area[gt] - intersection - overlap.get((VOID, pred), 0)
        iou = intersection / union
        if iou > MATCH_IOU:
            stat = stats.setdefault(category, CategoryStat())
            stat.tp += 1
            stat.iou += iou
            gt_matched.add(gt)
            pred_matched.add(pred)
    crowd: dict[int, int] = {}
    for gt, segment in gt_segments.items():
        if gt in gt_matched:
            continue
        if segment.get("iscrowd", 0) == 1:
            crowd[segment["category_id"]] = gt
            continue
        stats.setdefault(segment["category_id"], CategoryStat()).fn += 1
    for pred, segment in pred_segments.items():
        if pred in pred_matched:
            continue
        excused = overlap.get((VOID, pred), 0)
        if segment["category_id"] in crowd:
            excused += overlap.get((crowd[segment["category_id"]], pred), 0)
        if excused / pred_area[pred] > IGNORED_SHARE:
            continue
        stats.setdefault(segment["category_id"], CategoryStat()).fp += 1
    return stats


@dataclass(frozen=True)
class PanopticResult:
    """Summed per-category statistics of a split and the categories they are averaged over."""

    categories: dict[int, dict[str, Any]]
    stats: dict[int, CategoryStat]
    images: int

    def average(self, isthing: bool | None = None) -> dict[str, Any]:
        """Mean PQ, SQ, RQ (percent; None when no category is scored) and n over all categories (None), things
        (True) or stuff (False), as ``PQStat.pq_average``."""
        scored = [s for cat, info in self.categories.items()
                  if isthing is None or (info.get("isthing") == 1) == isthing
                  for s in [self.stats.get(cat, CategoryStat()).scores()] if s is not None]
        means = {key: (sum(s[key] for s in scored) / len(scored) if scored else None) for key in ("PQ", "SQ", "RQ")}
        return {**means, "n": len(scored)}

    @property
    def has_things_and_stuff(self) -> bool:
        return all("isthing" in info for info in self.categories.values())

    def per_class(self) -> dict[str, dict[str, Any]]:
        """Category id (as text) -> name, PQ, SQ, RQ (None when unscored), TP, FP, FN."""
        rows = {}
        for cat, info in self.categories.items():
            stat = self.stats.get(cat, CategoryStat())
            scores = stat.scores() or {"PQ": None, "SQ": None, "RQ": None}
            rows[str(cat)] = {"name": info["name"], **scores, "TP": stat.tp, "FP": stat.fp, "FN": stat.fn}
        return rows

    def to_json(self) -> dict[str, Any]:
        report: dict[str, Any] = {**self.average(), "per_class": self.per_class(), "images": self.images}
        if self.has_things_and_stuff:
            report["things"] = self.average(True)
            report["stuff"] = self.average(False)
        return report


def _checked(folder: Path, annotation: Annotation, categories: dict[int, dict[str, Any]], what: str,
             source: str) -> np.ndarray:
    ids = read_ids(folder, annotation, what)
    check_ids(ids, annotation, categories, f"{source}, image {annotation.image_id!r}")
    return ids


def evaluate_panoptic(pred_dir: Path, pred_json: Path, gt_dir: Path, gt_json: Path) -> PanopticResult:
    """PQ of the predictions (``pred_json`` + PNGs in ``pred_dir``) against the ground truth (``gt_json`` + PNGs
    in ``gt_dir``), whose ``categories`` are the ones scored. Every problem is one G4SegError line."""
    for folder, option in ((pred_dir, "PRED_DIR"), (gt_dir, "--gt-dir")):
        if not Path(folder).is_dir():
            raise G4SegError(f"{option} {folder} is not a folder" if Path(folder).exists()
                             else f"{option} not found: {folder}")
    gt_data = read_json(gt_json, "--gt-json")
    categories = categories_of(gt_data, f"--gt-json {gt_json}")
    gt_annotations = annotations_of(gt_data, f"--gt-json {gt_json}")
    predictions = annotations_of(read_json(pred_json, "--pred-json"), f"--pred-json {pred_json}")
    missing = [image_id for image_id in gt_annotations if image_id not in predictions]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise G4SegError(f"--pred-json {pred_json} has no prediction for {len(missing)} of {len(gt_annotations)} "
                         f"ground-truth images: {shown}")
    stats: dict[int, CategoryStat] = {}
    for image_id, gt in gt_annotations.items():
        pred = predictions[image_id]
        gt_ids = _checked(gt_dir, gt, categories, "ground-truth PNG", f"--gt-json {gt_json}")
        pred_ids = _checked(pred_dir, pred, categories, "predicted PNG", f"--pred-json {pred_json}")
        if gt_ids.shape != pred_ids.shape:
            raise G4SegError(f"image {image_id!r}: the predicted PNG {pred.file_name} is {pred_ids.shape[1]}x"
                             f"{pred_ids.shape[0]}, the ground truth {gt.file_name} {gt_ids.shape[1]}x"
                             f"{gt_ids.shape[0]} (width x height); they must have the same size")
        for category, stat in image_stats(gt_ids, gt.segments, pred_ids, pred.segments).items():
            stats.setdefault(category, CategoryStat()).add(stat)
    return PanopticResult(categories, stats, len(gt_annotations))
