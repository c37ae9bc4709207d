"""Sharding by RANK / WORLD_SIZE: the split itself, per-rank manifests, and a real two-process torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from g4seg.errors import G4SegError
from g4seg.manifest import read_entries
from g4seg.runner import run
from g4seg.sharding import Shard, current_shard, shard_items

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runner as fx  # noqa: E402  (fakes shared with the run-loop tests)

fakes = fx.fakes


def test_current_shard_reads_the_launcher_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert current_shard() == Shard(0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert current_shard() == Shard(2, 3)
    assert current_shard().manifest_name == "manifest.rank2.jsonl"
    assert Shard(0, 1).manifest_name == "manifest.jsonl"
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(G4SegError, match="RANK=3 with WORLD_SIZE=3"):
        current_shard()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(G4SegError, match="RANK='one' is not an integer"):
        current_shard()


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 12])
def test_shards_are_disjoint_cover_everything_and_ignore_input_order(world_size):
    names = [f"{i:04d}" for i in range(10)]
    shares = [shard_items(names, Shard(r, world_size), key=str) for r in range(world_size)]
    shuffled = [shard_items(names[::-1], Shard(r, world_size), key=str) for r in range(world_size)]
    assert shares == shuffled
    assert sorted(n for share in shares for n in share) == names
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares[0][0] == "0000" and (world_size == 1 or shares[1][0] == "0001")


def test_each_rank_writes_its_share_and_its_own_manifest(fakes, tmp_path, monkeypatch, capsys):
    items = fx.make_data(tmp_path / "data", 5)
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    summary = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=True)
    assert summary.done == 2
    assert capsys.readouterr().err == "", "only rank 0 shows progress"
    assert sorted(p.name for p in out.iterdir()) == ["img001.npz", "img001.png", "img003.npz", "img003.png",
                                                     "manifest.rank1.jsonl"]
    monkeypatch.setenv("RANK", "0")
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=True)
    assert "3/3" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    # a different world size still sees every manifest: nothing is redone
    for rank in range(3):
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        again = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=fx.FakeRefiner, progress=False)
        assert again.done == 0 and again.skipped == len(range(rank, 5, 3))


_RANK_SCRIPT = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_runner as t
t.install_fakes()
from g4seg.runner import run
summary = run(t.items_in(Path({data!r})), Path({out!r}), t.make_config(), t.CLASSES,
              build_refiner=t.FakeRefiner, progress=True)
# one file per rank: the ranks' stdout streams may interleave within a line
Path({out!r}, "..", "result.rank" + os.environ["RANK"]).write_text(
    " ".join(map(str, (os.environ["RANK"], os.environ["WORLD_SIZE"], summary.done, summary.skipped))))
"""


def test_two_process_torchrun(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 7)
    out = tmp_path / "out"
    script = tmp_path / "rank_script.py"
    script.write_text(_RANK_SCRIPT.format(tests=str(fx.TESTS_DIR), data=str(tmp_path / "data"), out=str(out)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0", str(script)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / f"result.rank{rank}").read_text().split() for rank in (0, 1))
    assert results == [["0", "2", "4", "0"], ["1", "2", "3", "0"]]
    per_rank = {}
    for rank in (0, 1):
        lines = (out / f"manifest.rank{rank}.jsonl").read_text().splitlines()
        per_rank[rank] = [json.loads(line)["stem"] for line in lines]
        assert {json.loads(line)["rank"] for line in lines} == {rank}
    assert per_rank == {0: ["img000", "img002", "img004", "img006"], 1: ["img001", "img003", "img005"]}
    assert not (out / "manifest.jsonl").exists()
    for item in items:
        fx.check_outputs(out, item)
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    # the same folder resumed by one process: all done, nothing rebuilt
    summary = run(items, out, fx.make_config(), fx.CLASSES, build_refiner=lambda: None, progress=False)
    assert (summary.done, summary.skipped) == (0, 7)
    assert len(read_entries(out)) == 7


def test_torchrun_of_the_real_cli_shards_the_images_and_one_process_resumes_them_all(tmp_path, config_file):
    """``torchrun -m g4seg refine`` itself, two ranks on CPU with tiny models: each rank refines its share
    into the shared folder with its own manifest, and a single-process rerun skips everything."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from g4seg.cli import app

    n = 5
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(imgs / f"im{i:02d}.png")
        mask = np.zeros((40, 48), np.uint8)
        mask[8 + i: 30, 10: 34 - i] = 255
        Image.fromarray(mask).save(masks / f"im{i:02d}.png")
    out = tmp_path / "out"
    args = [imgs, "--mask", masks, "--classes", "cat", "--out", out, "--config", config_file, "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "0", "-m", "g4seg", "refine", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = {}
    for rank in (0, 1):
        lines = [json.loads(line) for line in (out / f"manifest.rank{rank}.jsonl").read_text().splitlines()]
        assert {(e["rank"], e["status"]) for e in lines} == {(rank, "done")}
        shares[rank] = [e["stem"] for e in lines]
    assert shares == {0: ["im00", "im02", "im04"], 1: ["im01", "im03"]}, "every WORLD_SIZE-th image from the rank"
    assert not (out / "manifest.jsonl").exists()
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    for i in range(n):
        with Image.open(out / f"im{i:02d}.png") as img:
            img.verify()
        with Image.open(out / f"im{i:02d}.png") as img:
            assert img.mode == "P" and img.size == (48, 40) and set(np.unique(np.asarray(img))) <= {0, 1}
        with np.load(out / f"im{i:02d}.npz") as npz:
            assert npz["probs"].shape == (1, 40, 48) and np.isfinite(npz["probs"]).all()
            assert list(npz["classes"]) == ["cat"]
    assert not list(out.rglob("*.tmp"))
    # one process resumes the sharded folder: everything is skipped and nothing is written
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    result = CliRunner().invoke(app, ["refine", *map(str, args)])
    assert result.exit_code == 0 and f"done 0, skipped {n}, failed 0" in result.output, result.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert len(read_entries(out)) == n
