"""Mask source ``file``: coarse masks read from PNG label maps / binary masks or NPY/NPZ probabilities.

- PNG (or any image PIL reads): a palette image is read as indices, a grey one as values. As a
  label map, value i is the i-th class of the class list, 0 background, 255 ignore. A grey mask
  holding only 0 and 255 for a single class is a binary mask (255 = the class); 0/1 reads the same
  either way. ``mode`` forces one reading. With ``encoding`` (a dataset's: ``g4seg refine --dataset``
  and ``g4seg ablate`` pass it, see ``takes_encoding``) a label map holds that dataset's values instead
  (e.g. train ids): a value the dataset never writes is refused, the others are decoded to g4seg's labels.
- ``.npy``: a (K, H, W) stack of probabilities in [0, 1] aligned with the class list, or (H, W) for
  one class. ``.npz``: the same under the key ``probs``; when it also stores ``classes`` (as g4seg
  writes its outputs), the maps are picked and reordered to match the requested class list.
- A background channel (a K+1 stack, as SCLIP or CLIP-ES with a background score produce) is
  recognised in three ways: an npz entry ``background`` (H, W) beside ``probs``; an npz whose
  ``classes`` start with ``background`` (its first map); or, without names, K+1 maps for K classes
  (the first map is the background). Any other count is an error.

Masks are in the image's displayed orientation: images are read with their EXIF orientation applied
(:func:`g4seg.io.load_image`), and so are mask images. A mask of the image's size transposed (a
rotated mask, or one made for the stored pixels of an image whose EXIF rotates it) is refused with a
hint saying so, also with ``resize``, which never rotates: it refuses a mask whose aspect ratio is
the transposed image's and not the image's, instead of stretching it.

Every problem is one G4SegError line naming the file. :meth:`FileMaskSource.check` runs the same
checks without keeping the result (``g4seg refine`` checks every mask before it loads a model).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from g4seg.checks import CHEAP_CHECK_TAG  # building is cheap and check() needs no model
from g4seg.components import CoarseMask
from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.masks import IGNORE_LABEL, one_hot
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    from g4seg.datasets import LabelEncoding

ARRAY_SUFFIXES = (".npy", ".npz")
BACKGROUND = "background"


class FileMaskOptions(Options):
    """How to read image masks, and whether masks of another size may be resized to the image."""

    mode: Literal["auto", "labels", "binary"] = "auto"
    resize: bool = False


def _size(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


class FileMaskSource:
    """Reads one mask file per image; see the module docstring for the formats."""

    takes_encoding = True  # label maps may be in a dataset's own encoding (g4seg.runner.encoding_keywords)

    def __init__(self, options: FileMaskOptions) -> None:
        self.options = options

    def load(self, image_path: Path, mask_path: Path | None, classes: Sequence[str],
             image_hw: tuple[int, int], encoding: LabelEncoding | None = None) -> CoarseMask:
        classes = list(classes)
        if mask_path is None:
            raise G4SegError(f"mask source 'file' needs a mask file for image {image_path}")
        mask_path = Path(mask_path)
        if not classes:
            raise G4SegError(f"mask {mask_path}: the class list is empty (give at least one class name)")
        if not mask_path.is_file():
            from g4seg.io import dangling_link

            broken = dangling_link(mask_path)
            if broken:
                raise G4SegError(f"mask {broken}")
            if mask_path.is_dir():
                raise G4SegError(f"mask {mask_path} is a folder, not a file")
            raise G4SegError(f"mask file not found: {mask_path}")
        soft = mask_path.suffix.lower() in ARRAY_SUFFIXES
        background = None
        if soft:
            probs, background, ignore = *_read_array(mask_path, classes), None
        else:
            probs, ignore = self._read_image(mask_path, classes, encoding)
        if background is not None:
            probs = np.concatenate([background[None], probs])
        probs, ignore = self._fit(mask_path, probs, ignore, tuple(image_hw), soft, image_path)
        if background is not None:
            background, probs = probs[0], probs[1:]
        return CoarseMask(np.ascontiguousarray(probs, dtype=np.float32), ignore,
                          None if background is None else np.ascontiguousarray(background, dtype=np.float32))

    def check(self, image_path: Path, mask_path: Path | None, classes: Sequence[str],
              image_hw: tuple[int, int], encoding: LabelEncoding | None = None) -> None:
        """Raise the G4SegError :meth:`load` would raise (file, format, values, class count, size)."""
        self.load(image_path, mask_path, classes, image_hw, encoding)

    def _read_image(self, path: Path, classes: list[str],
                    encoding: LabelEncoding | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        values, palette = _image_values(path)
        if encoding is not None:
            values = _decode(path, values, encoding, len(classes))
        present = set(np.unique(values).tolist())
        binary = self.options.mode == "binary" or (
            self.options.mode == "auto" and len(classes) == 1 and not palette and present <= {0, 255})
        if binary:
            if len(classes) != 1:
                raise G4SegError(f"mask {path} is a binary mask (one class) but {len(classes)} classes were given")
            if not (present <= {0, 255} or present <= {0, 1}):
                raise G4SegError(f"binary mask {path} has values {_list(sorted(present))}; expected only 0/255 or 0/1")
            return (values > 0)[None].astype(np.float32), None
        return _labels_to_probs(path, values, classes)

    def _fit(self, path: Path, probs: np.ndarray, ignore: np.ndarray | None, image_hw: tuple[int, int],
             soft: bool, image_path: Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Check the size; with ``resize``, bilinear for probability arrays, nearest for label images."""
        mask_hw = tuple(probs.shape[1:])
        if mask_hw == image_hw:
            return probs, ignore
        rotated = image_hw[::-1]
        if mask_hw == rotated or (_aspect_like(mask_hw, rotated) and not _aspect_like(mask_hw, image_hw)):
            raise G4SegError(_rotated_message(path, mask_hw, image_path, image_hw, self.options.resize))
        if not self.options.resize:
            hint = ("or set -o mask_source.resize=true to resample it" if _aspect_like(mask_hw, image_hw) else
                    "(-o mask_source.resize=true would stretch this one: its aspect ratio differs)")
            raise G4SegError(f"mask {path} is {_size(mask_hw)} (HxW) but the image is {_size(image_hw)}; "
                             f"give a mask of the image's size {hint}")
        from scipy.ndimage import zoom

        factors = (1, image_hw[0] / mask_hw[0], image_hw[1] / mask_hw[1])
        resized = zoom(probs, factors, order=1 if soft else 0, mode="nearest", grid_mode=True)
        if ignore is not None:
            ignore = zoom(ignore.astype(np.uint8), factors[1:], order=0, mode="nearest", grid_mode=True) > 0
        return np.clip(resized, 0.0, 1.0), ignore


def _aspect_like(hw: tuple[int, int], reference: tuple[int, int]) -> bool:
    """Whether ``hw`` is ``reference`` scaled, up to rounding each side to whole pixels.

    Scaling by s and rounding gives h' = s h + e1, w' = s w + e2 with |e| <= 1/2, so
    |h' w - w' h| <= (h + w) / 2 (and the same with the roles swapped).
    """
    (h, w), (rh, rw) = hw, reference
    return abs(h * rw - w * rh) <= max(h + w, rh + rw) / 2


def _rotated_message(path: Path, mask_hw: tuple[int, int], image_path: Path | None, image_hw: tuple[int, int],
                     resize: bool) -> str:
    """Why a mask with the transposed image's shape (or aspect) is refused, and what to do about it."""
    exact = mask_hw == image_hw[::-1]
    shape = "the image's size transposed" if exact else "the aspect ratio of the image transposed"
    header = None
    if image_path is not None:
        from g4seg.io import read_image_header

        try:
            header = read_image_header(Path(image_path))
        except G4SegError:
            header = None
    stretch = "; -o mask_source.resize=true does not rotate masks" if resize else ""
    if header is not None and header.transposed and header.hw == image_hw:
        return (f"mask {path} is {_size(mask_hw)} (HxW) but the image is {_size(image_hw)}: the mask fits "
                f"{image_path} as stored, but that image has EXIF orientation {header.orientation} and is read "
                f"as viewers show it (rotated, {_size(image_hw)}); rotate the mask the same way, or remove the "
                f"image's orientation tag{stretch}")
    return (f"mask {path} is {_size(mask_hw)} (HxW) but the image is {_size(image_hw)}: {shape}, so the mask "
            f"looks rotated by 90 degrees; rotate it to match the image as displayed{stretch}")


def _list(values: Sequence[object], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


def _image_values(path: Path) -> tuple[np.ndarray, bool]:
    """(H, W) integer values (palette indices, grey levels, or one channel of a grey RGB image), palette?"""
    from PIL import Image, ImageOps

    from g4seg.io import open_error, read_errors

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # as viewers show it, like the image it belongs to
            mode = img.mode
            array = np.asarray(img)
    except read_errors() as exc:
        raise open_error(path, "mask", exc) from None
    if mode in ("P", "PA", "LA"):
        array = array[..., 0] if array.ndim == 3 else array
    elif mode in ("RGB", "RGBA"):
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise G4SegError(f"mask {path} is a colour image; save label maps as palette or grey PNGs")
        array = array[..., 0]
    elif mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L"):
        raise G4SegError(f"mask {path} has unsupported image mode {mode}; use a palette or grey PNG")
    return array.astype(np.int64), mode in ("P", "PA")


def _decode(path: Path, values: np.ndarray, encoding: LabelEncoding, k: int) -> np.ndarray:
    """A label map in a dataset's encoding -> g4seg labels; a value the encoding never writes is an error."""
    written = np.unique(encoding.encode_labels(np.array([*range(k + 1), IGNORE_LABEL], dtype=np.uint8)))
    outside = np.setdiff1d(np.unique(values), written)
    if outside.size:
        raise G4SegError(f"mask {path} has values {_list(outside.tolist())} that this dataset's label maps never "
                         f"hold (K={k}: they hold {_runs(written.tolist())})")
    return encoding.decode_labels(values).astype(np.int64)


def _runs(values: Sequence[int]) -> str:
    """Sorted integers as runs: [0, 1, ..., 18, 255] -> '0..18, 255'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)


def _labels_to_probs(path: Path, labels: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    k = len(classes)
    present = np.unique(labels)
    outside = [int(v) for v in present if not (0 <= v <= k or v == IGNORE_LABEL)]
    if outside:
        raise G4SegError(f"mask {path} has values {_list(outside)} outside the class list (K={k}: 0 = background, "
                         f"1..{k} = classes, {IGNORE_LABEL} = ignore)")
    probs = one_hot(labels, k)
    ignore = labels == IGNORE_LABEL
    return probs, ignore if ignore.any() else None


def _read_array(path: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(K, H, W) class maps aligned with ``classes`` and the (H, W) background channel, if any."""
    probs, stored, background = _load_array(path)
    probs = _as_maps(path, probs, "probabilities")
    if background is not None:
        if background.ndim != 2:
            raise G4SegError(f"mask {path}: the background entry has shape {background.shape}; expected (H, W)")
        background = _as_maps(path, background, "background")[0]
    if stored is not None and stored and stored[0].lower() == BACKGROUND and background is None:
        if len(stored) != probs.shape[0]:
            raise G4SegError(f"mask {path} has {probs.shape[0]} probability maps but names {len(stored)} classes")
        background, probs, stored = probs[0], probs[1:], stored[1:]
    if stored is not None:
        probs = _realign(path, probs, stored, classes)
    elif probs.shape[0] == len(classes) + 1 and background is None:
        background, probs = probs[0], probs[1:]
    elif probs.shape[0] != len(classes):
        raise G4SegError(f"mask {path} has {probs.shape[0]} probability maps but {len(classes)} classes were given "
                         f"({_list(classes)}); expected {len(classes)} (one per class) or {len(classes) + 1} "
                         f"(background first)")
    if background is not None and background.shape != probs.shape[1:]:
        raise G4SegError(f"mask {path}: the background map is {_size(background.shape)} but the class maps are "
                         f"{_size(probs.shape[1:])}")
    for name, values in (("probabilities", probs), ("background", background)):
        if values is None:
            continue
        if not np.isfinite(values).all():
            raise G4SegError(f"mask {path} has non-finite {name} (NaN or inf)")
        if values.min() < 0 or values.max() > 1:
            raise G4SegError(f"mask {path} has {name} in [{values.min():g}, {values.max():g}]; expected [0, 1]")
    return probs, background


def _as_maps(path: Path, values: np.ndarray, what: str) -> np.ndarray:
    """A numeric array as float32 (N, H, W); (H, W) is one map."""
    if values.dtype.kind not in "biuf":
        raise G4SegError(f"mask {path} holds {values.dtype} values; expected probabilities in [0, 1]")
    values = values.astype(np.float32)
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3:
        raise G4SegError(f"mask {path} has shape {values.shape}; expected (K, H, W) or (H, W)")
    return values


def _load_array(path: Path) -> tuple[np.ndarray, list[str] | None, np.ndarray | None]:
    """The probability array, the class names an npz stores, and its background entry (no pickles)."""
    import zipfile

    suffix = path.suffix.lower()
    magic = b"\x93NUMPY" if suffix == ".npy" else b"PK"
    with open(path, "rb") as handle:
        if handle.read(len(magic)) != magic:
            raise G4SegError(f"cannot read mask {path}: not a {suffix} file")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None, None
        with np.load(path, allow_pickle=False) as archive:
            if "probs" not in archive.files:
                raise G4SegError(f"mask {path} has no 'probs' array (it holds: {_list(archive.files) or 'nothing'})")
            stored = [str(c) for c in archive["classes"].tolist()] if "classes" in archive.files else None
            background = archive[BACKGROUND] if BACKGROUND in archive.files else None
            return archive["probs"], stored, background
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise G4SegError(f"cannot read mask {path}: {exc}".splitlines()[0]) from None


def _realign(path: Path, probs: np.ndarray, stored: list[str], classes: list[str]) -> np.ndarray:
    """Pick and reorder the stored maps so that map k belongs to ``classes[k]``."""
    if len(stored) != probs.shape[0]:
        raise G4SegError(f"mask {path} has {probs.shape[0]} probability maps but names {len(stored)} classes")
    missing = [c for c in classes if c not in stored]
    if missing:
        raise G4SegError(f"mask {path} has no probabilities for {_list(missing)} (it holds: {_list(stored)})")
    return probs[[stored.index(c) for c in classes]]


def _build(options: FileMaskOptions, runtime: Runtime) -> FileMaskSource:
    return FileMaskSource(options)


@hookimpl
def register_mask_sources(register):
    register(ComponentSpec(kind="mask_source", name="file", aliases=("files",), factory=_build,
                           options=FileMaskOptions, tags=frozenset({CHEAP_CHECK_TAG}),
                           description="coarse masks from PNG/NPY/NPZ files"))
