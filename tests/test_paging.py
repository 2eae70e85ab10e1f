"""Paging suite: kernels under real KVM (exact pages, one-cycle ring, same code natively),
skip rules on recorded hosts, derived rows, and the CLI. No timings are asserted."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_kvm

ROOT = Path(__file__).resolve().parent.parent
HOSTS = Path(__file__).parent / "data" / "hosts"
MiB, GiB = 1 << 20, 1 << 30

PVM_KVM = {"api_version": 12, "tsc_khz": 2700000, "nr_vcpus": 2, "max_vcpus": 1024,
           "caps": {"IOEVENTFD": 1}}


def host(name: str) -> dict:
    from vlab import host as _host

    return _host.fingerprint(str(HOSTS / name), PVM_KVM)


def paging():
    from vlab.experiments import paging as mod
    return mod


def P():
    from vlab.experiments import _paging
    return _paging


# ----------------------------------------------------------------------- NumPy oracles

MASK = (1 << 64) - 1


def pk_words(idx: np.ndarray, salt: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return ((idx + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)) ^ (idx >> np.uint64(7))


def lcg_states(seed: int, n: int) -> np.ndarray:
    """s_1..s_n of pk_lcg from `seed`, vectorized: s_k = a^k s_0 + c (1 + a + ... + a^(k-1))."""
    a, c = np.uint64(6364136223846793005), np.uint64(1442695040888963407)
    with np.errstate(over="ignore"):
        pows = np.cumprod(np.full(n, a, dtype=np.uint64), dtype=np.uint64)        # a^1..a^n
        geo = np.cumsum(np.concatenate(([np.uint64(1)], pows[:-1])), dtype=np.uint64) * c
        return pows * np.uint64(seed) + geo


def scale(s: np.ndarray, n: int) -> np.ndarray:
    """pk_scale: high 64 bits of s * n, for n < 2**32, in uint64 arithmetic."""
    hi, lo = s >> np.uint64(32), s & np.uint64(0xFFFFFFFF)
    with np.errstate(over="ignore"):
        return (hi * np.uint64(n) + ((lo * np.uint64(n)) >> np.uint64(32))) >> np.uint64(32)


def expected_random_read(nwords: int, n: int, seed: int, salt: int) -> tuple[int, int, np.ndarray]:
    s = lcg_states(seed, n)
    idx = scale(s, nwords)
    return int(pk_words(idx, salt).sum(dtype=np.uint64)), int(s[-1]), idx


def ring_order(mem: np.ndarray, nodes: int, stride: int) -> list[int]:
    """Node indices visited from node 0 until the ring closes (or nodes + 1 steps)."""
    nxt = mem.view(np.uint64)[: nodes * stride // 8: stride // 8] // np.uint64(stride)
    seen, i = [], 0
    for _ in range(nodes + 1):
        seen.append(i)
        i = int(nxt[i])
        if i == 0:
            break
    return seen


# ----------------------------------------------------------------------- no KVM needed

def test_numpy_oracles_match_the_c_kernels():
    p = P()
    idx = np.array([0, 1, 7, 128, 12345, 1 << 28], dtype=np.uint64)
    assert [int(x) for x in pk_words(idx, p.SALT)] == [p.word(int(i)) for i in idx]
    s = p.SEED
    states = lcg_states(p.SEED, 5)
    for k in range(5):
        s = p.lcg(s)
        assert int(states[k]) == s
    assert paging().lcg_jump(p.SEED, 5) == s
    assert paging().lcg_jump(p.SEED, 0) == p.SEED


def test_both_builds_include_the_same_kernel_file():
    header = (ROOT / "native" / "kernels" / "paging_kernels.h").resolve()
    users = [ROOT / "native" / "guest" / "payloads" / "paging.c",
             ROOT / "native" / "vmm" / "paging_native.c"]
    for src in users:
        includes = re.findall(r'^#include "([^"]*paging_kernels\.h)"', src.read_text(), re.M)
        assert len(includes) == 1, src
        assert (src.parent / includes[0]).resolve() == header
    # and neither side carries a private copy of a kernel
    for src in users:
        text = src.read_text()
        for fn in ("pk_random_read", "pk_chase", "pk_touch_write", "pk_chase_build"):
            assert not re.search(rf"^static[^;]*\b{fn}\s*\(", text, re.M), (src, fn)


def test_grid_normalizes_page_names_and_drops_guest_params_natively():
    from vlab.run import registry as _experiment
    from vlab.run.registry import parse_param

    exp = _experiment.get("paging.first_touch")
    _, pages = parse_param("guest_page=2m,4K")
    _, backing = parse_param("backing=4k,thp")
    assert pages == [2 << 20, 4096]                      # how -p parses them
    grid = exp.grid(overrides={"wss": [4 * MiB], "guest_page": pages, "backing": backing,
                               "prefault": [True], "preset_ad": [True, False]})
    guest = [g for g in grid if g["where"] == "guest"]
    native = [g for g in grid if g["where"] == "native"]
    assert {g["guest_page"] for g in guest} == {"2m", "4k"}
    assert len(guest) == 2 * 2 * 2
    assert all("guest_page" not in g and "preset_ad" not in g for g in native)
    assert len(native) == 2                              # one per backing, no duplicates


@pytest.mark.parametrize("bad", [0, -1, -4096, "abc", 1.5, True])
def test_bad_wss_is_a_usage_error(bad):
    from vlab._errors import UsageError

    with pytest.raises(UsageError, match="wss"):
        paging().validate({"wss": bad, "where": "guest"}, {})


@pytest.mark.parametrize("params,word", [
    ({"guest_page": "8k"}, "guest_page"), ({"backing": "memfd"}, "backing"),
    ({"where": "cloud"}, "where"), ({"op": "flip"}, "op"), ({"pages": 0}, "pages"),
    ({"prefault": "maybe"}, "prefault"),
])
def test_bad_values_are_usage_errors(params, word):
    from vlab._errors import UsageError

    with pytest.raises(UsageError, match=word):
        paging().validate(params, {})


def skip_reason(name: str, params: dict, h: dict) -> str | None:
    from vlab.run import registry as _experiment

    return _experiment.get(name).check(h, params)


def test_hugetlb_without_reserved_pages_skips_naming_nr_hugepages():
    h = host("pvm")
    for backing, path in (("hugetlb-2m", "hugepages-2048kB"), ("hugetlb-1g", "hugepages-1048576kB")):
        for where in ("guest", "native"):
            p = {"wss": 64 * MiB, "guest_page": "4k", "backing": backing, "where": where}
            why = skip_reason("paging.random_read", p, h)
            assert why and "nr_hugepages" in why and path in why and "0" in why, why


def test_hugetlb_with_reserved_pages_runs_until_they_run_out():
    h = dict(host("vmx"), kvm=dict(host("vmx")["kvm"], usable=True))
    p = {"wss": 64 * MiB, "guest_page": "4k", "backing": "hugetlb-2m", "where": "native"}
    assert skip_reason("paging.random_read", p, h) is None           # 1024 x 2 MiB reserved
    why = skip_reason("paging.random_read", dict(p, wss=4 * GiB), h)  # needs 2048
    assert why and "2048" in why and "nr_hugepages" in why


def test_working_set_beyond_available_memory_skips():
    h = host("pvm")
    for name in ("paging.random_read", "paging.pointer_chase", "paging.first_touch"):
        p = {"wss": 1 << 40, "guest_page": "4k", "backing": "4k", "where": "native"}
        why = skip_reason(name, p, h)
        assert why and "wss=1024 GiB" in why and "MemAvailable" in why, why
        assert skip_reason(name, dict(p, wss=64 * MiB), h) is None


def test_1g_guest_pages_need_pdpe1gb_in_the_guest_cpuid():
    h = host("pvm")
    p = {"wss": 1 * GiB, "guest_page": "1g", "backing": "4k", "where": "guest"}
    no = dict(h, kvm=dict(h["kvm"], guest_pdpe1gb=False))
    yes = dict(h, kvm=dict(h["kvm"], guest_pdpe1gb=True))
    why = skip_reason("paging.random_read", p, no)
    assert why and "pdpe1gb" in why
    assert skip_reason("paging.random_read", p, yes) is None
    assert skip_reason("paging.random_read", dict(p, guest_page="2m"), no) is None


@needs_kvm
def test_1g_probe_agrees_with_kvm(kvm):
    h = {"kvm": {"usable": True}}
    assert paging().guest_has_1g(h) == kvm.has_1g_pages()


def test_cpl0_kernels_do_not_run_natively_and_guest_needs_kvm():
    h = host("pvm")
    for name in ("paging.pte_update", "paging.cr3_switch"):
        why = skip_reason(name, {"pages": 16, "backing": "4k", "where": "native"}, h)
        assert why and "CPL0" in why
    why = skip_reason("paging.random_read", {"wss": MiB, "guest_page": "4k", "backing": "4k",
                                             "where": "guest"},
                      dict(host("nokvm"), kvm={"usable": False, "reason": "no /dev/kvm"}))
    assert why and "KVM" in why


def test_rows_record_the_host_setting():
    mod = paging()
    ept0 = mod.host_setting(host("vmx_ept0"))
    ept1 = mod.host_setting(host("vmx"))
    assert ept0["paging"] == "shadow" and ept0["kvm_intel.ept"] == "N"
    assert ept1["paging"] == "ept" and ept1["kvm_intel.ept"] == "Y"
    assert mod.host_setting(host("pvm"))["kvm.tdp_mmu"] == "N"
    _, flags, extra = mod.annotate({"backing": "4k"}, host("vmx_ept0"), "cycles_per_access",
                                   [1.0], [{}])
    assert extra["host_setting"] == ept0 and not flags


def test_emulated_cpl0_rows_are_flagged():
    mod = paging()
    h = dict(host("pvm"), emulated_cpl0=True)
    w, flags, _ = mod.annotate({}, h, "cycles_per_op", [1.0], [{"cpl0": True}])
    assert flags == {"emulated_cpl0": True} and w
    _, flags, _ = mod.annotate({}, h, "read_cycles", [1.0], [{"cpl0": True}])
    assert flags == {}
    _, flags, _ = mod.annotate({}, dict(h, emulated_cpl0=False), "cycles_per_op", [1.0],
                               [{"cpl0": True}])
    assert flags == {}


def test_thp_rows_say_how_much_was_really_huge(native_factory):
    p = P()
    small = native_factory(8 * MiB, "4k")
    p.fill(small.ptr, 8 * MiB)
    assert p.thp_fraction(small.ptr, 8 * MiB) == 0.0            # MADV_NOHUGEPAGE
    big = native_factory(8 * MiB, "thp")
    p.fill(big.ptr, 8 * MiB)
    frac = p.thp_fraction(big.ptr, 8 * MiB)
    assert frac is not None and 0.0 <= frac <= 1.0
    mod = paging()
    h = dict(host("pvm"), thp={"enabled": "madvise"})
    w, _, _ = mod.annotate({"backing": "thp"}, h, "cycles_per_access", [1.0],
                           [{"thp_backed_fraction": 1.0}, {"thp_backed_fraction": 0.25}])
    assert any("25%" in x for x in w)
    w, _, _ = mod.annotate({"backing": "thp"}, h, "cycles_per_access", [1.0],
                           [{"thp_backed_fraction": 1.0}])
    assert w == []
    w, _, _ = mod.annotate({"backing": "thp"}, dict(h, thp={"enabled": "never"}),
                           "cycles_per_access", [1.0], [{}])
    assert any("never" in x for x in w)


# ----------------------------------------------------------------------- derived rows

def mk(exp: str, params: dict, median: float, metric: str = "cycles_per_access") -> dict:
    from vlab import results

    rng = np.random.default_rng(abs(hash((exp, repr(sorted(params.items()))))) % 2**32)
    return results.make_row(exp, params, metric, "cycles",
                            list(median * (1 + 0.01 * rng.standard_normal(6))))


SWEEP = [16 << 10, 256 << 10, 4 * MiB, 64 * MiB, GiB]


def sweep_rows() -> list[dict]:
    rows = []
    for wss, g4, g2, n4, n2 in zip(SWEEP, [4, 5, 6.3, 40, 55], [4, 5, 6, 20, 24],
                                   [4, 5, 6.2, 42, 58], [4, 5, 6, 21, 25]):
        rows += [mk("paging.random_read", {"wss": wss, "guest_page": "4k", "backing": "4k",
                                           "where": "guest"}, g4),
                 mk("paging.random_read", {"wss": wss, "guest_page": "2m", "backing": "thp",
                                           "where": "guest"}, g2),
                 mk("paging.random_read", {"wss": wss, "backing": "4k", "where": "native"}, n4),
                 mk("paging.random_read", {"wss": wss, "backing": "thp", "where": "native"}, n2)]
    return rows


def test_ratio_rows_pair_guest_and_native_at_the_same_point():
    rows = paging().ratio_rows(sweep_rows(), "cycles_per_access")
    assert len(rows) == 2 * len(SWEEP)
    r = next(x for x in rows if x["params"] == {"wss": GiB, "guest_page": "4k", "backing": "4k"})
    assert r["metric"] == "guest_native_ratio" and r["flags"]["derived"]
    assert r["median"] == pytest.approx(55 / 58, rel=0.03)
    assert r["extra"]["equal_effective_page"] is True
    assert r["extra"]["ci_low"] <= r["median"] <= r["extra"]["ci_high"]


def test_knee_divides_by_larger_pages_where_it_can():
    mod = paging()
    rows = mod.knee_rows(sweep_rows())
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["params"]["wss"] == 64 * MiB for r in ok)
    g4 = next(r for r in ok if r["params"].get("guest_page") == "4k")
    # 4k/4k over 2m/thp: 1, 1, 1.05, 2.0, 2.29 -> stays >= 1.25 from 64M on
    assert g4["extra"]["reference"] == {"guest_page": "2m", "backing": "thp", "where": "guest"}
    assert "larger-page" in g4["extra"]["method"]
    assert g4["median"] == pytest.approx((40 / 20) / (6.3 / 6), rel=0.05)
    n4 = next(r for r in ok if r["params"] == {"backing": "4k", "where": "native", "wss": 64 * MiB})
    assert n4["extra"]["reference"] == {"backing": "thp", "where": "native"}
    g2 = next(r for r in ok if r["params"].get("guest_page") == "2m")
    assert "reference" not in g2["extra"] and "steepest" in g2["extra"]["method"]
    assert g2["median"] == pytest.approx(20 / 6, rel=0.05)


def test_knee_skips_when_there_is_none():
    mod = paging()
    flat = [mk("paging.random_read", {"wss": w, "backing": "4k", "where": "native"}, 10)
            for w in SWEEP]
    (skip,) = mod.knee_rows(flat)
    assert skip["status"] == "skip" and "no knee" in skip["reason"]
    (short,) = mod.knee_rows(flat[:2])
    assert short["status"] == "skip" and "at least 3" in short["reason"]
    assert mod.knee_rows(flat[:1]) == []
    big = [mk("paging.random_read", {"wss": w, "backing": "thp", "where": "native"}, c)
           for w, c in zip(SWEEP, [7, 7, 7, 7, 7])]
    rows = {r["params"]["backing"]: r for r in mod.knee_rows(flat + big)}
    assert rows["4k"]["status"] == "skip" and "already" in rows["4k"]["reason"]   # 10/7 all along
    same = [mk("paging.random_read", {"wss": w, "backing": "thp", "where": "native"}, 10)
            for w in SWEEP]
    rows = {r["params"]["backing"]: r for r in mod.knee_rows(flat + same)}
    assert rows["4k"]["status"] == "skip" and "never stays" in rows["4k"]["reason"]


def test_model_rows_only_beside_shadow_measurements():
    mod = paging()
    rows = sweep_rows()
    shadow = host("vmx_ept0")
    models = mod.model_rows(rows, shadow)
    guest = [r for r in rows if r["params"]["where"] == "guest"]
    assert len(models) == len(guest) * len(mod.PWC_LEVELS)
    for m in models:
        assert m["flags"] == {"model": True} and m["params"]["paging"] == "ept"
        assert m["extra"]["model"] == "vlab.analysis.pagewalk"
        # (samples are stored to 6 significant digits: equal within that rounding)
        assert m["median"] >= m["extra"]["measured_shadow"] * (1 - 1e-5)
    big = next(m for m in models if m["params"]["wss"] == GiB
               and m["params"]["guest_page"] == "4k" and m["params"]["pwc_levels"] == 0)
    assert big["extra"]["refs_nested"] == 24 and big["extra"]["refs_shadow"] == 4
    assert big["median"] > big["extra"]["measured_shadow"]
    assert big["extra"]["ref_cycles_source"].startswith("calibrated: native 4k vs thp")
    small = next(m for m in models if m["params"]["wss"] == 16 << 10)
    assert small["median"] == pytest.approx(small["extra"]["measured_shadow"], rel=1e-5)  # no misses (6-digit samples)
    assert mod.model_rows(rows, host("vmx")) == []                              # EPT measured
    amd = dict(shadow, cpu_vendor="amd")
    assert mod.model_rows(rows, amd)[0]["params"]["paging"] == "npt"


# ----------------------------------------------------------------------- under real KVM

@pytest.fixture
def rig_factory(kvm):
    made = []

    def make(size, guest_page="4k", backing="4k", **kw):
        r = P().GuestRig(size, guest_page, backing, kvm=kvm, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def native_factory():
    made = []

    def make(size, backing="4k"):
        m = P().NativeMem(size, backing)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def dirty_pages(rig) -> np.ndarray:
    bits = np.unpackbits(rig.m.vm.get_dirty_log(rig.slot).view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[: rig.slot.pages])


@needs_kvm
@pytest.mark.parametrize("guest_page,backing", [("4k", "4k"), ("2m", "thp")])
def test_random_read_reads_exactly_the_claimed_words(rig_factory, guest_page, backing):
    p = P()
    wss, n = 2 * MiB, 20_000
    rig = rig_factory(wss, guest_page, backing, dirty_log=True)
    p.fill(rig.hva, wss)
    rig.warm()
    rig.m.vm.get_dirty_log(rig.slot)                     # start clean
    cycles, total, state = rig.random_read(wss // 8, n, 3, seed=99)
    want_sum, want_state, idx = expected_random_read(wss // 8, 3 * n, 99, p.SALT)
    assert (total, state) == (want_sum, want_state)
    assert len(cycles) == 3 and all(c > 0 for c in cycles)
    assert len(np.unique(idx // 512)) == wss // 4096     # it did spread over every page
    assert dirty_pages(rig).size == 0                    # and wrote none of them


@needs_kvm
def test_guest_and_native_run_the_same_kernels(rig_factory, native_factory):
    """Same data, same seeds: identical checksums and end states, whether the kernel runs in
    the guest, on a host copy, or on the host over the guest's own memory."""
    p = P()
    from vlab.vmm._native import ffi
    wss = 4 * MiB
    rig = rig_factory(wss)
    nat = native_factory(wss)
    p.fill(rig.hva, wss)
    p.fill(nat.ptr, wss)
    assert np.array_equal(nat.array(), np.frombuffer(ffi.buffer(rig.hva, wss), np.uint64))
    rig.warm()
    g = rig.random_read(wss // 8, 50_000, 2, seed=7)
    n = p.native_random_read(nat.ptr, wss // 8, 50_000, 2, seed=7)
    o = p.native_random_read(rig.hva, wss // 8, 50_000, 2, seed=7)
    assert g[1:] == n[1:] == o[1:]
    p.build_ring(rig.hva, wss, seed=5)
    p.build_ring(nat.ptr, wss, seed=5)
    g = rig.chase(30_000, 2)
    n = p.native_chase(nat.ptr, 30_000, 2)
    assert g[1:] == n[1:] and g[1] % p.CHASE_STRIDE == 0
    p.reset(rig.hva, wss, True)
    p.reset(nat.ptr, wss, True)
    _, gsum, _ = rig.first_touch(wss // 4096, 4096, False)
    _, nsum = p.native_touch_write(nat.ptr, wss // 4096)
    assert gsum == nsum
    assert np.array_equal(nat.array()[::512], np.frombuffer(ffi.buffer(rig.hva, wss),
                                                            np.uint64)[::512])


@pytest.mark.parametrize("nodes", [1, 2, 3, 17, 1000, 65536])
def test_chase_ring_is_a_single_cycle(native_factory, nodes):
    p = P()
    from vlab.vmm._native import lib
    mem = native_factory(max(4096, -(-nodes * p.CHASE_STRIDE // 4096) * 4096))
    lib.vlab_paging_chase_build(mem.ptr, nodes, p.CHASE_STRIDE, 1234)
    order = ring_order(mem.array(), nodes, p.CHASE_STRIDE)
    assert len(order) == nodes and sorted(order) == list(range(nodes))
    # a permutation with one cycle returns to node 0 after exactly `nodes` steps
    cycles, end, total = p.native_chase(mem.ptr, nodes, 1)
    assert end == 0
    assert total == p.CHASE_STRIDE * nodes * (nodes - 1) // 2


@needs_kvm
def test_guest_chase_goes_once_round_the_ring(rig_factory):
    p = P()
    from vlab.vmm._native import ffi
    wss = 1 * MiB
    rig = rig_factory(wss, dirty_log=True)
    nodes = p.build_ring(rig.hva, wss, seed=11)
    order = ring_order(np.frombuffer(ffi.buffer(rig.hva, wss), np.uint64), nodes,
                       p.CHASE_STRIDE)
    assert len(order) == nodes and len(set(order)) == nodes
    rig.warm()
    rig.m.vm.get_dirty_log(rig.slot)
    _, end, total = rig.chase(nodes, 1)
    assert end == 0 and total == p.CHASE_STRIDE * nodes * (nodes - 1) // 2
    _, end, _ = rig.chase(nodes - 1, 1)
    assert end != 0                                      # not earlier
    assert dirty_pages(rig).size == 0


@needs_kvm
@pytest.mark.parametrize("guest_page,backing,prefault", [("4k", "4k", False), ("4k", "4k", True),
                                                         ("2m", "thp", True)])
def test_first_touch_dirties_exactly_the_pages_it_touches(rig_factory, guest_page, backing,
                                                          prefault):
    p = P()
    size, touched = 4 * MiB, 300                         # touch part of the slot only
    rig = rig_factory(size, guest_page, backing, dirty_log=True)
    for _ in range(2):
        p.reset(rig.hva, size, prefault)
        rig.m.vm.get_dirty_log(rig.slot)
        _, total, cleared = rig.first_touch(touched, 4096, False)
        assert total == int(pk_words(np.arange(touched, dtype=np.uint64) * np.uint64(512),
                                     p.SALT).sum(dtype=np.uint64))
        assert cleared == 0
        assert dirty_pages(rig).tolist() == list(range(touched))


@needs_kvm
def test_first_touch_without_preset_ad_lets_the_touch_set_them(rig_factory):
    p = P()
    size, n = 2 * MiB, 64
    rig = rig_factory(size, preset_ad=False)
    sysmem = np.frombuffer(rig.m.vm.hva(0, rig.m.sys.size), np.uint64)
    ptes = [rig.m.vm.translate(rig.m.cr3, rig.base + i * 4096)[1] for i in range(n)]
    assert all(int(sysmem[a // 8]) & 0x60 == 0 for a in ptes)       # A/D clear to begin with
    for _ in range(2):
        p.reset(rig.hva, size, True)
        _, _, cleared = rig.first_touch(n, 4096, True)
        assert cleared == n
        assert all(int(sysmem[a // 8]) & 0x60 == 0x60 for a in ptes)   # set by the writes
    untouched = rig.m.vm.translate(rig.m.cr3, rig.base + n * 4096)[1]
    assert int(sysmem[untouched // 8]) & 0x60 == 0


@needs_kvm
@pytest.mark.parametrize("mode", ["remap", "unmap_map"])
def test_pte_update_reads_the_new_frame_and_restores_the_mapping(rig_factory, mode):
    p = P()
    k, page = 16, 4096
    rig = rig_factory(2 * k * page, dirty_log=True)
    p.fill(rig.hva, rig.size)
    rig.warm()
    rig.m.vm.get_dirty_log(rig.slot)
    out = rig.pte_update(k, 3, mode)                     # odd: ends on the other frames
    assert out.shape == (3, 4) and (out[:, 1:] > 0).all()
    for j in range(k):
        gpa, _, ps = rig.m.vm.translate(rig.m.cr3, rig.base + j * page)
        assert gpa == rig.base + j * page and ps == page
    # The kernel only reads data, but each read after a PTE change maps the frame afresh, and
    # KVM logs a page as dirty when it installs a writable translation (the guest PTE is
    # writable and dirty, A/D preset). So the log names exactly the frames the kernel mapped:
    # A and B frames for remap, the A frames again for unmap_map, and nothing else.
    want = list(range(2 * k)) if mode == "remap" else list(range(k))
    assert dirty_pages(rig).tolist() == want


@needs_kvm
def test_pte_update_fails_the_guest_on_a_stale_frame(rig_factory):
    """The guest's frame check can fail: make frames A and B hold the same words."""
    from vlab._errors import GuestFailure

    p = P()
    from vlab.vmm._native import ffi
    k, page = 8, 4096
    rig = rig_factory(2 * k * page)
    p.fill(rig.hva, rig.size)
    a = np.frombuffer(ffi.buffer(rig.hva, rig.size), np.uint64)
    a[k * page // 8:] = a[: k * page // 8]               # B frames now look like A frames
    with pytest.raises(GuestFailure, match="wrong frame"):
        rig.pte_update(k, 1, "remap")


@needs_kvm
def test_cr3_switch_reads_each_address_space(rig_factory):
    p = P()
    n = 16
    rig = rig_factory(2 * n * 4096, dirty_log=True)
    p.fill(rig.hva, rig.size)
    rig.add_alt_space(n)
    rig.warm()
    rig.m.vm.get_dirty_log(rig.slot)
    out = rig.cr3_switch(n, 5, 2)                        # odd switches: the guest switches back
    assert out.shape == (2, 3) and (out > 0).all()
    # reads only; the first read of each page of the second space maps it (writable, so KVM
    # logs it, see the pte_update test): exactly that space's frames, none of the first's
    assert dirty_pages(rig).tolist() == list(range(n, 2 * n))


@needs_kvm
def test_cr3_switch_detects_a_second_space_that_is_not_different(rig_factory):
    from vlab._errors import GuestFailure
    from vlab.vmm.payloads import P_CR3_ALT

    p = P()
    n = 4
    rig = rig_factory(2 * n * 4096)
    p.fill(rig.hva, rig.size)
    m = rig.m
    root = m.vm.create_address_space()
    m.vm.map(root, 0x1000, 0x1000, m.sys.size - 0x1000, 4096, preset_ad=True)
    m.vm.map(root, rig.base, rig.base, n * 4096, 4096, preset_ad=True)   # same frames: wrong
    m.params[P_CR3_ALT] = root
    with pytest.raises(GuestFailure, match="other address space"):
        rig.cr3_switch(n, 2, 1)


# ----------------------------------------------------------------------- CLI

def vlab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlab", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("value", ["0", "-4096"])
def test_cli_wss_zero_or_negative_exits_2(tmp_path, value):
    proc = vlab("run", "paging", "-p", f"wss={value}", "-o", str(tmp_path / "r.json"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "wss" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_cli_too_large_and_hugetlb_cases_are_skip_rows(tmp_path):
    out = tmp_path / "r.json"
    proc = vlab("run", "paging.random_read", "-p", "wss=1T", "-p", "where=native",
                "-p", "backing=4k,hugetlb-1g", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    measured = [r for r in rows if r["metric"] == "cycles_per_access"]
    assert {r["status"] for r in measured} == {"skip"}
    reasons = {r["params"]["backing"]: r["reason"] for r in measured}
    assert "MemAvailable" in reasons["4k"]
    assert "nr_hugepages" in reasons["hugetlb-1g"] or "MemAvailable" in reasons["hugetlb-1g"]


@needs_kvm
@pytest.mark.slow
def test_cli_small_sweep_gives_measured_and_derived_rows(tmp_path):
    out = tmp_path / "r.json"
    proc = vlab("run", "paging.random_read", "-p", "wss=64K,1M,16M", "-p", "guest_page=4k",
                "-p", "backing=4k", "--processes", "1", "--values", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    measured = [r for r in rows if r["metric"] == "cycles_per_access" and r["status"] == "ok"
                and not r.get("flags", {}).get("model")]
    assert len(measured) == 6
    assert all(r["extra"]["host_setting"]["paging"] == doc["host"]["paging"] for r in measured)
    ratios = [r for r in rows if r["metric"] == "guest_native_ratio"]
    assert len(ratios) == 3 and all(r["median"] > 0 for r in ratios)
    knees = [r for r in rows if r["metric"] == "tlb_knee"]
    assert len(knees) == 2                              # guest and native configurations
    models = [r for r in rows if (r.get("flags") or {}).get("model")]
    assert bool(models) == (doc["host"]["paging"] == "shadow")
    show = vlab("show", str(out))
    assert show.returncode == 0 and "guest_native_ratio" in show.stdout


def test_runner_derive_hook_runs_once_per_experiment_and_survives_failures():
    from vlab.run.registry import LoopExperiment
    from vlab.run.runner import Case, derived_rows

    calls = []

    def good(rows, h):
        calls.append(len(rows))
        return [mk("x.good", {"k": 1}, 2.0, metric="ratio")]

    def bad(rows, h):
        raise ValueError("boom")

    g = LoopExperiment(name="x.good", description="", params={}, metrics={}, derive=good)
    b = LoopExperiment(name="x.bad", description="", params={}, metrics={}, derive=bad)
    n = LoopExperiment(name="x.none", description="", params={}, metrics={})
    rows = [mk("x.good", {"k": k}, 1.0) for k in range(3)] + [mk("x.none", {}, 1.0)]
    cases = [Case("c0", g, {"k": 0}), Case("c1", g, {"k": 1}), Case("c2", b, {}),
             Case("c3", n, {})]
    out, failed = derived_rows(cases, rows, {})
    assert calls == [3]                                   # once, with its own rows only
    assert failed and [r["status"] for r in out] == ["ok", "error"]
    assert "boom" in out[1]["reason"] and out[1]["experiment"] == "x.bad"
