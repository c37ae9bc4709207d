"""The plugin system: registration through hooks, duplicates, fail-soft and strict loading, options."""

import types
from importlib.metadata import EntryPoint

import pytest

from g4seg import plugins
from g4seg.errors import G4SegError, PluginError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Registry, incompatibility


class _FooOptions(Options):
    size: int = 3


def _plugin(name: str, *specs: ComponentSpec) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def register_extractors(register):
        for spec in specs:
            register(spec)

    module.register_extractors = register_extractors
    return module


def _spec(name: str, aliases=()) -> ComponentSpec:
    return ComponentSpec(kind="extractor", name=name, factory=lambda o, r: ("built", o.size),
                         options=_FooOptions, aliases=aliases)


@pytest.fixture
def fresh_load(monkeypatch):
    """Reload plugins with fake entry points; restore the cached registry afterwards."""

    def run(*eps: EntryPoint):
        monkeypatch.setattr(plugins, "entry_points", lambda group: list(eps))
        plugins.load.cache_clear()
        return plugins.load()

    yield run
    plugins.load.cache_clear()


def test_builtins_are_registered_through_the_hooks():
    reg, report = plugins.load()
    assert report.plugins["backbone_sd"] == "builtin"
    assert {s.name for s in reg.list("backbone")} >= {"sd15", "sd21", "sd21-768"}
    assert reg.get("backbone", "sd21").plugin == "backbone_sd"
    assert reg.get("injector", "attn").kind == "injector"


def test_a_broken_plugin_is_reported_and_the_rest_keeps_working(fresh_load, monkeypatch, capsys):
    monkeypatch.delenv("G4SEG_STRICT_PLUGINS", raising=False)
    reg, report = fresh_load(EntryPoint("broken", "g4seg_no_such_module_xyz", "g4seg"))
    assert "broken" in report.broken and "ModuleNotFoundError" in report.broken["broken"]
    assert "plugin 'broken' failed to load" in capsys.readouterr().err
    assert reg.get("backbone", "sd21").name == "sd21"


def test_strict_mode_makes_a_broken_plugin_fatal(fresh_load, monkeypatch):
    monkeypatch.setenv("G4SEG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'broken' failed to load"):
        fresh_load(EntryPoint("broken", "g4seg_no_such_module_xyz", "g4seg"))


def test_duplicate_names_name_both_plugins():
    import pluggy

    from g4seg import hookspecs

    pm = pluggy.PluginManager("g4seg")
    pm.add_hookspecs(hookspecs)
    pm.register(_plugin("first", _spec("feat")), name="first")
    pm.register(_plugin("second", _spec("other", aliases=("feat",))), name="second")
    with pytest.raises(PluginError) as info:
        plugins._collect(pm, plugins.LoadReport())
    assert "'first'" in str(info.value) and "'second'" in str(info.value) and "'feat'" in str(info.value)


def test_options_reject_unknown_keys_and_validate_types():
    spec = _spec("feat")
    assert spec.build({"size": "5"}) == ("built", 5)
    with pytest.raises(G4SegError, match="extractor 'feat': invalid options: colour: Extra inputs"):
        spec.build({"colour": "red"})
    with pytest.raises(G4SegError, match="size"):
        spec.build({"size": "big"})


def test_registry_wildcards_aliases_and_unknown_names():
    reg = Registry()
    reg.add(_spec("clip-b16", aliases=("clip",)))
    reg.add(_spec("dino"))
    assert [s.name for s in reg.list("extractor", "clip*")] == ["clip-b16"]
    assert reg.get("extractor", "clip").name == "clip-b16"
    with pytest.raises(G4SegError, match="unknown extractor 'sam' \\(available: clip-b16, dino\\)"):
        reg.get("extractor", "sam")


def test_incompatibility_is_declared_by_tags():
    backbone = ComponentSpec(kind="backbone", name="b", factory=lambda o, r: None, tags=frozenset({"unet-attention"}))
    bare = ComponentSpec(kind="backbone", name="bare", factory=lambda o, r: None)
    injector = ComponentSpec(kind="injector", name="i", factory=lambda o, r: None,
                             tags=frozenset({"requires:unet-attention"}))
    assert incompatibility(injector, backbone) is None
    assert "needs unet-attention" in incompatibility(injector, bare)


def test_g4seg_plugins_lists_a_broken_plugin_and_still_works(fresh_load, monkeypatch):
    import json

    from typer.testing import CliRunner

    from g4seg.cli import app

    monkeypatch.delenv("G4SEG_STRICT_PLUGINS", raising=False)
    fresh_load(EntryPoint("broken", "g4seg_no_such_module_xyz", "g4seg"))
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert "g4seg_no_such_module_xyz" in listed["broken"]["broken"]
    assert any(p["name"] == "backbone_sd" for p in listed["plugins"])
    table = CliRunner().invoke(app, ["plugins"])
    assert table.exit_code == 0 and "failed" in table.stdout
