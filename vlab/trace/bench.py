"""Benchmark: what the exit tracer costs the thing it traces.

`python -m vlab.trace.bench` runs `exits.pio_user` (out, one vCPU) alternately without and with
`--trace` and prints the median guest cycles per exit of each, and the overhead. Alternating
keeps slow drifts in host load out of the comparison.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def measure(rounds: int = 3, experiment: str = "exits.pio_user") -> dict:
    from vlab.run.runner import RunOptions, execute
    from vlab import trace

    ok, reason, _ = trace.status(mount=True)
    if not ok:
        raise SystemExit(f"tracing unavailable: {reason}")
    plain, traced = [], []
    for _ in range(rounds):
        for on, sink in ((False, plain), (True, traced)):
            doc, _code = execute(RunOptions(selectors=[experiment],
                                            overrides={"vcpus": [1], "direction": ["out"]},
                                            trace=on, pyperf={"processes": 2, "values": 3}))
            row = next(r for r in doc["rows"]
                       if r["experiment"] == experiment and r["metric"] == "guest_cycles")
            sink.append(row["median"])
    a, b = float(np.median(plain)), float(np.median(traced))
    return {"experiment": experiment, "untraced_cycles": a, "traced_cycles": b,
            "overhead": b / a - 1.0, "rounds": rounds, "untraced": plain, "traced": traced}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlab.trace.bench")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = measure(args.rounds)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['experiment']}: untraced {r['untraced_cycles']:,.0f} cycles/exit, traced "
              f"{r['traced_cycles']:,.0f} cycles/exit, overhead {100 * r['overhead']:+.1f}% "
              f"(medians of {r['rounds']} alternating runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
