"""``g4seg eval``: mmseg-exact mIoU of a prediction folder, optionally against the coarse masks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from g4seg.evaluation import Comparison, EvalResult

console = Console(highlight=False, soft_wrap=True)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _class_table(result: EvalResult, comparison: Comparison | None) -> Table:
    table = Table(title=f"{result.dataset}: per-class IoU (%)", title_justify="left")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    if comparison is not None:
        table.add_column("gain", justify="right")
    for name, value in result.per_class.items():
        row = [name, _fmt(value)]
        if comparison is not None:
            row.append(_fmt(comparison.class_gain[name], signed=True))
        table.add_row(*row)
    return table


def _bin_table(comparison: Comparison) -> Table:
    table = Table(title="gain by coarse per-image IoU (Table VII)", title_justify="left")
    for column in ("coarse IoU", "images", "share", "mean gain"):
        table.add_column(column, justify="right")
    binned = sum(b.count for b in comparison.bins)
    for b in comparison.bins:
        share = f"{100.0 * b.count / binned:.1f}%" if binned else "-"
        table.add_row(b.label, str(b.count), share, _fmt(b.mean_gain, signed=True))
    return table


def eval_command(
    pred_dir: Annotated[Path, typer.Argument(help="Folder of predicted label maps named <id>.png.",
                                             show_default=False)],
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset name (g4seg list datasets).",
                                                   show_default=False)] = None,
    root: Annotated[Optional[Path], typer.Option("--root", help="Dataset root folder.", show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "val",
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write the scores as JSON here.")] = None,
    compare_dir: Annotated[Optional[Path], typer.Option(
        "--compare", help="Folder of the coarse masks (<id>.png) to report the gain over.")] = None,
    resamples: Annotated[int, typer.Option(
        "--resamples", help="--compare: bootstrap resamples of the images for the gain's 95% interval.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="--compare: seed of the bootstrap resampling.")] = 0,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="--compare: write the per-image picture (coarse vs refined IoU) here; default "
                       "next to --json as <name>.per_image.png.")] = None,
    panoptic: Annotated[bool, typer.Option(
        "--panoptic", help="Score COCO panoptic PNGs + JSON (PQ, SQ, RQ as panopticapi) instead of label maps; "
                           "needs --pred-json, --gt-dir and --gt-json, no --dataset.")] = False,
    pred_json: Annotated[Optional[Path], typer.Option("--pred-json", help="--panoptic: the predictions' JSON.")] = None,
    gt_dir: Annotated[Optional[Path], typer.Option("--gt-dir", help="--panoptic: folder of ground-truth PNGs.")] = None,
    gt_json: Annotated[Optional[Path], typer.Option("--gt-json", help="--panoptic: the ground truth's JSON.")] = None,
) -> None:
    """mIoU as mmsegmentation's IoUMetric computes it (dataset-wide sums, 255 ignored), per class; with
    --panoptic, panoptic quality (docs/panoptic.md)."""
    from g4seg.checks import check_output_file
    from g4seg.errors import G4SegError
    from g4seg.evaluation import compare, evaluate, per_image_figure, save_figure
    from g4seg.io import write_json_report
    from g4seg.metrics import check_bootstrap
    from g4seg.plugins import registry

    if panoptic:
        given = [name for name, value in (("--dataset", dataset), ("--root", root), ("--compare", compare_dir),
                                          ("--plot", plot)) if value is not None]
        if given:
            raise G4SegError(f"--panoptic takes --pred-json, --gt-dir and --gt-json, not {', '.join(given)}")
        from g4seg.cli.panoptic import panoptic_eval

        return panoptic_eval(pred_dir, pred_json, gt_dir, gt_json, json_file)
    given = [name for name, value in (("--pred-json", pred_json), ("--gt-dir", gt_dir), ("--gt-json", gt_json))
             if value is not None]
    if given:
        raise G4SegError(f"{', '.join(given)}: give --panoptic to score panoptic predictions")
    if dataset is None or root is None:
        raise G4SegError("eval needs --dataset and --root (or --panoptic with --pred-json, --gt-dir and --gt-json)")
    if compare_dir is None and plot is not None:
        raise G4SegError("--plot draws the comparison: give --compare COARSE_DIR as well")
    if plot is None and json_file is not None and compare_dir is not None:
        plot = per_image_plot_path(json_file)
    check_bootstrap(resamples, seed)
    for path, option in ((json_file, "--json"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, option)  # before the evaluation, not after it
    data = registry().get("dataset", dataset).build({"root": root, "split": split})
    result = evaluate(pred_dir, data)
    comparison = compare(result, evaluate(compare_dir, data), resamples, seed) if compare_dir is not None else None

    console.print(_class_table(result, comparison))
    console.print(f"mIoU {_fmt(result.miou)} over {result.images} images ({data.name} {split})")
    report = result.to_json()
    if comparison is not None:
        console.print(_gain_line(comparison))
        console.print(_bin_table(comparison))
        report["compare"] = comparison.to_json()
    if json_file is not None:
        write_json_report(json_file, report, "--json")
        console.print(f"wrote {json_file}")
    if comparison is not None and plot is not None:
        try:
            save_figure(per_image_figure(comparison, f"{data.name} {split}: {pred_dir.name} vs {compare_dir.name}"),
                        plot)
        except OSError as exc:
            raise G4SegError(f"cannot write --plot {plot}: {exc.strerror or exc}") from None
        console.print(f"wrote {plot}")


def per_image_plot_path(json_file: Path) -> Path:
    """Where the per-image picture goes without --plot: next to the --json report, same name."""
    return json_file.with_name(f"{json_file.stem}.per_image.png")


def _gain_line(comparison: Comparison) -> str:
    low, high = comparison.gain_ci95
    share = comparison.improved_fraction
    improved = "" if share is None else (f"; improved on {100 * share:.1f}% of images, worse on "
                                         f"{100 * comparison.worsened_fraction:.1f}%")
    return (f"coarse mIoU {_fmt(comparison.coarse_miou)}, gain {_fmt(comparison.gain, signed=True)} "
            f"(95% CI [{_fmt(low, signed=True)}, {_fmt(high, signed=True)}], paired bootstrap over images, "
            f"{comparison.resamples} resamples, seed {comparison.seed}){improved}")
