"""Dirty-page tracking on a running Machine, in each of the three ways KVM offers.

* ``bitmap``: ``KVM_GET_DIRTY_LOG`` returns a slot's bitmap and, in the same call, clears it and
  write-protects the pages again.
* ``clear``: with ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (enabled with INITIALLY_SET), GET only
  copies the bitmap; ``KVM_CLEAR_DIRTY_LOG`` re-protects, here in chunks of
  ``clear_chunk_pages`` (0: one call per slot), skipping chunks with nothing dirty.
* ``ring``: ``KVM_CAP_DIRTY_LOG_RING(_ACQ_REL)``: every vCPU pushes (slot, page) entries into its
  ring; the harvest reads them and ``KVM_RESET_DIRTY_RINGS`` re-protects. When a ring fills, the
  vCPU leaves KVM_RUN with ``KVM_EXIT_DIRTY_RING_FULL``; whoever runs the vCPU calls
  `DirtyTracker.on_ring_full` (collect + reset) and re-enters (`VcpuThread(on_ring_full=...)`).
  What it collected is added to the next `harvest`, so no entry is lost or counted in the wrong
  interval. Every entry is validated: one naming a slot the VM does not have, or a page beyond
  its slot, is an error, never skipped.

`DirtyTracker` is the one tracker, for a dirty-rate measurement and for a live migration alike:
``start()`` turns logging on for the slots, ``harvest()`` returns what was dirtied since the
previous harvest (per slot, as bitmaps of 4 KiB pages) with the cost of each ioctl, and
``stop()`` turns logging off. A migration uses ``dirty_sets()`` (the same harvest, as sorted
page indices per slot) and, in clear mode, re-protects each batch with ``clear()`` right before
it copies it. It is thread-safe: the vCPU thread may handle a full ring while another thread
harvests.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from vlab._bits import bitmap_pages, pages_bitmap, popcount
from vlab._errors import KvmError, MissingCapability, UsageError, VlabError
from vlab.vmm.memory import MemorySlot
from vlab.dirty.modes import MODES
from vlab.vmm.vm import Vm

RING_ENTRY_BYTES = 16            # struct kvm_dirty_gfn
MANUAL_PROTECT_ENABLE = 1        # KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
MANUAL_INITIALLY_SET = 2         # KVM_DIRTY_LOG_INITIALLY_SET
_HARVEST_CHUNK = 65536           # entries read per native call (the largest ring KVM allows)


@dataclass
class Harvest:
    """What one harvest collected and what it cost.

    `bitmaps[slot_id]` has one bit per 4 KiB page of the slot (uint64 words). Times are host
    CLOCK_MONOTONIC nanoseconds: `get_ns` (KVM_GET_DIRTY_LOG; in bitmap mode that call also
    re-protects), `clear_ns` (KVM_CLEAR_DIRTY_LOG, `clear_calls` of them), `collect_ns` (reading
    ring entries), `reset_ns` (KVM_RESET_DIRTY_RINGS). `ring_full_exits` counts the
    KVM_EXIT_DIRTY_RING_FULL exits handled since the previous harvest; their entries and costs
    are included here.
    """
    bitmaps: dict[int, np.ndarray]
    get_ns: int = 0
    clear_ns: int = 0
    clear_calls: int = 0
    collect_ns: int = 0
    reset_ns: int = 0
    ring_entries: int = 0
    ring_full_exits: int = 0
    slot_ns: dict[int, int] = field(default_factory=dict)

    @property
    def total_ns(self) -> int:
        return self.get_ns + self.clear_ns + self.collect_ns + self.reset_ns

    def count(self, slot_id: int | None = None) -> int:
        """Dirty pages in one slot, or in all of them."""
        if slot_id is not None:
            return popcount(self.bitmaps[slot_id])
        return sum(popcount(b) for b in self.bitmaps.values())

    def pages(self, slot_id: int) -> np.ndarray:
        """Sorted page indices (4 KiB pages from the slot start) dirtied in one slot."""
        return bitmap_pages(self.bitmaps[slot_id])

    def sets(self, slots: list[MemorySlot]) -> list[np.ndarray]:
        """Per slot of `slots` (in that order), the sorted page indices (uint64) dirtied."""
        return [bitmap_pages(self.bitmaps[s.id], s.pages) for s in slots]


class DirtyTracker:
    """Dirty logging for some (default: all) memory slots of a VM, in one mode.

    Create it before anything enables dirty logging on the VM's slots: in ``clear`` mode it
    checks for and enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (INITIALLY_SET) right away, which
    KVM wants before slots are logged. ``ring`` mode needs the VM created with a dirty ring
    (``Machine(dirty_ring=bytes)``). The vCPU loop must call `on_ring_full` whenever the vCPU
    stops with ``dirty_ring_full`` and then run it again (`VcpuThread(on_ring_full=...)` does).

    Running totals over the tracker's life: `harvest_ns` (wall time inside harvests),
    `clear_ns` (inside `clear`), `ring_entries`, `ring_full_exits`.
    """

    def __init__(self, vm: Vm, mode: str, *, slots: list[MemorySlot] | None = None,
                 clear_chunk_pages: int = 0):
        if mode not in MODES:
            raise UsageError(f"dirty tracking mode must be one of {', '.join(MODES)}, "
                             f"not {mode!r}")
        if clear_chunk_pages < 0 or clear_chunk_pages % 64:
            raise UsageError(f"clear_chunk_pages must be 0 or a multiple of 64, "
                             f"not {clear_chunk_pages}")
        self.vm = getattr(vm, "vm", vm)          # a Machine or a Vm
        self.mode = mode
        self.slots = list(slots) if slots is not None else list(self.vm.slots)
        self.clear_chunk_pages = int(clear_chunk_pages)
        self.active = False
        self.harvest_ns = 0
        self.clear_ns = 0
        self.ring_entries = 0
        self.ring_full_exits = 0
        self._lock = threading.Lock()
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_cost = [0, 0, 0, 0]        # collect_ns, reset_ns, entries, exits
        if mode == "clear":
            if not self.vm.check_cap("MANUAL_DIRTY_LOG_PROTECT2"):
                raise MissingCapability("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "dirty mode clear")
            self.vm.enable_cap("MANUAL_DIRTY_LOG_PROTECT2",
                               MANUAL_PROTECT_ENABLE | MANUAL_INITIALLY_SET)
        if mode == "ring":
            if not self.vm.vcpus:
                raise UsageError("dirty mode ring: the VM has no vCPUs (rings are per vCPU)")
            try:
                self.vm.vcpus[0].dirty_ring_harvest(0)
            except KvmError:
                raise UsageError("dirty mode ring needs the VM created with a dirty ring "
                                 "(Machine(dirty_ring=bytes))") from None

    # ---- on / off ----
    def start(self) -> None:
        """Turn dirty logging on for the slots.

        In clear mode KVM starts with every page's bit set and nothing write-protected
        (INITIALLY_SET): the first harvest reports every page, and a migration re-protects
        them batch by batch as it copies them in its first round. Harvest once and drop the
        result to start from a clean state instead."""
        for s in self.slots:
            s.set_flags(dirty_log=True)
        self.active = True

    def stop(self) -> None:
        """Turn dirty logging off (pages are left writable); what the rings still hold is
        collected, the rings reset, and dropped with everything pending."""
        if self.vm.closed or not self.active:
            return
        self.active = False
        for s in self.slots:
            s.set_flags(dirty_log=False)
        if self.mode == "ring":
            with self._lock:
                self._collect()
                self.vm.reset_dirty_rings()
                self._pending.clear()
                self._pending_cost = [0, 0, 0, 0]

    # ---- harvesting ----
    def on_ring_full(self) -> None:
        """Handle KVM_EXIT_DIRTY_RING_FULL on the vCPU thread: collect every ring, reset them.

        What is collected is kept for the next `harvest`."""
        if self.mode != "ring":
            raise VlabError(f"KVM_EXIT_DIRTY_RING_FULL in dirty mode {self.mode}")
        with self._lock:
            slots, offs, t_col = self._collect()
            t0 = time.monotonic_ns()
            self.vm.reset_dirty_rings()
            t_reset = time.monotonic_ns() - t0
            self._pending.append((slots, offs))
            c = self._pending_cost
            c[0] += t_col
            c[1] += t_reset
            c[2] += len(slots)
            c[3] += 1
            self.ring_full_exits += 1

    def harvest(self, *, clear: bool = True) -> Harvest:
        """Pages dirtied since the previous harvest, per slot, and re-protect them.

        clear mode with `clear=False`: only read the bitmaps (KVM_GET_DIRTY_LOG); the pages stay
        reported, and writable, until the caller re-protects them with `clear` (a migration
        does so batch by batch, right before it copies them)."""
        t0 = time.monotonic_ns()
        with self._lock:
            if self.mode == "ring":
                h = self._harvest_ring()
            else:
                h = self._harvest_bitmaps(clear)
        self.harvest_ns += time.monotonic_ns() - t0
        return h

    def dirty_sets(self, clear_all: bool = False) -> list[np.ndarray]:
        """`harvest` as a migration wants it: per slot (in the order of `slots`), the sorted
        page indices (uint64) written since the last harvest; in clear mode since they were
        last cleared, and `clear_all` re-protects all of them at once."""
        return self.harvest(clear=clear_all).sets(self.slots)

    def clear(self, pos: int, idx: np.ndarray) -> None:
        """clear mode: re-protect the pages `idx` (sorted) of slot `self.slots[pos]` before
        they are copied. One KVM_CLEAR_DIRTY_LOG over the 64-page-aligned span they cover."""
        if self.mode != "clear" or not self.active or not len(idx):
            return
        t0 = time.monotonic_ns()
        s = self.slots[pos]
        first = int(idx[0]) & ~63
        num = min((int(idx[-1]) - first) // 64 * 64 + 64, s.pages - first)
        self.vm.clear_dirty_log(s, pages_bitmap(np.asarray(idx).astype(np.int64) - first, num),
                                first, num)
        self.clear_ns += time.monotonic_ns() - t0

    def _harvest_bitmaps(self, clear: bool) -> Harvest:
        h = Harvest({})
        for s in self.slots:
            t0 = time.monotonic_ns()
            bm = self.vm.get_dirty_log(s)
            t1 = time.monotonic_ns()
            h.get_ns += t1 - t0
            if self.mode == "clear" and clear:
                h.clear_calls += self._clear(s, bm)
                h.clear_ns += time.monotonic_ns() - t1
            h.slot_ns[s.id] = time.monotonic_ns() - t0
            h.bitmaps[s.id] = bm
        return h

    def _clear(self, s: MemorySlot, bm: np.ndarray) -> int:
        """KVM_CLEAR_DIRTY_LOG for the dirty pages of `bm`, chunk by chunk. Returns calls."""
        pages = s.pages
        chunk = self.clear_chunk_pages or pages
        calls = 0
        for first in range(0, pages, chunk):
            n = min(chunk, pages - first)
            part = bm[first // 64:(first + n + 63) // 64]
            if part.any():
                self.vm.clear_dirty_log(s, part, first, n)
                calls += 1
        return calls

    def _collect(self) -> tuple[np.ndarray, np.ndarray, int]:
        t0 = time.monotonic_ns()
        got_s, got_o = [], []
        for v in self.vm.vcpus:
            while True:
                sl, off = v.dirty_ring_harvest(_HARVEST_CHUNK)
                got_s.append(sl)
                got_o.append(off)
                if len(sl) < _HARVEST_CHUNK:
                    break
        slots = np.concatenate(got_s) if got_s else np.zeros(0, np.uint32)
        offs = np.concatenate(got_o) if got_o else np.zeros(0, np.uint64)
        return slots, offs, time.monotonic_ns() - t0

    def _harvest_ring(self) -> Harvest:
        slots, offs, t_col = self._collect()
        t0 = time.monotonic_ns()
        self.vm.reset_dirty_rings()
        t_reset = time.monotonic_ns() - t0
        pend_s = [p[0] for p in self._pending] + [slots]
        pend_o = [p[1] for p in self._pending] + [offs]
        c = self._pending_cost
        h = Harvest({}, collect_ns=t_col + c[0], reset_ns=t_reset + c[1],
                    ring_entries=len(slots) + c[2], ring_full_exits=c[3])
        self._pending.clear()
        self._pending_cost = [0, 0, 0, 0]
        self.ring_entries += h.ring_entries
        all_s = np.concatenate(pend_s)
        all_o = np.concatenate(pend_o)
        _validate_ring(all_s, all_o, {s.id: s.pages for s in self.vm.slots})
        for s in self.slots:
            h.bitmaps[s.id] = pages_bitmap(all_o[all_s == s.id], s.pages)
        return h


def _validate_ring(slots: np.ndarray, offs: np.ndarray, pages: dict[int, int]) -> None:
    """Every ring entry must name a slot of the VM (`pages`: slot id -> its pages) and a page
    inside it; anything else is KVM or memory gone wrong, and an error, never skipped. (The
    ring names a slot as (address space << 16) | slot id; vlab uses address space 0 only.)"""
    for sid in np.unique(slots):
        n = pages.get(int(sid))
        if n is None:
            raise VlabError(f"dirty ring entry names unknown slot {int(sid):#x}")
        o = offs[slots == sid]
        if int(o.max()) >= n:
            raise VlabError(f"dirty ring entry offset {int(o.max())} is beyond slot {int(sid)} "
                            f"({n} pages)")
