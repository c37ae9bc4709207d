"""g4seg-cascadepsp: the entry point, the adapter's per-class handling (by hand), the package's own Refiner on a
stand-in network (by hand), and the weights file (offline, failed download, MD5, the package's download).

CascadePSP's released weights cannot be downloaded here (no internet), so the network is the stand-in of
``g4seg_cascadepsp.testing``: the real ``RefinementModule``'s interface (checked below against the real
module), saved as the package's weights file, run by the package's unchanged ``Refiner``.
"""

from __future__ import annotations

import hashlib
import inspect

import numpy as np
import pytest
import torch

from g4seg import plugins
from g4seg.errors import G4SegError
from g4seg.masks import MergeRule
from g4seg.registry import Runtime
from g4seg_cascadepsp import CascadePspOptions, build_cascadepsp
from g4seg_cascadepsp.postprocessor import CascadePsp
from g4seg_cascadepsp.testing import StandInRefinementModule, save_stand_in
from g4seg_cascadepsp.weights import WEIGHTS_MD5, WEIGHTS_URL

sr_main = pytest.importorskip("segmentation_refinement.main")
sr_download = pytest.importorskip("segmentation_refinement.download")

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # main.py


@pytest.fixture(autouse=True)
def online_unless_told(monkeypatch):
    """Start every test online: a run of the whole suite may have left the offline variables set (an in-process
    ``g4seg --offline`` sets them for the process), and the tests below set them where they mean to."""
    from g4seg.runtime import OFFLINE_VARIABLES

    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def stand_in(monkeypatch):
    """The package's Refiner builds the stand-in instead of the real network."""
    monkeypatch.setattr(sr_main, "RefinementModule", StandInRefinementModule)


@pytest.fixture
def no_network(monkeypatch):
    """Any request fails the test (pytest.fail is a BaseException: no except clause can hide it)."""
    import requests

    def fail(*args, **kwargs):
        pytest.fail("no request may be made here")

    for name in ("get", "head"):
        monkeypatch.setattr(requests, name, fail)


def build(runtime: Runtime | None = None, **options) -> CascadePsp:
    return plugins.registry().get("postprocessor", "cascadepsp").build(options, runtime or Runtime())


def test_discovered_through_the_entry_point_group():
    registry, report = plugins.load()
    eps = [ep for ep in plugins.entry_points(group=plugins.ENTRY_POINT_GROUP) if ep.name == "cascadepsp"]
    assert [ep.value for ep in eps] == ["g4seg_cascadepsp"]
    assert report.plugins["cascadepsp"] == "g4seg-cascadepsp" and "cascadepsp" not in report.broken
    assert registry.get("postprocessor", "cascadepsp").options is CascadePspOptions


def test_the_constants_are_the_packages():
    """The URL and MD5 the error line names are the ones the package downloads and checks."""
    assert f"'{WEIGHTS_URL}'" in inspect.getsource(sr_download.download_model)
    assert f"'{WEIGHTS_MD5}'" in inspect.getsource(sr_download.check_model)


# ----- the stand-in network --------------------------------------------------------------------------

def test_the_stand_in_has_the_real_networks_interface():
    """Same forward parameters (names, kinds, defaults), output keys and shapes as RefinementModule (random
    weights, 16x16 input), for the ways it can be called: no intermediates (the global step), both (the local
    step, eval_helper.py), s8 alone."""
    from segmentation_refinement.models.psp.pspnet import RefinementModule

    real, fake = RefinementModule().eval(), StandInRefinementModule()
    def parameters(forward):
        return [(p.name, p.kind, p.default) for p in inspect.signature(forward).parameters.values()]

    assert parameters(real.forward) == parameters(fake.forward)
    x, seg = torch.randn(1, 3, 16, 16), torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        for inter in ((None, None), (seg, None), (seg, seg)):
            got, want = fake(x, seg, *inter), real(x, seg, *inter)
            assert sorted(got) == sorted(want)
            assert all(got[key].shape == want[key].shape for key in want)


def _by_hand(image: np.ndarray, mask: np.ndarray, seg_weight=3.0, image_weight=(1.5, -1.0, 0.5), bias=0.25):
    """The stand-in through the package's pre- and post-processing, in float64: ToTensor + Normalize, the mask
    binarised at 127 and mapped to +-1, the sigmoid times 255 truncated to uint8."""
    x = (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    seg = np.where(mask > 127, 1.0, -1.0)
    logit = seg_weight * seg + x @ np.array(image_weight) + bias
    return np.floor(255 / (1 + np.exp(-logit)))


def test_the_packages_refiner_runs_the_stand_in(tmp_path, stand_in):
    """Fast mode with L = the longer side: no resize, so the package's output is the per-pixel formula; its
    padding to a multiple of 8 (13x10 -> 16x16) must not show. A mask of 0/128/255 checks the threshold."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)
    mask = np.zeros((10, 13), np.uint8)
    mask[2:8, 3:9], mask[4, 4], mask[5, 5] = 255, 127, 128
    save_stand_in(tmp_path)
    from segmentation_refinement import Refiner

    refiner = Refiner(device="cpu", model_folder=str(tmp_path), download_and_check_model=False)
    out = refiner.refine(image, mask, fast=True, L=13)
    assert out.dtype == np.uint8 and out.shape == (10, 13)
    assert np.abs(out.astype(np.float64) - _by_hand(image, mask)).max() <= 1  # float32 vs float64 truncation
    assert len(np.unique(out)) > 20  # the image term is there, not only the mask's two values


# ----- the adapter, by hand --------------------------------------------------------------------------

class RecordingRefiner:
    """A binary refiner whose output is known: 200 inside the mask, 40 outside, plus 10 per earlier call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def refine(self, image, mask, fast=False, L=900):
        self.calls.append({"image": image.copy(), "mask": mask.copy(), "fast": fast, "L": L})
        return (np.where(mask > 127, 200, 40) + 10 * (len(self.calls) - 1)).astype(np.uint8)


def test_per_class_refinement_by_hand():
    """Three classes on a 3x4 image with an argmax-bg background channel: the labels the run would give are
    [[0 1 1 0] [3 3 1 0] [3 3 0 0]] (class 2 has no pixel; at (0, 0) class 1 is above 0.5 but the background
    wins, at (1, 1) class 1 is above 0.5 but class 3 wins: the masks are the labels, not each map above 0.5).
    Class 1 is refined first (call 0), class 3 second (call 1); class 2 is not refined. Refined maps: class 1 =
    200/255 in its region else 40/255; class 3 = 210/255 in its region else 50/255; background = 1 - max;
    labels = argmax(background, classes)."""
    image = np.arange(36, dtype=np.uint8).reshape(3, 4, 3)
    background = np.array([[.9, .1, .1, .9], [.1, .1, .1, .9], [.1, .1, .9, .9]], np.float32)
    c1 = np.array([[.7, .8, .8, .0], [.3, .55, .7, .0], [.0, .0, .0, .0]], np.float32)
    c2 = np.full((3, 4), 0.05, np.float32)
    c3 = np.array([[.0, .0, .0, .0], [.6, .6, .2, .0], [.5, .5, .0, .0]], np.float32)
    probs = np.stack([c1, c2, c3])
    rule = MergeRule("argmax-bg")
    labels = np.array([[0, 1, 1, 0], [3, 3, 1, 0], [3, 3, 0, 0]])
    assert np.array_equal(rule.labels(probs, background), labels)  # the hand-read label map

    refiner = RecordingRefiner()
    result = CascadePsp(refiner, fast=True, L=123, color="rgb")(image, probs, background=background, rule=rule)
    assert [(c["fast"], c["L"]) for c in refiner.calls] == [(True, 123), (True, 123)]
    assert np.array_equal(refiner.calls[0]["mask"], (labels == 1) * 255)
    assert np.array_equal(refiner.calls[1]["mask"], (labels == 3) * 255)
    assert refiner.calls[0]["mask"].dtype == np.uint8 and np.array_equal(refiner.calls[0]["image"], image)
    one = np.where(labels == 1, 200, 40) / 255
    three = np.where(labels == 3, 210, 50) / 255
    np.testing.assert_allclose(result.probs, np.stack([one, np.zeros((3, 4)), three]), atol=1e-7)
    np.testing.assert_allclose(result.background, 1 - np.maximum(one, three), atol=1e-7)
    assert result.merge == MergeRule("argmax-bg")
    # every refined region keeps its class (200/255 and 210/255 > 0.5); outside them 40 and 50/255 < 0.5
    assert np.array_equal(result.merge.labels(result.probs, result.background), labels)


def test_overlapping_claims_go_to_the_highest_then_the_first():
    """Two classes whose refined maps overlap: the higher wins; equal maps give the first; below 0.5 in
    both is background (eval_post_ade.py's rule from confidence 0.5)."""
    class Fixed:
        maps = [np.array([[200, 150, 100]]), np.array([[150, 150, 120]])]

        def refine(self, image, mask, fast=False, L=900):
            return self.maps.pop(0).astype(np.uint8)

    probs = np.array([[[0.9, 0.9, 0.1]], [[0.1, 0.2, 0.9]]], np.float32)
    result = CascadePsp(Fixed(), fast=False, L=900, color="rgb")(np.zeros((1, 3, 3), np.uint8), probs,
                                                                  background=None, rule=MergeRule())
    assert result.merge.labels(result.probs, result.background).tolist() == [[1, 1, 0]]


def test_bgr_reverses_the_channels():
    refiner = RecordingRefiner()
    image = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    probs = np.ones((1, 2, 4), np.float32)
    CascadePsp(refiner, fast=False, L=900, color="bgr")(image, probs, background=None, rule=MergeRule())
    assert np.array_equal(refiner.calls[0]["image"], image[..., ::-1])


def test_a_mismatched_input_is_one_line():
    with pytest.raises(G4SegError, match="needs an \\(H, W, 3\\) uint8 image"):
        CascadePsp(RecordingRefiner(), fast=False, L=900, color="rgb")(
            np.zeros((3, 4, 3), np.uint8), np.zeros((1, 3, 5), np.float32), background=None, rule=MergeRule())


# ----- building it: weights, options ----------------------------------------------------------------

def test_built_on_stand_in_weights_matches_the_package(tmp_path, stand_in):
    """The spec's component on the stand-in's file gives, per class, the package's own refine output / 255."""
    save_stand_in(tmp_path)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    probs = np.zeros((2, 20, 24), np.float32)
    probs[0, 2:12, 3:15], probs[1, 10:18, 12:22] = 0.9, 0.8
    post = build(model_folder=str(tmp_path), verify=False, L=80)
    result = post(image, probs, background=None, rule=MergeRule())
    labels = MergeRule().labels(probs)
    for k in range(2):
        want = post.refiner.refine(image, ((labels == k + 1) * 255).astype(np.uint8), fast=False, L=80)
        np.testing.assert_array_equal(result.probs[k], want.astype(np.float32) / 255)


def test_device_follows_the_run_unless_set(tmp_path, stand_in):
    save_stand_in(tmp_path)
    runs_on = build(Runtime(device="meta"), model_folder=str(tmp_path), verify=False)
    assert runs_on.refiner.device == "meta" and runs_on.refiner.model.seg_weight.device.type == "meta"
    assert build(Runtime(device="meta"), model_folder=str(tmp_path), verify=False, device="cpu").refiner.device == "cpu"


def test_weights_are_loaded_from_the_file(tmp_path, stand_in):
    save_stand_in(tmp_path, seg_weight=-2.0, image_weight=(0.0, 0.0, 0.0), bias=0.5)
    model = build(model_folder=str(tmp_path), verify=False).refiner.model
    assert model.seg_weight.item() == -2.0 and model.bias.item() == 0.5


def test_offline_and_missing_is_one_line_before_any_request(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "weights"
    with pytest.raises(G4SegError) as err:
        build(model_folder=str(folder))
    message = str(err.value)
    assert "\n" not in message and f"no CascadePSP weights at {folder / 'model'}" in message
    assert "offline" in message and WEIGHTS_URL in message and WEIGHTS_MD5 in message
    assert "-o postprocessor.model_folder=DIR" in message and not folder.exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(G4SegError, match="g4seg is offline"):
        build(Runtime(offline=True), model_folder=str(folder))  # --offline reaches it through the Runtime


def test_unreachable_download_is_one_line(tmp_path, monkeypatch):
    import requests

    def unreachable(url, **kwargs):
        assert url == WEIGHTS_URL and kwargs["timeout"] > 0
        raise requests.ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(requests, "head", unreachable)
    folder = tmp_path / "weights"
    with pytest.raises(G4SegError) as err:
        build(model_folder=str(folder))
    message = str(err.value)
    assert "\n" not in message and "the download failed: ConnectionError Failed to resolve" in message
    assert f"save it as {folder / 'model'}" in message and not (folder / "model").exists()


def test_a_bad_download_is_removed(tmp_path, monkeypatch):
    """The package's own download writes what it got and fails its MD5 assert twice; no file is left."""
    import requests

    class Response:
        content = b"<html>rate limited</html>"

    got = []
    monkeypatch.setattr(requests, "head", lambda url, **kwargs: Response())
    monkeypatch.setattr(sr_download.requests, "get", lambda url, **kwargs: got.append(url) or Response())
    folder = tmp_path / "weights"
    with pytest.raises(G4SegError, match="the download failed: AssertionError MD5 still does not pass"):
        build(model_folder=str(folder))
    assert got == [WEIGHTS_URL, WEIGHTS_URL] and not (folder / "model").exists()


def test_the_packages_download_is_used(tmp_path, monkeypatch, stand_in):
    """A reachable URL: the package's download writes the file and its MD5 check passes (here: the stand-in's
    MD5 in place of the released one), then the Refiner loads it."""
    import requests

    source = save_stand_in(tmp_path / "source", seg_weight=1.0)
    stand_in_md5 = hashlib.md5(source.read_bytes()).hexdigest()

    class Response:
        content = source.read_bytes()

    monkeypatch.setattr(requests, "head", lambda url, **kwargs: Response())
    monkeypatch.setattr(sr_download.requests, "get", lambda url, **kwargs: Response())
    monkeypatch.setattr(sr_download, "check_model",
                        lambda path: hashlib.md5(open(path, "rb").read()).hexdigest() == stand_in_md5)
    folder = tmp_path / "new" / "weights"
    post = build(model_folder=str(folder))
    assert (folder / "model").read_bytes() == source.read_bytes() and post.refiner.model.seg_weight.item() == 1.0


def test_a_file_that_is_not_the_released_model(tmp_path, stand_in, no_network):
    """verify (default): another MD5 is an error and the file is kept; verify=false loads it."""
    path = save_stand_in(tmp_path)
    before = path.read_bytes()
    with pytest.raises(G4SegError, match="is not CascadePSP's released model .*-o postprocessor.verify=false"):
        build(model_folder=str(tmp_path))
    assert path.read_bytes() == before
    assert isinstance(build(model_folder=str(tmp_path), verify=False), CascadePsp)


def test_an_unloadable_file_is_one_line(tmp_path, no_network):
    (tmp_path / "model").write_bytes(b"not a checkpoint")
    with pytest.raises(G4SegError, match=f"cannot load {tmp_path / 'model'} on device 'cpu'") as err:
        build(model_folder=str(tmp_path), verify=False)
    assert "\n" not in str(err.value)


def test_options_are_checked_and_the_package_is_required(tmp_path, monkeypatch):
    with pytest.raises(G4SegError, match="invalid options: L"):
        build(L=65)  # the local step's stride L // 2 - 32 must be positive
    with pytest.raises(G4SegError, match="invalid options: color"):
        build(color="hsv")
    monkeypatch.setitem(__import__("sys").modules, "segmentation_refinement", None)
    with pytest.raises(G4SegError, match="pip install segmentation-refinement"):
        build_cascadepsp(CascadePspOptions(model_folder=str(tmp_path)), Runtime())
