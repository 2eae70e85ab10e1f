"""Summary statistics and A/B comparison of measured samples (plain NumPy, no SciPy).

`summarize` gives the per-row statistics of the results file (`n, mean, median, stdev, min, max,
p90, p99`). `compare_samples` answers "did B change the metric relative to A?": the ratio of
medians B/A with a percentile-bootstrap confidence interval over the raw samples, a two-sided
Mann-Whitney U test (normal approximation with tie correction and continuity correction), and a
verdict that calls a change only when it is significant *and* larger than `min_effect`.
Medians rather than means because timing samples are skewed by occasional interrupts and
preemptions; a few outliers should not decide a verdict.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from vlab._errors import UsageError

__all__ = ["summarize", "cv", "mann_whitney_u", "compare_samples"]

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


def _rank_with_ties(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 1..n with ties given their average rank, and the sizes of the tie groups."""
    order = np.argsort(values, kind="mergesort")
    sorted_v = values[order]
    n = sorted_v.size
    # start of each run of equal values
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = sorted_v[1:] != sorted_v[:-1]
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.append(starts, n))
    # average rank of a run occupying positions s..s+t-1 (0-based) is s + (t+1)/2
    avg = starts + (sizes + 1) / 2.0
    ranks_sorted = np.repeat(avg, sizes)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks, sizes


def mann_whitney_u(a: Iterable[float] | np.ndarray,
                   b: Iterable[float] | np.ndarray) -> dict[str, float]:
    """Two-sided Mann-Whitney U test of A vs B (normal approximation).

    Returns `u` (the U statistic of A), `z` and `p_value`. The variance is tie-corrected
    (sigma^2 = n1 n2 / 12 * ((n+1) - sum(t^3 - t) / (n (n-1)))) and a 0.5 continuity correction
    is applied, as SciPy's `mannwhitneyu(method="asymptotic")` does. With every value tied the
    test has no information and p is 1.
    """
    x = _as_array(a, "samples of A")
    y = _as_array(b, "samples of B")
    n1, n2 = x.size, y.size
    if n1 == 0 or n2 == 0:
        raise UsageError("mann_whitney_u needs at least one sample on each side")
    ranks, ties = _rank_with_ties(np.concatenate([x, y]))
    n = n1 + n2
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    mu = n1 * n2 / 2.0
    tie_term = float(np.sum(ties.astype(np.float64) ** 3 - ties)) / (n * (n - 1)) if n > 1 else 0.0
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if var <= 0.0:
        return {"u": u1, "z": 0.0, "p_value": 1.0}
    diff = u1 - mu
    # continuity correction towards the mean
    diff = math.copysign(max(abs(diff) - 0.5, 0.0), diff)
    z = diff / math.sqrt(var)
    p = math.erfc(abs(z) / math.sqrt(2.0))
    return {"u": u1, "z": z, "p_value": min(1.0, p)}


def _bootstrap_median_ratio(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int,
                            level: float) -> tuple[float, float]:
    """Percentile bootstrap CI of median(y*)/median(x*) resampling each side independently.

    Resamples are drawn in blocks so that memory stays bounded (~32 MiB) for large n.
    """
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot, dtype=np.float64)
    block = max(1, min(n_boot, (4 << 20) // max(x.size, y.size)))
    done = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        while done < n_boot:
            m = min(block, n_boot - done)
            mx = np.median(x[rng.integers(0, x.size, size=(m, x.size))], axis=1)
            my = np.median(y[rng.integers(0, y.size, size=(m, y.size))], axis=1)
            ratios[done:done + m] = my / mx
            done += m
    ratios = ratios[~np.isnan(ratios)]
    if ratios.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(ratios, [tail, 100.0 - tail])
    return float(lo), float(hi)


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
    x = _as_array(a, "samples of A")
    y = _as_array(b, "samples of B")
    if x.size == 0 or y.size == 0:
        raise UsageError("compare_samples needs at least one sample on each side")
    if not (0.0 < alpha < 1.0):
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    if min_effect < 0:
        raise UsageError(f"min_effect must be >= 0, got {min_effect}")
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
    significant = bool(ci_excludes_one and mw["p_value"] < alpha)
    out["significant"] = significant
    if not significant:
        out["verdict"] = "not significant"
    elif small:
        out["verdict"] = within
    else:
        out["verdict"] = _change_words(ratio, higher_is_better)
    return out
