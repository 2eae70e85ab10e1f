"""Measurement kernels the native library runs on the host, outside any VM: the paging kernels
(native/kernels/paging_kernels.h, the same code the `paging` payload runs in a guest) over host
memory with a chosen backing, the host system-call loop, and the VMM's clock.

Pointers are the native library's (`HostMemory.ptr`, `slot_ptr(slot)`): pass them back to
these functions; `address(ptr)` is the plain number.
"""
from __future__ import annotations

import numpy as np

from vlab._errors import VlabError
from vlab.vmm._checks import _check
from vlab.vmm._native import ffi, lib
from vlab.vmm.memory import BACKINGS, MemorySlot


class HostMemory:
    """Host memory with a chosen backing (one of BACKINGS but memfd), freed by `close()`."""

    def __init__(self, size: int, backing: str):
        if backing not in BACKINGS:
            raise VlabError(f"backing {backing!r} is not one of {', '.join(BACKINGS)}")
        self._m = ffi.new("struct vlab_paging_mem *")
        _check(lib.vlab_paging_mem_alloc(self._m, size, BACKINGS[backing]))
        self.size = size
        self.backing = backing

    @property
    def ptr(self):
        if self._m.hva == ffi.NULL:
            raise VlabError("native memory already freed")
        return self._m.hva

    def array(self, dtype=np.uint64) -> np.ndarray:
        """A NumPy view of the memory (no copy)."""
        return np.frombuffer(ffi.buffer(self.ptr, self.size), dtype=dtype)

    def close(self) -> None:
        if self._m.hva != ffi.NULL:
            lib.vlab_paging_mem_free(self._m)


def slot_ptr(slot: MemorySlot):
    """The native pointer to a memory slot's host memory (for the kernels below)."""
    return lib.vlab_slot_hva(slot._h)


def address(ptr) -> int:
    """The host virtual address a native pointer holds."""
    return int(ffi.cast("uintptr_t", ptr))


def now_ns() -> int:
    """CLOCK_MONOTONIC ns, read as the VMM reads it (its stop and mark timestamps)."""
    return lib.vlab_now_ns()


def rdtsc() -> int:
    """The host's TSC now (the clock the injection-latency experiment relates to the guest's)."""
    return int(lib.vlab_rdtsc())


def syscall_loop(n: int) -> tuple[int, int]:
    """(TSC cycles, ns) of `n` getppid() system calls on this thread."""
    cyc, ns = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    lib.vlab_host_syscall_loop(n, cyc, ns)
    return cyc[0], ns[0]


# ---- the paging kernels ----
def paging_word(index: int, salt: int) -> int:
    """pk_word: what word `index` of a region filled with `salt` holds."""
    return int(lib.vlab_paging_word(index, salt))


def paging_fill(ptr, nwords: int, salt: int) -> None:
    """Word i := pk_word(i, salt) for i < nwords."""
    lib.vlab_paging_fill(ptr, nwords, salt)


def paging_chase_build(ptr, nodes: int, stride: int, seed: int) -> None:
    """A Sattolo ring (one cycle through every node) of `nodes` nodes `stride` bytes apart."""
    lib.vlab_paging_chase_build(ptr, nodes, stride, seed)


def paging_touch_read(ptr, npages: int, stride: int) -> int:
    """Read one word per `stride` bytes over `npages` strides; the sum read."""
    return int(lib.vlab_paging_touch_read(ptr, npages, stride))


def paging_mem_reset(ptr, nbytes: int, populate: bool) -> None:
    """Drop the pages (and any guest translation of them); re-populate them if asked."""
    _check(lib.vlab_paging_mem_reset(ptr, nbytes, 1 if populate else 0))


def paging_random_read(ptr, nwords: int, n: int, samples: int,
                       seed: int) -> tuple[list[int], int, int]:
    """(cycles per sample, checksum, final LCG state) of `samples` samples of n reads."""
    state, total = ffi.new("uint64_t *", seed), ffi.new("uint64_t *", 0)
    cycles = [lib.vlab_paging_random_read(ptr, nwords, n, state, total) for _ in range(samples)]
    return cycles, int(total[0]), int(state[0])


def paging_chase(ptr, n: int, samples: int, start: int) -> tuple[list[int], int, int]:
    """(cycles per sample, final offset, checksum) of `samples` samples of n dependent loads."""
    off, total = ffi.new("uint64_t *", start), ffi.new("uint64_t *", 0)
    cycles = [lib.vlab_paging_chase(ptr, off, n, total) for _ in range(samples)]
    return cycles, int(off[0]), int(total[0])


def paging_touch_write(ptr, npages: int, stride: int, salt: int) -> tuple[int, int]:
    """(cycles, checksum) of writing one word in each of npages pages `stride` bytes apart."""
    total = ffi.new("uint64_t *", 0)
    c = lib.vlab_paging_touch_write(ptr, npages, stride, salt, total)
    return int(c), int(total[0])
