"""The resumable, shardable run loop: many images, one output folder, nothing computed twice.

A run folder holds, per image, ``<stem>.png`` (palette label map) and ``<stem>.npz`` (probabilities),
optionally ``overlay/<stem>.png``, ``coarse/<stem>.png`` (the input label map, so one run gives both
sides of a comparison) and ``generated/<stem>/<label>_<class>.png``; plus ``config.json``
(the resolved configuration, versions, device) and one manifest per rank (see :mod:`g4seg.manifest`).
Every file is written to a temporary name in its folder and renamed, and an image's manifest line
comes after its files, so a kill at any moment leaves only complete files and a rerun redoes just the
images without a "done" line whose files exist.

Safety (see docs/runs.md): a run whose outputs would land on one of its inputs is refused before anything
is written; a run holds a lock on its folder (per rank when sharded, :mod:`g4seg.runlock`) while it
writes; an image is skipped only when its inputs have the recorded content and its outputs are the
files written then (:mod:`g4seg.fileid`); and a rerun with nothing to do writes nothing at all.

Speed (docs/runs.md, "Batching images"): one thread reads the next items ahead of the compute and another writes
finished images behind it, in item order and in the durable order above; with ``image_batch`` > 1 the images of a
batch go to :meth:`g4seg.refiner.Refiner.refine_many`, their classes sharing UNet calls, each image still
recorded (and failing) on its own.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import re
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from g4seg import io
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.fileid import FileId, identify, unchanged
from g4seg.manifest import (MANIFEST_GLOB, Entry, ManifestWriter, differences, hashed_settings, latest_entries,
                            settings_hash)
from g4seg.plugins import registry
from g4seg.registry import Runtime
from g4seg.runlock import RunLock, is_lock_name
from g4seg.runtime import package_versions
from g4seg.sharding import Shard, current_shard, shard_items

if TYPE_CHECKING:
    import numpy as np

    from g4seg.components import CoarseMask, MaskSource
    from g4seg.datasets import LabelEncoding
    from g4seg.refiner import Refiner, RefineResult

CONFIG_FILE = "config.json"
MASK_SUFFIXES = (".png", ".npz", ".npy")
VERSIONED = ("g4seg", "torch", "diffusers", "transformers", "open_clip_torch", "accelerate", "numpy")
# tempfile.mkstemp names: "." + target name + "." + 8 random characters + ".tmp" (see g4seg.io)
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


@dataclass(frozen=True)
class WorkItem:
    """One image to refine: outputs are named ``<stem>.png`` / ``<stem>.npz``.

    ``encoding`` (a dataset's, see :mod:`g4seg.datasets`) says how its label-map files store labels: the coarse
    mask is decoded with it (by mask sources with ``takes_encoding``) and the label PNGs are written encoded.
    """

    stem: str
    image: Path
    mask: Path | None  # coarse mask file for the mask source
    encoding: "LabelEncoding | None" = None  # None: g4seg's own labels


def encoding_keywords(mask_source: Any, item: WorkItem) -> dict[str, Any]:
    """``encoding=`` for a mask source that reads label maps (``takes_encoding = True``) when the item has one."""
    if item.encoding is None or not getattr(mask_source, "takes_encoding", False):
        return {}
    return {"encoding": item.encoding}


@dataclass
class RunSummary:
    """What this call did with this rank's share: refined, already done, failed (stem -> one line).

    Of ``done``, ``changed`` images had been done before but their image or mask changed since, and
    ``repaired`` ones had been done before but an output was missing or altered.
    """

    done: int
    skipped: int
    failed: int
    errors: dict[str, str]
    out_dir: Path
    changed: int = 0
    repaired: int = 0


@dataclass
class FolderStatus:
    """The state of a run folder for given items: done (stem -> seconds), failed, not yet finished; and of the
    done ones with a recorded ``noise_seconds`` (the part spent bringing the latent to t_s), that part."""

    done: dict[str, float] = field(default_factory=dict)
    noise_seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


def mask_index(folder: Path) -> dict[str, list[Path]]:
    """The mask files of ``folder`` (suffixes ``.png``, ``.npz``, ``.npy`` in any case) by lower-cased stem."""
    index: dict[str, list[Path]] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return index
    for entry in entries:
        path = Path(entry.path)
        if path.suffix.lower() in MASK_SUFFIXES:
            index.setdefault(path.stem.lower(), []).append(path)
    return index


def find_mask(folder: Path, stem: str, index: dict[str, list[Path]] | None = None) -> Path | None:
    """The mask of image ``stem`` in ``folder``, or None.

    ``folder/<stem>.png``, ``.npz`` or ``.npy`` (in this order) when one exists under exactly that
    name; otherwise the name is matched ignoring case (``IMG.JPG`` finds ``img.png``), and two masks
    that then match (``img.png`` and ``Img.PNG``) are a one-line G4SegError. A dangling symbolic link
    is returned like a file (the mask source names it). ``index`` (:func:`mask_index` of ``folder``)
    saves a folder scan per call when many stems are looked up.
    """
    folder = Path(folder)
    for suffix in MASK_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists() or candidate.is_symlink():
            return candidate
    found = (mask_index(folder) if index is None else index).get(stem.lower(), [])
    for suffix in MASK_SUFFIXES:
        matches = sorted(p for p in found if p.suffix.lower() == suffix)
        if len(matches) > 1:
            raise G4SegError(f"masks {', '.join(p.name for p in matches)} in {folder} all match image '{stem}' "
                             f"when case is ignored; keep one, or name one exactly {stem}{suffix}")
        if matches:
            return matches[0]
    return None


def dataset_items(dataset: Any, coarse: Path) -> list[WorkItem]:
    """One item per id of a dataset split, its coarse mask looked up by id in ``coarse``."""
    if not Path(coarse).is_dir():
        raise G4SegError(f"coarse mask folder not found: {coarse}")
    index = mask_index(coarse)  # one folder scan, not one per id
    return [WorkItem(i, dataset.image_path(i), find_mask(coarse, i, index), dataset) for i in dataset.ids()]


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


def _inputs_unchanged(entry: Entry, item: WorkItem, ident: _Identity) -> bool:
    """The item's image and mask have the content recorded when it was done (wherever they are now)."""
    if not entry.output_ids:  # a line from before identities were recorded: judged by the input paths, as then
        return (entry.image, entry.mask) == ident.inputs(item)
    image_id = FileId.from_json(entry.image_id)
    if image_id is None or not unchanged(item.image, image_id, entry.image):
        return False
    if item.mask is None or entry.mask_id is None:
        return item.mask is None and entry.mask_id is None
    mask_id = FileId.from_json(entry.mask_id)
    return mask_id is not None and unchanged(item.mask, mask_id, entry.mask)


def _outputs_intact(entry: Entry, out_dir: Path) -> bool:
    """Every output of the entry is there and is the file written then (size+mtime, else its hash)."""
    recorded = entry.output_ids if isinstance(entry.output_ids, dict) else {}
    for rel in entry.outputs:
        file_id = FileId.from_json(recorded.get(rel))
        if not ((out_dir / rel).is_file() if file_id is None else unchanged(out_dir / rel, file_id)):
            return False
    return bool(entry.outputs)


def _redo_reason(entry: Entry | None, item: WorkItem, ident: _Identity, out_dir: Path,
                 wanted: set[str]) -> str | None:
    """None when the item is done for this configuration; else why not: "new" (no finished record for
    these settings), "changed" (its inputs changed), "extras" (optional outputs asked for now were not
    written) or "damaged" (an output is missing or altered)."""
    if entry is None or entry.status != "done" or entry.config_hash != ident.config_hash:
        return "new"
    if not _inputs_unchanged(entry, item, ident):
        return "changed"
    if not wanted <= set(entry.saved):
        return "extras"
    if not _outputs_intact(entry, out_dir):
        return "damaged"
    return None


def folder_status(items: Sequence[WorkItem], out_dir: Path, config: RefineConfig,
                  classes: list[str]) -> FolderStatus:
    """Which of ``items`` a run folder holds finished for this configuration (all ranks' manifests)."""
    out_dir = Path(out_dir)
    ident = _identity(config, classes)
    latest = latest_entries(out_dir)
    status = FolderStatus()
    for item in items:
        entry = latest.get(item.stem)
        if _redo_reason(entry, item, ident, out_dir, set()) is None:
            status.done[item.stem] = entry.seconds
            if entry.noise_seconds is not None:
                status.noise_seconds[item.stem] = entry.noise_seconds
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


def _realpath(path: Path, folders: dict[str, str]) -> str:
    """``os.path.realpath(path)``, resolving each folder once (``folders`` caches them): one lstat per file."""
    folder, name = os.path.split(os.fspath(path))
    if name in ("", ".", ".."):
        return os.path.realpath(path)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder or os.curdir)
    joined = os.path.join(folders[folder], name)
    return os.path.realpath(joined) if os.path.islink(joined) else joined


def _check_inputs_untouched(items: Sequence[WorkItem], out_dir: Path) -> None:
    """Refuse a run that would write over (or delete) one of its own inputs, before anything is written.

    Real paths are compared (``os.path.realpath``), so an output folder that is, or links to, an input
    folder counts, and so do linked ``overlay``/``coarse``/``generated`` subfolders and outputs that are
    links to inputs. Every file the run may write or remove is considered: ``<stem>.png``, ``<stem>.npz``,
    ``overlay/<stem>.png``, ``coarse/<stem>.png``, all of ``generated/<stem>/``, ``config.json``,
    ``manifest*.jsonl``, the lock files and the temporary files. Other names next to the inputs are fine.
    """
    by_folder: dict[str, dict[str, Path]] = {}  # real folder -> real name -> input as given
    real_inputs: dict[str, Path] = {}
    real_folders: dict[str, str] = {}
    for item in items:
        for given in (item.image, item.mask):
            if given is not None:
                real = _realpath(given, real_folders)
                real_inputs[real] = Path(given)
                by_folder.setdefault(os.path.dirname(real), {})[os.path.basename(real)] = Path(given)
    stems = {item.stem for item in items}
    main = {f"{s}{suffix}" for s in stems for suffix in (".png", ".npz")}
    labels = {f"{s}.png" for s in stems}

    def temp_of(name: str, targets: Callable[[str], bool]) -> bool:
        match = _TEMP_NAME.match(name)
        return bool(match) and targets(match["target"])

    def top(name: str) -> bool:
        return (name in main or name == CONFIG_FILE or Path(name).match(MANIFEST_GLOB) or is_lock_name(name)
                or temp_of(name, lambda t: t in main or t == CONFIG_FILE))

    def per_stem(name: str) -> bool:
        return name in labels or temp_of(name, labels.__contains__)

    folders: list[tuple[str, Callable[[str], bool]]] = [(str(out_dir), top), (str(out_dir / "overlay"), per_stem),
                                                         (str(out_dir / "coarse"), per_stem)]
    generated = os.path.realpath(out_dir / "generated")
    linked = set()
    if os.path.isdir(generated):
        linked = {e.name for e in os.scandir(generated) if e.is_symlink()}
    hits: list[tuple[Path, str]] = []

    def check(folder: str, is_ours: Callable[[str], bool], real: str | None = None) -> None:
        real = real or os.path.realpath(folder)
        for name, given in by_folder.get(real, {}).items():
            if is_ours(name):
                hits.append((given, os.path.join(folder, name)))
        if not os.path.isdir(real):
            return
        for entry in os.scandir(real):  # outputs that are links to inputs
            if entry.is_symlink() and is_ours(entry.name) and os.path.realpath(entry.path) in real_inputs:
                hits.append((real_inputs[os.path.realpath(entry.path)], os.path.join(folder, entry.name)))

    for folder, is_ours in folders:
        check(folder, is_ours)
    for stem in sorted(stems):
        folder = os.path.join(generated, stem)
        real = os.path.realpath(folder) if stem in linked else folder
        if real in by_folder or stem in linked:
            check(str(out_dir / "generated" / stem), lambda name: True, real)
    if hits:
        given, output = hits[0]
        more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
        raise G4SegError(f"output folder {out_dir} would overwrite the input {given} (as {output}){more}; "
                         "nothing was written: choose another output folder")


def _recorded_hash(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None


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


def _plugins() -> dict[str, dict[str, str | None]]:
    """Every plugin that was loaded (built-ins included), with its origin and version."""
    from g4seg.plugins import load

    report = load()[1]
    return {name: {"origin": origin, "version": report.versions.get(name)} for name, origin in report.plugins.items()}


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
        "versions": package_versions(VERSIONED),
        "plugins": _plugins(),
    }
    io.atomic_write_json(out_dir / CONFIG_FILE, record)


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


@dataclass
class _Read:
    """An item read ahead of the compute: its inputs' identities (taken just before reading them, so an input edited
    after it was read is redone by the next run), its image and coarse mask, or the error reading raised."""

    item: WorkItem
    image_id: FileId | None
    mask_id: FileId | None
    image: "np.ndarray | None" = None
    coarse: "CoarseMask | None" = None
    error: Exception | None = None
    seconds: float = 0.0


@dataclass
class _Done:
    """An item's outcome for the writer: its result or its error, and the seconds spent on it so far."""

    read: _Read
    result: "RefineResult | None" = None
    error: Exception | None = None
    seconds: float = 0.0


def _read(item: WorkItem, mask_source: "MaskSource", classes: list[str]) -> _Read:
    """Identify and read one item's inputs (in the reader thread); a failure is the item's, never the run's."""
    start = time.perf_counter()
    read = _Read(item, identify(item.image), identify(item.mask) if item.mask is not None else None)
    try:
        read.image = io.load_image(item.image)
        read.coarse = mask_source.load(item.image, item.mask, classes, read.image.shape[:2],
                                       **encoding_keywords(mask_source, item))
    except Exception as exc:  # noqa: BLE001 - one bad input must not end a long run
        read.error = exc
    read.seconds = time.perf_counter() - start
    return read


class _Prefetch:
    """Reads items in order in one background thread, at most ``ahead`` items beyond those taken, so the compute
    does not wait on disk (nor on a mask source that computes its masks) and memory stays bounded. One thread:
    a mask source's ``load`` is never called concurrently with itself, only beside the refiner."""

    def __init__(self, items: Sequence[WorkItem], read: Callable[[WorkItem], _Read], ahead: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="g4seg-read")
        self._items, self._read, self._ahead = iter(items), read, max(1, ahead)
        self._pending: deque[Future[_Read]] = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            item = next(self._items, None)
            if item is None:
                return
            self._pending.append(self._pool.submit(self._read, item))

    def take(self, n: int) -> list[_Read]:
        """The next ``n`` items read (fewer at the end), in order; reading goes on behind them."""
        taken: list[_Read] = []
        while self._pending and len(taken) < n:
            taken.append(self._pending.popleft().result())
            self._fill()
        return taken

    def close(self) -> None:
        """Cancel the reads not started and wait for the one in progress (it writes nothing)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Writer:
    """Writes finished images in one background thread, in the order given, each completely (its files, then its
    manifest line) before the next: the run loop's durable order, moved off the compute. ``put`` blocks while
    ``size`` images wait (bounded memory). Whatever ``write`` raises stops all further writing and is raised in the
    run loop by the next ``put`` or ``close`` (a fault, or an image's error under ``--fail-fast``)."""

    def __init__(self, write: Callable[[_Done], None], size: int) -> None:
        self._write = write
        self._queue: queue.Queue[_Done | None] = queue.Queue(maxsize=max(1, size))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="g4seg-write", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (done := self._queue.get()) is not None:
            if self._error is None:  # after an error nothing more is written; the queue is still drained
                try:
                    self._write(done)
                except BaseException as exc:  # noqa: BLE001 - handed over to the run loop
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, done: _Done) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(done, timeout=0.05)
                return
            except queue.Full:
                continue

    def close(self, raise_error: bool = True) -> None:
        """Write everything handed over, then stop the thread (idempotent); raise what writing raised."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error:
            self._raise()


def _compute(batch: list[_Read], refiner: "Refiner", classes: list[str], wanted: set[str],
             pooled: bool) -> list[_Done]:
    """Refine the images of ``batch`` that were read, in order: with ``pooled``, all in one ``refine_many`` (their
    classes share UNet calls; each image's seconds are an equal share), else one ``refine`` each. An image's
    failure is its own outcome; the others of its batch are kept."""
    done = [_Done(read, error=read.error, seconds=read.seconds) for read in batch]
    ready = [d for d in done if d.error is None]
    generated = "generated" in wanted

    def alone(d: _Done) -> "RefineResult | Exception":
        coarse = d.read.coarse
        try:
            return refiner.refine(d.read.image, coarse.probs, classes, background=coarse.background,
                                  ignore=coarse.ignore, source_rule=coarse.merge, return_generated=generated)
        except Exception as exc:  # noqa: BLE001 - one bad image must not end a long run
            return exc

    if pooled and len(ready) > 1:
        from g4seg.refiner import RefineItem

        start = time.perf_counter()
        try:
            outcomes = refiner.refine_many([
                RefineItem(d.read.image, d.read.coarse.probs, classes, d.read.coarse.background, d.read.coarse.ignore,
                           d.read.coarse.merge, return_generated=generated) for d in ready])
        except Exception:  # noqa: BLE001 - each image alone, so that an error is its own
            outcomes = [alone(d) for d in ready]
        share = (time.perf_counter() - start) / len(ready)
        for d, outcome in zip(ready, outcomes):
            d.seconds += share
            d.result, d.error = (None, outcome) if isinstance(outcome, Exception) else (outcome, None)
        return done
    for d in ready:
        start = time.perf_counter()
        outcome = alone(d)
        d.seconds += time.perf_counter() - start
        d.result, d.error = (None, outcome) if isinstance(outcome, Exception) else (outcome, None)
    return done


def _write_outputs(out_dir: Path, stem: str, result: "RefineResult", image: "np.ndarray", classes: list[str],
                   saved: set[str], encoding: "LabelEncoding | None" = None) -> dict[str, FileId]:
    """Write one image's outputs (each atomically); returns them (paths relative to ``out_dir``) with their ids.

    Label PNGs hold ``encoding``'s values (a dataset's own), overlays are drawn from g4seg's labels."""
    encode = (lambda labels: labels) if encoding is None else encoding.encode_labels
    outputs = {f"{stem}.png": io.save_label_png(out_dir / f"{stem}.png", encode(result.labels))}
    outputs[f"{stem}.npz"] = io.save_probs_npz(out_dir / f"{stem}.npz", result.probs, classes, result.background)
    if "coarse" in saved:
        outputs[f"coarse/{stem}.png"] = io.save_label_png(out_dir / "coarse" / f"{stem}.png",
                                                          encode(result.coarse_labels))
    if "overlay" in saved:
        outputs[f"overlay/{stem}.png"] = io.save_rgb_png(out_dir / "overlay" / f"{stem}.png",
                                                         io.overlay(image, result.labels))
    if "generated" in saved:
        for name, generated in (result.generated or {}).items():
            rel = f"generated/{stem}/{classes.index(name) + 1}_{_safe_name(name)}.png"
            outputs[rel] = io.save_rgb_png(out_dir / rel, generated)
    return outputs


def _remove_leftovers(out_dir: Path, stem: str, keep: set[str]) -> None:
    """Delete the files of ``stem`` an earlier run wrote that this one did not (other settings, other
    optional outputs, or all of them when the image failed now), so the folder holds nothing stale."""
    candidates = [f"{stem}.png", f"{stem}.npz", f"overlay/{stem}.png", f"coarse/{stem}.png"]
    generated = out_dir / "generated" / stem
    if generated.is_dir() and not generated.is_symlink():
        candidates += [f"generated/{stem}/{p.name}" for p in generated.iterdir()
                       if not _TEMP_NAME.match(p.name) and not p.is_dir()]
    for rel in candidates:
        if rel not in keep and ((out_dir / rel).is_file() or (out_dir / rel).is_symlink()):
            (out_dir / rel).unlink(missing_ok=True)
    with suppress(OSError):
        generated.rmdir()  # only when empty


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
    Refused (G4SegError, nothing written): outputs that would land on an input, another configuration's
    finished images without ``overwrite``, a folder another run holds (:class:`g4seg.runlock.FolderBusy`).
    """
    out_dir = Path(out_dir)
    classes = list(classes)
    _check_stems(items)
    shard = current_shard()
    ident = _identity(config, classes)
    _check_inputs_untouched(items, out_dir)
    mine = shard_items(items, shard, key=lambda item: item.stem)
    wanted = {name for name, on in (("generated", save_generated), ("overlay", save_overlay),
                                    ("coarse", save_coarse)) if on}
    # Decide without writing (or locking) whether there is anything to write: a resume with nothing
    # to do must leave the folder untouched, and work on a read-only one.
    latest = latest_entries(out_dir)
    if not overwrite:
        _check_same_config(out_dir, ident, latest)
    if not ((overwrite and mine) or (shard.is_main and _recorded_hash(out_dir) != ident.config_hash)
            or any(_redo_reason(latest.get(item.stem), item, ident, out_dir, wanted) for item in mine)):
        return RunSummary(done=0, skipped=len(mine), failed=0, errors={}, out_dir=out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise G4SegError(f"cannot create output folder {out_dir}: {exc.strerror}") from None
    with RunLock(out_dir, shard):
        return _run_locked(mine, out_dir, config, classes, ident, shard, build_refiner=build_refiner,
                           overwrite=overwrite, fail_fast=fail_fast, wanted=wanted, progress=progress)


def _run_locked(mine: list[WorkItem], out_dir: Path, config: RefineConfig, classes: list[str], ident: _Identity,
                shard: Shard, *, build_refiner: Callable[[], "Refiner"] | None, overwrite: bool, fail_fast: bool,
                wanted: set[str], progress: bool) -> RunSummary:
    """The run proper, holding the folder's lock: the folder is read again (another run may have finished
    images since), then every image not done is refined and recorded."""
    latest = latest_entries(out_dir)
    if not overwrite:
        _check_same_config(out_dir, ident, latest)
    reasons: dict[str, str] = {}
    for item in mine:
        reason = "overwrite" if overwrite else _redo_reason(latest.get(item.stem), item, ident, out_dir, wanted)
        if reason is not None:
            reasons[item.stem] = reason
    todo = [item for item in mine if item.stem in reasons]
    _remove_stale_temps(out_dir, {item.stem for item in mine}, with_config=shard.is_main)
    if shard.is_main and (todo or _recorded_hash(out_dir) != ident.config_hash):
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
    batch = config.image_batch
    pooled = batch > 1 and callable(getattr(refiner, "refine_many", None))
    with ManifestWriter(out_dir / shard.manifest_name) as manifest, \
            _progress_bar(progress and shard.is_main, len(mine), summary.skipped) as advance:

        def write(done: _Done) -> None:
            """In the writer thread: one image's files, then its manifest line (durable before the next image)."""
            start = time.perf_counter()
            item, read, error = done.read.item, done.read, done.error
            outputs: dict[str, FileId] = {}
            if error is None:
                try:
                    outputs = _write_outputs(out_dir, item.stem, done.result, read.image, classes, wanted,
                                             item.encoding)
                    _remove_leftovers(out_dir, item.stem, set(outputs))
                except Exception as exc:  # noqa: BLE001 - one bad image must not end a long run
                    error, outputs = exc, {}
            if error is not None:
                with suppress(OSError):
                    _remove_leftovers(out_dir, item.stem, set())
            noise_seconds = None if error is not None else getattr(done.result, "noise_seconds", None)
            image, mask = ident.inputs(item)
            manifest.append(Entry(
                stem=item.stem, status="error" if error else "done",
                seconds=round(done.seconds + time.perf_counter() - start, 4),
                error=_one_line(error) if error else None, config_hash=ident.config_hash, rank=shard.rank,
                time=time.time(), image=image, mask=mask, outputs=list(outputs), saved=sorted(wanted),
                image_id=read.image_id.to_json() if read.image_id else None,
                mask_id=read.mask_id.to_json() if read.mask_id else None,
                output_ids={rel: file_id.to_json() for rel, file_id in outputs.items()},
                noise_seconds=None if noise_seconds is None else round(noise_seconds, 4),
                warmup_seconds=getattr(done.result, "warmup_seconds", None),
            ))
            advance()
            if error is None:
                summary.done += 1
                summary.changed += reasons[item.stem] == "changed"
                summary.repaired += reasons[item.stem] == "damaged"
                return
            summary.failed += 1
            summary.errors[item.stem] = _one_line(error)
            if fail_fast:
                raise error  # stops the writer; the run loop raises it

        # reading runs ahead of the compute and writing behind it, each in one thread, in the items' order
        reader = _Prefetch(todo, lambda item: _read(item, mask_source, classes), ahead=max(2, 2 * batch))
        writer = _Writer(write, size=batch + 1)
        try:
            while taken := reader.take(batch):
                for done in _compute(taken, refiner, classes, wanted, pooled):
                    writer.put(done)
                    if fail_fast and done.error is not None:
                        writer.close()  # raises its error once its line is written
                        raise done.error
            writer.close()
        except BaseException:
            # Ctrl-C or an error: images already computed are still written, each whole, then the run stops
            reader.close()
            writer.close(raise_error=False)
            raise
        reader.close()
    return summary
