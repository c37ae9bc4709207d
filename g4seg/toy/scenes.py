"""Synthetic photos with exact label maps: the toy world's scenes.

Six classes that differ in shape *and* texture, each drawn in a random colour (so colour alone never
tells them apart):

======  ===========================  ===================================
class   shape                        texture
======  ===========================  ===================================
ball    disc                         radial shading with a highlight
brick   rotated rectangle            staggered mortar lines
star    five-pointed star            polka dots
ring    annulus                      concentric bands
snake   thick sine curve (2-4 px)    bands across the body
kite    rhombus                      checkerboard
======  ===========================  ===================================

A scene is a textured background (low-frequency colour noise plus grain, sometimes stripes) with 1-3
objects painted in order; later objects cover earlier ones, which is what the label map says. Objects
may touch or cross the border and may be small (a few pixels) or thin. Masks are evaluated at pixel
centres without antialiasing, so the label map is exact: every pixel of class k shows class k's
texture and nothing else.

Everything is a pure function of the seed (``numpy.random.default_rng(seed)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = ("ball", "brick", "star", "ring", "snake", "kite")
SIDE = 64


@dataclass(frozen=True)
class Scene:
    """One synthetic photo: ``image`` (H, W, 3) uint8, ``labels`` (H, W) uint8 (0 = background,
    k = ``CLASSES[k - 1]``) and the classes present, largest visible area first."""

    image: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    @property
    def caption(self) -> str:
        """"a photo of a ball" or "a photo of a ball and a star" (classes by visible area)."""
        return caption(self.classes)


def caption(classes: tuple[str, ...] | list[str]) -> str:
    return "a photo of " + " and ".join(f"a {name}" for name in classes)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.uniform(), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))


def _smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """(side, side) values in [0, 1]: a random ``cells`` x ``cells`` grid, bilinearly upsampled."""
    grid = rng.uniform(size=(cells + 1, cells + 1))
    pos = np.linspace(0, cells, side, dtype=np.float64)
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    a, b = _colour(rng) * rng.uniform(0.5, 1.0), _colour(rng) * rng.uniform(0.5, 1.0)
    mix = _smooth_noise(rng, side, int(rng.integers(2, 6)))[..., None]
    image = a * mix + b * (1 - mix)
    if rng.uniform() < 0.4:  # faint stripes
        yy, xx = np.mgrid[:side, :side]
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        image = image * (0.85 + 0.15 * (np.sin(2 * np.pi * phase) > 0))[..., None]
    return image + rng.normal(0, 0.03, size=image.shape)


def _rotated(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to (cx, cy), in a frame rotated by ``angle``."""
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _object(name: str, rng: np.random.Generator, side: int, size: float) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W) bool, appearance (H, W, 3) float) of one object of class ``name``."""
    yy, xx = np.mgrid[:side, :side].astype(np.float64) + 0.5
    cx, cy = rng.uniform(0.0, 1.0, size=2) * side
    angle = rng.uniform(0, 2 * np.pi)
    u, v = _rotated(xx, yy, cx, cy, angle)
    colour = _colour(rng)
    r = np.hypot(u, v)
    if name == "ball":
        mask = r <= size
        hx, hy = -0.35 * size, -0.35 * size
        shade = 1.0 - 0.6 * np.clip(np.hypot(xx - cx - hx, yy - cy - hy) / (1.6 * size), 0, 1)
        look = colour * shade[..., None] + 0.25 * np.clip(1 - np.hypot(xx - cx - hx, yy - cy - hy) / (0.35 * size),
                                                           0, 1)[..., None]
    elif name == "brick":
        half_w, half_h = size, size * rng.uniform(0.45, 0.8)
        mask = (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
        row = np.floor((v + half_h) / 4.0)
        mortar = ((v + half_h) % 4.0 < 1.0) | ((u + half_w + 4.0 * (row % 2)) % 8.0 < 1.0)
        look = np.where(mortar[..., None], 0.85 - 0.6 * colour, colour)
    elif name == "star":
        theta = np.arctan2(v, u)
        lobe = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 0 at a point, 1 between points
        mask = r <= size * (1.0 - 0.55 * lobe)
        dots = ((xx % 4) - 2) ** 2 + ((yy % 4) - 2) ** 2 <= 1.1
        look = np.where(dots[..., None], 1.0 - colour, colour)
    elif name == "ring":
        inner = size * rng.uniform(0.45, 0.65)
        mask = (r <= size) & (r >= inner)
        bands = (np.floor(r / 2.0) % 2 == 0)
        look = colour * np.where(bands, 1.0, 0.55)[..., None]
    elif name == "snake":
        width = rng.uniform(1.0, 2.0)  # half-width: 2-4 px thick
        amplitude, period = size * rng.uniform(0.2, 0.4), size * rng.uniform(0.6, 1.2)
        centre = amplitude * np.sin(2 * np.pi * u / period)
        mask = (np.abs(v - centre) <= width) & (np.abs(u) <= 1.5 * size)
        bands = np.floor(u / 2.5) % 2 == 0
        look = np.where(bands[..., None], colour, 0.3 * colour)
    elif name == "kite":
        ratio = rng.uniform(0.5, 0.8)
        mask = np.abs(u) / size + np.abs(v) / (size * ratio) <= 1.0
        checks = (np.floor(xx / 3) + np.floor(yy / 3)) % 2 == 0
        look = np.where(checks[..., None], colour, 0.4 + 0.6 * (1 - colour))
    else:
        raise ValueError(f"unknown toy class {name!r}")
    return mask, np.broadcast_to(look, (side, side, 3))


def make_scene(seed: int, side: int = SIDE) -> Scene:
    """The scene of ``seed``: same seed, same pixels and labels."""
    rng = np.random.default_rng(seed)
    image = _background(rng, side)
    labels = np.zeros((side, side), dtype=np.uint8)
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    while count > 0 or not labels.any():  # an object placed off the image is replaced by another one
        count -= 1
        k = int(rng.integers(len(CLASSES)))
        small = rng.uniform() < 0.25
        size = side * (rng.uniform(0.05, 0.1) if small else rng.uniform(0.12, 0.32))
        mask, look = _object(CLASSES[k], rng, side, size)
        image[mask] = look[mask]
        labels[mask] = k + 1
    present = np.bincount(labels.ravel(), minlength=len(CLASSES) + 1)[1:]
    order = [k for k in np.argsort(-present, kind="stable") if present[k] > 0]
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return Scene(pixels, labels, tuple(CLASSES[k] for k in order))


def make_scenes(seeds: range | list[int], side: int = SIDE) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stacked images (N, H, W, 3) uint8, labels (N, H, W) uint8 and captions of ``seeds``."""
    scenes = [make_scene(seed, side) for seed in seeds]
    return (np.stack([s.image for s in scenes]), np.stack([s.labels for s in scenes]),
            [s.caption for s in scenes])
