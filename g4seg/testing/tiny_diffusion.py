"""Tiny random Stable Diffusion models of the real classes, saved exactly like Hub repos.

No weights can be downloaded where the tests and ``g4seg doctor --smoke`` run, so these builders make
seeded random components (diffusers ``UNet2DConditionModel``/``AutoencoderKL``, transformers
``CLIPTextModel``) and save them with the diffusers pipeline's own ``save_pretrained``: the folder
then has ``model_index.json`` and the ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` subfolders in safetensors, and loads through the same code path as a Hub id.

The tokenizer is the real CLIP BPE tokenizer, rebuilt from the merges file that ships inside the
open_clip wheel, so token positions of multi-token class names are the real ones.

Sizes: an 8x VAE and an 8x8 latent, i.e. 64x64 pixel inputs; UNets with three resolution levels
(latent grids 8, 4 and 2), cross-attention at every level for SD-like models and only at the two
lower levels for the SDXL-like one, as in the real models.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
TEXT_HIDDEN = 32
LATENT_SIDE = 8
SD_SCALING, SDXL_SCALING = 0.18215, 0.13025
SD_BETAS: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                            "beta_schedule": "scaled_linear"}


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges, built from open_clip's merges file the way CLIP builds them.

    Ids: the 256 byte symbols, the same with the end-of-word mark ``</w>``, one token per merge,
    then BOS (49406) and EOS (49407) -- the ids of the released CLIP tokenizers.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """The real CLIP tokenizer (77 tokens); SDXL's second tokenizer pads with "!" instead of EOS."""
    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)


def seeded(seed: int, build: Any, *args: Any, **kwargs: Any) -> Any:
    """Build a module from a fixed seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args, **kwargs).eval()


def _text_encoder(seed: int, *, projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=TEXT_HIDDEN, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407)
    return seeded(seed, CLIPTextModelWithProjection if projection else CLIPTextModel, config)


def tiny_vae(seed: int = 0, **config: Any) -> AutoencoderKL:
    """A 4-level (8x) AutoencoderKL with 8 channels; ``config`` overrides e.g. force_upcast, shift_factor."""
    settings: dict[str, Any] = {
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "latent_channels": 4,
        "norm_num_groups": 4, "sample_size": LATENT_SIDE * 8, "scaling_factor": SD_SCALING, **config,
    }
    return seeded(seed, AutoencoderKL, **settings)


def _sd_unet(seed: int, **config: Any) -> UNet2DConditionModel:
    settings: dict[str, Any] = {
        "sample_size": LATENT_SIDE, "block_out_channels": (16, 32, 32), "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3, "up_block_types": ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": TEXT_HIDDEN, "attention_head_dim": 4, "norm_num_groups": 8, **config,
    }
    return seeded(seed, UNet2DConditionModel, **settings)


def sd_scheduler(prediction_type: str = "epsilon") -> PNDMScheduler | DDIMScheduler:
    """The scheduler an SD repo ships: PNDM for epsilon (as SD1.5/2.1-base), DDIM otherwise (as SD2.1-768)."""
    if prediction_type == "epsilon":
        return PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**SD_BETAS, prediction_type=prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def save_tiny_sd(path: str | Path, *, prediction_type: str = "epsilon", upcast_attention: bool = False) -> Path:
    """An SD1.5/2.1-like repo with the scheduler of :func:`sd_scheduler`."""
    scheduler = sd_scheduler(prediction_type)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(1), text_encoder=_text_encoder(2), tokenizer=clip_tokenizer(),
        unet=_sd_unet(3, upcast_attention=upcast_attention), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_tiny_sdxl(path: str | Path) -> Path:
    """An SDXL-like repo: two text encoders (the second with projection), 'text_time' added conditions."""
    time_dim = 8
    unet = _sd_unet(
        4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN,
    )
    scheduler = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(5, scaling_factor=SDXL_SCALING, force_upcast=True), text_encoder=_text_encoder(6),
        text_encoder_2=_text_encoder(7, projection=True), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_tiny_lcm(path: str | Path) -> Path:
    """An LCM-like repo (as LCM_Dreamshaper_v7): SD UNet with time_cond_proj_dim and an LCMScheduler."""
    scheduler = LCMScheduler(**SD_BETAS, set_alpha_to_one=True, clip_sample=False, original_inference_steps=50)
    pipe = LatentConsistencyModelPipeline(
        vae=tiny_vae(8), text_encoder=_text_encoder(9), tokenizer=clip_tokenizer(),
        unet=_sd_unet(10, time_cond_proj_dim=32), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_tiny_vae(path: str | Path, **config: Any) -> Path:
    """A standalone VAE repo (weights at the root, like madebyollin/sdxl-vae-fp16-fix)."""
    tiny_vae(11, **config).save_pretrained(path, safe_serialization=True)
    return Path(path)


def tiny_taesd(seed: int = 13, **config: Any) -> AutoencoderTiny:
    """A tiny random TAESD (diffusers ``AutoencoderTiny``) for the tiny VAEs' latents: 4 latent channels, 8x (three
    2x upsamplings, as the released madebyollin/taesd), 8 channels per block; ``config`` overrides any setting."""
    settings: dict[str, Any] = {
        "encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
        "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1), "latent_channels": 4, **config,
    }
    return seeded(seed, AutoencoderTiny, **settings)


def save_tiny_taesd(path: str | Path, **config: Any) -> Path:
    """A standalone TAESD repo (config.json and safetensors weights at the root, like madebyollin/taesd)."""
    tiny_taesd(**config).save_pretrained(path, safe_serialization=True)
    return Path(path)


def tiny_controlnet(seed: int = 12, **unet_config: Any) -> ControlNetModel:
    """A ControlNet for the tiny SD UNet, made as real ones are (``ControlNetModel.from_unet``: the UNet's
    config and encoder weights, a 3-stage 8x condition encoder for the 64 px image), but with its zero
    convolutions (condition encoder output, down and mid residual projections) seeded random: a freshly
    made ControlNet adds exactly zero, which would hide whether its residuals reach the UNet.
    ``unet_config`` overrides the UNet it is made from (e.g. ``cross_attention_dim=48`` for another family).
    """
    unet = _sd_unet(3, **unet_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 8))
        zero_convs = [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.normal_(0.0, 0.3)
                conv.bias.normal_(0.0, 0.1)
    return net.eval()


def save_tiny_controlnet(path: str | Path, **unet_config: Any) -> Path:
    """A seg ControlNet repo (config.json and safetensors weights at the root, like
    lllyasviel/control_v11p_sd15_seg) matching :func:`save_tiny_sd`'s UNet; see :func:`tiny_controlnet`."""
    tiny_controlnet(**unet_config).save_pretrained(path, safe_serialization=True)
    return Path(path)
