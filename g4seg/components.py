"""The interfaces the core expects from each component kind.

The orchestrator (:mod:`g4seg.refiner`) talks to plugins only through these protocols, so a
third-party backbone, injector or extractor needs nothing else from the core.
Tensors are torch tensors; torch is imported only for type checking.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch

    from g4seg.masks import MergeRule


@dataclass(frozen=True)
class AttentionLayer:
    """One attention processor of a UNet: its processor name, self/cross, and its (h, w) token grid."""

    name: str
    kind: str  # "self" or "cross"
    grid: tuple[int, int]


@dataclass
class Conditioning:
    """Everything besides (sample, timestep) that one UNet call needs for a batch of prompts."""

    encoder_hidden_states: torch.Tensor
    unet_kwargs: dict[str, Any] = field(default_factory=dict)

    def cat(self, other: Conditioning) -> Conditioning:
        """This batch followed by ``other``'s (e.g. [unconditional, conditional] for guidance)."""
        return Conditioning(_cat(self.encoder_hidden_states, other.encoder_hidden_states),
                            _cat(self.unet_kwargs, other.unet_kwargs))


def _cat(first: Any, second: Any) -> Any:
    """Concatenate tensors along the batch, nested dicts key by key; anything else must be equal."""
    import torch

    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, dict):
        return {key: _cat(value, second[key]) for key, value in first.items()}
    if first != second:
        raise ValueError(f"cannot join conditionings that differ in {first!r} / {second!r}")
    return first


class Backbone(Protocol):
    """A diffusion model reduced to what G4Seg needs: encode, one-step prediction, decode."""

    unet: torch.nn.Module
    resolution: int  # default square input side in pixels
    vae_scale_factor: int  # pixels per latent cell (8 for every SD family)
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32
    device: torch.device
    dtype: torch.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> scaled latents (B, C, H/f, W/f)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) float32 in [0, 1]."""

    def encode_prompts(self, prompts: Sequence[str], image_hw: tuple[int, int]) -> Conditioning:
        """Text conditioning (and any added conditions) for a batch of prompts."""

    def token_indices(self, prompt: str, phrase: str) -> list[int]:
        """Positions of ``phrase``'s tokens inside the tokenized ``prompt`` (all of them)."""

    def predict(self, latents: torch.Tensor, timestep: int, cond: Conditioning, **extra: Any) -> torch.Tensor:
        """One UNet call; returns the raw model output (interpreted by ``prediction_type``).

        ``extra`` are an injector's UNet keywords. A backbone tagged ``controlnet:seg`` also takes
        ``residuals``: a callable it calls as ``residuals(latents, timestep, cond)`` with the call's own UNet
        inputs, whose returned keywords (down/mid block residuals) it passes to the UNet as well.
        """

    def attention_layers(self, latent_hw: tuple[int, int]) -> list[AttentionLayer]:
        """The UNet's attention processors with their kind and token grid for this latent size."""


class Injector(Protocol):
    """Conditions the one UNet call on binary masks; must leave the backbone exactly as found."""

    def inject(
        self,
        backbone: Backbone,
        masks: torch.Tensor,
        token_indices: Sequence[Sequence[int]],
        timestep: int,
        *,
        guided: bool = False,
    ) -> AbstractContextManager[dict[str, Any]]:
        """Context manager active around the UNet call; yields extra keyword arguments for ``predict``.

        ``masks`` is (B, H, W) bool at the backbone's input resolution, one per prompt;
        ``token_indices[b]`` are the class-name token positions of prompt ``b``. With ``guided``
        (classifier-free guidance) the UNet batch is 2B: B unconditional entries, then the B
        conditional ones; the mask binding modulates only the conditional half (the ``controlnet``
        injector gives the unconditional half the ControlNet's residuals for the empty prompt, as
        diffusers' ControlNet pipeline does; its module docstring says why).

        Optional, like :class:`UsesBackbone`'s ``attach`` (which the refiner also calls on injectors): an
        injector with ``takes_class_names = True`` is also called with ``classes``, the B prompts' class
        names (the ``controlnet`` injector colours each mask by its class). Adding it kept ``PLUGIN_API`` at 1.
        """


class Extractor(Protocol):
    """Dense per-patch features for the correspondence step.

    An extractor may also have the optional ``attach`` method of :class:`UsesBackbone`, to compute its
    features with the refiner's backbone (the ``sd`` extractor reads its UNet) instead of loading a model.
    """

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 in [0, 1] -> L2-normalised (B, C, h, w)."""


class UsesBackbone(Protocol):
    """Optional addition to the extractor protocol: a component that works with the refiner's backbone.

    :class:`g4seg.refiner.Refiner` calls ``attach(backbone)`` once, when it is constructed (by
    ``from_config`` or directly), if the extractor has the method; extractors without it are untouched.
    It calls an injector's ``attach`` the same way (the ``controlnet`` injector loads a ControlNet that fits it).
    The core never learns what the extractor does with the backbone. ``attach`` may raise a one-line
    G4SegError when the backbone lacks what it needs; an extractor that needs a backbone should say so
    in one line when called without one (e.g. built standalone by its spec), and should declare
    ``requires:<tag>`` so that an unsupported backbone is refused before any model loads. Holding only a
    weak reference keeps it from keeping a replaced backbone alive. Adding this optional method kept
    ``PLUGIN_API`` at 1 (docs/plugins.md).
    """

    def attach(self, backbone: Backbone) -> None:
        """Remember ``backbone`` (the refiner's, already loaded) for later calls."""


@dataclass
class CoarseMask:
    """Coarse per-class probabilities aligned with a class list, plus pixels to ignore.

    ``background`` is the baseline's own background channel when it has one (a K+1 stack);
    ``merge`` is the baseline's own label rule (e.g. SCLIP's thresholds), used by ``merge = "auto"``.
    """

    probs: np.ndarray  # (K, H, W) float32 in [0, 1]
    ignore: np.ndarray | None = None  # (H, W) bool, True = ignore (label 255)
    background: np.ndarray | None = None  # (H, W) float32 in [0, 1]
    merge: MergeRule | None = None


class MaskSource(Protocol):
    """Produces coarse probabilities for an image.

    Optional: one that reads label-map files sets ``takes_encoding = True`` and is then also called with
    ``encoding=`` (a dataset's :class:`g4seg.datasets.LabelEncoding`) for the images of a dataset, whose
    label maps hold that dataset's values (``g4seg refine --dataset``, ``g4seg ablate``).
    """

    def load(self, image_path: Path, mask_path: Path | None, classes: Sequence[str],
             image_hw: tuple[int, int]) -> CoarseMask:
        """Coarse mask for ``image_path``; raises G4SegError on bad input."""


class PostProcessor(Protocol):
    """Optional clean-up of refined probabilities (e.g. dense CRF).

    One that treats the background as a label of its own takes the optional form :class:`SeesBackground`.
    """

    def __call__(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 image and (K, H, W) probabilities -> probabilities of the same shape."""


class SeesBackground(Protocol):
    """Optional form of the post-processor protocol, for one whose output has a background of its own (a
    dense CRF: its posterior is a distribution over background and classes, and its labels are the argmax).

    A post-processor with ``background_aware = True`` is called by :meth:`g4seg.refiner.Refiner.refine` with
    the keywords ``background`` (the (H, W) channel the labels would be merged with, or None) and ``rule``
    (that merge rule), and returns a :class:`CoarseMask`: its ``probs`` (K, H, W) and ``background`` (H, W)
    replace the refined maps and the background channel, and its ``merge`` (when set) the merge rule, for
    the output labels and the saved probabilities. Plain post-processors are called as before, so adding
    this optional form kept ``PLUGIN_API`` at 1.
    """

    background_aware: bool

    def __call__(self, image: np.ndarray, probs: np.ndarray, *, background: np.ndarray | None,
                 rule: MergeRule) -> CoarseMask:
        """(H, W, 3) uint8 image, (K, H, W) probabilities, the merge's background and rule -> the posterior."""
