"""Coarse-mask handling around the refinement: softening hard masks, injection masks, label merge."""

from __future__ import annotations

import numpy as np

IGNORE_LABEL = 255


def is_hard(probs: np.ndarray) -> bool:
    """True when every value is exactly 0 or 1 (binary masks, label maps)."""
    return bool(np.isin(probs, (0.0, 1.0)).all())


def soften(probs: np.ndarray, sigma_fraction: float) -> np.ndarray:
    """Gaussian-blur each class map so the confidence band covers the uncertain boundary.

    A 0/1 mask has no pixel in [0.2, 0.6] and would never change; after blurring with
    sigma = ``sigma_fraction`` x short side, pixels near the boundary fall inside the band while
    the >= 0.5 injection mask stays the original shape.
    """
    from scipy.ndimage import gaussian_filter

    sigma = sigma_fraction * min(probs.shape[-2:])
    if sigma <= 0:
        return probs.astype(np.float32)
    return np.stack([gaussian_filter(p.astype(np.float32), sigma=sigma, mode="nearest") for p in probs])


def merge_labels(probs: np.ndarray, bg_threshold: float, ignore: np.ndarray | None = None) -> np.ndarray:
    """Label map: 0 where no class reaches ``bg_threshold``, else 1 + argmax; 255 on ignored pixels."""
    if probs.shape[0] == 0:
        labels = np.zeros(probs.shape[1:], dtype=np.uint8)
    else:
        labels = (probs.argmax(axis=0) + 1).astype(np.uint8)
        labels[probs.max(axis=0) < bg_threshold] = 0
    if ignore is not None:
        labels[ignore] = IGNORE_LABEL
    return labels
