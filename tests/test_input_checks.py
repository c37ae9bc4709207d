"""Inputs as viewers show them, and every cheap check before any model loads, on real files.

- images: EXIF orientation applied, 16-bit scaled by the high byte, dangling links named;
- masks: case-insensitive lookup by stem, hints that say only what is right for rotated masks;
- ``g4seg refine`` checks settings, class names, images, masks and ``--out`` before it builds a
  model (proved by a Refiner.from_config that raises), lists invalid items of a folder in one
  summary and refines the others, and never prints a traceback unless ``--debug`` asks for it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg import checks, io
from g4seg.cli import app
from g4seg.config import load_config
from g4seg.errors import G4SegError
from g4seg.plugins import registry
from g4seg.runner import find_mask, mask_index

runner = CliRunner()
MODEL_LOADED = "the model was loaded"


@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to build a model fails loudly: the checks under test must come first."""
    from g4seg.refiner import Refiner

    def refuse(*args, **kwargs):
        raise AssertionError(MODEL_LOADED)

    monkeypatch.setattr(Refiner, "from_config", classmethod(refuse))


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("g4seg: error:")]


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric RGB picture (JPEG-friendly): its orientation is visible in every corner."""
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, 3)
    return np.stack([base[0] + 50 * yy / h, base[1] + 50 * xx / w, base[2] + 25 * (yy + xx) / (h + w)],
                    axis=-1).round().astype(np.uint8)


def _labels(h: int, w: int) -> np.ndarray:
    labels = np.zeros((h, w), np.uint8)
    labels[h // 4: 3 * h // 4, w // 5: 3 * w // 5] = 1
    return labels


def _save_mask(path: Path, labels: np.ndarray) -> Path:
    img = Image.fromarray(labels, mode="P")
    img.putpalette(io.voc_palette())
    img.save(path)
    return path


def _save_exif(path: Path, pixels: np.ndarray, orientation: int, **kwargs) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, **kwargs)
    return path


def _png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit RGB PNG written byte by byte (PIL cannot write one)."""
    h, w, c = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


# ----- images as viewers show them --------------------------------------------------------------------


@pytest.mark.parametrize("orientation, turn", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    """Orientation 6 = rotate 90 degrees clockwise for display, 8 = counter-clockwise, 3 = 180 degrees."""
    stored = _picture(6, 10)
    path = _save_exif(tmp_path / "photo.png", stored, orientation)  # PNG: lossless, pixels comparable
    np.testing.assert_array_equal(io.load_image(path), np.rot90(stored, k=turn))
    header = io.read_image_header(path)
    assert header.stored_hw == (6, 10) and header.orientation == orientation
    assert header.hw == np.rot90(stored, k=turn).shape[:2]


def test_exif_rotated_jpeg_header_and_pixels(tmp_path):
    stored = _picture(24, 40)
    path = _save_exif(tmp_path / "photo.jpg", stored, 6, quality=98)
    header = io.read_image_header(path)
    assert (header.stored_hw, header.hw, header.transposed) == ((24, 40), (40, 24), True)
    loaded = io.load_image(path)
    assert loaded.shape == (40, 24, 3)
    assert np.abs(loaded.astype(int) - np.rot90(stored, k=-1)).mean() < 3  # JPEG is lossy, the layout is not


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 1000], [32767, 32768, 65280, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.array([[0, 0, 1, 3], [127, 128, 255, 255]], dtype=np.uint8)  # the high byte, by hand
    loaded = io.load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (2, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], expected)


def test_sixteen_bit_colour_png_reads_like_the_grey_one(tmp_path):
    values = np.random.default_rng(1).integers(0, 65536, (3, 5, 3)).astype(np.uint16)
    loaded = io.load_image(_png16(tmp_path / "rgb16.png", values))
    np.testing.assert_array_equal(loaded, (values // 256).astype(np.uint8))


def test_thirty_two_bit_and_float_images(tmp_path):
    values = np.array([[0, 4095, 65535]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i32.tif")
    np.testing.assert_array_equal(io.load_image(tmp_path / "i32.tif")[..., 0], [[0, 15, 255]])
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I").save(tmp_path / "big.tif")
    with pytest.raises(G4SegError, match=r"big.tif has 32-bit values in \[0, 70000\]"):
        io.load_image(tmp_path / "big.tif")
    Image.fromarray(np.zeros((2, 2), np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(G4SegError, match="float.tif has floating-point pixels"):
        io.load_image(tmp_path / "float.tif")


def test_dangling_links_and_folders_are_named(tmp_path):
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    for read in (io.load_image, io.read_image_header):
        with pytest.raises(G4SegError, match=r"image .*link.jpg is a dangling symbolic link \(to .*gone.jpg\)"):
            read(tmp_path / "link.jpg")
    with pytest.raises(G4SegError, match="is a folder"):
        io.load_image(tmp_path)


# ----- masks --------------------------------------------------------------------------------------


def test_mask_lookup_ignores_case(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "Other.NPY").write_bytes(b"")
    assert find_mask(tmp_path, "IMG") == tmp_path / "img.png"
    assert find_mask(tmp_path, "other") == tmp_path / "Other.NPY"
    assert find_mask(tmp_path, "img", mask_index(tmp_path)) == tmp_path / "img.png"
    assert find_mask(tmp_path, "nothing") is None


def test_exact_name_wins_and_case_twins_are_one_line(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "IMG.png").write_bytes(b"")
    assert find_mask(tmp_path, "img") == tmp_path / "img.png"  # named exactly like the image
    with pytest.raises(G4SegError, match=r"masks IMG.png, img.png in .* all match image 'Img' when case is ignored"):
        find_mask(tmp_path, "Img")


def test_dangling_mask_link_is_found_and_named(tmp_path):
    (tmp_path / "img.png").symlink_to(tmp_path / "elsewhere.png")
    assert find_mask(tmp_path, "img") == tmp_path / "img.png"
    source = registry().get("mask_source", "file").build({})
    with pytest.raises(G4SegError, match=r"mask .*img.png is a dangling symbolic link \(to .*elsewhere.png\)"):
        source.load(tmp_path / "img.jpg", tmp_path / "img.png", ["cat"], (4, 5))


# ----- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"prompt": "a {x} of {}"}, r"has the format field\(s\) \{x\}"),
    ({"prompt": "{} and {}"}, r"exactly one '\{\}'.* has 2"),
    ({"prompt": "a photo of {:>9}"}, r"\{:>9\}"),
    ({"prompt": "a {photo of {}"}, "not a valid template"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"seed": 2**64}, "seed: Input should be less than"),
    ({"resolution": 500}, "resolution must be a multiple of 64.*got 500; use 448 or 512"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(G4SegError, match=message) as info:
        load_config(None, **settings)
    assert "\n" not in str(info.value)


def test_good_settings_pass():
    cfg = load_config(None, prompt="a {{nice}} photo of {}", seed=2**64 - 1, resolution=768)
    assert cfg.prompt.format("cat") == "a {nice} photo of cat"


@pytest.mark.parametrize("names, prompt, message", [
    (["cat", "dog", "cat"], "a photo of {}", "'cat' is given twice"),
    (["Cat", "cat"], "a photo of {}", "as 'Cat' and 'cat' .*ignores case"),
    (["cat", " "], "a photo of {}", "class name 2 of 2 is empty"),
    (["cat", "very " * 80], "a photo of {}", r"is too long: .* is 85 CLIP tokens with BOS/EOS, .* at most 77"),
    (["cat"], "a photo of {}s", "does not occur as whole tokens"),
])
def test_class_names_are_checked_without_a_model(names, prompt, message):
    with pytest.raises(G4SegError, match=message) as info:
        checks.check_class_names(names, prompt)
    assert "\n" not in str(info.value)


def test_the_token_limit_is_exact():
    """The prompt filled with the name may use all 77 positions, BOS and EOS included, and not one more."""
    assert checks.clip_tokens("a photo of potted plant") == [320, 1125, 539, 48581, 3912]  # CLIP's own ids
    fits = "cat " * 71  # 'a photo of' (3) + 71 + BOS + EOS = 76
    checks.check_class_names([fits + "cat"], "a photo of {}")
    with pytest.raises(G4SegError, match="78 CLIP tokens"):
        checks.check_class_names([fits + "cat cat"], "a photo of {}")


def test_devices_this_torch_lacks_are_one_line():
    from g4seg.runtime import resolve_runtime

    for device in ("mps", "meta"):
        with pytest.raises(G4SegError, match=f"device '{device}' is not available with this torch"):
            resolve_runtime(device)


def test_output_folder_checks_write_nothing(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(G4SegError, match="--out .*file is a file, not a folder"):
        checks.check_output_folder(tmp_path / "file")
    with pytest.raises(G4SegError, match="cannot create --out .*file/sub/out: .*file is a file, not a folder"):
        checks.check_output_folder(tmp_path / "file" / "sub" / "out")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(G4SegError, match=r"--out .*link is a dangling symbolic link \(to .*gone\)"):
        checks.check_output_folder(tmp_path / "link")
    checks.check_output_folder(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # a resume with nothing to do writes nothing, so checks do not either
    # tests run as root, whom permission bits do not stop: a read-only parent is simulated
    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)
    with pytest.raises(G4SegError, match=f"cannot create --out {tmp_path / 'new'}: {tmp_path} is not writable"):
        checks.check_output_folder(tmp_path / "new")


# ----- g4seg refine: everything cheap before any model --------------------------------------------


def _one_image(tmp_path: Path) -> tuple[Path, Path]:
    Image.fromarray(_picture(40, 48)).save(tmp_path / "img.jpg")
    return tmp_path / "img.jpg", _save_mask(tmp_path / "mask.png", _labels(40, 48))


PRECHECK_CASES = {
    "duplicate class": (["--classes", "cat,cat"], "class name 'cat' is given twice"),
    "empty class": (["--classes", "cat,,dog"], "--classes 'cat,,dog': name 2 of 3 is empty"),
    "class name too long": (["--classes", "very " * 80], "CLIP tokens with BOS/EOS"),
    "prompt field": (["--prompt", "a {x} of {}"], r"has the format field(s) {x}"),
    "prompt twice": (["--prompt", "{} {}"], "exactly one '{}'"),
    "negative seed": (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    "resolution": (["--resolution", "100"], "use 64 or 128"),
    "mps": (["--device", "mps"], "device 'mps' is not available"),
    "unknown backbone": (["--backbone", "sd99"], "unknown backbone 'sd99'"),
    "bad injector option": (["-o", "injector.no_such_option=2"], "invalid options"),
    "lcm with guidance": (["--backbone", "lcm", "--guidance-scale", "2"], "has no classifier-free guidance"),
    "out is a file": (["--out", "FILE"], "--out FILE is a file, not a folder"),
    "out under a file": (["--out", "FILE/out"], "cannot create --out FILE/out: FILE is a file"),
    # /proc refuses even root: the run finds out when it creates or locks the folder, before any model
    "out not writable": (["--out", "/proc/self"], "output folder /proc/self"),
    "out not creatable": (["--out", "/proc/g4seg-out"], "output folder /proc/g4seg-out"),
    "config is a folder": (["--config", "DIR"], "config file DIR is a folder"),
    "config is binary": (["--config", "BINARY"], "is not a text (TOML) file"),
    "corrupt image": (["IMAGE", b"not a jpeg"], "cannot read image"),
    "dangling image": (["IMAGE", "dangling"], "input IMG is a dangling symbolic link"),
    "mask values": (["--classes", "cat", "MASK", 7], "has values 7 outside the class list"),
    "mask size": (["MASK", (20, 24)], "give a mask of the image's size or set -o mask_source.resize=true"),
    "rotated mask": (["MASK", (48, 40)], "the image's size transposed, so the mask looks rotated"),
    "dangling mask": (["MASK", "dangling"], "mask MASK is a dangling symbolic link"),
}


@pytest.mark.parametrize("case", list(PRECHECK_CASES))
def test_every_check_comes_before_any_model(tmp_path, no_models, case):
    image, mask = _one_image(tmp_path)
    extra, message = PRECHECK_CASES[case]
    options = {"--classes": "cat,dog", "--out": str(tmp_path / "out"), "--device": "cpu"}
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "BINARY").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "DIR").mkdir()
    if extra[0] == "IMAGE":
        if extra[1] == "dangling":
            image = tmp_path / "IMG.jpg"
            image.symlink_to(tmp_path / "gone.jpg")
        else:
            image.write_bytes(extra[1])
        extra = []
    elif "MASK" in extra:
        at = extra.index("MASK")
        what, extra = extra[at + 1], extra[:at]
        if what == "dangling":
            mask.unlink()
            mask.symlink_to(tmp_path / "gone.png")
        elif isinstance(what, tuple):
            _save_mask(mask, _labels(*what))
        else:
            labels = _labels(40, 48)
            labels[0, 0] = what
            _save_mask(mask, labels)
    replace = {"FILE": str(tmp_path / "FILE"), "DIR": str(tmp_path / "DIR"), "BINARY": str(tmp_path / "BINARY"),
               "MASK": str(mask), "IMG": str(image)}
    for flag, value in zip(extra[::2], extra[1::2]):
        for name in ("FILE", "DIR", "BINARY"):
            value = value.replace(name, replace[name]) if value.startswith(name) else value
        options[flag] = value
    args = [a for pair in options.items() for a in pair]
    result = _invoke("refine", image, "--mask", mask, "--no-progress", *args)
    assert result.exit_code == 1, result.output
    for name, value in replace.items():
        message = message.replace(name, value)
    errors = _error_lines(result)
    assert len(errors) == 1 and message in errors[0], result.output
    assert MODEL_LOADED not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_input_errors_come_before_a_missing_model(tmp_path):
    """With a real (non-existent) model path, the input error is the one reported, not the model's."""
    image, mask = _one_image(tmp_path)
    result = _invoke("refine", image, "--mask", mask, "--classes", "cat,cat", "--out", tmp_path / "out",
                     "--device", "cpu", "-o", f"backbone.model=local-dir:{tmp_path / 'no-such-model'}")
    assert result.exit_code == 1 and _error_lines(result) == [
        "g4seg: error: class name 'cat' is given twice; class names must be unique"]


def test_rotated_exif_photo_with_a_displayed_size_mask_is_refined(tmp_path, config_file):
    """A photo stored 40x48 with orientation 6 is 48x40 as displayed; masks and outputs follow the display."""
    image = _save_exif(tmp_path / "photo.jpg", _picture(40, 48), 6, quality=95)
    mask = _save_mask(tmp_path / "mask.png", _labels(48, 40))
    out = tmp_path / "out"
    result = _invoke("refine", image, "--mask", mask, "--classes", "cat", "--out", out, "--config", config_file,
                     "--no-progress", "--beta", "1")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.array(Image.open(out / "photo.png")), _labels(48, 40))


def test_a_stored_size_mask_of_a_rotated_photo_gets_the_exif_hint(tmp_path, no_models):
    image = _save_exif(tmp_path / "photo.jpg", _picture(40, 48), 6)
    mask = _save_mask(tmp_path / "mask.png", _labels(40, 48))
    result = _invoke("refine", image, "--mask", mask, "--classes", "cat", "--out", tmp_path / "out",
                     "--device", "cpu", "-o", "mask_source.resize=true")
    errors = _error_lines(result)
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert (f"mask {mask} is 40x48 (HxW) but the image is 48x40: the mask fits {image} as stored, but that image "
            f"has EXIF orientation 6 and is read as viewers show it (rotated, 48x40); rotate the mask the same way"
            in errors[0])
    assert "mask_source.resize=true does not rotate masks" in errors[0]


def test_sixteen_bit_image_through_refine(tmp_path, config_file):
    """The overlay keeps background pixels untouched, so it shows the image as read: the high bytes."""
    yy, xx = np.mgrid[:40, :48]
    values = (yy * 1200 + xx * 300 + 77).astype(np.uint16)  # up to 61277: 8-bit clipping would be all 255
    Image.fromarray(values).save(tmp_path / "deep.png")
    mask = _save_mask(tmp_path / "mask.png", _labels(40, 48))
    out = tmp_path / "out"
    result = _invoke("refine", tmp_path / "deep.png", "--mask", mask, "--classes", "cat", "--out", out,
                     "--config", config_file, "--no-progress", "--save-overlay", "--beta", "1")
    assert result.exit_code == 0, result.output
    background = np.array(Image.open(out / "deep.png")) == 0
    overlay = np.array(Image.open(out / "overlay" / "deep.png"))
    assert background.sum() > 1000
    np.testing.assert_array_equal(overlay[background], np.repeat((values[background] // 256)[:, None], 3, 1))


def test_folder_with_one_invalid_image(tmp_path, config_file, monkeypatch):
    """3 images, 1 invalid: one summary (count line + one line), the 2 valid ones are refined, exit 1.

    Images are named in capitals and masks in lower case: the lookup ignores case.
    """
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for n, stem in enumerate(("A", "B", "C")):
        Image.fromarray(_picture(40, 48, seed=n)).save(images / f"{stem}.JPG")
        _save_mask(masks / f"{stem.lower()}.png", _labels(40, 48) * (2 if stem == "B" else 1))
    out = tmp_path / "out"
    result = _invoke("refine", images, "--mask", masks, "--classes", "cat", "--out", out, "--config", config_file,
                     "--no-progress")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    at = lines.index("g4seg: 1 of 3 inputs are invalid and are not refined (the run goes on without them and exits "
                     "with status 1):")
    assert lines[at + 1].startswith(f"  B: mask {masks / 'b.png'} has values 2 outside the class list")
    assert sum(line.startswith("  ") for line in lines) == 1 and not _error_lines(result)
    assert "done 2, skipped 0, failed 0" in result.output and "invalid 1 (not refined; listed above)" in result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["A.png", "C.png"]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["mask"] for e in manifest] == [str(masks / "a.png"), str(masks / "c.png")]


def test_folder_with_a_dangling_image_and_fail_fast(tmp_path, no_models):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    Image.fromarray(_picture(40, 48)).save(images / "a.jpg")
    (images / "b.jpg").symlink_to(tmp_path / "gone.jpg")
    for stem in ("a", "b"):
        _save_mask(masks / f"{stem}.png", _labels(40, 48))
    args = ["refine", images, "--mask", masks, "--classes", "cat", "--out", tmp_path / "out", "--device", "cpu",
            "--no-progress"]
    listed = _invoke(*args)  # the valid image goes on to the (refused) model
    assert f"  b: image {images / 'b.jpg'} is a dangling symbolic link (to {tmp_path / 'gone.jpg'})" in listed.output
    assert "g4seg: 1 of 2 inputs are invalid" in listed.output and MODEL_LOADED in listed.output
    stopped = _invoke(*args, "--fail-fast")
    assert stopped.exit_code == 1 and MODEL_LOADED not in stopped.output
    assert _error_lines(stopped) == [f"g4seg: error: image {images / 'b.jpg'} is a dangling symbolic link "
                                     f"(to {tmp_path / 'gone.jpg'})"]


def test_dataset_without_a_coarse_mask_lists_it(tmp_path, no_models):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_ablation import IDS, make_voc

    voc, coarse = make_voc(tmp_path)
    (coarse / f"{IDS[0]}.png").unlink()
    result = _invoke("refine", "--dataset", "voc12", "--root", voc, "--split", "val", "--coarse", coarse,
                     "--out", tmp_path / "out", "--device", "cpu", "--fail-fast")
    assert result.exit_code == 1 and MODEL_LOADED not in result.output
    assert _error_lines(result) == [f"g4seg: error: no coarse mask for '{IDS[0]}' in {coarse} (looked for "
                                    f"{IDS[0]}.png/.npz/.npy, ignoring case)"]


# ----- no tracebacks ------------------------------------------------------------------------------


class _Exploding:
    def refine(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory\nsecond line")


@pytest.mark.parametrize("debug", [False, True])
def test_fail_fast_with_an_unexpected_error(tmp_path, monkeypatch, debug):
    from g4seg.refiner import Refiner

    monkeypatch.setattr(Refiner, "from_config", classmethod(lambda cls, *a, **k: _Exploding()))
    image, mask = _one_image(tmp_path)
    result = _invoke(*(["--debug"] if debug else []), "refine", image, "--mask", mask, "--classes", "cat",
                     "--out", tmp_path / "out", "--device", "cpu", "--no-progress", "--fail-fast")
    assert result.exit_code == 1
    if debug:
        assert "Traceback" in result.output and "RuntimeError: CUDA out of memory" in result.output
    else:
        assert "Traceback" not in result.output
        assert _error_lines(result) == ["g4seg: error: RuntimeError: CUDA out of memory (rerun with --debug for the "
                                        "traceback)"]


def test_eval_json_is_a_folder(tmp_path):
    result = _invoke("eval", tmp_path, "--dataset", "voc12", "--root", tmp_path, "--json", tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert _error_lines(result) == [f"g4seg: error: --json {tmp_path} is a folder; give a file name (e.g. "
                                    f"{tmp_path / 'scores.json'})"]
    (tmp_path / "file").write_text("x")
    under = _invoke("eval", tmp_path, "--dataset", "voc12", "--root", tmp_path, "--json", tmp_path / "file" / "s.json")
    assert under.exit_code == 1 and len(_error_lines(under)) == 1 and "is a file, not a folder" in under.output


def test_config_file_errors(tmp_path):
    (tmp_path / "bin.toml").write_bytes(os.urandom(64) + b"\xff")
    for path, message in ((tmp_path, "is a folder"), (tmp_path / "bin.toml", r"is not a text \(TOML\) file")):
        with pytest.raises(G4SegError, match=message):
            load_config(path)
