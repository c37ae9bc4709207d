"""CascadePSP, a binary refiner, applied to a multi-class label map: one refinement per class, then an argmax.

Decisions (CascadePSP's package refines one binary mask; the paper's scene-parsing code,
``eval_post_ade.py`` lines 100-134 of hkchengrex/CascadePSP, refines each class component separately and
gives a pixel the class of highest refined confidence above 0.5):

- **What each class refines.** Class k's mask is its region of the label map the run would output (the
  run's merge rule on the maps it hands over), not its probability map times 255: the package thresholds
  its mask at 127 anyway, and the label map is what the user sees, so overlaps and the merge rule (a
  baseline's background channel, SCLIP's thresholds) are already resolved. With ``--beta 1`` that map is
  the input's, so the run is CascadePSP alone on the coarse labels. A class with no pixel is not refined
  (probability 0): CascadePSP refines a mask, it does not find objects.
- **Output.** Each refined map is the package's uint8 output / 255, a probability, saved in the ``.npz``.
  The background channel is ``1 - max_k p_k`` and the labels are ``argmax(background, classes)``
  (background first, wins ties): a class wins a pixel exactly where its probability is the highest and
  above 0.5 (the first class wins a tie between classes), ``eval_post_ade.py``'s rule with confidence
  starting at 0.5 and its strict ``>``. Where no class passes 0.5 the pixel is background (the reference
  keeps the input label there, which for a VOC-style map with an unrefined background would keep every
  shrunk object pixel); with one class this is the package's binary output thresholded at 0.5, and
  ``(1 - p, p)`` is a distribution.
- The reference crops each component to its box enlarged by 25% before refining (``eval_post_ade.py``
  line 116, with a split step not in the package); the package's ``refine`` works on the whole image with
  its own global and local steps, and that is what runs here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from g4seg.errors import G4SegError

if TYPE_CHECKING:
    from g4seg.components import CoarseMask
    from g4seg.masks import MergeRule


class BinaryRefiner(Protocol):
    """``segmentation_refinement.Refiner``'s call: image (H, W, 3) 0..255, mask (H, W) uint8 binarised at
    127 -> (H, W) uint8 0..255 (the foreground probability times 255, truncated)."""

    def refine(self, image: np.ndarray, mask: np.ndarray, fast: bool = False, L: int = 900) -> np.ndarray: ...


class CascadePsp:
    """Background-aware post-processor (:class:`g4seg.components.SeesBackground`): per-class CascadePSP."""

    background_aware = True

    def __init__(self, refiner: BinaryRefiner, *, fast: bool, L: int, color: Literal["rgb", "bgr"]) -> None:
        self.refiner = refiner
        self.fast = fast
        self.L = L
        self.color = color

    def __call__(self, image: np.ndarray, probs: np.ndarray, *, background: np.ndarray | None,
                 rule: MergeRule) -> CoarseMask:
        from g4seg.components import CoarseMask
        from g4seg.masks import MergeRule

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or probs.shape[1:] != image.shape[:2]:
            raise G4SegError(f"post-processor 'cascadepsp' needs an (H, W, 3) uint8 image and (K, H, W) maps of "
                             f"its size, got {image.shape} {image.dtype} and {probs.shape}")
        labels = rule.labels(probs, background)
        pixels = np.ascontiguousarray(image[..., ::-1] if self.color == "bgr" else image)
        refined = np.zeros(probs.shape, np.float32)
        for k in range(len(probs)):
            region = labels == k + 1
            if region.any():
                out = self.refiner.refine(pixels, region.astype(np.uint8) * 255, fast=self.fast, L=self.L)
                refined[k] = np.asarray(out, np.float32) / 255
        return CoarseMask(refined, background=1 - refined.max(axis=0, initial=0.0), merge=MergeRule("argmax-bg"))
