"""``g4seg toy train``: trains the toy world's diffusion model and CLIP from scratch, on the CPU.

Three stages, each seeded, with fixed step counts (so a rerun with the same seed and thread count does
the same arithmetic; the figures in ``train_log.json`` say how long each stage took):

1. **VAE** (diffusers ``AutoencoderKL``, 2x: 64 px images -> 32x32x4 latents, no mid-block attention).
   *Decision:* trained as a plain autoencoder on the latent mean (L1 + MSE), without SD's KL term
   (weight 1e-6 there, i.e. nearly none). A KL draw with the initial log-variance 0 adds unit noise to
   the latents and slowed training several-fold in a probe, and g4seg only ever encodes to the mean.
   Trained on random 32 px crops (convolutions only, so crops teach the same filters at a quarter of
   the cost). ``scaling_factor`` is then 1 / std of the training latents, as SD's 0.18215 was chosen.
2. **UNet + text encoder** (``UNet2DConditionModel`` with SD's layout: cross-attention at the two lower
   levels and the mid block; a CLIP text encoder with the real 49408-token vocabulary). Epsilon
   prediction, SD's scaled-linear betas, timesteps uniform over [0, 1000) as SD trains; captions are
   dropped (empty prompt) 10 % of the time, so classifier-free guidance has an unconditional branch.
   The text encoder is trained with the UNet: a probe with a frozen random one gave class prompts of
   cosine 0.98-0.99 to each other, and the UNet ignored the text.
3. **CLIP** (an open_clip ``CLIP``: ViT image tower, 32 px windows of 4 px patches, so SCLIP-style
   sliding windows give a 16x16 feature grid on a 64 px scene). Contrastive training on crops of the
   scenes (16-64 px, resized to 32), each captioned from its exact labels ("a photo of a ball and a
   star"; "a photo of a background" when no object covers 5 % of it). Captions repeat within a batch,
   so every pair with the same caption is a positive (a multi-positive InfoNCE), not only the diagonal.

The diffusion model is saved in float16 safetensors and loads as float32; the CLIP's weights are rounded
to float16 too but stored as float32 (see :func:`save_clip`); about 35 MB in all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from g4seg.toy.scenes import CLASSES, SIDE, caption, make_scenes

if TYPE_CHECKING:
    import torch

TRAIN_SEEDS_START = 0
HELD_OUT_SEEDS_START = 1_000_000  # evaluation scenes: never seen in training
CLIP_WINDOW, CLIP_PATCH = 32, 4
TEXT_WIDTH = 64
BACKGROUND_WORD = "background"
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": CLIP_WINDOW, "layers": 4, "width": 128, "head_width": 32,
                   "patch_size": CLIP_PATCH},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 4, "layers": 2},
}
CLIP_MEAN, CLIP_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclass
class TrainSettings:
    """Step counts and batch sizes; the defaults fit the 60-minute CPU budget of issue 8."""

    seed: int = 0
    scenes: int = 12000
    vae_steps: int = 1200
    vae_batch: int = 32
    unet_steps: int = 600
    unet_batch: int = 64
    clip_steps: int = 1200
    clip_batch: int = 128
    device: str = "cpu"  # random draws stay on the CPU, so a GPU run sees the same batches


Report = Callable[[str, int, int, dict[str, float]], None]  # stage, step, total, figures


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two batches in [0, 1] (one MSE over all pixels)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


# ----- models ------------------------------------------------------------------------------------

def build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                         sample_size=SIDE, mid_block_add_attention=False)


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIDE // 2, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=16)


def build_text_encoder() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))


def build_clip() -> Any:
    import copy

    import open_clip

    return open_clip.CLIP(**copy.deepcopy(CLIP_CONFIG))


# ----- stage 1: VAE ------------------------------------------------------------------------------

def train_vae(vae: Any, images: torch.Tensor, held_out: torch.Tensor, settings: TrainSettings,
              report: Report) -> dict[str, float]:
    import torch

    device = torch.device(settings.device)
    vae.to(device)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    crop = SIDE // 2
    vae.train()
    for step in range(settings.vae_steps):
        _set_lr(optimizer, _cosine_lr(step, settings.vae_steps, 2e-3))
        index = torch.randint(len(images), (settings.vae_batch,), generator=generator)
        y0, x0 = (int(v) for v in torch.randint(SIDE - crop + 1, (2,), generator=generator))
        x = images[index, :, y0:y0 + crop, x0:x0 + crop].to(device)
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = (out - x).abs().mean() + ((out - x) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report("vae", step + 1, settings.vae_steps, {"loss": loss.item()})
    vae.eval()
    with torch.no_grad():
        decoded = vae.decode(vae.encode(held_out.to(device)).latent_dist.mode()).sample.clamp(-1, 1).cpu()
    return {"vae_psnr_db": psnr(decoded / 2 + 0.5, held_out / 2 + 0.5)}


def encode_all(vae: Any, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    import torch

    device = next(vae.parameters()).device
    with torch.no_grad():
        return torch.cat([vae.encode(images[i:i + batch].to(device)).latent_dist.mode().cpu()
                          for i in range(0, len(images), batch)])


# ----- stage 2: UNet + text encoder --------------------------------------------------------------

def train_unet(unet: Any, text_encoder: Any, tokenizer: Any, latents: torch.Tensor, captions: list[str],
               alphas_cumprod: torch.Tensor, settings: TrainSettings, report: Report) -> dict[str, float]:
    import torch

    from g4seg.diffusion_math import add_noise

    device = torch.device(settings.device)
    unet.to(device)
    text_encoder.to(device)
    generator = torch.Generator().manual_seed(settings.seed + 2)
    texts = sorted(set(captions)) + [""]
    token_ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    token_ids = token_ids.to(device)
    caption_index = torch.tensor([texts.index(c) for c in captions])
    empty = len(texts) - 1
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    unet.train()
    text_encoder.train()
    for step in range(settings.unet_steps):
        _set_lr(optimizer, _cosine_lr(step, settings.unet_steps, 3e-4))
        index = torch.randint(len(latents), (settings.unet_batch,), generator=generator)
        which = torch.where(torch.rand(settings.unet_batch, generator=generator) < 0.1, empty, caption_index[index])
        t = torch.randint(len(alphas_cumprod), (settings.unet_batch,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        z_t = add_noise(latents[index], alphas_cumprod[t].view(-1, 1, 1, 1), noise).to(device)
        hidden = text_encoder(token_ids[which.to(device)])[0]
        loss = ((unet(z_t, t.to(device), encoder_hidden_states=hidden).sample - noise.to(device)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        report("unet", step + 1, settings.unet_steps, {"loss": loss.item()})
    unet.eval()
    text_encoder.eval()
    return {"unet_final_loss": loss.item()}


# ----- stage 3: CLIP -----------------------------------------------------------------------------

def crop_caption(labels: np.ndarray, min_share: float = 0.05) -> str:
    """The caption of a crop from its exact labels: classes covering >= ``min_share``, by area."""
    counts = np.bincount(labels.ravel(), minlength=len(CLASSES) + 1)[1:]
    present = [k for k in np.argsort(-counts, kind="stable") if counts[k] >= min_share * labels.size]
    return caption([CLASSES[k] for k in present] or [BACKGROUND_WORD])


def _clip_batch(images: np.ndarray, labels: np.ndarray, size: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    import torch
    import torch.nn.functional as F

    crops, captions = [], []
    for _ in range(size):
        i = int(rng.integers(len(images)))
        side = int(rng.choice([16, 24, 32, 48, 64]))
        y0, x0 = (int(v) for v in rng.integers(SIDE - side + 1, size=2))
        crops.append(torch.from_numpy(images[i, y0:y0 + side, x0:x0 + side]).permute(2, 0, 1).float()[None] / 255)
        captions.append(crop_caption(labels[i, y0:y0 + side, x0:x0 + side]))
        crops[-1] = F.interpolate(crops[-1], size=(CLIP_WINDOW, CLIP_WINDOW), mode="bilinear", antialias=True,
                                  align_corners=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (torch.cat(crops).clamp(0, 1) - mean) / std, captions


def train_clip(model: Any, images: np.ndarray, labels: np.ndarray, settings: TrainSettings,
               report: Report) -> dict[str, float]:
    import open_clip
    import torch
    import torch.nn.functional as F

    torch.manual_seed(settings.seed + 3)
    rng = np.random.default_rng(settings.seed + 3)
    tokenize = open_clip.get_tokenizer("ViT-B-32")  # CLIP's BPE with 77-token context, as the model's
    device = torch.device(settings.device)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    for step in range(settings.clip_steps):
        _set_lr(optimizer, _cosine_lr(step, settings.clip_steps, 1e-3))
        pixels, captions = _clip_batch(images, labels, settings.clip_batch, rng)
        image_features = F.normalize(model.encode_image(pixels.to(device)), dim=-1)
        text_features = F.normalize(model.encode_text(tokenize(captions).to(device)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=device)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report("clip", step + 1, settings.clip_steps, {"loss": loss.item()})
    model.eval()
    return {"clip_final_loss": loss.item(), **clip_zero_shot(model, settings.seed)}


def clip_zero_shot(model: Any, seed: int, n: int = 300) -> dict[str, float]:
    """Accuracy of "a photo of a {class}" zero-shot on held-out single-class crops (a sanity figure)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    images, labels, _ = make_scenes(range(HELD_OUT_SEEDS_START + 50_000, HELD_OUT_SEEDS_START + 50_000 + n))
    rng = np.random.default_rng(seed)
    pixels, captions = _clip_batch(images, labels, n, rng)
    names = [BACKGROUND_WORD, *CLASSES]
    single = [i for i, c in enumerate(captions) if " and " not in c]
    truth = torch.tensor([names.index(captions[i].removeprefix("a photo of a ")) for i in single])
    device = next(model.parameters()).device
    tokens = open_clip.get_tokenizer("ViT-B-32")([caption([c]) for c in names]).to(device)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens), -1)
        predicted = (F.normalize(model.encode_image(pixels[single].to(device)), dim=-1) @ text.T).argmax(dim=1).cpu()
    return {"clip_zero_shot_accuracy": float((predicted == truth).float().mean()), "clip_zero_shot_crops": len(single)}


# ----- saving ------------------------------------------------------------------------------------

def save_diffusion(out: Path, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from g4seg.testing.tiny_diffusion import sd_scheduler

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to("cpu").to(torch.float16).save_pretrained(out, safe_serialization=True)


def save_clip(out: Path, model: Any) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": CLIP_CONFIG, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # float16 precision (as the diffusion model's weights), stored as float32: open_clip resizes position
    # embeddings (geometry=whole) in the checkpoint's dtype, which fails for float16 on a CPU
    state = {k: v.detach().cpu().half().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))


# ----- the whole run -----------------------------------------------------------------------------

def _clip_stage(out: Path, settings: TrainSettings, threads: int, report: Report | None = None) -> dict[str, Any]:
    """Stage 3 alone (it needs no other stage): build, train and save the CLIP; returns its figures."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    images, labels, _ = make_scenes(range(TRAIN_SEEDS_START, TRAIN_SEEDS_START + settings.scenes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        clip = build_clip()
    figures = train_clip(clip, images, labels, settings, report or (lambda *args: None))
    save_clip(out / "clip", clip)
    return {**figures, "clip_seconds": time.perf_counter() - start}


def _clip_child(out: Path, settings: TrainSettings, threads: int, queue: Any) -> None:
    try:
        queue.put(_clip_stage(out, settings, threads))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent as one line
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _wait_for(child: Any, queue: Any) -> dict[str, Any]:
    """The CLIP process's figures; one G4SegError line if it failed or died."""
    import queue as queues

    from g4seg.errors import G4SegError

    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queues.Empty:
            if not child.is_alive():
                raise G4SegError(f"the CLIP training process died (exit code {child.exitcode})") from None
    child.join()
    if "error" in result:
        raise G4SegError(f"CLIP training failed: {result['error']}")
    return result


def train_toy(out: Path, settings: TrainSettings, report: Report, threads: int | None = None) -> dict[str, Any]:
    """Train everything into ``out`` (``sd/``, ``clip/``, ``train_log.json``); returns the log.

    With two or more cores the CLIP trains in a second process while the VAE and the UNet train here,
    each on half the cores: on a small CPU two one-thread processes beat one two-thread process
    several-fold whenever anything else runs, and the stages share nothing.
    """
    import multiprocessing
    import os

    import torch

    from g4seg.testing.tiny_diffusion import clip_tokenizer, sd_scheduler

    start = time.perf_counter()
    cores = threads or os.cpu_count() or 1
    parallel = cores >= 2 and settings.device == "cpu"  # on a GPU the stages simply run one after the other
    own = max(1, cores // 2) if parallel else cores
    torch.set_num_threads(own)
    log: dict[str, Any] = {"settings": asdict(settings),
                           "threads": {"diffusion": own, "clip": cores - own if parallel else own},
                           "seconds": {}}
    child, queue = None, None
    if parallel:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_clip_child, args=(out, settings, cores - own, queue), daemon=True)
        child.start()

    images, _, captions = make_scenes(range(TRAIN_SEEDS_START, TRAIN_SEEDS_START + settings.scenes))
    held_out = _pixels(make_scenes(range(HELD_OUT_SEEDS_START, HELD_OUT_SEEDS_START + 64))[0])
    pixels = _pixels(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vae, unet, text_encoder = build_vae(), build_unet(), build_text_encoder()

    t0 = time.perf_counter()
    log.update(train_vae(vae, pixels, held_out, settings, report))
    latents = encode_all(vae, pixels)
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    log["seconds"]["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer = clip_tokenizer()
    alphas = sd_scheduler().alphas_cumprod.float()
    log.update(train_unet(unet, text_encoder, tokenizer, latents * vae.config.scaling_factor, captions, alphas,
                          settings, report))
    log["seconds"]["unet"] = time.perf_counter() - t0
    save_diffusion(out / "sd", vae, unet, text_encoder, tokenizer)

    if child is not None:
        report("clip", 0, settings.clip_steps, {})
        clip_log = _wait_for(child, queue)
    else:
        clip_log = _clip_stage(out, settings, own, report)
    log["seconds"]["clip"] = clip_log.pop("clip_seconds")
    log.update(clip_log)
    log["seconds"]["total"] = time.perf_counter() - start
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log
