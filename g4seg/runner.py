"""The resumable, shardable run loop: many images, one output folder, nothing computed twice.

A run folder holds, per image, ``<stem>.png`` (palette label map) and ``<stem>.npz`` (probabilities),
optionally ``overlay/<stem>.png``, ``coarse/<stem>.png`` (the input label map, so one run gives both
sides of a comparison) and ``generated/<stem>/<label>_<class>.png``; plus ``config.json``
(the resolved configuration, versions, device) and one manifest per rank (see :mod:`g4seg.manifest`).
Every file is written to a temporary name in its folder and renamed, and an image's manifest line
comes after its files, so a kill at any moment leaves only complete files and a rerun redoes just the
images without a "done" line whose files exist.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from g4seg import io
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.manifest import Entry, ManifestWriter, differences, hashed_settings, latest_entries, settings_hash
from g4seg.plugins import registry
from g4seg.registry import Runtime
from g4seg.sharding import Shard, current_shard, shard_items

if TYPE_CHECKING:
    from g4seg.components import MaskSource
    from g4seg.refiner import Refiner

CONFIG_FILE = "config.json"
MASK_SUFFIXES = (".png", ".npz", ".npy")
VERSIONED = ("g4seg", "torch", "diffusers", "transformers", "open_clip_torch", "accelerate", "numpy")
# tempfile.mkstemp names: "." + target name + "." + 8 random characters + ".tmp" (see g4seg.io)
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


@dataclass(frozen=True)
class WorkItem:
    """One image to refine: outputs are named ``<stem>.png`` / ``<stem>.npz``."""

    stem: str
    image: Path
    mask: Path | None  # coarse mask file for the mask source


@dataclass
class RunSummary:
    """What this call did with this rank's share: refined, already done, failed (stem -> one line)."""

    done: int
    skipped: int
    failed: int
    errors: dict[str, str]
    out_dir: Path


@dataclass
class FolderStatus:
    """The state of a run folder for given items: done (stem -> seconds), failed, not yet finished."""

    done: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


def find_mask(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.png``, ``.npz`` or ``.npy``, the first that exists."""
    for suffix in MASK_SUFFIXES:
        candidate = Path(folder) / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return None


def dataset_items(dataset: Any, coarse: Path) -> list[WorkItem]:
    """One item per id of a dataset split, its coarse mask looked up by id in ``coarse``."""
    if not Path(coarse).is_dir():
        raise G4SegError(f"coarse mask folder not found: {coarse}")
    return [WorkItem(i, dataset.image_path(i), find_mask(coarse, i)) for i in dataset.ids()]


@dataclass(frozen=True)
class _Identity:
    """What makes outputs reusable: the hashed settings, and the absolute paths of each item's inputs."""

    settings: dict[str, Any]
    config_hash: str
    runtime: Runtime

    def inputs(self, item: WorkItem) -> tuple[str, str | None]:
        return os.path.abspath(item.image), os.path.abspath(item.mask) if item.mask is not None else None


def _identity(config: RefineConfig, classes: Sequence[str]) -> _Identity:
    from g4seg.runtime import resolve_runtime

    runtime = resolve_runtime(config.device, config.dtype, config.offline)
    settings = hashed_settings(config, classes, runtime.dtype)
    return _Identity(settings, settings_hash(settings), runtime)


def _is_done(entry: Entry | None, item: WorkItem, ident: _Identity, out_dir: Path, wanted: set[str]) -> bool:
    return (entry is not None and entry.status == "done" and entry.config_hash == ident.config_hash
            and (entry.image, entry.mask) == ident.inputs(item) and wanted <= set(entry.saved)
            and bool(entry.outputs) and all((out_dir / p).is_file() for p in entry.outputs))


def folder_status(items: Sequence[WorkItem], out_dir: Path, config: RefineConfig,
                  classes: list[str]) -> FolderStatus:
    """Which of ``items`` a run folder holds finished for this configuration (all ranks' manifests)."""
    out_dir = Path(out_dir)
    ident = _identity(config, classes)
    latest = latest_entries(out_dir)
    status = FolderStatus()
    for item in items:
        entry = latest.get(item.stem)
        if _is_done(entry, item, ident, out_dir, set()):
            status.done[item.stem] = entry.seconds
        elif entry is not None and entry.status == "error" and entry.config_hash == ident.config_hash:
            status.failed[item.stem] = entry.error or "unknown error"
        else:
            status.pending.append(item.stem)
    return status


def _check_stems(items: Sequence[WorkItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if not item.stem or item.stem in (".", "..") or "/" in item.stem or os.sep in item.stem:
            raise G4SegError(f"invalid output name {item.stem!r} for {item.image}: it must be a plain file name")
        if item.stem in seen:
            raise G4SegError(f"two inputs share the output name '{item.stem}'; outputs would collide")
        seen.add(item.stem)


def _check_same_config(out_dir: Path, ident: _Identity, latest: dict[str, Entry]) -> None:
    """Finished images of other settings are never mixed into: the user must say --overwrite.

    A folder whose recorded config differs but that holds no finished image under another hash (a run
    that stopped before its first image, e.g. on a wrong model path) is simply reused.
    """
    path = out_dir / CONFIG_FILE
    recorded: dict[str, Any] = {}
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise G4SegError(f"{path} is not valid JSON; use --overwrite to start this folder afresh") from None
        if recorded.get("config_hash") == ident.config_hash:
            return
    if not any(e.status == "done" and e.config_hash != ident.config_hash for e in latest.values()):
        return
    changed = differences(recorded.get("settings", {}), ident.settings) if recorded else []
    detail = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "") if changed else \
        "its manifest records another configuration hash"
    raise G4SegError(f"output folder {out_dir} holds a run with a different configuration ({detail}); "
                     "use --overwrite to redo it, or another --out")


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return device
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def _write_config(out_dir: Path, config: RefineConfig, classes: list[str], ident: _Identity, shard: Shard) -> None:
    record = {
        "config": config.model_dump(mode="json"),
        "config_hash": ident.config_hash,
        "settings": ident.settings,
        "classes": classes,
        "seed": config.seed,
        "dtype": ident.runtime.dtype,
        "device": _device_name(ident.runtime.device),
        "world_size": shard.world_size,
        "python": platform.python_version(),
        "versions": _versions(),
    }
    io.atomic_write_bytes(out_dir / CONFIG_FILE, (json.dumps(record, indent=2) + "\n").encode())


def _remove_stale_temps(out_dir: Path, stems: set[str], with_config: bool) -> None:
    """Delete temporary files a killed run left behind for the outputs of this process's share.

    Only this process's own targets are touched: other ranks may be writing theirs right now.
    """
    outputs = {f"{s}{suffix}" for s in stems for suffix in (".png", ".npz")}
    owned: list[tuple[Path, Callable[[str], bool]]] = [
        (out_dir, lambda target: target in outputs or (with_config and target == CONFIG_FILE)),
        (out_dir / "overlay", lambda target: target in outputs),
        (out_dir / "coarse", lambda target: target in outputs),
        *((out_dir / "generated" / s, lambda target: True) for s in stems),
    ]
    for folder, is_ours in owned:
        if folder.is_dir():
            for path in folder.iterdir():
                match = _TEMP_NAME.match(path.name)
                if match and is_ours(match["target"]):
                    path.unlink(missing_ok=True)


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "class"


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, G4SegError) else f"{type(exc).__name__}: {exc}"
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def _refine_one(item: WorkItem, refiner: "Refiner", mask_source: "MaskSource", out_dir: Path,
                classes: list[str], saved: set[str]) -> list[str]:
    """Refine one image and write its outputs; returns their paths relative to ``out_dir``."""
    image = io.load_image(item.image)
    coarse = mask_source.load(item.image, item.mask, classes, image.shape[:2])
    save_generated, save_overlay = "generated" in saved, "overlay" in saved
    result = refiner.refine(image, coarse.probs, classes, background=coarse.background, ignore=coarse.ignore,
                            source_rule=coarse.merge, return_generated=save_generated)
    outputs = [f"{item.stem}.png", f"{item.stem}.npz"]
    io.save_label_png(out_dir / outputs[0], result.labels)
    io.save_probs_npz(out_dir / outputs[1], result.probs, classes, result.background)
    if "coarse" in saved:
        outputs.append(f"coarse/{item.stem}.png")
        io.save_label_png(out_dir / outputs[-1], result.coarse_labels)
    if save_overlay:
        outputs.append(f"overlay/{item.stem}.png")
        io.save_rgb_png(out_dir / outputs[-1], io.overlay(image, result.labels))
    if save_generated:
        for name, generated in (result.generated or {}).items():
            outputs.append(f"generated/{item.stem}/{classes.index(name) + 1}_{_safe_name(name)}.png")
            io.save_rgb_png(out_dir / outputs[-1], generated)
    return outputs


@contextmanager
def _progress_bar(enabled: bool, total: int, completed: int) -> Iterator[Callable[[], None]]:
    """Yields ``advance()``; a rich bar on stderr when enabled, else nothing is shown."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("refining"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("refining", total=total, completed=completed)
        yield lambda: bar.advance(task)


def run(items: Sequence[WorkItem], out_dir: Path, config: RefineConfig, classes: list[str], *,
        build_refiner: Callable[[], "Refiner"] | None = None, overwrite: bool = False, fail_fast: bool = False,
        save_generated: bool = False, save_overlay: bool = False, save_coarse: bool = False,
        progress: bool = True) -> RunSummary:
    """Refine this rank's share of ``items`` into ``out_dir``, skipping images already done.

    ``build_refiner`` (default: ``Refiner.from_config``) is called only when some image needs work.
    A failing image is recorded in the manifest and the run goes on, unless ``fail_fast``.
    """
    out_dir = Path(out_dir)
    classes = list(classes)
    _check_stems(items)
    shard = current_shard()
    ident = _identity(config, classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = latest_entries(out_dir)
    if not overwrite:
        _check_same_config(out_dir, ident, latest)
    mine = shard_items(items, shard, key=lambda item: item.stem)
    wanted = {name for name, on in (("generated", save_generated), ("overlay", save_overlay),
                                    ("coarse", save_coarse)) if on}
    todo = [item for item in mine
            if overwrite or not _is_done(latest.get(item.stem), item, ident, out_dir, wanted)]
    _remove_stale_temps(out_dir, {item.stem for item in mine}, with_config=shard.is_main)
    if shard.is_main:
        _write_config(out_dir, config, classes, ident, shard)
    summary = RunSummary(done=0, skipped=len(mine) - len(todo), failed=0, errors={}, out_dir=out_dir)
    if not todo:
        return summary

    if build_refiner is None:
        from g4seg.refiner import Refiner

        refiner = Refiner.from_config(config, ident.runtime)
    else:
        refiner = build_refiner()
    mask_spec = registry().get("mask_source", config.mask_source)
    mask_source = mask_spec.build(config.component_options("mask_source"), ident.runtime)
    with ManifestWriter(out_dir / shard.manifest_name) as manifest, \
            _progress_bar(progress and shard.is_main, len(mine), summary.skipped) as advance:
        for item in todo:
            start = time.perf_counter()
            outputs: list[str] = []
            error: BaseException | None = None
            try:
                outputs = _refine_one(item, refiner, mask_source, out_dir, classes, wanted)
            except Exception as exc:  # noqa: BLE001 - one bad image must not end a long run
                error = exc
            image, mask = ident.inputs(item)
            manifest.append(Entry(
                stem=item.stem, status="error" if error else "done", seconds=round(time.perf_counter() - start, 4),
                error=_one_line(error) if error else None, config_hash=ident.config_hash, rank=shard.rank,
                time=time.time(), image=image, mask=mask, outputs=outputs, saved=sorted(wanted),
            ))
            advance()
            if error is None:
                summary.done += 1
                continue
            summary.failed += 1
            summary.errors[item.stem] = _one_line(error)
            if fail_fast:
                raise error
    return summary
