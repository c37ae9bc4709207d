"""``g4seg bench``: a naive port of G4Seg against the optimised engine, in one run, on the same inputs.

Setup. The real architectures with seeded random weights, so that time and memory are those of the real
models (nothing is downloaded): the backbone from an SD repo folder built by
:func:`g4seg.testing.real_size.ensure_real_size_sd` (``--models DIR``, reused when it already holds a
repo; otherwise a temporary folder), and for the ``clip`` extractor a random open_clip ViT-B/16
(:func:`g4seg.testing.real_size.random_clip_options`, seeded). N synthetic images with K soft elliptic
masks each (:func:`g4seg.testing.real_size.synthetic_inputs`, image i seeded with ``seed + i``): soft, with
pixels in the confidence band, so every class of every image is refined. Random weights make no meaningful
segmentation; the labels only serve to compare the two paths.

The naive path is what a straightforward port of the paper does: float32, one class per UNet call, and for
every class the model-input resize, the original image's features, the VAE encode and the noising redone,
with the injector's processors built for that call. It is not a second implementation of G4Seg:
:class:`NaiveRefiner` is the :class:`~g4seg.refiner.Refiner` itself (fp32, ``class_batch = 1``, ``image_batch =
1``, nothing compiled or offloaded, no channels-last: :func:`naive_config`) whose per-image step ``_generate`` is
called once per class with that one class, so each call redoes the image's work exactly as the engine does it
once. Input checks, ramps, the band, Eq. 8/9 and
the merge are the refiner's own code, so the paths can only differ by what batching and the dtype change.

The optimised path is the engine as ``g4seg refine`` runs it: the run's dtype (``auto``: fp16 on CUDA, fp32
on CPU), ``class_batch`` classes per UNet call (default: all of them in one), the per-image work once per
image; ``Refiner.refine`` per image, or with ``image_batch`` > 1 ``Refiner.refine_many`` per batch of images
(their (image, class) pairs pooled, at most ``class_batch`` per UNet call; default then all the batch's
pairs). Other engine settings of the configuration (``compile``) reach it through ``engine``
(:func:`optimised_config`); :func:`run_pass` is where a new entry point would go.

Timing: each path first runs ``warmup`` untimed rounds on its first call's images (the first image, or the
first ``image_batch`` images: every kernel, allocation and, with ``compile``, graph of the pass's shapes is made
there), then ``repeats`` timed passes over all N images; a pass's time is divided by its N x K image-classes
and the median is reported. On CUDA every pass is bracketed by ``torch.cuda.synchronize``. When the two
configurations load the same models (same dtype, nothing compiled) the paths share one loaded set; otherwise
the naive path's models are freed before the optimised ones load.

Memory (``memory`` in the result says which): CUDA, ``torch.cuda.max_memory_allocated`` over the timed
passes (reset after the warm-up; it includes the weights). CPU, the peak resident set size over the timed
passes minus the RSS just before them (Linux ``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``;
glibc's free heap trimmed first): the working memory on top of the loaded weights. Where the peak cannot be
reset, ``ru_maxrss`` from ``getrusage``, a process-lifetime peak, is used; its delta is a lower bound (0 when
an earlier pass peaked higher).

Same result: the label maps of the two paths are compared pixel by pixel (``labels_equal``: all equal;
``label_agreement``: the fraction of equal pixels over all images). Tolerance rule: an fp32 optimised path
must give the naive labels exactly (only batching differs; ``min_agreement`` 1.0). With fp16/bf16 the
generations differ by rounding, and Eq. 8's argmax can flip a near-tie match and move a few band pixels, so
the rule is ``label_agreement >= 0.99``. ``same_result`` is the verdict; ``g4seg bench`` exits 1 when it is
false (after printing and writing the figures).
"""

from __future__ import annotations

import gc
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from g4seg.errors import G4SegError
from g4seg.refiner import Refiner

if TYPE_CHECKING:
    import numpy as np

    from g4seg.config import RefineConfig
    from g4seg.refiner import RefineResult

BUILDABLE = ("sd21", "sd15")  # backbones g4seg.testing.real_size can build with random weights
MAX_CLASSES = 20  # len(g4seg.testing.real_size.CLASS_NAMES)
PER_CALL = {"class_batch", "image_batch"}  # settings that change no loaded model: both paths can share them
HALF_MIN_AGREEMENT = 0.99  # fp16/bf16 optimised vs fp32 naive: share of equal label pixels
VERSIONED = ("g4seg", "torch", "diffusers", "transformers", "open_clip_torch", "numpy")
# defaults per device kind: (resolution, classes, images, repeats); CPU small enough for a few minutes on 2 cores
DEFAULTS = {"cuda": (512, 8, 4, 5), "cpu": (128, 2, 2, 3)}


@dataclass
class BenchSettings:
    """What ``g4seg bench`` measures; None picks the device kind's default (:data:`DEFAULTS`)."""

    backbone: str = "sd21"
    injector: str = "attn"
    extractor: str = "clip"
    resolution: int | None = None
    classes: int | None = None
    images: int | None = None
    class_batch: int | None = None  # classes per UNet call on the optimised path; None: all in one
    device: str = "auto"
    dtype: str = "auto"  # the optimised path's; the naive path is always fp32
    repeats: int | None = None
    warmup: int = 1
    seed: int = 0
    models: Path | None = None  # the random SD repo folder: reused if it holds one, else built there
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # -o COMPONENT.KEY=VALUE, over the defaults
    engine: dict[str, Any] = field(default_factory=dict)  # other RefineConfig fields for the optimised path


class NaiveRefiner(Refiner):
    """The refiner as a straightforward port runs it: each class alone, redoing the image's work.

    ``Refiner._generate`` takes images whose inputs are checked (their classes in the band: ``active``) and
    does each image's work (resize, original features, VAE encode, noising) once, then its classes in
    batches. Called once per class, with the image's state narrowed to that one class (the same probability
    tensor and result dicts, so Eq. 9 still updates the image in place), every class pays for all of it.
    Build it from a loaded refiner with :meth:`sharing`."""

    def _generate(self, states: list[Any]) -> None:
        for state in states:
            for k in state.active:
                super()._generate([replace(state, active=[k])])

    @classmethod
    def sharing(cls, refiner: Refiner, config: "RefineConfig") -> "NaiveRefiner":
        """A naive refiner on ``refiner``'s loaded components (which must be in ``config``'s dtype)."""
        return cls(config, refiner.backbone, refiner.injector, refiner.extractor, refiner.postprocessor)


# ----- configurations ------------------------------------------------------------------------------

def _defaults(settings: BenchSettings) -> BenchSettings:
    """``settings`` with every None filled in for the device kind (resolve_runtime decides auto)."""
    from g4seg.runtime import DTYPES, resolve_runtime

    runtime = resolve_runtime(settings.device, settings.dtype, offline=True)  # auto: fp16 on CUDA, else fp32
    settings = replace(settings, device=runtime.device,
                       dtype=next(name for name, full in DTYPES.items() if full == runtime.dtype))
    resolution, classes, images, repeats = DEFAULTS["cuda" if settings.device.startswith("cuda") else "cpu"]
    return replace(settings, resolution=settings.resolution or resolution, classes=settings.classes or classes,
                   images=settings.images or images, repeats=settings.repeats or repeats)



def check(settings: BenchSettings) -> BenchSettings:
    """Every cheap check before any model is built or loaded; returns the settings with defaults filled in.
    A bad value is one G4SegError."""
    for name in ("resolution", "classes", "images", "repeats", "class_batch"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise G4SegError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    image_batch = settings.engine.get("image_batch")
    if image_batch is not None and image_batch < 1:
        raise G4SegError(f"--image-batch must be at least 1, got {image_batch}")
    if settings.warmup < 0:
        raise G4SegError(f"--warmup must be 0 or more, got {settings.warmup}")
    if settings.classes is not None and settings.classes > MAX_CLASSES:
        raise G4SegError(f"--classes must be within 1..{MAX_CLASSES} (the synthetic scenes' class names), "
                         f"got {settings.classes}")
    if settings.dtype not in ("auto", "fp16", "bf16", "fp32"):
        raise G4SegError(f"invalid dtype '{settings.dtype}' (use auto, fp16, bf16 or fp32)")
    if "model" in settings.options.get("backbone", {}) and settings.models is not None:
        raise G4SegError("give the backbone's repo either as --models DIR or as -o backbone.model=..., not both")
    models = settings.models
    if models is not None and models.exists() and not models.is_dir():
        raise G4SegError(f"--models {models} is a file; give a folder (an SD repo, or where to build one)")
    from g4seg.plugins import registry

    registry().get("backbone", settings.backbone)  # an unknown name is its own error, before "cannot build"
    holds_repo = models is not None and (models / "model_index.json").is_file()
    if not holds_repo and "model" not in settings.options.get("backbone", {}) and settings.backbone not in BUILDABLE:
        raise G4SegError(f"random real-size weights can be built for {', '.join(BUILDABLE)} only, not "
                         f"'{settings.backbone}'; give --models DIR holding a repo of that backbone")
    settings = _defaults(settings)
    from g4seg.checks import check_settings
    from g4seg.testing.real_size import CLASS_NAMES

    config = optimised_config(settings, Path("models"))
    check_settings(config, CLASS_NAMES[:settings.classes])
    check_settings(naive_config(config), CLASS_NAMES[:settings.classes])
    return settings


def _options(settings: BenchSettings, models: Path) -> dict[str, dict[str, Any]]:
    """Component options: the random repo and random extractor weights under the user's ``-o`` overrides."""
    from g4seg.config import _merge
    from g4seg.testing.real_size import random_clip_options

    defaults: dict[str, dict[str, Any]] = {"backbone": {"model": f"local-dir:{models}"}}
    if settings.extractor == "clip":
        defaults["extractor"] = random_clip_options()
    elif settings.extractor == "dino":
        defaults["extractor"] = {"pretrained": "none"}
    return _merge(defaults, settings.options)


def optimised_config(settings: BenchSettings, models: Path) -> "RefineConfig":
    """The optimised path's configuration: the run's dtype, ``class_batch`` classes per call (default all),
    offline, plus ``settings.engine`` (RefineConfig fields such as image batching or compilation, where the
    configuration has them)."""
    from g4seg.config import RefineConfig, load_config

    unknown = sorted(set(settings.engine) - set(RefineConfig.model_fields))
    if unknown:
        raise G4SegError(f"this g4seg has no engine setting {', '.join(unknown)}")
    return load_config(None, backbone=settings.backbone, injector=settings.injector, extractor=settings.extractor,
                       device=settings.device, dtype=settings.dtype, offline=True, resolution=settings.resolution,
                       class_batch=settings.class_batch or settings.classes * settings.engine.get("image_batch", 1),
                       seed=settings.seed,
                       options=_options(settings, models), **settings.engine)


def naive_config(config: "RefineConfig") -> "RefineConfig":
    """``config`` as the naive port runs it: fp32, one class per call, and every engine optimisation
    RefineConfig offers switched off (image batching, compilation, offloading, where present), as is the
    backbone's channels-last layout where it would be on (its default on CUDA). Other ``-o`` options (which
    models, the decoder) are the user's choice and apply to both paths."""
    from g4seg.plugins import registry

    off: dict[str, Any] = {"dtype": "fp32", "class_batch": 1}
    for name, value in (("image_batch", 1), ("compile", False), ("offload", False)):  # later engine switches
        if name in type(config).model_fields:
            off[name] = value
    spec = registry().get("backbone", config.backbone)
    if "channels_last" in spec.options.model_fields:
        wanted = spec.parse_options(config.component_options("backbone")).channels_last
        if wanted or (wanted is None and config.device.startswith("cuda")):  # only where it would be on: on CPU
            off["options"] = {**config.options,  # the paths then share their models
                              "backbone": {**config.component_options("backbone"), "channels_last": False}}
    return config.model_copy(update=off)


def engine_settings(config: "RefineConfig") -> dict[str, Any]:
    """The engine settings of a configuration that the report shows (those it has)."""
    names = ("dtype", "class_batch", "image_batch", "compile", "offload")
    return {name: getattr(config, name) for name in names if name in type(config).model_fields}


# ----- measuring -------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of the passes between :meth:`start` and :meth:`stop`, in MiB (see the module docstring)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.method = ("cuda max_memory_allocated (includes the weights)" if self.cuda
                       else "cpu peak RSS minus RSS before (VmHWM reset via /proc/self/clear_refs)"
                       if _reset_rss_peak() else
                       "cpu ru_maxrss minus RSS before (process-lifetime peak: a lower bound)")
        self._before = 0.0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            _trim_heap()
            _reset_rss_peak()
            self._before = _rss_mib()

    def stop(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(0.0, _peak_rss_mib() - self._before)


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``), so that memory freed by the
    warm-up but still held by the allocator is not counted in the RSS before the timed passes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return _status_mib("VmHWM") is not None


def _rss_mib() -> float:
    return _status_mib("VmRSS") or 0.0


def _peak_rss_mib() -> float:
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


Inputs = list[tuple["np.ndarray", "np.ndarray", list[str]]]


def run_pass(refiner: Refiner, inputs: Inputs) -> list["RefineResult"]:
    """One pass of a path over every image: ``refine`` per image, or ``refine_many`` per ``image_batch``
    images when that is above 1 (the naive configuration sets it to 1). A failed image raises its error."""
    batch = getattr(refiner.config, "image_batch", 1)
    if batch <= 1:
        return [refiner.refine(image, probs, classes) for image, probs, classes in inputs]
    from g4seg.refiner import RefineItem

    results: list["RefineResult"] = []
    for start in range(0, len(inputs), batch):
        outcomes = refiner.refine_many([RefineItem(*args) for args in inputs[start:start + batch]])
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
            results.append(outcome)
    return results


def time_path(refiner: Refiner, inputs: Inputs, repeats: int, warmup: int,
              log: Callable[[str], None] = lambda line: None, name: str = "") -> tuple[dict[str, Any], list]:
    """``warmup`` untimed rounds on the first call's images, ``repeats`` timed passes over all; the figures and
    the last pass's results."""
    device = refiner.backbone.device
    image_classes = sum(len(classes) for _, _, classes in inputs)
    first = inputs[:max(1, getattr(refiner.config, "image_batch", 1))]
    for i in range(warmup):
        log(f"{name}: warm-up {i + 1}/{warmup} ({len(first)} image{'s' if len(first) > 1 else ''})")
        run_pass(refiner, first)
    memory = PeakMemory(device)
    memory.start()
    runs: list[float] = []
    results: list = []
    for i in range(repeats):
        log(f"{name}: timed pass {i + 1}/{repeats}")
        _sync(device)
        start = time.perf_counter()
        results = run_pass(refiner, inputs)
        _sync(device)
        runs.append((time.perf_counter() - start) * 1e3 / image_classes)
    figures = {"ms_per_image_class": statistics.median(runs), "peak_mb": memory.stop(),
               "ms_per_image_class_runs": runs, **engine_settings(refiner.config)}
    return figures, results


def compare(naive: list["RefineResult"], optimised: list["RefineResult"], dtype: str) -> dict[str, Any]:
    """Labels (and probabilities) of the two paths, and the tolerance rule's verdict."""
    import numpy as np

    equal = sum(int((a.labels == b.labels).sum()) for a, b in zip(naive, optimised))
    pixels = sum(a.labels.size for a in naive)
    agreement = equal / pixels
    minimum = 1.0 if dtype == "fp32" else HALF_MIN_AGREEMENT
    diff = max(float(np.abs(a.probs.astype(np.float64) - b.probs).max()) for a, b in zip(naive, optimised))
    return {"labels_equal": equal == pixels, "label_agreement": agreement, "max_abs_prob_diff": diff,
            "tolerance": {"min_agreement": minimum, "rule": (
                "fp32: labels equal exactly" if dtype == "fp32" else
                f"{dtype} vs fp32: at least {minimum:.0%} of label pixels equal (rounding can flip near-tie Eq. 8 "
                f"matches)")},
            "same_result": agreement >= minimum}


# ----- the run -----------------------------------------------------------------------------------------

def _load(config: "RefineConfig", seed: int) -> Refiner:
    import torch

    torch.manual_seed(seed)  # random extractor weights come from the global RNG: the same in every build
    root = logging.getLogger()
    root.addFilter(_random_weights_note)  # open_clip's "no pretrained weights" is the point here, not news
    try:
        return Refiner.from_config(config)
    finally:
        root.removeFilter(_random_weights_note)


def _random_weights_note(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def versions() -> dict[str, str | None]:
    """Python's and the main packages' versions (None: not installed)."""
    from g4seg.runtime import package_versions

    return {"python": platform.python_version(), **package_versions(VERSIONED)}


def run(settings: BenchSettings, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Check, build or reuse the random models, time the naive and the optimised path on the same inputs,
    compare their labels; returns the report (the JSON of ``g4seg bench``)."""
    settings = check(settings)
    from transformers.utils import logging as transformers_logging

    from g4seg.testing.real_size import device_name, ensure_real_size_sd, synthetic_inputs

    transformers_logging.disable_progress_bar()
    inputs = [synthetic_inputs(settings.resolution, settings.classes, seed=settings.seed + i)
              for i in range(settings.images)]
    with ExitStack() as stack:
        models = settings.models
        if models is None:
            models = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="g4seg-bench-"))) / settings.backbone
        if "model" not in settings.options.get("backbone", {}) and not (models / "model_index.json").is_file():
            log(f"building a random {settings.backbone} repo in {models} (~2.5 GB) ...")
            start = time.perf_counter()
            ensure_real_size_sd(models, settings.backbone)
            log(f"built in {time.perf_counter() - start:.0f} s")
        config = optimised_config(settings, models)
        plain = naive_config(config)
        log(f"loading {settings.backbone} ({plain.dtype}) ...")
        refiner = _load(plain, settings.seed)
        naive = NaiveRefiner.sharing(refiner, plain)
        device = refiner.backbone.device
        naive_figures, naive_results = time_path(naive, inputs, settings.repeats, settings.warmup, log, "naive")
        if config.model_dump(exclude=PER_CALL) != plain.model_dump(exclude=PER_CALL):  # other models to load
            del refiner, naive
            _free(device)
            log(f"loading {settings.backbone} ({config.dtype}) ...")
            refiner = _load(config, settings.seed)
        else:
            refiner = Refiner(config, refiner.backbone, refiner.injector, refiner.extractor, refiner.postprocessor)
        opt_figures, opt_results = time_path(refiner, inputs, settings.repeats, settings.warmup, log, "optimised")
        settings = replace(settings, class_batch=config.class_batch)  # the report shows what ran
        memory = PeakMemory(device).method
    report = {"naive": naive_figures, "optimised": opt_figures,
              "speedup": naive_figures["ms_per_image_class"] / opt_figures["ms_per_image_class"],
              **compare(naive_results, opt_results, config.dtype),
              "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
                           "image_classes_per_pass": settings.images * settings.classes},
              "device": device_name(device), "memory": memory, "versions": versions()}
    return report
