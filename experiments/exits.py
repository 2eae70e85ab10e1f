"""Exit costs: what every kind of VM exit costs, seen from the guest (rdtsc) and the host.

Each experiment runs a guest loop of one operation (see experiments/_micro.py for how the
figures are derived). `exits_per_op` is checked against what the operation should cost in exits
on this host's flavor and settings (experiments/_expect.py: VMX/SVM/PVM, EPT/NPT, CR0/CR4 bits
the guest owns, MSRs KVM passes through); a mismatch becomes a row warning that names both
numbers and the setting, and every row records the expectation it was checked against
(`extra.expectation`). The facts behind the table are in docs/exits.md.

Besides the batched per-operation figures, each row has `guest_cycles_single` (one operation per
rdtsc bracket: p50/p99 of single exits), a check that the guest's and the host's views of the same
batches agree (`extra.views`), and exits.syscall derives `x_syscall`, the guest system call's
round trip over the host's getppid().
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np

from vlab.run.registry import (LoopExperiment, Measurement, Requirement, needs_cap, needs_kvm,
                              one_of, register, within)
from vlab.host.emulation import tcg_shadow_requirement
from vlab.vmm.hostkernels import syscall_loop
from vlab.vmm.payloads import (GPA_IMAGE, MAX_VCPUS, MICRO_F_HALT, MICRO_F_KEEP, MICRO_F_X2APIC,
                               P_VCPU0)

from vlab.experiments import _expect, _inject, _micro
from vlab.experiments._micro import (MMIO_KERNEL, MMIO_USER, PIO_KERNEL_PORT, PIO_USER_PORT,
                                     MicroCase)
from vlab.experiments._micro import eventfd as _eventfd, eventfd_count as _eventfd_count
from vlab.experiments._micro import sink_hits as _sink_hits, sink_mmio as _sink_mmio
from vlab.experiments._micro import sink_pio as _sink_pio

EXIT_METRICS = {"guest_cycles": "cycles", "host_ns": "ns", "exits_per_op": "exits",
                "guest_cycles_single": "cycles"}
PIO_DEVICE_PORT = 0x4D0     # ELCR of KVM's in-kernel PIC (an in-kernel device that answers)
# MSRs by (index, name). IA32_MISC_ENABLE is emulated by KVM and intercepted on every flavor
# (in neither pass-through list); reading it and writing back its value is harmless.
MSR_KERNEL = (0x1A0, "IA32_MISC_ENABLE")
MSR_PASSTHROUGH = (0x174, "IA32_SYSENTER_CS")   # passed through on VMX and SVM
MSR_TSC_ADJUST = (0x3B, "IA32_TSC_ADJUST")
MSR_KERNEL_GS_BASE = (0xC0000102, "IA32_KERNEL_GS_BASE")
MSR_SPEC_CTRL = (0x48, "IA32_SPEC_CTRL")
MSR_PRED_CMD = (0x49, "IA32_PRED_CMD")
MSR_TSX_CTRL = (0x122, "IA32_TSX_CTRL")
MSR_ARCH_CAPABILITIES = 0x10A
MSR_UNKNOWN = 0xDEADBEEF    # no such MSR: exits to user space with KVM_CAP_X86_USER_SPACE_MSR


def _iters(params: dict, cpl3: int, cpl0: int) -> int:
    it = params.get("iters")
    if it is not None:
        return int(it)
    return cpl3 if params.get("cpl", 3) == 3 else cpl0


def _validate_common(params: dict, host: dict) -> None:
    from vlab._errors import UsageError

    if params.get("cpl", 3) not in (0, 3):
        raise UsageError(f"cpl must be 0 or 3, not {params.get('cpl')!r}")
    if "iters" in params and (not isinstance(params["iters"], int) or params["iters"] < 1):
        raise UsageError(f"iters must be a positive integer, not {params['iters']!r}")
    v = params.get("vcpus", 1)
    if not isinstance(v, int) or v < 1:
        raise UsageError(f"vcpus must be a positive integer, not {v!r}")


# what each value may be (vlab.run.registry.Limit); a string parameter takes its declared values
LIMITS = {"cpl": within(0, 3, "privilege level, 2 bits"),
          "vcpus": within(1, 255, "vCPU count; an xAPIC ID is 8 bits"),
          "leaf": within(0, (1 << 32) - 1, "CPUID leaf, the 32-bit EAX")}


def _fits_vcpus() -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        want = params.get("vcpus", 1)
        have = host.get("kvm", {}).get("nr_vcpus") or host.get("cpu", {}).get("count") or 1
        if want > MAX_VCPUS:
            return f"vcpus={want} exceeds vlab's limit of {MAX_VCPUS}"
        if want > have:
            return f"vcpus={want} exceeds this host's recommended vCPU count ({have})"
        return None
    return Requirement("vcpus", check)


def _loop_measure(st, loops: int) -> Measurement:
    meas = _micro.measure(st, loops)
    if not st.extra.get("subtract_baseline", True):
        for metric in ("guest_cycles", "guest_cycles_single"):
            if metric in meas.metrics:
                meas.metrics[metric] = [c + st.nop_per_iter for c in meas.metrics[metric]]
    meas.extra.update({k: v for k, v in st.extra.items() if k != "subtract_baseline"})
    return meas


def annotate_exits(params: dict, host: dict, metric: str, samples: list, extras: list):
    """Flags, warnings and extras of an exits.* row: emulated CPL0; the expectation for this
    host's flavor and settings, and the measured exit count against it (KVM's stats, the VMM's
    own count, the sink/eventfd ground truth); the two views' agreement; syscall CPL."""
    warnings: list[str] = []
    flags: dict = {}
    more: dict = {}
    last = extras[-1] if extras else {}
    cpl = params.get("cpl", 3)
    emulated = bool(host.get("emulated_cpl0"))
    if cpl == 0 and emulated:
        flags["emulated_cpl0"] = True
    name = last.get("experiment")
    exp = _expect.expectation(name, params, host, int(last.get("iters") or 1)) if name else None
    if exp is not None:
        more["expectation"] = exp.as_dict()
        more["expected_exits_per_op"] = exp.exits
    if metric == "exits_per_op" and exp is not None:
        warning = _expect.check(exp, float(np.mean(samples)))
        if warning:
            warnings.append(warning)
    if metric == "exits_per_op":
        vmm = [e.get("vmm_exits_per_op") for e in extras if "vmm_exits_per_op" in e]
        if vmm and "user space" in last.get("handled_by", "") and abs(np.mean(vmm) - 1) > 0.01:
            warnings.append(f"the VMM saw {np.mean(vmm):.2f} user-space exits per operation, "
                            "expected 1")
        truth = [e["truth_per_op"] for e in extras if "truth_per_op" in e]
        if truth and abs(np.mean(truth) - 1) > 1e-9:
            warnings.append(f"ground truth (sink/eventfd count) is {np.mean(truth):.4f} per "
                            "operation, expected exactly 1")
    irq = [e["interrupts"] for e in extras if "interrupts" in e]
    if irq and metric == "exits_per_op":
        # ground truth of the interrupt rows: the guest's handler counted every delivery
        handled = sum(i["handled"] for i in irq)
        ops = sum(i["operations"] for i in irq)
        more["interrupts_per_op"] = handled / ops if ops else None
        more["kvm_irq_injections_per_op"] = float(np.mean([i["kvm_irq_injections_per_op"]
                                                           for i in irq]))
        more["spurious_interrupts"] = sum(i["spurious"] for i in irq)
        late = sum(i.get("late", 0) for i in irq)
        more["late_interrupts"] = late
        if handled != ops:
            warnings.append(f"the guest's handler counted {handled} interrupts for {ops} "
                            "operations: an interrupt was lost or duplicated"
                            + (f" ({late} IPIs not taken within 5 s)" if late else ""))
    if metric == "guest_cycles":
        views = _micro.views_agree(extras)
        if views is not None:
            more["views"] = views
            if not views["agree"]:
                g, h = views["guest_cycles"], views["host_cycles"]
                larger = "host" if h > g else "guest"
                pct = abs(h - g) / abs(min(g, h)) * 100 if min(g, h) else float("inf")
                warnings.append(
                    f"the two views disagree: guest rdtsc {g:,.0f} cycles/op, host ns x TSC "
                    f"{h:,.0f} cycles/op; the {larger} view is larger by {abs(h - g):,.0f} "
                    f"cycles ({pct:.0f}%), beyond the tolerance of {views['tolerance_cycles']:,.0f}"
                    f" ({views['rel_tol'] * 100:.0f}% + twice the mark jitter)")
    if metric == "host_ns":
        below = sum(e.get("host_ns_below_resolution", 0) for e in extras)
        total = sum(e.get("host_ns_samples", 0) for e in extras)
        if below:
            warnings.append(f"host_ns: {below} of {total} samples took less than an empty "
                            "sample (the operation costs less than the MARK calibration "
                            "resolves); they count as 0")
    if metric == "guest_cycles_single":
        more["method"] = ("one operation per lfence;rdtsc bracket, less the empty bracket's median"
                          + (" and the CPL0 nop loop's cost per iteration" if cpl == 0 else ""))
    if last.get("syscall_handler_cpl") not in (None, 0) and params.get("mechanism") == "syscall":
        warnings.append("syscall did not reach CPL0 on this host: the handler ran at CPL"
                        f"{last['syscall_handler_cpl']} (PVM delivers a guest syscall to LSTAR "
                        "without a privilege change); mechanism=int3 is a real CPL3->0->3 trip")
    return warnings, flags, more


def micro_experiment(name: str, description: str, *, params: dict, quick: dict | None,
                     handled_by: str, make_case, requires=(), subtract_baseline: bool = True,
                     probe=None, derive=None, extra: dict | None = None,
                     metrics: dict | None = None, limits: dict | None = None,
                     measure=None, state=None, single: bool = True) -> LoopExperiment:
    """Declare one exits.* experiment around a MicroCase factory. Its expected exits per
    operation come from experiments/_expect.py, by name; `extra` is recorded on every row
    (e.g. which MSR the row used). `measure` replaces the standard one (it calls
    `_loop_measure` and adjusts); `state(params)` adds values to the state's extra; `single`
    False: the case records no one-operation samples (its MicroCase has single=0)."""

    def setup(p: dict, host: dict):
        st = _micro.setup(make_case(p))
        if state:
            st.extra.update(state(p))
        st.extra["subtract_baseline"] = subtract_baseline
        st.extra["handled_by"] = handled_by
        st.extra["experiment"] = name
        st.extra.update(extra or {})
        if probe:
            st.extra.update(probe(st))
        return st

    return register(LoopExperiment(
        name=name, description=description, params=params, quick=quick,
        metrics={**{k: u for k, u in EXIT_METRICS.items()
                    if single or k != "guest_cycles_single"}, **(metrics or {})},
        requires=[needs_kvm(), _fits_vcpus(), *requires],
        cpl="cpl", handled_by=handled_by, validate=_validate_common, annotate=annotate_exits,
        limits={**LIMITS, **(limits or {}), **{k: one_of(*v) for k, v in params.items()
                                               if all(isinstance(x, str) for x in v)}},
        setup=setup, measure=measure or _loop_measure, teardown=_micro.teardown, derive=derive))


def _case(op: str, cpl3_iters: int, cpl0_iters: int, p: dict, **kw) -> MicroCase:
    return MicroCase(op=op, cpl=p.get("cpl", 3), iters=_iters(p, cpl3_iters, cpl0_iters),
                     vcpus=p.get("vcpus", 1), **kw)


def _user_msr(m):
    m.vm.enable_user_msr(read_value=0)
    return {}


# ---------------------------------------------------------------- CPU features the guest has
# The guest's CPUID is exactly what KVM_GET_SUPPORTED_CPUID offers (native/vmm/vcpu.c sets it
# as is), so a host-side query tells what the guest will see; a guest that touched an MSR its
# CPUID does not offer would take a #GP (reported as a guest fault, never a crash).

@lru_cache(maxsize=None)
def _cpuid(leaf: int, index: int = 0) -> tuple[int, int, int, int] | None:
    from vlab.vmm.kvm import Kvm

    with Kvm() as k:
        return k.supported_cpuid(leaf, index)


@lru_cache(maxsize=None)
def _feature_msr(index: int) -> int | None:
    """A feature MSR's value as KVM offers it to guests (KVM_GET_MSRS on /dev/kvm), or None."""
    from vlab.vmm.kvm import Kvm

    try:
        with Kvm() as k:
            return k.feature_msr(index)
    except OSError:
        return None


def _bit(leaf: int, reg: int, bit: int, index: int = 0) -> bool:
    r = _cpuid(leaf, index)
    return bool(r and r[reg] >> bit & 1)


EAX, EBX, ECX, EDX = range(4)
FEATURES = {
    # name: (test, what the skip reason names)
    "tsc_adjust": (lambda: _bit(7, EBX, 1), "CPUID.(EAX=7,ECX=0):EBX[1] (IA32_TSC_ADJUST)"),
    "ibrs": (lambda: _bit(7, EDX, 26) or _bit(0x80000008, EBX, 14),
             "CPUID.(EAX=7,ECX=0):EDX[26] or CPUID.80000008H:EBX[14] (IBRS, IA32_SPEC_CTRL)"),
    "ibpb": (lambda: _bit(7, EDX, 26) or _bit(0x80000008, EBX, 12),
             "CPUID.(EAX=7,ECX=0):EDX[26] or CPUID.80000008H:EBX[12] (IBPB, IA32_PRED_CMD)"),
    "tsx_ctrl": (lambda: _bit(7, EDX, 29) and bool((_feature_msr(MSR_ARCH_CAPABILITIES) or 0)
                                                   & (1 << 7)),
                 "IA32_ARCH_CAPABILITIES[7] (TSX_CTRL_MSR) as KVM offers it to guests"),
    "rdtscp": (lambda: _bit(0x80000001, EDX, 27), "CPUID.80000001H:EDX[27] (RDTSCP)"),
    "x2apic": (lambda: _bit(1, ECX, 21), "CPUID.01H:ECX[21] (x2APIC)"),
    "tsc_deadline_timer": (lambda: _bit(1, ECX, 24), "CPUID.01H:ECX[24] (TSC-deadline timer)"),
}


def needs_feature(name: str, when=lambda p: True) -> Requirement:
    """The guest's CPU offers feature `name` (see FEATURES); the skip reason names it."""
    test, what = FEATURES[name]

    def check(host: dict, params: dict) -> str | None:
        if not when(params) or not host.get("kvm", {}).get("usable"):
            return None
        try:
            ok = test()
        except Exception as e:  # noqa: BLE001 - cannot tell: say so rather than guess
            return f"cannot read the guest's CPU features ({type(e).__name__}: {e})"
        return None if ok else f"the guest's CPU lacks {what}"
    return Requirement(f"feature:{name}", check)


def _vendor_not(vendor: str, what: str) -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        if host.get("cpu_vendor") == vendor:
            return f"{what} (this host: {vendor})"
        return None
    return Requirement(f"not-vendor:{vendor}", check)


def _msr_rw(p: dict) -> str:
    return "rdmsr" if p.get("direction", "read") == "read" else "wrmsr"


def _msr_extra(msr: tuple[int, str]) -> dict:
    return {"msr": msr[1], "msr_index": f"{msr[0]:#x}"}


# ---------------------------------------------------------------- the table

micro_experiment(
    "exits.nop", "baseline: a nop loop, no exit (CPL3 native; CPL0 shows the emulation cost)",
    params={"cpl": [3, 0], "vcpus": [1, 2]}, quick={"cpl": [3, 0], "vcpus": [1]},
    handled_by="none", subtract_baseline=False,
    make_case=lambda p: _case("nop", 2000, 20, p))

micro_experiment(
    "exits.cpuid", "cpuid: always intercepted, handled in the kernel",
    params={"cpl": [3], "leaf": [0, 1, 0xB], "vcpus": [1, 2]},
    quick={"cpl": [3], "leaf": [0], "vcpus": [1]},
    handled_by="kernel",
    make_case=lambda p: _case("cpuid", 8, 4, p, a0=p.get("leaf", 0)))

micro_experiment(
    "exits.pio_user", "port I/O to a plain port: exits to the VMM (KVM_EXIT_IO)",
    params={"cpl": [3], "direction": ["out", "in"], "vcpus": [1, 2]},
    quick={"cpl": [3], "direction": ["out"], "vcpus": [1]},
    handled_by="user space (KVM_EXIT_IO)",
    make_case=lambda p: _case(p.get("direction", "out"), 8, 4, p, a0=PIO_USER_PORT, a1=0x5A,
                              prepare=_sink_pio(PIO_USER_PORT), counts=_sink_hits))

micro_experiment(
    "exits.pio_kernel", "out to an ioeventfd port: handled in the kernel, eventfd signalled",
    params={"cpl": [3], "vcpus": [1, 2]}, quick={"cpl": [3], "vcpus": [1]},
    handled_by="kernel (ioeventfd)", requires=[needs_cap("IOEVENTFD")],
    make_case=lambda p: _case("out", 8, 4, p, a0=PIO_KERNEL_PORT, a1=0x5A,
                              prepare=_eventfd(PIO_KERNEL_PORT, 1, True), counts=_eventfd_count))

micro_experiment(
    "exits.pio_device", "in from a port an in-kernel device answers (the PIC's ELCR, 0x4d0)",
    params={"cpl": [3], "direction": ["in", "out"]}, quick=None,
    handled_by="kernel (in-kernel PIC)", requires=[needs_cap("IRQCHIP")],
    extra={"port": f"{PIO_DEVICE_PORT:#x}", "device": "in-kernel PIC (ELCR)"},
    # writing back 0 leaves every IRQ edge-triggered, the ELCR's reset value
    make_case=lambda p: _case(p.get("direction", "in"), 8, 4, p, a0=PIO_DEVICE_PORT, a1=0,
                              irqchip=True))

micro_experiment(
    "exits.mmio_user", "access to unbacked guest-physical memory: KVM_EXIT_MMIO to the VMM",
    params={"cpl": [3], "direction": ["write", "read"]},
    quick={"cpl": [3], "direction": ["write"]},
    handled_by="user space (KVM_EXIT_MMIO)",
    make_case=lambda p: _case("mmio_" + p.get("direction", "write"), 8, 4, p, a0=MMIO_USER, a1=7,
                              prepare=_sink_mmio(MMIO_USER), counts=_sink_hits))

micro_experiment(
    "exits.mmio_kernel", "write to an ioeventfd MMIO address: handled in the kernel",
    params={"cpl": [3]}, quick={"cpl": [3]},
    handled_by="kernel (ioeventfd)", requires=[needs_cap("IOEVENTFD")],
    make_case=lambda p: _case("mmio_write", 8, 4, p, a0=MMIO_KERNEL, a1=7,
                              prepare=_eventfd(MMIO_KERNEL, 4, False), counts=_eventfd_count))


def _hypercall_ok() -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        if params.get("insn") == "vmmcall" and host.get("cpu_vendor") != "amd":
            return f"vmmcall is AMD's hypercall instruction (this host: {host.get('cpu_vendor')})"
        if params.get("insn") == "vmcall" and host.get("cpu_vendor") == "amd":
            return "vmcall is Intel's hypercall instruction (this host: amd)"
        if params.get("cpl") == 0 and host.get("kvm", {}).get("flavor") == "pvm":
            return ("a hypercall at CPL0 livelocks in KVM's instruction emulator on PVM "
                    "(KVM_RUN returns only on a signal; the watchdog stops it)")
        return None
    return Requirement("hypercall", check)


micro_experiment(
    "exits.hypercall", "no-op hypercall (KVM returns -KVM_EPERM at CPL3 / -ENOSYS)",
    params={"cpl": [3, 0], "insn": ["vmcall", "vmmcall"]},
    quick={"cpl": [3], "insn": ["vmcall", "vmmcall"]},
    handled_by="kernel", requires=[_hypercall_ok()],
    make_case=lambda p: _case(p.get("insn", "vmcall"), 8, 4, p, a0=0))

micro_experiment(
    "exits.hlt", "hlt without an in-kernel irqchip: KVM_EXIT_HLT to the VMM",
    params={"cpl": [0]}, quick={"cpl": [0]},
    handled_by="user space (KVM_EXIT_HLT)",
    make_case=lambda p: _case("hlt", 4, 4, p))


def _msr_case(msr: tuple[int, str], p: dict, value: int = 0, keep: bool = True, **kw) -> MicroCase:
    """rdmsr, or wrmsr of the MSR's current value (keep) or of `value`."""
    return _case(_msr_rw(p), 4, 4, p, a0=msr[0], a1=value,
                 flags=MICRO_F_KEEP if keep and _msr_rw(p) == "wrmsr" else 0, **kw)


micro_experiment(
    "exits.msr_kernel", "rdmsr/wrmsr of IA32_MISC_ENABLE: intercepted and emulated by KVM on "
    "every flavor (the write puts back the value read)",
    params={"cpl": [0], "direction": ["read", "write"]}, quick={"cpl": [0], "direction": ["read"]},
    handled_by="kernel", extra=_msr_extra(MSR_KERNEL),
    make_case=lambda p: _msr_case(MSR_KERNEL, p))

micro_experiment(
    "exits.msr_passthrough", "rdmsr/wrmsr of IA32_SYSENTER_CS, which VMX and SVM pass through: "
    "the difference to exits.msr_kernel is the exit",
    params={"cpl": [0], "direction": ["read", "write"]}, quick=None,
    handled_by="none (passed through)", extra=_msr_extra(MSR_PASSTHROUGH),
    make_case=lambda p: _msr_case(MSR_PASSTHROUGH, p))

micro_experiment(
    "exits.msr_user", "rdmsr/wrmsr of an unknown MSR: KVM_EXIT_X86_RDMSR/WRMSR to the VMM",
    params={"cpl": [0], "direction": ["read", "write"]}, quick={"cpl": [0], "direction": ["read"]},
    handled_by="user space (KVM_EXIT_X86_RDMSR/WRMSR)",
    requires=[needs_cap("X86_USER_SPACE_MSR")],
    extra={"msr": "unknown", "msr_index": f"{MSR_UNKNOWN:#x}"},
    make_case=lambda p: _case(_msr_rw(p), 4, 4, p, a0=MSR_UNKNOWN, a1=1, prepare=_user_msr))

micro_experiment(
    "exits.tsc_adjust", "rdmsr/wrmsr of IA32_TSC_ADJUST (always intercepted; the write puts back "
    "the value read, so the guest's TSC does not move)",
    params={"cpl": [0], "direction": ["read", "write"]}, quick=None,
    handled_by="kernel", requires=[needs_feature("tsc_adjust")],
    extra=_msr_extra(MSR_TSC_ADJUST),
    make_case=lambda p: _msr_case(MSR_TSC_ADJUST, p))

micro_experiment(
    "exits.kernel_gs_base", "wrmsr of IA32_KERNEL_GS_BASE (the swapgs MSR a guest kernel writes "
    "on every context switch)",
    params={"cpl": [0], "direction": ["write"]}, quick=None,
    handled_by="none (passed through)", extra=_msr_extra(MSR_KERNEL_GS_BASE),
    make_case=lambda p: _msr_case(MSR_KERNEL_GS_BASE, p))

micro_experiment(
    "exits.spec_ctrl", "wrmsr IA32_SPEC_CTRL = IBRS (1): the Spectre v2 mitigation write",
    params={"cpl": [0], "direction": ["write"]}, quick=None,
    handled_by="none once passed through", requires=[needs_feature("ibrs")],
    extra=_msr_extra(MSR_SPEC_CTRL),
    make_case=lambda p: _msr_case(MSR_SPEC_CTRL, p, value=1, keep=False))

micro_experiment(
    "exits.pred_cmd", "wrmsr IA32_PRED_CMD = IBPB (1): an indirect branch prediction barrier",
    params={"cpl": [0], "direction": ["write"]}, quick=None,
    handled_by="none once passed through", requires=[needs_feature("ibpb")],
    extra=_msr_extra(MSR_PRED_CMD),
    make_case=lambda p: _msr_case(MSR_PRED_CMD, p, value=1, keep=False))

micro_experiment(
    "exits.tsx_ctrl", "wrmsr of IA32_TSX_CTRL (its current value): the TAA mitigation MSR",
    params={"cpl": [0], "direction": ["write"]}, quick=None,
    handled_by="kernel",
    requires=[_vendor_not("amd", "IA32_TSX_CTRL is Intel's"), needs_feature("tsx_ctrl")],
    extra=_msr_extra(MSR_TSX_CTRL),
    make_case=lambda p: _msr_case(MSR_TSX_CTRL, p))

micro_experiment(
    "exits.cr3_write", "mov to cr3 of the same value (a TLB flush; shadow paging resyncs)",
    params={"cpl": [0]}, quick={"cpl": [0]},
    handled_by="kernel (shadow paging) / none (EPT, NPT)", requires=[tcg_shadow_requirement()],
    make_case=lambda p: _case("cr3_write", 4, 4, p))

micro_experiment(
    "exits.invlpg", "invlpg of a mapped page",
    params={"cpl": [0]}, quick={"cpl": [0]},
    handled_by="kernel (shadow paging) / none (EPT, NPT)", requires=[tcg_shadow_requirement()],
    make_case=lambda p: _case("invlpg", 4, 4, p, a0=GPA_IMAGE))

micro_experiment(
    "exits.cr0_wp", "mov to cr0 toggling CR0.WP (what a guest kernel does around text patching)",
    params={"cpl": [0]}, quick=None,
    handled_by="kernel / none where the guest owns WP (VMX+EPT, Linux 6.4+)",
    make_case=lambda p: _case("cr0_wp", 4, 4, p))

micro_experiment(
    "exits.cr4_pge", "mov to cr4 toggling CR4.PGE (a global TLB flush)",
    params={"cpl": [0]}, quick=None,
    handled_by="kernel / none where the guest owns PGE (VMX+EPT)",
    make_case=lambda p: _case("cr4_pge", 4, 4, p))

micro_experiment(
    "exits.dr", "mov to/from DR7 (0x400, its reset value): lazily passed through after the "
    "first access per VM entry",
    params={"cpl": [0], "direction": ["write", "read"]}, quick=None,
    handled_by="kernel, then none until the next exit",
    make_case=lambda p: _case("dr_write" if p.get("direction", "write") == "write"
                              else "dr_read", 16, 4, p, a1=0x400))

micro_experiment(
    "exits.wbinvd", "wbinvd (write back and invalidate caches)",
    params={"cpl": [0]}, quick=None, handled_by="kernel",
    make_case=lambda p: _case("wbinvd", 4, 4, p))

micro_experiment(
    "exits.invd", "invd (invalidate caches without write-back; KVM emulates it as a no-op)",
    params={"cpl": [0]}, quick=None, handled_by="kernel",
    make_case=lambda p: _case("invd", 4, 4, p))

micro_experiment(
    "exits.pause", "pause in a spin loop (pause-loop exiting applies at CPL0 on VMX)",
    params={"cpl": [0, 3]}, quick=None, handled_by="none, or kernel (PLE / PAUSE filter)",
    make_case=lambda p: _case("pause", 1000, 16, p))

micro_experiment(
    "exits.rdtsc", "rdtsc / rdtscp: not intercepted (the TSC is offset in hardware)",
    params={"cpl": [3, 0], "insn": ["rdtsc", "rdtscp"]}, quick=None, handled_by="none",
    requires=[needs_feature("rdtscp", when=lambda p: p.get("insn") == "rdtscp")],
    make_case=lambda p: _case(p.get("insn", "rdtsc"), 200, 8, p))


def _probe_syscall(st) -> dict:
    """Which CS the syscall handler ran with (a guest syscall may not reach CPL0 on PVM), and
    the host's own getppid() in TSC cycles, for x_syscall."""
    from vlab.vmm.payloads import MICRO_OPS

    m = st.machine
    m.restart()
    m.set_args(MICRO_OPS["syscall_cs"])
    m.run_to_done(timeout=10)
    cs = int(m.results(0)[0])
    return {"syscall_handler_cpl": cs & 3, **_host_syscall()}


def _host_syscall(n: int = 2000, rounds: int = 5) -> dict:
    """Median of `rounds` timings of `n` host getppid() calls, in TSC cycles and ns."""
    c, t = [], []
    for _ in range(rounds):
        cyc, ns = syscall_loop(n)
        c.append(cyc / n)
        t.append(ns / n)
    return {"host_syscall_cycles": float(np.median(c)), "host_syscall_ns": float(np.median(t))}


def _derive_x_syscall(rows: list[dict], host: dict) -> list[dict]:
    """x_syscall: the guest system call round trip (guest_cycles p50) / the host's getppid()
    (TSC cycles, measured in the same worker processes): how much a system call costs in this
    guest against the host, the seed claim's ratio."""
    from vlab import results

    out = []
    for r in rows:
        if r.get("metric") != "guest_cycles" or r.get("status") != "ok":
            continue
        host_cyc = (r.get("extra") or {}).get("host_syscall_cycles")
        if not host_cyc or r.get("median") is None:
            continue
        out.append(results.make_row(
            r["experiment"], r["params"], "x_syscall", "x", [r["median"] / host_cyc],
            exp_version=r.get("exp_version"), flags={"derived": True},
            warnings=list(r.get("warnings") or []),
            extra={"method": "guest_cycles p50 of the guest system call / host getppid() TSC "
                             "cycles (median of 5 x 2000 calls in each worker)",
                   "guest_cycles": r["median"], "host_syscall_cycles": host_cyc,
                   "host_syscall_ns": r["extra"].get("host_syscall_ns")}))
    return out


micro_experiment(
    "exits.syscall", "guest system call round trip CPL3->0->3 (syscall/sysret, or int3/iretq)",
    params={"cpl": [3], "mechanism": ["syscall", "int3"]},
    quick={"cpl": [3], "mechanism": ["syscall", "int3"]},
    handled_by="guest kernel", probe=_probe_syscall, derive=_derive_x_syscall,
    make_case=lambda p: _case("syscall" if p.get("mechanism", "syscall") == "syscall" else "int3",
                              8, 4, p))


# ---------------------------------------------------------------- interrupts
# The in-kernel irqchip's local APIC, driven by the guest's interrupt runtime
# (native/guest/lib/apic.h): every operation is one complete delivery, counted by the guest's
# handler and checked against the operations (extra.interrupts) and KVM's irq_injections.
# xAPIC registers are MMIO (CPL3 or CPL0); x2APIC registers are MSRs (CPL0 only).
IRQ_VECTOR = 0x40
IRQ_METRICS = {"eoi_cycles": "cycles", "ipi_cycles": "cycles"}
IRQ_LIMITS = {"settle": within(0, 1 << 32, "cycles the sender waits after the target halts"),
              "delay": within(1, 1 << 40, "TSC cycles from arming to the deadline")}


def _apic_flags(p: dict) -> int:
    return MICRO_F_X2APIC if p.get("apic", "xapic") == "x2apic" else 0


def _x2apic_at_cpl0() -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        if params.get("apic") == "x2apic" and params.get("cpl", 3) != 0:
            return "x2APIC registers are MSRs: rdmsr/wrmsr need CPL0"
        return None
    return Requirement("x2apic_cpl0", check)


def _x2apic_offered() -> Requirement:
    return needs_feature("x2apic", when=lambda p: p.get("apic") == "x2apic")


def _irq_case(op: str, p: dict, cpl3_iters: int, cpl0_iters: int, **kw) -> MicroCase:
    """An interrupt row's case; `interrupts` (default True): each operation is one delivery the
    guest's handler counts (exits.eoi delivers none)."""
    kw["flags"] = kw.get("flags", 0) | _apic_flags(p)
    kw.setdefault("interrupts", True)
    return _case(op, cpl3_iters, cpl0_iters, p, irqchip=True, **kw)


_IRQ_REQ = [needs_cap("IRQCHIP"), _x2apic_at_cpl0(), _x2apic_offered()]

micro_experiment(
    "exits.ipi_self", "self-IPI through the local APIC (ICR, self shorthand) and its delivery to "
    "a handler that EOIs: guest_cycles is the whole round, eoi_cycles the handler's EOI write, "
    "ipi_cycles the rest",
    params={"apic": ["xapic", "x2apic"], "cpl": [3, 0]}, quick={"apic": ["xapic"], "cpl": [3]},
    handled_by="kernel (local APIC)", requires=_IRQ_REQ, metrics=IRQ_METRICS,
    extra={"vector": IRQ_VECTOR},
    make_case=lambda p: _irq_case("ipi_self", p, 8, 2, a0=IRQ_VECTOR))

micro_experiment(
    "exits.eoi", "EOI write with no interrupt in service (xAPIC MMIO or x2APIC MSR)",
    params={"apic": ["xapic", "x2apic"], "cpl": [3, 0]}, quick=None,
    handled_by="kernel (local APIC)", requires=_IRQ_REQ,
    make_case=lambda p: _irq_case("eoi", p, 16, 4, interrupts=False))


def _settle(p: dict) -> int:
    return int(p.get("settle", 20000)) if p.get("target") == "halted" else 0


def _ipi_other_measure(st, loops: int) -> Measurement:
    """ipi_other: the sender's cycles less the settle wait it spends before each IPI to a
    halted target (so the row is the IPI, the wake-up and the handler, not the wait)."""
    meas = _loop_measure(st, loops)
    settle = st.extra.get("settle_cycles", 0)
    if settle:
        for metric in ("guest_cycles", "ipi_cycles"):
            if metric in meas.metrics:
                meas.metrics[metric] = [c - settle for c in meas.metrics[metric]]
    return meas


micro_experiment(
    "exits.ipi_other", "fixed IPI from vCPU 0 to vCPU 1, which is running (spinning) or halted "
    "(hlt on the in-kernel LAPIC: the IPI wakes it); the sender waits until the target's "
    "handler ran",
    params={"apic": ["xapic", "x2apic"], "cpl": [3, 0], "target": ["running", "halted"]},
    quick={"apic": ["xapic"], "cpl": [3], "target": ["running", "halted"]},
    handled_by="kernel (local APIC), across vCPUs", requires=_IRQ_REQ, metrics=IRQ_METRICS,
    limits=IRQ_LIMITS, extra={"vector": IRQ_VECTOR, "vcpus": 2},
    measure=_ipi_other_measure, state=lambda p: {"settle_cycles": _settle(p)}, single=False,
    make_case=lambda p: replace(_irq_case(
        "ipi_other", p, 4, 2, a0=IRQ_VECTOR, a1=_settle(p),
        flags=MICRO_F_HALT if p.get("target") == "halted" else 0), vcpus=2, measured=1,
        single=0))


def _timer_measure(st, loops: int) -> Measurement:
    """tsc_deadline: the guest's deadline-to-handler latency (handler entry TSC - deadline,
    mean per call; VPARAM 0-3; for an expired timer the deadline is the TSC just before the
    write) beside the per-operation cycles; for a future deadline the delay is taken off
    guest_cycles, leaving arming, delivery and handler."""
    m = st.machine
    base = P_VCPU0
    for i in range(4):
        m.params[base + i] = 0
    meas = _loop_measure(st, loops)
    delay = st.extra.get("delay_cycles", 0)
    if delay:
        meas.metrics["guest_cycles"] = [c - delay for c in meas.metrics["guest_cycles"]]
    n = int(m.params[base + 1])
    if not n:
        raise RuntimeError("the guest recorded no timer interrupt")

    def signed(i: int) -> int:
        return int(np.int64(np.uint64(m.params[base + i])))
    meas.metrics["timer_latency_cycles"] = [signed(0) / n]
    meas.extra["timer_latency"] = {"count": n, "min_cycles": signed(2), "max_cycles": signed(3)}
    return meas


def _delay(p: dict) -> int:
    return int(p.get("delay", 50000)) if p.get("timer") == "future" else 0


micro_experiment(
    "exits.tsc_deadline", "TSC-deadline timer: armed already expired (wrmsr IA32_TSC_DEADLINE = "
    "now: the cost of arming plus the delivery) or in the future (`delay` cycles; "
    "timer_latency_cycles is deadline to handler entry)",
    params={"timer": ["expired", "future"], "apic": ["xapic", "x2apic"], "cpl": [0]},
    quick={"timer": ["expired"], "apic": ["xapic"], "cpl": [0]},
    handled_by="kernel (local APIC timer)", limits=IRQ_LIMITS,
    requires=[*_IRQ_REQ, needs_feature("tsc_deadline_timer")],
    metrics={**IRQ_METRICS, "timer_latency_cycles": "cycles"}, extra={"vector": IRQ_VECTOR},
    measure=_timer_measure, state=lambda p: {"delay_cycles": _delay(p)}, single=False,
    make_case=lambda p: _irq_case("timer_" + p.get("timer", "expired"), p, 2, 2, a0=IRQ_VECTOR,
                                  a1=_delay(p), single=0))

micro_experiment(
    "exits.cr8", "mov to/from CR8 (the task-priority register, TPR[7:4]); the write alternates "
    "0 and 1, which masks no vector >= 32",
    params={"direction": ["write", "read"], "cpl": [0]}, quick=None,
    handled_by="none with a TPR shadow / V_TPR, else kernel", requires=[needs_cap("IRQCHIP")],
    make_case=lambda p: _case("cr8_" + p.get("direction", "write"), 16, 4, p, irqchip=True))

register(_inject.EXPERIMENT)     # exits.irq_inject: experiments/_inject.py

# ---------------------------------------------------------------- host-side references

def _native_syscall_setup(params: dict, host: dict):
    return {"iters": int(params.get("iters", 1000))}


def _native_syscall_measure(st: dict, loops: int) -> Measurement:
    n = st["iters"]
    cycles, nss = [], []
    total = 0.0
    for _ in range(loops):
        cyc, ns = syscall_loop(n)
        cycles.append(cyc / n)
        nss.append(ns / n)
        total += ns / 1e9
    return Measurement(total, {"cycles": cycles, "host_ns": nss},
                       {"iters": n, "loops": loops, "syscall": "getppid",
                        "note": "host TSC cycles; no guest involved"})


register(LoopExperiment(
    name="native.syscall", description="getppid() on the host: the native system-call baseline",
    params={}, quick=None, metrics={"cycles": "cycles", "host_ns": "ns"},
    handled_by="host kernel", payload=None,
    setup=_native_syscall_setup, measure=_native_syscall_measure, teardown=lambda st: None))


def _run_overhead_setup(params: dict, host: dict):
    from vlab.vmm.machine import Machine

    return {"machine": Machine(), "iters": int(params.get("iters", 200))}


def _run_overhead_measure(st: dict, loops: int) -> Measurement:
    v = st["machine"].vcpus[0]
    n = st["iters"]
    samples = [v.run_immediate_exit(n) / n for _ in range(loops)]
    return Measurement(sum(samples) * n / 1e9, {"host_ns": samples},
                       {"iters": n, "loops": loops})


register(LoopExperiment(
    name="exits.run_overhead", description="KVM_RUN with immediate_exit: the ioctl round trip alone",
    params={}, quick=None, metrics={"host_ns": "ns"}, requires=[needs_kvm()],
    handled_by="kernel (no guest entry)", payload=None,
    setup=_run_overhead_setup, measure=_run_overhead_measure,
    teardown=lambda st: st["machine"].close()))
