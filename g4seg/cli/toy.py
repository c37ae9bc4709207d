"""``g4seg toy ...``: the toy world (docs/quality.md): train its models, measure the method on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

toy_app = typer.Typer(name="toy", help="The toy world: synthetic scenes and the small models trained on them.",
                      no_args_is_help=True, add_completion=False)


def train_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for sd/, clip/ and train_log.json.")] = Path("toy-model"),
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of every stage.")] = 0,
    scenes: Annotated[int, typer.Option("--scenes", min=1, help="Training scenes.")] = 12000,
    vae_steps: Annotated[int, typer.Option("--vae-steps", min=1, help="VAE optimiser steps.")] = 1200,
    unet_steps: Annotated[int, typer.Option("--unet-steps", min=1, help="UNet + text encoder steps.")] = 600,
    clip_steps: Annotated[int, typer.Option("--clip-steps", min=1, help="CLIP steps.")] = 1200,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1,
                                                   help="CPU threads in all; default: every core.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, or cuda / cuda:N to train on a GPU.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the models already in --out.")] = False,
) -> None:
    """Train the toy world's diffusion model and CLIP from scratch (seeded; about 45 minutes on 2 CPU cores)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from g4seg.errors import G4SegError
    from g4seg.toy.train import TrainSettings, train_toy

    taken = [name for name in ("sd", "clip") if (out / name).exists()]
    if taken and not overwrite:
        raise G4SegError(f"{out} already holds {' and '.join(n + '/' for n in taken)}; use --overwrite to replace "
                         f"them or another --out")
    out.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings(seed=seed, scenes=scenes, vae_steps=vae_steps, unet_steps=unet_steps,
                             clip_steps=clip_steps, device=device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[figures]}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, step: int, total: int, figures: dict[str, float]) -> None:
            if stage not in tasks:
                label = {"vae": "VAE", "unet": "UNet + text", "clip": "CLIP (second process)"}[stage]
                tasks[stage] = progress.add_task(label, total=total, figures="")
            text = "  ".join(f"{k} {v:.4f}" for k, v in figures.items())
            progress.update(tasks[stage], completed=step, figures=text)

        log = train_toy(out, settings, report, threads=threads)
    seconds = log["seconds"]
    typer.echo(f"VAE reconstruction {log['vae_psnr_db']:.2f} dB, CLIP zero-shot accuracy "
               f"{log['clip_zero_shot_accuracy']:.3f}; {seconds['total'] / 60:.1f} min "
               f"(VAE {seconds['vae'] / 60:.1f}, UNet {seconds['unet'] / 60:.1f}, CLIP {seconds['clip'] / 60:.1f})")
    typer.echo(f"models in {out}: -o backbone.model=local-dir:{out / 'sd'} -o extractor.model=local-dir:{out / 'clip'}")


def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for demo.png and refined.png.")] = Path("demo-out"),
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps.")] = "auto",
) -> None:
    """Refine a shipped toy scene's perturbed mask with the shipped toy models (offline, seconds on a CPU)."""
    from rich.console import Console
    from rich.table import Table

    from g4seg.toy.demo import run_demo

    result = run_demo(out, device=device)
    table = Table(title="toy demo: IoU (%) against the exact labels", title_justify="left")
    for column in ("class", "coarse", "refined", "change"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name in [*result.classes, "mIoU"]:
        before, after = result.coarse_iou[name], result.refined_iou[name]
        table.add_row(name, f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}")
    Console(highlight=False).print(table)
    typer.echo(f"picture: {result.picture}")


def toy_commands() -> list[tuple[str, object]]:
    """The ``g4seg toy`` subcommands, registered by :mod:`g4seg.cli`."""
    from g4seg.cli.toy_eval import eval_command, export_command, sanity_command

    return [("train", train_command), ("export", export_command), ("eval", eval_command), ("sanity", sanity_command)]
