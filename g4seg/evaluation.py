"""Score a folder of predicted label maps against a dataset split, and compare two such folders.

Predictions are palette or grey PNGs named ``<id>.png`` in the dataset's label encoding -- g4seg's label
convention (0 background, i = classes[i-1], 255 ignore) for most datasets, train ids for ``nightcity``
(:meth:`g4seg.datasets.SegDataset.decode_labels`) -- what ``g4seg refine --dataset`` writes and what
SCLIP/mmseg save with ``output_dir`` set. They must have the label's size (mmseg resizes logits to it
before the argmax).

A comparison reports the mIoU gain with a paired bootstrap interval over images and the share of images
that improved, so a gain can be read against the spread over images (docs/evaluation.md).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from g4seg.datasets import SegDataset, missing_summary, read_index_png
from g4seg.errors import G4SegError
from g4seg.io import atomic_write_bytes
from g4seg.metrics import (Areas, IoUAccumulator, bootstrap_gain, image_iou, intersect_and_union, iou_percent,
                           mean_iou)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Table VII's strata of the coarse mask's per-image IoU, in percent; the last one includes 100.
GAIN_BINS = ((0.0, 40.0), (40.0, 80.0), (80.0, 100.0))
RESAMPLES = 1000  # default number of bootstrap resamples


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True)
class EvalResult:
    """Dataset-level mIoU (mmseg's), per-class IoU and per-image IoU, all in percent."""

    dataset: str
    classes: list[str]  # metric classes: background first when the dataset scores it
    per_image: dict[str, float]  # id -> per-image IoU (see g4seg.metrics.image_iou)
    total: Areas = field(repr=False)  # dataset-wide per-class pixel counts
    image_areas: Areas = field(repr=False)  # (N, K) per-image counts, rows in per_image's order (bootstrap)

    @property
    def iou(self) -> np.ndarray:
        """(K,) per-class IoU in percent, NaN where the union is zero."""
        return iou_percent(self.total)

    @property
    def miou(self) -> float:
        return mean_iou(self.total)

    @property
    def per_class(self) -> dict[str, float | None]:
        return {name: _nan_to_none(value) for name, value in zip(self.classes, self.iou)}

    @property
    def images(self) -> int:
        return len(self.per_image)

    def to_json(self) -> dict[str, Any]:
        return {"mIoU": _nan_to_none(self.miou), "per_class": self.per_class, "images": self.images}


@dataclass(frozen=True)
class GainBin:
    """Images whose coarse per-image IoU lies in [low, high) (the last bin includes 100)."""

    low: float
    high: float
    count: int
    mean_gain: float | None  # mean of refined minus coarse per-image IoU, in points; None when empty

    @property
    def label(self) -> str:
        return f"{self.low:g}-{self.high:g}"


def gain_bin(coarse_iou: float) -> int:
    """Index of the GAIN_BINS stratum of a coarse per-image IoU (the last bin includes 100)."""
    return next(k for k, (_, high) in enumerate(GAIN_BINS) if coarse_iou < high or k == len(GAIN_BINS) - 1)


@dataclass(frozen=True)
class Comparison:
    """A refined result against the coarse masks it started from: the gain, its 95% paired bootstrap
    interval over images, the share of images that improved, and Table VII's stratified gains."""

    miou: float
    coarse_miou: float
    bins: list[GainBin]
    class_gain: dict[str, float | None]  # refined minus coarse IoU per class, in points
    gain_ci95: tuple[float, float]  # percentile interval of the gain over resamples of images
    per_image: dict[str, tuple[float, float]]  # id -> (coarse, refined) per-image IoU, where both are defined
    resamples: int
    seed: int

    @property
    def gain(self) -> float:
        return self.miou - self.coarse_miou

    def _fraction(self, better: bool) -> float | None:
        pairs = self.per_image.values()
        moved = sum((after > before) if better else (after < before) for before, after in pairs)
        return moved / len(pairs) if pairs else None

    @property
    def improved_fraction(self) -> float | None:
        """Share of images (with a defined per-image IoU) whose per-image IoU rose; None without any."""
        return self._fraction(better=True)

    @property
    def worsened_fraction(self) -> float | None:
        return self._fraction(better=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "coarse_mIoU": _nan_to_none(self.coarse_miou),
            "gain": _nan_to_none(self.gain),
            "gain_ci95": [_nan_to_none(v) for v in self.gain_ci95],
            "improved_fraction": self.improved_fraction,
            "worsened_fraction": self.worsened_fraction,
            "resamples": self.resamples,
            "bootstrap_seed": self.seed,
            "bins": [{"range": b.label, "count": b.count, "mean_gain": b.mean_gain} for b in self.bins],
        }


def _prediction_path(pred_dir: Path, id: str) -> Path:
    return pred_dir / f"{id}.png"


def _check_predictions(pred_dir: Path, ids: list[str]) -> None:
    if not pred_dir.is_dir():
        raise G4SegError(f"prediction folder not found: {pred_dir}")
    missing = [f"{i}.png" for i in ids if not _prediction_path(pred_dir, i).is_file()]
    if missing:
        raise G4SegError(missing_summary("predictions", missing, len(ids), pred_dir)
                         + "; predictions must be named <id>.png for every id of the split")


def _score_image(pred_dir: Path, dataset: SegDataset, id: str, num_classes: int) -> Areas:
    pred = dataset.decode_labels(read_index_png(_prediction_path(pred_dir, id)))
    label = dataset.load_label(id)
    if pred.shape != label.shape:
        raise G4SegError(f"{_prediction_path(pred_dir, id)} is {pred.shape[1]}x{pred.shape[0]} but its label "
                         f"{dataset.label_path(id)} is {label.shape[1]}x{label.shape[0]}; "
                         "save predictions at the label's size")
    return intersect_and_union(dataset.to_metric(pred), dataset.to_metric(label), num_classes)


def evaluate(pred_dir: Path, dataset: SegDataset, workers: int | None = None) -> EvalResult:
    """Check the dataset layout and the predictions, then score every id of the split.

    PNG decoding releases the GIL, so a few threads read files in parallel; counts are integers, so
    the sum does not depend on the order.
    """
    pred_dir = Path(pred_dir)
    dataset.check()
    ids = dataset.ids()
    _check_predictions(pred_dir, ids)
    classes = dataset.metric_classes
    accumulator = IoUAccumulator(len(classes))
    per_image: dict[str, float] = {}
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scored = pool.map(lambda i: _score_image(pred_dir, dataset, i, len(classes)), ids)
        for id, areas in zip(ids, scored):
            accumulator.add(areas)
            per_image[id] = image_iou(areas)
    return EvalResult(dataset.name, classes, per_image, accumulator.total, accumulator.stacked())


def compare(refined: EvalResult, coarse: EvalResult, resamples: int = RESAMPLES, seed: int = 0) -> Comparison:
    """Coarse vs refined mIoU with the gain's paired bootstrap interval (``resamples`` draws of the images,
    seeded), and the mean per-image gain stratified by the coarse per-image IoU.

    Images whose per-image IoU is undefined in either result (every pixel ignored) join no bin and do not
    count in the improved fraction; the bootstrap resamples every image.
    """
    if refined.classes != coarse.classes or refined.per_image.keys() != coarse.per_image.keys():
        raise G4SegError("refined and coarse results cover different classes or images; "
                         "evaluate both on the same dataset split")
    row = {id: i for i, id in enumerate(coarse.per_image)}
    coarse_areas = coarse.image_areas.rows([row[id] for id in refined.per_image])  # paired with refined's rows
    interval = bootstrap_gain(refined.image_areas, coarse_areas, resamples, seed)
    pairs = {id: (coarse.per_image[id], after) for id, after in refined.per_image.items()
             if not (math.isnan(coarse.per_image[id]) or math.isnan(after))}
    gains: list[list[float]] = [[] for _ in GAIN_BINS]
    for before, after in pairs.values():
        gains[gain_bin(before)].append(after - before)
    bins = [GainBin(low, high, len(g), float(np.mean(g)) if g else None) for (low, high), g in zip(GAIN_BINS, gains)]
    class_gain = {name: _nan_to_none(r - c) for name, r, c in zip(refined.classes, refined.iou, coarse.iou)}
    return Comparison(refined.miou, coarse.miou, bins, class_gain, interval, pairs, resamples, seed)


BIN_COLOURS = ("tab:red", "tab:orange", "tab:green")  # one per GAIN_BINS stratum


def per_image_figure(comparison: Comparison, title: str) -> "Figure":
    """Scatter of refined against coarse per-image IoU, coloured by Table VII's bins: points above the
    diagonal improved. Shows whether a small mIoU gain is many small moves or a few large ones."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    figure = Figure(figsize=(5.2, 5.0))
    ax = figure.add_subplot()
    ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8, linestyle="--")
    points = np.array(list(comparison.per_image.values()), dtype=float).reshape(-1, 2)
    strata = np.array([gain_bin(before) for before in points[:, 0]], dtype=int)
    for k, (b, colour) in enumerate(zip(comparison.bins, BIN_COLOURS)):
        mine = points[strata == k]
        ax.scatter(mine[:, 0], mine[:, 1], s=10, color=colour, alpha=0.7,
                   label=f"coarse IoU {b.label} ({b.count} images)")
    low, high = comparison.gain_ci95
    ax.set_title(f"{title}\nmIoU gain {comparison.gain:+.2f} (95% CI [{low:+.2f}, {high:+.2f}]), "
                 f"improved {100 * (comparison.improved_fraction or 0):.0f}% of images", fontsize="small")
    ax.set_xlabel("coarse per-image IoU (%)")
    ax.set_ylabel("refined per-image IoU (%)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_aspect("equal")
    ax.legend(fontsize="small", loc="lower right")
    return figure


def save_figure(figure: "Figure", path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(Path(path), buffer.getvalue())
