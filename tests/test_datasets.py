"""Dataset plugins on tiny synthetic copies of each layout: ids, paths, label conventions, layout checks."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g4seg.datasets import read_class_file, read_index_png
from g4seg.errors import G4SegError
from g4seg.io import save_label_png, voc_palette
from g4seg.plugins import registry


def build(name, root, split="val"):
    return registry().get("dataset", name).build({"root": root, "split": split})


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def write_grey(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def label_map(value: int, border: int = 255) -> np.ndarray:
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = value
    labels[1, 1:7] = border
    return labels


def make_voc(root: Path, ids=("2007_000033", "2007_000042"), split_name="val.txt", aug_name="aug.txt"):
    """VOC2012 layout: palette labels in SegmentationClass, grey ones in SegmentationClassAug."""
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / split_name).write_text("\n".join(reversed(ids)) + "\n")
    (sets / aug_name).write_text("\n".join(ids) + "\n")
    for k, i in enumerate(ids):
        write_image(root / "JPEGImages" / f"{i}.jpg", k)
        save_label_png(root / "SegmentationClass" / f"{i}.png", label_map(15 + k))
        write_grey(root / "SegmentationClassAug" / f"{i}.png", label_map(3 + k))
    return root


def make_context(root: Path, ids=("2008_000002", "2008_000003")):
    sets = root / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("\n".join(ids) + "\n")
    for k, i in enumerate(ids):
        write_image(root / "JPEGImages" / f"{i}.jpg", k)
        labels = label_map(59 - k, border=0)
        labels[7, :] = 1
        write_grey(root / "SegmentationClassContext" / f"{i}.png", labels)
    return root


def make_coco(root: Path, ids=("000000000285", "000000000139")):
    for k, i in enumerate(ids):
        write_image(root / "images" / "val2017" / f"{i}.jpg", k)
        write_grey(root / "annotations" / "val2017" / f"{i}_instanceTrainIds.png", label_map(80 - k, border=0))
    (root / "images" / "val2017" / "notes.txt").write_text("not an image")
    return root


def test_class_files_match_the_datasets():
    for name, count in (("voc12", 20), ("context60", 59), ("context59", 59), ("coco-object", 80)):
        data = build(name, "/nonexistent")
        assert len(data.classes) == count and len(set(data.classes)) == count
        assert [s[0] for s in data.synonyms] == data.classes
    voc = build("voc12", "/nonexistent")
    assert voc.classes[0] == "aeroplane" and voc.classes[14] == "person" and voc.classes[19] == "tv monitor"
    assert "tvmonitor" in voc.synonyms[19] and "pottedplant" in voc.synonyms[15]
    assert voc.metric_classes[0] == "background" and len(voc.metric_classes) == 21
    coco = build("coco-object", "/nonexistent")
    assert coco.classes[0] == "person" and coco.classes[-1] == "toothbrush" and coco.classes[61] == "toilet"
    assert len(coco.metric_classes) == 81
    assert len(build("context60", "/x").metric_classes) == 60 and len(build("context59", "/x").metric_classes) == 59
    assert read_class_file("voc12.txt")[3] == ["boat", "ship"]


def test_aliases_and_split_validation():
    assert registry().get("dataset", "voc").name == "voc12"
    assert registry().get("dataset", "pc59").name == "context59"
    with pytest.raises(G4SegError, match="split"):
        build("voc12", "/x", split="test")
    with pytest.raises(G4SegError, match="split"):
        build("coco-object", "/x", split="train_aug")
    with pytest.raises(G4SegError, match="root"):
        registry().get("dataset", "voc12").build({"split": "val"})
    with pytest.raises(G4SegError, match="colour"):
        registry().get("dataset", "voc12").build({"root": "/x", "colour": "red"})


def test_voc_val_ids_paths_and_palette_labels(tmp_path):
    root = make_voc(tmp_path)
    data = build("voc12", root)
    data.check()
    assert data.ids() == ["2007_000033", "2007_000042"]  # sorted, although val.txt lists them reversed
    assert data.image_path("2007_000033") == root / "JPEGImages" / "2007_000033.jpg"
    assert data.label_path("2007_000042") == root / "SegmentationClass" / "2007_000042.png"
    labels = data.load_label("2007_000042")
    assert labels.dtype == np.uint8 and labels.shape == (8, 8)
    assert np.array_equal(labels, label_map(16))  # the palette index, not a colour
    rgb = np.asarray(Image.open(data.label_path("2007_000042")).convert("RGB"))
    assert tuple(rgb[3, 3]) == tuple(voc_palette()[16 * 3:16 * 3 + 3])
    assert data.image_labels("2007_000042") == [16]
    assert data.load_image("2007_000033").shape == (8, 8, 3)


def test_voc_train_aug_reads_the_aug_list_and_grey_labels(tmp_path):
    root = make_voc(tmp_path, aug_name="train_aug.txt")
    data = build("voc12", root, split="train_aug")
    data.check()
    assert data.ids() == ["2007_000033", "2007_000042"]
    assert data.label_path("2007_000033").parent.name == "SegmentationClassAug"
    assert np.array_equal(data.load_label("2007_000033"), label_map(3))


def test_check_lists_everything_missing_in_one_message(tmp_path):
    ids = [f"img{k}" for k in range(8)]
    root = make_voc(tmp_path, ids=ids)
    for k in range(6):
        (root / "JPEGImages" / f"img{k}.jpg").unlink()
    (root / "SegmentationClass" / "img7.png").unlink()
    with pytest.raises(G4SegError) as info:
        build("voc12", root).check()
    message = str(info.value)
    assert "\n" not in message
    assert "6 of 8 images missing" in message and "img0.jpg" in message and "img4.jpg" in message
    assert "img5.jpg" not in message and "..." in message  # the first few names only
    assert "1 of 8 labels missing" in message and "img7.png" in message
    assert "voc12" in message and "val" in message


def test_check_reports_a_missing_split_file_and_root(tmp_path):
    root = make_voc(tmp_path, aug_name="other.txt")
    with pytest.raises(G4SegError, match=r"split file .*aug\.txt or .*train_aug\.txt not found"):
        build("voc12", root, split="train_aug").check()
    with pytest.raises(G4SegError, match="split file"):
        build("voc12", root, split="train_aug").ids()
    with pytest.raises(G4SegError, match="root folder not found"):
        build("voc12", tmp_path / "nowhere").check()


def test_context60_keeps_background_and_context59_ignores_it(tmp_path):
    root = make_context(tmp_path)
    raw = label_map(59, border=0)
    raw[7, :] = 1
    c60 = build("context60", root)
    c60.check()
    assert c60.ids() == ["2008_000002", "2008_000003"]
    assert c60.label_path("2008_000002") == root / "SegmentationClassContext" / "2008_000002.png"
    assert np.array_equal(c60.load_label("2008_000002"), raw)
    c59 = build("context59", root)
    expected = raw.copy()
    expected[raw == 0] = 255
    assert np.array_equal(c59.load_label("2008_000002"), expected)
    assert c59.image_labels("2008_000002") == [1, 59]
    # metric indices: context60 unchanged; context59 shifted down with background out of every class
    values = np.array([[0, 1, 59, 255]], np.uint8)
    assert c60.to_metric(values).tolist() == [[0, 1, 59, 255]]
    assert c59.to_metric(values).tolist() == [[-1, 0, 58, 255]]


def test_coco_object_scans_the_image_folder(tmp_path):
    root = make_coco(tmp_path)
    data = build("coco-object", root)
    data.check()
    assert data.ids() == ["000000000139", "000000000285"]
    assert data.label_path("000000000139") == root / "annotations" / "val2017" / "000000000139_instanceTrainIds.png"
    assert np.array_equal(data.load_label("000000000285"), label_map(80, border=0))  # 0 stays background
    (root / "annotations" / "val2017" / "000000000139_instanceTrainIds.png").unlink()
    with pytest.raises(G4SegError, match=r"1 of 2 labels missing .*000000000139_instanceTrainIds\.png"):
        data.check()
    with pytest.raises(G4SegError, match="image folder .*train2017 not found"):
        build("coco-object", root, split="train").check()


def test_index_png_refuses_colour_images(tmp_path):
    write_image(tmp_path / "rgb.png")
    with pytest.raises(G4SegError, match="mode RGB"):
        read_index_png(tmp_path / "rgb.png")
    with pytest.raises(G4SegError, match="not found"):
        read_index_png(tmp_path / "missing.png")
