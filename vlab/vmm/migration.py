"""What live migration needs from the VMM, as small typed functions over Vm, Vcpu and MemorySlot.

vlab.migration moves a guest between two processes: it hashes, gathers and scatters guest
pages, saves and loads vCPU state, matches the TSC rate, and (post-copy) serves the
destination's missing pages through userfaultfd. Those are native calls on raw host addresses;
they live here, in the binding, so that nothing above `vlab.vmm` touches cffi or a slot's
handle. Every native failure raises `KvmError` naming the call and errno.
"""
from __future__ import annotations

import os

import numpy as np

from vlab._units import PAGE
from vlab.vmm._checks import _check
from vlab.vmm._native import ffi, lib
from vlab.vmm.memory import MemorySlot
from vlab.vmm.vcpu import Vcpu
from vlab.vmm.vm import Vm


# ---------------------------------------------------------------- vCPU

def vcpu_state_size() -> int:
    """Bytes of the blob `Vcpu.save_state` produces in this build (both ends must agree)."""
    return int(lib.vlab_vcpu_state_size())


def set_tsc_khz(vcpu: Vcpu, khz: int) -> None:
    """KVM_SET_TSC_KHZ: run this vCPU's TSC at the source's rate."""
    _check(lib.vlab_vcpu_set_tsc_khz(vcpu._ptr(), khz))


# ---------------------------------------------------------------- guest memory

def _u64(a: np.ndarray, n: int):
    """`a` as a uint64_t[] for C, which will touch its first `n` entries."""
    if a.dtype != np.uint64 or not a.flags.c_contiguous or a.size < n:
        raise ValueError(f"need a contiguous uint64 array of at least {n} entries")
    return ffi.from_buffer("uint64_t[]", a)


def _pages(buf, n: int, writable: bool = False):
    """The buffer `buf` for C, which will touch its first `n` pages."""
    c = ffi.from_buffer(buf, require_writable=writable)
    if len(c) < n * PAGE:
        raise ValueError(f"a buffer of {len(c)} bytes holds fewer than {n} pages")
    return c


def page_hashes(slot: MemorySlot) -> np.ndarray:
    """The hash of every page of `slot`, as the guest memory holds it now."""
    out = np.empty(slot.pages, dtype=np.uint64)
    _check(lib.vlab_mem_page_hashes(lib.vlab_slot_hva(slot._h), slot.pages, ffi.NULL, slot.pages,
                                    _u64(out, slot.pages)))
    return out


def buffer_hashes(data, n: int) -> np.ndarray:
    """The hashes of `n` pages lying back to back in the buffer `data`."""
    out = np.empty(n, dtype=np.uint64)
    _check(lib.vlab_mem_buffer_hashes(_pages(data, n), n, _u64(out, n)))
    return out


def gather_pages(slot: MemorySlot, idx: np.ndarray, out, hashes: np.ndarray) -> None:
    """Copy pages `idx` (uint64, contiguous) of `slot` back to back into the buffer `out`, and
    the hash of each copy into `hashes[:len(idx)]` (what is sent, even if the guest writes the
    original meanwhile)."""
    n = len(idx)
    _check(lib.vlab_mem_gather(lib.vlab_slot_hva(slot._h), slot.pages, _u64(idx, n), n,
                               _pages(out, n, writable=True), _u64(hashes, n)))


def scatter_pages(dst: MemorySlot | np.ndarray, n_pages: int, idx: np.ndarray, data) -> np.ndarray:
    """Copy the pages lying back to back in `data` to pages `idx` (uint64, contiguous) of `dst`
    (a slot's guest memory, or a staging array of `n_pages` pages); the hash of each page as
    written."""
    n = len(idx)
    out = np.empty(n, dtype=np.uint64)
    if isinstance(dst, MemorySlot):
        if n_pages != dst.pages:
            raise ValueError(f"slot {dst.id} has {dst.pages} pages, not {n_pages}")
        base = lib.vlab_slot_hva(dst._h)
    else:
        base = _pages(dst, n_pages, writable=True)
    _check(lib.vlab_mem_scatter(base, n_pages, _u64(idx, n), n, _pages(data, n), _u64(out, n)))
    return out


def add_u64(vm: Vm, gpa: int, delta: int) -> int:
    """Atomically add `delta` to the u64 at guest-physical `gpa`; the new value. Done in C
    with Python's lock released, so a userfaultfd fault on that page can be served meanwhile
    by another Python thread."""
    return int(lib.vlab_mem_add_u64(ffi.from_buffer(vm.hva(gpa, 8)), delta))


# ---------------------------------------------------------------- userfaultfd (post-copy)

def uffd_probe() -> tuple[int, str] | None:
    """None if a userfaultfd that also reports the kernel's faults (KVM reading guest memory)
    can be opened here; else (errno, the operation that failed)."""
    feats = ffi.new("uint64_t *")
    fd = lib.vlab_uffd_open(0, feats)
    if fd >= 0:
        os.close(fd)
        return None
    e = lib.vlab_last_error()
    return int(e.err), ffi.string(e.op).decode()


class Userfaultfd:
    """A userfaultfd over the guest memory of some slots (missing-page mode): faults are read
    as (slot position, page), pages are installed with UFFDIO_COPY and waiters woken.

    Slot positions are the order of `register` calls."""

    def __init__(self) -> None:
        feats = ffi.new("uint64_t *")
        self.fd = _check(lib.vlab_uffd_open(0, feats))
        self._bases: list[tuple[int, int]] = []      # (host address, bytes) per slot
        self._addrs = ffi.new("uint64_t[64]")

    def register(self, slot: MemorySlot) -> int:
        """Report every missing page of `slot` from now on; its position."""
        io = ffi.new("uint64_t *")
        hva = lib.vlab_slot_hva(slot._h)
        _check(lib.vlab_uffd_register(self.fd, hva, slot.size, io))
        self._bases.append((int(ffi.cast("uintptr_t", hva)), slot.size))
        return len(self._bases) - 1

    def read(self, timeout_ms: int) -> list[tuple[int, int]]:
        """The faults pending now (waiting up to `timeout_ms` for one), as (slot position,
        page); faults outside the registered slots are left out."""
        n = _check(lib.vlab_uffd_read(self.fd, timeout_ms, self._addrs, 64))
        out = []
        for k in range(n):
            a = self._addrs[k]
            for i, (b, size) in enumerate(self._bases):
                if b <= a < b + size:
                    out.append((i, (a - b) // PAGE))
                    break
        return out

    def copy(self, pos: int, page: int, count: int, src, src_page: int = 0) -> tuple[int, bool]:
        """UFFDIO_COPY `count` pages from the buffer `src` (starting at its page `src_page`) to
        pages [page, page+count) of slot `pos`, waking the faulting threads. Returns the pages
        copied and whether the copy stopped at a page already present (EEXIST); the caller
        wakes that page's waiters and goes on after it."""
        base, size = self._bases[pos]
        if page < 0 or count < 0 or (page + count) * PAGE > size:
            raise ValueError(f"pages {page}+{count} are outside slot position {pos}")
        copied = ffi.new("uint64_t *")
        rc = _check(lib.vlab_uffd_copy(self.fd, ffi.cast("void *", base + page * PAGE),
                                       _pages(src, src_page + count) + src_page * PAGE,
                                       count * PAGE, copied))
        return int(copied[0]) // PAGE, rc == 1

    def wake(self, pos: int, page: int, count: int = 1) -> None:
        """Wake the threads waiting on pages [page, page+count) of slot `pos` (already there)."""
        base = self._bases[pos][0]
        _check(lib.vlab_uffd_wake(self.fd, ffi.cast("void *", base + page * PAGE), count * PAGE))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
