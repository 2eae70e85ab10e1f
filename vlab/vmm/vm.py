"""A KVM VM: `Vm` owns its memory slots, guest page tables, device sinks, ioeventfds, dirty
logging and vCPUs. Made from a `Kvm` (`Kvm.create_vm()` or `Vm(kvm)`).
"""
from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

import numpy as np

from vlab.vmm._checks import _check, cap_number
from vlab.vmm._native import ffi, lib
from vlab.vmm.devices import EventFd, IrqFd, Sink
from vlab.vmm.memory import BACKINGS, MemorySlot
from vlab.vmm.stats import StatsReader
from vlab.vmm.vcpu import Vcpu

if TYPE_CHECKING:
    from vlab.vmm.kvm import Kvm


class Vm:
    """A KVM VM: memory slots, guest tables, device sinks, ioeventfds, dirty logging, vCPUs."""

    def __init__(self, kvm: "Kvm"):
        out = ffi.new("struct vlab_vm **")
        _check(lib.vlab_vm_create(kvm._h, out))
        self.kvm = kvm
        self._h = out[0]
        self.slots: list[MemorySlot] = []
        self.vcpus: list[Vcpu] = []
        self.eventfds: list[EventFd] = []
        self._stats: StatsReader | None = None
        self.irqchip = False
        self.msi_routes: list[tuple[int, int, int]] = []     # (gsi, dest, vector)
        self.irqfds: list[IrqFd] = []
        self._fin = weakref.finalize(self, lib.vlab_vm_destroy, self._h)

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: KVM's in-kernel PIC, IOAPIC and a local APIC per vCPU. Only
        before the first vCPU. With it, hlt waits in the kernel for an interrupt instead of
        exiting to the VMM, the PIC answers its ports (0x20/0x21, 0xa0/0xa1, ELCR 0x4d0/0x4d1)
        in the kernel (what exits.pio_device measures), and MSI routes and irqfds work."""
        if self.vcpus:
            raise ValueError("an in-kernel irqchip must be created before the first vCPU")
        self.kvm.require("IRQCHIP", "an in-kernel irqchip")
        _check(lib.vlab_irq_chip_create(self._h))
        self.irqchip = True

    # ---- interrupts (native/vmm/irq.c) ----
    def _check_msi(self, dest: int, vector: int) -> None:
        if not self.irqchip:
            raise ValueError("MSIs need the in-kernel irqchip (create_irqchip first)")
        if not 32 <= vector <= 255:
            raise ValueError(f"vector {vector} is not an interrupt vector (32-255)")
        if not 0 <= dest < max(len(self.vcpus), 1):
            raise ValueError(f"destination APIC ID {dest}: this VM has {len(self.vcpus)} vCPUs")

    def route_msi(self, dest: int, vector: int) -> int:
        """Add a GSI whose MSI goes to the local APIC `dest` (the vCPU id) with `vector`, fixed
        and edge-triggered; returns the GSI. KVM_SET_GSI_ROUTING replaces the whole table, so
        the VM keeps it (vlab's routes only: the irqchip's default IOAPIC/PIC routes go, which
        nothing in vlab uses)."""
        self._check_msi(dest, vector)
        self.kvm.require("IRQ_ROUTING", "MSI routes")
        gsi = len(self.msi_routes)
        routes = self.msi_routes + [(gsi, dest, vector)]
        cols = list(zip(*routes))
        _check(lib.vlab_irq_set_msi_routes(self._h, len(routes),
                                           *(ffi.new("uint32_t[]", list(c)) for c in cols)))
        self.msi_routes = routes
        return gsi

    def add_irqfd(self, dest: int, vector: int, fd: int | None = None) -> IrqFd:
        """An eventfd that KVM turns into the MSI (`dest`, `vector`) on every write, without
        the VMM: the in-kernel side of a device interrupt (QEMU's irqfd). `fd`: an eventfd to
        use (the VM takes it over and closes it), else a new one."""
        if fd is None:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.kvm.require("IRQFD", "irqfd")
            gsi = self.route_msi(dest, vector)
            _check(lib.vlab_irq_irqfd(self._h, fd, gsi, 1))
        except BaseException:
            os.close(fd)
            raise
        irq = IrqFd(fd, gsi, dest, vector)
        self.irqfds.append(irq)
        return irq

    def signal_msi(self, dest: int, vector: int) -> bool:
        """KVM_SIGNAL_MSI: inject one MSI now; False when the guest's APIC blocked it."""
        self._check_msi(dest, vector)
        self.kvm.require("SIGNAL_MSI", "KVM_SIGNAL_MSI")
        return _check(lib.vlab_irq_signal_msi(self._h, dest, vector)) > 0

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
        for irq in self.irqfds:
            irq.close()
        self.irqfds.clear()
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
