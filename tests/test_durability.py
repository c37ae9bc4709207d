"""Durability of the run loop's write path, by fault injection and by a real SIGKILL.

What a kill must never leave behind is a visible (non-temporary) file that is incomplete, and what a
rerun must do is redo exactly the images without a finished manifest line. Three kinds of tests:

- **Fault injection in a child process.** The run loop (fakes of test_runner: no models, real files)
  dies (``os._exit``, no clean-up, no buffers flushed) at one point of one write, chosen by wrapping
  ``os.fsync``, ``os.replace`` and ``ManifestWriter.append`` in the child: a temporary file half on
  disk (torn, before its fsync), a complete temporary file before its fsync, before and after the
  rename, before the manifest line, in the middle of it (a cut line), and after it. The parent checks
  every visible file (PNGs verify and hold the expected labels, NPZs load and hold the expected
  probabilities, config.json parses, manifest lines parse except a cut last one), then reruns and
  counts the refined images. The same points also raise (a BaseException, as Ctrl-C would) in process.
- **Order of durability (spy).** os.fsync is called on each output's temporary file, holding all its
  bytes, before os.replace puts it in place; the manifest is fsynced after each complete line, and
  after the image's files are in place, before the next image's first write.
- **The real thing.** ``python -m g4seg refine`` with tiny models is SIGKILLed at a random moment of
  its work (after its first image, within about two images' time), then rerun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg import manifest as manifest_module
from g4seg import masks
from g4seg.cli import app
from g4seg.manifest import Entry, read_entries
from g4seg.runner import _TEMP_NAME, run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runner as fx  # noqa: E402  (fakes shared with the run-loop tests)
from test_run_safety import _photos_and_masks  # noqa: E402

fakes = fx.fakes
N_IMAGES = 5  # img000 .. img004; "middle" is img002
DIED = 86  # exit status of a child that died at its fault point
WAIT_S = 120


# --- fault points ---------------------------------------------------------------------------------------

FILE_POINTS = ("torn_temp", "before_fsync", "before_rename", "after_rename")
LINE_POINTS = ("before_line", "mid_line", "after_line")


class Crash(BaseException):
    """What an in-process fault raises: not an Exception, so the run loop does not record it as a failure."""


def arm(point: str, target: str, out: Path, die) -> dict:
    """Wrap os.fsync, os.replace and ManifestWriter.append so that ``die()`` happens at ``point`` of the
    write of ``target`` (a path relative to ``out`` for file points, a stem for manifest points).
    Returns the replacements (name -> function); the caller installs them."""
    real_fsync, real_replace, real_append = os.fsync, os.replace, manifest_module.ManifestWriter.append
    real_out = os.path.realpath(out)

    def temp_target(fd: int) -> str | None:
        folder, name = os.path.split(os.readlink(f"/proc/self/fd/{fd}"))
        match = _TEMP_NAME.match(name)
        return os.path.relpath(os.path.join(folder, match["target"]), real_out) if match else None

    def fsync(fd: int) -> None:
        if point in ("torn_temp", "before_fsync") and temp_target(fd) == target:
            if point == "torn_temp":  # only half of what was written reached the disk
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
            die()
        real_fsync(fd)

    def replace(src, dst) -> None:
        hit = os.path.relpath(os.path.realpath(dst), real_out) == target
        if hit and point == "before_rename":
            die()
        real_replace(src, dst)
        if hit and point == "after_rename":
            die()

    def append(self, entry: Entry) -> None:
        if entry.stem == target and point == "before_line":
            die()
        if entry.stem == target and point == "mid_line":
            line = json.dumps(dataclasses.asdict(entry)) + "\n"
            self._handle.write(line[: len(line) // 2])
            self._handle.flush()
            die()
        real_append(self, entry)
        if entry.stem == target and point == "after_line":
            die()

    return {"fsync": fsync, "replace": replace, "append": append}


CASES = [
    *((point, target) for point in FILE_POINTS for target in ("img000.png", "img002.npz")),
    *((point, target) for point in ("torn_temp", "before_rename", "after_rename")
      for target in ("config.json", "overlay/img002.png")),
    *((point, stem) for point in LINE_POINTS for stem in ("img000", "img002")),
]


def case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}:{case[1]}"


def done_before(point: str, target: str) -> int:
    """How many images have a finished line when the run dies at ``point`` of ``target``'s write."""
    if target == "config.json":
        return 0
    index = int(target.split("/")[-1][3:6])
    return index + (point == "after_line")


# --- the child: one fresh process that forks once per case (a fresh interpreter per case costs ~2.5 s) ----

_CHILD = """
import json, os, sys, traceback
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_durability as d
results = {{}}
for point, target in d.CASES:
    out = Path({root!r}) / d.case_id((point, target)).replace(":", "_").replace("/", "_")
    pid = os.fork()
    if pid == 0:
        try:
            d.child_run(point, target, out, Path({data!r}))
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    results[d.case_id((point, target))] = [os.waitstatus_to_exitcode(status), str(out)]
print(json.dumps(results))
"""


def child_run(point: str, target: str, out: Path, data: Path) -> None:
    """In the forked child: arm the fault (dying by os._exit: no clean-up, no flush) and run."""
    fx.install_fakes()
    patches = arm(point, target, out, lambda: os._exit(DIED))
    os.fsync, os.replace = patches["fsync"], patches["replace"]
    manifest_module.ManifestWriter.append = patches["append"]
    run(fx.items_in(data), out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True,
        progress=False)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> dict[str, tuple[int, Path, Path]]:
    """Every case of CASES run once in a child that dies at the fault: case id -> (exit status, out, data)."""
    root = tmp_path_factory.mktemp("killed")
    data = root / "data"
    fx.make_data(data, N_IMAGES)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    script = _CHILD.format(tests=str(fx.TESTS_DIR), root=str(root), data=str(data))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {key: (status, Path(out), data) for key, (status, out) in results.items()}


# --- checks ---------------------------------------------------------------------------------------------


def expected_probs(data: Path, stem: str) -> np.ndarray:
    return np.load(data / f"{stem}.npy").astype(np.float32) ** 2


def check_visible_files(out: Path, data: Path, cut_lines: int = 0) -> None:
    """Every file a reader can see (not a temporary file, not a lock file) is complete and correct; the
    manifest's lines all parse but ``cut_lines`` cut short by a kill (the reader skips them)."""
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name, rel = path.name, path.relative_to(out).as_posix()
        if _TEMP_NAME.match(name) or name.endswith(".lock"):
            continue
        if name.endswith(".jsonl"):
            lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line]
            bad = [line for line in lines if Entry.from_line(line) is None]
            assert len(bad) <= cut_lines, f"{rel}: lines that do not parse: {bad}"
            assert all(line.startswith('{"stem": ') for line in bad), f"{rel}: not a cut line: {bad}"
        elif name == "config.json":
            assert json.loads(path.read_text(encoding="utf-8"))["config_hash"]
        elif name.endswith(".npz"):
            with np.load(path) as npz:
                np.testing.assert_allclose(npz["probs"], expected_probs(data, path.stem), atol=1e-3)
                assert list(npz["classes"]) == fx.CLASSES
        elif name.endswith(".png"):
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                pixels = np.asarray(img)
            if rel.startswith("overlay/"):
                assert pixels.shape == (16, 20, 3)
            else:
                probs = np.load(data / f"{path.stem}.npy")
                expected = masks.MergeRule().labels(expected_probs(data, path.stem), None, probs[0] > 0.97)
                np.testing.assert_array_equal(pixels, expected)
        else:
            raise AssertionError(f"unexpected file {rel}")


def rerun_and_check(out: Path, data: Path, already_done: int, cut_lines: int = 0) -> None:
    """A rerun refines exactly the images without a finished line; then every output is complete."""
    before = [e.stem for e in read_entries(out) if e.status == "done"]
    assert before == [f"img{i:03d}" for i in range(already_done)]
    refiner = fx.FakeRefiner()
    items = fx.items_in(data)
    summary = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=lambda: refiner, save_overlay=True,
                  progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (N_IMAGES - already_done, already_done, 0)
    assert len(refiner.calls) == N_IMAGES - already_done, "exactly the missing images are refined"
    done = Counter(e.stem for e in read_entries(out) if e.status == "done")
    assert done == Counter(item.stem for item in items), "each image done exactly once"
    for item in items:
        fx.check_outputs(out, item)
    check_visible_files(out, data, cut_lines)
    assert not [p for p in out.rglob("*") if _TEMP_NAME.match(p.name)], "stale temporary files removed"
    assert json.loads((out / "config.json").read_text())["config_hash"] == read_entries(out)[0].config_hash
    again = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=None, save_overlay=True, progress=False)
    assert (again.done, again.skipped) == (0, N_IMAGES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_kill_at_any_point_of_a_write_leaves_complete_files_and_a_rerun_redoes_exactly_the_rest(
        fakes, killed_runs, case):
    status, out, data = killed_runs[case_id(case)]
    assert status == DIED, f"the run did not die at {case_id(case)} (exit status {status})"
    point, target = case
    check_visible_files(out, data, cut_lines=point == "mid_line")
    if point in ("torn_temp", "before_fsync", "before_rename"):
        assert not (out / target).exists(), "the file was not put in place before its rename"
        assert [p for p in (out / target).parent.iterdir() if _TEMP_NAME.match(p.name)], "the temp file stays"
    if point == "after_rename":
        assert (out / target).is_file()
    if point == "mid_line":
        assert not (out / "manifest.jsonl").read_text().endswith("\n"), "the kill cut the line"
    rerun_and_check(out, data, done_before(point, target), cut_lines=point == "mid_line")


@pytest.mark.parametrize("case", [(p, t) for p, t in CASES if t in ("img002.npz", "img002", "config.json")],
                         ids=case_id)
def test_an_exception_at_any_point_of_a_write_leaves_complete_files_and_a_rerun_redoes_exactly_the_rest(
        fakes, tmp_path, monkeypatch, case):
    point, target = case
    data, out = tmp_path / "data", tmp_path / "out"
    items = fx.make_data(data, N_IMAGES)

    def crash():
        raise Crash(case_id(case))

    real = {"fsync": os.fsync, "replace": os.replace, "append": manifest_module.ManifestWriter.append}
    patches = arm(point, target, out, crash)
    monkeypatch.setattr(os, "fsync", patches["fsync"])
    monkeypatch.setattr(os, "replace", patches["replace"])
    monkeypatch.setattr(manifest_module.ManifestWriter, "append", patches["append"])
    with pytest.raises(Crash):
        run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True,
            progress=False)
    monkeypatch.setattr(os, "fsync", real["fsync"])
    monkeypatch.setattr(os, "replace", real["replace"])
    monkeypatch.setattr(manifest_module.ManifestWriter, "append", real["append"])
    check_visible_files(out, data, cut_lines=point == "mid_line")
    if point in ("torn_temp", "before_fsync"):  # an exception inside the write removes its temp file
        assert not [p for p in out.rglob("*") if _TEMP_NAME.match(p.name)]
    rerun_and_check(out, data, done_before(point, target), cut_lines=point == "mid_line")


# --- the order of durability ----------------------------------------------------------------------------


def test_each_file_is_fsynced_whole_before_its_rename_and_each_manifest_line_before_the_next_image(
        fakes, tmp_path, monkeypatch):
    """Spy on os.fsync (path and size of the fd's file when it is called) and os.replace, in order."""
    data, out = tmp_path / "data", tmp_path / "out"
    items = fx.make_data(data, 3)
    events: list[tuple[str, str, int | str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path, size = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size
        real_fsync(fd)
        events.append(("fsync", path, size))

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True, progress=False)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "replace", real_replace)
    real_out = os.path.realpath(out)
    manifest = os.path.join(real_out, "manifest.jsonl")

    # every output: fsynced (as its temporary file, with all its bytes) before the rename that shows it
    outputs = ["config.json"] + [f"{d}{i.stem}.{s}" for i in items for d, s in (("", "png"), ("", "npz"),
                                                                                 ("overlay/", "png"))]
    for rel in outputs:
        final = os.path.join(real_out, rel)
        renames = [k for k, e in enumerate(events) if e[0] == "replace" and e[2] == final]
        assert len(renames) == 1, f"{rel}: written in place, not renamed from a temporary file"
        temp = events[renames[0]][1]
        assert os.path.dirname(temp) == os.path.dirname(final) and _TEMP_NAME.match(os.path.basename(temp))
        synced = [k for k, e in enumerate(events[:renames[0]]) if e[0] == "fsync" and e[1] == temp]
        assert synced, f"{rel}: its data is not fsynced before os.replace"
        assert events[synced[-1]][2] == os.path.getsize(final), f"{rel}: fsynced before all of it was written"

    # the manifest: one fsync per line, each after the whole line is in the file (flushed), in order
    text = Path(manifest).read_bytes()
    ends = [k + 1 for k, byte in enumerate(text) if byte == ord("\n")]
    syncs = [k for k, e in enumerate(events) if e[0] == "fsync" and e[1] == manifest]
    assert [events[k][2] for k in syncs] == ends, "the manifest is fsynced after each complete line"

    # image k's files are in place before its line is durable, which is before image k+1's first write
    def owner(path: str) -> str:
        match = _TEMP_NAME.match(os.path.basename(path))
        return (match["target"] if match else os.path.basename(path)).split(".")[0]

    def span(stem: str) -> tuple[int, int]:
        mine = [k for k, e in enumerate(events) if e[1] != manifest and owner(e[1]) == stem]
        return min(mine), max(mine)

    for k, item in enumerate(items):
        assert span(item.stem)[1] < syncs[k], f"{item.stem}: its line is durable before its files are in place"
        if k + 1 < len(items):
            assert syncs[k] < span(items[k + 1].stem)[0], f"{item.stem}: its line is not durable before the next"


# --- the real thing: SIGKILL of the CLI with tiny models at a random moment of its work --------------------


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_sigkill_of_the_real_cli_at_a_random_moment_then_a_rerun_completes_each_image_once(tmp_path, config_file):
    n = 7
    imgs, mask_dir = _photos_and_masks(tmp_path, n, image_suffix=".png")
    out = tmp_path / "out"
    args = [imgs, "--mask", mask_dir, "--classes", "cat", "--out", out, "--config", config_file, "--no-progress",
            "--save-overlay"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    rng = random.Random()
    lines, fraction = rng.randint(1, n - 3), rng.random()  # a random moment of the work on image `lines`
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "g4seg", "refine", *map(str, args)], env=env,
                                stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + WAIT_S  # the child imports the model libraries and loads the models first
        while _lines(out / "manifest.jsonl") < lines:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.002)
        # the models are loaded and the next image is being refined: kill within one image's time
        per_image = Entry.from_line((out / "manifest.jsonl").read_text().splitlines()[lines - 1]).seconds
        delay = fraction * per_image
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_S)
    where = f"killed {delay:.3f} s after line {lines} (image time {per_image:.3f} s)"
    first = [e.stem for e in read_entries(out) if e.status == "done"]
    assert 1 <= len(first) < n, f"the kill must land mid-run: {where}, {len(first)} done"
    for path in out.rglob("*"):  # every visible file is complete
        if path.is_file() and not _TEMP_NAME.match(path.name) and not path.name.endswith(".lock"):
            if path.suffix == ".png":
                with Image.open(path) as img:
                    img.verify()
            elif path.suffix == ".npz":
                with np.load(path) as npz:
                    assert npz["probs"].shape == (1, 40, 48), where
            elif path.name == "config.json":
                json.loads(path.read_text())
            else:
                assert path.name == "manifest.jsonl", path
                lines = path.read_text().split("\n")
                assert all(Entry.from_line(line) for line in lines[:-1]), where

    result = CliRunner().invoke(app, ["refine", *map(str, args)])
    assert result.exit_code == 0, result.output
    assert f"done {n - len(first)}, skipped {len(first)}, failed 0" in result.output, (where, result.output)
    done = Counter(e.stem for e in read_entries(out) if e.status == "done")
    assert done == Counter(f"im{i:02d}" for i in range(n)), f"each image done exactly once ({where})"
    for i in range(n):
        stem = f"im{i:02d}"
        with Image.open(out / f"{stem}.png") as img:
            assert img.size == (48, 40) and img.mode == "P"
        with np.load(out / f"{stem}.npz") as npz:
            assert npz["probs"].shape == (1, 40, 48) and np.isfinite(npz["probs"]).all()
        with Image.open(out / "overlay" / f"{stem}.png") as img:
            img.verify()
    assert not [p for p in out.rglob("*") if _TEMP_NAME.match(p.name)]
