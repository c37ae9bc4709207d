"""Unit tests for :mod:`g4seg.fileid`, written for survivors of mutation testing (docs/testing.md).

Only the run-loop tests reached this module before; they check resume decisions end to end but not
each rule of ``unchanged`` (size first, the cheap same-place path, the hash otherwise) nor ``identify``'s
re-read of a file that changes while it is hashed. Expected values come from ``os.stat`` and
``hashlib`` directly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from g4seg import fileid
from g4seg.fileid import FileId, digest_bytes, identify, unchanged


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_json_round_trip_and_incomplete_records():
    record = FileId(12, 1_700_000_000_123_456_789, "ab" * 32)
    assert record.to_json() == {"size": 12, "mtime_ns": 1_700_000_000_123_456_789, "sha256": "ab" * 32}
    assert FileId.from_json(record.to_json()) == record
    assert FileId.from_json({"size": "12", "mtime_ns": "7", "sha256": "x"}) == FileId(12, 7, "x")
    for broken in (None, {}, {"size": 1, "mtime_ns": 2}, {"size": "a", "mtime_ns": 2, "sha256": "x"}, [1, 2, 3]):
        assert FileId.from_json(broken) is None


def test_identify_is_stat_and_sha256(tmp_path):
    data = os.urandom(3000)
    path = _write(tmp_path / "a.bin", data)
    stat = os.stat(path)
    assert digest_bytes(data) == hashlib.sha256(data).hexdigest()
    assert identify(path) == FileId(len(data), stat.st_mtime_ns, hashlib.sha256(data).hexdigest())
    assert identify(tmp_path / "missing.bin") is None


def test_identify_reads_again_while_the_file_changes(tmp_path, monkeypatch):
    """A file whose size/mtime differ before and after hashing is hashed again; one that never settles
    within ``attempts`` reads gets no identity (None), never a stale one."""
    path = _write(tmp_path / "a.bin", b"12345")
    real_fstat = os.fstat
    calls = {"n": 0}

    def fstat(fd, unstable_reads: int):
        calls["n"] += 1
        result = real_fstat(fd)
        # the first `unstable_reads` hashes see a different mtime after than before
        if calls["n"] <= 2 * unstable_reads and calls["n"] % 2 == 0:
            return SimpleNamespace(st_size=result.st_size, st_mtime_ns=result.st_mtime_ns + 1)
        return result

    monkeypatch.setattr(fileid.os, "fstat", lambda fd: fstat(fd, unstable_reads=2))
    assert identify(path) == FileId(5, os.stat(path).st_mtime_ns, hashlib.sha256(b"12345").hexdigest())
    assert calls["n"] == 6  # three reads, two before/after pairs rejected
    calls["n"] = 0
    monkeypatch.setattr(fileid.os, "fstat", lambda fd: fstat(fd, unstable_reads=3))
    assert identify(path) is None
    calls["n"] = 0
    assert identify(path, attempts=4) is not None


def test_unchanged_rules(tmp_path):
    path = _write(tmp_path / "a.bin", b"hello world")
    recorded = identify(path)
    where = os.path.abspath(path)
    assert unchanged(path, recorded) and unchanged(path, recorded, where)
    assert not unchanged(tmp_path / "missing.bin", recorded)

    # same size and mtime at the same place: trusted without reading, even if the bytes differ
    _write(path, b"HELLO WORLD")
    os.utime(path, ns=(recorded.mtime_ns, recorded.mtime_ns))
    assert unchanged(path, recorded, where)
    # ... but not at another place (a moved file is hashed), nor with a different mtime
    assert not unchanged(path, recorded, where + ".elsewhere")
    os.utime(path, ns=(recorded.mtime_ns + 10**9, recorded.mtime_ns + 10**9))
    assert not unchanged(path, recorded, where)

    # touched (new mtime) or moved but the same bytes: the hash says unchanged
    _write(path, b"hello world")
    os.utime(path, ns=(recorded.mtime_ns + 10**9, recorded.mtime_ns + 10**9))
    assert unchanged(path, recorded, where)
    moved = tmp_path / "b.bin"
    os.replace(path, moved)
    assert unchanged(moved, recorded, where)

    # a different size is a change without reading: a recorded hash that matches does not help
    _write(moved, b"hello world!")
    assert not unchanged(moved, FileId(11, recorded.mtime_ns, hashlib.sha256(b"hello world!").hexdigest()))


def test_unchanged_does_not_read_on_the_cheap_paths(tmp_path, monkeypatch):
    path = _write(tmp_path / "a.bin", b"abc")
    recorded = identify(path)

    def no_read(*args, **kwargs):
        raise AssertionError("hashed the file")

    monkeypatch.setattr(fileid, "identify", no_read)
    assert unchanged(path, recorded, os.path.abspath(path))
    assert unchanged(path, recorded)
    assert not unchanged(path, FileId(4, recorded.mtime_ns, recorded.sha256))
    with pytest.raises(AssertionError, match="hashed"):
        unchanged(path, FileId(3, recorded.mtime_ns + 1, recorded.sha256))
