"""The runner: plan cases, run them (pyperf worker processes for loop experiments), write rows.

pyperf does what it is good at: worker processes, warmups, loop calibration and metadata. Raw
per-operation samples travel back through side files (see vlab/_worker.py) and every one is
kept in the results file. A case whose requirement fails is a `skip` row naming it; a case that
fails is an `error` row with the message, and the run goes on.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

import numpy as np

from vlab.run import pinning, registry as registry
from vlab._errors import UsageError, VlabError
from vlab.run.interrupt import Interrupted, deferred, stop_children, worker_command
from vlab.run.registry import Experiment
from vlab.vmm.thread import placement_record, set_placement

DEFAULT_PYPERF = {"processes": 3, "values": 3, "warmups": 1, "min_time": 0.02}


@dataclass
class Case:
    id: str
    exp: Experiment
    params: dict
    skip: str | None = None
    loops: int | None = None        # pyperf loops per value (a suite entry's `loops`); None:
                                    # pyperf calibrates (or the run's --loops)


@dataclass
class RunOptions:
    selectors: list[str] = field(default_factory=list)
    suite: str | None = None
    overrides: dict[str, list] = field(default_factory=dict)
    output: str | None = None
    results_dir: str = "results"
    trace: bool = False
    argv: list[str] = field(default_factory=list)
    progress: TextIO | None = None
    pyperf: dict[str, Any] = field(default_factory=dict)
    pin: list[str] | None = None                # --pin items (vlab/run/pinning.py); None: the
                                                # suite's, else pinning.DEFAULT_PIN
    # ---- journal and resume (vlab/run/journal.py) ----
    run_id: str | None = None
    host: dict | None = None                    # resuming: the journal's host (no calibration)
    done: dict[str, list[dict]] = field(default_factory=dict)   # case id -> rows, not rerun
    on_start: Callable[..., None] | None = None   # after planning, before the first case
    on_case: Callable[[str, list[dict]], None] | None = None    # a case finished: its rows


def plan(opts: RunOptions, host: dict) -> tuple[list[Case], dict[str, Any], str | None]:
    """Resolve selectors/suite into cases; bad names or parameters raise UsageError. The
    pyperf options come back with the run's pin items under "pin" (None: the default)."""
    pyperf_opts = dict(DEFAULT_PYPERF)
    suite_name = None
    pin = opts.pin
    entries: list[tuple[Experiment, dict[str, list], bool, int | None]] = []
    if opts.selectors:
        for exp in registry.select(opts.selectors):
            entries.append((exp, {}, False, None))
    else:
        suite_name = opts.suite or "quick"
        suite = registry.load_suite(suite_name)
        pyperf_opts.update(suite.pyperf)
        if pin is None:
            pin = suite.pin
        for i, (sel, overrides) in enumerate(suite.entries):
            loops = suite.loops[i] if i < len(suite.loops) else None
            for exp in registry.select([sel]):
                entries.append((exp, overrides, suite.quick, loops))
    pyperf_opts.update(opts.pyperf)
    pyperf_opts["pin"] = pin
    known = {k for exp, _, _, _ in entries for k in exp.params} | {"iters"}
    for key in opts.overrides:
        if key not in known:
            raise UsageError(f"unknown parameter {key!r} for the selected experiments "
                             f"(known: {', '.join(sorted(known))})")
    cases: list[Case] = []
    seen: set[str] = set()
    for exp, suite_over, quick, loops in entries:
        over = dict(suite_over)
        over.update({k: v for k, v in opts.overrides.items() if k in exp.params})
        grid = exp.grid(quick=quick, overrides=over)
        if "iters" in opts.overrides:
            grid = [dict(p, iters=it) for p in grid for it in opts.overrides["iters"]]
        for params in grid:
            exp.check_params(params, host)  # declared limits and the experiment's validate
            cid = exp.name + "".join(f",{k}={v}" for k, v in params.items())
            if cid in seen:
                continue
            seen.add(cid)
            cases.append(Case(f"c{len(cases):03d}", exp, params, exp.check(host, params),
                              None if "loops" in opts.pyperf else loops))
    if not cases:
        raise UsageError("nothing to run: the selection matched no experiment cases")
    return cases, pyperf_opts, suite_name


def _fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:#x}" if k in ("leaf",) and isinstance(v, int) else f"{k}={v}"
                    for k, v in params.items())


def _progress(opts: RunOptions, text: str, end: str = "\n") -> None:
    out = opts.progress
    if out is not None:
        out.write(text + end)
        out.flush()


def _new_runner(pyperf_opts: dict, plan_path: str):
    import pyperf

    # pyperf allows one Runner per process; a run creates its own, so let go of an old one
    pyperf.Runner._created.clear()
    launcher, program = worker_command(("-m", "vlab.run.worker", plan_path))
    runner = pyperf.Runner(program_args=program)
    args = ["--quiet", "--processes", str(pyperf_opts["processes"]),
            "--values", str(pyperf_opts["values"]), "--warmups", str(pyperf_opts["warmups"]),
            "--min-time", str(pyperf_opts["min_time"]), "--python", launcher]
    if pyperf_opts.get("loops"):
        args += ["--loops", str(pyperf_opts["loops"])]
    runner.parse_args(args)
    return runner


def _bench(runner, task: int, case_id: str):
    """Run loop case number `task` of the plan (its index among the plan's cases) in pyperf's
    worker processes. pyperf numbers the cases in the order `bench_time_func` is called and
    passes the number to each worker (`--worker-task`), which runs that case of the plan. It
    counts a call only when the call returns, so after a case whose workers failed, the workers
    of each later case would run the case before it (and the case be reported failed). Setting
    the number from the plan keeps case and workers matched whatever happened before."""
    runner._worker_task = task
    with contextlib.redirect_stdout(io.StringIO()):   # pyperf's own result line
        return runner.bench_time_func(case_id, _never_called)


def _read_side(side_dir: str, case_id: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(side_dir, f"{case_id}.*.jsonl"))):
        pid = int(path.rsplit(".", 2)[-2])
        with open(path) as f:
            out[pid] = [json.loads(line) for line in f if line.strip()]
    return out


def _kept_records(side: dict[int, list[dict]], warmups: int, values: int) -> list[list[dict]]:
    """Per worker process, the records of its values (not calibration, not warmups)."""
    kept = []
    for _pid, recs in sorted(side.items()):
        loops = {r.get("loops") for r in recs}
        if len(recs) == warmups + values and len(loops) == 1:
            kept.append(recs[warmups:])
    return kept


def _error_text(side: dict[int, list[dict]], exc: BaseException) -> str:
    for recs in side.values():
        for r in recs:
            if "error" in r:
                return r["error"]
    return f"{type(exc).__name__}: {exc}"


def _rows_for(case: Case, host: dict, per_process: list[list[dict]], bench_meta: dict) -> list[dict]:
    from vlab import results

    exp = case.exp
    version = exp.version()
    extras = [r["extra"] for proc in per_process for r in proc]
    rows = []
    for metric, unit in exp.metrics.items():
        samples = [x for proc in per_process for r in proc for x in r["metrics"].get(metric, [])]
        if not samples:
            rows.append(results.error_row(exp.name, case.params, metric, unit,
                                          "no samples were recorded", exp_version=version))
            continue
        per_proc = [[x for r in proc for x in r["metrics"].get(metric, [])] for proc in per_process]
        means = [float(np.mean(v)) for v in per_proc if v]
        medians = [float(np.median(v)) for v in per_proc if v]
        extra: dict[str, Any] = {
            "handled_by": exp.handled_by,
            "processes": len(per_process),
            "process_means": means,
            "process_medians": medians,
            # spread between worker processes: of their means (tails included) and of their
            # medians (robust to a few descheduled samples)
            "cv_between_processes": _cv(means),
            "cv_between_process_medians": _cv(medians),
            "pyperf_loops": bench_meta.get("loops"),
        }
        if extras:
            for k, v in extras[-1].items():
                if k not in ("per_vcpu",):
                    extra.setdefault(k, v)
            if "per_vcpu" in extras[-1]:
                extra["per_vcpu"] = extras[-1]["per_vcpu"]
        flags: dict[str, Any] = {}
        warnings: list[str] = []
        if metric in exp.higher_is_better:
            flags["higher_is_better"] = True
        if exp.annotate:
            w, f, e = exp.annotate(case.params, host, metric, samples, extras)
            warnings += w
            flags.update(f)
            extra.update(e)
        rows.append(results.make_row(exp.name, case.params, metric, unit, samples,
                                     exp_version=version, warnings=warnings, flags=flags,
                                     extra=extra))
    return rows


def _cv(values: list[float]) -> float | None:
    if len(values) < 2 or not np.mean(values):
        return None
    return float(np.std(values, ddof=1) / abs(np.mean(values)))


def _skip_rows(case: Case, reason: str, status: str = "skip") -> list[dict]:
    from vlab import results

    make = results.skip_row if status == "skip" else results.error_row
    return [make(case.exp.name, case.params, m, u, reason, exp_version=case.exp.version())
            for m, u in case.exp.metrics.items()]


def execute(opts: RunOptions) -> tuple[dict, int]:
    """Run what `opts` selects on this host; return the results document and an exit code."""
    from vlab import results
    from vlab.host.calibrate import calibrate_host, collect_host

    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.monotonic()
    run_id = opts.run_id or results.new_run_id()
    host = opts.host or collect_host()
    cases, pyperf_opts, suite = plan(opts, host)
    placement = pinning.parse_pin(pyperf_opts["pin"])
    # a resumed run keeps the host record (and calibration) of the run it continues
    cal = None if opts.host is not None else calibrate_host(
        host, on_start=lambda: _progress(opts, "calibrating ...", end=" "))
    if cal is not None:
        _progress(opts, f"CPL3 nop {cal.get('cpl3_nop_cycles_per_iter', 0):.1f} cycles, "
                        f"CPL0 nop {cal.get('cpl0_nop_cycles_per_iter', 0):.0f} cycles"
                        + (" (CPL0 is emulated on this host)" if cal.get("emulated_cpl0") else ""))
    if opts.on_start is not None:
        opts.on_start(run_id=run_id, started_at=started.isoformat(timespec="seconds"),
                      host=host, cases=cases, pyperf=pyperf_opts, suite=suite,
                      trace=opts.trace, argv=opts.argv,
                      options={"selectors": opts.selectors, "suite": opts.suite,
                               "overrides": opts.overrides, "trace": opts.trace,
                               "pyperf": opts.pyperf, "pin": opts.pin})
    _progress(opts, pinning.describe(placement))
    own_cpus = os.sched_getaffinity(0)
    set_placement(placement)            # one-shot cases run here, in the manager process
    tmp = tempfile.mkdtemp(prefix="vlab-run-")
    rows: list[dict] = []
    failed = any(r.get("status") == "error" for rs in opts.done.values() for r in rs)
    interrupted: Interrupted | None = None
    tracer, trace_reason = (_open_tracer(opts) if opts.trace else (None, None))
    try:
        side_dir = os.path.join(tmp, "side")
        os.makedirs(side_dir)
        loop_cases = [c for c in cases if c.skip is None and c.exp.kind == "loop"
                      and c.id not in opts.done]
        plan_path = os.path.join(tmp, "plan.json")
        with open(plan_path, "w") as f:
            json.dump({"host": host, "side_dir": side_dir,
                       "placement": pinning.to_plan(placement),
                       "cases": [{"id": c.id, "experiment": c.exp.name, "params": c.params}
                                 for c in loop_cases]}, f)
        runner = _new_runner(pyperf_opts, plan_path) if loop_cases else None
        task = {c.id: k for k, c in enumerate(loop_cases)}     # the plan's numbering
        pyperf_meta: dict = {}
        total = len(cases)
        for i, case in enumerate(cases, 1):
            label = f"[{i:>{len(str(total))}}/{total}] {case.exp.name} {_fmt_params(case.params)}"
            if case.id in opts.done:
                _progress(opts, f"{label}  done before (journal)")
                rows += opts.done[case.id]
                continue
            if case.skip:
                _progress(opts, f"{label}  skip: {case.skip}")
                with deferred():
                    rows += _skip_rows(case, case.skip)
                    _journal(opts, case, rows[-len(case.exp.metrics):])
                continue
            _progress(opts, f"{label} ...", end=" ")
            t0 = time.monotonic()
            if tracer is not None:
                tracer.snapshot(reset=True)         # start this case's trace from zero
            try:
                if case.exp.kind == "loop":
                    runner.args.loops = case.loops or pyperf_opts.get("loops") or 0
                    bench = _bench(runner, task[case.id], case.id)
                    side = _read_side(side_dir, case.id)
                    kept = _kept_records(side, pyperf_opts["warmups"], pyperf_opts["values"])
                    if not kept:
                        raise VlabError("no worker process completed its values")
                    meta = bench.get_metadata() if bench is not None else {}
                    if not pyperf_meta:
                        pyperf_meta = {k: v for k, v in meta.items()
                                       if k in ("cpu_model_name", "cpu_count", "hostname",
                                                "platform", "python_version", "cpu_affinity",
                                                "cpu_config", "cpu_freq", "boot_time")}
                    case_rows = _rows_for(case, host, kept, meta)
                    where = pinning.merge_records(r.get("placement") for proc in kept
                                                  for r in proc)
                else:
                    set_placement(placement)        # forget the CPUs of the case before
                    case_rows = case.exp.run(case.params, host,
                                             lambda s: _progress(opts, s, end=" "))
                    where = placement_record()
                for row in case_rows:
                    row.setdefault("placement", where)
                if opts.trace:
                    case_rows = case_rows + _trace_case_rows(
                        tracer, trace_reason,
                        f"{case.exp.name} {_fmt_params(case.params)}".strip())
                with deferred():          # the rows and their journal line, or neither
                    rows += case_rows
                    _journal(opts, case, case_rows)
                _progress(opts, f"ok ({time.monotonic() - t0:.1f} s)  {_headline(case_rows)}")
            except (KeyboardInterrupt, Interrupted):
                raise
            except BaseException as e:  # noqa: BLE001 - an error row, the run goes on
                side = _read_side(side_dir, case.id) if case.exp.kind == "loop" else {}
                msg = _error_text(side, e) if side else f"{type(e).__name__}: {e}"
                _progress(opts, f"error: {msg}")
                with deferred():
                    rows += _skip_rows(case, msg, status="error")
                    _journal(opts, case, rows[-len(case.exp.metrics):])
                failed = True
        if pyperf_meta:
            host["pyperf"] = pyperf_meta
        # ---- derived rows (experiments that declare `derive`) ----
        more, derive_failed = derived_rows(cases, rows, host, opts)
        rows += more
        failed |= derive_failed
    except Interrupted as e:      # stop now: end the workers, keep the finished cases
        interrupted = e
        _progress(opts, f"\n{e.name}: stopping the workers ...")
        stop_children()
    finally:
        set_placement(None)
        os.sched_setaffinity(0, own_cpus)
        shutil.rmtree(tmp, ignore_errors=True)
        if tracer is not None:
            last = tracer.snapshot()
            host["trace"] = {"source": last.source, "notes": last.notes,
                             "unavailable": last.unavailable}
            tracer.close(wait=True)
    doc = results.new_document(host, rows, argv=opts.argv, suite=suite, started=started,
                               duration_s=round(time.monotonic() - t_start, 2), run_id=run_id)
    doc["placement"] = dict(pinning.to_plan(placement) or {}, pin=placement.spec
                            if placement is not None else "none")
    if interrupted is not None:
        doc.update(interrupted=True, signal=interrupted.name)
        return doc, interrupted.exit_code
    return doc, (1 if failed else 0)


def _journal(opts: RunOptions, case: Case, rows: list[dict]) -> None:
    if opts.on_case is not None:
        opts.on_case(case.id, rows)


def _open_tracer(opts: RunOptions):
    """The exit tracer over this process and every pyperf worker it spawns, or the reason why
    tracing is unavailable (then each case gets skip rows saying so; the run goes on)."""
    try:
        from vlab import trace
    except ImportError as e:
        return None, f"tracing module unavailable: {e}"
    ok, reason, _detail = trace.status(mount=True)
    if not ok:
        _progress(opts, f"tracing unavailable: {reason}")
        return None, reason
    try:
        tracer = trace.Tracer([os.getpid()], follow_children=True)
        tracer.start()
    except Exception as e:  # noqa: BLE001 - tracing is optional; say why and go on
        _progress(opts, f"tracing unavailable: {e}")
        return None, f"tracer failed to attach: {e}"
    _progress(opts, f"tracing exits ({tracer.snapshot().source})")
    return tracer, None


def _trace_case_rows(tracer, reason: str | None, of: str) -> list[dict]:
    from vlab.run.tracerows import trace_rows, unavailable_rows

    if tracer is None:
        return unavailable_rows(reason or "tracing unavailable", of)
    return trace_rows(tracer.snapshot(reset=True), of)

def derived_rows(cases: list[Case], rows: list[dict], host: dict,
                 opts: RunOptions | None = None) -> tuple[list[dict], bool]:
    """Rows computed from several cases' rows, once per experiment that declares `derive`
    (e.g. the paging area's guest/native ratios, TLB-reach knees and model rows). A derive
    that raises gives an error row for that experiment, and the run goes on."""
    from vlab import results

    out: list[dict] = []
    failed = False
    done: set[str] = set()
    for case in cases:
        exp = case.exp
        if exp.derive is None or exp.name in done:
            continue
        done.add(exp.name)
        mine = [r for r in rows if r.get("experiment") == exp.name]
        try:
            more = exp.derive(mine, host)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - an error row, the run goes on
            more = [results.error_row(exp.name, {}, "derived", "-",
                                      f"deriving rows failed: {type(e).__name__}: {e}",
                                      exp_version=exp.version())]
            failed = True
        if more and opts is not None:
            _progress(opts, f"{exp.name}: {len(more)} derived row{'s' if len(more) > 1 else ''}")
        out += more
    return out, failed


def _never_called(loops: int) -> float:
    raise RuntimeError("the manager process never times anything itself")


def _headline(rows: list[dict]) -> str:
    for r in rows:
        if r.get("status") == "ok":
            med = r.get("median")
            return f"{r['metric']} p50 {med:,.1f} {r['unit']}" if med is not None else ""
    return ""


def default_output(doc: dict, results_dir: str = "results") -> str:
    stamp = doc["started_at"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stamp = stamp.replace("+00:00", "Z")
    return os.path.join(results_dir, doc["host"]["host_id"], f"{stamp}.json")
