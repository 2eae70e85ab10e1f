"""Post-copy: the guest resumes on the destination before its memory has arrived, and every page
it lacks is fetched when first touched.

Both ends live here. The source (`push_missing`) pushes every missing page, pages the
destination asks for first, with a small window of pushed pages in flight so that a demand
fetch never queues behind megabytes of background pages. The destination (`PostcopyReceiver`)
registers guest memory with userfaultfd: a fault (the guest's, through KVM, or the VMM's own)
on a page staged by an earlier pre-copy round is served from the staging area at once, any
other becomes a request to the source; arriving pages are checked against their hashes and
installed with UFFDIO_COPY, and the latency of every demand fault is recorded.

Without userfaultfd the strategy cannot run (`uffd_status` says why): a read-only slot would
only trap writes and the guest would read stale pages, so it is not a correct fallback.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
import time
from typing import Callable

import numpy as np

from vlab._errors import VlabError
from vlab.migration import stream as ms
from vlab.vmm.memory import MemorySlot
from vlab.vmm.migration import Userfaultfd, buffer_hashes, uffd_probe

POSTCOPY_WINDOW = 128                # pushed pages in flight (512 KiB: ~2 ms at 2 Gbit/s)
BACKGROUND_BATCH = 16                # pages per background PAGES message


class MissingFeature(VlabError):
    """This host lacks what a strategy needs (post-copy: userfaultfd); the text says what."""


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
    failed = uffd_probe()
    if failed is None:
        return None
    err, op = failed
    try:
        with open(os.path.join(root, "proc/sys/vm/unprivileged_userfaultfd")) as f:
            unpriv: str | None = f.read()
    except OSError:
        unpriv = None
    return uffd_reason(err, op, unprivileged=unpriv, euid=os.geteuid(),
                       dev_exists=os.path.exists(os.path.join(root, "dev/userfaultfd")))


def stats_ms(values_ns: list[int]) -> dict:
    """n, median, p90, p99, max and mean of latencies given in ns, in ms."""
    if not values_ns:
        return {"n": 0}
    a = np.asarray(values_ns, dtype=np.float64) / 1e6
    return {"n": int(a.size), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


# ====================================================================== source

def push_missing(send: Callable[[int, np.ndarray, int], None], slot_pages: list[int],
                 missing: list[np.ndarray], events: queue.Queue, w: ms.Writer,
                 io_timeout: float) -> dict:
    """Source: send every page of `missing` (per slot), demand requests first, with at most
    `POSTCOPY_WINDOW` pushed pages in flight (sent, not yet credited as installed), then
    POSTDONE; the post-copy figures of the result.

    `send(slot, idx, flags)` sends pages (flags 1: on demand); `events` brings
    ("req", (slot, pages)), ("credit", n) and ("error", e) from the destination."""
    need = [np.zeros(n, dtype=bool) for n in slot_pages]
    for pos, idx in enumerate(missing):
        need[pos][idx.astype(np.int64)] = True
    cursor = [0] * len(need)
    left = int(sum(int(n.sum()) for n in need))
    demanded = pushed = credited = waits = 0
    t0 = time.monotonic_ns()
    while left:
        full = demanded + pushed - credited >= POSTCOPY_WINDOW
        try:
            # block only when the window is full: a credit or a request wakes us
            kind, item = events.get(timeout=io_timeout) if full else events.get_nowait()
        except queue.Empty:
            if full:
                raise ms.StreamError(f"no credit from the destination within "
                                     f"{io_timeout:g} s") from None
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
                send(slot, idx, 1)
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
            idx = (nz[:BACKGROUND_BATCH] + cursor[pos]).astype(np.uint64)
            need[pos][idx.astype(np.int64)] = False
            send(pos, idx, 0)
            pushed += len(idx)
            left -= len(idx)
            break
    w.send_json(ms.POSTDONE, {"pages_sent": demanded + pushed})
    return {"postcopy_pages": demanded + pushed, "postcopy_demand_served": demanded,
            "postcopy_pushed": pushed, "postcopy_ms": (time.monotonic_ns() - t0) / 1e6,
            "postcopy_window_waits": waits}


# ====================================================================== destination

class PostcopyReceiver:
    """Destination: completes guest memory while the guest runs.

    Guest memory (all of it still missing: pre-copy rounds went to `stage`) is registered with
    userfaultfd at construction. `start` runs three threads: one installs the valid staged
    pages, one serves faults, one installs the pages the source sends; `finish` waits for all
    of memory. `hashes` (per slot) is updated with every page that arrives."""

    def __init__(self, slots: list[MemorySlot], stage: list[np.ndarray],
                 received: list[np.ndarray], maps: dict[int, np.ndarray],
                 hashes: list[np.ndarray]):
        self.slots, self.stage, self.maps, self.hashes = slots, stage, maps, hashes
        self.uffd = Userfaultfd()
        self.valid: list[np.ndarray] = []       # staged and not dirtied since: install locally
        self.installed: list[np.ndarray] = []
        self.requested: list[np.ndarray] = []   # ns of the first request, 0: never asked
        try:
            for i, s in enumerate(slots):
                self.uffd.register(s)
                ok = received[i].copy()
                ok[maps[i].astype(np.int64)] = False
                self.valid.append(ok)
                self.installed.append(np.zeros(s.pages, dtype=bool))
                self.requested.append(np.zeros(s.pages, dtype=np.int64))
        except BaseException:
            self.uffd.close()
            raise
        self.fault_ns: list[int] = []
        self.local_fault_ns: list[int] = []
        self.faults_seen = 0
        self.left = sum(s.pages for s in slots)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._net_done = threading.Event()
        self._local_done = threading.Event()
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def start(self, r: ms.Reader, w: ms.Writer) -> None:
        """Serve faults and install pages, on threads of their own, until `finish`."""
        self._threads = [threading.Thread(target=self._fault_loop, args=(w,), daemon=True,
                                          name="uffd-faults"),
                         threading.Thread(target=self._net_loop, args=(r, w), daemon=True,
                                          name="uffd-fetched"),
                         threading.Thread(target=self._local_loop, daemon=True,
                                          name="uffd-staged")]
        for t in self._threads:
            t.start()

    def finish(self, timeout: float) -> None:
        """Wait until every page is installed (raise what went wrong, or what is missing), then
        stop the threads and drop the staging area."""
        limit = time.monotonic() + timeout
        for ev in (self._net_done, self._local_done):
            ev.wait(max(0.0, limit - time.monotonic()))
        if self._error is not None:
            raise self._error
        if self.left:
            raise VlabError(f"post-copy did not complete: {self.left} pages missing")
        self._done.set()
        for t in self._threads:
            t.join(5)
        self.stage = []

    def figures(self) -> dict:
        """What the destination reports about post-copy (fault counts and latencies)."""
        return {"demand_faults": len(self.fault_ns), "local_faults": len(self.local_fault_ns),
                "uffd_fault_events": self.faults_seen,
                "fault_latency_ms": stats_ms(self.fault_ns),
                "local_fault_latency_ms": stats_ms(self.local_fault_ns)}

    def close(self) -> None:
        self._done.set()
        self.uffd.close()

    # ---- installing ----
    def _install(self, slot: int, first: int, count: int, src, src_page: int = 0) -> int:
        """UFFDIO_COPY pages [first, first+count) of `slot` from `src` (from its page
        `src_page`); skips pages someone else installed meanwhile. Returns the pages this call
        installed."""
        done = off = 0
        while off < count:
            n, exists = self.uffd.copy(slot, first + off, count - off, src, src_page + off)
            if n:
                a, b = first + off, first + off + n
                with self._lock:
                    fresh = int(np.count_nonzero(~self.installed[slot][a:b]))
                    self.installed[slot][a:b] = True
                    self.left -= fresh
                done += n
                off += n
            if exists:
                self.uffd.wake(slot, first + off)
                off += 1                    # that page is already there
        return done

    def _local_loop(self) -> None:
        """Install every valid staged page, in runs, while the guest runs."""
        try:
            for i, ok in enumerate(self.valid):
                src = self.stage[i]
                idx = np.flatnonzero(ok)
                if not idx.size:
                    continue
                breaks = np.flatnonzero(np.diff(idx) != 1)
                starts = np.concatenate([[idx[0]], idx[breaks + 1]])
                ends = np.concatenate([idx[breaks], [idx[-1]]])
                for a, b in zip(starts.tolist(), ends.tolist()):
                    for c in range(a, b + 1, 512):      # 2 MiB at a time: faults get a turn
                        n = min(512, b + 1 - c)
                        self._install(i, c, n, src, c)
                    if self._error is not None:
                        return
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self._error = e
        finally:
            self._local_done.set()

    def _fault_loop(self, w: ms.Writer) -> None:
        """Serve userfaultfd faults: valid staged pages at once, others by a request."""
        try:
            while not self._done.is_set():
                want: dict[int, list[int]] = {}
                for i, p in self.uffd.read(50):
                    now = time.monotonic_ns()
                    self.faults_seen += 1
                    with self._lock:
                        state = ("installed" if self.installed[i][p] else
                                 "local" if self.valid[i][p] else
                                 "asked" if self.requested[i][p] else "fetch")
                        if state == "fetch":
                            self.requested[i][p] = now
                    if state == "installed":
                        self.uffd.wake(i, p)
                    elif state == "local":
                        self._install(i, p, 1, self.stage[i], p)
                        self.local_fault_ns.append(time.monotonic_ns() - now)
                    elif state == "fetch":
                        want.setdefault(i, []).append(p)
                for i, ps in want.items():
                    for a0 in range(0, len(ps), ms.MAX_REQ):
                        w.send(ms.REQ, *ms.encode_req(i, np.asarray(ps[a0:a0 + ms.MAX_REQ],
                                                                     dtype=np.uint64)))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self._error = e
            self._net_done.set()
            self._local_done.set()

    def _net_loop(self, r: ms.Reader, w: ms.Writer) -> None:
        """Install the pages the source sends (requested or pushed) until POSTDONE, crediting
        the source after every message."""
        total = 0
        try:
            while True:
                mtype, pl = r.read({ms.PAGES, ms.POSTDONE})
                seq = r.seq - 1
                if mtype == ms.POSTDONE:
                    r.read_json(mtype, pl)
                    with self._lock:
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
                got = buffer_hashes(data, len(idx))
                bad = np.flatnonzero(got != hashes)
                if bad.size:
                    raise ms.StreamError(f"PAGES message #{seq}: page {int(idx[bad[0]])} of slot "
                                         f"{slot} arrived corrupted (hash mismatch)")
                ii = idx.astype(np.int64)
                cuts = np.flatnonzero(np.diff(ii) != 1) + 1
                for k0, k1 in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ii)]):
                    self._install(slot, int(ii[k0]), k1 - k0, data, k0)
                now = time.monotonic_ns()
                with self._lock:
                    self.hashes[slot][ii] = got
                    t_req = self.requested[slot][ii]
                self.fault_ns.extend((now - t_req[t_req > 0]).tolist())
                total += len(idx)
                w.send(ms.CREDIT, ms.encode_credit(total))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self._error = e
            self._local_done.set()
        finally:
            self._net_done.set()
