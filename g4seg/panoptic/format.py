"""The COCO panoptic format (Kirillov et al.; cocodataset/panopticapi): a JSON file and a folder of PNGs.

Each image is an RGB PNG whose pixel colour is a segment id, ``id = R + 256 G + 256^2 B``
(panopticapi/utils.py ``rgb2id``); id 0 is VOID (no segment). The JSON's ``annotations`` hold, per
image, ``image_id``, ``file_name`` (the PNG in the folder) and ``segments_info``: one entry per
segment with its ``id``, ``category_id`` and, in ground truth, ``iscrowd`` (0 when absent); ``area``
and ``bbox`` are recomputed from the PNG wherever g4seg needs or writes them. ``categories`` (in the
ground truth, or a categories file) give each category id its ``name`` and ``isthing``.

Every inconsistency is one :class:`G4SegError` line naming the file and the image: a PNG id missing
from the JSON, a JSON segment missing from the PNG, an unknown category, duplicate segment, image or
category ids, a PNG that is not RGB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g4seg.errors import G4SegError

VOID = 0
MAX_ID = 256 ** 3 - 1  # what three 8-bit channels hold


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) int64 segment ids, ``R + 256 G + 256^2 B``."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 colours (the inverse of :func:`rgb2id`)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256) % 256], axis=-1).astype(np.uint8)


def read_json(path: Path, what: str) -> Any:
    """A JSON file, any problem one line naming ``what`` (e.g. ``--pred-json``)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise G4SegError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise G4SegError(f"{what} {path} is a folder, not a JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise G4SegError(f"{what} {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise G4SegError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise G4SegError(f"{where} must be an integer, got {value!r}")
    return value


def categories_of(data: Any, where: str) -> dict[int, dict[str, Any]]:
    """Category id -> its entry, from a panoptic JSON (its ``categories``) or a bare list of categories."""
    entries = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise G4SegError(f"{where} has no categories (a 'categories' list of {{id, name, isthing}})")
    categories: dict[int, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or "id" not in entry:
            raise G4SegError(f"{where}: every category needs an 'id', got {entry!r}")
        cat = _int(entry["id"], f"{where}: category id")
        if cat in categories:
            raise G4SegError(f"{where}: category id {cat} is given twice")
        if not str(entry.get("name", "")).strip():
            raise G4SegError(f"{where}: category {cat} has no name")
        categories[cat] = entry
    return categories


@dataclass(frozen=True)
class Annotation:
    """One image of a panoptic JSON: its id, PNG file name and segments (id -> the JSON entry)."""

    image_id: Any
    file_name: str
    segments: dict[int, dict[str, Any]]
    raw: dict[str, Any]  # the JSON entry as read (extra keys are kept when written back)


def annotations_of(data: Any, where: str) -> dict[Any, Annotation]:
    """image_id -> :class:`Annotation`, in file order; duplicate image or segment ids are an error."""
    entries = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise G4SegError(f"{where} has no 'annotations' list (COCO panoptic format)")
    found: dict[Any, Annotation] = {}
    for entry in entries:
        if not isinstance(entry, dict) or "image_id" not in entry or "file_name" not in entry:
            raise G4SegError(f"{where}: every annotation needs 'image_id', 'file_name' and 'segments_info'")
        image_id = entry["image_id"]
        if image_id in found:
            raise G4SegError(f"{where}: image_id {image_id!r} has two annotations")
        segments: dict[int, dict[str, Any]] = {}
        for segment in entry.get("segments_info", []):
            if not isinstance(segment, dict) or "id" not in segment or "category_id" not in segment:
                raise G4SegError(f"{where}, image {image_id!r}: every segment needs 'id' and 'category_id'")
            sid = _int(segment["id"], f"{where}, image {image_id!r}: segment id")
            _int(segment["category_id"], f"{where}, image {image_id!r}: category_id of segment {sid}")
            if not 0 < sid <= MAX_ID:
                raise G4SegError(f"{where}, image {image_id!r}: segment id {sid} is outside 1..{MAX_ID} "
                                 f"(0 is VOID)")
            if sid in segments:
                raise G4SegError(f"{where}, image {image_id!r}: segment id {sid} is given twice")
            segments[sid] = segment
        found[image_id] = Annotation(image_id, str(entry["file_name"]), segments, entry)
    return found


def read_ids(folder: Path, annotation: Annotation, what: str) -> np.ndarray:
    """The (H, W) segment ids of an annotation's PNG in ``folder`` (RGB or RGBA; alpha is ignored)."""
    from g4seg.io import open_error, read_errors
    from PIL import Image

    path = Path(folder) / annotation.file_name
    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA"):
                raise G4SegError(f"{what} {path} is a {img.mode} image; panoptic PNGs are RGB "
                                 f"(id = R + 256 G + 256^2 B)")
            rgb = np.asarray(img.convert("RGB"))
    except read_errors() as exc:
        raise open_error(path, what, exc) from None
    return rgb2id(rgb)


def check_ids(ids: np.ndarray, annotation: Annotation, categories: dict[int, dict[str, Any]],
              where: str) -> dict[int, int]:
    """Segment id -> area in the PNG, after checking that the PNG and the JSON hold the same segments (VOID
    aside) and that every category is known (panopticapi's checks in ``pq_compute_single_core``)."""
    values, counts = np.unique(ids, return_counts=True)
    areas = {int(v): int(c) for v, c in zip(values, counts) if v != VOID}
    extra = sorted(set(areas) - set(annotation.segments))
    if extra:
        raise G4SegError(f"{where}: segment id(s) {_few(extra)} are in the PNG {annotation.file_name} but not in "
                         f"the JSON's segments_info")
    missing = sorted(set(annotation.segments) - set(areas))
    if missing:
        raise G4SegError(f"{where}: segment id(s) {_few(missing)} are in the JSON's segments_info but not in the "
                         f"PNG {annotation.file_name}")
    for sid, segment in annotation.segments.items():
        if segment["category_id"] not in categories:
            raise G4SegError(f"{where}: segment {sid} has unknown category_id {segment['category_id']}")
    return areas


def _few(values: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


def segment_box(mask: np.ndarray) -> list[int]:
    """COCO's ``[x, y, width, height]`` of a non-empty (H, W) bool mask, as panopticapi's converters compute
    it (inclusive pixel extent)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
