"""The orchestrator end to end with tiny random models loaded through the real registry path."""

import numpy as np
import pytest

from g4seg import Refiner
from g4seg.errors import G4SegError

H, W = 40, 56


@pytest.fixture(scope="module")
def scene():
    yy, xx = np.mgrid[:H, :W]
    image = np.where(((yy - 20) ** 2 + (xx - 28) ** 2 < 150)[..., None], [200, 60, 50], [30, 110, 190])
    soft = np.clip(1.2 - np.sqrt((yy - 20) ** 2 + (xx - 24) ** 2) / 16, 0, 1)
    probs = np.stack([soft, np.zeros((H, W)), soft[::-1]]).astype(np.float32)
    return image.astype(np.uint8), probs, ["potted plant", "dog", "cat"]


def _refiner(sd_dir, clip_options, **settings):
    options = {"backbone": {"model": f"local-dir:{sd_dir}"}, "extractor": clip_options}
    return Refiner.from_names("sd21", "attn", "clip", resolution=64, device="cpu", options=options, **settings)


@pytest.fixture(scope="module")
def refiner(tiny_sd_dir, tiny_clip_options):
    return _refiner(tiny_sd_dir, tiny_clip_options)


def test_refinement_touches_only_the_band_and_merges(refiner, scene):
    image, probs, classes = scene
    result = refiner.refine(image, probs, classes, return_generated=True, return_correspondence=True)
    assert result.probs.shape == probs.shape and result.labels.shape == (H, W)
    outside = (probs < 0.2) | (probs > 0.6)
    assert np.array_equal(result.probs[outside], probs[outside])
    assert not np.array_equal(result.probs, probs)
    # Eq. 9: every changed value is 0.8 x itself + 0.2 x a value that occurs in that class's coarse map
    for k in range(len(classes)):
        changed = result.probs[k] != probs[k]
        matched = (result.probs[k][changed] - 0.8 * probs[k][changed]) / 0.2
        distance = np.abs(matched[:, None] - np.unique(probs[k])[None, :]).min(axis=1)
        assert (distance < 1e-4).all()
    # "dog" has no pixel in the band: it cannot change, so nothing was generated for it
    assert set(result.generated) == {"potted plant", "cat"} == set(result.correspondence)
    assert result.generated["cat"].shape == (64, 64, 3) and result.generated["cat"].dtype == np.uint8
    expected = np.where(result.probs.max(0) < 0.5, 0, result.probs.argmax(0) + 1)
    assert np.array_equal(result.labels, expected)


def test_same_seed_same_result_and_batching_does_not_matter(refiner, scene, tiny_sd_dir, tiny_clip_options):
    image, probs, classes = scene
    first = refiner.refine(image, probs, classes).probs
    assert np.array_equal(first, refiner.refine(image, probs, classes).probs)
    one_at_a_time = _refiner(tiny_sd_dir, tiny_clip_options, class_batch=1).refine(image, probs, classes).probs
    assert np.allclose(first, one_at_a_time, atol=1e-5)


def test_injection_changes_the_generated_image(tiny_sd_dir, tiny_clip_options, scene):
    image, probs, classes = scene
    options = {"backbone": {"model": f"local-dir:{tiny_sd_dir}"}, "extractor": tiny_clip_options}
    plain = Refiner.from_names("sd21", "none", "clip", resolution=64, options=options)
    injected = Refiner.from_names("sd21", "attn", "clip", resolution=64, options=options)
    a = plain.refine(image, probs, classes, return_generated=True).generated["cat"]
    b = injected.refine(image, probs, classes, return_generated=True).generated["cat"]
    assert not np.array_equal(a, b)


def test_hard_masks_are_softened_so_they_can_change(refiner, scene):
    image, probs, classes = scene
    hard = (probs >= 0.5).astype(np.float32)
    result = refiner.refine(image, hard, classes, ignore=np.eye(H, W, dtype=bool))
    assert ((result.probs > 0) & (result.probs < 1)).any()
    assert (result.labels[np.eye(H, W, dtype=bool)] == 255).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda img, p, c: (img, p[:2], c), "expected"),
    (lambda img, p, c: (img, p, []), "class list is empty"),
    (lambda img, p, c: (img, p * 2, c), "within \\[0, 1\\]"),
    (lambda img, p, c: (img[..., :2], p, c), "uint8"),
    (lambda img, p, c: (img, p, ["cat", "cat", "dog"]), "unique"),
])
def test_bad_inputs_are_one_line_errors(refiner, scene, mutate, message):
    with pytest.raises(G4SegError, match=message) as info:
        refiner.refine(*mutate(*scene))
    assert "\n" not in str(info.value)
