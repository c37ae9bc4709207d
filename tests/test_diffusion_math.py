"""Eq. 2 (x~0) and forward noising against diffusers' DDIM scheduler and hand-made cases."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from g4seg.diffusion_math import add_noise, predict_x0, seeded_noise


def ddim(prediction_type: str) -> DDIMScheduler:
    """SD's training schedule; no clipping/thresholding so pred_original_sample is the plain formula."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(50)
    return scheduler


def tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t", [1, 400, 999])
def test_predict_x0_matches_ddim_pred_original_sample(prediction_type: str, t: int) -> None:
    scheduler = ddim(prediction_type)
    output, z_t = tensors(t)
    expected = scheduler.step(output, t, z_t, eta=0.0).pred_original_sample
    got = predict_x0(output, z_t, scheduler.alphas_cumprod[t], prediction_type)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 400, 999])
def test_add_noise_matches_scheduler(t: int) -> None:
    scheduler = ddim("epsilon")
    z0, noise = tensors(100 + t)
    expected = scheduler.add_noise(z0, noise, torch.tensor([t]))
    torch.testing.assert_close(add_noise(z0, scheduler.alphas_cumprod[t], noise), expected, rtol=1e-5, atol=1e-6)


def test_exact_model_output_recovers_the_clean_sample() -> None:
    """If the UNet predicted the true eps (or the true v), x~0 is exactly z0: a hand-made case."""
    z0, eps = tensors(7)
    a = torch.tensor(0.3)
    z_t = add_noise(z0, a, eps)
    torch.testing.assert_close(z_t, a.sqrt() * z0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(predict_x0(eps, z_t, a, "epsilon"), z0, rtol=1e-5, atol=1e-5)
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    torch.testing.assert_close(predict_x0(v, z_t, a, "v_prediction"), z0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict_x0(z0, z_t, a, "sample"), z0)


def test_dtypes_and_unknown_prediction_type() -> None:
    z0, eps = tensors(3)
    z_half = add_noise(z0.half(), 0.5, eps.half())
    assert z_half.dtype == torch.float16
    assert predict_x0(eps.half(), z_half, 0.5, "epsilon").dtype == torch.float32
    with pytest.raises(ValueError, match="flow"):
        predict_x0(eps, z0, 0.5, "flow")


def test_seeded_noise_is_reproducible() -> None:
    a, b, c = seeded_noise((1, 4, 8, 8), 0), seeded_noise((1, 4, 8, 8), 0), seeded_noise((1, 4, 8, 8), 1)
    assert a.shape == (1, 4, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
