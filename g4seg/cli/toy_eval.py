"""``g4seg toy export``, ``g4seg toy eval`` and ``g4seg toy sanity``: the toy world as data and as measurements.

The refine settings are ``g4seg refine``'s, with the same names, parsed by the same helpers
(:func:`g4seg.config.load_config`, :func:`g4seg.config.parse_overrides`, :func:`g4seg.checks.check_settings`);
only their defaults differ: backbone ``toy``, extractor ``toy-clip`` and the prompt ``a photo of a {}`` of
the toy captions. No model loads before every setting and output path is checked.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from g4seg.errors import G4SegError
from g4seg.toy.train import HELD_OUT_SEEDS_START as HELD_OUT  # numpy only; torch loads in functions

if TYPE_CHECKING:
    from g4seg.config import RefineConfig

console = Console(highlight=False, soft_wrap=True)
if not console.is_terminal:  # logs and pipes: the harness table needs more than rich's 80 columns
    console = Console(highlight=False, soft_wrap=True, width=140)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

TOY_DEFAULTS = {"backbone": "toy", "extractor": "toy-clip", "prompt": "a photo of a {}"}

N = Annotated[int, typer.Option("--n", help="Number of scenes.")]
SeedStart = Annotated[int, typer.Option("--seed-start",
                                        help=f"First scene seed (held-out scenes start at {HELD_OUT}).")]
Perturbations = Annotated[Optional[str], typer.Option(
    "--perturbations", help="Comma-separated perturbations (dilate-1, erode-2, ...) or all; default all.")]
JsonFile = Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")]
Threads = Annotated[int, typer.Option(
    "--threads", min=1, help="CPU threads of torch. On 2 idle cores 2 threads are ~1.5x faster than 1, but when "
                             "another process shares the CPU they run 2x to many times slower.")]
Backbone = Annotated[Optional[str], typer.Option(help="Backbone; default toy.")]
Injector = Annotated[Optional[str], typer.Option(help="Injector; default attn.")]
Extractor = Annotated[Optional[str], typer.Option(help="Feature extractor; default toy-clip.")]
Timestep = Annotated[Optional[int], typer.Option(help="Noising step t_s; default 400.")]
Beta = Annotated[Optional[float], typer.Option(help="Mixing coefficient; default 0.8.")]
Band = Annotated[Optional[str], typer.Option("--cf", help="Confidence band LO,HI; default 0.2,0.6.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Noise seed; default 0.")]
Prompt = Annotated[Optional[str], typer.Option(help="Prompt template with {}; default 'a photo of a {}'.")]
RampWidth = Annotated[Optional[float], typer.Option(help="Signed-distance ramp of hard masks, fraction of the "
                                                         "short side; default 0.05.")]
GuidanceScale = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale; default off.")]
ClassEmbedding = Annotated[Optional[str], typer.Option(help="Class-name token embeddings: prompt or alone.")]
ClassBatch = Annotated[Optional[int], typer.Option(help="Classes per UNet call; default 8.")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu or cuda:N; default auto.")]
Dtype = Annotated[Optional[str], typer.Option(help="auto, fp16, bf16 or fp32; default auto.")]
Offline = Annotated[bool, typer.Option("--offline", help="Never contact the Hugging Face Hub.")]
Option = Annotated[Optional[list[str]], typer.Option("-o", "--option", help="COMPONENT.KEY=VALUE, repeatable, e.g. "
                                                     "-o backbone.model=local-dir:DIR/sd.")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]


def toy_config(option: list[str] | None, cf: str | None, **settings: Any) -> "RefineConfig":
    """A refine configuration from the flags (None = not given) over the toy defaults, checked without models."""
    from g4seg.checks import check_settings
    from g4seg.cli.refine import parse_band
    from g4seg.config import load_config, parse_overrides
    from g4seg.runtime import set_offline
    from g4seg.toy.scenes import CLASSES

    set_offline(bool(settings.get("offline")))
    given = {k: v for k, v in settings.items() if v is not None and v is not False}
    cfg = load_config(None, **{**TOY_DEFAULTS, **given, "cf": parse_band(cf),
                               "options": parse_overrides(option or []) or None})
    check_settings(cfg, CLASSES)
    return cfg


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU thread count for a block, restored afterwards (commands also run inside tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_json(path: Path, report: dict[str, Any], what: str = "--json") -> None:
    from g4seg.io import write_json_report

    write_json_report(path, report, what, allow_nan=False)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _ci(pair: list[float | None] | None) -> str:
    if not pair or pair[0] is None:
        return ""
    return f" [{pair[0]:+.2f}, {pair[1]:+.2f}]"


# ----- export ------------------------------------------------------------------------------------

def export_command(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write.", show_default=False)],
    n: N = 200,
    seed_start: SeedStart = HELD_OUT,
    perturbations: Perturbations = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that is not empty.")] = False,
) -> None:
    """Write toy scenes as the dataset `toy`: images/, labels/, coarse/<perturbation>/, val.txt, classes.txt."""
    from g4seg.builtin.dataset_toy import export_toy
    from g4seg.toy.perturb import parse_names

    names = parse_names(perturbations)
    ids = export_toy(out, n, seed_start, names, overwrite=overwrite)
    console.print(f"wrote {len(ids)} scenes ({ids[0]} .. {ids[-1]}) with {len(names)} coarse folders to {out}")
    console.print(f"next: g4seg refine --dataset toy --root {out} --split val --coarse {out}/coarse/{names[0]} "
                  f"--out OUT --backbone toy --extractor toy-clip --prompt 'a photo of a {{}}'")


# ----- eval --------------------------------------------------------------------------------------

def _harness_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"toy harness: {report['scenes']} held-out scenes, mIoU (%) over 7 classes; gains with "
                        f"95% paired bootstrap intervals over scenes", title_justify="left")
    for column in ("perturbation", "coarse", "refined", "gain [95% CI]", "self", "noise", "over noise [95% CI]",
                   "improved"):
        table.add_column(column, justify="left" if column == "perturbation" else "right")
    rows = [(name, v["coarse"], v["refined"], v, v["self"], v["noise"], v["gain_over_noise"],
             v["gain_over_noise_ci95"], v["improved_fraction"]) for name, v in report["per_perturbation"].items()]
    controls = report["controls"]
    rows.append(("all", report["coarse_mIoU"], report["refined_mIoU"], report, controls["self"]["refined_mIoU"],
                 controls["noise"]["refined_mIoU"], report["gain_over_noise"], report["gain_over_noise_ci95"],
                 report["improved_fraction"]))
    for i, (name, coarse, refined, own, self_, noise, over, over_ci, improved) in enumerate(rows):
        table.add_row(name, _fmt(coarse), _fmt(refined), _fmt(own["gain"], True) + _ci(own["gain_ci95"]),
                      _fmt(self_), _fmt(noise), _fmt(over, True) + _ci(over_ci),
                      "-" if improved is None else f"{100 * improved:.0f}%", end_section=i == len(rows) - 2)
    return table


def eval_command(
    n: N = 200,
    seed_start: SeedStart = HELD_OUT,
    perturbations: Perturbations = None,
    json_file: JsonFile = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder for eval.json and pictures/<perturbation>/scene<seed>.png of the first --pictures "
                      "scenes.")] = None,
    pictures: Annotated[int, typer.Option("--pictures", min=0, help="--out: scenes drawn per perturbation.")] = 4,
    resamples: Annotated[int, typer.Option("--resamples", help="Bootstrap resamples of the scenes.")] = 1000,
    bootstrap_seed: Annotated[int, typer.Option("--bootstrap-seed", help="Seed of the bootstrap.")] = 0,
    threads: Threads = 1,
    backbone: Backbone = None, injector: Injector = None, extractor: Extractor = None, timestep: Timestep = None,
    beta: Beta = None, cf: Band = None, seed: Seed = None, prompt: Prompt = None, ramp_width: RampWidth = None,
    guidance_scale: GuidanceScale = None, class_embedding: ClassEmbedding = None, class_batch: ClassBatch = None,
    device: Device = None, dtype: Dtype = None, offline: Offline = False, option: Option = None,
    progress: Progress = True,
) -> None:
    """Refine perturbed ground truth of held-out toy scenes: coarse vs refined mIoU per perturbation, with controls.

    Every coarse mask is refined three times with the same settings: generator model (the method), self (the
    image compared with itself) and noise (with seeded noise); a gain counts only where it beats noise.
    """
    from g4seg.checks import check_output_file, check_output_folder
    from g4seg.metrics import check_bootstrap
    from g4seg.toy.harness import held_out_seeds
    from g4seg.toy.perturb import parse_names

    seeds = held_out_seeds(n, seed_start)
    names = parse_names(perturbations)
    check_bootstrap(resamples, bootstrap_seed)
    if json_file is not None:
        check_output_file(json_file, "--json")
    if out is not None:
        check_output_folder(out)
    cfg = toy_config(option, cf, backbone=backbone, injector=injector, extractor=extractor, timestep=timestep,
                     beta=beta, seed=seed, prompt=prompt, ramp_width=ramp_width, guidance_scale=guidance_scale,
                     class_embedding=class_embedding, class_batch=class_batch, device=device, dtype=dtype,
                     offline=offline)
    report = _run_harness(cfg, seeds, names, threads, progress, pictures if out is not None else 0, out,
                          resamples, bootstrap_seed)
    console.print(_harness_table(report))
    per = report["seconds_per_refine"]
    console.print(f"coarse mIoU {_fmt(report['coarse_mIoU'])} -> refined {_fmt(report['refined_mIoU'])} (gain "
                  f"{_fmt(report['gain'], True)}{_ci(report['gain_ci95'])}; over the noise control "
                  f"{_fmt(report['gain_over_noise'], True)}{_ci(report['gain_over_noise_ci95'])}); "
                  f"{len(seeds) * len(names)} coarse masks x 3 generators in {report['seconds']['total']:.1f} s "
                  f"(per refine: model {per['model']:.3f} s, self {per['self']:.3f} s, noise {per['noise']:.3f} s)")
    for path, what in ((json_file, "--json"), (out / "eval.json" if out is not None else None, "--out")):
        if path is not None:
            _write_json(path, report, what)
            console.print(f"wrote {path}")


def _run_harness(cfg: "RefineConfig", seeds: list[int], names: list[str], threads: int, progress: bool,
                 pictures: int, out: Path | None, resamples: int, bootstrap_seed: int) -> dict[str, Any]:
    """Build the refiner once, run the harness, summarise, and draw the pictures."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from g4seg.refiner import Refiner
    from g4seg.toy.harness import run_harness, summarise

    start = time.perf_counter()
    refiner = Refiner.from_config(cfg)
    built = time.perf_counter()
    columns = (TextColumn("scenes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with torch_threads(threads), Progress(*columns, console=err_console, disable=not progress) as bar:
        task = bar.add_task("scenes", total=len(seeds))
        run = run_harness(refiner, seeds, names, pictures=pictures, advance=lambda: bar.advance(task))
    ran = time.perf_counter()
    report = summarise(run, resamples, bootstrap_seed)
    report["settings"] = cfg.model_dump(mode="json")
    report["seconds"] = {"build": built - start, "refine": ran - built, "total": time.perf_counter() - start}
    report["threads"] = threads
    if out is not None and run.panels:
        _draw(run.panels, out)
    return report


def _draw(panels: list, out: Path) -> None:
    from g4seg.evaluation import save_figure
    from g4seg.toy.harness import panel_figure

    for panel in panels:
        path = out / "pictures" / panel.perturbation / f"scene{panel.seed}.png"
        try:
            save_figure(panel_figure(panel), path)
        except OSError as exc:
            raise G4SegError(f"cannot write {path}: {exc.strerror or exc}") from None


# ----- sanity ------------------------------------------------------------------------------------

def _sanity_tables(report: dict[str, Any]) -> list[Table]:
    def table(title: str, rows: list[tuple[str, Any]]) -> Table:
        t = Table(title=title, title_justify="left")
        t.add_column("figure")
        t.add_column("value", justify="right")
        for name, value in rows:
            t.add_row(name, value if isinstance(value, str) else _fmt(value))
        return t

    rec, prm, inj, cor = (report[k] for k in ("reconstruction", "prompt", "injection", "correspondence"))
    x0 = rec["x0_psnr_db"]
    tables = [table(f"reconstruction, PSNR (dB), {report['scenes']} scenes, t = {report['timestep']}", [
        ("VAE reconstruction vs input", rec["vae_psnr_db"]), ("x~0 (caption) vs input", x0["vs_input"]),
        ("x~0 vs VAE reconstruction", x0["vs_vae_reconstruction"]), ("x~0 vs another scene (floor)",
                                                                      x0["floor_other_scene"]),
        ("x~0 (empty prompt) vs input", rec["x0_empty_prompt_psnr_db"])])]
    zs = prm["zero_shot"]
    tables.append(table("class prompt vs wrong-class prompt", [
        ("PSNR correct prompt (dB)", prm["psnr_correct_prompt_db"]), ("PSNR wrong prompt (dB)",
                                                                      prm["psnr_wrong_prompt_db"]),
        ("change between them inside the object (0-255)", prm["change_inside_object"]),
        ("change between them outside the object (0-255)", prm["change_outside_object"]),
        ("zero-shot: original object box is its class", zs["original_is_class"]),
        ("zero-shot: correct-prompt box is the class", zs["correct_prompt_is_class"]),
        ("zero-shot: wrong-prompt box is the class", zs["wrong_prompt_is_class"]),
        ("zero-shot: wrong-prompt box is the wrong class", zs["wrong_prompt_is_wrong_class"])]))
    if inj.get("regions"):
        rows = [("original: labelled A", inj["original"]["labelled_class"]),
                ("original: labelled background", inj["original"]["labelled_background"])]
        for name, values in inj.items():
            if isinstance(values, dict) and "labelled_class" in values and name != "original":
                rows += [(f"{name}: labelled A", values["labelled_class"]),
                         (f"{name}: change vs input inside R / outside (0-255)",
                          f"{_fmt(values['change_inside'])} / {_fmt(values['change_outside'])}")]
            elif isinstance(values, dict) and name.endswith("_vs_none"):
                rows.append((f"{name}: change inside R / outside (0-255)",
                             f"{_fmt(values['change_inside'])} / {_fmt(values['change_outside'])}"))
        tables.append(table(f"injection: an absent class A into a free {inj['side']} px background square R, "
                            f"{inj['regions']} regions", rows))
    rows = [(f"{g}: all / object / band", " / ".join(_fmt(cor[g][k]) for k in ("all", "object", "band")))
            for g in ("model", "noise", "self", "chance")]
    tables.append(table("correspondence: Eq. 8 match lands on the same class (ground truth injected)", rows))
    return tables


def sanity_command(
    n: N = 64,
    seed_start: SeedStart = HELD_OUT,
    json_file: JsonFile = None,
    threads: Threads = 1,
    backbone: Backbone = None, injector: Injector = None, extractor: Extractor = None, timestep: Timestep = None,
    seed: Seed = None, prompt: Prompt = None, ramp_width: RampWidth = None, cf: Band = None,
    device: Device = None, dtype: Dtype = None, offline: Offline = False, option: Option = None,
) -> None:
    """Sanity figures: one-step reconstruction, prompt and mask injection effects, correspondence accuracy."""
    from g4seg.checks import check_output_file
    from g4seg.toy.harness import held_out_seeds
    from g4seg.toy.sanity import build_parts, sanity

    seeds = held_out_seeds(n, seed_start)
    if json_file is not None:
        check_output_file(json_file, "--json")
    cfg = toy_config(option, cf, backbone=backbone, injector=injector, extractor=extractor, timestep=timestep,
                     seed=seed, prompt=prompt, ramp_width=ramp_width, device=device, dtype=dtype, offline=offline)
    start = time.perf_counter()
    parts = build_parts(cfg)
    with torch_threads(threads):
        report = sanity(parts, seeds, lambda name: err_console.print(f"{name}: done "
                                                                     f"({time.perf_counter() - start:.0f} s)"))
    report["seconds"] = time.perf_counter() - start
    report["settings"] = cfg.model_dump(mode="json")
    for table in _sanity_tables(report):
        console.print(table)
    if json_file is not None:
        _write_json(json_file, report)
        console.print(f"wrote {json_file}")
