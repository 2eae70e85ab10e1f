"""Migration sessions: one role per process, or both on this machine, and the model beside them.

    listen(addr)          destination: accept one connection, receive, run and report the guest
    run_source(addr, cfg) source: build and start the guest, warm up, (trace), migrate to addr
    run_local(cfg)        both, as two fresh processes over loopback, plus the pre-copy model

`RunConfig` is everything a source run needs. `run_local` hands it to its child processes as
JSON in a file (vlab/migration/child.py), never as command-line options parsed again.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np

from vlab._argparse import one_line
from vlab._errors import UsageError, VlabError
from vlab.migration.destination import Destination
from vlab.migration.guest import PAGE, GuestSpec, report_ok
from vlab.migration.options import MigrateOptions
from vlab.migration.postcopy import MissingFeature, uffd_status
from vlab.migration.source import Source
from vlab.migration.auth import (AuthError, authenticate_destination, authenticate_source,
                                 host_record, load_key)

CHILD = "vlab.migration.child"       # the module run_local's two processes run


@dataclass
class RunConfig:
    """One source-side run: the guest, how to migrate it, and what to do around it."""
    spec: GuestSpec = field(default_factory=GuestSpec)
    opts: MigrateOptions = field(default_factory=MigrateOptions)
    warmup_s: float = 0.5
    trace_s: float = 0.0             # >0: record a dirty trace for the model first
    trace_interval_ms: float = 100.0
    trace_out: str | None = None     # where to save it (.npz)
    psk_file: str | None = None      # the migration key (vlab.migration.auth)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; `from_dict` gives the same config back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """The config `to_dict` produced, validated (UsageError naming what is wrong)."""
        if not isinstance(d, dict):
            raise UsageError("run config: expected a JSON object")
        kw = dict(d)
        try:
            spec = GuestSpec(**_fields_of(GuestSpec, kw.pop("spec", {}), "spec"))
            opts = MigrateOptions(**_fields_of(MigrateOptions, kw.pop("opts", {}), "opts"))
            cfg = cls(spec=spec, opts=opts, **_fields_of(cls, kw, "run config"))
        except TypeError as e:
            raise UsageError(f"run config: {e}") from None
        spec.validate()
        opts.validate()
        return cfg


def _fields_of(cls: type, d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise UsageError(f"{what}: expected a JSON object")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise UsageError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")
    return d


# ====================================================================== connections

def parse_addr(text: str, *, listen: bool) -> tuple[str, int]:
    """HOST:PORT (or PORT when listening: loopback)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = ("127.0.0.1" if listen else ""), text
    if not host:
        if not listen:
            raise UsageError(f"address {text!r}: expected HOST:PORT")
        host = "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise UsageError(f"address {text!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535 or (p == 0 and not listen):
        raise UsageError(f"address {text!r}: port out of range")
    return host.strip("[]"), p


def listen(addr: str, *, run_after: float = 1.0, accept_timeout: float = 60.0,
           io_timeout: float = 30.0, max_mem: int | None = None,
           announce: Callable[[str], None] | None = None, psk: bytes | None = None) -> dict:
    """Destination: accept one connection on `addr`, receive and run the guest; the status.
    `announce` is told the bound address (HOST:PORT) before waiting. With `psk` the source
    must authenticate first (vlab.migration.auth); no VM exists before it has."""
    host, port = parse_addr(addr, listen=True)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(1)
        bound = srv.getsockname()
        if announce:
            announce(f"{bound[0]}:{bound[1]}")
        srv.settimeout(accept_timeout)
        try:
            conn, peer = srv.accept()
        except socket.timeout:
            return {"status": "error", "reason": f"no source connected within "
                                                 f"{accept_timeout:g} s", "guest_resumed": False,
                    "vcpu_runs": 0}
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            auth = authenticate_destination(conn, psk, host_record=host_record,
                                            timeout=io_timeout)
        except AuthError as e:
            return {"status": "refused", "reason": one_line(e), "guest_resumed": False,
                    "vcpu_runs": 0, "vm_created": False, "peer": f"{peer[0]}:{peer[1]}"}
        dest = Destination(run_after=run_after, max_mem=max_mem, io_timeout=io_timeout)
        st = dest.serve(conn)
        st["peer"] = f"{peer[0]}:{peer[1]}"
        st["auth"] = auth
        return st


def connect(addr: str, timeout: float = 10.0) -> socket.socket:
    """A connection to the destination at HOST:PORT (VlabError naming it if refused)."""
    host, port = parse_addr(addr, listen=False)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise VlabError(f"cannot connect to the destination {host}:{port}: "
                        f"{e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# ====================================================================== the source process

def run_source(addr: str, cfg: RunConfig) -> dict:
    """Source process: build and start the guest, warm up, (trace), migrate to `addr`."""
    cfg.opts.validate()
    src = Source(cfg.spec, cfg.opts)
    try:
        src.start()
        time.sleep(max(cfg.warmup_s, 0))
        trace_info: dict[str, Any] = {}
        if cfg.trace_s > 0:
            trace_info = _trace(src, cfg)
        sock = connect(addr)
        with sock:
            peer = authenticate_source(sock, load_key(cfg.psk_file) if cfg.psk_file else None,
                                       timeout=cfg.opts.io_timeout)
            res = src.migrate(sock)
        res["auth"] = {"authenticated": peer["authenticated"], "method": peer["method"]}
        res["destination_host"] = peer["peer_host"]
        res.update(trace_info)
        res["guest"] = asdict(cfg.spec)
        res["host_load"] = list(os.getloadavg())
        if res.get("outcome") in ("failed", "aborted") and not src.closed:
            # the guest stayed here: let it check itself, so "state intact" is computed too
            try:
                rep = src.finish_guest()
                ok, why = report_ok(rep, migrations=0, counter_at_pause=None)
                res["source_guest_report"] = rep
                res["source_guest_ok"] = ok
                res["source_guest_problems"] = why
            except VlabError as e:
                res["source_guest_ok"] = False
                res["source_guest_problems"] = [one_line(e)]
        return res
    finally:
        src.close()


def _trace(src: Source, cfg: RunConfig) -> dict:
    """Record the guest's dirty trace for the model (saved to cfg.trace_out); what the
    result says about it."""
    secs = cfg.trace_s
    if cfg.opts.bandwidth:
        # the model loops the trace; for a window longer than the trace that would
        # repeat pages instead of finding new ones, so cover round 0 at least
        secs = max(secs, min(60.0, 1.15 * src.n_pages * (PAGE + 16) / cfg.opts.bandwidth))
    tr = src.record_trace(secs, cfg.trace_interval_ms)
    if cfg.trace_out:
        from vlab.analysis.dirty import DirtyTrace

        DirtyTrace(tr["n_pages"], PAGE, tr["interval_ns"], tr["bitmaps"]).save(cfg.trace_out)
    return {"trace_s": secs, "trace_interval_ms": cfg.trace_interval_ms,
            "trace_writes_per_s": tr["writes_per_s"],
            "trace_dirty_pages_per_s": tr["dirty_pages_per_s"],
            "trace_intervals": int(len(tr["interval_ns"]))}


# ====================================================================== both, on this machine

def run_local(cfg: RunConfig, *, run_after: float = 1.0, timeout: float = 600.0,
              host: str = "127.0.0.1", model: bool = True) -> dict:
    """Migrate on this machine between two fresh processes (destination and source) over
    `host` (loopback by default); the source's result with the destination's status and, when
    a trace was recorded, the pre-copy model's prediction for the same workload and link.

    The trace goes to `cfg.trace_out` if set (and stays), else to a temporary file."""
    if cfg.opts.strategy == "postcopy":
        why = uffd_status()
        if why:
            raise MissingFeature(f"post-copy cannot run here: {why}")
    tmp = tempfile.mkdtemp(prefix="vlab-migrate-")
    trace_path = cfg.trace_out or os.path.join(tmp, "trace.npz")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    dst = src = None
    try:
        dst = _spawn(tmp, "destination", {"role": "destination", "listen": f"{host}:0",
                                          "run_after": run_after,
                                          "io_timeout": cfg.opts.io_timeout,
                                          "psk_file": cfg.psk_file}, env)
        line = _read_line(dst, 60)
        if not line.startswith("LISTENING "):
            err = dst.stderr.read() if dst.poll() is not None else ""
            raise VlabError(f"destination did not start: {line.strip() or err.strip()[-300:]}")
        addr = line.split()[1]
        run = RunConfig(spec=cfg.spec, opts=cfg.opts, warmup_s=cfg.warmup_s,
                        trace_s=cfg.trace_s, trace_interval_ms=cfg.trace_interval_ms,
                        trace_out=trace_path if cfg.trace_s > 0 else None,
                        psk_file=cfg.psk_file)
        src = _spawn(tmp, "source", {"role": "source", "to": addr, "config": run.to_dict()}, env)
        try:
            s_out, s_err = src.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VlabError(f"source did not finish within {timeout:g} s") from None
        try:
            d_out, d_err = dst.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            dst.send_signal(signal.SIGUSR1)         # its threads' stacks, for the report
            time.sleep(0.5)
            dst.kill()
            d_out, d_err = dst.communicate()
            d_out = json.dumps({"status": "error", "guest_resumed": None,
                                "reason": "destination did not exit within 60 s after the "
                                          "source; stacks: " + d_err.strip()[-2000:]})
        res = _last_json(s_out)
        if res is None:
            raise VlabError(f"source failed: "
                            f"{s_err.strip().splitlines()[-1] if s_err.strip() else 'no output'}")
        res["destination"] = _last_json(d_out) or {"status": "error",
                                                    "reason": d_err.strip()[-300:]}
        res["source_exit"] = src.returncode
        res["destination_exit"] = dst.returncode
        if model and cfg.trace_s > 0 and os.path.exists(trace_path):
            res["model"] = predict(trace_path, cfg.opts, res)
        return res
    finally:
        for p in (src, dst):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _spawn(tmp: str, name: str, job: dict, env: dict) -> subprocess.Popen:
    """Start `python -m vlab.migration.child` on `job`, written as JSON to a file in `tmp`."""
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump(job, f)
    return subprocess.Popen([sys.executable, "-m", CHILD, path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _read_line(p: subprocess.Popen, timeout: float) -> str:
    """One line of the process's stdout, or "" if none came within `timeout` s."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


def _last_json(text: str) -> dict | None:
    """The last line of `text` that is a JSON object (None if the last such line is bad)."""
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


# ====================================================================== the model

def predict(trace_path: str, opts: MigrateOptions, measured: dict | None = None) -> dict:
    """migration.precopy_sim's prediction for the recorded trace, at the bandwidth limit (or,
    without one, at the measured round-0 throughput: said in `bandwidth_source`)."""
    from vlab.analysis.dirty import DirtyTrace, precopy_sim

    trace = DirtyTrace.load(trace_path)
    if opts.bandwidth:
        bps, src = opts.bandwidth * 8.0, "bandwidth limit"
    else:
        r0 = (measured or {}).get("rounds_detail") or []
        if not r0:
            return {"error": "no bandwidth limit and no measured round to take one from"}
        bps, src = r0[0]["bytes"] * 8.0 / (r0[0]["ms"] / 1000.0), "measured round-0 throughput"
    thr = {"initial": opts.throttle_initial, "step": opts.throttle_step,
           "max": opts.throttle_max} if opts.auto_converge else None
    kw = dict(max_downtime_ms=opts.max_downtime_ms, max_rounds=opts.max_rounds,
              page_size=PAGE, policy=opts.policy, throttle=thr)
    out = precopy_sim(trace, bandwidth_bps=bps, **kw)
    out["bandwidth_source"] = src
    out["bandwidth_bps"] = bps
    r0 = (measured or {}).get("rounds_detail") or []
    if opts.bandwidth and r0 and r0[0]["ms"] > 0:
        # the same model at the throughput round 0 really achieved (this host may not reach
        # the limit), to tell a model error from a slow link
        eff = r0[0]["bytes"] * 8.0 / (r0[0]["ms"] / 1000.0)
        e = precopy_sim(trace, bandwidth_bps=eff, **kw)
        out["effective"] = {"bandwidth_bps": eff, "total_ms": e["total_ms"],
                            "downtime_ms": e["downtime_ms"], "rounds": e["rounds"],
                            "pages_per_round": e["pages_per_round"], "outcome": e["outcome"]}
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}

