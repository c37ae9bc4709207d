"""Softening of hard masks and the label merge."""

import numpy as np

from g4seg import masks


def test_is_hard():
    assert masks.is_hard(np.array([[[0.0, 1.0]]]))
    assert not masks.is_hard(np.array([[[0.0, 0.5]]]))


def test_soften_puts_the_boundary_in_the_band_and_keeps_the_shape():
    hard = np.zeros((1, 100, 100), np.float32)
    hard[0, 25:75, 25:75] = 1
    soft = masks.soften(hard, 0.03)
    in_band = (soft >= 0.2) & (soft <= 0.6)
    assert in_band[0, 50, 20:30].any() and not in_band[0, 50, 45:55].any() and not in_band[0, 0:5, 0:5].any()
    agreement = ((soft >= 0.5) == (hard >= 0.5)).mean()
    assert agreement > 0.99
    assert np.array_equal(masks.soften(hard, 0.0), hard)


def test_merge_labels_background_argmax_and_ignore():
    probs = np.array([[[0.9, 0.2, 0.3]], [[0.1, 0.4, 0.7]]], np.float32)
    ignore = np.array([[False, False, True]])
    labels = masks.merge_labels(probs, 0.5, ignore)
    assert labels.tolist() == [[1, 0, 255]]
    assert masks.merge_labels(probs, 0.0).tolist() == [[1, 2, 2]]
