"""One run per output folder (and rank) at a time, with ``flock`` locks the OS releases when a process dies.

A single-process run holds ``OUT/.g4seg.lock`` exclusively. Each rank of a sharded run (``WORLD_SIZE`` > 1)
holds that file shared, so the ranks of a launch run side by side, plus ``OUT/.g4seg.rank<R>.lock``
exclusively, so two launches never run the same rank together and no single-process run overlaps a
sharded one. Attempts never wait: a folder in use is a one-line :class:`G4SegError` naming the holder
(pid, host, start time), which the holder writes into the file it holds exclusively.

A lock file is removed by the process that releases it (only when no one else holds it); a killed
process leaves its file behind, unlocked, and the next run simply takes it. Taking a lock checks that
the file it locked is still the one at the path, so removing a released file never lets two runs in.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from g4seg.errors import G4SegError
from g4seg.sharding import Shard

FOLDER_LOCK = ".g4seg.lock"
RANK_LOCK_GLOB = ".g4seg.rank*.lock"


def rank_lock_name(rank: int) -> str:
    return f".g4seg.rank{rank}.lock"


def is_lock_name(name: str) -> bool:
    """Whether ``name`` is one of the lock files of a run folder (any rank)."""
    return name == FOLDER_LOCK or (name.startswith(".g4seg.rank") and name.endswith(".lock"))


class FolderBusy(G4SegError):
    """Another g4seg run holds the output folder (or this rank of it)."""


def _holder_record(shard: Shard) -> bytes:
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                        "rank": shard.rank, "world_size": shard.world_size}) + "\n").encode()


def _read_holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and "pid" in data else None
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """False only for a pid of this host that no longer exists (a killed holder's leftover record)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):
        return True
    return True


def describe(holder: dict | None) -> str:
    """``pid 4242 on gpu01, started 2025-05-01 10:22:03`` (plus the rank for a sharded holder)."""
    if holder is None:
        return "holder not known yet: it has just started"
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
    except (KeyError, TypeError, ValueError, OverflowError):
        started = "?"
    text = f"pid {holder.get('pid')} on {holder.get('host', '?')}, started {started}"
    if int(holder.get("world_size") or 1) > 1:
        text = f"rank {holder.get('rank')} of {holder.get('world_size')}: {text}"
    return text


class RunLock:
    """The locks of one process of a run into ``out_dir``; use as a context manager.

    Raises :class:`FolderBusy` when another run holds them, and a :class:`G4SegError` when the folder
    does not allow creating the lock file (e.g. it is read-only) or does not support locks.
    """

    def __init__(self, out_dir: Path, shard: Shard) -> None:
        self.out_dir = Path(out_dir)
        self.shard = shard
        self._held: list[tuple[Path, int, bool]] = []  # (path, fd, exclusive)

    def acquire(self) -> "RunLock":
        try:
            if self.shard.world_size == 1:
                self._take(self.out_dir / FOLDER_LOCK, exclusive=True)
            else:
                self._take(self.out_dir / FOLDER_LOCK, exclusive=False)
                self._take(self.out_dir / rank_lock_name(self.shard.rank), exclusive=True)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, path: Path, exclusive: bool) -> None:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise G4SegError(f"cannot lock output folder {self.out_dir}: cannot create {path.name} "
                                 f"({exc.strerror})") from None
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(path, exclusive) from None
            except OSError as exc:
                os.close(fd)
                raise G4SegError(f"cannot lock output folder {self.out_dir}: {exc.strerror} "
                                 "(its file system does not support flock)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by its previous holder after we opened it: take the new one
        self._held.append((path, fd, exclusive))
        os.ftruncate(fd, 0)  # holder details: written by the exclusive holder, cleared by shared ones
        if exclusive:
            os.pwrite(fd, _holder_record(self.shard), 0)

    def _busy(self, path: Path, exclusive: bool) -> FolderBusy:
        if path.name == FOLDER_LOCK and exclusive:
            holder = _read_holder(path)
            if holder is None or not _alive(holder):  # held shared: the ranks of a sharded run
                ranks = [h for p in sorted(self.out_dir.glob(RANK_LOCK_GLOB))
                         if (h := _read_holder(p)) is not None and _alive(h)]
                who = "; ".join(describe(h) for h in ranks) if ranks else "a sharded run"
                return FolderBusy(f"output folder {self.out_dir} is in use by another g4seg run ({who}); "
                                  "wait for it to end, or choose another output folder")
            return FolderBusy(f"output folder {self.out_dir} is in use by another g4seg run ({describe(holder)}); "
                              "wait for it to end, or choose another output folder")
        holder = _read_holder(path)
        if path.name == FOLDER_LOCK:
            return FolderBusy(f"output folder {self.out_dir} is in use by another g4seg run ({describe(holder)}), "
                              f"so rank {self.shard.rank} cannot start; wait for it to end, or choose another "
                              "output folder")
        return FolderBusy(f"rank {self.shard.rank} of output folder {self.out_dir} is in use by another g4seg run "
                          f"({describe(holder)}); wait for it to end, or choose another output folder")

    def release(self) -> None:
        """Remove the lock files no one else holds, then unlock (closing the file is what unlocks)."""
        while self._held:
            path, fd, exclusive = self._held.pop()
            try:
                if not exclusive:  # the other ranks may still hold it: only its last holder removes it
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        exclusive = True
                    except OSError:
                        pass
                if exclusive:
                    path.unlink(missing_ok=True)
            except OSError:
                pass  # an unremovable lock file is harmless: it is unlocked once closed
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
