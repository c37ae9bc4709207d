"""Eq. 8 matches drawn as lines, shared by the demo's picture and the harness's pictures."""

from __future__ import annotations

from typing import Any

import numpy as np


def boundary_cells(mask: np.ndarray, grid: tuple[int, int], count: int) -> list[int]:
    """Up to ``count`` feature-grid cells on the boundary of ``mask`` (where Eq. 9 acts on a hard mask),
    spread evenly along it; flat indices into the grid."""
    from scipy.ndimage import binary_erosion

    return spread_cells(mask & ~binary_erosion(mask, border_value=1), grid, count)


def spread_cells(pixels: np.ndarray, grid: tuple[int, int], count: int) -> list[int]:
    """Up to ``count`` feature-grid cells holding pixels of the (H, W) bool map ``pixels``, spread evenly
    over them in raster order; flat indices into the grid."""
    h, w = grid
    height, width = pixels.shape
    ys, xs = np.nonzero(pixels)
    cells = sorted({int(y * h // height) * w + int(x * w // width) for y, x in zip(ys, xs)})
    step = max(1, len(cells) // count)
    return cells[::step][:count]


def match_lines(axis: Any, generated: np.ndarray, image: np.ndarray, delta: np.ndarray, mask: np.ndarray,
                count: int = 8) -> None:
    """Show the generated image left of the original and join ``count`` generated cells on the mask's
    boundary to the original cells Eq. 8 matched them with (``delta``: (h, w) flat indices)."""
    cell_lines(axis, generated, image, delta, boundary_cells(mask, delta.shape, count))


def cell_lines(axis: Any, generated: np.ndarray, image: np.ndarray, delta: np.ndarray, cells: list[int]) -> None:
    """Show the generated image left of the original and join each generated cell of ``cells`` (flat indices
    into ``delta``'s grid) to the original cell Eq. 8 matched it with."""
    side = image.shape[1]
    h, w = delta.shape
    cell_y, cell_x = image.shape[0] / h, side / w
    axis.imshow(np.concatenate([generated, image], axis=1), interpolation="nearest")
    for j in cells:
        (y0, x0), (y1, x1) = divmod(j, w), divmod(int(delta.flat[j]), w)
        axis.plot([(x0 + 0.5) * cell_x, side + (x1 + 0.5) * cell_x], [(y0 + 0.5) * cell_y, (y1 + 0.5) * cell_y],
                  "-o", color="yellow", lw=0.8, ms=2)
