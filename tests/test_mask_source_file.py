"""The ``file`` mask source: every format against hand-made arrays, and every error as one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g4seg.errors import G4SegError
from g4seg.io import save_probs_npz, voc_palette
from g4seg.plugins import registry

HW = (4, 5)
LABELS = np.array([[0, 1, 1, 2, 2],
                   [0, 1, 1, 2, 2],
                   [0, 0, 255, 255, 0],
                   [2, 2, 0, 0, 1]], dtype=np.uint8)


def source(**options):
    return registry().get("mask_source", "file").build(options)


def load(path: Path, classes, hw=HW, **options):
    return source(**options).load(Path("image.jpg"), path, classes, hw)


def save_png(path: Path, array: np.ndarray, mode: str | None = None, palette: bool = False) -> Path:
    img = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    if palette:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(voc_palette())
    img.save(path)
    return path


def expected_from_labels(labels: np.ndarray, k: int) -> np.ndarray:
    return np.stack([(labels == i).astype(np.float32) for i in range(1, k + 1)])


@pytest.mark.parametrize("palette", [True, False], ids=["palette", "grey"])
def test_label_map_png(tmp_path, palette):
    mask = load(save_png(tmp_path / "m.png", LABELS, mode="P" if palette else "L", palette=palette), ["cat", "dog"])
    assert mask.probs.dtype == np.float32 and mask.probs.shape == (2, *HW)
    np.testing.assert_array_equal(mask.probs, expected_from_labels(LABELS, 2))
    np.testing.assert_array_equal(mask.ignore, LABELS == 255)


def test_palette_png_is_read_as_indices_not_colours(tmp_path):
    path = save_png(tmp_path / "m.png", LABELS, mode="P", palette=True)
    assert Image.open(path).mode == "P"  # colours (128, 0, 0) etc. in the file, indices in the mask
    np.testing.assert_array_equal(load(path, ["a", "b"]).probs[1], (LABELS == 2).astype(np.float32))


def test_label_map_without_ignore_has_none(tmp_path):
    labels = np.where(LABELS == 255, 0, LABELS).astype(np.uint8)
    assert load(save_png(tmp_path / "m.png", labels), ["a", "b"]).ignore is None


def test_label_map_with_unused_classes_gives_empty_maps(tmp_path):
    mask = load(save_png(tmp_path / "m.png", LABELS), ["a", "b", "c"])
    np.testing.assert_array_equal(mask.probs, expected_from_labels(LABELS, 3))
    assert mask.probs[2].sum() == 0


@pytest.mark.parametrize("on", [255, 1])
def test_binary_mask_png(tmp_path, on):
    binary = (LABELS == 1).astype(np.uint8) * on
    mask = load(save_png(tmp_path / "m.png", binary), ["cat"])
    np.testing.assert_array_equal(mask.probs, (LABELS == 1)[None].astype(np.float32))
    assert mask.ignore is None


def test_binary_mask_from_one_bit_png(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(LABELS == 2).convert("1").save(path)
    np.testing.assert_array_equal(load(path, ["dog"]).probs, (LABELS == 2)[None].astype(np.float32))


def test_forced_label_mode_reads_255_as_ignore(tmp_path):
    binary = (LABELS == 1).astype(np.uint8) * 255
    mask = load(save_png(tmp_path / "m.png", binary), ["cat"], mode="labels")
    assert mask.probs.sum() == 0
    np.testing.assert_array_equal(mask.ignore, binary == 255)


def test_grey_rgb_png_is_accepted_colour_is_not(tmp_path):
    grey = np.repeat(LABELS[..., None], 3, axis=2)
    np.testing.assert_array_equal(load(save_png(tmp_path / "g.png", grey), ["a", "b"]).probs,
                                  expected_from_labels(LABELS, 2))
    colour = grey.copy()
    colour[0, 0] = (10, 20, 30)
    with pytest.raises(G4SegError, match="c.png is a colour image"):
        load(save_png(tmp_path / "c.png", colour), ["a", "b"])


def test_sixteen_bit_label_png(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(LABELS.astype(np.uint16)).save(path)
    np.testing.assert_array_equal(load(path, ["a", "b"]).probs, expected_from_labels(LABELS, 2))


def probs_stack(k: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((k, *HW)).astype(np.float32)


def test_npy_stack_and_single_map(tmp_path):
    stack = probs_stack()
    np.save(tmp_path / "s.npy", stack)
    np.testing.assert_array_equal(load(tmp_path / "s.npy", ["a", "b", "c"]).probs, stack)
    np.save(tmp_path / "one.npy", stack[1].astype(np.float64))
    mask = load(tmp_path / "one.npy", ["b"])
    assert mask.probs.dtype == np.float32 and mask.probs.shape == (1, *HW)
    np.testing.assert_array_equal(mask.probs[0], stack[1])


def test_npz_without_classes_is_taken_in_order(tmp_path):
    stack = probs_stack(2)
    np.savez(tmp_path / "p.npz", probs=stack)
    np.testing.assert_array_equal(load(tmp_path / "p.npz", ["x", "y"]).probs, stack)


def test_npz_written_by_g4seg_is_realigned_to_the_requested_classes(tmp_path):
    stack = probs_stack(3)
    save_probs_npz(tmp_path / "out.npz", stack, ["cat", "dog", "person"])
    mask = load(tmp_path / "out.npz", ["person", "cat"])
    halves = stack.astype(np.float16).astype(np.float32)  # g4seg stores float16
    np.testing.assert_array_equal(mask.probs, halves[[2, 0]])


def test_a_stack_without_background_has_none(tmp_path):
    np.save(tmp_path / "s.npy", probs_stack(2))
    assert load(tmp_path / "s.npy", ["a", "b"]).background is None


@pytest.mark.parametrize("form", ["npy K+1", "npz K+1", "npz background entry", "npz named background",
                                  "npz named background, reordered"])
def test_background_channel_is_recognised(tmp_path, form):
    """K+1 maps: background first by count, by an npz 'background' entry, or by the stored names."""
    stack = probs_stack(3, seed=4)  # background, a, b
    path = tmp_path / ("m.npy" if form.startswith("npy") else "m.npz")
    classes = ["a", "b"]
    if form == "npy K+1":
        np.save(path, stack)
    elif form == "npz K+1":
        np.savez(path, probs=stack)
    elif form == "npz background entry":
        np.savez(path, probs=stack[1:], background=stack[0])
    elif form == "npz named background":
        np.savez(path, probs=stack, classes=np.array(["background", "a", "b"]))
    else:
        np.savez(path, probs=stack, classes=np.array(["background", "a", "b"]))
        classes = ["b", "a"]
    mask = load(path, classes)
    np.testing.assert_array_equal(mask.background, stack[0])
    np.testing.assert_array_equal(mask.probs, stack[[1 + ["a", "b"].index(c) for c in classes]])


def test_background_is_resized_with_the_classes(tmp_path):
    np.savez(tmp_path / "m.npz", probs=np.array([[[0.0, 1.0]]]), background=np.array([[1.0, 0.0]]))
    mask = load(tmp_path / "m.npz", ["a"], hw=(1, 4), resize=True)
    np.testing.assert_allclose(mask.probs[0, 0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(mask.background[0], [1.0, 0.75, 0.25, 0.0])


def test_resize_option_resamples_to_the_image(tmp_path):
    labels = np.array([[1, 0], [255, 2]], dtype=np.uint8)
    mask = load(save_png(tmp_path / "m.png", labels), ["a", "b"], hw=(4, 4), resize=True)
    np.testing.assert_array_equal(mask.probs[0], np.kron(labels == 1, np.ones((2, 2))))
    np.testing.assert_array_equal(mask.ignore, np.kron(labels == 255, np.ones((2, 2))).astype(bool))
    np.save(tmp_path / "soft.npy", np.array([[0.0, 1.0]], dtype=np.float32))
    soft = load(tmp_path / "soft.npy", ["a"], hw=(1, 4), resize=True)
    np.testing.assert_allclose(soft.probs[0, 0], [0.0, 0.25, 0.75, 1.0])  # bilinear, pixel centres


def error_cases(tmp_path: Path):
    """(mask path, classes, image size, options, expected message fragment) for every error."""
    labels = save_png(tmp_path / "labels.png", LABELS)
    np.save(tmp_path / "k3.npy", probs_stack(3))
    np.savez(tmp_path / "bg3d.npz", probs=probs_stack(1), background=probs_stack(2))
    np.savez(tmp_path / "bgsize.npz", probs=probs_stack(1), background=np.zeros((2, 2)))
    np.savez(tmp_path / "bghigh.npz", probs=probs_stack(1), background=np.full(HW, 2.0))
    np.save(tmp_path / "big.npy", probs_stack(2) * 2)
    nan = probs_stack(2)
    nan[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "neg.npy", probs_stack(2) - 0.5)
    np.save(tmp_path / "text.npy", np.array([["a"]]))
    np.save(tmp_path / "4d.npy", np.zeros((1, 2, *HW), dtype=np.float32))
    np.savez(tmp_path / "nokey.npz", scores=probs_stack(2))
    save_probs_npz(tmp_path / "named.npz", probs_stack(2), ["cat", "dog"])
    np.savez(tmp_path / "badnames.npz", probs=probs_stack(2), classes=np.array(["a", "b", "c"]))
    save_png(tmp_path / "grey.png", np.array([[0, 128]], dtype=np.uint8))
    save_png(tmp_path / "rgba.png", np.zeros((2, 2, 4), dtype=np.uint8) + np.array([1, 2, 3, 255], dtype=np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "k3.npy").read_bytes()[:100])
    return {
        "size mismatch": (labels, ["a", "b"], (5, 4), {}, r"labels.png is 4x5 \(HxW\) but the image is 5x4"),
        "value outside classes": (labels, ["a"], HW, {}, r"labels.png has values 2 outside the class list \(K=1"),
        "empty class list": (labels, [], HW, {}, "labels.png: the class list is empty"),
        "missing file": (tmp_path / "none.png", ["a"], HW, {}, "mask file not found: .*none.png"),
        "corrupt png": (tmp_path / "bad.png", ["a"], HW, {}, "cannot read mask .*bad.png"),
        "corrupt npy": (tmp_path / "bad.npy", ["a"], HW, {}, "cannot read mask .*bad.npy: not a .npy file"),
        "corrupt npz": (tmp_path / "bad.npz", ["a"], HW, {}, "cannot read mask .*bad.npz"),
        "truncated npy": (tmp_path / "cut.npy", ["a"], HW, {}, "cannot read mask .*cut.npy"),
        "above one": (tmp_path / "big.npy", ["a", "b"], HW, {}, r"big.npy has probabilities in \[.*\]; expected"),
        "below zero": (tmp_path / "neg.npy", ["a", "b"], HW, {}, r"neg.npy has probabilities in \[-"),
        "non-finite": (tmp_path / "nan.npy", ["a", "b"], HW, {}, "nan.npy has non-finite probabilities"),
        "wrong K": (tmp_path / "k3.npy", ["a"], HW, {},
                    r"k3.npy has 3 probability maps but 1 classes were given \(a\); expected 1 \(one per class\) "
                    r"or 2 \(background first\)"),
        "bad background": (tmp_path / "bg3d.npz", ["a"], HW, {}, r"bg3d.npz: the background entry has shape"),
        "background size": (tmp_path / "bgsize.npz", ["a"], HW, {}, r"bgsize.npz: the background map is 2x2"),
        "background above one": (tmp_path / "bghigh.npz", ["a"], HW, {}, r"bghigh.npz has background in \[2, 2\]"),
        "not numbers": (tmp_path / "text.npy", ["a"], HW, {}, "text.npy holds <U1 values"),
        "wrong rank": (tmp_path / "4d.npy", ["a"], HW, {}, r"4d.npy has shape \(1, 2, 4, 5\)"),
        "npz without probs": (tmp_path / "nokey.npz", ["a", "b"], HW, {}, "nokey.npz has no 'probs' .*scores"),
        "npz missing class": (tmp_path / "named.npz", ["cat", "horse"], HW, {}, "named.npz has no .* for horse"),
        "npz names mismatch": (tmp_path / "badnames.npz", ["a"], HW, {}, "badnames.npz has 2 .* but names"),
        "binary with K=2": (labels, ["a", "b"], HW, {"mode": "binary"}, "labels.png is a binary mask .* 2 classes"),
        "binary not 0/255": (tmp_path / "grey.png", ["a"], (1, 2), {"mode": "binary"}, "grey.png has values 0, 128"),
        "no mask": (None, ["a"], HW, {}, "needs a mask file for image image.jpg"),
        "colour rgba": (tmp_path / "rgba.png", ["a"], (2, 2), {}, "rgba.png is a colour image"),
    }


@pytest.mark.parametrize("case", [
    "size mismatch", "value outside classes", "empty class list", "missing file", "corrupt png", "corrupt npy",
    "corrupt npz", "truncated npy", "above one", "below zero", "non-finite", "wrong K", "not numbers", "wrong rank",
    "bad background", "background size", "background above one",
    "npz without probs", "npz missing class", "npz names mismatch", "binary with K=2", "binary not 0/255", "no mask",
    "colour rgba",
])
def test_errors_are_one_line_and_name_the_file(tmp_path, case):
    path, classes, hw, options, expected = error_cases(tmp_path)[case]
    with pytest.raises(G4SegError, match=expected) as info:
        load(path, classes, hw, **options)
    assert "\n" not in str(info.value)


def test_label_values_error_names_every_bad_value(tmp_path):
    labels = LABELS.copy()
    labels[3, 4] = 7
    with pytest.raises(G4SegError, match=r"has values 2, 7 outside the class list \(K=1"):
        load(save_png(tmp_path / "m.png", labels), ["a"])


def test_unknown_option_is_rejected():
    with pytest.raises(G4SegError, match="invalid options"):
        source(threshold=0.5)


@pytest.mark.parametrize("hw, resize, expected", [
    ((5, 4), False, r"is 4x5 \(HxW\) but the image is 5x4: the image's size transposed, so the mask looks rotated"),
    ((10, 8), True, r"the aspect ratio of the image transposed, so the mask looks rotated by 90 degrees; rotate it to "
                    r"match the image as displayed; -o mask_source.resize=true does not rotate masks"),
    ((4, 9), False, r"is 4x5 \(HxW\) but the image is 4x9; give a mask of the image's size \(-o "
                    r"mask_source.resize=true would stretch this one: its aspect ratio differs\)"),
    ((8, 10), False, r"give a mask of the image's size or set -o mask_source.resize=true to resample it"),
])
def test_size_hints_say_only_what_is_right(tmp_path, hw, resize, expected):
    """A rotated mask is never resized (that would stretch it); resize is offered only where it fits."""
    with pytest.raises(G4SegError, match=expected) as info:
        load(save_png(tmp_path / "m.png", LABELS), ["a", "b"], hw=hw, resize=resize)
    assert "\n" not in str(info.value)


def test_resize_keeps_working_for_the_same_aspect_up_to_rounding(tmp_path):
    labels = np.kron(LABELS, np.ones((2, 2), np.uint8))  # 8x10
    mask = load(save_png(tmp_path / "m.png", labels), ["a", "b"], hw=(4, 5), resize=True)
    np.testing.assert_array_equal(mask.probs, expected_from_labels(LABELS, 2))
    assert load(save_png(tmp_path / "odd.png", labels[:7]), ["a", "b"], hw=(4, 5), resize=True).probs.shape == (2, 4, 5)


def test_mask_images_are_read_as_displayed(tmp_path):
    """A mask PNG carrying EXIF orientation 6 is rotated clockwise, like the photo it belongs to."""
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.fromarray(LABELS, mode="P")
    img.putpalette(voc_palette())
    img.save(tmp_path / "m.png", exif=exif)
    rotated = np.rot90(LABELS, k=-1)
    mask = load(tmp_path / "m.png", ["a", "b"], hw=rotated.shape)
    np.testing.assert_array_equal(mask.probs, expected_from_labels(rotated, 2))


def test_check_raises_what_load_raises(tmp_path):
    path = save_png(tmp_path / "m.png", LABELS)
    assert source().check(Path("image.jpg"), path, ["a", "b"], HW) is None
    with pytest.raises(G4SegError, match="outside the class list"):
        source().check(Path("image.jpg"), path, ["a"], HW)
    assert "cheap-check" in registry().get("mask_source", "file").tags
