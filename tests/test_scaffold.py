"""``g4seg plugins new``: names, refusals, and generated packages that really install, load and pass their tests.

The end-to-end test writes one package per kind, installs them with ``pip install -e`` into a
temporary virtual environment that sees this g4seg (``--system-site-packages``), and then asks that
environment's g4seg: ``plugins --json`` lists them, ``G4SEG_LOAD_PLUGINS`` pins them, a changed
``G4SEG_PLUGIN_API`` is refused, the command plugin's command runs, and the generated tests pass.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg import PLUGIN_API
from g4seg.cli import app
from g4seg.errors import G4SegError
from g4seg.scaffold import SCAFFOLD_KINDS, kind_of, new_plugin, plugin_names, render


@pytest.mark.parametrize(("name", "dist", "module", "cls"), [
    ("edges", "g4seg-edges", "g4seg_edges", "Edges"),
    ("my-edges2", "g4seg-my-edges2", "g4seg_my_edges2", "MyEdges2"),
    ("g4seg-dino-small", "g4seg-dino-small", "g4seg_dino_small", "DinoSmall"),
])
def test_names_derived_from_the_plugin_name(name, dist, module, cls):
    names = plugin_names(name, "extractor")
    assert (names.dist, names.module, names.cls, names.name) == (dist, module, cls, dist[len("g4seg-"):])


@pytest.mark.parametrize("name", ["", "Edges", "my_edges", "2d", "my--edges", "edges-", "g4seg-", "a b"])
def test_bad_names_are_refused(name):
    with pytest.raises(G4SegError, match="lowercase letters and digits"):
        plugin_names(name, "extractor")


def test_kind_spellings():
    assert kind_of("mask-source") == kind_of("Mask_Sources") == "mask_source"
    assert kind_of("extractors") == "extractor" and kind_of("command") == "command"
    with pytest.raises(G4SegError, match="unknown plugin kind 'sampler'"):
        kind_of("sampler")


@pytest.mark.parametrize("kind", SCAFFOLD_KINDS)
def test_every_kind_renders_a_complete_package(kind):
    files = render(plugin_names("my-part", kind))
    expected = {"pyproject.toml", "README.md", "g4seg_my_part/__init__.py", "tests/test_g4seg_my_part.py"}
    if kind == "dataset":
        expected.add("g4seg_my_part/data/my-part.txt")
    assert set(files) == expected
    for path, text in files.items():
        assert "$" not in text.replace("$$", ""), path  # every placeholder filled
        if path.endswith(".py"):
            ast.parse(text, path)
    module = files["g4seg_my_part/__init__.py"]
    hook = "register_commands" if kind == "command" else f"register_{kind}s"
    assert f"def {hook}(" in module and f"G4SEG_PLUGIN_API = {PLUGIN_API}" in module
    assert '[project.entry-points.g4seg]\nmy-part = "g4seg_my_part"' in files["pyproject.toml"]


def test_an_existing_folder_is_never_touched(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(G4SegError, match="already exists"):
        new_plugin("edges", "extractor", target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert new_plugin("edges", "extractor", empty) == empty and (empty / "pyproject.toml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]  # no staging folder left


def test_a_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def half_written(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_written)
    with pytest.raises(OSError, match="disk full"):
        new_plugin("edges", "extractor", tmp_path / "edges")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_package_and_refuses_taken_names_in_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["plugins", "new", "edges", "--kind", "extractor", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e" / "g4seg_edges" / "__init__.py").is_file()
    for args, message in ((["clip", "--kind", "extractor"], "the extractor name 'clip' is already taken"),
                          (["voc", "--kind", "dataset"], "the dataset name 'voc' is already taken"),
                          (["refine", "--kind", "command"], "the command name 'refine' is already taken"),
                          (["toy", "--kind", "command"], "the command name 'toy' is already taken"),
                          (["x", "--kind", "sampler"], "unknown plugin kind")):
        result = runner.invoke(app, ["plugins", "new", *args, "--out", str(tmp_path / "refused")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()
    listed = runner.invoke(app, ["plugins", "--json"])  # the group still lists when given no subcommand
    assert listed.exit_code == 0 and json.loads(listed.stdout)["plugin_api"] == PLUGIN_API


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("G4SEG_LOAD_PLUGINS", "G4SEG_STRICT_PLUGINS")}
    environment.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """One generated package per kind, ``pip install -e`` into a fresh venv; returns (folder, venv python)."""
    root = tmp_path_factory.mktemp("scaffold")
    for kind in SCAFFOLD_KINDS:
        new_plugin(f"my-{kind.replace('_', '-')}", kind, root / f"g4seg-my-{kind.replace('_', '-')}")
    # --without-pip: the venv's bundled setuptools would shadow the system's; pip comes from the system site
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root / "venv")],
                   check=True)
    python = str(root / "venv" / "bin" / "python")
    packages = [arg for path in sorted(root.glob("g4seg-my-*")) for arg in ("-e", str(path))]
    pip = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *packages], root)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return root, python


def _listed(python: str, root: Path, **env: str) -> dict[str, dict]:
    result = _run([python, "-m", "g4seg", "plugins", "--json"], root, **env)
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)["plugins"]}


def test_installed_packages_are_listed_with_their_hooks(installed):
    root, python = installed
    rows = _listed(python, root)
    for kind in SCAFFOLD_KINDS:
        name = f"my-{kind.replace('_', '-')}"
        hook = "register_commands" if kind == "command" else f"register_{kind}s"
        assert rows[name] | {"components": None} == {
            "name": name, "origin": f"g4seg-{name}", "version": "0.1.0", "hooks": [hook], "status": "loaded",
            "components": None}
        assert rows[name]["components"] == ([] if kind == "command" else [f"{kind}:{name}"])
    assert sys.executable != python and "my-extractor" not in _listed(sys.executable, root)  # only in the venv


def test_the_allow_list_and_the_api_check_apply_to_installed_packages(installed):
    root, python = installed
    rows = _listed(python, root, G4SEG_LOAD_PLUGINS="g4seg_my_extractor")
    assert rows["my-extractor"]["status"] == "loaded" and rows["my-injector"]["status"].startswith("skipped")
    module = root / "g4seg-my-dataset" / "g4seg_my_dataset" / "__init__.py"
    text = module.read_text()
    module.write_text(text.replace(f"G4SEG_PLUGIN_API = {PLUGIN_API}", f"G4SEG_PLUGIN_API = {PLUGIN_API + 1}"))
    try:
        row = _listed(python, root)["my-dataset"]
    finally:
        module.write_text(text)
    assert row["status"] == "broken"
    assert f"plugin API {PLUGIN_API + 1}" in row["error"] and f"plugin API {PLUGIN_API}" in row["error"]


def test_the_command_plugin_adds_a_working_command(installed, tmp_path):
    root, python = installed
    label = np.zeros((2, 2), np.uint8)
    label[0, 0] = 7
    Image.fromarray(label, mode="L").save(tmp_path / "label.png")
    result = _run([python, "-m", "g4seg", "my-command", str(tmp_path / "label.png")], root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["background: 3 pixels (75.0%)", "label 7: 1 pixels (25.0%)"]
    missing = _run([python, "-m", "g4seg", "my-command", str(tmp_path / "nothing.png")], root)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("g4seg: error: label file not found")


def test_the_generated_tests_pass_as_generated(installed):
    root, python = installed
    tests = [str(path / "tests") for path in sorted(root.glob("g4seg-my-*"))]
    result = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], root)
    assert result.returncode == 0, result.stdout[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "skipped" not in summary, summary
