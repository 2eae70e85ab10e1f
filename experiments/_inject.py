"""exits.irq_inject: the time from the host writing an irqfd to the guest's handler running.

The host takes its TSC just before the eventfd write (`IrqFd.fire`, in C); the guest's handler
takes the guest TSC at entry. The two clocks differ by the vCPU's TSC offset (and a scaling
ratio, 1 unless the VMM set another TSC rate):

- VMX and SVM: the CPU adds the offset (VMCS TSC_OFFSET / VMCB tsc_offset) and scales in
  hardware: guest TSC = host TSC x ratio + offset. KVM reports the guest's TSC for the current
  host TSC through KVM_GET_MSRS(IA32_TSC).
- PVM: guest code runs natively in the host's address space, and its rdtsc reads the host's TSC
  as the host kernel sees it (nothing offsets a user-mode rdtsc there); KVM's IA32_TSC may still
  carry an offset it cannot apply, so KVM's answer is checked against a direct measurement.
- TCG: QEMU's emulated TSC; both sides read the same emulated clock.

So vlab measures the relation twice and says which it used: (1) KVM_GET_MSRS(IA32_TSC) between
two host rdtscs (an interval as wide as the ioctl), and (2) a guest rdtsc inside one KVM_RUN
bracketed by host rdtscs (as wide as a guest entry and exit). When (1) falls inside (2) it is
used; otherwise the guest's own reading (2) is, and the row says KVM's offset disagreed.
The uncertainty of the offset is recorded with every row.

The guest waits for each interrupt by spinning with interrupts on (`wait=spin`: delivery to a
running vCPU, a posted interrupt or a kick) or in hlt on the in-kernel LAPIC (`wait=halt`: the
host first waits `settle_us` so the vCPU is asleep; with halt polling the wake may come from
the poll loop, which KVM's halt_successful_poll counts).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from vlab._errors import GuestTimeout, VlabError
from vlab.run.registry import (LoopExperiment, Measurement, needs_cap, needs_kvm, one_of, within)
from vlab.vmm.devices import IrqFd
from vlab.vmm.hostkernels import rdtsc as host_tsc
from vlab.vmm.machine import Machine
from vlab.vmm.payloads import MICRO_ARG_HALTING, MICRO_F_HALT, MICRO_OPS, P_ARG0
from vlab.vmm.stats import diff
from vlab.vmm.thread import VcpuThread

VECTOR = 0x41
WAIT_S = 5.0            # longest the host waits for the guest to be ready for one interrupt
IRQ_STATS = ("irq_injections", "halt_exits", "halt_wakeup", "halt_successful_poll", "exits")


@dataclass
class TscRelation:
    """guest TSC = host TSC + offset (ratio 1), with the offset's uncertainty."""
    offset: int
    halfwidth: int
    method: str
    kvm_offset: int
    kvm_halfwidth: int
    probe_low: int
    probe_high: int
    kvm_agrees: bool
    guest_khz: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"offset_cycles": self.offset, "uncertainty_cycles": self.halfwidth,
                "method": self.method, "kvm_get_msrs_offset": self.kvm_offset,
                "kvm_get_msrs_uncertainty": self.kvm_halfwidth,
                "guest_rdtsc_bracket": [self.probe_low, self.probe_high],
                "kvm_agrees_with_guest": self.kvm_agrees, "guest_tsc_khz": self.guest_khz}


def tsc_relation(m: Machine) -> TscRelation:
    """Measure the guest-minus-host TSC offset of vCPU 0 both ways (module docstring)."""
    v = m.vcpus[0]
    kvm = []
    for _ in range(16):
        g, a, b = v.guest_tsc()
        kvm.append((b - a, g - (a + b) // 2))
    width, kvm_off = min(kvm)
    probes = []
    for _ in range(4):
        m.restart()
        m.set_args(MICRO_OPS["tsc_probe"])
        h0 = host_tsc()
        m.run_to_done(0, timeout=10)
        h1 = host_tsc()
        g = int(m.results(0)[0])
        probes.append((h1 - h0, g - h1, g - h0))
    _, lo, hi = min(probes)
    agrees = lo - width // 2 <= kvm_off <= hi + width // 2
    if agrees:
        off, half, method = kvm_off, width // 2 + 1, "KVM_GET_MSRS(IA32_TSC)"
    else:
        off, half, method = (lo + hi) // 2, (hi - lo) // 2 + 1, "guest rdtsc inside one KVM_RUN"
    return TscRelation(off, half, method, kvm_off, width // 2 + 1, lo, hi, agrees,
                       v.tsc_khz or 0)


@dataclass
class InjectState:
    machine: Machine
    irqfd: IrqFd
    wait: str
    settle_s: float
    tsc: TscRelation
    calls: int = 0


def setup(params: dict, host: dict) -> InjectState:
    m = Machine(irqchip=True)
    try:
        irq = m.vm.add_irqfd(0, VECTOR)
        tsc = tsc_relation(m)
        wait = params.get("wait", "spin")
        return InjectState(m, irq, wait, float(params.get("settle_us", 1000)) / 1e6, tsc)
    except BaseException:
        m.close()
        raise


def _wait_for(m: Machine, t: VcpuThread, value: int) -> None:
    """Until the guest announces it waits for interrupt `value` (ARG 9), bounded."""
    slot = P_ARG0 + MICRO_ARG_HALTING
    deadline = time.monotonic() + WAIT_S
    while int(m.params[slot]) != value:
        if t.finished:
            t.wait_done(0)          # re-raises what stopped the guest
            raise VlabError(f"the guest ended before waiting for interrupt {value}")
        if time.monotonic() > deadline:
            raise GuestTimeout(WAIT_S, detail=f"the guest did not get ready for interrupt "
                                              f"{value}; were the earlier ones delivered?")
        time.sleep(0)


def measure(st: InjectState, loops: int) -> Measurement:
    """`loops` injections: per injection, wait until the guest waits (and `settle` more when it
    halts), fire the irqfd, and take the guest handler's entry TSC from its results."""
    m, v = st.machine, st.machine.vcpus[0]
    m.restart()
    m.set_args(MICRO_OPS["irq_wait"], 0, 0, VECTOR, loops,
               MICRO_F_HALT if st.wait == "halt" else 0, 0, 0, 0, 0)
    k0 = v.stats()
    fired: list[int] = []
    t = VcpuThread(v, timeout=WAIT_S * (loops + 2) + st.settle_s * loops)
    t.start()
    try:
        for k in range(loops):
            _wait_for(m, t, k + 1)
            if st.settle_s:
                end = time.perf_counter() + st.settle_s
                while time.perf_counter() < end:
                    pass
            fired.append(st.irqfd.fire())
        t.wait_done(WAIT_S * 2)
    finally:
        t.quit()
    handler = m.results(0).astype(np.int64)
    if len(handler) != loops:
        raise VlabError(f"the guest handled {len(handler)} of {loops} injected interrupts")
    host = np.asarray(fired, dtype=np.int64)
    lat = handler - (host + st.tsc.offset)
    khz = st.tsc.guest_khz or 1
    dk = diff(v.stats(), k0)
    st.calls += 1
    extra = {"injections": loops, "handled": int(len(handler)), "vector": VECTOR,
             "wait": st.wait, "settle_us": st.settle_s * 1e6, "tsc": st.tsc.as_dict(),
             "kvm": {k: dk.get(k, 0) for k in IRQ_STATS},
             "kvm_irq_injections_per_op": dk.get("irq_injections", 0) / loops,
             "irqfd_writes": st.irqfd.fired}
    wall = loops * (st.settle_s + float(np.median(lat)) / khz / 1e3)
    return Measurement(seconds=max(wall, 1e-6),
                       metrics={"latency_cycles": lat.astype(float).tolist(),
                                "latency_ns": (lat / khz * 1e6).tolist()},
                       extra=extra)


def teardown(st: InjectState) -> None:
    st.machine.close()


def annotate(params: dict, host: dict, metric: str, samples: list, extras: list):
    """The TSC relation used, its uncertainty against the latency, and the count check."""
    warnings: list[str] = []
    flags: dict = {}
    more: dict = {}
    last = extras[-1] if extras else {}
    tsc = last.get("tsc") or {}
    more["tsc_relation"] = tsc
    if tsc and not tsc.get("kvm_agrees_with_guest"):
        lo, hi = tsc.get("guest_rdtsc_bracket") or (0, 0)
        off = tsc.get("kvm_get_msrs_offset", 0)
        gap = min(abs(off - lo), abs(off - hi))
        warnings.append(f"KVM's IA32_TSC offset is {gap:,} cycles outside the guest's own rdtsc "
                        "bracket (a TSC the CPU does not offset as KVM says: PVM's user-mode "
                        "rdtsc, TCG's emulated TSC); the offset was measured from a guest rdtsc "
                        f"inside one KVM_RUN, +-{tsc.get('uncertainty_cycles', 0):,} cycles")
    if samples and tsc:
        med = float(np.median(samples))
        unc = tsc.get("uncertainty_cycles", 0) * (1e6 / max(tsc.get("guest_tsc_khz") or 1, 1)
                                                  if metric == "latency_ns" else 1)
        if unc > abs(med) / 2:
            warnings.append(f"the TSC offset's uncertainty ({unc:,.0f}) exceeds half the median "
                            f"latency ({med:,.0f}): the figure is an order of magnitude only")
    inj = [e["kvm_irq_injections_per_op"] for e in extras if "kvm_irq_injections_per_op" in e]
    if inj:
        more["kvm_irq_injections_per_op"] = float(np.mean(inj))
    if host.get("emulated_cpl0"):
        flags["emulated_cpl0"] = True      # the handler runs at CPL0, in PVM's emulator
    return warnings, flags, more


EXPERIMENT = LoopExperiment(
    name="exits.irq_inject",
    description="interrupt injection latency: host irqfd write (host TSC) to the guest handler's "
                "entry (guest TSC), the guest spinning or halted",
    params={"wait": ["spin", "halt"]}, quick={"wait": ["spin", "halt"]},
    metrics={"latency_cycles": "cycles", "latency_ns": "ns"},
    requires=[needs_kvm(), needs_cap("IRQCHIP"), needs_cap("IRQFD"), needs_cap("IRQ_ROUTING")],
    cpl=3, handled_by="kernel (irqfd -> MSI -> local APIC)", annotate=annotate,
    limits={"wait": one_of("spin", "halt"),
            "settle_us": within(0, 10_000_000, "microseconds the host waits before firing")},
    setup=setup, measure=measure, teardown=teardown)
