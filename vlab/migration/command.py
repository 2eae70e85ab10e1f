"""The live-migration command line: `python -m vlab.migrate` and `vlab migrate`.

    python -m vlab.migrate --listen [HOST:]PORT          # destination (one migration, then exit)
    python -m vlab.migrate --to HOST:PORT [options]      # source: run a guest and migrate it
    vlab migrate [options]                               # both, on loopback, plus the model

Parses the options (vlab/migration/options.py) into a `RunConfig`, runs the role, prints the
result (one JSON line with --json, else a short summary) and sets the exit code: 0 a verified
migration (or an abort the policy asked for), 1 a failed one, 2 bad usage (one line, no
traceback). `vlab migrate` (vlab/cli.py) parses the same options and calls `run_cli`.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from typing import Any, Sequence

import numpy as np

from vlab._argparse import UsageParser, one_line
from vlab._errors import UsageError, VlabError
from vlab.migration.guest import GuestSpec
from vlab._units import parse_rate, parse_size
from vlab.migration.options import MigrateOptions, add_arguments
from vlab.migration.auth import listen_key
from vlab.migration.record import write_results
from vlab.migration.session import RunConfig, listen, parse_addr, run_local, run_source

DESCRIPTION = ("Live migration of a running vlab guest between two VMM processes, verified end "
               "to end.")
GOOD_OUTCOMES = ("converged", "max_rounds_stop_copy", "postcopy")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The source-side run the parsed options describe, validated."""
    bw = parse_rate(args.bandwidth, "--bandwidth") / 8.0 if args.bandwidth else None
    spec = GuestSpec(workload=args.workload, mem=parse_size(args.mem, "--mem"),
                     ws=parse_size(args.ws, "--ws") if args.ws else None, rate=args.rate,
                     seed=args.seed, lag_us=args.lag_us, backing=args.backing)
    opts = MigrateOptions(strategy=args.strategy, mode=args.mode, bandwidth=bw,
                          max_downtime_ms=args.max_downtime_ms, max_rounds=args.max_rounds,
                          policy=args.policy, auto_converge=args.auto_converge,
                          postcopy_rounds=args.postcopy_rounds, io_timeout=args.io_timeout)
    spec.validate()
    opts.validate()
    return RunConfig(spec=spec, opts=opts, warmup_s=args.warmup_s, trace_s=args.trace_s,
                     trace_interval_ms=args.trace_interval_ms, trace_out=args.trace_out,
                     psk_file=args.psk_file)


def format_result(res: dict) -> str:
    """A short human-readable summary of a migration result."""
    lines = [f"outcome      {res.get('outcome')}" + (f"  ({res['error']})" if res.get("error") else "")]
    for key, unit in (("total_ms", "ms"), ("downtime_ms", "ms"), ("rounds", ""),
                      ("bytes_sent", "B"), ("verified", "")):
        v = res.get(key)
        if isinstance(v, float):
            v = f"{v:.2f}"
        lines.append(f"{key:<12} {v} {unit}".rstrip())
    if res.get("pages_per_round"):
        lines.append(f"pages/round  {res['pages_per_round']}")
    if res.get("guest_problems"):
        lines.append(f"guest        {'; '.join(res['guest_problems'])}")
    d = res.get("destination") or {}
    if d.get("fault_latency_ms", {}).get("n"):
        fl = d["fault_latency_ms"]
        lines.append(f"demand faults {fl['n']}: median {fl['median']:.3f} ms, p99 "
                     f"{fl['p99']:.3f} ms")
    if res.get("switchover_detail_ms"):
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in
                          res["switchover_detail_ms"].items() if v is not None)
        lines.append(f"switch-over  {parts} (ms)")
    m = res.get("model")
    if m and "rounds" in m:
        lines.append(f"model        total {m['total_ms']:.2f} ms, downtime "
                     f"{m['downtime_ms'] if m['downtime_ms'] is None else round(m['downtime_ms'], 2)}"
                     f" ms, rounds {m['rounds']}, outcome {m['outcome']} "
                     f"({m['bandwidth_source']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlab.migrate`: one role (--listen or --to), or both on loopback."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1)     # `kill -USR1 PID`: every thread's stack, stderr
    p = UsageParser(prog="vlab migrate", description=DESCRIPTION)
    add_arguments(p)
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
        return run_cli(args)
    except UsageError as e:
        print(f"vlab migrate: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlab migrate: interrupted", file=sys.stderr)
        return 130


def run_cli(args: argparse.Namespace) -> int:
    """Run what the parsed arguments ask; print the result; the exit code."""
    if args.listen:
        key = listen_key(args, parse_addr(args.listen, listen=True)[0])
        return serve(args.listen, run_after=args.run_after, accept_timeout=args.accept_timeout,
                     io_timeout=args.io_timeout, as_json=args.json, psk=key)
    cfg = config_from_args(args)
    return migrate(args.to, cfg, run_after=args.run_after, as_json=args.json,
                   on_result=lambda res: write_results(args, res, cfg))


def serve(addr: str, *, run_after: float, accept_timeout: float, io_timeout: float,
          as_json: bool, psk: bytes | None = None) -> int:
    """Be the destination on `addr`: print "LISTENING HOST:PORT", then the status; the exit
    code (1 unless the guest arrived, ran and checked itself)."""
    def announce(a: str) -> None:
        print(f"LISTENING {a}", flush=True)

    st = listen(addr, run_after=run_after, accept_timeout=accept_timeout,
                io_timeout=io_timeout, announce=announce, psk=psk)
    print(json.dumps(st, default=_jsonable) if as_json else
          f"destination: {st['status']}" + (f" ({st['reason']})" if st.get("reason") else ""),
          flush=True)
    if st["status"] != "ok":
        print(f"vlab migrate: destination: {st['reason']}", file=sys.stderr)
        return 1
    return 0


def migrate(to: str | None, cfg: RunConfig, *, run_after: float = 1.0, as_json: bool = False,
            on_result: Callable[[dict], Any] | None = None) -> int:
    """Be the source migrating to `to` (None: both roles on loopback); print the result and
    hand it to `on_result` (`vlab migrate` writes its results file there); the exit code (0:
    verified, or aborted as the policy asked)."""
    try:
        if to:
            res = run_source(to, cfg)
        else:
            res = run_local(cfg, run_after=run_after)
    except (VlabError, OSError) as e:
        print(f"vlab migrate: {one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(res, default=_jsonable) if as_json else format_result(res), flush=True)
    if on_result is not None:
        on_result(res)
    ok = res.get("outcome") == "aborted" or (res.get("outcome") in GOOD_OUTCOMES
                                             and res.get("verified"))
    return 0 if ok else 1


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
