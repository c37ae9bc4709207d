"""Unit tests for :mod:`g4seg.io`, written for survivors of mutation testing (docs/testing.md).

Expected values are independent of the code: the PASCAL VOC colour map as published
(VOCdevkit ``VOCcode/labelcolormap.m``, quoted from memory: the first colours and the ignore colour are
well known: e.g. 12 dog (64, 0, 128), 15 person (192, 128, 128)), the overlay blend and the written files
read back with PIL, numpy and ``os.stat``.
"""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest
from PIL import Image

from g4seg import io
from g4seg.errors import G4SegError
from g4seg.fileid import FileId

# labelcolormap.m: label -> RGB
VOC = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 5: (128, 0, 128),
       6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 9: (192, 0, 0), 12: (64, 0, 128), 14: (64, 128, 128),
       15: (192, 128, 128), 16: (0, 64, 0), 20: (0, 64, 128), 255: (224, 224, 192)}


def test_voc_palette_is_the_published_colour_map():
    palette = io.voc_palette()
    assert len(palette) == 768
    for label, rgb in VOC.items():
        assert tuple(palette[3 * label:3 * label + 3]) == rgb, label
    assert len({tuple(palette[i:i + 3]) for i in range(0, 768, 3)}) == 256  # every label its own colour


def test_header_orientation():
    header = io.ImageHeader((4, 6), 1, "RGB", "PNG")
    assert header.hw == (4, 6) and not header.transposed
    for orientation in (2, 3, 4):
        assert io.ImageHeader((4, 6), orientation, "RGB", "PNG").hw == (4, 6)
    for orientation in (5, 6, 7, 8):
        header = io.ImageHeader((4, 6), orientation, "RGB", "PNG")
        assert header.transposed and header.hw == (6, 4)


def test_open_errors_are_one_line(tmp_path):
    missing = tmp_path / "missing.png"
    assert str(io.open_error(missing, "mask", FileNotFoundError())) == f"mask not found: {missing}"
    link = tmp_path / "link.png"
    link.symlink_to(missing)
    assert io.dangling_link(link) == f"{link} is a dangling symbolic link (to {missing})"
    assert str(io.open_error(link, "image", FileNotFoundError())) == f"image {link} is a dangling symbolic link " \
                                                                     f"(to {missing})"
    assert str(io.open_error(tmp_path, "image", IsADirectoryError())) == f"image {tmp_path} is a folder, not a file"
    assert str(io.open_error(missing, "image", OSError("broken data\nsecond line"))) == \
        f"cannot read image {missing}: broken data"
    assert str(io.open_error(missing, "image", ValueError(""))) == f"cannot read image {missing}: ValueError"
    assert io.dangling_link(tmp_path) is None and io.dangling_link(missing) is None


def test_header_of_an_exif_rotated_jpeg(tmp_path):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[io.EXIF_ORIENTATION] = 6
    Image.new("RGB", (6, 4)).save(path, exif=exif)
    header = io.read_image_header(path)
    assert (header.stored_hw, header.orientation, header.hw, header.mode, header.format) == \
        ((4, 6), 6, (6, 4), "RGB", "JPEG")
    for invalid in (0, 9):  # not an orientation: taken as stored
        exif[io.EXIF_ORIENTATION] = invalid
        Image.new("RGB", (6, 4)).save(path, exif=exif)
        assert io.read_image_header(path).orientation == 1
    Image.new("RGB", (6, 4)).save(tmp_path / "plain.png")  # no EXIF at all
    assert io.read_image_header(tmp_path / "plain.png").orientation == 1
    path.write_bytes(b"not an image")
    with pytest.raises(G4SegError, match="^cannot read image "):
        io.read_image_header(path)


def test_sixteen_bit_grey_is_its_high_byte(tmp_path):
    values = np.array([[0, 255, 256], [4095, 65280, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    loaded = io.load_image(path)
    assert loaded.shape == (2, 3, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded[..., 0], [[0, 0, 1], [15, 255, 255]])
    assert (loaded == loaded[..., :1]).all()


def test_thirty_two_bit_range_is_exactly_sixteen_bits(tmp_path):
    """Mode I values 0..65535 are taken as 16-bit; one past either end is an error (65536 >> 8 would wrap to 0)."""
    Image.fromarray(np.array([[65535]], dtype=np.int32), mode="I").save(tmp_path / "top.tif")
    assert io.load_image(tmp_path / "top.tif")[0, 0, 0] == 255
    for value in (65536, -1):
        Image.fromarray(np.array([[0, value]], dtype=np.int32), mode="I").save(tmp_path / "out.tif")
        with pytest.raises(G4SegError, match=rf"out.tif has 32-bit values in \[{min(0, value)}, {max(0, value)}\]"):
            io.load_image(tmp_path / "out.tif")


def test_grey_and_palette_images_load_as_rgb(tmp_path):
    grey = np.array([[0, 128], [200, 255]], dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(io.load_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=2))
    labels = Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8), mode="P")
    labels.putpalette(io.voc_palette())
    labels.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(io.load_image(tmp_path / "palette.png"),
                                  [[VOC[0], VOC[1]], [VOC[2], VOC[255]]])


def test_umask_is_read_without_changing_it_where_linux_shows_it(monkeypatch):
    """/proc/self/status has the umask: read there, os.umask (process-wide, racy with threads) is not called;
    without /proc it is set and put back."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    umask = os.umask(0)
    os.umask(umask)

    def no_umask(*args):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(io.os, "umask", no_umask)
    assert io._process_umask() == umask
    monkeypatch.undo()

    def no_proc(*args, **kwargs):
        raise FileNotFoundError(args[0])

    monkeypatch.setattr(io, "open", no_proc, raising=False)  # the module's name lookup finds it before builtins
    assert io._process_umask() == umask
    assert os.umask(umask) == umask  # put back as it was


def test_atomic_write_mode_identity_and_cleanup(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "a.bin"
    written = io.atomic_write_bytes(path, b"payload")
    info = os.stat(path)
    assert path.read_bytes() == b"payload"
    assert written == FileId(7, info.st_mtime_ns, hashlib.sha256(b"payload").hexdigest())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(info.st_mode) == io.FILE_MODE == 0o666 & ~umask
    assert io._process_umask() == umask

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_bytes(path, b"other")
    assert path.read_bytes() == b"payload"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]  # no temporary file left


def test_atomic_write_goes_through_a_temporary_the_runner_recognises(tmp_path, monkeypatch):
    """The temporary sits in the target's folder (so the rename is atomic), missing parent folders are made,
    and its name is the one g4seg.runner's stale-temporary cleanup matches (``_TEMP_NAME``) for that target."""
    from g4seg.runner import _TEMP_NAME

    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    path = tmp_path / "a" / "b" / "out.png"
    io.atomic_write_bytes(path, b"x")
    (src, dst), = renames
    assert dst == path and os.path.dirname(src) == str(path.parent)
    match = _TEMP_NAME.match(os.path.basename(src))
    assert match and match.group("target") == "out.png"


def test_written_outputs_read_back(tmp_path):
    labels = np.array([[0, 1, 2], [255, 3, 1]], dtype=np.int64)
    io.save_label_png(tmp_path / "l.png", labels)
    with Image.open(tmp_path / "l.png") as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.array(img), labels)
        assert img.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    probs = np.array([[[0.25, 0.5]], [[1.0, 0.0]]], dtype=np.float32)
    io.save_probs_npz(tmp_path / "p.npz", probs, ["cat", "dog"])
    with np.load(tmp_path / "p.npz") as data:
        assert sorted(data.files) == ["classes", "probs"]
        assert data["probs"].dtype == np.float16 and data["classes"].tolist() == ["cat", "dog"]
        np.testing.assert_array_equal(data["probs"], probs)
    io.save_probs_npz(tmp_path / "b.npz", probs, ["cat", "dog"], background=np.array([[0.75, 0.125]]))
    with np.load(tmp_path / "b.npz") as data:
        assert data["background"].dtype == np.float16
        np.testing.assert_array_equal(data["background"], [[0.75, 0.125]])
    rgb = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    io.save_rgb_png(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "rgb.png")), rgb)


def test_overlay_blends_label_colours():
    image = np.full((1, 4, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1, 255, 2]])
    out = io.overlay(image, labels, alpha=0.25)
    # label 1 is (128, 0, 0), label 2 (0, 128, 0): 0.75 * 100 + 0.25 * colour, rounded
    np.testing.assert_array_equal(out[0], [[100, 100, 100], [107, 75, 75], [100, 100, 100], [75, 107, 75]])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(io.overlay(image, labels)[0, 1], [114, 50, 50])  # default alpha 0.5
