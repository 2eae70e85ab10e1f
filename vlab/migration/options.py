"""How a live migration runs: `MigrateOptions` (strategy, dirty tracking, link, convergence
policy, throttle) with its validation, and the command-line options of `vlab migrate` and
`python -m vlab.migrate` that set it (sizes and rates are parsed by `vlab._units`).

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
