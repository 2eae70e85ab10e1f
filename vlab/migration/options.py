"""How a live migration runs: `MigrateOptions` (strategy, dirty tracking, link, convergence
policy, throttle) with its validation, and the command-line options of `vlab migrate` and
`python -m vlab.migrate` that set it (sizes and rates are parsed by `vlab._units`) with the
values each may take (`MIGRATE_OPTIONS`, `check_migrate_options`).

Kept apart from the rest of vlab.migration so that building the `vlab` parser imports nothing
heavy (no numpy, no native module): only the standard library here.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from vlab._errors import UsageError
from vlab.dirty.modes import MODES

STRATEGIES = ("precopy", "postcopy")
POLICIES = ("stop_copy", "abort")

@dataclass
class MigrateOptions:
    """How the source migrates (see vlab/migration/source.py for what each does)."""
    strategy: str = "precopy"
    mode: str = "bitmap"
    bandwidth: float | None = None       # bytes/s (token bucket), None: unlimited
    max_downtime_ms: float = 50.0
    max_rounds: int = 30
    policy: str = "stop_copy"
    auto_converge: bool = False
    throttle_initial: float = 0.2
    throttle_step: float = 0.1
    throttle_max: float = 0.99
    postcopy_rounds: int = 1
    batch_pages: int = 256
    io_timeout: float = 30.0
    drop_pages: int = 0                  # fault injection for tests: leave this many written
                                         # working-set pages out of the final round

    def validate(self) -> None:
        """UsageError naming the first option that is out of range."""
        from vlab.migration.stream import MAX_BATCH

        if self.strategy not in STRATEGIES:
            raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.mode not in MODES:
            raise UsageError(f"dirty tracking mode must be one of {', '.join(MODES)}")
        if self.policy not in POLICIES:
            raise UsageError(f"non-convergence policy must be one of {', '.join(POLICIES)}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise UsageError("bandwidth must be positive (bytes/s)")
        if not self.max_downtime_ms >= 0:
            raise UsageError("max downtime must be >= 0 ms")
        if self.max_rounds < 1:
            raise UsageError("max rounds must be at least 1")
        if self.postcopy_rounds < 0:
            raise UsageError("postcopy rounds must be >= 0")
        if not 1 <= self.batch_pages <= MAX_BATCH:
            raise UsageError(f"batch must be 1..{MAX_BATCH} pages")
        if not (0 < self.throttle_initial <= self.throttle_max < 1 and 0 <= self.throttle_step <= 1):
            raise UsageError("throttle: need 0 < initial <= max < 1 and 0 <= step <= 1")
        if not self.io_timeout > 0:
            raise UsageError("io timeout must be positive")


_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1

#: `vlab migrate` options and the values each may take: (option, lo, hi, integer, what). The
#: guest's writer takes rate, seed and lag_us as arguments; the rest are counts and durations
#: (nan, inf or a 70-bit count once hung a migration or ended it in a traceback). Checked at
#: the command's entry (`check_migrate_options`, called by vlab/cli.py) before anything runs.
MIGRATE_OPTIONS = (
    ("rate", 0, _U32, True, "pages/s, 32 bits"),
    ("seed", 0, _U64, True, "the guest writer's 64-bit PRNG seed"),
    ("lag_us", 0, _U32, True, "microseconds, 32 bits"),
    ("max_rounds", 1, _U32, True, "rounds"),
    ("postcopy_rounds", 0, _U32, True, "rounds"),
    ("max_downtime_ms", 0, 3_600_000, False, "milliseconds, at most an hour"),
    ("warmup_s", 0, 3600, False, "seconds, at most an hour"),
    ("trace_s", 0, 3600, False, "seconds, at most an hour"),
    ("trace_interval_ms", 0.01, 60_000, False, "milliseconds"),
    ("run_after", 0, 3600, False, "seconds, at most an hour"),
    ("io_timeout", 0.001, 86400, False, "seconds, at most a day"),
    ("accept_timeout", 0.001, 86400, False, "seconds, at most a day"),
)
#: Guest memory and working set: within the 52-bit guest-physical address space.
MAX_GUEST_BYTES = 1 << 52
#: Link limit: 10 Tbit/s is beyond any link.
MAX_LINK_BIT_S = 1e13


def check_migrate_options(args) -> None:
    """Every numeric option of `vlab migrate` fits where it goes; a one-line UsageError if not."""
    from vlab._inputs import check_fits, finite
    from vlab._units import parse_rate, parse_size

    for attr, lo, hi, integer, what in MIGRATE_OPTIONS:
        v = getattr(args, attr, None)
        if v is None:
            continue
        name = "--" + attr.replace("_", "-")
        if integer:
            check_fits(name, v, lo, hi, what)
        else:
            finite(name, v, lo, hi)
    for attr in ("mem", "ws"):
        text = getattr(args, attr, None)
        if text is None:
            continue
        try:
            v = parse_size(text, f"--{attr}")
        except (ValueError, OverflowError):
            raise UsageError(f"--{attr}: {text!r} is not a size (e.g. 64M, 1G)") from None
        check_fits(f"--{attr}", v, 1, MAX_GUEST_BYTES, "bytes, 52-bit guest-physical space")
    if getattr(args, "bandwidth", None):
        v = parse_rate(args.bandwidth, "--bandwidth")
        finite("--bandwidth", v, 0.0, MAX_LINK_BIT_S, lo_open=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `vlab migrate` and `python -m vlab.migrate`."""
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
