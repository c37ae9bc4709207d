"""The plugin manager: built-ins and third-party plugins go through the same pluggy hooks.

Built-in modules are registered as default plugins; third-party ones come from the ``g4seg``
entry-point group. Loading is fail-soft: a plugin that fails to import or to register is recorded in
:data:`LoadReport.broken` (and printed to stderr) while the rest keeps working, unless
``G4SEG_STRICT_PLUGINS=1``.

``G4SEG_LOAD_PLUGINS`` pins the third-party plugins (as the ``llm`` CLI's ``LLM_LOAD_PLUGINS``): a
comma-separated list of distribution names; set but empty loads none. Built-ins always load. A
plugin module may declare ``G4SEG_PLUGIN_API = N``, the plugin API it was written against; when it
differs from :data:`g4seg.PLUGIN_API` the plugin is reported broken with both numbers and not loaded.
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

from g4seg import PLUGIN_API, hookspecs
from g4seg import __version__ as PACKAGE_VERSION
from g4seg.errors import PluginError
from g4seg.registry import KINDS, ComponentSpec, Registry

ENTRY_POINT_GROUP = "g4seg"
ALLOW_LIST_VARIABLE = "G4SEG_LOAD_PLUGINS"
API_ATTRIBUTE = "G4SEG_PLUGIN_API"

BUILTIN_MODULES = (
    "g4seg.builtin.backbone_sd",
    "g4seg.builtin.backbone_sdxl",
    "g4seg.builtin.backbone_lcm",
    "g4seg.builtin.injector_attn",
    "g4seg.builtin.injector_none",
    "g4seg.builtin.injector_controlnet",
    "g4seg.builtin.extractor_clip",
    "g4seg.builtin.extractor_dino",
    "g4seg.builtin.extractor_sd",
    "g4seg.builtin.toy",
    "g4seg.builtin.mask_source_file",
    "g4seg.builtin.mask_source_sclip",
    "g4seg.builtin.postprocessor_densecrf",
    "g4seg.builtin.dataset_voc",
    "g4seg.builtin.dataset_context",
    "g4seg.builtin.dataset_coco_object",
    "g4seg.builtin.dataset_toy",
    "g4seg.builtin.dataset_ade20k",
    "g4seg.builtin.dataset_nightcity",
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
    """What got loaded: plugin name -> origin ("builtin" or the distribution), its version and hooks; the
    failures, and the plugins left out by ``G4SEG_LOAD_PLUGINS`` (name -> distribution)."""

    plugins: dict[str, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    hooks: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    manager: pluggy.PluginManager | None = field(default=None, repr=False)  # for the command hook


def _normalise(name: str) -> str:
    """Distribution names compare as pip compares them: case, '-', '_' and '.' do not matter."""
    return name.lower().replace("_", "-").replace(".", "-")


def allow_list() -> set[str] | None:
    """The distributions ``G4SEG_LOAD_PLUGINS`` allows; None when the variable is not set."""
    value = os.environ.get(ALLOW_LIST_VARIABLE)
    if value is None:
        return None
    return {_normalise(part.strip()) for part in value.split(",") if part.strip()}


def _check_api(module: Any) -> None:
    wanted = getattr(module, API_ATTRIBUTE, None)
    if wanted is not None and wanted != PLUGIN_API:
        raise PluginError(f"written for g4seg plugin API {wanted}, but this g4seg provides plugin API {PLUGIN_API}")


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
            report.plugins[short], report.versions[short] = "builtin", PACKAGE_VERSION
        except Exception as exc:  # noqa: BLE001 - a broken built-in is reported like any plugin
            _fail(report, short, exc)
    allowed = allow_list()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name):
            continue
        dist = ep.dist.name if ep.dist else "unknown"
        if allowed is not None and _normalise(dist) not in allowed:
            report.skipped[ep.name] = dist
            continue
        try:
            module = ep.load()
            _check_api(module)
            pm.register(module, name=ep.name)
            report.plugins[ep.name] = dist
            report.versions[ep.name] = ep.dist.version if ep.dist else None
        except Exception as exc:  # noqa: BLE001
            _fail(report, ep.name, exc)
    for name in report.plugins:
        report.hooks[name] = sorted(caller.name for caller in pm.get_hookcallers(pm.get_plugin(name)) or [])
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
    report.manager = _manager(report)
    return _collect(report.manager, report), report


def _command_callbacks(app: Any, commands: int, groups: int) -> list[Any]:
    """The callbacks of the commands (and of the commands of groups) added to ``app`` after the first
    ``commands`` commands and ``groups`` groups."""
    callbacks = [info.callback for info in app.registered_commands[commands:]]
    for group in app.registered_groups[groups:]:
        callbacks += _command_callbacks(group.typer_instance, 0, 0) if group.typer_instance else []
    return callbacks


def register_commands(app: Any) -> None:
    """Let every plugin add its commands to ``app``; a plugin whose hook fails, or one of whose commands
    Typer cannot read (say, an annotation naming something not imported), is reported like any broken
    plugin and its commands are taken out again, so the rest of the command line keeps working."""
    from typer.utils import get_params_from_function

    report = load()[1]
    pm = report.manager
    if pm is None:
        return
    for impl in reversed(pm.hook.register_commands.get_hookimpls()):
        name = pm.get_name(impl.plugin) or "?"
        commands, groups = len(app.registered_commands), len(app.registered_groups)
        try:
            impl.function(app=app)
            for callback in _command_callbacks(app, commands, groups):
                get_params_from_function(callback)  # what Typer does when it builds the command line
        except Exception as exc:  # noqa: BLE001 - fail-soft, as component registration
            del app.registered_commands[commands:], app.registered_groups[groups:]
            _fail(report, name, exc)


def registry() -> Registry:
    return load()[0]
