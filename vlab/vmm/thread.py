"""`VcpuThread`: the one way vlab runs a vCPU on a thread of its own.

The thread repeats the single trip of `Vcpu.run` (one native `vlab_vcpu_run`: KVM_RUN until
an event the C side does not handle itself) and deals with what comes back:

- `done` ends the thread; an event in ERROR_STOPS ends it with the exception `stop_error`
  maps it to (GuestFault, GuestFailure, GuestTimeout, KvmError); any other event (sync, an
  unhandled port, ...) goes to `on_stop`, or is an error (`unexpected_stop`) without one;
- `dirty_ring_full` calls `on_ring_full` (the dirty tracker harvests) and runs on;
- PRINT ucalls are logged; the watchdog (`timeout` seconds of running since the start or the
  last resume) raises GuestTimeout;
- other threads `pause()` it (the run is kicked out of KVM_RUN and pending I/O completed, so
  the saved vCPU state is consistent), `resume()` it, `set_throttle()` it, or `quit()` it.

Whatever stopped the thread badly is kept in `error` and re-raised to the controlling thread
by `wait_done()`, `wait_paused()` and `pause()`. Nothing here runs per KVM_RUN: the C side
loops over the exits it handles, Python sees only the events above.

Placement (CPU pinning): `set_placement(Placement(...))` makes this process pin its threads by
role: every VcpuThread (and a thread that runs a vCPU itself inside `vcpu_slot()`) takes the
lowest free vCPU slot and runs on `vcpu[slot % len(vcpu)]`; a device backend or host peer
thread is created inside `inherit("backend")` and is born on the `backend` CPUs. Without a
placement nothing is pinned. `placement_record()` says where this process's threads were
allowed to run, as read back from the kernel.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vlab._errors import GuestTimeout, KvmError, VlabError
from vlab.vmm._checks import _check
from vlab.vmm._native import ffi, lib
from vlab.vmm.devices import task_cpu_ns, task_wait_ns
from vlab.vmm.vcpu import ERROR_STOPS, STOP_NAMES, Stop, Vcpu, stop_error, unexpected_stop

log = logging.getLogger("vlab")

_NO_WATCHDOG_MS = 10000      # one run's length when nothing else bounds it (a quit kicks it)
ROLES = ("worker", "vcpu", "backend")


@dataclass(frozen=True)
class Placement:
    """CPUs per role: `worker` (the whole process, and what any other thread inherits),
    `vcpu` (one CPU per vCPU thread, round robin by slot), `backend` (device backend and
    host peer threads). `spec` is the user's text it came from (e.g. "auto")."""
    worker: tuple[int, ...]
    vcpu: tuple[int, ...]
    backend: tuple[int, ...]
    spec: str = ""

    def cpus(self, role: str, slot: int = 0) -> set[int]:
        """The CPUs a thread of `role` (a vCPU thread: of vCPU slot `slot`) may run on."""
        if role == "vcpu":
            return {self.vcpu[slot % len(self.vcpu)]}
        return set(getattr(self, role))


_placement: Placement | None = None
_slots_lock = threading.Lock()
_vcpu_slots: set[int] = set()
_seen: dict[str, set[int]] = {}     # role -> CPUs threads of that role were allowed (read back)


def set_placement(p: Placement | None) -> None:
    """Pin this process's threads by `p` from now on (None: leave affinity alone). The calling
    thread, and every thread it creates later without a role, gets the worker CPUs."""
    global _placement
    _placement = p
    _seen.clear()
    if p is not None:
        os.sched_setaffinity(0, p.worker)
        note_thread("worker", 0)


def placement() -> Placement | None:
    return _placement


def note_thread(role: str, tid: int) -> None:
    """Note where thread `tid` of `role` may run (its affinity, read back), for
    `placement_record`; a thread that has already ended is skipped."""
    try:
        _seen.setdefault(role, set()).update(os.sched_getaffinity(tid))
    except OSError:
        pass


def note_cpus(role: str, cpus) -> None:
    """Note that a thread of `role` ran on `cpus` (a thread pinned by the C side that has
    ended by the time anyone could read its affinity back)."""
    _seen.setdefault(role, set()).update(cpus)


def cpu_mask(cpus: set[int] | tuple[int, ...]) -> int:
    """CPUs as the bit mask the C side takes (CPUs 0..63; pinning beyond is refused)."""
    if any(not 0 <= c < 64 for c in cpus):
        raise VlabError(f"cannot pin a C thread to CPUs beyond 63: {sorted(cpus)}")
    return sum(1 << c for c in cpus)


def placement_record() -> dict:
    """Where this process's threads were allowed to run: the spec ("none" without a placement)
    and, per role, the union of the CPU sets the kernel reported for its threads."""
    rec: dict = {"pin": _placement.spec if _placement is not None else "none"}
    if "worker" not in _seen:
        note_thread("worker", 0)
    for role in ROLES:
        if role in _seen:
            rec[role] = sorted(_seen[role])
    return rec


def pin_thread(role: str, tid: int = 0, slot: int = 0) -> None:
    """Pin thread `tid` (0: the calling thread) to the CPUs of `role` under the placement, and
    note where it may run. Without a placement only the note."""
    if _placement is not None:
        os.sched_setaffinity(tid, _placement.cpus(role, slot))
    note_thread(role, tid)


@contextlib.contextmanager
def vcpu_slot() -> Iterator[int]:
    """The calling thread runs a vCPU for the duration: it takes the lowest free vCPU slot and
    its CPU, and goes back to the worker CPUs afterwards. Yields the slot."""
    with _slots_lock:
        slot = 0
        while slot in _vcpu_slots:
            slot += 1
        _vcpu_slots.add(slot)
    try:
        pin_thread("vcpu", 0, slot)
        yield slot
    finally:
        with _slots_lock:
            _vcpu_slots.discard(slot)
        if _placement is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, _placement.worker)


@contextlib.contextmanager
def inherit(role: str) -> Iterator[None]:
    """Threads the calling thread creates inside this block (e.g. a C device backend's
    pthread) are born with the CPUs of `role`: the calling thread carries that affinity for
    the duration (a new thread inherits its creator's) and gets its own back afterwards."""
    if _placement is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _placement.cpus(role))
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


class VcpuThread:
    """Runs `vcpu` on its own thread until the guest is done, fails, or is told to quit.

    timeout      watchdog: seconds the guest may run (since `start` or the last `resume`)
                 before GuestTimeout; None: no watchdog (a migrating guest runs until quit).
    slice_ms     the longest single run (None: until the watchdog): the thread leaves
                 KVM_RUN at least this often, which is what a throttle change waits for.
    period_ms    throttle period: with throttle t the vCPU runs (1 - t) of every period and
                 its thread sleeps the rest (auto-converge).
    on_ring_full called on the vCPU thread at KVM_EXIT_DIRTY_RING_FULL (harvest the rings);
                 without it a full ring is an error.
    on_stop      called on the vCPU thread with the `Stop` of any other event the guest
                 reports (e.g. `sync`); it returns True to pause there (until `resume`), False
                 to run on, or raises. Without it such an event is an error.
    on_error     called on the vCPU thread with the exception that ends it (e.g. to abort a
                 peer VM); the exception is still re-raised by `wait_done`.
    """

    def __init__(self, vcpu: Vcpu, *, timeout: float | None = None, slice_ms: int | None = None,
                 period_ms: int = 20, on_ring_full: Callable[[], None] | None = None,
                 on_stop: Callable[[Stop], bool] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 name: str | None = None):
        self.vcpu = vcpu
        self.timeout = timeout
        self.slice_ms = slice_ms
        self.period_ms = period_ms
        self.on_ring_full = on_ring_full
        self.on_stop = on_stop
        self.on_error = on_error
        self.name = name or f"vcpu{vcpu.id}"
        self.throttle = 0.0
        self.ring_full = 0                  # KVM_EXIT_DIRTY_RING_FULL exits handled
        self.error: BaseException | None = None
        self.stop_reason: str | None = None
        self.last_stop: Stop | None = None  # the event that ended the thread or paused it
        self.paused_at_ns = 0               # CLOCK_MONOTONIC ns of the last exit before a pause
        self.last_exit_ns = 0
        self.run_ns = 0                     # ns inside vlab_vcpu_run, summed
        self.cpu_ns = 0                     # the thread's CPU time, once it has ended
        self.wait_ns = 0                    # ... and its time runnable without a CPU
        self.tid = 0                        # its native thread id, once started
        self.slot = -1                      # its vCPU slot (placement), once started
        self._pause_req = False
        self._self_paused = False
        self._quit = False
        self._paused = False
        self._deadline: float | None = None
        self._cv = threading.Condition()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- control (other threads) ----
    def start(self) -> "VcpuThread":
        """Start the thread (the watchdog starts now). Returns self."""
        self._arm()
        self._thread = threading.Thread(target=self._body, name=self.name, daemon=True)
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, timeout: float = 10.0) -> int:
        """Stop the guest; returns CLOCK_MONOTONIC ns of its last KVM_RUN exit."""
        with self._cv:
            self._pause_req = True
            self._cv.notify_all()
        self._kick()
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._paused and not self._finished.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(timeout, detail="vCPU thread did not pause")
                self._cv.wait(min(left, 0.05))
                if not self._paused:
                    self._kick()            # the first signal may have come between two runs
        if self.error is not None:
            raise self.error
        if self._finished.is_set() and not self._paused:
            raise VlabError(f"guest stopped on its own ({self.stop_reason}) before the pause")
        return self.paused_at_ns

    def wait_paused(self, timeout: float) -> Stop | None:
        """Wait until the thread pauses (asked to, or `on_stop` said so); the Stop it paused
        at (None for a requested pause). Re-raises what stopped it badly."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._paused and not self._finished.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(timeout, detail="vCPU thread did not pause")
                self._cv.wait(min(left, 0.5))
        if self.error is not None:
            raise self.error
        if not self._paused:
            raise VlabError(f"guest stopped on its own ({self.stop_reason}) before it paused")
        return self.last_stop if self._self_paused else None

    def resume(self, timeout: float | None = None) -> None:
        """Let a paused guest run on; the watchdog restarts (with `timeout` if given)."""
        with self._cv:
            if timeout is not None:
                self.timeout = timeout
            self._arm()
            self._pause_req = False
            self._self_paused = False
            self._cv.notify_all()

    def set_throttle(self, t: float) -> None:
        """Run only (1 - t) of every `period_ms` (t clamped to [0, 0.99])."""
        self.throttle = min(max(float(t), 0.0), 0.99)
        with self._cv:
            self._cv.notify_all()

    def quit(self, timeout: float = 10.0) -> None:
        """End the thread (the guest stays where it is) and wait up to `timeout` s for it."""
        with self._cv:
            self._quit = True
            self._cv.notify_all()
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive():
            self._kick()
            self._thread.join(min(0.05, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end on its own; True if it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._finished.is_set()

    def wait_done(self, timeout: float) -> str:
        """Wait for the guest to finish on its own; re-raise what stopped it badly."""
        if not self._finished.wait(timeout):
            raise GuestTimeout(timeout, detail="guest did not finish")
        if self._thread is not None:
            self._thread.join()             # cpu_ns and wait_ns are final once it has ended
        if self.error is not None:
            raise self.error
        return self.stop_reason or ""

    # ---- the vCPU thread ----
    def _arm(self) -> None:
        self._deadline = None if self.timeout is None else time.monotonic() + self.timeout

    def _kick(self) -> None:
        if self.vcpu._h is not None:
            lib.vlab_vcpu_kick(self.vcpu._h)

    def _run_ms(self) -> int:
        thr = self.throttle
        if thr > 0:
            ms = max(1, round(self.period_ms * (1 - thr)))
        else:
            ms = self.slice_ms or _NO_WATCHDOG_MS
        if self._deadline is not None:
            left = max(1, int((self._deadline - time.monotonic()) * 1000))
            if thr > 0 or self.slice_ms:
                ms = min(ms, left)
            else:
                ms = left
        return ms

    def _wait_resumed(self) -> None:
        with self._cv:
            self._paused = True
            self._cv.notify_all()
            while (self._pause_req or self._self_paused) and not self._quit:
                self._cv.wait(0.5)
            self._paused = False

    def _body(self) -> None:
        self.tid = threading.get_native_id()
        try:
            with vcpu_slot() as self.slot:
                self._measured_body()
        except BaseException as e:  # noqa: BLE001 - pinning failed: the body never ran
            if not self._finished.is_set():
                self.error = e
                self.stop_reason = f"error: {e}"
                self._finished.set()
                with self._cv:
                    self._cv.notify_all()

    def _measured_body(self) -> None:
        c0, w0 = task_cpu_ns(self.tid), task_wait_ns(self.tid)
        st = ffi.new("struct vlab_stop *")
        prints: list[str] = []
        try:
            ptr = self.vcpu._ptr()
            while True:
                with self._cv:
                    if self._quit:
                        self.stop_reason = self.stop_reason or "quit"
                        break
                    pause = self._pause_req
                if pause:
                    self.vcpu.run_immediate_exit(1)     # complete pending I/O first
                    self.paused_at_ns = self.last_exit_ns
                    self._wait_resumed()
                    continue
                thr = self.throttle
                _check(lib.vlab_vcpu_run(ptr, self._run_ms(), st))
                self.last_exit_ns = st.t_exit_ns
                self.run_ns += st.t_exit_ns - st.t_enter_ns
                reason = STOP_NAMES.get(st.reason, str(st.reason))
                if reason in ("intr", "timeout"):
                    if self._deadline is not None and time.monotonic() >= self._deadline:
                        raise GuestTimeout(self.timeout or 0.0, st.rip)
                elif reason == "done":
                    self.last_stop = Stop.of(st, reason, "", prints)
                    self.stop_reason = "done"
                    break
                elif reason == "dirty_ring_full":
                    self.ring_full += 1
                    if self.on_ring_full is None:
                        raise KvmError("KVM_RUN", 0, "dirty ring full and nobody harvests it")
                    self.on_ring_full()
                elif reason == "print":
                    msg = ffi.string(st.msg).decode(errors="replace")
                    log.info("guest vCPU %d: %s", self.vcpu.id, msg)
                    prints.append(msg)
                    self.vcpu.prints.append(msg)
                elif reason in ERROR_STOPS:
                    raise stop_error(reason, st, self.timeout or 0.0)
                else:
                    stop = Stop.of(st, reason, ffi.string(st.msg).decode(errors="replace"),
                                   prints)
                    if self.on_stop is None:
                        raise unexpected_stop(stop)
                    if self.on_stop(stop):
                        self.last_stop = stop
                        self.paused_at_ns = self.last_exit_ns
                        with self._cv:
                            self._self_paused = True
                        self._wait_resumed()
                        prints = []
                    continue
                if thr > 0:
                    with self._cv:
                        if not self._pause_req and not self._quit:
                            self._cv.wait(self.period_ms * thr / 1000.0)
        except BaseException as e:  # noqa: BLE001 - handed to the controlling thread
            self.error = e
            self.stop_reason = f"error: {e}"
            if self.on_error is not None:
                try:
                    self.on_error(e)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    log.exception("vCPU %d: on_error failed", self.vcpu.id)
        finally:
            try:
                self.cpu_ns = task_cpu_ns(self.tid) - c0
                self.wait_ns = task_wait_ns(self.tid) - w0
            except VlabError:
                pass
            self._finished.set()
            with self._cv:
                self._cv.notify_all()


def run_together(threads: list[VcpuThread]) -> None:
    """Start every thread, wait for all of them to end, and quit any still running if waiting
    was cut short (an exception, Ctrl-C). Each thread's outcome stays in its `error`."""
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for t in threads:
            t.quit()
