"""What a file is, for resume decisions: its size, modification time and content hash.

The manifest records a :class:`FileId` for each input (image, mask) and each output of a finished image.
A rerun trusts a recorded hash without reading the file only when the file sits at the same path with
the same size and ``mtime_ns``; otherwise it hashes the file (streaming SHA-256) and compares contents,
so a touched or moved but unchanged file still counts as the same, and an edited one does not.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALGORITHM = "sha256"


@dataclass(frozen=True)
class FileId:
    """Size in bytes, ``st_mtime_ns``, and the SHA-256 hex digest of the content."""

    size: int
    mtime_ns: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any) -> "FileId | None":
        """None for anything that is not a complete record (an older manifest, a hand-edited line)."""
        try:
            return cls(int(data["size"]), int(data["mtime_ns"]), str(data["sha256"]))
        except (KeyError, TypeError, ValueError):
            return None


def digest_bytes(data: bytes) -> str:
    return hashlib.new(ALGORITHM, data).hexdigest()


def identify(path: Path, attempts: int = 3) -> FileId | None:
    """The FileId of ``path`` (symlinks followed); None when it cannot be read.

    Size and mtime are taken from the open file before and after hashing; a file that changes while it
    is being read is read again, so the recorded size and mtime always belong to the hashed content.
    """
    try:
        with open(path, "rb") as handle:
            for _ in range(attempts):
                before = os.fstat(handle.fileno())
                handle.seek(0)
                digest = hashlib.file_digest(handle, ALGORITHM).hexdigest()
                after = os.fstat(handle.fileno())
                if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
                    return FileId(after.st_size, after.st_mtime_ns, digest)
    except OSError:
        return None
    return None  # kept changing: never record an identity that may not match the content


def unchanged(path: Path, recorded: FileId, recorded_path: str | None = None) -> bool:
    """Whether ``path`` still holds the content ``recorded`` describes.

    Cheap path: the same path (``recorded_path``, when given) with the same size and ``mtime_ns`` is
    trusted without reading it. A different size is a change without reading it. Otherwise the
    content is hashed and compared.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return False
    if stat.st_size != recorded.size:
        return False
    same_place = recorded_path is None or os.path.abspath(path) == recorded_path
    if same_place and stat.st_mtime_ns == recorded.mtime_ns:
        return True
    current = identify(path)
    return current is not None and current.sha256 == recorded.sha256
