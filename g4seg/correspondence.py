"""The semantic correspondence alignment (Eq. 8), the mixing update (Eq. 9) and the confidence band.

Matching happens on the feature grid (e.g. 32 x 32 patches). The match of grid cell j is turned into
a displacement in pixels and applied at full resolution, so S*[p] = beta S[p] + (1 - beta) S[p + d(p)]
reads the coarse mask itself, never a resampled copy: identity features change nothing, and pixels
outside the band keep their value exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def match(original: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Eq. 8: for each cell j of each generated map, the original cell with the highest cosine.

    ``original`` (C, h, w) and ``generated`` (K, C, h, w) are L2-normalised; returns (K, h*w) indices
    into the flattened original grid.
    """
    orig = original.flatten(1).float()  # (C, N)
    gen = generated.flatten(2).float()  # (K, C, N)
    similarity = torch.einsum("cn,kcm->kmn", orig, gen)  # (K, N_gen, N_orig)
    return similarity.argmax(dim=-1)


def source_pixels(delta: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Full-resolution flat source index for every pixel, from grid matches ``delta`` (K, h*w).

    Pixel p lies in cell j; it reads the pixel displaced by (cell(delta_j) - cell(j)) cells,
    clamped to the image.
    """
    (height, width), (cell_y, cell_x) = size, _pixel_cells(grid, size)
    dy, dx = _cell_shifts(delta, grid, size)  # (K, h, w) whole-pixel shifts per cell
    ys, xs = torch.arange(height), torch.arange(width)
    # the shift depends only on the cell, so rows and columns are clamped separately, then combined
    src_y = (ys[None, :, None] + dy[:, cell_y, :]).clamp_(0, height - 1)  # (K, H, w)
    src_x = (xs[None, None, :] + dx[:, :, cell_x]).clamp_(0, width - 1)  # (K, h, W)
    return src_y[:, :, cell_x].mul_(width).add_(src_x[:, cell_y, :])


def _pixel_cells(grid: tuple[int, int], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid row of every pixel row and the grid column of every pixel column."""
    (h, w), (height, width) = grid, size
    return (torch.arange(height) * h) // height, (torch.arange(width) * w) // width


def _cell_shifts(delta: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(dy, dx), each (K, h, w) int64: the displacement in whole pixels of every cell's match, rounded as
    ``round(float32(cells) * (size / grid))``."""
    (h, w), (height, width) = grid, size
    cells = delta.view(-1, h, w)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    dy = (cells // w - rows).float() * (height / h)
    dx = (cells % w - cols).float() * (width / w)
    return dy.round().long(), dx.round().long()


def mix(probs: torch.Tensor, source: torch.Tensor, beta: float, band: tuple[float, float]) -> torch.Tensor:
    """Eq. 9 inside the confidence band: S*[p] = beta S[p] + (1 - beta) S[src(p)] where lo <= S[p] <= hi.

    A pixel matched to itself is left bit-exact (beta*S + (1-beta)*S need not round back to S).
    """
    if not _numpy_path(probs):
        return _mix_dense(probs, source, beta, band)
    width = probs.shape[-1]
    flat_source = source.reshape(source.shape[0], -1).cpu().numpy()

    def source_of(k: int, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.divmod(flat_source[k][ys * width + xs], width)

    return _mix_band(probs, source_of, beta, band)


def _mix_dense(probs: torch.Tensor, source: torch.Tensor, beta: float, band: tuple[float, float]) -> torch.Tensor:
    """Eq. 9 on whole (K, H, W) tensors (any device and dtype)."""
    flat = probs.flatten(1)
    matched = torch.gather(flat, 1, source.flatten(1)).view_as(probs)
    lo, hi = band
    own = torch.arange(flat.shape[1], device=source.device).view(probs.shape[1:])
    update = (probs >= lo) & (probs <= hi) & (source != own)
    return torch.where(update, beta * probs + (1 - beta) * matched, probs)


def _numpy_path(probs: torch.Tensor) -> bool:
    return probs.device.type == "cpu" and probs.dtype in (torch.float16, torch.float32, torch.float64)


SourceOf = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _mix_band(probs: torch.Tensor, source_of: SourceOf, beta: float, band: tuple[float, float]) -> torch.Tensor:
    """Eq. 9 computed only at the pixels inside the band (CPU). ``source_of(k, ys, xs)`` gives the source
    row and column of class k's pixels (ys, xs). The update itself is the same torch expression as in
    :func:`_mix_dense`, elementwise on the same float values, so the result is identical; nothing of
    full size is built but the band mask of one class at a time."""
    lo, hi = band
    out = probs.detach().clone(memory_format=torch.contiguous_format)
    values_all, out_all = probs.detach().numpy(), out.numpy()
    for k in range(probs.shape[0]):
        values = values_all[k]
        inside = values >= lo
        inside &= values <= hi
        ys, xs = np.nonzero(inside)
        if ys.size == 0:
            continue
        src_y, src_x = source_of(k, ys, xs)
        moved = (src_y != ys) | (src_x != xs)
        ys, xs, src_y, src_x = ys[moved], xs[moved], src_y[moved], src_x[moved]
        own, matched = torch.from_numpy(values[ys, xs]), torch.from_numpy(values[src_y, src_x])
        out_all[k][ys, xs] = (beta * own + (1 - beta) * matched).numpy()
    return out


def _grid_source(delta: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> SourceOf:
    """``source_of(k, ys, xs)``: the pixel :func:`source_pixels` names for class k's pixels (ys, xs)."""
    height, width = size
    cell_y, cell_x = (c.numpy() for c in _pixel_cells(grid, size))
    dy, dx = (d.numpy() for d in _cell_shifts(delta.cpu(), grid, size))

    def source_of(k: int, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cy, cx = cell_y[ys], cell_x[xs]
        src_y = ys + dy[k][cy, cx]
        src_x = xs + dx[k][cy, cx]
        return np.clip(src_y, 0, height - 1, out=src_y), np.clip(src_x, 0, width - 1, out=src_x)

    return source_of


def refine(probs: torch.Tensor, original: torch.Tensor, generated: torch.Tensor, beta: float,
           band: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Match features and mix ``probs`` (K, H, W); returns (refined probs, grid matches (K, h, w))."""
    delta = match(original, generated)
    grid = tuple(original.shape[-2:])
    size = tuple(probs.shape[-2:])
    if not _numpy_path(probs):
        return _mix_dense(probs, source_pixels(delta, grid, size), beta, band), delta.view(-1, *grid)
    # the same as mix(probs, source_pixels(...)), with the source computed only inside the band
    return _mix_band(probs, _grid_source(delta, grid, size), beta, band), delta.view(-1, *grid)
