"""vlab.analysis.stats: summaries, the Mann-Whitney test and the A/B verdicts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vlab._errors import UsageError
from vlab.analysis.stats import compare_samples, cv, mann_whitney_u, summarize


def _base(n: int, seed: int, sd: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100.0 * (1.0 + sd * rng.standard_normal(n))


def _scaled(a: np.ndarray, factor: float, seed: int = 99) -> np.ndarray:
    """The same samples times `factor`, shuffled: the median ratio is exactly `factor`."""
    return np.random.default_rng(seed).permutation(a) * factor


# ------------------------------------------------------------------------------ summarize

def test_summarize_keys_and_values():
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    s = summarize(x)
    assert list(s) == ["n", "mean", "median", "stdev", "min", "max", "p90", "p99"]
    assert s["n"] == 8 and isinstance(s["n"], int)
    assert s["mean"] == pytest.approx(np.mean(x))
    assert s["median"] == pytest.approx(3.5)
    assert s["stdev"] == pytest.approx(np.std(x, ddof=1))
    assert (s["min"], s["max"]) == (1.0, 9.0)
    assert s["p90"] == pytest.approx(np.percentile(x, 90))
    assert s["p99"] == pytest.approx(np.percentile(x, 99))
    assert all(isinstance(s[k], float) for k in s if k != "n")


def test_summarize_single_and_empty():
    s = summarize([7])
    assert s["n"] == 1 and s["stdev"] == 0.0 and s["median"] == 7.0 and s["p99"] == 7.0
    e = summarize([])
    assert e["n"] == 0 and all(e[k] is None for k in e if k != "n")


def test_summarize_rejects_non_finite():
    with pytest.raises(UsageError):
        summarize([1.0, float("nan")])


def test_cv():
    assert cv([10.0, 10.0, 10.0]) == 0.0
    assert cv([1.0]) is None
    assert cv([-1.0, 1.0]) is None  # mean 0
    assert cv([9.0, 11.0]) == pytest.approx(np.std([9, 11], ddof=1) / 10.0)


# ------------------------------------------------------------------------- Mann-Whitney U

def _brute_u(a, b) -> float:
    return sum((x > y) + 0.5 * (x == y) for x in a for y in b)


def test_mann_whitney_small_exact_formula():
    r = mann_whitney_u([1, 2, 3], [4, 5, 6])
    assert r["u"] == 0.0
    # z = (|0 - 4.5| - 0.5) / sqrt(3*3/12 * 7), p = erfc(|z|/sqrt 2)
    z = 4.0 / math.sqrt(9 / 12 * 7)
    assert r["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-12)
    assert r["p_value"] == pytest.approx(0.0809, abs=1e-4)


def test_mann_whitney_ties_match_brute_force_and_correction():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, 40).astype(float)
    b = rng.integers(1, 6, 30).astype(float)
    r = mann_whitney_u(a, b)
    assert r["u"] == pytest.approx(_brute_u(a, b))
    n1, n2, n = 40, 30, 70
    _, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    var = n1 * n2 / 12 * ((n + 1) - np.sum(counts**3 - counts) / (n * (n - 1)))
    diff = r["u"] - n1 * n2 / 2
    z = math.copysign(abs(diff) - 0.5, diff) / math.sqrt(var)
    assert r["z"] == pytest.approx(z)


def test_mann_whitney_all_tied():
    assert mann_whitney_u([2, 2, 2], [2, 2])["p_value"] == 1.0


# ------------------------------------------------------------------------ compare_samples

def test_ratio_one_is_not_significant():
    a = _base(200, 1)
    res = compare_samples(a, _scaled(a, 1.0))
    assert res["ratio"] == pytest.approx(1.0)
    assert not res["significant"] and res["verdict"] == "not significant"
    # an independent draw of the same distribution
    res2 = compare_samples(a, _base(200, 2))
    assert res2["verdict"] == "not significant"
    assert res2["ci_low"] < 1.0 < res2["ci_high"]


def test_ratio_one_and_a_half_is_slower():
    a = _base(200, 1)
    res = compare_samples(a, _scaled(a, 1.5))
    assert res["statistic"] == "median"
    assert res["ratio"] == pytest.approx(1.5)
    assert res["significant"] and res["p_value"] < 1e-6
    assert res["ci_low"] > 1.0 and res["ci_low"] <= 1.5 <= res["ci_high"]
    assert res["verdict"] == "1.50x slower"


def test_faster_and_higher_is_better_flip_the_words():
    a = _base(200, 1)
    assert compare_samples(a, _scaled(a, 0.5))["verdict"] == "2.00x faster"
    assert compare_samples(a, _scaled(a, 1.5), higher_is_better=True)["verdict"] == "1.50x faster"
    assert compare_samples(a, _scaled(a, 0.5), higher_is_better=True)["verdict"] == "2.00x slower"


def test_small_but_significant_change_is_within_min_effect():
    a = _base(5000, 4, sd=0.01)
    res = compare_samples(a, _scaled(a, 1.01), n_boot=300)
    assert res["significant"]
    assert res["verdict"] == "within ±2%"
    assert compare_samples(a, _scaled(a, 1.01), n_boot=300, min_effect=0.005)["verdict"] \
        == "1.01x slower"


def test_single_sample_rows_have_no_test():
    res = compare_samples([100.0], [150.0])
    assert res["p_value"] is None and res["ci_low"] is None and not res["significant"]
    assert res["verdict"] == "1.50x slower (n=1, no test)"
    assert compare_samples([100.0, 101.0], [100.5])["verdict"] == "within ±2% (n=1, no test)"


def test_deterministic_and_seeded():
    a, b = _base(50, 5), _base(50, 6) * 1.1
    r1, r2 = compare_samples(a, b), compare_samples(a, b)
    assert (r1["ci_low"], r1["ci_high"], r1["p_value"]) == (r2["ci_low"], r2["ci_high"],
                                                            r2["p_value"])
    r3 = compare_samples(a, b, seed=1)
    assert r3["p_value"] == r1["p_value"] and r3["ci_low"] != r1["ci_low"]


def test_zero_median_and_bad_input():
    res = compare_samples([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert res["ratio"] is None and "undefined" in res["verdict"]
    with pytest.raises(UsageError):
        compare_samples([], [1.0])
    with pytest.raises(UsageError):
        compare_samples([1.0, 2.0], [1.0, 2.0], alpha=1.5)
