"""SCA (Eq. 8), mixing (Eq. 9) and the confidence band on hand-made features and masks."""

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from g4seg import correspondence


def _features(c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(c, h, w, generator=g), dim=0)


def test_identity_features_change_nothing():
    orig = _features(16, 4, 4)
    probs = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1))
    refined, delta = correspondence.refine(probs, orig, orig.expand(3, -1, -1, -1), beta=0.8, band=(0.2, 0.6))
    assert torch.equal(refined, probs)
    assert torch.equal(delta, torch.arange(16).view(1, 4, 4).expand(3, 4, 4))


def test_match_recovers_a_known_permutation():
    orig = _features(8, 2, 3)
    perm = torch.tensor([5, 1, 2, 3, 4, 0])
    gen = orig.flatten(1)[:, perm].view(1, 8, 2, 3)
    assert torch.equal(correspondence.match(orig, gen)[0], perm)


def test_permutation_moves_exactly_the_expected_pixels():
    # 2x2 grid on a 4x4 image: each cell is a 2x2 block. Generated cell 0 matches original cell 3.
    orig = _features(8, 2, 2)
    perm = torch.tensor([3, 1, 2, 0])
    gen = orig.flatten(1)[:, perm].view(1, 8, 2, 2)
    probs = torch.tensor([[[0.30, 0.50, 0.00, 0.00],
                           [0.40, 0.90, 0.00, 0.00],
                           [0.00, 0.00, 0.10, 0.20],
                           [0.00, 0.00, 0.70, 1.00]]])
    beta = 0.75
    refined, _ = correspondence.refine(probs, orig, gen, beta=beta, band=(0.2, 0.6))
    expected = probs.clone()
    # cell 0 pixels read the pixel displaced by (+2, +2); only in-band ones (0.3, 0.5, 0.4) change
    expected[0, 0, 0] = beta * 0.30 + (1 - beta) * 0.10
    expected[0, 0, 1] = beta * 0.50 + (1 - beta) * 0.20
    expected[0, 1, 0] = beta * 0.40 + (1 - beta) * 0.70
    # cell 3 reads cell 0 (displacement -2, -2): only 0.2 is in the band
    expected[0, 2, 3] = beta * 0.20 + (1 - beta) * 0.50
    assert torch.allclose(refined, expected)
    untouched = torch.ones_like(probs, dtype=torch.bool)
    untouched[0, 0, 0] = untouched[0, 0, 1] = untouched[0, 1, 0] = untouched[0, 2, 3] = False
    assert torch.equal(refined[untouched], probs[untouched])


def test_band_edges_are_inclusive_and_outside_is_exact():
    probs = torch.tensor([[[0.2, 0.6, 0.19, 0.61]]])
    source = torch.tensor([[[3, 2, 1, 0]]])
    out = correspondence.mix(probs, source, beta=0.5, band=(0.2, 0.6))
    assert torch.allclose(out, torch.tensor([[[0.5 * 0.2 + 0.5 * 0.61, 0.5 * 0.6 + 0.5 * 0.19, 0.19, 0.61]]]))


def test_classes_are_refined_independently():
    orig = _features(8, 2, 2)
    swap = orig.flatten(1)[:, torch.tensor([1, 0, 2, 3])].view(8, 2, 2)
    gen = torch.stack([orig, swap])
    probs = torch.full((2, 2, 2), 0.4)
    probs[:, 0, 1] = 0.5
    refined, delta = correspondence.refine(probs, orig, gen, beta=0.5, band=(0.2, 0.6))
    assert torch.equal(refined[0], probs[0])
    assert torch.allclose(refined[1, 0, 0], torch.tensor(0.45)) and torch.allclose(refined[1, 0, 1], torch.tensor(0.45))
    assert delta[0].flatten().tolist() == [0, 1, 2, 3] and delta[1].flatten().tolist() == [1, 0, 2, 3]


def test_non_divisible_sizes_clamp_inside_the_image():
    delta = torch.tensor([[3, 3, 3, 3]])
    source = correspondence.source_pixels(delta, (2, 2), (5, 7))
    assert source.shape == (1, 5, 7)
    assert int(source.min()) >= 0 and int(source.max()) < 35
    # the bottom-right pixel maps to itself (cell 3 -> cell 3)
    assert int(source[0, 4, 6]) == 4 * 7 + 6


def _reference(probs: np.ndarray, original: np.ndarray, generated: np.ndarray, in_band, mix
               ) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8 and Eq. 9 written out cell by cell and pixel by pixel (numpy), independent of the module.

    Pixel (y, x) lies in cell (y h // H, x w // W); it reads the pixel displaced by the matched cell's
    offset in cells times the cell size, rounded (half to even) and clamped to the image.
    """
    k, height, width = probs.shape
    c, h, w = original.shape
    orig = original.reshape(c, -1)
    delta = np.stack([np.argmax(orig.T @ generated[i].reshape(c, -1), axis=0) for i in range(k)])  # (K, h*w)
    out = probs.copy()
    for i in range(k):
        for y in range(height):
            for x in range(width):
                cy, cx = y * h // height, x * w // width
                my, mx = divmod(int(delta[i, cy * w + cx]), w)
                dy = np.rint(np.float32(my - cy) * np.float32(height / h))
                dx = np.rint(np.float32(mx - cx) * np.float32(width / w))
                sy, sx = int(np.clip(y + dy, 0, height - 1)), int(np.clip(x + dx, 0, width - 1))
                if in_band(probs[i, y, x]) and (sy, sx) != (y, x):
                    out[i, y, x] = mix(probs[i, y, x], probs[i, sy, sx])
    return out, delta.reshape(k, h, w)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 5), st.integers(1, 13), st.integers(1, 13),
       st.integers(1, 3), st.sampled_from(["float32", "float64", "bfloat16"]))
def test_refine_is_eq8_and_eq9_on_random_grids_sizes_and_dtypes(seed, h, w, height, width, k, dtype):
    """Non-square grids and images, sizes that do not divide, matches that point past the edges (clamped),
    classes with no pixel in the band, and the whole-tensor path (bfloat16) beside the band path."""
    rng = np.random.default_rng(seed)
    original = F.normalize(torch.from_numpy(rng.normal(size=(4, h, w))).float(), dim=0)
    generated = F.normalize(torch.from_numpy(rng.normal(size=(k, 4, h, w))).float(), dim=1)
    values = rng.choice([0.1, 0.2, 0.35, 0.5, 0.6, 0.75, 0.9], size=(k, height, width))
    values[rng.random(k) < 0.3] = 0.9  # some classes have no pixel in the band
    torch_dtype = getattr(torch, dtype)
    probs = torch.from_numpy(values).to(torch_dtype)
    beta, band = float(rng.choice([0.3, 0.8])), (0.2, 0.6)
    refined, delta = correspondence.refine(probs, original, generated, beta, band)

    def mix(own: float, matched: float) -> float:  # Eq. 9 in the tensors' dtype, as scalars
        own_t, matched_t = torch.tensor(own, dtype=torch_dtype), torch.tensor(matched, dtype=torch_dtype)
        return float(beta * own_t + (1 - beta) * matched_t)

    def in_band(value: float) -> bool:  # the band's edges are compared in the tensors' dtype, inclusive
        v = torch.tensor(value, dtype=torch_dtype)
        return bool((v >= band[0]) & (v <= band[1]))

    expected, expected_delta = _reference(probs.double().numpy(), original.numpy(), generated.numpy(), in_band,
                                          mix)
    np.testing.assert_array_equal(delta.numpy(), expected_delta)
    assert refined.dtype == torch_dtype
    np.testing.assert_array_equal(refined.double().numpy(), expected)
