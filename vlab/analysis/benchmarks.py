"""Benchmarks of the analysis kernels: `python -m vlab.analysis.benchmarks [--quick]`.

Measures the numba kernels of `vlab.analysis` against their NumPy oracles on synthetic traces
(`vlab.analysis.dirty.synthetic_trace`: a hot set dirtied every interval, a warm set dirtied at
random, a cold random trickle) and prints one table: kernel, size, seconds (best of --repeat),
speedup over the NumPy oracle. The default size is the design target, a 1 TiB guest
(268,435,456 4 KiB pages, 3.4 GB of bitmaps for 100 intervals); --quick uses 16 GiB.

The pre-copy scenario scales the link with the guest (100 Gbit/s for 1 TiB) so that every size
runs the same rounds over the same intervals; its numbers are therefore comparable across sizes.
Oracle runs that would take minutes (the brute-force WWS curve, the CSR pre-copy oracle) are
measured at a smaller size (4M and 16M pages) and extrapolated linearly in the number of pages;
such rows say "extrapolated". The scenario is scale-free, so the work grows linearly with pages.
JIT compilation is excluded: every kernel runs once on a tiny trace first.

After the table it checks the pre-copy model's targets against the rows: the numba kernel at
least 20x the NumPy oracle, and (at 1 TiB) every numba pre-copy simulation of the 100-interval
trace, including one of 100 rounds, within 10 s. It prints "met" or "NOT met" for each.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from vlab.analysis import dirty, pagewalk

TIB_PAGES = 1 << 28          # 1 TiB of 4 KiB pages
GIB16_PAGES = 1 << 22        # 16 GiB


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _size(n_pages: int, k: int) -> str:
    gib = n_pages * 4096 / 2**30
    mem = f"{gib / 1024:g} TiB" if gib >= 1024 else f"{gib:g} GiB"
    return f"{mem} ({n_pages:,} pages) x {k} intervals"


def _warm() -> None:
    tr = dirty.synthetic_trace(5000, 3, seed=1)
    for t in (tr, tr.to_sparse()):
        dirty.wws_curve(t, [1, 2])
        for method in ("table", "direct"):
            dirty.precopy_sim(t, bandwidth_bps=1e9, max_downtime_ms=1, max_rounds=3,
                              method=method)
    pagewalk.tlb_miss_rate(1 << 20, 4096, 64, 4, 1000)


def _scenario(n_pages: int) -> dict[str, Any]:
    return {"bandwidth_bps": 100e9 * n_pages / TIB_PAGES, "max_downtime_ms": 300.0,
            "max_rounds": 30}


def run(n_pages: int, k: int, repeat: int, *, oracle: bool = True, sparse: bool = True,
        wws_oracle_pages: int = 1 << 22, sparse_oracle_pages: int = 1 << 24,
        log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every benchmark and return the table rows (also used by tests and reports)."""
    say = log or (lambda s: None)
    rows: list[dict[str, Any]] = []

    def add(kernel: str, size: str, seconds: float, oracle_s: float | None = None,
            note: str = "") -> None:
        rows.append({"kernel": kernel, "size": size, "seconds": seconds,
                     "oracle_seconds": oracle_s,
                     "speedup": (oracle_s / seconds) if oracle_s and seconds > 0 else None,
                     "note": note})
        say(f"  {kernel}: {seconds:.3f} s" + (f" (oracle {oracle_s:.3f} s)" if oracle_s else ""))

    _warm()
    size = _size(n_pages, k)
    say(f"generating a synthetic trace: {size} ...")
    t0 = time.perf_counter()
    tr = dirty.synthetic_trace(n_pages, k, interval_ms=1000.0, seed=1)
    say(f"  done in {time.perf_counter() - t0:.1f} s, "
        f"{tr.bitmaps.nbytes / 1e9:.2f} GB of bitmaps, "
        f"{int(tr.pages_per_interval().mean()):,} dirty pages per interval")
    kw = _scenario(n_pages)

    # --- pre-copy: one simulation
    t_np, ref = _best(lambda: dirty.precopy_sim_numpy(tr, **kw), repeat) if oracle \
        else (None, None)
    scen = (f"{len(ref['pages_per_round']) if ref else '?'} rounds, "
            f"{ref['outcome'] if ref else ''}")
    if ref:
        add("precopy_sim_numpy (oracle)", size, t_np, t_np, scen)
    for method in ("auto", "direct", "table"):
        t, res = _best(lambda m=method: dirty.precopy_sim(tr, method=m, **kw), repeat)
        if ref:
            assert res["pages_per_round"] == ref["pages_per_round"], method
        add(f"precopy_sim numba method={method}", size, t, t_np,
            f"{res['implementation']}, one simulation, table build included"
            if method == "table" else f"{res['implementation']}, one simulation")

    # --- the floor under any implementation of one dense simulation: round 0 sends every page
    # while the guest runs, so its dirty set is the union of every interval it overlaps, and
    # those rows must be read at least once. Timed as a parallel numba popcount of just those
    # rows, which reads each 64-bit word once and does almost nothing else.
    # Round 0 starts at the start of interval 0 (the synthetic intervals are all the same
    # length), so it overlaps intervals 0 .. floor((span - 1) / interval).
    span_ns = math.ceil(n_pages * 8 * tr.page_size / kw["bandwidth_bps"] * 1e9)
    round0_rows = min(k, (span_ns - 1) // int(tr.interval_ns[0]) + 1)
    head = tr.bitmaps[:round0_rows]
    t_floor, _ = _best(lambda: dirty._popcount_rows(head), repeat)
    add("read-once floor (round 0 rows)", size, t_floor, t_np,
        f"popcount of the {round0_rows} rows round 0 spans: no implementation of one simulation "
        "can beat this; its 'speedup' is the ceiling for any kernel")

    # --- the same guest simulated for 100 rounds (it never converges at this link)
    kw100 = dict(kw, max_rounds=100)
    t_np100, ref100 = _best(lambda: dirty.precopy_sim_numpy(tr, **kw100), 1) if oracle \
        else (None, None)
    t100, res100 = _best(lambda: dirty.precopy_sim(tr, **kw100), repeat)
    if ref100:
        assert res100["pages_per_round"] == ref100["pages_per_round"]
    add("precopy_sim numba 100 rounds", size, t100, t_np100,
        f"{res100['implementation']}, {len(res100['pages_per_round'])} rounds, "
        f"{res100['outcome']}")

    # --- union table and a sweep that shares it
    t_tab, table = _best(lambda: dirty.union_table(tr), repeat)
    add("union_table (dense)", size, t_tab, None, "one pass; makes every later round a lookup")
    bws = [kw["bandwidth_bps"] * f for f in (0.5, 1.0, 2.0, 4.0)]
    downs = [30.0, 100.0, 300.0, 1000.0]
    n_cfg = len(bws) * len(downs)
    t_sw, grid = _best(lambda: dirty.precopy_sweep(tr, bandwidths_bps=bws,
                                                    max_downtimes_ms=downs,
                                                    max_rounds=kw["max_rounds"]), repeat)
    t_sw_np = None
    if oracle:
        t0 = time.perf_counter()
        for i, (bw, dt) in enumerate((b, d_) for b in bws for d_ in downs):
            r = dirty.precopy_sim_numpy(tr, bandwidth_bps=bw, max_downtime_ms=dt,
                                        max_rounds=kw["max_rounds"])
            assert r["pages_per_round"] == grid[i]["pages_per_round"]
        t_sw_np = time.perf_counter() - t0
    add(f"precopy_sweep {len(bws)}x{len(downs)} grid", size, t_sw, t_sw_np,
        f"{n_cfg} simulations, one table")

    # --- sparse (CSR) representation of the same trace
    if sparse:
        t0 = time.perf_counter()
        sp = tr.to_sparse()
        t_conv = time.perf_counter() - t0
        say(f"  CSR conversion {t_conv:.1f} s, {sp.pages.nbytes / 1e9:.2f} GB of page indices")
        t_sp, tab_sp = _best(lambda: dirty.union_table(sp), repeat)
        assert np.array_equal(tab_sp.counts, table.counts)
        add("union_table (CSR)", size, t_sp, None, "same counts as dense")
        t, res = _best(lambda: dirty.precopy_sim(sp, **kw), repeat)
        t_spo = None
        note = f"{res['implementation']}; oracle merges page lists with np.unique"
        del sp, tab_sp
        if oracle:
            small_n = min(n_pages, sparse_oracle_pages)
            small = tr if small_n == n_pages else dirty.synthetic_trace(
                small_n, k, interval_ms=1000.0, seed=1)
            small_sp = small.to_sparse()
            kw_small = _scenario(small_n)
            t_small, r = _best(lambda: dirty.precopy_sim_numpy(small_sp, **kw_small), 1)
            assert r["pages_per_round"] == dirty.precopy_sim(small_sp, **kw_small)[
                "pages_per_round"]
            t_spo = t_small * n_pages / small_n
            if small_n != n_pages:
                note += f"; oracle measured at {small_n:,} pages ({t_small:.2f} s), extrapolated"
            del small, small_sp
        add("precopy_sim CSR numba method=auto", size, t, t_spo, note)

    # --- writable working set curve
    windows = np.array([w for w in (1, 2, 5, 10, 20, 50, 100) if w <= k], dtype=np.int64)
    t_w, curve = _best(lambda: dirty.wws_curve(tr, windows), repeat)
    note = f"windows {windows.tolist()}, table build included"
    t_wo = None
    if oracle:
        small_n = min(n_pages, wws_oracle_pages)
        small = tr if small_n == n_pages else dirty.synthetic_trace(small_n, k,
                                                                    interval_ms=1000.0, seed=1)
        t_small, want = _best(lambda: dirty.wws_curve_numpy(small, windows), 1)
        got = dirty.wws_curve(small, windows)
        assert np.allclose(got["mean"], want["mean"]) and np.array_equal(got["max"], want["max"])
        t_wo = t_small * n_pages / small_n
        if small_n != n_pages:
            note += f"; oracle measured at {small_n:,} pages ({t_small:.2f} s), extrapolated"
    add("wws_curve", size, t_w, t_wo, note)
    del table

    # --- TLB simulator
    n_acc = 2_000_000
    t_tlb, rate = _best(lambda: pagewalk.tlb_miss_rate(1 << 30, 4096, 1536, 12, n_acc, 1), repeat)
    add("tlb_miss_rate", f"1 GiB wss, 1536x12 STLB, {n_acc:,} + {n_acc:,} warm-up accesses",
        t_tlb, None, f"miss rate {rate:.3f}; {2 * n_acc / t_tlb / 1e6:.0f} M accesses/s")
    return rows


def targets(rows: list[dict[str, Any]], n_pages: int) -> list[str]:
    """The pre-copy model's acceptance targets, checked against the measured rows: the numba
    kernel >= 20x the NumPy oracle, and a 1 TiB trace of 100 intervals simulated in <= 10 s."""
    by = {r["kernel"]: r for r in rows}
    out = []
    one = by.get("precopy_sim numba method=auto")
    if one and one["speedup"]:
        out.append(f"numba vs NumPy oracle, one simulation over dense bitmaps: "
                   f"{one['speedup']:.1f}x (target >= 20x: "
                   f"{'met' if one['speedup'] >= 20 else 'NOT met'})")
    floor = by.get("read-once floor (round 0 rows)")
    if one and one["speedup"] and floor and floor["speedup"]:
        out.append(f"  ceiling for any implementation of one dense simulation (oracle / time to "
                   f"read round 0's rows once): {floor['speedup']:.1f}x; numba reaches "
                   f"{one['speedup'] / floor['speedup']:.0%} of it")
    for name in ("precopy_sim numba 100 rounds", "precopy_sweep 4x4 grid",
                 "precopy_sim CSR numba method=auto"):
        r = by.get(name)
        if r and r["speedup"]:
            out.append(f"numba vs NumPy oracle, {name.replace('precopy_sim numba ', '')}: "
                       f"{r['speedup']:.1f}x (target >= 20x: "
                       f"{'met' if r['speedup'] >= 20 else 'NOT met'})")
    if n_pages >= TIB_PAGES:
        worst = max((r["seconds"] for k, r in by.items()
                     if k.startswith("precopy_sim numba")), default=None)
        if worst is not None:
            out.append(f"1 TiB x 100 intervals, slowest numba pre-copy simulation: {worst:.2f} s "
                       f"(target <= 10 s: {'met' if worst <= 10 else 'NOT met'})")
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    head = ("kernel", "size", "seconds", "speedup", "note")
    body = [(r["kernel"], r["size"], f"{r['seconds']:.3f}",
             "-" if r["speedup"] is None else f"{r['speedup']:.1f}x", r["note"]) for r in rows]
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head[:4], widths)) + "  " + head[4]]
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b[:4], widths)) + "  " + b[4])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlab.analysis.benchmarks",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 GiB guest instead of 1 TiB")
    p.add_argument("--pages", type=int, default=None, help="guest size in 4 KiB pages")
    p.add_argument("--intervals", type=int, default=100, help="trace length (default 100)")
    p.add_argument("--repeat", type=int, default=None, help="best of N (default 3, 2 at 1 TiB)")
    p.add_argument("--no-oracle", action="store_true", help="skip the NumPy oracles")
    p.add_argument("--no-sparse", action="store_true", help="skip the CSR benchmarks")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    n_pages = args.pages or (GIB16_PAGES if args.quick else TIB_PAGES)
    repeat = args.repeat or (2 if n_pages >= TIB_PAGES else 3)
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    log(f"vlab.analysis.benchmarks: numba {numba.__version__}, numpy {np.__version__}, "
        f"{numba.get_num_threads()} threads")
    rows = run(n_pages, args.intervals, repeat, oracle=not args.no_oracle,
               sparse=not args.no_sparse, log=log)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    if not args.json:
        for line in targets(rows, n_pages):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
