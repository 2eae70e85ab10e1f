"""Summary statistics and A/B comparison of measured samples; the tests come from scipy.stats.

`summarize` gives the per-row statistics of the results file (`n, mean, median, stdev, min, max,
p90, p99`).

Two comparisons, for two kinds of data:

* `compare_units` is what `vlab compare` uses for measured rows. **The unit of replication is the
  worker process**: samples of one process share its CPU placement, caches, page-table layout
  and calibration, so they are not independent, and pooling them as if they were makes p-values
  far too small. Each process is reduced to its **median** (timing samples are skewed by
  interrupts and preemptions; a median ignores a few descheduled samples) and the test compares
  the log process medians (effects on time are multiplicative). With enough processes for a rank
  test to reach `alpha` (C(n_a+n_b, n_a) >= 2/alpha: 4 against 4, or 3 against 5) it is an exact
  permutation test (`scipy.stats.permutation_test`); with fewer, where no rank or permutation
  test can ever reach p < 0.05 (3 against 3 has 20 arrangements: the smallest two-sided p is
  0.1), Welch's t-test (`scipy.stats.ttest_ind`, equal_var=False). The interval is a percentile
  bootstrap (`scipy.stats.bootstrap`) of the ratio of geometric means with 5 or more processes a
  side, and Welch's t interval below that, where a bootstrap of 3 values is too narrow.
* `compare_samples` compares two sets of independent samples (e.g. per-page costs within one
  model): a Mann-Whitney U test and a bootstrap interval of the ratio of medians.

`fdr_bh` applies Benjamini-Hochberg false-discovery control across all rows of one comparison
(`scipy.stats.false_discovery_control`). Every verdict calls a change only when it is significant
*and* larger than `min_effect` (Firecracker's A/B rule).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vlab._errors import UsageError

__all__ = ["summarize", "cv", "mann_whitney_u", "compare_samples", "compare_units", "fdr_bh"]

SUMMARY_KEYS = ("n", "mean", "median", "stdev", "min", "max", "p90", "p99")


def _as_array(samples: Iterable[float] | np.ndarray, what: str = "samples") -> np.ndarray:
    try:
        arr = np.asarray(list(samples) if not isinstance(samples, np.ndarray) else samples,
                         dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} must be numbers: {exc}") from None
    if arr.size and not np.all(np.isfinite(arr)):
        raise UsageError(f"{what} must be finite numbers (found NaN or infinity)")
    return arr


def summarize(samples: Iterable[float] | np.ndarray) -> dict[str, Any]:
    """Statistics of one set of samples, keyed exactly `n, mean, median, stdev, min, max, p90,
    p99`.

    `n` is an int, the rest floats. `stdev` is the sample standard deviation (ddof=1) and 0.0
    when n < 2. Percentiles use linear interpolation between order statistics. An empty input
    gives n=0 and None for every other key, so a row can still be written.
    """
    arr = _as_array(samples)
    n = int(arr.size)
    if n == 0:
        return {"n": 0, **{k: None for k in SUMMARY_KEYS[1:]}}
    p90, p99 = np.percentile(arr, [90.0, 99.0])
    return {
        "n": n,
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "stdev": float(arr.std(ddof=1)) if n >= 2 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "p90": float(p90),
        "p99": float(p99),
    }


def cv(samples: Iterable[float] | np.ndarray) -> float | None:
    """Coefficient of variation: sample stdev / |mean|. None when n < 2 or the mean is 0."""
    arr = _as_array(samples)
    if arr.size < 2:
        return None
    mean = float(arr.mean())
    if mean == 0.0:
        return None
    return float(arr.std(ddof=1)) / abs(mean)


def mann_whitney_u(a: Iterable[float] | np.ndarray,
                   b: Iterable[float] | np.ndarray) -> dict[str, float]:
    """Two-sided Mann-Whitney U test of A vs B, from `scipy.stats.mannwhitneyu` (normal
    approximation, tie-corrected variance, 0.5 continuity correction).

    Returns `u` (the U statistic of A), `z` (the signed standard score that p comes from) and
    `p_value`. With every value tied the test has no information and p is 1.
    """
    x = _as_array(a, "samples of A")
    y = _as_array(b, "samples of B")
    if x.size == 0 or y.size == 0:
        raise UsageError("mann_whitney_u needs at least one sample on each side")
    if np.all(np.concatenate([x, y]) == x[0]):
        return {"u": x.size * y.size / 2.0, "z": 0.0, "p_value": 1.0}
    res = _scipy_stats().mannwhitneyu(x, y, alternative="two-sided", method="asymptotic",
                                      use_continuity=True)
    u1, p = float(res.statistic), float(res.pvalue)
    z = float(_scipy_stats().norm.isf(p / 2.0)) if p < 1.0 else 0.0
    return {"u": u1, "z": math.copysign(z, u1 - x.size * y.size / 2.0), "p_value": min(1.0, p)}


def _bootstrap_median_ratio(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int,
                            level: float) -> tuple[float, float]:
    """Percentile bootstrap CI of median(y*)/median(x*), each side resampled independently
    (`scipy.stats.bootstrap`, seeded: the same inputs give the same interval)."""
    def ratio(xs: np.ndarray, ys: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.median(ys, axis=axis) / np.median(xs, axis=axis)

    res = _scipy_stats().bootstrap((x, y), ratio, n_resamples=n_boot, confidence_level=level,
                                   method="percentile", vectorized=True, paired=False,
                                   rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return lo, hi


def _scipy_stats():
    """scipy.stats, imported on first use: reading and showing results does not need it."""
    import scipy.stats

    return scipy.stats


def _two_sides(a: Any, b: Any, what: str, noun: str, fn: str, alpha: float,
               min_effect: float) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as arrays, checked with the test's settings (one-line UsageError)."""
    x = _as_array(a, f"{what} of A")
    y = _as_array(b, f"{what} of B")
    if x.size == 0 or y.size == 0:
        raise UsageError(f"{fn} needs at least one {noun} on each side")
    if not (0.0 < alpha < 1.0):
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    if min_effect < 0:
        raise UsageError(f"min_effect must be >= 0, got {min_effect}")
    return x, y


def _change_words(ratio: float, higher_is_better: bool) -> str:
    """'1.50x slower' / '2.00x faster': the factor is always >= 1, the word says the direction."""
    bigger = ratio > 1.0
    factor = ratio if bigger else (1.0 / ratio if ratio > 0 else math.inf)
    worse = bigger != higher_is_better
    return f"{factor:.2f}x {'slower' if worse else 'faster'}"


def compare_samples(a: Iterable[float] | np.ndarray, b: Iterable[float] | np.ndarray, *,
                    min_effect: float = 0.02, alpha: float = 0.05, n_boot: int = 2000,
                    seed: int = 0, higher_is_better: bool = False) -> dict[str, Any]:
    """Compare samples B against baseline A.

    Returns a dict with:

    * `ratio`: median(B) / median(A) (`statistic` is "median");
    * `ci_low`, `ci_high`: the (1-alpha) percentile-bootstrap interval of that ratio, resampling
      A and B independently `n_boot` times with a seeded generator (deterministic);
    * `p_value`, `u`, `z`: two-sided Mann-Whitney U test;
    * `significant`: CI excludes 1.0 AND p < alpha;
    * `verdict`: "1.23x slower" / "1.23x faster" when significant and |ratio-1| >= min_effect,
      "within ±2%" when significant but smaller than `min_effect`, else "not significant".
      For lower-is-better metrics (cycles, ns) a ratio > 1 is "slower"; `higher_is_better`
      (throughput) flips the words.

    With fewer than two samples on a side there is nothing to test: the CI and p-value are None,
    `significant` is False and the verdict comes from the ratio alone, suffixed
    "(n=1, no test)". A zero median of A gives ratio None and an explanatory verdict.
    """
    x, y = _two_sides(a, b, "samples", "sample", "compare_samples", alpha, min_effect)
    if n_boot < 1:
        raise UsageError(f"n_boot must be >= 1, got {n_boot}")
    med_a, med_b = float(np.median(x)), float(np.median(y))
    out: dict[str, Any] = {
        "statistic": "median", "n_a": int(x.size), "n_b": int(y.size),
        "median_a": med_a, "median_b": med_b, "ratio": None, "ci_low": None, "ci_high": None,
        "ci_level": 1.0 - alpha, "p_value": None, "u": None, "z": None, "significant": False,
        "min_effect": min_effect, "higher_is_better": higher_is_better, "verdict": "",
    }
    within = f"within ±{min_effect * 100:g}%"
    if med_a == 0.0:
        out["verdict"] = "ratio undefined (median of A is 0)"
        return out
    ratio = med_b / med_a
    out["ratio"] = ratio
    small = abs(ratio - 1.0) < min_effect
    if x.size < 2 or y.size < 2:
        words = within if small else _change_words(ratio, higher_is_better)
        n_small = min(x.size, y.size)
        out["verdict"] = f"{words} (n={n_small}, no test)"
        return out
    lo, hi = _bootstrap_median_ratio(x, y, n_boot, seed, 1.0 - alpha)
    mw = mann_whitney_u(x, y)
    out.update(ci_low=lo, ci_high=hi, p_value=mw["p_value"], u=mw["u"], z=mw["z"])
    ci_excludes_one = (not math.isnan(lo)) and (lo > 1.0 or hi < 1.0)
    out["significant"] = bool(ci_excludes_one and mw["p_value"] < alpha)
    out["verdict"] = verdict(out["significant"], ratio, min_effect, higher_is_better)
    return out


def _exact_permutations(n_a: int, n_b: int) -> int:
    return math.comb(n_a + n_b, n_a)


def compare_units(a: Iterable[float] | np.ndarray, b: Iterable[float] | np.ndarray, *,
                  ratio: float | None = None, min_effect: float = 0.02, alpha: float = 0.05,
                  n_boot: int = 2000, seed: int = 0,
                  higher_is_better: bool = False) -> dict[str, Any]:
    """Compare B against baseline A where each value is one independent unit (a worker process's
    median); see the module docstring for why and for the choice of test.

    `ratio` is the headline B/A to report (the caller's ratio of row medians); it defaults to
    the ratio of the geometric means of the units. Returns `ratio`, `ci_low`/`ci_high` (the
    (1-alpha) interval of the ratio of geometric means), `p_value`, `test` (which test gave it),
    `ci_method`, `n_a`/`n_b` (units per side), `significant` (before any false-discovery
    control: p < alpha and the interval excludes 1) and `verdict`. With fewer than two units on
    a side nothing is tested: p and the interval are None and the verdict says so.
    """
    x, y = _two_sides(a, b, "process values", "unit", "compare_units", alpha, min_effect)
    out: dict[str, Any] = {
        "statistic": "process median", "n_a": int(x.size), "n_b": int(y.size), "ratio": ratio,
        "ci_low": None, "ci_high": None, "ci_level": 1.0 - alpha, "p_value": None, "test": None,
        "ci_method": None, "significant": False, "min_effect": min_effect,
        "higher_is_better": higher_is_better, "verdict": ""}
    if np.any(x <= 0) or np.any(y <= 0):
        # logs need positive values (a cost below its baseline can be <= 0): compare on the
        # linear scale then, with the same tests
        lx, ly, back = x, y, None
    else:
        lx, ly, back = np.log(x), np.log(y), np.exp
    if ratio is None:
        ma, mb = float(np.mean(lx)), float(np.mean(ly))
        out["ratio"] = ratio = (math.exp(mb - ma) if back is not None
                                else (mb / ma if ma else None))
    within = f"within ±{min_effect * 100:g}%"
    if ratio is None:
        out["verdict"] = "ratio undefined (A is 0)"
        return out
    small = abs(ratio - 1.0) < min_effect
    if x.size < 2 or y.size < 2:
        words = within if small else _change_words(ratio, higher_is_better)
        out["verdict"] = f"{words} ({min(x.size, y.size)} process, no test)"
        return out
    st = _scipy_stats()
    if np.all(lx == lx[0]) and np.all(ly == lx[0]):
        p, test = 1.0, "identical"
    elif _exact_permutations(x.size, y.size) * alpha >= 2.0:
        def mean_diff(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.mean(v, axis=axis) - np.mean(u, axis=axis)

        res = st.permutation_test((lx, ly), mean_diff, permutation_type="independent",
                                  alternative="two-sided", vectorized=True,
                                  n_resamples=20000, rng=np.random.default_rng(seed))
        p, test = float(res.pvalue), "permutation"
    else:
        with warnings.catch_warnings():
            # quantized process medians (one side all equal) make scipy warn of precision loss
            # in its moments; the p-value it returns is still the test's (nan becomes 1 below)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = st.ttest_ind(ly, lx, equal_var=False)
        p = float(res.pvalue) if math.isfinite(res.pvalue) else 1.0
        test = "welch"
    out.update(p_value=min(1.0, p), test=test)
    lo, hi = _units_interval(lx, ly, alpha, n_boot, seed)
    if back is not None:
        lo, hi = math.exp(lo), math.exp(hi)
    else:
        base = float(np.mean(lx))
        # a negative baseline (a cost below its reference) flips the ends of the ratio
        lo, hi = (sorted(((base + lo) / base, (base + hi) / base)) if base
                  else (math.nan, math.nan))
    out.update(ci_low=lo, ci_high=hi,
               ci_method="bootstrap" if min(x.size, y.size) >= 5 else "welch")
    excludes = math.isfinite(lo) and math.isfinite(hi) and (lo > 1.0 or hi < 1.0)
    out["significant"] = bool(excludes and out["p_value"] < alpha)
    out["verdict"] = verdict(out["significant"], ratio, min_effect, higher_is_better)
    return out


def _units_interval(lx: np.ndarray, ly: np.ndarray, alpha: float, n_boot: int,
                    seed: int) -> tuple[float, float]:
    """(1-alpha) interval of mean(ly) - mean(lx): bootstrap with >= 5 units a side, else
    Welch's t interval."""
    st = _scipy_stats()
    if min(lx.size, ly.size) >= 5:
        def diff(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.mean(v, axis=axis) - np.mean(u, axis=axis)

        res = st.bootstrap((lx, ly), diff, n_resamples=n_boot, confidence_level=1.0 - alpha,
                           method="percentile", vectorized=True, paired=False,
                           rng=np.random.default_rng(seed))
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    d = float(np.mean(ly) - np.mean(lx))
    va, vb = float(np.var(lx, ddof=1)) / lx.size, float(np.var(ly, ddof=1)) / ly.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return d, d
    dof = (va + vb) ** 2 / ((va ** 2 / (lx.size - 1) if va else 0.0)
                            + (vb ** 2 / (ly.size - 1) if vb else 0.0))
    q = float(st.t.ppf(1.0 - alpha / 2.0, dof))
    return d - q * se, d + q * se


def verdict(significant: bool, ratio: float | None, min_effect: float,
            higher_is_better: bool) -> str:
    """The words of a verdict: a change only when significant and at least `min_effect`."""
    if not significant or ratio is None:
        return "not significant"
    if abs(ratio - 1.0) < min_effect:
        return f"within ±{min_effect * 100:g}%"
    return _change_words(ratio, higher_is_better)


def fdr_bh(p_values: Sequence[float | None]) -> list[float | None]:
    """Benjamini-Hochberg adjusted p-values (q-values) of one family of tests, in input order;
    a None (an untested row) stays None and does not count as a test."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    out: list[float | None] = [None] * len(p_values)
    if idx:
        q = _scipy_stats().false_discovery_control([float(p_values[i]) for i in idx], method="bh")
        for i, v in zip(idx, np.atleast_1d(q)):
            out[i] = float(v)
    return out
