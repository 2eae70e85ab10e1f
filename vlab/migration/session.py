"""Live migration of a running vlab guest between two VMM processes, verified end to end.

    python -m vlab.migrate --listen [HOST:]PORT          # destination (one migration, then exit)
    python -m vlab.migrate --to HOST:PORT [options]      # source: run a guest and migrate it
    vlab migrate [options]                               # both, on loopback, plus the model

The stream (protocol 1, see vlab/_migstream.py) is: HELLO, LAYOUT, then rounds of pages, the
final stop-and-copy round, the vCPU state and DONE. The destination answers READY once it
holds a complete guest; the source then commits with GO, and only then does the destination
resume the guest; it answers ACK (with the time of the guest's first MARK) and the hashes of
every page of its memory as the final round left it. The source tears down only after the
ACK, and compares those hashes with its own paused memory. The guest then runs on the
destination and reports its own invariants (REPORT).

Strategies:
* precopy: iterative pre-copy with dirty logging (bitmap: KVM_GET_DIRTY_LOG; clear: manual
  protection, each batch re-protected with KVM_CLEAR_DIRTY_LOG just before it is copied, so a
  page written before its copy is not sent again; ring: the dirty ring). A round sends the pages dirtied during the previous one; when the remaining set can be
  sent within `max_downtime_ms` (at the bandwidth limit, or the measured rate without one),
  the guest is paused and the rest sent (outcome "converged"). After `max_rounds` live rounds
  the non-convergence policy applies: "stop_copy" pauses and sends the rest anyway (outcome
  "max_rounds_stop_copy"), "abort" cancels: the guest goes on running on the source (outcome
  "aborted"). `auto_converge` throttles the guest after each round that did not converge
  (0.2, then +0.1 per round, up to 0.99, like QEMU): its vCPU thread sleeps that fraction of
  every 20 ms.
* postcopy: after `postcopy_rounds` pre-copy rounds (0: none) the guest is paused, its vCPU
  state and the map of pages the destination lacks are sent, and the destination resumes at
  once. Missing pages are fetched on demand: the destination's memory is registered with
  userfaultfd, a fault (the guest's, through KVM, or the VMM's own) becomes a request, and the
  page is installed with UFFDIO_COPY; meanwhile the source pushes the rest in order. The
  latency of every demand fault is reported. Without userfaultfd the strategy is skipped: a
  read-only slot (KVM_MEM_READONLY) would only trap writes, and the guest would read stale
  pages, so it is not a correct fallback.

Failures: if the connection breaks before GO, the source stops dirty logging and lets its guest
run on (outcome "failed", guest_running True). The destination never resumes a guest before
GO: a stream that ends early, or anything malformed, makes it discard the VM and exit 1 with a
one-line reason. After GO the guest belongs to the destination: a source that hears no ACK
reports "failed_after_commit" and does not resume its copy (a guest must never run twice).

Time: the TSC travels in the vCPU state (IA32_TSC). On this host (PVM) KVM ignores a host
write of IA32_TSC: the guest reads the host's TSC, so on one host time simply continues and the
guest sees the downtime as a TSC step of the same length (reported as `tsc_step_ms`; the guest
itself fails if the TSC ever goes backwards). Where KVM honours the write, the step is only the
time between the state load and the resume. Source and destination must run the TSC at the
same rate (KVM_SET_TSC_KHZ where KVM_CAP_TSC_CONTROL exists, otherwise refused).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from vlab.migration import stream as ms
from vlab.migration.options import POLICIES, STRATEGIES, MODES, add_arguments, parse_rate, parse_size
from vlab._errors import KvmError, UsageError, VlabError
from vlab.migration.guest import (A_GEN, A_STOP, A_WS, PAGE, DirtyTracker, GuestRunner, GuestSpec,
                        bits_to_index, build_guest, counter_of, index_to_bits, params_view,
                        read_report, report_ok)

log = logging.getLogger("vlab.migration.session")

PROTOCOL = ms.VERSION
RING_BYTES = 1 << 20                 # the dirty ring's maximum on the hosts vlab runs on
POSTCOPY_WINDOW = 128                # pushed pages in flight (512 KiB: ~2 ms at 2 Gbit/s)
OUTCOMES = ("converged", "max_rounds_stop_copy", "aborted", "postcopy", "failed",
            "failed_after_commit")


class MissingFeature(VlabError):
    """This host lacks what a strategy needs (post-copy: userfaultfd); the text says what."""


class SourceAborted(ms.StreamError):
    """The source cancelled the migration (its non-convergence policy, or its own failure)."""


@dataclass
class MigrateOptions:
    """How the source migrates (see the module docstring)."""
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
        if not 1 <= self.batch_pages <= ms.MAX_BATCH:
            raise UsageError(f"batch must be 1..{ms.MAX_BATCH} pages")
        if not (0 < self.throttle_initial <= self.throttle_max < 1 and 0 <= self.throttle_step <= 1):
            raise UsageError("throttle: need 0 < initial <= max < 1 and 0 <= step <= 1")
        if not self.io_timeout > 0:
            raise UsageError("io timeout must be positive")


def boot_id() -> str:
    """This kernel's boot id: two processes with the same one share CLOCK_MONOTONIC."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def uffd_reason(err: int, op: str, *, unprivileged: str | None, euid: int,
                dev_exists: bool) -> str:
    """Why userfaultfd cannot be used, from what opening it said (`err`, the errno of `op`) and
    the host's settings: /proc/sys/vm/unprivileged_userfaultfd, the user, /dev/userfaultfd."""
    base = f"userfaultfd unavailable: {op} failed: {os.strerror(err)}"
    if err == errno.ENOSYS and not dev_exists:
        return base + " (kernel built without CONFIG_USERFAULTFD)"
    if err == errno.EPERM:
        if euid != 0 and (unprivileged or "").strip() == "0":
            return base + (" (vm.unprivileged_userfaultfd=0: post-copy needs root, "
                           "CAP_SYS_PTRACE or access to /dev/userfaultfd)")
        return base + " (no permission: needs CAP_SYS_PTRACE or access to /dev/userfaultfd)"
    return base


def uffd_status(root: str = "/") -> str | None:
    """None if userfaultfd can serve faults that KVM takes on guest memory here, else why not.

    Post-copy needs faults from the kernel (KVM reading guest memory for a vCPU) reported, so
    the descriptor is opened without UFFD_USER_MODE_ONLY; unprivileged users need
    vm.unprivileged_userfaultfd=1 or /dev/userfaultfd for that."""
    from vlab.vmm._native import ffi, lib

    feats = ffi.new("uint64_t *")
    fd = lib.vlab_uffd_open(0, feats)
    if fd >= 0:
        os.close(fd)
        return None
    e = lib.vlab_last_error()
    try:
        with open(os.path.join(root, "proc/sys/vm/unprivileged_userfaultfd")) as f:
            unpriv: str | None = f.read()
    except OSError:
        unpriv = None
    return uffd_reason(e.err, ffi.string(e.op).decode(), unprivileged=unpriv,
                       euid=os.geteuid(), dev_exists=os.path.exists(os.path.join(root,
                                                                                 "dev/userfaultfd")))


def _hashes_of(slot) -> np.ndarray:
    from vlab.vmm._native import ffi, lib

    out = np.empty(slot.pages, dtype=np.uint64)
    if lib.vlab_mem_page_hashes(lib.vlab_slot_hva(slot._h), slot.pages, ffi.NULL, slot.pages,
                                ffi.from_buffer("uint64_t[]", out)) < 0:
        from vlab.vmm.kvm import _raise_last
        _raise_last()
    return out


def _stats_ms(values_ns: list[int]) -> dict:
    if not values_ns:
        return {"n": 0}
    a = np.asarray(values_ns, dtype=np.float64) / 1e6
    return {"n": int(a.size), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


# =========================================================================== source

class Source:
    """A running guest that can be migrated to a destination over a connected socket."""

    def __init__(self, spec: GuestSpec, opts: MigrateOptions):
        from vlab.vmm._native import lib

        opts.validate()
        self.spec, self.opts = spec, opts
        self.machine = build_guest(spec, dirty_ring=RING_BYTES if opts.mode == "ring" else 0)
        self.vm = self.machine.vm
        self.slots = [self.machine.sys, *self.machine.data]
        self.vcpu = self.machine.vcpus[0]
        self.tracker = DirtyTracker(self.vm, self.slots, opts.mode, self.machine.vcpus)
        self.runner = GuestRunner(self.vcpu, on_ring_full=self.tracker.ring_full)
        self.data_gpa = self.machine.data[0].gpa
        self.state_size = lib.vlab_vcpu_state_size()
        self.closed = False
        self._khz = self.vcpu.tsc_khz
        self._buf = bytearray(opts.batch_pages * PAGE)
        self._hbuf = np.empty(opts.batch_pages, dtype=np.uint64)
        self._sent_hash = [np.zeros(s.pages, dtype=np.uint64) for s in self.slots]
        self.resent_unchanged = 0       # pages sent again although unchanged since last sent

    # ---- the guest ----
    def start(self) -> None:
        self.runner.start()

    @property
    def n_pages(self) -> int:
        return sum(s.pages for s in self.slots)

    def writes_so_far(self) -> int:
        """Sum of the guest's sequence table (racy read of guest memory; for rates only)."""
        if self.spec.workload != "uniform" or self.closed:
            return 0
        ws = int(params_view(self.vm)[16 + A_WS])
        table = np.frombuffer(self.vm.hva(self.data_gpa + PAGE, -(-ws * 4 // PAGE) * PAGE),
                              dtype=np.uint32)[:ws]
        return int(table.sum(dtype=np.uint64))

    def record_trace(self, seconds: float, interval_ms: float) -> dict:
        """Record the guest's dirty trace (every page of every slot, one bitmap per interval)
        with the migration's own tracking mode, for the pre-copy model. Returns n_pages,
        interval_ns, bitmaps (K x words) and the writer's measured rate."""
        if seconds <= 0:
            raise UsageError("trace duration must be positive")
        offs = np.cumsum([0] + [s.pages for s in self.slots])
        n = int(offs[-1])
        words = (n + 63) // 64
        k = max(1, int(round(seconds * 1000 / interval_ms)))
        bitmaps = np.zeros((k, words), dtype=np.uint64)
        iv = np.zeros(k, dtype=np.int64)
        self.tracker.start()
        try:
            self.tracker.harvest(clear_all=True)
            w0, t_last = self.writes_so_far(), time.monotonic_ns()
            t_first = t_last
            for i in range(k):
                target = t_first + int((i + 1) * interval_ms * 1e6)
                delay = (target - time.monotonic_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                sets = self.tracker.harvest(clear_all=True)
                t = time.monotonic_ns()
                iv[i] = max(1, t - t_last)
                t_last = t
                bits = np.zeros(words * 64, dtype=np.uint8)
                for j, idx in enumerate(sets):
                    bits[offs[j] + idx.astype(np.int64)] = 1
                bitmaps[i] = np.packbits(bits, bitorder="little").view(np.uint64)
                if self.runner.finished:
                    raise self.runner.error or VlabError("guest stopped during the trace")
            w1 = self.writes_so_far()
        finally:
            self.tracker.stop()
        dur = (t_last - t_first) / 1e9
        return {"n_pages": n, "interval_ns": iv, "bitmaps": bitmaps,
                "writes_per_s": (w1 - w0) / dur if dur > 0 else 0.0,
                "dirty_pages_per_s": float(np.unpackbits(bitmaps.view(np.uint8)).sum()) / dur
                if dur > 0 else 0.0}

    def finish_guest(self, timeout: float = 60.0) -> dict:
        """Ask the guest (still on this side) to stop and check itself; its report."""
        if self.runner.finished and self.runner.error is not None:
            raise self.runner.error
        params_view(self.vm)[16 + A_STOP] = 1
        self.runner.wait_done(timeout)
        return read_report(self.vm)

    def close(self) -> None:
        if not self.closed:
            self.runner.quit()
            self.machine.close()
            self.closed = True

    # ---- sending ----
    def _send_sets(self, w: ms.Writer, sets: list[np.ndarray], flags: int = 0,
                   clear: bool = True) -> int:
        """Send the pages `sets[slot]` in batches; in clear mode each batch is re-protected
        right before it is copied (unless `clear` is False: the guest is paused)."""
        from vlab.vmm._native import ffi, lib

        sent = 0
        bp = self.opts.batch_pages
        cbuf = ffi.from_buffer(self._buf)
        chash = ffi.from_buffer("uint64_t[]", self._hbuf)
        for pos, idx in enumerate(sets):
            slot = self.slots[pos]
            hva = lib.vlab_slot_hva(slot._h)
            idx = np.ascontiguousarray(idx, dtype=np.uint64)
            for a in range(0, len(idx), bp):
                chunk = idx[a:a + bp]
                n = len(chunk)
                if clear:
                    self.tracker.clear(pos, chunk)
                if lib.vlab_mem_gather(hva, slot.pages, ffi.from_buffer("uint64_t[]", chunk), n,
                                       cbuf, chash) < 0:
                    from vlab.vmm.kvm import _raise_last
                    _raise_last()
                w.send_pages(pos, chunk, self._hbuf[:n], self._buf, flags)
                ci = chunk.astype(np.int64)
                prev = self._sent_hash[pos][ci]
                self.resent_unchanged += int(np.count_nonzero((prev != 0) &
                                                              (prev == self._hbuf[:n])))
                self._sent_hash[pos][ci] = self._hbuf[:n]
                sent += n
        return sent

    def _drop(self, idx: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
        """Fault injection: remove up to n working-set pages (past the counter page and the
        sequence table) from a final-round set, choosing pages whose content really changed
        since they were last sent, so the destination keeps stale copies."""
        ws = int(params_view(self.vm)[16 + A_WS])
        first = 1 + -(-ws * 4 // PAGE)
        cand = idx[idx >= first]
        now = _hashes_of(self.slots[1])
        cand = cand[now[cand.astype(np.int64)] != self._sent_hash[1][cand.astype(np.int64)]][-n:]
        return np.setdiff1d(idx, cand).astype(np.uint64), [int(c) for c in cand]

    def _layout(self) -> dict:
        return {"slots": [{"gpa": s.gpa, "size": s.size, "backing": s.backing}
                          for s in self.slots],
                "vcpus": len(self.machine.vcpus), "data_slot": 1, "pages": self.n_pages,
                "payload": self.machine.payload.name, "workload": self.spec.workload}

    # ---- migrating ----
    def migrate(self, sock: socket.socket) -> dict:
        """Migrate the running guest over `sock`; the result (see OUTCOMES). Never raises for
        a failure of the peer or the stream: the result says what happened."""
        o = self.opts
        sock.settimeout(o.io_timeout)
        w = ms.Writer(sock, ms.Bucket(o.bandwidth))
        res: dict[str, Any] = {"strategy": o.strategy, "mode": o.mode, "policy": o.policy,
                               "bandwidth_Bps": o.bandwidth, "max_downtime_ms": o.max_downtime_ms,
                               "max_rounds": o.max_rounds, "auto_converge": o.auto_converge,
                               "guest_pages": self.n_pages, "outcome": None, "error": None,
                               "verified": False, "guest_running": None}
        rounds: list[dict] = []
        res["rounds_detail"] = rounds
        committed = paused = False
        inbox: queue.Queue | None = None
        t0 = time.monotonic_ns()
        writes0 = self.writes_so_far()
        try:
            if self.runner.finished:
                raise VlabError(f"guest is not running ({self.runner.stop_reason})")
            w.send_json(ms.HELLO, {"protocol": PROTOCOL, "strategy": o.strategy,
                                   "tsc_khz": self.vcpu.tsc_khz, "boot_id": boot_id(),
                                   "state_size": self.state_size, "page_size": PAGE,
                                   "vlab": _version(), "pid": os.getpid()})
            w.send_json(ms.LAYOUT, self._layout())
            sent_ever = [np.zeros(s.pages, dtype=bool) for s in self.slots]
            to_send = [np.arange(s.pages, dtype=np.uint64) for s in self.slots]
            pending = [np.zeros(0, dtype=np.uint64) for _ in self.slots]
            outcome = None
            pure_postcopy = o.strategy == "postcopy" and o.postcopy_rounds == 0
            if pure_postcopy:
                outcome = "postcopy"
            else:
                self.tracker.start()
            while not pure_postcopy:
                n = int(sum(len(x) for x in to_send))
                tr0, b0 = time.monotonic_ns(), w.bytes
                w.send_json(ms.ROUND, {"round": len(rounds), "pages": n, "final": False})
                self._send_sets(w, to_send)
                for pos, idx in enumerate(to_send):
                    sent_ever[pos][idx.astype(np.int64)] = True
                tr1 = time.monotonic_ns()
                dirty = self.tracker.harvest()
                nd = int(sum(len(x) for x in dirty))
                secs = max((tr1 - tr0) / 1e9, 1e-9)
                rate = o.bandwidth or (w.bytes - b0) / secs
                rounds.append({"round": len(rounds), "pages": n, "ms": secs * 1000,
                               "bytes": w.bytes - b0, "throttle": self.runner.throttle,
                               "dirtied": nd, "MBps": (w.bytes - b0) / secs / 1e6})
                if self.runner.finished:
                    raise self.runner.error or VlabError("guest stopped during the migration")
                pending = dirty
                if o.strategy == "postcopy" and len(rounds) >= o.postcopy_rounds:
                    outcome = "postcopy"
                    break
                if nd * (PAGE + 16) / rate * 1000 <= o.max_downtime_ms:
                    outcome = "converged"
                    break
                if len(rounds) >= o.max_rounds:
                    outcome = "aborted" if o.policy == "abort" else "max_rounds_stop_copy"
                    break
                to_send = dirty
                if o.auto_converge:
                    t = self.runner.throttle
                    self.runner.set_throttle(o.throttle_initial if t == 0 else
                                             min(t + o.throttle_step, o.throttle_max))
            if outcome == "aborted":
                self.tracker.stop()
                self.runner.set_throttle(0)
                w.send_json(ms.ABORT, {"reason": f"no convergence within {o.max_rounds} rounds "
                                                 f"(policy abort)"})
                res.update(outcome="aborted", rounds=len(rounds),
                           total_ms=(time.monotonic_ns() - t0) / 1e6, guest_running=True,
                           downtime_ms=None)
                self._finish_res(res, rounds, w)
                return res
            # ---- switch-over ----
            # Let the destination drain what is still queued in the sockets and in its own
            # backlog while the guest still runs here: otherwise that catching-up would count
            # as downtime. Whatever the guest dirties meanwhile goes in the final set.
            r = ms.Reader(sock, "destination")
            t_sync = time.monotonic_ns()
            w.send_json(ms.SYNC, {"round": len(rounds)})
            mtype, pl = r.read({ms.SYNCED, ms.ERROR})
            msg = r.read_json(mtype, pl)
            if mtype == ms.ERROR:
                raise ms.StreamError(f"destination failed: {msg['reason']}")
            res["sync_ms"] = (time.monotonic_ns() - t_sync) / 1e6
            t_req = time.monotonic_ns()
            t_pause = self.runner.pause()
            t_paused = time.monotonic_ns()
            paused = True
            last = self.tracker.harvest() if self.tracker.active else pending
            t_harvest = time.monotonic_ns()
            final = [_union(a, b, s.pages) for a, b, s in zip(pending, last, self.slots)]
            if o.drop_pages:
                final[1], res["dropped_pages"] = self._drop(final[1], o.drop_pages)
            blob = self.vcpu.save_state()
            t_state = time.monotonic_ns()
            missing: list[np.ndarray] = []
            tf0, bf0 = time.monotonic_ns(), w.bytes
            if o.strategy == "precopy":
                nf = int(sum(len(x) for x in final))
                w.send_json(ms.ROUND, {"round": len(rounds), "pages": nf, "final": True})
                self._send_sets(w, final, clear=False)
                rounds.append({"round": len(rounds), "pages": nf,
                               "ms": (time.monotonic_ns() - tf0) / 1e6, "bytes": w.bytes - bf0,
                               "throttle": 0.0, "dirtied": 0, "final": True})
            else:
                for pos, s in enumerate(self.slots):
                    need = np.zeros(s.pages, dtype=bool)
                    need[~sent_ever[pos]] = True
                    need[final[pos].astype(np.int64)] = True
                    missing.append(np.flatnonzero(need).astype(np.uint64))
                    w.send(ms.DIRTYMAP, *ms.encode_dirtymap(pos, s.pages,
                                                            index_to_bits(missing[-1], s.pages)))
            w.send(ms.STATE, *ms.encode_state(0, blob))
            pages_sent = int(sum(r["pages"] for r in rounds))
            w.send_json(ms.DONE, {"rounds": len(rounds), "pages_sent": pages_sent,
                                  "messages": w.messages, "pause_ns": t_pause})
            t_done = time.monotonic_ns()
            # off the critical path: the destination is busy checking what it received
            self.tracker.stop()
            self.runner.set_throttle(0)
            res["counter_at_pause"] = counter_of(self.vm, self.data_gpa)
            live_s = (t_pause - t0) / 1e9
            res["writes_per_s_while_migrating"] = (self.writes_so_far() - writes0) / live_s \
                if live_s > 0 and self.spec.workload == "uniform" else None
            mtype, pl = r.read({ms.READY, ms.ERROR})
            t_ready = time.monotonic_ns()
            msg = r.read_json(mtype, pl)
            if mtype == ms.ERROR:
                raise ms.StreamError(f"destination refused the guest: {msg['reason']}")
            w.send_json(ms.GO, {})
            committed = True
            t_go = time.monotonic_ns()
            inbox = queue.Queue()
            events: queue.Queue = queue.Queue()
            reader = threading.Thread(target=_source_inbox, args=(r, inbox, events),
                                      name="migrate-inbox", daemon=True)
            reader.start()
            post: dict[str, Any] = {}
            if o.strategy == "postcopy":
                # the resumed guest needs pages before it can even mark its first steps
                post = self._serve_postcopy(w, missing, events, inbox)
            ack, t_ack = _expect(inbox, ms.ACK, o.io_timeout, with_time=True)
            hashes = self._collect_hashes(inbox, o.io_timeout)
            t_end = time.monotonic_ns()
            # the destination holds the guest: compare, then tear down the source copy
            mismatch, first_bad = 0, None
            for pos, s in enumerate(self.slots):
                mine = _hashes_of(s)
                bad = np.flatnonzero(mine != hashes[pos])
                if bad.size and first_bad is None:
                    first_bad = {"slot": pos, "page": int(bad[0])}
                mismatch += int(bad.size)
            self.close()
            res["guest_running"] = False
            same_host = ack["boot_id"] == boot_id() and bool(ack["boot_id"])
            if same_host and ack["mark_ns"] > 0:
                res["downtime_ms"] = (ack["mark_ns"] - t_pause) / 1e6
                res["downtime_method"] = "guest MARK on the destination - last KVM_RUN exit " \
                                         "on the source (same CLOCK_MONOTONIC)"
            else:
                res["downtime_ms"] = (t_ack - t_pause) / 1e6
                res["downtime_method"] = "ACK received - pause (upper bound: other host)"
            res["switchover_detail_ms"] = {
                "pause_request_to_stopped": (t_pause - t_req) / 1e6,
                "stopped_to_paused": (t_paused - t_pause) / 1e6,
                "final_harvest": (t_harvest - t_paused) / 1e6,
                "final_set_and_state": (t_state - t_harvest) / 1e6,
                "final_round_and_state_sent": (t_done - t_state) / 1e6,
                "destination_checks_and_load": (t_ready - t_done) / 1e6,
                "ready_to_go": (t_go - t_ready) / 1e6,
                "go_to_resume": (ack["resumed_ns"] - t_go) / 1e6 if same_host else None,
                "resume_to_first_mark": (ack["mark_ns"] - ack["resumed_ns"]) / 1e6}
            res.update(outcome=outcome, rounds=len(rounds), pages_sent=pages_sent,
                       total_ms=(t_end - t0) / 1e6, switchover_ms=(t_go - t_pause) / 1e6,
                       memory_mismatches=mismatch, first_mismatch=first_bad,
                       memory_verified=mismatch == 0, dest=ack, **post)
            rep_msg = _expect(inbox, ms.REPORT, o.io_timeout + 120)
            rep = rep_msg["guest"]
            ok, why = report_ok(rep, migrations=1, counter_at_pause=res["counter_at_pause"])
            res["guest_report"] = rep
            res["guest_ok"] = ok and not rep_msg.get("error")
            res["guest_problems"] = why + ([rep_msg["error"]] if rep_msg.get("error") else [])
            res["tsc_step_ms"] = rep["migration_tsc_step"] / self._khz \
                if rep.get("migration_tsc_step") and self._khz else None
            res["verified"] = bool(res["memory_verified"] and res["guest_ok"])
            try:
                w.send_json(ms.FIN, {"verified": res["verified"]})
            except ms.StreamError:
                pass
        except (ms.StreamError, OSError, VlabError) as e:
            res["error"] = _one_line(e)
            if not committed:
                # the guest never left: stop logging, let it run on here
                try:
                    self.tracker.stop()
                    self.runner.set_throttle(0)
                    if paused:
                        self.runner.resume()
                finally:
                    res["guest_running"] = not self.runner.finished and not self.closed
                res["outcome"] = "failed"
            else:
                res["outcome"] = "failed_after_commit"
                res["guest_running"] = False
            res["rounds"] = len(rounds)
            res["total_ms"] = (time.monotonic_ns() - t0) / 1e6
        self._finish_res(res, rounds, w)
        return res

    def _finish_res(self, res: dict, rounds: list[dict], w: ms.Writer) -> None:
        res["pages_per_round"] = [r["pages"] for r in rounds]
        res["bytes_sent"] = w.bytes
        res["messages_sent"] = w.messages
        res["bandwidth_wait_s"] = w.bucket.waited_s
        res["harvest_ms"] = self.tracker.harvest_ns / 1e6
        res["clear_ms"] = self.tracker.clear_ns / 1e6
        res["ring_full_exits"] = self.runner.ring_full
        res["throttle_per_round"] = [r["throttle"] for r in rounds]
        res["resent_unchanged_pages"] = self.resent_unchanged

    def _collect_hashes(self, inbox: queue.Queue, timeout: float) -> list[np.ndarray]:
        out = [np.zeros(s.pages, dtype=np.uint64) for s in self.slots]
        got = [np.zeros(s.pages, dtype=bool) for s in self.slots]
        while not all(g.all() for g in got):
            slot, first, h = _expect(inbox, ms.HASHES, timeout)
            if slot >= len(out) or first + len(h) > len(out[slot]):
                raise ms.StreamError(f"HASHES for slot {slot} pages {first}+{len(h)} is outside "
                                     f"the layout")
            out[slot][first:first + len(h)] = h
            got[slot][first:first + len(h)] = True
        return out

    def _serve_postcopy(self, w: ms.Writer, missing: list[np.ndarray], events: queue.Queue,
                        inbox: queue.Queue) -> dict:
        """Push every missing page, demand requests first, with at most `POSTCOPY_WINDOW`
        pushed pages in flight (sent, not yet credited as installed); returns post-copy
        figures. `events` brings ("req", (slot, pages)), ("credit", n) and ("error", e)."""
        need = [np.zeros(s.pages, dtype=bool) for s in self.slots]
        for pos, idx in enumerate(missing):
            need[pos][idx.astype(np.int64)] = True
        cursor = [0] * len(self.slots)
        left = int(sum(int(n.sum()) for n in need))
        demanded = pushed = credited = waits = 0
        t0 = time.monotonic_ns()
        bg = 16                      # pages per background message
        while left:
            full = demanded + pushed - credited >= POSTCOPY_WINDOW
            try:
                # block only when the window is full: a credit or a request wakes us
                kind, item = events.get(timeout=self.opts.io_timeout) if full \
                    else events.get_nowait()
            except queue.Empty:
                if full:
                    raise ms.StreamError(f"no credit from the destination within "
                                         f"{self.opts.io_timeout:g} s") from None
                kind = None
            if full:
                waits += 1
            if kind == "error":
                raise item
            if kind == "credit":
                credited = max(credited, item)
                continue
            if kind == "req":
                slot, idx = item
                if slot >= len(need):
                    raise ms.StreamError(f"REQ for slot {slot}, which does not exist")
                idx = idx[idx < len(need[slot])]
                idx = idx[need[slot][idx.astype(np.int64)]]
                if len(idx):
                    need[slot][idx.astype(np.int64)] = False
                    self._send_sets(w, [np.zeros(0, np.uint64)] * slot + [idx], flags=1)
                    demanded += len(idx)
                    left -= len(idx)
                continue
            if full:
                continue
            for pos in range(len(need)):
                if cursor[pos] >= len(need[pos]):
                    continue
                nz = np.flatnonzero(need[pos][cursor[pos]:cursor[pos] + 4096])
                if not len(nz):
                    cursor[pos] += 4096
                    break
                idx = (nz[:bg] + cursor[pos]).astype(np.uint64)
                need[pos][idx.astype(np.int64)] = False
                self._send_sets(w, [np.zeros(0, np.uint64)] * pos + [idx])
                pushed += len(idx)
                left -= len(idx)
                break
        w.send_json(ms.POSTDONE, {"pages_sent": demanded + pushed})
        return {"postcopy_pages": demanded + pushed, "postcopy_demand_served": demanded,
                "postcopy_pushed": pushed, "postcopy_ms": (time.monotonic_ns() - t0) / 1e6,
                "postcopy_window_waits": waits}


def _union(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Sorted union of two page-index sets of an n-page slot. A mask, not np.union1d: this runs
    while the guest is paused, and numpy's set operations cost milliseconds on first use."""
    mask = np.zeros(n, dtype=bool)
    mask[a.astype(np.int64)] = True
    mask[b.astype(np.int64)] = True
    return np.flatnonzero(mask).astype(np.uint64)


def _source_inbox(r: ms.Reader, inbox: queue.Queue, events: queue.Queue) -> None:
    """Read the destination's messages after GO: post-copy requests and credits to `events`,
    the rest to `inbox`; a failure to both."""
    try:
        while True:
            mtype, pl = r.read({ms.ACK, ms.HASHES, ms.REQ, ms.REPORT, ms.ERROR, ms.CREDIT})
            if mtype == ms.REQ:
                events.put(("req", ms.decode_req(pl, r.seq - 1)))
                continue
            if mtype == ms.CREDIT:
                events.put(("credit", ms.decode_credit(pl, r.seq - 1)))
                continue
            now = time.monotonic_ns()
            if mtype == ms.HASHES:
                slot, first, h = ms.decode_hashes(pl, r.seq - 1)
                inbox.put((ms.HASHES, (slot, first, h.copy()), now))
            elif mtype == ms.ERROR:
                msg = r.read_json(mtype, pl)
                err = ms.StreamError(f"destination failed: {msg['reason']}")
                inbox.put(("error", err, now))
                events.put(("error", err))
                return
            else:
                inbox.put((mtype, r.read_json(mtype, pl), now))
                if mtype == ms.REPORT:
                    return
    except ms.StreamError as e:
        inbox.put(("error", e, time.monotonic_ns()))
        events.put(("error", e))


def _expect(inbox: queue.Queue, mtype: int, timeout: float, with_time: bool = False):
    try:
        kind, item, t_ns = inbox.get(timeout=timeout)
    except queue.Empty:
        raise ms.StreamError(f"no {ms.NAMES[mtype]} from the destination within "
                             f"{timeout:g} s") from None
    if kind == "error":
        raise item
    if kind != mtype:
        raise ms.StreamError(f"unexpected {ms.NAMES.get(kind, kind)} from the destination; "
                             f"expected {ms.NAMES[mtype]}")
    return (item, t_ns) if with_time else item


# ====================================================================== destination

class Destination:
    """Receives one guest, resumes it after GO, and reports. Never resumes a partial guest."""

    def __init__(self, *, run_after: float = 1.0, max_mem: int | None = None,
                 io_timeout: float = 30.0):
        self.run_after = run_after
        self.max_mem = max_mem
        self.io_timeout = io_timeout
        self.vm = None
        self.kvm = None
        self.slots: list = []
        self.vcpus: list = []
        self.postcopy = False
        self.stage: list[np.ndarray] | None = None
        self.status: dict[str, Any] = {"status": None, "reason": None, "guest_resumed": False,
                                       "vcpu_runs": 0}
        self._uffd = -1

    # ---- building the guest from the stream ----
    def _check_hello(self, h: dict) -> None:
        from vlab.vmm._native import lib

        if h["protocol"] != PROTOCOL:
            raise ms.StreamError(f"source speaks protocol {h['protocol']}, this vlab {PROTOCOL}")
        if h["strategy"] not in STRATEGIES:
            raise ms.StreamError(f"unknown strategy {h['strategy']!r} in HELLO")
        if h["page_size"] != PAGE:
            raise ms.StreamError(f"page size {h['page_size']} (only {PAGE} is supported)")
        if h["state_size"] != lib.vlab_vcpu_state_size():
            raise ms.StreamError(f"vCPU state of {h['state_size']} bytes; this vlab's is "
                                 f"{lib.vlab_vcpu_state_size()} (different vlab build)")
        if h["tsc_khz"] <= 0:
            raise ms.StreamError("HELLO carries no TSC frequency")
        if h["strategy"] == "postcopy":
            why = uffd_status()
            if why:
                raise ms.StreamError(f"post-copy needs userfaultfd: {why}")

    def _build(self, layout: dict) -> None:
        from vlab.vmm.kvm import BACKINGS, Kvm, Vm

        slots = layout["slots"]
        if not 1 <= len(slots) <= 16:
            raise ms.StreamError(f"LAYOUT has {len(slots)} slots (1..16 allowed)")
        if not 1 <= layout["vcpus"] <= 8:
            raise ms.StreamError(f"LAYOUT asks for {layout['vcpus']} vCPUs (1..8)")
        if not 0 <= layout["data_slot"] < len(slots):
            raise ms.StreamError("LAYOUT data_slot is not one of its slots")
        total = 0
        for i, s in enumerate(slots):
            ok = (isinstance(s, dict) and all(isinstance(s.get(k), int) and
                                              not isinstance(s.get(k), bool)
                                              for k in ("gpa", "size"))
                  and s.get("backing") in BACKINGS and s.get("backing") != "memfd")
            if not ok or s["gpa"] < 0 or s["size"] <= 0 or (s["gpa"] | s["size"]) % PAGE \
                    or s["gpa"] + s["size"] > 1 << 46:
                raise ms.StreamError(f"LAYOUT slot {i} is malformed: {s!r:.120}")
            if self.postcopy and s["backing"].startswith("hugetlb"):
                raise ms.StreamError(f"LAYOUT slot {i} is backed by {s['backing']}: post-copy "
                                     f"installs 4 KiB pages and supports 4k/thp backings only")
            total += s["size"]
        if total // PAGE != layout["pages"]:
            raise ms.StreamError(f"LAYOUT says {layout['pages']} pages, its slots hold "
                                 f"{total // PAGE}")
        limit = self.max_mem if self.max_mem is not None else _mem_available() * 9 // 10
        need = total * (2 if self.postcopy else 1)      # post-copy stages pre-copied pages
        if need > limit:
            raise ms.StreamError(f"LAYOUT needs {need >> 20} MiB here for {total >> 20} MiB of "
                                 f"guest memory; this destination allows {limit >> 20} MiB")
        self.kvm = Kvm()
        self.vm = Vm(self.kvm)
        try:
            for s in slots:
                self.slots.append(self.vm.add_slot(s["gpa"], s["size"], s["backing"]))
        except KvmError as e:
            raise ms.StreamError(f"cannot build the guest's memory: {e}") from None
        self.vcpus = [self.vm.create_vcpu(i) for i in range(layout["vcpus"])]
        self.data_gpa = slots[layout["data_slot"]]["gpa"]
        self.received = [np.zeros(s.pages, dtype=bool) for s in self.slots]
        self.hashes = [np.zeros(s.pages, dtype=np.uint64) for s in self.slots]
        # post-copy: pre-copy rounds land in a staging area, not in guest memory, so that guest
        # memory is still wholly missing (userfaultfd reports every first touch) at the
        # switch-over and nothing has to be discarded while the guest is paused. Valid staged
        # pages are then installed locally; stale and unsent ones are fetched.
        self.stage = [np.zeros(s.size, dtype=np.uint8) for s in self.slots] \
            if self.postcopy else None

    def _target(self, slot: int):
        from vlab.vmm._native import ffi, lib

        if self.stage is not None:
            return ffi.from_buffer(self.stage[slot])
        return lib.vlab_slot_hva(self.slots[slot]._h)

    def _apply_pages(self, payload: memoryview, seq: int) -> int:
        from vlab.vmm._native import ffi, lib

        slot, flags, idx, hashes, data = ms.decode_pages(payload, seq)
        if slot >= len(self.slots):
            raise ms.StreamError(f"PAGES message #{seq} for slot {slot}, which LAYOUT did not "
                                 f"declare")
        s = self.slots[slot]
        if int(idx.max()) >= s.pages:
            raise ms.StreamError(f"PAGES message #{seq}: page {int(idx.max())} is outside slot "
                                 f"{slot} ({s.pages} pages)")
        out = np.empty(len(idx), dtype=np.uint64)
        if lib.vlab_mem_scatter(self._target(slot), s.pages,
                                ffi.from_buffer("uint64_t[]", idx), len(idx),
                                ffi.from_buffer(data), ffi.from_buffer("uint64_t[]", out)) < 0:
            from vlab.vmm.kvm import _raise_last
            _raise_last()
        bad = np.flatnonzero(out != hashes)
        if bad.size:
            raise ms.StreamError(f"PAGES message #{seq}: page {int(idx[bad[0]])} of slot {slot} "
                                 f"arrived corrupted (hash mismatch)")
        ii = idx.astype(np.int64)
        self.received[slot][ii] = True
        self.hashes[slot][ii] = out
        return len(idx)

    def receive(self, r: ms.Reader, w: ms.Writer) -> dict:
        """Everything up to DONE: a complete guest in memory, its vCPU state loaded."""
        from vlab.vmm._native import lib

        mtype, pl = r.read({ms.HELLO})
        hello = r.read_json(mtype, pl)
        self._check_hello(hello)
        self.status["strategy"] = hello["strategy"]
        self.postcopy = hello["strategy"] == "postcopy"
        mtype, pl = r.read({ms.LAYOUT})
        self._build(r.read_json(mtype, pl))
        states: dict[int, bytes] = {}
        maps: dict[int, np.ndarray] = {}
        next_round, final_seen, pages_rx = 0, False, 0
        postcopy = hello["strategy"] == "postcopy"
        while True:
            mtype, pl = r.read({ms.ROUND, ms.PAGES, ms.STATE, ms.DIRTYMAP, ms.DONE, ms.ABORT,
                                ms.SYNC})
            seq = r.seq - 1
            if mtype == ms.SYNC:
                # everything before it is applied: say so (the source pauses after this)
                w.send_json(ms.SYNCED, r.read_json(mtype, pl))
            elif mtype == ms.ROUND:
                rd = r.read_json(mtype, pl)
                if rd["round"] != next_round or final_seen:
                    raise ms.StreamError(f"ROUND {rd['round']} out of order (expected "
                                         f"{next_round})")
                if rd["final"] and postcopy:
                    raise ms.StreamError("a post-copy stream has no final pre-copy round")
                next_round += 1
                final_seen = rd["final"]
            elif mtype == ms.PAGES:
                if next_round == 0:
                    raise ms.StreamError("PAGES before the first ROUND")
                pages_rx += self._apply_pages(pl, seq)
            elif mtype == ms.STATE:
                vcpu, blob = ms.decode_state(pl, lib.vlab_vcpu_state_size(), seq)
                if vcpu >= len(self.vcpus) or vcpu in states:
                    raise ms.StreamError(f"STATE for vCPU {vcpu} unexpected")
                states[vcpu] = blob
            elif mtype == ms.DIRTYMAP:
                if not postcopy:
                    raise ms.StreamError("DIRTYMAP in a pre-copy stream")
                slot, n, bm = ms.decode_dirtymap(pl, seq)
                if slot >= len(self.slots) or n != self.slots[slot].pages or slot in maps:
                    raise ms.StreamError(f"DIRTYMAP for slot {slot} ({n} pages) does not match "
                                         f"the layout")
                maps[slot] = bits_to_index(bm.copy(), n)
            elif mtype == ms.ABORT:
                raise SourceAborted(f"source aborted the migration: "
                                    f"{r.read_json(mtype, pl)['reason']}")
            else:
                done = r.read_json(mtype, pl)
                break
        if len(states) != len(self.vcpus):
            raise ms.StreamError(f"DONE before the state of every vCPU ({len(states)} of "
                                 f"{len(self.vcpus)})")
        if done["pages_sent"] != pages_rx or done["messages"] != r.seq - 1:
            raise ms.StreamError(f"DONE says {done['pages_sent']} pages in {done['messages']} "
                                 f"messages; received {pages_rx} in {r.seq - 1}")
        if postcopy:
            if len(maps) != len(self.slots):
                raise ms.StreamError("post-copy DONE before a DIRTYMAP for every slot")
            for i, s in enumerate(self.slots):
                have = self.received[i].copy()
                have[maps[i].astype(np.int64)] = False
                lacking = s.pages - int(have.sum()) - len(maps[i])
                if lacking:
                    raise ms.StreamError(f"slot {i}: {lacking} pages neither received nor in "
                                         f"the DIRTYMAP")
        else:
            if not final_seen:
                raise ms.StreamError("DONE before the final round")
            for i, rec in enumerate(self.received):
                if not rec.all():
                    raise ms.StreamError(f"DONE but {int((~rec).sum())} pages of slot {i} "
                                         f"never arrived")
        self.status["pages_received"] = pages_rx
        self.status["rounds"] = done["rounds"]
        self._tsc(hello["tsc_khz"])
        for i, v in enumerate(self.vcpus):
            v.load_state(states[i])
        self.maps = maps
        return {"hello": hello, "done": done}

    def _tsc(self, khz: int) -> None:
        from vlab.vmm._native import lib

        mine = self.vcpus[0].tsc_khz
        self.status["tsc_khz"] = {"source": khz, "destination": mine}
        if mine == khz:
            return
        if not self.kvm.check_cap("TSC_CONTROL"):
            raise ms.StreamError(f"source TSC runs at {khz} kHz, this host's at {mine} kHz, and "
                                 f"KVM_CAP_TSC_CONTROL is missing to scale it")
        for v in self.vcpus:
            if lib.vlab_vcpu_set_tsc_khz(v._ptr(), khz) < 0:
                from vlab.vmm.kvm import _raise_last
                _raise_last()

    # ---- post-copy ----
    def _postcopy_setup(self) -> None:
        """Register guest memory (all of it still missing) with userfaultfd."""
        from vlab.vmm._native import ffi, lib

        feats = ffi.new("uint64_t *")
        fd = lib.vlab_uffd_open(0, feats)
        if fd < 0:
            from vlab.vmm.kvm import _raise_last
            _raise_last()
        self._uffd = fd
        io = ffi.new("uint64_t *")
        self.valid, self.installed, self.requested = [], [], []
        for i, s in enumerate(self.slots):
            if lib.vlab_uffd_register(fd, lib.vlab_slot_hva(s._h), s.size, io) < 0:
                from vlab.vmm.kvm import _raise_last
                _raise_last()
            ok = self.received[i].copy()
            ok[self.maps[i].astype(np.int64)] = False
            self.valid.append(ok)
            self.installed.append(np.zeros(s.pages, dtype=bool))
            self.requested.append(np.zeros(s.pages, dtype=np.int64))
        self.fault_ns: list[int] = []
        self.local_fault_ns: list[int] = []
        self.faults_seen = 0
        self._left = sum(s.pages for s in self.slots)
        self._net_left = int(sum(len(m) for m in self.maps.values()))
        self._pc_lock = threading.Lock()
        self._pc_done = threading.Event()
        self._net_done = threading.Event()
        self._local_done = threading.Event()
        self._pc_error: BaseException | None = None

    def _uffd_install(self, slot: int, first: int, count: int, src) -> int:
        """UFFDIO_COPY pages [first, first+count) of `slot` from `src` (count pages); skips
        pages someone else installed meanwhile. Returns the pages this call installed."""
        from vlab.vmm._native import ffi, lib

        hva = int(ffi.cast("uintptr_t", lib.vlab_slot_hva(self.slots[slot]._h)))
        copied = ffi.new("uint64_t *")
        done = off = 0
        while off < count:
            rc = lib.vlab_uffd_copy(self._uffd, ffi.cast("void *", hva + (first + off) * PAGE),
                                    src + off * PAGE, (count - off) * PAGE, copied)
            if rc < 0:
                from vlab.vmm.kvm import _raise_last
                _raise_last()
            n = copied[0] // PAGE
            if n:
                a, b = first + off, first + off + n
                with self._pc_lock:
                    fresh = int(np.count_nonzero(~self.installed[slot][a:b]))
                    self.installed[slot][a:b] = True
                    self._left -= fresh
                done += n
                off += n
            if rc == 1:
                lib.vlab_uffd_wake(self._uffd, ffi.cast("void *", hva + (first + off) * PAGE),
                                   PAGE)
                off += 1                    # that page is already there
        return done

    def _local_loop(self) -> None:
        """Install every valid staged page, in runs, while the guest runs."""
        from vlab.vmm._native import ffi

        try:
            for i, ok in enumerate(self.valid):
                src = ffi.from_buffer(self.stage[i])
                idx = np.flatnonzero(ok)
                if not idx.size:
                    continue
                breaks = np.flatnonzero(np.diff(idx) != 1)
                starts = np.concatenate([[idx[0]], idx[breaks + 1]])
                ends = np.concatenate([idx[breaks], [idx[-1]]])
                for a, b in zip(starts.tolist(), ends.tolist()):
                    for c in range(a, b + 1, 512):      # 2 MiB at a time: faults get a turn
                        n = min(512, b + 1 - c)
                        self._uffd_install(i, c, n, src + c * PAGE)
                    if self._pc_error is not None:
                        return
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self._pc_error = e
        finally:
            self._local_done.set()

    def _fault_loop(self, w: ms.Writer) -> None:
        """Serve userfaultfd faults: valid staged pages at once, others by a request."""
        from vlab.vmm._native import ffi, lib

        addrs = ffi.new("uint64_t[64]")
        bases = [(int(ffi.cast("uintptr_t", lib.vlab_slot_hva(s._h))), s.size) for s in self.slots]
        try:
            while not self._pc_done.is_set():
                n = lib.vlab_uffd_read(self._uffd, 50, addrs, 64)
                if n < 0:
                    from vlab.vmm.kvm import _raise_last
                    _raise_last()
                want: dict[int, list[int]] = {}
                for k in range(n):
                    a = addrs[k]
                    now = time.monotonic_ns()
                    for i, (b, size) in enumerate(bases):
                        if not b <= a < b + size:
                            continue
                        p = (a - b) // PAGE
                        self.faults_seen += 1
                        with self._pc_lock:
                            state = ("installed" if self.installed[i][p] else
                                     "local" if self.valid[i][p] else
                                     "asked" if self.requested[i][p] else "fetch")
                            if state == "fetch":
                                self.requested[i][p] = now
                        if state == "installed":
                            lib.vlab_uffd_wake(self._uffd, ffi.cast("void *", b + p * PAGE), PAGE)
                        elif state == "local":
                            self._uffd_install(i, p, 1, ffi.from_buffer(self.stage[i]) + p * PAGE)
                            self.local_fault_ns.append(time.monotonic_ns() - now)
                        elif state == "fetch":
                            want.setdefault(i, []).append(p)
                        break
                for i, ps in want.items():
                    for a0 in range(0, len(ps), ms.MAX_REQ):
                        w.send(ms.REQ, *ms.encode_req(i, np.asarray(ps[a0:a0 + ms.MAX_REQ],
                                                                     dtype=np.uint64)))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self._pc_error = e
            self._net_done.set()
            self._local_done.set()

    def _net_loop(self, r: ms.Reader, w: ms.Writer) -> None:
        """Install the pages the source sends (requested or pushed) until POSTDONE, crediting
        the source after every message."""
        from vlab.vmm._native import ffi, lib

        total = 0
        try:
            while True:
                mtype, pl = r.read({ms.PAGES, ms.POSTDONE})
                seq = r.seq - 1
                if mtype == ms.POSTDONE:
                    r.read_json(mtype, pl)
                    with self._pc_lock:
                        missing = int(sum(int(np.count_nonzero(~inst[m.astype(np.int64)]))
                                          for inst, m in zip(self.installed,
                                                             (self.maps[i] for i in
                                                              range(len(self.slots))))))
                    if missing:
                        raise ms.StreamError(f"POSTDONE but {missing} pages never arrived")
                    return
                slot, flags, idx, hashes, data = ms.decode_pages(pl, seq)
                if slot >= len(self.slots) or int(idx.max()) >= self.slots[slot].pages:
                    raise ms.StreamError(f"PAGES message #{seq} outside the layout")
                if self.valid[slot][idx.astype(np.int64)].any():
                    raise ms.StreamError(f"PAGES message #{seq} resends a page the destination "
                                         f"already holds")
                got = np.empty(len(idx), dtype=np.uint64)
                lib.vlab_mem_buffer_hashes(ffi.from_buffer(data), len(idx),
                                           ffi.from_buffer("uint64_t[]", got))
                bad = np.flatnonzero(got != hashes)
                if bad.size:
                    raise ms.StreamError(f"PAGES message #{seq}: page {int(idx[bad[0]])} of slot "
                                         f"{slot} arrived corrupted (hash mismatch)")
                src = ffi.from_buffer(data)
                ii = idx.astype(np.int64)
                cuts = np.flatnonzero(np.diff(ii) != 1) + 1
                for k0, k1 in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ii)]):
                    self._uffd_install(slot, int(ii[k0]), k1 - k0, src + k0 * PAGE)
                now = time.monotonic_ns()
                with self._pc_lock:
                    self.hashes[slot][ii] = got
                    t_req = self.requested[slot][ii]
                self.fault_ns.extend((now - t_req[t_req > 0]).tolist())
                total += len(idx)
                w.send(ms.CREDIT, ms.encode_credit(total))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self._pc_error = e
            self._local_done.set()
        finally:
            self._net_done.set()

    # ---- the whole destination side ----
    def serve(self, sock: socket.socket) -> dict:
        """Receive, resume after GO, report. Returns the status (also on failure)."""
        sock.settimeout(self.io_timeout)
        st = self.status
        runner: GuestRunner | None = None
        r, w = ms.Reader(sock, "source"), ms.Writer(sock)
        try:
            info = self.receive(r, w)
            postcopy = info["hello"]["strategy"] == "postcopy"
            if postcopy:
                self._postcopy_setup()
            w.send_json(ms.READY, {"pages_received": st["pages_received"]})
            mtype, pl = r.read({ms.GO, ms.ABORT})
            if mtype == ms.ABORT:
                raise SourceAborted(f"source aborted at the switch-over: "
                                    f"{r.read_json(mtype, pl)['reason']}")
            r.read_json(mtype, pl)
            threads = []
            if postcopy:
                threads = [threading.Thread(target=self._fault_loop, args=(w,), daemon=True,
                                            name="uffd-faults"),
                           threading.Thread(target=self._net_loop, args=(r, w), daemon=True,
                                            name="uffd-fetched"),
                           threading.Thread(target=self._local_loop, daemon=True,
                                            name="uffd-staged")]
                for t in threads:
                    t.start()
            vcpu = self.vcpus[0]
            vcpu.record_marks(64)
            # tell the guest it moved. In post-copy the parameter page may still be missing:
            # touch it from C (Python's lock released), never from Python, or the thread that
            # serves the fault could not run
            from vlab.vmm._native import ffi, lib

            gen = lib.vlab_mem_add_u64(ffi.from_buffer(self.vm.hva(
                lib.VLAB_GPA_PARAMS + 8 * (16 + A_GEN), 8)), 1)
            st["generation"] = int(gen)
            runner = GuestRunner(vcpu)
            t_resume = time.monotonic_ns()
            runner.start()
            st["guest_resumed"] = True
            mark_ns = 0
            deadline = time.monotonic() + min(self.io_timeout, 30)
            while time.monotonic() < deadline and not runner.finished:
                marks = vcpu.marks()
                if len(marks):
                    mark_ns = int(marks[0])
                    break
                time.sleep(0.0005)
            if not mark_ns:
                if runner.error is not None:
                    raise runner.error
                raise VlabError("the resumed guest did not mark its first steps within 30 s")
            w.send_json(ms.ACK, {"mark_ns": mark_ns, "boot_id": boot_id(),
                                 "resumed_ns": t_resume, "pid": os.getpid()})
            st["first_mark_after_resume_ms"] = (mark_ns - t_resume) / 1e6
            if postcopy:
                limit = time.monotonic() + self.io_timeout * 10
                for ev in (self._net_done, self._local_done):
                    ev.wait(max(0.0, limit - time.monotonic()))
                if self._pc_error is not None:
                    raise self._pc_error
                if self._left:
                    raise VlabError(f"post-copy did not complete: {self._left} pages missing")
                self._pc_done.set()
                for t in threads:
                    t.join(5)
                self.stage = None
                st["demand_faults"] = len(self.fault_ns)
                st["local_faults"] = len(self.local_fault_ns)
                st["uffd_fault_events"] = self.faults_seen
                st["fault_latency_ms"] = _stats_ms(self.fault_ns)
                st["local_fault_latency_ms"] = _stats_ms(self.local_fault_ns)
                st["postcopy_complete_after_resume_ms"] = (time.monotonic_ns() - t_resume) / 1e6
            for i, h in enumerate(self.hashes):
                for a in range(0, len(h), ms.MAX_HASHES):
                    w.send(ms.HASHES, *ms.encode_hashes(i, a, h[a:a + ms.MAX_HASHES]))
            # let the guest run here, then have it check itself
            left = self.run_after - (time.monotonic_ns() - t_resume) / 1e9
            if left > 0:
                time.sleep(left)
            if runner.finished:
                raise runner.error or VlabError(f"guest stopped on its own: {runner.stop_reason}")
            p = params_view(self.vm)            # every page is present by now
            p[16 + A_STOP] = 1
            guest_err = None
            try:
                runner.wait_done(120)
                rep = read_report(self.vm)
            except VlabError as e:
                guest_err = _one_line(e)
                rep = {}
            st["guest"] = rep
            st["vcpu_runs"] = vcpu.counters()["runs"]
            w.send_json(ms.REPORT, {"guest": rep, "error": guest_err,
                                    "status": {k: v for k, v in st.items() if k != "guest"}})
            try:
                mtype, pl = r.read({ms.FIN})
                r.read_json(mtype, pl)
            except ms.PeerGone:
                pass
            st["status"] = "ok" if guest_err is None else "error"
            st["reason"] = guest_err
        except SourceAborted as e:
            st["status"], st["reason"] = "aborted", _one_line(e)
        except (ms.StreamError, OSError, VlabError) as e:
            st["status"], st["reason"] = "error", _one_line(e)
            if not isinstance(e, ms.PeerGone):
                try:
                    w.send_json(ms.ERROR, {"reason": st["reason"]})
                except (ms.StreamError, OSError):
                    pass
        finally:
            if runner is not None:
                runner.quit(2)
            if self.vcpus:
                try:
                    st["vcpu_runs"] = self.vcpus[0].counters()["runs"]
                except VlabError:
                    pass
            self.close()
        return st

    def close(self) -> None:
        if self._uffd >= 0:
            if hasattr(self, "_pc_done"):
                self._pc_done.set()
            os.close(self._uffd)
            self._uffd = -1
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


def _version() -> str:
    from vlab import __version__

    return __version__


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ====================================================================== processes

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
           io_timeout: float = 30.0, max_mem: int | None = None, announce=None,
           psk: bytes | None = None) -> dict:
    """Destination: accept one connection on `addr`, receive and run the guest; the status.
    With `psk` the source must authenticate first (vlab.migration.auth)."""
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
        # ---- auth hook (vlab/migration/auth.py): no VM exists before the peer is accepted ----
        from vlab.migration.auth import AuthError, authenticate_destination, host_record
        try:
            auth = authenticate_destination(conn, psk, host_record=host_record,
                                            timeout=io_timeout)
        except AuthError as e:
            return {"status": "refused", "reason": _one_line(e), "guest_resumed": False,
                    "vcpu_runs": 0, "vm_created": False, "peer": f"{peer[0]}:{peer[1]}"}
        # ---- end auth hook ----
        dest = Destination(run_after=run_after, max_mem=max_mem, io_timeout=io_timeout)
        st = dest.serve(conn)
        st["peer"] = f"{peer[0]}:{peer[1]}"
        st["auth"] = auth
        return st


def connect(addr: str, timeout: float = 10.0) -> socket.socket:
    host, port = parse_addr(addr, listen=False)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise VlabError(f"cannot connect to the destination {host}:{port}: "
                        f"{e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


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


def run_source(addr: str, cfg: RunConfig) -> dict:
    """Source process: build and start the guest, warm up, (trace), migrate to `addr`."""
    cfg.opts.validate()
    src = Source(cfg.spec, cfg.opts)
    try:
        src.start()
        time.sleep(max(cfg.warmup_s, 0))
        trace_info: dict[str, Any] = {}
        if cfg.trace_s > 0:
            secs = cfg.trace_s
            if cfg.opts.bandwidth:
                # the model loops the trace; for a window longer than the trace that would
                # repeat pages instead of finding new ones, so cover round 0 at least
                secs = max(secs, min(60.0, 1.15 * src.n_pages * (PAGE + 16) / cfg.opts.bandwidth))
            tr = src.record_trace(secs, cfg.trace_interval_ms)
            trace_info["trace_s"] = secs
            trace_info["trace_interval_ms"] = cfg.trace_interval_ms
            trace_info.update({"trace_writes_per_s": tr["writes_per_s"],
                               "trace_dirty_pages_per_s": tr["dirty_pages_per_s"],
                               "trace_intervals": int(len(tr["interval_ns"]))})
            if cfg.trace_out:
                _save_trace(cfg.trace_out, tr)
        w0, t0 = src.writes_so_far(), time.monotonic()
        sock = connect(addr)
        with sock:
            # ---- auth hook (vlab/migration/auth.py): prove and check the key first ----
            from vlab.migration.auth import authenticate_source, load_key
            peer = authenticate_source(sock, load_key(cfg.psk_file) if cfg.psk_file else None,
                                       timeout=cfg.opts.io_timeout)
            # ---- end auth hook ----
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
                res["source_guest_problems"] = [_one_line(e)]
        del w0, t0
        return res
    finally:
        src.close()


def _save_trace(path: str, tr: dict) -> None:
    from vlab.analysis.dirty import DirtyTrace

    DirtyTrace(tr["n_pages"], PAGE, tr["interval_ns"], tr["bitmaps"]).save(path)


def run_local(cfg: RunConfig, *, run_after: float = 1.0, timeout: float = 600.0,
              host: str = "127.0.0.1", model: bool = True) -> dict:
    """Migrate on this machine between two fresh processes (destination and source) over
    `host` (loopback by default); the source's result with the destination's status and, when
    a trace was recorded, the pre-copy model's prediction for the same workload and link."""
    if cfg.opts.strategy == "postcopy":
        why = uffd_status()
        if why:
            raise MissingFeature(f"post-copy cannot run here: {why}")
    tmp = tempfile.mkdtemp(prefix="vlab-migrate-")
    trace_path = os.path.join(tmp, "trace.npz")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    dst = subprocess.Popen([sys.executable, "-m", "vlab.migration.session", "--listen", f"{host}:0",
                            "--run-after", str(run_after), "--json",
                            "--io-timeout", str(cfg.opts.io_timeout),
                            *(["--psk-file", cfg.psk_file] if cfg.psk_file else [])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    src = None
    try:
        line = _read_line(dst, 60)
        if not line.startswith("LISTENING "):
            err = dst.stderr.read() if dst.poll() is not None else ""
            raise VlabError(f"destination did not start: {line.strip() or err.strip()[-300:]}")
        addr = line.split()[1]
        argv = [sys.executable, "-m", "vlab.migration.session", "--to", addr, "--json",
                "--no-results", *_source_argv(cfg)]
        if cfg.trace_s > 0:
            argv += ["--trace-s", str(cfg.trace_s), "--trace-interval-ms",
                     str(cfg.trace_interval_ms), "--trace-out", trace_path]
        src = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
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
            raise VlabError(f"source failed: {s_err.strip().splitlines()[-1] if s_err.strip() else 'no output'}")
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
        try:
            if os.path.exists(trace_path):
                os.unlink(trace_path)
            os.rmdir(tmp)
        except OSError:
            pass


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


def _source_argv(cfg: RunConfig) -> list[str]:
    s, o = cfg.spec, cfg.opts
    argv = ["--workload", s.workload, "--mem", str(s.mem), "--rate", str(s.rate),
            "--seed", str(s.seed), "--lag-us", str(s.lag_us), "--backing", s.backing,
            "--strategy", o.strategy, "--mode", o.mode, "--max-downtime-ms",
            str(o.max_downtime_ms), "--max-rounds", str(o.max_rounds), "--policy", o.policy,
            "--postcopy-rounds", str(o.postcopy_rounds), "--io-timeout", str(o.io_timeout),
            "--warmup-s", str(cfg.warmup_s)]
    if s.ws is not None:
        argv += ["--ws", str(s.ws)]
    if o.bandwidth:
        argv += ["--bandwidth", str(o.bandwidth * 8)]
    if o.auto_converge:
        argv += ["--auto-converge"]
    if cfg.psk_file:
        argv += ["--psk-file", cfg.psk_file]
    return argv


def _read_line(p: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


def _last_json(text: str) -> dict | None:
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


# ====================================================================== command line

def config_from_args(args: argparse.Namespace) -> RunConfig:
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

    from vlab.cli import _Parser

    faulthandler.register(signal.SIGUSR1)     # `kill -USR1 PID`: every thread's stack, stderr
    p = _Parser(prog="vlab migrate", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
        return run_cli(args)
    except UsageError as e:
        print(f"vlab migrate: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlab migrate: interrupted", file=sys.stderr)
        return 130


def run_cli(args: argparse.Namespace) -> int:
    """Run what the parsed arguments ask; print the result; the exit code."""
    from vlab.migration.auth import listen_key
    if args.listen:
        def announce(a: str) -> None:
            print(f"LISTENING {a}", flush=True)
        st = listen(args.listen, run_after=args.run_after, accept_timeout=args.accept_timeout,
                    io_timeout=args.io_timeout, announce=announce,
                    psk=listen_key(args, parse_addr(args.listen, listen=True)[0]))
        print(json.dumps(st, default=_jsonable) if args.json else
              f"destination: {st['status']}" + (f" ({st['reason']})" if st.get("reason") else ""),
              flush=True)
        if st["status"] != "ok":
            print(f"vlab migrate: destination: {st['reason']}", file=sys.stderr)
            return 1
        return 0
    cfg = config_from_args(args)
    try:
        if args.to:
            res = run_source(args.to, cfg)
        else:
            res = run_local(cfg, run_after=args.run_after)
    except (VlabError, OSError) as e:
        print(f"vlab migrate: {_one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(res, default=_jsonable) if args.json else format_result(res), flush=True)
    from vlab.migration.record import write_results     # `vlab migrate`'s results file
    write_results(args, res, cfg)
    ok = res.get("outcome") == "aborted" or (res.get("outcome") in
                                             ("converged", "max_rounds_stop_copy", "postcopy")
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


if __name__ == "__main__":
    sys.exit(main())
