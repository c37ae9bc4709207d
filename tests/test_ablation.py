"""The ablation runner: grid planning, skipped pairs, reports, resume, sharded cells, real tiny models."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg import ablation, plugins
from g4seg.errors import G4SegError
from g4seg.io import save_label_png
from g4seg.manifest import read_entries
from g4seg.registry import ComponentSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runner as fx  # noqa: E402  (fakes shared with the run-loop tests)

IDS = ["2007_000032", "2007_000039"]


def make_voc(root: Path, size: tuple[int, int] = (32, 40)) -> tuple[Path, Path]:
    """A VOC2012-layout split of two images, labels with an ignore border, coarse label PNGs."""
    voc, coarse = root / "VOC2012", root / "coarse"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    coarse.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = size
    for n, id in enumerate(IDS):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{id}.jpg")
        label = np.zeros((h, w), np.uint8)
        label[6:26, 8:30] = 8 + n  # cat, then chair
        label[5, 8:30] = 255
        save_label_png(voc / "SegmentationClass" / f"{id}.png", label)
        guess = np.zeros((h, w), np.uint8)
        guess[9:29, 4:24] = 8 + n
        save_label_png(coarse / f"{id}.png", guess)
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(IDS) + "\n")
    return voc, coarse


def voc_miou(pred_dir: Path, voc: Path) -> float:
    """mIoU over the 21 VOC classes, written out here independently of g4seg.evaluation."""
    inter, union = np.zeros(21), np.zeros(21)
    for id in IDS:
        pred = np.asarray(Image.open(pred_dir / f"{id}.png"))
        label = np.asarray(Image.open(voc / "SegmentationClass" / f"{id}.png"))
        valid = label != 255
        for c in range(21):
            p, g = (pred == c) & valid, (label == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    return float(100 * (inter[union > 0] / union[union > 0]).mean())


def write_grid(path: Path, voc: Path, coarse: Path, base: str, grid: str) -> Path:
    path.write_text(f'dataset = "voc12"\nroot = "{voc}"\nsplit = "val"\ncoarse = "{coarse}"\n\n'
                    f"[base]\n{base}\n\n[grid]\n{grid}\n")
    return path


@pytest.fixture
def fakes(monkeypatch):
    """The run-loop fakes plus 'sd15-plain', the SD1.5 backbone without the attention capability."""
    reg = fx.fake_registry()
    sd15 = reg.get("backbone", "sd15")
    reg.add(ComponentSpec(kind="backbone", name="sd15-plain", factory=sd15.factory, options=sd15.options))
    monkeypatch.setattr(plugins, "load", lambda: (reg, plugins.LoadReport()))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


FAKE_BASE = 'backbone = "fake-bb"\nextractor = "fake-ext"\ndevice = "cpu"'


def test_plan_is_the_product_with_unsupported_pairs_skipped(fakes, tmp_path):
    voc, coarse = make_voc(tmp_path)
    grid = ablation.load_grid(write_grid(
        tmp_path / "g.toml", voc, coarse, 'device = "cpu"\n[base.options.backbone]\nrevision = "main"',
        'backbones = ["sd15", "sd15-plain"]\n'
        'injectors = ["none", { name = "attn", label = "attn-eq5", options = { rule = "eq5", alpha = 4.0 } }]\n'
        "timesteps = [100, 400, 700]\ncf = [[0.2, 0.6], [0.1, 0.7]]"))
    cells = ablation.plan_cells(grid)
    assert len(cells) == 2 * 2 * 3 * 2
    assert len({c.id for c in cells}) == len(cells)
    assert cells[0].id == "sd15_none_clip_t100_b0.8_cf0.2-0.6"
    skipped = [c for c in cells if c.skip]
    assert {(c.backbone.name, c.injector.name) for c in skipped} == {("sd15-plain", "attn")}
    assert "unet-attention" in skipped[0].skip and skipped[0].config is None
    eq5 = next(c for c in cells if c.id == "sd15_attn-eq5_clip_t400_b0.8_cf0.1-0.7")
    assert eq5.config.options["injector"] == {"rule": "eq5", "alpha": 4.0}
    assert eq5.config.options["backbone"] == {"revision": "main"}  # base options reach every cell
    assert (eq5.config.timestep, eq5.config.cf, eq5.config.beta) == (400, (0.1, 0.7), 0.8)


def test_variants_axis_compares_engine_settings(fakes, tmp_path):
    """The choices DESIGN.md section 2 leaves open (ramp width, merge, guidance...) are one axis of labelled sets."""
    voc, coarse = make_voc(tmp_path)
    grid = ablation.load_grid(write_grid(
        tmp_path / "g.toml", voc, coarse, 'device = "cpu"\nramp_width = 0.02\n[base.options.injector]\nw_self = 0.5',
        'betas = [0.8, 0.9]\nvariants = [{ label = "ramp2" }, { label = "ramp8-cfg", ramp_width = 0.08, '
        'guidance_scale = 3.0, options = { injector = { strength = 0.5 } } }]'))
    cells = ablation.plan_cells(grid)
    assert [c.id for c in cells] == [f"sd21_attn_clip_t400_b{b}_cf0.2-0.6_{v}" for b in ("0.8", "0.9")
                                     for v in ("ramp2", "ramp8-cfg")]
    plain, tuned = cells[0].config, cells[1].config
    assert (plain.ramp_width, plain.guidance_scale, plain.options["injector"]) == (0.02, None, {"w_self": 0.5})
    assert (tuned.ramp_width, tuned.guidance_scale) == (0.08, 3.0)
    assert tuned.options["injector"] == {"w_self": 0.5, "strength": 0.5}
    assert cells[1].row()["variant"] == "ramp8-cfg"


@pytest.mark.parametrize("grid,message", [
    ('variants = [{ label = "a", beta = 0.5 }]', "grid.variants: 'a' sets beta, which have axes of their own"),
    ('variants = [{ label = "a" }, { label = "a" }]', "grid.variants: label 'a' must be unique"),
    ('variants = [{ label = "a", ramp_width = 7 }]', "ramp_width"),
    ('injectors = ["attn", { name = "attn", options = { rule = "eq5" } }]', "'attn' appears more than once"),
    ("timesteps = [400, 1000]", "timestep"),
    ('backbones = ["sd99"]', "unknown backbone 'sd99'"),
    ("betas = [0.8, 0.8]", "grid.betas: 0.8 listed more than once"),
    ("colours = [1]", "colours"),
])
def test_grid_errors_are_one_line(fakes, tmp_path, grid, message):
    voc, coarse = make_voc(tmp_path)
    with pytest.raises(G4SegError, match=message) as info:
        ablation.plan_cells(ablation.load_grid(write_grid(tmp_path / "g.toml", voc, coarse, "", grid)))
    assert "\n" not in str(info.value)


def test_fake_grid_report_resume_and_skips(fakes, tmp_path):
    voc, coarse = make_voc(tmp_path)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE,
                      'injectors = ["none", "attn"]\nbetas = [0.8, 0.9]')
    built = []

    def build(config):
        built.append(config)
        return fx.FakeRefiner()

    report = ablation.run_ablation(grid, tmp_path / "out", build_refiner=build, progress=False)
    assert report.written and len(built) == 4
    coarse_miou = voc_miou(coarse, voc)
    assert report.coarse_miou == pytest.approx(coarse_miou)
    # the fake refiner keeps hard masks as they are: every cell scores the coarse mIoU exactly
    assert [r.status for r in report.results] == ["done"] * 4
    assert all(r.miou == pytest.approx(coarse_miou) and r.gain == pytest.approx(0) for r in report.results)
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [r["cell"] for r in rows] == [r.cell.id for r in report.results]
    assert {r["beta"] for r in rows} == {"0.8", "0.9"}
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["coarse"]["miou"] == round(coarse_miou, 2) and data["cells"][0]["images"] == 2
    assert "| fake-bb_none_fake-ext_t400_b0.8_cf0.2-0.6 |" in (tmp_path / "out" / "results.md").read_text()
    again = ablation.run_ablation(grid, tmp_path / "out", build_refiner=build, progress=False)
    assert len(built) == 4, "a rerun resumes every cell: nothing rebuilt, nothing redone"
    assert [r.miou for r in again.results] == [r.miou for r in report.results]


def test_only_skipped_pairs_are_listed_with_their_reason(fakes, tmp_path):
    voc, coarse = make_voc(tmp_path)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, 'device = "cpu"',
                      'backbones = ["sd15-plain"]\ninjectors = ["attn"]')
    report = ablation.run_ablation(grid, tmp_path / "out", progress=False)
    assert [r.status for r in report.results] == ["skipped"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "## Skipped" in markdown and "sd15-plain_attn_clip" in markdown and "unet-attention" in markdown
    assert not (tmp_path / "out" / "cells").exists()


def test_sharded_cells_leave_the_report_to_the_last_rank(fakes, tmp_path, monkeypatch):
    voc, coarse = make_voc(tmp_path)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE, "timesteps = [200, 400]")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = ablation.run_ablation(grid, tmp_path / "out", build_refiner=lambda c: fx.FakeRefiner(), progress=False)
    assert not first.written and {r.status for r in first.results} == {"pending"}
    assert not (tmp_path / "out" / "results.csv").exists()
    monkeypatch.setenv("RANK", "1")
    last = ablation.run_ablation(grid, tmp_path / "out", build_refiner=lambda c: fx.FakeRefiner(), progress=False)
    assert last.written and {r.status for r in last.results} == {"done"}
    cell_dir = tmp_path / "out" / "cells" / last.results[0].cell.id
    assert sorted(p.name for p in cell_dir.glob("manifest*")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]


def test_a_failing_image_marks_its_cell(fakes, tmp_path):
    voc, coarse = make_voc(tmp_path)
    (coarse / f"{IDS[1]}.png").unlink()
    grid = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE, "")
    report = ablation.run_ablation(grid, tmp_path / "out", build_refiner=lambda c: fx.FakeRefiner(), progress=False)
    (result,) = report.results
    assert result.status == "failed" and result.failed == 1 and IDS[1] in result.note
    assert report.coarse_miou is None and "label PNG" in report.coarse_note


def test_two_by_two_grid_with_tiny_models_through_the_cli(tiny_sd_dir, tmp_path, monkeypatch):
    from g4seg.cli import app
    from g4seg.testing.tiny_clip import save_tiny_clip

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    sd_dir, clip = tiny_sd_dir, save_tiny_clip(tmp_path / "clip")
    voc, coarse = make_voc(tmp_path)
    extractor = "\n".join(f'{k} = "{v}"' if k != "input_size" else f"{k} = {v}" for k, v in clip.items())
    base = (f'backbone = "sd15"\nextractor = "clip"\ndevice = "cpu"\nresolution = 64\n'
            f'[base.options.backbone]\nmodel = "local-dir:{sd_dir}"\n[base.options.extractor]\n{extractor}')
    grid = write_grid(tmp_path / "g.toml", voc, coarse, base, 'injectors = ["attn", "none"]\ntimesteps = [200, 600]')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ablate", "--grid", str(grid), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["injector"], r["timestep"], r["status"]) for r in rows] == [
        ("attn", "200", "done"), ("attn", "600", "done"), ("none", "200", "done"), ("none", "600", "done")]
    coarse_miou = voc_miou(coarse, voc)
    for row in rows:
        cell_dir = out / "cells" / row["cell"]
        assert float(row["miou"]) == pytest.approx(voc_miou(cell_dir, voc), abs=0.006)
        assert float(row["gain"]) == pytest.approx(voc_miou(cell_dir, voc) - coarse_miou, abs=0.006)
        assert json.loads((cell_dir / "config.json").read_text())["config"]["timestep"] == int(row["timestep"])
    # the timestep reaches the model: t=200 and t=600 refine the same image differently
    probs = [np.load(out / "cells" / rows[i]["cell"] / f"{IDS[0]}.npz")["probs"] for i in (0, 1)]
    assert not np.array_equal(probs[0], probs[1])
    for name in ("miou_vs_timestep.png", "gain_per_cell.png"):
        with Image.open(out / "plots" / name) as img:
            assert img.format == "PNG" and img.width > 200
    lines = {p: len(read_entries(p.parent)) for p in out.glob("cells/*/manifest.jsonl")}
    again = CliRunner().invoke(app, ["ablate", "--grid", str(grid), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert {p: len(read_entries(p.parent)) for p in out.glob("cells/*/manifest.jsonl")} == lines
