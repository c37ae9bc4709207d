"""The paired bootstrap interval of an mIoU gain, against a plain-python loop on the same draws and closed forms.

The reference (:func:`reference_interval`) shares nothing with :mod:`g4seg.metrics` but the documented draws,
``np.random.default_rng(seed).integers(0, N, (resamples, N))``: per resample it sums the drawn images' counts
in a Python loop, takes mmseg's mIoU (mean IoU over classes with a non-zero union), and reads the 2.5th and
97.5th percentiles off the sorted gains by linear interpolation.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from g4seg import metrics
from g4seg.errors import G4SegError
from g4seg.metrics import Areas, bootstrap_gain, intersect_and_union


def counts(pred: np.ndarray, label: np.ndarray, num_classes: int) -> tuple[list[int], list[int]]:
    """Per-class intersection and union of one image, counted pixel by pixel (255 in the label ignored)."""
    inter, union = [0] * num_classes, [0] * num_classes
    for p, t in zip(pred.ravel().tolist(), label.ravel().tolist()):
        if t == 255:
            continue
        for c in range(num_classes):
            inter[c] += p == c and t == c
            union[c] += p == c or t == c
    return inter, union


def miou(inter: list[float], union: list[float]) -> float:
    ious = [100.0 * i / u for i, u in zip(inter, union) if u > 0]
    return sum(ious) / len(ious) if ious else math.nan


def percentile(values: list[float], q: float) -> float:
    """numpy's default ('linear') percentile, written out."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def reference_interval(refined: list[tuple[list[int], list[int]]], coarse: list[tuple[list[int], list[int]]],
                       resamples: int, seed: int) -> tuple[float, float]:
    """Per-image (intersection, union) lists of both sides, paired by position."""
    n, k = len(refined), len(refined[0][0])
    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))
    gains = []
    for row in draws.tolist():
        sums = []
        for side in (refined, coarse):
            inter, union = [0] * k, [0] * k
            for i in row:
                for c in range(k):
                    inter[c] += side[i][0][c]
                    union[c] += side[i][1][c]
            sums.append(miou(inter, union))
        gains.append(sums[0] - sums[1])
    gains = [g for g in gains if not math.isnan(g)]
    return percentile(gains, 2.5), percentile(gains, 97.5)


def stacked(per_image: list[tuple[list[int], list[int]]]) -> Areas:
    inter = np.array([i for i, _ in per_image], np.int64)
    union = np.array([u for _, u in per_image], np.int64)
    return Areas(inter, union, np.zeros_like(inter), np.zeros_like(inter))


def hand_made(n: int = 9, k: int = 4, seed: int = 3) -> tuple[list, list, list[np.ndarray]]:
    """n small label maps with ignored pixels; the refined prediction fixes part of the coarse one's errors."""
    rng = np.random.default_rng(seed)
    labels, refined, coarse = [], [], []
    for _ in range(n):
        label = rng.integers(0, k, (6, 7))
        label[rng.random((6, 7)) < 0.1] = 255
        wrong = rng.integers(0, k, (6, 7))
        before = np.where(rng.random((6, 7)) < 0.4, wrong, label)
        after = np.where(rng.random((6, 7)) < 0.5, label, before)
        labels.append(label)
        coarse.append(counts(before, label, k))
        refined.append(counts(after, label, k))
    return refined, coarse, labels


@pytest.mark.parametrize("seed,resamples", [(0, 200), (7, 333)])
def test_interval_matches_a_plain_python_loop_on_the_same_draws(seed, resamples):
    refined, coarse, _ = hand_made()
    got = bootstrap_gain(stacked(refined), stacked(coarse), resamples, seed)
    expected = reference_interval(refined, coarse, resamples, seed)
    assert got == pytest.approx(expected, abs=1e-9)
    assert got[0] < got[1]  # a real spread: the test would notice an interval collapsed to the gain


def test_chunked_draws_give_the_same_interval(monkeypatch):
    """Memory is bounded by drawing resamples in chunks of rows; the numbers must not depend on the chunking."""
    refined, coarse, _ = hand_made()
    whole = bootstrap_gain(stacked(refined), stacked(coarse), 101, 5)
    monkeypatch.setattr(metrics, "BOOTSTRAP_CELLS", 20)  # two resamples of 9 images per chunk
    assert bootstrap_gain(stacked(refined), stacked(coarse), 101, 5) == whole


def test_stacked_areas_are_the_hand_counts():
    """What g4seg keeps per image (and resamples) are the counts of the loop above."""
    _, _, labels = hand_made(n=3)
    rng = np.random.default_rng(3)
    preds = [rng.integers(0, 4, label.shape) for label in labels]
    mine = Areas.stack([intersect_and_union(p, t, 4) for p, t in zip(preds, labels)], 4)
    hand = [counts(p, t, 4) for p, t in zip(preds, labels)]
    assert mine.intersect.tolist() == [i for i, _ in hand] and mine.union.tolist() == [u for _, u in hand]


def test_identical_predictions_give_zero_zero():
    refined, _, _ = hand_made()
    assert bootstrap_gain(stacked(refined), stacked(refined), 500, 1) == (0.0, 0.0)


def test_a_single_image_gives_the_gain_itself():
    """Every resample is the one image drawn once: the interval degenerates to the observed gain."""
    refined, coarse, _ = hand_made(n=1)
    gain = miou(*refined[0]) - miou(*coarse[0])
    assert gain != 0
    low, high = bootstrap_gain(stacked(refined), stacked(coarse), 300, 2)
    assert low == pytest.approx(gain, abs=1e-12) and high == pytest.approx(gain, abs=1e-12)


def test_two_images_span_the_gains_of_their_three_compositions():
    """With two images a resample is {a, a}, {a, b} or {b, b} (probabilities 1/4, 1/2, 1/4); over 1000 resamples
    the 2.5th and 97.5th percentiles fall in the two extreme compositions, so the interval is exactly the
    smallest and the largest of the three gains (a doubled image has the gain of the image alone)."""
    a = ([3, 1, 0], [4, 3, 0]), ([1, 1, 0], [4, 5, 0])  # (refined, coarse) of image a: (intersection, union)
    b = ([2, 0, 5], [2, 1, 6]), ([2, 0, 1], [2, 4, 6])
    gains = [miou(*a[0]) - miou(*a[1]), miou(*b[0]) - miou(*b[1]),
             miou([x + y for x, y in zip(a[0][0], b[0][0])], [x + y for x, y in zip(a[0][1], b[0][1])])
             - miou([x + y for x, y in zip(a[1][0], b[1][0])], [x + y for x, y in zip(a[1][1], b[1][1])])]
    low, high = bootstrap_gain(stacked([a[0], b[0]]), stacked([a[1], b[1]]), 1000, 0)
    assert low == pytest.approx(min(gains), abs=1e-12) and high == pytest.approx(max(gains), abs=1e-12)
    assert len(set(np.round(gains, 9))) == 3


def test_images_with_every_pixel_ignored_are_resampled_like_any_other():
    """An all-ignored image adds zero counts: a resample of only such images has no mIoU and is left out."""
    refined, coarse, _ = hand_made(n=2)
    empty = ([0] * 4, [0] * 4)
    got = bootstrap_gain(stacked([*refined, empty]), stacked([*coarse, empty]), 400, 4)
    assert got == pytest.approx(reference_interval([*refined, empty], [*coarse, empty], 400, 4), abs=1e-9)
    nothing = bootstrap_gain(stacked([empty]), stacked([empty]), 10, 0)
    assert math.isnan(nothing[0]) and math.isnan(nothing[1])


@pytest.mark.parametrize("resamples,seed,message", [(0, 0, "resamples must be at least 1, got 0"),
                                                    (-5, 0, "at least 1"), (10, -1, "seed must be >= 0")])
def test_bad_settings_are_one_line(resamples, seed, message):
    refined, coarse, _ = hand_made(n=2)
    with pytest.raises(G4SegError, match=message) as info:
        bootstrap_gain(stacked(refined), stacked(coarse), resamples, seed)
    assert "\n" not in str(info.value)


def test_a_thousand_resamples_over_thousands_of_images_is_fast():
    rng = np.random.default_rng(0)
    n, k = 3000, 60
    inter = rng.integers(0, 500, (n, k))
    sides = [Areas(inter, inter + rng.integers(0, 500, (n, k)), inter, inter) for _ in range(2)]
    start = time.perf_counter()
    bootstrap_gain(*sides, 1000, 0)
    assert time.perf_counter() - start < 10  # about 0.3 s on one core; a Python loop over resamples takes minutes
