"""Panoptic quality (``g4seg eval --panoptic``) and per-segment refinement (``g4seg refine-panoptic``).

PQ is checked against a case counted by hand and, on random cases, against panopticapi's own lines
re-implemented below (cocodataset/panopticapi, panopticapi/evaluation.py at commit 7bb4655:
``PQStat.pq_average`` lines 49-73, ``pq_compute_single_core`` lines 77-165, file reading left out).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from g4seg.cli import app
from g4seg.errors import G4SegError
from g4seg.panoptic.format import id2rgb, rgb2id
from g4seg.panoptic.quality import CategoryStat, PanopticResult, image_stats
from g4seg.panoptic.refine import ROUND_LIMIT, merge_segments, refine_segments, rounds
from g4seg.refiner import RefineResult

runner = CliRunner()
PERSON, CAR, SKY, TREE = 1, 2, 3, 4
CATEGORIES = [{"id": PERSON, "name": "person", "isthing": 1}, {"id": CAR, "name": "car", "isthing": 1},
              {"id": SKY, "name": "sky", "isthing": 0}, {"id": TREE, "name": "tree", "isthing": 0}]


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("g4seg: error: "), result.output
    return lines[0]


# ----- the format ----------------------------------------------------------------------------------

def test_rgb2id_is_panopticapi_formula_and_id2rgb_inverts_it():
    """panopticapi/utils.py lines 73-78: id = R + 256 G + 256^2 B."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ids = rgb2id(rgb)
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    assert np.array_equal(ids, r + 256 * g + 65536 * b)
    assert np.array_equal(id2rgb(ids), rgb)
    assert rgb2id(np.array([[[1, 2, 3]]], np.uint8))[0, 0] == 1 + 512 + 3 * 65536


# ----- the hand-counted case -----------------------------------------------------------------------

def hand_case() -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """10 x 10 ground truth and prediction with matched, unmatched, crowd and VOID segments.

    Ground truth: g1 person rows 0-3 cols 0-4 (20 px); g2 person CROWD rows 0-3 cols 5-9 (20); g3 car rows
    4-5 (20); g4 sky rows 6-9 cols 0-4 (20); VOID rows 6-9 cols 5-9 (20).
    """
    gt = np.zeros((10, 10), np.int64)
    gt[0:4, 0:5], gt[0:4, 5:10], gt[4:6, :], gt[6:10, 0:5] = 11, 12, 13, 14
    gt_info = [{"id": 11, "category_id": PERSON, "iscrowd": 0}, {"id": 12, "category_id": PERSON, "iscrowd": 1},
               {"id": 13, "category_id": CAR, "iscrowd": 0}, {"id": 14, "category_id": SKY, "iscrowd": 0}]
    pred = np.zeros((10, 10), np.int64)
    pred[0:4, 0:4] = pred[6:8, 5:7] = 21  # person: 16 px on g1 + 4 px on VOID
    pred[0:4, 6:10] = pred[4:6, 8:10] = 22  # person: 16 px on the person crowd + 4 px on the car
    pred[4:6, 0:5] = 23  # car: 10 px, all on g3
    pred[7:10, 0:5] = 24  # sky: 15 px, all on g4
    pred[8:10, 7:10] = 25  # sky: 6 px, all on VOID
    pred[6:8, 8:10] = pred[6, 0:5] = 26  # car: 4 px on VOID + 5 px on the sky
    pred_info = [{"id": i, "category_id": c} for i, c in ((21, PERSON), (22, PERSON), (23, CAR), (24, SKY),
                                                          (25, SKY), (26, CAR))]
    return gt, gt_info, pred, pred_info


# person: 21 matches g1: union 20 + 20 - 16 - 4 (its VOID pixels) = 20, IoU 0.8 -> TP. 22 is unmatched (g2 is crowd)
#   but 16 of its 20 px are on the person crowd -> not FP. The crowd g2 is never FN.        PQ 80, SQ 80, RQ 100
# car: 23 vs g3: IoU 10 / (10 + 20 - 10) = 0.5, not > 0.5 -> no match: 23 FP, g3 FN. 26: 4 of 9 px on VOID (not more
#   than half; sky pixels do not excuse) -> FP.                                    TP 0, FP 2, FN 1: PQ 0, SQ 0, RQ 0
# sky: 24 matches g4 with IoU 15/20 -> TP. 25 is all on VOID -> not FP.             PQ 75, SQ 75, RQ 100
# tree: no TP, FP or FN -> not averaged.
HAND = {"PQ": (80 + 0 + 75) / 3, "SQ": (80 + 0 + 75) / 3, "RQ": (100 + 0 + 100) / 3, "n": 3}
HAND_THINGS = {"PQ": 40.0, "SQ": 40.0, "RQ": 50.0, "n": 2}
HAND_STUFF = {"PQ": 75.0, "SQ": 75.0, "RQ": 100.0, "n": 1}


def test_hand_case_statistics():
    gt, gt_info, pred, pred_info = hand_case()
    stats = image_stats(gt, {s["id"]: s for s in gt_info}, pred, {s["id"]: s for s in pred_info})
    assert stats[PERSON] == CategoryStat(iou=pytest.approx(0.8), tp=1, fp=0, fn=0)
    assert stats[CAR] == CategoryStat(iou=0.0, tp=0, fp=2, fn=1)
    assert stats[SKY] == CategoryStat(iou=pytest.approx(0.75), tp=1, fp=0, fn=0)
    assert TREE not in stats
    result = PanopticResult({c["id"]: c for c in CATEGORIES}, stats, 1)
    assert result.average() == pytest.approx(HAND)
    assert result.average(True) == pytest.approx(HAND_THINGS)
    assert result.average(False) == pytest.approx(HAND_STUFF)
    assert result.per_class()[str(TREE)]["PQ"] is None


def write_panoptic(folder: Path, json_path: Path, images: dict, categories: list[dict] | None = CATEGORIES) -> None:
    """``images``: image_id -> (id map, segments_info); PNGs named <image_id>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for image_id, (ids, info) in images.items():
        Image.fromarray(id2rgb(ids)).save(folder / f"{image_id}.png")
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": info})
    data = {"annotations": annotations, **({"categories": categories} if categories is not None else {})}
    json_path.write_text(json.dumps(data))


@pytest.fixture
def hand_files(tmp_path):
    gt, gt_info, pred, pred_info = hand_case()
    write_panoptic(tmp_path / "gt", tmp_path / "gt.json", {"a": (gt, gt_info), "b": (gt, gt_info)})
    write_panoptic(tmp_path / "pred", tmp_path / "pred.json", {"a": (pred, pred_info), "b": (gt, gt_info),
                                                                "extra": (pred, pred_info)}, categories=None)
    return tmp_path


def test_eval_panoptic_cli_on_the_hand_case(hand_files):
    """Image a is the hand case, image b a perfect prediction: the sums over both images, counted by hand.

    person: TP 2 (0.8 + 1), FP 0, FN 0 (b's crowd is never FN) -> PQ SQ 90, RQ 100. car: TP 1 (1.0), FP 2, FN 1
    -> PQ 1 / (1 + 1 + 0.5) = 40, SQ 100, RQ 40. sky: TP 2 (0.75 + 1) -> PQ SQ 87.5, RQ 100. The prediction "extra"
    is not in the ground truth and is ignored.
    """
    t = hand_files
    out = t / "pq.json"
    result = _invoke("eval", t / "pred", "--panoptic", "--pred-json", t / "pred.json", "--gt-dir", t / "gt",
                     "--gt-json", t / "gt.json", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["PQ"] == pytest.approx((90 + 40 + 87.5) / 3)
    assert report["SQ"] == pytest.approx((90 + 100 + 87.5) / 3)
    assert report["RQ"] == pytest.approx((100 + 40 + 100) / 3)
    assert report["things"]["PQ"] == pytest.approx(65) and report["stuff"]["PQ"] == pytest.approx(87.5)
    assert report["per_class"][str(CAR)] == {"name": "car", "PQ": pytest.approx(40), "SQ": pytest.approx(100),
                                             "RQ": pytest.approx(40), "TP": 1, "FP": 2, "FN": 1}
    assert report["per_class"][str(TREE)]["PQ"] is None and report["images"] == 2
    assert "All" in result.output and "Things" in result.output and "Stuff" in result.output


# ----- panopticapi's lines, re-implemented ---------------------------------------------------------

def reference_pq(images, categories):
    """panopticapi/evaluation.py ``pq_compute_single_core`` (lines 77-165) without the file reading, then
    ``PQStat.pq_average`` (lines 49-73) for All, Things and Stuff. ``images``: (gt ids, gt segments_info,
    pred ids, pred segments_info); areas as panopticapi has them (ground truth: the JSON's, here exact)."""
    OFFSET, VOID = 256 * 256 * 256, 0
    stat = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    for pan_gt, gt_info, pan_pred, pred_info in images:
        gt_segms = {el["id"]: dict(el) for el in gt_info}
        pred_segms = {el["id"]: dict(el) for el in pred_info}
        labels, labels_cnt = np.unique(pan_pred, return_counts=True)
        for label, label_cnt in zip(labels, labels_cnt):
            if label not in pred_segms:
                continue
            pred_segms[label]["area"] = label_cnt
        pan_gt_pred = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
        gt_pred_map = {}
        labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
        for label, intersection in zip(labels, labels_cnt):
            gt_pred_map[(label // OFFSET, label % OFFSET)] = intersection
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            if gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection
                     - gt_pred_map.get((VOID, pred_label), 0))
            iou = intersection / union
            if iou > 0.5:
                stat[gt_segms[gt_label]["category_id"]]["tp"] += 1
                stat[gt_segms[gt_label]["category_id"]]["iou"] += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_labels_dict = {}
        for gt_label, gt_info_ in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_info_["iscrowd"] == 1:
                crowd_labels_dict[gt_info_["category_id"]] = gt_label
                continue
            stat[gt_info_["category_id"]]["fn"] += 1
        for pred_label, pred_info_ in pred_segms.items():
            if pred_label in pred_matched:
                continue
            intersection = gt_pred_map.get((VOID, pred_label), 0)
            if pred_info_["category_id"] in crowd_labels_dict:
                intersection += gt_pred_map.get((crowd_labels_dict[pred_info_["category_id"]], pred_label), 0)
            if intersection / pred_info_["area"] > 0.5:
                continue
            stat[pred_info_["category_id"]]["fp"] += 1
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        pq, sq, rq, n = 0, 0, 0, 0
        per_class = {}
        for label, label_info in categories.items():
            if isthing is not None and isthing != (label_info["isthing"] == 1):
                continue
            s = stat[label]
            if s["tp"] + s["fp"] + s["fn"] == 0:
                per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_class = s["iou"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
            sq_class = s["iou"] / s["tp"] if s["tp"] != 0 else 0
            rq_class = s["tp"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
            per_class[label] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq, sq, rq = pq + pq_class, sq + sq_class, rq + rq_class
        results[name] = ({"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n} if n else None), per_class
    return results


def random_image(rng: np.random.Generator, categories: list[int]):
    """A blocky ground truth (some crowd, some VOID) and a prediction made from it by relabelling blocks and
    flipping pixels, so that matches above and below IoU 0.5 both occur."""
    h, w = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    cells = rng.integers(0, 5, (-(-h // 2), -(-w // 2)))
    gt = np.kron(cells, np.ones((2, 2), np.int64))[:h, :w]
    flips = np.where(rng.random((h, w)) < 0.5, 0, rng.integers(11, 15, (h, w)))
    pred = np.where(rng.random((h, w)) < 0.25, flips, gt + 10)  # 10: a segment on VOID (or VOID itself)
    if rng.random() < 0.5:
        pred[pred == 10] = 0
    gt_info = [{"id": int(i), "category_id": int(rng.choice(categories)), "iscrowd": int(rng.random() < 0.25),
                "area": int((gt == i).sum())} for i in np.unique(gt) if i]
    pred_info = [{"id": int(i), "category_id": int(rng.choice(categories))} for i in np.unique(pred) if i]
    return gt, gt_info, pred, pred_info


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 3), st.integers(1, 3))
def test_pq_equals_panopticapi_on_random_cases(seed, n_images, n_categories):
    rng = np.random.default_rng(seed)
    categories = {c: {"id": c, "name": f"c{c}", "isthing": int(rng.random() < 0.5)} for c in range(1, n_categories + 1)}
    images = [random_image(rng, list(categories)) for _ in range(n_images)]
    stats: dict[int, CategoryStat] = {}
    for gt, gt_info, pred, pred_info in images:
        for category, stat in image_stats(gt, {s["id"]: s for s in gt_info}, pred,
                                          {s["id"]: s for s in pred_info}).items():
            stats.setdefault(category, CategoryStat()).add(stat)
    ours = PanopticResult(categories, stats, n_images)
    expected = reference_pq(images, categories)
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        summary, per_class = expected[name]
        got = ours.average(isthing)
        if summary is None:
            assert got == {"PQ": None, "SQ": None, "RQ": None, "n": 0}
        else:
            assert got == pytest.approx({"PQ": 100 * summary["pq"], "SQ": 100 * summary["sq"],
                                         "RQ": 100 * summary["rq"], "n": summary["n"]})
        for label, scores in per_class.items():
            row = ours.per_class()[str(label)]
            if row["TP"] + row["FP"] + row["FN"]:
                assert [row["PQ"], row["SQ"], row["RQ"]] == pytest.approx(
                    [100 * scores["pq"], 100 * scores["sq"], 100 * scores["rq"]])


# ----- bad input: one line, exit 1 ----------------------------------------------------------------

def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _first_segments(data):
    return data["annotations"][0]["segments_info"]


BAD_INPUTS = {
    "missing pred json": (lambda t: (t / "pred.json").unlink(), "--pred-json not found"),
    "png id not in json": (lambda t: _edit_json(t / "pred.json", lambda d: _first_segments(d).pop(0)),
                           "are in the PNG a.png but not in the JSON"),
    "json segment not in png": (lambda t: _edit_json(t / "pred.json", lambda d: _first_segments(d).append(
        {"id": 99, "category_id": PERSON})), "99 are in the JSON's segments_info but not in the PNG"),
    "unknown category": (lambda t: _edit_json(t / "pred.json", lambda d: _first_segments(d)[0].update(
        category_id=77)), "unknown category_id 77"),
    "duplicate segment id": (lambda t: _edit_json(t / "pred.json", lambda d: _first_segments(d).append(
        dict(_first_segments(d)[0]))), "segment id 21 is given twice"),
    "duplicate image id": (lambda t: _edit_json(t / "gt.json", lambda d: d["annotations"].append(
        d["annotations"][0])), "image_id 'a' has two annotations"),
    "duplicate category id": (lambda t: _edit_json(t / "gt.json", lambda d: d["categories"].append(
        d["categories"][0])), "category id 1 is given twice"),
    "size mismatch": (lambda t: Image.fromarray(id2rgb(np.pad(hand_case()[0], ((0, 0), (0, 1))))).save(
        t / "pred" / "b.png"), "image 'b': the predicted PNG b.png is 11x10, the ground truth b.png 10x10"),
    "gt image without prediction": (lambda t: _edit_json(t / "pred.json", lambda d: d["annotations"].pop(1)),
                                    "no prediction for 1 of 2 ground-truth images: 'b'"),
    "grey png": (lambda t: Image.fromarray(np.zeros((10, 10), np.uint8)).save(t / "gt" / "a.png"),
                 "is a L image; panoptic PNGs are RGB"),
    "missing png": (lambda t: (t / "gt" / "b.png").unlink(), "ground-truth PNG not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_eval_panoptic_bad_input_is_one_line(hand_files, case):
    spoil, message = BAD_INPUTS[case]
    t = hand_files
    spoil(t)
    out = t / "pq.json"
    result = _invoke("eval", t / "pred", "--panoptic", "--pred-json", t / "pred.json", "--gt-dir", t / "gt",
                     "--gt-json", t / "gt.json", "--json", out)
    assert message in _one_error_line(result)
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--panoptic", "--pred-json", "p.json"], "--panoptic needs --pred-json, --gt-dir and --gt-json; missing "
                                              "--gt-dir, --gt-json"),
    (["--panoptic", "--dataset", "voc12"], "--panoptic takes --pred-json, --gt-dir and --gt-json, not --dataset"),
    ([], "eval needs --dataset and --root"),
    (["--gt-json", "g.json"], "--gt-json: give --panoptic"),
])
def test_eval_mode_options_are_checked(tmp_path, args, message):
    assert message in _one_error_line(_invoke("eval", tmp_path, *args))


# ----- segments -> classes -> segments -------------------------------------------------------------

def test_rounds_keep_names_unique_and_within_the_label_range():
    names = ["person", "sky", "Person", "car", "person ", "sky"]
    groups = rounds(names)
    assert groups == [[0, 1, 3], [2, 5], [4]]
    many = [f"c{i}" for i in range(ROUND_LIMIT + 3)]
    assert [len(g) for g in rounds(many)] == [ROUND_LIMIT, 3]


def test_merge_segments_argmax_threshold_and_unclaimed():
    before = np.array([[5, 5, 0, 7]])
    probs = np.array([[[0.9, 0.4, 0.6, 0.55]], [[0.9, 0.45, 0.2, 0.7]]], np.float32)  # segments 5 and 7
    assert merge_segments(probs, [5, 7], before, "void").tolist() == [[5, 0, 5, 7]]  # tie: the first
    assert merge_segments(probs, [5, 7], before, "keep").tolist() == [[5, 5, 5, 7]]
    assert merge_segments(probs[:0], [], before, "void").tolist() == [[0, 0, 0, 0]]


class ShiftingRefiner:
    """A stand-in for the Refiner: records the items and returns, per item, its masks with every segment's
    map shifted one column right (so each segment moves and one vanishes under another)."""

    def __init__(self):
        self.items = []

    def refine_many(self, items):
        self.items.append(items)
        out = []
        for item in items:
            probs = np.zeros_like(item.probs)
            probs[:, :, 1:] = item.probs[:, :, :-1]
            out.append(RefineResult(probs, np.zeros(probs.shape[1:], np.uint8), list(item.classes),
                                    np.zeros(probs.shape[1:], np.uint8)))
        return out


def test_refine_segments_maps_segments_to_classes_and_back():
    ids = np.array([[1, 1, 2, 0, 3, 3],
                    [1, 1, 2, 0, 3, 9]])
    info = [{"id": 1, "category_id": PERSON, "score": 0.9}, {"id": 2, "category_id": PERSON},
            {"id": 3, "category_id": SKY}, {"id": 9, "category_id": CAR}]
    fake = ShiftingRefiner()
    image = np.zeros((2, 6, 3), np.uint8)
    refined = refine_segments(fake, image, ids, info, {c["id"]: c for c in CATEGORIES})
    (items,) = fake.items  # one refine_many call; two rounds, each with unique names
    assert [list(item.classes) for item in items] == [["person", "sky", "car"], ["person"]]
    assert np.array_equal(items[1].probs[0], (ids == 2).astype(np.float32))
    # shifted right: column 0 unclaimed (VOID), segment 2 covers the old VOID column, 9 lost to the shift
    assert refined.ids.tolist() == [[0, 1, 1, 2, 0, 3], [0, 1, 1, 2, 0, 3]]
    assert refined.vanished == [9]
    assert refined.segments_info == [
        {"id": 1, "category_id": PERSON, "score": 0.9, "area": 4, "bbox": [1, 0, 2, 2]},
        {"id": 2, "category_id": PERSON, "area": 2, "bbox": [3, 0, 1, 2]},
        {"id": 3, "category_id": SKY, "area": 2, "bbox": [5, 0, 1, 2]}]
    kept = refine_segments(ShiftingRefiner(), image, ids, info, {c["id"]: c for c in CATEGORIES}, "keep")
    assert kept.ids[:, 0].tolist() == [1, 1]


def test_refine_segments_refuses_a_size_mismatch():
    with pytest.raises(G4SegError, match="must have the same size"):
        refine_segments(ShiftingRefiner(), np.zeros((3, 6, 3), np.uint8), np.zeros((2, 6), np.int64), [], {})


# ----- refine-panoptic end to end on tiny models -------------------------------------------------------

@pytest.fixture
def panoptic_scene(tmp_path):
    """A 40 x 48 photo-like image and its panoptic prediction: two persons (one category), sky, a car, VOID."""
    h, w = 40, 48
    yy, xx = np.mgrid[:h, :w]
    image = np.where((yy < 14)[..., None], [120, 170, 230], [90, 120, 60]).astype(np.uint8)
    ids = np.zeros((h, w), np.int64)
    ids[:14] = 300  # sky (an id over 255: uses the G channel)
    ids[((yy - 26) ** 2 + (xx - 12) ** 2) < 60] = 5
    ids[18:36, 26:32] = 70000  # uses the B channel
    ids[30:34, 38:46] = 8
    image[ids == 5] = [200, 60, 50]
    image[ids == 70000] = [210, 80, 60]
    image[ids == 8] = [40, 40, 40]
    info = [{"id": 5, "category_id": PERSON}, {"id": 300, "category_id": SKY}, {"id": 70000, "category_id": PERSON},
            {"id": 8, "category_id": CAR}]
    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "street.jpg")
    write_panoptic(tmp_path / "pred", tmp_path / "pred.json", {"street": (ids, info)})
    return tmp_path, ids


def _refine(t: Path, out: Path, config_file, *args):
    return _invoke("refine-panoptic", t / "images", "--pred-dir", t / "pred", "--pred-json", t / "pred.json",
                   "--out", out, "--config", config_file, *args)


def test_refine_panoptic_beta_one_gives_back_the_input_and_pq_100(panoptic_scene, config_file):
    t, ids = panoptic_scene
    out = t / "out"
    result = _refine(t, out, config_file, "--beta", "1", "--backbone", "sd21", "-o", "injector.rule=eq5")
    assert result.exit_code == 0, result.output
    assert "refined 1 images, 4 segments (0 vanished)" in result.output
    assert np.array_equal(rgb2id(np.asarray(Image.open(out / "street.png").convert("RGB"))), ids)
    written = json.loads((out / "pred.json").read_text())
    info = written["annotations"][0]["segments_info"]
    assert [(s["id"], s["category_id"]) for s in info] == [(5, PERSON), (300, SKY), (70000, PERSON), (8, CAR)]
    assert [s["area"] for s in info] == [int((ids == s["id"]).sum()) for s in info]
    assert info[3]["bbox"] == [38, 30, 8, 4] and info[1]["bbox"] == [0, 0, 48, 14]
    assert written["categories"] == CATEGORIES
    report = t / "pq.json"
    scored = _invoke("eval", out, "--panoptic", "--pred-json", out / "pred.json", "--gt-dir", t / "pred",
                     "--gt-json", t / "pred.json", "--json", report)
    assert scored.exit_code == 0, scored.output
    pq = json.loads(report.read_text())
    assert (pq["PQ"], pq["SQ"], pq["RQ"], pq["n"]) == (100.0, 100.0, 100.0, 3)


def test_refine_panoptic_changes_segments_and_stays_consistent(panoptic_scene, config_file):
    """beta 0.2 over a wide band: segments move, and the output is a valid prediction (eval's checks pass)."""
    t, ids = panoptic_scene
    out = t / "out"
    result = _refine(t, out, config_file, "--beta", "0.2", "--cf", "0,1", "--unclaimed", "keep")
    assert result.exit_code == 0, result.output
    refined = rgb2id(np.asarray(Image.open(out / "street.png").convert("RGB")))
    assert not np.array_equal(refined, ids)
    assert set(np.unique(refined)) <= {0, 5, 300, 70000, 8}
    scored = _invoke("eval", out, "--panoptic", "--pred-json", out / "pred.json", "--gt-dir", t / "pred",
                     "--gt-json", t / "pred.json")
    assert scored.exit_code == 0, scored.output


def test_refine_panoptic_bad_inputs_before_any_model(panoptic_scene, config_file, monkeypatch):
    import g4seg.refiner

    def no_models(*args, **kwargs):
        pytest.fail("a model was built for a bad input")

    monkeypatch.setattr(g4seg.refiner.Refiner, "from_config", no_models)
    t, _ = panoptic_scene
    assert "is the --pred-dir folder" in _one_error_line(_refine(t, t / "pred", config_file))
    assert "the output JSON would overwrite it" in _one_error_line(_refine(t, t, config_file))
    assert "--unclaimed must be void or keep" in _one_error_line(_refine(t, t / "o", config_file, "--unclaimed", "x"))
    _edit_json(t / "pred.json", lambda d: d["annotations"][0].update(file_name="../street.png"))
    assert "has folder parts" in _one_error_line(_refine(t, t / "o", config_file))
    _edit_json(t / "pred.json", lambda d: d["annotations"][0].update(file_name="street.png"))
    (t / "images" / "street.jpg").rename(t / "images" / "road.jpg")
    assert "no image named street.* in" in _one_error_line(_refine(t, t / "o", config_file))
    Image.fromarray(np.zeros((40, 47, 3), np.uint8)).save(t / "images" / "street.png")
    assert "must have the same size" in _one_error_line(_refine(t, t / "o", config_file))
    assert not (t / "o").exists()


def test_refine_panoptic_takes_refines_options(panoptic_scene, config_file, monkeypatch):
    """The shared options are refine's own declarations and parsing: they are listed, and a bad -o or --cf is
    refine's one-line error, before any model is built."""
    import g4seg.refiner

    monkeypatch.setattr(g4seg.refiner.Refiner, "from_config", lambda *a, **k: pytest.fail("a model was built"))
    shown = _invoke("refine-panoptic", "--help").output
    for option in ("--backbone", "--injector", "--extractor", "--beta", "--option", "--config", "--unclaimed"):
        assert option in shown
    t, _ = panoptic_scene
    assert "injector" in _one_error_line(_refine(t, t / "o", config_file, "-o", "injector.no_such_option=1"))
    assert "--cf must be LO,HI" in _one_error_line(_refine(t, t / "o", config_file, "--cf", "0.3"))
    assert "option 'beta'" in _one_error_line(_refine(t, t / "o", config_file, "-o", "beta"))


def test_refine_panoptic_keeps_what_it_wrote_when_an_image_fails(panoptic_scene, config_file, monkeypatch):
    """The second image fails while it is refined: the first one's PNG and JSON entry are written."""
    import g4seg.refiner

    t, ids = panoptic_scene
    Image.fromarray(np.asarray(Image.open(t / "images" / "street.jpg"))).save(t / "images" / "zebra.png")
    write_panoptic(t / "pred", t / "pred.json", {"street": (ids, [{"id": 5, "category_id": PERSON},
                                                                  {"id": 300, "category_id": SKY},
                                                                  {"id": 70000, "category_id": PERSON},
                                                                  {"id": 8, "category_id": CAR}]),
                                                 "zebra": (ids > 0, [{"id": 1, "category_id": CAR}])})

    class FailsSecond(ShiftingRefiner):
        def refine_many(self, items):
            if self.items:
                raise RuntimeError("out of memory")
            return super().refine_many(items)

    monkeypatch.setattr(g4seg.refiner.Refiner, "from_config", lambda *a, **k: FailsSecond())
    out = t / "out"
    assert "RuntimeError: out of memory" in _one_error_line(_refine(t, out, config_file))
    written = json.loads((out / "pred.json").read_text())
    assert [a["image_id"] for a in written["annotations"]] == ["street"]
    assert (out / "street.png").exists() and not (out / "zebra.png").exists()
