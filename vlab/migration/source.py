"""The source of a live migration: a running guest and the state machine that moves it.

`Source.migrate` runs these steps over a connected socket (the stream: vlab/migration/stream.py):

1. hello: HELLO (protocol, strategy, TSC rate, boot id, vCPU state size) and LAYOUT (slots).
2. pre-copy rounds, live (`_precopy_rounds`): round 0 sends every page; each later round sends
   the pages dirtied during the one before. Dirty tracking (vlab/migration/guest.py): bitmap
   (KVM_GET_DIRTY_LOG), clear (manual protection: each batch is re-protected with
   KVM_CLEAR_DIRTY_LOG just before it is copied, so a page written before its copy is not sent
   again) or ring (the dirty ring). The rounds end when the rest can be sent within
   `max_downtime_ms` (at the bandwidth limit, or the measured rate without one: "converged"),
   after `postcopy_rounds` (post-copy; 0: no round at all), or after `max_rounds`: then the
   policy decides, "stop_copy" goes on ("max_rounds_stop_copy"), "abort" cancels and the guest
   runs on here ("aborted", `_abort`). `auto_converge` throttles the guest after each round
   that did not converge (0.2, then +0.1 per round, up to 0.99, like QEMU): its vCPU thread
   sleeps that fraction of every 20 ms.
3. sync (`_sync`): the destination drains its backlog while the guest still runs here, so
   that catching up does not count as downtime.
4. stop-and-copy (`_stop_and_copy`): pause, final harvest, the final round (post-copy: the map
   of pages the destination lacks), the vCPU state, DONE.
5. commit (`_commit`): the destination answers READY once it holds a complete guest; GO hands
   the guest over. In post-copy, the missing pages are then pushed (vlab/migration/postcopy.py).
6. verification (`_verify`): ACK (with the time of the guest's first MARK, the end of the
   downtime), the hash of every page as the destination received it, compared with this
   side's paused memory, then the guest's own REPORT of its invariants.

Failures: before GO, a broken connection or a refusal stops dirty logging and lets the guest run
on here (outcome "failed", guest_running True). After GO the guest belongs to the destination:
with no ACK the outcome is "failed_after_commit" and this copy is never resumed (a guest must
never run twice). `migrate` never raises for the peer's or the stream's failure.
"""
from __future__ import annotations

import functools
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlab._argparse import one_line
from vlab._errors import UsageError, VlabError
from vlab.migration import stream as ms
from vlab._bits import pages_bitmap
from vlab.dirty.tracker import DirtyTracker
from vlab.migration.guest import (A_STOP, A_WS, PAGE, GuestSpec, build_guest, counter_of,
                                  params_view, read_report, report_ok)
from vlab.vmm.thread import VcpuThread
from vlab.migration.options import MigrateOptions
from vlab.migration.postcopy import push_missing
from vlab.vmm.migration import gather_pages, page_hashes, vcpu_state_size

PROTOCOL = ms.VERSION
RING_BYTES = 1 << 20                 # the dirty ring's maximum on the hosts vlab runs on
OUTCOMES = ("converged", "max_rounds_stop_copy", "aborted", "postcopy", "failed",
            "failed_after_commit")


def _version() -> str:
    from vlab import __version__

    return __version__


@dataclass
class _Migration:
    """One migration's state, handed from step to step of `Source.migrate`."""
    w: ms.Writer
    res: dict[str, Any]
    t0: int
    writes0: int
    rounds: list[dict] = field(default_factory=list)
    r: ms.Reader | None = None
    outcome: str | None = None
    sent_ever: list[np.ndarray] = field(default_factory=list)   # pages sent at least once
    pending: list[np.ndarray] = field(default_factory=list)     # dirtied in the last round
    missing: list[np.ndarray] = field(default_factory=list)     # post-copy: to fetch after GO
    pages_sent: int = 0                                          # by the rounds, up to DONE
    paused: bool = False
    committed: bool = False
    t: dict[str, int] = field(default_factory=dict)             # switch-over timestamps (ns)
    inbox: queue.Queue | None = None
    events: queue.Queue | None = None


class Source:
    """A running guest that can be migrated to a destination over a connected socket."""

    def __init__(self, spec: GuestSpec, opts: MigrateOptions):
        opts.validate()
        self.spec, self.opts = spec, opts
        self.machine = build_guest(spec, dirty_ring=RING_BYTES if opts.mode == "ring" else 0)
        self.vm = self.machine.vm
        self.slots = [self.machine.sys, *self.machine.data]
        self.vcpu = self.machine.vcpus[0]
        self.tracker = DirtyTracker(self.vm, opts.mode, slots=self.slots)
        self.runner = VcpuThread(self.vcpu, on_ring_full=self.tracker.on_ring_full, slice_ms=20)
        self.data_gpa = self.machine.data[0].gpa
        self.state_size = vcpu_state_size()
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
            self.tracker.dirty_sets(clear_all=True)
            w0, t_last = self.writes_so_far(), time.monotonic_ns()
            t_first = t_last
            for i in range(k):
                target = t_first + int((i + 1) * interval_ms * 1e6)
                delay = (target - time.monotonic_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                sets = self.tracker.dirty_sets(clear_all=True)
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
        sent = 0
        bp = self.opts.batch_pages
        for pos, idx in enumerate(sets):
            slot = self.slots[pos]
            idx = np.ascontiguousarray(idx, dtype=np.uint64)
            for a in range(0, len(idx), bp):
                chunk = idx[a:a + bp]
                n = len(chunk)
                if clear:
                    self.tracker.clear(pos, chunk)
                gather_pages(slot, chunk, self._buf, self._hbuf)
                w.send_pages(pos, chunk, self._hbuf[:n], self._buf, flags)
                ci = chunk.astype(np.int64)
                prev = self._sent_hash[pos][ci]
                self.resent_unchanged += int(np.count_nonzero((prev != 0) &
                                                              (prev == self._hbuf[:n])))
                self._sent_hash[pos][ci] = self._hbuf[:n]
                sent += n
        return sent

    def _send_one(self, w: ms.Writer, pos: int, idx: np.ndarray, flags: int) -> None:
        """Send pages `idx` of slot `pos` alone (post-copy)."""
        self._send_sets(w, [np.zeros(0, np.uint64)] * pos + [idx], flags=flags)

    def _drop(self, idx: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
        """Fault injection: remove up to n working-set pages (past the counter page and the
        sequence table) from a final-round set, choosing pages whose content really changed
        since they were last sent, so the destination keeps stale copies."""
        ws = int(params_view(self.vm)[16 + A_WS])
        first = 1 + -(-ws * 4 // PAGE)
        cand = idx[idx >= first]
        now = page_hashes(self.slots[1])
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
        res: dict[str, Any] = {"strategy": o.strategy, "mode": o.mode, "policy": o.policy,
                               "bandwidth_Bps": o.bandwidth, "max_downtime_ms": o.max_downtime_ms,
                               "max_rounds": o.max_rounds, "auto_converge": o.auto_converge,
                               "guest_pages": self.n_pages, "outcome": None, "error": None,
                               "verified": False, "guest_running": None}
        m = _Migration(w=ms.Writer(sock, ms.Bucket(o.bandwidth)), res=res,
                       t0=time.monotonic_ns(), writes0=self.writes_so_far())
        res["rounds_detail"] = m.rounds
        try:
            if self.runner.finished:
                raise VlabError(f"guest is not running ({self.runner.stop_reason})")
            self._hello(m)
            m.outcome = self._precopy_rounds(m)
            if m.outcome == "aborted":
                self._abort(m)
            else:
                m.r = ms.Reader(sock, "destination")
                self._sync(m)
                self._stop_and_copy(m)
                self._commit(m)
                post = {}
                if o.strategy == "postcopy":
                    # the resumed guest needs pages before it can even mark its first steps
                    post = push_missing(functools.partial(self._send_one, m.w),
                                        [s.pages for s in self.slots], m.missing, m.events,
                                        m.w, o.io_timeout)
                self._verify(m, post)
        except (ms.StreamError, OSError, VlabError) as e:
            self._fail(m, e)
        self._finish_res(res, m.rounds, m.w)
        return res

    def _hello(self, m: _Migration) -> None:
        """Step 1: who this is (HELLO) and the guest's memory (LAYOUT)."""
        m.w.send_json(ms.HELLO, {"protocol": PROTOCOL, "strategy": self.opts.strategy,
                                 "tsc_khz": self.vcpu.tsc_khz, "boot_id": ms.boot_id(),
                                 "state_size": self.state_size, "page_size": PAGE,
                                 "vlab": _version(), "pid": os.getpid()})
        m.w.send_json(ms.LAYOUT, self._layout())

    def _precopy_rounds(self, m: _Migration) -> str:
        """Step 2: live rounds until the set to send is small enough, post-copy's rounds are
        done, or max_rounds pass; the outcome that ended them."""
        o = self.opts
        m.sent_ever = [np.zeros(s.pages, dtype=bool) for s in self.slots]
        m.pending = [np.zeros(0, dtype=np.uint64) for _ in self.slots]
        if o.strategy == "postcopy" and o.postcopy_rounds == 0:
            return "postcopy"                   # pure post-copy: no round, no tracking
        self.tracker.start()
        to_send = [np.arange(s.pages, dtype=np.uint64) for s in self.slots]
        while True:
            dirty, rate = self._live_round(m, to_send)
            nd = int(sum(len(x) for x in dirty))
            m.pending = dirty
            if o.strategy == "postcopy" and len(m.rounds) >= o.postcopy_rounds:
                return "postcopy"
            if nd * (PAGE + 16) / rate * 1000 <= o.max_downtime_ms:
                return "converged"
            if len(m.rounds) >= o.max_rounds:
                return "aborted" if o.policy == "abort" else "max_rounds_stop_copy"
            to_send = dirty
            if o.auto_converge:
                t = self.runner.throttle
                self.runner.set_throttle(o.throttle_initial if t == 0 else
                                         min(t + o.throttle_step, o.throttle_max))

    def _live_round(self, m: _Migration, to_send: list[np.ndarray]) -> tuple[list[np.ndarray],
                                                                             float]:
        """One live round: send `to_send`, then harvest what the guest dirtied meanwhile.
        Returns that set and the rate to judge convergence by (bytes/s)."""
        w = m.w
        n = int(sum(len(x) for x in to_send))
        tr0, b0 = time.monotonic_ns(), w.bytes
        w.send_json(ms.ROUND, {"round": len(m.rounds), "pages": n, "final": False})
        self._send_sets(w, to_send)
        for pos, idx in enumerate(to_send):
            m.sent_ever[pos][idx.astype(np.int64)] = True
        tr1 = time.monotonic_ns()
        dirty = self.tracker.dirty_sets()
        nd = int(sum(len(x) for x in dirty))
        secs = max((tr1 - tr0) / 1e9, 1e-9)
        rate = self.opts.bandwidth or (w.bytes - b0) / secs
        m.rounds.append({"round": len(m.rounds), "pages": n, "ms": secs * 1000,
                         "bytes": w.bytes - b0, "throttle": self.runner.throttle,
                         "dirtied": nd, "MBps": (w.bytes - b0) / secs / 1e6})
        if self.runner.finished:
            raise self.runner.error or VlabError("guest stopped during the migration")
        return dirty, rate

    def _abort(self, m: _Migration) -> None:
        """The policy "abort": stop tracking, tell the destination; the guest runs on here."""
        self.tracker.stop()
        self.runner.set_throttle(0)
        m.w.send_json(ms.ABORT, {"reason": f"no convergence within {self.opts.max_rounds} "
                                           f"rounds (policy abort)"})
        m.res.update(outcome="aborted", rounds=len(m.rounds),
                     total_ms=(time.monotonic_ns() - m.t0) / 1e6, guest_running=True,
                     downtime_ms=None)

    def _sync(self, m: _Migration) -> None:
        """Step 3: let the destination drain what is still queued in the sockets and in its own
        backlog while the guest still runs here: otherwise that catching-up would count as
        downtime. Whatever the guest dirties meanwhile goes in the final set."""
        t_sync = time.monotonic_ns()
        m.w.send_json(ms.SYNC, {"round": len(m.rounds)})
        mtype, pl = m.r.read({ms.SYNCED, ms.ERROR})
        msg = m.r.read_json(mtype, pl)
        if mtype == ms.ERROR:
            raise ms.StreamError(f"destination failed: {msg['reason']}")
        m.res["sync_ms"] = (time.monotonic_ns() - t_sync) / 1e6

    def _stop_and_copy(self, m: _Migration) -> None:
        """Step 4: pause the guest, send what it dirtied last (post-copy: the map of pages the
        destination lacks), its vCPU state, and DONE."""
        o, w, t = self.opts, m.w, m.t
        t["req"] = time.monotonic_ns()
        t["pause"] = self.runner.pause()
        t["paused"] = time.monotonic_ns()
        m.paused = True
        last = self.tracker.dirty_sets() if self.tracker.active else m.pending
        t["harvest"] = time.monotonic_ns()
        final = [_union(a, b, s.pages) for a, b, s in zip(m.pending, last, self.slots)]
        if o.drop_pages:
            final[1], m.res["dropped_pages"] = self._drop(final[1], o.drop_pages)
        blob = self.vcpu.save_state()
        t["state"] = time.monotonic_ns()
        tf0, bf0 = time.monotonic_ns(), w.bytes
        if o.strategy == "precopy":
            nf = int(sum(len(x) for x in final))
            w.send_json(ms.ROUND, {"round": len(m.rounds), "pages": nf, "final": True})
            self._send_sets(w, final, clear=False)
            m.rounds.append({"round": len(m.rounds), "pages": nf,
                             "ms": (time.monotonic_ns() - tf0) / 1e6, "bytes": w.bytes - bf0,
                             "throttle": 0.0, "dirtied": 0, "final": True})
        else:
            for pos, s in enumerate(self.slots):
                need = np.zeros(s.pages, dtype=bool)
                need[~m.sent_ever[pos]] = True
                need[final[pos].astype(np.int64)] = True
                m.missing.append(np.flatnonzero(need).astype(np.uint64))
                w.send(ms.DIRTYMAP, *ms.encode_dirtymap(pos, s.pages,
                                                        pages_bitmap(m.missing[-1], s.pages)))
        w.send(ms.STATE, *ms.encode_state(0, blob))
        m.pages_sent = int(sum(r["pages"] for r in m.rounds))
        w.send_json(ms.DONE, {"rounds": len(m.rounds), "pages_sent": m.pages_sent,
                              "messages": w.messages, "pause_ns": t["pause"]})
        t["done"] = time.monotonic_ns()
        # off the critical path: the destination is busy checking what it received
        self.tracker.stop()
        self.runner.set_throttle(0)
        m.res["counter_at_pause"] = counter_of(self.vm, self.data_gpa)
        live_s = (t["pause"] - m.t0) / 1e9
        m.res["writes_per_s_while_migrating"] = (self.writes_so_far() - m.writes0) / live_s \
            if live_s > 0 and self.spec.workload == "uniform" else None

    def _commit(self, m: _Migration) -> None:
        """Step 5: READY from the destination, then GO: from here on the guest is the
        destination's. Its later messages are read on a thread of their own."""
        mtype, pl = m.r.read({ms.READY, ms.ERROR})
        m.t["ready"] = time.monotonic_ns()
        msg = m.r.read_json(mtype, pl)
        if mtype == ms.ERROR:
            raise ms.StreamError(f"destination refused the guest: {msg['reason']}")
        m.w.send_json(ms.GO, {})
        m.committed = True
        m.t["go"] = time.monotonic_ns()
        m.inbox, m.events = queue.Queue(), queue.Queue()
        threading.Thread(target=_source_inbox, args=(m.r, m.inbox, m.events),
                         name="migrate-inbox", daemon=True).start()

    def _verify(self, m: _Migration, post: dict) -> None:
        """Step 6: ACK, the destination's page hashes against this paused copy (then torn
        down), the downtime, and the guest's own report from the destination."""
        o, res, t = self.opts, m.res, m.t
        ack, t_ack = _expect(m.inbox, ms.ACK, o.io_timeout, with_time=True)
        hashes = self._collect_hashes(m.inbox, o.io_timeout)
        t_end = time.monotonic_ns()
        # the destination holds the guest: compare, then tear down the source copy
        mismatch, first_bad = 0, None
        for pos, s in enumerate(self.slots):
            bad = np.flatnonzero(page_hashes(s) != hashes[pos])
            if bad.size and first_bad is None:
                first_bad = {"slot": pos, "page": int(bad[0])}
            mismatch += int(bad.size)
        self.close()
        res["guest_running"] = False
        same_host = ack["boot_id"] == ms.boot_id() and bool(ack["boot_id"])
        if same_host and ack["mark_ns"] > 0:
            res["downtime_ms"] = (ack["mark_ns"] - t["pause"]) / 1e6
            res["downtime_method"] = "guest MARK on the destination - last KVM_RUN exit " \
                                     "on the source (same CLOCK_MONOTONIC)"
        else:
            res["downtime_ms"] = (t_ack - t["pause"]) / 1e6
            res["downtime_method"] = "ACK received - pause (upper bound: other host)"
        res["switchover_detail_ms"] = {
            "pause_request_to_stopped": (t["pause"] - t["req"]) / 1e6,
            "stopped_to_paused": (t["paused"] - t["pause"]) / 1e6,
            "final_harvest": (t["harvest"] - t["paused"]) / 1e6,
            "final_set_and_state": (t["state"] - t["harvest"]) / 1e6,
            "final_round_and_state_sent": (t["done"] - t["state"]) / 1e6,
            "destination_checks_and_load": (t["ready"] - t["done"]) / 1e6,
            "ready_to_go": (t["go"] - t["ready"]) / 1e6,
            "go_to_resume": (ack["resumed_ns"] - t["go"]) / 1e6 if same_host else None,
            "resume_to_first_mark": (ack["mark_ns"] - ack["resumed_ns"]) / 1e6}
        res.update(outcome=m.outcome, rounds=len(m.rounds), pages_sent=m.pages_sent,
                   total_ms=(t_end - m.t0) / 1e6, switchover_ms=(t["go"] - t["pause"]) / 1e6,
                   memory_mismatches=mismatch, first_mismatch=first_bad,
                   memory_verified=mismatch == 0, dest=ack, **post)
        rep_msg = _expect(m.inbox, ms.REPORT, o.io_timeout + 120)
        rep = rep_msg["guest"]
        ok, why = report_ok(rep, migrations=1, counter_at_pause=res["counter_at_pause"])
        res["guest_report"] = rep
        res["guest_ok"] = ok and not rep_msg.get("error")
        res["guest_problems"] = why + ([rep_msg["error"]] if rep_msg.get("error") else [])
        res["tsc_step_ms"] = rep["migration_tsc_step"] / self._khz \
            if rep.get("migration_tsc_step") and self._khz else None
        res["verified"] = bool(res["memory_verified"] and res["guest_ok"])
        try:
            m.w.send_json(ms.FIN, {"verified": res["verified"]})
        except ms.StreamError:
            pass

    def _fail(self, m: _Migration, e: BaseException) -> None:
        """The migration failed. Before GO the guest never left: stop logging and let it run
        on here. After GO it is the destination's: this copy stays paused."""
        res = m.res
        res["error"] = one_line(e)
        if not m.committed:
            try:
                self.tracker.stop()
                self.runner.set_throttle(0)
                if m.paused:
                    self.runner.resume()
            finally:
                res["guest_running"] = not self.runner.finished and not self.closed
            res["outcome"] = "failed"
        else:
            res["outcome"] = "failed_after_commit"
            res["guest_running"] = False
        res["rounds"] = len(m.rounds)
        res["total_ms"] = (time.monotonic_ns() - m.t0) / 1e6

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
    """The next message from the inbox, which must be `mtype` (with its arrival time)."""
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
