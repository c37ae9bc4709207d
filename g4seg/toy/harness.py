"""The quality harness: does refinement raise mIoU on toy scenes, and by more than its bias controls?

Held-out scenes (seeds from :data:`~g4seg.toy.train.HELD_OUT_SEEDS_START`) get every perturbation of
:mod:`g4seg.toy.perturb`; each coarse label map is refined through :meth:`Refiner.refine` exactly as
``g4seg refine --dataset toy`` refines it (a hard mask over the dataset's whole class list, so only the
classes with band pixels are generated), once per generator: ``model`` (the method) and the bias
controls ``self`` and ``noise`` (issue 13), which share the model's components and settings. mIoU is
:mod:`g4seg.metrics`' over 7 classes (background included); every gain comes with the paired bootstrap
interval over scenes of :func:`g4seg.metrics.bootstrap_gain`, and the model's gain over the ``noise``
control with its own interval: the probe for issue 8 found that Eq. 9 alone raises IoU under dilation
even when the "generation" is noise, so only a gain over that control is the generation's.

Speed: the extractor is memoised on its exact input (:class:`MemoExtractor`), so the original's
features and the ``noise`` control's image, identical across a scene's perturbations and generators,
are extracted once per scene; outputs are bit-identical to recomputing them.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from g4seg.errors import G4SegError
from g4seg.masks import one_hot
from g4seg.metrics import Areas, bootstrap_gain, image_iou, intersect_and_union, mean_iou
from g4seg.toy.perturb import perturb
from g4seg.toy.scenes import CLASSES, make_scene
from g4seg.toy.train import HELD_OUT_SEEDS_START

if TYPE_CHECKING:
    import torch

    from g4seg.refiner import Refiner

GENERATOR = "model"
CONTROLS = ("self", "noise")
NUM_CLASSES = len(CLASSES) + 1  # metric classes: background first
METRIC_CLASSES = ("background", *CLASSES)


def held_out_seeds(n: int, start: int = HELD_OUT_SEEDS_START) -> list[int]:
    """``n`` scene seeds from ``start``; seeds below the held-out range were (or may be) trained on."""
    if n < 1:
        raise G4SegError(f"--n must be at least 1, got {n}")
    if start < HELD_OUT_SEEDS_START:
        raise G4SegError(f"--seed-start must be >= {HELD_OUT_SEEDS_START} (held-out scenes; training uses seeds "
                         f"below it), got {start}")
    return list(range(start, start + n))


class MemoExtractor:
    """An extractor that returns a copy of its last outputs for an input it has seen (same shape, dtype and
    bytes). Extraction is a pure function of the input, so results are identical; it saves the repeated
    extraction of one scene's original and noise image across perturbations and generators."""

    def __init__(self, extractor: Callable[["torch.Tensor"], "torch.Tensor"], size: int = 8) -> None:
        self.extractor, self.size = extractor, size
        self._memo: OrderedDict[tuple, "torch.Tensor"] = OrderedDict()

    def attach(self, backbone: Any) -> None:
        """Pass the refiner's backbone on (components.UsesBackbone) to an extractor that takes it."""
        attach = getattr(self.extractor, "attach", None)
        if callable(attach):
            attach(backbone)

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        data = images.detach().contiguous().cpu()
        key = (tuple(data.shape), str(data.dtype), str(images.device),
               hashlib.blake2b(data.numpy().tobytes(), digest_size=16).digest())
        if key not in self._memo:
            self._memo[key] = self.extractor(images)
            if len(self._memo) > self.size:
                self._memo.popitem(last=False)
        self._memo.move_to_end(key)
        return self._memo[key].clone()


def with_generators(refiner: "Refiner") -> dict[str, "Refiner"]:
    """The refiner (``model``) and its controls: the same components and settings, another ``generator``;
    every one extracts through one :class:`MemoExtractor`."""
    from g4seg.refiner import Refiner

    extractor = refiner.extractor if isinstance(refiner.extractor, MemoExtractor) else MemoExtractor(refiner.extractor)
    return {generator: Refiner(refiner.config.model_copy(update={"generator": generator}), refiner.backbone,
                               refiner.injector, extractor, refiner.postprocessor)
            for generator in (GENERATOR, *CONTROLS)}


@dataclass
class Panel:
    """One scene and perturbation, for a picture: image, truth, coarse, generated images, refined maps."""

    seed: int
    perturbation: str
    image: np.ndarray
    truth: np.ndarray
    coarse: np.ndarray
    generated: dict[str, np.ndarray]
    refined: dict[str, np.ndarray]  # generator -> label map
    matches: dict[str, np.ndarray] = field(default_factory=dict)  # class -> Eq. 8 grid matches (model)


@dataclass
class HarnessRun:
    """Per-scene areas: ``coarse[p][i]`` and ``refined[generator][p][i]`` for scene ``seeds[i]``."""

    seeds: list[int]
    perturbations: list[str]
    coarse: dict[str, list[Areas]]
    refined: dict[str, dict[str, list[Areas]]]
    seconds: dict[str, float]  # generator -> time spent in refine()
    panels: list[Panel] = field(default_factory=list)

    @property
    def refines(self) -> int:
        """refine() calls per generator."""
        return len(self.seeds) * len(self.perturbations)


def run_harness(refiner: "Refiner", seeds: Sequence[int], perturbations: Sequence[str], *, pictures: int = 0,
                advance: Callable[[], None] | None = None) -> HarnessRun:
    """Refine every perturbation of every scene with the model and both controls; ``pictures`` first scenes
    also keep a :class:`Panel` per perturbation. ``advance`` is called after each scene."""
    refiners = with_generators(refiner)
    run = HarnessRun(list(seeds), list(perturbations), {p: [] for p in perturbations},
                     {g: {p: [] for p in perturbations} for g in refiners}, {g: 0.0 for g in refiners})
    for i, seed in enumerate(seeds):
        scene = make_scene(seed)
        for name in perturbations:
            coarse = perturb(scene.labels, name, seed)
            probs = one_hot(coarse, len(CLASSES))  # what the ``file`` mask source makes of a label PNG
            run.coarse[name].append(intersect_and_union(coarse, scene.labels, NUM_CLASSES))
            panel = Panel(seed, name, scene.image, scene.labels, coarse, {}, {}) if i < pictures else None
            for generator, r in refiners.items():
                start = time.perf_counter()
                result = r.refine(scene.image, probs, CLASSES, return_generated=panel is not None,
                                  return_correspondence=panel is not None and generator == GENERATOR)
                run.seconds[generator] += time.perf_counter() - start
                run.refined[generator][name].append(intersect_and_union(result.labels, scene.labels, NUM_CLASSES))
                if panel is not None:
                    panel.refined[generator] = result.labels
                    if generator == GENERATOR:
                        panel.generated, panel.matches = result.generated or {}, result.correspondence or {}
            if panel is not None:
                run.panels.append(panel)
        if advance is not None:
            advance()
    return run


# ----- the report --------------------------------------------------------------------------------

def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _interval(pair: tuple[float, float]) -> list[float | None]:
    return [_number(v) for v in pair]


def _stack(per_scene: list[Areas]) -> Areas:
    return Areas.stack(per_scene, NUM_CLASSES)


def _miou(per_scene: list[Areas]) -> float:
    """mIoU of the summed areas (mmseg's dataset-level figure)."""
    return mean_iou(sum(per_scene, Areas.zeros(NUM_CLASSES)))


def _summed(run_areas: dict[str, list[Areas]]) -> list[Areas]:
    """Each scene's areas summed over the perturbations: the pooled figures resample scenes, not pairs."""
    scenes = len(next(iter(run_areas.values())))
    total = [Areas.zeros(NUM_CLASSES) for _ in range(scenes)]
    for areas in run_areas.values():
        total = [a + b for a, b in zip(total, areas)]
    return total


def _comparison(after: list[Areas], before: list[Areas], resamples: int, seed: int) -> dict[str, Any]:
    """mIoU of ``after``, its gain over ``before`` with the 95% paired bootstrap interval over scenes,
    and the shares of scenes whose own IoU rose / fell."""
    miou_after, miou_before = _miou(after), _miou(before)
    pairs = [(image_iou(b), image_iou(a)) for a, b in zip(after, before)]
    pairs = [(b, a) for b, a in pairs if not (math.isnan(a) or math.isnan(b))]
    return {"mIoU": _number(miou_after), "gain": _number(miou_after - miou_before),
            "gain_ci95": _interval(bootstrap_gain(_stack(after), _stack(before), resamples, seed)),
            "improved_fraction": sum(a > b for b, a in pairs) / len(pairs) if pairs else None,
            "worsened_fraction": sum(a < b for b, a in pairs) / len(pairs) if pairs else None}


def _control(run: HarnessRun, control: str, coarse_all: list[Areas], resamples: int, seed: int) -> dict[str, Any]:
    """A control's figures: pooled, and per perturbation, each against the coarse masks."""
    pooled = _comparison(_summed(run.refined[control]), coarse_all, resamples, seed)
    per = {}
    for name in run.perturbations:
        figures = _comparison(run.refined[control][name], run.coarse[name], resamples, seed)
        per[name] = {"refined": figures.pop("mIoU"), **figures}
    return {"refined_mIoU": pooled.pop("mIoU"), **pooled, "per_perturbation": per}


def summarise(run: HarnessRun, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The JSON report: ``coarse_mIoU``, ``refined_mIoU``, ``per_perturbation`` and ``controls``, each gain
    with its interval, and the model's gain over the noise control."""
    model, noise = run.refined[GENERATOR], run.refined["noise"]
    per: dict[str, dict[str, Any]] = {}
    for name in run.perturbations:
        coarse = run.coarse[name]
        own = _comparison(model[name], coarse, resamples, seed)
        over_noise = _comparison(model[name], noise[name], resamples, seed)
        per[name] = {"coarse": _number(_miou(coarse)), "refined": own.pop("mIoU"), **own,
                     **{c: _number(_miou(run.refined[c][name])) for c in CONTROLS},
                     "gain_over_noise": over_noise["gain"], "gain_over_noise_ci95": over_noise["gain_ci95"]}
    coarse_all, model_all = _summed(run.coarse), _summed(model)
    overall = _comparison(model_all, coarse_all, resamples, seed)
    over_noise = _comparison(model_all, _summed(noise), resamples, seed)
    controls = {control: _control(run, control, coarse_all, resamples, seed) for control in CONTROLS}
    return {
        "coarse_mIoU": _number(_miou(coarse_all)),
        "refined_mIoU": overall.pop("mIoU"), **overall,
        "gain_over_noise": over_noise["gain"], "gain_over_noise_ci95": over_noise["gain_ci95"],
        "per_perturbation": per,
        "controls": controls,
        "scenes": len(run.seeds),
        "seeds": [run.seeds[0], run.seeds[-1]] if run.seeds else [],
        "perturbations": run.perturbations,
        "classes": list(METRIC_CLASSES),
        "bootstrap": {"resamples": resamples, "seed": seed},
        "seconds_per_refine": {g: _number(s / max(run.refines, 1)) for g, s in run.seconds.items()},
    }


# ----- pictures ----------------------------------------------------------------------------------

def _colours(labels: np.ndarray) -> np.ndarray:
    from g4seg.io import voc_palette

    return np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)[labels]


def panel_figure(panel: Panel) -> Any:
    """One row: image, ground truth, coarse, the generation of the largest coarse class, its Eq. 8 matches
    (generated | original), refined by the model and by the noise control; each map titled with its IoU
    against the truth."""
    from matplotlib.figure import Figure

    from g4seg.toy.pictures import match_lines

    def score(labels: np.ndarray) -> str:
        return f"mIoU {image_iou(intersect_and_union(labels, panel.truth, NUM_CLASSES)):.1f}"

    present = np.bincount(panel.coarse.ravel(), minlength=NUM_CLASSES)[1:]
    shown = [CLASSES[k] for k in np.argsort(-present, kind="stable") if CLASSES[k] in panel.generated][:1]
    tiles = [("image", panel.image), ("ground truth", _colours(panel.truth)),
             (f"coarse ({panel.perturbation})\n{score(panel.coarse)}", _colours(panel.coarse)),
             (f"generated: {shown[0]}" if shown else "generated: none\n(no band pixels)",
              panel.generated[shown[0]] if shown else np.zeros_like(panel.image)),
             ("Eq. 8 matches\ngenerated | original", None),
             *((f"refined ({g})\n{score(panel.refined[g])}", _colours(panel.refined[g])) for g in (GENERATOR, "noise"))]
    figure = Figure(figsize=(2.0 * (len(tiles) + 1), 2.5))
    widths = [2 if tile is None else 1 for _, tile in tiles]
    for ax, (title, tile) in zip(figure.subplots(1, len(tiles), gridspec_kw={"width_ratios": widths}), tiles):
        if tile is not None:
            ax.imshow(tile, interpolation="nearest")
        elif shown:
            k = CLASSES.index(shown[0]) + 1
            match_lines(ax, panel.generated[shown[0]], panel.image, panel.matches[shown[0]], panel.coarse == k)
        ax.set_title(title, fontsize="small")
        ax.axis("off")
    figure.suptitle(f"scene {panel.seed}", fontsize="small")
    return figure
