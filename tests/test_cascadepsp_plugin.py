"""The plugin package plugins/g4seg-cascadepsp through the CLI: ``--injector none --beta 1 --postprocessor
cascadepsp`` is CascadePSP alone on the coarse labels, and offline without weights is one line.

CascadePSP's released weights cannot be downloaded here, so the network is the plugin's stand-in
(``g4seg_cascadepsp.testing``: the real ``RefinementModule``'s forward parameters and output keys, a per-pixel
model), saved as the package's weights file and run by the package's own ``Refiner``; the expected output is
that Refiner called directly in the test on the same image and per-class masks. The plugin's own tests
(plugins/g4seg-cascadepsp/tests) check the adapter by hand and the stand-in against the real network.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg.cli import app
from g4seg.io import load_image, voc_palette

try:
    distribution("g4seg-cascadepsp")
    import segmentation_refinement.main as sr_main
except (PackageNotFoundError, ImportError):
    pytest.skip("g4seg-cascadepsp is not installed (pip install segmentation-refinement && "
                "pip install --no-deps -e plugins/g4seg-cascadepsp)", allow_module_level=True)

from g4seg_cascadepsp.testing import StandInRefinementModule, save_stand_in  # noqa: E402

runner = CliRunner()
H, W = 36, 44


def _scene(folder):
    """A two-colour image with a disc and a box, and a coarse label map (1 = a, 2 = b, one ignore pixel) that
    misses part of each object, so CascadePSP's refinement has something to change."""
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 18) ** 2 + (xx - 14) ** 2 < 81
    box = (yy >= 8) & (yy < 28) & (xx >= 27) & (xx < 40)
    image = np.where(disc[..., None], [220, 40, 40], np.where(box[..., None], [40, 200, 60], [20, 90, 200]))
    Image.fromarray(image.astype(np.uint8)).save(folder / "img.png")
    labels = np.zeros((H, W), np.uint8)
    labels[11:25, 7:20] = 1
    labels[10:30, 29:42] = 2
    labels[0, 0] = 255
    mask = Image.fromarray(labels, mode="P")
    mask.putpalette(voc_palette())
    mask.save(folder / "mask.png")
    return folder / "img.png", folder / "mask.png", labels


def _refine(image, mask, out, config_file, *extra):
    return runner.invoke(app, ["refine", str(image), "--mask", str(mask), "--classes", "a,b", "--injector", "none",
                               "--beta", "1", "--postprocessor", "cascadepsp", "--config", str(config_file),
                               "--out", str(out), "--no-progress", *extra])


def test_cascadepsp_alone_through_the_cli(tmp_path, config_file, monkeypatch):
    """Per class, the package's Refiner on the image (RGB, as loaded) and the class's coarse region; the .npz
    holds its output / 255 (float16) and 1 - max as background; the labels are the class above 0.5 with the
    highest probability, else background, and the ignore pixel stays 255."""
    monkeypatch.setattr(sr_main, "RefinementModule", StandInRefinementModule)
    weights = tmp_path / "weights"
    save_stand_in(weights)
    image_path, mask_path, coarse = _scene(tmp_path)
    out = tmp_path / "out"
    result = _refine(image_path, mask_path, out, config_file, "-o", f"postprocessor.model_folder={weights}",
                     "-o", "postprocessor.verify=false", "-o", "postprocessor.L=96")
    assert result.exit_code == 0, result.output

    refiner = sr_main.Refiner(device="cpu", model_folder=str(weights), download_and_check_model=False)
    image = load_image(image_path)
    expected = np.stack([refiner.refine(image, ((coarse == k) * 255).astype(np.uint8), fast=False, L=96)
                         for k in (1, 2)]).astype(np.float32) / 255
    saved = np.load(out / "img.npz")
    np.testing.assert_array_equal(saved["probs"], expected.astype(np.float16))
    np.testing.assert_array_equal(saved["background"], (1 - expected.max(axis=0)).astype(np.float16))
    labels = np.where(expected.max(axis=0) > 0.5, expected.argmax(axis=0) + 1, 0)
    labels[0, 0] = 255
    written = np.array(Image.open(out / "img.png"))
    assert np.array_equal(written, labels)
    assert (written != coarse).sum() > 20  # CascadePSP (the stand-in) changed the coarse labels
    recorded = json.loads((out / "config.json").read_text())["config"]
    assert recorded["postprocessor"] == "cascadepsp" and str(recorded["options"]["postprocessor"]["L"]) == "96"


def test_offline_without_weights_is_one_line(tmp_path, config_file, forbid_downloads):
    import requests
    from segmentation_refinement import download

    forbid_downloads(requests, "get")
    forbid_downloads(requests, "head")
    forbid_downloads(download, "download_model")
    image_path, mask_path, _ = _scene(tmp_path)
    folder = tmp_path / "no-weights"
    result = runner.invoke(app, ["refine", str(image_path), "--mask", str(mask_path), "--classes", "a,b",
                                 "--postprocessor", "cascadepsp", "-o", f"postprocessor.model_folder={folder}",
                                 "--config", str(config_file), "--out", str(tmp_path / "out"), "--no-progress",
                                 "--offline"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(f"g4seg: error: post-processor 'cascadepsp': no CascadePSP weights at "
                               f"{folder / 'model'} (g4seg is offline")
    assert "download https://github.com/hkchengrex/CascadePSP/releases/download/v1.0/model" in lines[0]
    assert not folder.exists() and not (tmp_path / "out" / "img.png").exists()


def test_listed_by_plugins_and_list():
    listed = json.loads(runner.invoke(app, ["plugins", "--json"]).output)
    entry = next(p for p in listed["plugins"] if p["name"] == "cascadepsp")
    assert entry["origin"] == "g4seg-cascadepsp" and entry["status"] == "loaded"
    assert "postprocessor:cascadepsp" in entry["components"]
    listing = runner.invoke(app, ["list", "postprocessors", "--json"])
    assert listing.exit_code == 0
    assert {"name": "cascadepsp", "plugin": "cascadepsp"}.items() <= next(
        spec for spec in json.loads(listing.output) if spec["name"] == "cascadepsp").items()
