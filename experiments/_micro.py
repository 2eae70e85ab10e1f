"""Shared measurement of one guest micro-operation in a loop (the exits.* experiments).

Per sample the guest times `iters` operations between lfence;rdtsc brackets, and the VMM
timestamps a MARK ucall before the first and after every sample. From one `measure` call:

- guest_cycles: per operation, (sample - bracket) / iters - the nop loop's cost per iteration
  at the same CPL (so a CPL0 figure is the excess over the CPL0 nop baseline);
- host_ns: per operation, (interval between marks - the cost of an empty sample) / iters,
  floored at 0 (samples below the empty-sample cost are counted in host_ns_below_resolution);
- exits_per_op: KVM's binary-stats exits (less host-caused ones and our own ucalls) per
  operation, with the VMM's own user-space exit count beside it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from vlab._experiment import Measurement
from vlab._guest import MICRO_F_MARK, MICRO_F_SYNC, MICRO_OPS
from vlab._machine import Machine
from vlab._stats import diff, guest_exits


@dataclass
class MicroCase:
    op: str
    cpl: int
    iters: int
    a0: int = 0
    a1: int = 0
    vcpus: int = 1
    prepare: Callable[[Machine], dict] | None = None     # add sinks/eventfds; returns handles
    counts: Callable[[dict], int] | None = None          # ground-truth count from the handles


@dataclass
class MicroState:
    case: MicroCase
    machine: Machine
    handles: dict
    bracket: float            # cycles of an empty rdtsc bracket
    nop_per_iter: float       # cycles per nop-loop iteration at this CPL
    mark_ns: float            # host ns of an empty sample (one MARK round trip)
    tsc_khz: int
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _run_samples(m: Machine, op: str, iters: int, samples: int, a0: int, a1: int,
                 flags: int = MICRO_F_MARK) -> None:
    m.restart()
    m.set_args(MICRO_OPS[op], iters, samples, a0, a1, flags, 0)
    for v in m.vcpus:
        v.record_marks(samples + 2)
    m.run_all(timeout=60)


def _per_op_cycles(samples: np.ndarray, iters: int, bracket: float) -> np.ndarray:
    return (samples.astype(np.float64) - bracket) / max(iters, 1)


def setup(case: MicroCase) -> MicroState:
    """Build the machine and calibrate this process's bracket, nop baseline and mark cost."""
    m = Machine(vcpus=case.vcpus, cpl=case.cpl)
    try:
        handles = case.prepare(m) if case.prepare else {}
        _run_samples(m, "empty", 0, 64, 0, 0)
        bracket = float(np.median(m.results(0)))
        mark_ns = float(np.median(np.diff(m.vcpus[0].marks().astype(np.int64))))
        nop_iters = 2000 if case.cpl == 3 else 20
        _run_samples(m, "nop", nop_iters, 32, 0, 0)
        nop = float(np.median(_per_op_cycles(m.results(0), nop_iters, bracket)))
        return MicroState(case, m, handles, bracket, nop, mark_ns, m.vcpus[0].tsc_khz or 1)
    except BaseException:
        m.close()
        raise


def measure(st: MicroState, loops: int) -> Measurement:
    """Run `loops` samples of `iters` operations on every vCPU; see the module docstring."""
    c, m = st.case, st.machine
    m.restart()
    m.set_args(MICRO_OPS[c.op], c.iters, loops, c.a0, c.a1, MICRO_F_MARK | MICRO_F_SYNC, 0)
    for v in m.vcpus:
        v.record_marks(loops + 2)
    before_truth = c.counts(st.handles) if c.counts else None
    snaps: dict = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(m.vcpus) + 1)

    def worker(i: int) -> None:
        try:
            stop = m.vcpus[i].run(timeout=60)
            if stop.reason != "sync":
                raise RuntimeError(f"vCPU {i}: expected sync, got {stop.reason}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        barrier.wait()
        barrier.wait()
        if errors:
            return
        try:
            m.run_to_done(i, timeout=120)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(m.vcpus))]
    for t in threads:
        t.start()
    barrier.wait()
    for v in m.vcpus:
        snaps[v.id] = (v.counters(), v.stats())
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]

    ops_per_vcpu = c.iters * loops
    cycles, host_ns, per_vcpu = [], [], []
    exits_kvm = exits_vmm = 0
    below = 0
    for v in m.vcpus:
        c0, k0 = snaps[v.id]
        c1, k1 = v.counters(), v.stats()
        dk = diff(k1, k0)
        ucalls = c1["ucalls"] - c0["ucalls"]
        # our own MARK/DONE ucalls are user-space exits too; they are not the operation's
        exits_kvm += guest_exits(dk) - ucalls
        exits_vmm += (c1["exits_total"] - c0["exits_total"]) - ucalls
        g = _per_op_cycles(m.results(v.id), c.iters, st.bracket) - st.nop_per_iter
        marks = v.marks().astype(np.int64)
        h = (np.diff(marks)[:loops] - st.mark_ns) / c.iters
        # A sample faster than the median empty sample is noise around an operation that costs
        # less than the calibration can resolve (no exit: an MSR passed through, a cr3 write
        # under NPT). A duration is never negative: such samples count as 0 and are reported.
        below += int(np.count_nonzero(h < 0))
        h = np.maximum(h, 0.0)
        cycles += g.tolist()
        host_ns += h.tolist()
        per_vcpu.append({"vcpu": v.id, "guest_cycles_median": float(np.median(g)),
                         "host_ns_median": float(np.median(h)),
                         "emulated_insns": dk.get("insn_emulation", 0)})
    total_ops = ops_per_vcpu * len(m.vcpus)
    extra = {"iters": c.iters, "loops": loops, "bracket_cycles": st.bracket,
             "nop_cycles_per_iter": st.nop_per_iter, "mark_ns": st.mark_ns,
             "vmm_exits_per_op": exits_vmm / total_ops, "per_vcpu": per_vcpu,
             "host_ns_below_resolution": below, "host_ns_samples": len(host_ns)}
    if c.counts:
        extra["truth_per_op"] = (c.counts(st.handles) - before_truth) / total_ops
    # pyperf calibrates its loop count against what we return: the wall time these samples
    # took (mark to mark), which includes the per-sample MARK exits. Returning guest time
    # alone would make a nop loop look 100x shorter than it is and its runs far too long.
    marks0 = m.vcpus[0].marks().astype(np.int64)
    wall = float(marks0[-1] - marks0[0]) / 1e9 if len(marks0) > 1 else 0.0
    st.calls += 1
    return Measurement(seconds=wall,
                       metrics={"guest_cycles": cycles, "host_ns": host_ns,
                                "exits_per_op": [exits_kvm / total_ops]},
                       extra=extra)


def teardown(st: MicroState) -> None:
    st.machine.close()
