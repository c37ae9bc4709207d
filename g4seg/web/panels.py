"""The page's pictures of one refinement, as (H, W, 3) uint8 arrays.

Overlays use the label maps' own VOC colours (:func:`g4seg.io.overlay`, as ``--save-overlay`` writes
them); the correspondence picture is the demo's (:func:`g4seg.toy.pictures.cell_lines`), for a sample of
*band* pixels: those whose input probability lies in the confidence band, the only ones Eq. 9 updates.
Our choice where nothing prescribes one: the band is recomputed here from the same ramp the refiner
applies to a hard mask (``masks.ramp`` over ``ramp_width``), and the first class with band pixels is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from g4seg.config import RefineConfig
    from g4seg.components import CoarseMask
    from g4seg.refiner import RefineResult

CHANGED_COLOUR = (255, 0, 255)  # magenta: not a VOC label colour of the first classes
MATCH_COUNT = 12


def input_probs(coarse: "CoarseMask", config: "RefineConfig") -> np.ndarray:
    """The (K, H, W) probabilities Eq. 9 starts from: a hard mask's signed-distance ramps (what
    ``Refiner._prepare`` computes), else the coarse probabilities as given."""
    from g4seg import masks

    if not masks.is_hard(coarse.probs, coarse.background):
        return coarse.probs
    labels = masks.hard_labels(coarse.probs, coarse.background)
    hw = labels.shape
    return masks.ramp(labels, len(coarse.probs), masks.ramp_pixels(config.ramp_width, hw))


def changed(image: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The image darkened, with the pixels whose label changed in magenta."""
    out = (image.astype(np.float32) * 0.4).round().astype(np.uint8)
    out[before != after] = CHANGED_COLOUR
    return out


def correspondence(image: np.ndarray, result: "RefineResult", band_probs: np.ndarray,
                   cf: tuple[float, float]) -> tuple[np.ndarray, str] | None:
    """Generated image | original, joined by lines from band cells to their Eq. 8 matches, and the class
    drawn; None when no class had pixels in the band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from g4seg.toy.pictures import cell_lines, spread_cells

    for k, name in enumerate(result.classes):
        if name not in (result.correspondence or {}):
            continue
        generated, delta = result.generated[name], result.correspondence[name]
        side = generated.shape[0]
        original = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
        band = (band_probs[k] >= cf[0]) & (band_probs[k] <= cf[1])
        band = np.asarray(Image.fromarray(band).resize((side, side), Image.NEAREST))
        figure = plt.figure(figsize=(6, 3), dpi=100)
        axis = figure.add_axes((0, 0, 1, 1))
        axis.axis("off")
        cell_lines(axis, generated, original, delta, spread_cells(band, delta.shape, MATCH_COUNT))
        figure.canvas.draw()
        picture = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
        plt.close(figure)
        return picture, name
    return None
