"""Shared measurement of one guest micro-operation in a loop (the exits.* experiments).

Per sample the guest times `iters` operations between lfence;rdtsc brackets, and the VMM
timestamps a MARK ucall before the first and after every sample. From one `measure` call:

- guest_cycles: per operation, (sample - bracket) / iters - the nop loop's cost per iteration
  at the same CPL (so a CPL0 figure is the excess over the CPL0 nop baseline);
- host_ns: per operation, (interval between marks - the cost of an empty sample) / iters,
  floored at 0 (samples below the empty-sample cost are counted in host_ns_below_resolution);
- exits_per_op: KVM's binary-stats exits (less host-caused ones and our own ucalls) per
  operation, with the VMM's own user-space exit count beside it;
- guest_cycles_single: one operation per rdtsc bracket, less the bracket (and at CPL0 the nop
  loop's cost per iteration), so its p50 and p99 describe single operations and single exits,
  not batches. The batched guest_cycles stays: it averages the bracket's own jitter away and is
  the steadier figure for cheap operations.

Each call also records both views of the same batches (extra `views`): the guest's rdtsc cycles
per operation and the host's mark-to-mark ns per operation converted with the vCPU's TSC rate,
which `views_agree` compares.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from vlab.run.registry import Measurement
from vlab._errors import VlabError
from vlab.vmm.payloads import (GPA_MMIO, MICRO_ARG_HALTING, MICRO_ARG_READY, MICRO_ARG_STOP,
                               MICRO_F_MARK, MICRO_F_SYNC, MICRO_OPS, P_ARG0, P_VCPU0,
                               P_VCPU_STRIDE)
from vlab.vmm.machine import Machine
from vlab.vmm.stats import diff, guest_exits
from vlab.vmm.thread import VcpuThread
from vlab.vmm.vcpu import Stop

# where the exit experiments' operations go (exits.pio_*, exits.mmio_*, and io.virtio's kick)
PIO_USER_PORT = 0x80
PIO_KERNEL_PORT = 0x81
MMIO_USER = GPA_MMIO
MMIO_KERNEL = GPA_MMIO + 0x1000


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
    flags: int = 0                  # extra guest flags (MICRO_F_KEEP)
    irqchip: bool = False           # an in-kernel irqchip (exits.pio_device, interrupts)
    single: int = 32                # one-operation samples per measure call (0: none)
    measured: int = 0               # vCPUs whose samples count (0: all; ipi_other: vCPU 0
                                    # sends and times, the others are its targets)
    interrupts: bool = False        # count the guest handler's deliveries (VPARAM 5-8)


@dataclass
class MicroState:
    case: MicroCase
    machine: Machine
    handles: dict
    bracket: float            # cycles of an empty rdtsc bracket
    nop_per_iter: float       # cycles per nop-loop iteration at this CPL
    mark_ns: float            # host ns of an empty sample (one MARK round trip)
    tsc_khz: int
    mark_spread_ns: float = 0.0   # interquartile range of the empty samples' mark intervals
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _run_samples(m: Machine, op: str, iters: int, samples: int, a0: int, a1: int,
                 flags: int = MICRO_F_MARK) -> None:
    m.restart()
    m.set_args(MICRO_OPS[op], iters, samples, a0, a1, flags, 0, 0, 0, 0)
    for v in m.vcpus:
        v.record_marks(samples + 2)
    m.run_all(timeout=60)


def _pause_at_sync(stop: Stop) -> bool:
    """on_stop of a measured run: the guest's sync before its samples, nothing else."""
    if stop.reason != "sync":
        raise RuntimeError(f"vCPU: expected sync, got {stop.reason}")
    return True


def _per_op_cycles(samples: np.ndarray, iters: int, bracket: float) -> np.ndarray:
    return (samples.astype(np.float64) - bracket) / max(iters, 1)


def setup(case: MicroCase) -> MicroState:
    """Build the machine and calibrate this process's bracket, nop baseline and mark cost."""
    m = Machine(vcpus=case.vcpus, cpl=case.cpl, irqchip=case.irqchip)
    try:
        handles = case.prepare(m) if case.prepare else {}
        _run_samples(m, "empty", 0, 64, 0, 0)
        bracket = float(np.median(m.results(0)))
        marks = np.diff(m.vcpus[0].marks().astype(np.int64))
        mark_ns = float(np.median(marks))
        spread = float(np.subtract(*np.percentile(marks, [75, 25])))
        nop_iters = 2000 if case.cpl == 3 else 20
        _run_samples(m, "nop", nop_iters, 32, 0, 0)
        nop = float(np.median(_per_op_cycles(m.results(0), nop_iters, bracket)))
        # Prime: run the operation once, so one-time work (a lazily passed-through MSR's first
        # write, first-touch faults of the code and data) is not counted as its steady cost.
        _run_samples(m, case.op, case.iters, 1, case.a0, case.a1, MICRO_F_MARK | case.flags)
        return MicroState(case, m, handles, bracket, nop, mark_ns, m.vcpus[0].tsc_khz or 1,
                          mark_spread_ns=spread)
    except BaseException:
        m.close()
        raise


def measure(st: MicroState, loops: int) -> Measurement:
    """Run `loops` samples of `iters` operations on every vCPU; see the module docstring."""
    c, m = st.case, st.machine
    m.restart()
    m.set_args(MICRO_OPS[c.op], c.iters, loops, c.a0, c.a1,
               MICRO_F_MARK | MICRO_F_SYNC | c.flags, 0, 0, 0, 0)
    irq0 = irq_counters(m) if c.interrupts else None
    for v in m.vcpus:
        v.record_marks(loops + 2)
    before_truth = c.counts(st.handles) if c.counts else None
    snaps: dict = {}
    # each vCPU runs to its sync on its own thread and waits there, so that the counters are
    # read with every vCPU out of the guest; then all run the measured samples to done
    threads = [VcpuThread(v, timeout=60, on_stop=_pause_at_sync) for v in m.vcpus]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.wait_paused(90)
        for v in m.vcpus:
            snaps[v.id] = (v.counters(), v.stats())
        for t in threads:
            t.resume(timeout=120)
        errors = []
        for t in threads:
            try:
                t.wait_done(150)
            except VlabError as e:
                errors.append(e)
        if errors:
            raise _with_state(errors[0], m, threads, c)
    finally:
        for t in threads:
            t.quit()

    ops_per_vcpu = c.iters * loops
    cycles, host_ns, per_vcpu, raw_guest = [], [], [], []
    exits_kvm = exits_vmm = 0
    below = 0
    measured = m.vcpus[:c.measured] if c.measured else m.vcpus
    irq_kvm: dict[str, int] = {}
    for v in m.vcpus:
        c0, k0 = snaps[v.id]
        c1, k1 = v.counters(), v.stats()
        dk = diff(k1, k0)
        ucalls = c1["ucalls"] - c0["ucalls"]
        # our own MARK/DONE ucalls are user-space exits too; they are not the operation's
        exits_kvm += guest_exits(dk) - ucalls
        exits_vmm += (c1["exits_total"] - c0["exits_total"]) - ucalls
        for k in IRQ_STATS:
            irq_kvm[k] = irq_kvm.get(k, 0) + dk.get(k, 0)
        if v not in measured:
            continue
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
        raw_guest += (g + st.nop_per_iter).tolist()
        per_vcpu.append({"vcpu": v.id, "guest_cycles_median": float(np.median(g)),
                         "host_ns_median": float(np.median(h)),
                         "emulated_insns": dk.get("insn_emulation", 0)})
    total_ops = ops_per_vcpu * len(measured)
    khz = st.tsc_khz
    extra = {"iters": c.iters, "loops": loops, "bracket_cycles": st.bracket,
             "nop_cycles_per_iter": st.nop_per_iter, "mark_ns": st.mark_ns,
             "guest_cycles_batch": c.iters,
             "vmm_exits_per_op": exits_vmm / total_ops, "per_vcpu": per_vcpu,
             "host_ns_below_resolution": below, "host_ns_samples": len(host_ns),
             # the same batches seen twice: guest rdtsc cycles per op (nop loop not taken off)
             # and host mark-to-mark ns per op times the vCPU's TSC rate
             "views": {"guest_cycles": float(np.median(raw_guest)),
                       "host_cycles": float(np.median(host_ns)) * khz / 1e6,
                       "mark_spread_cycles": st.mark_spread_ns * khz / 1e6 / c.iters,
                       "tsc_khz": khz}}
    if c.counts:
        extra["truth_per_op"] = (c.counts(st.handles) - before_truth) / total_ops
    metrics_more: dict[str, list[float]] = {}
    if irq0 is not None:
        d = {k: irq_counters(m)[k] - irq0[k] for k in irq0}
        # one operation = one delivery of the op's vector
        ops_run = total_ops
        extra["interrupts"] = {
            "handled": d["handled"], "operations": ops_run, "late": d["late"],
            "handled_per_op": d["handled"] / ops_run,
            "eois": d["eois"], "spurious": d["spurious"],
            "kvm": irq_kvm, "kvm_irq_injections_per_op": irq_kvm.get("irq_injections", 0) / ops_run}
        if d["eois"]:
            eoi = d["eoi_cycles"] / d["eois"]
            metrics_more["eoi_cycles"] = [eoi]
            metrics_more["ipi_cycles"] = [x - eoi for x in cycles]
    # pyperf calibrates its loop count against what we return: the wall time these samples
    # took (mark to mark), which includes the per-sample MARK exits. Returning guest time
    # alone would make a nop loop look 100x shorter than it is and its runs far too long.
    marks0 = m.vcpus[0].marks().astype(np.int64)
    wall = float(marks0[-1] - marks0[0]) / 1e9 if len(marks0) > 1 else 0.0
    st.calls += 1
    metrics = {"guest_cycles": cycles, "host_ns": host_ns,
               "exits_per_op": [exits_kvm / total_ops]}
    metrics.update(metrics_more)
    if c.single:
        metrics["guest_cycles_single"] = single_op_samples(st)
        extra["single_samples_per_call"] = c.single
    return Measurement(seconds=wall, metrics=metrics, extra=extra)


def single_op_samples(st: MicroState) -> list[float]:
    """`case.single` samples of one operation each, per vCPU: rdtsc bracket minus the empty
    bracket's median (and at CPL0 the nop loop's cost per iteration, as for the batched figure).
    Run after the batched samples, outside the exit accounting."""
    c, m = st.case, st.machine
    m.restart()
    m.set_args(MICRO_OPS[c.op], 1, c.single, c.a0, c.a1, c.flags, 0, 0, 0, 0)
    m.run_all(timeout=60)
    out: list[float] = []
    for v in (m.vcpus[:c.measured] if c.measured else m.vcpus):
        out += (_per_op_cycles(m.results(v.id), 1, st.bracket) - st.nop_per_iter).tolist()
    return out


# KVM vCPU statistics that count interrupt work (summed over the VM's vCPUs per measure call)
IRQ_STATS = ("irq_injections", "halt_exits", "halt_wakeup", "halt_successful_poll",
             "irq_window_exits", "req_event")


def _with_state(e: VlabError, m: Machine, threads: list[VcpuThread], c: MicroCase) -> VlabError:
    """`e` (the first vCPU's failure) with what every vCPU was doing, so a multi-vCPU case that
    stopped says which side stalled: each vCPU's outcome and rip, and for interrupt ops the
    op vector's bits in its local APIC (IRR pending, ISR in service) and the handshake
    arguments (ipi_other's stop, ready, halting; the IPIs the target did not take in 5 s)."""
    if len(threads) < 2 and not c.interrupts:
        return e
    parts = []
    vec = c.a0 & 0xFF
    for t in threads:
        v = t.vcpu
        if t.stop_reason is None:       # still in KVM_RUN: its registers would wait for it
            parts.append(f"vCPU {v.id} running")
            continue
        what = "finished" if t.error is None else type(t.error).__name__
        try:
            rip, cpl = v.rip()
            what += f" rip={rip:#x} cpl={cpl}"
            if c.interrupts:
                apic = v.lapic()
                what += (f" irr={_apic_bit(apic, 0x200, vec)} isr={_apic_bit(apic, 0x100, vec)}"
                         f" tpr={apic[0x80]}")
        except VlabError as why:
            what += f" (state unreadable: {why})"
        parts.append(f"vCPU {v.id} {what}")
    if c.interrupts:
        arg = m.params[P_ARG0:]
        parts.append(f"stop={int(arg[MICRO_ARG_STOP])} ready={int(arg[MICRO_ARG_READY])} "
                     f"halting={int(arg[MICRO_ARG_HALTING])} late={irq_counters(m)['late']}")
    e.args = (f"{e}; " + "; ".join(parts),)
    return e


def _apic_bit(apic: bytes, base: int, vec: int) -> int:
    """Bit `vec` of the 256-bit local APIC register at `base` (IRR 0x200, ISR 0x100): eight
    32-bit words, 16 bytes apart."""
    off = base + 16 * (vec // 32)
    return (int.from_bytes(apic[off:off + 4], "little") >> (vec % 32)) & 1


def irq_counters(m: Machine) -> dict[str, int]:
    """The guest handler's cumulative counters, summed over vCPUs (micro.c publishes them in
    VPARAM(id, 5..9) after every interrupt op): deliveries of the op's vector, EOIs, EOI cycles,
    spurious interrupts, and the IPIs ipi_other's target did not take within the wait (5 s)."""
    out = {"handled": 0, "eois": 0, "eoi_cycles": 0, "spurious": 0, "late": 0}
    for v in m.vcpus:
        base = P_VCPU0 + P_VCPU_STRIDE * v.id
        p = m.params
        out["handled"] += int(p[base + 5])
        out["eois"] += int(p[base + 6])
        out["eoi_cycles"] += int(p[base + 7])
        out["spurious"] += int(p[base + 8])
        out["late"] += int(p[base + 9])
    return out


def views_agree(extras: list[dict], rel_tol: float = 0.10) -> dict | None:
    """Compare the guest's and the host's view of the same batches (extra `views` of each
    measure call): guest rdtsc cycles per operation against host ns per operation x TSC kHz.

    They agree when the medians over calls differ by at most `rel_tol` of the guest figure plus
    twice the jitter of one mark-to-mark interval spread over the batch (for cheap operations
    the host's view is mostly that jitter). Returns the figures and the verdict, or None when
    no call recorded both views."""
    views = [e["views"] for e in extras if e.get("views")]
    if not views:
        return None
    guest = float(np.median([v["guest_cycles"] for v in views]))
    host = float(np.median([v["host_cycles"] for v in views]))
    spread = float(np.median([v.get("mark_spread_cycles", 0.0) for v in views]))
    tol = rel_tol * abs(guest) + 2 * spread
    return {"guest_cycles": guest, "host_cycles": host, "tolerance_cycles": tol,
            "rel_tol": rel_tol, "agree": abs(host - guest) <= tol,
            "host_over_guest": host / guest if guest else None}


def teardown(st: MicroState) -> None:
    st.machine.close()


# ---- what a case prepares on its machine (sinks, ioeventfds) and how it counts the truth ----
def sink_pio(port: int) -> Callable[[Machine], dict]:
    """prepare: a PIO sink at `port` (the VMM counts each exit, in C)."""
    def prepare(m):
        return {"sink": m.vm.add_pio_sink(port)}
    return prepare


def sink_mmio(addr: int) -> Callable[[Machine], dict]:
    """prepare: an MMIO sink over the page at `addr`."""
    def prepare(m):
        return {"sink": m.vm.add_mmio_sink(addr, 0x1000)}
    return prepare


def eventfd(addr: int, length: int, pio: bool) -> Callable[[Machine], dict]:
    """prepare: an ioeventfd at `addr` (KVM signals it without leaving the kernel)."""
    def prepare(m):
        return {"eventfd": m.vm.add_ioeventfd(addr, length, pio=pio)}
    return prepare


def sink_hits(h: dict) -> int:
    """counts: exits the sink consumed."""
    return h["sink"].hits


def eventfd_count(h: dict) -> int:
    """counts: signals the ioeventfd received."""
    h["eventfd"].read()
    return h["eventfd"].total
