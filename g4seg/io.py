"""Reading images and writing outputs; every output is written to a temporary file and renamed."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from g4seg.errors import G4SegError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 entries, flat RGB): label i's colour from its bits."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); a missing or unreadable file is a one-line G4SegError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except FileNotFoundError:
        raise G4SegError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise G4SegError(f"cannot read image {path}: {exc}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def label_png_bytes(labels: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def save_label_png(path: Path, labels: np.ndarray) -> None:
    """Palette PNG with the VOC colours (0 background, i = i-th class, 255 ignore)."""
    atomic_write_bytes(path, label_png_bytes(labels))


def save_probs_npz(path: Path, probs: np.ndarray, classes: list[str], background: np.ndarray | None = None) -> None:
    """``probs`` as float16 (K, H, W) plus the class names, and the background channel when there is one
    (so the file reads back as the same K+1 stack), compressed."""
    buffer = io.BytesIO()
    extra = {} if background is None else {"background": background.astype(np.float16)}
    np.savez_compressed(buffer, probs=probs.astype(np.float16), classes=np.array(classes), **extra)
    atomic_write_bytes(path, buffer.getvalue())


def save_rgb_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The label colours blended over the image (background and ignore left untouched)."""
    colours = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)[labels]
    keep = (labels == 0) | (labels == 255)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.where(keep[..., None], image, blended.round()).astype(np.uint8)
