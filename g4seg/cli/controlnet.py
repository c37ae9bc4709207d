"""``g4seg controlnet train``: fine-tune a seg ControlNet on a dataset split (docs/controlnet-training.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from g4seg.errors import G4SegError

controlnet_app = typer.Typer(name="controlnet", help="Seg ControlNets for the controlnet injector.",
                             no_args_is_help=True, add_completion=False)


@controlnet_app.callback()
def _group() -> None:
    """Seg ControlNets for the controlnet injector (the paper's Table VIII)."""


def train_command(
    dataset: Annotated[str, typer.Option(help="Dataset name (g4seg list datasets).", show_default=False)],
    root: Annotated[Path, typer.Option(help="Dataset root folder.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoints and the final ControlNet.",
                                      show_default=False)],
    split: Annotated[str, typer.Option(help="Dataset split.")] = "train",
    backbone: Annotated[Optional[str], typer.Option(help="Base model family: sd21, sd15 or sd21-768; default "
                                                         "sd21.")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "-o", "--option", help="backbone.KEY=VALUE (e.g. backbone.model=local-dir:/models/sd21), or "
                               "injector.palette / injector.background for the condition images; repeatable.")] = None,
    init: Annotated[Optional[str], typer.Option(
        help="ControlNet to start from: Hub id, hf-hub:, local-dir: or folder; 'unet' = a copy of the UNet's "
             "encoder (ControlNetModel.from_unet); default the backbone family's seg ControlNet.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in all (a rerun may raise it).")] = 5000,
    batch: Annotated[int, typer.Option(min=1, help="Images per micro-batch and process.")] = 4,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate (constant).")] = 5e-6,
    resolution: Annotated[Optional[int], typer.Option(help="Square training side, a multiple of 64; default the "
                                                           "backbone's.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt template, {} = the classes present, comma-joined; "
                                                       "default 'a photo of {}'.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the data order, noise and timesteps.")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 (CUDA) or bf16.")] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, slower.")] = False,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Optimizer steps between checkpoints.")] = 500,
    keep: Annotated[int, typer.Option(min=1, help="Checkpoints kept.")] = 2,
    device: Annotated[str, typer.Option(help="auto (accelerate's choice: the GPU of each process) or cpu.")] = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Never contact the Hugging Face Hub.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with the loss.")] = True,
) -> None:
    """Fine-tune a seg ControlNet on a dataset split; resumes from OUT's last checkpoint after a kill."""
    from g4seg.config import load_config, parse_overrides
    from g4seg.controlnet_train import TrainSettings, train_controlnet
    from g4seg.runtime import set_offline

    if lr <= 0:
        raise G4SegError(f"--lr must be above 0, got {lr}")
    if device not in ("auto", "cpu"):
        raise G4SegError(f"--device must be auto or cpu, got '{device}' (accelerate places each process on its GPU)")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise G4SegError(f"--mixed-precision must be no, fp16 or bf16, got '{mixed_precision}'")
    set_offline(offline)
    options = parse_overrides(option or [])
    other = sorted(set(options) - {"backbone", "injector"})
    if other:
        raise G4SegError(f"controlnet train takes -o backbone.* and -o injector.* options only, not "
                         f"{', '.join(other)}.*")
    # the refine settings' own validation: backbone name, resolution multiple of 64, prompt with one {}
    cfg = load_config(None, backbone=backbone, resolution=resolution, prompt=prompt, seed=seed,
                      options=options or None)
    settings = TrainSettings(
        dataset=dataset, root=str(root.expanduser().resolve()), split=split, backbone=cfg.backbone,
        backbone_options=cfg.component_options("backbone"), injector_options=cfg.component_options("injector"),
        init=init, steps=steps, batch=batch, grad_accum=grad_accum, lr=lr, resolution=cfg.resolution,
        prompt=cfg.prompt, seed=cfg.seed, mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every, keep=keep,
    )
    if progress:
        result = _with_progress(settings, out, device == "cpu", offline)
    else:
        result = train_controlnet(settings, out, cpu=device == "cpu", offline=offline)
    if result.nothing_to_do:
        typer.echo(f"nothing to do: {out} already holds the ControlNet trained for {result.step} steps")
        return
    resumed = f" (resumed at step {result.started_at})" if result.started_at else ""
    typer.echo(f"trained {result.step} steps{resumed}; fixed evaluation loss {_loss(result.eval_loss_initial)} "
               f"before, {_loss(result.eval_loss_final)} after")
    typer.echo(f"ControlNet in {out}: g4seg refine ... --injector controlnet -o injector.model=local-dir:{out}")


def _loss(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"


def _with_progress(settings, out: Path, cpu: bool, offline: bool):
    """The run with a rich progress bar on stderr showing each step's loss."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from g4seg.controlnet_train import train_controlnet

    columns = (TextColumn("ControlNet"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn())
    bar = Progress(*columns, console=Console(stderr=True))
    tasks: list = []  # the bar starts with the first step, so a run with nothing to do shows none

    def report(step: int, total: int, loss: float) -> None:
        if not tasks:
            bar.start()
            tasks.append(bar.add_task("train", total=total, completed=step - 1, loss="-"))
        bar.update(tasks[0], completed=step, loss=f"{loss:.4f}")

    try:
        return train_controlnet(settings, out, cpu=cpu, offline=offline, report=report)
    finally:
        if tasks:
            bar.stop()
