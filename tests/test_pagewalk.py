"""The page-walk model (vlab.analysis.pagewalk) against the published reference counts.

Bhargava et al. (ASPLOS 2008): a native 4-level walk reads 4 entries; a two-dimensional
(nested) walk of 4 KiB guest pages on 4 KiB host pages reads up to 24, because each of the 4
guest entries and the final guest-physical address need a 4-reference host walk:
(4 + 1) * (4 + 1) - 1. Larger pages shorten each dimension.
"""
from __future__ import annotations

import pytest

from vlab._errors import UsageError
from vlab.analysis import pagewalk as pw


def test_published_counts_without_caches():
    assert pw.walk_refs("native", "4K") == 4
    assert pw.walk_refs("nested", "4K", "4K") == 24
    assert pw.walk_refs("ept", "4K", "4K") == pw.walk_refs("npt", "4K", "4K") == 24


@pytest.mark.parametrize("guest,host,refs", [
    ("2M", "4K", 19), ("4K", "2M", 19), ("2M", "2M", 15), ("1G", "1G", 8), ("4K", "1G", 14),
])
def test_huge_pages_shorten_the_nested_walk(guest, host, refs):
    assert pw.walk_refs("nested", guest, host) == refs
    assert refs < pw.walk_refs("nested", "4K", "4K")


def test_native_walk_per_page_size():
    assert [pw.walk_refs("native", p) for p in ("4K", "2M", "1G")] == [4, 3, 2]


def test_shadow_walks_the_effective_page_natively():
    # a 2 MiB guest page on 4 KiB backing is splintered: a 4 KiB walk
    assert pw.walk_refs("shadow", "2M", "4K") == pw.walk_refs("native", "4K") == 4
    assert pw.walk_refs("shadow", "2M", "2M") == 3
    assert pw.walk_refs("shadow", "4K", "1G") == 4
    assert pw.walk_refs("shadow", "1G", "1G") == 2


def test_page_walk_cache_skips_upper_levels_but_never_the_leaf():
    assert pw.walk_refs("nested", "4K", "4K", pwc_levels=1) == 15     # 3 x 3 per dimension
    assert pw.walk_refs("nested", "4K", "4K", pwc_levels=2) == 8
    assert pw.walk_refs("native", "4K", pwc_levels=3) == 1
    assert pw.walk_refs("native", "4K", pwc_levels=9) == 1              # capped at the leaf


def test_five_level_paging():
    assert pw.walk_refs("native", "4K", levels=5) == 5
    assert pw.walk_refs("nested", "4K", "4K", levels=5) == 35


def test_model_table_is_labelled_and_complete():
    rows = pw.model_table()
    assert all(r["model"] is True for r in rows)
    nested = {(r["guest_page"], r["host_page"]): r["refs"] for r in rows if r["mode"] == "nested"}
    assert nested[("4K", "4K")] == 24 and len(nested) == 9
    assert max(r["refs"] for r in rows) == 24 and min(r["refs"] for r in rows) == 2


def test_predicted_cycles_formula():
    out = pw.predicted_cycles("nested", "4K", "4K", miss_rate=0.5, ref_cycles=10,
                              base_cycles=7)
    assert out["refs"] == 24 and out["model"] is True
    assert out["cycles_per_access"] == pytest.approx(7 + 0.5 * 24 * 10)


def test_tlb_miss_rate_inside_and_far_beyond_reach():
    inside = pw.tlb_miss_rate(1 << 20, 4096, 1536, 12, 50_000)      # 256 pages, reach 6 MiB
    far = pw.tlb_miss_rate(1 << 32, 4096, 1536, 12, 50_000)         # 1 Mi pages
    assert inside == 0.0
    assert far == pytest.approx(1 - 1536 / (1 << 20), abs=0.01)
    # the same 1 GiB that misses with 4 KiB pages fits with 2 MiB pages (512 entries)
    assert pw.tlb_miss_rate(1 << 30, 4096, 1536, 12, 50_000) > 0.9
    assert pw.tlb_miss_rate(1 << 30, 2 << 20, 1536, 12, 50_000) == 0.0


def test_bad_inputs_are_usage_errors():
    with pytest.raises(UsageError):
        pw.walk_refs("bogus", "4K")
    with pytest.raises(UsageError):
        pw.walk_refs("native", "8K")
    with pytest.raises(UsageError):
        pw.tlb_miss_rate(0, 4096, 64, 4)
