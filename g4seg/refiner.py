"""The G4Seg orchestrator: noise once, one injected UNet step per class, correspond, mix, merge.

It knows no concrete plugin: components come from the registry by name and are used only through
the protocols in :mod:`g4seg.components`.

Around Eq. 9 everything is neutral (the identity principle, :mod:`g4seg.masks`): the input label map
is computed first (a hard input's own labels, or a soft input merged by its baseline's rule), each
class's injection mask is its region there, and the output is merged by the same rule, so that with
beta = 1 the output labels are the input labels.

Two engine settings follow DenseDiffusion where the paper is silent, both off by default:
``guidance_scale`` runs classifier-free guidance (batch [unconditional, conditional]; only the
conditional half is injected; x~0 uses the guided prediction), and ``class_embedding = "alone"``
replaces the class-name token embeddings of the prompt by those of the name encoded on its own
(DenseDiffusion's ``cond_embeddings[0][j:j+wlen] = cond_embeddings[i][1:1+wlen]``).

``generator`` chooses what Eq. 8 compares the image with: ``model`` (the one-step generation above) or a
bias control that makes no generation (no noising, no one-step UNet call, no decoding; a feature
extractor may still run a model of its own, e.g. ``sd`` reads the backbone's UNet). ``self`` compares the
image with itself (what Eq. 9 does when every pixel can match itself); ``noise`` with seeded noise of the
image's per-channel mean and std (what Eq. 9 does when the "generation" carries no information). See
docs/evaluation.md.

``noise`` chooses how the image latent reaches t_s before the one step: ``add`` (one seeded noise addition,
the paper's), ``ddim-inversion`` or ``null-text`` (Table IV); the inversions and their choices are in
:mod:`g4seg.inversion`. :meth:`Refiner.noised` and :meth:`Refiner.denoise` are the two halves of the
generation, shared with the toy sanity figures (:func:`g4seg.toy.sanity.one_step`); the seconds spent in
the first half are reported per image (``RefineResult.noise_seconds``, the manifest's ``noise_seconds``).

``compile`` and ``offload`` change how fast and in how much GPU memory the models run, not what they compute
(:mod:`g4seg.acceleration`): components with a ``compile_models()`` method compile their models when the refiner
is built, and a call that compiled something reports its seconds (``RefineResult.warmup_seconds``, the manifest's
``warmup_seconds``, one stderr line); ``offload`` reaches the backbone through ``Runtime.offload``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from g4seg import correspondence, diffusion_math, inversion, masks
from g4seg.acceleration import check_speed_settings, compiled_graphs
from g4seg.components import Backbone, Conditioning, Extractor, Injector, PostProcessor
from g4seg.config import NO_GUIDANCE_TAG, RefineConfig, guidance_refusal  # noqa: F401 (NO_GUIDANCE_TAG: re-exported)
from g4seg.errors import G4SegError
from g4seg.plugins import registry
from g4seg.registry import Runtime, incompatibility
from g4seg.runtime import resolve_runtime


@dataclass
class RefineResult:
    """Refined probabilities (K, H, W), the merged label map (H, W) and optional diagnostics.

    ``coarse_labels`` is the input label map (what ``labels`` equals with beta = 1). For a hard input
    ``probs`` are its refined signed-distance ramps. ``generated`` (the image each class was compared
    with: its generation, or the control's image) and ``correspondence`` hold entries only for classes
    that had pixels inside the confidence band (others cannot change, so no generation is run for them).
    """

    probs: np.ndarray
    labels: np.ndarray
    classes: list[str]
    coarse_labels: np.ndarray
    background: np.ndarray | None = None  # the baseline's background channel (unchanged), if it had one;
    # after a background-aware post-processor (components.SeesBackground) its background
    generated: dict[str, np.ndarray] | None = None
    correspondence: dict[str, np.ndarray] | None = None
    noise_seconds: float | None = None  # time spent bringing the latent to t_s (``noise``); None: no generation
    warmup_seconds: float | None = None  # with ``compile``: this call's seconds when it compiled models, else None


@dataclass
class RefineItem:
    """One image for :meth:`Refiner.refine_many`: the arguments of :meth:`Refiner.refine`, by the same names."""

    image: np.ndarray
    probs: np.ndarray
    classes: Sequence[str]
    background: np.ndarray | None = None
    ignore: np.ndarray | None = None
    source_rule: masks.MergeRule | None = None
    return_generated: bool = False
    return_correspondence: bool = False


@dataclass
class _Image:
    """One image between its input checks and its merge: the probabilities Eq. 9 updates in place, the input label
    map and rule, the classes with pixels in the band, and what the generation left (kept apart per image, so that
    several images can share UNet calls)."""

    image: np.ndarray
    classes: list[str]
    refined: torch.Tensor  # (K, H, W) float32
    coarse: np.ndarray  # (H, W) the input label map
    rule: masks.MergeRule
    background: np.ndarray | None
    active: list[int]
    generated: dict[str, np.ndarray] = field(default_factory=dict)
    matches: dict[str, np.ndarray] = field(default_factory=dict)
    spent: list[float] = field(default_factory=list)  # seconds of each time a latent was brought to t_s


@dataclass
class Noised:
    """The image latent at t_s (B or 1, C, h, w), the model input's (H, W), and, after null-text inversion, the
    optimised null embedding (B or 1, L, D) with its losses; ``seconds`` is what bringing it there cost."""

    z_t: torch.Tensor
    hw: tuple[int, int]
    null: torch.Tensor | None = None
    losses: list[float] | None = None
    seconds: float = 0.0


def model_input(images: np.ndarray, size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 images -> (B, 3, size, size) in [0, 1]: bilinear with antialiasing, the model input."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _times_warmup(method: Callable[..., Any]) -> Callable[..., Any]:
    """With ``compile``, a call during which torch.compile compiled graphs (the first call, and any that meets new
    shapes, e.g. a new number of classes in one UNet call) is a warm-up: its seconds go to its first result's
    ``warmup_seconds`` (a run's manifest records it) and one line on stderr says so. Without torch's graph
    counter (:func:`g4seg.acceleration.compiled_graphs` = -1) the first call counts."""

    @functools.wraps(method)
    def timed(self: "Refiner", *args: Any, **kwargs: Any) -> Any:
        if not self.config.compile or self._timing:
            return method(self, *args, **kwargs)
        self._timing = True
        graphs, start = compiled_graphs(), _clock(self.backbone.device)
        try:
            out = method(self, *args, **kwargs)
        finally:
            self._timing = False
        seconds = _clock(self.backbone.device) - start
        new = compiled_graphs() - graphs
        if (new > 0) if graphs >= 0 else not self._called:
            results = [r for r in (out if isinstance(out, list) else [out]) if isinstance(r, RefineResult)]
            if results:  # what a run records in the image's manifest line
                results[0].warmup_seconds = round(seconds, 4)
            graphs_text = f"{new} new graph(s)" if graphs >= 0 else "its models"
            print(f"g4seg: torch.compile: compiled {graphs_text} ({', '.join(self.compiled) or 'nothing'}) in a "
                  f"refinement that took {seconds:.1f} s; later calls with the same shapes reuse them",
                  file=sys.stderr, flush=True)
        self._called = True
        return out

    return timed


class Refiner:
    """Refines coarse per-class probabilities of one image (:meth:`refine`), or of several whose classes share
    UNet calls (:meth:`refine_many`, what folder and dataset runs use with ``image_batch`` > 1)."""

    def __init__(self, config: RefineConfig, backbone: Backbone, injector: Injector, extractor: Extractor,
                 postprocessor: PostProcessor | None = None) -> None:
        self.config = config
        self.backbone = backbone
        self.injector = injector
        self.extractor = extractor
        self.postprocessor = postprocessor
        for part in (extractor, injector):  # optional protocol method (components.UsesBackbone): e.g. features
            attach = getattr(part, "attach", None)  # of this UNet, or a ControlNet that must fit it
            if callable(attach):
                attach(backbone)
        self.compiled: list[str] = []  # what ``compile`` compiled (g4seg.acceleration)
        self._timing = False  # a timed call is running (refine_many refines an image alone through refine)
        self._called = False
        if config.compile:
            for part in (backbone, extractor):  # optional protocol method: compile the component's own models
                compile_models = getattr(part, "compile_models", None)
                if callable(compile_models):
                    self.compiled += compile_models()
            if not self.compiled:
                print(f"g4seg: --compile: neither the backbone ({config.backbone}) nor the extractor "
                      f"({config.extractor}) can compile its models; they run eagerly", file=sys.stderr, flush=True)

    @classmethod
    def from_config(cls, config: RefineConfig, runtime: Runtime | None = None) -> "Refiner":
        """Build every component by name; an unsupported backbone x injector or backbone x extractor pair is a
        G4SegError, raised before any model loads."""
        runtime = runtime or resolve_runtime(config.device, config.dtype, config.offline)
        check_speed_settings(config.compile, config.offload, runtime.device)
        runtime = dataclasses.replace(runtime, offload=config.offload)
        reg = registry()
        backbone_spec = reg.get("backbone", config.backbone)
        injector_spec = reg.get("injector", config.injector)
        reason = incompatibility(injector_spec, backbone_spec)
        if reason:
            raise G4SegError(reason)
        reason = guidance_refusal(config, backbone_spec.name, backbone_spec.tags)
        if reason:
            raise G4SegError(reason)
        extractor_spec = reg.get("extractor", config.extractor)
        reason = incompatibility(extractor_spec, backbone_spec)
        if reason:
            raise G4SegError(reason)
        post_spec = reg.get("postprocessor", config.postprocessor) if config.postprocessor else None
        return cls(
            config,
            backbone_spec.build(config.component_options("backbone"), runtime),
            injector_spec.build(config.component_options("injector"), runtime),
            extractor_spec.build(config.component_options("extractor"), runtime),
            post_spec.build(config.component_options("postprocessor"), runtime) if post_spec else None,
        )

    @classmethod
    def from_names(cls, backbone: str = "sd21", injector: str = "attn", extractor: str = "clip",
                   **settings: Any) -> "Refiner":
        """``Refiner.from_names("sd21", "attn", options={"backbone": {"model": "local-dir:..."}})``."""
        return cls.from_config(RefineConfig(backbone=backbone, injector=injector, extractor=extractor, **settings))

    @property
    def resolution(self) -> int:
        return self.config.resolution or self.backbone.resolution

    @_times_warmup
    def refine(self, image: np.ndarray, probs: np.ndarray, classes: Sequence[str], *,
               background: np.ndarray | None = None, ignore: np.ndarray | None = None,
               source_rule: masks.MergeRule | None = None, return_generated: bool = False,
               return_correspondence: bool = False) -> RefineResult:
        """Refine ``probs`` (K, H, W) in [0, 1] for ``image`` (H, W, 3) uint8 and ``classes`` (K names).

        ``background`` (H, W) is the baseline's background channel, if it has one; ``source_rule``
        the baseline's own merge rule (used when the config's ``merge`` is ``auto``).
        """
        state = self._prepare(image, probs, list(classes), background, source_rule)
        if state.active:
            with torch.inference_mode():
                self._generate([state])
        return self._finish(state, ignore, return_generated, return_correspondence)

    @_times_warmup
    def refine_many(self, items: Sequence[RefineItem]) -> list[RefineResult | Exception]:
        """Refine several images, their classes pooled into shared UNet calls; one outcome per item, in order.

        Each image is encoded, noised and described by the extractor alone (batch 1, as :meth:`refine` does);
        then its (image, class) pairs, image after image, go through the UNet, the decoder and the extractor in
        batches of at most ``class_batch`` pairs, so the UNet batch is capped by ``class_batch`` whatever the
        number of images. Each image keeps its own noise (the same seeded draw as alone), injection masks,
        prompts and Eq. 9 update, so its result equals :meth:`refine` of that image alone up to the batch
        size's effect on floating point (docs/runs.md). Pooling applies to ``generator = "model"`` with ``noise``
        ``add`` or ``ddim-inversion`` on the empty prompt; per-class inversions and null-text, whose optimisation
        runs per batch, and the controls (no UNet) refine each image alone.

        An image whose inputs are bad gets its one-line exception in its place and the others go on; if a pooled
        call fails (e.g. out of memory), each image of the pool is refined alone, so every error is its own image's.
        """
        outcomes: list[RefineResult | Exception | None] = [None] * len(items)
        states: dict[int, _Image] = {}
        for i, item in enumerate(items):
            try:
                states[i] = self._prepare(item.image, item.probs, list(item.classes), item.background,
                                          item.source_rule)
            except Exception as exc:  # noqa: BLE001 - a bad input is that image's outcome
                outcomes[i] = exc
        pool = [i for i, state in states.items() if state.active]
        if len(pool) > 1 and self._pools():
            try:
                with torch.inference_mode():
                    self._refine_pooled([states[i] for i in pool])
            except Exception:  # noqa: BLE001 - redo each image alone: its error, if any, is its own
                for i in pool:
                    del states[i]
                    outcomes[i] = self._alone(items[i])
        else:
            for i in pool:
                try:
                    with torch.inference_mode():
                        self._generate([states[i]])
                except Exception as exc:  # noqa: BLE001
                    del states[i]
                    outcomes[i] = exc
        for i, state in states.items():
            item = items[i]
            try:
                outcomes[i] = self._finish(state, item.ignore, item.return_generated, item.return_correspondence)
            except Exception as exc:  # noqa: BLE001
                outcomes[i] = exc
        return outcomes  # type: ignore[return-value]  (every slot is filled above)

    def _alone(self, item: RefineItem) -> RefineResult | Exception:
        try:
            return self.refine(item.image, item.probs, item.classes, background=item.background, ignore=item.ignore,
                               source_rule=item.source_rule, return_generated=item.return_generated,
                               return_correspondence=item.return_correspondence)
        except Exception as exc:  # noqa: BLE001
            return exc

    def _prepare(self, image: np.ndarray, probs: np.ndarray, classes: list[str], background: np.ndarray | None,
                 source_rule: masks.MergeRule | None) -> _Image:
        """Check the inputs, compute the input label map (and a hard input's ramps) and the classes in the band."""
        self._check_inputs(image, probs, classes, background)
        probs = probs.astype(np.float32)  # our own copy: Eq. 9 updates it in place
        if masks.is_hard(probs, background):
            coarse = masks.hard_labels(probs, background)
            rule, background = masks.HARD_RULE, None
            probs = masks.ramp(coarse, len(classes), masks.ramp_pixels(self.config.ramp_width, image.shape[:2]))
        else:
            rule = masks.resolve_rule(self.config, source_rule, background is not None)
            coarse = rule.labels(probs, background)
        refined = torch.from_numpy(probs)
        lo, hi = self.config.cf
        active = [k for k in range(len(classes)) if ((refined[k] >= lo) & (refined[k] <= hi)).any()]
        return _Image(image, classes, refined, coarse, rule, background, active)

    def _finish(self, state: _Image, ignore: np.ndarray | None, return_generated: bool,
                return_correspondence: bool) -> RefineResult:
        """The post-processor and the merge of one image, after its generation."""
        image, out, background, rule, coarse = state.image, state.refined.numpy(), state.background, state.rule, \
            state.coarse
        if getattr(self.postprocessor, "background_aware", False):  # components.SeesBackground (a dense CRF)
            posterior = self.postprocessor(image, out, background=background, rule=rule)
            out, background, rule = posterior.probs, posterior.background, posterior.merge or rule
        elif self.postprocessor is not None:
            out = self.postprocessor(image, out)
        if ignore is not None:
            coarse[ignore] = masks.IGNORE_LABEL
        spent = state.spent
        return RefineResult(out, rule.labels(out, background, ignore), state.classes, coarse, background,
                            state.generated if return_generated else None,
                            state.matches if return_correspondence else None,
                            round(sum(spent), 6) if spent else None)

    def _check_inputs(self, image: np.ndarray, probs: np.ndarray, classes: list[str],
                      background: np.ndarray | None) -> None:
        if not classes:
            raise G4SegError("the class list is empty")
        if len(set(classes)) != len(classes):
            raise G4SegError(f"class names must be unique, got {', '.join(classes)}")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise G4SegError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if probs.shape != (len(classes), *image.shape[:2]):
            raise G4SegError(f"probabilities have shape {probs.shape}, expected "
                             f"({len(classes)}, {image.shape[0]}, {image.shape[1]}) for {len(classes)} classes")
        if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
            raise G4SegError("probabilities must be finite and within [0, 1]")
        if background is not None:
            if background.shape != image.shape[:2]:
                raise G4SegError(f"background channel has shape {background.shape}, expected {image.shape[:2]}")
            if not np.isfinite(background).all() or background.min() < 0 or background.max() > 1:
                raise G4SegError("background probabilities must be finite and within [0, 1]")

    def _pools(self) -> bool:
        """Whether the classes of several images can share UNet calls: the one-step generation from a latent
        brought to t_s once per image, independently of the classes (``add``, or DDIM inversion on the empty
        prompt). Per-class inversions and null-text run per batch of one image's classes; controls have no UNet."""
        cfg = self.config
        return cfg.generator == "model" and (
            cfg.noise == "add" or (cfg.noise == "ddim-inversion" and cfg.inversion_prompt == "empty"))

    def _generate(self, states: list[_Image]) -> None:
        """Eq. 8-9 for the classes in the band of ``states`` (pooled where :meth:`_pools`, else image by image)."""
        if self._pools():
            self._refine_pooled(states)
            return
        for state in states:
            self._refine_active(state)

    def _refine_pooled(self, states: list[_Image]) -> None:
        """The paper's generation for the (image, class) pairs of ``states``, at most ``class_batch`` per UNet call.

        Per image, alone (batch 1, exactly as for one image): model input, original features, VAE encode, the
        latent at t_s and the injection masks. Then each batch of pairs stacks its images' latents (a batch of one
        image's classes keeps that image's latent as one entry, expanded, as :meth:`denoise` always did), its
        prompts and masks, runs one injected UNet step, the decoder and the extractor, and each image's Eq. 9
        update reads only its own pairs and its own original features.
        """
        bb, cfg, size = self.backbone, self.config, self.resolution
        hw = (size, size)
        originals, latents, injections = [], [], []
        for state in states:
            pixels = model_input(state.image[None], size)
            originals.append(self.extractor(pixels.to(bb.device))[0].float().cpu())
            noised = self.noised(bb.encode(pixels.to(bb.device, bb.dtype)), hw)
            state.spent.append(noised.seconds)
            latents.append(noised.z_t)
            injections.append(injection_masks(torch.from_numpy(state.coarse), len(state.classes), hw))
        pairs = [(n, k) for n, state in enumerate(states) for k in state.active]
        for start in range(0, len(pairs), cfg.class_batch):
            chunk = pairs[start:start + cfg.class_batch]
            names = [states[n].classes[k] for n, k in chunk]
            prompts = [cfg.prompt.format(name) for name in names]
            tokens = [bb.token_indices(p, name) for p, name in zip(prompts, names)]
            cond = self._conditioning(prompts, names, tokens, hw)
            owners = list(dict.fromkeys(n for n, _ in chunk))
            z_t = latents[owners[0]] if len(owners) == 1 else torch.cat([latents[n] for n, _ in chunk])
            pair_masks = torch.stack([injections[n][k] for n, k in chunk])
            images = self.denoise(Noised(z_t, hw), cond, self.injector, pair_masks, tokens, names)
            features = self.extractor(images).float().cpu()
            for n in owners:
                rows = [i for i, (m, _) in enumerate(chunk) if m == n]
                self._update(states[n], [chunk[i][1] for i in rows], images[rows], originals[n], features[rows])

    def _update(self, state: _Image, chunk: list[int], images: torch.Tensor, original_features: torch.Tensor,
                gen_features: torch.Tensor) -> None:
        """Eq. 8-9 for classes ``chunk`` of one image, compared with ``images`` (their features ``gen_features``)."""
        cfg = self.config
        new, delta = correspondence.refine(state.refined[chunk], original_features, gen_features, cfg.beta, cfg.cf)
        state.refined[chunk] = new
        for i, k in enumerate(chunk):
            state.generated[state.classes[k]] = (images[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(
                np.uint8)
            state.matches[state.classes[k]] = delta[i].numpy()

    def _refine_active(self, state: _Image) -> None:
        """One image's classes in batches of ``class_batch``, for the modes that do not pool (:meth:`_pools`)."""
        bb, cfg, size = self.backbone, self.config, self.resolution
        pixels = model_input(state.image[None], size)
        original_features = self.extractor(pixels.to(bb.device))[0].float().cpu()
        compared = self._compared(pixels, original_features, torch.from_numpy(state.coarse), state.classes,
                                  state.spent)
        for start in range(0, len(state.active), cfg.class_batch):
            chunk = state.active[start:start + cfg.class_batch]
            images, gen_features = compared(chunk)
            self._update(state, chunk, images, original_features, gen_features)

    def _compared(self, pixels: torch.Tensor, original_features: torch.Tensor, coarse: torch.Tensor,
                  classes: list[str], spent: list[float]) -> Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]:
        """What Eq. 8 compares a batch of classes with, by ``generator``: a function of the class indices
        giving the images (B, 3, S, S) and their features. A control is one image for every class, made and
        extracted once, with no generation (and so without noising: nothing goes to ``spent``)."""
        cfg, device = self.config, self.backbone.device
        if cfg.generator == "model":
            generate = self._one_step(pixels, coarse, classes, spent)

            def one_step(chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
                images = generate(chunk)
                return images, self.extractor(images).float().cpu()

            return one_step
        if cfg.generator == "self":  # the original's own features: every pixel can match itself exactly
            image, features = pixels.to(device), original_features[None]
        else:
            image = noise_image(pixels, cfg.seed).to(device)
            features = self.extractor(image).float().cpu()
        return lambda chunk: (image.expand(len(chunk), -1, -1, -1), features.expand(len(chunk), -1, -1, -1))

    def _one_step(self, pixels: torch.Tensor, coarse: torch.Tensor, classes: list[str],
                  spent: list[float] | None = None) -> Callable[[list[int]], torch.Tensor]:
        """The paper's generation: bring the image latent to t_s (:meth:`noised`: once per image; per batch of
        classes where the classes' conditioning enters, i.e. ``inversion_prompt = "class"`` and null-text's
        optimisation); the returned function runs, for a batch of class indices, one mask-injected UNet step,
        x~0 (Eq. 2) and the decoder (:meth:`denoise`). The seconds each :meth:`noised` took go to ``spent``."""
        bb, cfg, size = self.backbone, self.config, self.resolution
        hw = (size, size)
        z0 = bb.encode(pixels.to(bb.device, bb.dtype))
        per_class = cfg.noise != "add" and cfg.inversion_prompt == "class"
        shared = None if per_class else self.noised(z0, hw)  # null-text: only its inversion, shared by the classes
        if shared is not None and spent is not None:
            spent.append(shared.seconds)
        injection = injection_masks(coarse, len(classes), hw)

        def generate(chunk: list[int]) -> torch.Tensor:
            names = [classes[k] for k in chunk]
            prompts = [cfg.prompt.format(name) for name in names]
            tokens = [bb.token_indices(p, name) for p, name in zip(prompts, names)]
            cond = self._conditioning(prompts, names, tokens, hw)
            noised = shared
            if per_class or cfg.noise == "null-text":  # the classes' conditioning (never their masks) enters
                noised = self.noised(z0, hw, cond, inverted=shared)
                if spent is not None:
                    spent.append(noised.seconds)
            return self.denoise(noised, cond, self.injector, injection[chunk], tokens, names)

        return generate

    @property
    def guidance_scale(self) -> float | None:
        """The one step's guidance scale: ``guidance_scale``; for null-text (whose null embedding only a guided
        step reads) Mokady et al.'s 7.5 when it is unset (:data:`g4seg.inversion.NULL_TEXT_GUIDANCE`)."""
        if self.config.guidance_scale is None and self.config.noise == "null-text":
            return inversion.NULL_TEXT_GUIDANCE
        return self.config.guidance_scale

    def noised(self, z0: torch.Tensor, hw: tuple[int, int], cond: Conditioning | None = None,
               inverted: Noised | None = None) -> Noised:
        """The image latents ``z0`` (B, C, h, w) brought to t_s by the ``noise`` setting (:mod:`g4seg.inversion`)
        for a step on ``cond``: the final step's text conditioning without the mask, one entry per latent (a z0
        of batch 1 is repeated to match). ``hw`` is the model input's size (SDXL's added conditions need it).

        ``add``: sqrt(a) z0 + sqrt(1 - a) eps, one seeded draw of shape (1, C, h, w) shared by the batch.
        ``ddim-inversion``: DDIM inversion conditioned on the empty prompt, or on ``cond`` with
        ``inversion_prompt = "class"``. ``null-text``: that inversion, then the null embedding optimised for the
        guided step on ``cond``; without ``cond`` (once per image, before the classes are known) only the
        inversion. ``inverted``: the image's latent already inverted (shared by its classes), reused.
        """
        bb, cfg = self.backbone, self.config
        start = _clock(bb.device)
        alpha_bar = bb.alphas_cumprod[cfg.timestep].to(bb.device)
        if cfg.noise == "add":
            noise = diffusion_math.seeded_noise((1, *z0.shape[1:]), cfg.seed).to(bb.device)
            z_t = diffusion_math.add_noise(z0, alpha_bar, noise.to(z0.dtype).expand_as(z0))
            return Noised(z_t, hw, seconds=_clock(bb.device) - start)
        batch = len(cond.encoder_hidden_states) if cond is not None else len(z0)
        z0 = z0.expand(batch, *z0.shape[1:])
        if inverted is not None:
            z_t = inverted.z_t.expand(batch, *inverted.z_t.shape[1:])
        else:
            by_class = cond is not None and cfg.inversion_prompt == "class"
            pivot = cond if by_class else bb.encode_prompts([""] * batch, hw)
            z_t = inversion.ddim_invert(z0, lambda latents, t: bb.predict(latents, t, pivot), bb.alphas_cumprod,
                                        cfg.timestep, cfg.inversion_steps, bb.prediction_type)
        if cfg.noise == "ddim-inversion" or cond is None:
            return Noised(z_t, hw, seconds=_clock(bb.device) - start)
        empty = bb.encode_prompts([""] * batch, hw)

        def unconditional(latents: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            return bb.predict(latents, cfg.timestep, Conditioning(hidden, empty.unet_kwargs))

        null = inversion.optimise_null_text(
            z0, z_t, alpha_bar, unconditional, empty.encoder_hidden_states, bb.predict(z_t, cfg.timestep, cond),
            self.guidance_scale, cfg.null_text_iters, cfg.null_text_lr, bb.prediction_type)
        return Noised(z_t, hw, null.embedding.to(bb.dtype), null.losses, seconds=_clock(bb.device) - start)

    def denoise(self, noised: Noised, cond: Conditioning, injector: Injector | None, masks: torch.Tensor | None,
                tokens: list[list[int]] | None, names: list[str] | None = None) -> torch.Tensor:
        """One UNet step at t_s from ``noised`` for a batch of prompts ``cond``, x~0 (Eq. 2), decoded to
        (B, 3, H, W) in [0, 1]. ``injector`` (None: no injection) binds ``masks`` (B, H, W) bool to ``tokens``
        (and, for an injector that takes them, the class ``names``). With guidance (:attr:`guidance_scale`) the
        batch is [unconditional, conditional], the unconditional half the empty prompt or the null-text
        embedding; the attention injector modulates only the conditional half (a ControlNet adds residuals to
        both, as diffusers' pipeline does; see g4seg/components.py)."""
        bb, cfg = self.backbone, self.config
        n = len(cond.encoder_hidden_states)
        alpha_bar = bb.alphas_cumprod[cfg.timestep].to(bb.device)
        latents = noised.z_t.expand(n, *noised.z_t.shape[1:])
        scale = self.guidance_scale
        if scale is not None:
            unconditional = bb.encode_prompts([""] * n, noised.hw)
            if noised.null is not None:
                unconditional = Conditioning(noised.null.expand(n, *noised.null.shape[1:]), unconditional.unet_kwargs)
            cond = unconditional.cat(cond)
            latents = torch.cat([latents, latents])
        context: Any = nullcontext({})
        if injector is not None:
            named = {"classes": names} if names is not None and getattr(injector, "takes_class_names", False) else {}
            context = injector.inject(bb, masks.to(bb.device), tokens, cfg.timestep,
                                      **({"guided": True} if scale is not None else {}), **named)
        with context as extra:
            output = bb.predict(latents, cfg.timestep, cond, **extra)
        if scale is not None:
            output = diffusion_math.guide(*output.float().chunk(2), scale)
        x0 = diffusion_math.predict_x0(output, latents[:n], alpha_bar, bb.prediction_type)
        return bb.decode(x0.to(bb.dtype)).float().clamp(0, 1)

    def _conditioning(self, prompts: list[str], names: list[str], tokens: list[list[int]],
                      hw: tuple[int, int]) -> Conditioning:
        """The prompts' text conditioning; with ``class_embedding = "alone"`` each run of class-name token
        positions takes the embeddings of the name encoded alone (its tokens follow the start token)."""
        cond = self.backbone.encode_prompts(prompts, hw)
        if self.config.class_embedding == "prompt":
            return cond
        alone = self.backbone.encode_prompts(names, hw).encoder_hidden_states
        hidden = cond.encoder_hidden_states.clone()
        for b, positions in enumerate(tokens):
            for run in _consecutive_runs(positions):
                hidden[b, run] = alone[b, 1:1 + len(run)]
        return Conditioning(hidden, cond.unet_kwargs)


def injection_masks(coarse: torch.Tensor, k: int, hw: tuple[int, int]) -> torch.Tensor:
    """(K, H, W) bool at the model input: class k's injection mask is its region of the input label map ``coarse``
    (label k + 1), nearest-resized to the model input."""
    labels = F.interpolate(coarse[None, None].float(), size=hw, mode="nearest")[0, 0]
    return labels[None] == torch.arange(1, k + 1, dtype=labels.dtype)[:, None, None]


def noise_image(pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """The ``noise`` control for ``pixels`` (1, 3, H, W) in [0, 1]: seeded Gaussian noise standardised per
    channel, then given the image's own per-channel mean and std and clamped to [0, 1]. It keeps the image's
    colour statistics and nothing of its content, so a gain it produces comes from the update rule alone."""
    eps = diffusion_math.seeded_noise(tuple(pixels.shape), seed)
    eps = (eps - eps.mean((-2, -1), keepdim=True)) / eps.std((-2, -1), keepdim=True)
    mean, std = pixels.mean((-2, -1), keepdim=True), pixels.std((-2, -1), keepdim=True)
    return (mean + std * eps.to(pixels.device)).clamp(0, 1)


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done, so GPU time is counted where it is spent."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _consecutive_runs(positions: Sequence[int]) -> list[list[int]]:
    """[3, 4, 9] -> [[3, 4], [9]]: one run per occurrence of the name in the prompt."""
    runs: list[list[int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs
