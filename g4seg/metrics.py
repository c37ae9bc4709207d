"""mIoU exactly as mmsegmentation's ``IoUMetric`` computes it, plus a per-image IoU for stratification.

mmseg (``IoUMetric.intersect_and_union`` + ``compute_metrics``): per image, drop pixels whose label is
the ignore index; count, per class index ``0..K-1``, the predicted pixels, the labelled pixels and the
pixels where both agree (``torch.histc``, which silently drops values outside ``0..K-1`` -- a prediction
of 255 or -1 belongs to no class); union = pred + label - intersection. The counts are summed over the
whole dataset, IoU = intersection / union per class (NaN where the union is 0, i.e. the class is absent
from both labels and predictions), and mIoU = nanmean(IoU) in percent. Counts here are int64, where mmseg
sums float32 histograms; on any realistic dataset the two agree far below the 0.01 mmseg prints.

Because mIoU is a ratio of sums over the dataset, not a mean over images, its uncertainty cannot come
from per-image scores: :func:`bootstrap_gain` resamples images and recomputes both mIoUs from the
summed areas of each resample (see ``docs/evaluation.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from g4seg.errors import G4SegError

IGNORE_INDEX = 255
CI95_PERCENTILES = (2.5, 97.5)  # numpy's default (linear) percentile of the resampled gains
BOOTSTRAP_CELLS = 1 << 22  # resample-by-image counts held at once (32 MiB of float64)


@dataclass(frozen=True)
class Areas:
    """Per-class pixel counts (int64, shape (K,)) of one image or of a whole dataset."""

    intersect: np.ndarray
    union: np.ndarray
    pred: np.ndarray
    label: np.ndarray

    def __add__(self, other: "Areas") -> "Areas":
        return Areas(self.intersect + other.intersect, self.union + other.union,
                     self.pred + other.pred, self.label + other.label)

    @classmethod
    def zeros(cls, num_classes: int) -> "Areas":
        z = np.zeros(num_classes, dtype=np.int64)
        return cls(z, z.copy(), z.copy(), z.copy())

    @classmethod
    def stack(cls, images: Sequence["Areas"], num_classes: int) -> "Areas":
        """Per-image areas as (N, K) arrays, row i = image i (what the bootstrap resamples)."""
        def rows(name: str) -> np.ndarray:
            return np.array([getattr(a, name) for a in images], dtype=np.int64).reshape(len(images), num_classes)

        return cls(rows("intersect"), rows("union"), rows("pred"), rows("label"))

    def rows(self, index: Sequence[int]) -> "Areas":
        """The stacked areas of the images at ``index`` (in that order)."""
        return Areas(self.intersect[index], self.union[index], self.pred[index], self.label[index])


def _histogram(values: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of 0..K-1 in ``values``; anything outside that range is dropped, like ``torch.histc``."""
    inside = values[(values >= 0) & (values < num_classes)]
    return np.bincount(inside, minlength=num_classes).astype(np.int64)


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> Areas:
    """mmseg's ``intersect_and_union`` for one (H, W) prediction and label in metric index space."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    keep = label != ignore_index
    p = pred[keep].astype(np.int64)
    t = label[keep].astype(np.int64)
    intersect = _histogram(p[p == t], num_classes)
    area_pred = _histogram(p, num_classes)
    area_label = _histogram(t, num_classes)
    return Areas(intersect, area_pred + area_label - intersect, area_pred, area_label)


def iou_percent(areas: Areas) -> np.ndarray:
    """Per-class IoU in percent; NaN where the union is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(areas.union > 0, 100.0 * areas.intersect / np.maximum(areas.union, 1), np.nan)


def mean_iou(areas: Areas) -> float:
    """Mean of the per-class IoUs with a non-zero union (mmseg's nanmean), in percent; NaN if none."""
    iou = iou_percent(areas)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def image_iou(areas: Areas) -> float:
    """Per-image IoU (Table VII's stratification): the mean IoU over the classes present in the image's
    label or prediction (non-zero union in this image), in percent; NaN when every pixel is ignored.

    With background counted as a class (VOC, context60, COCO-Object) background takes part like any class.
    """
    return mean_iou(areas)


def _row_miou(intersect: np.ndarray, union: np.ndarray) -> np.ndarray:
    """:func:`mean_iou` of each row of (B, K) summed counts; NaN for a row with no defined class."""
    defined = union > 0
    iou = np.where(defined, 100.0 * intersect / np.maximum(union, 1), 0.0)
    count = defined.sum(1)
    return np.where(count > 0, iou.sum(1) / np.maximum(count, 1), np.nan)


def check_bootstrap(resamples: int, seed: int) -> None:
    """Bad bootstrap settings are one line, before any scoring starts."""
    if resamples < 1:
        raise G4SegError(f"resamples must be at least 1, got {resamples}")
    if seed < 0:
        raise G4SegError(f"the bootstrap seed must be >= 0, got {seed}")


def resample_counts(images: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """(b, N) float64 chunks: how often each image is drawn in each resample, row by row.

    Resample r draws N image indices with replacement; all draws are one stream,
    ``np.random.default_rng(seed).integers(0, N, (resamples, N))``, taken in chunks of rows so memory stays
    bounded (chunks of one stream give the same numbers as one call).
    """
    check_bootstrap(resamples, seed)
    rng = np.random.default_rng(seed)
    rows = max(1, BOOTSTRAP_CELLS // max(images, 1))
    for start in range(0, resamples, rows):
        b = min(rows, resamples - start)
        draws = rng.integers(0, images, (b, images)) + images * np.arange(b)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * images).reshape(b, images).astype(np.float64)


def bootstrap_gain(refined: Areas, coarse: Areas, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mIoU(refined) - mIoU(coarse) over paired resamples of images.

    ``refined`` and ``coarse`` are stacked per-image areas (:meth:`Areas.stack`), row i the same image in
    both. Each resample sums the drawn images' intersections and unions (an image drawn twice counts
    twice) and recomputes both dataset-level mIoUs on the same draws, so the interval reflects how the gain
    varies with the choice of images, not the spread of per-image scores. Resamples whose gain is
    undefined (every drawn pixel ignored) are left out; NaN bounds when all are.
    """
    check_bootstrap(resamples, seed)
    if refined.intersect.shape != coarse.intersect.shape or refined.intersect.ndim != 2:
        raise ValueError(f"paired (N, K) areas expected, got {refined.intersect.shape} and {coarse.intersect.shape}")
    images = refined.intersect.shape[0]
    if images == 0:
        return float("nan"), float("nan")
    gains = []
    for counts in resample_counts(images, resamples, seed):
        after = _row_miou(counts @ refined.intersect, counts @ refined.union)
        before = _row_miou(counts @ coarse.intersect, counts @ coarse.union)
        gains.append(after - before)
    gain = np.concatenate(gains)
    if np.isnan(gain).all():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(gain, CI95_PERCENTILES)
    return float(low), float(high)


class IoUAccumulator:
    """Sums per-image areas over a dataset and keeps each image's (for :func:`bootstrap_gain`);
    ``update`` also returns the image's own areas."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.total = Areas.zeros(num_classes)
        self.per_image: list[Areas] = []

    def update(self, pred: np.ndarray, label: np.ndarray) -> Areas:
        areas = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.add(areas)
        return areas

    def add(self, areas: Areas) -> None:
        self.total = self.total + areas
        self.per_image.append(areas)

    @property
    def images(self) -> int:
        return len(self.per_image)

    def stacked(self) -> Areas:
        """Every added image's areas as (N, K) arrays, in the order added."""
        return Areas.stack(self.per_image, self.num_classes)

    def iou(self) -> np.ndarray:
        return iou_percent(self.total)

    def miou(self) -> float:
        return mean_iou(self.total)
