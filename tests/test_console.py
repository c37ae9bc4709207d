"""A clean console: --version, other libraries quiet unless --verbose, the loading status, the no-Hub
failure (fast, one line), an empty component list, and refine --help at 80 columns."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg import __version__, console
from g4seg.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _invoke(*args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture
def restore_console(monkeypatch):
    """Whatever a test configures is undone: the quiet variables and the libraries' own settings."""
    for name in console.QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    console._State.configured = False  # as in a process where the CLI has not run
    yield
    console.configure(verbose=True)  # undo what this test's configure(False) changed
    for name in console.QUIET_ENV:
        os.environ.pop(name, None)
    console._State.configured = False
    console._State.verbose = False


def test_version():
    result = _invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"g4seg {__version__}"


def test_quiet_settings_are_variables_set_before_any_model_library(tmp_path):
    """``g4seg plugins`` sets the variables the libraries read at import, and imports none of them;
    a variable the user set is kept; --verbose sets none."""
    code = (
        "import os, sys; os.environ['TRANSFORMERS_VERBOSITY'] = 'info'; "
        "from typer.testing import CliRunner; from g4seg.cli import app; "
        "r = CliRunner().invoke(app, sys.argv[1:]); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'huggingface_hub') "
        "if m in sys.modules]; assert not heavy, heavy; "
        "print({k: os.environ.get(k) for k in ('DIFFUSERS_VERBOSITY', 'TRANSFORMERS_VERBOSITY', "
        "'HF_HUB_DISABLE_PROGRESS_BARS', 'TRANSFORMERS_NO_ADVISORY_WARNINGS')})")
    env = {k: v for k, v in os.environ.items() if k not in console.QUIET_ENV and k != console.VERBOSE_ENV}
    quiet = subprocess.run([sys.executable, "-c", code, "plugins"], env=env, cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert eval(quiet) == {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "info",
                           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    verbose = subprocess.run([sys.executable, "-c", code, "--verbose", "plugins"], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert eval(verbose) == {"DIFFUSERS_VERBOSITY": None, "TRANSFORMERS_VERBOSITY": "info",
                             "HF_HUB_DISABLE_PROGRESS_BARS": None, "TRANSFORMERS_NO_ADVISORY_WARNINGS": None}


def _scene(tmp_path: Path) -> tuple[Path, Path]:
    yy, xx = np.mgrid[:40, :48]
    image = np.where(((yy - 20) ** 2 + (xx - 24) ** 2 < 120)[..., None], [200, 80, 40], [30, 90, 160])
    Image.fromarray(image.astype(np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(((yy - 18) ** 2 + (xx - 26) ** 2 < 100).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path / "img.png", tmp_path / "mask.png"


def test_library_output_is_quiet_unless_verbose(tmp_path, tiny_sd_dir, tiny_clip_options, restore_console):
    """The transformers "Loading weights" bar of the text encoder shows only with --verbose, which also
    names what loads from where; the quiet run prints nothing but its summary."""
    image, mask = _scene(tmp_path)
    common = [image, "--mask", mask, "--classes", "cat", "--device", "cpu", "--no-progress", "--resolution", "64",
              "-o", f"backbone.model=local-dir:{tiny_sd_dir}",
              *[a for key, value in tiny_clip_options.items() for a in ("-o", f"extractor.{key}={value}")]]
    quiet = _invoke("refine", *common, "--out", tmp_path / "quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout.startswith("done 1,"), quiet.output
    verbose = _invoke("--verbose", "refine", *common, "--out", tmp_path / "verbose")
    assert verbose.exit_code == 0, verbose.output
    assert "Loading weights" in verbose.stderr
    assert f"loading the diffusion backbone from local folder {tiny_sd_dir}" in verbose.stderr


def test_the_loading_status_shows_only_on_a_terminal(monkeypatch, capsys, restore_console):
    console.configure(verbose=False)
    with console.loading("the diffusion backbone", "the Hub cache (org/name)"):
        pass
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal: nothing at all
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal
    with console.loading("the diffusion backbone", "the Hub cache (org/name)"):
        with console.loading("the VAE", "local folder /models/vae"):  # nested: the same spinner, new text
            time.sleep(0.5)  # the spinner redraws 12.5 times a second
    err = capsys.readouterr().err
    assert "loading the diffusion backbone from the Hub cache (org/name)" in err
    assert "loading the VAE from local folder /models/vae" in err


def test_nothing_changes_for_library_users(capsys, restore_console):
    """Without the CLI's configure(), loading() shows nothing and quiet_libraries() does nothing."""
    assert not console.is_configured()
    with console.loading("x", "y"):
        pass
    assert capsys.readouterr().err == ""


# ----- no Hub ---------------------------------------------------------------------------------------

@pytest.fixture
def closed_hub(monkeypatch):
    """The Hub endpoint is a closed local port (nothing leaves the machine); offline mode is off."""
    from huggingface_hub import constants

    from g4seg import model_ref

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(model_ref, "_HUB_PROBES", {})
    return "http://127.0.0.1:9"


def test_no_hub_and_not_cached_is_one_fast_line(closed_hub, tmp_path):
    from diffusers import UNet2DConditionModel

    from g4seg.errors import G4SegError
    from g4seg.model_ref import load_pretrained, resolve_model_ref

    start = time.perf_counter()
    with pytest.raises(G4SegError) as exc:
        load_pretrained(UNet2DConditionModel, resolve_model_ref("g4seg-tests/not-cached"), subfolder="unet",
                        option="backbone.model", cache_dir=str(tmp_path))
    seconds = time.perf_counter() - start
    message = str(exc.value)
    assert "\n" not in message and seconds < 5, (seconds, message)
    assert "'g4seg-tests/not-cached'" in message and closed_hub in message
    assert "--offline" in message and "`g4seg doctor --smoke`" in message
    assert "-o backbone.model=local-dir:/path/to/folder" in message


def test_no_hub_but_cached_loads_from_the_cache(closed_hub, tmp_path, tiny_sd_dir):
    from transformers import CLIPTokenizer

    from g4seg.model_ref import load_pretrained, resolve_model_ref

    repo = tmp_path / "hub" / "models--g4seg-test--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    start = time.perf_counter()
    tokenizer = load_pretrained(CLIPTokenizer, resolve_model_ref("g4seg-test/tiny-sd"), subfolder="tokenizer",
                                cache_dir=str(tmp_path / "hub"))
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    assert time.perf_counter() - start < 5


def test_a_connection_error_is_named_as_such():
    from huggingface_hub.utils import get_session

    from g4seg.model_ref import _reason

    try:
        get_session().head("http://127.0.0.1:9/", timeout=2)
    except Exception as exc:  # noqa: BLE001 - whatever the Hub's HTTP library raises
        wrapped = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        wrapped.__cause__ = exc
        assert "could not be reached" in _reason(wrapped, "unet", None)
    else:
        pytest.fail("port 9 answered")


@pytest.mark.slow
def test_cli_without_hub_fails_fast_in_one_line(tmp_path):
    """The real command, offline mode unset, the Hub a closed port: one error line, no retry loop."""
    image, mask = _scene(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    script = ("import sys, time; import diffusers, transformers, torch; diffusers.UNet2DConditionModel; "
              "from g4seg.cli import main; start = time.perf_counter()\n"
              "try:\n    main()\nfinally:\n    print(f'{time.perf_counter() - start:.2f}', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", script, "refine", str(image), "--mask", str(mask),
                           "--classes", "cat", "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress",
                           "-o", "backbone.model=g4seg-tests/not-cached"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    *lines, seconds = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("g4seg: error: model 'g4seg-tests/not-cached' could not be loaded (not in the "
                               "local cache, and the Hugging Face Hub at http://127.0.0.1:9 is unreachable")
    assert "--offline" in lines[0] and "`g4seg doctor --smoke`" in lines[0]
    assert float(seconds) < 10, seconds  # after the imports; huggingface_hub's retry loop alone sleeps 23 s


# ----- small CLI fixes ------------------------------------------------------------------------------

def test_an_empty_component_list_says_so(monkeypatch):
    from g4seg import plugins
    from g4seg.registry import Registry

    none_match = _invoke("list", "backbones", "zz*")
    assert none_match.exit_code == 0 and "no backbones match 'zz*' (installed: " in none_match.output
    monkeypatch.setattr(plugins, "registry", Registry)  # a registry where nothing is installed
    result = _invoke("list", "postprocessors")
    assert result.exit_code == 0
    assert result.output.strip() == ("no postprocessors installed: a plugin adds them with the hook "
                                     "register_postprocessors (see docs/plugins.md)")
    assert _invoke("list", "postprocessors", "--json").output.strip() == "[]"


def test_refine_help_fits_80_columns():
    import typer.main

    result = _invoke("refine", "--help", env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    command = typer.main.get_command(app).commands["refine"]
    for param in command.params:
        for name in (*param.opts, *param.secondary_opts):
            assert name in text, f"option {name} is cut or missing in refine --help at 80 columns"
