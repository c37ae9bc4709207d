"""The toy world's models: the shipped ones load through the normal ``local-dir:`` path, and the training
script writes models that load the same way (tiny step counts here; CI never trains for real)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from g4seg.builtin.toy import SHIPPED, TOY_CLIP, TOY_SD
from g4seg.cli import app
from g4seg.config import RefineConfig
from g4seg.refiner import Refiner
from g4seg.toy.scenes import CLASSES, make_scene


def _refine_scene(refiner: Refiner, seed: int = 1_000_123):
    scene = make_scene(seed)
    probs = np.stack([(scene.labels == CLASSES.index(c) + 1).astype(np.float32) for c in scene.classes])
    return scene, refiner.refine(scene.image, probs, list(scene.classes), return_generated=True)


def test_the_shipped_models_load_through_local_dir_and_refine():
    config = RefineConfig(backbone="toy", extractor="toy-clip", device="cpu",
                          options={"backbone": {"model": f"local-dir:{SHIPPED / 'sd'}"},
                                   "extractor": {"model": f"local-dir:{SHIPPED / 'clip'}"}})
    refiner = Refiner.from_config(config)
    assert refiner.resolution == 64 and refiner.backbone.prediction_type == "epsilon"
    ref = refiner.backbone.model_ref
    assert ref.local and Path(ref.location) == (SHIPPED / "sd").resolve()
    scene, result = _refine_scene(refiner)
    assert result.labels.shape == scene.labels.shape
    assert all(img.shape == (64, 64, 3) for img in result.generated.values())
    # the defaults of the toy components are exactly these folders
    assert TOY_SD == f"local-dir:{SHIPPED / 'sd'}" and TOY_CLIP == f"local-dir:{SHIPPED / 'clip'}"


def test_the_shipped_weights_are_safetensors_within_40_mb():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    index = json.loads((SHIPPED / "sd" / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)


def _train(out: Path, threads: int) -> None:
    result = CliRunner().invoke(app, ["toy", "train", "--out", str(out), "--scenes", "8", "--vae-steps", "1",
                                      "--unet-steps", "1", "--clip-steps", "1", "--threads", str(threads)])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_training_writes_models_that_load_and_reruns_identically(tmp_path):
    """One process (one thread) and two processes (the CLIP beside the diffusion stages) give the same
    arithmetic: every saved tensor is equal, i.e. a rerun with the seed reproduces the model."""
    from safetensors.numpy import load_file

    _train(tmp_path / "a", threads=1)
    _train(tmp_path / "b", threads=2)
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert log["threads"] == {"diffusion": 1, "clip": 1} and np.isfinite(log["vae_psnr_db"])
    for file in sorted((tmp_path / "a").rglob("*.safetensors")):
        twin = tmp_path / "b" / file.relative_to(tmp_path / "a")
        a, b = load_file(str(file)), load_file(str(twin))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), file
    config = RefineConfig(backbone="toy", extractor="toy-clip", device="cpu",
                          options={"backbone": {"model": f"local-dir:{tmp_path / 'a' / 'sd'}"},
                                   "extractor": {"model": f"local-dir:{tmp_path / 'a' / 'clip'}"}})
    _refine_scene(Refiner.from_config(config))


def test_training_refuses_to_overwrite_models(tmp_path):
    (tmp_path / "sd").mkdir()
    result = CliRunner().invoke(app, ["toy", "train", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--overwrite" in result.output


def test_the_sclip_toy_preset_selects_the_toy_clip():
    from g4seg.plugins import registry
    from g4seg.registry import Runtime

    spec = registry().get("mask_source", "sclip")
    options = spec.parse_options({"preset": "toy"})
    assert (options.model, options.short_side, options.stride, options.templates) == (TOY_CLIP, 64, 16, "single")
    assert spec.parse_options({"preset": "toy", "short_side": "96"}).short_side == 96  # given wins
    assert spec.parse_options({}).model != TOY_CLIP  # only the toy preset switches the model
    source = spec.factory(options, Runtime(device="cpu", dtype="float32", offline=True))
    scene = make_scene(1_000_077)
    coarse = source.segment(scene.image, list(scene.classes))
    assert coarse.probs.shape == (len(scene.classes), 64, 64) and coarse.background.shape == (64, 64)
    assert np.isfinite(coarse.probs).all()


def test_the_demo_scene_is_what_its_description_says():
    from g4seg.toy.demo import load_scene
    from g4seg.toy.perturb import perturb

    image, truth, coarse, description = load_scene()
    scene = make_scene(description["seed"])
    assert np.array_equal(image, scene.image) and np.array_equal(truth, scene.labels)
    assert np.array_equal(coarse, perturb(scene.labels, description["perturbation"], description["seed"]))
    assert description["classes"] == list(scene.classes)


def test_demo_prints_coarse_and_refined_iou_and_draws_six_panels(tmp_path):
    from PIL import Image

    from g4seg.toy.demo import ious, load_scene

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _, truth, coarse, _ = load_scene()
    expected = ious(coarse, truth, ["background", "ball", "star"])["mIoU"]
    row = next(line for line in result.output.splitlines() if "mIoU" in line)
    assert f"{expected:.2f}" in row
    with Image.open(tmp_path / "demo.png") as picture:
        assert picture.size[0] > 4 * picture.size[1]  # one row of six panels
    assert (tmp_path / "refined.png").is_file()


def test_demo_with_beta_one_changes_nothing(tmp_path):
    from g4seg.datasets import read_index_png
    from g4seg.toy.demo import load_scene, run_demo

    result = run_demo(tmp_path, device="cpu", beta=1.0)
    _, _, coarse, _ = load_scene()
    assert np.array_equal(read_index_png(tmp_path / "refined.png"), coarse)
    assert result.refined_iou == result.coarse_iou
