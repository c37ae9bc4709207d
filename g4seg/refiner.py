"""The G4Seg orchestrator: noise once, one injected UNet step per class, correspond, mix, merge.

It knows no concrete plugin: components come from the registry by name and are used only through
the protocols in :mod:`g4seg.components`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from g4seg import correspondence, diffusion_math, masks
from g4seg.components import Backbone, Extractor, Injector, PostProcessor
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.plugins import registry
from g4seg.registry import Runtime, incompatibility
from g4seg.runtime import resolve_runtime


@dataclass
class RefineResult:
    """Refined probabilities (K, H, W), the merged label map (H, W) and optional diagnostics.

    ``generated`` and ``correspondence`` hold entries only for classes that had pixels inside the
    confidence band (others cannot change, so no generation is run for them).
    """

    probs: np.ndarray
    labels: np.ndarray
    classes: list[str]
    generated: dict[str, np.ndarray] | None = None
    correspondence: dict[str, np.ndarray] | None = None


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


class Refiner:
    """Refines coarse per-class probabilities of one image at a time."""

    def __init__(self, config: RefineConfig, backbone: Backbone, injector: Injector, extractor: Extractor,
                 postprocessor: PostProcessor | None = None) -> None:
        self.config = config
        self.backbone = backbone
        self.injector = injector
        self.extractor = extractor
        self.postprocessor = postprocessor

    @classmethod
    def from_config(cls, config: RefineConfig, runtime: Runtime | None = None) -> "Refiner":
        """Build every component by name; an unsupported backbone x injector pair is a G4SegError."""
        runtime = runtime or resolve_runtime(config.device, config.dtype, config.offline)
        reg = registry()
        backbone_spec = reg.get("backbone", config.backbone)
        injector_spec = reg.get("injector", config.injector)
        reason = incompatibility(injector_spec, backbone_spec)
        if reason:
            raise G4SegError(reason)
        extractor_spec = reg.get("extractor", config.extractor)
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

    def refine(self, image: np.ndarray, probs: np.ndarray, classes: Sequence[str], *,
               ignore: np.ndarray | None = None, return_generated: bool = False,
               return_correspondence: bool = False) -> RefineResult:
        """Refine ``probs`` (K, H, W) in [0, 1] for ``image`` (H, W, 3) uint8 and ``classes`` (K names)."""
        classes = list(classes)
        self._check_inputs(image, probs, classes)
        probs = probs.astype(np.float32)
        if masks.is_hard(probs):
            probs = masks.soften(probs, self.config.soften_sigma)
        refined = torch.from_numpy(probs.copy())
        lo, hi = self.config.cf
        active = [k for k in range(len(classes)) if ((refined[k] >= lo) & (refined[k] <= hi)).any()]
        generated: dict[str, np.ndarray] = {}
        matches: dict[str, np.ndarray] = {}
        if active:
            with torch.inference_mode():
                self._refine_active(image, refined, classes, active, generated, matches)
        out = refined.numpy()
        if self.postprocessor is not None:
            out = self.postprocessor(image, out)
        labels = masks.merge_labels(out, self.config.bg_threshold, ignore)
        return RefineResult(out, labels, classes, generated if return_generated else None,
                            matches if return_correspondence else None)

    def _check_inputs(self, image: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
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

    def _refine_active(self, image: np.ndarray, refined: torch.Tensor, classes: list[str], active: list[int],
                       generated: dict[str, np.ndarray], matches: dict[str, np.ndarray]) -> None:
        bb, cfg, size = self.backbone, self.config, self.resolution
        pixels = F.interpolate(_image_tensor(image), size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1)
        z0 = bb.encode(pixels.to(bb.device, bb.dtype))
        alpha_bar = bb.alphas_cumprod[cfg.timestep].to(bb.device)
        noise = diffusion_math.seeded_noise(tuple(z0.shape), cfg.seed).to(bb.device)
        z_t = diffusion_math.add_noise(z0, alpha_bar, noise.to(z0.dtype))
        original_features = self.extractor(pixels.to(bb.device))[0].float().cpu()
        binary = F.interpolate((refined >= 0.5).float()[:, None], size=(size, size), mode="nearest")[:, 0] > 0.5
        for start in range(0, len(active), cfg.class_batch):
            chunk = active[start:start + cfg.class_batch]
            prompts = [cfg.prompt.format(classes[k]) for k in chunk]
            tokens = [bb.token_indices(p, classes[k]) for p, k in zip(prompts, chunk)]
            cond = bb.encode_prompts(prompts, (size, size))
            batch_latents = z_t.expand(len(chunk), *z_t.shape[1:])
            with self.injector.inject(bb, binary[chunk].to(bb.device), tokens, cfg.timestep) as extra:
                output = bb.predict(batch_latents, cfg.timestep, cond, **extra)
            x0 = diffusion_math.predict_x0(output, batch_latents, alpha_bar, bb.prediction_type)
            images = bb.decode(x0.to(bb.dtype)).float().clamp(0, 1)
            gen_features = self.extractor(images).float().cpu()
            new, delta = correspondence.refine(refined[chunk], original_features, gen_features, cfg.beta, cfg.cf)
            refined[chunk] = new
            for i, k in enumerate(chunk):
                generated[classes[k]] = (images[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
                matches[classes[k]] = delta[i].numpy()
