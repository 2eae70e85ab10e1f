"""Live migration, measured: a guest migrated between two VMM processes, beside the model.

`migration.live` runs one real migration per case (vlab.migration.session.run_local: a destination and
a source process on loopback). Before migrating, the source records the guest's dirty trace
with the migration's own tracking mode; `migration.precopy_sim`'s model is then run on that
trace for the same link, downtime budget, round limit, policy and throttle, and its rows are
set beside the measured ones (param `estimate` = "precopy_sim", flags.model). The measured
rows carry `estimate` = "measured". The model's semantics are those of mode=bitmap: a page
written during a round is sent again in the next. mode=clear re-protects each batch just
before copying it, so a page written before its copy is not resent; the model then
over-predicts the rounds (that difference is a measured result, not an error).

The trace is harvested every max_downtime_ms/2 (5..100 ms) and lasts at least as long as
round 0 at the link's rate: the model loops the trace and resolves rounds only to one interval,
so a shorter or coarser trace would bias it (a short trace repeats pages where a uniform writer
would find new ones; a coarse one makes every round dirty at least one interval's worth).

The guest is the `migrate` payload (vlab/_migguest.py): `uniform` writes random pages of the
whole data slot at `rate` pages/s, paced by rdtsc; after its vCPU was descheduled or throttled
it catches up at most `lag_us` of backlog, so with a small `lag_us` it behaves like a CPU-bound
guest that auto-converge can slow down, and with the default (50 ms) it keeps its rate on a
busy host. Rows warn when the guest wrote much less than `rate` or the link did not reach its
limit (both happen on an oversubscribed 2-core host).

A case whose migration is not verified (page hashes of the destination after the final round
differ from the source's paused memory, or the guest's own checks fail on the destination) is
an error, not a row of figures.
"""
from __future__ import annotations

from typing import Any

from vlab.run.registry import (OneShotExperiment, Requirement, needs_cap, needs_kvm, one_of,
                               register, within)

METRICS = {"total_ms": "ms", "downtime_ms": "ms", "rounds": "rounds", "bytes_sent": "bytes",
           "verified": "bool"}
MODEL_METRICS = ("total_ms", "downtime_ms", "rounds", "bytes_sent")
NAME = "migration.live"

PARAMS = {"workload": ["uniform"], "mem": [1 << 30], "rate": [1000, 10000, 50000],
          "link_mbit": [2000], "max_downtime_ms": [50], "max_rounds": [30],
          "mode": ["bitmap"], "strategy": ["precopy"], "policy": ["stop_copy"],
          "auto_converge": [False], "lag_us": [50000]}
QUICK = {"workload": ["uniform"], "mem": [64 << 20], "rate": [10000], "link_mbit": [1000],
         "max_downtime_ms": [50], "max_rounds": [30], "mode": ["bitmap"],
         "strategy": ["precopy"], "policy": ["stop_copy"], "auto_converge": [False],
         "lag_us": [50000]}

# what each value may be (vlab.run.registry.Limit)
U32 = (1 << 32) - 1
LIMITS = {"mem": within(1, 1 << 52, "guest memory bytes, 52-bit guest-physical space"),
          "rate": within(0, U32, "pages/s, 32 bits"),
          "link_mbit": within(0, 10_000_000, "Mbit/s, at most 10 Tbit/s", integer=False),
          "max_downtime_ms": within(0, 3_600_000, "milliseconds, at most an hour",
                                    integer=False),
          "max_rounds": within(1, U32, "round count"),
          "lag_us": within(0, U32, "microseconds, 32 bits"),
          "auto_converge": one_of(False, True)}


def _config(params: dict):
    from vlab._errors import UsageError
    from vlab.migration.guest import GuestSpec
    from vlab.migration.options import MigrateOptions
    from vlab.migration.session import RunConfig

    for key in ("mem", "rate", "max_rounds", "lag_us"):
        v = params.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise UsageError(f"{key} must be an integer, got {v!r}")
    mem = int(params.get("mem", 64 << 20))
    link = params.get("link_mbit", 1000)
    if link is not None and (isinstance(link, bool) or not isinstance(link, (int, float))
                             or link <= 0):
        raise UsageError(f"link_mbit must be a positive number of Mbit/s, got {link!r}")
    spec = GuestSpec(workload=str(params.get("workload", "uniform")), mem=mem,
                     rate=int(params.get("rate", 10000)),
                     lag_us=int(params.get("lag_us", 50000)))
    opts = MigrateOptions(strategy=str(params.get("strategy", "precopy")),
                          mode=str(params.get("mode", "bitmap")),
                          bandwidth=link * 1e6 / 8 if link else None,
                          max_downtime_ms=float(params.get("max_downtime_ms", 50)),
                          max_rounds=int(params.get("max_rounds", 30)),
                          policy=str(params.get("policy", "stop_copy")),
                          auto_converge=bool(params.get("auto_converge", False)))
    spec.validate()
    opts.validate()
    small = mem <= 256 << 20
    # the model resolves rounds only to one trace interval: keep it under the downtime budget,
    # but not much finer: every harvest re-protects the guest's hot pages (its sequence table),
    # which slows the writer (1 GiB, 50k pages/s asked: ~31k/s at 10 ms, ~48k/s at 50 ms).
    # The trace is extended to cover round 0 (vlab.migration.session.run_source).
    interval = min(100.0, max(5.0, opts.max_downtime_ms / 2))
    # the model is of pre-copy: no trace (and no model rows) for post-copy
    trace = 1.0 if opts.strategy == "precopy" else 0.0
    return RunConfig(spec=spec, opts=opts, warmup_s=0.3 if small else 1.0, trace_s=trace,
                     trace_interval_ms=interval), (0.5 if small else 1.0)


def _validate(params: dict, host: dict) -> None:
    _config(params)


def _memory() -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        need = 2 * int(params.get("mem", 0)) + (64 << 20)
        have = (host.get("mem_available_kb") or 0) * 1024
        if have and need > have:
            return (f"needs ~{need >> 20} MiB for the source and destination guests; "
                    f"{have >> 20} MiB available")
        return None
    return Requirement("memory", check)


def _ring() -> Requirement:
    ring = needs_cap("DIRTY_LOG_RING", "mode=ring")
    ring_acq = needs_cap("DIRTY_LOG_RING_ACQ_REL", "mode=ring")

    def check(host: dict, params: dict) -> str | None:
        if params.get("mode") != "ring":
            return None
        a, b = ring.check(host, params), ring_acq.check(host, params)
        return a if (a and b) else None
    return Requirement("dirty_ring", check)


def _manual_protect() -> Requirement:
    cap = needs_cap("MANUAL_DIRTY_LOG_PROTECT2", "mode=clear")

    def check(host: dict, params: dict) -> str | None:
        return cap.check(host, params) if params.get("mode") == "clear" else None
    return Requirement("manual_protect", check)


def _userfaultfd() -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        if params.get("strategy") != "postcopy":
            return None
        try:
            from vlab.migration.postcopy import uffd_status
        except ImportError as e:
            return f"post-copy needs vlab's native module: {e}"
        why = uffd_status()
        return f"post-copy skipped: {why}" if why else None
    return Requirement("userfaultfd", check)


def _rows(params: dict, res: dict, version: str) -> list[dict]:
    from vlab import results

    rows: list[dict] = []
    warnings: list[str] = []
    rate = params.get("rate")
    got = res.get("trace_writes_per_s")
    if rate and got is not None and got < 0.8 * rate:
        warnings.append(f"the guest wrote {got:.0f} pages/s of the {rate} asked (host CPU "
                        f"contention; the model is fed the measured trace)")
    r0 = (res.get("rounds_detail") or [{}])[0]
    limit = res.get("bandwidth_Bps")
    if limit and r0.get("MBps") and r0["MBps"] * 1e6 < 0.9 * limit:
        warnings.append(f"round 0 moved {r0['MBps']:.0f} MB/s of the {limit / 1e6:.0f} MB/s "
                        f"limit (CPU-bound on this host); the model assumes the limit")
    dest = res.get("destination") or {}
    extra = {"outcome": res.get("outcome"), "pages_per_round": res.get("pages_per_round"),
             "downtime_method": res.get("downtime_method"),
             "switchover_detail_ms": res.get("switchover_detail_ms"),
             "tsc_step_ms": res.get("tsc_step_ms"), "writes_per_s": got,
             "dirty_pages_per_s": res.get("trace_dirty_pages_per_s"),
             "memory_mismatches": res.get("memory_mismatches"),
             "guest_report": res.get("guest_report"), "host_load": res.get("host_load"),
             "round0_MBps": r0.get("MBps"), "harvest_ms": res.get("harvest_ms"),
             "ring_full_exits": res.get("ring_full_exits"),
             "throttle_per_round": res.get("throttle_per_round"),
             "writes_per_s_while_migrating": res.get("writes_per_s_while_migrating"),
             "resent_unchanged_pages": res.get("resent_unchanged_pages"),
             "trace_s": res.get("trace_s"), "trace_interval_ms": res.get("trace_interval_ms")}
    if dest.get("fault_latency_ms"):
        extra["demand_faults"] = dest.get("demand_faults")
        extra["fault_latency_ms"] = dest.get("fault_latency_ms")
    mp = dict(params, estimate="measured")
    ppr = res.get("pages_per_round") or []
    series = {"x": list(range(len(ppr))), "y": ppr, "x_label": "round (last: stop-and-copy)",
              "y_label": "pages sent in the round"} if ppr else None
    for metric, unit in METRICS.items():
        v = res.get(metric)
        if metric == "verified":
            if res.get("outcome") == "aborted":
                continue
            v = 1.0 if res.get("verified") else 0.0
        if v is None:
            continue
        opt: dict[str, Any] = {"exp_version": version, "warnings": list(warnings),
                               "extra": extra}
        if metric == "rounds" and series:
            opt["series"] = series
        rows.append(results.make_row(NAME, mp, metric, unit, [float(v)], **opt))
    if params.get("strategy") == "postcopy" and dest.get("fault_latency_ms", {}).get("n"):
        fl = dest["fault_latency_ms"]
        rows.append(results.make_row(NAME, mp, "demand_faults", "faults",
                                     [float(fl["n"])], exp_version=version, extra=extra))
        rows.append(results.make_row(NAME, mp, "fault_latency_ms", "ms", [fl["median"]],
                                     exp_version=version,
                                     extra={"p90": fl["p90"], "p99": fl["p99"],
                                            "max": fl["max"], "mean": fl["mean"]}))
    model = res.get("model")
    if model and "rounds" in model:
        pp = dict(params, estimate="precopy_sim")
        mextra = {"outcome": model["outcome"], "pages_per_round": model["pages_per_round"],
                  "bandwidth_source": model.get("bandwidth_source"),
                  "trace_wrapped": model.get("trace_wrapped"),
                  "measured": {m: res.get(m) for m in MODEL_METRICS},
                  "assumptions": "the recorded trace loops; a round of P pages lasts "
                                 "P*4096*8/bandwidth; no protocol overhead or switch-over "
                                 "costs beyond the final round's transfer"}
        if model.get("effective"):
            mextra["at_measured_throughput"] = model["effective"]
        mseries = {"x": list(range(len(model["pages_per_round"]))),
                   "y": model["pages_per_round"], "x_label": "round (last: stop-and-copy)",
                   "y_label": "pages sent in the round"}
        for metric in MODEL_METRICS:
            v = model.get(metric)
            if v is None:
                continue
            opt = {"exp_version": version, "flags": {"model": True}, "extra": mextra}
            if metric == "rounds":
                opt["series"] = mseries
            rows.append(results.make_row(NAME, pp, metric, METRICS[metric], [float(v)], **opt))
    return rows


def run(params: dict, host: dict, progress) -> list[dict]:
    """One migration (and the model beside it) -> rows."""
    from vlab._errors import VlabError
    from vlab.run.registry import get
    from vlab.migration.session import run_local

    cfg, run_after = _config(params)
    progress(f"{cfg.spec.mem >> 20} MiB guest ...")
    res = run_local(cfg, run_after=run_after)
    outcome = res.get("outcome")
    if outcome in ("failed", "failed_after_commit") or res.get("error"):
        raise VlabError(f"migration {outcome}: {res.get('error')}")
    if outcome != "aborted" and not res.get("verified"):
        problems = res.get("guest_problems") or []
        if res.get("memory_mismatches"):
            problems = [f"{res['memory_mismatches']} pages differ from the source's paused "
                        f"memory (first {res.get('first_mismatch')})"] + problems
        raise VlabError("migration not verified: " + ("; ".join(problems) or "unknown"))
    return _rows(params, res, get(NAME).version())


register(OneShotExperiment(
    name=NAME,
    description="live-migrate a running guest between two VMM processes on loopback, "
                "verified, beside the pre-copy model's prediction",
    params=PARAMS, quick=QUICK, metrics=METRICS,
    requires=[needs_kvm(), _memory(), _ring(), _manual_protect(), _userfaultfd()],
    validate=_validate, payload="migrate", cpl=3, run=run, limits=LIMITS,
    handled_by="two vlab VMM processes over TCP (loopback)"))
