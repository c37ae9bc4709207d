"""Ablations: the cartesian product of settings, each cell an ordinary resumable run, then one report.

A grid file (TOML, see ``docs/runs.md``) names one dataset split and one coarse-mask folder, the base
settings, and the axes to vary: backbones, injectors (with options), extractors, timesteps, betas,
confidence bands, and ``variants`` (labelled sets of any other engine settings, e.g. ramp width, merge
rule, guidance, class embedding: the choices DESIGN.md section 2 decides and asks to compare),
``generators`` (``model`` and the bias controls ``self`` and ``noise``) and ``noises`` (how the latent
reaches t_s: ``add``, ``ddim-inversion``, ``null-text``; the paper's Table IV, with each cell's time per image
and the part of it spent on the noising or inversion).
Cell ``C`` is refined into ``OUT/cells/C/`` by :func:`g4seg.runner.run` (so a rerun resumes it and a
sharded launch splits its images) and scored with :func:`g4seg.evaluation.evaluate`.
Combinations a backbone cannot run (an unsupported injector or extractor: ``requires:`` tags; guidance or
null-text on a backbone whose guidance is built in) are listed as skipped with the reason.

Every gain is reported with its paired bootstrap interval over images, and next to the gain of the
cell's noise control: the cell with the same settings and ``generator = "noise"``. Controls are not
added behind the user's back (they cost a run each): a grid without them shows the control as
missing and says how to add it (docs/runs.md).

Under ``torchrun`` every rank runs its share of every cell; the report is written by whichever process
finds every cell finished (the last rank to finish, or any later rerun).
"""

from __future__ import annotations

import csv
import io as _io
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from g4seg.config import COMPONENT_KINDS, RefineConfig, guidance_refusal, load_config
from g4seg.errors import G4SegError
from g4seg.io import atomic_write_bytes, atomic_write_json
from g4seg.plugins import registry
from g4seg.registry import incompatibilities
from g4seg.runner import WorkItem, dataset_items, folder_status, run

if TYPE_CHECKING:
    from g4seg.evaluation import Comparison, EvalResult
    from g4seg.refiner import Refiner
    from g4seg.registry import Runtime

AXES = ("backbones", "injectors", "extractors", "timesteps", "betas", "cf", "variants", "generators", "noises")
CSV_COLUMNS = ("cell", "backbone", "injector", "extractor", "timestep", "beta", "cf_lo", "cf_hi", "variant",
               "generator", "noise", "status", "miou", "gain", "gain_lo", "gain_hi", "improved_fraction", "noise_cell",
               "noise_gain", "vs_noise", "vs_noise_lo", "vs_noise_hi", "images", "failed", "sec_per_image",
               "noise_sec_per_image", "note")
NOISE = "noise"  # the generator whose cells are the other cells' controls


class Choice(BaseModel):
    """One component on an axis: its registered name, a label for tables and folders, its options."""

    model_config = ConfigDict(extra="forbid")

    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def tag(self) -> str:
        """The label made safe for a folder name ('_' separates the parts of a cell id)."""
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", self.label or self.name).strip("-") or "x"


class Variant(BaseModel):
    """A labelled set of engine settings (RefineConfig fields other than the axes' own), e.g. a ramp width."""

    model_config = ConfigDict(extra="allow")

    label: str

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


AXIS_SETTINGS = ("backbone", "injector", "extractor", "timestep", "beta", "cf", "generator", "noise")


class Axes(BaseModel):
    """What varies; an axis left out takes its single value from ``base`` (or the default)."""

    model_config = ConfigDict(extra="forbid")

    backbones: list[str | Choice] | None = None
    injectors: list[str | Choice] | None = None
    extractors: list[str | Choice] | None = None
    timesteps: list[int] | None = None
    betas: list[float] | None = None
    cf: list[tuple[float, float]] | None = None
    variants: list[Variant] | None = None
    generators: list[Literal["model", "self", "noise"]] | None = None
    noises: list[Literal["add", "ddim-inversion", "null-text"]] | None = None


class GridFile(BaseModel):
    """A whole grid file: dataset, coarse masks, base settings (a RefineConfig's fields), axes."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    root: Path
    split: str = "val"
    coarse: Path
    base: dict[str, Any] = Field(default_factory=dict)
    grid: Axes = Field(default_factory=Axes)


@dataclass(frozen=True)
class Cell:
    """One combination of settings; ``skip`` says why it cannot run (then ``config`` is None)."""

    id: str
    backbone: Choice
    injector: Choice
    extractor: Choice
    timestep: int
    beta: float
    cf: tuple[float, float]
    config: RefineConfig | None
    skip: str | None = None
    variant: str = ""
    generator: str = "model"
    noise: str = "add"

    @property
    def settings(self) -> tuple:
        """Every axis value but the generator: cells sharing it differ only in what Eq. 8 compares with."""
        return (self.backbone.tag, self.injector.tag, self.extractor.tag, self.timestep, self.beta, self.cf,
                self.variant, self.noise)

    def row(self) -> dict[str, Any]:
        return {"cell": self.id, "backbone": self.backbone.tag, "injector": self.injector.tag,
                "extractor": self.extractor.tag, "timestep": self.timestep, "beta": self.beta,
                "cf_lo": self.cf[0], "cf_hi": self.cf[1], "variant": self.variant, "generator": self.generator,
                "noise": self.noise}


@dataclass
class CellResult:
    """A cell's outcome. status: done (scored), skipped, error, failed (some images), pending.

    ``comparison`` is the cell against the coarse masks; ``noise`` the result of its noise control (None when
    the grid has none, or the cell is one) and ``versus_noise`` the cell against that control, paired
    image by image like a comparison with the coarse masks.
    """

    cell: Cell
    status: str
    miou: float | None = None
    gain: float | None = None
    images: int = 0
    failed: int = 0
    sec_per_image: float | None = None
    noise_sec_per_image: float | None = None  # of sec_per_image, bringing the latent to t_s (``noise``)
    note: str = ""
    per_class: dict[str, float | None] | None = None
    bins: list[dict[str, Any]] | None = None
    scored: "EvalResult | None" = field(default=None, repr=False)
    comparison: "Comparison | None" = field(default=None, repr=False)
    noise: "CellResult | None" = field(default=None, repr=False)
    versus_noise: "Comparison | None" = field(default=None, repr=False)

    @property
    def gain_ci95(self) -> tuple[float, float] | None:
        return self.comparison.gain_ci95 if self.comparison else None

    def row(self) -> dict[str, Any]:
        gain_ci, noise_ci = _bounds(self.gain_ci95), _bounds(self.versus_noise.gain_ci95 if self.versus_noise else None)
        return {**self.cell.row(), "status": self.status, "miou": _round(self.miou), "gain": _round(self.gain),
                "gain_lo": gain_ci[0], "gain_hi": gain_ci[1],
                "improved_fraction": _round(self.comparison.improved_fraction, 4) if self.comparison else None,
                "noise_cell": self.noise.cell.id if self.noise else None,
                "noise_gain": _round(self.noise.gain) if self.noise else None,
                "vs_noise": _round(self.versus_noise.gain) if self.versus_noise else None,
                "vs_noise_lo": noise_ci[0], "vs_noise_hi": noise_ci[1],
                "images": self.images, "failed": self.failed, "sec_per_image": _round(self.sec_per_image, 3),
                "noise_sec_per_image": _round(self.noise_sec_per_image, 3), "note": self.note}

    @property
    def noise_note(self) -> str:
        """Why the noise control's gain is not shown: '' when it is, or the cell is a control itself."""
        if self.cell.generator == NOISE or (self.noise is not None and self.noise.status == "done"):
            return ""
        return "missing" if self.noise is None else self.noise.status


@dataclass
class AblationReport:
    """All cells' results, the coarse baseline, and whether the report files were written."""

    out_dir: Path
    dataset: str
    split: str
    coarse_miou: float | None
    coarse_note: str
    results: list[CellResult] = field(default_factory=list)
    written: bool = False
    resamples: int = 1000
    bootstrap_seed: int = 0

    @property
    def finished(self) -> bool:
        return all(r.status != "pending" for r in self.results)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def _bounds(interval: tuple[float, float] | None) -> tuple[float | None, float | None]:
    return (None, None) if interval is None else (_round(interval[0]), _round(interval[1]))


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '?'}: {e['msg']}" for e in exc.errors())


def load_grid(path: Path) -> GridFile:
    """Read and validate a grid file; every problem is one G4SegError line naming the file."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise G4SegError(f"grid file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise G4SegError(f"grid file {path} is not valid TOML: {exc}") from None
    try:
        return GridFile(**data)
    except ValidationError as exc:
        raise G4SegError(f"grid file {path}: {_problems(exc)}") from None


def _choices(values: list[str | Choice] | None, default: str, axis: str) -> list[Choice]:
    choices = [Choice(name=v) if isinstance(v, str) else v for v in (values or [default])]
    tags = [c.tag for c in choices]
    for tag in tags:
        if tags.count(tag) > 1:
            raise G4SegError(f"grid.{axis}: '{tag}' appears more than once; give each entry a distinct label "
                             f"(e.g. {{ name = \"{tag}\", label = \"{tag}-2\", options = {{ ... }} }})")
    return choices


def _values(values: list | None, default: Any, axis: str) -> list:
    values = list(values or [default])
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise G4SegError(f"grid.{axis}: {', '.join(repeated)} listed more than once")
    return values


def _variants(variants: list[Variant] | None) -> list[Variant | None]:
    if not variants:
        return [None]
    labels = [v.label for v in variants]
    for v in variants:
        if labels.count(v.label) > 1 or not re.fullmatch(r"[A-Za-z0-9.+-]+", v.label):
            raise G4SegError(f"grid.variants: label '{v.label}' must be unique and use only letters, digits, "
                             f"'.', '+' and '-'")
        clash = sorted(set(v.settings) & set(AXIS_SETTINGS))
        if clash:
            raise G4SegError(f"grid.variants: '{v.label}' sets {', '.join(clash)}, which have axes of their own")
    return list(variants)


def _cell_config(base: dict[str, Any], backbone: Choice, injector: Choice, extractor: Choice, timestep: int,
                 beta: float, cf: tuple[float, float], variant: Variant | None, generator: str,
                 noise: str) -> RefineConfig:
    settings = {**base, **(variant.settings if variant else {})}
    options = {kind: dict(values) for kind, values in base.get("options", {}).items()}
    for kind, values in (variant.settings.get("options", {}) if variant else {}).items():
        options[kind] = {**options.get(kind, {}), **values}
    for kind, choice in (("backbone", backbone), ("injector", injector), ("extractor", extractor)):
        options[kind] = {**options.get(kind, {}), **choice.options}
    return load_config(None, **{**settings, "backbone": backbone.name, "injector": injector.name,
                                "extractor": extractor.name, "timestep": timestep, "beta": beta, "cf": cf,
                                "generator": generator, "noise": noise, "options": options})


def plan_cells(grid: GridFile) -> list[Cell]:
    """Every combination, backbone outermost (so models load once per backbone), pairs checked."""
    base_config = load_config(None, **grid.base)
    axes = grid.grid
    backbones = _choices(axes.backbones, base_config.backbone, "backbones")
    injectors = _choices(axes.injectors, base_config.injector, "injectors")
    extractors = _choices(axes.extractors, base_config.extractor, "extractors")
    timesteps = _values(axes.timesteps, base_config.timestep, "timesteps")
    betas = _values(axes.betas, base_config.beta, "betas")
    bands = _values(axes.cf, base_config.cf, "cf")
    variants = _variants(axes.variants)
    generators = _values(axes.generators, base_config.generator, "generators")
    noises = _values(axes.noises, base_config.noise, "noises")
    reg = registry()
    cells = []
    for bb, inj, ext, t, beta, cf, variant, gen, noise in itertools.product(
            backbones, injectors, extractors, timesteps, betas, bands, variants, generators, noises):
        cell_id = f"{bb.tag}_{inj.tag}_{ext.tag}_t{t}_b{beta:g}_cf{cf[0]:g}-{cf[1]:g}"
        if variant is not None:
            cell_id += f"_{variant.label}"
        if axes.generators:
            cell_id += f"_gen-{gen}"
        if axes.noises:
            cell_id += f"_noise-{noise}"
        # an unknown name fails here, before anything runs
        reason = "; ".join(incompatibilities(reg.get("backbone", bb.name), reg.get("injector", inj.name),
                                             reg.get("extractor", ext.name))) or None
        config = None if reason else _cell_config(grid.base, bb, inj, ext, t, beta, cf, variant, gen, noise)
        backbone_spec = reg.get("backbone", bb.name)
        refusal = config and guidance_refusal(config, backbone_spec.name, backbone_spec.tags)
        if refusal:  # e.g. null-text on LCM: skipped like an unsupported pair, not a failing cell
            reason, config = refusal, None
        cells.append(Cell(cell_id, bb, inj, ext, t, beta, cf, config, reason, variant.label if variant else "", gen,
                          noise))
    return cells


class _ComponentCache:
    """The last built component of each kind, so cells differing only in t, beta or cf share models."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[str, Any]] = {}

    def _get(self, kind: str, config: RefineConfig, runtime: "Runtime") -> Any:
        name = getattr(config, kind)
        if name is None:
            return None
        options = config.component_options(kind)
        key = json.dumps([name, options, repr(runtime)], sort_keys=True, default=str)
        if kind not in self._built or self._built[kind][0] != key:
            self._built.pop(kind, None)  # free the previous model before loading the next
            self._built[kind] = (key, registry().get(kind, name).build(options, runtime))
        return self._built[kind][1]

    def refiner(self, config: RefineConfig) -> "Refiner":
        from g4seg.refiner import Refiner
        from g4seg.runtime import resolve_runtime

        runtime = resolve_runtime(config.device, config.dtype, config.offline)
        parts = {kind: self._get(kind, config, runtime) for kind in COMPONENT_KINDS if kind != "mask_source"}
        return Refiner(config, parts["backbone"], parts["injector"], parts["extractor"], parts["postprocessor"])


def _coarse_baseline(coarse: Path, dataset: Any, ids: Sequence[str]) -> tuple["EvalResult | None", str]:
    from g4seg.evaluation import evaluate

    if not all((coarse / f"{i}.png").is_file() for i in ids):
        return None, f"n/a: {coarse} does not hold a label PNG for every image"
    try:
        return evaluate(coarse, dataset), ""
    except G4SegError as exc:
        return None, f"n/a: {exc}"


def _score(cell: Cell, items: list[WorkItem], classes: list[str], cell_dir: Path, dataset: Any,
           coarse: "EvalResult | None", resamples: int, seed: int) -> CellResult:
    from g4seg.evaluation import compare, evaluate

    status = folder_status(items, cell_dir, cell.config, classes)
    seconds, noising = list(status.done.values()), list(status.noise_seconds.values())
    result = CellResult(cell, "pending", images=len(status.done), failed=len(status.failed),
                        sec_per_image=sum(seconds) / len(seconds) if seconds else None,
                        noise_sec_per_image=sum(noising) / len(noising) if noising else None)
    if status.pending:
        result.note = f"{len(status.pending)} images not finished"
        return result
    if status.failed:
        first = next(iter(status.failed.items()))
        result.status, result.note = "failed", f"{len(status.failed)} images failed, e.g. {first[0]}: {first[1]}"
        return result
    try:
        scored = evaluate(cell_dir, dataset)
    except G4SegError as exc:
        result.status, result.note = "error", str(exc)
        return result
    result.status, result.miou, result.per_class, result.scored = "done", scored.miou, scored.per_class, scored
    if coarse is not None:
        result.comparison = compare(scored, coarse, resamples, seed)
        result.gain, result.bins = result.comparison.gain, result.comparison.to_json()["bins"]
    return result


def _pair_noise_controls(results: list[CellResult], resamples: int, seed: int) -> None:
    """Give each non-control cell its noise control (same settings, generator noise), and when both are
    scored, the cell against the control paired over images: the gain the generation adds to the rule's."""
    controls = {r.cell.settings: r for r in results if r.cell.generator == NOISE}
    from g4seg.evaluation import compare

    for r in results:
        if r.cell.generator == NOISE:
            continue
        r.noise = controls.get(r.cell.settings)
        if r.status == "done" and r.noise is not None and r.noise.status == "done":
            r.versus_noise = compare(r.scored, r.noise.scored, resamples, seed)


def run_ablation(grid_path: Path, out_dir: Path, *, overwrite: bool = False, fail_fast: bool = False,
                 progress: bool = True, log: Callable[[str], None] = lambda line: None,
                 build_refiner: Callable[[RefineConfig], "Refiner"] | None = None, resamples: int = 1000,
                 bootstrap_seed: int = 0) -> AblationReport:
    """Run (or resume) every cell of the grid into ``out_dir``, score them, write the report.

    ``build_refiner(config)`` makes a cell's refiner; by default models are built by name and kept
    while consecutive cells use the same ones. ``resamples`` and ``bootstrap_seed`` set the gains'
    paired bootstrap intervals.
    """
    from g4seg.metrics import check_bootstrap
    from g4seg.sharding import current_shard

    check_bootstrap(resamples, bootstrap_seed)
    grid = load_grid(grid_path)
    cells = plan_cells(grid)
    out_dir = Path(out_dir)
    dataset = registry().get("dataset", grid.dataset).build({"root": grid.root, "split": grid.split})
    dataset.check()
    items = dataset_items(dataset, grid.coarse)
    classes = list(dataset.classes)
    shard = current_shard()
    build_refiner = build_refiner or _ComponentCache().refiner
    errors: dict[str, str] = {}
    runnable = [c for c in cells if c.skip is None]
    for number, cell in enumerate(runnable, 1):
        if shard.is_main:
            log(f"cell {number}/{len(runnable)}: {cell.id}")
        try:
            run(items, out_dir / "cells" / cell.id, cell.config, classes,
                build_refiner=lambda config=cell.config: build_refiner(config),
                overwrite=overwrite, fail_fast=fail_fast, progress=progress)
        except G4SegError as exc:
            if fail_fast:
                raise
            errors[cell.id] = str(exc)
            log(f"cell {cell.id}: error: {exc}")

    coarse, coarse_note = _coarse_baseline(Path(grid.coarse), dataset, [i.stem for i in items])
    report = AblationReport(out_dir, dataset.name, grid.split, coarse.miou if coarse else None, coarse_note,
                            resamples=resamples, bootstrap_seed=bootstrap_seed)
    for cell in cells:
        if cell.skip is not None:
            report.results.append(CellResult(cell, "skipped", note=cell.skip))
        elif cell.id in errors:
            report.results.append(CellResult(cell, "error", note=errors[cell.id]))
        else:
            report.results.append(_score(cell, items, classes, out_dir / "cells" / cell.id, dataset, coarse,
                                         resamples, bootstrap_seed))
    _pair_noise_controls(report.results, resamples, bootstrap_seed)
    if report.finished:
        write_report(report)
    return report


def write_report(report: AblationReport) -> None:
    """results.json, results.csv, results.md and the plots, each written atomically."""
    out = report.out_dir
    rows = [r.row() for r in report.results]
    cells = [{**r.row(), "injector_options": r.cell.injector.options, "backbone_options": r.cell.backbone.options,
              "extractor_options": r.cell.extractor.options, "per_class": r.per_class, "gain_bins": r.bins,
              "gain_ci95": _interval_json(r.comparison), "noise_control": _noise_json(r)}
             for r in report.results]
    summary = {"dataset": report.dataset, "split": report.split,
               "coarse": {"miou": _round(report.coarse_miou), "note": report.coarse_note},
               "bootstrap": {"resamples": report.resamples, "seed": report.bootstrap_seed}, "cells": cells}
    atomic_write_json(out / "results.json", summary)
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())
    plots = _plots(report)
    atomic_write_bytes(out / "results.md", _markdown(report, plots).encode())
    report.written = True


def _interval_json(comparison: "Comparison | None") -> list[float | None] | None:
    return list(_bounds(comparison.gain_ci95)) if comparison else None


def _noise_json(r: CellResult) -> dict[str, Any] | None:
    """The cell's noise control in results.json: its cell, gain, and the cell's gain over it (paired)."""
    if r.cell.generator == NOISE:
        return None
    if r.noise is None or r.noise.status != "done":
        return {"cell": r.noise.cell.id if r.noise else None, "status": r.noise_note}
    return {"cell": r.noise.cell.id, "status": "done", "gain": _round(r.noise.gain),
            "gain_ci95": _interval_json(r.noise.comparison),
            "vs_noise": _round(r.versus_noise.gain) if r.versus_noise else None,
            "vs_noise_ci95": _interval_json(r.versus_noise)}


def _fmt(value: float | None, signed: bool = False, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _with_interval(comparison: "Comparison | None") -> str:
    """'+0.71 [+0.32, +1.05]': a gain and its 95% interval."""
    if comparison is None:
        return "n/a"
    low, high = comparison.gain_ci95
    return f"{_fmt(comparison.gain, True)} [{_fmt(low, True)}, {_fmt(high, True)}]"


def _markdown(report: AblationReport, plots: list[str]) -> str:
    coarse = _fmt(report.coarse_miou) if report.coarse_miou is not None else report.coarse_note
    lines = [f"# Ablation on {report.dataset} ({report.split})", "", f"Coarse masks (baseline) mIoU: {coarse}", "",
             f"Gains are mIoU minus the coarse masks' mIoU, in points, with a 95% paired bootstrap interval over "
             f"images ({report.resamples} resamples, seed {report.bootstrap_seed}); *improved* is the share of "
             f"images whose per-image IoU rose. A cell's *noise control* is the cell with the same settings and "
             f"generator `noise`: the gain the update rule makes when the compared image carries no information. "
             f"*Over noise* is the cell minus its control, paired over images: a gain whose interval there does "
             f"not lie above 0 is not shown to come from the generation.", "",
             "| cell | backbone | injector | extractor | t | beta | cf | variant | generator | noise | mIoU | "
             "gain [95% CI] | improved | noise control gain | over noise [95% CI] | images | s/image | "
             "noising s/image |",
             "|---|---|---|---|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.results:
        if r.status == "done":
            c = r.cell
            improved = r.comparison.improved_fraction if r.comparison else None
            noise = "-" if c.generator == NOISE else (r.noise_note or _fmt(r.noise.gain, True))
            versus = "-" if c.generator == NOISE else (r.noise_note or _with_interval(r.versus_noise))
            lines.append(f"| {c.id} | {c.backbone.tag} | {c.injector.tag} | {c.extractor.tag} | {c.timestep} | "
                         f"{c.beta:g} | [{c.cf[0]:g}, {c.cf[1]:g}] | {c.variant or '-'} | {c.generator} | "
                         f"{c.noise} | {_fmt(r.miou)} | {_with_interval(r.comparison)} | "
                         f"{'n/a' if improved is None else f'{100 * improved:.0f}%'} | {noise} | {versus} | "
                         f"{r.images} | {_fmt(r.sec_per_image)} | {_fmt(r.noise_sec_per_image, digits=3)} |")
    if any(r.status == "done" and r.noise_note == "missing" for r in report.results):
        lines += ["", 'Cells marked "missing" have no noise control in the grid: add `generators = ["model", '
                      '"noise"]` to `[grid]` (a noise cell runs no UNet or VAE).']
    for title, statuses in (("Skipped", ("skipped",)), ("Not scored", ("error", "failed", "pending"))):
        listed = [r for r in report.results if r.status in statuses]
        if listed:
            lines += ["", f"## {title}", ""] + [f"- {r.cell.id}: {r.note}" for r in listed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if any(r.comparison for r in report.results):
        lines += ["", f"Per cell, refined against coarse per-image IoU coloured by Table VII's bins: "
                      f"`{PER_IMAGE_PLOTS}/<cell>.png`."]
    return "\n".join(lines) + "\n"


PER_IMAGE_PLOTS = "plots/per_image"


def _savefig(figure: Any, path: Path) -> None:
    from g4seg.evaluation import save_figure

    save_figure(figure, path)


def _plots(report: AblationReport) -> list[str]:
    """mIoU against timestep (the paper's Fig. 4), one line per other-settings group; gain per cell with its
    interval and its noise control's gain; the summary plots' names. Also one per-image picture per cell."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    from g4seg.evaluation import per_image_figure

    scored = [r for r in report.results if r.status == "done"]
    if not scored:
        return []
    groups: dict[tuple, list[CellResult]] = {}
    for r in scored:
        c = r.cell
        groups.setdefault((c.backbone.tag, c.injector.tag, c.extractor.tag, f"beta={c.beta:g}",
                           f"cf=[{c.cf[0]:g},{c.cf[1]:g}]", c.variant, f"gen={c.generator}", f"noise={c.noise}"),
                          []).append(r)
    varying = [i for i in range(len(next(iter(groups)))) if len({key[i] for key in groups}) > 1]
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    for key, members in groups.items():
        members.sort(key=lambda r: r.cell.timestep)
        label = " / ".join(key[i] for i in varying) or "G4Seg"
        ax.plot([r.cell.timestep for r in members], [r.miou for r in members], marker="o", label=label)
    if report.coarse_miou is not None:
        ax.axhline(report.coarse_miou, color="grey", linestyle="--", label="coarse")
    ax.set_xlabel("timestep $t_s$")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"mIoU against timestep ({report.dataset} {report.split})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    names = ["plots/miou_vs_timestep.png", "plots/gain_per_cell.png"]
    _savefig(figure, report.out_dir / names[0])

    with_gain = report.coarse_miou is not None
    values = [r.gain if with_gain else r.miou for r in scored]
    figure = Figure(figsize=(6.4, 1.2 + 0.3 * len(scored)))
    ax = figure.add_subplot()
    colours = ["tab:green" if v >= 0 else "tab:red" for v in values] if with_gain else "tab:blue"
    ax.barh([r.cell.id for r in scored], values, color=colours)
    bars = [(y, r.gain_ci95) for y, r in enumerate(scored) if r.gain_ci95 is not None]
    if bars:  # centred on the interval, not the gain: a percentile interval need not be symmetric about it
        ax.errorbar([(lo + hi) / 2 for _, (lo, hi) in bars], [y for y, _ in bars],
                    xerr=[(hi - lo) / 2 for _, (lo, hi) in bars], fmt="none", ecolor="black", capsize=3,
                    label="95% CI")
    controls = [(y, r.noise.gain) for y, r in enumerate(scored)
                if with_gain and r.noise is not None and r.noise.status == "done"]
    if controls:
        ax.scatter([g for _, g in controls], [y for y, _ in controls], marker="x", color="black", zorder=3,
                   label="its noise control")
    if bars or controls:
        ax.legend(fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("mIoU gain over the coarse masks (points)" if with_gain else "mIoU (%) (no coarse baseline)")
    ax.tick_params(axis="y", labelsize="small")
    _savefig(figure, report.out_dir / names[1])
    for r in scored:
        if r.comparison is not None:
            _savefig(per_image_figure(r.comparison, r.cell.id), report.out_dir / PER_IMAGE_PLOTS / f"{r.cell.id}.png")
    return names
