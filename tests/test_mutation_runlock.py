"""Unit tests for :mod:`g4seg.runlock`, written for survivors of mutation testing (docs/testing.md).

tests/test_run_safety.py checks the locks end to end with real holder processes; these check, in one
process, the pieces whose every branch those tests do not reach: lock-file names, the holder record
and its one-line description, the liveness test of a leftover record, and the shared/exclusive
protocol (``flock`` locks of different open files conflict within one process too, as across
processes).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from g4seg.runlock import (FOLDER_LOCK, FolderBusy, RunLock, _alive, _read_holder, describe, is_lock_name,
                           rank_lock_name)
from g4seg.sharding import Shard


def test_lock_file_names():
    assert rank_lock_name(3) == ".g4seg.rank3.lock"
    assert all(is_lock_name(n) for n in (FOLDER_LOCK, ".g4seg.lock", ".g4seg.rank0.lock", rank_lock_name(12)))
    for name in (".g4seg.lockx", "g4seg.lock", ".g4seg.rank1.lck", "x.g4seg.rank1.lock", "manifest.jsonl"):
        assert not is_lock_name(name)


def test_describe_a_holder():
    started = 1_700_000_000.0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    holder = {"pid": 4242, "host": "gpu01", "started": started, "rank": 0, "world_size": 1}
    assert describe(holder) == f"pid 4242 on gpu01, started {when}"
    assert describe({**holder, "rank": 2, "world_size": 4}) == f"rank 2 of 4: pid 4242 on gpu01, started {when}"
    assert describe({"pid": 7}) == "pid 7 on ?, started ?"
    assert describe({"pid": 7, "started": "soon", "world_size": None}) == "pid 7 on ?, started ?"
    assert describe(None) == "holder not known yet: it has just started"


def test_read_holder(tmp_path):
    path = tmp_path / "lock"
    assert _read_holder(path) is None  # missing
    for text in ("", "{cut", "[1, 2]", '{"host": "x"}'):
        path.write_text(text)
        assert _read_holder(path) is None
    path.write_text('{"pid": 5, "host": "x"}\n')
    assert _read_holder(path) == {"pid": 5, "host": "x"}


def test_alive_is_false_only_for_a_dead_pid_of_this_host():
    here = socket.gethostname()
    assert _alive({"pid": os.getpid(), "host": here})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not _alive({"pid": dead.pid, "host": here})
    assert _alive({"pid": dead.pid, "host": here + "-elsewhere"})  # another host's pid cannot be checked
    assert _alive({"pid": "not a pid", "host": here})


def test_alive_only_probes_the_holder():
    """``_alive`` asks with signal 0, which checks the pid and delivers nothing: a live holder (here a child
    that takes SIGHUP's default action, even under nohup) is still running afterwards."""
    code = ("import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); print('ready', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert _alive({"pid": holder.pid, "host": socket.gethostname()})
        time.sleep(0.2)
        assert holder.poll() is None, "the holder was signalled"
    finally:
        holder.kill()
        holder.wait()


def test_holder_record_and_shared_ranks(tmp_path):
    """The exclusive holder writes its record; ranks hold the folder lock shared (side by side), each its
    own rank lock exclusively; the last one out removes the shared file."""
    single = RunLock(tmp_path, Shard()).acquire()
    record = json.loads((tmp_path / FOLDER_LOCK).read_text())
    assert (record["pid"], record["host"], record["rank"], record["world_size"]) == \
        (os.getpid(), socket.gethostname(), 0, 1)
    assert abs(record["started"] - time.time()) < 60
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / FOLDER_LOCK).st_mode) == 0o666 & ~umask  # as open() would create it
    holder = describe(record)
    with pytest.raises(FolderBusy) as caught:
        RunLock(tmp_path, Shard()).acquire()
    assert str(caught.value) == (f"output folder {tmp_path} is in use by another g4seg run ({holder}); wait for it "
                                 "to end, or choose another output folder")
    with pytest.raises(FolderBusy) as caught:
        RunLock(tmp_path, Shard(1, 2)).acquire()
    assert str(caught.value) == (f"output folder {tmp_path} is in use by another g4seg run ({holder}), so rank 1 "
                                 "cannot start; wait for it to end, or choose another output folder")
    assert single._held and not (tmp_path / rank_lock_name(1)).exists()
    single.release()
    assert sorted(os.listdir(tmp_path)) == []

    rank0 = RunLock(tmp_path, Shard(0, 2)).acquire()
    rank1 = RunLock(tmp_path, Shard(1, 2)).acquire()
    assert (tmp_path / FOLDER_LOCK).read_text() == ""  # shared holders write no record
    assert json.loads((tmp_path / rank_lock_name(1)).read_text())["rank"] == 1
    holders = [describe(json.loads((tmp_path / rank_lock_name(r)).read_text())) for r in (0, 1)]
    assert holders[1].startswith(f"rank 1 of 2: pid {os.getpid()} on ")
    with pytest.raises(FolderBusy) as caught:
        RunLock(tmp_path, Shard(1, 2)).acquire()
    assert str(caught.value) == (f"rank 1 of output folder {tmp_path} is in use by another g4seg run ({holders[1]}); "
                                 "wait for it to end, or choose another output folder")
    with pytest.raises(FolderBusy) as caught:
        RunLock(tmp_path, Shard()).acquire()
    assert str(caught.value) == (f"output folder {tmp_path} is in use by another g4seg run ({'; '.join(holders)}); "
                                 "wait for it to end, or choose another output folder")
    rank1.release()
    assert sorted(os.listdir(tmp_path)) == [FOLDER_LOCK, rank_lock_name(0)]  # rank 0 still holds the folder
    rank0.release()
    assert sorted(os.listdir(tmp_path)) == []
    assert rank0._held == [] and rank1._held == []


def test_a_shared_holder_without_live_rank_records_is_a_sharded_run(tmp_path):
    """The folder lock held shared (a sharded run) whose rank files are missing or left by dead processes:
    the message says "a sharded run" and names no dead holder."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rank_lock_name(0)).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                          "started": 0, "rank": 0, "world_size": 2}))
    fd = os.open(tmp_path / FOLDER_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with pytest.raises(FolderBusy) as caught:
            RunLock(tmp_path, Shard()).acquire()
    finally:
        os.close(fd)
    assert str(caught.value) == (f"output folder {tmp_path} is in use by another g4seg run (a sharded run); "
                                 "wait for it to end, or choose another output folder")


def test_a_file_system_without_flock_is_one_line(tmp_path, monkeypatch):
    """flock failing with anything but "would block" (e.g. ENOLCK on some network mounts): one G4SegError
    line, and the lock file's descriptor is closed."""
    import errno

    from g4seg import runlock
    from g4seg.errors import G4SegError

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    open_fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(G4SegError) as caught:
        RunLock(tmp_path, Shard()).acquire()
    assert type(caught.value) is G4SegError
    assert str(caught.value) == (f"cannot lock output folder {tmp_path}: {os.strerror(errno.ENOLCK)} "
                                 "(its file system does not support flock)")
    assert len(os.listdir("/proc/self/fd")) == open_fds


def test_a_lock_file_removed_between_open_and_lock_is_opened_again(tmp_path, monkeypatch):
    """The previous holder removes the file after we opened it: the lock we got is on a file no longer at the
    path, so it is closed and the new file at the path is taken (else two runs could both "hold" the folder)."""
    from g4seg import runlock

    real_stat, removed = os.stat, []

    def stat_after_removal(path, *args, **kwargs):
        if not removed:
            removed.append(path)
            os.unlink(path)  # what a releasing holder does
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(runlock.os, "stat", stat_after_removal)
    lock = RunLock(tmp_path, Shard()).acquire()
    monkeypatch.undo()
    assert removed == [tmp_path / FOLDER_LOCK]
    (path, fd, exclusive), = lock._held
    assert os.fstat(fd).st_ino == os.stat(tmp_path / FOLDER_LOCK).st_ino and exclusive
    assert json.loads((tmp_path / FOLDER_LOCK).read_text())["pid"] == os.getpid()
    lock.release()
