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


# ------------------------------------------------------- worker processes as the unit, FDR

from vlab.analysis.stats import compare_units, fdr_bh  # noqa: E402


def _processes(rng, n_proc: int, center: float, between: float = 0.05, within: float = 0.3,
               n: int = 300) -> list[np.ndarray]:
    """Samples of `n_proc` worker processes: each process has its own offset (placement,
    caches), and its samples scatter widely around it."""
    return [center * (1 + between * rng.standard_normal()) * (1 + within * rng.standard_normal(n))
            for _ in range(n_proc)]


def test_fdr_bh_matches_the_textbook_values_and_keeps_untested_rows():
    q = fdr_bh([0.01, None, 0.04, 0.03, 0.2])
    assert q[1] is None
    assert q[0] == pytest.approx(0.04) and q[2] == pytest.approx(0.04 / 3 * 4)
    assert q[3] == pytest.approx(0.04 / 3 * 4) and q[4] == pytest.approx(0.2)
    assert fdr_bh([]) == [] and fdr_bh([None]) == [None]


def test_compare_units_finds_a_real_change_with_three_processes_a_side():
    rng = np.random.default_rng(1)
    a = [float(np.median(p)) for p in _processes(rng, 3, 100.0)]
    b = [float(np.median(p)) for p in _processes(rng, 3, 200.0)]
    r = compare_units(a, b)
    assert r["test"] == "welch" and r["ci_method"] == "welch"
    assert r["significant"] and r["verdict"].endswith("slower")
    assert r["ci_low"] < r["ratio"] < r["ci_high"] and r["ci_low"] > 1.5


def test_compare_units_uses_an_exact_permutation_test_when_it_can_reach_alpha():
    rng = np.random.default_rng(2)
    a = [float(np.median(p)) for p in _processes(rng, 5, 100.0)]
    b = [float(np.median(p)) for p in _processes(rng, 5, 150.0)]
    r = compare_units(a, b)
    assert r["test"] == "permutation" and r["ci_method"] == "bootstrap"
    assert r["significant"] and r["p_value"] <= 2 / 252 + 1e-9
    # 3 against 3 has 20 arrangements: a permutation test could never reach 0.05
    assert compare_units(a[:3], b[:3])["test"] == "welch"


def test_compare_units_with_one_process_tests_nothing():
    r = compare_units([100.0], [150.0, 151.0])
    assert r["p_value"] is None and not r["significant"] and "no test" in r["verdict"]


def test_a_versus_a_over_many_rows_finds_nothing_when_processes_are_the_unit():
    """Same distribution on both sides, 200 rows, process-level offsets: pooling samples would
    call many rows changed (their samples are not independent); process medians with BH must
    call essentially none."""
    rng = np.random.default_rng(3)
    p_units, p_pooled = [], []
    for _ in range(200):
        pa, pb = _processes(rng, 3, 100.0), _processes(rng, 3, 100.0)
        p_units.append(compare_units([np.median(p) for p in pa], [np.median(p) for p in pb])
                       ["p_value"])
        p_pooled.append(mann_whitney_u(np.concatenate(pa), np.concatenate(pb))["p_value"])
    q_units = fdr_bh(p_units)
    assert sum(q < 0.05 for q in q_units) <= 1
    # the pooled test is fooled by the process offsets: the reason for the unit
    assert sum(p < 0.05 for p in p_pooled) > 50


def test_compare_units_handles_non_positive_values_on_a_linear_scale():
    r = compare_units([-1.0, 1.0, 3.0], [9.0, 10.0, 11.0])
    assert r["ratio"] == pytest.approx(10.0) and r["p_value"] < 0.05
    assert compare_units([-1.0, 0.0, 1.0], [9.0, 10.0, 11.0])["verdict"] == "ratio undefined (A is 0)"


def test_compare_units_interval_has_its_low_end_first_for_a_negative_baseline():
    # exits.nop's single-exit cost is below its baseline (about -78 cycles): the ratio's
    # interval comes from dividing by a negative mean, which swaps its ends
    r = compare_units([-80.0, -78.0, -76.0], [-79.0, -78.0, -77.0])
    assert r["ci_low"] <= r["ratio"] <= r["ci_high"]
