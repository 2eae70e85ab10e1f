"""The migrating guest: its workloads, how it is built, and the guest's own report of its
invariants.

Used by both ends of a migration (vlab/migration/source.py and destination.py): the source
builds the guest with
`build_guest`, runs it with `vlab.vmm.thread.VcpuThread` (paused and throttled from the
migration thread) and tracks it with `vlab.dirty.tracker.DirtyTracker`; the destination
rebuilds memory from the stream, runs the same vCPU and reads the same report.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlab._errors import UsageError, VlabError
from vlab._units import PAGE
from vlab.vmm.payloads import MIGRATE_WORKLOADS as WORKLOADS
from vlab.vmm.payloads import (GPA_PARAMS, GPA_RESULTS, P_RESULTS_BASE, P_RESULTS_STRIDE,
                               RESULTS_SIZE)
from vlab.vmm.vm import Vm

A_WORKLOAD, A_WS, A_RATE, A_SEED, A_LAG_US, A_STOP, A_GEN = 0, 1, 2, 3, 4, 8, 9
CNT_MAGIC = 0x726574756E756F63
RESULT_MAGIC = 0x544C5345524749
K_MAGIC, K_COUNT, K_CHECK, K_TSC = 0, 1, 2, 3
REPORT_KEYS = ("magic", "workload", "counter", "writes", "pages_checked", "bad_pages",
               "first_bad_page", "seq_sum", "max_tsc_step", "migrations", "migration_tsc_step",
               "generation", "ticks_since_migration")


def ws_pages_for(data_bytes: int, ws: int | None) -> int:
    """Working-set pages of the uniform writer: `ws` bytes, or all the data slot holds after the
    counter page and the sequence table."""
    pages = data_bytes // PAGE
    fit = pages - 1
    # table pages T = ceil(4 W / 4096): largest W with 1 + T + W <= pages
    w = fit * 1024 // 1025
    while 1 + -(-w * 4 // PAGE) + w > pages:
        w -= 1
    if ws is None:
        return w
    want = ws // PAGE
    if want < 1 or want > w:
        raise UsageError(f"working set of {ws} bytes does not fit a {data_bytes}-byte guest "
                         f"(at most {w * PAGE} bytes)")
    return want


@dataclass
class GuestSpec:
    """What the source runs: workload, memory and writer rate."""
    workload: str = "uniform"
    mem: int = 64 << 20            # bytes of the data slot
    ws: int | None = None          # working-set bytes (uniform); None = all of it
    rate: int = 10000              # pages/s (uniform); 0 = as fast as possible
    seed: int = 1
    lag_us: int = 50000            # the writer drops a backlog older than this
    backing: str = "4k"

    def validate(self) -> None:
        if self.workload not in WORKLOADS:
            raise UsageError(f"unknown workload {self.workload!r}; one of "
                             f"{', '.join(WORKLOADS)}")
        if self.mem < 1 << 20 or self.mem % (2 << 20):
            raise UsageError(f"guest memory must be a multiple of 2 MiB, at least 2 MiB "
                             f"(got {self.mem})")
        if self.rate < 0:
            raise UsageError("rate must be >= 0 pages/s")
        if self.backing not in ("4k", "thp", "hugetlb-2m", "hugetlb-1g"):
            raise UsageError(f"backing {self.backing!r} cannot be migrated; use 4k, thp, "
                             f"hugetlb-2m or hugetlb-1g")
        if self.workload == "uniform":
            ws_pages_for(self.mem, self.ws)


def build_guest(spec: GuestSpec, *, dirty_ring: int = 0):
    """A Machine running the migrate payload with `spec`, not yet started."""
    from vlab.vmm.machine import Machine, pt_pool_for

    spec.validate()
    pool = pt_pool_for(spec.mem, PAGE) + (512 << 10)   # the guest's tables, the system area's
    m = Machine("migrate", pt_pool=pool, dirty_ring=dirty_ring)
    try:
        m.add_data(spec.mem, backing=spec.backing)
        ws = ws_pages_for(spec.mem, spec.ws) if spec.workload == "uniform" else 0
        m.set_args(WORKLOADS[spec.workload], ws, spec.rate, spec.seed, spec.lag_us)
    except BaseException:
        m.close()
        raise
    return m


def params_view(vm: Vm) -> np.ndarray:
    """The payload's parameter page (u64 slots) of `vm`, no copy."""
    return np.frombuffer(vm.hva(GPA_PARAMS, PAGE), dtype=np.uint64)


def counter_of(vm: Vm, data_gpa: int) -> int | None:
    """The counter page's value, if the page holds a valid counter (magic and checksum)."""
    cnt = np.frombuffer(vm.hva(data_gpa, PAGE), dtype=np.uint64)
    if int(cnt[K_MAGIC]) != CNT_MAGIC:
        return None
    return int(cnt[K_COUNT])


def read_report(vm: Vm) -> dict:
    """The guest's report (results of vCPU 0), validated: the results area and its header are
    guest memory, so nothing in them is trusted."""
    p = params_view(vm)
    base, stride = int(p[P_RESULTS_BASE]), int(p[P_RESULTS_STRIDE])
    if base != GPA_RESULTS or stride % PAGE or not PAGE <= stride <= RESULTS_SIZE:
        raise VlabError(f"guest results area is malformed (base {base:#x}, stride {stride:#x})")
    words = np.frombuffer(vm.hva(base, stride), dtype=np.uint64)
    n, cap = int(words[0]), int(words[1])
    if cap != stride // 8 - 2:
        raise VlabError("guest overwrote its results header")
    if n != len(REPORT_KEYS):
        raise VlabError(f"guest reported {n} values, expected {len(REPORT_KEYS)}")
    rep = {k: int(v) for k, v in zip(REPORT_KEYS, words[2:2 + n])}
    if rep["magic"] != RESULT_MAGIC:
        raise VlabError("guest report has no magic: the guest did not finish its checks")
    return rep


def report_ok(rep: dict, *, migrations: int, counter_at_pause: int | None) -> tuple[bool, list[str]]:
    """Check the guest's report: its own memory checks passed, the register count of writes
    matches the sequence table, it saw the expected number of switch-overs, and the counter
    continued from the value the source's paused memory held."""
    why = []
    if rep["bad_pages"]:
        why.append(f"{rep['bad_pages']} working-set pages do not hold what the guest wrote "
                   f"(first: page {rep['first_bad_page']})")
    if rep["seq_sum"] != rep["writes"]:
        why.append(f"sequence table sums to {rep['seq_sum']} writes, the guest counted "
                   f"{rep['writes']}")
    if rep["migrations"] != migrations:
        why.append(f"guest saw {rep['migrations']} switch-overs, expected {migrations}")
    if counter_at_pause is not None and migrations:
        # the switch-over tick resets ticks_since to 1; a tick cut in half by the pause adds one
        d = rep["counter"] - counter_at_pause - rep["ticks_since_migration"]
        if d not in (0, 1):
            why.append(f"counter did not continue from {counter_at_pause}: now "
                       f"{rep['counter']} after {rep['ticks_since_migration']} ticks")
    return not why, why
