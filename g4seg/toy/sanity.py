"""Sanity figures of the toy world (issue 8, item 3): does each piece of the method do its job at all?

Measured on held-out scenes with the library's own pieces (the refiner's one-step generation,
:meth:`Refiner.noised` and :meth:`Refiner.denoise`, with the configured injector or none,
:meth:`Refiner.refine`, :func:`g4seg.correspondence.source_pixels`); noise is the refiner's (the config's
``noise``; with ``add``, ``seeded_noise(seed)``, one draw reused for every image, as every refinement does).

- **reconstruction**: PSNR of the VAE's reconstruction, and of one-step x~0 at ``timestep`` prompted with
  the scene's caption, against the input, against the VAE's own reconstruction (what the UNet could at
  best give back), and against another scene (the floor: what any image of this world scores). Also x~0
  with the empty prompt.
- **prompt**: x~0 prompted with the scene's largest class vs a seeded wrong class: PSNR of each, the
  mean pixel change between them inside and outside that object, and the toy CLIP's zero-shot label of
  the object's box in each (does the image follow the prompt?).
- **injection**: a class A absent from the scene is injected into a free background square R (prompt
  filled with A), with the configured injector and with ``none``; the toy CLIP labels R's crop of each
  generation among "a photo of a {background, ball, ...}". If injection works, ``attn`` makes A there
  far more often than ``none``, and changes R more than the rest of the image.
- **correspondence**: the ground-truth mask is refined (so the correct mask is injected); for each
  generated class the Eq. 8 matches, brought to pixels as Eq. 9 reads them, land on a pixel of the same
  ground-truth class at this rate, against chance (a uniformly random source pixel) and the ``noise``
  and ``self`` generators. Over all pixels, the class's own pixels, and the pixels in the confidence band
  (the only ones Eq. 9 changes).

Changes are mean absolute differences in 0..255 grey levels; rates are fractions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from g4seg.errors import G4SegError
from g4seg.toy.scenes import CLASSES, Scene, caption, make_scene
from g4seg.toy.train import BACKGROUND_WORD, psnr

if TYPE_CHECKING:
    import torch

    from g4seg.components import Backbone, Injector
    from g4seg.config import RefineConfig
    from g4seg.refiner import Refiner

BATCH = 16
REGION = 16  # side of the injected background square, in pixels of the 64 px scene
LABELS = (BACKGROUND_WORD, *CLASSES)  # the zero-shot classifier's answers


class ZeroShot:
    """The extractor's CLIP (text tower included) as a classifier of crops among :data:`LABELS`."""

    def __init__(self, config: "RefineConfig", runtime: Any) -> None:
        import torch.nn.functional as F

        from g4seg.clip_model import ClipModelOptions, load_clip, on_runtime, tokenizer
        from g4seg.plugins import registry

        options = registry().get("extractor", config.extractor).parse_options(config.component_options("extractor"))
        if not isinstance(options, ClipModelOptions):
            raise G4SegError(f"the sanity figures need a CLIP extractor (e.g. toy-clip) for their zero-shot labels, "
                             f"got '{config.extractor}'")
        loaded = load_clip(options, runtime, "extractor")
        self.model = on_runtime(loaded.model, runtime)
        self.device = next(self.model.parameters()).device
        self.size = tuple(self.model.visual.image_size)
        self.mean = torch_tensor(loaded.mean, self.device).view(1, 3, 1, 1)
        self.std = torch_tensor(loaded.std, self.device).view(1, 3, 1, 1)
        tokens = tokenizer(loaded, options.cache_dir)([caption([name]) for name in LABELS]).to(self.device)
        with no_grad():
            self.text = F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def __call__(self, crops: Sequence["torch.Tensor"]) -> np.ndarray:
        """Indices into :data:`LABELS` of (3, h, w) crops in [0, 1], each resized to the tower's input."""
        import torch
        import torch.nn.functional as F

        if not crops:
            return np.zeros(0, dtype=int)
        batch = torch.cat([F.interpolate(c[None].float().to(self.device), size=self.size, mode="bilinear",
                                         antialias=True, align_corners=False) for c in crops]).clamp(0, 1)
        with no_grad():
            image = F.normalize(self.model.encode_image((batch - self.mean) / self.std).float(), dim=-1)
        return (image @ self.text.T).argmax(dim=1).cpu().numpy()


def torch_tensor(values: Sequence[float], device: Any) -> "torch.Tensor":
    import torch

    return torch.tensor(values, dtype=torch.float32, device=device)


def no_grad() -> Any:
    import torch

    return torch.inference_mode()


@dataclass
class Parts:
    """Everything the figures use, built once: the refiner (backbone, injector, extractor), ``none``, CLIP."""

    refiner: "Refiner"
    no_injector: "Injector"
    zero_shot: ZeroShot

    @property
    def backbone(self) -> "Backbone":
        return self.refiner.backbone

    @property
    def config(self) -> "RefineConfig":
        return self.refiner.config


def build_parts(config: "RefineConfig") -> Parts:
    from g4seg.plugins import registry
    from g4seg.refiner import Refiner
    from g4seg.runtime import resolve_runtime

    runtime = resolve_runtime(config.device, config.dtype, config.offline)
    refiner = Refiner.from_config(config, runtime)
    return Parts(refiner, registry().get("injector", "none").build({}, runtime), ZeroShot(config, runtime))


# ----- one step ----------------------------------------------------------------------------------

def pixels_of(scenes: Sequence[Scene], size: int) -> "torch.Tensor":
    """(B, 3, size, size) in [0, 1], resized as the refiner resizes its input."""
    from g4seg.refiner import model_input

    return model_input(np.stack([s.image for s in scenes]), size)


def one_step(parts: Parts, pixels: "torch.Tensor", prompts: list[str], injector: "Injector | None" = None,
             masks: "torch.Tensor | None" = None, tokens: list[list[int]] | None = None) -> "torch.Tensor":
    """Decoded x~0 (B, 3, S, S) in [0, 1] of one UNet step at the config's timestep, with ``injector`` binding
    ``masks`` (B, S, S) bool to the ``tokens`` of each prompt when given: the refiner's own two halves
    (:meth:`Refiner.noised`, :meth:`Refiner.denoise`; the config's ``noise`` and guidance included), for a batch
    of images with one prompt each."""
    bb, refiner = parts.backbone, parts.refiner
    with no_grad():
        hw = tuple(pixels.shape[-2:])
        z0 = bb.encode(pixels.to(bb.device, bb.dtype))
        cond = bb.encode_prompts(prompts, hw)
        return refiner.denoise(refiner.noised(z0, hw, cond), cond, injector, masks, tokens).cpu()


def vae_reconstruction(parts: Parts, pixels: "torch.Tensor") -> "torch.Tensor":
    bb = parts.backbone
    with no_grad():
        return bb.decode(bb.encode(pixels.to(bb.device, bb.dtype))).float().clamp(0, 1).cpu()


def _chunks(items: Sequence[Any], size: int = BATCH) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _change(a: "torch.Tensor", b: "torch.Tensor", where: "torch.Tensor") -> float | None:
    """Mean |a - b| in grey levels over the pixels of ``where`` (B, S, S) bool; None when empty."""
    diff = (a - b).abs().mean(dim=1) * 255
    return float(diff[where].mean()) if bool(where.any()) else None


def _box(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _resized(labels: np.ndarray, size: int) -> np.ndarray:
    """A label map at the model's side (nearest), the geometry masks are injected at."""
    if labels.shape == (size, size):
        return labels
    index = (np.arange(size) * labels.shape[0]) // size, (np.arange(size) * labels.shape[1]) // size
    return labels[index[0][:, None], index[1][None, :]]


# ----- the figures -------------------------------------------------------------------------------

def reconstruction(parts: Parts, seeds: list[int], scenes: list[Scene]) -> dict[str, Any]:
    """PSNR of the VAE and of one-step x~0 (caption prompt, and empty prompt) against the input, the
    VAE's reconstruction and another scene (each x~0 against the next scene's image)."""
    import torch

    size = parts.backbone.resolution
    inputs, recon, x0, empty = [], [], [], []
    for chunk in _chunks(scenes):
        pixels = pixels_of(chunk, size)
        inputs.append(pixels)
        recon.append(vae_reconstruction(parts, pixels))
        x0.append(one_step(parts, pixels, [s.caption for s in chunk]))
        empty.append(one_step(parts, pixels, [""] * len(chunk)))
    inputs, recon, x0, empty = (torch.cat(t) for t in (inputs, recon, x0, empty))
    return {"vae_psnr_db": psnr(recon, inputs),
            "x0_psnr_db": {"vs_input": psnr(x0, inputs), "vs_vae_reconstruction": psnr(x0, recon),
                           "floor_other_scene": psnr(x0, inputs.roll(1, dims=0)) if len(scenes) > 1 else None},
            "x0_empty_prompt_psnr_db": psnr(empty, inputs)}


def prompt_effect(parts: Parts, seeds: list[int], scenes: list[Scene]) -> dict[str, Any]:
    """x~0 prompted with the largest class A vs a seeded wrong class B (see the module docstring)."""
    import torch

    size, cfg = parts.backbone.resolution, parts.config
    x_right, x_wrong, inputs, inside, crops = [], [], [], [], {"original": [], "right": [], "wrong": []}
    truth, wrong_truth = [], []
    for chunk_seeds, chunk in zip(_chunks(seeds), _chunks(scenes)):
        pixels = pixels_of(chunk, size)
        right = [s.classes[0] for s in chunk]
        wrong = [_other_class(seed, name) for seed, name in zip(chunk_seeds, right)]
        a, b = (one_step(parts, pixels, [cfg.prompt.format(n) for n in names]) for names in (right, wrong))
        for i, s in enumerate(chunk):
            mask = _resized(s.labels, size) == CLASSES.index(right[i]) + 1
            box = _box(mask)
            for key, image in (("original", pixels), ("right", a), ("wrong", b)):
                crops[key].append(image[i][:, box[0], box[1]])
            inside.append(torch.from_numpy(mask))
        x_right.append(a)
        x_wrong.append(b)
        inputs.append(pixels)
        truth += [LABELS.index(n) for n in right]
        wrong_truth += [LABELS.index(n) for n in wrong]
    a, b, pixels, inside = torch.cat(x_right), torch.cat(x_wrong), torch.cat(inputs), torch.stack(inside)
    labelled = {key: parts.zero_shot(value) for key, value in crops.items()}
    truth, wrong_truth = np.array(truth), np.array(wrong_truth)
    return {"psnr_correct_prompt_db": psnr(a, pixels), "psnr_wrong_prompt_db": psnr(b, pixels),
            "change_inside_object": _change(a, b, inside), "change_outside_object": _change(a, b, ~inside),
            "zero_shot": {"original_is_class": float((labelled["original"] == truth).mean()),
                          "correct_prompt_is_class": float((labelled["right"] == truth).mean()),
                          "wrong_prompt_is_class": float((labelled["wrong"] == truth).mean()),
                          "wrong_prompt_is_wrong_class": float((labelled["wrong"] == wrong_truth).mean())}}


def _other_class(seed: int, name: str) -> str:
    """A seeded class other than ``name``."""
    return str(np.random.default_rng([seed, 1]).choice([c for c in CLASSES if c != name]))


def free_square(labels: np.ndarray, side: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """Top-left corner of a seeded ``side`` x ``side`` square holding only background, or None."""
    height, width = labels.shape
    if side > min(height, width):
        return None
    filled = np.pad((labels != 0).astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = filled[side:, side:] - filled[:-side, side:] - filled[side:, :-side] + filled[:-side, :-side]
    ys, xs = np.nonzero(counts == 0)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return int(ys[i]), int(xs[i])


def injection(parts: Parts, seeds: list[int], scenes: list[Scene], side: int = REGION) -> dict[str, Any]:
    """A class absent from the scene injected into a free background square (see the module docstring)."""
    import torch

    size, cfg = parts.backbone.resolution, parts.config
    cases = []  # (scene, class name, region mask at the model's side)
    for seed, s in zip(seeds, scenes):
        rng = np.random.default_rng([seed, 2])
        span = side * size // s.labels.shape[0]  # the square at the model's side
        corner = free_square(_resized(s.labels, size), span, rng)
        absent = [c for c in CLASSES if c not in s.classes]
        if corner is None or not absent:
            continue
        region = np.zeros((size, size), dtype=bool)
        region[corner[0]:corner[0] + span, corner[1]:corner[1] + span] = True
        cases.append((s, str(rng.choice(absent)), region))
    injectors = {cfg.injector: parts.refiner.injector, "none": parts.no_injector}
    generated: dict[str, list[torch.Tensor]] = {name: [] for name in injectors}
    inputs, regions = [], []
    for chunk in _chunks(cases):
        pixels = pixels_of([c[0] for c in chunk], size)
        prompts = [cfg.prompt.format(c[1]) for c in chunk]
        tokens = [parts.backbone.token_indices(p, c[1]) for p, c in zip(prompts, chunk)]
        masks = torch.from_numpy(np.stack([c[2] for c in chunk]))
        for name, injector in injectors.items():
            generated[name].append(one_step(parts, pixels, prompts, injector, masks, tokens))
        inputs.append(pixels)
        regions.append(masks)
    if not cases:
        return {"regions": 0}
    pixels, region = torch.cat(inputs), torch.cat(regions)
    target = np.array([LABELS.index(c[1]) for c in cases])

    def crops(images: torch.Tensor) -> list[torch.Tensor]:
        return [images[i][:, box[0], box[1]] for i, box in enumerate(_box(c[2]) for c in cases)]

    original = parts.zero_shot(crops(pixels))
    report: dict[str, Any] = {"regions": len(cases), "side": side,
                              "original": {"labelled_class": float((original == target).mean()),
                                           "labelled_background": float((original == 0).mean())}}
    images = {name: torch.cat(batches) for name, batches in generated.items()}
    for name, image in images.items():
        label = parts.zero_shot(crops(image))
        report[name] = {"labelled_class": float((label == target).mean()),
                        "labelled_background": float((label == 0).mean()),
                        "change_inside": _change(image, pixels, region),
                        "change_outside": _change(image, pixels, ~region)}
    if cfg.injector != "none":
        report[f"{cfg.injector}_vs_none"] = {"change_inside": _change(images[cfg.injector], images["none"], region),
                                             "change_outside": _change(images[cfg.injector], images["none"], ~region)}
    return report


def correspondence_rates(parts: Parts, seeds: list[int], scenes: list[Scene]) -> dict[str, Any]:
    """How often Eq. 8's matches (brought to pixels) land on the same ground-truth class, per generator,
    with the ground-truth mask injected; and the chance rate of a uniformly random source pixel."""
    import torch

    from g4seg import correspondence, masks
    from g4seg.masks import one_hot
    from g4seg.toy.harness import with_generators

    cfg = parts.config
    lo, hi = cfg.cf
    sets = ("all", "object", "band")
    hits = {g: dict.fromkeys(sets, 0) for g in ("model", "noise", "self")}
    chance, counts = dict.fromkeys(sets, 0.0), dict.fromkeys(sets, 0)
    refiners = with_generators(parts.refiner)
    for s in scenes:
        labels = s.labels
        share = np.bincount(labels.ravel(), minlength=len(CLASSES) + 1) / labels.size
        ramps = masks.ramp(labels, len(CLASSES), masks.ramp_pixels(cfg.ramp_width, labels.shape))
        results = {g: refiners[g].refine(s.image, one_hot(labels, len(CLASSES)), CLASSES, return_correspondence=True)
                   for g in hits}
        for name in results["model"].correspondence:
            k = CLASSES.index(name)
            where = {"all": np.ones_like(labels, dtype=bool), "object": labels == k + 1,
                     "band": (ramps[k] >= lo) & (ramps[k] <= hi)}
            for key, pixels in where.items():
                counts[key] += int(pixels.sum())
                chance[key] += float(share[labels[pixels]].sum())
            for g, result in results.items():
                delta = torch.from_numpy(result.correspondence[name]).view(1, -1)
                source = correspondence.source_pixels(delta, tuple(result.correspondence[name].shape),
                                                      labels.shape)[0].numpy()
                same = labels.ravel()[source] == labels
                for key, pixels in where.items():
                    hits[g][key] += int(same[pixels].sum())

    def rate(value: float, count: int) -> float | None:
        return value / count if count else None

    return {**{g: {key: rate(h[key], counts[key]) for key in sets} for g, h in hits.items()},
            "chance": {key: rate(chance[key], counts[key]) for key in sets}, "pixels": counts}


FIGURES: dict[str, Callable[[Parts, list[int], list[Scene]], dict[str, Any]]] = {
    "reconstruction": reconstruction, "prompt": prompt_effect, "injection": injection,
    "correspondence": correspondence_rates}


def sanity(parts: Parts, seeds: Sequence[int], advance: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every figure on the scenes of ``seeds``; ``advance(name)`` after each figure."""
    scenes = [make_scene(seed) for seed in seeds]
    seeds = list(seeds)
    report: dict[str, Any] = {"scenes": len(scenes), "seeds": [seeds[0], seeds[-1]], "timestep": parts.config.timestep,
                              "seed": parts.config.seed, "prompt_template": parts.config.prompt}
    for name, figure in FIGURES.items():
        report[name] = figure(parts, seeds, scenes)
        if advance is not None:
            advance(name)
    return report
