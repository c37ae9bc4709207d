"""What the README loads works: the bundled example through the README command's own code, and the
real-size model builders have the published parameter counts (built on the meta device: no memory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from g4seg import io
from g4seg.cli import app
from g4seg.cli.refine import check_inputs, class_list, collect_items
from g4seg.config import RefineConfig
from g4seg.plugins import registry
from g4seg.registry import Runtime

ROOT = Path(__file__).resolve().parent.parent
IMAGE, COARSE = ROOT / "examples" / "cat.png", ROOT / "examples" / "cat_coarse.png"


def test_the_bundled_example_reads_through_the_readme_commands_code(tmp_path):
    """``g4seg refine examples/cat.png --mask examples/cat_coarse.png --classes cat``: the items the CLI
    builds, io.load_image and the ``file`` mask source give a 300 x 451 image and a binary cat mask."""
    classes = class_list("cat")
    assert classes == ["cat"]
    items, problems = collect_items([IMAGE], COARSE)
    assert problems == {} and [(i.stem, i.image, i.mask) for i in items] == [("cat", IMAGE, COARSE)]
    image = io.load_image(IMAGE)
    assert image.shape == (300, 451, 3) and image.dtype == np.uint8
    assert io.read_image_header(IMAGE).hw == (300, 451)
    raw = np.asarray(Image.open(COARSE))
    assert raw.shape == image.shape[:2] and set(np.unique(raw)) == {0, 255}, "a binary 0/255 mask of the image size"
    source = registry().get("mask_source", "file").build({}, Runtime())
    coarse = source.load(IMAGE, COARSE, classes, image.shape[:2])
    assert coarse.probs.shape == (1, 300, 451)
    np.testing.assert_array_equal(coarse.probs[0] > 0.5, raw == 255)
    assert coarse.background is None and (coarse.ignore is None or not coarse.ignore.any())
    # the command's checks before any model loads (image header, mask format, values, size) accept it
    assert 0.05 < (raw == 255).mean() < 0.95, "the mask covers part of the image"
    valid, problems = check_inputs(items, {}, RefineConfig(device="cpu"), classes, tmp_path / "out", fail_fast=True,
                                   single=True)
    assert valid == items and problems == {}


def test_the_readme_command_with_beta_1_writes_back_the_coarse_mask_exactly(tmp_path, config_file):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["refine", str(IMAGE), "--mask", str(COARSE), "--classes", "cat", "--out",
                                      str(out), "--save-overlay", "--beta", "1", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert "done 1, skipped 0, failed 0" in result.output
    with Image.open(out / "cat.png") as img:
        assert img.mode == "P" and img.size == (451, 300)
        labels = np.asarray(img)
    np.testing.assert_array_equal(labels, (np.asarray(Image.open(COARSE)) == 255).astype(np.uint8))
    with np.load(out / "cat.npz") as npz:
        assert npz["probs"].shape == (1, 300, 451) and list(npz["classes"]) == ["cat"]
    assert io.load_image(out / "overlay" / "cat.png").shape == (300, 451, 3)
    assert json.loads((out / "config.json").read_text())["classes"] == ["cat"]


# --- real-size builders: the published parameter counts ---------------------------------------------------

# (component, family) -> parameters, from the released models (docs/benchmarks.md gives them in millions)
PUBLISHED = {
    ("unet", "sd21"): 865_910_724,
    ("text_encoder", "sd21"): 340_387_840,
    ("vae", "sd21"): 83_653_863,
    ("unet", "sd15"): 859_520_964,
    ("text_encoder", "sd15"): 123_060_480,
    ("vae", "sd15"): 83_653_863,
}
# (heads, head size) of the UNet's attention layers: SD 2.1's unet/config.json has attention_head_dim
# [5, 10, 20, 20] (diffusers reads it as the number of heads, 64 channels each); SD 1.5's has 8 (8 heads)
PUBLISHED_HEADS = {"sd21": [(5, 64), (10, 64), (20, 64)], "sd15": [(8, 40), (8, 80), (8, 160)]}
DOCUMENTED_M = {"unet": {"sd21": 865.91, "sd15": 859.52}, "text_encoder": {"sd21": 340.39, "sd15": 123.06},
                "vae": {"sd21": 83.65, "sd15": 83.65}}


def _meta_components(family: str, monkeypatch) -> dict[str, torch.nn.Module]:
    """Run ``save_real_size_sd`` itself, with every module built on the meta device and nothing saved."""
    from g4seg.testing import real_size

    built: dict[str, torch.nn.Module] = {}

    def seeded_on_meta(seed, build, *args, **kwargs):
        with torch.device("meta"):
            return build(*args, **kwargs).eval()

    class Pipeline:
        def __init__(self, **components):
            built.update({k: v for k, v in components.items() if isinstance(v, torch.nn.Module)})

        def to(self, dtype):
            return self

        def save_pretrained(self, path, safe_serialization):
            assert safe_serialization

    monkeypatch.setattr(real_size, "seeded", seeded_on_meta)
    monkeypatch.setattr(real_size, "StableDiffusionPipeline", Pipeline)
    real_size.save_real_size_sd("never-written", family)
    return built


@pytest.mark.parametrize("family", ["sd21", "sd15"])
def test_real_size_builders_have_the_published_parameter_counts(family, monkeypatch):
    start = time.perf_counter()
    built = _meta_components(family, monkeypatch)
    assert set(built) == {"unet", "vae", "text_encoder"}
    for name, module in built.items():
        assert all(p.device.type == "meta" for p in module.parameters()), "built without memory"
        count = sum(p.numel() for p in module.parameters())
        assert count == PUBLISHED[name, family], f"{family} {name}: {count:,} parameters"
        assert round(count / 1e6, 2) == DOCUMENTED_M[name][family], "docs/benchmarks.md's figure"
    # heads do not change the parameter count, but they set the attention's cost (and the injector's)
    from diffusers.models.attention_processor import Attention

    layers = [a for a in built["unet"].modules() if isinstance(a, Attention)]
    assert sorted({(a.heads, a.inner_dim // a.heads) for a in layers}) == PUBLISHED_HEADS[family]
    assert built["text_encoder"].config.num_attention_heads == {"sd21": 16, "sd15": 12}[family]
    assert time.perf_counter() - start < 60
