"""``g4seg eval`` and :mod:`g4seg.evaluation` on real files, with every expected number counted by hand."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg.errors import G4SegError
from g4seg.evaluation import compare, evaluate
from g4seg.io import save_label_png
from g4seg.plugins import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bootstrap import counts, reference_interval  # noqa: E402  (the plain-python bootstrap)

BG, CAT, HORSE, PERSON = 0, 8, 13, 15  # VOC labels
SPLIT = ["a", "b", "c"]  # dataset.ids() (sorted): the order of the rows the bootstrap draws


def labels_and_predictions():
    """Three 8x8 VOC images: label, refined prediction, coarse prediction."""
    a = np.zeros((8, 8), np.uint8)
    a[:, 4:] = PERSON  # background left (32 px), person right (32 px)
    a_coarse = np.zeros((8, 8), np.uint8)  # person missed entirely
    b = np.full((8, 8), CAT, np.uint8)
    b[0] = 255  # 8 ignored pixels, 56 cat pixels
    b_refined = np.full((8, 8), CAT, np.uint8)
    b_refined[4:] = BG  # 24 cat pixels right, 32 cat pixels called background
    b_coarse = np.full((8, 8), CAT, np.uint8)
    c = np.full((8, 8), HORSE, np.uint8)
    c[6:] = BG  # 48 horse, 16 background
    c_coarse = np.full((8, 8), HORSE, np.uint8)
    c_coarse[4:] = BG  # 32 horse right, 16 horse called background
    return {"a": (a, a, a_coarse), "b": (b, b_refined, b_coarse), "c": (c, c, c_coarse)}


# Refined, summed over the three images (intersection / union):
#   background: a 32/32, b 0/32, c 16/16 -> 48/80 = 60      person: 32/32 = 100
#   cat: 24/56 = 300/7                                       horse: 48/48 = 100
REFINED_MIOU = (60 + 100 + 300 / 7 + 100) / 4
# Coarse: background a 32/64, c 16/32 -> 48/96 = 50; person 0/32 = 0; cat 56/56 = 100; horse 32/48
COARSE_MIOU = (50 + 0 + 100 + 200 / 3) / 4
# Per image (classes present in label or prediction):
#   refined a 100, b (bg 0 + cat 300/7) / 2 = 150/7, c 100
#   coarse  a (bg 50 + person 0) / 2 = 25, b 100, c (bg 16/32 + horse 32/48) / 2 = 175/3
# Bins by coarse IoU: 0-40 {a: +75}, 40-80 {c: 100 - 175/3}, 80-100 {b: 150/7 - 100}


def make_run(root: Path) -> tuple[Path, Path, Path]:
    voc = root / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("c\na\nb\n")
    refined_dir, coarse_dir = root / "refined", root / "coarse"
    for k, (id, (label, refined, coarse)) in enumerate(labels_and_predictions().items()):
        (voc / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(voc / "JPEGImages" / f"{id}.jpg")
        save_label_png(voc / "SegmentationClass" / f"{id}.png", label)
        save_label_png(refined_dir / f"{id}.png", refined)
        (coarse_dir).mkdir(exist_ok=True)
        Image.fromarray(coarse, mode="L").save(coarse_dir / f"{id}.png")  # grey PNGs work as well
    return voc, refined_dir, coarse_dir


@pytest.fixture
def run_eval():
    from g4seg.cli import app

    return lambda *args: CliRunner().invoke(app, ["eval", *map(str, args)])


def test_evaluate_and_compare_by_hand(tmp_path):
    voc, refined_dir, coarse_dir = make_run(tmp_path)
    dataset = registry().get("dataset", "voc12").build({"root": voc, "split": "val"})
    refined = evaluate(refined_dir, dataset)
    coarse = evaluate(coarse_dir, dataset, workers=1)
    assert dataset.ids() == SPLIT and list(refined.per_image) == SPLIT
    assert refined.images == 3
    assert refined.miou == pytest.approx(REFINED_MIOU)
    assert coarse.miou == pytest.approx(COARSE_MIOU)
    assert refined.per_class["background"] == pytest.approx(60.0)
    assert refined.per_class["cat"] == pytest.approx(300 / 7)
    assert refined.per_class["dog"] is None  # absent from labels and predictions
    assert refined.per_image == pytest.approx({"a": 100.0, "b": 150 / 7, "c": 100.0})
    assert coarse.per_image == pytest.approx({"a": 25.0, "b": 100.0, "c": 175 / 3})
    comparison = compare(refined, coarse)
    assert comparison.gain == pytest.approx(REFINED_MIOU - COARSE_MIOU)
    assert [(b.label, b.count) for b in comparison.bins] == [("0-40", 1), ("40-80", 1), ("80-100", 1)]
    assert [b.mean_gain for b in comparison.bins] == pytest.approx([75.0, 100 - 175 / 3, 150 / 7 - 100])
    assert comparison.class_gain["person"] == pytest.approx(100.0)
    assert comparison.class_gain["dog"] is None


def test_cli_table_json_and_compare(tmp_path, run_eval):
    voc, refined_dir, coarse_dir = make_run(tmp_path)
    out = tmp_path / "scores" / "voc.json"
    result = run_eval(refined_dir, "--dataset", "voc12", "--root", voc, "--split", "val",
                      "--json", out, "--compare", coarse_dir)
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"mIoU {REFINED_MIOU:.2f} over 3 images" in text
    assert "42.86" in text and "person" in text  # the cat row and a class name of the table
    assert f"coarse mIoU {COARSE_MIOU:.2f}, gain +{REFINED_MIOU - COARSE_MIOU:.2f}" in text
    assert "+75.00" in text and "-78.57" in text  # bin means
    report = json.loads(out.read_text())
    assert set(report) == {"mIoU", "per_class", "images", "compare"}
    assert report["mIoU"] == pytest.approx(REFINED_MIOU) and report["images"] == 3
    assert len(report["per_class"]) == 21 and report["per_class"]["horse"] == pytest.approx(100.0)
    assert report["per_class"]["sofa"] is None
    assert report["compare"]["coarse_mIoU"] == pytest.approx(COARSE_MIOU)
    assert report["compare"]["bins"][1] == {"range": "40-80", "count": 1, "mean_gain": pytest.approx(100 - 175 / 3)}
    # the interval: 1000 paired resamples, seed 0, recomputed by the plain loop from hand counts
    assert report["compare"]["gain"] == pytest.approx(REFINED_MIOU - COARSE_MIOU)
    low, high = hand_interval(1000, 0)
    assert report["compare"]["gain_ci95"] == [pytest.approx(low), pytest.approx(high)] and low < high
    assert report["compare"]["improved_fraction"] == pytest.approx(2 / 3)  # a and c improved, b got worse
    assert report["compare"]["worsened_fraction"] == pytest.approx(1 / 3)
    assert (report["compare"]["resamples"], report["compare"]["bootstrap_seed"]) == (1000, 0)
    assert f"95% CI [{low:+.2f}, {high:+.2f}]" in text and "improved on 66.7% of images" in text
    with Image.open(out.parent / "voc.per_image.png") as picture:  # next to the --json report
        assert picture.format == "PNG"


def hand_interval(resamples: int, seed: int) -> tuple[float, float]:
    """The gain's interval from the three images' hand counts (21 VOC classes), in the split's order."""
    images = labels_and_predictions()
    refined = [counts(images[id][1], images[id][0], 21) for id in SPLIT]
    coarse = [counts(images[id][2], images[id][0], 21) for id in SPLIT]
    return reference_interval(refined, coarse, resamples, seed)


def test_cli_resamples_seed_and_plot_options(tmp_path, run_eval):
    voc, refined_dir, coarse_dir = make_run(tmp_path)
    out, plot = tmp_path / "s.json", tmp_path / "pictures" / "mine.png"
    result = run_eval(refined_dir, "-d", "voc12", "--root", voc, "--compare", coarse_dir, "--json", out,
                      "--resamples", 50, "--seed", 9, "--plot", plot)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["compare"]
    assert report["gain_ci95"] == pytest.approx(list(hand_interval(50, 9)))
    assert report["gain_ci95"] != pytest.approx(list(hand_interval(1000, 0)))
    assert plot.is_file() and not (tmp_path / "s.per_image.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--compare", "COARSE", "--resamples", "0"], "resamples must be at least 1, got 0"),
    (["--compare", "COARSE", "--seed", "-1"], "seed must be >= 0"),
    (["--plot", "p.png"], "--plot draws the comparison: give --compare"),
])
def test_cli_bad_bootstrap_options_are_one_line(tmp_path, run_eval, args, message):
    voc, refined_dir, coarse_dir = make_run(tmp_path)
    args = [str(coarse_dir) if a == "COARSE" else a for a in args]
    result = run_eval(refined_dir, "-d", "voc12", "--root", voc, *args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("g4seg: error: ") and message in lines[0]


def test_per_image_picture_plots_each_image_in_its_bin(tmp_path):
    from matplotlib.colors import to_rgba

    from g4seg.evaluation import BIN_COLOURS, per_image_figure

    voc, refined_dir, coarse_dir = make_run(tmp_path)
    dataset = registry().get("dataset", "voc12").build({"root": voc, "split": "val"})
    figure = per_image_figure(compare(evaluate(refined_dir, dataset), evaluate(coarse_dir, dataset)), "toy")
    (ax,) = figure.axes
    points = [(np.asarray(c.get_offsets()), to_rgba(c.get_facecolor()[0])[:3]) for c in ax.collections]
    # (coarse, refined) per-image IoU: a in 0-40, c in 40-80, b in 80-100
    for (got, _), expected in zip(points, ([[25.0, 100.0]], [[175 / 3, 100.0]], [[100.0, 150 / 7]])):
        np.testing.assert_allclose(got, expected)
    assert [colour for _, colour in points] == [to_rgba(c)[:3] for c in BIN_COLOURS]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "coarse IoU 0-40 (1 images)", "coarse IoU 40-80 (1 images)", "coarse IoU 80-100 (1 images)"]


def test_cli_without_compare_writes_the_plain_format(tmp_path, run_eval):
    voc, refined_dir, _ = make_run(tmp_path)
    out = tmp_path / "plain.json"
    result = run_eval(refined_dir, "-d", "voc", "--root", voc, "--json", out)  # split defaults to val
    assert result.exit_code == 0, result.output
    assert "gain" not in result.output
    assert set(json.loads(out.read_text())) == {"mIoU", "per_class", "images"}


def test_missing_predictions_are_listed(tmp_path, run_eval):
    voc, refined_dir, _ = make_run(tmp_path)
    (refined_dir / "b.png").unlink()
    (refined_dir / "c.png").unlink()
    dataset = registry().get("dataset", "voc12").build({"root": voc, "split": "val"})
    with pytest.raises(G4SegError, match=r"2 of 3 predictions missing under .*refined \(b\.png, c\.png\)"):
        evaluate(refined_dir, dataset)
    result = run_eval(refined_dir, "--dataset", "voc12", "--root", voc)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("g4seg: error: 2 of 3 predictions missing")


def test_size_mismatch_and_missing_folder(tmp_path):
    voc, refined_dir, _ = make_run(tmp_path)
    save_label_png(refined_dir / "a.png", np.zeros((4, 8), np.uint8))
    dataset = registry().get("dataset", "voc12").build({"root": voc, "split": "val"})
    with pytest.raises(G4SegError, match=r"a\.png is 8x4 but its label .* is 8x8"):
        evaluate(refined_dir, dataset)
    with pytest.raises(G4SegError, match="prediction folder not found"):
        evaluate(tmp_path / "none", dataset)


def test_context59_scores_background_predictions_as_misses(tmp_path):
    root = tmp_path / "VOC2010"
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("x\n")
    (root / "JPEGImages").mkdir()
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(root / "JPEGImages" / "x.jpg")
    (root / "SegmentationClassContext").mkdir()
    label = np.array([[0, 0, 1, 1], [2, 2, 2, 2]], np.uint8)  # 0 = background, not scored in context59
    Image.fromarray(label, mode="L").save(root / "SegmentationClassContext" / "x.png")
    pred = np.array([[1, 0, 1, 0], [2, 2, 0, 0]], np.uint8)
    save_label_png(tmp_path / "pred" / "x.png", pred)
    c59 = evaluate(tmp_path / "pred", registry().get("dataset", "context59").build({"root": root}))
    # class 1 (aeroplane): label at 2 scored pixels, predicted on 1 of them -> 1/2; the prediction on a
    # background pixel is not scored. Class 2 (bag): 2 of 4 predicted, background predictions count nowhere.
    assert len(c59.per_class) == 59 and "background" not in c59.per_class
    assert c59.per_class["aeroplane"] == pytest.approx(50.0) and c59.per_class["bag"] == pytest.approx(50.0)
    assert c59.miou == pytest.approx(50.0)
    c60 = evaluate(tmp_path / "pred", registry().get("dataset", "context60").build({"root": root}))
    # with background scored: bg 1 / (2 + 4 - 1) = 20, aeroplane 1 / (2 + 2 - 1), bag 2 / 4
    assert c60.per_class["background"] == pytest.approx(20.0)
    assert c60.per_class["aeroplane"] == pytest.approx(100 / 3)
    assert c60.miou == pytest.approx((20 + 100 / 3 + 50) / 3)
    assert not math.isnan(c60.per_image["x"])


def test_bins_are_half_open_and_the_last_includes_100():
    from g4seg.evaluation import EvalResult
    from g4seg.metrics import Areas

    coarse_ious = {"p": 0.0, "q": 39.9, "r": 40.0, "s": 79.99, "t": 80.0, "u": 100.0, "v": math.nan}
    areas = Areas.stack([Areas.zeros(2)] * len(coarse_ious), 2)
    coarse = EvalResult("toy", ["background", "x"], coarse_ious, Areas.zeros(2), areas)
    refined = EvalResult("toy", ["background", "x"], {k: 100.0 for k in coarse_ious}, Areas.zeros(2), areas)
    comparison = compare(refined, coarse)
    bins = comparison.bins
    assert [b.count for b in bins] == [2, 2, 2]  # the undefined image joins no bin
    assert [b.mean_gain for b in bins] == pytest.approx([(100 + 60.1) / 2, (60 + 20.01) / 2, 10.0])
    assert comparison.improved_fraction == pytest.approx(5 / 6)  # u stays at 100; v is undefined
    assert comparison.worsened_fraction == 0
    with pytest.raises(G4SegError, match="same dataset split"):
        compare(refined, EvalResult("toy", ["background", "x"], {"p": 1.0}, Areas.zeros(2), areas.rows([0])))
