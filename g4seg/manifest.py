"""The run folder's bookkeeping: one JSON line per finished image, and the hash of what was computed.

Manifests are append-only (each line flushed and fsynced), so a killed run loses at most the image it
was working on. Several processes never share a manifest file: a sharded run writes one per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from g4seg.config import COMPONENT_KINDS, RefineConfig
from g4seg.plugins import registry

MANIFEST_GLOB = "manifest*.jsonl"
# Settings that choose where or how fast the work runs, not what it computes.
UNHASHED = frozenset({"device", "offline", "class_batch", "image_batch", "compile", "offload"})
# Component options of that kind (results equal up to floating-point rounding), by component kind.
UNHASHED_OPTIONS: dict[str, frozenset[str]] = {"backbone": frozenset({"vae_slicing", "channels_last"})}
# Component options added after run folders existed, left out of the hash at these values so that those folders
# resume; an option mapped to (other option, value) is left out unless the other option has that value (it is
# read only then: taesd_model only matters with decoder = "taesd").
OPTIONS_ADDED_AT_DEFAULT: dict[str, dict[str, Any]] = {
    "backbone": {"decoder": "vae", "vae_tiling": False, "taesd_model": ("decoder", "taesd")}}


@dataclass
class Entry:
    """One finished image: ``status`` is "done" or "error"; ``outputs`` are paths relative to the folder.

    ``image`` and ``mask`` are absolute input paths and ``image_id`` / ``mask_id`` their identities
    (size, mtime_ns, sha256; see :mod:`g4seg.fileid`), so a rerun redoes an image whose inputs changed
    and skips one whose inputs merely moved. ``output_ids`` holds the same for every output, so an
    output that is missing, truncated or otherwise altered is redone. ``saved`` names the optional
    outputs written ("generated", "overlay", "coarse"). Lines written before identities were recorded
    (no ``output_ids``) are judged by input paths and output existence, as then. ``noise_seconds`` is the
    part of ``seconds`` spent bringing the latent to t_s (the ``noise`` setting: a noise addition, or an
    inversion; None when nothing was generated, or on lines from before it was recorded). With ``compile``,
    ``warmup_seconds`` is on the line of an image whose refinement compiled models (the first, and any with a new
    batch size): that refinement's seconds, compilation included; None on every other line.
    """

    stem: str
    status: str
    seconds: float
    error: str | None
    config_hash: str
    rank: int
    time: float
    image: str | None = None
    mask: str | None = None
    outputs: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    image_id: dict[str, Any] | None = None
    mask_id: dict[str, Any] | None = None
    output_ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    noise_seconds: float | None = None
    warmup_seconds: float | None = None

    @classmethod
    def from_line(cls, line: str) -> "Entry | None":
        """Parse one manifest line; None for a line cut short by a kill or otherwise unreadable."""
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict):  # valid JSON but no entry (a hand-edited line such as `null` or `[1, 2]`)
            return None
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError:
            return None


class ManifestWriter:
    """Appends entries to one manifest file, each durable before the next image starts."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        ends_cleanly = True
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as handle:
                handle.seek(-1, os.SEEK_END)
                ends_cleanly = handle.read(1) == b"\n"
        self._handle = self.path.open("a", encoding="utf-8")
        if not ends_cleanly:  # a kill cut the last line short: never glue the next entry onto it
            self._handle.write("\n")

    def append(self, entry: Entry) -> None:
        self._handle.write(json.dumps(asdict(entry)) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_entries(out_dir: Path) -> list[Entry]:
    """Every readable entry of every manifest in ``out_dir`` (all ranks, all earlier runs)."""
    entries = []
    for path in sorted(Path(out_dir).glob(MANIFEST_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = Entry.from_line(line) if line.strip() else None
            if entry is not None:
                entries.append(entry)
    return entries


def latest_entries(out_dir: Path) -> dict[str, Entry]:
    """The most recent entry per stem, whichever manifest (rank, world size) it is in."""
    latest: dict[str, Entry] = {}
    for entry in read_entries(out_dir):
        if entry.stem not in latest or entry.time >= latest[entry.stem].time:
            latest[entry.stem] = entry
    return latest


# settings added after run folders existed: left out of the hash at their default, so those folders resume
ADDED_AT_DEFAULT: dict[str, Any] = {"generator": "model", "noise": "add", "inversion_steps": 20,
                                    "inversion_prompt": "empty", "null_text_iters": 10, "null_text_lr": 0.01,
                                    "image_batch": 1}  # image_batch: unhashed anyway (UNHASHED)


def hashed_settings(config: RefineConfig, classes: Sequence[str], dtype: str) -> dict[str, Any]:
    """Every setting that changes the outputs, fully resolved.

    Component names become their canonical names and component options are validated by the
    component's Options model with defaults filled in, so ``-o key=0.5`` (a string) and ``key = 0.5``
    in TOML, or an alias and its name, hash the same. ``dtype`` is the resolved one (fp16 and fp32
    give different numbers); device, offline mode, class and image batching, compile, offload and the
    speed-only component options (:data:`UNHASHED_OPTIONS`) are left out.
    """
    reg = registry()
    data = config.model_dump(mode="json", exclude=set(UNHASHED | {"options", "dtype", *COMPONENT_KINDS}))
    data["dtype"] = dtype
    data["classes"] = list(classes)
    for key, default in ADDED_AT_DEFAULT.items():
        if data.get(key) == default:
            del data[key]
    for kind in COMPONENT_KINDS:
        name = getattr(config, kind)
        if name is None:
            data[kind] = None
            continue
        spec = reg.get(kind, name)
        options = spec.parse_options(config.component_options(kind)).model_dump(mode="json")
        data[kind] = {"name": spec.name, "options": _hashed_options(kind, options)}
    return data


def _hashed_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """A component's options without those of :data:`UNHASHED_OPTIONS` and :data:`OPTIONS_ADDED_AT_DEFAULT`."""
    kept = {key: value for key, value in options.items() if key not in UNHASHED_OPTIONS.get(kind, ())}
    for key, default in OPTIONS_ADDED_AT_DEFAULT.get(kind, {}).items():
        if key not in kept:
            continue
        if isinstance(default, tuple):
            other, value = default
            if options.get(other) != value:
                del kept[key]
        elif kept[key] == default:
            del kept[key]
    return kept


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["timestep: 400 -> 300", "injector.options.rule: 'dense' -> 'eq5'"]`` between two settings."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes
