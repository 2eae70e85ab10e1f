"""pyperf worker: `python -m vlab.run.worker PLAN.json <pyperf worker args>`.

The runner (pyperf's manager side) spawns this for every process of every loop case. pyperf's
`--worker-task` picks which case of the plan this process measures; the others are registered
only so the task numbering matches the manager's. Each timed call also appends its raw samples
and extras to a side file, because pyperf itself keeps only one number per value.
"""
from __future__ import annotations

import signal

# First of all: a terminal's Ctrl-C reaches the whole process group, workers included. The
# runner stops its workers itself (SIGTERM, then SIGKILL; see vlab/run/interrupt.py), so a
# worker ignores SIGINT rather than print a KeyboardInterrupt traceback from the middle of its
# imports. (SIG_IGN is set before anything heavy is imported.)
signal.signal(signal.SIGINT, signal.SIG_IGN)

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402


def main() -> None:
    from vlab.run.interrupt import die_with_parent

    die_with_parent()       # the runner killed with SIGKILL: no worker (or guest) runs on
    plan_path = sys.argv[1]
    with open(plan_path) as f:
        plan = json.load(f)
    import pyperf

    from vlab.run import registry as _experiment

    runner = pyperf.Runner(program_args=("-m", "vlab.run.worker", plan_path))
    runner.parse_args(sys.argv[2:])
    host = plan["host"]
    from vlab.run.pinning import from_plan
    from vlab.vmm.thread import set_placement

    set_placement(from_plan(plan.get("placement")))     # before any thread of the case starts
    for case in plan["cases"]:
        runner.bench_time_func(case["id"], _time_func(_experiment, case, host, plan["side_dir"]))


def _time_func(registry, case: dict, host: dict, side_dir: str):
    state: dict = {}
    side = os.path.join(side_dir, f"{case['id']}.{os.getpid()}.jsonl")

    def record(obj: dict) -> None:
        with open(side, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def time_func(loops: int) -> float:
        try:
            if "exp" not in state:
                exp = registry.get(case["experiment"])
                state["exp"] = exp
                state["st"] = exp.setup(case["params"], host)
            meas = state["exp"].measure(state["st"], loops)
        except BaseException as e:
            record({"error": f"{type(e).__name__}: {e}".strip(),
                    "traceback": traceback.format_exc(limit=8)})
            raise
        from vlab.vmm.thread import placement_record

        record({"loops": loops, "metrics": meas.metrics, "extra": meas.extra,
                "placement": placement_record()})
        return meas.seconds

    return time_func


if __name__ == "__main__":
    main()
    # pyperf has written this process's values to its pipe and closed it; the manager now
    # polls for our exit. Interpreter finalization (numpy, cffi, threads) took ~0.1 s per
    # worker, two workers per case: leave at once instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
