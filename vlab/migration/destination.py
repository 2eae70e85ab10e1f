"""The destination of a live migration: receives one guest, resumes it only after the source's
GO, and reports on it.

The stream (vlab/migration/stream.py) is checked message by message: HELLO (protocol, page
size, vCPU state size, TSC rate, userfaultfd for post-copy), LAYOUT (bounded slots, vCPUs and
memory), rounds of pages (each page's hash checked as it lands), the vCPU state, DONE (its
counts must match what arrived, and every page must be there, or named in the post-copy
DIRTYMAP). Anything malformed, truncated or out of order makes the destination discard the VM
and report a one-line reason; it never resumes a partial guest.

After GO the guest runs here: the destination tells it that it moved, waits for its first MARK
(whose time is the end of the downtime), answers ACK and the hash of every page as the final
round left it, lets the guest run `run_after` seconds, then has it check itself and sends its
REPORT. In post-copy, `PostcopyReceiver` completes memory while the guest runs.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np

from vlab._argparse import one_line
from vlab._errors import KvmError, VlabError
from vlab.migration import stream as ms
from vlab._bits import bitmap_pages
from vlab.migration.guest import A_GEN, A_STOP, PAGE, params_view, read_report
from vlab.vmm.thread import VcpuThread
from vlab.migration.options import STRATEGIES
from vlab.migration.postcopy import PostcopyReceiver, uffd_status
from vlab.vmm import BACKINGS, Kvm, Vm
from vlab.vmm.migration import add_u64, scatter_pages, set_tsc_khz, vcpu_state_size
from vlab.vmm.payloads import GPA_PARAMS

PROTOCOL = ms.VERSION


class SourceAborted(ms.StreamError):
    """The source cancelled the migration (its non-convergence policy, or its own failure)."""


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (1 GiB if unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


class Destination:
    """Receives one guest, resumes it after GO, and reports. Never resumes a partial guest."""

    def __init__(self, *, run_after: float = 1.0, max_mem: int | None = None,
                 io_timeout: float = 30.0):
        self.run_after = run_after
        self.max_mem = max_mem
        self.io_timeout = io_timeout
        self.vm: Vm | None = None
        self.kvm: Kvm | None = None
        self.slots: list = []
        self.vcpus: list = []
        self.postcopy = False
        self.stage: list[np.ndarray] | None = None
        self.status: dict[str, Any] = {"status": None, "reason": None, "guest_resumed": False,
                                       "vcpu_runs": 0}
        self.pc: PostcopyReceiver | None = None

    # ---- building the guest from the stream ----
    def _check_hello(self, h: dict) -> None:
        if h["protocol"] != PROTOCOL:
            raise ms.StreamError(f"source speaks protocol {h['protocol']}, this vlab {PROTOCOL}")
        if h["strategy"] not in STRATEGIES:
            raise ms.StreamError(f"unknown strategy {h['strategy']!r} in HELLO")
        if h["page_size"] != PAGE:
            raise ms.StreamError(f"page size {h['page_size']} (only {PAGE} is supported)")
        if h["state_size"] != vcpu_state_size():
            raise ms.StreamError(f"vCPU state of {h['state_size']} bytes; this vlab's is "
                                 f"{vcpu_state_size()} (different vlab build)")
        if h["tsc_khz"] <= 0:
            raise ms.StreamError("HELLO carries no TSC frequency")
        if h["strategy"] == "postcopy":
            why = uffd_status()
            if why:
                raise ms.StreamError(f"post-copy needs userfaultfd: {why}")

    def _check_layout(self, layout: dict) -> int:
        """Refuse a LAYOUT that is malformed or does not fit here; its bytes of guest memory."""
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
        limit = self.max_mem if self.max_mem is not None else mem_available() * 9 // 10
        need = total * (2 if self.postcopy else 1)      # post-copy stages pre-copied pages
        if need > limit:
            raise ms.StreamError(f"LAYOUT needs {need >> 20} MiB here for {total >> 20} MiB of "
                                 f"guest memory; this destination allows {limit >> 20} MiB")
        return total

    def _build(self, layout: dict) -> None:
        self._check_layout(layout)
        slots = layout["slots"]
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

    def _apply_pages(self, payload: memoryview, seq: int) -> int:
        slot, flags, idx, hashes, data = ms.decode_pages(payload, seq)
        if slot >= len(self.slots):
            raise ms.StreamError(f"PAGES message #{seq} for slot {slot}, which LAYOUT did not "
                                 f"declare")
        s = self.slots[slot]
        if int(idx.max()) >= s.pages:
            raise ms.StreamError(f"PAGES message #{seq}: page {int(idx.max())} is outside slot "
                                 f"{slot} ({s.pages} pages)")
        target = self.stage[slot] if self.stage is not None else s
        out = scatter_pages(target, s.pages, idx, data)
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
        mtype, pl = r.read({ms.HELLO})
        hello = r.read_json(mtype, pl)
        self._check_hello(hello)
        self.status["strategy"] = hello["strategy"]
        self.postcopy = postcopy = hello["strategy"] == "postcopy"
        mtype, pl = r.read({ms.LAYOUT})
        self._build(r.read_json(mtype, pl))
        states: dict[int, bytes] = {}
        maps: dict[int, np.ndarray] = {}
        next_round, final_seen, pages_rx = 0, False, 0
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
                vcpu, blob = ms.decode_state(pl, vcpu_state_size(), seq)
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
                maps[slot] = bitmap_pages(bm.copy(), n)
            elif mtype == ms.ABORT:
                raise SourceAborted(f"source aborted the migration: "
                                    f"{r.read_json(mtype, pl)['reason']}")
            else:
                done = r.read_json(mtype, pl)
                break
        self._check_done(done, states, maps, pages_rx, r.seq - 1, final_seen)
        self.status["pages_received"] = pages_rx
        self.status["rounds"] = done["rounds"]
        self._tsc(hello["tsc_khz"])
        for i, v in enumerate(self.vcpus):
            v.load_state(states[i])
        self.maps = maps
        return {"hello": hello, "done": done}

    def _check_done(self, done: dict, states: dict, maps: dict, pages_rx: int, messages: int,
                    final_seen: bool) -> None:
        """DONE must close a complete guest: every vCPU's state, the counts it states, and
        every page received (post-copy: received or in the DIRTYMAP)."""
        if len(states) != len(self.vcpus):
            raise ms.StreamError(f"DONE before the state of every vCPU ({len(states)} of "
                                 f"{len(self.vcpus)})")
        if done["pages_sent"] != pages_rx or done["messages"] != messages:
            raise ms.StreamError(f"DONE says {done['pages_sent']} pages in {done['messages']} "
                                 f"messages; received {pages_rx} in {messages}")
        if self.postcopy:
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

    def _tsc(self, khz: int) -> None:
        mine = self.vcpus[0].tsc_khz
        self.status["tsc_khz"] = {"source": khz, "destination": mine}
        if mine == khz:
            return
        if not self.kvm.check_cap("TSC_CONTROL"):
            raise ms.StreamError(f"source TSC runs at {khz} kHz, this host's at {mine} kHz, and "
                                 f"KVM_CAP_TSC_CONTROL is missing to scale it")
        for v in self.vcpus:
            set_tsc_khz(v, khz)

    # ---- running it here ----
    def _wait_first_mark(self, vcpu, runner: VcpuThread) -> int:
        """CLOCK_MONOTONIC ns of the resumed guest's first MARK (the end of the downtime)."""
        deadline = time.monotonic() + min(self.io_timeout, 30)
        while time.monotonic() < deadline and not runner.finished:
            marks = vcpu.marks()
            if len(marks):
                return int(marks[0])
            time.sleep(0.0005)
        if runner.error is not None:
            raise runner.error
        raise VlabError("the resumed guest did not mark its first steps within 30 s")

    def _send_hashes(self, w: ms.Writer) -> None:
        for i, h in enumerate(self.hashes):
            for a in range(0, len(h), ms.MAX_HASHES):
                w.send(ms.HASHES, *ms.encode_hashes(i, a, h[a:a + ms.MAX_HASHES]))

    def _guest_report(self, runner: VcpuThread, t_resume: int) -> tuple[dict, str | None]:
        """Let the guest run `run_after` s after its resume, then have it check itself."""
        left = self.run_after - (time.monotonic_ns() - t_resume) / 1e9
        if left > 0:
            time.sleep(left)
        if runner.finished:
            raise runner.error or VlabError(f"guest stopped on its own: {runner.stop_reason}")
        p = params_view(self.vm)            # every page is present by now
        p[16 + A_STOP] = 1
        try:
            runner.wait_done(120)
            return read_report(self.vm), None
        except VlabError as e:
            return {}, one_line(e)

    # ---- the whole destination side ----
    def serve(self, sock: socket.socket) -> dict:
        """Receive, resume after GO, report. Returns the status (also on failure)."""
        sock.settimeout(self.io_timeout)
        st = self.status
        runner: VcpuThread | None = None
        r, w = ms.Reader(sock, "source"), ms.Writer(sock)
        try:
            info = self.receive(r, w)
            postcopy = info["hello"]["strategy"] == "postcopy"
            if postcopy:
                # register guest memory (all of it still missing) with userfaultfd
                self.pc = PostcopyReceiver(self.slots, self.stage, self.received, self.maps,
                                           self.hashes)
            w.send_json(ms.READY, {"pages_received": st["pages_received"]})
            mtype, pl = r.read({ms.GO, ms.ABORT})
            if mtype == ms.ABORT:
                raise SourceAborted(f"source aborted at the switch-over: "
                                    f"{r.read_json(mtype, pl)['reason']}")
            r.read_json(mtype, pl)
            if self.pc is not None:
                self.pc.start(r, w)
            vcpu = self.vcpus[0]
            vcpu.record_marks(64)
            # tell the guest it moved. In post-copy the parameter page may still be missing:
            # touch it from C (Python's lock released), never from Python, or the thread that
            # serves the fault could not run
            st["generation"] = add_u64(self.vm, GPA_PARAMS + 8 * (16 + A_GEN), 1)
            runner = VcpuThread(vcpu, slice_ms=20)
            t_resume = time.monotonic_ns()
            runner.start()
            st["guest_resumed"] = True
            mark_ns = self._wait_first_mark(vcpu, runner)
            w.send_json(ms.ACK, {"mark_ns": mark_ns, "boot_id": ms.boot_id(),
                                 "resumed_ns": t_resume, "pid": os.getpid()})
            st["first_mark_after_resume_ms"] = (mark_ns - t_resume) / 1e6
            if self.pc is not None:
                self.pc.finish(self.io_timeout * 10)
                self.stage = None
                st.update(self.pc.figures())
                st["postcopy_complete_after_resume_ms"] = (time.monotonic_ns() - t_resume) / 1e6
            self._send_hashes(w)
            rep, guest_err = self._guest_report(runner, t_resume)
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
            st["status"], st["reason"] = "aborted", one_line(e)
        except (ms.StreamError, OSError, VlabError) as e:
            st["status"], st["reason"] = "error", one_line(e)
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
        if self.pc is not None:
            self.pc.close()
            self.pc = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
