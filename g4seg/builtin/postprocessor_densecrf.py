"""Post-processor ``densecrf``: a fully connected CRF (Kraehenbuehl & Koltun 2011) through pydensecrf.

The library is an optional extra (``pip install 'g4seg[crf]'``, which builds ``pydensecrf2`` with the
machine's C++ compiler); it is imported when the post-processor is built, so ``g4seg plugins`` works
without it and using it without the library is one error line.

**Background.** The refiner's maps are the K classes; a CRF needs the background as a label of its
own, and what comes out of it is a distribution over (background, classes) whose argmax is the label
map (CLIP-ES ``eval_cam_with_crf.py`` line 118, IRN ``misc/imutils.py`` line 170). So this
post-processor is *background-aware* (:class:`g4seg.components.SeesBackground`): the refiner hands
it the background channel and merge rule its labels would be merged with; it builds the score of the
CRF's background label (option ``background``), runs the CRF over (background, classes), and returns
the class marginals together with the background marginal and the rule ``argmax-bg``, so the labels
are the CRF's argmax and the saved ``.npz`` is its (K+1) posterior (probabilities in, probabilities
out, background channel included). Background scores:

- ``merge`` (default): the score the merge rule itself gives the background, so that before any
  pairwise term the argmax over (background, classes) is exactly the label map the refinement gives
  without a CRF (the identity principle; tested for every rule): ``threshold`` a constant
  ``bg_threshold``; ``argmax-bg`` the background channel; ``sclip`` max(background channel or 0,
  ``prob_thd``), the classes its area filter drops set to 0; ``pow`` (1 - max_k p_k) ** power.
- ``power``: (1 - max_k p_k) ** ``bg_power``, CLIP-ES's CRF input (``eval_cam_with_crf.py`` line 111,
  power 1, while its CRF-free evaluation uses power 2).
- ``constant``: ``bg_value`` everywhere, IRN's ``np.pad(cams, ..., constant_values=conf_fg_thres)``
  (``step/cam_to_ir_label.py`` line 27, ``conf_fg_thres`` 0.30 in ``run_sample.py`` line 35).

**Labels of the CRF** (option ``classes``): ``nonzero`` (default) keeps the background and the classes
with any non-zero probability; the classes left out get probability 0. Both reference methods run the
CRF over an image's labelled classes only (CLIP-ES's CAM ``keys``, IRN's ``n_labels=keys.shape[0]``),
which a stack that stores absent classes as zero maps reproduces; ``all`` keeps every class.

**Unary** (option ``unary``): ``softmax`` is -log(clip(p, 1e-5, 1)) of the (background, classes) stack,
not renormalised (pydensecrf's ``unary_from_softmax``, CLIP-ES line 26); ``labels`` takes that stack's
argmax and gives each pixel's label probability ``gt_prob``, the other labels sharing the rest
(``unary_from_labels(..., zero_unsure=False)``, IRN ``imutils.py`` line 162).

**Pairwise**: pydensecrf's ``addPairwiseGaussian`` (``gaussian_sxy``, ``gaussian_compat``) and
``addPairwiseBilateral`` (``bilateral_sxy``, ``bilateral_srgb``, ``bilateral_compat``): Potts
compatibility, diagonal kernel, symmetric normalisation; a compat of 0 leaves that kernel out.
``iterations`` mean-field steps. Neither reference rescales the image for its CRF, so there is no
scale option.

**Presets** (``-o postprocessor.preset=...``; every option given explicitly overrides its preset):

========== ===== ============ ================== ============== ============ ========
preset     iters gaussian     bilateral          unary          background   image
           (t)   sxy, compat  sxy, srgb, compat
========== ===== ============ ================== ============== ============ ========
deeplab    10    1, 3         67, 3, 4           softmax        merge        rgb
clip-es    10    1, 3         67, 3, 4           softmax        power 1      clip-es
irn        10    3, 3         50, 5, 10          labels, 0.7    constant 0.3 rgb
========== ===== ============ ================== ============== ============ ========

- ``deeplab`` (default): DeepLab v2's VOC CRF, as ``kazuto1011/deeplab-pytorch`` ``configs/voc12.yaml``
  (``CRF: ITER_MAX 10, POS_W 3, POS_XY_STD 1, BI_W 4, BI_XY_STD 67, BI_RGB_STD 3``), with g4seg's own
  background (``merge``) and the image as given.
- ``clip-es``: CLIP-ES (``linyq2117/CLIP-ES`` at 3893f81, ``eval_cam_with_crf.py``): ``DenseCRF``
  lines 14-41 (the deeplab-pytorch class) with ``iter_max=10, pos_xy_std=1, pos_w=3, bi_xy_std=67,
  bi_rgb_std=3, bi_w=4`` (lines 87-94), background ``(1 - max) ** 1`` (line 111), and the image the
  script gives its CRF (``color = clip-es``): read as BGR by cv2 (line 100), minus ``mean_bgr``
  (104.008, 116.669, 122.675) in float32 (lines 103-104, 163), cast back to uint8 (line 115). That
  cast wraps the negative values (truncated toward zero, then modulo 256, as numpy's cast does on
  x86), so its bilateral kernel sees wrapped colours; kept for exactness, ``-o postprocessor.color=rgb``
  drops it.
- ``irn``: IRN (``jiwoon-ahn/irn`` at a2ece00, ``misc/imutils.py`` ``crf_inference_label`` lines
  156-170: ``t=10``, ``unary_from_labels(gt_prob=0.7, zero_unsure=False)``, ``addPairwiseGaussian(sxy=3,
  compat=3)``, ``addPairwiseBilateral(sxy=50, srgb=5, compat=10)``) on the RGB image (``imageio``),
  with labels from the CAMs padded by the constant ``conf_fg_thres`` 0.30 (``cam_to_ir_label.py``
  lines 27-29). IRN's pseudo labels combine that run with a second one at ``conf_bg_thres`` 0.05 and
  mark the disagreement 255; that is IRN's label step, not a post-processor (so is CLIP-ES's
  ``confidence < 0.95 -> 255``, lines 121-123).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    from g4seg.components import CoarseMask
    from g4seg.masks import MergeRule

Preset = Literal["deeplab", "clip-es", "irn"]
UNARY_CLIP = 1e-5  # pydensecrf's unary_from_softmax default, as both references use it
CLIP_ES_MEAN_BGR = (104.008, 116.669, 122.675)  # eval_cam_with_crf.py line 163
INSTALL_HINT = "pip install 'g4seg[crf]'"


@dataclass(frozen=True)
class CrfSettings:
    """Every CRF setting, resolved from a preset and the explicit options."""

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    unary: Literal["softmax", "labels"] = "softmax"
    gt_prob: float = 0.7
    background: Literal["merge", "power", "constant"] = "merge"
    bg_power: float = 1.0
    bg_value: float = 0.3
    color: Literal["rgb", "clip-es"] = "rgb"
    classes: Literal["nonzero", "all"] = "nonzero"


PRESETS: dict[str, CrfSettings] = {
    "deeplab": CrfSettings(),
    "clip-es": CrfSettings(background="power", bg_power=1.0, color="clip-es"),
    "irn": CrfSettings(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=50.0, bilateral_srgb=5.0,
                       bilateral_compat=10.0, unary="labels", gt_prob=0.7, background="constant", bg_value=0.3),
}


class DenseCrfOptions(Options):
    """A preset plus explicit overrides (None = the preset's value); see the module docstring."""

    preset: Preset = Field("deeplab", description="deeplab, clip-es or irn: the settings those methods use; "
                                                  "options left unset (None) take the preset's values")
    iterations: int | None = Field(None, ge=0, description="mean-field iterations")
    gaussian_sxy: float | None = Field(None, gt=0, description="Gaussian kernel: spatial std in pixels")
    gaussian_compat: float | None = Field(None, ge=0, description="Gaussian kernel: Potts weight (0 = off)")
    bilateral_sxy: float | None = Field(None, gt=0, description="bilateral kernel: spatial std in pixels")
    bilateral_srgb: float | None = Field(None, gt=0, description="bilateral kernel: colour std (0-255 units)")
    bilateral_compat: float | None = Field(None, ge=0, description="bilateral kernel: Potts weight (0 = off)")
    unary: Literal["softmax", "labels"] | None = Field(None, description="softmax: -log p; labels: from argmax")
    gt_prob: float | None = Field(None, gt=0, lt=1, description="unary=labels: probability of the argmax label")
    background: Literal["merge", "power", "constant"] | None = Field(
        None, description="background score: merge (the merge rule's), power ((1-max)^bg_power), constant")
    bg_power: float | None = Field(None, gt=0, description="background=power: exponent")
    bg_value: float | None = Field(None, ge=0, le=1, description="background=constant: its score")
    color: Literal["rgb", "clip-es"] | None = Field(None, description="image the bilateral kernel sees: rgb, "
                                                                       "or CLIP-ES's BGR-minus-mean uint8")
    classes: Literal["nonzero", "all"] | None = Field(None, description="CRF labels: background + classes with "
                                                                         "any non-zero probability, or all")

    def settings(self) -> CrfSettings:
        """The preset's settings with every explicitly given option in place."""
        given = {name: value for name, value in self.model_dump().items() if name != "preset" and value is not None}
        return replace(PRESETS[self.preset], **given)


def clip_es_image(image: np.ndarray) -> np.ndarray:
    """The uint8 image CLIP-ES's script gives its CRF: BGR minus ``mean_bgr`` in float32, cast to uint8
    the way numpy casts on x86 (truncate toward zero, then modulo 256); written without the
    platform-dependent float -> uint8 cast."""
    shifted = image[..., ::-1].astype(np.float32) - np.asarray(CLIP_ES_MEAN_BGR, np.float32)
    return np.ascontiguousarray(np.mod(np.trunc(shifted).astype(np.int64), 256).astype(np.uint8))


def background_score(probs: np.ndarray, background: np.ndarray | None, rule: MergeRule | None,
                     settings: CrfSettings) -> tuple[np.ndarray, np.ndarray]:
    """(class scores, background score) for the CRF's (background, classes) stack."""
    if settings.background == "power":
        return probs, np.power(1 - probs.max(axis=0, initial=0.0), settings.bg_power)
    if settings.background == "constant":
        return probs, np.full(probs.shape[1:], settings.bg_value, np.float32)
    from g4seg.masks import MergeRule, merge_sclip

    rule = rule or MergeRule()
    if rule.mode == "threshold":
        return probs, np.full(probs.shape[1:], rule.bg_threshold, np.float32)
    if rule.mode == "argmax-bg":
        if background is None:
            raise G4SegError("post-processor 'densecrf': merge 'argmax-bg' needs a background channel; "
                             "use -o postprocessor.background=power or constant")
        return probs, background.astype(np.float32)
    if rule.mode == "pow":
        return probs, np.power(1 - probs.max(axis=0, initial=0.0), rule.power)
    if rule.mode == "sclip":
        bg = np.zeros(probs.shape[1:], np.float32) if background is None else background.astype(np.float32)
        if rule.area_thd is not None:  # the classes SCLIP's area filter drops win no pixel: drop them here too
            winners = merge_sclip(probs, background, 0.0, None)
            area = np.bincount(winners.ravel(), minlength=probs.shape[0] + 1)[1:].astype(np.float64)
            keep = area > rule.area_thd * area.sum()
            probs = probs * keep[:, None, None].astype(probs.dtype)
        return probs, np.maximum(bg, np.float32(rule.prob_thd))
    raise G4SegError(f"post-processor 'densecrf': unknown merge mode '{rule.mode}'")


class DenseCrf:
    """Callable: image and class probabilities (plus the merge's background and rule) -> CRF posterior."""

    background_aware = True  # components.SeesBackground: the refiner passes background= and rule=

    def __init__(self, settings: CrfSettings, densecrf: Any) -> None:
        self.settings = settings
        self._densecrf = densecrf  # the pydensecrf.densecrf module

    def __call__(self, image: np.ndarray, probs: np.ndarray, *, background: np.ndarray | None = None,
                 rule: MergeRule | None = None) -> CoarseMask:
        from g4seg.components import CoarseMask
        from g4seg.masks import MergeRule

        self._check(image, probs, background)
        s = self.settings
        probs = np.asarray(probs, np.float32)
        scores, bg = background_score(probs, background, rule, s)
        kept = np.flatnonzero(scores.reshape(len(scores), -1).max(axis=1, initial=0.0) > 0) \
            if s.classes == "nonzero" else np.arange(len(scores))
        out = np.zeros_like(probs)
        if len(kept) == 0:  # nothing but background
            return CoarseMask(out, background=np.ones(probs.shape[1:], np.float32), merge=MergeRule("argmax-bg"))
        stack = np.concatenate([bg[None].astype(np.float32), scores[kept]], axis=0)
        q = self.posterior(image, stack)
        out[kept] = q[1:]
        return CoarseMask(out, background=q[0], merge=MergeRule("argmax-bg"))

    def posterior(self, image: np.ndarray, stack: np.ndarray) -> np.ndarray:
        """The CRF's marginals (L, H, W) float32 for a (L, H, W) score stack, label 0 the background."""
        s, dcrf = self.settings, self._densecrf
        labels, height, width = stack.shape
        if s.unary == "softmax":
            unary = -np.log(np.clip(stack, UNARY_CLIP, 1.0)).reshape(labels, -1)
        else:
            unary = label_unary(stack.argmax(axis=0), labels, s.gt_prob)
        rgb = clip_es_image(image) if s.color == "clip-es" else np.ascontiguousarray(image, dtype=np.uint8)
        crf = dcrf.DenseCRF2D(width, height, labels)
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        if s.gaussian_compat > 0:
            crf.addPairwiseGaussian(sxy=s.gaussian_sxy, compat=s.gaussian_compat)
        if s.bilateral_compat > 0:
            crf.addPairwiseBilateral(sxy=s.bilateral_sxy, srgb=s.bilateral_srgb, rgbim=rgb, compat=s.bilateral_compat)
        return np.asarray(crf.inference(s.iterations), np.float32).reshape(labels, height, width)

    @staticmethod
    def _check(image: np.ndarray, probs: np.ndarray, background: np.ndarray | None) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise G4SegError(f"post-processor 'densecrf' needs an (H, W, 3) uint8 image, got {image.shape} "
                             f"{image.dtype}")
        if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
            raise G4SegError(f"post-processor 'densecrf' needs (K, H, W) probabilities of the image's size "
                             f"{image.shape[:2]}, got {probs.shape}")
        if not np.isfinite(probs).all() or probs.min(initial=0.0) < 0 or probs.max(initial=0.0) > 1:
            raise G4SegError("post-processor 'densecrf' needs probabilities that are finite and within [0, 1]")
        if background is not None and background.shape != image.shape[:2]:
            raise G4SegError(f"post-processor 'densecrf': background channel of shape {background.shape}, "
                             f"expected {image.shape[:2]}")


def label_unary(labels: np.ndarray, count: int, gt_prob: float) -> np.ndarray:
    """pydensecrf's ``unary_from_labels(labels, count, gt_prob, zero_unsure=False)``: -log gt_prob at each
    pixel's label, -log((1 - gt_prob) / (count - 1)) elsewhere; (count, H*W) float32."""
    flat = labels.ravel()
    other = -np.log((1.0 - gt_prob) / max(count - 1, 1))
    unary = np.full((count, flat.size), other, np.float32)
    unary[flat, np.arange(flat.size)] = -np.log(gt_prob)
    return unary


def import_densecrf() -> Any:
    """The ``pydensecrf.densecrf`` module, or one G4SegError line saying how to install it."""
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError:
        raise G4SegError(f"post-processor 'densecrf' needs the pydensecrf library, which is not installed: "
                         f"{INSTALL_HINT} (builds pydensecrf2; needs a C++ compiler)") from None
    return densecrf


def build_densecrf(options: DenseCrfOptions, runtime: Runtime) -> DenseCrf:
    return DenseCrf(options.settings(), import_densecrf())


@hookimpl
def register_postprocessors(register):
    register(ComponentSpec(kind="postprocessor", name="densecrf", aliases=("crf",), factory=build_densecrf,
                           options=DenseCrfOptions,
                           description="fully connected CRF (pydensecrf; presets deeplab, clip-es, irn)"))
