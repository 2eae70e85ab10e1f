"""Page-walk reference-count model and a TLB simulator (numba kernels).

Why: the paging experiments measure cycles per access under shadow paging (the only mode the
PVM hosts offer, see docs/kvm-on-pvm.md) or EPT/NPT. This module puts a *model* next to those
figures: how many memory references one TLB miss costs in each translation mode, and how often
a TLB of a given size misses for a given working set. Everything it returns is a model, and the
dict outputs say so with `model: True`.

Walk model (x86-64, 4-level paging unless `levels` says 5):

* native: a walk reads one entry per level; a 4 KiB page is mapped at level 1 (4 refs), a
  2 MiB page at level 2 (3 refs), a 1 GiB page at level 3 (2 refs).
* nested (EPT/NPT, two-dimensional): each of the guest's n_g entry reads is at a guest-physical
  address that itself needs a host walk of n_h refs, and so does the final guest-physical
  address: (n_g + 1) * (n_h + 1) - 1 refs; 24 for 4K on 4K.
* shadow: the hardware walks the shadow table, a native walk of the *effective* page size, the
  smaller of the guest page and the host backing page (a 2 MiB guest page backed by 4 KiB host
  pages is splintered to 4 KiB in the shadow table).
* page-walk cache (`pwc_levels` = p): hits on the p uppermost levels skip those reads, in each
  dimension (for nested: p guest levels and p levels of every host walk). The leaf level is
  never skipped (a cached leaf would be a TLB hit), so at most n-1 levels per dimension.
  This is the simplest "perfect PWC hit" model, an upper bound on what a PWC saves.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numba import njit

from vlab._errors import UsageError

__all__ = ["PAGE_SIZES", "MODES", "page_bytes", "walk_refs", "model_table", "predicted_cycles",
           "tlb_miss_rate", "tlb_miss_curve", "predicted_curve"]

PAGE_SIZES: dict[str, int] = {"4K": 4096, "2M": 2 << 20, "1G": 1 << 30}
MODES = ("native", "nested", "shadow")
_MODE_ALIASES = {"native": 0, "nested": 1, "ept": 1, "npt": 1, "2d": 1, "tdp": 1, "shadow": 2}
_LEAF_LEVEL = {4096: 1, 2 << 20: 2, 1 << 30: 3}  # level holding the leaf entry


def page_bytes(page: str | int) -> int:
    """Bytes of a page size given as "4K"/"2M"/"1G" (also "4KiB", "2m", ...) or an int."""
    if isinstance(page, (int, np.integer)) and not isinstance(page, bool):
        size = int(page)
    elif isinstance(page, str):
        key = page.strip().upper().replace("IB", "").replace("B", "")
        if key not in PAGE_SIZES:
            raise UsageError(f"unknown page size {page!r} (use 4K, 2M or 1G)")
        size = PAGE_SIZES[key]
    else:
        raise UsageError(f"page size must be a string like '4K' or an int, got {page!r}")
    if size not in _LEAF_LEVEL:
        raise UsageError(f"page size {size} is not an x86-64 page size (4K, 2M, 1G)")
    return size


_to_bytes = page_bytes  # for functions whose `page_bytes` argument shadows the name


def _page_name(size: int) -> str:
    return {v: k for k, v in PAGE_SIZES.items()}[size]


def _mode_code(mode: str) -> int:
    code = _MODE_ALIASES.get(str(mode).strip().lower())
    if code is None:
        raise UsageError(f"unknown walk mode {mode!r} (use native, nested/ept/npt or shadow)")
    return code


@njit(cache=True)
def _refs_kernel(mode: int, guest_levels: int, host_levels: int, pwc: int) -> int:
    """References per TLB miss; levels are the number of entries read by an uncached walk."""
    g = guest_levels - min(pwc, guest_levels - 1)
    if mode == 0:
        return g
    h = host_levels - min(pwc, host_levels - 1)
    if mode == 1:
        return (g + 1) * (h + 1) - 1
    # shadow: host_levels already holds the walk length of the effective page size
    return h


def _walk_levels(size: int, levels: int) -> int:
    return levels - _LEAF_LEVEL[size] + 1


def walk_refs(mode: str, guest_page: str | int, host_page: str | int = "4K",
              pwc_levels: int = 0, *, levels: int = 4) -> int:
    """Memory references one TLB miss costs (model).

    `mode` is "native" (host_page ignored: the walk of a guest_page-sized mapping), "nested"
    (aliases "ept", "npt") or "shadow". `pwc_levels` upper levels per dimension hit in a
    page-walk cache. `levels` is 4 (or 5 with LA57). Examples: native 4K -> 4, nested 4K/4K
    -> 24, nested 2M/4K -> 19, shadow 2M guest on 4K backing -> 4.
    """
    code = _mode_code(mode)
    if levels not in (4, 5):
        raise UsageError(f"levels must be 4 or 5, got {levels}")
    if pwc_levels < 0:
        raise UsageError(f"pwc_levels must be >= 0, got {pwc_levels}")
    g = page_bytes(guest_page)
    h = page_bytes(host_page)
    ng = _walk_levels(g, levels)
    nh = _walk_levels(h, levels)
    if code == 2:
        nh = _walk_levels(min(g, h), levels)
    return int(_refs_kernel(code, ng, nh, int(pwc_levels)))


def model_table(pwc_levels: Sequence[int] = (0,), *, levels: int = 4) -> list[dict[str, Any]]:
    """Every (mode, guest page, host page, PWC) combination with its refs per TLB miss.

    Native rows have host_page None (no second dimension). Each row also gives the effective
    TLB page size (what one TLB entry maps) and is labelled `model: True`.
    """
    rows: list[dict[str, Any]] = []
    names = list(PAGE_SIZES)
    for pwc in pwc_levels:
        for gp in names:
            rows.append({"mode": "native", "guest_page": gp, "host_page": None,
                         "effective_page": gp, "pwc_levels": int(pwc),
                         "refs": walk_refs("native", gp, gp, pwc, levels=levels),
                         "model": True})
        for mode in ("nested", "shadow"):
            for gp in names:
                for hp in names:
                    eff = _page_name(min(PAGE_SIZES[gp], PAGE_SIZES[hp]))
                    rows.append({"mode": mode, "guest_page": gp, "host_page": hp,
                                 "effective_page": eff, "pwc_levels": int(pwc),
                                 "refs": walk_refs(mode, gp, hp, pwc, levels=levels),
                                 "model": True})
    return rows


def predicted_cycles(mode: str, guest_page: str | int, host_page: str | int, miss_rate: float,
                     ref_cycles: float, *, pwc_levels: int = 0, levels: int = 4,
                     base_cycles: float = 0.0) -> dict[str, Any]:
    """Predicted translation cost per access (model): miss_rate * refs * ref_cycles.

    A deliberately simple model, to show what EPT/NPT *would* cost next to measured shadow
    figures: every walk reference costs `ref_cycles` (pick a cache-hit latency for an
    optimistic bound, a DRAM latency for a pessimistic one), walks are not overlapped, and
    `base_cycles` (the cost of an access that hits the TLB) is added unchanged.
    """
    if not (0.0 <= miss_rate <= 1.0):
        raise UsageError(f"miss_rate must be in [0, 1], got {miss_rate}")
    if ref_cycles < 0:
        raise UsageError(f"ref_cycles must be >= 0, got {ref_cycles}")
    refs = walk_refs(mode, guest_page, host_page, pwc_levels, levels=levels)
    walk = miss_rate * refs * ref_cycles
    return {"mode": mode, "guest_page": guest_page, "host_page": host_page,
            "pwc_levels": pwc_levels, "miss_rate": float(miss_rate),
            "ref_cycles": float(ref_cycles), "refs": refs, "walk_cycles_per_access": walk,
            "cycles_per_access": base_cycles + walk,
            "formula": "base_cycles + miss_rate * refs * ref_cycles", "model": True}


# --------------------------------------------------------------------------- TLB simulation

@njit(cache=True)
def _tlb_sim(n_pages: np.int64, n_sets: np.int64, ways: np.int64, n_warmup: np.int64,
             n_accesses: np.int64, seed: np.uint64) -> np.int64:
    """Set-associative LRU TLB over uniformly random page numbers in [0, n_pages).

    Set index = page number mod n_sets. The random stream is xorshift64* (seeded), so results
    are identical from run to run. Returns the misses among the last `n_accesses` accesses.
    """
    tags = np.full((n_sets, ways), -1, dtype=np.int64)
    stamp = np.zeros((n_sets, ways), dtype=np.int64)
    state = seed ^ np.uint64(0x9E3779B97F4A7C15)
    if state == np.uint64(0):
        state = np.uint64(1)
    misses = np.int64(0)
    total = n_warmup + n_accesses
    for i in range(total):
        state ^= state >> np.uint64(12)
        state ^= state << np.uint64(25)
        state ^= state >> np.uint64(27)
        r = state * np.uint64(0x2545F4914F6CDD1D)
        vpn = np.int64((r >> np.uint64(11)) % np.uint64(n_pages))
        s = vpn % n_sets
        hit = -1
        victim = 0
        oldest = stamp[s, 0]
        for w in range(ways):
            if tags[s, w] == vpn:
                hit = w
                break
            if stamp[s, w] < oldest:
                oldest = stamp[s, w]
                victim = w
        if hit >= 0:
            stamp[s, hit] = i + 1
        else:
            # an empty way has stamp 0 and is the oldest
            tags[s, victim] = vpn
            stamp[s, victim] = i + 1
            if i >= n_warmup:
                misses += 1
    return misses


def tlb_miss_rate(wss_bytes: int, page_bytes: int | str, entries: int, ways: int,
                  n_accesses: int = 200_000, seed: int = 0, *,
                  warmup: int | None = None) -> float:
    """Steady-state miss rate (model) of a set-associative LRU TLB under uniform random access.

    The working set is ceil(wss_bytes / page) pages; each access picks one uniformly. The first
    `warmup` accesses (default: as many as measured) fill the TLB and are not counted, so a
    working set within the TLB's reach (entries * page) gives ~0 and one far beyond it
    approaches 1 - entries / pages. Deterministic for a given seed.
    """
    page = _to_bytes(page_bytes) if isinstance(page_bytes, str) else int(page_bytes)
    if page <= 0:
        raise UsageError(f"page size must be > 0, got {page}")
    if wss_bytes <= 0:
        raise UsageError(f"wss_bytes must be > 0, got {wss_bytes}")
    if entries <= 0 or ways <= 0 or entries % ways:
        raise UsageError(f"entries ({entries}) must be a positive multiple of ways ({ways})")
    if n_accesses <= 0:
        raise UsageError(f"n_accesses must be > 0, got {n_accesses}")
    n_pages = -(-int(wss_bytes) // page)
    warm = n_accesses if warmup is None else int(warmup)
    misses = _tlb_sim(np.int64(n_pages), np.int64(entries // ways), np.int64(ways),
                      np.int64(warm), np.int64(n_accesses), np.uint64(seed & (2**64 - 1)))
    return float(misses) / float(n_accesses)


def tlb_miss_curve(wss_list: Iterable[int], page: int | str, entries: int, ways: int,
                   n_accesses: int = 200_000, seed: int = 0) -> list[dict[str, Any]]:
    """`tlb_miss_rate` for each working-set size: rows {wss_bytes, page_bytes, entries, ways,
    tlb_reach_bytes, miss_rate, model: True}."""
    pb = page_bytes(page)
    out = []
    for wss in wss_list:
        out.append({"wss_bytes": int(wss), "page_bytes": pb, "entries": entries, "ways": ways,
                    "tlb_reach_bytes": entries * pb,
                    "miss_rate": tlb_miss_rate(int(wss), pb, entries, ways, n_accesses, seed),
                    "model": True})
    return out


def predicted_curve(mode: str, guest_page: str | int, host_page: str | int,
                    wss_list: Iterable[int], *, entries: int = 1536, ways: int = 12,
                    ref_cycles: float = 30.0, pwc_levels: int = 0, base_cycles: float = 0.0,
                    n_accesses: int = 200_000, seed: int = 0) -> list[dict[str, Any]]:
    """Predicted cycles per random access vs working-set size (model).

    The TLB caches the combined translation at the effective page size: the guest page for
    native, and the smaller of guest page and host backing for nested and shadow. Its miss
    rate comes from `tlb_miss_rate` (one TLB level of `entries`/`ways`; defaults are a
    Skylake-like unified STLB) and feeds `predicted_cycles`.
    """
    g = page_bytes(guest_page)
    h = page_bytes(host_page)
    eff = g if _mode_code(mode) == 0 else min(g, h)
    rows = []
    for wss in wss_list:
        rate = tlb_miss_rate(int(wss), eff, entries, ways, n_accesses, seed)
        row = predicted_cycles(mode, guest_page, host_page, rate, ref_cycles,
                               pwc_levels=pwc_levels, base_cycles=base_cycles)
        row.update(wss_bytes=int(wss), tlb_page_bytes=eff, entries=entries, ways=ways)
        rows.append(row)
    return rows

