"""Run-folder safety on real files: outputs never land on inputs, one run per folder (and rank) at a time,
resume by content (changed inputs, damaged outputs), no stale extras after --overwrite, the umask's file
modes, and a resume with nothing to do that writes nothing (so it works on a read-only folder).

Fast tests use the fakes of test_runner (no models); the CLI tests use the tiny random models of conftest.
Every wait on another process is bounded, and every helper process is killed at the end of its test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg import io
from g4seg.cli import app
from g4seg.errors import G4SegError
from g4seg.manifest import read_entries
from g4seg.runlock import FOLDER_LOCK, FolderBusy, RunLock, rank_lock_name
from g4seg.runner import WorkItem, run
from g4seg.sharding import Shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runner as fx  # noqa: E402  (fakes shared with the run-loop tests)

fakes = fx.fakes
cli = CliRunner()
WAIT_S = 60  # bound of every wait on a helper process (they normally take well under a second)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def _invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("g4seg: error:")]


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path under ``root`` (folders included) with size, mtime_ns, inode and mode: any write shows."""
    rows = {}
    for folder, _, files in os.walk(root):
        for path in (folder, *(os.path.join(folder, f) for f in files)):
            st = os.lstat(path)
            rows[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)
    return rows


@pytest.fixture
def procs():
    """Helper processes started by a test; killed (SIGKILL) and reaped at its end whatever happens."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT_S)


def _photos_and_masks(root: Path, n: int, image_suffix: str = ".jpg") -> tuple[Path, Path]:
    """``root/imgs/im<i><suffix>`` photos and ``root/masks/im<i>.png`` binary masks (named like the outputs)."""
    imgs, masks = root / "imgs", root / "masks"
    imgs.mkdir(parents=True), masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(imgs / f"im{i:02d}{image_suffix}")
        mask = np.zeros((40, 48), np.uint8)
        mask[8 + i % 5: 30, 10: 34 - i % 7] = 255
        Image.fromarray(mask).save(masks / f"im{i:02d}.png")
    return imgs, masks


# --- 1. never write over an input ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["out is the mask folder", "out is the photo folder", "out links to the masks",
                                  "overlay folder links to the photos"])
def test_outputs_onto_inputs_are_refused_before_anything_is_written(tmp_path, config_file, case):
    imgs, masks = _photos_and_masks(tmp_path, 2, ".png" if "photo" in case else ".jpg")
    out = {"out is the mask folder": masks, "out is the photo folder": imgs}.get(case, tmp_path / "out")
    if case == "out links to the masks":
        out.symlink_to(masks, target_is_directory=True)
    elif case == "overlay folder links to the photos":
        out.mkdir()
        (out / "overlay").symlink_to(imgs, target_is_directory=True)
    before = {p: p.read_bytes() for p in [*imgs.iterdir(), *masks.iterdir()]}
    result = _invoke("refine", imgs, "--mask", masks, "--classes", "cat", "--out", out, "--config", config_file,
                     "--no-progress")
    assert result.exit_code == 1, result.output
    errors = _error_lines(result)
    assert len(errors) == 1 and "would overwrite the input" in errors[0] and "(and 1 more)" in errors[0], errors
    assert {p: p.read_bytes() for p in [*imgs.iterdir(), *masks.iterdir()]} == before, "inputs untouched"
    for folder in (imgs, masks, out):
        names = {p.name for p in folder.iterdir()}
        assert not names & {"config.json", "manifest.jsonl", FOLDER_LOCK}, names


def test_the_refusal_comes_before_any_folder_is_created(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 2)  # data/img<i>.png photos and data/img<i>.npy masks
    listing = _snapshot(tmp_path)
    out = tmp_path / "data" / "new" / ".."  # the data folder itself, through a folder that does not exist
    with pytest.raises(G4SegError, match=r"would overwrite the input .*img000.png.*nothing was written") as caught:
        run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    assert "\n" not in str(caught.value)
    assert _snapshot(tmp_path) == listing and not (tmp_path / "data" / "new").exists()


def test_an_input_that_links_into_the_output_folder_is_refused(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    linked = tmp_path / "linked.png"
    linked.symlink_to(out / "img000.png")  # an earlier output used as an input of a run into that folder
    with pytest.raises(G4SegError, match=r"would overwrite the input .*linked.png \(as .*img000.png\)"):
        run([WorkItem("img000", linked, items[0].mask), items[1]], out, fx.make_config(beta=0.5), fx.CLASSES,
            build_refiner=fx.FakeRefiner, overwrite=True, progress=False)


def test_writing_next_to_the_inputs_under_other_names_is_fine(fakes, tmp_path):
    data = tmp_path / "data"
    items = fx.make_data(data, 2)
    jpgs = []
    for item in items:  # photos as .jpg: the outputs <stem>.png / .npz then share the folder, not the names
        Image.open(item.image).convert("RGB").save(item.image.with_suffix(".jpg"), quality=100)
        item.image.unlink()
        jpgs.append(WorkItem(item.stem, item.image.with_suffix(".jpg"), item.mask))
    summary = run(jpgs, data, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True,
                  progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    assert (data / "img000.png").exists() and (data / "overlay" / "img000.png").exists()


# --- 2. one run per output folder (and rank) at a time ------------------------------------------------------

_HOLD_LOCK = """
import time
from pathlib import Path
from g4seg.runlock import RunLock
from g4seg.sharding import Shard
RunLock(Path({out!r}), Shard({rank}, {world})).acquire()
time.sleep(300)
"""


def _wait_for_holder(lock_file: Path, proc: subprocess.Popen) -> dict:
    """The holder record ``proc`` writes into ``lock_file`` once it holds it (bounded wait)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        assert proc.poll() is None, "the lock holder died"
        try:
            record = json.loads(lock_file.read_text())
            if record.get("pid") == proc.pid:
                return record
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, "the helper never took the lock"
        time.sleep(0.01)


def _hold(procs, out: Path, rank: int = 0, world: int = 1) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK.format(out=str(out), rank=rank, world=world)],
                            env=_env())
    procs.append(proc)
    _wait_for_holder(out / (FOLDER_LOCK if world == 1 else rank_lock_name(rank)), proc)
    return proc


def test_a_second_run_is_refused_with_the_holder_then_runs_once_it_is_gone(tmp_path, config_file, procs):
    imgs, masks = _photos_and_masks(tmp_path, 2)
    out = tmp_path / "out"
    holder = _hold(procs, out)
    args = ["refine", imgs, "--mask", masks, "--classes", "cat", "--out", out, "--config", config_file,
            "--no-progress"]
    result = _invoke(*args)
    assert result.exit_code == 1
    errors = _error_lines(result)
    assert len(errors) == 1 and "is in use by another g4seg run" in errors[0], result.output
    assert f"pid {holder.pid} on {socket.gethostname()}, started {time.strftime('%Y-')}" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_LOCK], "nothing written while refused"
    holder.kill()  # SIGKILL: the OS drops the lock; the lock file stays behind, unlocked
    holder.wait(timeout=WAIT_S)
    assert (out / FOLDER_LOCK).exists()
    again = _invoke(*args)
    assert again.exit_code == 0 and "done 2, skipped 0, failed 0" in again.output, again.output
    assert not (out / FOLDER_LOCK).exists(), "a run removes the lock file it releases"


_SLOW_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_runner as t
t.install_fakes()
from g4seg.runner import run
run(t.items_in(Path({data!r})), Path({out!r}), t.make_config(), t.CLASSES,
    build_refiner=lambda: t.FakeRefiner(delay=0.2), progress=False)
"""


def test_a_run_in_progress_keeps_its_folder_and_its_config(fakes, tmp_path, procs):
    items = fx.make_data(tmp_path / "data", 6)
    out = tmp_path / "out"
    script = _SLOW_RUN.format(tests=str(fx.TESTS_DIR), data=str(tmp_path / "data"), out=str(out))
    first = subprocess.Popen([sys.executable, "-c", script], env=_env())
    procs.append(first)
    _wait_for_holder(out / FOLDER_LOCK, first)
    deadline = time.monotonic() + WAIT_S
    while not (out / "config.json").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.01)
    recorded = json.loads((out / "config.json").read_text())["config_hash"]
    for config, overwrite in ((fx.make_config(), False), (fx.make_config(beta=0.9), True)):
        with pytest.raises(FolderBusy, match=rf"in use by another g4seg run \(pid {first.pid} on "):
            run(items, out, config, fx.CLASSES, build_refiner=fx.FakeRefiner, overwrite=overwrite, progress=False)
        assert json.loads((out / "config.json").read_text())["config_hash"] == recorded
    assert first.wait(timeout=WAIT_S) == 0
    done = [e.stem for e in read_entries(out) if e.status == "done"]
    assert sorted(done) == [i.stem for i in items], "the first run did every image, once"


def test_sharded_ranks_run_side_by_side_but_never_twice(fakes, tmp_path, procs, monkeypatch):
    items = fx.make_data(tmp_path / "data", 4)
    out = tmp_path / "out"
    holder = _hold(procs, out, rank=1, world=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    summary = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    assert summary.done == 2, "rank 0 runs while rank 1 of the folder is held"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(FolderBusy, match=rf"rank 1 of output folder .* \(rank 1 of 2: pid {holder.pid} on "):
        run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(FolderBusy, match=rf"in use by another g4seg run \(rank 1 of 2: pid {holder.pid} on "):
        run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)


def test_a_rank_never_writes_config_while_a_single_process_run_holds_the_folder(fakes, tmp_path, procs,
                                                                                monkeypatch):
    items = fx.make_data(tmp_path / "data", 4)
    out = tmp_path / "out"
    holder = _hold(procs, out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(FolderBusy, match=rf"pid {holder.pid} .*so rank {rank} cannot start"):
            run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_LOCK]


def test_locks_in_one_process_and_lock_file_problems_are_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out, Shard()):
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
            RunLock(out, Shard()).acquire()
    assert not (out / FOLDER_LOCK).exists()
    (out / FOLDER_LOCK).mkdir()  # a lock file that cannot be opened (as a read-only folder would do)
    with pytest.raises(G4SegError, match=r"^cannot lock output folder .*cannot create \.g4seg\.lock \(") as caught:
        RunLock(out, Shard()).acquire()
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_sigkill_of_a_real_cli_run_then_a_rerun_finishes_exactly_the_missing_images(tmp_path, config_file, procs):
    n = 30
    imgs, masks = _photos_and_masks(tmp_path, n)
    out = tmp_path / "out"
    args = [imgs, "--mask", masks, "--classes", "cat", "--out", out, "--config", config_file, "--no-progress"]
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "g4seg", "refine", *map(str, args)], env=_env(),
                                stdout=log, stderr=log)
    procs.append(proc)
    deadline = time.monotonic() + 3 * WAIT_S  # model libraries load in the child first
    while fx._manifest_lines(out) < 1:
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    assert json.loads((out / FOLDER_LOCK).read_text())["pid"] == proc.pid, "the run holds the folder"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=WAIT_S)
    first = [e.stem for e in read_entries(out) if e.status == "done"]
    assert 1 <= len(first) < n, "the kill must land mid-run"
    assert (out / FOLDER_LOCK).exists(), "a killed run leaves its lock file, but not its lock"

    result = _invoke("refine", *args)
    assert result.exit_code == 0, result.output
    assert f"done {n - len(first)}, skipped {len(first)}, failed 0" in result.output
    done = [e.stem for e in read_entries(out) if e.status == "done"]
    assert sorted(done) == [f"im{i:02d}" for i in range(n)], "every image done exactly once"
    for stem in done:
        assert Image.open(out / f"{stem}.png").size == (48, 40)
    assert not list(out.rglob("*.tmp")) and not (out / FOLDER_LOCK).exists()


# --- 3. resume by content -------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_manifest_records_what_inputs_and_outputs_were(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 1)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True, progress=False)
    entry = read_entries(out)[0]
    for recorded, path in ((entry.image_id, items[0].image), (entry.mask_id, items[0].mask)):
        st = path.stat()
        assert recorded == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha(path)}
    assert list(entry.output_ids) == entry.outputs == ["img000.png", "img000.npz", "overlay/img000.png"]
    for rel, recorded in entry.output_ids.items():
        st = (out / rel).stat()
        assert recorded == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha(out / rel)}


def test_a_changed_input_is_redone_a_touched_or_moved_one_is_not(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 4)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    # img000: same content, new mtime; img001: mask edited in place (same name, same size);
    # img002: image edited; img003: untouched
    os.utime(items[0].mask, ns=(time.time_ns(), time.time_ns() + 10**9))
    size = items[1].mask.stat().st_size
    np.save(items[1].mask, np.load(items[1].mask)[::-1].copy())
    assert items[1].mask.stat().st_size == size
    pixels = np.asarray(Image.open(items[2].image)).copy()
    pixels[0, 0] ^= 255
    Image.fromarray(pixels).save(items[2].image)
    refiner = fx.FakeRefiner()
    summary = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=lambda: refiner, progress=False)
    assert (summary.done, summary.changed, summary.repaired, summary.skipped) == (2, 2, 0, 2)
    assert len(refiner.calls) == 2
    for item in items:
        fx.check_outputs(out, item)
    # the same files somewhere else: their content is what counts, so nothing is redone
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    moved = fx.items_in(tmp_path / "moved")
    again = run(moved, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    assert (again.done, again.skipped) == (0, 4)


def test_the_cli_line_counts_changed_inputs_and_damaged_outputs(tmp_path, config_file):
    imgs, masks = _photos_and_masks(tmp_path, 3)
    out = tmp_path / "out"
    args = ["refine", imgs, "--mask", masks, "--classes", "cat", "--out", out, "--config", config_file,
            "--no-progress", "--save-overlay"]
    assert _invoke(*args).exit_code == 0
    mask = np.asarray(Image.open(masks / "im01.png")).copy()
    mask[:, :4] = 255
    Image.fromarray(mask).save(masks / "im01.png")  # content changed, name kept
    npz = out / "im02.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # truncated output
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert ("done 2 (1 redone: inputs changed, 1 redone: outputs missing or damaged), skipped 1, failed 0"
            in result.output), result.output
    with np.load(npz) as data:
        assert data["probs"].shape == (1, 40, 48)
    assert "done 0, skipped 3, failed 0" in _invoke(*args).output


@pytest.mark.parametrize("damage", ["truncated npz", "garbage png, same size", "missing overlay",
                                    "overlay replaced by another image"])
def test_a_damaged_output_is_redone(fakes, tmp_path, damage):
    items = fx.make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True, progress=False)
    if damage == "truncated npz":
        data = (out / "img000.npz").read_bytes()
        (out / "img000.npz").write_bytes(data[:-40])
    elif damage == "garbage png, same size":
        size = (out / "img000.png").stat().st_size
        (out / "img000.png").write_bytes(b"\0" * size)
    elif damage == "missing overlay":
        (out / "overlay" / "img000.png").unlink()
    else:
        shutil.copyfile(out / "overlay" / "img001.png", out / "overlay" / "img000.png")
    refiner = fx.FakeRefiner()
    summary = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=lambda: refiner, save_overlay=True,
                  progress=False)
    assert (summary.done, summary.repaired, summary.changed, summary.skipped) == (1, 1, 0, 1)
    fx.check_outputs(out, items[0])
    image = io.load_image(items[0].image)
    np.testing.assert_array_equal(io.load_image(out / "overlay" / "img000.png"),
                                  io.overlay(image, np.asarray(Image.open(out / "img000.png"))))


def test_overwrite_leaves_no_stale_extras(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True,
        save_generated=True, save_coarse=True, progress=False)
    assert sorted(p.name for p in (out / "generated" / "img000").iterdir()) == ["1_cat.png", "2_potted_plant.png"]
    (out / "generated" / "img001" / "notes.txt").write_text("an earlier configuration's file")

    class OneClass(fx.FakeRefiner):  # generates only the first class now
        def refine(self, image, probs, classes, **kwargs):
            result = super().refine(image, probs, classes, **kwargs)
            if result.generated:
                result.generated = {classes[0]: result.generated[classes[0]]}
            return result

    summary = run(items[:1], out, fx.make_config(beta=0.5), fx.CLASSES, build_refiner=OneClass,
                  save_generated=True, overwrite=True, progress=False)
    assert summary.done == 1
    assert sorted(p.name for p in (out / "generated" / "img000").iterdir()) == ["1_cat.png"]
    assert not (out / "overlay" / "img000.png").exists() and not (out / "coarse" / "img000.png").exists()
    assert (out / "overlay" / "img001.png").exists(), "images not in this run are left alone"
    summary = run(items, out, fx.make_config(beta=0.9), fx.CLASSES, build_refiner=fx.FakeRefiner,
                  overwrite=True, progress=False)
    assert summary.done == 2
    assert not (out / "generated").exists() or not any((out / "generated").rglob("*"))
    assert not any((out / "overlay").iterdir()) and not any((out / "coarse").iterdir())
    assert {p.name for p in out.iterdir() if p.is_file()} == {"img000.png", "img000.npz", "img001.png",
                                                              "img001.npz", "config.json", "manifest.jsonl"}


def test_a_redo_that_fails_leaves_no_outputs_of_the_earlier_inputs(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True, progress=False)
    items[0].image.write_bytes(b"not an image any more")
    summary = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True,
                  progress=False)
    assert (summary.failed, summary.skipped) == (1, 1)
    assert not list(out.rglob("img000*")), "the outputs of the earlier image are gone with it"


# --- files respect the umask; a resume with nothing to do writes nothing -------------------------------------

_UMASK_RUN = """
import os, sys
os.umask(0o022)
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_runner as t
t.install_fakes()
from g4seg.runner import run
run(t.items_in(Path({data!r})), Path({out!r}), t.make_config(), t.CLASSES, build_refiner=t.FakeRefiner,
    save_overlay=True, save_generated=True, save_coarse=True, progress=False)
"""


def test_files_get_the_umask_mode(fakes, tmp_path):
    fx.make_data(tmp_path / "data", 1)
    out = tmp_path / "out"
    script = _UMASK_RUN.format(tests=str(fx.TESTS_DIR), data=str(tmp_path / "data"), out=str(out))
    subprocess.run([sys.executable, "-c", script], env=_env(), check=True, timeout=WAIT_S)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"img000.png", "img000.npz", "config.json", "manifest.jsonl", "1_cat.png"}
    assert {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.relative_to(out).as_posix(): "0o644" for p in files}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in out.rglob("*") if p.is_dir()} == {"0o755"}
    assert io.FILE_MODE == 0o666 & ~_umask_now()


def _umask_now() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_resume_with_nothing_to_do_writes_nothing_even_into_a_read_only_folder(fakes, tmp_path):
    """chmod 0555/0444 makes the folder read-only for a normal user; the tests may run as root, whom
    chmod does not stop, so what counts is that no path under it changes (names, sizes, mtimes, inodes,
    modes of files and folders: a file created or deleted changes its folder's mtime)."""
    items = fx.make_data(tmp_path / "data", 3)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, save_overlay=True, progress=False)
    assert not (out / FOLDER_LOCK).exists()
    for path in [out, *out.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        before = _snapshot(out)
        time.sleep(0.01)  # so that any write would get another mtime

        def fail():
            raise AssertionError("nothing to do: no model may be built")

        for config in (fx.make_config(), fx.make_config(device="auto", class_batch=1)):
            summary = run(items, out, config, fx.CLASSES, build_refiner=fail, save_overlay=True, progress=False)
            assert (summary.done, summary.skipped, summary.failed) == (0, 3, 0)
            summary = run(items, out, config, fx.CLASSES, build_refiner=fail, progress=False)
            assert summary.skipped == 3
        assert _snapshot(out) == before
    finally:
        for path in [out, *out.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_run_that_cannot_create_its_folder_is_one_line(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 1)
    (tmp_path / "file").write_text("")
    with pytest.raises(G4SegError, match=r"^cannot create output folder .*file/out: ") as caught:
        run(items, tmp_path / "file" / "out", fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner,
            progress=False)
    assert "\n" not in str(caught.value)


def test_manifest_lines_from_before_identities_are_judged_by_path(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    manifest = out / "manifest.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k not in ("image_id", "mask_id", "output_ids")}
           for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in old))
    summary = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    assert (summary.done, summary.skipped) == (0, 2), "an upgrade does not redo a finished run"
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    summary = run(fx.items_in(tmp_path / "moved"), out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner,
                  progress=False)
    assert (summary.done, summary.changed, summary.skipped) == (2, 2, 0), "other paths: redone, as before"
    assert all(e.output_ids for e in read_entries(out)[-2:]), "and recorded with identities now"


def test_a_cli_resume_with_nothing_to_do_writes_nothing(tmp_path, config_file):
    imgs, masks = _photos_and_masks(tmp_path, 2)
    out = tmp_path / "out"
    args = ["refine", imgs, "--mask", masks, "--classes", "cat", "--out", out, "--config", config_file,
            "--no-progress", "--save-overlay"]
    assert _invoke(*args).exit_code == 0
    for path in [out, *out.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        before = _snapshot(out)
        time.sleep(0.01)
        result = _invoke(*args)
        assert result.exit_code == 0 and "done 0, skipped 2, failed 0" in result.output, result.output
        assert _snapshot(out) == before
    finally:
        for path in [out, *out.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


_READ_ONLY_RESUME = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_runner as t
t.install_fakes()
from g4seg.errors import G4SegError
from g4seg.runner import run
items = t.items_in(Path({data!r}))
summary = run(items, Path({out!r}), t.make_config(), t.CLASSES, build_refiner=None, progress=False)
print("SKIPPED", summary.skipped, summary.done, flush=True)
try:
    run(items, Path({out!r}), t.make_config(beta=0.5), t.CLASSES, build_refiner=t.FakeRefiner, overwrite=True,
        progress=False)
except G4SegError as exc:
    print("REFUSED", exc, flush=True)
"""


def _read_only_mounts(folder: Path) -> bool:
    """Whether this process may make a read-only bind mount in a mount namespace of its own (root in a
    container usually may; then a read-only folder is really read-only, even for root)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    folder.mkdir()
    probe = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder} && ! touch {folder}/x"
    try:
        proc = subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=WAIT_S)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and not (folder / "x").exists()


def test_a_resume_with_nothing_to_do_runs_on_a_read_only_mount(fakes, tmp_path):
    if not _read_only_mounts(tmp_path / "probe"):
        pytest.skip("no read-only bind mounts here (needs unshare -m and mount); see the chmod test above")
    items = fx.make_data(tmp_path / "data", 3)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
    before = _snapshot(out)
    script = _READ_ONLY_RESUME.format(tests=str(fx.TESTS_DIR), data=str(tmp_path / "data"), out=str(out))
    (tmp_path / "resume.py").write_text(script)
    mount = f"mount --bind {out} {out} && mount -o remount,ro,bind {out} {out} && exec {sys.executable} resume.py"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", mount], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "SKIPPED 3 0" in lines, proc.stdout + proc.stderr[-3000:]
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert refused and "cannot lock output folder" in refused[0] and "Read-only file system" in refused[0], lines
    after = _snapshot(out)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
