"""Migration: exact dirty-page rates, writable working sets, what tracking costs, and a pre-copy
model fed with the recorded traces.

* `migration.dirty_rate`: a workload's dirty pages per interval as a time series, checked page
  by page against the guest's own record (missing / extra pages, and where the extra ones are).
* `migration.wws`: distinct pages dirtied as a function of window length, from one trace, and
  the rate that implies (the longer the window, the smaller the rate: QEMU's caveat, measured).
* `migration.harvest`: time per get / clear / ring reset by slot size and dirty count, and what a
  write costs the guest with tracking on and off.
* `migration.precopy_sim`: a model (flags.model) of pre-copy, stop-and-copy and auto-converge
  over a recorded trace, by link bandwidth, maximum downtime and rounds.

Workloads are given as `name[:arg]`: uniform, hotcold[:hot_fraction/hot_share] (default 0.2/0.8),
zipf[:s] (default 1.0), sequential, ratelimited[:pages_per_s] (default 10000),
readmostly[:write_pct] (default 10).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from vlab._errors import UsageError
from vlab.run.registry import (OneShotExperiment, Requirement, input_file, needs_kvm,
                               register, within)
from vlab.results import make_row

MODES = ("bitmap", "clear", "ring")
WORKLOADS = ("uniform", "hotcold", "zipf", "sequential", "ratelimited", "readmostly")
LINKS_GBIT = (1, 10, 25)
PAGE = 4096
MIB = 1 << 20


# ------------------------------------------------------------------------------ parameters

def workload_kwargs(spec: str) -> tuple[str, dict[str, Any]]:
    """`name[:arg]` -> (vlab.dirty workload, its keyword arguments)."""
    if not isinstance(spec, str) or not spec:
        raise UsageError(f"workload must be a string like 'zipf:1.2', not {spec!r}")
    name, _, arg = spec.partition(":")
    try:
        if name == "uniform" and not arg:
            return "uniform", {}
        if name == "sequential" and not arg:
            return "sequential", {}
        if name == "hotcold":
            f, _, s = (arg or "0.2/0.8").partition("/")
            return "hotcold", {"hot_fraction": float(f), "hot_share": float(s or 0.8)}
        if name == "zipf":
            return "hotcold", {"zipf": float(arg or 1.0)}
        if name == "ratelimited":
            return "ratelimited", {"rate": float(arg or 10000)}
        if name == "readmostly":
            return "readmostly", {"write_pct": float(arg or 10)}
    except ValueError:
        raise UsageError(f"bad workload argument in {spec!r}") from None
    raise UsageError(f"unknown workload {spec!r}; one of {', '.join(WORKLOADS)} (some take "
                     "':arg', e.g. zipf:1.2, ratelimited:50000, readmostly:5, hotcold:0.1/0.9)")


def _size(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise UsageError(f"{what} must be a positive size in bytes (e.g. 64M), not {v!r}")
    return v


def _validate_common(p: dict, host: dict) -> None:
    from vlab.dirty import WorkloadGuest  # noqa: F401 - import check only
    from vlab.dirty.workloads import workload_args

    if "workload" in p:
        name, kw = workload_kwargs(p["workload"])
        wss = _size(p.get("wss", 64 * MIB), "wss")
        if "zipf" in kw:
            if not kw["zipf"] > 0:
                raise UsageError(f"zipf parameter must be > 0 in {p['workload']!r}")
        else:
            workload_args(name, max(1, wss // PAGE), **kw)
    if "wss" in p:
        _size(p["wss"], "wss")
        ps = {"4k": PAGE, "2m": 2 * MIB, "1g": 1 << 30}.get(p.get("guest_page", "4k"))
        if ps is None:
            raise UsageError(f"guest_page must be 4k, 2m or 1g, not {p.get('guest_page')!r}")
        if p["wss"] % ps:
            raise UsageError(f"wss {p['wss']} is not a multiple of the {p.get('guest_page')} "
                             "guest page")
    if "mode" in p and p["mode"] not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {p['mode']!r}")
    iv = p.get("interval_ms", 100)
    if not isinstance(iv, (int, float)) or not 1 <= iv <= 1000:
        raise UsageError(f"interval_ms must be in [1, 1000], not {iv!r}")
    for key in ("duration_s",):
        if key in p and not (isinstance(p[key], (int, float)) and 0 < p[key] <= 3600):
            raise UsageError(f"{key} must be in (0, 3600], not {p[key]!r}")
    for key in ("intervals", "max_rounds"):
        if key in p and (isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1):
            raise UsageError(f"{key} must be an integer >= 1, not {p[key]!r}")


def _mode_requirement() -> Requirement:
    """The KVM capability a mode needs, as KVM names it."""
    def check(host: dict, params: dict) -> str | None:
        from vlab.host.fingerprint import cap_value

        caps = host.get("kvm", {}).get("caps", {})
        mode = params.get("mode", "bitmap")
        if mode == "ring" and not (cap_value(caps, "DIRTY_LOG_RING_ACQ_REL")
                                   or cap_value(caps, "DIRTY_LOG_RING")):
            return "KVM capability KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) is missing (mode=ring)"
        if mode == "clear" and not cap_value(caps, "MANUAL_DIRTY_LOG_PROTECT2"):
            return "KVM capability KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is missing (mode=clear)"
        ring = params.get("ring_size")
        if mode == "ring" and ring:
            top = cap_value(caps, "DIRTY_LOG_RING_ACQ_REL") or cap_value(caps, "DIRTY_LOG_RING")
            if top and ring > top:
                return f"ring_size {ring} exceeds this host's maximum dirty ring ({top} bytes)"
        return None
    return Requirement("dirty-mode", check)


def _memory_requirement(key: str = "wss") -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        want = params.get(key, 0) * 3 // 2 + 64 * MIB
        have = (host.get("mem_available_kb") or 0) * 1024
        if have and want > have:
            return f"{key}={params.get(key)} needs ~{want >> 20} MiB; {have >> 20} MiB available"
        return None
    return Requirement("memory", check)


def _fmt_size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", MIB), ("K", 1024)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _link_pages_per_s(gbit: float, page_size: int = PAGE) -> float:
    return gbit * 1e9 / 8 / page_size


# ---------------------------------------------------------------------------- recordings

_TRACES: dict[tuple, Any] = {}


def _record(p: dict, *, interval_ms: float, duration_s: float | None = None,
            intervals: int | None = None, mode: str = "bitmap", cache: bool = False):
    """A recording of the case's workload. With `cache`, one recording per process is reused
    for every case that differs only in model parameters (a sweep over bandwidths and
    downtimes); measurements always record afresh."""
    import vlab.dirty as vd

    name, kw = workload_kwargs(p["workload"])
    key = (p["workload"], p["wss"], p.get("guest_page", "4k"), mode, interval_ms, duration_s,
           intervals, p.get("ring_size", 65536))
    if not cache or key not in _TRACES:
        if len(_TRACES) > 4:
            _TRACES.clear()
        _TRACES[key] = vd.record(name, mode=mode, interval_ms=interval_ms,
                                 duration_s=duration_s, intervals=intervals, wss=p["wss"],
                                 guest_page=p.get("guest_page", "4k"),
                                 ring_size=p.get("ring_size", 65536), seed=p.get("seed", 1),
                                 **kw)
    return _TRACES[key]


def _link_extra(mb_per_s: float) -> dict[str, Any]:
    """What a dirty rate means for links of 1, 10 and 25 Gbit/s."""
    out = {}
    for g in LINKS_GBIT:
        link_mb = g * 1e9 / 8 / 1e6
        out[f"{g}gbit"] = {"link_mb_per_s": link_mb, "dirty_share_of_link": mb_per_s / link_mb}
    return out


# -------------------------------------------------------------------- migration.dirty_rate

def run_dirty_rate(p: dict, host: dict, progress: Callable[[str], None]) -> list[dict]:
    exp = "migration.dirty_rate"
    rec = _record(p, interval_ms=p["interval_ms"], duration_s=p["duration_s"], mode=p["mode"])
    s = rec.summary()
    pages = rec.dirty_pages()
    wall = rec.wall_seconds()
    t = np.concatenate([[0.0], np.cumsum(wall)[:-1]]).round(4).tolist()
    missing, extra = rec.missing_pages(), rec.extra_pages()
    warnings: list[str] = []
    if missing.sum():
        warnings.append(f"the dirty log missed {int(missing.sum())} pages the guest wrote "
                        f"(in {int(np.count_nonzero(missing))} intervals)")
    if extra.sum():
        warnings.append(f"the dirty log reported {int(extra.sum())} buffer pages the guest did "
                        "not write")
    flags = {"exact": bool(missing.sum() == 0 and extra.sum() == 0)}
    common = {"exp_version": None, "flags": flags}
    extra_info = {
        "summary": s, "intervals": rec.n_intervals, "n_pages": rec.n_pages,
        "paused_fraction": s["paused_fraction"], "links": _link_extra(s["dirty_mb_per_s"]),
        "guest_writes_per_s": float((rec.writes / rec.seconds()).mean()),
        "ring_full_exits": int(rec.ring_full_exits.sum()),
        "interval_s": "guest run time per interval; the harvest pause is excluded "
                      "(paused_fraction)",
    }
    rows = [
        make_row(exp, p, "dirty_pages_per_s", "pages/s", rec.pages_per_s().tolist(),
                 warnings=list(warnings), extra=extra_info,
                 series={"x": t, "y": pages.tolist(), "x_label": "time (s)",
                         "y_label": f"pages dirtied per {p['interval_ms']:g} ms interval"},
                 **common),
        make_row(exp, p, "dirty_mb_per_s", "MB/s", rec.mb_per_s().tolist(), **common),
        make_row(exp, p, "missing_pages", "pages", missing.tolist(), warnings=list(warnings),
                 **common),
        make_row(exp, p, "extra_pages", "pages", extra.tolist(),
                 extra={"where": "inside the measured buffer"}, **common),
        make_row(exp, p, "extra_pages_pt", "pages", rec.outside["page_tables"].tolist(),
                 extra={"where": "the guest's page tables"}, **common),
        make_row(exp, p, "extra_pages_runtime", "pages",
                 (rec.outside["runtime"] + rec.outside["recorder"]).tolist(),
                 extra={"where": "runtime: code/data, stack, parameter and results pages, and "
                                 "the ground-truth recorder's own region",
                        "runtime_pages": int(rec.outside["runtime"].sum()),
                        "recorder_pages": int(rec.outside["recorder"].sum())}, **common),
        make_row(exp, p, "harvest_us", "us", (rec.harvest_ns.sum(axis=1) / 1e3).tolist(),
                 **common),
    ]
    return _finish(rows, exp)


def _finish(rows: list[dict], exp: str) -> list[dict]:
    from vlab.run.registry import get

    v = get(exp).version()
    for r in rows:
        r["exp_version"] = v
    return rows


# --------------------------------------------------------------------------- migration.wws

def _windows(k: int, n: int = 24) -> np.ndarray:
    return np.unique(np.round(np.geomspace(1, k, n)).astype(np.int64))


def run_wws(p: dict, host: dict, progress: Callable[[str], None]) -> list[dict]:
    from vlab.analysis import dirty as model

    exp = "migration.wws"
    rec = _record(p, interval_ms=p["interval_ms"], intervals=p["intervals"], mode=p["mode"])
    tr = rec.trace
    w = _windows(tr.n_intervals)
    t0 = time.perf_counter()
    curve = model.wws_curve(tr, w)
    kernel_s = time.perf_counter() - t0
    iv_ms = float(tr.interval_ns.mean() / 1e6)
    win_ms = (w * iv_ms).round(3).tolist()
    mean = curve["mean"]
    rate = mean / (w * iv_ms / 1e3)
    extra = {"windows_intervals": w.tolist(), "max": curve["max"].tolist(),
             "mean_interval_ms": iv_ms, "kernel_s": kernel_s, "n_pages": tr.n_pages,
             "missing_pages": int(rec.missing_pages().sum()),
             "extra_pages": int(rec.extra_pages().sum()),
             "note": "windows are sliding runs of whole intervals; x is the mean window length "
                     "of guest run time"}
    rows = [
        make_row(exp, p, "wws_pages", "pages", [float(mean[-1])], extra=extra,
                 series={"x": win_ms, "y": mean.round(2).tolist(), "x_label": "window (ms)",
                         "y_label": "distinct pages written in the window (mean)"}),
        make_row(exp, p, "wws_pages_per_s", "pages/s", rate.tolist(),
                 extra={"windows_ms": win_ms,
                        "note": "WWS / window length: the rate a sampler with that window "
                                "would report"}),
    ]
    return _finish(rows, exp)


# ----------------------------------------------------------------------- migration.harvest

_UNTRACKED: dict[tuple, float] = {}


def _write_cycles_untracked(wss: int, dirty: int, intervals: int) -> float:
    """Guest cycles per page written by the counts workload with dirty logging off."""
    from vlab.dirty import WorkloadGuest

    key = (wss, dirty, intervals)
    if key not in _UNTRACKED:
        per: list[float] = []
        with WorkloadGuest.build("counts", counts=[dirty], wss=wss, sync=True) as g:
            def on_epoch(gg) -> bool:
                ep = gg.take_epoch()
                if ep.epoch:
                    per.append((ep.tsc_idle - ep.tsc_go) / dirty)
                return len(per) < intervals
            g.run_synced(on_epoch, timeout=120)
        _UNTRACKED[key] = float(np.median(per))
    return _UNTRACKED[key]


def run_harvest(p: dict, host: dict, progress: Callable[[str], None]) -> list[dict]:
    import vlab.dirty as vd

    exp = "migration.harvest"
    slot, dirty, k = p["slot"], p["dirty"], p["intervals"]
    rec = vd.record("counts", counts=[dirty], mode=p["mode"], interval_ms=0, sync=True,
                    intervals=k, wss=slot, ring_size=p["ring_size"],
                    clear_chunk_pages=p.get("clear_chunk_pages", 0), track="buffer")
    hns = rec.harvest_ns
    total = hns.sum(axis=1)
    exact = int(rec.missing_pages().sum()) == 0 and int(rec.extra_pages().sum()) == 0
    info = {"slot_pages": slot // PAGE, "dirty_pages": dirty, "exact": exact,
            "ring_full_exits_per_interval": float(rec.ring_full_exits.mean()),
            "ring_entries_per_interval": float(rec.ring_entries.mean()),
            "clear_calls_per_interval": float(rec.clear_calls.mean()),
            "tracked": "the buffer slot only"}
    rows = [make_row(exp, p, "harvest_us", "us", (total / 1e3).tolist(), extra=info)]
    mode = p["mode"]
    if mode in ("bitmap", "clear"):
        rows.append(make_row(exp, p, "get_us", "us", (hns[:, 0] / 1e3).tolist(),
                             extra={"ioctl": "KVM_GET_DIRTY_LOG" + (
                                 " (also clears and write-protects)" if mode == "bitmap"
                                 else " (copy only)")}))
    if mode == "clear":
        rows.append(make_row(exp, p, "clear_us", "us", (hns[:, 1] / 1e3).tolist(),
                             extra={"ioctl": "KVM_CLEAR_DIRTY_LOG",
                                    "chunk_pages": p.get("clear_chunk_pages", 0) or "slot"}))
    if mode == "ring":
        rows.append(make_row(exp, p, "collect_us", "us", (hns[:, 2] / 1e3).tolist(),
                             extra={"what": "reading the ring entries"}))
        rows.append(make_row(exp, p, "reset_us", "us", (hns[:, 3] / 1e3).tolist(),
                             extra={"ioctl": "KVM_RESET_DIRTY_RINGS"}))
    if dirty:
        rows.append(make_row(exp, p, "harvest_ns_per_dirty_page", "ns/page",
                             (total / dirty).tolist()))
        tracked = (rec.tsc_idle - rec.tsc_go) / dirty
        base = _write_cycles_untracked(slot, dirty, min(k, 5))
        rows.append(make_row(exp, p, "guest_cycles_per_write", "cycles", tracked.tolist(),
                             extra={"what": "guest TSC per distinct page written in an "
                                            "interval, tracking on (a write-protection fault "
                                            "per page)", "untracked_cycles": base}))
        rows.append(make_row(exp, p, "write_slowdown", "x", (tracked / base).tolist(),
                             extra={"untracked_cycles_per_write": base,
                                    "what": "tracked / untracked guest cycles per page write"}))
    return _finish(rows, exp)


# ------------------------------------------------------------------- migration.precopy_sim

def _load_trace(p: dict):
    import vlab.dirty as vd

    path = p.get("trace") or ""
    if path:
        return vd.DirtyRecording.load(path), path
    return _record(p, interval_ms=p["interval_ms"], duration_s=p["duration_s"],
                   mode="bitmap", cache=True), None


def run_precopy(p: dict, host: dict, progress: Callable[[str], None]) -> list[dict]:
    from vlab.analysis import dirty as model
    from vlab.dirty import coarsen

    exp = "migration.precopy_sim"
    rec, path = _load_trace(p)
    ps = {"4k": PAGE, "2m": 2 * MIB}[p["page_size"]]
    tr = coarsen(rec.trace, ps)
    bw = p["bandwidth_gbit"] * 1e9
    variant = p["variant"]
    if variant == "stop_and_copy":
        res = model.stop_and_copy(tr, bw)
    else:
        res = model.precopy_sim(tr, bandwidth_bps=bw, max_downtime_ms=p["max_downtime_ms"],
                                max_rounds=p["max_rounds"],
                                throttle=True if variant == "auto_converge" else None)
    warnings = []
    if res.get("trace_wrapped"):
        warnings.append("the migration outlasted the recorded trace; the model looped it")
    if variant != "stop_and_copy" and not res["converged"]:
        warnings.append(f"did not converge: {res['outcome']} (the guest dirties pages faster "
                        "than the link sends them, or its working set exceeds the downtime)")
    flags = {"model": True, "converged": bool(res["converged"])}
    summ = rec.summary()
    trace_info = {"trace": path or "recorded now", "trace_intervals": tr.n_intervals,
                  "trace_dirty_mb_per_s": summ["dirty_mb_per_s"],
                  "memory_bytes": tr.n_pages * tr.page_size, "assumptions": res["assumptions"],
                  "outcome": res["outcome"], "pages_per_round": res["pages_per_round"],
                  "round_ms": res["round_ms"], "bytes_sent": res["bytes_sent"],
                  "trace_wrapped": res["trace_wrapped"],
                  "throttle_per_round": res.get("throttle_per_round")}
    pages = res["pages_per_round"]
    # stop-and-copy is a single round: no series to draw
    series = None if variant == "stop_and_copy" else {
        "x": list(range(1, len(pages) + 1)), "y": pages, "x_label": "pre-copy round",
        "y_label": "pages sent in the round"}
    rows = [
        make_row(exp, p, "rounds", "rounds", [res["rounds"]], flags=flags, warnings=warnings,
                 extra=trace_info, series=series),
        make_row(exp, p, "total_ms", "ms", [res["total_ms"]], flags=flags),
        make_row(exp, p, "converged", "bool", [1.0 if res["converged"] else 0.0], flags=flags),
        make_row(exp, p, "pages_sent", "pages", [float(sum(pages))], flags=flags),
    ]
    if res["downtime_ms"] is not None:
        rows.insert(2, make_row(exp, p, "downtime_ms", "ms", [res["downtime_ms"]], flags=flags))
    return _finish(rows, exp)


# --------------------------------------------------------------------------- declarations

def _validate_harvest(p: dict, host: dict) -> None:
    _validate_common(p, host)
    _size(p["slot"], "slot")
    if p["slot"] % (2 * MIB):
        raise UsageError("slot must be a multiple of 2 MiB")
    d = p["dirty"]
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
        raise UsageError(f"dirty must be an integer >= 0 (pages per interval), not {d!r}")
    r = p.get("ring_size", 65536)
    if not isinstance(r, int) or r < 4096 or r & (r - 1):
        raise UsageError(f"ring_size must be a power of two >= 4096 bytes, not {r!r}")
    c = p.get("clear_chunk_pages", 0)
    if not isinstance(c, int) or c < 0 or c % 64:
        raise UsageError(f"clear_chunk_pages must be 0 or a multiple of 64, not {c!r}")


def _validate_precopy(p: dict, host: dict) -> None:
    _validate_common(p, host)
    if p["variant"] not in ("precopy", "stop_and_copy", "auto_converge"):
        raise UsageError("variant must be precopy, stop_and_copy or auto_converge")
    if p["page_size"] not in ("4k", "2m"):
        raise UsageError("page_size must be 4k or 2m")
    bw = p["bandwidth_gbit"]
    if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not 0 < bw <= 10000:
        raise UsageError(f"bandwidth_gbit must be in (0, 10000], not {bw!r}")
    dt = p["max_downtime_ms"]
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or dt < 0:
        raise UsageError(f"max_downtime_ms must be >= 0, not {dt!r}")
    if p.get("trace") and not isinstance(p["trace"], str):
        raise UsageError("trace must be a path to a recording (.npz)")


def _dirty_fits() -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        slot, dirty = params.get("slot", 0), params.get("dirty", 0)
        if dirty > slot // PAGE:
            return (f"dirty={dirty} pages per interval do not fit in a {_fmt_size(slot)} slot "
                    f"({slot // PAGE} pages)")
        return None
    return Requirement("dirty-fits-slot", check)


def _needs_kvm_unless_trace() -> Requirement:
    base = needs_kvm()

    def check(host: dict, params: dict) -> str | None:
        return None if params.get("trace") else base.check(host, params)
    return Requirement("kvm", check)


# what each value may be (vlab.run.registry.Limit): sizes in the 52-bit guest-physical space;
# counts the KVM dirty-log ioctls take as 32-bit fields
U32 = (1 << 32) - 1
LIMITS = {"wss": within(1, 1 << 52, "bytes of guest memory, 52-bit guest-physical space"),
          "slot": within(1, 1 << 52, "memory slot bytes, 52-bit guest-physical space"),
          "dirty": within(0, U32, "pages per interval, 32 bits"),
          "intervals": within(1, U32, "interval count"),
          "ring_size": within(4096, U32, "dirty ring bytes, a 32-bit KVM_CAP_DIRTY_LOG_RING size"),
          "clear_chunk_pages": within(0, U32, "KVM_CLEAR_DIRTY_LOG num_pages, 32 bits"),
          "interval_ms": within(1, 1000, "milliseconds", integer=False),
          "duration_s": within(0, 3600, "seconds", integer=False),
          "bandwidth_gbit": within(0, 10000, "Gbit/s", integer=False),
          "max_downtime_ms": within(0, 3_600_000, "milliseconds, at most an hour", integer=False),
          "max_rounds": within(1, U32, "round count"),
          "trace": input_file("recorded dirty trace (.npz)", 4 << 30)}


register(OneShotExperiment(
    name="migration.dirty_rate",
    description="dirty pages per interval of a guest workload, exact against the guest's "
                "own record (time series)",
    params={"workload": list(WORKLOADS), "wss": [64 * MIB], "mode": list(MODES),
            "interval_ms": [100], "duration_s": [2.0], "guest_page": ["4k"]},
    quick={"workload": ["hotcold"], "wss": [16 * MIB], "mode": ["bitmap", "ring"],
           "interval_ms": [50], "duration_s": [1.0], "guest_page": ["4k"]},
    metrics={"dirty_pages_per_s": "pages/s", "dirty_mb_per_s": "MB/s", "missing_pages": "pages",
             "extra_pages": "pages", "extra_pages_pt": "pages", "extra_pages_runtime": "pages",
             "harvest_us": "us"},
    requires=[needs_kvm(), _mode_requirement(), _memory_requirement()],
    cpl=3, handled_by="KVM dirty log (bitmap / manual clear / dirty ring)", payload="dirty",
    validate=_validate_common, run=run_dirty_rate, limits=LIMITS))

register(OneShotExperiment(
    name="migration.wws",
    description="writable working set: distinct pages dirtied vs window length (numba over "
                "the recorded bitmaps)",
    params={"workload": ["hotcold", "zipf", "uniform", "sequential"], "wss": [64 * MIB],
            "mode": ["bitmap"], "interval_ms": [10], "intervals": [200]},
    quick={"workload": ["zipf"], "wss": [16 * MIB], "mode": ["bitmap"], "interval_ms": [10],
           "intervals": [60]},
    metrics={"wws_pages": "pages", "wws_pages_per_s": "pages/s"},
    requires=[needs_kvm(), _mode_requirement(), _memory_requirement()],
    cpl=3, handled_by="KVM dirty log; vlab.analysis.dirty.wws_curve", payload="dirty",
    validate=_validate_common, run=run_wws, limits=LIMITS))

register(OneShotExperiment(
    name="migration.harvest",
    description="what dirty tracking costs: get/clear/reset time by slot size and dirty "
                "count, ring vs bitmap, guest cycles per write with tracking on and off",
    params={"mode": list(MODES), "slot": [16 * MIB, 256 * MIB, 1 << 30],
            "dirty": [0, 1000, 10000], "intervals": [20], "ring_size": [65536],
            "clear_chunk_pages": [0]},
    quick={"mode": ["bitmap", "ring"], "slot": [16 * MIB], "dirty": [1000], "intervals": [5],
           "ring_size": [65536], "clear_chunk_pages": [0]},
    metrics={"harvest_us": "us", "get_us": "us", "clear_us": "us", "collect_us": "us",
             "reset_us": "us", "harvest_ns_per_dirty_page": "ns/page",
             "guest_cycles_per_write": "cycles", "write_slowdown": "x"},
    requires=[needs_kvm(), _mode_requirement(), _memory_requirement("slot"), _dirty_fits()],
    cpl=3, handled_by="KVM dirty log ioctls", payload="dirty",
    validate=_validate_harvest, run=run_harvest, limits=LIMITS))

register(OneShotExperiment(
    name="migration.precopy_sim",
    description="pre-copy / stop-and-copy / auto-converge migration model over a recorded "
                "dirty trace (model)",
    params={"workload": ["hotcold", "zipf", "uniform", "ratelimited"], "wss": [256 * MIB],
            "interval_ms": [10], "duration_s": [4.0], "bandwidth_gbit": list(LINKS_GBIT),
            "max_downtime_ms": [30, 300], "max_rounds": [30], "page_size": ["4k"],
            "variant": ["precopy", "stop_and_copy", "auto_converge"], "trace": [""]},
    quick={"workload": ["zipf"], "wss": [64 * MIB], "interval_ms": [10], "duration_s": [1.0],
           "bandwidth_gbit": list(LINKS_GBIT), "max_downtime_ms": [300], "max_rounds": [30],
           "page_size": ["4k"], "variant": ["precopy", "stop_and_copy", "auto_converge"],
           "trace": [""]},
    metrics={"rounds": "rounds", "total_ms": "ms", "downtime_ms": "ms", "converged": "bool",
             "pages_sent": "pages"},
    requires=[_needs_kvm_unless_trace(), _memory_requirement()],
    cpl=3, handled_by="model (vlab.analysis.dirty.precopy_sim) over a recorded trace",
    payload="dirty", validate=_validate_precopy, run=run_precopy, limits=LIMITS))
