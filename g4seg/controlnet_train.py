"""Fine-tuning a segmentation ControlNet on a dataset split (``g4seg controlnet train``; the paper's Table VIII:
a seg ControlNet fine-tuned on the dataset's training split, masks drawn in the nearest-ADE20K palette).

The loss is that of diffusers' ``examples/controlnet/train_controlnet.py`` (written from memory of that script;
the Hub and GitHub were not reachable here): the image is VAE-encoded and scaled by the VAE's
``scaling_factor``, noised to a uniformly drawn timestep of the backbone's DDPM schedule
(``alphas_cumprod``), the ControlNet reads the noisy latent, the prompt and the condition image, its residuals go
into the frozen UNet, and the MSE is taken against the noise (epsilon models) or the velocity (v-prediction).
VAE, text encoder and UNet are the backbone's own (built through the backbone registry, as ``refine`` builds
them), frozen, in the mixed-precision dtype; only the ControlNet trains, in float32, under
:class:`accelerate.Accelerator` (processes, ``mixed_precision``, gradient accumulation). AdamW with diffusers'
defaults (betas 0.9/0.999, weight decay 1e-2, eps 1e-8), gradient norm clipped at 1, constant learning rate.

Decisions where the script or the paper is silent or where g4seg differs:

* Condition images: each label map drawn with the controlnet injector's :class:`Palette` (the shipped
  nearest-ADE20K table, overridable with ``-o injector.palette=...``); background (0) and ignore (255) pixels take
  the injector's ``background`` colour (default black). The injector draws everything but the class in that
  colour at inference, so training with it teaches the ControlNet exactly the convention it will be given; a
  third colour for "ignore" would be a condition it never sees. (VOC's ignore pixels are object borders: the
  drawn objects are slightly thinner than the true ones.)
* Prompts: the refine prompt template (default "a photo of {}") filled with the names of the classes present,
  in label order, comma-joined ("a photo of cat, dog"); an image with no class gets the empty prompt. The
  injector prompts "a photo of {class}" with a one-class condition image, so the training prompts have the
  same form; encoded by the backbone's own tokenizer and text encoder (``encode_prompts``).
* Latents are the VAE posterior's mean (the backbone's ``encode``, as refine encodes), not a sample of it.
* Images and label maps: shorter side resized to ``resolution`` (bilinear for images, nearest for labels),
  then centre-cropped, as the script's transforms; no flips or random crops, so a step's batch depends only on
  its position.
* Determinism and resume: the data order is a permutation per epoch drawn from ``(seed, epoch)``, and each
  micro-batch's noise and timesteps come from a generator seeded by ``(seed, micro-batch, process)``; nothing
  depends on how many steps ran in this process, so a run resumed from a checkpoint (model, optimizer,
  accelerate's RNG state, step) continues exactly where it stopped and, with the same seed, ends with the same
  weights as an uninterrupted run (tests/test_controlnet_train.py checks this bitwise on CPU). The learning
  rate is constant, so ``--steps`` can grow on a rerun without changing the steps already taken.
* ``batch`` is per process and per micro-batch (the script's ``train_batch_size``); the global batch is
  ``batch x processes x grad_accum``.
* ``--init unet`` starts from the backbone's own UNet (``ControlNetModel.from_unet``: its encoder weights, zero
  convolutions), which needs no download; by default the family's seg ControlNet of the injector.
* A fixed evaluation loss (the first few images of the split, fixed noise and timesteps, no gradient) is
  measured before the first step and after the last, so a run reports whether the loss fell.

The output folder holds ``train_settings.json`` (the settings; a rerun with other settings is refused),
``checkpoints/checkpoint-NNNNNNN/`` (the last ``keep``, each written to a temporary folder, fsynced and renamed),
the final ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``save_pretrained``, so the folder is what
``-o injector.model=local-dir:DIR`` loads) and ``train_log.json`` (written last: the run is finished).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from g4seg.errors import G4SegError
from g4seg.io import FILE_MODE, atomic_write_json

if TYPE_CHECKING:
    import torch

SETTINGS_FILE = "train_settings.json"
LOG_FILE = "train_log.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-"
PROGRESS_FILE = "progress.json"
INIT_FROM_UNET = "unet"
INIT_OPTION = "--init"
EVAL_IMAGES = 4  # images of the fixed evaluation batch
EVAL_DRAWS = 4  # (noise, timestep) draws per evaluation image
EVAL_STREAM = 2**32 - 1  # micro-batch number of the evaluation batch's generator (never a training one)
INJECTOR_KEYS = ("palette", "background")  # injector options that shape the condition images
# settings that do not change the weights a run ends with: a rerun may change them
OPERATIONAL = ("steps", "checkpoint_every", "keep", "gradient_checkpointing")
ADAM = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}  # diffusers' train_controlnet.py defaults
MAX_GRAD_NORM = 1.0


class TrainSettings(BaseModel):
    """Everything that decides a run's weights (and the operational settings in :data:`OPERATIONAL`)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    root: str
    split: str = "train"
    backbone: str = "sd21"
    backbone_options: dict[str, Any] = Field(default_factory=dict)
    injector_options: dict[str, Any] = Field(default_factory=dict, description="palette and background")
    init: str | None = Field(None, description="ControlNet to start from; None = the family's seg ControlNet, "
                                               "'unet' = ControlNetModel.from_unet")
    steps: int = Field(5000, ge=1, description="optimizer steps")
    batch: int = Field(4, ge=1, description="images per micro-batch and process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-6, gt=0.0, description="AdamW learning rate (constant)")
    resolution: int | None = Field(None, description="square training side; None = the backbone's")
    prompt: str = "a photo of {}"
    seed: int = Field(0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(500, ge=1, description="optimizer steps between checkpoints")
    keep: int = Field(2, ge=1, description="checkpoints kept")
    processes: int = Field(1, ge=1, description="accelerate processes (set by the launch)")

    def identity(self) -> dict[str, Any]:
        """The settings a rerun into the same folder must repeat."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in OPERATIONAL}


@dataclass
class TrainResult:
    """What a call of :func:`train_controlnet` did."""

    out: Path
    step: int  # optimizer steps the model in ``out`` has taken
    started_at: int  # the step this call started from (0 = fresh, == step: nothing was left to do)
    eval_loss_initial: float | None
    eval_loss_final: float | None
    losses: list[float]  # training loss of every step so far (mean over processes and micro-batches)
    nothing_to_do: bool = False  # the folder already held the finished run


# ----- the data --------------------------------------------------------------------------------------

class ConditionData:
    """A dataset split as (image, condition image, prompt) triples at one square resolution."""

    def __init__(self, dataset: Any, palette: Any, background: tuple[int, int, int], prompt: str) -> None:
        self.dataset = dataset
        self.ids = dataset.ids()
        names = list(dataset.classes)
        # label -> colour: 0 background, i = classes[i-1], every other value (255 ignore) background
        lut = np.tile(np.array(background, dtype=np.uint8), (256, 1))
        lut[1:len(names) + 1] = [palette.colour(name) for name in names]  # one line for a class without colour
        self.lut = lut
        self.names = names
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.ids)

    def prompt_for(self, label: np.ndarray) -> str:
        present = [self.names[v - 1] for v in np.unique(label) if 1 <= v <= len(self.names)]
        return self.prompt.format(", ".join(present)) if present else ""

    def item(self, index: int, side: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(side, side, 3) uint8 image and condition image, and the prompt, of the split's ``index``-th id."""
        id = self.ids[index]
        image, label = self.dataset.load_image(id), self.dataset.load_label(id)
        if image.shape[:2] != label.shape:
            raise G4SegError(f"{self.dataset!r}: image {id} is {image.shape[1]}x{image.shape[0]} but its label map "
                             f"{label.shape[1]}x{label.shape[0]}")
        label = square(label, side, nearest=True)
        return square(image, side, nearest=False), self.lut[label], self.prompt_for(label)

    def batch(self, indices: Sequence[int], side: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(B, 3, side, side) float images and condition images in [0, 1], and B prompts."""
        import torch

        items = [self.item(i, side) for i in indices]
        images = torch.from_numpy(np.stack([im for im, _, _ in items])).permute(0, 3, 1, 2).float() / 255
        conditions = torch.from_numpy(np.stack([c for _, c, _ in items])).permute(0, 3, 1, 2).float() / 255
        return images, conditions, [p for _, _, p in items]


def square(array: np.ndarray, side: int, *, nearest: bool) -> np.ndarray:
    """Shorter side resized to ``side`` (nearest for labels, bilinear for images), then centre-cropped."""
    from PIL import Image

    h, w = array.shape[:2]
    scale = side / min(h, w)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    resized = np.asarray(Image.fromarray(array).resize(size, Image.NEAREST if nearest else Image.BILINEAR))
    top, left = (size[1] - side) // 2, (size[0] - side) // 2
    return resized[top:top + side, left:left + side]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``n`` items in ``epoch``: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def positions(n: int, seed: int, start: int, count: int) -> list[int]:
    """Item indices at positions ``start .. start + count - 1`` of the endless stream of epochs."""
    orders: dict[int, np.ndarray] = {}
    found = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        found.append(int(orders[epoch][offset]))
    return found


def stream_generator(seed: int, micro_batch: int, process: int) -> torch.Generator:
    """The CPU generator of one micro-batch's noise and timesteps (the same on every device)."""
    import torch

    state = np.random.SeedSequence([seed, micro_batch, process]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


# ----- the loss --------------------------------------------------------------------------------------

def diffusion_loss(backbone: Any, controlnet: Any, images: torch.Tensor, conditions: torch.Tensor,
                   prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """The ControlNet training loss of one batch: noise to random timesteps, ControlNet residuals into the frozen
    UNet (the backbone's own ``predict``), MSE against the noise or the velocity."""
    import torch
    import torch.nn.functional as F

    from g4seg.diffusion_math import add_noise

    side = images.shape[-1]
    with torch.no_grad():
        latents = backbone.encode(images)
        cond = backbone.encode_prompts(list(prompts), (side, side))
    steps = len(backbone.alphas_cumprod)
    timesteps = torch.randint(0, steps, (images.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    alpha = backbone.alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(latents.device)
    noisy = add_noise(latents, alpha, noise)
    timesteps = timesteps.to(latents.device)
    control = conditions.to(latents.device)

    def residuals(sample: torch.Tensor, timestep: Any, conditioning: Any) -> dict[str, Any]:
        down, mid = controlnet(sample, timestep, encoder_hidden_states=conditioning.encoder_hidden_states,
                               controlnet_cond=control, return_dict=False)
        return {"down_block_additional_residuals": [d.to(backbone.dtype) for d in down],
                "mid_block_additional_residual": mid.to(backbone.dtype)}

    prediction = backbone.predict(noisy, timesteps, cond, residuals=residuals)
    if backbone.prediction_type == "epsilon":
        target = noise
    elif backbone.prediction_type == "v_prediction":  # diffusers' DDPMScheduler.get_velocity
        target = alpha.sqrt() * noise.float() - (1 - alpha).sqrt() * latents.float()
    else:
        raise G4SegError(f"ControlNet training supports epsilon and v_prediction models, not "
                         f"'{backbone.prediction_type}'")
    return F.mse_loss(prediction.float(), target.float())


# ----- the output folder -----------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise G4SegError(f"cannot read {path}: {exc}") from None


def fsync_tree(folder: Path) -> None:
    """fsync every file of ``folder`` (recursively) and the folders themselves, before a rename publishes it."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints (renamed into place, so whole), by step."""
    found = []
    for path in (out / CHECKPOINTS).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if step.isdigit() and (path / PROGRESS_FILE).is_file():
            found.append((int(step), path))
    return sorted(found)


def check_folder(out: Path, settings: TrainSettings) -> dict[str, Any] | None:
    """Refuse a folder that is not this run's (one line); returns the finished run's log, if there is one."""
    from g4seg.checks import check_output_folder

    check_output_folder(out)
    recorded = read_json(out / SETTINGS_FILE) if out.is_dir() else None
    if recorded is None:
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise G4SegError(f"--out {out} already holds files but no {SETTINGS_FILE}: it is not a ControlNet "
                             f"training folder; use a new or empty folder")
        return None
    mine = settings.identity()
    theirs = {k: v for k, v in recorded.items() if k not in OPERATIONAL}
    differ = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in differ)
        raise G4SegError(f"--out {out} holds a training run with other settings ({shown}); rerun with its settings "
                         f"(see {out / SETTINGS_FILE}) or use another --out")
    log = read_json(out / LOG_FILE)
    if log is not None and log["step"] > settings.steps:
        raise G4SegError(f"--out {out} holds a ControlNet already trained for {log['step']} steps, more than "
                         f"--steps {settings.steps}; pass --steps {log['step']} or more, or use another --out")
    last = checkpoints(out)
    if last and last[-1][0] > settings.steps:
        raise G4SegError(f"--out {out} has a checkpoint at step {last[-1][0]}, past --steps {settings.steps}; pass "
                         f"--steps {last[-1][0]} or more, or use another --out")
    return log


# ----- training --------------------------------------------------------------------------------------

Report = Callable[[int, int, float], None]  # (step, steps, loss of that step)


def build_data(settings: TrainSettings) -> ConditionData:
    """The dataset split, checked, with every class's colour (one line for a class without one): no model."""
    from g4seg.builtin.injector_controlnet import ControlNetOptions, Palette
    from g4seg.plugins import registry

    unknown = sorted(set(settings.injector_options) - set(INJECTOR_KEYS))
    if unknown:
        raise G4SegError(f"controlnet train takes the injector options {' and '.join(INJECTOR_KEYS)} only, not "
                         f"{', '.join(unknown)} (the ControlNet to start from is {INIT_OPTION})")
    dataset = registry().get("dataset", settings.dataset).build({"root": settings.root, "split": settings.split})
    dataset.check()
    options = registry().get("injector", "controlnet").parse_options(settings.injector_options)
    assert isinstance(options, ControlNetOptions)
    return ConditionData(dataset, Palette.from_option(options.palette), options.background, settings.prompt)


def load_backbone(settings: TrainSettings, device: str, weight_dtype: str, offline: bool) -> Any:
    """The frozen backbone, built through the backbone registry exactly as ``refine`` builds it."""
    from g4seg.builtin.injector_controlnet import CONTROLNET_TAG
    from g4seg.plugins import registry
    from g4seg.registry import Runtime

    spec = registry().get("backbone", settings.backbone)
    if CONTROLNET_TAG not in spec.tags:
        raise G4SegError(f"backbone '{spec.name}' takes no seg ControlNet (tag {CONTROLNET_TAG}): use sd15, sd21 or "
                         f"sd21-768")
    return spec.build(settings.backbone_options, Runtime(device=device, dtype=weight_dtype, offline=offline))


def load_init(settings: TrainSettings, backbone: Any, offline: bool) -> Any:
    """The float32 ControlNet to train: ``--init`` (a model reference), the family's default, or the UNet's copy."""
    from diffusers import ControlNetModel

    from g4seg.builtin.injector_controlnet import check_fits, default_model
    from g4seg.console import loading
    from g4seg.model_ref import describe_source, load_pretrained, resolve_model_ref

    if settings.init == INIT_FROM_UNET:
        return ControlNetModel.from_unet(backbone.unet).float()
    ref = resolve_model_ref(settings.init or default_model(backbone.unet.config), INIT_OPTION)
    with loading("the ControlNet", describe_source(ref, None, offline)):
        model = load_pretrained(ControlNetModel, ref, offline=offline, option=INIT_OPTION, dtype=None)
    check_fits(model.config, backbone.unet.config, ref.text)
    return model.float()


def train_controlnet(settings: TrainSettings, out: Path, *, cpu: bool = False, offline: bool = False,
                     report: Report | None = None) -> TrainResult:
    """Train (or resume, or find finished) the run of ``settings`` in ``out``; see the module docstring."""
    import torch
    from accelerate import Accelerator

    from g4seg.runlock import RunLock
    from g4seg.sharding import current_shard

    out = Path(out)
    settings = settings.model_copy(update={"processes": current_shard().world_size})
    data = build_data(settings)
    log = check_folder(out, settings)
    if log is not None and log["step"] == settings.steps:
        return TrainResult(out, log["step"], log["step"], log.get("eval_loss_initial"), log.get("eval_loss_final"),
                           log["losses"], nothing_to_do=True)
    if settings.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise G4SegError("--mixed-precision fp16 needs a CUDA GPU (use bf16 or no on a CPU)")
    accelerator = Accelerator(cpu=cpu, mixed_precision=settings.mixed_precision,
                              gradient_accumulation_steps=settings.grad_accum)
    if accelerator.num_processes != settings.processes:
        raise G4SegError(f"accelerate runs {accelerator.num_processes} processes but WORLD_SIZE says "
                         f"{settings.processes}; start the run with accelerate launch or torchrun")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, current_shard()):
        return _train(settings, out, data, accelerator, offline, report)


def _train(settings: TrainSettings, out: Path, data: ConditionData, accelerator: Any, offline: bool,
           report: Report | None) -> TrainResult:
    import torch

    main = accelerator.is_main_process
    if main:
        for stale in [*out.glob(f"{TEMP_PREFIX}*"), *(out / CHECKPOINTS).glob(f"{TEMP_PREFIX}*")]:
            shutil.rmtree(stale, ignore_errors=True)  # a killed save's leftovers: never renamed, never read
        if not (out / SETTINGS_FILE).is_file():
            atomic_write_json(out / SETTINGS_FILE, settings.model_dump(mode="json"))
    weight_dtype = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}[settings.mixed_precision]
    backbone = load_backbone(settings, str(accelerator.device), weight_dtype, offline)
    side = settings.resolution or backbone.resolution
    controlnet = load_init(settings, backbone, offline).to(accelerator.device)
    if settings.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        backbone.unet.enable_gradient_checkpointing()
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=settings.lr, **ADAM)
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)

    saved = checkpoints(out)
    progress: dict[str, Any] = {"step": 0, "losses": [], "eval_loss_initial": None}
    if saved:
        accelerator.load_state(str(saved[-1][1]))
        progress = read_json(saved[-1][1] / PROGRESS_FILE) or progress
    start = progress["step"]
    evaluate = fixed_evaluation(backbone, data, settings, side)
    if start == 0 and main:
        progress["eval_loss_initial"] = evaluate(accelerator.unwrap_model(controlnet))
    began = time.monotonic()
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in range(start, settings.steps):
        total = torch.zeros((), device=accelerator.device)
        for part in range(settings.grad_accum):
            micro = step * settings.grad_accum + part
            indices = positions(len(data), settings.seed, (micro * world + rank) * settings.batch, settings.batch)
            images, conditions, prompts = data.batch(indices, side)
            with accelerator.accumulate(controlnet):
                loss = diffusion_loss(backbone, controlnet, images, conditions, prompts,
                                      stream_generator(settings.seed, micro, rank))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach() / settings.grad_accum
        mean = float(accelerator.gather(total[None]).mean())
        progress["losses"].append(mean)
        progress["step"] = step + 1
        if report is not None and main:
            report(step + 1, settings.steps, mean)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            save_checkpoint(accelerator, out, progress, settings.keep)
    model = accelerator.unwrap_model(controlnet)
    final = evaluate(model) if main else None
    if main:
        save_model(model, out)
        atomic_write_json(out / LOG_FILE, {"step": settings.steps, "started_at": start,
                                           "seconds": time.monotonic() - began,
                                           "eval_loss_initial": progress["eval_loss_initial"],
                                           "eval_loss_final": final, "losses": progress["losses"]})
    accelerator.wait_for_everyone()
    return TrainResult(out, settings.steps, start, progress["eval_loss_initial"], final, progress["losses"])


def fixed_evaluation(backbone: Any, data: ConditionData, settings: TrainSettings, side: int) -> Callable[[Any], float]:
    """The fixed evaluation loss: the split's first images, each with the same noise and timesteps every time."""
    import torch

    count = min(EVAL_IMAGES, len(data))
    images, conditions, prompts = data.batch(list(range(count)) * EVAL_DRAWS, side)

    def evaluate(controlnet: Any) -> float:
        was_training = controlnet.training
        controlnet.eval()
        generator = stream_generator(settings.seed, EVAL_STREAM, 0)
        losses = []
        with torch.no_grad():
            for first in range(0, len(prompts), settings.batch):
                part = slice(first, first + settings.batch)
                loss = diffusion_loss(backbone, controlnet, images[part], conditions[part], prompts[part], generator)
                losses.append(float(loss) * len(prompts[part]))
        controlnet.train(was_training)
        return sum(losses) / len(prompts)

    return evaluate


def save_checkpoint(accelerator: Any, out: Path, progress: dict[str, Any], keep: int) -> None:
    """accelerate's state and the progress record into a temporary folder, fsynced, renamed; the last ``keep``."""
    folder = out / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{progress['step']:07d}"
    temp = folder.with_name(TEMP_PREFIX + folder.name)
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(temp / PROGRESS_FILE, progress)
        fsync_tree(temp)
        if folder.exists():  # the same step saved before (a rerun that stopped between rename and log)
            shutil.rmtree(folder)
        os.replace(temp, folder)
        fsync_dir(folder.parent)
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_model(model: Any, out: Path) -> None:
    """``save_pretrained`` (safetensors) into a temporary folder, fsynced, each file renamed into ``out``."""
    temp = out / f"{TEMP_PREFIX}model"
    shutil.rmtree(temp, ignore_errors=True)
    model.save_pretrained(temp, safe_serialization=True)
    fsync_tree(temp)
    for path in sorted(temp.iterdir(), key=lambda p: p.name == "config.json"):  # config last
        os.chmod(path, FILE_MODE)  # safetensors writes 0600; the folder's other files get the umask's mode
        os.replace(path, out / path.name)
    fsync_dir(out)
    temp.rmdir()
