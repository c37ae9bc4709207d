"""Coarse masks made from exact label maps: the quality harness's controlled errors (issue 8).

Each perturbation is a seeded function of a label map (0 = background, k > 0 a class) that returns
another label map, so the error it makes is known exactly and the gain of refinement can be read per
kind of error. Seven kinds, each at two strengths (``<kind>-1`` mild, ``<kind>-2`` strong; pixels at
the toy scenes' 64 px):

==========  ================================================================  ======  ======
kind        what it does                                                      ``-1``  ``-2``
==========  ================================================================  ======  ======
dilate      background within r px (Euclidean) of an object takes the        r = 2   r = 4
            nearest object's class (objects never grow into each other)
erode       object pixels within r px of another label become background     r = 1   r = 2
            (the image border is not a boundary: cut-off objects stay cut)
shift       the whole map moves by d px in a seeded direction; what comes    d = 2   d = 4
            in is background
holes       discs of radius r at seeded object pixels become background      2 x r2  4 x r3
            (only the pixels of that object's class)
boundary    within w px of a boundary, each pixel with probability 1/2       w = 1   w = 2
            takes the label of a seeded pixel at most w px away
drop        the n smallest objects (8-connected components of one class)     n = 1   n = 2
            become background (deterministic; a one-object scene loses it)
blob        a disc of radius r of a class present in the scene (any class    r = 3   r = 6
            when none is) on background, away from every object if possible
==========  ================================================================  ======  ======

Every function works on multi-class maps and is a pure function of (labels, seed): the random
generator of a perturbation is ``default_rng([seed, crc32(name)])``, so two perturbations of one scene
draw independent numbers. Pure numpy/scipy.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from g4seg.errors import G4SegError

BACKGROUND = 0
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity

Apply = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _distance_with_nearest(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance of every pixel to the nearest pixel *outside* ``mask`` (0 outside), and the
    (2, H, W) indices of that pixel."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(mask, return_indices=True)


def _disc(shape: tuple[int, int], cy: int, cx: int, radius: float) -> np.ndarray:
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def dilate(labels: np.ndarray, radius: float) -> np.ndarray:
    """Background pixels within ``radius`` of an object take the class of the nearest object pixel."""
    background = labels == BACKGROUND
    if background.all():
        return labels.copy()
    distance, (iy, ix) = _distance_with_nearest(background)
    out = labels.copy()
    grow = background & (distance <= radius)
    out[grow] = labels[iy[grow], ix[grow]]
    return out


def erode(labels: np.ndarray, radius: float) -> np.ndarray:
    """Object pixels within ``radius`` of a pixel of another label become background."""
    from scipy.ndimage import distance_transform_edt

    out = labels.copy()
    for k in np.unique(labels):
        if k == BACKGROUND:
            continue
        inside = labels == k
        if inside.all():  # no other label anywhere: nothing to erode from (and the transform needs one)
            continue
        depth = distance_transform_edt(inside)  # to the nearest pixel of another label; the border is none
        out[inside & (depth <= radius)] = BACKGROUND
    return out


def shift(labels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The map moved by (dy, dx) pixels (down, right); pixels moved out are lost, background comes in."""
    height, width = labels.shape
    out = np.full_like(labels, BACKGROUND)
    if abs(dy) >= height or abs(dx) >= width:
        return out
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        labels[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


def random_shift(labels: np.ndarray, rng: np.random.Generator, distance: int) -> np.ndarray:
    """:func:`shift` by ``distance`` pixels in a seeded direction (rounded to whole pixels, never zero)."""
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = int(round(distance * np.sin(angle))), int(round(distance * np.cos(angle)))
    if dy == 0 and dx == 0:  # only for distance < 1
        dx = 1
    return shift(labels, dy, dx)


def holes(labels: np.ndarray, rng: np.random.Generator, count: int, radius: float) -> np.ndarray:
    """``count`` discs centred on seeded object pixels; the disc's pixels of the centre's class become
    background."""
    out = labels.copy()
    ys, xs = np.nonzero(labels != BACKGROUND)
    if ys.size == 0:
        return out
    for i in rng.choice(ys.size, size=min(count, ys.size), replace=False):
        cy, cx = int(ys[i]), int(xs[i])
        out[_disc(labels.shape, cy, cx, radius) & (labels == labels[cy, cx])] = BACKGROUND
    return out


def boundary_noise(labels: np.ndarray, rng: np.random.Generator, width: int, p: float = 0.5) -> np.ndarray:
    """Within ``width`` px (a square window) of a pixel of another label, each pixel with probability
    ``p`` takes the label of the pixel at a seeded offset in [-width, width]^2 (clamped to the image)."""
    from scipy.ndimage import maximum_filter, minimum_filter

    size = 2 * width + 1
    band = maximum_filter(labels, size=size, mode="nearest") != minimum_filter(labels, size=size, mode="nearest")
    height, w = labels.shape
    flip = band & (rng.uniform(size=labels.shape) < p)
    oy, ox = rng.integers(-width, width + 1, size=(2, *labels.shape))
    yy, xx = np.mgrid[:height, :w]
    source = labels[np.clip(yy + oy, 0, height - 1), np.clip(xx + ox, 0, w - 1)]
    return np.where(flip, source, labels).astype(labels.dtype)


def objects(labels: np.ndarray) -> list[np.ndarray]:
    """The objects of a map (8-connected components of one class), smallest first (ties: class, then
    scan order), as boolean masks."""
    from scipy.ndimage import label as connected

    found: list[tuple[int, int, int, np.ndarray]] = []
    for k in np.unique(labels):
        if k == BACKGROUND:
            continue
        components, count = connected(labels == k, structure=_EIGHT)
        for c in range(1, count + 1):
            mask = components == c
            found.append((int(mask.sum()), int(k), c, mask))
    found.sort(key=lambda item: item[:3])
    return [item[3] for item in found]


def drop_smallest(labels: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` smallest objects become background."""
    out = labels.copy()
    for mask in objects(labels)[:count]:
        out[mask] = BACKGROUND
    return out


def add_blob(labels: np.ndarray, rng: np.random.Generator, radius: float, num_classes: int) -> np.ndarray:
    """A false positive: a disc of ``radius`` px of a seeded class present in the map (one of
    1..``num_classes`` when none is), painted on background only, centred on a seeded background pixel
    more than ``radius + 1`` px from every object (the farthest ones when there is none)."""
    background = labels == BACKGROUND
    if not background.any():
        return labels.copy()
    present = [int(k) for k in np.unique(labels) if k != BACKGROUND]
    k = int(rng.choice(present)) if present else int(rng.integers(1, num_classes + 1))
    if background.all():
        free = background
    else:
        distance, _ = _distance_with_nearest(background)
        free = distance > radius + 1
        if not free.any():
            free = distance == distance.max()
    ys, xs = np.nonzero(free)
    i = int(rng.integers(ys.size))
    out = labels.copy()
    out[_disc(labels.shape, int(ys[i]), int(xs[i]), radius) & background] = k
    return out


@dataclass(frozen=True)
class Perturbation:
    """One named perturbation: ``apply(labels, rng)`` and what it does, in words."""

    name: str
    description: str
    apply: Apply


def _table(num_classes: int) -> list[Perturbation]:
    return [
        Perturbation("dilate-1", "objects grown by 2 px", lambda m, r: dilate(m, 2)),
        Perturbation("dilate-2", "objects grown by 4 px", lambda m, r: dilate(m, 4)),
        Perturbation("erode-1", "objects shrunk by 1 px", lambda m, r: erode(m, 1)),
        Perturbation("erode-2", "objects shrunk by 2 px", lambda m, r: erode(m, 2)),
        Perturbation("shift-1", "map moved 2 px", lambda m, r: random_shift(m, r, 2)),
        Perturbation("shift-2", "map moved 4 px", lambda m, r: random_shift(m, r, 4)),
        Perturbation("holes-1", "2 holes of radius 2 px", lambda m, r: holes(m, r, 2, 2)),
        Perturbation("holes-2", "4 holes of radius 3 px", lambda m, r: holes(m, r, 4, 3)),
        Perturbation("boundary-1", "boundary noise 1 px", lambda m, r: boundary_noise(m, r, 1)),
        Perturbation("boundary-2", "boundary noise 2 px", lambda m, r: boundary_noise(m, r, 2)),
        Perturbation("drop-1", "smallest object dropped", lambda m, r: drop_smallest(m, 1)),
        Perturbation("drop-2", "two smallest objects dropped", lambda m, r: drop_smallest(m, 2)),
        Perturbation("blob-1", "false-positive disc, radius 3 px", lambda m, r: add_blob(m, r, 3, num_classes)),
        Perturbation("blob-2", "false-positive disc, radius 6 px", lambda m, r: add_blob(m, r, 6, num_classes)),
    ]


def _default_classes() -> int:
    from g4seg.toy.scenes import CLASSES

    return len(CLASSES)


PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in _table(_default_classes())}
NAMES: tuple[str, ...] = tuple(PERTURBATIONS)


def perturbation_rng(name: str, seed: int) -> np.random.Generator:
    """The random numbers of perturbation ``name`` on the scene of ``seed``."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def perturb(labels: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Coarse label map ``name`` (e.g. ``dilate-1``) of ``labels``; same inputs, same output."""
    if labels.ndim != 2:
        raise G4SegError(f"a label map must be (H, W), got shape {labels.shape}")
    return PERTURBATIONS[check_names([name])[0]].apply(labels, perturbation_rng(name, seed))


def check_names(names: list[str]) -> list[str]:
    """The names, checked: an unknown or repeated one is one G4SegError line listing the known ones."""
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise G4SegError(f"unknown perturbation(s) {', '.join(unknown)} (known: {', '.join(NAMES)})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise G4SegError(f"perturbation(s) {', '.join(repeated)} given more than once")
    if not names:
        raise G4SegError(f"no perturbation given (known: {', '.join(NAMES)})")
    return list(names)


def parse_names(text: str | None) -> list[str]:
    """``"all"``/None -> every perturbation; else comma-separated names, checked."""
    if text is None or text.strip() == "all":
        return list(NAMES)
    return check_names([part.strip() for part in text.split(",") if part.strip()])
