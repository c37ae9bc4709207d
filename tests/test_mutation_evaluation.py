"""Unit tests for :mod:`g4seg.evaluation` and :mod:`g4seg.sharding`, written for survivors of mutation testing
(docs/testing.md, fifth run): the sign of the per-class gain, the dataset's name in a result, empty gain bins,
the improved share without any defined image, the bootstrap's default seed, and the exact one-line messages.
Expected numbers are the hand counts of ``tests/test_eval_cli.py``.
"""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from g4seg.errors import G4SegError
from g4seg.evaluation import compare, evaluate
from g4seg.io import save_label_png
from g4seg.plugins import registry
from g4seg.sharding import current_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_eval_cli import make_run  # noqa: E402  (three hand-counted 8x8 VOC images)


@pytest.fixture
def results(tmp_path):
    voc, refined_dir, coarse_dir = make_run(tmp_path)
    dataset = registry().get("dataset", "voc12").build({"root": voc, "split": "val"})
    return dataset, refined_dir, evaluate(refined_dir, dataset), evaluate(coarse_dir, dataset)


def test_class_gain_is_refined_minus_coarse_and_the_result_names_its_dataset(results):
    _, _, refined, coarse = results
    comparison = compare(refined, coarse)
    # cat: refined 24/56 = 300/7, coarse 56/56 = 100; background: 60 against 50 (tests/test_eval_cli.py)
    assert comparison.class_gain["cat"] == pytest.approx(300 / 7 - 100)
    assert comparison.class_gain["background"] == pytest.approx(10.0)
    assert refined.dataset == "voc12" and refined.to_json()["images"] == 3
    assert comparison.seed == 0 and comparison.to_json()["bootstrap_seed"] == 0  # the default seed is 0


def test_empty_bins_and_no_defined_image(results):
    _, _, refined, coarse = results
    nan = float("nan")
    # every coarse per-image IoU in the top bin: the other two are empty, with no mean
    high = replace(coarse, per_image={id: 90.0 for id in coarse.per_image})
    bins = compare(refined, high).bins
    assert [b.count for b in bins] == [0, 0, 3] and [b.mean_gain for b in bins[:2]] == [None, None]
    # no image with a defined per-image IoU: no share of improved or worsened images
    undefined = replace(coarse, per_image={id: nan for id in coarse.per_image})
    comparison = compare(refined, undefined)
    assert comparison.per_image == {}
    assert comparison.improved_fraction is None and comparison.worsened_fraction is None
    assert all(b.count == 0 and b.mean_gain is None for b in comparison.bins)


def test_messages(results, tmp_path):
    dataset, refined_dir, refined, coarse = results
    (refined_dir / "a.png").unlink()
    with pytest.raises(G4SegError) as err:
        evaluate(refined_dir, dataset)
    assert str(err.value) == (f"1 of 3 predictions missing under {refined_dir} (a.png); predictions must be "
                              "named <id>.png for every id of the split")
    save_label_png(refined_dir / "a.png", np.zeros((8, 6), np.uint8))  # 6 wide, 8 high; the label is 8x8
    with pytest.raises(G4SegError) as err:
        evaluate(refined_dir, dataset)
    assert str(err.value) == (f"{refined_dir / 'a.png'} is 6x8 but its label {dataset.label_path('a')} is 8x8; "
                              "save predictions at the label's size")
    # a label that is not square: its width and height in that order too
    save_label_png(dataset.label_path("a"), np.zeros((6, 8), np.uint8))
    save_label_png(refined_dir / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(G4SegError) as err:
        evaluate(refined_dir, dataset)
    assert str(err.value) == (f"{refined_dir / 'a.png'} is 8x8 but its label {dataset.label_path('a')} is 8x6; "
                              "save predictions at the label's size")
    with pytest.raises(G4SegError) as err:
        compare(refined, replace(coarse, per_image={"a": 1.0}))
    assert str(err.value) == ("refined and coarse results cover different classes or images; evaluate both on "
                              "the same dataset split")


def test_launch_messages(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(G4SegError) as err:
        current_shard()
    assert str(err.value) == ("environment variable WORLD_SIZE='two' is not an integer (it is set by torchrun / "
                              "accelerate launch; unset it for a single process)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(G4SegError) as err:
        current_shard()
    assert str(err.value) == "invalid launch: RANK=2 with WORLD_SIZE=2 (need 0 <= RANK < WORLD_SIZE)"


def test_per_image_picture_reads_back(results):
    """What the picture says in words and where it looks: title numbers, axis labels and limits, the diagonal,
    one legend entry per bin (the point series themselves: tests/test_eval_cli.py)."""
    from g4seg.evaluation import per_image_figure

    _, _, refined, coarse = results
    comparison = compare(refined, coarse)
    ax = per_image_figure(comparison, "voc12 val").axes[0]
    low, high = comparison.gain_ci95
    assert ax.get_title() == (f"voc12 val\nmIoU gain {comparison.gain:+.2f} (95% CI [{low:+.2f}, {high:+.2f}]), "
                              "improved 67% of images")  # a 25 -> 100 and c 175/3 -> 100 up, b 100 -> 150/7 down
    assert ax.title.get_fontsize() < ax.xaxis.label.get_fontsize()  # "small"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("coarse per-image IoU (%)", "refined per-image IoU (%)")
    assert ax.get_xlim() == (-2, 102) and ax.get_ylim() == (-2, 102)
    diagonal = ax.lines[0]
    assert diagonal.get_xydata().tolist() == [[0.0, 0.0], [100.0, 100.0]]
    assert (diagonal.get_linestyle(), diagonal.get_linewidth(), diagonal.get_color()) == ("--", 0.8, "grey")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "coarse IoU 0-40 (1 images)", "coarse IoU 40-80 (1 images)", "coarse IoU 80-100 (1 images)"]
