"""The toy world's scene generator: exact label maps, captions that name what is visible, classes that
colour alone cannot separate, small and thin objects."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from g4seg.toy import scenes
from g4seg.toy.scenes import CLASSES, SIDE, make_scene

SEEDS = st.integers(0, 2**32 - 1)


@given(SEEDS)
@settings(max_examples=40, deadline=None)
def test_a_scene_is_a_pure_function_of_its_seed(seed):
    a, b = make_scene(seed), make_scene(seed)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.classes == b.classes


@given(SEEDS)
@settings(max_examples=60, deadline=None)
def test_background_pixels_are_exactly_the_untouched_background(seed):
    """Label 0 <=> nothing was painted there: the background drawn alone from the same seed shows there,
    and every labelled pixel shows something else almost everywhere (an object was painted on it)."""
    scene = make_scene(seed)
    alone = scenes._background(np.random.default_rng(seed), SIDE)
    alone = (np.clip(alone, 0, 1) * 255).round().astype(np.uint8)
    background = scene.labels == 0
    assert np.array_equal(scene.image[background], alone[background])
    painted = ~background
    assert painted.any()
    changed = (scene.image[painted] != alone[painted]).any(axis=-1)
    assert changed.mean() > 0.95


@pytest.mark.parametrize("seed", [3, 17, 2024])
def test_a_ball_is_the_disc_of_its_drawn_centre_and_radius(seed):
    """Recompute the disc independently from the same random draws (centre first, then the rest)."""
    size = 9.5
    mask, _ = scenes._object("ball", np.random.default_rng(seed), SIDE, size)
    cx, cy = np.random.default_rng(seed).uniform(0.0, 1.0, size=2) * SIDE
    expected = np.zeros((SIDE, SIDE), dtype=bool)
    for y in range(SIDE):
        for x in range(SIDE):
            expected[y, x] = (x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= size ** 2
    assert np.array_equal(mask, expected)


def test_a_ring_has_a_hole_and_a_snake_is_thin():
    rng = np.random.default_rng(5)
    ring, _ = scenes._object("ring", rng, SIDE, 12.0)
    assert ring.sum() > 0
    cx, cy = np.random.default_rng(5).uniform(0.0, 1.0, size=2) * SIDE
    assert not ring[int(cy), int(cx)]  # the centre pixel lies in the hole
    for seed in range(20):
        snake, _ = scenes._object("snake", np.random.default_rng(seed), SIDE, 15.0)
        if snake.sum() < 20:
            continue
        # every column crosses the body in at most one run of at most 4 px + the slope's overhang
        widths = [np.diff(np.flatnonzero(np.diff(np.r_[0, col, 0]))).max(initial=0) for col in snake.T]
        assert min(w for w in widths if w) <= 4


@given(SEEDS)
@settings(max_examples=60, deadline=None)
def test_the_caption_names_every_visible_class_by_area(seed):
    scene = make_scene(seed)
    areas = {CLASSES[k - 1]: int((scene.labels == k).sum()) for k in range(1, len(CLASSES) + 1)}
    visible = [name for name, area in areas.items() if area > 0]
    assert sorted(scene.classes) == sorted(visible)
    assert [areas[c] for c in scene.classes] == sorted((areas[c] for c in scene.classes), reverse=True)
    assert scene.caption == "a photo of " + " and ".join(f"a {c}" for c in scene.classes)
    assert set(np.unique(scene.labels)) <= set(range(len(CLASSES) + 1))


def test_colour_alone_does_not_separate_the_classes_and_small_objects_occur():
    """Over many scenes every class is drawn in many hues, and objects of a few pixels occur."""
    hues: dict[str, list[float]] = {c: [] for c in CLASSES}
    small = 0
    for seed in range(300):
        scene = make_scene(seed)
        for k, name in enumerate(CLASSES, start=1):
            region = scene.labels == k
            if region.sum() == 0:
                continue
            small += int(region.sum() < 40)
            r, g, b = scene.image[region].astype(float).mean(axis=0)
            hues[name].append(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b))
    for name, values in hues.items():
        counts, _ = np.histogram(values, bins=6, range=(-np.pi, np.pi))
        assert (counts > 0).sum() >= 4, f"{name} is drawn in too few hues: {counts}"
    assert small >= 10
