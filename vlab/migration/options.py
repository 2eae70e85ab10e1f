"""Command-line options of live migration (`vlab migrate`, `python -m vlab.migration.session`).

Kept apart from vlab/migrate.py so that building the `vlab` parser imports nothing heavy.
"""
from __future__ import annotations

import argparse

from vlab._errors import UsageError

STRATEGIES = ("precopy", "postcopy")
MODES = ("bitmap", "clear", "ring")
POLICIES = ("stop_copy", "abort")

_SIZE = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if t and t[-1] in _SIZE:
        mult, t = _SIZE[t[-1]], t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a size (e.g. 64M, 1G)") from None
    if v <= 0:
        raise UsageError(f"{what} must be positive")
    return int(v)


def parse_rate(text: str, what: str) -> float:
    """bit/s with k/M/G (decimal) suffixes: 1G = 10^9 bit/s."""
    t = text.strip().lower().removesuffix("bit/s").removesuffix("bps").removesuffix("b")
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(t[-1:], 1.0)
    if t[-1:] in "kmg":
        t = t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a rate (e.g. 1G for 1 Gbit/s)") from None
    if v <= 0:
        raise UsageError(f"{what} must be positive")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `vlab migrate` and `python -m vlab.migration.session`."""
    role = p.add_mutually_exclusive_group()
    role.add_argument("--listen", metavar="[HOST:]PORT",
                      help="be the destination: accept one migration on this address")
    role.add_argument("--to", metavar="HOST:PORT", help="be the source: migrate to this address")
    p.add_argument("--workload", default="uniform", help="uniform (default) or counter")
    p.add_argument("--mem", default="64M", help="guest data memory (default 64M)")
    p.add_argument("--ws", help="uniform: working set (default: all of --mem)")
    p.add_argument("--rate", type=int, default=10000,
                   help="uniform: target pages written per second (default 10000; 0 = flat out)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lag-us", type=int, default=50000,
                   help="uniform: the writer catches up at most this much backlog after its "
                        "vCPU was descheduled or throttled (default 50000 us); set it below "
                        "the throttle's pause (e.g. 1000) for a CPU-bound guest that "
                        "auto-converge can slow down")
    p.add_argument("--backing", default="4k", help="host backing of guest memory (4k, thp)")
    p.add_argument("--strategy", default="precopy", choices=STRATEGIES)
    p.add_argument("--mode", default="bitmap", choices=MODES, help="dirty tracking")
    p.add_argument("--bandwidth", help="link limit in bit/s, e.g. 1G (default: unlimited)")
    p.add_argument("--max-downtime-ms", type=float, default=50.0)
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--policy", default="stop_copy", choices=POLICIES,
                   help="when max rounds pass without convergence (default stop_copy)")
    p.add_argument("--auto-converge", action="store_true",
                   help="throttle the guest after every round that did not converge")
    p.add_argument("--postcopy-rounds", type=int, default=1,
                   help="post-copy: pre-copy rounds before the switch-over (default 1)")
    p.add_argument("--warmup-s", type=float, default=0.5)
    p.add_argument("--trace-s", type=float, default=0.0,
                   help="record the guest's dirty trace this long first and set the pre-copy "
                        "model beside the result (extended to cover round 0 at --bandwidth)")
    p.add_argument("--trace-interval-ms", type=float, default=25.0,
                   help="harvest interval of that trace (default 25 ms; the model cannot "
                        "resolve rounds shorter than one interval, and every harvest slows "
                        "the guest a little)")
    p.add_argument("--trace-out", help="save the recorded trace here (.npz)")
    p.add_argument("--run-after", type=float, default=1.0,
                   help="destination: seconds the guest runs after resuming, before it checks "
                        "itself")
    p.add_argument("--io-timeout", type=float, default=30.0)
    p.add_argument("--accept-timeout", type=float, default=60.0)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--psk-file", metavar="FILE",
                   help="the migration key (mode 0600, at least 16 bytes): both ends prove they "
                        "hold it before any guest memory moves; required to --listen on a "
                        "non-loopback address (vlab.migration.auth)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="source: the results file (default results/<host_id>/migrate-<stamp>.json)")
    p.add_argument("--no-results", action="store_true", help="source: write no results file")
