"""The ``densecrf`` post-processor against a naive mean-field CRF written out here.

The reference builds the two kernels of a fully connected CRF explicitly on a tiny image (every pair
of pixels, self pairs included: k = exp(-|f_i - f_j|^2 / 2) with f = (x, y) / sxy and
(x, y) / sxy ++ rgb / srgb), normalises them symmetrically (D^-1/2 K D^-1/2, pydensecrf's default),
and iterates Q <- softmax(-U + sum_k w_k K_k Q) (Potts compatibility). pydensecrf computes the same
messages on a permutohedral lattice, which approximates the Gaussian filtering: on these 5 x 6 scenes
its posteriors stay within ``TOL`` of the exact ones (measured: at most 0.04), so a setting counts as
passed through when changing it moves the exact posterior by far more than ``TOL`` and pydensecrf's
output follows it there. Without pairwise terms the CRF is exact (Q = the normalised unary), which is
compared to float precision. Merge rules come from :mod:`g4seg.masks`, an independent implementation.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg.builtin.postprocessor_densecrf import PRESETS, CrfSettings, DenseCrfOptions, background_score, clip_es_image
from g4seg.errors import G4SegError
from g4seg.masks import MergeRule
from g4seg.plugins import registry

HAS_CRF = importlib.util.find_spec("pydensecrf") is not None
needs_crf = pytest.mark.skipif(not HAS_CRF, reason="pydensecrf is not installed (pip install 'g4seg[crf]', which "
                                                    "builds pydensecrf2); its missing-library error is tested")
TOL = 0.06  # pydensecrf's lattice vs the exact kernels on these scenes (measured: at most 0.04)
NO_PAIRWISE = {"gaussian_compat": 0, "bilateral_compat": 0}


def build(**options):
    return registry().get("postprocessor", "densecrf").build(options)


# ----- the reference ---------------------------------------------------------------------------------

def naive_crf(image: np.ndarray, stack: np.ndarray, s: CrfSettings) -> np.ndarray:
    """Exact mean field of a dense CRF over the (L, H, W) score stack, label 0 the background."""
    labels, height, width = stack.shape
    if s.unary == "softmax":
        unary = -np.log(np.clip(stack.astype(np.float64), 1e-5, 1.0)).reshape(labels, -1)
    else:
        winner = stack.argmax(axis=0).ravel()
        unary = np.where(np.arange(labels)[:, None] == winner[None], -np.log(s.gt_prob),
                         -np.log((1 - s.gt_prob) / (labels - 1)))
    rgb = clip_es_image(image) if s.color == "clip-es" else image
    yy, xx = np.mgrid[:height, :width]
    pos = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    colours = rgb.reshape(-1, 3).astype(np.float64)

    def kernel(features: np.ndarray) -> np.ndarray:
        k = np.exp(-((features[:, None] - features[None]) ** 2).sum(-1) / 2)
        norm = 1 / np.sqrt(k.sum(axis=1))
        return norm[:, None] * k * norm[None]

    kernels = [(s.gaussian_compat, kernel(pos / s.gaussian_sxy)),
               (s.bilateral_compat, kernel(np.concatenate([pos / s.bilateral_sxy, colours / s.bilateral_srgb], 1)))]

    def softmax(energy: np.ndarray) -> np.ndarray:
        e = np.exp(energy - energy.max(axis=0))
        return e / e.sum(axis=0)

    q = softmax(-unary)
    for _ in range(s.iterations):
        q = softmax(-unary + sum(w * (q @ k) for w, k in kernels))  # k symmetric: (k q_l)_i = (q_l k)_i
    return q.reshape(labels, height, width)


def scene(seed: int = 0, weak: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A 5 x 6 image, red left half and blue right half (slightly noisy), and two noisy class maps that
    mostly follow the halves, with two pixels on the wrong side; ``weak`` unaries let the pairwise terms decide."""
    rng = np.random.default_rng(seed)
    image = np.zeros((5, 6, 3), np.int64)
    image[:, :3], image[:, 3:] = (200, 40, 40), (40, 60, 190)
    image = (image + rng.integers(-6, 7, image.shape)).clip(0, 255).astype(np.uint8)
    left = np.zeros((5, 6), bool)
    left[:, :3] = True
    high, low, noise = (0.4, 0.25, 0.12) if weak else (0.6, 0.15, 0.1)
    probs = np.stack([np.where(left, high, low), np.where(left, low, high)]) + rng.uniform(-noise, noise, (2, 5, 6))
    if not weak:
        probs[:, 2, 1], probs[:, 1, 4] = (0.3, 0.45), (0.5, 0.35)
    return image, probs.clip(0, 1).astype(np.float32)


def stack_of(probs: np.ndarray, settings: CrfSettings, rule: MergeRule | None = None) -> np.ndarray:
    scores, bg = background_score(probs, None, rule, settings)
    return np.concatenate([bg[None], scores]).astype(np.float64)


# ----- settings and presets (no library needed) ------------------------------------------------------

def test_presets_are_the_cited_settings():
    def row(s: CrfSettings):
        return (s.iterations, s.gaussian_sxy, s.gaussian_compat, s.bilateral_sxy, s.bilateral_srgb, s.bilateral_compat)

    # kazuto1011/deeplab-pytorch configs/voc12.yaml:
    # ITER_MAX 10, POS_XY_STD 1, POS_W 3, BI_XY_STD 67, BI_RGB_STD 3, BI_W 4
    assert row(PRESETS["deeplab"]) == (10, 1, 3, 67, 3, 4)
    assert (PRESETS["deeplab"].unary, PRESETS["deeplab"].background, PRESETS["deeplab"].color) == \
        ("softmax", "merge", "rgb")
    # CLIP-ES eval_cam_with_crf.py lines 87-94 (same numbers), line 111 power 1, lines 100-115 the image
    clip_es = PRESETS["clip-es"]
    assert row(clip_es) == (10, 1, 3, 67, 3, 4)
    assert (clip_es.unary, clip_es.background, clip_es.bg_power, clip_es.color) == ("softmax", "power", 1.0, "clip-es")
    # IRN misc/imutils.py lines 156-168 (t=10, gt_prob=0.7, sxy=3 compat=3, sxy=50 srgb=5 compat=10),
    # cam_to_ir_label.py line 27 with run_sample.py's conf_fg_thres 0.30
    irn = PRESETS["irn"]
    assert row(irn) == (10, 3, 3, 50, 5, 10)
    assert (irn.unary, irn.gt_prob, irn.background, irn.bg_value, irn.color) == ("labels", 0.7, "constant", 0.3, "rgb")


def test_explicit_options_override_the_preset_and_parse_from_strings():
    spec = registry().get("postprocessor", "densecrf")
    options = spec.parse_options({"preset": "irn", "iterations": "3", "bilateral_srgb": "7.5"})
    settings = options.settings()
    assert (settings.iterations, settings.bilateral_srgb) == (3, 7.5)
    assert (settings.bilateral_sxy, settings.unary, settings.bg_value) == (50, "labels", 0.3)  # the rest: irn's
    assert DenseCrfOptions().settings() == PRESETS["deeplab"]
    for bad in ({"preset": "nope"}, {"iterations": -1}, {"gt_prob": 1}, {"kernel": 3}):
        with pytest.raises(G4SegError, match="postprocessor 'densecrf': invalid options") as info:
            spec.parse_options(bad)
        assert "\n" not in str(info.value)


def test_clip_es_image_is_bgr_minus_mean_wrapped_to_uint8():
    image = np.array([[[0, 0, 0], [200, 120, 110], [255, 255, 255], [122, 116, 105], [100, 100, 100]]], np.uint8)
    # BGR - (104.008, 116.669, 122.675), truncated toward zero (-0.669 -> 0), modulo 256 (by hand)
    expected = [[[152, 140, 134], [5, 3, 77], [150, 138, 132], [0, 0, 0], [252, 240, 234]]]
    assert clip_es_image(image).tolist() == expected
    assert clip_es_image(image).dtype == np.uint8


@pytest.mark.parametrize("rule, with_background", [
    (MergeRule("threshold", bg_threshold=0.45), False),
    (MergeRule("argmax-bg"), True),
    (MergeRule("sclip", prob_thd=0.3), True),
    (MergeRule("sclip", prob_thd=0.2), False),
    (MergeRule("sclip", prob_thd=0.1, area_thd=0.2), True),
    (MergeRule("pow", power=2.0), False),
    (MergeRule("pow", power=1.0), False),
])
def test_the_merge_background_reproduces_the_merge_rule(rule, with_background):
    """background=merge: before any pairwise term, argmax over (background, classes) is the rule's label map."""
    rng = np.random.default_rng(3)
    probs = rng.random((4, 12, 14)).astype(np.float32)
    probs[3] *= 0.35  # a weak class, which the area filter drops
    background = rng.random((12, 14)).astype(np.float32) if with_background else None
    scores, bg = background_score(probs, background, rule, PRESETS["deeplab"])
    labels = np.concatenate([bg[None], scores]).argmax(axis=0)
    expected = rule.labels(probs, background)
    assert (labels == expected).all()
    if rule.area_thd is not None:
        assert 4 not in expected and 1 in expected  # the case exercises the filter


def test_power_and_constant_backgrounds():
    probs = np.array([[[0.2, 0.9]], [[0.5, 0.1]]], np.float32)
    _, power = background_score(probs, None, None, CrfSettings(background="power", bg_power=2.0))
    assert np.allclose(power, [[0.25, 0.01]])
    _, constant = background_score(probs, None, MergeRule("pow"), CrfSettings(background="constant", bg_value=0.3))
    assert np.allclose(constant, 0.3)
    with pytest.raises(G4SegError, match="needs a background channel"):
        background_score(probs, None, MergeRule("argmax-bg"), PRESETS["deeplab"])


def test_missing_library_is_one_line_and_plugins_still_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import pydensecrf.densecrf -> ImportError
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert "densecrf" in [spec.name for spec in registry().list("postprocessor")]
    with pytest.raises(G4SegError) as info:
        build(preset="clip-es")
    message = str(info.value)
    assert "\n" not in message and "pip install 'g4seg[crf]'" in message and "pydensecrf" in message
    from g4seg.cli import app

    listed = CliRunner().invoke(app, ["plugins", "--json"])
    assert listed.exit_code == 0, listed.output
    entry = {p["name"]: p for p in json.loads(listed.output)["plugins"]}["postprocessor_densecrf"]
    assert entry["status"] == "loaded" and entry["components"] == ["postprocessor:densecrf"]


# ----- the CRF itself --------------------------------------------------------------------------------

@needs_crf
@pytest.mark.parametrize("unary", ["softmax", "labels"])
def test_without_pairwise_terms_the_posterior_is_the_unary_exactly(unary):
    image, probs = scene()
    crf = build(unary=unary, background="constant", bg_value=0.4, **NO_PAIRWISE)
    out = crf(image, probs, background=None, rule=None)
    stack = stack_of(probs, crf.settings)
    if unary == "softmax":
        expected = np.clip(stack, 1e-5, 1) / np.clip(stack, 1e-5, 1).sum(axis=0)
    else:
        expected = np.where(np.arange(3)[:, None, None] == stack.argmax(axis=0), 0.7, 0.15)
    np.testing.assert_allclose(np.concatenate([out.background[None], out.probs]), expected, atol=1e-6)


@needs_crf
@pytest.mark.parametrize("rule, with_background", [
    (MergeRule("threshold", bg_threshold=0.5), False), (MergeRule("argmax-bg"), True),
    (MergeRule("sclip", prob_thd=0.1, area_thd=0.2), True), (MergeRule("pow", power=2.0), False),
])
def test_without_pairwise_terms_the_labels_are_the_merge_rules(rule, with_background):
    """The identity principle around the CRF: with its pairwise terms off it gives the refiner's labels back."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    probs = rng.random((3, 9, 11)).astype(np.float32)
    probs[2] *= 0.35
    background = rng.random((9, 11)).astype(np.float32) if with_background else None
    out = build(**NO_PAIRWISE)(image, probs, background=background, rule=rule)
    assert out.merge == MergeRule("argmax-bg")
    assert (out.merge.labels(out.probs, out.background) == rule.labels(probs, background)).all()


@needs_crf
@pytest.mark.parametrize("preset", ["deeplab", "clip-es", "irn"])
def test_each_preset_matches_the_naive_mean_field(preset):
    image, probs = scene()
    crf = build(preset=preset)
    out = crf(image, probs, background=None, rule=MergeRule("threshold", bg_threshold=0.3))
    got = np.concatenate([out.background[None], out.probs])
    expected = naive_crf(image, stack_of(probs, crf.settings, MergeRule("threshold", bg_threshold=0.3)), crf.settings)
    assert np.abs(got - expected).max() < TOL
    sure = np.sort(expected, axis=0)[-1] - np.sort(expected, axis=0)[-2] > 2 * TOL
    assert (got.argmax(axis=0)[sure] == expected.argmax(axis=0)[sure]).all() and sure.mean() > 0.8


GAUSSIAN_ONLY = {"gaussian_compat": 3.0, "bilateral_compat": 0.0}
BILATERAL_ONLY = {"gaussian_compat": 0.0, "bilateral_compat": 3.0}


@needs_crf
@pytest.mark.parametrize("name, base, changed, setting", [
    ("iterations", 0, 10, {}),
    ("gaussian_sxy", 0.3, 3.0, GAUSSIAN_ONLY),
    ("gaussian_compat", 0.0, 2.0, {}),
    ("bilateral_sxy", 0.3, 50.0, BILATERAL_ONLY),
    ("bilateral_srgb", 10.0, 300.0, {**BILATERAL_ONLY, "bilateral_sxy": 50.0}),
    ("bilateral_compat", 1.0, 8.0, {}),
    ("gt_prob", 0.55, 0.9, {"unary": "labels"}),
    ("color", "rgb", "clip-es", BILATERAL_ONLY),
])
def test_each_setting_reaches_the_crf(name, base, changed, setting):
    """Changing one setting moves the exact posterior by much more than the lattice's error, and
    pydensecrf's output follows it to the new value (so the setting was passed, and passed right)."""
    image, probs = scene(weak=True)
    if name == "color":  # two halves 2 apart in RGB; CLIP-ES's wrapped BGR-minus-mean puts them ~254 apart
        image[:, :3], image[:, 3:] = (122, 117, 104), (120, 115, 102)
        wrapped = clip_es_image(image)
        assert wrapped[0, 0].tolist() == [0, 0, 0] and wrapped[0, 5].tolist() == [254, 255, 254]
    common = {"gaussian_sxy": 1.0, "gaussian_compat": 1.0, "bilateral_sxy": 3.0, "bilateral_srgb": 20.0,
              "bilateral_compat": 1.0, "iterations": 5, "background": "constant", "bg_value": 0.3, **setting}
    results = {}
    for value in (base, changed):
        crf = build(**{**common, name: value})
        out = crf(image, probs, background=None, rule=None)
        got = np.concatenate([out.background[None], out.probs])
        results[value] = got, naive_crf(image, stack_of(probs, crf.settings), crf.settings)
    (got_base, exact_base), (got_changed, exact_changed) = results[base], results[changed]
    assert np.abs(exact_changed - exact_base).max() > 3 * TOL
    assert np.abs(got_base - exact_base).max() < TOL
    assert np.abs(got_changed - exact_changed).max() < TOL


@needs_crf
def test_shapes_dtypes_ranges_and_absent_classes():
    image, probs = scene()
    probs = np.concatenate([probs, np.zeros((1, 5, 6), np.float32)])  # an absent class
    for classes in ("nonzero", "all"):
        out = build(classes=classes)(image, probs, background=None, rule=MergeRule("threshold"))
        assert out.probs.shape == (3, 5, 6) and out.probs.dtype == np.float32
        assert out.background.shape == (5, 6) and out.background.dtype == np.float32
        assert out.probs.min() >= 0 and out.probs.max() <= 1
        np.testing.assert_allclose(out.probs.sum(axis=0) + out.background, 1, atol=1e-5)
        assert (out.probs[2] == 0).all() if classes == "nonzero" else (out.probs[2] > 0).all()
    nothing = build()(image, np.zeros((2, 5, 6), np.float32), background=None, rule=None)
    assert (nothing.probs == 0).all() and (nothing.background == 1).all()


@needs_crf
@pytest.mark.parametrize("image, probs, message", [
    (np.zeros((5, 6, 3), np.float32), np.zeros((2, 5, 6), np.float32), "uint8 image"),
    (np.zeros((5, 6), np.uint8), np.zeros((2, 5, 6), np.float32), "uint8 image"),
    (np.zeros((5, 6, 3), np.uint8), np.zeros((2, 6, 5), np.float32), "image's size"),
    (np.zeros((5, 6, 3), np.uint8), np.full((2, 5, 6), 1.5, np.float32), "within \\[0, 1\\]"),
    (np.zeros((5, 6, 3), np.uint8), np.full((2, 5, 6), np.nan, np.float32), "finite"),
])
def test_bad_input_is_one_line(image, probs, message):
    with pytest.raises(G4SegError, match=message) as info:
        build()(image, probs, background=None, rule=None)
    assert "\n" not in str(info.value)


@needs_crf
def test_refiner_merges_with_the_crfs_background():
    """Refiner.refine hands the CRF the merge's background and rule and takes its posterior back: the labels
    are the argmax over (CRF background, CRF classes), even where the input's rule would say otherwise."""
    from g4seg.config import RefineConfig
    from g4seg.refiner import Refiner

    image = np.full((4, 5, 3), 90, np.uint8)
    probs = np.stack([np.full((4, 5), 0.66), np.full((4, 5), 0.65)]).astype(np.float32)  # outside the CF band
    probs[:, 0, 0] = 0.1
    crf = build(iterations=0, **NO_PAIRWISE)
    config = RefineConfig(merge="threshold", bg_threshold=0.45)
    result = Refiner(config, None, None, None, crf).refine(image, probs, ["a", "b"])
    direct = crf(image, probs, background=None, rule=MergeRule("threshold", bg_threshold=0.45))
    np.testing.assert_array_equal(result.probs, direct.probs)
    np.testing.assert_array_equal(result.background, direct.background)
    # the rule reached the CRF: Q = (0.45, 0.66, 0.65) / 1.76 at most pixels, (0.45, 0.1, 0.1) / 0.65 at (0, 0)
    np.testing.assert_allclose(result.background[1:], 0.45 / 1.76, rtol=1e-4)
    expected = np.ones((4, 5), np.uint8)
    expected[0, 0] = 0
    assert (result.labels == expected).all()
    # the input's rule on the CRF's classes alone would make every pixel background
    assert (MergeRule("threshold", bg_threshold=0.45).labels(result.probs) == 0).all()


@needs_crf
def test_refine_cli_with_the_clip_es_preset(tmp_path, config_file):
    from g4seg.cli import app

    h, w = 40, 48
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2
    Image.fromarray(np.where(disc[..., None], [220, 40, 40], [20, 90, 200]).astype(np.uint8)).save(tmp_path / "a.png")
    probs = np.stack([np.where(disc, 0.7, 0.25), np.where(disc, 0.1, 0.3)]).astype(np.float32)
    np.save(tmp_path / "a.npy", probs)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(a) for a in (
        "refine", tmp_path / "a.png", "--mask", tmp_path / "a.npy", "--classes", "cat,dog", "--out", out,
        "--config", config_file, "--no-progress", "--postprocessor", "densecrf", "-o", "postprocessor.preset=clip-es")])
    assert result.exit_code == 0, result.output
    saved = np.load(out / "a.npz")
    assert saved["probs"].shape == (2, h, w) and saved["background"].shape == (h, w)
    np.testing.assert_allclose(saved["probs"].astype(np.float32).sum(0) + saved["background"], 1, atol=3e-3)
    labels = np.array(Image.open(out / "a.png"))
    assert (labels[disc] == 1).mean() > 0.95 and (labels[~disc] != 1).mean() > 0.95
    resolved = json.loads((out / "config.json").read_text())["config"]
    assert resolved["postprocessor"] == "densecrf" and resolved["options"]["postprocessor"]["preset"] == "clip-es"
