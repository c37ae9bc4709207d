"""Bringing the image latent to t_s by inversion instead of one noise addition (the ``noise`` setting).

G4Seg noises the encoded image z0 once, z_t = sqrt(a) z0 + sqrt(1 - a) eps (``noise = "add"``, the paper's
Sec. III-C), and says (Table IV) that Mokady et al.'s null-text inversion, which reconstructs the image
almost perfectly, adds little mIoU for ~4x the time. Two alternatives to the noise addition live here,
both built from :mod:`g4seg.diffusion_math` (``predict_x0``, ``predict_eps``, ``guide``):

``ddim-inversion``: deterministic DDIM inversion of z0 from 0 to t_s in ``inversion_steps`` steps. The
  targets are t_i = round(i t_s / n), i = 1..n (so the last is exactly t_s, the timestep of the one
  step); the first step starts from the clean latent at alpha_bar = 1 (diffusers' ``set_alpha_to_one``).
  Each step reads the model at the step's *target* timestep on the current latent, as diffusers'
  inversion loops (``inverse_scheduler.step(unet(latents, t), t, latents)``) and Mokady et al.'s
  ``ddim_loop`` do, and moves with the DDIM update: x0 and eps implied at the current level, re-noised
  to the next (:func:`ddim_inversion_step`; diffusers' ``DDIMInverseScheduler.step``, file
  ``diffusers/schedulers/scheduling_ddim_inverse.py`` lines 340-380 in diffusers 0.42.1).

``null-text``: null-text inversion (Mokady et al., CVPR 2023) specialised to the one step. Mokady et al.
  invert with DDIM (the pivot trajectory), then at every sampling step optimise the unconditional
  ("null") text embedding so that the *guided* step on the source prompt lands on the pivot's next
  latent; editing then changes the attention (prompt-to-prompt) while the optimised null embedding keeps
  the image. Here there is one step, from the DDIM-inverted z_t straight to x~0, so its pivot target is
  z0 itself: starting from the empty prompt's embedding, the null embedding is optimised (Adam,
  ``null_text_iters`` iterations at ``null_text_lr``; Mokady et al.'s 10 and 1e-2 per step) so that x~0 of
  the guided prediction eps(z_t, null) + w (eps(z_t, c) - eps(z_t, null)) reconstructs z0. The source
  prompt c is the step's own: each class's prompt (``class_embedding`` included), without its mask, so
  the null embedding is optimised per class (batched like the classes' UNet calls). The single step then
  runs *guided* (an unguided step never reads the null embedding): unconditional half = the optimised
  null embedding, conditional half = the class prompt with the mask injected (the "edit", as
  prompt-to-prompt is for Mokady et al.); w = ``guidance_scale``, or Mokady et al.'s 7.5 when it is unset
  (:data:`NULL_TEXT_GUIDANCE`). A backbone whose guidance is built in (LCM, ``guidance:embedded``) has no
  null embedding and is refused before any model loads (:func:`g4seg.config.guidance_refusal`).

Conditioning of the DDIM inversion (``inversion_prompt``, both modes). The inversion never sees a mask:
masks are injected only in the final step, whose conditioning (class prompt + mask) differs per class.

- ``empty`` (default): the empty prompt "" (the model's unconditional embedding). One inversion per
  image, shared by every class of the batch, exactly where the noise addition was, so the inversion's
  cost does not grow with the number of classes; the inverted latent is the image's alone, and the
  class prompt and mask act only in the final step (as with ``add``). On the tiny test models its
  one-step reconstruction under the class prompt is close to the ``class`` inversion's and far better
  than ``add``'s (tests/test_noise_modes.py measures all three).
- ``class``: each class's own prompt (the final step's text conditioning without the mask): the
  inversion matches the final step's text exactly, at the price of one inversion per class.

The null embedding is optimised for the step without the mask, never with the mask injected:
optimising through the injected step would train the embedding to undo the injection, and the
generated image would become the image itself (the ``self`` control). Its objective uses the class
prompt, not the inversion's conditioning: optimised for the empty prompt, the embedding would be
tuned for a step that never runs (with guidance, the class prompt's difference from the empty one is
amplified w times; measured on the tiny SD test model, the class-prompted step then reconstructed z0
with a mean squared latent error of 0.25, against 0.11 with the embedding optimised for the class prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from g4seg import diffusion_math

if TYPE_CHECKING:
    import torch

NULL_TEXT_GUIDANCE = 7.5  # Mokady et al.'s guidance scale: null-text's step scale when guidance_scale is unset


def inversion_timesteps(timestep: int, steps: int) -> list[int]:
    """The targets of ``steps`` inversion steps from 0 to ``timestep``: round(i t / n), i = 1..n, all distinct."""
    if not 1 <= steps <= timestep:
        raise ValueError(f"need 1 <= steps <= timestep, got {steps} steps to {timestep}")
    return [round(i * timestep / steps) for i in range(1, steps + 1)]


def ddim_inversion_step(sample: torch.Tensor, model_output: torch.Tensor, alpha_from: float | torch.Tensor,
                        alpha_to: float | torch.Tensor, prediction_type: str) -> torch.Tensor:
    """One DDIM step up the noise levels: x0 and eps implied at alpha_from, re-noised to alpha_to.

    sqrt(a_to) x0 + sqrt(1 - a_to) eps, as ``DDIMInverseScheduler.step`` (its ``alpha_prod_t`` is our
    ``alpha_from``, its ``alpha_prod_t_prev`` our ``alpha_to``). Float32 out.
    """
    import torch

    x0 = diffusion_math.predict_x0(model_output, sample, alpha_from, prediction_type)
    eps = diffusion_math.predict_eps(model_output, sample, alpha_from, prediction_type)
    a = torch.as_tensor(alpha_to, dtype=torch.float32)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def ddim_invert(z0: torch.Tensor, predict: Callable[[torch.Tensor, int], torch.Tensor],
                alphas_cumprod: torch.Tensor, timestep: int, steps: int, prediction_type: str) -> torch.Tensor:
    """z0 carried deterministically to ``timestep`` in ``steps`` DDIM inversion steps (see the module docstring).

    ``predict(latents, t)`` is the model output at timestep t for ``latents`` (the caller binds the
    conditioning). The latent is kept in float32 between steps and returned in z0's dtype.
    """
    import torch

    z = z0.float()
    alpha_from = torch.tensor(1.0)
    for t in inversion_timesteps(timestep, steps):
        alpha_to = alphas_cumprod[t].float().cpu()
        output = predict(z.to(z0.dtype), t)
        z = ddim_inversion_step(z, output, alpha_from.to(z.device), alpha_to.to(z.device), prediction_type)
        alpha_from = alpha_to
    return z.to(z0.dtype)


@dataclass
class NullText:
    """The optimised null embedding (encoder hidden states, float32) and the loss before each update."""

    embedding: torch.Tensor
    losses: list[float] = field(default_factory=list)


def reconstruction_error(x0: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error between a predicted clean latent and the image latent, float32 (B,)."""
    return (x0.float() - z0.float()).pow(2).flatten(1).mean(1)


def optimise_null_text(z0: torch.Tensor, z_t: torch.Tensor, alpha_bar: float | torch.Tensor,
                       predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], null: torch.Tensor,
                       conditional: torch.Tensor, scale: float, iters: int, lr: float,
                       prediction_type: str) -> NullText:
    """Optimise the null embedding so the one guided step from ``z_t`` gives back ``z0`` (Mokady et al., one step).

    ``predict(latents, hidden)`` is the model output at t_s with ``hidden`` as the unconditional text
    embedding (the caller binds the timestep and any added conditions); ``null`` (B, L, D) is the starting
    embedding, ``conditional`` the (fixed) conditional model output at ``z_t``. The loss is the sum over
    the batch of each sample's mean squared error of x~0 (:func:`reconstruction_error`), so the samples'
    embeddings are optimised independently (Adam is per element). Runs with gradients even inside
    ``torch.inference_mode`` (inputs are cloned into normal tensors); the model's weights get no gradient.
    A non-finite loss (half precision overflow) stops the loop and keeps the last finite embedding.
    """
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        z0, z_t, conditional = z0.clone().float(), z_t.clone(), conditional.clone().float()
        embedding = null.clone().float().requires_grad_(True)
        optimiser = torch.optim.Adam([embedding], lr=lr)
        losses: list[float] = []
        kept = embedding.detach().clone()
        for _ in range(iters):
            output = diffusion_math.guide(predict(z_t, embedding.to(null.dtype)).float(), conditional, scale)
            x0 = diffusion_math.predict_x0(output, z_t, alpha_bar, prediction_type)
            loss = reconstruction_error(x0, z0).sum()
            if not torch.isfinite(loss):
                return NullText(kept, losses)
            losses.append(float(loss.detach()) / len(z0))
            kept = embedding.detach().clone()
            (embedding.grad,) = torch.autograd.grad(loss, [embedding])  # the weights need no gradient
            optimiser.step()
    return NullText(embedding.detach(), losses)
