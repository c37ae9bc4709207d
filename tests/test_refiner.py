"""The orchestrator end to end with tiny random models loaded through the real registry path."""

import numpy as np
import pytest

from g4seg import Refiner
from g4seg.errors import G4SegError

from conftest import SCENE_HW

H, W = SCENE_HW


def _refiner(sd_dir, clip_options, injector="attn", **settings):
    options = {"backbone": {"model": f"local-dir:{sd_dir}"}, "extractor": clip_options}
    return Refiner.from_names("sd21", injector, "clip", resolution=64, device="cpu", options=options, **settings)


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


def _generated(refiner, scene, name="cat"):
    image, probs, classes = scene
    return refiner.refine(image, probs, classes, return_generated=True).generated[name]


def test_guidance_combines_both_halves_as_classifier_free_guidance(tiny_sd_dir, tiny_clip_options, scene):
    """Independent recomputation with the backbone's pieces: eps_u + g (eps_c - eps_u), then Eq. 2 and decode."""
    import torch
    import torch.nn.functional as F

    from g4seg import diffusion_math

    refiner = _refiner(tiny_sd_dir, tiny_clip_options, injector="none", guidance_scale=3.0)
    bb = refiner.backbone
    image = scene[0]
    with torch.inference_mode():
        pixels = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, size=(64, 64),
                               mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        z0 = bb.encode(pixels)
        a = bb.alphas_cumprod[400]
        z_t = diffusion_math.add_noise(z0, a, diffusion_math.seeded_noise(tuple(z0.shape), 0))
        eps = [bb.unet(z_t, 400, encoder_hidden_states=bb.encode_prompts([p], (64, 64)).encoder_hidden_states).sample
               for p in ("", "a photo of cat")]
        x0 = diffusion_math.predict_x0(eps[0] + 3.0 * (eps[1] - eps[0]), z_t, a, "epsilon")
        expected = (bb.decode(x0)[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(_generated(refiner, scene).astype(float) - expected).max() <= 1


def test_guidance_injects_only_the_conditional_half(tiny_sd_dir, tiny_clip_options, scene):
    """Scale 0 keeps only the unconditional prediction: injected or not, the same image; scale 1 the injected one."""
    plain = _generated(_refiner(tiny_sd_dir, tiny_clip_options, injector="none", guidance_scale=0.0), scene)
    injected = _generated(_refiner(tiny_sd_dir, tiny_clip_options, guidance_scale=0.0), scene)
    assert np.abs(plain.astype(int) - injected).max() <= 1
    unguided = _generated(_refiner(tiny_sd_dir, tiny_clip_options), scene)
    scale_one = _generated(_refiner(tiny_sd_dir, tiny_clip_options, guidance_scale=1.0), scene)
    assert np.abs(unguided.astype(int) - scale_one).max() <= 1
    assert np.abs(unguided.astype(int) - plain).max() > 1


def test_guidance_is_refused_where_the_backbone_has_no_branch(tiny_lcm_dir, tiny_clip_options):
    options = {"backbone": {"model": f"local-dir:{tiny_lcm_dir}"}, "extractor": tiny_clip_options}
    with pytest.raises(G4SegError, match="backbone 'lcm' has no classifier-free guidance branch"):
        Refiner.from_names("lcm", "attn", "clip", guidance_scale=7.5, options=options)


def test_class_embedding_alone_splices_the_name_encoded_on_its_own(tiny_sd_dir, tiny_clip_options, scene):
    """Multi-token 'potted plant': its positions take the name-alone embeddings after BOS; the rest is the prompt's."""
    import torch

    refiner = _refiner(tiny_sd_dir, tiny_clip_options, class_embedding="alone")
    bb = refiner.backbone
    prompts, names = ["a photo of potted plant", "a potted plant and a potted plant"], ["potted plant"] * 2
    tokens = [bb.token_indices(p, n) for p, n in zip(prompts, names)]
    assert tokens[0] == [4, 5] and tokens[1] == [2, 3, 6, 7]
    with torch.inference_mode():
        spliced = refiner._conditioning(prompts, names, tokens, (64, 64)).encoder_hidden_states
        prompt = bb.encode_prompts(prompts, (64, 64)).encoder_hidden_states
        alone = bb.encode_prompts(["potted plant"], (64, 64)).encoder_hidden_states[0]
    for b, positions in enumerate(tokens):
        others = [i for i in range(77) if i not in positions]
        assert torch.equal(spliced[b, others], prompt[b, others])
    assert torch.equal(spliced[0, [4, 5]], alone[[1, 2]])
    assert torch.equal(spliced[1, [2, 3]], alone[[1, 2]]) and torch.equal(spliced[1, [6, 7]], alone[[1, 2]])
    assert not np.array_equal(_generated(refiner, scene, "potted plant"),
                              _generated(_refiner(tiny_sd_dir, tiny_clip_options), scene, "potted plant"))


# ----- bias controls: generator self / noise ------------------------------------------------------------

class NoModel:
    """Stands for the backbone and the injector of a control run: their UNet, VAE and injection must not run."""

    resolution, device, dtype = 64, "cpu", None
    OPTIONAL = ("attach",)  # optional protocol methods (components.UsesBackbone) may be looked up, as absent

    def __getattr__(self, name):
        if name in self.OPTIONAL:
            raise AttributeError(name)
        raise AssertionError(f"a control run used the model's '{name}'")


def cell_features(images):
    """Mean colour of 8x8 cells plus a one-hot of the cell's position: every cell's feature is unique, so a
    cell can always match itself (and the colour part lets another image's cells match elsewhere)."""
    import torch
    import torch.nn.functional as F

    pooled = F.avg_pool2d(images.float(), 8)
    b, _, h, w = pooled.shape
    position = 0.2 * torch.eye(h * w).view(1, h * w, h, w).expand(b, -1, -1, -1)
    return F.normalize(torch.cat([pooled, position], 1), dim=1)


def resized(image, size=64):
    """The model input, resized here on its own: (1, 3, size, size) in [0, 1]."""
    import torch
    import torch.nn.functional as F

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _control(generator, **settings):
    from g4seg.config import RefineConfig

    config = RefineConfig(generator=generator, resolution=64, device="cpu", **settings)
    return Refiner(config, NoModel(), NoModel(), cell_features)


def test_self_control_with_identical_features_changes_nothing(scene):
    """generator self: every band pixel matches itself (beta < 1 and many pixels in the band), so Eq. 9 leaves
    the probabilities bit-exact; the image compared is the input; no UNet, VAE or injection runs."""
    image, probs, classes = scene
    result = _control("self", beta=0.5).refine(image, probs, classes, return_generated=True,
                                               return_correspondence=True)
    in_band = (probs >= 0.2) & (probs <= 0.6)
    assert in_band.sum() > 100 and set(result.generated) == {"potted plant", "cat"}
    assert np.array_equal(result.probs, probs)
    for name in result.correspondence:
        assert np.array_equal(result.correspondence[name], np.arange(64).reshape(8, 8))
        expected = (resized(image)[0].permute(1, 2, 0).numpy() * 255).round()
        assert np.array_equal(result.generated[name], expected)
    # the same update rule against noise does move band pixels: the check above is not vacuous
    assert not np.array_equal(_control("noise", beta=0.5).refine(image, probs, classes).probs, probs)


def test_noise_image_has_the_images_channel_statistics_and_its_seed():
    from g4seg.refiner import noise_image

    rng = np.random.default_rng(0)
    means, stds = np.array([0.3, 0.5, 0.7]), np.array([0.02, 0.05, 0.03])  # no value near 0 or 1: no clamping
    pixels = means[None, :, None, None] + stds[None, :, None, None] * rng.standard_normal((1, 3, 32, 48))
    import torch

    pixels_t = torch.from_numpy(pixels.astype(np.float32))
    noise = noise_image(pixels_t, 7).numpy().astype(np.float64)
    assert noise.shape == pixels.shape
    np.testing.assert_allclose(noise.mean((0, 2, 3)), pixels.mean((0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(noise.std((0, 2, 3), ddof=1), pixels.std((0, 2, 3), ddof=1), rtol=1e-4)
    assert np.array_equal(noise_image(pixels_t, 7).numpy(), noise.astype(np.float32))  # deterministic
    def correlation(a, b):  # of the per-channel deviations from the mean
        a, b = (x - x.mean((2, 3), keepdims=True) for x in (a, b))
        return abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    other = noise_image(pixels_t, 8).numpy()
    assert correlation(other, noise) < 0.1  # another seed, other noise
    assert correlation(noise, pixels) < 0.1  # nothing of the image's content
    saturated = noise_image(torch.zeros(1, 3, 8, 8), 0)
    assert torch.equal(saturated, torch.zeros(1, 3, 8, 8))  # a flat image gives itself, in [0, 1]


def test_noise_control_is_deterministic_for_a_seed_and_is_what_was_compared(scene):
    from g4seg.refiner import noise_image

    image, probs, classes = scene
    first = _control("noise").refine(image, probs, classes, return_generated=True)
    again = _control("noise").refine(image, probs, classes, return_generated=True)
    other = _control("noise", seed=1).refine(image, probs, classes, return_generated=True)
    assert np.array_equal(first.probs, again.probs) and np.array_equal(first.generated["cat"], again.generated["cat"])
    assert not np.array_equal(first.generated["cat"], other.generated["cat"])
    assert not np.array_equal(first.probs, other.probs)
    expected = (noise_image(resized(image), 0)[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.array_equal(first.generated["cat"], expected)
    assert np.array_equal(first.generated["potted plant"], expected)  # one noise image for every class


def test_generator_is_validated():
    from g4seg.config import load_config

    with pytest.raises(G4SegError, match="generator") as info:
        load_config(None, generator="random")
    assert "\n" not in str(info.value)
