"""vlab.analysis.pagewalk: walk reference counts, the cost model and the TLB simulator."""
from __future__ import annotations

import pytest

from vlab._errors import UsageError
from vlab.analysis import pagewalk as pw


@pytest.fixture(scope="module", autouse=True)
def _warm_jit():
    pw.walk_refs("nested", "4K", "4K")
    pw.tlb_miss_rate(1 << 20, 4096, 64, 4, 100)


@pytest.mark.parametrize("page,refs", [("4K", 4), ("2M", 3), ("1G", 2)])
def test_native(page, refs):
    assert pw.walk_refs("native", page, page) == refs


@pytest.mark.parametrize("guest,host,refs", [
    ("4K", "4K", 24),
    ("2M", "4K", 19),   # (3+1)*(4+1)-1
    ("4K", "2M", 19),   # (4+1)*(3+1)-1
    ("2M", "2M", 15),
    ("1G", "1G", 8),
    ("4K", "1G", 14),
])
def test_nested(guest, host, refs):
    assert pw.walk_refs("nested", guest, host) == refs
    assert pw.walk_refs("ept", guest, host) == refs and pw.walk_refs("npt", guest, host) == refs


@pytest.mark.parametrize("guest", ["4K", "2M", "1G"])
@pytest.mark.parametrize("host", ["4K", "2M", "1G"])
def test_shadow_is_native_of_effective_page(guest, host):
    eff = guest if pw.PAGE_SIZES[guest] <= pw.PAGE_SIZES[host] else host
    assert pw.walk_refs("shadow", guest, host) == pw.walk_refs("native", eff)
    for pwc in (1, 2, 3):
        assert pw.walk_refs("shadow", guest, host, pwc) == pw.walk_refs("native", eff, pwc_levels=pwc)


def test_page_walk_cache_reduces_refs():
    assert pw.walk_refs("native", "4K", pwc_levels=2) == 2
    assert pw.walk_refs("native", "4K", pwc_levels=9) == 1        # the leaf is never cached
    assert pw.walk_refs("nested", "4K", "4K", 1) == (3 + 1) * (3 + 1) - 1
    assert pw.walk_refs("nested", "4K", "4K", 3) == 3             # (1+1)*(1+1)-1
    for mode in ("native", "nested", "shadow"):
        for g in ("4K", "2M"):
            counts = [pw.walk_refs(mode, g, "4K", p) for p in range(4)]
            assert counts[0] > counts[1] and all(x >= y for x, y in zip(counts, counts[1:]))


def test_five_level_paging():
    assert pw.walk_refs("native", "4K", levels=5) == 5
    assert pw.walk_refs("nested", "4K", "4K", levels=5) == 35


def test_bad_inputs():
    with pytest.raises(UsageError):
        pw.walk_refs("hybrid", "4K", "4K")
    with pytest.raises(UsageError):
        pw.walk_refs("native", "8K", "4K")
    with pytest.raises(UsageError):
        pw.walk_refs("native", "4K", "4K", -1)
    assert pw.page_bytes("2MiB") == 2 << 20 and pw.page_bytes(4096) == 4096


def test_model_table_covers_all_combinations():
    rows = pw.model_table(pwc_levels=(0, 2))
    assert len(rows) == 2 * (3 + 2 * 9)
    assert all(r["model"] is True for r in rows)
    nested = {(r["guest_page"], r["host_page"]): r["refs"] for r in rows
              if r["mode"] == "nested" and r["pwc_levels"] == 0}
    assert nested[("4K", "4K")] == 24 and nested[("2M", "2M")] == 15
    shadow = [r for r in rows if r["mode"] == "shadow" and r["guest_page"] == "2M"
              and r["host_page"] == "4K"]
    assert shadow[0]["effective_page"] == "4K"


def test_predicted_cycles_is_labelled_model():
    r = pw.predicted_cycles("nested", "4K", "4K", miss_rate=0.1, ref_cycles=10)
    assert r["model"] is True and r["refs"] == 24
    assert r["cycles_per_access"] == pytest.approx(0.1 * 24 * 10)
    s = pw.predicted_cycles("shadow", "4K", "4K", miss_rate=0.1, ref_cycles=10, base_cycles=5)
    assert s["cycles_per_access"] == pytest.approx(5 + 0.1 * 4 * 10)
    with pytest.raises(UsageError):
        pw.predicted_cycles("native", "4K", "4K", miss_rate=1.5, ref_cycles=10)


def test_tlb_within_reach_never_misses():
    entries, ways = 64, 4
    reach = entries * 4096
    assert pw.tlb_miss_rate(reach // 2, 4096, entries, ways, 50_000, seed=1) == 0.0
    assert pw.tlb_miss_rate(reach, 4096, entries, ways, 50_000, seed=1) == 0.0


def test_tlb_far_beyond_reach_always_misses():
    rate = pw.tlb_miss_rate(1 << 32, 4096, 64, 4, 50_000, seed=1)
    assert rate > 0.99
    # the analytic steady state of uniform random access: 1 - entries / pages
    mid = pw.tlb_miss_rate(64 * 4096 * 4, 4096, 64, 64, 200_000, seed=2)
    assert mid == pytest.approx(0.75, abs=0.02)


def test_tlb_deterministic_and_huge_pages_extend_reach():
    a = pw.tlb_miss_rate(64 << 20, 4096, 64, 4, 20_000, seed=7)
    assert a == pw.tlb_miss_rate(64 << 20, 4096, 64, 4, 20_000, seed=7)
    assert pw.tlb_miss_rate(64 << 20, 2 << 20, 64, 4, 20_000, seed=7) == 0.0
    curve = pw.tlb_miss_curve([1 << 18, 1 << 22, 1 << 26, 1 << 30], "4K", 64, 4, 20_000)
    rates = [r["miss_rate"] for r in curve]
    assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] > 0.99
    assert all(r["model"] for r in curve)


def test_predicted_curve_nested_costs_more_than_shadow():
    wss = [1 << 17, 1 << 28]   # within the 256 KiB reach, far beyond it
    nested = pw.predicted_curve("nested", "4K", "4K", wss, entries=64, ways=4, n_accesses=20_000)
    shadow = pw.predicted_curve("shadow", "4K", "4K", wss, entries=64, ways=4, n_accesses=20_000)
    assert nested[0]["cycles_per_access"] == 0.0
    assert nested[1]["cycles_per_access"] == pytest.approx(6 * shadow[1]["cycles_per_access"])
    huge = pw.predicted_curve("nested", "2M", "4K", wss, entries=64, ways=4, n_accesses=20_000)
    assert huge[1]["tlb_page_bytes"] == 4096   # splintered by the 4K backing
