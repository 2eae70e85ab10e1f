"""Paging: what guest page tables cost under EPT/NPT or shadow paging, and what huge pages buy.

Two-dimensional paging (EPT, NPT) and shadow paging fail in opposite places. Under EPT/NPT a
TLB miss walks two page tables (up to 24 memory references instead of 4), while page-table
updates and CR3 switches cost nothing extra. Under shadow paging a TLB miss walks one table, as
natively, but first touches, A/D-bit updates, page-table changes and CR3 switches trap to KVM.

| experiment | kernel | metric |
|---|---|---|
| paging.random_read | independent random 8-byte reads over `wss` (throughput-bound) | cycles_per_access |
| paging.pointer_chase | dependent loads around a one-cycle random ring (latency-bound) | cycles_per_access |
| paging.first_touch | one write to each page never touched since its pages were dropped | cycles_per_page |
| paging.pte_update | change a PTE (remap or unmap+map), invlpg (CPL0), read the page | cycles_per_op |
| paging.cr3_switch | switch between two address spaces (CPL0), read `pages` pages | cycles_per_op |

The memory kernels are native/kernels/paging_kernels.h, compiled into the guest payload and
into the host library alike: `where=native` runs the very same loops on the host. Parameters:
`wss` (bytes), `guest_page` (4k/2m/1g), `backing` (host memory: 4k/thp/hugetlb-2m/hugetlb-1g),
`where` (guest/native). Natively a page is the backing page, so native cases have no
`guest_page`. Cases that cannot run here are skip rows naming what is missing: 1 GiB guest
pages without pdpe1gb in the guest CPUID, hugetlb without reserved pages (nr_hugepages), a
working set beyond available memory, CPL0 operations natively.

After all cases, `derive` adds rows computed from several cases (flags.derived):
`guest_native_ratio` (guest median / native median at the same wss and backing), `tlb_knee`
(per configuration, the wss where cycles per access rise most steeply, and by how much), and,
on a shadow-paging host, model rows (flags.model, params.paging=ept/npt) of what a
two-dimensional walk would cost at each measured point (vlab.analysis.pagewalk).

On hosts that emulate guest CPL0 (KVM on PVM), the CPL0 step of pte_update and cr3_switch
includes thousands of cycles of instruction emulation: those rows carry flags.emulated_cpl0,
and `cpl0_gate_cycles` (a no-op CPL0 call, measured in the same samples) says how much.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlab._errors import UsageError, VlabError
from vlab.run.registry import LoopExperiment, Measurement, Requirement, one_of, register, within

from vlab.experiments import _paging as P

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FULL_WSS = [16 * KiB * 4 ** i for i in range(10)]          # 16 KiB .. 4 GiB
GUEST_PAGES = ["4k", "2m", "1g"]
BACKINGS = ["4k", "thp", "hugetlb-2m", "hugetlb-1g"]
WHERE = ["guest", "native"]
RANDOM_READS = 1 << 20          # accesses per sample
CHASE_LOADS = 1 << 18
PTE_PAGES = 64
CR3_OPS = 16                    # switches per sample
SWEEP_METRIC = "cycles_per_access"
MEMORY_MARGIN = 1 * GiB         # left to everything else on the host, plus 10% of what is free

# native cases have no guest page and no guest page-table bits
GUEST_ONLY_PARAMS = ("guest_page", "preset_ad")
_PAGE_NAMES = {4096: "4k", 2 << 20: "2m", 1 << 30: "1g"}


# --------------------------------------------------------------------------- parameters

def _norm_page(v: Any) -> Any:
    """`-p guest_page=2m` arrives as 2097152 (sizes parse as numbers): back to a name."""
    if isinstance(v, int) and not isinstance(v, bool) and v in _PAGE_NAMES:
        return _PAGE_NAMES[v]
    return v.lower() if isinstance(v, str) else v


def _norm_backing(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and v == 4096:
        return "4k"
    return v.lower() if isinstance(v, str) else v


# what each value may be (vlab.run.registry.Limit); guest-physical addresses are 52 bits
LIMITS = {"wss": within(1, 1 << 52, "working set in bytes, in the 52-bit guest-physical space"),
          "pages": within(1, (1 << 32) - 1, "page count, a 32-bit count"),
          "prefault": one_of(False, True), "preset_ad": one_of(False, True)}


@dataclass
class PagingExperiment(LoopExperiment):
    """A LoopExperiment whose grid drops guest-only parameters from native cases (and the
    duplicates that leaves) and turns page sizes given as numbers back into names."""

    def __post_init__(self) -> None:
        self.limits = {**LIMITS, **self.limits}

    def grid(self, quick: bool = False, overrides: dict[str, list] | None = None) -> list[dict]:
        over = {}
        for k, vals in (overrides or {}).items():
            if k == "guest_page":
                vals = [_norm_page(v) for v in vals]
            elif k == "backing":
                vals = [_norm_backing(v) for v in vals]
            elif k == "where":
                vals = [v.lower() if isinstance(v, str) else v for v in vals]
            over[k] = vals
        out: list[dict] = []
        for p in super().grid(quick, over):
            if p.get("where") == "native":
                p = {k: v for k, v in p.items() if k not in GUEST_ONLY_PARAMS}
            if p not in out:
                out.append(p)
        return out


def _positive_int(params: dict, key: str) -> None:
    v = params.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        unit = " in bytes (e.g. 64M)" if key == "wss" else ""
        raise UsageError(f"{key} must be a positive integer{unit}, not {v!r}")


def validate(params: dict, host: dict) -> None:
    """Bad parameter values are usage errors (exit 2); values this host cannot run are skips."""
    for key in ("wss", "pages", "iters"):
        _positive_int(params, key)
    checks = (("guest_page", GUEST_PAGES), ("backing", BACKINGS), ("where", WHERE),
              ("op", list(P.PTE_MODES)))
    for key, allowed in checks:
        if key in params and params[key] not in allowed:
            raise UsageError(f"{key} must be one of {', '.join(allowed)}, not {params[key]!r}")
    for key in ("prefault", "preset_ad"):
        if key in params and not isinstance(params[key], bool):
            raise UsageError(f"{key} must be true or false, not {params[key]!r}")


# --------------------------------------------------------------------------- requirements

def _fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def _guest_ok(host: dict, params: dict) -> str | None:
    if params.get("where", "guest") != "guest":
        return None
    kvm = host.get("kvm", {})
    if not kvm.get("usable"):
        return f"KVM unusable: {kvm.get('reason') or '/dev/kvm cannot be opened'}"
    return None


_GUEST_1G: dict[str, bool] = {}


def guest_has_1g(host: dict) -> bool | None:
    """Whether KVM offers 1 GiB pages to guests (CPUID 0x80000001 EDX bit 26, pdpe1gb). From
    the host record when it says so, else asked of /dev/kvm once per process."""
    rec = host.get("kvm", {}).get("guest_pdpe1gb")
    if rec is not None:
        return bool(rec)
    if not host.get("kvm", {}).get("usable"):
        return None
    if "v" not in _GUEST_1G:
        from vlab.vmm.kvm import Kvm

        with Kvm() as k:
            _GUEST_1G["v"] = k.has_1g_pages()
    return _GUEST_1G["v"]


def _guest_page_ok(host: dict, params: dict) -> str | None:
    if params.get("where") != "guest" or params.get("guest_page") != "1g":
        return None
    if not guest_has_1g(host):
        return ("guest_page=1g needs 1 GiB pages in the guest: KVM's supported CPUID does not "
                "offer pdpe1gb (CPUID 0x80000001 EDX bit 26) on this host")
    return None


def footprint(name: str, params: dict) -> int:
    """Host memory a case allocates (data region; pte_update and cr3_switch hold two frames
    per page)."""
    backing = params.get("backing", "4k")
    gp = params.get("guest_page") if params.get("where") == "guest" else None
    if name in ("paging.pte_update", "paging.cr3_switch"):
        page = P.PAGE[gp or "4k"]
        return P.region_bytes(2 * params.get("pages", PTE_PAGES) * page, gp, backing)
    return P.region_bytes(params.get("wss", 4096), gp, backing)


def _hugetlb_reason(host: dict, backing: str, need_bytes: int) -> str | None:
    if not backing.startswith("hugetlb-"):
        return None
    size_kb, label = ("2048kB", "2 MiB") if backing == "hugetlb-2m" else ("1048576kB", "1 GiB")
    pool = (host.get("hugepages") or {}).get(size_kb)
    path = f"/sys/kernel/mm/hugepages/hugepages-{size_kb}/nr_hugepages"
    page = P.BACKING_PAGE[backing]
    need = -(-need_bytes // page)
    if pool is None:
        return f"backing={backing}: this kernel has no {label} hugetlb pool ({path} is missing)"
    nr, free = pool.get("nr") or 0, pool.get("free")
    free = nr if free is None else free
    if free < need:
        key = "2m" if backing == "hugetlb-2m" else "1g"
        return (f"backing={backing} needs {need} free {label} huge pages; {path} is {nr} "
                f"({free} free): reserve them with `vlab host set hugepages.{key}={need}`")
    return None


def _memory_reason(host: dict, what: str, need: int) -> str | None:
    avail_kb = host.get("mem_available_kb")
    if avail_kb is None:
        return None
    avail = int(avail_kb) * 1024
    usable = avail - MEMORY_MARGIN - avail // 10
    if need > usable:
        return (f"{what} needs {_fmt(need)} of memory but only {_fmt(max(usable, 0))} may be "
                f"used here (MemAvailable {_fmt(avail)} less a {_fmt(MEMORY_MARGIN)} + 10% "
                "margin)")
    return None


def _fits(name: str):
    def check(host: dict, params: dict) -> str | None:
        need = footprint(name, params)
        what = f"wss={_fmt(params['wss'])}" if "wss" in params else f"pages={params.get('pages')}"
        return (_hugetlb_reason(host, params.get("backing", "4k"), need)
                or _memory_reason(host, what, need))
    return Requirement("memory", check)


def _cpl0_only(name: str, what: str):
    def check(host: dict, params: dict) -> str | None:
        if params.get("where") == "native":
            return (f"{name} needs CPL0 ({what}): a host process cannot do that to its own "
                    "address space, so there is no native run of this kernel")
        return None
    return Requirement("cpl0", check)


def requirements(name: str, extra: tuple = ()) -> list[Requirement]:
    from vlab.host.emulation import tcg_shadow_requirement

    return [Requirement("kvm", _guest_ok), Requirement("guest_page", _guest_page_ok), *extra,
            _fits(name), tcg_shadow_requirement()]


# --------------------------------------------------------------------------- host settings

def host_setting(host: dict) -> dict:
    """The host settings that decide how paging behaves, recorded in every paging row."""
    kvm = host.get("kvm") or {}
    params = kvm.get("params") or {}
    out: dict[str, Any] = {"paging": host.get("paging"), "kvm_flavor": kvm.get("flavor"),
                           "nested": host.get("nested")}
    keys = {"kvm": ("tdp_mmu", "nx_huge_pages", "eager_page_split"),
            "kvm_intel": ("ept", "unrestricted_guest", "vpid"),
            "kvm_amd": ("npt",)}
    for mod, names in keys.items():
        for k in names:
            v = (params.get(mod) or {}).get(k)
            if v is not None:
                out[f"{mod}.{k}"] = v
    thp = host.get("thp") or {}
    for k in ("enabled", "defrag"):
        if thp.get(k) is not None:
            out[f"thp.{k}"] = thp[k]
    for size, pool in (host.get("hugepages") or {}).items():
        out[f"hugepages.{size}.nr"] = (pool or {}).get("nr")
    return out


THP_MIN_FRACTION = 0.9
_CPL0_METRICS = {"cycles_per_op", "invlpg_cycles", "switch_cycles", "cpl0_gate_cycles"}


def annotate(params: dict, host: dict, metric: str, samples: list, extras: list):
    """Flags, warnings and extras common to every paging row."""
    warnings: list[str] = []
    flags: dict[str, Any] = {}
    last = extras[-1] if extras else {}
    if metric in _CPL0_METRICS and last.get("cpl0") and host.get("emulated_cpl0"):
        flags["emulated_cpl0"] = True
        warnings.append("includes a CPL0 call, which this host emulates instruction by "
                        "instruction: see cpl0_gate_cycles for the cost of the call alone")
    thp = (host.get("thp") or {}).get("enabled")
    fracs = [e["thp_backed_fraction"] for e in extras if "thp_backed_fraction" in e]
    if params.get("backing") == "thp" and thp == "never":
        warnings.append("backing=thp but transparent hugepages are off on this host "
                        "(enabled=never): the memory is 4 KiB pages")
    elif params.get("backing") == "thp" and fracs and min(fracs) < THP_MIN_FRACTION:
        warnings.append(f"backing=thp but only {min(fracs):.0%} of the region was in huge pages "
                        "in at least one worker (the kernel fell back to 4 KiB pages)")
    return warnings, flags, {"host_setting": host_setting(host)}


# --------------------------------------------------------------------------- measuring

@dataclass
class State:
    name: str
    params: dict
    where: str
    rig: P.GuestRig | None = None
    mem: P.NativeMem | None = None
    size: int = 0
    n: int = 0
    seed: int = P.SEED
    offset: int = 0
    expect: int = 0
    tsc_khz: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def ptr(self):
        return self.rig.hva if self.rig is not None else self.mem.ptr

    def close(self) -> None:
        if self.rig is not None:
            self.rig.close()
        if self.mem is not None:
            self.mem.close()


def _tsc_khz(host: dict) -> int:
    return int(host.get("tsc_khz") or 0) or 1


def _open(name: str, params: dict, host: dict, size: int, *, preset_ad: bool = True) -> State:
    where = params.get("where", "guest")
    st = State(name, params, where, size=size)
    backing = params.get("backing", "4k")
    if where == "guest":
        st.rig = P.GuestRig(size, params.get("guest_page", "4k"), backing, preset_ad=preset_ad)
        st.tsc_khz = st.rig.tsc_khz
    else:
        st.mem = P.NativeMem(size, backing)
        st.tsc_khz = _tsc_khz(host)
    st.extra = {"region_bytes": size, "where": where,
                "effective_page": P.effective_page(params.get("guest_page"), backing, where)}
    return st


def _note_thp(st: State) -> None:
    """Record how much of a thp-backed region really is in huge pages."""
    if st.params.get("backing") == "thp":
        frac = P.thp_fraction(st.ptr, st.size)
        if frac is not None:
            st.extra["thp_backed_fraction"] = round(frac, 4)


def _chunks(loops: int):
    while loops > 0:
        k = min(loops, P.MAX_SAMPLES_PER_RUN)
        yield k
        loops -= k


def lcg_jump(state: int, steps: int) -> int:
    """The LCG state after `steps` steps, in O(log steps): checks how many accesses ran."""
    mask = (1 << 64) - 1
    a, c = 6364136223846793005, 1442695040888963407
    acc_a, acc_c = 1, 0
    while steps:
        if steps & 1:
            acc_a, acc_c = (acc_a * a) & mask, (acc_c * a + c) & mask
        a, c = (a * a) & mask, (c * a + c) & mask
        steps >>= 1
    return (acc_a * state + acc_c) & mask


# random_read

def setup_random_read(params: dict, host: dict) -> State:
    wss = params["wss"]
    st = _open("paging.random_read", params, host,
               P.region_bytes(wss, params.get("guest_page"), params.get("backing", "4k")))
    try:
        P.fill(st.ptr, st.size)
        if st.rig is not None:
            st.rig.warm()
        _note_thp(st)
        st.n = int(params.get("iters", RANDOM_READS))
        st.extra.update(accesses_per_sample=st.n, words=wss // 8)
        return st
    except BaseException:
        st.close()
        raise


def measure_random_read(st: State, loops: int) -> Measurement:
    nwords = st.params["wss"] // 8
    cycles: list[int] = []
    for k in _chunks(loops):
        before = st.seed
        if st.rig is not None:
            c, _sum, st.seed = st.rig.random_read(nwords, st.n, k, seed=st.seed)
        else:
            c, _sum, st.seed = P.native_random_read(st.ptr, nwords, st.n, k, seed=st.seed)
        if st.seed != lcg_jump(before, st.n * k):
            raise VlabError("random_read: the kernel's LCG state says it did not run "
                            f"{st.n * k} accesses")
        cycles += c
    return Measurement(sum(cycles) / (st.tsc_khz * 1e3),
                       {"cycles_per_access": [c / st.n for c in cycles]}, dict(st.extra))


# pointer_chase

def setup_pointer_chase(params: dict, host: dict) -> State:
    wss = params["wss"]
    st = _open("paging.pointer_chase", params, host,
               P.region_bytes(wss, params.get("guest_page"), params.get("backing", "4k")))
    try:
        nodes = P.build_ring(st.ptr, wss)
        if st.rig is not None:
            st.rig.warm()
        else:
            P.touch_read(st.ptr, st.size)
        _note_thp(st)
        st.n = int(params.get("iters", CHASE_LOADS))
        st.extra.update(loads_per_sample=st.n, ring_nodes=nodes, node_stride=P.CHASE_STRIDE)
        return st
    except BaseException:
        st.close()
        raise


def measure_pointer_chase(st: State, loops: int) -> Measurement:
    cycles: list[int] = []
    nodes = st.extra["ring_nodes"]
    for k in _chunks(loops):
        if st.rig is not None:
            c, st.offset, _sum = st.rig.chase(st.n, k, start=st.offset)
        else:
            c, st.offset, _sum = P.native_chase(st.ptr, st.n, k, start=st.offset)
        if st.offset % P.CHASE_STRIDE or st.offset >= nodes * P.CHASE_STRIDE:
            raise VlabError(f"pointer_chase: the chase ended at offset {st.offset:#x}, "
                            "which is not a ring node")
        cycles += c
    return Measurement(sum(cycles) / (st.tsc_khz * 1e3),
                       {"cycles_per_access": [c / st.n for c in cycles]}, dict(st.extra))


# first_touch

def setup_first_touch(params: dict, host: dict) -> State:
    wss = params["wss"]
    preset_ad = params.get("preset_ad", True)
    st = _open("paging.first_touch", params, host,
               P.region_bytes(wss, params.get("guest_page"), params.get("backing", "4k")),
               preset_ad=preset_ad)
    st.n = -(-wss // 4096)
    idx = np.arange(st.n, dtype=np.uint64) * np.uint64(512)
    st.expect = int(_pk_words(idx, P.SALT).sum(dtype=np.uint64))
    st.extra.update(pages_per_sample=st.n, prefault=params.get("prefault", False))
    if st.rig is not None:
        st.extra["preset_ad"] = preset_ad
        st.extra["ad_cleared_per_sample"] = -(-wss // st.rig.page) if not preset_ad else 0
    return st


def _pk_words(idx: np.ndarray, salt: int) -> np.ndarray:
    """pk_word over an array of indices (NumPy, wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        return ((idx + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)) ^ (idx >> np.uint64(7))


def measure_first_touch(st: State, loops: int) -> Measurement:
    """One pass per loop. pyperf gets wall time, not the touch cycles: every loop also drops
    and re-populates the region, and pyperf must size `loops` on what a loop really costs."""
    per_page: list[float] = []
    t0 = time.perf_counter()
    prefault = bool(st.params.get("prefault", False))
    for _ in range(loops):
        P.reset(st.ptr, st.size, prefault)
        if st.rig is not None:
            c, got, cleared = st.rig.first_touch(st.n, 4096, not st.params.get("preset_ad", True))
            if cleared != st.extra["ad_cleared_per_sample"]:
                raise VlabError(f"first_touch: the guest cleared A/D bits in {cleared} entries, "
                                f"expected {st.extra['ad_cleared_per_sample']}")
        else:
            c, got = P.native_touch_write(st.ptr, st.n)
        if got != st.expect:
            raise VlabError("first_touch: the checksum of the words written is wrong")
        per_page.append(c / st.n)
    _note_thp(st)
    return Measurement(time.perf_counter() - t0, {"cycles_per_page": per_page}, dict(st.extra))


# pte_update

def setup_pte_update(params: dict, host: dict) -> State:
    k = params.get("pages", PTE_PAGES)
    page = P.PAGE[params.get("guest_page", "4k")]
    st = _open("paging.pte_update", params, host, footprint("paging.pte_update", params))
    try:
        P.fill(st.ptr, st.size)
        st.rig.warm()
        _note_thp(st)
        st.n = k
        st.extra.update(pages=k, op=params.get("op", "remap"), frame_delta=k * page, cpl0=True)
        return st
    except BaseException:
        st.close()
        raise


def measure_pte_update(st: State, loops: int) -> Measurement:
    k = st.n
    rows = []
    for n in _chunks(loops):
        rows.append(st.rig.pte_update(k, n, st.params.get("op", "remap")))
    a = np.vstack(rows).astype(np.float64)
    _check_identity(st.rig, k)
    return Measurement(float(a.sum()) / (st.tsc_khz * 1e3), {
        "cycles_per_op": list((a[:, 0] + a[:, 1] + a[:, 2]) / k),
        "pte_write_cycles": list(a[:, 0] / k),
        "invlpg_cycles": list(a[:, 1] / k),
        "read_cycles": list(a[:, 2] / k),
        "cpl0_gate_cycles": list(a[:, 3] / k),
    }, dict(st.extra))


def _check_identity(rig: P.GuestRig, k: int) -> None:
    """After a run every page must map its own frame again (the guest restores them)."""
    for j in range(k):
        va = rig.base + j * rig.page
        gpa, _pte, ps = rig.m.vm.translate(rig.m.cr3, va)
        if gpa != va or ps != rig.page:
            raise VlabError(f"pte_update: page {va:#x} maps {gpa:#x} ({ps} B) after the run")


# cr3_switch

def setup_cr3_switch(params: dict, host: dict) -> State:
    n = params.get("pages", 16)
    st = _open("paging.cr3_switch", params, host, footprint("paging.cr3_switch", params))
    try:
        P.fill(st.ptr, st.size)
        st.rig.add_alt_space(n)
        st.rig.warm()
        _note_thp(st)
        st.n = n
        st.extra.update(pages=n, switches_per_sample=CR3_OPS, cpl0=True)
        return st
    except BaseException:
        st.close()
        raise


def measure_cr3_switch(st: State, loops: int) -> Measurement:
    rows = [st.rig.cr3_switch(st.n, CR3_OPS, k) for k in _chunks(loops)]
    a = np.vstack(rows).astype(np.float64)
    return Measurement(float(a.sum()) / (st.tsc_khz * 1e3), {
        "cycles_per_op": list((a[:, 0] + a[:, 1]) / CR3_OPS),
        "switch_cycles": list(a[:, 0] / CR3_OPS),
        "read_cycles_per_page": list(a[:, 1] / (CR3_OPS * st.n)),
        "cpl0_gate_cycles": list(a[:, 2] / CR3_OPS),
    }, dict(st.extra))


def teardown(st: State) -> None:
    st.close()


# --------------------------------------------------------------------------- derived rows

def _key(params: dict, drop: tuple[str, ...]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items() if k not in drop))


def _ok(rows: list[dict], metric: str) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("metric") == metric
            and not (r.get("flags") or {}).get("model") and not (r.get("flags") or {}).get("derived")]


def ratio_rows(rows: list[dict], metric: str) -> list[dict]:
    """guest/native for each guest row that has a native row at the same wss and backing
    (and prefault): median of the guest samples over median of the native ones, with a
    bootstrap CI."""
    from vlab import results
    from vlab.analysis.stats import compare_samples

    ok = _ok(rows, metric)
    native = {_key(r["params"], ("where",)): r for r in ok if r["params"].get("where") == "native"}
    out = []
    for g in ok:
        p = g["params"]
        if p.get("where") != "guest":
            continue
        n = native.get(_key(p, ("where",) + GUEST_ONLY_PARAMS))
        if n is None:
            continue
        cmp = compare_samples(n["samples"], g["samples"])
        if cmp["ratio"] is None:
            continue
        backing = p.get("backing", "4k")
        g_eff = P.effective_page(p.get("guest_page"), backing, "guest")
        n_eff = P.effective_page(None, backing, "native")
        params = {k: v for k, v in p.items() if k != "where"}
        out.append(results.make_row(
            g["experiment"], params, "guest_native_ratio", "x", [cmp["ratio"]],
            exp_version=g.get("exp_version"), flags={"derived": True},
            extra={"method": f"median {metric} of the guest samples / median of the native "
                             "samples at the same wss and backing; 95% bootstrap CI",
                   "guest_median": cmp["median_b"], "native_median": cmp["median_a"],
                   "ci_low": cmp["ci_low"], "ci_high": cmp["ci_high"],
                   "verdict": cmp["verdict"], "guest_effective_page": g_eff,
                   "native_effective_page": n_eff, "equal_effective_page": g_eff == n_eff}))
    return out


KNEE_MIN_STEP = 1.15      # raw curve: a rise per doubling of wss below this is no knee
KNEE_MIN_EXCESS = 1.25    # relative curve: from the knee on, >= 25% over the larger pages


def _eff(params: dict) -> int:
    return P.effective_page(params.get("guest_page"), params.get("backing", "4k"),
                            params.get("where", "guest"))


def _reference(groups: dict, key: tuple, params: dict) -> tuple | None:
    """The configuration to divide by: same `where` and other parameters, a larger effective
    page, at least three wss points in common; the largest page wins."""
    best = None
    for k2, pts in groups.items():
        if k2 == key:
            continue
        p2 = next(iter(pts.values()))["params"]
        same = all(p2.get(k) == v for k, v in params.items()
                   if k not in ("guest_page", "backing"))
        same = same and all(params.get(k) == v for k, v in p2.items()
                            if k not in ("guest_page", "backing", "wss"))
        common = set(pts) & set(groups[key])
        if not same or _eff(p2) <= _eff(params) or len(common) < 3:
            continue
        rank = (_eff(p2), len(common))
        if best is None or rank > best[0]:
            best = (rank, k2)
    return best[1] if best else None


def knee_rows(rows: list[dict], metric: str = SWEEP_METRIC) -> list[dict]:
    """Per configuration (everything but wss), the wss at which the TLB stops covering the
    working set.

    Where a configuration with larger effective pages was measured alongside (same `where`),
    the curve is this configuration's cycles divided by that one's: the same data and the same
    caches, only the translations differ, so cache knees cancel. The knee is the first wss
    from which that ratio stays at or above KNEE_MIN_EXCESS. Otherwise (the largest pages of a
    run have nothing to divide by) the curve is the raw cycles and the knee is its steepest
    rise per doubling of wss, which can be a cache knee as well: the row's `extra.method` says
    which. The row's wss is the knee; its value the curve at the knee over the point before.
    Fewer than three points, or no knee, gives a skip row; a single point gives nothing."""
    from vlab import results

    groups: dict[tuple, dict[int, dict]] = {}
    for r in _ok(rows, metric):
        if isinstance(r["params"].get("wss"), int):
            groups.setdefault(_key(r["params"], ("wss",)), {})[r["params"]["wss"]] = r
    out = []
    for key, pts in groups.items():
        first = next(iter(pts.values()))
        params = {k: v for k, v in first["params"].items() if k != "wss"}
        exp, version = first["experiment"], first.get("exp_version")

        def skip(reason: str) -> None:
            out.append(results.skip_row(exp, params, "tlb_knee", "x", reason,
                                        exp_version=version, flags={"derived": True}))

        if len(pts) == 1:
            continue                    # one point is not a sweep: nothing to say
        if len(pts) < 3:
            skip(f"a knee needs a sweep of at least 3 wss points; this configuration has "
                 f"{len(pts)}")
            continue
        ref_key = _reference(groups, key, params)
        extra: dict[str, Any] = {"effective_page": _eff(params),
                                 "model_tlb_reach": {"entries": TLB_ENTRIES,
                                                     "bytes": TLB_ENTRIES * _eff(params),
                                                     "note": "assumed second-level TLB size x "
                                                             "effective page"}}
        if ref_key is not None:
            ref = groups[ref_key]
            ws = sorted(set(pts) & set(ref))
            curve = [pts[w]["median"] / ref[w]["median"] for w in ws]
            ref_params = {k: v for k, v in next(iter(ref.values()))["params"].items()
                          if k != "wss"}
            extra.update(method=f"first wss from which median {metric} stays >= "
                                f"{KNEE_MIN_EXCESS}x that of the larger-page configuration "
                                f"{results.params_key(ref_params)} (cache effects cancel)",
                         reference=ref_params,
                         curve=[{"wss": w, "relative": c} for w, c in zip(ws, curve)])
            i = next((i for i in range(len(ws)) if min(curve[i:]) >= KNEE_MIN_EXCESS), None)
            if i is None:
                skip(f"no knee: {metric} never stays {KNEE_MIN_EXCESS}x above the larger-page "
                     f"configuration {results.params_key(ref_params)} up to the largest wss")
                continue
            if i == 0:
                skip(f"no knee inside the sweep: {metric} is already {curve[0]:.2f}x the "
                     f"larger-page configuration at the smallest wss")
                continue
        else:
            ws = sorted(pts)
            curve = [pts[w]["median"] for w in ws]
            extra.update(method=f"steepest rise of median {metric} per doubling of wss "
                                "(no larger-page configuration to divide by: cache knees "
                                "count too)",
                         curve=[{"wss": w, "cycles": c} for w, c in zip(ws, curve)])
            rises = [(math.exp(math.log(curve[j] / curve[j - 1]) / math.log2(ws[j] / ws[j - 1])), j)
                     for j in range(1, len(ws)) if curve[j - 1] > 0 and curve[j] > 0]
            best = max(rises, default=None)
            if best is None or best[0] < KNEE_MIN_STEP:
                top = f"{best[0]:.2f}x" if best else "nothing"
                skip(f"no knee: {metric} rises by at most {top} per doubling of wss "
                     f"(threshold {KNEE_MIN_STEP}x)")
                continue
            i = best[1]
        extra.update(knee_wss=ws[i], from_wss=ws[i - 1])
        out.append(results.make_row(exp, {**params, "wss": ws[i]}, "tlb_knee", "x",
                                    [curve[i] / curve[i - 1]], exp_version=version,
                                    flags={"derived": True}, extra=extra))
    return out


TLB_ENTRIES, TLB_WAYS = 1536, 12       # a Skylake-class second-level TLB (assumed)
PWC_LEVELS = (0, 2)
DEFAULT_REF_CYCLES = 10.0
_HOST_PAGE = {"4k": "4K", "thp": "2M", "hugetlb-2m": "2M", "hugetlb-1g": "1G"}


@functools.lru_cache(maxsize=None)
def _miss(wss: int, page: int) -> float:
    """Modelled steady-state miss rate of the assumed TLB for uniform random access."""
    from vlab.analysis.pagewalk import tlb_miss_rate

    return tlb_miss_rate(wss, page, TLB_ENTRIES, TLB_WAYS, 100_000)


def _ref_cycles(ok: list[dict], wss: int, pwc: int) -> tuple[float, str]:
    """Cycles per page-walk reference, calibrated from this host's own 4 KiB vs 2 MiB figures
    at the largest measured wss <= `wss`: (c_4k - c_2m) / (refs_4k * m_4k - refs_2m * m_2m),
    native rows first, else guest 4k-on-4k vs 2m-on-thp (a shadow walk is a native walk)."""
    from vlab.analysis.pagewalk import walk_refs

    def med(pred) -> dict[int, float]:
        return {r["params"]["wss"]: r["median"] for r in ok if pred(r["params"])}

    pairs = [("native 4k vs thp",
              med(lambda p: p.get("where") == "native" and p.get("backing") == "4k"),
              med(lambda p: p.get("where") == "native" and p.get("backing") == "thp")),
             ("guest 4k/4k vs 2m/thp",
              med(lambda p: p.get("where") == "guest" and p.get("backing") == "4k"
                  and p.get("guest_page") == "4k"),
              med(lambda p: p.get("where") == "guest" and p.get("backing") == "thp"
                  and p.get("guest_page") == "2m"))]
    for label, small, big in pairs:
        common = sorted(w for w in small if w in big and w <= wss)
        for w in reversed(common):
            m4, m2 = _miss(w, 4096), _miss(w, 2 << 20)
            denom = (walk_refs("native", "4K", "4K", pwc) * m4
                     - walk_refs("native", "2M", "2M", pwc) * m2)
            if m4 < 0.5 or denom <= 0:
                continue
            ref = (small[w] - big[w]) / denom
            if ref > 0:
                return ref, f"calibrated: {label} at wss={w}"
    return DEFAULT_REF_CYCLES, ("assumed (no 4 KiB vs 2 MiB pair with TLB misses was measured "
                                "to calibrate it)")


def model_rows(rows: list[dict], host: dict, metric: str = SWEEP_METRIC) -> list[dict]:
    """On a shadow-paging host: for each measured guest point, what a two-dimensional walk
    would cost (model). The TLB misses alike in both modes (it caches the same effective page),
    each miss walks more: predicted = measured + miss_rate * (refs_nested - refs_shadow) *
    ref_cycles, without (pwc 0, the published 24-reference case for 4K on 4K) and with a
    page-walk cache on the upper two levels of each dimension."""
    from vlab import results
    from vlab.analysis.pagewalk import walk_refs

    if host.get("paging") != "shadow":
        return []
    mode = "npt" if host.get("cpu_vendor") == "amd" else "ept"
    ok = _ok(rows, metric)
    out = []
    for r in ok:
        p = r["params"]
        if p.get("where") != "guest" or not isinstance(p.get("wss"), int):
            continue
        gp, hp = p.get("guest_page", "4k").upper(), _HOST_PAGE[p.get("backing", "4k")]
        eff = min(P.PAGE[p.get("guest_page", "4k")], P.BACKING_PAGE[p.get("backing", "4k")])
        miss = _miss(p["wss"], eff)
        for pwc in PWC_LEVELS:
            nested = walk_refs("nested", gp, hp, pwc)
            shadow = walk_refs("shadow", gp, hp, pwc)
            ref, source = _ref_cycles(ok, p["wss"], pwc)
            value = r["median"] + miss * (nested - shadow) * ref
            out.append(results.make_row(
                r["experiment"], {**p, "paging": mode, "pwc_levels": pwc}, metric, r["unit"],
                [value], exp_version=r.get("exp_version"), flags={"model": True},
                extra={"model": "vlab.analysis.pagewalk",
                       "formula": "measured_shadow + miss_rate * (refs_nested - refs_shadow) "
                                  "* ref_cycles",
                       "measured_shadow": r["median"], "miss_rate": miss,
                       "refs_nested": nested, "refs_shadow": shadow, "pwc_levels": pwc,
                       "ref_cycles": ref, "ref_cycles_source": source,
                       "tlb": {"entries": TLB_ENTRIES, "ways": TLB_WAYS, "page": eff,
                               "note": "assumed second-level TLB"},
                       "note": f"what {mode.upper()} would cost at this point: a model, not a "
                               "measurement (this host is shadow-paging only)"}))
    return out


def derive_sweep(rows: list[dict], host: dict) -> list[dict]:
    return ratio_rows(rows, SWEEP_METRIC) + knee_rows(rows) + model_rows(rows, host)


def derive_first_touch(rows: list[dict], host: dict) -> list[dict]:
    return ratio_rows(rows, "cycles_per_page")


# --------------------------------------------------------------------------- declarations

def _sweep(name: str, description: str, setup, measure, quick: dict) -> None:
    register(PagingExperiment(
        name=name, description=description,
        params={"wss": FULL_WSS, "guest_page": GUEST_PAGES, "backing": BACKINGS, "where": WHERE},
        quick=quick, metrics={"cycles_per_access": "cycles"}, requires=requirements(name),
        cpl=3, handled_by="hardware page walk (shadow or two-dimensional)", payload="paging",
        validate=validate, annotate=annotate, derive=derive_sweep,
        setup=setup, measure=measure, teardown=teardown))


_sweep("paging.random_read",
       "independent random 8-byte reads over wss: throughput-bound, many TLB misses in flight",
       setup_random_read, measure_random_read,
       quick={"wss": [64 * MiB], "guest_page": ["4k", "2m"], "backing": ["thp"], "where": WHERE})

_sweep("paging.pointer_chase",
       "dependent loads around a random one-cycle ring over wss: latency-bound, one miss at a time",
       setup_pointer_chase, measure_pointer_chase,
       quick={"wss": [64 * MiB], "guest_page": ["4k"], "backing": ["4k"], "where": WHERE})

register(PagingExperiment(
    name="paging.first_touch",
    description="first write to each page after its memory was dropped (MADV_DONTNEED): "
                "with/without host prefault, with/without preset guest A/D bits",
    params={"wss": [4 * MiB, 64 * MiB], "guest_page": GUEST_PAGES, "backing": BACKINGS,
            "prefault": [False, True], "preset_ad": [True, False], "where": WHERE},
    quick={"wss": [4 * MiB], "guest_page": ["4k"], "backing": ["4k"], "prefault": [True],
           "preset_ad": [True, False], "where": WHERE},
    metrics={"cycles_per_page": "cycles"}, requires=requirements("paging.first_touch"),
    cpl=3, handled_by="KVM page fault (shadow or EPT/NPT violation) / host page fault",
    payload="paging", validate=validate, annotate=annotate, derive=derive_first_touch,
    setup=setup_first_touch, measure=measure_first_touch, teardown=teardown))

register(PagingExperiment(
    name="paging.pte_update",
    description="change a guest PTE (remap, or unmap+map), invlpg it at CPL0, read the page",
    params={"pages": [PTE_PAGES], "op": ["remap", "unmap_map"], "guest_page": ["4k", "2m"],
            "backing": ["4k", "thp"], "where": WHERE},
    quick={"pages": [PTE_PAGES], "op": ["remap"], "guest_page": ["4k"], "backing": ["4k"],
           "where": WHERE},
    metrics={"cycles_per_op": "cycles", "pte_write_cycles": "cycles", "invlpg_cycles": "cycles",
             "read_cycles": "cycles", "cpl0_gate_cycles": "cycles"},
    requires=requirements("paging.pte_update",
                          (_cpl0_only("paging.pte_update", "writing its page tables and invlpg"),)),
    cpl=3, handled_by="shadow MMU (write-protect/unsync, invlpg) or nothing under EPT/NPT",
    payload="paging", validate=validate, annotate=annotate,
    setup=setup_pte_update, measure=measure_pte_update, teardown=teardown))

register(PagingExperiment(
    name="paging.cr3_switch",
    description="switch between two guest address spaces at CPL0, then read `pages` pages",
    params={"pages": [1, 16, 256], "guest_page": ["4k", "2m"], "backing": ["4k"],
            "where": WHERE},
    quick={"pages": [16], "guest_page": ["4k"], "backing": ["4k"], "where": WHERE},
    metrics={"cycles_per_op": "cycles", "switch_cycles": "cycles",
             "read_cycles_per_page": "cycles", "cpl0_gate_cycles": "cycles"},
    requires=requirements("paging.cr3_switch",
                          (_cpl0_only("paging.cr3_switch", "mov to CR3"),)),
    cpl=3, handled_by="shadow MMU (new root or cached root) or nothing under EPT/NPT",
    payload="paging", validate=validate, annotate=annotate,
    setup=setup_cr3_switch, measure=measure_cr3_switch, teardown=teardown))
