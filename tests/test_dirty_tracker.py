"""The one dirty tracker as live migration uses it (dirty_sets, clear, stop), its ring-entry
validation, and the page-bitmap helpers every user of dirty pages shares."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_kvm

PAGE = 4096


# ---- the bitmap helpers (no KVM) ----

def test_bitmap_helpers_round_trip_and_count():
    from vlab._bits import bit_counts, bitmap_pages, pages_bitmap, popcount

    pages = np.array([0, 1, 63, 64, 65, 130, 199], dtype=np.uint64)
    bm = pages_bitmap(pages, 200)
    assert bm.dtype == np.uint64 and bm.size == 4
    assert bitmap_pages(bm).tolist() == pages.tolist()
    assert bitmap_pages(bm, 100).tolist() == [0, 1, 63, 64, 65]
    assert bitmap_pages(bm).dtype == np.uint64
    assert popcount(bm) == 7
    rows = np.stack([bm, pages_bitmap(np.array([5]), 200), np.zeros(4, np.uint64)])
    assert popcount(rows, axis=1).tolist() == [7, 1, 0]
    assert bit_counts(np.array([0, 1, 3, 2**64 - 1], dtype=np.uint64)).tolist() == [0, 1, 2, 64]


def test_one_popcount_and_one_pair_of_bitmap_helpers():
    """The dirty package, the analysis models and migration use the helpers of vlab._bits."""
    import vlab._bits as bits
    import vlab.analysis.dirty as ad
    import vlab.dirty as vd

    assert vd.popcount is bits.popcount and ad.popcount is bits.popcount
    assert vd.bitmap_pages is bits.bitmap_pages and vd.pages_bitmap is bits.pages_bitmap


@pytest.mark.parametrize("slots, offs, match", [
    ([1, 0x10001], [0, 0], "unknown slot 0x10001"),     # another address space
    ([7], [0], "unknown slot 0x7"),
    ([1, 1], [3, 16], "offset 16 is beyond slot 1"),
])
def test_a_bad_ring_entry_is_an_error(slots, offs, match):
    from vlab._errors import VlabError
    from vlab.dirty.tracker import _validate_ring

    with pytest.raises(VlabError, match=match):
        _validate_ring(np.array(slots, np.uint32), np.array(offs, np.uint64), {0: 8, 1: 16})


def test_good_ring_entries_pass():
    from vlab.dirty.tracker import _validate_ring

    _validate_ring(np.array([0, 1, 1], np.uint32), np.array([7, 0, 15], np.uint64), {0: 8, 1: 16})
    _validate_ring(np.zeros(0, np.uint32), np.zeros(0, np.uint64), {0: 8})


# ---- under KVM ----

def _rig(kvm, mode: str):
    from vlab import Machine
    from vlab.dirty import DirtyTracker

    m = Machine(kvm=kvm, dirty_ring=65536 if mode == "ring" else 0)
    slot = m.add_data(2 << 20)
    return m, slot, DirtyTracker(m.vm, mode, slots=[slot])


def _write(m, slot, page: int) -> None:
    from vlab.vmm.payloads import MICRO_OPS

    m.restart()
    m.set_args(MICRO_OPS["write_word"], 0, 0, slot.gpa + page * PAGE + 8, 0xD1D7 + page)
    m.run_to_done(timeout=10)


@needs_kvm
@pytest.mark.parametrize("mode", ["bitmap", "clear", "ring"])
def test_dirty_sets_report_exactly_the_pages_written(kvm, mode):
    m, slot, tr = _rig(kvm, mode)
    with m:
        tr.start()
        if mode == "clear":
            first = tr.dirty_sets()           # INITIALLY_SET: every page, nothing protected
            assert first[0].tolist() == list(range(slot.pages))
            tr.clear(0, first[0])
        else:
            assert tr.dirty_sets()[0].tolist() == []
        for p in (3, 200, 511):
            _write(m, slot, p)
        sets = tr.dirty_sets()
        assert len(sets) == 1 and sets[0].dtype == np.uint64
        assert sets[0].tolist() == [3, 200, 511]
        if mode == "clear":
            # not re-protected yet: reported again; clear() re-protects just that batch
            assert tr.dirty_sets()[0].tolist() == [3, 200, 511]
            tr.clear(0, np.array([3, 200], np.uint64))
            assert tr.dirty_sets()[0].tolist() == [511]
            assert tr.dirty_sets(clear_all=True)[0].tolist() == [511]
        assert tr.dirty_sets()[0].tolist() == []
        _write(m, slot, 42)
        assert tr.dirty_sets()[0].tolist() == [42]
        assert tr.harvest_ns > 0
        tr.stop()
        assert not tr.active


@needs_kvm
def test_ring_stop_drops_what_the_rings_still_hold(kvm):
    m, slot, tr = _rig(kvm, "ring")
    with m:
        tr.start()
        _write(m, slot, 9)
        tr.stop()
        tr.start()
        assert tr.dirty_sets()[0].tolist() == []
        _write(m, slot, 10)
        assert tr.dirty_sets()[0].tolist() == [10]
        assert tr.ring_entries >= 1


@needs_kvm
@pytest.mark.parametrize("slot_id, off, match", [
    (0x10000, 0, "unknown slot"),            # address space 1: vlab has none
    (None, 1 << 20, "beyond slot"),
])
def test_a_corrupted_ring_entry_fails_the_harvest(kvm, slot_id, off, match):
    """An entry collected at a full ring (kept for the next harvest) that names a slot the VM
    lacks or a page beyond its slot fails the harvest instead of being skipped."""
    from vlab._errors import VlabError

    m, slot, tr = _rig(kvm, "ring")
    with m:
        tr.start()
        _write(m, slot, 1)
        tr.on_ring_full()                    # collects the good entry and resets the ring
        sid = slot.id if slot_id is None else slot_id
        tr._pending.append((np.array([sid], np.uint32), np.array([off], np.uint64)))
        with pytest.raises(VlabError, match=match):
            tr.dirty_sets()


@needs_kvm
def test_clear_mode_checks_the_capability_and_ring_mode_the_ring(kvm):
    from vlab import Machine
    from vlab._errors import UsageError
    from vlab.dirty import DirtyTracker

    with Machine(kvm=kvm) as m:
        assert m.vm.check_cap("MANUAL_DIRTY_LOG_PROTECT2")   # what clear mode checks first
        DirtyTracker(m.vm, "clear")
        with pytest.raises(UsageError, match="dirty ring"):
            DirtyTracker(m.vm, "ring")
        with pytest.raises(UsageError, match="mode"):
            DirtyTracker(m.vm, "rings")
