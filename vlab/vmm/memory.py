"""Guest memory: `MemorySlot` (one KVM memory slot and the host memory behind it) and the host
backings and guest page sizes vlab knows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlab.vmm._checks import _check
from vlab.vmm._native import ffi, lib
from vlab._units import PAGE_SIZES  # noqa: F401 (the guest page sizes, re-exported)

if TYPE_CHECKING:
    from vlab.vmm.vm import Vm

BACKINGS = {"4k": lib.VLAB_BACKING_4K, "thp": lib.VLAB_BACKING_THP,
            "hugetlb-2m": lib.VLAB_BACKING_HUGETLB_2M, "hugetlb-1g": lib.VLAB_BACKING_HUGETLB_1G,
            "memfd": lib.VLAB_BACKING_MEMFD}


class MemorySlot:
    """One KVM memory slot and the host memory behind it."""

    def __init__(self, vm: "Vm", h, backing: str):
        """Made by `Vm.add_slot`; `h` is the native slot handle."""
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
        return self.size // PAGE_SIZES["4k"]

    @property
    def hva(self) -> int:
        """Host virtual address of the slot's first byte (for native kernels over the slot)."""
        return int(ffi.cast("uintptr_t", lib.vlab_slot_hva(self._h)))

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
