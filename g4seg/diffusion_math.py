"""Forward noising, the one-step clean-sample estimate x~0 (Eq. 2), the implied noise, and guidance.

All use ``alphas_cumprod[t]`` directly, so DDIM, DDPM and LCM schedulers behave the same, and the
backbone's ``prediction_type`` decides how the UNet output is read. DDIM inversion
(:mod:`g4seg.inversion`) is built from ``predict_x0`` and ``predict_eps``.
"""

from __future__ import annotations

import torch


def add_noise(z0: torch.Tensor, alpha_bar: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32)
    return (a.sqrt() * z0.float() + (1 - a).sqrt() * noise.float()).to(z0.dtype)


def predict_x0(model_output: torch.Tensor, z_t: torch.Tensor, alpha_bar: float | torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """x~0 from the model output: Eq. 2 for epsilon, the v-parameterisation for v_prediction."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32)
    out, z = model_output.float(), z_t.float()
    if prediction_type == "epsilon":
        return (z - (1 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unsupported prediction_type '{prediction_type}'")


def predict_eps(model_output: torch.Tensor, z_t: torch.Tensor, alpha_bar: float | torch.Tensor,
                prediction_type: str) -> torch.Tensor:
    """The noise the model output implies at z_t: what a DDIM step (forward or inverted) carries to the next
    noise level. For ``sample`` it is undefined at alpha_bar = 1 (z_t is then x0 and carries no noise)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32)
    out, z = model_output.float(), z_t.float()
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * z
    if prediction_type == "sample":
        if bool(a >= 1):
            raise ValueError("a sample-predicting model implies no noise at alpha_bar = 1")
        return (z - a.sqrt() * out) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction_type '{prediction_type}'")


def guide(unconditional: torch.Tensor, conditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on raw model outputs: u + w (c - u) (linear, so it is the same for eps and v)."""
    return unconditional + scale * (conditional - unconditional)


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from a CPU generator, so a seed gives the same noise on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)
