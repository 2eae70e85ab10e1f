"""The migrating guest: its workloads, the vCPU thread that can be paused and throttled, dirty
tracking (bitmap or ring) and the guest's own report of its invariants.

Used by both ends of a migration (vlab/migration/source.py and destination.py): the source
builds the guest with `build_guest`, runs it with `GuestRunner` and tracks it with
`DirtyTracker`; the destination rebuilds memory from the stream, runs the same vCPU and reads
the same report.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vlab._errors import GuestFailure, GuestFault, GuestTimeout, KvmError, UsageError, VlabError
from vlab.vmm.payloads import P_RESULTS_BASE, P_RESULTS_STRIDE
from vlab.vmm.kvm import STOP_NAMES, MemorySlot, Vcpu, Vm, _check
from vlab.vmm.migration import GPA_PARAMS, GPA_RESULTS, RESULTS_SIZE
from vlab.vmm._native import ffi, lib   # GuestRunner's alone (to become vlab.vmm.thread.VcpuThread)

log = logging.getLogger("vlab.migration.session")

PAGE = 4096
WORKLOADS = {"counter": 0, "uniform": 1}
A_WORKLOAD, A_WS, A_RATE, A_SEED, A_LAG_US, A_STOP, A_GEN = 0, 1, 2, 3, 4, 8, 9
CNT_MAGIC = 0x726574756E756F63
RESULT_MAGIC = 0x544C5345524749
K_MAGIC, K_COUNT, K_CHECK, K_TSC = 0, 1, 2, 3
REPORT_KEYS = ("magic", "workload", "counter", "writes", "pages_checked", "bad_pages",
               "first_bad_page", "seq_sum", "max_tsc_step", "migrations", "migration_tsc_step",
               "generation", "ticks_since_migration")


def ws_pages_for(data_bytes: int, ws: int | None) -> int:
    """Working-set pages of the uniform writer: `ws` bytes, or all the data slot holds after the
    counter page and the sequence table."""
    pages = data_bytes // PAGE
    fit = pages - 1
    # table pages T = ceil(4 W / 4096): largest W with 1 + T + W <= pages
    w = fit * 1024 // 1025
    while 1 + -(-w * 4 // PAGE) + w > pages:
        w -= 1
    if ws is None:
        return w
    want = ws // PAGE
    if want < 1 or want > w:
        raise UsageError(f"working set of {ws} bytes does not fit a {data_bytes}-byte guest "
                         f"(at most {w * PAGE} bytes)")
    return want


@dataclass
class GuestSpec:
    """What the source runs: workload, memory and writer rate."""
    workload: str = "uniform"
    mem: int = 64 << 20            # bytes of the data slot
    ws: int | None = None          # working-set bytes (uniform); None = all of it
    rate: int = 10000              # pages/s (uniform); 0 = as fast as possible
    seed: int = 1
    lag_us: int = 50000            # the writer drops a backlog older than this
    backing: str = "4k"

    def validate(self) -> None:
        if self.workload not in WORKLOADS:
            raise UsageError(f"unknown workload {self.workload!r}; one of "
                             f"{', '.join(WORKLOADS)}")
        if self.mem < 1 << 20 or self.mem % (2 << 20):
            raise UsageError(f"guest memory must be a multiple of 2 MiB, at least 2 MiB "
                             f"(got {self.mem})")
        if self.rate < 0:
            raise UsageError("rate must be >= 0 pages/s")
        if self.backing not in ("4k", "thp", "hugetlb-2m", "hugetlb-1g"):
            raise UsageError(f"backing {self.backing!r} cannot be migrated; use 4k, thp, "
                             f"hugetlb-2m or hugetlb-1g")
        if self.workload == "uniform":
            ws_pages_for(self.mem, self.ws)


def build_guest(spec: GuestSpec, *, dirty_ring: int = 0):
    """A Machine running the migrate payload with `spec`, not yet started."""
    from vlab.vmm.machine import Machine, pt_pool_for

    spec.validate()
    pool = pt_pool_for(spec.mem, PAGE) + (512 << 10)   # the guest's tables, the system area's
    m = Machine("migrate", pt_pool=pool, dirty_ring=dirty_ring)
    try:
        m.add_data(spec.mem, backing=spec.backing)
        ws = ws_pages_for(spec.mem, spec.ws) if spec.workload == "uniform" else 0
        m.set_args(WORKLOADS[spec.workload], ws, spec.rate, spec.seed, spec.lag_us)
    except BaseException:
        m.close()
        raise
    return m


def params_view(vm: Vm) -> np.ndarray:
    """The payload's parameter page (u64 slots) of `vm`, no copy."""
    return np.frombuffer(vm.hva(GPA_PARAMS, PAGE), dtype=np.uint64)


def counter_of(vm: Vm, data_gpa: int) -> int | None:
    """The counter page's value, if the page holds a valid counter (magic and checksum)."""
    cnt = np.frombuffer(vm.hva(data_gpa, PAGE), dtype=np.uint64)
    if int(cnt[K_MAGIC]) != CNT_MAGIC:
        return None
    return int(cnt[K_COUNT])


def read_report(vm: Vm) -> dict:
    """The guest's report (results of vCPU 0), validated: the results area and its header are
    guest memory, so nothing in them is trusted."""
    p = params_view(vm)
    base, stride = int(p[P_RESULTS_BASE]), int(p[P_RESULTS_STRIDE])
    if base != GPA_RESULTS or stride % PAGE or not PAGE <= stride <= RESULTS_SIZE:
        raise VlabError(f"guest results area is malformed (base {base:#x}, stride {stride:#x})")
    words = np.frombuffer(vm.hva(base, stride), dtype=np.uint64)
    n, cap = int(words[0]), int(words[1])
    if cap != stride // 8 - 2:
        raise VlabError("guest overwrote its results header")
    if n != len(REPORT_KEYS):
        raise VlabError(f"guest reported {n} values, expected {len(REPORT_KEYS)}")
    rep = {k: int(v) for k, v in zip(REPORT_KEYS, words[2:2 + n])}
    if rep["magic"] != RESULT_MAGIC:
        raise VlabError("guest report has no magic: the guest did not finish its checks")
    return rep


def report_ok(rep: dict, *, migrations: int, counter_at_pause: int | None) -> tuple[bool, list[str]]:
    """Check the guest's report: its own memory checks passed, the register count of writes
    matches the sequence table, it saw the expected number of switch-overs, and the counter
    continued from the value the source's paused memory held."""
    why = []
    if rep["bad_pages"]:
        why.append(f"{rep['bad_pages']} working-set pages do not hold what the guest wrote "
                   f"(first: page {rep['first_bad_page']})")
    if rep["seq_sum"] != rep["writes"]:
        why.append(f"sequence table sums to {rep['seq_sum']} writes, the guest counted "
                   f"{rep['writes']}")
    if rep["migrations"] != migrations:
        why.append(f"guest saw {rep['migrations']} switch-overs, expected {migrations}")
    if counter_at_pause is not None and migrations:
        # the switch-over tick resets ticks_since to 1; a tick cut in half by the pause adds one
        d = rep["counter"] - counter_at_pause - rep["ticks_since_migration"]
        if d not in (0, 1):
            why.append(f"counter did not continue from {counter_at_pause}: now "
                       f"{rep['counter']} after {rep['ticks_since_migration']} ticks")
    return not why, why


class GuestRunner:
    """Runs vCPU 0 on its own thread in short KVM_RUN slices, so another thread can pause it
    (for the switch-over), resume it, or throttle it.

    Throttle t (auto-converge): the vCPU runs (1 - t) of every `period_ms` and its thread
    sleeps the rest; the writer drops its backlog after a pause, so it dirties ~(1 - t) as
    many pages. Pausing kicks the thread out of KVM_RUN with a signal (vlab_vcpu_kick) and
    completes any I/O KVM left pending (KVM_RUN with immediate_exit) before reporting paused,
    so the saved vCPU state is consistent.
    """

    def __init__(self, vcpu: Vcpu, *, on_ring_full: Callable[[], None] | None = None,
                 slice_ms: int = 20, period_ms: int = 20):
        self.vcpu = vcpu
        self.on_ring_full = on_ring_full
        self.slice_ms = slice_ms
        self.period_ms = period_ms
        self.throttle = 0.0
        self.ring_full = 0
        self.error: BaseException | None = None
        self.stop_reason: str | None = None
        self.paused_at_ns = 0
        self.last_exit_ns = 0
        self.run_ns = 0
        self._pause_req = False
        self._quit = False
        self._cv = threading.Condition()
        self._paused = False
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- control (other threads) ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._body, name=f"vcpu{self.vcpu.id}",
                                        daemon=True)
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def pause(self, timeout: float = 10.0) -> int:
        """Stop the guest; returns CLOCK_MONOTONIC ns of its last KVM_RUN exit."""
        with self._cv:
            self._pause_req = True
            self._cv.notify_all()
        lib.vlab_vcpu_kick(self.vcpu._ptr())
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._paused and not self._finished.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(timeout, detail="vCPU thread did not pause")
                self._cv.wait(min(left, 0.05))
                if not self._paused:
                    lib.vlab_vcpu_kick(self.vcpu._ptr())
        if self.error is not None:
            raise self.error
        if self._finished.is_set() and not self._paused:
            raise VlabError(f"guest stopped on its own ({self.stop_reason}) before the pause")
        return self.paused_at_ns

    def resume(self) -> None:
        with self._cv:
            self._pause_req = False
            self._cv.notify_all()

    def set_throttle(self, t: float) -> None:
        self.throttle = min(max(float(t), 0.0), 0.99)
        with self._cv:
            self._cv.notify_all()

    def quit(self, timeout: float = 10.0) -> None:
        """End the thread (the guest stays where it is)."""
        with self._cv:
            self._quit = True
            self._cv.notify_all()
        lib.vlab_vcpu_kick(self.vcpu._ptr())
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_done(self, timeout: float) -> str:
        """Wait for the guest to finish on its own; re-raise what stopped it badly."""
        if not self._finished.wait(timeout):
            raise GuestTimeout(timeout, detail="guest did not finish")
        if self.error is not None:
            raise self.error
        return self.stop_reason or ""

    # ---- the vCPU thread ----
    def _body(self) -> None:
        st = ffi.new("struct vlab_stop *")
        try:
            ptr = self.vcpu._ptr()
            while True:
                with self._cv:
                    if self._quit:
                        break
                    pause = self._pause_req
                if pause:
                    self.vcpu.run_immediate_exit(1)     # complete pending I/O first
                    with self._cv:
                        self.paused_at_ns = self.last_exit_ns
                        self._paused = True
                        self._cv.notify_all()
                        while self._pause_req and not self._quit:
                            self._cv.wait(0.5)
                        self._paused = False
                    continue
                thr = self.throttle
                run_ms = self.slice_ms if thr <= 0 else max(1, round(self.period_ms * (1 - thr)))
                _check(lib.vlab_vcpu_run(ptr, run_ms, st))
                self.last_exit_ns = st.t_exit_ns
                self.run_ns += st.t_exit_ns - st.t_enter_ns
                reason = STOP_NAMES.get(st.reason, str(st.reason))
                if reason in ("intr", "timeout"):
                    pass
                elif reason == "dirty_ring_full":
                    self.ring_full += 1
                    if self.on_ring_full is None:
                        raise KvmError("KVM_RUN", 0, "dirty ring full and nobody harvests it")
                    self.on_ring_full()
                elif reason == "print":
                    log.info("guest: %s", ffi.string(st.msg).decode(errors="replace"))
                elif reason == "done":
                    self.stop_reason = "done"
                    break
                else:
                    raise _stop_error(reason, st)
                if thr > 0:
                    with self._cv:
                        if not self._pause_req and not self._quit:
                            self._cv.wait(self.period_ms * thr / 1000.0)
        except BaseException as e:  # noqa: BLE001 - handed to the controlling thread
            self.error = e
            self.stop_reason = f"error: {e}"
        finally:
            self._finished.set()
            with self._cv:
                self._cv.notify_all()


def _stop_error(reason: str, st) -> VlabError:
    args = tuple(st.arg)
    msg = ffi.string(st.msg).decode(errors="replace")
    if reason == "fail":
        return GuestFailure(args[0], msg)
    if reason == "exception":
        return GuestFault(args[0], args[1], args[2], args[3],
                          f"cr2={args[4]:#x}" if args[0] == 14 else "")
    if reason == "shutdown":
        return GuestFault(255, 0, st.rip, st.cpl, "KVM_EXIT_SHUTDOWN")
    return KvmError("KVM_RUN", 0, f"guest stopped: {reason} {msg}".strip(),
                    vm_dead=reason in ("fail_entry", "internal_error"))


def bits_to_index(bitmap: np.ndarray, n_pages: int) -> np.ndarray:
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:n_pages]
    return np.flatnonzero(bits).astype(np.uint64)


def index_to_bits(idx: np.ndarray, n_pages: int) -> np.ndarray:
    b = np.zeros(((n_pages + 63) // 64) * 64, dtype=np.uint8)
    b[idx.astype(np.int64)] = 1
    return np.packbits(b, bitorder="little").view(np.uint64)


class DirtyTracker:
    """Which pages of which slots the guest wrote since the last harvest.

    bitmap: KVM_GET_DIRTY_LOG per slot (fetch and re-protect in one ioctl).
    clear: manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, bits initially set): the
    harvest only reads the bitmap; the sender clears (re-protects) each batch of pages with
    KVM_CLEAR_DIRTY_LOG just before copying it (`clear`). A page written between the harvest
    and its copy then goes out once, with its new content, instead of being sent again in the
    next round (what QEMU does).
    ring: the vCPUs' dirty rings are drained (also by the vCPU thread when KVM says a ring is
    full) into per-slot pending sets, then KVM_RESET_DIRTY_RINGS re-protects those pages.
    Every way a page is re-protected before the caller copies it, so a write after the copy
    is logged again.
    """

    def __init__(self, vm: Vm, slots: list[MemorySlot], mode: str, vcpus: list[Vcpu]):
        if mode not in ("bitmap", "clear", "ring"):
            raise UsageError(f"dirty tracking mode must be 'bitmap', 'clear' or 'ring', "
                             f"got {mode!r}")
        self.vm, self.slots, self.mode, self.vcpus = vm, slots, mode, vcpus
        self._pos = {s.id: i for i, s in enumerate(slots)}
        self._pending = [np.zeros(s.pages, dtype=bool) for s in slots] if mode == "ring" else []
        self._lock = threading.Lock()
        self.active = False
        self.harvest_ns = 0
        self.clear_ns = 0
        self.ring_entries = 0
        if mode == "clear":
            # ENABLE | INITIALLY_SET: logging starts with every bit set, nothing protected
            vm.enable_cap("MANUAL_DIRTY_LOG_PROTECT2", 3)

    def start(self) -> None:
        for s in self.slots:
            s.set_flags(dirty_log=True)
        self.active = True

    def stop(self) -> None:
        """Stop logging (slots back to plain memory); drain what the rings still hold."""
        if not self.active:
            return
        self.active = False
        for s in self.slots:
            s.set_flags(dirty_log=False)
        if self.mode == "ring":
            with self._lock:
                self._drain()
                for p in self._pending:
                    p[:] = False

    def harvest(self, clear_all: bool = False) -> list[np.ndarray]:
        """Per slot, the sorted page indices written since the last harvest (clear mode:
        since they were last cleared; `clear_all` clears all of them at once)."""
        t0 = time.monotonic_ns()
        if self.mode == "bitmap":
            out = [bits_to_index(self.vm.get_dirty_log(s), s.pages) for s in self.slots]
        elif self.mode == "clear":
            out = []
            for s in self.slots:
                bm = self.vm.get_dirty_log(s)
                if clear_all:
                    self.vm.clear_dirty_log(s, bm, 0, s.pages)
                out.append(bits_to_index(bm, s.pages))
        else:
            with self._lock:
                self._drain()
                out = [np.flatnonzero(p).astype(np.uint64) for p in self._pending]
                for p in self._pending:
                    p[:] = False
        self.harvest_ns += time.monotonic_ns() - t0
        return out

    def clear(self, pos: int, idx: np.ndarray) -> None:
        """clear mode: re-protect the pages `idx` (sorted) of slot `pos` before they are
        copied. One KVM_CLEAR_DIRTY_LOG over the 64-page-aligned span they cover."""
        if self.mode != "clear" or not self.active or not len(idx):
            return
        t0 = time.monotonic_ns()
        s = self.slots[pos]
        first = int(idx[0]) & ~63
        num = min((int(idx[-1]) - first) // 64 * 64 + 64, s.pages - first)
        bits = np.zeros((num + 63) // 64 * 64, dtype=np.uint8)
        bits[idx.astype(np.int64) - first] = 1
        self.vm.clear_dirty_log(s, np.packbits(bits, bitorder="little").view(np.uint64),
                                first, num)
        self.clear_ns += time.monotonic_ns() - t0

    def ring_full(self) -> None:
        """Called on the vCPU thread when KVM stops it because its ring is full."""
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        for v in self.vcpus:
            while True:
                ids, offs = v.dirty_ring_harvest(65536)
                if not len(ids):
                    break
                self.ring_entries += len(ids)
                for sid in np.unique(ids):
                    pos = self._pos.get(int(sid))
                    if pos is None:
                        continue            # a slot we do not migrate (or another address space)
                    o = offs[ids == sid].astype(np.int64)
                    o = o[o < self.slots[pos].pages]
                    self._pending[pos][o] = True
        self.vm.reset_dirty_rings()
