"""The server's own temporary folder: every file a request reads or writes lies inside it.

Layout of the folder (created by :class:`Workspace`, removed on exit):

- ``uploads/``: gradio's upload cache (``GRADIO_TEMP_DIR``), where the browser's files land;
- ``requests/<id>/``: one folder per refinement, holding copies of its inputs under their uploaded
  names and its outputs in ``out/`` (the files the page offers for download).

A request names its inputs by paths gradio gives it; :meth:`Workspace.inside` refuses any path that does
not resolve (symbolic links followed) into the folder, so no request makes the server read elsewhere.
Error messages name inputs relative to the request folder (``mask.png``, not ``/tmp/.../mask.png``):
exactly what ``g4seg refine mask.png ...`` run in that folder prints.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from g4seg.errors import G4SegError

DEFAULT_MAX_UPLOAD_MB = 20  # an image of a few tens of megapixels as PNG; the CLI reads anything


class Workspace:
    """A fresh temporary folder for one server; :meth:`close` deletes it."""

    def __init__(self, parent: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="g4seg-serve-", dir=parent)).resolve()
        self.uploads = self.root / "uploads"
        self.requests = self.root / "requests"
        self.uploads.mkdir()
        self.requests.mkdir()

    def inside(self, path: str | Path) -> Path:
        """``path`` resolved, when it lies inside this folder; else a G4SegError (nothing is read)."""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root):
            raise G4SegError(f"refused to read {Path(path).name}: not a file uploaded to this page")
        return resolved

    def new_request(self) -> Path:
        """An empty folder of its own for one request."""
        folder = self.requests / uuid.uuid4().hex[:12]
        folder.mkdir()
        return folder

    def take(self, upload: str | Path, folder: Path, name: str | None = None) -> Path:
        """Copy an uploaded file into a request's folder under its uploaded (or the given) name."""
        source = self.inside(upload)
        target = folder / Path(name or source.name).name
        if target.exists():  # e.g. an image and a mask both uploaded as "scene.png"
            target = folder / uuid.uuid4().hex[:6] / target.name
            target.parent.mkdir()
        shutil.copyfile(source, target)
        return target

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def relative_message(message: str, folder: Path) -> str:
    """``message`` with ``folder``'s absolute path taken out: the inputs' names as the request saw them."""
    return message.replace(f"{folder}/", "")

