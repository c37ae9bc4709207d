"""``g4seg serve`` without a browser: the request handling of g4seg/web against ``g4seg refine``'s own files
and messages, the painted-mask decoding, the shared models, the workspace's confinement, the command."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg.cli import app
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.web import requests as web
from g4seg.web.examples import toy_examples
from g4seg.web.workspace import Workspace

TOY = ["--backbone", "toy", "--extractor", "toy-clip", "--device", "cpu"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server's state on the toy models (loaded once for the module) and its examples."""
    workspace = Workspace(tmp_path_factory.mktemp("serve"))
    examples = toy_examples(workspace.root / "examples")
    yield web.Refinements(RefineConfig(backbone="toy", extractor="toy-clip", device="cpu"), workspace), examples
    workspace.close()


def _cli(args: list, cwd: Path, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _rgba(hw, painted: dict[int, np.ndarray], alpha: int = 255) -> np.ndarray:
    layer = np.zeros((*hw, 4), np.uint8)
    for k, where in painted.items():
        layer[where] = (*web.class_colours()[k - 1], alpha)
    return layer


def test_painted_labels_by_brush_colour_and_opacity():
    yy, xx = np.mgrid[:6, :8]
    first = _rgba((6, 8), {1: xx < 3, 2: xx >= 5})
    first[0, 0, 3] = 100  # an antialiased brush edge: not painted
    first[1, 1, :3] += 3  # a colour a little off the brush's: still class 1
    second = _rgba((6, 8), {3: yy == 5})  # on top
    erased = _rgba((6, 8), {})  # an eraser leaves alpha 0
    labels = web.painted_labels([first, second, erased], (6, 8), 3)
    expected = np.where(xx < 3, 1, np.where(xx >= 5, 2, 0))
    expected[0, 0] = 0
    expected[5] = 3
    np.testing.assert_array_equal(labels, expected)


def test_painted_layer_of_another_size_is_resized_and_extra_colours_refused():
    big = _rgba((8, 8), {2: np.add.outer(np.arange(8), np.zeros(8, int)) >= 4})
    np.testing.assert_array_equal(web.painted_labels([big], (4, 4), 2), np.repeat([[0], [0], [2], [2]], 4, axis=1))
    with pytest.raises(G4SegError, match="colour of class 2, but only 1 class"):
        web.painted_labels([big], (4, 4), 1)


def test_page_downloads_are_the_cli_files_byte_for_byte(served, tmp_path, monkeypatch):
    refinements, examples = served
    example = examples[0]
    result = refinements.run(web.PageInputs(str(example.image), example.classes, web.UPLOAD, str(example.coarse),
                                            truth=str(example.truth)))
    code, output = _cli(["refine", example.image, "--mask", example.coarse, "--classes", example.classes,
                         "--out", tmp_path / "cli", "--save-coarse", *TOY], tmp_path, monkeypatch)
    assert code == 0, output
    for key, rel in (("labels", "scene.png"), ("probs", "scene.npz"), ("coarse", "coarse/scene.png")):  # same bytes
        assert result.files[key].read_bytes() == (tmp_path / "cli" / rel).read_bytes(), key
    assert result.files["labels"].is_relative_to(refinements.workspace.root)
    # the panels: the refined overlay is the image blended with the refined labels' colours
    labels = np.asarray(Image.open(result.files["labels"]))
    image = np.asarray(Image.open(example.image).convert("RGB"))
    assert (labels != np.asarray(Image.open(result.files["coarse"]))).sum() > 0
    np.testing.assert_array_equal(result.panels["refined"][labels == 0], image[labels == 0])
    assert (result.panels["changed"] == [255, 0, 255]).all(axis=2).sum() == \
        (labels != np.asarray(Image.open(result.files["coarse"]))).sum()
    assert result.generated and result.panels["correspondence"].shape[2] == 3
    # IoU against the uploaded truth, counted by hand for the first class present
    truth = np.asarray(Image.open(example.truth))
    k = int(truth[truth > 0][0])
    inter, union = ((labels == k) & (truth == k)).sum(), ((labels == k) | (truth == k)).sum()
    row = result.iou[k]
    assert row[2] == round(100 * inter / union, 2)


def test_painted_mask_is_refined_as_the_cli_refines_its_label_png(served, tmp_path, monkeypatch):
    refinements, examples = served
    example = examples[1]
    truth = np.asarray(Image.open(example.truth))
    layer = _rgba(truth.shape, {k: truth == k for k in np.unique(truth) if k})
    result = refinements.run(web.PageInputs(str(example.image), example.classes, web.PAINT, painted=[layer],
                                            settings={"beta": 0.7, "seed": 3.0, "cf": "0.1,0.7"}))
    painted = next(result.files["labels"].parent.parent.glob("*_painted.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(painted)), truth)
    code, output = _cli(["refine", example.image, "--mask", painted, "--classes", example.classes, "--beta", "0.7",
                         "--seed", "3", "--cf", "0.1,0.7", "--out", tmp_path / "cli", *TOY], tmp_path, monkeypatch)
    assert code == 0, output
    assert result.files["labels"].read_bytes() == (tmp_path / "cli" / "scene.png").read_bytes()


@pytest.mark.parametrize("case", ["corrupt image", "mask of the wrong size", "unknown class value"])
def test_bad_upload_is_the_cli_one_line_message(served, tmp_path, monkeypatch, case):
    refinements, examples = served
    example = examples[0]
    uploads = refinements.workspace.uploads / case.replace(" ", "-")
    uploads.mkdir()
    image, mask, classes = uploads / "photo.png", uploads / "coarse.png", example.classes
    shutil.copyfile(example.image, image)
    shutil.copyfile(example.coarse, mask)
    if case == "corrupt image":
        image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "mask of the wrong size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    else:
        classes = "ball"
    with pytest.raises(G4SegError) as raised:
        refinements.run(web.PageInputs(str(image), classes, web.UPLOAD, str(mask)))
    code, output = _cli(["refine", "photo.png", "--mask", "coarse.png", "--classes", classes, "--out", "out", *TOY],
                        uploads, monkeypatch)
    assert code == 1
    assert output.strip() == f"g4seg: error: {raised.value}"
    # and the page keeps working
    assert refinements.run(web.PageInputs(str(example.image), example.classes, web.UPLOAD, str(example.coarse)))


def test_files_outside_the_workspace_are_refused(served, tmp_path):
    refinements, examples = served
    outside = tmp_path / "secret.png"
    shutil.copyfile(examples[0].image, outside)
    link = refinements.workspace.uploads / "link.png"
    link.symlink_to(outside)
    for path in (outside, link):
        with pytest.raises(G4SegError, match="not a file uploaded to this page"):
            refinements.run(web.PageInputs(str(path), examples[0].classes, web.UPLOAD, str(examples[0].coarse)))


def test_models_are_loaded_once_and_concurrent_requests_keep_their_own_results(served, monkeypatch):
    refinements, examples = served
    from g4seg.refiner import Refiner

    pairs = [(e, {"beta": beta}) for e, beta in zip(examples[:3], (0.8, 0.6, 0.9))]
    alone = [refinements.run(web.PageInputs(str(e.image), e.classes, web.UPLOAD, str(e.coarse), settings=s))
             for e, s in pairs]
    built = []
    monkeypatch.setattr(Refiner, "from_config", classmethod(lambda cls, *a, **k: built.append(a)))
    together: dict[int, web.PageResult] = {}

    def one(n: int) -> None:
        e, s = pairs[n]
        together[n] = refinements.run(web.PageInputs(str(e.image), e.classes, web.UPLOAD, str(e.coarse), settings=s))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == []  # every request above ran on the models loaded for the first
    for n, result in enumerate(alone):
        assert together[n].files["labels"].read_bytes() == result.files["labels"].read_bytes()
        assert together[n].files["labels"].parent != result.files["labels"].parent
    assert len({r.files["labels"].read_bytes() for r in alone}) == 3


def test_iou_rows_count_as_hand_made():
    truth = np.array([[0, 1, 1, 255], [0, 2, 2, 2]], np.uint8)
    coarse = np.array([[0, 0, 1, 1], [0, 2, 2, 0]], np.uint8)
    refined = np.array([[0, 1, 1, 1], [0, 2, 2, 2]], np.uint8)
    rows = web.iou_rows(coarse, refined, truth, ["a", "b"])
    # by hand, (0, 3) ignored: coarse background {00, 01, 10, 13} vs {00, 10}: 2/4; a {02} vs {01, 02}: 1/2;
    # b {11, 12} vs {11, 12, 13}: 2/3; the refined map equals the truth where it counts
    assert rows == [["background", 50.0, 100.0], ["a", 50.0, 100.0], ["b", round(200 / 3, 2), 100.0],
                    ["mIoU", round((50 + 50 + 200 / 3) / 3, 2), 100.0]]


def test_settings_come_from_the_page_over_the_server_config(tmp_path):
    base = RefineConfig(backbone="toy", extractor="toy-clip", beta=0.9, ramp_width=0.1)
    refinements = web.Refinements(base, Workspace(tmp_path))
    config = refinements.config({"beta": 0.5, "cf": "0.1,0.7", "timestep": 300.0, "seed": ""}, "sclip")
    assert (config.beta, config.cf, config.timestep, config.seed, config.ramp_width, config.mask_source) == \
        (0.5, (0.1, 0.7), 300, 0, 0.1, "sclip")
    with pytest.raises(G4SegError, match="--cf must be LO,HI"):
        refinements.config({"cf": "0.2"}, web.PAINT)
    with pytest.raises(G4SegError, match="seed must be a whole number"):
        refinements.config({"seed": 1.5}, web.PAINT)
    assert web.model_key(config) == web.model_key(base)
    options = {"mask_source": {"preset": "toy", "resize": "true"}}
    both = web.Refinements(base.model_copy(update={"options": options}), Workspace(tmp_path))
    assert both.config({}, web.PAINT).options["mask_source"] == {"resize": "true"}
    assert both.config({}, "sclip").options["mask_source"] == {"preset": "toy"}
    assert web.model_key(config.model_copy(update={"dtype": "fp32"})) != web.model_key(base)


def test_serve_has_every_refine_setting_and_warns_off_localhost(monkeypatch):
    from g4seg.cli import serve

    names = set(serve.serve_signature().parameters)
    assert names == {"host", "port", "max_upload_mb", *serve.SETTINGS}
    assert serve.check_host("127.0.0.1") is None and serve.check_host("::1") is None
    assert "warning: binding to 0.0.0.0" in serve.check_host("0.0.0.0")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1
    assert result.output.strip() == "g4seg: error: the web page needs gradio: pip install 'g4seg[web]'"


def test_settings_config_is_refine_s(tmp_path):
    from g4seg.cli.serve import SETTINGS, settings_config

    toml = tmp_path / "c.toml"
    toml.write_text('beta = 0.9\noffline = true\n[options.backbone]\nmodel = "x"\n')
    values = {name: None for name in SETTINGS} | {"offline": False, "compile": False, "offload": False,
                                                   "config": toml, "option": ["injector.alpha=3"], "cf": "0.1,0.5"}
    config = settings_config(values)
    assert (config.beta, config.offline, config.cf) == (0.9, True, (0.1, 0.5))
    assert config.options == {"backbone": {"model": "x"}, "injector": {"alpha": "3"}}


def test_toy_world_when_the_defaults_cannot_load(monkeypatch):
    from g4seg.web import defaults

    monkeypatch.setattr(defaults, "default_model_available", lambda config: False)
    config, note = defaults.starting_config(RefineConfig(beta=0.7))
    assert (config.backbone, config.extractor, config.beta) == ("toy", "toy-clip", 0.7) and "toy world" in note
    assert config.options == {"mask_source": {"preset": "toy"}}
    named = RefineConfig(backbone="sd15")
    assert defaults.starting_config(named) == (named, None)
    monkeypatch.setattr(defaults, "default_model_available", lambda config: True)
    assert defaults.starting_config(RefineConfig()) == (RefineConfig(), None)


def test_default_model_unavailable_offline_without_cache(monkeypatch, tmp_path):
    from g4seg.web import defaults

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert defaults.default_model_available(RefineConfig(offline=True)) is False


def test_sclip_mask_source_on_the_page_is_refine_s(tmp_path, monkeypatch):
    """The third way to a coarse mask: a mask source that needs no file (here SCLIP with the toy preset)."""
    workspace = Workspace(tmp_path)
    examples = toy_examples(workspace.root / "examples")
    options = {"mask_source": {"preset": "toy"}}
    refinements = web.Refinements(RefineConfig(backbone="toy", extractor="toy-clip", device="cpu",
                                               options=options), workspace)
    example = examples[0]
    result = refinements.run(web.PageInputs(str(example.image), example.classes, "sclip"))
    # the same server refines an uploaded mask too: SCLIP's preset is not given to the file source
    assert refinements.run(web.PageInputs(str(example.image), example.classes, web.UPLOAD, str(example.coarse)))
    code, output = _cli(["refine", example.image, "--classes", example.classes, "--mask-source", "sclip",
                         "-o", "mask_source.preset=toy", "--save-coarse", "--out", tmp_path / "cli", *TOY],
                        tmp_path, monkeypatch)
    assert code == 0, output
    assert result.files["labels"].read_bytes() == (tmp_path / "cli" / "scene.png").read_bytes()
    assert result.files["coarse"].read_bytes() == (tmp_path / "cli" / "coarse" / "scene.png").read_bytes()
    assert not list(result.files["labels"].parent.parent.glob("*_painted.png"))


def test_the_cli_starts_without_gradio():
    import subprocess
    import sys

    code = "import sys, g4seg.cli, g4seg.web.requests; assert 'gradio' not in sys.modules, 'gradio imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
