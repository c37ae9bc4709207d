"""Unit tests for :mod:`g4seg.metrics` and :mod:`g4seg.config` written for survivors of mutation testing
(docs/testing.md, sixth run): every field of summed and selected areas, a class of one pixel, labels equal
to K, the all-NaN mean without a warning, the bootstrap's defaults, chunks, one image and no image, the
accumulator's ignore index; the guidance rule, option keys with dots, and the exact one-line messages.
Expected values are worked out by hand in each test.
"""

import warnings

import numpy as np
import pytest

from g4seg import metrics
from g4seg.config import NO_GUIDANCE_TAG, RefineConfig, guidance_refusal, load_config, parse_overrides
from g4seg.errors import G4SegError
from g4seg.metrics import Areas, IoUAccumulator, bootstrap_gain, mean_iou


def areas(*rows):
    return Areas(*(np.array(r, dtype=np.int64) for r in rows))


def test_sum_and_rows_keep_every_field():
    a, b = areas([1, 2], [3, 4], [5, 6], [7, 8]), areas([10, 20], [30, 40], [50, 60], [70, 80])
    total = a + b
    assert [f.tolist() for f in (total.intersect, total.union, total.pred, total.label)] == [
        [11, 22], [33, 44], [55, 66], [77, 88]]
    stacked = Areas.stack([a, b], 2).rows([1, 0])
    assert [f.tolist() for f in (stacked.intersect, stacked.union, stacked.pred, stacked.label)] == [
        [[10, 20], [1, 2]], [[30, 40], [3, 4]], [[50, 60], [5, 6]], [[70, 80], [7, 8]]]


def test_a_label_equal_to_k_is_no_class_and_one_pixel_is_a_whole_iou():
    counted = metrics.intersect_and_union(np.array([[0, 2]]), np.array([[0, 2]]), 2)
    assert counted.label.tolist() == [1, 0] and counted.pred.tolist() == [1, 0]  # 2 is not a class of K = 2
    assert metrics.iou_percent(counted)[0] == 100.0  # one pixel, intersect 1, union 1


def test_mean_of_no_defined_class_is_nan_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(mean_iou(areas([0, 0], [0, 0], [0, 0], [0, 0])))


def paired(n=5, k=3, seed=1):
    rng = np.random.default_rng(seed)
    union = rng.integers(1, 50, (n, k))
    refined, coarse = rng.integers(0, union + 1), rng.integers(0, union + 1)
    return areas(refined, union, union, union), areas(coarse, union, union, union)


def test_bootstrap_defaults_chunks_and_sizes(monkeypatch):
    refined, coarse = paired()
    assert bootstrap_gain(refined, coarse) == bootstrap_gain(refined, coarse, 1000, 0)
    assert bootstrap_gain(refined, coarse, 7, 3) != bootstrap_gain(refined, coarse, 7, 4)
    whole = bootstrap_gain(refined, coarse, 7, 3)
    monkeypatch.setattr(metrics, "BOOTSTRAP_CELLS", 10)  # 5 images: chunks of 2 resamples (2, 2, 2, 1)
    assert [c.shape for c in metrics.resample_counts(5, 7, 3)] == [(2, 5)] * 3 + [(1, 5)]
    assert bootstrap_gain(refined, coarse, 7, 3) == whole  # chunks of one stream: the same draws
    one = bootstrap_gain(refined.rows([0]), coarse.rows([0]), 50, 0)  # one image: every draw is that image
    gain = mean_iou(refined.rows([0]) + Areas.zeros(3)) - mean_iou(coarse.rows([0]) + Areas.zeros(3))
    assert one == pytest.approx((gain, gain))
    assert all(np.isnan(bootstrap_gain(refined.rows([]), coarse.rows([]), 10, 0)))
    low, high = bootstrap_gain(refined, coarse, 1, 0)  # a single resample is allowed: its gain is both ends
    assert low == high and np.isfinite(low)


def test_bootstrap_refuses_unpaired_areas():
    refined, coarse = paired()
    with pytest.raises(ValueError) as err:
        bootstrap_gain(refined, coarse.rows([0, 1]), 10, 0)
    assert str(err.value) == "paired (N, K) areas expected, got (5, 3) and (2, 3)"


def test_accumulator_uses_its_ignore_index():
    acc = IoUAccumulator(2, ignore_index=9)
    counted = acc.update(np.array([[0, 1, 1]]), np.array([[0, 1, 9]]))
    assert counted.union.tolist() == [1, 1] and acc.miou() == 100.0


def test_guidance_rule():
    lcm = {NO_GUIDANCE_TAG}
    assert guidance_refusal(RefineConfig(guidance_scale=2.0), "sd21", set()) is None
    assert guidance_refusal(RefineConfig(), "lcm", lcm) is None
    assert guidance_refusal(RefineConfig(guidance_scale=2.0), "lcm", lcm) == (
        "backbone 'lcm' has no classifier-free guidance branch (its guidance is built in); leave guidance_scale unset")
    assert guidance_refusal(RefineConfig(noise="null-text"), "lcm", lcm) == (
        "backbone 'lcm' has no null-text embedding to optimise (its guidance is built in, no unconditional branch): "
        "use noise = \"add\" or \"ddim-inversion\"")
    assert guidance_refusal(RefineConfig(noise="ddim-inversion"), "lcm", lcm) is None


def test_option_keys_may_hold_dots_and_bad_options_are_exact_lines():
    assert parse_overrides(["backbone.lora.scale=0.5"]) == {"backbone": {"lora.scale": "0.5"}}
    for bad in ("backbone.=x", "backbone=x", "backbone.model"):
        with pytest.raises(G4SegError) as err:
            parse_overrides([bad])
        assert str(err.value) == f"option '{bad}' must look like COMPONENT.KEY=VALUE (e.g. backbone.model=...)"
    with pytest.raises(G4SegError) as err:
        parse_overrides(["unet.model=x"])
    assert str(err.value) == ("option 'unet.model=x': unknown component 'unet' (use backbone, injector, extractor, "
                              "mask_source, postprocessor)")


def test_config_file_messages(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    unreadable = tmp_path / "unreadable.toml"
    unreadable.symlink_to(unreadable)  # a loop: reading it is an OSError other than not-found
    cases = [(tmp_path, f"config file {tmp_path} is a folder; give a TOML file"),
             (binary, f"config file {binary} is not a text (TOML) file"),
             (unreadable, f"cannot read config file {unreadable}: Too many levels of symbolic links")]
    for path, message in cases:
        with pytest.raises(G4SegError) as err:
            load_config(path)
        assert str(err.value) == message
    with pytest.raises(G4SegError) as err:
        load_config(None, beta=2.0, timestep=-1)
    assert str(err.value).startswith("invalid configuration: ") and "; " in str(err.value)
    problems = str(err.value).removeprefix("invalid configuration: ").split("; ")
    assert sorted(p.split(": ")[0] for p in problems) == ["beta", "timestep"]  # field names joined by dots
    assert not any("Value error" in p for p in problems)


def test_a_nested_problem_names_its_path_with_dots():
    with pytest.raises(G4SegError) as err:
        load_config(None, options={"backbone": 5})
    assert str(err.value) == "invalid configuration: options.backbone: Input should be a valid dictionary"
    with pytest.raises(G4SegError) as err:
        load_config(None, cf=(0.8, 0.2))  # a validator's ValueError: pydantic's "Value error, " prefix is dropped
    assert str(err.value) == "invalid configuration: cf: cf must satisfy 0 <= lo <= hi <= 1"


def test_bootstrap_counts_a_one_pixel_class_and_leaves_out_images_with_nothing_defined():
    # one image; class 0 is a single pixel, right in the refined map (IoU 100), wrong in the coarse one (0)
    refined = areas([[1, 0]], [[1, 0]], [[1, 0]], [[1, 0]])
    coarse = areas([[0, 0]], [[1, 0]], [[0, 0]], [[1, 0]])
    assert bootstrap_gain(refined, coarse, 5, 0) == (100.0, 100.0)
    empty = areas([[0, 0]], [[0, 0]], [[0, 0]], [[0, 0]])  # every pixel ignored: no defined gain at all
    assert all(np.isnan(bootstrap_gain(empty, empty, 5, 0)))
