"""Extractor ``sd``: DIFT diffusion features (Tang et al. 2023) read from the refiner's own backbone.

DIFT ("Emergent Correspondence from Image Diffusion") noises an image's latent to step t, runs the
UNet once and takes the output of one up-block as a dense descriptor, averaged over several noise
draws. Reference: github.com/Tsingularity/dift, ``src/models/dift_sd.py``:

- ``SDFeaturizer.forward`` defaults ``prompt=''``, ``t=261``, ``up_ft_index=1``, ``ensemble_size=8``
  (lines 211-216; the same defaults in ``extract_dift.py`` lines 33-40, which the README calls "the
  same as in the semantic correspondence tasks"). The null prompt ``''`` is the featurizer's default
  (line 191); only the SPair evaluation (``SDFeaturizer4Eval``, line 253) prompts with the category,
  ``"a photo of a {cat}"``, which an extractor that sees images alone cannot know. So the default
  ``prompt`` is ``""``.
- Latents: ``vae.encode(img).latent_dist.sample() * scaling_factor`` of the [-1, 1] image (line 178),
  noised by ``scheduler.add_noise`` with one fresh draw per ensemble member (lines 180-181), UNet run
  up to ``up_ft_indices`` and stopped (lines 125-128), ``up_ft[i] = sample`` after up-block i (i.e.
  after its upsampler, line 155-156), averaged over the ensemble (line 243) and L2-normalised per
  location at matching time (``eval_spair.py`` lines 115-116).
- DIFT's SD model is ``stabilityai/stable-diffusion-2-1`` (the 768 px v-prediction model, line 191).
  Here the features come from whichever SD-family backbone the refiner runs (``sd21``, the 512 px base
  model, by default), at the refiner's input size: no second copy of the model is loaded. Up-block 1
  of SD 1.x/2.x is at 1/16 of the input (32x32 for 512 px; DIFT README "up_ft_index=1 ... 1/16").

Small decisions (ours):

- The latent is the backbone's ``encode`` (the mean of the latent distribution, as the generation
  uses), not a sample, so the only randomness is the seeded noise.
- Draw e of the ensemble uses ``seeded_noise((ensemble, C, h, w), seed)[e]`` for every image of the
  batch. An image's features are then a function of the image alone (not of what else is in the
  batch), and the original and its generations are noised alike, so differences between their
  features come from the images, not from the noise.
- UNet calls hold at most ``unet_batch`` samples (images x draws); DIFT runs its 8 draws of one image
  as one batch of 8.

How it reaches the backbone: the optional ``attach(backbone)`` method of the extractor protocol
(:class:`g4seg.components.UsesBackbone`), which :class:`g4seg.refiner.Refiner` calls. The extractor
keeps only a weak reference, so it never keeps a model alive (an ablation swapping backbones frees the
old one before loading the next). The up-block output is caught by a forward hook on
``unet.up_blocks[i]`` that stops the UNet there (the blocks after it are never run) and is removed
before the call returns.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field

from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    import torch

    from g4seg.components import Backbone, Conditioning

SEED_LIMIT = 2**64  # torch.Generator.manual_seed's range, as the refiner's own seed


class SDFeatureOptions(Options):
    """DIFT's settings for SD 2.1 semantic correspondence (dift_sd.py lines 211-216)."""

    timestep: int = Field(261, ge=0, description="noising step t of the feature pass (DIFT: 261)")
    up_block: int = Field(1, ge=0, description="index of the UNet up-block whose output is the feature "
                                               "(DIFT up_ft_index: 1, 1/16 of the input for SD 2.1)")
    ensemble: int = Field(8, ge=1, description="noise draws averaged (DIFT ensemble_size: 8)")
    prompt: str = Field("", description="text conditioning of the feature pass (DIFT: the empty prompt)")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="seed of the ensemble's noise")
    unet_batch: int = Field(8, ge=1, description="samples (images x draws) per UNet call; lower it if "
                                                 "memory runs out")


class _Reached(Exception):
    """Raised by the hook once the chosen up-block has run: the rest of the UNet is not needed."""


class SDFeatures:
    """Callable (B, 3, H, W) in [0, 1] -> L2-normalised (B, C, h, w) up-block features of an attached backbone."""

    def __init__(self, options: SDFeatureOptions) -> None:
        self.options = options
        self._backbone: Callable[[], Any] | None = None
        self._conditioning: dict[tuple[int, int, int], Conditioning] = {}

    def attach(self, backbone: Backbone) -> None:
        """Use ``backbone``'s UNet (called by the Refiner); checks the up-block and timestep exist."""
        blocks = getattr(getattr(backbone, "unet", None), "up_blocks", None)
        if blocks is None:
            raise G4SegError(f"extractor 'sd' needs a backbone with a diffusers UNet (unet.up_blocks); "
                             f"{type(backbone).__name__} has none")
        if self.options.up_block >= len(blocks):
            raise G4SegError(f"extractor 'sd': up_block {self.options.up_block} does not exist, the backbone's "
                             f"UNet has {len(blocks)} up-blocks (0 to {len(blocks) - 1})")
        steps = len(backbone.alphas_cumprod)
        if self.options.timestep >= steps:
            raise G4SegError(f"extractor 'sd': timestep {self.options.timestep} is out of range, the backbone "
                             f"has {steps} training steps (0 to {steps - 1})")
        try:
            self._backbone = weakref.ref(backbone)
        except TypeError:  # an object without weak-reference support: hold it
            self._backbone = lambda: backbone
        self._conditioning.clear()

    @property
    def backbone(self) -> Backbone:
        backbone = self._backbone() if self._backbone is not None else None
        if backbone is None:
            gone = "its backbone no longer exists" if self._backbone is not None else "it has no backbone"
            raise G4SegError(f"extractor 'sd' reads the diffusion backbone's UNet, and {gone}: use it through a "
                             f"Refiner (g4seg refine --extractor sd, Refiner.from_config) or call attach(backbone)")
        return backbone

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        from g4seg import diffusion_math

        bb, opt = self.backbone, self.options
        if images.ndim != 4 or images.shape[1] != 3:
            raise G4SegError(f"sd extractor expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        batch, hw = images.shape[0], (int(images.shape[2]), int(images.shape[3]))
        with torch.inference_mode():
            z0 = bb.encode(images.to(bb.device, torch.float32))
            noise = diffusion_math.seeded_noise((opt.ensemble, *z0.shape[1:]), opt.seed).to(bb.device)
            alpha_bar = bb.alphas_cumprod[opt.timestep].to(bb.device)
            # sample e * B + b: image b noised with draw e
            z_t = diffusion_math.add_noise(z0[None].expand(opt.ensemble, *z0.shape), alpha_bar,
                                           noise[:, None].to(z0.dtype)).flatten(0, 1)
            owner = torch.arange(batch, device=bb.device).repeat(opt.ensemble)
            total: torch.Tensor | None = None
            for start in range(0, len(z_t), opt.unet_batch):
                feats = self._up_block(bb, z_t[start:start + opt.unet_batch], hw).float()
                if total is None:
                    total = torch.zeros(batch, *feats.shape[1:], device=feats.device)
                total.index_add_(0, owner[start:start + opt.unet_batch].to(feats.device), feats)
            return F.normalize(total / opt.ensemble, dim=1)

    def _up_block(self, bb: Backbone, latents: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The output of ``unet.up_blocks[up_block]`` for ``latents``; the UNet stops right after it."""
        captured: list[Any] = []

        def hook(module: Any, inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Reached

        handle = bb.unet.up_blocks[self.options.up_block].register_forward_hook(hook)
        try:
            bb.predict(latents, self.options.timestep, self._cond(bb, len(latents), hw))
        except _Reached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise G4SegError(f"extractor 'sd': the backbone's UNet call never ran up-block {self.options.up_block}")
        return captured[0]

    def _cond(self, bb: Backbone, n: int, hw: tuple[int, int]) -> Conditioning:
        """The prompt's conditioning for a batch of ``n`` at image size ``hw`` (encoded once per size)."""
        key = (n, *hw)
        if key not in self._conditioning:
            self._conditioning[key] = bb.encode_prompts([self.options.prompt] * n, hw)
        return self._conditioning[key]


def build_sd_extractor(options: SDFeatureOptions, runtime: Runtime) -> SDFeatures:
    """Nothing is loaded: the features come from the backbone the refiner attaches."""
    return SDFeatures(options)


@hookimpl
def register_extractors(register: Callable[..., None]) -> None:
    register(ComponentSpec(
        kind="extractor", name="sd", aliases=("dift",), factory=build_sd_extractor, options=SDFeatureOptions,
        tags=frozenset({"features:dense", "requires:unet-attention"}),
        description="DIFT diffusion features: a UNet up-block of the refiner's own backbone (Tang et al. 2023)"))
