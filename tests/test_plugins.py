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


class _FakeEntryPoint:
    """An installed entry point of distribution ``dist`` (version ``version``) whose module is ``module``."""

    def __init__(self, name: str, module: types.ModuleType, dist: str, version: str = "1.0") -> None:
        self.name, self._module = name, module
        self.dist = types.SimpleNamespace(name=dist, version=version)

    def load(self) -> types.ModuleType:
        return self._module


def test_the_allow_list_pins_third_party_plugins(fresh_load, monkeypatch):
    """G4SEG_LOAD_PLUGINS: only the named distributions (compared as pip compares names); empty = none;
    unset = all; built-ins always."""
    a = _FakeEntryPoint("a", _plugin("a", _spec("feat-a")), "pkg-a")
    b = _FakeEntryPoint("b", _plugin("b", _spec("feat-b")), "pkg_b")
    monkeypatch.setenv("G4SEG_LOAD_PLUGINS", " PKG_A ")
    registry, report = fresh_load(a, b)
    assert "a" in report.plugins and report.skipped == {"b": "pkg_b"}
    assert [s.name for s in registry.list("extractor", "feat-*")] == ["feat-a"]
    assert "backbone_sd" in report.plugins
    monkeypatch.setenv("G4SEG_LOAD_PLUGINS", "")
    registry, report = fresh_load(a, b)
    assert report.skipped == {"a": "pkg-a", "b": "pkg_b"} and not registry.list("extractor", "feat-*")
    assert "toy" in report.plugins
    monkeypatch.delenv("G4SEG_LOAD_PLUGINS")
    registry, report = fresh_load(a, b)
    assert not report.skipped and len(registry.list("extractor", "feat-*")) == 2


def test_a_plugin_for_another_api_is_broken_with_both_numbers(fresh_load, monkeypatch):
    from g4seg import PLUGIN_API

    monkeypatch.delenv("G4SEG_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("G4SEG_LOAD_PLUGINS", raising=False)
    future, current = _plugin("future", _spec("feat-future")), _plugin("current", _spec("feat-current"))
    future.G4SEG_PLUGIN_API, current.G4SEG_PLUGIN_API = PLUGIN_API + 1, PLUGIN_API
    registry, report = fresh_load(_FakeEntryPoint("future", future, "pkg-future"),
                                  _FakeEntryPoint("current", current, "pkg-current"))
    message = report.broken["future"]
    assert f"plugin API {PLUGIN_API + 1}" in message and f"plugin API {PLUGIN_API}" in message
    assert "future" not in report.plugins and not registry.list("extractor", "feat-future")
    assert registry.get("extractor", "feat-current").plugin == "current"


def test_plugins_json_shows_origin_version_hooks_and_status(fresh_load, monkeypatch):
    import json

    from typer.testing import CliRunner

    from g4seg import PLUGIN_API
    from g4seg.cli import app

    monkeypatch.delenv("G4SEG_STRICT_PLUGINS", raising=False)
    monkeypatch.setenv("G4SEG_LOAD_PLUGINS", "pkg-a")
    fresh_load(_FakeEntryPoint("a", _plugin("a", _spec("feat-a")), "pkg-a", "2.3"),
               _FakeEntryPoint("b", _plugin("b", _spec("feat-b")), "pkg-b"))
    listed = json.loads(CliRunner().invoke(app, ["plugins", "--json"]).stdout)
    rows = {row["name"]: row for row in listed["plugins"]}
    assert listed["plugin_api"] == PLUGIN_API
    assert rows["a"] == {"name": "a", "origin": "pkg-a", "version": "2.3", "hooks": ["register_extractors"],
                         "status": "loaded", "components": ["extractor:feat-a"]}
    assert rows["b"]["status"].startswith("skipped") and rows["b"]["origin"] == "pkg-b"
    assert rows["backbone_sd"]["origin"] == "builtin" and rows["backbone_sd"]["hooks"] == ["register_backbones"]


def test_plugins_add_commands_and_a_broken_command_plugin_is_reported(fresh_load, monkeypatch):
    import typer
    from typer.testing import CliRunner

    monkeypatch.delenv("G4SEG_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("G4SEG_LOAD_PLUGINS", raising=False)
    good, bad = types.ModuleType("good"), types.ModuleType("bad")

    @hookimpl
    def good_commands(app):
        @app.command("hello")
        def hello(name: str = "world") -> None:
            typer.echo(f"hello {name}")

    @hookimpl
    def bad_commands(app):
        raise RuntimeError("cannot build my command")

    good.register_commands, bad.register_commands = good_commands, bad_commands
    _, report = fresh_load(_FakeEntryPoint("good", good, "pkg-good"), _FakeEntryPoint("bad", bad, "pkg-bad"))
    app = typer.Typer()

    @app.command("other")
    def other() -> None:
        typer.echo("other works")

    plugins.register_commands(app)
    assert report.broken["bad"] == "RuntimeError: cannot build my command"
    assert report.hooks["good"] == ["register_commands"]
    runner = CliRunner()
    assert runner.invoke(app, ["hello", "--name", "g4seg"]).output == "hello g4seg\n"
    assert runner.invoke(app, ["other"]).output == "other works\n"


def test_a_command_typer_cannot_read_is_taken_out_and_reported(fresh_load, monkeypatch):
    """An annotation naming something the plugin module never imported fails only when Typer builds the
    command line (for every command); register_commands tries that per plugin and takes the plugin's
    commands (and groups) out again, so the other commands keep working."""
    import typer
    from typer.testing import CliRunner

    monkeypatch.delenv("G4SEG_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("G4SEG_LOAD_PLUGINS", raising=False)
    sloppy = types.ModuleType("sloppy")

    @hookimpl
    def sloppy_commands(app):
        @app.command("fine-first")
        def fine_first() -> None:
            typer.echo("never reachable")

        group = typer.Typer()

        @group.command("inner")
        def inner(paths: "NotImported") -> None:  # noqa: F821 - the mistake under test
            typer.echo("unreachable")

        app.add_typer(group, name="sloppy-group")

    sloppy.register_commands = sloppy_commands
    _, report = fresh_load(_FakeEntryPoint("sloppy", sloppy, "pkg-sloppy"))
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as g4seg's app, even with one command left

    @app.command("other")
    def other() -> None:
        typer.echo("other works")

    plugins.register_commands(app)
    assert report.broken["sloppy"] == "NameError: name 'NotImported' is not defined"
    assert [info.name for info in app.registered_commands] == ["other"] and not app.registered_groups
    assert CliRunner().invoke(app, ["other"]).output == "other works\n"
