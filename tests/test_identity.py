"""The identity principle end to end: with beta = 1 the output labels are the input labels, for every input form
and every merge mode, on random shapes and sizes; outside the confidence band nothing moves, whatever beta.

The refiner is the real one (tiny random SD and CLIP loaded through the normal path), so the generation, the
correspondence and the Eq. 9 update all run; only beta decides that nothing may change.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from g4seg import Refiner
from g4seg.masks import IGNORE_LABEL, MERGE_MODES, MergeRule, ramp

MERGES = ("auto", *MERGE_MODES)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def models(tiny_sd_dir, tiny_clip_options):
    return {"backbone": {"model": f"local-dir:{tiny_sd_dir}"}, "extractor": tiny_clip_options}


@pytest.fixture(scope="module")
def refiners(models):
    """One refiner per (merge mode, beta); they share nothing but the files they load."""
    cache: dict[tuple[str, float], Refiner] = {}

    def get(merge: str, beta: float = 1.0, **settings) -> Refiner:
        key = (merge, beta, tuple(sorted(settings.items())))
        if key not in cache:
            cache[key] = Refiner.from_names("sd21", "attn", "clip", resolution=64, device="cpu", beta=beta,
                                            merge=merge, options=models, **settings)
        return cache[key]

    return get


def random_label_map(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """Small and thin things on purpose: single pixels, one-pixel lines, corners, a few blobs, some ignore."""
    labels = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 6))):
        cls = int(rng.integers(1, k + 1))
        shape = rng.integers(0, 4)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        if shape == 0:
            labels[y, x] = cls
        elif shape == 1:
            labels[y, x:] = cls
        elif shape == 2:
            labels[:y + 1, :x + 1] = cls  # a corner region
        else:
            labels[y:y + int(rng.integers(1, 6)), x:x + int(rng.integers(1, 6))] = cls
    if rng.random() < 0.5:
        labels[rng.random((h, w)) < 0.05] = IGNORE_LABEL
    return labels


def one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    return (labels[None] == np.arange(1, k + 1)[:, None, None]).astype(np.float32)


def soft_stack(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """Smooth-ish random scores with plenty of values inside the band, summing to 1 over k (background too)."""
    coarse = rng.normal(size=(k, -(-h // 4), -(-w // 4))) * 3
    logits = np.kron(coarse, np.ones((4, 4)))[:, :h, :w] + rng.normal(size=(k, h, w)) * 0.3
    scores = np.exp(logits - logits.max(0))
    return (scores / scores.sum(0)).astype(np.float32)


cases = st.tuples(st.integers(0, 2**32 - 1), st.integers(3, 40), st.integers(3, 40), st.integers(1, 4),
                  st.sampled_from(MERGES))


@SETTINGS
@given(cases)
def test_beta_one_gives_back_hard_inputs_exactly(refiners, case):
    """Binary masks and label maps with several classes, as 0/1 stacks with or without a background channel."""
    seed, h, w, k, merge = case
    rng = np.random.default_rng(seed)
    labels = random_label_map(rng, h, w, k)
    if k == 1:
        labels[labels == IGNORE_LABEL] = 0  # a binary mask has no ignore value
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ignore = labels == IGNORE_LABEL
    probs = one_hot(labels, k)
    background = (labels == 0).astype(np.float32) if rng.random() < 0.5 else None
    result = refiners(merge).refine(image, probs, [f"c{i}" for i in range(k)], background=background,
                                    ignore=ignore if ignore.any() else None)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_array_equal(result.coarse_labels, labels)


@SETTINGS
@given(cases, st.booleans())
def test_beta_one_gives_back_soft_inputs_exactly(refiners, case, with_background):
    """K and K+1 probability stacks: the probabilities come back bit for bit, so does the merge of any rule."""
    seed, h, w, k, merge = case
    if merge == "argmax-bg" and not with_background:
        merge = "auto"
    rng = np.random.default_rng(seed)
    scores = soft_stack(rng, h, w, k + 1)
    probs, background = (scores[1:], scores[0]) if with_background else (scores[1:], None)
    source_rule = MergeRule("sclip", prob_thd=0.1, area_thd=0.1) if rng.random() < 0.5 else None
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    refiner = refiners(merge)
    result = refiner.refine(image, probs, [f"c{i}" for i in range(k)], background=background,
                            source_rule=source_rule)
    assert np.array_equal(result.probs, probs)
    mode = merge if merge != "auto" else (source_rule.mode if source_rule else
                                          "argmax-bg" if with_background else "threshold")
    expected = (source_rule if source_rule and source_rule.mode == mode else MergeRule(mode)).labels(probs, background)
    np.testing.assert_array_equal(result.labels, expected)
    np.testing.assert_array_equal(result.coarse_labels, expected)


@SETTINGS
@given(cases)
def test_outside_the_band_nothing_moves_whatever_beta(refiners, case):
    seed, h, w, k, _ = case
    rng = np.random.default_rng(seed)
    probs = soft_stack(rng, h, w, k + 1)[1:]
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    result = refiners("auto", beta=0.3).refine(image, probs, [f"c{i}" for i in range(k)])
    outside = (probs < 0.2) | (probs > 0.6)
    assert np.array_equal(result.probs[outside], probs[outside])


def test_hard_input_changes_with_beta_below_one(refiners):
    """The ramp puts boundaries in the band, so a hard mask can change (a guard against a silent no-op)."""
    rng = np.random.default_rng(3)
    labels = np.zeros((40, 52), np.uint8)
    labels[8:30, 10:40] = 1
    image = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    result = refiners("auto", beta=0.2).refine(image, one_hot(labels, 1), ["cat"])
    ramps = ramp(labels, 1, 0.05 * min(labels.shape))  # the default ramp_width of the short side
    in_band = (ramps >= 0.2) & (ramps <= 0.6)
    assert in_band.any() and not np.array_equal(result.probs[in_band], ramps[in_band])
    assert np.array_equal(result.probs[~in_band], ramps[~in_band])
    np.testing.assert_array_equal(result.coarse_labels, labels)
