"""The signed-distance ramp of hard masks and the merge rules, against hand-made cases and the baselines' code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from g4seg import masks
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.masks import MergeRule


def test_is_hard_includes_the_background_channel():
    assert masks.is_hard(np.array([[[0.0, 1.0]]]))
    assert not masks.is_hard(np.array([[[0.0, 0.5]]]))
    assert not masks.is_hard(np.array([[[0.0, 1.0]]]), np.array([[0.5, 0.0]]))


def test_ramp_values_by_hand():
    """A 3-pixel class in a 7-pixel row, width 2: sd = -1.5, -0.5, 0.5, 1.5, 0.5, -0.5, -1.5; p = 0.5 + sd / 4."""
    labels = np.array([[0, 0, 1, 1, 1, 0, 0]], np.uint8)
    expected = [0.125, 0.375, 0.625, 0.875, 0.625, 0.375, 0.125]
    np.testing.assert_allclose(masks.ramp(labels, 1, 2.0)[0, 0], expected)
    # a diagonal neighbour is sqrt(2) away: sd = -(sqrt(2) - 0.5)
    corner = np.zeros((3, 3), np.uint8)
    corner[1, 1] = 1
    np.testing.assert_allclose(masks.ramp(corner, 1, 1.0)[0, 0, 0], 0.5 - (np.sqrt(2) - 0.5) / 2)
    np.testing.assert_allclose(masks.ramp(corner, 1, 1.0)[0, 1, 1], 0.75)


def test_ramp_edge_cases():
    labels = np.array([[1, 1], [1, 1]], np.uint8)
    ramps = masks.ramp(labels, 3, 5.0)
    assert ramps.dtype == np.float32 and ramps.shape == (3, 2, 2)
    assert (ramps[0] == 1).all() and (ramps[1:] == 0).all()  # whole map / absent classes
    two = np.array([[1, 2, 0]], np.uint8)
    np.testing.assert_array_equal(masks.ramp(two, 2, 0.0), [[[1, 0, 0]], [[0, 1, 0]]])  # width 0 keeps it hard


label_maps = st.integers(1, 4).flatmap(lambda k: st.tuples(
    st.just(k),
    arrays(np.uint8, st.tuples(st.integers(1, 23), st.integers(1, 23)), elements=st.integers(0, k)),
    st.floats(0.3, 400.0),
))


@settings(max_examples=300, deadline=None)
@given(label_maps)
def test_hard_rule_gives_back_any_label_map_from_its_ramp(case):
    """Property: random label maps (single pixels, one-pixel lines, corners, any size) survive ramp + merge."""
    k, labels, width = case
    ramps = masks.ramp(labels, k, width)
    inside = labels[None] == np.arange(1, k + 1)[:, None, None]
    assert (ramps[inside] > 0.5).all() and (ramps[~inside] < 0.5).all()
    np.testing.assert_array_equal(masks.HARD_RULE.labels(ramps), labels)


@settings(max_examples=100, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 1)))
def test_hard_labels_of_a_01_stack(stack):
    """The first class holding 1 wins, background elsewhere; a background channel of 1 means background."""
    probs = stack[1:].astype(np.float32)
    labels = masks.hard_labels(probs)
    for (y, x), label in np.ndenumerate(labels):
        ones = np.flatnonzero(probs[:, y, x] == 1)
        assert label == (ones[0] + 1 if ones.size else 0)
    with_bg = masks.hard_labels(probs, stack[0].astype(np.float32))
    assert (with_bg[stack[0] == 1] == 0).all()
    np.testing.assert_array_equal(with_bg[stack[0] == 0], labels[stack[0] == 0])


def test_threshold_and_argmax_bg_by_hand():
    probs = np.array([[[0.9, 0.2, 0.3]], [[0.1, 0.4, 0.7]]], np.float32)
    ignore = np.array([[False, False, True]])
    assert MergeRule("threshold", bg_threshold=0.5).labels(probs, None, ignore).tolist() == [[1, 0, 255]]
    assert MergeRule("threshold", bg_threshold=0.0).labels(probs).tolist() == [[1, 2, 2]]
    background = np.array([[0.95, 0.3, 0.7]], np.float32)  # ties go to the background
    assert MergeRule("argmax-bg").labels(probs, background).tolist() == [[0, 2, 0]]
    with pytest.raises(G4SegError, match="argmax-bg' needs a background channel"):
        MergeRule("argmax-bg").labels(probs)


def sclip_postprocess(seg_logits: torch.Tensor, prob_thd: float, area_thd: float | None) -> torch.Tensor:
    """SCLIP's ``CLIPForSegmentation.postprocess_result``, its label part, as published.

    wangf3014/SCLIP@b56bd30, clip_segmentor.py lines 162-170, applied to per-class scores (background
    first) after the softmax and synonym max of lines 152-160:

        if self.area_thd is not None:
            predictions = nn.functional.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
            area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
            area_pred = (area_pred > self.area_thd * area_pred.sum()).to(seg_logits.dtype)
            seg_logits[1:] *= area_pred.transpose(0, -1)
        seg_pred = seg_logits.argmax(0, keepdim=True)
        seg_pred[seg_logits.max(0, keepdim=True)[0] < self.prob_thd] = 0
    """
    seg_logits = seg_logits.clone()
    num_cls = seg_logits.shape[0]
    if area_thd is not None:
        predictions = torch.nn.functional.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_pred[0]


def clip_es_labels(cams: np.ndarray, cam_eval_thres: float) -> np.ndarray:
    """CLIP-ES ``eval_cam.py`` (linyq2117/CLIP-ES@3893f81, lines 58-66) for a CAM stack without 'bg':

        if args.cam_eval_thres < 1:
            cams = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode='constant', constant_values=args.cam_eval_thres)
        else:
            bg_score = np.power(1 - np.max(cams, axis=0, keepdims=True), args.cam_eval_thres)
            cams = np.concatenate((bg_score, cams), axis=0)
        keys = np.pad(cam_dict['keys'] + 1, (1, 0), mode='constant')
        cls_labels = np.argmax(cams, axis=0)
        cls_labels = keys[cls_labels].astype(np.uint8)

    ``keys`` are all K classes here (label k + 1 for map k).
    """
    if cam_eval_thres < 1:
        cams = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=cam_eval_thres)
    else:
        bg_score = np.power(1 - np.max(cams, axis=0, keepdims=True), cam_eval_thres)
        cams = np.concatenate((bg_score, cams), axis=0)
    keys = np.pad(np.arange(cams.shape[0] - 1) + 1, (1, 0), mode="constant")
    return keys[np.argmax(cams, axis=0)].astype(np.uint8)


def random_scores(seed: int, k: int, h: int, w: int, softmax: bool = True) -> np.ndarray:
    """(k, h, w) scores; with ``softmax`` they sum to 1 over k, like SCLIP's (background included)."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(k, h, w)) * rng.uniform(0.5, 6))
    return (logits.softmax(0) if softmax else logits.sigmoid()).float().numpy()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("prob_thd, area_thd", [(0.0, None), (0.1, None), (0.1, 0.1), (0.3, 0.05), (0.6, 0.2)])
def test_sclip_rule_matches_sclip_code(seed, prob_thd, area_thd):
    rng = np.random.default_rng(seed)
    scores = random_scores(seed, int(rng.integers(2, 7)), int(rng.integers(1, 20)), int(rng.integers(1, 20)))
    expected = sclip_postprocess(torch.from_numpy(scores), prob_thd, area_thd).numpy()
    rule = MergeRule("sclip", prob_thd=prob_thd, area_thd=area_thd)
    np.testing.assert_array_equal(rule.labels(scores[1:], scores[0]), expected)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("power", [1.0, 2.0, 3.5])
def test_pow_rule_matches_clip_es_code(seed, power):
    rng = np.random.default_rng(seed)
    cams = random_scores(seed, int(rng.integers(1, 6)), int(rng.integers(1, 20)), int(rng.integers(1, 20)), False)
    np.testing.assert_array_equal(MergeRule("pow", power=power).labels(cams), clip_es_labels(cams, power))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9])
def test_threshold_rule_matches_clip_es_padding(seed, threshold):
    """CLIP-ES's cam_eval_thres < 1 branch pads a constant background: the threshold rule (no exact ties here)."""
    rng = np.random.default_rng(seed)
    cams = random_scores(seed, int(rng.integers(1, 6)), int(rng.integers(1, 20)), int(rng.integers(1, 20)), False)
    expected = clip_es_labels(cams, threshold)
    np.testing.assert_array_equal(MergeRule("threshold", bg_threshold=threshold).labels(cams), expected)


def test_sclip_rule_without_background_channel_uses_zero():
    probs = np.array([[[0.05, 0.6]], [[0.02, 0.3]]], np.float32)
    assert MergeRule("sclip", prob_thd=0.1).labels(probs).tolist() == [[0, 1]]


@pytest.mark.parametrize("merge, hint, background, expected", [
    ("auto", None, False, MergeRule("threshold")),
    ("auto", None, True, MergeRule("argmax-bg")),
    ("auto", MergeRule("sclip", prob_thd=0.1, area_thd=0.1), True, MergeRule("sclip", prob_thd=0.1, area_thd=0.1)),
    ("sclip", None, True, MergeRule("sclip", prob_thd=0.0, area_thd=None)),
    ("pow", MergeRule("sclip", prob_thd=0.1), False, MergeRule("pow", power=1.0)),
])
def test_resolve_rule_prefers_config_then_source_then_defaults(merge, hint, background, expected):
    assert masks.resolve_rule(RefineConfig(merge=merge), hint, background) == expected


def test_resolve_rule_explicit_parameters_override_the_source():
    hint = MergeRule("sclip", prob_thd=0.1, area_thd=0.1)
    config = RefineConfig(prob_thd=0.25, bg_threshold=0.3)
    assert masks.resolve_rule(config, hint, True) == MergeRule("sclip", bg_threshold=0.3, prob_thd=0.25,
                                                               area_thd=0.1)
    assert masks.resolve_rule(RefineConfig(merge="pow", bg_power=3.0), None, False).power == 3.0
