"""Thin typed wrappers over the native VMM: Kvm, Vm, Vcpu, MemorySlot.

Every native call that fails raises `KvmError` naming the ioctl and errno. Guest-side trouble
raises `GuestFault`, `GuestFailure` or `GuestTimeout`. Everything is released deterministically
by `close()` or a `with` block; a finalizer is only the safety net.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from ._errors import GuestFailure, GuestFault, GuestTimeout, KvmError, MissingCapability
from ._native import ffi, lib
from ._stats import StatsReader

log = logging.getLogger("vlab")

BACKINGS = {"4k": lib.VLAB_BACKING_4K, "thp": lib.VLAB_BACKING_THP,
            "hugetlb-2m": lib.VLAB_BACKING_HUGETLB_2M, "hugetlb-1g": lib.VLAB_BACKING_HUGETLB_1G,
            "memfd": lib.VLAB_BACKING_MEMFD}
PAGE_SIZES = {"4k": 4096, "2m": 2 << 20, "1g": 1 << 30}

STOP_NAMES = {getattr(lib, n): n[len("VLAB_STOP_"):].lower() for n in dir(lib)
              if n.startswith("VLAB_STOP_")}


def _raise_last(default_op: str = "vlab") -> None:
    e = lib.vlab_last_error()
    op = ffi.string(e.op).decode() or default_op
    msg = ffi.string(e.msg).decode(errors="replace")
    raise KvmError(op, e.err, msg, vm_dead=bool(e.vm_dead))


def _check(ret: int) -> int:
    if ret < 0:
        _raise_last()
    return ret


def default_path() -> str:
    """/dev/kvm, or $VLAB_DEV_KVM (lets tests and odd hosts point vlab elsewhere)."""
    return os.environ.get("VLAB_DEV_KVM") or "/dev/kvm"


def cap_number(name: str) -> int:
    """KVM_CAP_<name> number from the headers vlab was built with (-1 if unknown)."""
    return lib.vlab_kvm_cap_number(name.removeprefix("KVM_CAP_").encode())


def known_caps() -> list[str]:
    """The capability names vlab knows how to query."""
    out, i = [], 0
    while (p := lib.vlab_kvm_cap_name(i)) != ffi.NULL:
        out.append(ffi.string(p).decode())
        i += 1
    return out


class Kvm:
    """An open /dev/kvm: API version, capabilities, supported CPUID, VM factory."""

    def __init__(self, path: str | None = None):
        path = path or default_path()
        out = ffi.new("struct vlab_kvm **")
        _check(lib.vlab_kvm_open(path.encode(), out))
        self._h = out[0]
        self.path = path
        self._fin = weakref.finalize(self, lib.vlab_kvm_close, self._h)

    @property
    def api_version(self) -> int:
        return lib.vlab_kvm_api_version(self._h)

    def check_cap(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm; 0 means absent."""
        nr = cap_number(cap) if isinstance(cap, str) else cap
        if nr < 0:
            return 0
        return _check(lib.vlab_kvm_check_cap(self._h, nr))

    def caps(self) -> dict[str, int]:
        """Every capability vlab knows, with KVM's answer."""
        return {name: self.check_cap(name) for name in known_caps()}

    def require(self, cap: str, what: str = "") -> int:
        """The capability's value, or MissingCapability naming it."""
        v = self.check_cap(cap)
        if not v:
            raise MissingCapability("KVM_CAP_" + cap.removeprefix("KVM_CAP_"), what)
        return v

    def supported_cpuid(self, leaf: int, index: int = 0) -> tuple[int, int, int, int] | None:
        regs = ffi.new("uint32_t[4]")
        if not _check(lib.vlab_kvm_supported_cpuid(self._h, leaf, index, regs)):
            return None
        return tuple(regs)  # type: ignore[return-value]

    def has_1g_pages(self) -> bool:
        """pdpe1gb offered to guests (CPUID 0x80000001 EDX bit 26)."""
        r = self.supported_cpuid(0x80000001)
        return bool(r and r[3] & (1 << 26))

    def create_vm(self) -> "Vm":
        return Vm(self)

    def close(self) -> None:
        self._fin()

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Sink:
    """A PIO or MMIO range whose exits the VMM consumes in C, counting each one."""
    vm: "Vm"
    index: int
    kind: str
    base: int
    length: int

    @property
    def hits(self) -> int:
        return lib.vlab_vm_sink_hits(self.vm._h, self.index)


class EventFd:
    """An ioeventfd: KVM signals it on a guest write without leaving the kernel."""

    def __init__(self, fd: int, addr: int, length: int, pio: bool):
        self.fd, self.addr, self.length, self.pio = fd, addr, length, pio
        self.total = 0

    def read(self) -> int:
        """Writes since the last read (eventfd counters accumulate), added to `total`."""
        try:
            n = int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            n = 0
        self.total += n
        return n


class MemorySlot:
    """One KVM memory slot and the host memory behind it."""

    def __init__(self, vm: "Vm", h, backing: str):
        self.vm = vm
        self._h = h
        self.backing = backing

    @property
    def id(self) -> int:
        return lib.vlab_slot_id(self._h)

    @property
    def gpa(self) -> int:
        return lib.vlab_slot_gpa(self._h)

    @property
    def size(self) -> int:
        return lib.vlab_slot_size(self._h)

    @property
    def fd(self) -> int:
        """The memfd behind a shared slot (-1 otherwise); pass it as `share=` to another VM."""
        return lib.vlab_slot_fd(self._h)

    @property
    def pages(self) -> int:
        return self.size // 4096

    def buffer(self):
        """A writable buffer over the slot's host memory (no copy)."""
        return ffi.buffer(lib.vlab_slot_hva(self._h), self.size)

    def array(self, dtype=np.uint8) -> np.ndarray:
        """A NumPy view of the slot's host memory (no copy)."""
        return np.frombuffer(self.buffer(), dtype=dtype)

    def set_flags(self, *, dirty_log: bool = False, readonly: bool = False) -> None:
        flags = (lib.VLAB_SLOT_DIRTY_LOG if dirty_log else 0) | (lib.VLAB_SLOT_READONLY if readonly else 0)
        _check(lib.vlab_vm_slot_set_flags(self.vm._h, self._h, flags))

    def __repr__(self) -> str:
        return f"MemorySlot(id={self.id}, gpa={self.gpa:#x}, size={self.size:#x}, {self.backing})"


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


class Vm:
    """A KVM VM: memory slots, guest tables, device sinks, ioeventfds, dirty logging, vCPUs."""

    def __init__(self, kvm: Kvm):
        out = ffi.new("struct vlab_vm **")
        _check(lib.vlab_vm_create(kvm._h, out))
        self.kvm = kvm
        self._h = out[0]
        self.slots: list[MemorySlot] = []
        self.vcpus: list[Vcpu] = []
        self.eventfds: list[EventFd] = []
        self._stats: StatsReader | None = None
        self._fin = weakref.finalize(self, lib.vlab_vm_destroy, self._h)

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: KVM's in-kernel PIC, IOAPIC and local APICs. Only before the
        first vCPU; the PIC then answers its ports (0x20/0x21, 0xa0/0xa1, ELCR 0x4d0/0x4d1) in the
        kernel, which is what exits.pio_device measures. Off by default: with it, hlt no longer
        exits to the VMM."""
        import fcntl

        if self.vcpus:
            raise ValueError("an in-kernel irqchip must be created before the first vCPU")
        self.kvm.require("IRQCHIP", "an in-kernel irqchip")
        fcntl.ioctl(lib.vlab_vm_fd(self._h), 0xAE60)      # _IO(KVMIO, 0x60)

    # ---- memory ----
    def add_slot(self, gpa: int, size: int, backing: str = "4k", *, dirty_log: bool = False,
                 readonly: bool = False, prefault: bool = False,
                 share: "MemorySlot | int | None" = None) -> MemorySlot:
        """Add guest memory at `gpa`. `share` maps an existing memfd (another VM's shared slot)."""
        if backing not in BACKINGS:
            raise ValueError(f"unknown backing {backing!r}; one of {', '.join(BACKINGS)}")
        share_fd = share.fd if isinstance(share, MemorySlot) else (-1 if share is None else share)
        if share_fd >= 0:
            backing = "memfd"
        flags = ((lib.VLAB_SLOT_DIRTY_LOG if dirty_log else 0)
                 | (lib.VLAB_SLOT_READONLY if readonly else 0)
                 | (lib.VLAB_SLOT_PREFAULT if prefault else 0))
        out = ffi.new("struct vlab_slot **")
        _check(lib.vlab_vm_slot_add(self._h, gpa, size, BACKINGS[backing], flags, share_fd, out))
        slot = MemorySlot(self, out[0], backing)
        self.slots.append(slot)
        return slot

    def remove_slot(self, slot: MemorySlot) -> None:
        _check(lib.vlab_vm_slot_remove(self._h, slot._h))
        self.slots.remove(slot)

    def hva(self, gpa: int, length: int):
        """A buffer over guest-physical [gpa, gpa+length), which must lie in one slot."""
        p = lib.vlab_vm_gpa_to_hva(self._h, gpa, length)
        if p == ffi.NULL:
            raise ValueError(f"guest-physical {gpa:#x}+{length:#x} is not in guest memory")
        return ffi.buffer(p, length)

    # ---- guest image and tables ----
    def load_image(self, image: bytes):
        hdr = ffi.new("struct vlab_image_header *")
        _check(lib.vlab_vm_load_image(self._h, image, len(image), hdr))
        return hdr

    def setup_tables(self, pool_gpa: int, pool_size: int) -> None:
        _check(lib.vlab_vm_setup_tables(self._h, pool_gpa, pool_size))

    def create_address_space(self) -> int:
        root = ffi.new("uint64_t *")
        _check(lib.vlab_vm_as_create(self._h, root))
        return root[0]

    def map(self, root: int, gva: int, gpa: int, size: int, page_size: int = 4096, *,
            write: bool = True, preset_ad: bool = False, nx: bool = False) -> None:
        """Map guest-virtual to guest-physical in the address space rooted at `root`."""
        flags = (lib.VLAB_MAP_USER | (lib.VLAB_MAP_WRITE if write else 0)
                 | (lib.VLAB_MAP_PRESET_AD if preset_ad else 0) | (lib.VLAB_MAP_NX if nx else 0))
        _check(lib.vlab_vm_as_map(self._h, root, gva, gpa, size, page_size, flags))

    def translate(self, root: int, gva: int) -> tuple[int, int, int]:
        """(gpa, gpa of the leaf PTE, page size) for `gva`."""
        gpa, pte, ps = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        _check(lib.vlab_vm_as_translate(self._h, root, gva, gpa, pte, ps))
        return gpa[0], pte[0], ps[0]

    @property
    def ptpool_used(self) -> int:
        return lib.vlab_vm_ptpool_used(self._h)

    # ---- devices ----
    def add_pio_sink(self, port: int, count: int = 1, in_value: int = 0) -> Sink:
        idx = _check(lib.vlab_vm_add_pio_sink(self._h, port, count, in_value))
        return Sink(self, idx, "pio", port, count)

    def add_mmio_sink(self, gpa: int, length: int, read_value: int = 0) -> Sink:
        idx = _check(lib.vlab_vm_add_mmio_sink(self._h, gpa, length, read_value))
        return Sink(self, idx, "mmio", gpa, length)

    def enable_user_msr(self, read_value: int = 0) -> None:
        """Unknown/invalid MSR accesses exit to user space (KVM_CAP_X86_USER_SPACE_MSR)."""
        self.kvm.require("X86_USER_SPACE_MSR", "user-space MSR exits")
        _check(lib.vlab_vm_enable_user_msr(self._h, read_value))

    def add_ioeventfd(self, addr: int, length: int = 1, *, pio: bool = True) -> EventFd:
        self.kvm.require("IOEVENTFD", "ioeventfd")
        fd = _check(lib.vlab_vm_add_ioeventfd(self._h, addr, length, 1 if pio else 0))
        ev = EventFd(fd, addr, length, pio)
        self.eventfds.append(ev)
        return ev

    def check_cap(self, cap: str) -> int:
        nr = cap_number(cap)
        return 0 if nr < 0 else _check(lib.vlab_vm_check_cap(self._h, nr))

    def enable_cap(self, cap: str | int, arg0: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM, by name (\"DIRTY_LOG_RING\") or number."""
        _check(lib.vlab_vm_enable_cap(self._h, cap_number(cap) if isinstance(cap, str) else cap, arg0))

    def stats(self) -> dict:
        """KVM's binary statistics for this VM, names from the descriptors."""
        if self._stats is None:
            self._stats = StatsReader(_check(lib.vlab_vm_stats_fd(self._h)))
        return self._stats.read()

    # ---- dirty logging ----
    def get_dirty_log(self, slot: MemorySlot) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: one bit per 4 KiB page, as uint64 words."""
        words = (slot.pages + 63) // 64
        buf = np.zeros(words, dtype=np.uint64)
        _check(lib.vlab_vm_get_dirty_log(self._h, slot._h, ffi.from_buffer("uint64_t[]", buf)))
        return buf

    def clear_dirty_log(self, slot: MemorySlot, bitmap: np.ndarray, first_page: int = 0,
                        num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (manual protect): re-protect the pages set in `bitmap`."""
        if num_pages is None:
            num_pages = slot.pages - first_page
        bitmap = np.ascontiguousarray(bitmap, dtype=np.uint64)
        _check(lib.vlab_vm_clear_dirty_log(self._h, slot._h, first_page, num_pages,
                                           ffi.from_buffer("uint64_t[]", bitmap)))

    def enable_dirty_ring(self, nbytes: int) -> None:
        _check(lib.vlab_vm_enable_dirty_ring(self._h, nbytes))

    def reset_dirty_rings(self) -> int:
        return _check(lib.vlab_vm_reset_dirty_rings(self._h))

    # ---- vCPUs ----
    def create_vcpu(self, vcpu_id: int | None = None) -> "Vcpu":
        if vcpu_id is None:
            vcpu_id = len(self.vcpus)
        out = ffi.new("struct vlab_vcpu **")
        _check(lib.vlab_vcpu_create(self._h, vcpu_id, out))
        v = Vcpu(self, out[0], vcpu_id)
        self.vcpus.append(v)
        return v

    def close(self) -> None:
        """Destroy vCPUs, the VM and all guest memory; closes every fd the VM owns."""
        for v in self.vcpus:
            v._h = None
        self.vcpus.clear()
        self.slots.clear()
        self._stats = None
        self._fin()

    @property
    def closed(self) -> bool:
        return not self._fin.alive

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Vcpu:
    """One vCPU. `run()` drives KVM_RUN under a watchdog until an event the caller must see."""

    def __init__(self, vm: Vm, h, vcpu_id: int):
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

    def run(self, timeout: float = 10.0) -> Stop:
        """Run until the guest reports done/sync, or an exit nobody in C handles.

        Raises GuestFault (exception or triple fault), GuestFailure (guest assertion),
        GuestTimeout (watchdog) or KvmError (KVM failure, entry failure, internal error).
        PRINT ucalls are logged and collected; signals (Ctrl-C) are honoured between runs.
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
            args = tuple(st.arg)
            if reason == "exception":
                raise GuestFault(args[0], args[1], args[2], args[3],
                                 f"cr2={args[4]:#x}" if args[0] == 14 else "")
            if reason == "shutdown":
                raise GuestFault(255, 0, st.rip, st.cpl, "KVM_EXIT_SHUTDOWN")
            if reason == "timeout":
                raise GuestTimeout(timeout, st.rip)
            if reason == "fail":
                raise GuestFailure(args[0], msg)
            if reason in ("fail_entry", "internal_error", "unknown", "bad_ucall", "system_event"):
                raise KvmError("KVM_RUN", 0, f"{reason}: {msg} args={[hex(a) for a in args[:4]]}",
                               vm_dead=reason in ("fail_entry", "internal_error"))
            return Stop(reason, st.kvm_exit_reason, args, st.rip, st.t_enter_ns, st.t_exit_ns,
                        msg, prints)

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
