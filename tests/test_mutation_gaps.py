"""Tests written for survivors of mutation testing (docs/testing.md): lines no other test checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g4seg import correspondence


def _case(seed: int = 0, k: int = 2, h: int = 5, w: int = 7):
    rng = np.random.default_rng(seed)
    probs = torch.from_numpy(rng.random((k, h, w)).astype(np.float32))
    source = torch.from_numpy(rng.integers(0, h * w, (k, h, w)))
    source[:, 0, 0] = 0  # some pixels matched to themselves
    return probs, source


def _eq9(probs: np.ndarray, source: np.ndarray, beta: float, band: tuple[float, float]) -> np.ndarray:
    """Eq. 9 written out pixel by pixel."""
    out = probs.copy()
    k, h, w = probs.shape
    for c in range(k):
        for y in range(h):
            for x in range(w):
                s = source[c, y, x]
                if band[0] <= probs[c, y, x] <= band[1] and s != y * w + x:
                    out[c, y, x] = beta * probs[c, y, x] + (1 - beta) * probs[c].flat[s]
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_mix_is_eq9_and_agrees_with_the_cpu_path(seed):
    """The whole-tensor path (GPU, bfloat16) was reached by no CPU test: every mutant of it survived."""
    probs, source = _case(seed)
    expected = _eq9(probs.numpy(), source.numpy(), 0.8, (0.2, 0.6))
    dense = correspondence._mix_dense(probs, source, 0.8, (0.2, 0.6))
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(correspondence.mix(probs, source, 0.8, (0.2, 0.6)).numpy(), expected, atol=1e-7)
    assert torch.equal(dense[:, 0, 0], probs[:, 0, 0])  # matched to itself: bit-exact
    half = correspondence.mix(probs.to(torch.bfloat16), source, 0.8, (0.2, 0.6))
    assert half.dtype == torch.bfloat16
    np.testing.assert_allclose(half.float().numpy(), expected, atol=1e-2)


@pytest.mark.parametrize("seed", range(6))
def test_merges_agree_on_their_general_path(seed):
    """``merge_threshold`` / ``merge_argmax`` take a one-map-at-a-time path for float maps and numpy's argmax
    otherwise (integer scores, NaN): both must give the same labels as the rule written with numpy here."""
    from g4seg import masks

    rng = np.random.default_rng(seed)
    k, h, w = int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
    scores = rng.integers(0, 10, (k + 1, h, w))  # integers: ties happen, first maximum wins
    for values in (scores, scores.astype(np.float32)):
        expected_threshold = np.where(values[1:].max(0) < 5, 0, values[1:].argmax(0) + 1)
        np.testing.assert_array_equal(masks.merge_threshold(values[1:], 5), expected_threshold)
        np.testing.assert_array_equal(masks.merge_argmax(values[1:], values[0]), values.argmax(0))
    with_nan = scores.astype(np.float64)
    with_nan[1, 0, 0] = np.nan  # numpy's argmax picks the first NaN
    assert masks.merge_argmax(with_nan[1:], with_nan[0])[0, 0] == 1
    assert masks.merge_threshold(with_nan[1:], 5)[0, 0] == 1
