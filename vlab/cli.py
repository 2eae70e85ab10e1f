"""The `vlab` command line (also `python -m vlab`).

Exit codes: 0 done (skips are not errors), 1 an experiment failed, 2 bad usage or bad input
(unknown experiment, bad parameter, unreadable results file, no usable /dev/kvm) with a
one-line message and no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from vlab._argparse import UsageParser as _Parser
from vlab._argparse import one_line as _one_line
from vlab._errors import KvmError, UsageError, VlabError


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vlab", description="virtualization performance lab for x86 Linux/KVM hosts")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser("doctor", help="host fingerprint and capability table")
    d.add_argument("--json", action="store_true", help="emit the fingerprint as JSON")

    ls = sub.add_parser("list", help="experiments, their parameters, and whether each can run here")
    ls.add_argument("--json", action="store_true")

    r = sub.add_parser("run", help="run experiments and write a results file")
    r.add_argument("selectors", nargs="*", metavar="SELECTOR",
                   help="experiment names, globs (exits.*) or areas (exits); default: the suite")
    r.add_argument("--suite", help="suite name (default quick)")
    r.add_argument("-o", "--output", help="results file (default results/<host_id>/<stamp>.json)")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set a parameter axis, e.g. -p cpl=0 or -p wss=64M,1G")
    r.add_argument("--trace", action="store_true", help="attach the exit tracer to every case")
    r.add_argument("--processes", type=int, help="pyperf worker processes per case")
    r.add_argument("--values", type=int, help="pyperf values per process")
    r.add_argument("--pin", action="append", metavar="SPEC",
                   help="CPU pinning of vCPU, backend and worker threads: auto (the default), "
                        "none, a CPU list (0-3,6), or ROLE=CPUS (roles worker, vcpu, backend; "
                        "repeat --pin for several)")
    r.add_argument("--resume", metavar="FILE",
                   help="continue a stopped or killed run from its journal (FILE.journal)")
    r.add_argument("--force", action="store_true", help="replace an existing -o results file")

    s = sub.add_parser("show", help="print the table of a results file")
    s.add_argument("file")
    s.add_argument("--csv", action="store_true")

    c = sub.add_parser("compare", help="per-metric ratio B/A with significance, and host changes")
    c.add_argument("files", nargs="+", metavar="FILE",
                   help="a results file, or replicate runs of one side joined by commas "
                        "(a1.json,a2.json,a3.json): with two or more runs on both sides each "
                        "run counts once. Every side after the first is compared to the first")
    c.add_argument("--min-effect", type=float, default=0.02,
                   help="smallest relative change that counts (default 0.02 = 2%%)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--md", action="store_true")
    c.add_argument("--strict", action="store_true", help="refuse any experiment-version mismatch")
    c.add_argument("--fdr", type=float, default=0.05,
                   help="false-discovery rate across the rows of a comparison "
                        "(Benjamini-Hochberg; default 0.05)")

    pl = sub.add_parser("plot", help="PNG/SVG figures per area")
    pl.add_argument("files", nargs="+", metavar="FILE")
    pl.add_argument("-o", "--output", required=True, metavar="DIR")

    rp = sub.add_parser("report", help="one self-contained HTML report")
    rp.add_argument("files", nargs="+", metavar="FILE")
    rp.add_argument("-o", "--output", required=True, metavar="report.html")

    t = sub.add_parser("trace", help="live exit reasons, counts and latency of any process's VMs")
    t.add_argument("--pid", type=int, action="append", help="trace this process (repeatable)")
    t.add_argument("--duration", type=float, help="stop after this many seconds")
    t.add_argument("--interval", type=float, default=1.0, help="refresh period (default 1 s)")
    t.add_argument("-o", "--output", help="results file (default results/<host_id>/trace-<stamp>.json)")
    t.add_argument("--force", action="store_true", help="replace an existing -o results file")
    t.add_argument("cmdline", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="a command to run and trace")

    h = sub.add_parser("host", help="opt-in host configuration changes")
    hs = h.add_subparsers(dest="host_command", parser_class=_Parser)
    hs.required = True
    hset = hs.add_parser("set", help="set KEY=VALUE (e.g. kvm_intel.ept=0, thp=never)")
    hset.add_argument("assignment", metavar="KEY=VALUE")
    hset.add_argument("--dry-run", action="store_true")
    hres = hs.add_parser("restore", help="put back a setting changed with `vlab host set`")
    hres.add_argument("key", nargs="?")
    hres.add_argument("--dry-run", action="store_true")
    hs.add_parser("show", help="the settings `vlab host set` manages, as they are now")

    # ---- live migration (vlab/migration/command.py) ----
    from vlab.migration.options import add_arguments as _migrate_arguments

    mg = sub.add_parser("migrate", help="live-migrate a running guest between two VMM "
                                        "processes and verify it")
    _migrate_arguments(mg)
    # ---- end live migration ----

    # ---- fleets (vlab/fleet) ----
    from vlab.fleet.command import add_arguments as _fleet_arguments

    _fleet_arguments(sub.add_parser("fleet", help="run and compare many hosts through Ansible"),
                     _Parser)
    return p


# ---------------------------------------------------------------- commands

def cmd_doctor(args) -> int:
    from vlab.host.calibrate import calibrate_host, collect_host
    from vlab.host import doctor_checks, format_doctor

    host = collect_host()
    calibrate_host(host)
    extra = _trace_checks(host)
    if args.json:
        print(json.dumps(host, indent=1, sort_keys=True))
        return 0
    print(format_doctor(host, doctor_checks(host, extra)))
    return 0


def _trace_checks(host: dict) -> list:
    """Tracing capability rows for the doctor (empty when the tracing module is absent)."""
    try:
        from vlab import trace
        from vlab.host import Check
    except ImportError:
        return []
    ok, reason, detail = trace.status(mount=os.geteuid() == 0)
    tooling = host.setdefault("tooling", {})
    tooling["trace"] = {"ok": ok, "reason": reason, **detail}
    headers = detail.get("headers") if isinstance(detail.get("headers"), dict) else {}
    if ok and headers.get("path"):
        tooling.setdefault("bpf", {})["bcc_kernel_source"] = headers["path"]
    text = reason if not ok else f"bcc ready; kernel headers: {headers.get('reason') or headers.get('path')}"
    return [Check("exit tracing (bcc)", ok, text, "" if ok else detail.get("advice", ""),
                  level="warn" if not ok else "missing")]


def cmd_list(args) -> int:
    from vlab.run import registry as reg
    from vlab.host.calibrate import collect_host

    host = collect_host()
    out = []
    for exp in reg.discover().values():
        reasons = {exp.check(host, p) for p in exp.grid()}
        runnable = None in reasons
        out.append({"name": exp.name, "description": exp.description, "params": exp.params,
                    "metrics": exp.metrics, "handled_by": exp.handled_by,
                    "runs_here": runnable,
                    "skips": sorted(r for r in reasons if r)})
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    width = max(len(e["name"]) for e in out)
    for e in out:
        grid = " ".join(f"{k}={','.join(map(str, v))}" for k, v in e["params"].items())
        status = "yes" if e["runs_here"] else "no"
        print(f"{e['name']:<{width}}  {status:<3}  {e['description']}")
        if grid:
            print(f"{'':<{width}}       params: {grid}")
        for why in e["skips"]:
            print(f"{'':<{width}}       skips: {why}")
    return 0


def cmd_run(args) -> int:
    from vlab.run import registry as reg
    from vlab.run.runner import RunOptions, execute
    from vlab.run.summary import summary

    overrides: dict[str, list] = {}
    for text in args.param:
        k, v = reg.parse_param(text)
        overrides[k] = v
    if args.suite and args.selectors:
        raise UsageError("give either experiment selectors or --suite, not both")
    pyperf = {}
    if args.processes is not None:
        if args.processes < 1:
            raise UsageError("--processes must be at least 1")
        if args.processes > 1000:
            raise UsageError("--processes must be at most 1000")
        pyperf["processes"] = args.processes
    if args.values is not None:
        if args.values < 1:
            raise UsageError("--values must be at least 1")
        if args.values > 100000:
            raise UsageError("--values must be at most 100000")
        pyperf["values"] = args.values
    if args.pin is not None:
        from vlab.run.pinning import parse_pin

        parse_pin(args.pin)             # a bad spec stops here, before anything runs
    dev = os.environ.get("VLAB_DEV_KVM") or "/dev/kvm"
    if not os.path.exists(dev):
        raise UsageError(f"{dev} does not exist: this host has no KVM (see `vlab doctor`)")
    if not os.access(dev, os.R_OK | os.W_OK):
        raise UsageError(f"{dev} is not readable and writable by this user (see `vlab doctor`)")
    # ---- output, journal, resume and interrupts (vlab/run/journal.py, interrupt.py) ----
    from vlab.run.interrupt import Interrupted, catching, stop_children
    from vlab.run.journal import RunSession, resume_options

    session = RunSession(args.output, "results", args.force)
    opts = RunOptions(selectors=args.selectors, suite=args.suite, overrides=overrides,
                      output=args.output, trace=args.trace, argv=sys.argv[1:],
                      progress=sys.stderr, pyperf=pyperf, pin=args.pin,
                      on_start=session.on_start, on_case=session.on_case)
    if args.resume:
        resume_options(session, args.resume, opts)
    else:
        session.check_early()
    try:
        with catching():
            doc, code = execute(opts)
    except Interrupted as e:
        stop_children()
        session.abandon()
        print(f"vlab: interrupted by {e.name} before the first case finished; nothing "
              "measured", file=sys.stderr)
        return e.exit_code
    path, code = session.finish(doc, code)
    # ---- end output ----
    print(summary(doc))
    print(f"\nresults: {path}  ({doc['duration_s']:.1f} s)")
    return code


def cmd_show(args) -> int:
    from vlab import results
    from vlab._outputs import write_stdout
    from vlab.host import emulation as _emulation

    doc = results.read(args.file)
    tcg = None if args.csv else _emulation.warning(doc.get("host") or {})
    text = results.to_csv(doc) if args.csv else results.format_table(doc)
    write_stdout(f"WARNING: {tcg}\n{text}" if tcg else text)
    return 0


def _side_paths(arg: str) -> list[str]:
    """The files of one side of `vlab compare`: the path itself when it exists (a name may hold
    a comma), else its comma-separated parts (replicate runs)."""
    if "," not in arg or os.path.exists(arg):
        return [arg]
    parts = arg.split(",")
    if not all(parts):
        raise UsageError(f"compare: {arg!r} has an empty file name between its commas")
    return parts


def cmd_compare(args) -> int:
    from vlab import results
    from vlab._inputs import finite
    from vlab.compare import compare, format_compare

    if len(args.files) < 2:
        raise UsageError("compare needs at least two results files")
    finite("--min-effect", args.min_effect, 0.0)
    sides = [_side_paths(arg) for arg in args.files]
    docs = [[results.read(f) for f in side] for side in sides]
    res = compare(docs, min_effect=args.min_effect, strict=args.strict, fdr=args.fdr,
                  names=[",".join(os.path.basename(f) for f in side) for side in sides])
    fmt = "json" if args.json else "md" if args.md else "text"
    print(format_compare(res, fmt=fmt))
    return 0


def cmd_plot(args) -> int:
    from vlab import results
    from vlab.plot import plot

    docs = [results.read(f) for f in args.files]
    paths = plot(docs, args.output)
    for p in paths:
        print(p)
    if not paths:
        print("no figures: the files hold no ok rows")
    return 0


def cmd_report(args) -> int:
    from vlab.report import report

    path = report(args.files, args.output)
    print(path)
    return 0


def cmd_host(args) -> int:
    from vlab.host import settings as _hostset

    if args.host_command == "set":
        key, value = _hostset.parse_assignment(args.assignment)
        print(_hostset.set_host(key, value, dry_run=args.dry_run))   # checks the value's width
    elif args.host_command == "restore":
        print(_hostset.restore_host(args.key, dry_run=args.dry_run))
    else:
        for k, v in _hostset.host_settings("/").items():
            print(f"{k} = {v}")
    return 0


def cmd_trace(args) -> int:
    import datetime as dt
    import time

    from vlab import results, trace
    from vlab.host.calibrate import collect_host
    from vlab.run.runner import default_output
    from vlab.run.tracerows import trace_rows

    command = args.cmdline[1:] if args.cmdline[:1] == ["--"] else args.cmdline
    if bool(args.pid) == bool(command):
        raise UsageError("trace needs either --pid PID or -- COMMAND...")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    for pid in args.pid or []:
        if not 0 < pid < 1 << 22 or not os.path.exists(f"/proc/{pid}"):   # PID_MAX_LIMIT
            raise UsageError(f"no process with pid {pid}")
    from vlab import _inputs, _outputs

    _inputs.finite("--duration", args.duration, 0.0, lo_open=True)
    _inputs.finite("--interval", args.interval, 0.0, 86400.0, lo_open=True)
    if args.output is not None:          # checked before tracing, not after
        _outputs.check_file(args.output, "results file", force=args.force)
    else:
        _outputs.check_dir("results", "results directory")
    ok, reason, _ = trace.status(mount=True)
    if not ok:
        print(f"vlab: tracing unavailable: {reason}", file=sys.stderr)
        return 1
    started = dt.datetime.now(dt.timezone.utc)
    tty = sys.stdout.isatty()

    def show(res) -> None:
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(trace.format_table(res))
        sys.stdout.flush()

    code = 0
    if command:
        of = " ".join(" ".join(command).split())
        of = of if len(of) <= 60 else of[:57] + "..."
        code, total = trace.run_traced(command, interval=args.interval, on_tick=show)
    else:
        of = "pid " + ",".join(map(str, args.pid))
        with trace.Tracer(list(args.pid)) as tracer:
            end = time.monotonic() + args.duration if args.duration else None
            try:
                while end is None or time.monotonic() < end:
                    time.sleep(args.interval if end is None else
                               max(0.0, min(args.interval, end - time.monotonic())))
                    show(tracer.snapshot(reset=False))
                    if not all(os.path.exists(f"/proc/{p}") for p in args.pid):
                        break
            except KeyboardInterrupt:
                pass
            total = tracer.snapshot(total=True)
    doc = results.new_document(collect_host(), trace_rows(total, of), argv=sys.argv[1:],
                               suite=None, started=started)
    doc["host"]["trace"] = {"source": total.source, "unavailable": total.unavailable,
                            "notes": total.notes}
    path = args.output or default_output(doc).replace(os.sep + doc["started_at"][:4],
                                                        os.sep + "trace-" + doc["started_at"][:4])
    results.validate(doc)
    stem, ext = os.path.splitext(path)
    path, problem = _outputs.save(results.encode(doc, os.path.basename(path)),
                                  path, replace=args.force,
                                  alternative=None if args.output else f"{stem}-{doc['run_id']}{ext}")
    if problem:
        print(f"vlab: {problem}", file=sys.stderr)
        return 1
    print(f"\ntrace of {of}: source {total.source}; results: {path}")
    return 0 if code == 0 else 1


# ---- live migration ----

def cmd_migrate(args) -> int:
    """`vlab migrate`: by default a destination and a source process on loopback, the
    migration verified and set beside the pre-copy model; or one role (--listen / --to)."""
    from vlab._outputs import check_file
    from vlab.migration.command import run_cli
    from vlab.migration.options import check_migrate_options

    check_migrate_options(args)               # every value fits where it goes
    if getattr(args, "trace_out", None):      # the one file migrate writes: checked first
        check_file(args.trace_out, "--trace-out file")
    return run_cli(args)

# ---- end live migration ----


def cmd_fleet(args) -> int:
    """`vlab fleet run|report` (vlab/fleet)."""
    from vlab.fleet.command import run_cli

    return run_cli(args)


COMMANDS = {"doctor": cmd_doctor, "list": cmd_list, "run": cmd_run, "show": cmd_show,
            "compare": cmd_compare, "plot": cmd_plot, "report": cmd_report, "host": cmd_host,
            "trace": cmd_trace, "migrate": cmd_migrate, "fleet": cmd_fleet}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vlab` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"vlab: {_one_line(e)}", file=sys.stderr)
        return 2
    except KvmError as e:
        # no usable /dev/kvm (missing, no permission) is bad input, not an experiment failure
        if e.op == "open":
            print(f"vlab: cannot use KVM: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"vlab: {_one_line(e)}", file=sys.stderr)
        return 1
    except VlabError as e:
        print(f"vlab: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vlab: interrupted; nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
