"""Unit tests for :mod:`g4seg.masks` written for survivors of mutation testing (docs/testing.md, sixth run):
explicit rule settings over a source's rule, SCLIP's area filter when the last class wins nowhere, a score
equal to prob_thd, no class at all, and one_hot. Expected label maps are worked out by hand.
"""

import numpy as np

from g4seg.config import RefineConfig
from g4seg.masks import MergeRule, merge_pow, merge_sclip, one_hot, resolve_rule


def test_explicit_settings_override_the_sources_rule_of_the_same_mode():
    hint = MergeRule("sclip", prob_thd=0.3, area_thd=0.1)
    rule = resolve_rule(RefineConfig(merge="auto", area_thd=0.25), hint, has_background=True)
    assert (rule.mode, rule.prob_thd, rule.area_thd) == ("sclip", 0.3, 0.25)
    rule = resolve_rule(RefineConfig(merge="pow", bg_power=2.0), hint, has_background=True)
    assert (rule.mode, rule.power, rule.area_thd) == ("pow", 2.0, None)  # another mode: defaults, not the hint's


def test_sclip_area_filter_with_a_class_that_wins_nowhere():
    # background 0.1 everywhere; class 1 wins the 3 left pixels, class 2 the right one, class 3 nowhere
    probs = np.array([[[0.9, 0.9, 0.9, 0.0]], [[0.0, 0.0, 0.0, 0.8]], [[0.05, 0.05, 0.05, 0.05]]], np.float32)
    background = np.full((1, 4), 0.1, np.float32)
    # area shares 3/4, 1/4, 0: an area threshold of 0.3 drops classes 2 and 3
    assert merge_sclip(probs, background, 0.0, 0.3).tolist() == [[1, 1, 1, 0]]
    assert merge_sclip(probs, background, 0.0, None).tolist() == [[1, 1, 1, 2]]
    # a score equal to prob_thd keeps its class; only a lower one becomes background
    assert merge_sclip(probs, background, 0.8, None).tolist() == [[1, 1, 1, 2]]
    assert merge_sclip(probs, background, 0.85, None).tolist() == [[1, 1, 1, 0]]


def test_no_class_at_all_is_all_background():
    labels = merge_pow(np.zeros((0, 2, 3), np.float32), 1.0)
    assert labels.dtype == np.uint8 and labels.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_one_hot_maps_classes_1_to_k():
    labels = np.array([[0, 1, 2], [3, 2, 255]], np.uint8)
    maps = one_hot(labels, 2)
    assert maps.dtype == np.float32 and maps.shape == (2, 2, 3)
    assert maps[0].tolist() == [[0, 1, 0], [0, 0, 0]] and maps[1].tolist() == [[0, 0, 1], [0, 1, 0]]
