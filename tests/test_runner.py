"""The run loop: outputs, manifest, resume, config changes, failures, and a real SIGKILL mid-run.

The refiner and the mask source are fakes computed in a known way (probabilities squared; masks read
from .npy), so these tests check the loop itself, independently of any model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g4seg import io, masks, plugins
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.manifest import read_entries
from g4seg.refiner import RefineResult
from g4seg.registry import ComponentSpec, Registry
from g4seg.runner import WorkItem, folder_status, run

CLASSES = ["cat", "potted plant"]
TESTS_DIR = Path(__file__).resolve().parent


class FakeRefiner:
    """Squares the coarse probabilities; 'generates' the image itself for each class."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[int, ...]] = []

    def refine(self, image, probs, classes, *, background=None, ignore=None, source_rule=None,
               return_generated=False):
        self.calls.append(image.shape)
        time.sleep(self.delay)
        refined = probs.astype(np.float32) ** 2
        labels = masks.MergeRule().labels(refined, None, ignore)
        coarse = masks.MergeRule().labels(probs, None, ignore)
        generated = {c: image[::2, ::2].copy() for c in classes} if return_generated else None
        return RefineResult(refined, labels, list(classes), coarse, generated=generated)


class _NpyMasks:
    def load(self, image_path, mask_path, classes, image_hw):
        if mask_path is None:
            raise G4SegError(f"no coarse mask for {image_path}")
        probs = np.load(mask_path)
        if probs.shape != (len(classes), *image_hw):
            raise G4SegError(f"{mask_path}: shape {probs.shape} does not fit the image")
        from g4seg.components import CoarseMask

        return CoarseMask(probs.astype(np.float32), probs[0] > 0.97)


def _never_built(options, runtime):
    raise AssertionError("the runner must not build models when a refiner is given")


def fake_registry() -> Registry:
    """The real registry plus a fake backbone, extractor and .npy mask source."""
    reg = Registry()
    for spec in plugins.load()[0].all():
        reg.add(spec)
    reg.add(ComponentSpec(kind="backbone", name="fake-bb", factory=_never_built,
                          tags=frozenset({"unet-attention"})))
    reg.add(ComponentSpec(kind="extractor", name="fake-ext", factory=_never_built))
    reg.add(ComponentSpec(kind="mask_source", name="fake-npy", factory=lambda o, r: _NpyMasks()))
    return reg


def install_fakes() -> None:
    """For subprocesses: make the fakes visible through g4seg.plugins.registry()."""
    reg = fake_registry()
    plugins.load = lambda: (reg, plugins.LoadReport())


def make_config(**changes) -> RefineConfig:
    settings = dict(backbone="fake-bb", injector="none", extractor="fake-ext", mask_source="fake-npy", device="cpu")
    return RefineConfig(**{**settings, **changes})


def make_data(folder: Path, n: int, size: int = 16, seed: int = 0) -> list[WorkItem]:
    """``n`` random images with random coarse probabilities saved as .npy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        stem = f"img{i:03d}"
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
        np.save(folder / f"{stem}.npy", rng.random((len(CLASSES), size, size + 4)).astype(np.float32))
        items.append(WorkItem(stem, folder / f"{stem}.png", folder / f"{stem}.npy"))
    return items


def items_in(folder: Path) -> list[WorkItem]:
    return [WorkItem(p.stem, p, p.with_suffix(".npy")) for p in sorted(folder.glob("*.png"))]


def check_outputs(out: Path, item: WorkItem) -> None:
    """The outputs of ``item`` are complete and equal the fake refiner's known result."""
    expected = np.load(item.mask).astype(np.float32) ** 2
    with np.load(out / f"{item.stem}.npz") as data:
        assert data["probs"].dtype == np.float16
        np.testing.assert_allclose(data["probs"], expected, atol=1e-3)
        assert list(data["classes"]) == CLASSES
    label_img = Image.open(out / f"{item.stem}.png")
    assert label_img.mode == "P"
    ignore = np.load(item.mask)[0] > 0.97
    np.testing.assert_array_equal(np.asarray(label_img), masks.MergeRule().labels(expected, None, ignore))


@pytest.fixture
def fakes(monkeypatch):
    reg = fake_registry()
    monkeypatch.setattr(plugins, "load", lambda: (reg, plugins.LoadReport()))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_outputs_manifest_and_resolved_config(fakes, tmp_path):
    items = make_data(tmp_path / "data", 3)
    refiner = FakeRefiner()
    summary = run(items, tmp_path / "out", make_config(), CLASSES, build_refiner=lambda: refiner, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (3, 0, 0)
    out = tmp_path / "out"
    for item in items:
        check_outputs(out, item)
    entries = read_entries(out)
    assert [e.stem for e in entries] == ["img000", "img001", "img002"]
    assert {e.status for e in entries} == {"done"} and {e.rank for e in entries} == {0}
    assert all(e.seconds >= 0 and e.error is None and len(e.config_hash) == 16 for e in entries)
    assert entries[0].image == os.path.abspath(items[0].image)
    record = json.loads((out / "config.json").read_text())
    assert record["config_hash"] == entries[0].config_hash
    assert record["device"] == "cpu" and record["seed"] == 0 and record["world_size"] == 1
    assert record["config"]["timestep"] == 400 and record["classes"] == CLASSES
    assert record["versions"]["torch"] and record["versions"]["g4seg"]
    # every plugin that was loaded, with its origin and version (a run is reproducible only with them)
    assert set(record["plugins"]) == set(plugins.load()[1].plugins)
    assert not list(out.rglob("*.tmp"))


def test_config_json_records_every_loaded_plugin_with_its_version():
    from g4seg import __version__
    from g4seg.runner import _plugins

    recorded = _plugins()
    assert recorded["backbone_sd"] == {"origin": "builtin", "version": __version__}
    assert set(recorded) == set(plugins.load()[1].plugins)


def test_rerun_skips_done_images_without_building_a_refiner(fakes, tmp_path):
    items = make_data(tmp_path / "data", 3)
    run(items, tmp_path / "out", make_config(), CLASSES, build_refiner=FakeRefiner, progress=False)
    before = (tmp_path / "out" / "img001.npz").stat().st_mtime_ns

    def fail():
        raise AssertionError("nothing to do, so no refiner may be built")

    summary = run(items, tmp_path / "out", make_config(device="auto", class_batch=2), CLASSES,
                  build_refiner=fail, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (0, 3, 0)
    assert (tmp_path / "out" / "img001.npz").stat().st_mtime_ns == before
    assert len(read_entries(tmp_path / "out")) == 3


def test_only_images_without_a_valid_record_are_redone(fakes, tmp_path):
    items = make_data(tmp_path / "data", 5)
    out = tmp_path / "out"
    run(items, out, make_config(), CLASSES, build_refiner=FakeRefiner, progress=False)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    # img000: manifest line without its files; img001: files without a manifest line (kill after rename);
    # img002: line cut short by a kill; a stale temporary file of img003's label map.
    (out / "img000.npz").unlink()
    (out / "manifest.jsonl").write_text(lines[0] + "\n" + lines[2][:25])
    (out / ".img003.png.abc12_xy.tmp").write_bytes(b"half")
    for line in lines[3:]:
        with (out / "manifest.jsonl").open("a") as handle:
            handle.write("\n" + line)
    refiner = FakeRefiner()
    summary = run(items, out, make_config(), CLASSES, build_refiner=lambda: refiner, progress=False)
    assert (summary.done, summary.skipped) == (3, 2)
    assert len(refiner.calls) == 3
    latest = {e.stem: e for e in read_entries(out)}
    assert set(latest) == {i.stem for i in items} and all(e.status == "done" for e in latest.values())
    for item in items:
        check_outputs(out, item)
    assert not list(out.rglob("*.tmp"))


def test_a_changed_config_is_refused_and_overwrite_redoes_everything(fakes, tmp_path):
    items = make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    run(items, out, make_config(), CLASSES, build_refiner=FakeRefiner, progress=False)
    with pytest.raises(G4SegError, match=r"different configuration \(timestep: 400 -> 300\).*--overwrite"):
        run(items, out, make_config(timestep=300), CLASSES, build_refiner=FakeRefiner, progress=False)
    with pytest.raises(G4SegError, match=r"classes"):
        run(items, out, make_config(), ["dog", "cat"], build_refiner=FakeRefiner, progress=False)
    summary = run(items, out, make_config(timestep=300), CLASSES, build_refiner=FakeRefiner,
                  overwrite=True, progress=False)
    assert (summary.done, summary.skipped) == (2, 0)
    assert json.loads((out / "config.json").read_text())["config"]["timestep"] == 300
    again = run(items, out, make_config(timestep=300), CLASSES, build_refiner=FakeRefiner, progress=False)
    assert (again.done, again.skipped) == (0, 2)


def test_a_run_that_failed_before_its_first_image_does_not_lock_the_folder(fakes, tmp_path):
    items = make_data(tmp_path / "data", 2)
    out = tmp_path / "out"

    def missing_model():
        raise G4SegError("model 'x' could not be loaded")

    with pytest.raises(G4SegError, match="could not be loaded"):
        run(items, out, make_config(timestep=300), CLASSES, build_refiner=missing_model, progress=False)
    summary = run(items, out, make_config(), CLASSES, build_refiner=FakeRefiner, progress=False)
    assert (summary.done, summary.skipped) == (2, 0)
    assert json.loads((out / "config.json").read_text())["config"]["timestep"] == 400


def test_config_hash_covers_outputs_not_placement(fakes, tmp_path):
    items = make_data(tmp_path / "data", 1)
    out = tmp_path / "out"
    run(items, out, make_config(options={"injector": {}}), CLASSES, build_refiner=FakeRefiner, progress=False)
    first = read_entries(out)[0].config_hash
    # settings that only place the work or batch it do not change the hash
    same = folder_status(items, out, make_config(class_batch=1, offline=True), CLASSES)
    assert list(same.done) == ["img000"]
    for changed in (make_config(beta=0.9), make_config(cf=(0.1, 0.7)), make_config(seed=1),
                    make_config(dtype="bf16"), make_config(prompt="an image of {}"),
                    make_config(generator="noise"), make_config(generator="self")):
        assert folder_status(items, out, changed, CLASSES).pending == ["img000"]
    assert json.loads((out / "config.json").read_text())["config_hash"] == first


def test_settings_added_later_hash_as_before_at_their_default(fakes):
    """A run folder made before ``generator`` existed resumes: the default is left out of the hash."""
    from g4seg.manifest import ADDED_AT_DEFAULT, hashed_settings

    default = hashed_settings(make_config(), CLASSES, "fp32")
    assert not set(ADDED_AT_DEFAULT) & set(default)
    assert hashed_settings(make_config(generator="noise"), CLASSES, "fp32")["generator"] == "noise"


def test_component_options_are_hashed_after_validation(fakes, tmp_path):
    items = make_data(tmp_path / "data", 1)
    out = tmp_path / "out"
    field = "w_cross"
    value = getattr(plugins.registry().get("injector", "attn").options(), field)
    config = make_config(injector="attn", options={"injector": {field: value}})
    run(items, out, config, CLASSES, build_refiner=FakeRefiner, progress=False)
    # the default left implicit, or given as a string (as -o does): the same settings
    assert folder_status(items, out, make_config(injector="attn"), CLASSES).done
    as_text = make_config(injector="attn", options={"injector": {field: str(value)}})
    assert folder_status(items, out, as_text, CLASSES).done
    other = make_config(injector="attn", options={"injector": {field: value + 0.25}})
    assert folder_status(items, out, other, CLASSES).pending == ["img000"]


def test_a_bad_image_is_recorded_and_the_run_goes_on(fakes, tmp_path):
    items = make_data(tmp_path / "data", 3)
    (tmp_path / "data" / "img001.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    summary = run(items, out, make_config(), CLASSES, build_refiner=FakeRefiner, progress=False)
    assert (summary.done, summary.failed) == (2, 1)
    assert "cannot read image" in summary.errors["img001"] and "\n" not in summary.errors["img001"]
    entry = {e.stem: e for e in read_entries(out)}["img001"]
    assert entry.status == "error" and entry.error == summary.errors["img001"]
    assert not (out / "img001.png").exists()
    status = folder_status(items, out, make_config(), CLASSES)
    assert sorted(status.done) == ["img000", "img002"] and list(status.failed) == ["img001"]
    # once fixed, a rerun redoes exactly the failed image
    make_data(tmp_path / "data", 3)
    refiner = FakeRefiner()
    again = run(items, out, make_config(), CLASSES, build_refiner=lambda: refiner, progress=False)
    assert (again.done, again.skipped, len(refiner.calls)) == (1, 2, 1)


def test_fail_fast_stops_at_the_first_failure_and_keeps_what_was_written(fakes, tmp_path):
    items = make_data(tmp_path / "data", 3)
    items[1] = WorkItem("img001", items[1].image, None)
    out = tmp_path / "out"
    with pytest.raises(G4SegError, match="no coarse mask"):
        run(items, out, make_config(), CLASSES, build_refiner=FakeRefiner, fail_fast=True, progress=False)
    assert [(e.stem, e.status) for e in read_entries(out)] == [("img000", "done"), ("img001", "error")]
    check_outputs(out, items[0])
    assert not (out / "img002.png").exists()


def test_generated_images_and_overlays_go_to_their_own_folders(fakes, tmp_path):
    items = make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    run(items, out, make_config(), CLASSES, build_refiner=FakeRefiner, progress=False)
    assert not (out / "overlay").exists() and not (out / "generated").exists()
    refiner = FakeRefiner()
    summary = run(items, out, make_config(), CLASSES, build_refiner=lambda: refiner,
                  save_generated=True, save_overlay=True, progress=False)
    assert summary.done == 2, "outputs asked for now but missing must be produced"
    image = io.load_image(items[0].image)
    labels = np.asarray(Image.open(out / "img000.png"))
    np.testing.assert_array_equal(io.load_image(out / "overlay" / "img000.png"), io.overlay(image, labels))
    assert sorted(p.name for p in (out / "generated" / "img000").iterdir()) == ["1_cat.png", "2_potted_plant.png"]
    np.testing.assert_array_equal(io.load_image(out / "generated" / "img000" / "1_cat.png"), image[::2, ::2])
    plain = run(items, out, make_config(), CLASSES, build_refiner=FakeRefiner, progress=False)
    assert plain.skipped == 2


def test_duplicate_or_unsafe_output_names_are_refused(fakes, tmp_path):
    items = make_data(tmp_path / "data", 2)
    with pytest.raises(G4SegError, match="share the output name 'img000'"):
        run([items[0], WorkItem("img000", items[1].image, items[1].mask)], tmp_path / "out", make_config(),
            CLASSES, build_refiner=FakeRefiner, progress=False)
    with pytest.raises(G4SegError, match="plain file name"):
        run([WorkItem("a/b", items[0].image, None)], tmp_path / "out", make_config(), CLASSES,
            build_refiner=FakeRefiner, progress=False)


def test_progress_bar_only_when_asked(fakes, tmp_path, capsys):
    items = make_data(tmp_path / "data", 2)
    run(items, tmp_path / "a", make_config(), CLASSES, build_refiner=FakeRefiner, progress=False)
    assert capsys.readouterr().err == ""
    run(items, tmp_path / "b", make_config(), CLASSES, build_refiner=FakeRefiner, progress=True)
    assert "2/2" in capsys.readouterr().err


_KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_runner as t
t.install_fakes()
from g4seg.runner import run
run(t.items_in(Path({data!r})), Path({out!r}), t.make_config(), t.CLASSES,
    build_refiner=lambda: t.FakeRefiner(delay={delay}), save_overlay=True, progress=False)
"""


def _manifest_lines(out: Path) -> int:
    path = out / "manifest.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.parametrize("after_lines,extra_wait", [(2, 0.0), (4, 0.055), (6, 0.11)])
def test_sigkill_mid_run_then_rerun_completes_every_image_exactly_once(fakes, tmp_path, after_lines, extra_wait):
    items = make_data(tmp_path / "data", 8)
    out = tmp_path / "out"
    script = _KILLED_RUN.format(tests=str(TESTS_DIR), data=str(tmp_path / "data"), out=str(out), delay=0.1)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _manifest_lines(out) < after_lines:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    time.sleep(extra_wait)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    first = [e.stem for e in read_entries(out) if e.status == "done"]
    assert after_lines <= len(first) < len(items), "the kill must land mid-run"

    refiner = FakeRefiner()
    summary = run(items, out, make_config(), CLASSES, build_refiner=lambda: refiner, save_overlay=True,
                  progress=False)
    assert summary.skipped == len(first) and summary.done == len(items) - len(first)
    done = [e.stem for e in read_entries(out) if e.status == "done"]
    assert sorted(done) == [i.stem for i in items], "every image done exactly once"
    for item in items:
        check_outputs(out, item)
        assert io.load_image(out / "overlay" / f"{item.stem}.png").shape == (16, 20, 3)
    assert not list(out.rglob("*.tmp"))
