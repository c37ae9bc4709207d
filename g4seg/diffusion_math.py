"""Forward noising and the one-step clean-sample estimate x~0 (Eq. 2), for any scheduler.

Both use ``alphas_cumprod[t]`` directly, so DDIM, DDPM and LCM schedulers behave the same, and the
backbone's ``prediction_type`` decides how the UNet output is read.
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


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from a CPU generator, so a seed gives the same noise on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)
