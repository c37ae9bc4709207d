"""What one click on the page's "Refine" does, without gradio: inputs in, pictures and files out.

The path is the CLI's, step for step, so the page shows what ``g4seg refine`` would do and its downloads
are the CLI's files byte for byte:

1. settings: the server's configuration (its flags, config file and ``-o`` options) with the page's
   fields on top, validated by :func:`g4seg.config.load_config`'s model; class names by the CLI's
   :func:`g4seg.cli.refine.class_list`;
2. inputs are copied into a folder of the request's own (:class:`~g4seg.web.workspace.Workspace`); a
   painted mask is written there as a label PNG (:func:`painted_labels`); then every cheap check of
   ``g4seg refine`` (:func:`g4seg.checks.check_settings`, :func:`g4seg.checks.check_items`);
3. the mask source reads the mask (``file`` for painted and uploaded masks, or e.g. ``sclip``), the
   refiner refines with ``return_generated`` and ``return_correspondence``;
4. the label PNG, probability NPZ and coarse label PNG are written by the writers ``g4seg refine``
   uses (:mod:`g4seg.io`), named as it names them (``<stem>.png``, ``<stem>.npz``), the coarse labels
   (``--save-coarse``'s ``coarse/<stem>.png``) as ``<stem>_coarse.png`` beside them.

Every user error is one :class:`~g4seg.errors.G4SegError` line naming the inputs as they were uploaded.

Models are loaded once and shared: components are cached by the settings that decide which models load
(:func:`model_key`); a request whose other settings differ (beta, timestep, band, seed, ...) gets a
shallow copy of the cached :class:`~g4seg.refiner.Refiner` with its own configuration. Refinements run
one at a time under one lock (torch work is serialized; every request's state is its own).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from g4seg.errors import G4SegError
from g4seg.web.workspace import Workspace, relative_message

if TYPE_CHECKING:
    from g4seg.config import RefineConfig
    from g4seg.refiner import Refiner

PAINT = "paint"  # coarse mask painted on the page
UPLOAD = "file"  # coarse mask uploaded as a file (the `file` mask source)
PAINT_COLOURS = 8  # brush colours offered: classes 1..8 in the VOC label colours
ALPHA_PAINTED = 128  # a layer pixel at least this opaque is painted (brush edges are antialiased)
MODELS_KEPT = 2  # model sets kept loaded (switching backbones back and forth does not reload)
MODEL_FIELDS = ("backbone", "injector", "extractor", "postprocessor", "device", "dtype", "offline", "compile",
                "offload")
PAGE_FIELDS = ("backbone", "injector", "extractor", "timestep", "beta", "cf", "seed")
Progress = Callable[[float, str], None]


def class_colours(count: int = PAINT_COLOURS) -> list[tuple[int, int, int]]:
    """The label colours of classes 1..count (the VOC palette the label PNGs and overlays use)."""
    from g4seg.io import voc_palette

    flat = voc_palette()
    return [tuple(flat[3 * k:3 * k + 3]) for k in range(1, count + 1)]


def painted_labels(layers: list[np.ndarray], hw: tuple[int, int], num_classes: int) -> np.ndarray:
    """The (H, W) uint8 label map painted on the editor's RGBA ``layers`` (later layers on top).

    A pixel is painted where a layer is at least half opaque; its class is the nearest brush colour
    (:func:`class_colours`). A layer of another size than the image (a scaled canvas) is resized
    nearest-neighbour. A colour of a class beyond ``num_classes`` is a G4SegError.
    """
    from PIL import Image

    colours = np.array(class_colours(), dtype=np.int32)
    labels = np.zeros(hw, dtype=np.uint8)
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue  # not a painted layer (the editor sends RGBA)
        if layer.shape[:2] != tuple(hw):
            layer = np.asarray(Image.fromarray(layer).resize((hw[1], hw[0]), Image.NEAREST))
        painted = layer[..., 3] >= ALPHA_PAINTED
        rgb = layer[..., :3][painted].astype(np.int32)
        nearest = ((rgb[:, None, :] - colours[None]) ** 2).sum(axis=2).argmin(axis=1) + 1
        labels[painted] = nearest
    if labels.max() > num_classes:
        raise G4SegError(f"the painted mask uses the colour of class {int(labels.max())}, but only {num_classes} "
                         f"class name(s) were given")
    return labels


def own_options(mask_source: str, options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The server's ``-o mask_source.*`` options that ``mask_source`` has: the page switches between mask
    sources, so ``preset=toy`` is SCLIP's and ``resize=true`` the file source's, each given to its own."""
    from g4seg.plugins import registry

    declared = registry().get("mask_source", mask_source).options.model_fields
    return {k: v for k, v in options.get("mask_source", {}).items() if k in declared}


def model_key(config: "RefineConfig") -> str:
    """The settings that decide which models are loaded (everything else is per request)."""
    import json

    chosen = {name: getattr(config, name) for name in MODEL_FIELDS}
    chosen["options"] = {k: v for k, v in config.options.items() if k != "mask_source"}
    return json.dumps(chosen, sort_keys=True, default=str)


@dataclass
class PageInputs:
    """What the page sends: uploaded files as paths in gradio's upload cache, the painted layers, text."""

    image: str | None
    classes: str
    mask_from: str = PAINT  # PAINT, UPLOAD, or a mask source that needs no file (e.g. "sclip")
    mask_file: str | None = None
    painted: list[np.ndarray] = field(default_factory=list)
    truth: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # PAGE_FIELDS; cf as "LO,HI" text


@dataclass
class PageResult:
    """Everything the page shows after a refinement."""

    panels: dict[str, np.ndarray]  # image, coarse, changed, refined, correspondence (if any)
    generated: list[tuple[np.ndarray, str]]
    files: dict[str, Path]  # labels, probs, coarse
    iou: list[list[Any]] | None  # rows: class, coarse IoU %, refined IoU %
    summary: str
    matched_class: str | None = None


class Refinements:
    """The server's shared state: its configuration, its workspace and the loaded models."""

    def __init__(self, base: "RefineConfig", workspace: Workspace) -> None:
        self.base = base
        self.workspace = workspace
        self._lock = threading.Lock()
        self._models: dict[str, Refiner] = {}
        self._sources: dict[str, Any] = {}

    def config(self, settings: dict[str, Any], mask_source: str) -> "RefineConfig":
        """The server's configuration with the page's fields (and mask source) on top; the CLI's messages."""
        from g4seg.cli.refine import parse_band
        from g4seg.config import load_config

        page = {k: v for k, v in settings.items() if k in PAGE_FIELDS and v not in (None, "")}
        if "cf" in page:
            page["cf"] = parse_band(str(page["cf"]))
        for name in ("timestep", "seed"):
            if name in page:
                page[name] = _whole(page[name], name)
        data = self.base.model_dump()
        data.update(page, mask_source="file" if mask_source in (PAINT, UPLOAD) else mask_source)
        data["options"] = {**data["options"], "mask_source": own_options(data["mask_source"], data["options"])}
        return load_config(None, **data)

    def refiner(self, config: "RefineConfig", runtime: Any) -> "Refiner":
        """A refiner for ``config`` on the cached models (built on first use); call holding the lock."""
        from g4seg.refiner import Refiner

        key = model_key(config)
        if key not in self._models:
            if len(self._models) >= MODELS_KEPT:
                self._models.pop(next(iter(self._models)))
            self._models[key] = Refiner.from_config(config, runtime)
        shared = copy.copy(self._models[key])
        shared.config = config
        return shared

    def mask_source(self, config: "RefineConfig", runtime: Any) -> Any:
        import json

        from g4seg.plugins import registry

        options = config.component_options("mask_source")
        key = json.dumps([config.mask_source, options, model_key(config)], sort_keys=True, default=str)
        if key not in self._sources:
            self._sources[key] = registry().get("mask_source", config.mask_source).build(options, runtime)
        return self._sources[key]

    def run(self, inputs: PageInputs, progress: Progress = lambda fraction, text: None) -> PageResult:
        """Refine one request in a folder of its own; a G4SegError names the inputs as uploaded."""
        folder = self.workspace.new_request()
        try:
            return self._run(inputs, folder, progress)
        except G4SegError as exc:
            raise G4SegError(relative_message(str(exc), folder)) from None

    def _run(self, inputs: PageInputs, folder: Path, progress: Progress) -> PageResult:
        from g4seg import io
        from g4seg.checks import check_image, check_items, check_settings
        from g4seg.cli.refine import class_list
        from g4seg.runner import WorkItem

        progress(0.0, "checking the inputs")
        if not inputs.image:
            raise G4SegError("upload an image (or pick an example) first")
        config = self.config(inputs.settings, inputs.mask_from)
        names = class_list(inputs.classes)
        image_path = self.workspace.take(inputs.image, folder)
        stem = image_path.stem
        mask_path = None
        if inputs.mask_from == PAINT:
            hw = check_image(image_path)
            mask_path = folder / f"{stem}_painted.png"
            io.save_label_png(mask_path, painted_labels(inputs.painted, hw, len(names)))
        elif inputs.mask_from == UPLOAD:
            if not inputs.mask_file:
                raise G4SegError("upload a coarse mask file, or paint the mask, or let a mask source make it")
            mask_path = self.workspace.take(inputs.mask_file, folder)
        runtime = check_settings(config, names)
        problems = check_items([WorkItem(stem, image_path, mask_path)], names, config, runtime)
        if problems:
            raise G4SegError(problems[stem])
        truth = self._truth(inputs.truth, folder, image_path) if inputs.truth else None
        with self._lock:
            progress(0.15, "loading the models (once)")
            refiner = self.refiner(config, runtime)
            source = self.mask_source(config, runtime)
            progress(0.3, "reading the coarse mask")
            image = io.load_image(image_path)
            coarse = source.load(image_path, mask_path, names, image.shape[:2])
            progress(0.45, "refining: one mask-injected diffusion step per class")
            result = refiner.refine(image, coarse.probs, names, background=coarse.background, ignore=coarse.ignore,
                                    source_rule=coarse.merge, return_generated=True, return_correspondence=True)
        progress(0.85, "drawing")
        out = folder / "out"
        files = {"labels": out / f"{stem}.png", "probs": out / f"{stem}.npz", "coarse": out / f"{stem}_coarse.png"}
        io.save_label_png(files["labels"], result.labels)
        io.save_probs_npz(files["probs"], result.probs, names, result.background)
        io.save_label_png(files["coarse"], result.coarse_labels)
        return self._page(image, coarse, result, config, files, truth, names)

    def _truth(self, upload: str, folder: Path, image_path: Path) -> np.ndarray:
        """The uploaded ground truth label map, checked against the image's size."""
        from g4seg.checks import check_image
        from g4seg.datasets import read_index_png

        path = self.workspace.take(upload, folder, f"truth_{Path(upload).name}")
        truth = read_index_png(path)
        hw = check_image(image_path)
        if truth.shape != tuple(hw):
            raise G4SegError(f"ground truth {path.name} is {truth.shape[0]}x{truth.shape[1]}, the image "
                             f"{hw[0]}x{hw[1]}; give the label map of this image")
        return truth

    def _page(self, image: np.ndarray, coarse: Any, result: Any, config: "RefineConfig", files: dict[str, Path],
              truth: np.ndarray | None, names: list[str]) -> PageResult:
        from g4seg import io
        from g4seg.web import panels as draw

        shown = {"image": image, "coarse": io.overlay(image, result.coarse_labels),
                 "changed": draw.changed(image, result.coarse_labels, result.labels),
                 "refined": io.overlay(image, result.labels)}
        lines = draw.correspondence(image, result, draw.input_probs(coarse, config), config.cf)
        if lines is not None:
            shown["correspondence"] = lines[0]
        generated = [(picture, name) for name, picture in (result.generated or {}).items()]
        moved = int((result.coarse_labels != result.labels).sum())
        summary = (f"{moved} pixel(s) changed label of {result.labels.size}; "
                   f"{len(generated)} of {len(names)} class(es) had pixels in the band [{config.cf[0]}, "
                   f"{config.cf[1]}] (backbone {config.backbone}, t = {config.timestep}, beta = {config.beta}, "
                   f"seed {config.seed})")
        rows = iou_rows(result.coarse_labels, result.labels, truth, names) if truth is not None else None
        return PageResult(shown, generated, files, rows, summary, lines[1] if lines else None)


def iou_rows(coarse: np.ndarray, refined: np.ndarray, truth: np.ndarray, names: list[str]) -> list[list[Any]]:
    """Per-class IoU (%) of the coarse and the refined labels against ``truth`` (255 ignored), background
    first, then the mean over classes with a non-zero union (g4seg.metrics, as ``g4seg eval`` counts)."""
    from g4seg.metrics import intersect_and_union, iou_percent, mean_iou

    before, after = (intersect_and_union(labels, truth, len(names) + 1) for labels in (coarse, refined))
    rows = [[name, _round(b), _round(a)]
            for name, b, a in zip(["background", *names], iou_percent(before), iou_percent(after))]
    return rows + [["mIoU", _round(mean_iou(before)), _round(mean_iou(after))]]


def _round(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 2)


def _whole(value: Any, name: str) -> int:
    """A whole number from a page field (gradio's Number sends floats)."""
    number = float(value)
    if not number.is_integer():
        raise G4SegError(f"{name} must be a whole number, got {value}")
    return int(number)
