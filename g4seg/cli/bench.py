"""``g4seg bench``: the naive path against the optimised one, in one run, on the same inputs.

The work is :mod:`g4seg.benchmark`; this module parses the options, prints the table and writes the JSON.
Everything is checked before a model is built or loaded (torch and the model libraries load in the
command, not at import, so that the CLI starts fast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from g4seg.errors import G4SegError

console = Console(highlight=False, soft_wrap=True)
if not console.is_terminal:  # logs and pipes: the table needs more than rich's 80 columns
    console = Console(highlight=False, soft_wrap=True, width=140)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _engine(image_batch: int | None, compile_: bool | None) -> dict[str, Any]:
    """The optimised path's engine settings that were given, if this g4seg's configuration has them."""
    from g4seg.config import RefineConfig

    given = {name: value for name, value in (("image_batch", image_batch), ("compile", compile_))
             if value is not None}
    missing = sorted(set(given) - set(RefineConfig.model_fields))
    if missing:
        raise G4SegError(f"this g4seg has no {', '.join('--' + m.replace('_', '-') for m in missing)} yet")
    return given


def engine_text(path: dict[str, Any]) -> str:
    """``fp32, 3 classes/call, 2 images/batch, compiled``: a path's engine settings in words."""
    parts = [path["dtype"], f"{path['class_batch']} class{'es' if path['class_batch'] > 1 else ''}/call"]
    if path.get("image_batch", 1) > 1:
        parts.append(f"{path['image_batch']} images/batch")
    parts += [word for key, word in (("compile", "compiled"), ("offload", "offloaded")) if path.get(key)]
    return ", ".join(parts)


def print_report(report: dict[str, Any]) -> None:
    """The two paths side by side, the speed-up and the result check."""
    s = report["settings"]
    table = Table(title=f"g4seg bench: {s['backbone']} (random weights, real sizes), {s['resolution']} px, "
                        f"{s['classes']} classes x {s['images']} images; {report['device']}")
    table.add_column("path")
    table.add_column("engine")
    table.add_column("ms / image-class", justify="right")
    table.add_column("min-max", justify="right")
    table.add_column("peak MB", justify="right")
    table.add_column("speed-up", justify="right")
    for name in ("naive", "optimised"):
        p = report[name]
        runs = p["ms_per_image_class_runs"]
        table.add_row(name, engine_text(p), f"{p['ms_per_image_class']:.1f}", f"{min(runs):.1f}-{max(runs):.1f}",
                      f"{p['peak_mb']:.0f}", f"{report['speedup']:.2f}x" if name == "optimised" else "1.00x")
    console.print(table)
    verdict = "[green]same result[/green]" if report["same_result"] else "[red]DIFFERENT RESULT[/red]"
    console.print(f"labels equal: {report['labels_equal']}; label agreement {report['label_agreement']:.4%}; "
                  f"max |prob diff| {report['max_abs_prob_diff']:.3g}; rule: {report['tolerance']['rule']} -> "
                  f"{verdict}")
    console.print(f"ms / image-class: median of {s['repeats']} timed pass(es) over all images, after {s['warmup']} "
                  f"untimed warm-up(s) on the first image(s); peak MB: {report['memory']}")


def bench_command(
    backbone: Annotated[str, typer.Option(help="Backbone (random real-size weights: sd21 or sd15; others need "
                                               "--models).")] = "sd21",
    injector: Annotated[str, typer.Option(help="Injector.")] = "attn",
    extractor: Annotated[str, typer.Option(help="Feature extractor (clip: a random ViT-B/16).")] = "clip",
    resolution: Annotated[Optional[int], typer.Option(help="Model input side, a multiple of 64; default 512 on "
                                                           "CUDA, 128 on CPU.")] = None,
    classes: Annotated[Optional[int], typer.Option(help="Classes per image (1..20); default 8 on CUDA, 2 on "
                                                        "CPU.")] = None,
    images: Annotated[Optional[int], typer.Option(help="Synthetic images; default 4 on CUDA, 2 on CPU.")] = None,
    class_batch: Annotated[Optional[int], typer.Option(help="Classes per UNet call on the optimised path; "
                                                            "default all classes in one call.")] = None,
    image_batch: Annotated[Optional[int], typer.Option(help="Images per batch on the optimised path (where "
                                                            "this g4seg batches images).")] = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile on the "
                                                     "optimised path (where this g4seg offers it).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="The optimised path's dtype: auto (fp16 on CUDA, fp32 on CPU), fp16, "
                                            "bf16 or fp32; the naive path is fp32.")] = "auto",
    repeats: Annotated[Optional[int], typer.Option(help="Timed passes per path (median reported); default 5 on "
                                                        "CUDA, 3 on CPU.")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed warm-ups per path (on its first image, or first image "
                                              "batch) before the timed passes.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic inputs, the noise and the random extractor.")] = 0,
    models: Annotated[Optional[Path], typer.Option(help="Folder of the random SD repo: reused if it holds one, "
                                                        "else built there (~2.6 GB); default a temporary "
                                                        "folder.")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here ('-': "
                                                                     "stdout, instead of the table).")] = None,
    option: Annotated[Optional[list[str]], typer.Option("-o", "--option", help="COMPONENT.KEY=VALUE, repeatable, "
                                                        "over the random-weight defaults.")] = None,
) -> None:
    """Time a naive port (fp32, one class per UNet call, per-class encode and features) against the optimised
    engine on the same synthetic inputs, with real-size random-weight models; check both give the same labels."""
    from g4seg.benchmark import BenchSettings, check, run
    from g4seg.config import parse_overrides

    if json_file is not None and str(json_file) != "-":
        if json_file.is_dir():
            raise G4SegError(f"--json {json_file} is a folder; give a file name")
        if not json_file.parent.is_dir():
            raise G4SegError(f"--json: folder {json_file.parent} does not exist")
    settings = BenchSettings(backbone=backbone, injector=injector, extractor=extractor, resolution=resolution,
                             classes=classes, images=images, class_batch=class_batch, device=device, dtype=dtype,
                             repeats=repeats, warmup=warmup, seed=seed, models=models,
                             options=parse_overrides(option or []), engine=_engine(image_batch, compile_))
    settings = check(settings)  # one line per bad value, before anything is built
    to_stdout = json_file is not None and str(json_file) == "-"
    report = run(settings, log=lambda line: err_console.print(line, markup=False))
    text = json.dumps(report, indent=2)
    if to_stdout:
        typer.echo(text)
    else:
        print_report(report)
        if json_file is not None:
            json_file.write_text(text + "\n")
            console.print(f"wrote {json_file}")
    if not report["same_result"]:
        raise G4SegError(f"the optimised path's labels differ from the naive path's beyond the tolerance "
                         f"({report['label_agreement']:.4%} equal; rule: {report['tolerance']['rule']})")
