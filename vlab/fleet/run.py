"""`vlab fleet run`: every inventory host runs vlab through Ansible; nothing fetched is lost.

The fleet directory (`results/fleet/<stamp>/` by default) holds, per inventory host,
`<host>.json` (its results file, as `vlab run` wrote it there) and `<host>.doctor.json` (its
`vlab doctor --json`), plus `fleet.json`, the manifest: the stamp, the `vlab run` arguments and
every host's status ("ok", or "error" with a one-line reason: unreachable, a task failed, no
results fetched) and timings. `events.jsonl` keeps Ansible's per-host events.

Files are named by inventory host, not by vlab's host_id: two inventory hosts may be the same
machine (the tests' loopback hosts are), and the host_id is inside each file anyway.

A rerun of the same directory (`--resume DIR`, or `-o DIR` again) keeps every host that has its
results and runs the playbook only on the others; on a host whose results are already there
(the connection broke during the fetch), the role skips straight to the fetch.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from vlab._errors import UsageError
from vlab._files import atomic_open
from vlab.fleet import FLEET_SCHEMA, MANIFEST
from vlab.fleet.inventory import PLAYBOOK_DIR, ansible_env, ansible_tool, list_hosts

INCOMING = ".incoming"


@dataclass
class FleetOptions:
    """What `vlab fleet run` was asked."""
    inventory: str
    selectors: list[str] = field(default_factory=list)
    suite: str | None = None
    params: list[str] = field(default_factory=list)
    processes: int | None = None
    values: int | None = None
    forks: int = 5
    out: str | None = None             # the fleet directory; an existing one is resumed
    results_dir: str = "results"
    dist: str | None = None            # the wheel to install; default: built from this tree
    limit: str | None = None           # an Ansible host pattern
    timeout: float = 4 * 3600.0        # bound on the whole playbook
    progress: TextIO | None = None


def run_args(opts: FleetOptions) -> list[str]:
    """The `vlab run` arguments every host gets, checked here first (a bad selector or
    parameter is refused before any host is touched)."""
    from vlab.run import registry

    if opts.suite and opts.selectors:
        raise UsageError("give either experiment selectors or --suite, not both")
    if opts.selectors:
        registry.select(opts.selectors)
    if opts.suite:
        registry.load_suite(opts.suite)
    args = list(opts.selectors)
    if opts.suite:
        args += ["--suite", opts.suite]
    for p in opts.params:
        registry.parse_param(p)
        args += ["-p", p]
    for name, v in (("processes", opts.processes), ("values", opts.values)):
        if v is not None:
            if v < 1:
                raise UsageError(f"--{name} must be at least 1")
            args += [f"--{name}", str(v)]
    return args


def new_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def read_manifest(fleet_dir: str) -> dict[str, Any] | None:
    """The fleet directory's manifest, or None when it has none; a bad one is a UsageError."""
    path = os.path.join(fleet_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable fleet manifest ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != FLEET_SCHEMA \
            or not isinstance(doc.get("hosts"), dict):
        raise UsageError(f"{path}: not a {FLEET_SCHEMA} manifest")
    return doc


def write_manifest(fleet_dir: str, doc: dict[str, Any]) -> None:
    doc["updated_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_open(os.path.join(fleet_dir, MANIFEST), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


def has_results(fleet_dir: str, host: str) -> bool:
    """True when the host's results file is there and valid."""
    from vlab import results

    path = os.path.join(fleet_dir, f"{host}.json")
    if not os.path.exists(path):
        return False
    try:
        results.read(path)
    except UsageError:
        return False
    return True


class _Progress:
    """Per-host progress lines from the callback's events, and what each host did."""

    def __init__(self, hosts: list[str], out: TextIO | None, log: TextIO, t0: float):
        self.hosts = hosts
        self.out = out
        self.log = log
        self.t0 = t0
        self.width = max(len(h) for h in hosts)
        self.failure: dict[str, str] = {}
        self.tasks: dict[str, dict[str, float]] = {h: {} for h in hosts}
        self.started: dict[tuple[str, str], float] = {}
        self.task_names: list[str] = []
        self.last_task: dict[str, str] = {}

    def say(self, host: str, text: str) -> None:
        if self.out is not None:
            self.out.write(f"[{time.monotonic() - self.t0:7.1f}s] {host:<{self.width}}  {text}\n")
            self.out.flush()

    def feed(self, line: str) -> None:
        self.log.write(line if line.endswith("\n") else line + "\n")
        self.log.flush()
        try:
            ev = json.loads(line)
        except ValueError:
            return
        if not isinstance(ev, dict):
            return
        kind, host, task = ev.get("event"), ev.get("host"), ev.get("task", "")
        if kind == "task" and task not in self.task_names:
            self.task_names.append(task)
        if host not in self.tasks:
            return
        if kind == "start":
            self.started[(host, task)] = ev.get("t", time.time())
            self.last_task[host] = task
            return
        t_start = self.started.pop((host, task), None)
        if t_start is not None and kind in ("ok", "failed", "unreachable"):
            self.tasks[host][task] = round(ev.get("t", time.time()) - t_start, 3)
        took = f" ({self.tasks[host][task]:.1f} s)" if task in self.tasks[host] else ""
        if kind == "ok" and task == "vlab run" and not ev.get("changed"):
            # `creates`: the host already has this fleet's results
            self.say(host, f"{task}: skipped (results already on the host)")
        elif kind == "ok" and task != "state":
            self.say(host, f"{task}: {'done' if ev.get('changed') else 'ok'}{took}")
        elif kind in ("failed", "unreachable") and not ev.get("ignored"):
            why = ev.get("reason") or kind
            self.failure.setdefault(host, f"{kind} at {task!r}: {why}")
            self.say(host, f"{task}: {kind.upper()}: {why}")
        elif kind == "skipped" and task in ("vlab run", "install vlab", "copy the build"):
            self.say(host, f"{task}: skipped (already on the host)")


def _terminate(p: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop ansible-playbook and everything it started (its own process group)."""
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _playbook(hosts: list[str], opts: FleetOptions, stamp: str, args: list[str], wheel: str,
              fleet_dir: str, prog: _Progress) -> tuple[int, str]:
    """Run the playbook on `hosts`; its exit code and the tail of its stderr."""
    incoming = os.path.join(fleet_dir, INCOMING)
    os.makedirs(incoming, exist_ok=True)
    extra = {"vlab_stamp": stamp, "vlab_run_args": args, "vlab_dist": wheel,
             "vlab_fetch_dir": os.path.abspath(incoming)}
    fd, vars_path = tempfile.mkstemp(prefix=".vars.", suffix=".json", dir=fleet_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(extra, f)
    limit_path = os.path.join(fleet_dir, ".limit")
    with open(limit_path, "w") as f:
        f.write("\n".join(hosts) + "\n")
    argv = [ansible_tool("ansible-playbook"), "-i", opts.inventory,
            "--limit", f"@{os.path.abspath(limit_path)}", "--forks", str(opts.forks),
            "-e", f"@{vars_path}", os.path.join(PLAYBOOK_DIR, "fleet.yml")]
    err_tail: list[str] = []
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ansible_env(), stdin=subprocess.DEVNULL, start_new_session=True)

    def drain_err() -> None:
        for line in p.stderr:
            err_tail.append(line.rstrip())
            del err_tail[:-20]

    t = threading.Thread(target=drain_err, daemon=True)
    t.start()
    timer = threading.Timer(opts.timeout, lambda: _terminate(p))
    timer.daemon = True
    timer.start()
    try:
        for line in p.stdout:
            prog.feed(line)
        p.wait()
    except KeyboardInterrupt:
        _terminate(p)
        raise
    finally:
        timer.cancel()
        t.join(5)
        for path in (vars_path, limit_path):
            try:
                os.unlink(path)
            except OSError:
                pass
    return p.returncode, "\n".join(err_tail)


def _collect(host: str, fleet_dir: str) -> tuple[bool, str | None]:
    """Move the host's fetched files into place when its results file is valid."""
    from vlab import results

    incoming = os.path.join(fleet_dir, INCOMING)
    src = os.path.join(incoming, f"{host}.json")
    doctor = os.path.join(incoming, f"{host}.doctor.json")
    if os.path.exists(doctor):
        os.replace(doctor, os.path.join(fleet_dir, f"{host}.doctor.json"))
    if not os.path.exists(src):
        return False, None
    try:
        results.read(src)
    except UsageError as e:
        os.unlink(src)
        return False, f"fetched results are not valid: {e}"
    os.replace(src, os.path.join(fleet_dir, f"{host}.json"))
    return True, None


def run_fleet(opts: FleetOptions) -> dict[str, Any]:
    """Run (or resume) a fleet; returns the manifest (also written to the fleet directory)."""
    if opts.forks < 1:
        raise UsageError("--forks must be at least 1")
    if opts.timeout <= 0:
        raise UsageError("--timeout must be positive")
    given = run_args(opts)
    hosts = list_hosts(opts.inventory, opts.limit)
    fleet_dir = opts.out
    manifest = read_manifest(fleet_dir) if fleet_dir and os.path.isdir(fleet_dir) else None
    if manifest is not None:
        if (opts.selectors or opts.suite or opts.params or opts.processes or opts.values) \
                and given != manifest["run_args"]:
            raise UsageError(f"{fleet_dir} holds a fleet of `vlab run "
                             f"{' '.join(manifest['run_args'])}`; resume it without run "
                             f"arguments, or give a new directory")
        args, stamp = manifest["run_args"], manifest["stamp"]
    else:
        args, stamp = given, new_stamp()
        fleet_dir = fleet_dir or os.path.join(opts.results_dir, "fleet", stamp)
        if os.path.exists(fleet_dir) and os.listdir(fleet_dir):
            raise UsageError(f"{fleet_dir} exists and is not a fleet directory")
        manifest = {"schema": FLEET_SCHEMA, "stamp": stamp, "run_args": args,
                    "inventory": os.path.abspath(opts.inventory), "created_at": None,
                    "hosts": {}, "runs": []}
        manifest["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    os.makedirs(fleet_dir, exist_ok=True)
    out = opts.progress
    todo = [h for h in hosts if not has_results(fleet_dir, h)]
    for h in hosts:
        entry = manifest["hosts"].setdefault(h, {"status": None, "reason": None, "attempts": 0})
        if h not in todo:
            entry.update(status="ok", reason=None, results=f"{h}.json")
    if out is not None:
        out.write(f"fleet {stamp}: {len(hosts)} hosts, {len(hosts) - len(todo)} already have "
                  f"results; `vlab run {' '.join(args)}` on {len(todo)}; into {fleet_dir}\n")
    if not todo:
        write_manifest(fleet_dir, manifest)
        manifest["dir"] = fleet_dir
        return manifest
    wheel = controller_wheel_for(opts)
    manifest["dist"] = os.path.basename(wheel)
    t0 = time.monotonic()
    run_rec = {"started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "hosts": todo, "forks": opts.forks}
    manifest["runs"].append(run_rec)
    with open(os.path.join(fleet_dir, "events.jsonl"), "a", encoding="utf-8") as log:
        prog = _Progress(todo, out, log, t0)
        interrupted = False
        try:
            rc, err = _playbook(todo, opts, stamp, args, wheel, fleet_dir, prog)
        except KeyboardInterrupt:
            interrupted, rc, err = True, 130, "interrupted"
        elapsed = time.monotonic() - t0
        run_rec.update(duration_s=round(elapsed, 3), ansible_exit=rc)
        for h in todo:
            entry = manifest["hosts"][h]
            entry["attempts"] = entry.get("attempts", 0) + 1
            entry["tasks_s"] = prog.tasks[h]
            ok, bad = _collect(h, fleet_dir)
            doctor = os.path.join(fleet_dir, f"{h}.doctor.json")
            entry["doctor"] = f"{h}.doctor.json" if os.path.exists(doctor) else None
            if ok:
                entry.update(status="ok", reason=None, results=f"{h}.json",
                             bytes=os.path.getsize(os.path.join(fleet_dir, f"{h}.json")))
                continue
            why = bad or prog.failure.get(h)
            if why is None:
                if interrupted:
                    why = "interrupted before its results were fetched"
                elif elapsed >= opts.timeout:
                    why = f"the fleet timed out after {opts.timeout:g} s"
                else:
                    tail = err.strip().splitlines()[-1:] if err.strip() else []
                    why = "no results fetched" + (f" (ansible: {tail[0]})" if tail else "")
            entry.update(status="error", reason=" ".join(why.split()), results=None)
        write_manifest(fleet_dir, manifest)
    try:
        os.rmdir(os.path.join(fleet_dir, INCOMING))     # only when nothing is left in it
    except OSError:
        pass
    if interrupted:
        raise KeyboardInterrupt
    manifest["dir"] = fleet_dir
    return manifest


def controller_wheel_for(opts: FleetOptions) -> str:
    from vlab.fleet.dist import controller_wheel

    say = (lambda m: (opts.progress.write(m + "\n"), opts.progress.flush())) \
        if opts.progress is not None else None
    return controller_wheel(opts.dist, progress=say)


def format_hosts(manifest: dict[str, Any]) -> str:
    """The per-host table printed at the end of a run."""
    rows = [("host", "status", "results / reason")]
    for h, e in manifest["hosts"].items():
        rows.append((h, e.get("status") or "-",
                     e.get("results") if e.get("status") == "ok" else (e.get("reason") or "")))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def exit_code(manifest: dict[str, Any]) -> int:
    """0 when every host has results, 1 when any is an error row."""
    return 0 if all(e.get("status") == "ok" for e in manifest["hosts"].values()) else 1

