"""tools/mutate.py's sampled retest: which mutants it draws and the score it estimates from them.

The estimate is checked on a hand-made module of six mutants; the interval against the equation that
defines Wilson's score interval (its ends are the p with (k/n - p)^2 = z^2 p (1 - p) / n).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import mutate  # noqa: E402

STATUSES = {"a": "killed", "b": "survived", "c": "not checked", "d": "not checked", "e": "not checked",
            "f": "not checked", "g": "no tests"}


def test_what_mutmut_did_not_kill_is_retested_or_sampled():
    keys, drawn = mutate.retest_keys(STATUSES, None, 0)
    assert keys == ["b", "c", "d", "e", "f", "g"] and drawn == []  # "a" was killed: more tests cannot revive it
    keys, drawn = mutate.retest_keys(STATUSES, 2, 0)
    assert keys == drawn and len(drawn) == 2 and set(drawn) < {"b", "c", "d", "e", "f", "g"}
    assert mutate.retest_keys(STATUSES, 2, 0) == (keys, drawn)  # seeded
    assert {tuple(mutate.retest_keys(STATUSES, 2, seed)[1]) for seed in range(20)} != {tuple(drawn)}
    assert sorted(mutate.retest_keys(STATUSES, 10, 0)[1]) == ["b", "c", "d", "e", "f", "g"]  # never more than there are


@pytest.mark.parametrize("k, n", [(0, 5), (1, 2), (8, 10), (37, 40), (40, 40)])
def test_wilson_ends_solve_the_score_equation(k, n):
    z = 1.96
    lo, hi = mutate.wilson(k, n, z)
    assert 0 <= lo <= k / n <= hi <= 1
    for p in (lo, hi):
        if 0 < p < 1:
            assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, abs=1e-12)


def test_estimate_counts_what_is_known_and_scales_the_sample():
    retested = {"b": "killed", "c": "survived"}
    estimate = mutate.estimate(STATUSES, retested, ["b", "c"])
    # known: a (mutmut) and b (retest) killed, c not; d, e, f, g at the sample's share 1/2: (2 + 0.5 x 4) / 7
    assert estimate["sample"] == 2 and estimate["sample_killed_share"] == 0.5 and estimate["not_retested"] == 4
    assert estimate["score"] == pytest.approx(4 / 7)
    lo, hi = mutate.wilson(1, 2)
    assert estimate["ci95"] == pytest.approx([(2 + 4 * lo) / 7, (2 + 4 * hi) / 7])
    assert mutate.estimate(STATUSES, {"b": "killed"}, ["c"]) is None  # the drawn mutant was not reached
