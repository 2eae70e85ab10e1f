"""Machine: a ready-to-run guest (VM + system area + payload + page tables + vCPUs).

This is what experiments use. It lays out guest memory as native/include/vlab.h says, maps the
system area with 4 KiB pages (leaving page 0 unmapped so null dereferences fault), maps an
unbacked MMIO window (accesses exit to the VMM), and lets experiments add data regions with a
chosen host backing and guest page size.
"""
from __future__ import annotations

import numpy as np

from vlab._errors import VlabError
from vlab.vmm.payloads import (GPA_APIC, P_CR3, P_DATA_BASE, P_DATA_SIZE, P_MAGIC, P_MMIO_BASE, P_NR_VCPUS,
                     P_RESULTS_BASE, P_RESULTS_STRIDE, P_SHARED_BASE, P_SHARED_SIZE, P_TSC_KHZ,
                     PARAM_MAGIC, P_ARG0, Payload, load_payload)
from vlab.vmm.kvm import Kvm
from vlab.vmm.memory import PAGE_SIZES, MemorySlot
from vlab.vmm._native import lib
from vlab.vmm.thread import VcpuThread, run_together
from vlab.vmm.vcpu import Stop, Vcpu, unexpected_stop
from vlab.vmm.vm import Vm

SYS_FIXED = lib.VLAB_GPA_PTPOOL          # everything below the page-table pool
DEFAULT_PT_POOL = 8 << 20


def pt_pool_for(size: int, page_size: int) -> int:
    """Bytes of page-table pool needed to map `size` bytes with `page_size` pages (plus slack)."""
    pages = 0
    span = page_size
    while span < (1 << 48):
        span *= 512
        pages += -(-size // span) + 1
    return (pages + 64) * 4096


class Machine:
    """A VM running one payload on `vcpus` vCPUs at `cpl` (3 or 0)."""

    def __init__(self, payload: str | Payload = "micro", *, vcpus: int = 1, cpl: int = 3,
                 kvm: Kvm | None = None, pt_pool: int = DEFAULT_PT_POOL,
                 sys_backing: str = "4k", preset_ad: bool = True, dirty_ring: int = 0,
                 mmio: bool = True, irqchip: bool = False):
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.payload = payload if isinstance(payload, Payload) else load_payload(payload)
        self.cpl = cpl
        self.irqchip = irqchip
        self.data: list[MemorySlot] = []
        self.vm = Vm(self.kvm)
        try:
            if dirty_ring:
                self.vm.enable_dirty_ring(dirty_ring)
            if irqchip:
                self.vm.create_irqchip()
            self.sys = self.vm.add_slot(0, SYS_FIXED + pt_pool, sys_backing)
            self.vm.load_image(self.payload.image)
            self.vm.setup_tables(lib.VLAB_GPA_PTPOOL, pt_pool)
            self.cr3 = self.vm.create_address_space()
            self.vm.map(self.cr3, 0x1000, 0x1000, self.sys.size - 0x1000, 4096,
                        preset_ad=preset_ad)
            if irqchip:     # the xAPIC page: no memory slot, KVM's local APIC answers
                self.vm.map(self.cr3, GPA_APIC, GPA_APIC, 4096, 4096, preset_ad=preset_ad)
            if mmio:
                self.vm.map(self.cr3, lib.VLAB_GPA_MMIO, lib.VLAB_GPA_MMIO, lib.VLAB_MMIO_SIZE,
                            4096, preset_ad=preset_ad)
            self.params = np.frombuffer(self.vm.hva(lib.VLAB_GPA_PARAMS, 4096), dtype=np.uint64)
            self.params[:] = 0
            stride = lib.VLAB_RESULTS_SIZE // max(vcpus, 1) // 4096 * 4096
            self._results = np.frombuffer(self.vm.hva(lib.VLAB_GPA_RESULTS, lib.VLAB_RESULTS_SIZE),
                                          dtype=np.uint64)
            self._stride_words = stride // 8
            p = self.params
            p[P_MAGIC] = PARAM_MAGIC
            p[P_NR_VCPUS] = vcpus
            p[P_RESULTS_BASE] = lib.VLAB_GPA_RESULTS
            p[P_RESULTS_STRIDE] = stride
            p[P_MMIO_BASE] = lib.VLAB_GPA_MMIO
            p[P_CR3] = self.cr3
            self.vcpus: list[Vcpu] = []
            for i in range(vcpus):
                v = self.vm.create_vcpu(i)
                self.vcpus.append(v)
                self._enter(i)
            p[P_TSC_KHZ] = self.vcpus[0].tsc_khz if self.vcpus else 0
            self.reset_results()
        except BaseException:
            self.close()
            raise

    # ---- memory ----
    def add_data(self, size: int, *, backing: str = "4k", guest_page: str = "4k",
                 gpa: int | None = None, dirty_log: bool = False, prefault: bool = False,
                 preset_ad: bool = True, share: MemorySlot | int | None = None,
                 readonly: bool = False, map: bool = True) -> MemorySlot:
        """Add a data slot and identity-map it with `guest_page` pages.

        The first data region is advertised to the guest in P_DATA_BASE/P_DATA_SIZE, a shared
        one in P_SHARED_BASE/P_SHARED_SIZE.
        """
        ps = PAGE_SIZES[guest_page]
        if gpa is None:
            gpa = lib.VLAB_GPA_DATA
            for s in self.data:
                gpa = max(gpa, -(-(s.gpa + s.size) // (1 << 30)) * (1 << 30))
        if size % ps:
            raise VlabError(f"data size {size:#x} is not a multiple of the {guest_page} guest page")
        slot = self.vm.add_slot(gpa, size, backing, dirty_log=dirty_log, prefault=prefault,
                                share=share, readonly=readonly)
        if map:
            self.vm.map(self.cr3, gpa, gpa, size, ps, write=not readonly, preset_ad=preset_ad)
        if share is not None or backing == "memfd":
            self.params[P_SHARED_BASE], self.params[P_SHARED_SIZE] = gpa, size
        elif not self.data:
            self.params[P_DATA_BASE], self.params[P_DATA_SIZE] = gpa, size
        self.data.append(slot)
        return slot

    # ---- parameters and results ----
    def set_args(self, *values: int) -> None:
        """Payload arguments ARG(0..n)."""
        for i, v in enumerate(values):
            self.params[P_ARG0 + i] = int(v) & 0xFFFFFFFFFFFFFFFF

    def reset_results(self) -> None:
        cap = self._stride_words - 2
        for i in range(len(self.vcpus)):
            base = i * self._stride_words
            self._results[base] = 0
            self._results[base + 1] = cap

    def results(self, vcpu: int = 0) -> np.ndarray:
        """The samples vCPU `vcpu` recorded, validated against the capacity the host set."""
        base = vcpu * self._stride_words
        n, cap = int(self._results[base]), self._stride_words - 2
        if int(self._results[base + 1]) != cap:
            raise VlabError(f"guest vCPU {vcpu} overwrote its results header")
        if n > cap:
            raise VlabError(f"guest vCPU {vcpu} recorded {n} samples; only {cap} fit")
        return self._results[base + 2:base + 2 + n].copy()

    # ---- running ----
    def restart(self, vcpu: int | None = None, cpl: int | None = None) -> None:
        """Put vCPU(s) back at the payload entry (same memory), to run the payload again."""
        if cpl is not None:
            self.cpl = cpl
        for i in ([vcpu] if vcpu is not None else range(len(self.vcpus))):
            self._enter(i)
        self.reset_results()

    def _enter(self, i: int) -> None:
        """Put vCPU i at the payload entry. With an irqchip every vCPU is made runnable (an AP
        would wait for INIT/SIPI, a halted vCPU for an interrupt), and a CPL3 vCPU starts with
        RFLAGS.IF set: it takes interrupts, and cannot always `sti` itself (PVM)."""
        v = self.vcpus[i]
        v.setup(cpl=self.cpl, cr3=self.cr3, entry=self.payload.entry,
                stack_top=lib.VLAB_GPA_USTACKS + (i + 1) * lib.VLAB_USTACK_SIZE)
        if self.irqchip:
            v.set_runnable()
            if self.cpl == 3:
                v.set_interrupt_flag(True)

    def run(self, vcpu: int = 0, timeout: float = 10.0) -> Stop:
        return self.vcpus[vcpu].run(timeout)

    def run_to_done(self, vcpu: int = 0, timeout: float = 10.0) -> Stop:
        """Run until the guest says done; anything else that stops it is an error."""
        st = self.vcpus[vcpu].run(timeout)
        if st.reason != "done":
            raise unexpected_stop(st)
        return st

    def run_all(self, timeout: float = 10.0) -> list[Stop]:
        """Run every vCPU on its own thread to done; re-raise the first failure."""
        if len(self.vcpus) == 1:
            return [self.run_to_done(0, timeout)]
        threads = [VcpuThread(v, timeout=timeout) for v in self.vcpus]
        run_together(threads)
        for t in threads:
            if t.error is not None:
                raise t.error
        return [t.last_stop for t in threads]      # type: ignore[misc]

    def close(self) -> None:
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if self._own_kvm and getattr(self, "kvm", None) is not None:
            self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

