"""Reading images and writing outputs; every output is written to a temporary file and renamed."""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g4seg.errors import G4SegError
from g4seg.fileid import FileId, digest_bytes

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


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL modes read as 16-bit grey (see load_image)
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height for display


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding the pixels."""

    stored_hw: tuple[int, int]  # (H, W) as the pixels are stored
    orientation: int  # EXIF orientation, 1 = as stored; 5-8 swap height and width
    mode: str  # PIL mode
    format: str | None

    @property
    def hw(self) -> tuple[int, int]:
        """(H, W) as viewers show the image, i.e. of :func:`load_image`'s array."""
        return self.stored_hw[::-1] if self.transposed else self.stored_hw

    @property
    def transposed(self) -> bool:
        return self.orientation in TRANSPOSING_ORIENTATIONS


def dangling_link(path: Path) -> str | None:
    """``"<path> is a dangling symbolic link (to <target>)"`` when it is one, else None."""
    path = Path(path)
    try:
        if path.is_symlink() and not path.exists():
            return f"{path} is a dangling symbolic link (to {os.readlink(path)})"
    except OSError:
        return None
    return None


def open_error(path: Path, what: str, exc: BaseException) -> G4SegError:
    """One line for a file PIL could not open or decode."""
    if isinstance(exc, FileNotFoundError):
        return G4SegError(f"{what} {dangling_link(path)}" if dangling_link(path) else f"{what} not found: {path}")
    if isinstance(exc, IsADirectoryError):
        return G4SegError(f"{what} {path} is a folder, not a file")
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return G4SegError(f"cannot read {what} {path}: {text}")


def read_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError


def read_image_header(path: Path) -> ImageHeader:
    """Size, EXIF orientation and mode of an image without decoding it; problems are one G4SegError line.

    The orientation comes from the EXIF data in the header (JPEG APP1, TIFF tags, a PNG eXIf chunk
    before the pixel data): what :func:`load_image` applies, without its full decode.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            orientation = Image.Image.getexif(img).get(EXIF_ORIENTATION, 1)  # base class: never decodes
            return ImageHeader((img.height, img.width), int(orientation) if orientation in range(1, 9) else 1,
                               img.mode, img.format)
    except read_errors() as exc:
        raise open_error(Path(path), "image", exc) from None


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) as viewers show the image; a missing or unreadable file is a one-line G4SegError.

    - The EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): a photo stored sideways with
      orientation 6 or 8 comes back upright, its height and width swapped.
    - 16-bit images are scaled to 8 bits by their high byte (``value >> 8``), as PIL itself reads
      16-bit colour PNGs: grey 16-bit PNGs/TIFFs (PIL modes ``I;16*``) and 32-bit integer images
      (mode ``I``, taken as 16-bit; values outside 0..65535 are an error). Floating-point images
      (mode ``F``) are refused.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode == "F":
                raise G4SegError(f"image {path} has floating-point pixels (PIL mode F); "
                                 f"save it as an 8- or 16-bit image")
            if mode not in SIXTEEN_BIT_MODES:
                return np.array(img.convert("RGB"))
            values = np.asarray(img)
    except read_errors() as exc:
        raise open_error(path, "image", exc) from None
    if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise G4SegError(f"image {path} has 32-bit values in [{values.min()}, {values.max()}]; "
                         f"expected 8- or 16-bit pixels (0..65535)")
    grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _process_umask() -> int:
    """The umask, read without changing it where Linux shows it (``/proc/self/status``, thread-safe);
    elsewhere set and restored once, at import."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Mode of every file written here: what open() would give (0644 under umask 022). mkstemp makes 0600.
FILE_MODE = 0o666 & ~_process_umask()


def atomic_write_bytes(path: Path, data: bytes) -> FileId:
    """Write to a temporary file in the same folder, fsync, then rename: a reader never sees half a file.

    The file gets the umask's mode (:data:`FILE_MODE`, read once at import). Returns the written file's
    size, mtime and SHA-256, which the run manifest records to recognise the output later.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            stat = os.fstat(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return FileId(stat.st_size, stat.st_mtime_ns, digest_bytes(data))


def atomic_write_json(path: Path, data: object, *, allow_nan: bool = True) -> FileId:
    """``data`` as indented JSON with a final newline, written atomically (:func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=allow_nan) + "\n").encode())


def write_json_report(path: Path, data: object, what: str, *, allow_nan: bool = True) -> None:
    """A command's JSON report (``what``: its option, e.g. ``--json``); a failed write is one line naming it."""
    try:
        atomic_write_json(path, data, allow_nan=allow_nan)
    except OSError as exc:
        raise G4SegError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def label_png_bytes(labels: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def save_label_png(path: Path, labels: np.ndarray) -> FileId:
    """Palette PNG with the VOC colours (0 background, i = i-th class, 255 ignore)."""
    return atomic_write_bytes(path, label_png_bytes(labels))


def save_probs_npz(path: Path, probs: np.ndarray, classes: list[str],
                   background: np.ndarray | None = None) -> FileId:
    """``probs`` as float16 (K, H, W) plus the class names, and the background channel when there is one
    (so the file reads back as the same K+1 stack), compressed."""
    buffer = io.BytesIO()
    extra = {} if background is None else {"background": background.astype(np.float16)}
    np.savez_compressed(buffer, probs=probs.astype(np.float16), classes=np.array(classes), **extra)
    return atomic_write_bytes(path, buffer.getvalue())


def save_rgb_png(path: Path, image: np.ndarray) -> FileId:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The label colours blended over the image (background and ignore left untouched)."""
    colours = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)[labels]
    keep = (labels == 0) | (labels == 255)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.where(keep[..., None], image, blended.round()).astype(np.uint8)
