"""Dirty-page tracking on a running Machine, in each of the three ways KVM offers.

* ``bitmap``: ``KVM_GET_DIRTY_LOG`` returns a slot's bitmap and, in the same call, clears it and
  write-protects the pages again.
* ``clear``: with ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (enabled with INITIALLY_SET), GET only
  copies the bitmap; ``KVM_CLEAR_DIRTY_LOG`` re-protects, here in chunks of
  ``clear_chunk_pages`` (0: one call per slot), skipping chunks with nothing dirty.
* ``ring``: ``KVM_CAP_DIRTY_LOG_RING(_ACQ_REL)``: every vCPU pushes (slot, page) entries into its
  ring; the harvest reads them and ``KVM_RESET_DIRTY_RINGS`` re-protects. When a ring fills, the
  vCPU leaves KVM_RUN with ``KVM_EXIT_DIRTY_RING_FULL``; whoever runs the vCPU calls
  `DirtyTracker.on_ring_full` (collect + reset) and re-enters. What it collected is added to the
  next `harvest`, so no entry is lost or counted in the wrong interval.

`DirtyTracker` is what a migration or a dirty-rate measurement needs: ``start()`` turns logging on
for the slots and discards what was dirty before, ``harvest()`` returns what was dirtied since
the previous harvest (per slot, as bitmaps of 4 KiB pages) with the cost of each ioctl, and
``stop()`` turns logging off. It is thread-safe: the vCPU thread may handle a full ring while
another thread harvests.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from vlab._errors import MissingCapability, UsageError, VlabError
from vlab.vmm.kvm import KvmError, MemorySlot, Vm

MODES = ("bitmap", "clear", "ring")
RING_ENTRY_BYTES = 16            # struct kvm_dirty_gfn
MANUAL_PROTECT_ENABLE = 1        # KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
MANUAL_INITIALLY_SET = 2         # KVM_DIRTY_LOG_INITIALLY_SET
_HARVEST_CHUNK = 65536           # entries read per native call (the largest ring KVM allows)


def popcount(words: np.ndarray) -> int:
    """Set bits in a uint64 array."""
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(words).sum(dtype=np.int64))
    return int(np.unpackbits(np.ascontiguousarray(words).view(np.uint8)).sum(dtype=np.int64))


def bitmap_pages(words: np.ndarray, n_pages: int | None = None) -> np.ndarray:
    """Indices of the set bits of a uint64 bitmap (bit i of word w = page 64*w + i)."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")
    if n_pages is not None:
        bits = bits[:n_pages]
    return np.flatnonzero(bits)


def pages_bitmap(pages: np.ndarray, n_pages: int) -> np.ndarray:
    """The uint64 bitmap (ceil(n_pages/64) words) with the given page indices set."""
    words = (n_pages + 63) // 64
    flags = np.zeros(words * 64, dtype=bool)
    flags[np.asarray(pages, dtype=np.int64)] = True
    return np.packbits(flags, bitorder="little").view(np.uint64)


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


class DirtyTracker:
    """Dirty logging for some (default: all) memory slots of a VM, in one mode.

    Create it before anything enables dirty logging on the VM's slots: in ``clear`` mode it
    enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (INITIALLY_SET) right away, which KVM wants before
    slots are logged. ``ring`` mode needs the VM created with a dirty ring
    (``Machine(dirty_ring=bytes)``). The vCPU loop must call `on_ring_full` whenever
    ``Vcpu.run`` stops with ``dirty_ring_full`` and then run the vCPU again.
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
        """Turn dirty logging on for the slots and start from a clean state."""
        for s in self.slots:
            s.set_flags(dirty_log=True)
        self.active = True
        self.harvest()          # drop what was dirty before (INITIALLY_SET: every page)

    def stop(self) -> None:
        """Turn dirty logging off (pages are left writable)."""
        if self.vm.closed:
            return
        for s in self.slots:
            s.set_flags(dirty_log=False)
        self.active = False

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

    def harvest(self) -> Harvest:
        """Pages dirtied since the previous harvest, per slot, and re-protect them."""
        with self._lock:
            if self.mode == "ring":
                return self._harvest_ring()
            return self._harvest_bitmaps()

    def _harvest_bitmaps(self) -> Harvest:
        h = Harvest({})
        for s in self.slots:
            t0 = time.monotonic_ns()
            bm = self.vm.get_dirty_log(s)
            t1 = time.monotonic_ns()
            h.get_ns += t1 - t0
            if self.mode == "clear":
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
        all_s = np.concatenate(pend_s)
        all_o = np.concatenate(pend_o)
        known = {s.id: s for s in self.vm.slots}
        # the ring names a slot as (address space << 16) | slot id; vlab uses address space 0
        bad = ~np.isin(all_s, np.array(list(known), dtype=np.uint32))
        if bad.any():
            raise VlabError(f"dirty ring entry names unknown slot {int(all_s[bad][0]):#x}")
        for s in self.slots:
            o = all_o[all_s == s.id]
            if o.size and int(o.max()) >= s.pages:
                raise VlabError(f"dirty ring entry offset {int(o.max())} is beyond slot {s.id} "
                                f"({s.pages} pages)")
            h.bitmaps[s.id] = pages_bitmap(o, s.pages)
        return h
