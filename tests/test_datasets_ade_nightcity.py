"""The ``ade20k`` and ``nightcity`` datasets: layouts, class files, palette colours, their label encodings, and
``g4seg eval`` / ``g4seg refine --dataset`` against mmsegmentation's metric re-implemented here."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from g4seg.builtin.injector_controlnet import PALETTE_FILE, ControlNetInjector, ControlNetOptions, Palette
from g4seg.builtin.mask_source_file import FileMaskOptions, FileMaskSource
from g4seg.errors import G4SegError
from g4seg.metrics import intersect_and_union, iou_percent
from g4seg.plugins import registry
from g4seg.registry import Runtime

ADE_IDS = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
NIGHT_IDS = ["Chicago_0001", "Chicago_0002"]
# mmseg's CityscapesDataset METAINFO classes (mmseg/datasets/cityscapes.py), the train-id order
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
              "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def build(name: str, root: Path, split: str = "val"):
    return registry().get("dataset", name).build({"root": root, "split": split})


def write_grey(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def write_image(path: Path, hw: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)


def make_ade(root: Path, labels: dict[str, np.ndarray], folder: str = "validation") -> Path:
    """ADEChallengeData2016: images/<folder>/<id>.jpg, annotations/<folder>/<id>.png."""
    for k, (id, label) in enumerate(labels.items()):
        write_image(root / "images" / folder / f"{id}.jpg", label.shape, k)
        write_grey(root / "annotations" / folder / f"{id}.png", label)
    return root


def make_nightcity(root: Path, labels: dict[str, np.ndarray], split: str = "val") -> Path:
    """nightcity-fine: <split>/img/<id>.png, <split>/lbl/<id>_trainIds.png."""
    for k, (id, label) in enumerate(labels.items()):
        write_image(root / split / "img" / f"{id}.png", label.shape, k)
        write_grey(root / split / "lbl" / f"{id}_trainIds.png", label)
    return root


# ----- mmsegmentation, re-implemented (the reference every number below is checked against) -----------------

def mmseg_reduce_zero_label(gt: np.ndarray) -> np.ndarray:
    """mmseg/datasets/transforms/loading.py, LoadAnnotations._load_seg_map (mmseg 1.x), the reduce_zero_label
    branch, on uint8 as there: 0 -> 255, then -1 (so 255 -> 254), then 254 -> 255."""
    gt = gt.astype(np.uint8).copy()
    gt[gt == 0] = 255
    gt = gt - 1
    gt[gt == 254] = 255
    return gt


def mmseg_intersect_and_union(pred_label: torch.Tensor, label: torch.Tensor, num_classes: int,
                              ignore_index: int = 255) -> tuple[torch.Tensor, ...]:
    """mmseg/evaluation/metrics/iou_metric.py, IoUMetric.intersect_and_union (mmseg 1.x), as written there."""
    mask = label != ignore_index
    pred_label = pred_label[mask]
    label = label[mask]
    intersect = pred_label[pred_label == label]
    area_intersect = torch.histc(intersect.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_pred_label = torch.histc(pred_label.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_label = torch.histc(label.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_union = area_pred_label + area_label - area_intersect
    return area_intersect, area_union, area_pred_label, area_label


def mmseg_iou(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> tuple[float, np.ndarray]:
    """IoUMetric.compute_metrics + total_area_to_metrics: dataset-wide sums, IoU per class, nanmean (percent)."""
    results = [mmseg_intersect_and_union(torch.as_tensor(p.astype(np.int64)), torch.as_tensor(g.astype(np.int64)),
                                         num_classes) for p, g in pairs]
    intersect = sum(r[0] for r in results)
    union = sum(r[1] for r in results)
    iou = (intersect / union).numpy()
    return float(np.nanmean(iou) * 100), iou * 100


# ----- class files and colours -------------------------------------------------------------------------------

def test_class_files_follow_mmseg_and_the_palette_table():
    ade = build("ade20k", Path("/nonexistent"))
    table = tomllib.loads(PALETTE_FILE.read_text())["ade20k"]
    assert ade.classes == list(table)  # mmseg's ade.py order, as the palette table lists it with colours
    assert len(ade.classes) == 150 and len(set(ade.classes)) == 150 and ade.metric_classes == ade.classes
    assert [s[0] for s in ade.synonyms] == ade.classes and "window" in ade.synonyms[8]
    night = build("nightcity", Path("/nonexistent"))
    assert night.classes == CITYSCAPES and night.metric_classes == CITYSCAPES
    assert "motorbike" in night.synonyms[17]
    for data in (ade, night):  # no synonym is another class's name
        for k, line in enumerate(data.synonyms):
            assert not set(line[1:]) & set(data.classes[:k] + data.classes[k + 1:])


def test_every_class_and_synonym_of_both_datasets_has_a_colour():
    ade, night = build("ade20k", Path("/x")), build("nightcity", Path("/x"))
    names = [w for data in (ade, night) for line in data.synonyms for w in line]
    ControlNetInjector(ControlNetOptions(), Runtime()).check_classes(names)  # raises on the first without one
    palette = Palette()
    table = tomllib.loads(PALETTE_FILE.read_text())["ade20k"]
    for line in ade.synonyms:  # an ADE20K synonym takes its own class's colour
        assert {palette.colour(w) for w in line} == {tuple(table[line[0]])}, line
    chosen = {"traffic sign": "signboard", "vegetation": "tree", "terrain": "grass", "rider": "person",
              "motorcycle": "minibike", "sidewalk": "sidewalk", "train": "bus", "pedestrian": "person"}
    for name, ade_class in chosen.items():
        assert palette.colour(name) == tuple(table[ade_class]), name


# ----- layouts ---------------------------------------------------------------------------------------------

def test_ade20k_layout_ids_paths_and_splits(tmp_path):
    root = make_ade(tmp_path / "ADEChallengeData2016", {i: np.ones((6, 8)) for i in reversed(ADE_IDS)})
    make_ade(root, {"ADE_train_00000001": np.ones((6, 8))}, folder="training")
    (root / "images" / "validation" / "readme.txt").write_text("not an image")
    val = build("ade", root)
    val.check()
    assert val.name == "ade20k" and val.ids() == ADE_IDS
    assert val.image_path(ADE_IDS[0]) == root / "images" / "validation" / f"{ADE_IDS[0]}.jpg"
    assert val.label_path(ADE_IDS[0]) == root / "annotations" / "validation" / f"{ADE_IDS[0]}.png"
    assert build("ade20k", root, "train").ids() == ["ADE_train_00000001"]
    with pytest.raises(G4SegError, match="split"):
        build("ade20k", root, "test")


def test_nightcity_layout_ids_and_paths(tmp_path):
    root = make_nightcity(tmp_path / "nightcity-fine", {i: np.zeros((6, 8)) for i in NIGHT_IDS})
    make_nightcity(root, {"Tokyo_0001": np.zeros((6, 8))}, split="train")
    val = build("nightcity-fine", root)
    val.check()
    assert val.name == "nightcity" and val.ids() == NIGHT_IDS
    assert val.image_path("Chicago_0002") == root / "val" / "img" / "Chicago_0002.png"
    assert val.label_path("Chicago_0002") == root / "val" / "lbl" / "Chicago_0002_trainIds.png"
    assert build("nightcity", root, "train").ids() == ["Tokyo_0001"]


@pytest.mark.parametrize("name", ["ade20k", "nightcity"])
def test_layout_errors_are_one_line_naming_what_is_missing(tmp_path, name):
    with pytest.raises(G4SegError, match="root folder not found") as err:
        build(name, tmp_path / "nowhere").check()
    assert name in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(G4SegError, match="image folder .* not found"):
        build(name, tmp_path / "empty").check()
    ids = [f"img{k}" for k in range(7)]
    labels = {i: np.ones((4, 4)) for i in ids}
    root = make_ade(tmp_path / name, labels) if name == "ade20k" else make_nightcity(tmp_path / name, labels)
    data = build(name, root)
    for i in ids[:6]:
        data.label_path(i).unlink()
    with pytest.raises(G4SegError) as err:
        build(name, root).check()
    message = str(err.value)
    assert "\n" not in message and "6 of 7 labels missing" in message and str(data.label_dir) in message
    suffix = ".png" if name == "ade20k" else "_trainIds.png"
    assert f"img0{suffix}" in message and f"img4{suffix}" in message and "img5" not in message and "..." in message


# ----- label encodings -------------------------------------------------------------------------------------

def test_annotations_reach_the_metric_as_mmseg_loads_them(tmp_path):
    """Every uint8 value: ADE20K through reduce_zero_label, NightCity as stored (reduce_zero_label=False); the
    metric indices may differ from mmseg's only where both are outside the class range (no class counts them)."""
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ade = build("ade20k", make_ade(tmp_path / "ade", {"a": every}))
    night = build("nightcity", make_nightcity(tmp_path / "night", {"a": every}))
    for data, mmseg, k in ((ade, mmseg_reduce_zero_label(every), 150), (night, every, 19)):
        ours = data.to_metric(data.load_label("a")).astype(np.int64)
        mmseg = mmseg.astype(np.int64)
        same_class = np.where((mmseg >= 0) & (mmseg < k) | (mmseg == 255), mmseg, -1)
        assert np.array_equal(np.where((ours >= 0) & (ours < k) | (ours == 255), ours, -1), same_class), data.name
    assert ade.load_label("a")[0, 0] == 255 and ade.image_labels("a") == list(range(1, 151))
    assert night.image_labels("a") == list(range(1, 20))  # train id v is g4seg label v + 1


def test_nightcity_encoding_round_trips_and_the_others_are_identity():
    night = build("nightcity", Path("/x"))
    values = np.arange(256, dtype=np.uint8)
    labels = night.decode_labels(values)
    assert np.array_equal(labels[:19], np.arange(1, 20)) and labels[255] == 255
    assert not labels[19:255].any()  # values no class owns: no class (background), never a class or ignore
    assert np.array_equal(night.encode_labels(labels[:19]), values[:19])  # train ids come back exactly
    assert night.encode_labels(np.array([0, 255], np.uint8)).tolist() == [255, 255]  # no class is written as 255
    for name in ("ade20k", "voc12", "context59"):
        data = build(name, Path("/x"))
        assert data.decode_labels(values) is values and data.encode_labels(values) is values


def test_file_masks_decode_a_dataset_encoding_and_refuse_values_it_never_writes(tmp_path):
    night = build("nightcity", Path("/x"))
    train_ids = np.array([[0, 18, 255, 7]], np.uint8)
    write_grey(tmp_path / "m.png", train_ids)
    source = FileMaskSource(FileMaskOptions())
    coarse = source.load(tmp_path / "i.png", tmp_path / "m.png", night.classes, (1, 4), encoding=night)
    assert coarse.probs.shape == (19, 1, 4)
    assert coarse.probs[0, 0, 0] == 1 and coarse.probs[18, 0, 1] == 1 and coarse.probs[7, 0, 3] == 1
    assert coarse.probs[:, 0, 2].sum() == 0 and coarse.ignore.tolist() == [[False, False, True, False]]
    plain = source.load(tmp_path / "i.png", tmp_path / "m.png", night.classes, (1, 4))  # g4seg's own reading
    assert plain.probs[0, 0, 0] == 0 and plain.probs[17, 0, 1] == 1
    write_grey(tmp_path / "bad.png", np.array([[0, 19, 200, 255]]))
    with pytest.raises(G4SegError, match=r"values 19, 200 that this dataset's label maps never hold .*0\.\.18, 255"):
        source.check(tmp_path / "i.png", tmp_path / "bad.png", night.classes, (1, 4), encoding=night)


# ----- g4seg eval against mmseg --------------------------------------------------------------------------

def _eval(pred: Path, name: str, root: Path, report: Path) -> dict:
    from g4seg.cli import app

    result = CliRunner().invoke(app, ["eval", str(pred), "--dataset", name, "--root", str(root), "--split", "val",
                                      "--json", str(report)])
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())


def test_eval_on_ade20k_matches_mmseg(tmp_path):
    """Predictions as mmseg saves them for ADE20K (its class index + 1; 0 = no class) against annotations with
    0 = other, over a few classes, ignore pixels included."""
    rng = np.random.default_rng(1)
    used = np.array([0, 1, 2, 5, 13, 150, 255])
    labels = {i: rng.choice(used[:-1], (12, 10)) for i in ADE_IDS}
    labels[ADE_IDS[0]][0] = 255
    preds = {i: np.where(rng.random(g.shape) < 0.6, g, rng.choice(used[:-1], g.shape)) for i, g in labels.items()}
    root = make_ade(tmp_path / "ade", labels)
    for i, p in preds.items():
        write_grey(tmp_path / "pred" / f"{i}.png", p)
    report = _eval(tmp_path / "pred", "ade20k", root, tmp_path / "ade.json")
    miou, iou = mmseg_iou([(preds[i].astype(np.int64) - 1, mmseg_reduce_zero_label(labels[i])) for i in ADE_IDS], 150)
    assert report["mIoU"] == pytest.approx(miou) and report["images"] == 3
    per_class = report["per_class"]
    assert list(per_class) == build("ade20k", root).classes
    assert [per_class[c] is None for c in per_class] == list(np.isnan(iou))
    assert [v for v in per_class.values() if v is not None] == pytest.approx(iou[~np.isnan(iou)].tolist())
    assert per_class["wall"] is not None and per_class["flag"] is not None and per_class["sky"] is None


def test_eval_on_nightcity_matches_mmseg(tmp_path):
    """Train-id predictions (255 and a value of no class among them) against train-id annotations."""
    rng = np.random.default_rng(2)
    labels = {i: rng.choice([0, 1, 8, 10, 13, 18], (10, 12)) for i in NIGHT_IDS}
    labels[NIGHT_IDS[1]][:, :2] = 255
    preds = {i: np.where(rng.random(g.shape) < 0.7, g, rng.choice([0, 8, 11, 18, 255, 30], g.shape))
             for i, g in labels.items()}
    root = make_nightcity(tmp_path / "night", labels)
    for i, p in preds.items():
        write_grey(tmp_path / "pred" / f"{i}.png", p)
    report = _eval(tmp_path / "pred", "nightcity", root, tmp_path / "night.json")
    miou, iou = mmseg_iou([(preds[i], labels[i]) for i in NIGHT_IDS], 19)
    assert report["mIoU"] == pytest.approx(miou)
    assert list(report["per_class"]) == CITYSCAPES
    assert [report["per_class"][c] for c in ("road", "vegetation", "bicycle")] == pytest.approx(iou[[0, 8, 18]])
    assert report["per_class"]["person"] == 0.0 and report["per_class"]["wall"] is None  # predicted only; absent


def test_nightcity_metric_by_hand():
    """By hand: two road and two sky pixels (train ids 0 and 10), predicted road, 255, sky, car (13)."""
    night = build("nightcity", Path("/x"))
    pred = night.to_metric(night.decode_labels(np.array([[0, 255, 10, 13]], np.uint8)))
    label = night.to_metric(night.decode_labels(np.array([[0, 0, 10, 10]], np.uint8)))
    iou = iou_percent(intersect_and_union(pred, label, 19))
    assert iou[0] == pytest.approx(50.0) and iou[10] == pytest.approx(50.0) and iou[13] == 0.0  # car: 0 / 1


# ----- refine --dataset nightcity: train ids in, train ids out ------------------------------------------

def test_refine_nightcity_with_beta_1_writes_back_the_coarse_train_ids(tmp_path, config_file):
    h, w = 24, 32
    rng = np.random.default_rng(3)
    truth, coarse = {}, {}
    for i in NIGHT_IDS:
        label = np.zeros((h, w), np.uint8)  # road
        label[:8] = 10  # sky
        label[10:20, 4:14] = 13  # car
        label[10:20, 18:24] = 11  # person
        truth[i] = label
        guess = np.roll(label, 2, axis=1)
        guess[0, :4] = 255
        guess[rng.random((h, w)) < 0.05] = 18  # bicycle noise
        coarse[i] = guess
        write_grey(tmp_path / "coarse" / f"{i}.png", guess)
    root = make_nightcity(tmp_path / "nightcity-fine", truth)
    out = tmp_path / "out"
    from g4seg.cli import app

    invoke = CliRunner().invoke
    result = invoke(app, ["refine", "--dataset", "nightcity", "--root", str(root), "--split", "val", "--coarse",
                          str(tmp_path / "coarse"), "--out", str(out), "--config", str(config_file), "--beta", "1",
                          "--save-coarse", "--no-progress"])
    assert result.exit_code == 0, result.output
    for i in NIGHT_IDS:
        written = np.asarray(Image.open(out / f"{i}.png"))
        assert np.array_equal(written, coarse[i])  # values 0..18 and 255, exactly the coarse map
        assert np.array_equal(np.asarray(Image.open(out / "coarse" / f"{i}.png")), coarse[i])
        assert np.load(out / f"{i}.npz")["classes"].tolist() == CITYSCAPES  # per class, no encoding
    refined = _eval(out, "nightcity", root, tmp_path / "refined.json")
    miou, _ = mmseg_iou([(coarse[i], truth[i]) for i in NIGHT_IDS], 19)
    assert refined["mIoU"] == pytest.approx(miou)
    # a coarse map with a value no train id has is refused before any model loads, one line for it
    bad = tmp_path / "bad"
    bad.mkdir()
    write_grey(bad / f"{NIGHT_IDS[0]}.png", np.full((h, w), 19))
    write_grey(bad / f"{NIGHT_IDS[1]}.png", coarse[NIGHT_IDS[1]])
    refused = invoke(app, ["refine", "--dataset", "nightcity", "--root", str(root), "--split", "val", "--coarse",
                           str(bad), "--out", str(tmp_path / "out2"), "--config", str(config_file), "--beta", "1",
                           "--no-progress", "--fail-fast"])
    assert refused.exit_code == 1 and refused.output.count("g4seg: error:") == 1
    assert "values 19 that this dataset's label maps never hold" in refused.output
    assert not (tmp_path / "out2").exists()


def test_ablation_items_carry_the_dataset_encoding(tmp_path):
    from g4seg.runner import dataset_items

    root = make_nightcity(tmp_path / "night", {i: np.zeros((4, 4)) for i in NIGHT_IDS})
    (tmp_path / "coarse").mkdir()
    night = build("nightcity", root)
    items = dataset_items(night, tmp_path / "coarse")
    assert [item.stem for item in items] == NIGHT_IDS and all(item.encoding is night for item in items)
