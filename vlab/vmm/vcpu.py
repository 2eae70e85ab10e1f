"""One vCPU: `Vcpu` (set-up, counters, KVM statistics, state save/load, dirty ring, and the
single trip `Vcpu.run`), `Stop` (why a run returned) and the one mapping from the VMM's stop
reasons to the exceptions a guest's trouble raises (`stop_error`, `unexpected_stop`).

`vlab.vmm.thread.VcpuThread` runs a vCPU on its own thread and uses the same mapping.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vlab._errors import GuestFailure, GuestFault, GuestTimeout, KvmError, VlabError
from vlab.vmm._checks import _check
from vlab.vmm._native import ffi, lib
from vlab.vmm.stats import StatsReader

if TYPE_CHECKING:
    from vlab.vmm.vm import Vm

log = logging.getLogger("vlab")

STOP_NAMES = {getattr(lib, n): n[len("VLAB_STOP_"):].lower() for n in dir(lib)
              if n.startswith("VLAB_STOP_")}
# the stop reasons that always mean trouble (what `stop_error` maps)
ERROR_STOPS = frozenset({"exception", "shutdown", "timeout", "fail", "fail_entry",
                         "internal_error", "unknown", "bad_ucall", "system_event"})


def stop_error(reason: str, st, timeout: float) -> VlabError:
    """The exception for a run that stopped with `reason` in ERROR_STOPS (`st` the native
    `struct vlab_stop`, `timeout` the watchdog's seconds): GuestFault for an exception or a
    triple fault, GuestFailure for a guest assertion, GuestTimeout for the watchdog, KvmError
    for a failed entry, an internal error or anything the VMM cannot make sense of."""
    args = tuple(st.arg)
    msg = ffi.string(st.msg).decode(errors="replace")
    if reason == "exception":
        return GuestFault(args[0], args[1], args[2], args[3],
                          f"cr2={args[4]:#x}" if args[0] == 14 else "")
    if reason == "shutdown":
        return GuestFault(255, 0, st.rip, st.cpl, "KVM_EXIT_SHUTDOWN")
    if reason == "timeout":
        return GuestTimeout(timeout, st.rip)
    if reason == "fail":
        return GuestFailure(args[0], msg)
    return KvmError("KVM_RUN", 0, f"{reason}: {msg} args={[hex(a) for a in args[:4]]}",
                    vm_dead=reason in ("fail_entry", "internal_error"))


def unexpected_stop(st: "Stop") -> VlabError:
    """The error for a run that stopped for an event its caller does not handle (an unhandled
    port or MMIO access, a sync where done was due, ...), saying which."""
    if st.reason == "io":
        port, direction, size, count = st.args[:4]
        return VlabError(f"guest did unhandled port {'in' if direction == 0 else 'out'} on "
                         f"{port:#x} (size {size}, count {count}) at rip {st.rip:#x}")
    if st.reason == "mmio":
        addr, is_write, length = st.args[:3]
        return VlabError(f"guest did unhandled MMIO {'write' if is_write else 'read'} at "
                         f"{addr:#x} len {length}")
    return VlabError(f"guest stopped unexpectedly: {st.reason} {st.message}".strip())


@dataclass
class Stop:
    """Why a `Vcpu.run` returned, for the events the caller handles (done, sync, I/O, ...)."""
    reason: str
    kvm_exit_reason: int
    args: tuple
    rip: int
    t_enter_ns: int
    t_exit_ns: int
    message: str = ""
    prints: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, st, reason: str, message: str, prints: list[str] | None = None) -> "Stop":
        """The Stop a native `struct vlab_stop` describes (its stop reason already named)."""
        return cls(reason, st.kvm_exit_reason, tuple(st.arg), st.rip, st.t_enter_ns,
                   st.t_exit_ns, message, prints if prints is not None else [])


class Vcpu:
    """One vCPU. `run()` drives KVM_RUN under a watchdog until an event the caller must see."""

    def __init__(self, vm: "Vm", h, vcpu_id: int):
        """Made by `Vm.create_vcpu`; `h` is the native vCPU handle."""
        self.vm = vm
        self._h = h
        self.id = vcpu_id
        self.cpl = 3
        self.prints: list[str] = []
        self._marks = None
        self._stats: StatsReader | None = None

    def _ptr(self):
        if self._h is None:
            raise KvmError("vlab_vcpu", 9, "vCPU used after its VM was closed")
        return self._h

    def setup(self, *, cpl: int, cr3: int, entry: int, stack_top: int) -> None:
        """Long mode straight away: CPUID, sregs (GDT/TSS/IDT), syscall MSRs, entry registers."""
        _check(lib.vlab_vcpu_setup(self._ptr(), cpl, cr3, entry, stack_top))
        self.cpl = cpl

    def set_entry_args(self, rdi: int, rsi: int) -> None:
        _check(lib.vlab_vcpu_set_entry_args(self._ptr(), rdi, rsi))

    def set_stop_on_hlt(self, on: bool) -> None:
        lib.vlab_vcpu_set_run_flags(self._ptr(), lib.VLAB_RUN_STOP_ON_HLT if on else 0)

    def record_marks(self, capacity: int) -> None:
        """Timestamp (CLOCK_MONOTONIC ns) every MARK ucall into a buffer of `capacity`."""
        self._marks = ffi.new("uint64_t[]", max(capacity, 1))
        lib.vlab_vcpu_set_mark_buffer(self._ptr(), self._marks, capacity)

    def marks(self) -> np.ndarray:
        n = min(lib.vlab_vcpu_mark_count(self._ptr()), len(self._marks) if self._marks else 0)
        return np.frombuffer(ffi.buffer(self._marks, 8 * n), dtype=np.uint64).copy() if n else np.zeros(0, np.uint64)

    def counters(self) -> dict:
        """The VMM's own counters: KVM_RUN calls, user-space exits by reason, ucalls, sinks."""
        c = lib.vlab_vcpu_counters(self._ptr())
        exits = {ffi.string(lib.vlab_exit_reason_name(i)).decode(): c.exits[i]
                 for i in range(lib.VLAB_NR_EXIT_REASONS) if c.exits[i]}
        return {"runs": c.runs, "exits": exits, "exits_total": sum(exits.values()),
                "ucalls": c.ucalls, "marks": c.marks, "io_sunk": c.io_sunk,
                "mmio_sunk": c.mmio_sunk, "hlt": c.hlt, "msr_user": c.msr_user,
                "hypercall": c.hypercall, "intr": c.intr, "run_ns": c.run_ns}

    def reset_counters(self) -> None:
        lib.vlab_vcpu_reset_counters(self._ptr())

    def stats(self) -> dict:
        """KVM's binary statistics for this vCPU (exits, halt/io/mmio exits, ...)."""
        if self._stats is None:
            self._stats = StatsReader(_check(lib.vlab_vcpu_stats_fd(self._ptr())))
        return self._stats.read()

    @property
    def tsc_khz(self) -> int:
        return lib.vlab_vcpu_tsc_khz(self._ptr())

    def set_interrupt_flag(self, on: bool = True) -> None:
        """RFLAGS.IF at the next entry (after `setup`): how a CPL3 guest gets interrupts where
        it cannot `sti` itself (PVM keeps guest user mode's hardware IOPL at 0)."""
        _check(lib.vlab_vcpu_set_interrupt_flag(self._ptr(), 1 if on else 0))

    def set_runnable(self) -> None:
        """KVM_SET_MP_STATE RUNNABLE: with the in-kernel irqchip, vCPUs other than the BSP start
        waiting for INIT/SIPI and a halted one stays halted; vlab enters each at its entry."""
        _check(lib.vlab_vcpu_set_runnable(self._ptr()))

    def guest_tsc(self) -> tuple[int, int, int]:
        """(guest TSC, host TSC before, host TSC after): the guest's IA32_TSC as KVM computes it
        (host TSC x the vCPU's scaling ratio + its offset) between two host rdtscs."""
        g, a, b = (ffi.new("uint64_t *") for _ in range(3))
        _check(lib.vlab_vcpu_guest_tsc(self._ptr(), g, a, b))
        return int(g[0]), int(a[0]), int(b[0])

    def lapic(self) -> bytes:
        """The local APIC's 1 KiB register page (KVM_GET_LAPIC; needs the in-kernel irqchip):
        offset 0x80 TPR, 0x100.. ISR, 0x200.. IRR, 0xF0 SVR, each 32-bit register 16 bytes apart."""
        buf = ffi.new("uint8_t[1024]")
        _check(lib.vlab_irq_lapic_get(self._ptr(), buf))
        return bytes(ffi.buffer(buf))

    def rip(self) -> tuple[int, int]:
        rip, cpl = ffi.new("uint64_t *"), ffi.new("int *")
        _check(lib.vlab_vcpu_get_rip(self._ptr(), rip, cpl))
        return rip[0], cpl[0]

    def io_data(self) -> memoryview:
        """The data area of the last KVM_EXIT_IO (write into it to answer an `in`)."""
        p, n = ffi.new("uint8_t **"), ffi.new("uint32_t *")
        _check(lib.vlab_vcpu_io_data(self._ptr(), p, n))
        return memoryview(ffi.buffer(p[0], n[0]))

    def mmio_data(self) -> memoryview:
        p, n = ffi.new("uint8_t **"), ffi.new("uint32_t *")
        _check(lib.vlab_vcpu_mmio_data(self._ptr(), p, n))
        return memoryview(ffi.buffer(p[0], n[0]))

    def run_immediate_exit(self, n: int) -> int:
        """Issue `n` KVM_RUNs with immediate_exit set; total ns."""
        out = ffi.new("uint64_t *")
        _check(lib.vlab_vcpu_run_immediate_exit(self._ptr(), n, out))
        return out[0]

    def kick(self) -> bool:
        """Make the thread running this vCPU leave KVM_RUN now (a signal to it; its run returns
        `intr`). Any thread may call it; False if no run was in progress to kick."""
        return bool(_check(lib.vlab_vcpu_kick(self._ptr())))

    def run(self, timeout: float = 10.0) -> Stop:
        """Run until the guest reports done/sync, or an exit nobody in C handles.

        Raises GuestFault (exception or triple fault), GuestFailure (guest assertion),
        GuestTimeout (watchdog) or KvmError (KVM failure, entry failure, internal error), as
        `stop_error` maps them. PRINT ucalls are logged and collected; signals (Ctrl-C) are
        honoured between runs. The single trip `VcpuThread` repeats on its own thread.
        """
        st = ffi.new("struct vlab_stop *")
        deadline = time.monotonic() + timeout
        prints: list[str] = []
        while True:
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            _check(lib.vlab_vcpu_run(self._ptr(), left_ms, st))
            reason = STOP_NAMES.get(st.reason, str(st.reason))
            msg = ffi.string(st.msg).decode(errors="replace")
            if reason == "print":
                log.info("guest vCPU %d: %s", self.id, msg)
                prints.append(msg)
                self.prints.append(msg)
                continue
            if reason == "intr":
                if time.monotonic() >= deadline:
                    raise GuestTimeout(timeout, st.rip)
                continue      # Python runs pending signal handlers (KeyboardInterrupt) here
            if reason in ERROR_STOPS:
                raise stop_error(reason, st, timeout)
            return Stop.of(st, reason, msg, prints)

    # ---- migration ----
    def save_state(self) -> bytes:
        """The complete vCPU state (regs, sregs, FPU/XSAVE, XCRs, MSRs, events) as a blob."""
        size = lib.vlab_vcpu_state_size()
        buf = ffi.new("uint8_t[]", size)
        _check(lib.vlab_vcpu_save_state(self._ptr(), buf, size))
        return bytes(ffi.buffer(buf, size))

    def load_state(self, blob: bytes) -> None:
        _check(lib.vlab_vcpu_load_state(self._ptr(), blob, len(blob)))

    def dirty_ring_harvest(self, capacity: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Collect (slot ids, page offsets) the dirty ring holds, marking entries for reset."""
        slots = np.empty(capacity, dtype=np.uint32)
        offs = np.empty(capacity, dtype=np.uint64)
        n = _check(lib.vlab_vcpu_dirty_ring_harvest(self._ptr(), ffi.from_buffer("uint32_t[]", slots),
                                                    ffi.from_buffer("uint64_t[]", offs), capacity))
        return slots[:n], offs[:n]
