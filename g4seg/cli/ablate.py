"""``g4seg ablate``: run a grid of settings over one dataset split and tabulate mIoU per cell."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from g4seg.ablation import CellResult

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


SIGNED = ("gain", "noise_gain", "vs_noise")


def _text(column: str, value: object) -> str:
    if value is None or value == "":
        return "-"
    if column in SIGNED and isinstance(value, float):
        return f"{value:+.2f}"
    return f"{value:.2f}" if column in ("miou", "sec_per_image") else str(value)


def _shown(result: CellResult) -> dict:
    """A cell's row with its interval and its noise control as the table shows them."""
    row = result.row()
    row["gain_ci95"] = None if row["gain_lo"] is None else f"[{row['gain_lo']:+.2f}, {row['gain_hi']:+.2f}]"
    if result.status == "done" and result.noise_note:
        row["noise_gain"] = row["vs_noise"] = result.noise_note
    elif row["vs_noise_lo"] is not None:
        row["vs_noise"] = f"{row['vs_noise']:+.2f} [{row['vs_noise_lo']:+.2f}, {row['vs_noise_hi']:+.2f}]"
    return row


def _cell_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    columns = [c for c in ("cell", "status", "miou", "gain", "gain_ci95", "noise_gain", "vs_noise", "images",
                           "sec_per_image", "note") if c in rows[0]]
    headers = {"miou": "mIoU", "sec_per_image": "s/image", "gain_ci95": "95% CI", "noise_gain": "noise control",
               "vs_noise": "over noise [95% CI]"}
    for column in columns:
        numeric = column in ("miou", "gain", "gain_ci95", "noise_gain", "vs_noise", "images", "sec_per_image")
        table.add_column(headers.get(column, column), justify="right" if numeric else "left",
                         overflow="fold", no_wrap=numeric or column == "status")
    for row in rows:
        table.add_row(*(_text(c, row[c]) for c in columns))
    return table


def ablate_command(
    grid: Annotated[Path, typer.Option("--grid", help="Grid file (TOML): dataset, coarse folder, base settings, "
                                                      "axes. See docs/runs.md.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder (cells/<cell>/, results.*, plots/).",
                                      show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo every cell's images.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failing image or cell.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and skipped pairs; run nothing.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Never contact the Hugging Face Hub.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per cell.")] = True,
    resamples: Annotated[int, typer.Option("--resamples", help="Bootstrap resamples of the images for each "
                                                               "gain's 95% interval.")] = 1000,
    bootstrap_seed: Annotated[int, typer.Option("--bootstrap-seed", help="Seed of the bootstrap resampling (the "
                                                                         "grid's `seed` is the noise seed).")] = 0,
) -> None:
    """Refine a dataset split once per combination of settings; write results.md/.csv/.json and plots."""
    from g4seg import ablation
    from g4seg.runtime import set_offline

    set_offline(offline)
    if dry_run:
        cells = ablation.plan_cells(ablation.load_grid(grid))
        rows = [{"cell": c.id, "status": "skipped" if c.skip else "to run", "note": c.skip or ""} for c in cells]
        console.print(_cell_table(rows, f"{sum(c.skip is None for c in cells)} of {len(cells)} cells to run"))
        return
    report = ablation.run_ablation(grid, out, overwrite=overwrite, fail_fast=fail_fast, progress=progress,
                                   log=lambda line: err_console.print(line, markup=False), resamples=resamples,
                                   bootstrap_seed=bootstrap_seed)
    if not report.written:
        console.print("this process's share is done; the report is written by the last process to finish "
                      "(or rerun `g4seg ablate` to write it)")
        return
    coarse = f"{report.coarse_miou:.2f}" if report.coarse_miou is not None else report.coarse_note
    console.print(_cell_table([_shown(r) for r in report.results], f"{report.dataset} {report.split}: "
                                                                   f"coarse mIoU {coarse}"))
    console.print(f"wrote {out / 'results.md'}, results.csv, results.json and plots/")
    if any(r.status in ("error", "failed") for r in report.results):
        raise typer.Exit(1)
