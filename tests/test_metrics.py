"""The mIoU against hand-counted confusion matrices and against mmseg's formula written with torch.histc."""

import math

import numpy as np
import pytest

from g4seg.metrics import Areas, IoUAccumulator, image_iou, intersect_and_union, iou_percent, mean_iou

# Image 1, 4 classes (0..3), 255 = ignore.
LABEL_1 = np.array([[0, 0, 1, 1],
                    [0, 255, 1, 2],
                    [255, 255, 2, 2]])
PRED_1 = np.array([[0, 1, 1, 1],
                   [3, 0, 2, 2],
                   [3, 3, 2, 0]])
# Counted by hand over the 9 non-ignored pixels (rows = label, columns = prediction):
#   label 0: pred 0 x1, pred 1 x1, pred 3 x1      label area 3
#   label 1: pred 1 x2, pred 2 x1                 label area 3
#   label 2: pred 2 x2, pred 0 x1                 label area 3
# pred areas: 0 -> 2, 1 -> 3, 2 -> 3, 3 -> 1 (the three predictions on ignored pixels do not count)
# intersections: 1, 2, 2, 0; unions: 2+3-1 = 4, 3+3-2 = 4, 3+3-2 = 4, 1+0-0 = 1.
# Class 3 appears only in the prediction: IoU 0, and it counts in the mean.


def test_one_image_by_hand():
    areas = intersect_and_union(PRED_1, LABEL_1, num_classes=4)
    assert areas.intersect.tolist() == [1, 2, 2, 0]
    assert areas.pred.tolist() == [2, 3, 3, 1]
    assert areas.label.tolist() == [3, 3, 3, 0]
    assert areas.union.tolist() == [4, 4, 4, 1]
    assert iou_percent(areas).tolist() == [25.0, 50.0, 50.0, 0.0]
    assert mean_iou(areas) == pytest.approx(31.25)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    areas = intersect_and_union(PRED_1, LABEL_1, num_classes=5)
    iou = iou_percent(areas)
    assert math.isnan(iou[4])
    assert iou[:4].tolist() == [25.0, 50.0, 50.0, 0.0]
    assert mean_iou(areas) == pytest.approx(31.25)


def test_counts_are_summed_over_the_dataset_not_averaged_per_image():
    # image 2: a 2x2 image of class 3, predicted right -> class 3 gets intersection 4, union 4
    acc = IoUAccumulator(num_classes=4)
    acc.update(PRED_1, LABEL_1)
    second = acc.update(np.full((2, 2), 3), np.full((2, 2), 3))
    assert iou_percent(second)[3] == 100.0
    # class 3 over the dataset: intersection 0 + 4, union 1 + 4 -> 80 (the per-image mean would be 50)
    assert acc.iou().tolist() == [25.0, 50.0, 50.0, 80.0]
    assert acc.miou() == pytest.approx((25 + 50 + 50 + 80) / 4)
    assert acc.images == 2


def test_out_of_range_values_belong_to_no_class():
    label = np.array([[0, 1, 9, 255]])  # 9 is not a class but not ignored either
    pred = np.array([[255, 1, 1, 0]])  # 255 in a prediction is "no class", not "ignore"
    areas = intersect_and_union(pred, label, num_classes=2)
    # pixel 0: label 0 missed (pred 255 counts nowhere); pixel 2: pred 1 on label 9 is a false positive
    assert areas.label.tolist() == [1, 1]
    assert areas.pred.tolist() == [0, 2]
    assert areas.intersect.tolist() == [0, 1]
    assert areas.union.tolist() == [1, 2]
    assert mean_iou(areas) == pytest.approx(25.0)


def test_image_iou_is_the_mean_over_classes_present_in_label_or_prediction():
    assert image_iou(intersect_and_union(PRED_1, LABEL_1, num_classes=21)) == pytest.approx(31.25)
    assert math.isnan(image_iou(intersect_and_union(PRED_1, np.full((3, 4), 255), num_classes=4)))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        intersect_and_union(np.zeros((2, 2)), np.zeros((2, 3)), num_classes=2)


def _mmseg_reference(preds, labels, num_classes, ignore_index=255):
    """mmseg's IoUMetric.intersect_and_union + compute_metrics, written out with torch.histc."""
    import torch

    results = []
    for pred, label in zip(preds, labels):
        pred = torch.from_numpy(pred)
        label = torch.from_numpy(label).to(pred)
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        hist = [torch.histc(x.float(), bins=num_classes, min=0, max=num_classes - 1) for x in (intersect, pred, label)]
        results.append((hist[0], hist[1] + hist[2] - hist[0]))
    inter = sum(r[0] for r in results)
    union = sum(r[1] for r in results)
    iou = (inter / union).numpy()
    return inter.numpy(), union.numpy(), iou, np.round(np.nanmean(iou) * 100, 2)


@pytest.mark.parametrize("num_classes", [4, 21, 60])
def test_matches_mmseg_formula_on_random_maps(num_classes):
    rng = np.random.default_rng(num_classes)
    preds, labels = [], []
    for size in ((7, 9), (16, 5), (12, 12), (3, 30)):
        # the last class (histc's closed right edge), values outside 0..K-1, ignored labels, class 1 only
        # in predictions, and class 2 nowhere
        values = np.concatenate([np.arange(0, num_classes, 3), [num_classes - 1, num_classes + 3, 255]])
        labels.append(rng.choice(values, size=size).astype(np.int64))
        preds.append(rng.choice(np.concatenate([values, [1]]), size=size).astype(np.int64))
    acc = IoUAccumulator(num_classes)
    for pred, label in zip(preds, labels):
        acc.update(pred, label)
    inter, union, iou, miou = _mmseg_reference(preds, labels, num_classes)
    assert acc.total.intersect.tolist() == inter.astype(int).tolist()
    assert acc.total.union.tolist() == union.astype(int).tolist()
    np.testing.assert_allclose(acc.iou(), iou * 100, rtol=1e-6, equal_nan=True)
    assert np.isnan(acc.iou()[2]) and acc.total.label[num_classes - 1] > 0 and acc.total.label[1] == 0
    assert round(acc.miou(), 2) == pytest.approx(miou)


def test_areas_add_up():
    a = intersect_and_union(PRED_1, LABEL_1, 4)
    total = Areas.zeros(4) + a + a
    assert total.intersect.tolist() == [2, 4, 4, 0] and total.union.tolist() == [8, 8, 8, 2]
