"""``g4seg demo``: the whole method on one shipped toy scene, offline, in seconds on a CPU.

The scene (``demo_scene/image.png``), its exact labels (``truth.png``) and a perturbed coarse mask
(``coarse.png``; how it was made is in ``demo_scene/scene.json``) ship with the package. The demo
refines the coarse mask with the shipped toy models through the normal :class:`~g4seg.refiner.Refiner`
(backbone ``toy``, injector ``attn``, extractor ``toy-clip``, the paper's t = 400, beta 0.8, band
[0.2, 0.6]), prints coarse and refined IoU against the truth, and draws one picture: image, coarse
mask, generated image, correspondence lines for a few pixels, refined mask, ground truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g4seg.toy.scenes import CLASSES

SCENE_DIR = Path(__file__).resolve().parent / "demo_scene"
NUM_CLASSES = len(CLASSES) + 1  # background included, as the toy dataset scores it


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and where it wrote its picture."""

    classes: list[str]
    coarse_iou: dict[str, float]  # per class present in the truth, plus "mIoU"
    refined_iou: dict[str, float]
    picture: Path


def load_scene(folder: Path = SCENE_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(image, truth, coarse, description) of the shipped demo scene."""
    from g4seg.datasets import read_index_png
    from g4seg.io import load_image

    description = json.loads((folder / "scene.json").read_text())
    return (load_image(folder / "image.png"), read_index_png(folder / "truth.png"),
            read_index_png(folder / "coarse.png"), description)


def ious(pred: np.ndarray, truth: np.ndarray, names: list[str]) -> dict[str, float]:
    """IoU (%) of each named class and of background, and their mean ("mIoU"), as g4seg.metrics counts."""
    from g4seg.metrics import intersect_and_union, iou_percent, mean_iou

    areas = intersect_and_union(pred, truth, NUM_CLASSES)
    per_class = iou_percent(areas)
    result = {name: float(per_class[k]) for k, name in enumerate(["background", *CLASSES]) if name in names}
    result["mIoU"] = mean_iou(areas)
    return result


@dataclass(frozen=True)
class DemoInputs:
    """The demo scene as a refiner takes it: the classes in its truth or coarse mask, numbered 1..K here."""

    image: np.ndarray  # (H, W, 3) uint8
    probs: np.ndarray  # (K, H, W) 0/1 coarse maps of ``classes``
    classes: list[str]
    ids: list[int]  # toy class ids of ``classes``
    truth: np.ndarray  # (H, W) toy class ids
    coarse: np.ndarray


def demo_inputs() -> DemoInputs:
    """The shipped scene's image and coarse maps, ready for ``Refiner.refine`` (also a plugin test's input)."""
    from g4seg.masks import one_hot

    image, truth, coarse, _ = load_scene()
    present = [k for k in range(1, NUM_CLASSES) if (truth == k).any() or (coarse == k).any()]
    probs = one_hot(coarse, NUM_CLASSES - 1)[[k - 1 for k in present]]
    return DemoInputs(image, probs, [CLASSES[k - 1] for k in present], present, truth, coarse)


def run_demo(out: Path, device: str = "auto", **settings: Any) -> DemoResult:
    """Refine the shipped scene's coarse mask; write ``out/demo.png`` and ``out/refined.png``."""
    from g4seg.io import save_label_png
    from g4seg.refiner import Refiner

    scene = demo_inputs()
    image, truth, coarse, present, names = scene.image, scene.truth, scene.coarse, scene.ids, scene.classes
    refiner = Refiner.from_names(backbone="toy", injector="attn", extractor="toy-clip", device=device, **settings)
    result = refiner.refine(image, scene.probs, names, return_generated=True, return_correspondence=True)
    # back to toy class ids (the refiner numbers the given classes 1..K)
    refined = np.array([0, *present], dtype=np.uint8)[result.labels]
    out.mkdir(parents=True, exist_ok=True)
    save_label_png(out / "refined.png", refined)
    picture = out / "demo.png"
    draw(picture, image, coarse, truth, refined, result.generated, result.correspondence, present, names)
    shown = ["background", *names]
    return DemoResult(shown, ious(coarse, truth, shown), ious(refined, truth, shown), picture)


def draw(path: Path, image: np.ndarray, coarse: np.ndarray, truth: np.ndarray, refined: np.ndarray,
         generated: dict[str, np.ndarray], matches: dict[str, np.ndarray], ids: list[int], names: list[str]) -> None:
    """Six panels; the correspondence panel joins a few generated cells on the coarse mask's boundary to
    the original cells Eq. 8 matched them with (:func:`g4seg.toy.pictures.match_lines`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from g4seg.io import overlay
    from g4seg.toy.pictures import match_lines

    name = next((n for n in names if n in generated), None)
    figure, axes = plt.subplots(1, 6, figsize=(17, 3), dpi=110, gridspec_kw={"width_ratios": [1, 1, 1, 2, 1, 1]})
    panels = [(image, "image"), (overlay(image, coarse), "coarse mask"),
              (generated[name] if name else np.zeros_like(image), f"generated ({name or 'nothing in the band'})"),
              (None, "Eq. 8 matches: generated | original"), (overlay(image, refined), "refined"),
              (overlay(image, truth), "ground truth")]
    for axis, (picture, title) in zip(axes, panels):
        axis.set_title(title, fontsize=8)
        axis.axis("off")
        if picture is not None:
            axis.imshow(picture, interpolation="nearest")
    if name:
        match_lines(axes[3], generated[name], image, matches[name], coarse == ids[names.index(name)])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
