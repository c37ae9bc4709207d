"""The semantic correspondence alignment (Eq. 8), the mixing update (Eq. 9) and the confidence band.

Matching happens on the feature grid (e.g. 32 x 32 patches). The match of grid cell j is turned into
a displacement in pixels and applied at full resolution, so S*[p] = beta S[p] + (1 - beta) S[p + d(p)]
reads the coarse mask itself, never a resampled copy: identity features change nothing, and pixels
outside the band keep their value exactly.
"""

from __future__ import annotations

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
    (h, w), (height, width) = grid, size
    ys = torch.arange(height)
    xs = torch.arange(width)
    cell_y = (ys * h) // height
    cell_x = (xs * w) // width
    cells = cell_y[:, None] * w + cell_x[None, :]  # (H, W)
    matched = delta[:, cells]  # (K, H, W)
    dy = (matched // w - cell_y[None, :, None]).float() * (height / h)
    dx = (matched % w - cell_x[None, None, :]).float() * (width / w)
    src_y = (ys[None, :, None] + dy.round().long()).clamp(0, height - 1)
    src_x = (xs[None, None, :] + dx.round().long()).clamp(0, width - 1)
    return src_y * width + src_x


def mix(probs: torch.Tensor, source: torch.Tensor, beta: float, band: tuple[float, float]) -> torch.Tensor:
    """Eq. 9 inside the confidence band: S*[p] = beta S[p] + (1 - beta) S[src(p)] where lo <= S[p] <= hi.

    A pixel matched to itself is left bit-exact (beta*S + (1-beta)*S need not round back to S).
    """
    flat = probs.flatten(1)
    matched = torch.gather(flat, 1, source.flatten(1)).view_as(probs)
    lo, hi = band
    own = torch.arange(flat.shape[1], device=source.device).view(probs.shape[1:])
    update = (probs >= lo) & (probs <= hi) & (source != own)
    return torch.where(update, beta * probs + (1 - beta) * matched, probs)


def refine(probs: torch.Tensor, original: torch.Tensor, generated: torch.Tensor, beta: float,
           band: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Match features and mix ``probs`` (K, H, W); returns (refined probs, grid matches (K, h, w))."""
    delta = match(original, generated)
    grid = tuple(original.shape[-2:])
    source = source_pixels(delta, grid, tuple(probs.shape[-2:]))
    return mix(probs, source, beta, band), delta.view(-1, *grid)
