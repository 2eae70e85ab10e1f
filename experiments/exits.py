"""Exit costs: what every kind of VM exit costs, seen from the guest (rdtsc) and the host.

Each experiment runs a guest loop of one operation (see experiments/_micro.py for how the
figures are derived). `exits_per_op` is checked against what the operation should cost in exits:
1 for an exiting operation, 0 for the nop baseline; a mismatch becomes a row warning that says
why (on a host that emulates CPL0, kernel-handled CPL0 operations never leave the emulator).
"""
from __future__ import annotations

import numpy as np

from vlab.run.registry import (LoopExperiment, Measurement, Requirement, needs_cap, needs_kvm,
                              one_of, register, within)
from vlab.vmm._native import ffi, lib

from vlab.experiments import _micro
from vlab.experiments._micro import MicroCase

EXIT_METRICS = {"guest_cycles": "cycles", "host_ns": "ns", "exits_per_op": "exits"}
PIO_USER_PORT = 0x80
PIO_KERNEL_PORT = 0x81
MMIO_USER = lib.VLAB_GPA_MMIO
MMIO_KERNEL = lib.VLAB_GPA_MMIO + 0x1000
MSR_KERNEL = 0x174          # IA32_SYSENTER_CS: KVM emulates it in the kernel, harmless to write
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
        if want > lib.VLAB_MAX_VCPUS:
            return f"vcpus={want} exceeds vlab's limit of {lib.VLAB_MAX_VCPUS}"
        if want > have:
            return f"vcpus={want} exceeds this host's recommended vCPU count ({have})"
        return None
    return Requirement("vcpus", check)


def _loop_measure(st, loops: int) -> Measurement:
    meas = _micro.measure(st, loops)
    if not st.extra.get("subtract_baseline", True):
        meas.metrics["guest_cycles"] = [c + st.nop_per_iter for c in meas.metrics["guest_cycles"]]
    meas.extra.update({k: v for k, v in st.extra.items() if k != "subtract_baseline"})
    return meas


def annotate_exits(params: dict, host: dict, metric: str, samples: list, extras: list):
    """Flags and warnings of an exits.* row: emulated CPL0, exit counts against expectations
    (KVM's stats, the VMM's own count, and the sink/eventfd ground truth), syscall CPL."""
    warnings: list[str] = []
    flags: dict = {}
    last = extras[-1] if extras else {}
    cpl = params.get("cpl", 3)
    emulated = bool(host.get("emulated_cpl0"))
    if cpl == 0 and emulated:
        flags["emulated_cpl0"] = True
    if metric == "exits_per_op":
        expected = last.get("expected_exits_per_op")
        got = float(np.mean(samples))
        if expected is not None and abs(got - expected) > 0.01 * max(1, expected):
            why = ""
            if cpl == 0 and emulated and got < expected:
                why = (": CPL0 is emulated on this host, so KVM handles the instruction inside "
                       "its emulator without a VM exit")
            elif got < expected and host.get("kvm", {}).get("flavor") == "pvm":
                why = (": KVM's exit statistics on PVM do not count this operation as an exit, "
                       "although its guest-side cost shows that it traps")
            warnings.append(f"exits_per_op is {got:.2f}, expected {expected}{why}")
        vmm = [e.get("vmm_exits_per_op") for e in extras if "vmm_exits_per_op" in e]
        if vmm and "user space" in last.get("handled_by", "") and abs(np.mean(vmm) - 1) > 0.01:
            warnings.append(f"the VMM saw {np.mean(vmm):.2f} user-space exits per operation, "
                            "expected 1")
        truth = [e["truth_per_op"] for e in extras if "truth_per_op" in e]
        if truth and abs(np.mean(truth) - 1) > 1e-9:
            warnings.append(f"ground truth (sink/eventfd count) is {np.mean(truth):.4f} per "
                            "operation, expected exactly 1")
    if last.get("syscall_handler_cpl") not in (None, 0) and params.get("mechanism") == "syscall":
        warnings.append("syscall did not reach CPL0 on this host: the handler ran at CPL"
                        f"{last['syscall_handler_cpl']} (PVM delivers a guest syscall to LSTAR "
                        "without a privilege change); mechanism=int3 is a real CPL3->0->3 trip")
    return warnings, flags, {}


def micro_experiment(name: str, description: str, *, params: dict, quick: dict | None,
                     handled_by: str, expect: int | None, make_case, requires=(),
                     subtract_baseline: bool = True, probe=None) -> LoopExperiment:
    """Declare one exits.* experiment around a MicroCase factory."""

    def setup(p: dict, host: dict):
        st = _micro.setup(make_case(p))
        st.extra["subtract_baseline"] = subtract_baseline
        st.extra["handled_by"] = handled_by
        st.extra["expected_exits_per_op"] = expect
        if probe:
            st.extra.update(probe(st))
        return st

    return register(LoopExperiment(
        name=name, description=description, params=params, quick=quick,
        metrics=dict(EXIT_METRICS), requires=[needs_kvm(), _fits_vcpus(), *requires],
        cpl="cpl", handled_by=handled_by, validate=_validate_common, annotate=annotate_exits,
        limits={**LIMITS, **{k: one_of(*v) for k, v in params.items()
                             if all(isinstance(x, str) for x in v)}},
        setup=setup, measure=_loop_measure, teardown=_micro.teardown))


def _case(op: str, cpl3_iters: int, cpl0_iters: int, p: dict, **kw) -> MicroCase:
    return MicroCase(op=op, cpl=p.get("cpl", 3), iters=_iters(p, cpl3_iters, cpl0_iters),
                     vcpus=p.get("vcpus", 1), **kw)


def _sink_pio(port: int):
    def prepare(m):
        return {"sink": m.vm.add_pio_sink(port)}
    return prepare


def _sink_mmio(addr: int):
    def prepare(m):
        return {"sink": m.vm.add_mmio_sink(addr, 0x1000)}
    return prepare


def _eventfd(addr: int, length: int, pio: bool):
    def prepare(m):
        return {"eventfd": m.vm.add_ioeventfd(addr, length, pio=pio)}
    return prepare


def _sink_hits(h: dict) -> int:
    return h["sink"].hits


def _eventfd_count(h: dict) -> int:
    h["eventfd"].read()
    return h["eventfd"].total


def _user_msr(m):
    m.vm.enable_user_msr(read_value=0)
    return {}


# ---------------------------------------------------------------- the table

micro_experiment(
    "exits.nop", "baseline: a nop loop, no exit (CPL3 native; CPL0 shows the emulation cost)",
    params={"cpl": [3, 0], "vcpus": [1, 2]}, quick={"cpl": [3, 0], "vcpus": [1]},
    handled_by="none", expect=0, subtract_baseline=False,
    make_case=lambda p: _case("nop", 2000, 20, p))

micro_experiment(
    "exits.cpuid", "cpuid: always intercepted, handled in the kernel",
    params={"cpl": [3], "leaf": [0, 1, 0xB], "vcpus": [1, 2]},
    quick={"cpl": [3], "leaf": [0], "vcpus": [1]},
    handled_by="kernel", expect=1,
    make_case=lambda p: _case("cpuid", 8, 4, p, a0=p.get("leaf", 0)))

micro_experiment(
    "exits.pio_user", "port I/O to a plain port: exits to the VMM (KVM_EXIT_IO)",
    params={"cpl": [3], "direction": ["out", "in"], "vcpus": [1, 2]},
    quick={"cpl": [3], "direction": ["out"], "vcpus": [1]},
    handled_by="user space (KVM_EXIT_IO)", expect=1,
    make_case=lambda p: _case(p.get("direction", "out"), 8, 4, p, a0=PIO_USER_PORT, a1=0x5A,
                              prepare=_sink_pio(PIO_USER_PORT), counts=_sink_hits))

micro_experiment(
    "exits.pio_kernel", "out to an ioeventfd port: handled in the kernel, eventfd signalled",
    params={"cpl": [3], "vcpus": [1, 2]}, quick={"cpl": [3], "vcpus": [1]},
    handled_by="kernel (ioeventfd)", expect=1, requires=[needs_cap("IOEVENTFD")],
    make_case=lambda p: _case("out", 8, 4, p, a0=PIO_KERNEL_PORT, a1=0x5A,
                              prepare=_eventfd(PIO_KERNEL_PORT, 1, True), counts=_eventfd_count))

micro_experiment(
    "exits.mmio_user", "access to unbacked guest-physical memory: KVM_EXIT_MMIO to the VMM",
    params={"cpl": [3], "direction": ["write", "read"]},
    quick={"cpl": [3], "direction": ["write"]},
    handled_by="user space (KVM_EXIT_MMIO)", expect=1,
    make_case=lambda p: _case("mmio_" + p.get("direction", "write"), 8, 4, p, a0=MMIO_USER, a1=7,
                              prepare=_sink_mmio(MMIO_USER), counts=_sink_hits))

micro_experiment(
    "exits.mmio_kernel", "write to an ioeventfd MMIO address: handled in the kernel",
    params={"cpl": [3]}, quick={"cpl": [3]},
    handled_by="kernel (ioeventfd)", expect=1, requires=[needs_cap("IOEVENTFD")],
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
    handled_by="kernel", expect=1, requires=[_hypercall_ok()],
    make_case=lambda p: _case(p.get("insn", "vmcall"), 8, 4, p, a0=0))

micro_experiment(
    "exits.hlt", "hlt without an in-kernel irqchip: KVM_EXIT_HLT to the VMM",
    params={"cpl": [0]}, quick={"cpl": [0]},
    handled_by="user space (KVM_EXIT_HLT)", expect=1,
    make_case=lambda p: _case("hlt", 4, 4, p))

micro_experiment(
    "exits.msr_kernel", "rdmsr/wrmsr of IA32_SYSENTER_CS, an MSR KVM handles",
    params={"cpl": [0], "direction": ["read", "write"]}, quick={"cpl": [0], "direction": ["read"]},
    handled_by="kernel", expect=1,
    make_case=lambda p: _case("rdmsr" if p.get("direction", "read") == "read" else "wrmsr", 4, 4, p,
                              a0=MSR_KERNEL, a1=0x8))

micro_experiment(
    "exits.msr_user", "rdmsr/wrmsr of an unknown MSR: KVM_EXIT_X86_RDMSR/WRMSR to the VMM",
    params={"cpl": [0], "direction": ["read", "write"]}, quick={"cpl": [0], "direction": ["read"]},
    handled_by="user space (KVM_EXIT_X86_RDMSR/WRMSR)", expect=1,
    requires=[needs_cap("X86_USER_SPACE_MSR")],
    make_case=lambda p: _case("rdmsr" if p.get("direction", "read") == "read" else "wrmsr", 4, 4, p,
                              a0=MSR_UNKNOWN, a1=1, prepare=_user_msr))

micro_experiment(
    "exits.cr3_write", "mov to cr3 of the same value (a TLB flush; shadow paging resyncs)",
    params={"cpl": [0]}, quick={"cpl": [0]},
    handled_by="kernel", expect=1,
    make_case=lambda p: _case("cr3_write", 4, 4, p))

micro_experiment(
    "exits.invlpg", "invlpg of a mapped page",
    params={"cpl": [0]}, quick={"cpl": [0]},
    handled_by="kernel", expect=1,
    make_case=lambda p: _case("invlpg", 4, 4, p, a0=lib.VLAB_GPA_IMAGE))


def _probe_syscall(st) -> dict:
    """Which CS the syscall handler ran with: a guest syscall may not reach CPL0 (PVM)."""
    from vlab.vmm.payloads import MICRO_OPS

    m = st.machine
    m.restart()
    m.set_args(MICRO_OPS["syscall_cs"])
    m.run_to_done(timeout=10)
    cs = int(m.results(0)[0])
    return {"syscall_handler_cpl": cs & 3}


micro_experiment(
    "exits.syscall", "guest system call round trip CPL3->0->3 (syscall/sysret, or int3/iretq)",
    params={"cpl": [3], "mechanism": ["syscall", "int3"]},
    quick={"cpl": [3], "mechanism": ["syscall", "int3"]},
    handled_by="guest kernel", expect=None, probe=_probe_syscall,
    make_case=lambda p: _case("syscall" if p.get("mechanism", "syscall") == "syscall" else "int3",
                              8, 4, p))


# ---------------------------------------------------------------- host-side references

def _native_syscall_setup(params: dict, host: dict):
    return {"iters": int(params.get("iters", 1000))}


def _native_syscall_measure(st: dict, loops: int) -> Measurement:
    n = st["iters"]
    cyc, ns = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    cycles, nss = [], []
    total = 0.0
    for _ in range(loops):
        lib.vlab_host_syscall_loop(n, cyc, ns)
        cycles.append(cyc[0] / n)
        nss.append(ns[0] / n)
        total += ns[0] / 1e9
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
