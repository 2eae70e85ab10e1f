"""The paging experiments' two sides: the guest rig and the host (`where=native`) memory.

Both sides run the kernels of native/kernels/paging_kernels.h: the guest through the `paging`
payload, the host through the vlab_paging_* functions of the native library. Data is laid out
identically on both sides (word i holds pk_word(i, salt), pointer-chase rings hold offsets from
the region base), so the same seed over the same data gives the same checksum on both.

Everything here returns raw per-sample cycles and the checksums; the experiment module turns
them into rows, and the tests check the checksums against each other and against the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlab._errors import VlabError
from vlab.vmm import hostkernels as hk
from vlab.vmm.payloads import P_CR3_ALT
from vlab.vmm.machine import DEFAULT_PT_POOL, Machine, pt_pool_for

PAGE = {"4k": 4096, "2m": 2 << 20, "1g": 1 << 30}
BACKING_PAGE = {"4k": 4096, "thp": 2 << 20, "hugetlb-2m": 2 << 20, "hugetlb-1g": 1 << 30}
CHASE_STRIDE = 64           # PK_CHASE_STRIDE: one ring node per cache line
SALT = 0x5EED
SEED = 0x1234567

# operations of native/guest/payloads/paging.c
OP_WARM, OP_RANDOM_READ, OP_CHASE, OP_FIRST_TOUCH, OP_PTE_UPDATE, OP_CR3_SWITCH = range(1, 7)
PTE_MODES = {"remap": 0, "unmap_map": 1}
MAX_SAMPLES_PER_RUN = 4096

_MASK = (1 << 64) - 1


def region_bytes(wss: int, guest_page: str | None, backing: str) -> int:
    """Bytes to allocate for a working set: wss rounded up to the guest page and backing page."""
    unit = max(PAGE.get(guest_page or "4k", 4096), BACKING_PAGE[backing])
    return -(-int(wss) // unit) * unit


def effective_page(guest_page: str | None, backing: str, where: str) -> int:
    """What one TLB entry maps: the backing page natively; under shadow or nested paging the
    smaller of the guest page and the backing page (a larger guest page is splintered)."""
    if where == "native":
        return BACKING_PAGE[backing]
    return min(PAGE[guest_page or "4k"], BACKING_PAGE[backing])


def word(index: int, salt: int = SALT) -> int:
    """pk_word: what word `index` of a filled region holds."""
    return hk.paging_word(index, salt)


def lcg(state: int) -> int:
    """pk_lcg, for checking the state a kernel hands back."""
    return (state * 6364136223846793005 + 1442695040888963407) & _MASK


# ---------------------------------------------------------------------------- host memory

class NativeMem(hk.HostMemory):
    """Host memory with a chosen backing (4k, thp, hugetlb-2m, hugetlb-1g), for where=native."""

    def __init__(self, size: int, backing: str):
        if backing not in BACKING_PAGE:
            raise VlabError(f"backing {backing!r} is not one of {', '.join(BACKING_PAGE)}")
        super().__init__(size, backing)


def thp_fraction(ptr, nbytes: int) -> float | None:
    """Share of [ptr, ptr+nbytes) backed by transparent huge pages right now: the
    AnonHugePages of the mappings that overlap it (/proc/self/smaps), capped at nbytes.
    backing=thp only asks for huge pages; the kernel falls back to 4 KiB pages when it has no
    free 2 MiB block, and a row should say which it got. None when smaps is unreadable."""
    lo = hk.address(ptr)
    hi = lo + nbytes
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):
                    start, _, end = head.partition("-")
                    inside = int(start, 16) < hi and lo < int(end, 16)
                elif inside and head == "AnonHugePages:":
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return min(total, nbytes) / nbytes if nbytes else None


def fill(ptr, nbytes: int, salt: int = SALT) -> None:
    hk.paging_fill(ptr, nbytes // 8, salt)


def chase_nodes(wss: int) -> int:
    return max(1, int(wss) // CHASE_STRIDE)


def build_ring(ptr, wss: int, seed: int = SEED) -> int:
    """A Sattolo ring (one cycle through every node) over `wss` bytes; returns the node count."""
    n = chase_nodes(wss)
    hk.paging_chase_build(ptr, n, CHASE_STRIDE, seed)
    return n


def touch_read(ptr, nbytes: int) -> int:
    """Read one word per 4 KiB page (faults every page in); returns the sum read."""
    return hk.paging_touch_read(ptr, nbytes // 4096, 4096)


def reset(ptr, nbytes: int, populate: bool) -> None:
    """Drop the pages (and any guest translation of them); re-populate them host-side if asked."""
    hk.paging_mem_reset(ptr, nbytes, populate)


def native_random_read(ptr, nwords: int, n: int, samples: int, seed: int = SEED):
    """(cycles per sample, checksum, final LCG state) of `samples` samples of n reads."""
    return hk.paging_random_read(ptr, nwords, n, samples, seed)


def native_chase(ptr, n: int, samples: int, start: int = 0):
    """(cycles per sample, final offset, checksum) of `samples` samples of n dependent loads."""
    return hk.paging_chase(ptr, n, samples, start)


def native_touch_write(ptr, npages: int, stride: int = 4096, salt: int = SALT):
    """(cycles, checksum) of writing one word in each of npages pages."""
    return hk.paging_touch_write(ptr, npages, stride, salt)


# ---------------------------------------------------------------------------- guest rig

@dataclass
class GuestResult:
    samples: np.ndarray        # per-sample values (possibly several per sample, flattened)
    tail: list[int]            # the checksums after them


class GuestRig:
    """A Machine running the `paging` payload with one data slot of `size` bytes (`backing`,
    identity-mapped with `guest_page` pages) at VLAB_GPA_DATA."""

    def __init__(self, size: int, guest_page: str = "4k", backing: str = "4k", *,
                 preset_ad: bool = True, dirty_log: bool = False, extra_pt: int = 0,
                 kvm=None):
        ps = PAGE[guest_page]
        pool = max(DEFAULT_PT_POOL, pt_pool_for(size, ps) + extra_pt)
        self.m = Machine("paging", kvm=kvm, pt_pool=pool, preset_ad=True, mmio=False)
        try:
            self.slot = self.m.add_data(size, backing=backing, guest_page=guest_page,
                                        preset_ad=preset_ad, dirty_log=dirty_log)
        except BaseException:
            self.m.close()
            raise
        self.size = size
        self.page = ps
        self.guest_page = guest_page
        self.backing = backing
        self.base = self.slot.gpa
        self.hva = hk.slot_ptr(self.slot)
        self.tsc_khz = self.m.vcpus[0].tsc_khz or 1

    def run(self, *args: int, expect: int, timeout: float = 120.0) -> np.ndarray:
        """Run one payload operation to done; its results must number exactly `expect`."""
        m = self.m
        m.restart()
        m.set_args(*args)
        m.run_to_done(timeout=timeout)
        out = m.results(0)
        if len(out) != expect:
            raise VlabError(f"paging payload op {args[0]} recorded {len(out)} values, "
                            f"expected {expect}")
        return out

    def timeout_for(self, cycles: float) -> float:
        """A watchdog budget for work estimated at `cycles` guest cycles: generous, bounded."""
        return min(600.0, 30.0 + 4.0 * cycles / (self.tsc_khz * 1e3))

    def warm(self, nbytes: int | None = None) -> int:
        """Read one word per 4 KiB page so that every page has a translation; returns the sum."""
        n = (nbytes or self.size) // 4096
        return int(self.run(OP_WARM, self.base, n, 4096, expect=1,
                            timeout=self.timeout_for(n * 50_000))[0])

    def random_read(self, nwords: int, n: int, samples: int, seed: int = SEED):
        out = self.run(OP_RANDOM_READ, self.base, nwords, n, samples, seed, expect=samples + 2,
                       timeout=self.timeout_for(samples * n * 1000))
        return [int(x) for x in out[:samples]], int(out[samples]), int(out[samples + 1])

    def chase(self, n: int, samples: int, start: int = 0):
        out = self.run(OP_CHASE, self.base, start, n, samples, expect=samples + 2,
                       timeout=self.timeout_for(samples * n * 2000))
        return [int(x) for x in out[:samples]], int(out[samples]), int(out[samples + 1])

    def first_touch(self, npages: int, stride: int, clear_ad: bool, salt: int = SALT):
        """(cycles, checksum, leaf entries whose A/D bits were cleared) of one first-touch pass."""
        out = self.run(OP_FIRST_TOUCH, self.base, npages, stride, salt, int(clear_ad), expect=3,
                       timeout=self.timeout_for(npages * 200_000))
        return int(out[0]), int(out[1]), int(out[2])

    def pte_update(self, npages: int, samples: int, mode: str, salt: int = SALT) -> np.ndarray:
        """Per sample [pte write, invlpg, read, no-op gate] cycle sums over npages pages; the
        data slot must hold 2 * npages guest pages (frames A, then frames B)."""
        out = self.run(OP_PTE_UPDATE, self.base, npages, self.page, npages * self.page, samples,
                       PTE_MODES[mode], salt, expect=4 * samples,
                       timeout=self.timeout_for(samples * npages * 2_000_000))
        return out.reshape(samples, 4)

    def add_alt_space(self, npages: int) -> int:
        """A second address space: the system area as the first one maps it, and the first
        npages guest pages of the data slot's virtual range mapped to the frames after them.
        Advertised to the guest in P_CR3_ALT."""
        m = self.m
        root = m.vm.create_address_space()
        m.vm.map(root, 0x1000, 0x1000, m.sys.size - 0x1000, 4096, preset_ad=True)
        span = npages * self.page
        m.vm.map(root, self.base, self.base + span, span, self.page, preset_ad=True)
        m.params[P_CR3_ALT] = root
        return root

    def cr3_switch(self, npages: int, ops: int, samples: int, salt: int = SALT) -> np.ndarray:
        """Per sample [switch, read, no-op gate] cycle sums over `ops` switches."""
        out = self.run(OP_CR3_SWITCH, self.base, npages, self.page, npages * self.page, ops,
                       samples, salt, expect=3 * samples,
                       timeout=self.timeout_for(samples * ops * (npages * 20_000 + 2_000_000)))
        return out.reshape(samples, 3)

    def close(self) -> None:
        self.m.close()
