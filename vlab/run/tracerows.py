"""Rows from the exit tracer: `trace.exits` (count by reason) and `trace.exit_ns` (latency).

Used by `vlab run --trace` (one set per case, `of` naming the case) and by `vlab trace`.
Latency rows come from log2 histograms: their `mean` is exact (BPF keeps the sum), the
quantiles and `samples` are bucket midpoints, and the row says so.
"""
from __future__ import annotations

import math
from typing import Any


def _midpoint(k: int) -> float:
    return 0.0 if k == 0 else math.sqrt(float(2 ** k) * float(2 ** (k + 1)))


def hist_samples(buckets: dict[int, int], cap: int = 2000) -> list[float]:
    """Representative samples for a log2 histogram, at most about `cap` of them."""
    total = sum(buckets.values())
    scale = min(1.0, cap / total) if total else 1.0
    out: list[float] = []
    for k in sorted(buckets):
        c = buckets[k]
        if c:
            out += [_midpoint(k)] * max(1, round(c * scale))
    return out


def trace_rows(result: Any, of: str, version: str = "") -> list[dict]:
    """Rows for one TraceResult; `of` names what was traced (a case label, a pid, a command)."""
    from vlab import results

    base: dict[str, Any] = {"source": result.source, "backend": result.backend}
    if result.unavailable:
        base["unavailable"] = list(result.unavailable)
    rows = []
    for key, count in sorted(result.counts.items()):
        rows.append(results.make_row("trace.exits", {"of": of, "reason": key}, "count", "events",
                                     [count], exp_version=version or None, extra=dict(base)))
    for key, h in sorted(result.latency.items()):
        if not h.count:
            continue
        row = results.make_row("trace.exit_ns", {"of": of, "reason": key}, "latency_ns", "ns",
                               hist_samples(h.buckets), exp_version=version or None,
                               extra=dict(base, histogram=h.to_dict(), exact_mean_ns=h.mean_ns,
                                          samples_are="log2 bucket midpoints (mean is exact)"))
        row["mean"] = h.mean_ns
        row["n"] = h.count
        rows.append(row)
    return rows


def unavailable_rows(reason: str, of: str) -> list[dict]:
    from vlab import results

    return [results.skip_row("trace.exits", {"of": of}, "count", "events", reason),
            results.skip_row("trace.exit_ns", {"of": of}, "latency_ns", "ns", reason)]
