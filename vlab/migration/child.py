"""The processes `run_local` starts: `python -m vlab.migration.child JOB.json`.

A job is a JSON object written by vlab/migration/session.py:

    {"role": "destination", "listen": "HOST:PORT", "run_after": s, "io_timeout": s,
     "psk_file": PATH or null}
    {"role": "source", "to": "HOST:PORT", "config": RunConfig.to_dict()}

The child runs that role exactly as `python -m vlab.migrate --listen/--to ... --json` would
(same output: "LISTENING HOST:PORT", then one JSON line; same exit codes), but its
configuration arrives as data, not as command-line options turned back into a config.
"""
from __future__ import annotations

import json
import signal
import sys
from typing import Any, Sequence

from vlab._argparse import one_line
from vlab._errors import UsageError
from vlab.migration.auth import load_key
from vlab.migration.command import migrate, serve
from vlab.migration.session import RunConfig


def run_job(job: dict[str, Any]) -> int:
    """Run one job (see the module docstring); the exit code."""
    if not isinstance(job, dict):
        raise UsageError("job: expected a JSON object")
    role = job.get("role")
    if role not in ("destination", "source"):
        raise UsageError(f"job role must be 'destination' or 'source', not {role!r}")
    try:
        if role == "destination":
            addr = str(job["listen"])
            times = {k: float(job.get(k, d)) for k, d in (("run_after", 1.0),
                                                            ("accept_timeout", 60.0),
                                                            ("io_timeout", 30.0))}
            key = load_key(job["psk_file"]) if job.get("psk_file") else None
        else:
            addr, cfg = str(job["to"]), RunConfig.from_dict(job["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{role} job: bad or missing {one_line(e)}") from None
    if role == "destination":
        return serve(addr, as_json=True, psk=key, **times)
    return migrate(addr, cfg, as_json=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Read the job file named by the one argument and run it."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1)     # `kill -USR1 PID`: every thread's stack, stderr
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) != 1:
            raise UsageError("usage: python -m vlab.migration.child JOB.json")
        try:
            with open(args[0]) as f:
                job = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"job {args[0]}: {one_line(e)}") from None
        return run_job(job)
    except UsageError as e:
        print(f"vlab migrate: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlab migrate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
