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
from test_bootstrap import reference_interval  # noqa: E402  (the plain-python bootstrap)

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
    ('variants = [{ label = "a", generator = "noise" }]', "'a' sets generator, which have axes of their own"),
    ('generators = ["model", "random"]', "generators"),
    ('generators = ["noise", "noise"]', "grid.generators: noise listed more than once"),
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


# --- wiring: dry run, shared models, failing cells, the report's numbers, the plots' series -----------------

VOC_CLASSES = 21


class ShiftRefiner(fx.FakeRefiner):
    """Moves every class's probabilities ``shift`` pixels right: a known, config-dependent change."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift

    def refine(self, image, probs, classes, *, background=None, ignore=None, source_rule=None,
               return_generated=False):
        result = super().refine(image, probs, classes, background=background, ignore=ignore)
        refined = np.roll(probs.astype(np.float32), self.shift, axis=2)
        result.probs[...] = refined
        result.labels[...] = fx.masks.MergeRule().labels(refined, None, ignore)
        return result


def voc_areas(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = label != 255
    inter = np.array([((pred == c) & (label == c) & valid).sum() for c in range(VOC_CLASSES)], float)
    union = np.array([(((pred == c) | (label == c)) & valid).sum() for c in range(VOC_CLASSES)], float)
    return inter, union


def voc_scores(pred_dir: Path, voc: Path) -> tuple[list[float | None], dict[str, float]]:
    """Per-class IoU over the split (None where no pixel of the class) and each image's own mean IoU."""
    total_i, total_u, per_image = np.zeros(VOC_CLASSES), np.zeros(VOC_CLASSES), {}
    for id in IDS:
        pred = np.asarray(Image.open(pred_dir / f"{id}.png"))
        label = np.asarray(Image.open(voc / "SegmentationClass" / f"{id}.png"))
        inter, union = voc_areas(pred, label)
        total_i, total_u = total_i + inter, total_u + union
        per_image[id] = float(100 * (inter[union > 0] / union[union > 0]).mean())
    per_class = [float(100 * i / u) if u else None for i, u in zip(total_i, total_u)]
    return per_class, per_image


def gain_bins(refined: dict[str, float], coarse: dict[str, float]) -> list[tuple[str, int, float | None]]:
    """Table VII's strata [0, 40), [40, 80), [80, 100], written out here independently."""
    bins = [("0-40", 0, 40), ("40-80", 40, 80), ("80-100", 80, 101)]
    out = []
    for name, low, high in bins:
        gains = [refined[i] - coarse[i] for i in IDS if low <= coarse[i] < high]
        out.append((name, len(gains), float(np.mean(gains)) if gains else None))
    return out


def counting_registry(builds: list[tuple[str, str]], broken: set[str] = frozenset()):
    """The fakes, with every backbone/injector/extractor factory replaced by one that records its builds."""
    import dataclasses

    from g4seg.registry import Registry

    def factory(kind, name):
        def build(options, runtime):
            if name in broken:
                raise G4SegError(f"cannot load {kind} '{name}': weights not found")
            builds.append((kind, name))
            return f"{kind}:{name}"
        return build

    reg = Registry()
    for spec in fx.fake_registry().all():
        if spec.kind in ("backbone", "injector", "extractor"):
            spec = dataclasses.replace(spec, factory=factory(spec.kind, spec.name))
        reg.add(spec)
    for name in ("fake-bb2", "broken-bb"):
        reg.add(ComponentSpec(kind="backbone", name=name, factory=factory("backbone", name),
                              tags=frozenset({"unet-attention"})))
    return reg


@pytest.fixture
def counted(monkeypatch):
    """Models built by name through the ablation's own cache, every build recorded; the refiner is a fake."""
    builds: list[tuple[str, str]] = []
    parts: list[tuple] = []
    reg = counting_registry(builds, broken={"broken-bb"})
    monkeypatch.setattr(plugins, "load", lambda: (reg, plugins.LoadReport()))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def refiner(config, backbone, injector, extractor, postprocessor):
        parts.append((config.timestep, backbone, injector, extractor))
        return fx.FakeRefiner()

    import g4seg.refiner

    monkeypatch.setattr(g4seg.refiner, "Refiner", refiner)
    return builds, parts


def test_dry_run_lists_cells_and_runs_nothing(fakes, tmp_path, monkeypatch):
    from g4seg.cli import app

    def forbidden(*args, **kwargs):
        raise AssertionError("--dry-run must not run or build anything")

    monkeypatch.setattr(ablation, "run_ablation", forbidden)
    monkeypatch.setattr(ablation._ComponentCache, "refiner", forbidden)
    monkeypatch.setattr(ablation, "run", forbidden)
    from rich.console import Console

    import g4seg.cli.ablate as ablate_cli

    monkeypatch.setattr(ablate_cli, "console", Console(width=400, highlight=False, soft_wrap=True))
    voc, coarse = make_voc(tmp_path)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, 'device = "cpu"',
                      'backbones = ["sd15", "sd15-plain"]\ninjectors = ["attn", "none"]\ntimesteps = [200, 400]')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ablate", "--grid", str(grid), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "6 of 8 cells to run" in text
    for cell in ablation.plan_cells(ablation.load_grid(grid)):
        assert cell.id in result.output
    assert text.count("skipped") == 2 and text.count("to run") == 1 + 6 and "unet-attention" in text
    assert not out.exists(), "a dry run writes nothing"


def test_cells_differing_in_t_beta_cf_share_models_and_a_new_backbone_loads_only_itself(counted, tmp_path):
    builds, parts = counted
    voc, coarse = make_voc(tmp_path)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE,
                      'backbones = ["fake-bb", "fake-bb2"]\ntimesteps = [200, 400]\nbetas = [0.8, 0.9]\n'
                      "cf = [[0.2, 0.6], [0.1, 0.7]]")
    report = ablation.run_ablation(grid, tmp_path / "out", progress=False)
    assert [r.status for r in report.results] == ["done"] * 16
    assert builds == [("backbone", "fake-bb"), ("injector", "attn"), ("extractor", "fake-ext"),
                      ("backbone", "fake-bb2")]
    assert len(parts) == 16  # one refiner per cell, each given the shared models
    assert {p[1] for p in parts[:8]} == {"backbone:fake-bb"} and {p[1] for p in parts[8:]} == {"backbone:fake-bb2"}
    assert {p[2:] for p in parts} == {("injector:attn", "extractor:fake-ext")}


def test_component_cache_rebuilds_only_the_kind_whose_name_or_options_change(counted):
    builds, _ = counted
    cache = ablation._ComponentCache()
    base = fx.make_config(injector="attn")
    for config in (base, base.model_copy(update={"timestep": 100, "beta": 0.9, "cf": (0.1, 0.7)}),
                   fx.make_config(injector="attn", options={"injector": {"w_self": 0.5}}),
                   fx.make_config(injector="none", options={"injector": {}}), fx.make_config(injector="none")):
        cache.refiner(config)
    assert builds == [("backbone", "fake-bb"), ("injector", "attn"), ("extractor", "fake-ext"),
                      ("injector", "attn"), ("injector", "none")]


def test_a_cell_whose_models_fail_to_load_is_reported_and_the_others_are_scored(counted, tmp_path):
    from g4seg.cli import app

    voc, coarse = make_voc(tmp_path)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE,
                      'backbones = ["broken-bb", "fake-bb"]\ntimesteps = [200, 400]')
    lines = []
    report = ablation.run_ablation(grid, tmp_path / "out", progress=False, log=lines.append)
    assert [(r.cell.backbone.name, r.status) for r in report.results] == [
        ("broken-bb", "error"), ("broken-bb", "error"), ("fake-bb", "done"), ("fake-bb", "done")]
    for r in report.results[:2]:
        assert r.note == "cannot load backbone 'broken-bb': weights not found" and r.miou is None
        assert any(line == f"cell {r.cell.id}: error: {r.note}" for line in lines)
    coarse_miou = voc_miou(coarse, voc)
    assert all(r.miou == pytest.approx(coarse_miou) for r in report.results[2:])
    assert report.written
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(c["status"], c["note"]) for c in data["cells"][:2]] == [("error", report.results[0].note)] * 2
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "## Not scored" in markdown and f"- {report.results[0].cell.id}: cannot load backbone" in markdown
    with pytest.raises(G4SegError, match="broken-bb"):
        ablation.run_ablation(grid, tmp_path / "out2", progress=False, fail_fast=True)
    result = CliRunner().invoke(app, ["ablate", "--grid", str(grid), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1 and "weights not found" in result.output


def _shift_grid(tmp_path: Path):
    """Two images, the second's coarse mask exact; cells whose refiner shifts the masks by t/100 (+1 at beta .9)."""
    voc, coarse = make_voc(tmp_path)
    exact = np.asarray(Image.open(voc / "SegmentationClass" / f"{IDS[1]}.png")).copy()
    exact[exact == 255] = 0
    save_label_png(coarse / f"{IDS[1]}.png", exact)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE, "timesteps = [400, 200]\nbetas = [0.8, 0.9]")
    report = ablation.run_ablation(
        grid, tmp_path / "out", progress=False,
        build_refiner=lambda c: ShiftRefiner(c.timestep // 100 + (c.beta > 0.85)))
    return voc, coarse, report


def test_results_json_holds_per_class_iou_and_gain_bins_computed_independently(fakes, tmp_path):
    voc, coarse, report = _shift_grid(tmp_path)
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    coarse_class, coarse_image = voc_scores(coarse, voc)
    assert data["coarse"]["miou"] == round(float(np.mean([v for v in coarse_class if v is not None])), 2)
    assert [c["cell"] for c in data["cells"]] == [r.cell.id for r in report.results]
    mious = set()
    for cell in data["cells"]:
        assert cell["status"] == "done"
        per_class, per_image = voc_scores(out / "cells" / cell["cell"], voc)
        got = list(cell["per_class"].values())
        assert len(got) == VOC_CLASSES and list(cell["per_class"])[0] == "background"
        assert [v is None for v in got] == [v is None for v in per_class]
        assert [v for v in got if v is not None] == pytest.approx([v for v in per_class if v is not None])
        miou = float(np.mean([v for v in per_class if v is not None]))
        assert cell["miou"] == round(miou, 2)
        assert cell["gain"] == pytest.approx(miou - float(np.mean([v for v in coarse_class if v is not None])),
                                             abs=0.006)
        bins = [(b["range"], b["count"]) for b in cell["gain_bins"]]
        expected = gain_bins(per_image, coarse_image)
        assert bins == [(name, count) for name, count, _ in expected] == [("0-40", 0), ("40-80", 1), ("80-100", 1)]
        for got_bin, (_, _, mean_gain) in zip(cell["gain_bins"], expected):
            assert got_bin["mean_gain"] == (None if mean_gain is None else pytest.approx(mean_gain))
        assert cell["gain_bins"][2]["mean_gain"] < 0  # the exact mask can only get worse when shifted
        mious.add(cell["miou"])
    assert len(mious) == 4, "each cell's shift differs, so each cell's score must"


def test_plots_hold_the_expected_series(fakes, tmp_path, monkeypatch):
    figures = {}
    real = ablation._savefig

    def capture(figure, path):
        figures[Path(path).name] = figure
        real(figure, path)

    monkeypatch.setattr(ablation, "_savefig", capture)
    voc, coarse, report = _shift_grid(tmp_path)
    per_image = sorted(f"{r.cell.id}.png" for r in report.results)
    assert sorted(figures) == sorted(["gain_per_cell.png", "miou_vs_timestep.png", *per_image])
    assert (tmp_path / "out" / "plots" / "gain_per_cell.png").is_file()
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "plots" / "per_image").iterdir()) == per_image
    score = {r.cell.id: voc_miou(out / "cells" / r.cell.id, voc) for r in report.results}

    (ax,) = figures["miou_vs_timestep.png"].axes
    series = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert set(series) == {"beta=0.8", "beta=0.9", "coarse"}
    for beta in ("0.8", "0.9"):
        xs, ys = series[f"beta={beta}"]
        assert xs == [200, 400]  # sorted by timestep although the grid lists 400 first
        ids = [f"fake-bb_attn_fake-ext_t{t}_b{beta}_cf0.2-0.6" for t in xs]
        assert ys == pytest.approx([score[i] for i in ids])
    assert list(series["coarse"][1]) == pytest.approx([voc_miou(coarse, voc)] * 2)

    (ax,) = figures["gain_per_cell.png"].axes
    bars = ax.patches
    assert [t.get_text() for t in ax.get_yticklabels()] == [r.cell.id for r in report.results]
    assert [b.get_width() for b in bars] == pytest.approx([r.gain for r in report.results])
    assert [b.get_width() for b in bars] == pytest.approx([score[r.cell.id] - voc_miou(coarse, voc)
                                                            for r in report.results])
    from matplotlib.colors import to_rgba

    assert [b.get_facecolor() for b in bars] == [to_rgba("tab:green" if r.gain >= 0 else "tab:red")
                                                 for r in report.results]
    # error bars: each cell's interval from results.json, from its low end to its high end
    (errorbar,) = ax.containers[1:]
    segments = errorbar.lines[2][0].get_segments()
    cells = json.loads((out / "results.json").read_text())["cells"]
    np.testing.assert_allclose([(s[0][0], s[1][0], s[0][1]) for s in segments],
                               [(*c["gain_ci95"], y) for y, c in enumerate(cells)], atol=0.006)

    # per-image pictures: each image of the cell at (coarse, refined) per-image IoU
    per_image_axes = figures[f"{report.results[0].cell.id}.png"].axes[0]
    points = np.concatenate([c.get_offsets() for c in per_image_axes.collections])
    _, coarse_image = voc_scores(coarse, voc)
    _, refined_image = voc_scores(out / "cells" / report.results[0].cell.id, voc)
    np.testing.assert_allclose(sorted(map(tuple, points.tolist())),
                               sorted((coarse_image[i], refined_image[i]) for i in IDS))


# --- noise controls and intervals --------------------------------------------------------------------------

def image_areas(pred_dir: Path, voc: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each image's per-class (intersection, union), counted here, in the split's order."""
    return [voc_areas(np.asarray(Image.open(pred_dir / f"{id}.png")),
                      np.asarray(Image.open(voc / "SegmentationClass" / f"{id}.png"))) for id in IDS]


def test_generators_axis_plans_one_cell_per_generator(fakes, tmp_path):
    voc, coarse = make_voc(tmp_path)
    grid = ablation.load_grid(write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE,
                                         'timesteps = [200, 400]\ngenerators = ["model", "noise", "self"]'))
    cells = ablation.plan_cells(grid)
    assert [c.id for c in cells] == [f"fake-bb_attn_fake-ext_t{t}_b0.8_cf0.2-0.6_gen-{g}" for t in (200, 400)
                                     for g in ("model", "noise", "self")]
    assert [c.config.generator for c in cells] == [c.generator for c in cells] == ["model", "noise", "self"] * 2
    assert cells[0].row()["generator"] == "model" and cells[0].settings == cells[1].settings != cells[3].settings
    plain = ablation.plan_cells(ablation.load_grid(write_grid(tmp_path / "h.toml", voc, coarse, FAKE_BASE, "")))
    assert plain[0].id == "fake-bb_attn_fake-ext_t400_b0.8_cf0.2-0.6"  # no axis: ids (and old folders) unchanged


def _noise_grid(tmp_path: Path, grid: str = 'timesteps = [400, 200]\ngenerators = ["model", "noise"]', **kwargs):
    """Cells whose refiner shifts the masks by t/100 pixels (model) or by 7 (noise): known, different outputs."""
    voc, coarse = make_voc(tmp_path)
    grid_file = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE, grid)
    report = ablation.run_ablation(
        grid_file, tmp_path / "out", progress=False,
        build_refiner=lambda c: ShiftRefiner(c.timestep // 100 if c.generator == "model" else 7), **kwargs)
    return voc, coarse, report


def test_each_gain_is_reported_with_its_interval_and_its_noise_control(fakes, tmp_path):
    """Intervals (cell vs coarse, cell vs its noise control) recomputed by the plain loop from counts made here."""
    voc, coarse, report = _noise_grid(tmp_path, resamples=300, bootstrap_seed=4)
    out = tmp_path / "out"
    rows = {r["cell"]: r for r in csv.DictReader((out / "results.csv").open())}
    cells = {c["cell"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    coarse_areas = image_areas(coarse, voc)
    for t in (400, 200):
        model, noise = (f"fake-bb_attn_fake-ext_t{t}_b0.8_cf0.2-0.6_gen-{g}" for g in ("model", "noise"))
        mine, control = image_areas(out / "cells" / model, voc), image_areas(out / "cells" / noise, voc)
        for cell, areas in ((model, mine), (noise, control)):
            low, high = reference_interval(areas, coarse_areas, 300, 4)
            assert (float(rows[cell]["gain_lo"]), float(rows[cell]["gain_hi"])) == (round(low, 2), round(high, 2))
            assert cells[cell]["gain_ci95"] == [round(low, 2), round(high, 2)]
        row = rows[model]
        assert row["noise_cell"] == noise and row["noise_gain"] == rows[noise]["gain"]
        assert float(row["vs_noise"]) == pytest.approx(voc_miou(out / "cells" / model, voc)
                                                       - voc_miou(out / "cells" / noise, voc), abs=0.006)
        low, high = reference_interval(mine, control, 300, 4)
        assert (float(row["vs_noise_lo"]), float(row["vs_noise_hi"])) == (round(low, 2), round(high, 2))
        assert cells[model]["noise_control"] == {
            "cell": noise, "status": "done", "gain": float(rows[noise]["gain"]), "gain_ci95": cells[noise]["gain_ci95"],
            "vs_noise": float(row["vs_noise"]), "vs_noise_ci95": [round(low, 2), round(high, 2)]}
        assert rows[noise]["noise_cell"] == "" and cells[noise]["noise_control"] is None
        _, coarse_image = voc_scores(coarse, voc)
        _, refined_image = voc_scores(out / "cells" / model, voc)
        improved = sum(refined_image[i] > coarse_image[i] for i in IDS) / len(IDS)
        assert float(row["improved_fraction"]) == improved
    assert len({rows[c]["vs_noise"] for c in rows if c.endswith("model")}) == 2
    data = json.loads((out / "results.json").read_text())
    assert data["bootstrap"] == {"resamples": 300, "seed": 4}
    markdown = (out / "results.md").read_text()
    assert "noise control gain | over noise [95% CI]" in markdown and "300 resamples, seed 4" in markdown
    model = "fake-bb_attn_fake-ext_t400_b0.8_cf0.2-0.6_gen-model"
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {model} |"))
    assert f"{float(rows[model]['gain']):+.2f} [{float(rows[model]['gain_lo']):+.2f}, " in line
    assert f"| {float(rows[model]['noise_gain']):+.2f} | {float(rows[model]['vs_noise']):+.2f} [" in line
    assert "missing" not in markdown


def test_a_grid_without_noise_controls_marks_them_missing(fakes, tmp_path):
    voc, coarse, report = _noise_grid(tmp_path, grid="betas = [0.8, 0.9]")
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["noise_cell"] for r in rows] == ["", ""] and all(r["gain_lo"] for r in rows)
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [c["noise_control"] for c in cells] == [{"cell": None, "status": "missing"}] * 2
    markdown = (out / "results.md").read_text()
    assert markdown.count("| missing | missing |") == 2 and 'add `generators = ["model", "noise"]`' in markdown


def test_a_noise_control_that_is_not_scored_is_named_with_its_status(fakes, tmp_path):
    def broken_noise(c):
        if c.generator == "noise":
            raise G4SegError("cannot load the extractor")
        return ShiftRefiner(1)

    voc, coarse = make_voc(tmp_path)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE, 'generators = ["model", "noise"]')
    report = ablation.run_ablation(grid, tmp_path / "out", progress=False, build_refiner=broken_noise)
    model, noise = report.results
    assert noise.status == "error" and model.noise is noise and model.versus_noise is None
    assert model.noise_note == "error" and model.row()["noise_gain"] is None
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert f"| {model.cell.id} |" in markdown and "| error | error |" in markdown


def test_bad_bootstrap_settings_are_refused_before_any_cell_runs(fakes, tmp_path):
    from g4seg.cli import app

    voc, coarse = make_voc(tmp_path)
    grid = write_grid(tmp_path / "g.toml", voc, coarse, FAKE_BASE, "")
    result = CliRunner().invoke(app, ["ablate", "--grid", str(grid), "--out", str(tmp_path / "out"),
                                      "--resamples", "0"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines == ["g4seg: error: resamples must be at least 1, got 0"]
    assert not (tmp_path / "out").exists()


def test_noise_control_markers_sit_at_the_controls_gains(fakes, tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(ablation, "_savefig", lambda figure, path: figures.setdefault(Path(path).name, figure))
    voc, coarse, report = _noise_grid(tmp_path)
    ax = figures["gain_per_cell.png"].axes[0]
    (markers,) = [c for c in ax.collections if c.get_label() == "its noise control"]
    expected = [(r.noise.gain, y) for y, r in enumerate(report.results) if r.noise is not None]
    assert len(expected) == 2 and all(r.noise is None for r in report.results if r.cell.generator == "noise")
    np.testing.assert_allclose(np.asarray(markers.get_offsets()), expected)


def test_generators_axis_with_tiny_models_through_the_cli(tiny_sd_dir, tmp_path, monkeypatch):
    """model, noise and self cells on real tiny models: the controls run, the model cell is paired with its noise
    control, and the terminal, the CSV and the per-image pictures show it."""
    from rich.console import Console

    import g4seg.cli.ablate as ablate_cli
    from g4seg.cli import app
    from g4seg.testing.tiny_clip import save_tiny_clip

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(ablate_cli, "console", Console(width=400, highlight=False, soft_wrap=True))
    clip = save_tiny_clip(tmp_path / "clip")
    voc, coarse = make_voc(tmp_path)
    extractor = "\n".join(f'{k} = "{v}"' if k != "input_size" else f"{k} = {v}" for k, v in clip.items())
    base = (f'backbone = "sd15"\nextractor = "clip"\ndevice = "cpu"\nresolution = 64\n'
            f'[base.options.backbone]\nmodel = "local-dir:{tiny_sd_dir}"\n[base.options.extractor]\n{extractor}')
    grid = write_grid(tmp_path / "g.toml", voc, coarse, base, 'generators = ["model", "noise", "self"]')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ablate", "--grid", str(grid), "--out", str(out), "--no-progress",
                                      "--resamples", "200", "--bootstrap-seed", "1"])
    assert result.exit_code == 0, result.output
    rows = {r["generator"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == ["model", "noise", "self"] and {r["status"] for r in rows.values()} == {"done"}
    for generator, row in rows.items():
        config = json.loads((out / "cells" / row["cell"] / "config.json").read_text())["config"]
        assert config["generator"] == generator
    model, noise = rows["model"], rows["noise"]
    assert model["noise_cell"] == noise["cell"] and rows["self"]["noise_cell"] == noise["cell"]
    assert float(model["vs_noise"]) == pytest.approx(voc_miou(out / "cells" / model["cell"], voc)
                                                     - voc_miou(out / "cells" / noise["cell"], voc), abs=0.006)
    low, high = reference_interval(image_areas(out / "cells" / model["cell"], voc), image_areas(coarse, voc), 200, 1)
    assert (float(model["gain_lo"]), float(model["gain_hi"])) == (round(low, 2), round(high, 2))
    text = " ".join(result.output.split())
    assert "over noise [95% CI]" in text and f"[{low:+.2f}, {high:+.2f}]" in text
    for row in rows.values():
        with Image.open(out / "plots" / "per_image" / f"{row['cell']}.png") as picture:
            assert picture.format == "PNG"
