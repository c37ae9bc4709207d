"""The plugin manager: built-ins and third-party plugins go through the same pluggy hooks.

Built-in modules are registered as default plugins; third-party ones come from the ``g4seg``
entry-point group. Loading is fail-soft: a plugin that fails to import or to register is recorded in
:data:`LoadReport.broken` (and printed to stderr) while the rest keeps working, unless
``G4SEG_STRICT_PLUGINS=1``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import pluggy

from g4seg import hookspecs
from g4seg.errors import PluginError
from g4seg.registry import KINDS, ComponentSpec, Registry

ENTRY_POINT_GROUP = "g4seg"

BUILTIN_MODULES = (
    "g4seg.builtin.backbone_sd",
    "g4seg.builtin.backbone_sdxl",
    "g4seg.builtin.backbone_lcm",
    "g4seg.builtin.injector_attn",
    "g4seg.builtin.injector_none",
    "g4seg.builtin.extractor_clip",
    "g4seg.builtin.toy",
    "g4seg.builtin.mask_source_file",
    "g4seg.builtin.mask_source_sclip",
    "g4seg.builtin.dataset_voc",
    "g4seg.builtin.dataset_context",
    "g4seg.builtin.dataset_coco_object",
    "g4seg.builtin.dataset_toy",
)

HOOK_FOR_KIND = {
    "backbone": "register_backbones",
    "injector": "register_injectors",
    "extractor": "register_extractors",
    "mask_source": "register_mask_sources",
    "postprocessor": "register_postprocessors",
    "dataset": "register_datasets",
}


@dataclass
class LoadReport:
    """What got loaded: plugin name -> origin ("builtin" or the distribution), and the failures."""

    plugins: dict[str, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)


def strict() -> bool:
    return os.environ.get("G4SEG_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


def _fail(report: LoadReport, name: str, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if strict():
        raise PluginError(f"plugin '{name}' failed to load: {message}") from exc
    report.broken[name] = message
    print(f"g4seg: warning: plugin '{name}' failed to load: {message}", file=sys.stderr)


def _manager(report: LoadReport) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("g4seg")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_MODULES:
        short = module_name.rsplit(".", 1)[1]
        try:
            pm.register(importlib.import_module(module_name), name=short)
            report.plugins[short] = "builtin"
        except Exception as exc:  # noqa: BLE001 - a broken built-in is reported like any plugin
            _fail(report, short, exc)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
            dist = ep.dist.name if ep.dist else "unknown"
            report.plugins[ep.name] = dist
        except Exception as exc:  # noqa: BLE001
            _fail(report, ep.name, exc)
    return pm


def _collect(pm: pluggy.PluginManager, report: LoadReport) -> Registry:
    registry = Registry()
    for kind in KINDS:
        caller = getattr(pm.hook, HOOK_FOR_KIND[kind])
        for impl in reversed(caller.get_hookimpls()):
            plugin = pm.get_name(impl.plugin) or "?"

            def register(spec: ComponentSpec | None = None, _plugin: str = plugin, _kind: str = kind,
                         **fields: Any) -> None:
                spec = spec or ComponentSpec(kind=_kind, **fields)
                if spec.kind != _kind:
                    raise PluginError(f"plugin '{_plugin}' registered a {spec.kind} from the {_kind} hook")
                registry.add(ComponentSpec(**{**spec.__dict__, "plugin": _plugin}))

            try:
                impl.function(register=register)
            except PluginError as exc:
                if "duplicate" in str(exc):
                    raise
                _fail(report, plugin, exc)
            except Exception as exc:  # noqa: BLE001
                _fail(report, plugin, exc)
    return registry


@lru_cache(maxsize=1)
def load() -> tuple[Registry, LoadReport]:
    """Load every plugin once per process and return the registry with its load report."""
    report = LoadReport()
    return _collect(_manager(report), report), report


def registry() -> Registry:
    return load()[0]
