"""`vlab doctor`: a host record turned into a table of named checks, each saying what it found
and, when it fails, what that costs and how to fix it.

The checks come in groups (KVM and its capabilities, what virtualization the numbers include,
how interrupts are virtualized, noise sources, hugetlb pools, device assignment, tracing tools), each a function of the host
record alone, so recorded trees test every row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from vlab.host.fingerprint import HALTPOLL_ADVICE, cap_value, idle_halts_at_once
from vlab.host.emulation import warning as emulation_warning

_KVM_API_VERSION = 12


@dataclass
class Check:
    """One row of `vlab doctor`: a named requirement, whether it holds, and what to do if not.

    `level` decides how a failed check is shown: "missing" for a capability some experiments need
    (they will be skipped), "warn" for a condition that makes results noisy or different.
    """

    name: str
    ok: bool
    detail: str
    advice: str = ""
    level: str = "missing"

    @property
    def status(self) -> str:
        """"OK", "MISSING" or "WARN"."""
        return "OK" if self.ok else ("WARN" if self.level == "warn" else "MISSING")


# (capability names accepted, what in vlab uses it). Only capabilities vlab really uses: KVM
# offers more (EXIT_HYPERCALL, SYNC_REGS, READONLY_MEM, ...) that nothing here needs.
NEEDED_CAPS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("IOEVENTFD",), "exits.pio_kernel, exits.mmio_kernel, io.virtio notify=kernel"),
    (("IRQCHIP",), "exits.pio_device and every interrupt row (in-kernel PIC, IOAPIC, LAPICs)"),
    (("IRQFD",), "exits.irq_inject and the io.virtio and io.ivshmem interrupt modes"),
    (("IRQ_ROUTING",), "MSI routes (KVM_SET_GSI_ROUTING) behind every irqfd"),
    (("SIGNAL_MSI",), "tests injecting an MSI directly (KVM_SIGNAL_MSI)"),
    (("DIRTY_LOG_RING", "DIRTY_LOG_RING_ACQ_REL"), "migration.* mode=ring"),
    (("MANUAL_DIRTY_LOG_PROTECT2",), "migration.* mode=clear"),
    (("X86_USER_SPACE_MSR",), "exits.msr_user"),
    (("BINARY_STATS_FD", "STATS_BINARY_FD"), "exits/op of exits.* and io.* (KVM binary stats)"),
    (("IMMEDIATE_EXIT",), "exits.run_overhead and the watchdog"),
    (("GET_TSC_KHZ",), "converting guest cycles to time"),
)


def _cap_checks(kvm: dict) -> list[Check]:
    if not kvm.get("usable"):
        return [Check("kvm.caps", False, "not checked: /dev/kvm is not usable")]
    caps = kvm.get("caps") or {}
    checks = []
    for names, needed_for in NEEDED_CAPS:
        values = {n: cap_value(caps, n) for n in names}
        present = {n: v for n, v in values.items() if v}
        label = names[0]
        if present:
            detail = ", ".join(f"{n}={v}" for n, v in present.items())
            checks.append(Check(f"cap.{label}", True, detail))
        else:
            checks.append(Check(f"cap.{label}", False, f"not offered (needed for {needed_for})"))
    return checks


def _kvm_checks(host: dict) -> list[Check]:
    """/dev/kvm itself, the API version and the capabilities experiments need."""
    kvm = host.get("kvm") or {}
    flavor = kvm.get("flavor", "none")
    flags = (host.get("cpu") or {}).get("flags") or {}
    checks: list[Check] = []
    if kvm.get("usable"):
        checks.append(Check("kvm.dev", True, f"/dev/kvm usable (flavor {flavor})"))
    else:
        if kvm.get("dev_kvm"):
            advice = "run as root or as a member of the kvm group; build vlab's native layer"
        elif flags.get("vmx") or flags.get("svm"):
            advice = "modprobe kvm_intel (or kvm_amd)"
        elif host.get("nested"):
            advice = ("the CPU offers neither vmx nor svm: enable nested virtualization in the "
                      "outer hypervisor, or use a host with KVM on PVM")
        else:
            advice = "enable VT-x/AMD-V in the firmware, then modprobe kvm_intel (or kvm_amd)"
        checks.append(Check("kvm.dev", False, kvm.get("reason") or "/dev/kvm is not usable",
                            advice))
    api = kvm.get("api_version")
    if kvm.get("usable"):
        checks.append(Check("kvm.api_version", api == _KVM_API_VERSION,
                            f"KVM_GET_API_VERSION = {api}",
                            "" if api == _KVM_API_VERSION else "vlab needs API version 12"))
    checks.extend(_cap_checks(kvm))
    return checks


def _virtualization_checks(host: dict) -> list[Check]:
    """What the numbers mean here: paging mode, whether CPL0 is emulated, nesting."""
    flavor = (host.get("kvm") or {}).get("flavor", "none")
    checks: list[Check] = []
    paging = host.get("paging")
    if paging in ("ept", "npt"):
        checks.append(Check("paging", True, f"{paging.upper()}: hardware two-dimensional paging"))
    elif paging == "shadow":
        why = {"pvm": "KVM on PVM has no EPT/NPT",
               "vmx": "kvm_intel.ept=0", "svm": "kvm_amd.npt=0"}.get(flavor, "")
        checks.append(Check(
            "paging", False,
            f"shadow paging ({why}): guest page faults and page-table writes trap to KVM, so "
            "paging.first_touch/pte_update/cr3_switch measure the shadow MMU", level="warn",
            advice="compare paging results only with other shadow-paging hosts"
                   + ("; vlab host set kvm_intel.ept=1" if flavor == "vmx" else "")
                   + ("; vlab host set kvm_amd.npt=1" if flavor == "svm" else "")))
    else:
        checks.append(Check("paging", False, "no KVM: nothing to measure"))

    if host.get("cpl0_emulated_expected"):
        emulated = host.get("emulated_cpl0")
        detail = ("guest CPL0 code runs in KVM's instruction emulator (~500 ns an instruction)"
                  if emulated is not False else "expected emulated CPL0, calibration says native")
        checks.append(Check("cpl0", False, detail, level="warn",
                            advice="timed loops run at CPL3; CPL0 exit costs are reported against "
                                   "a CPL0 nop calibration and compare only with PVM hosts"))
    elif flavor in ("vmx", "svm"):
        checks.append(Check("cpl0", True, "guest CPL0 runs natively"))

    tcg = emulation_warning(host)
    if tcg:
        checks.append(Check("cpu.emulated", False, tcg, level="warn",
                            advice="use its exit counts, exit reasons and paging modes; take "
                                   "costs only from hardware hosts"))
    if host.get("nested") and tcg:
        checks.append(Check("nested", False,
                            "running inside QEMU with an emulated CPU (cpu flag 'hypervisor'): "
                            "no outer hardware hypervisor, every exit and walk is emulated",
                            level="warn", advice="compare exit counts and reasons with other "
                                                 "hosts, not times"))
    elif host.get("nested"):
        checks.append(Check("nested", False,
                            "running under a hypervisor (cpu flag 'hypervisor'): every exit also "
                            "pays the outer hypervisor", level="warn",
                            advice="use bare metal for absolute numbers; compare nested hosts "
                                   "with each other"))
    else:
        checks.append(Check("nested", True, "bare metal (no 'hypervisor' cpu flag)"))
    return checks


def _apic_check(host: dict) -> Check:
    """How the local APIC is virtualized: which APIC accesses and IPIs exit at all."""
    flavor = (host.get("kvm") or {}).get("flavor")
    irq = host.get("interrupts") or {}
    src = irq.get("sources") or {}
    flags = (host.get("cpu") or {}).get("flags") or {}
    mode = irq.get("apic_virtualization")
    x2 = "guest x2APIC " + {True: "offered", False: "not offered"}.get(irq.get("x2apic"), "unknown")
    if mode in ("apicv", "avic", "x2avic"):
        name = {"apicv": "APICv", "avic": "AVIC", "x2avic": "x2AVIC"}[mode]
        ipi = ("IPIs to running vCPUs without an exit" if irq.get("ipi_virtualization")
               else "IPIs exit on the sender")
        return Check("apic", True, f"{name} ({src.get('apic_virtualization')}): EOI, TPR and "
                                   f"self-IPI writes do not exit; {ipi} "
                                   f"({src.get('ipi_virtualization')}); {x2}")
    cost = "every EOI, TPR write and IPI exits to KVM's emulated local APIC"
    if flavor == "pvm":
        return Check("apic", False, f"KVM on PVM has no APICv/AVIC: {cost} (and a guest CPL0 "
                                    f"handler runs in the instruction emulator); {x2}",
                     "compare interrupt rows only with other hosts without APIC virtualization",
                     level="warn")
    if mode == "none" and flavor == "vmx":
        can = flags.get("apicv")
        return Check("apic", False, f"APICv off ({src.get('apic_virtualization')}): {cost}; {x2}",
                     "vlab host set kvm_intel.enable_apicv=1" if can
                     else "the CPU has no APICv (no 'apicv' vmx flag)", level="warn")
    if mode == "none" and flavor == "svm":
        if not flags.get("avic"):
            advice = "the CPU has no AVIC (no 'avic' cpu flag)"
        elif host.get("paging") != "npt":
            advice = "AVIC needs NPT: vlab host set kvm_amd.npt=1, then kvm_amd.avic=1"
        else:
            advice = "vlab host set kvm_amd.avic=1"
        return Check("apic", False, f"AVIC off ({src.get('apic_virtualization')}): {cost}; {x2}",
                     advice, level="warn")
    return Check("apic", False, f"unknown ({src.get('apic_virtualization') or 'not recorded'})",
                 level="warn")


def _interrupt_checks(host: dict) -> list[Check]:
    """APIC virtualization, posted interrupts, halt polling and the guest's TSC-deadline timer:
    what an interrupt, an IPI and a wake-up cost here (the `interrupts` section)."""
    kvm = host.get("kvm") or {}
    irq = host.get("interrupts") or {}
    if kvm.get("flavor", "none") == "none" or not irq:
        return []
    src = irq.get("sources") or {}
    checks = [_apic_check(host)]

    posted = irq.get("posted_interrupts")
    if posted:
        checks.append(Check("apic.posted", True, "posted interrupts: an interrupt for a running "
                                                 "vCPU is delivered without an exit ("
                                                 f"{src.get('posted_interrupts')})"))
    else:
        checks.append(Check("apic.posted", False,
                            "no posted interrupts: an interrupt for a running vCPU kicks it out "
                            f"(a host IPI and an exit) to be injected ({src.get('posted_interrupts')})",
                            level="warn"))

    ns = irq.get("halt_poll_ns")
    if ns is None:
        checks.append(Check("halt_poll", False, src.get("halt_poll_ns") or "not recorded",
                            level="warn"))
    else:
        knobs = ", ".join(f"{k} {irq.get('halt_poll_ns_' + k)}"
                          for k in ("grow", "grow_start", "shrink")
                          if irq.get("halt_poll_ns_" + k) is not None)
        tail = f" ({knobs})" if knobs else ""
        if ns:
            checks.append(Check("halt_poll", True,
                                f"kvm.halt_poll_ns={ns}{tail}: a vCPU halted on the in-kernel "
                                f"local APIC polls up to {ns / 1000:g} us for a wake-up before "
                                "it sleeps; every wake-up row includes it"))
        else:
            checks.append(Check("halt_poll", False,
                                f"kvm.halt_poll_ns=0{tail}: a halted vCPU sleeps at once, so every "
                                "wake-up pays the host scheduler", "vlab host set "
                                "kvm.halt_poll_ns=200000", level="warn"))

    offered = irq.get("tsc_deadline_timer")
    backend = {"vmx_preemption_timer": "the VMX preemption timer",
               "hrtimer": "a host hrtimer"}.get(irq.get("timer_backend"), "an unknown timer")
    advance = irq.get("lapic_timer_advance")
    if advance == "fixed":
        advance = f"fixed {irq.get('lapic_timer_advance_ns')} ns"
    pi = {True: "on", False: "off", None: "auto"}[irq.get("pi_inject_timer")]
    how = (f"runs on {backend}; timer advance {advance or 'unknown'}, "
           f"pi_inject_timer {pi}")
    if offered:
        checks.append(Check("tsc_deadline", True, f"guest TSC-deadline timer offered "
                                                   f"({src.get('tsc_deadline_timer')}); {how}"))
    elif offered is False:
        checks.append(Check("tsc_deadline", False,
                            f"no guest TSC-deadline timer ({src.get('tsc_deadline_timer')}): the "
                            "TSC-deadline timer rows skip"))
    else:
        checks.append(Check("tsc_deadline", False,
                            "not checked: /dev/kvm is not usable" if not kvm.get("usable")
                            else f"unknown ({src.get('tsc_deadline_timer')}); {how}",
                            level="warn"))
    return checks


def _noise_checks(host: dict) -> list[Check]:
    """Host settings that make results noisy or different: CPU frequency, THP, idle polling."""
    checks: list[Check] = []
    governor = host.get("governor")
    if governor is None:
        checks.append(Check("governor", True, "no cpufreq driver (frequency not managed here)"))
    elif governor == "performance":
        checks.append(Check("governor", True, "governor is performance"))
    else:
        checks.append(Check("governor", False, f"governor is {governor}: results will be noisy",
                            "cpupower frequency-set -g performance", level="warn"))

    thp = (host.get("thp") or {}).get("enabled")
    if thp in ("always", "madvise"):
        checks.append(Check("thp", True, f"transparent hugepages: {thp}"))
    else:
        checks.append(Check("thp", False,
                            f"transparent hugepages: {thp or 'unavailable'}: backing=thp runs "
                            "on 4 KiB pages", "vlab host set thp=madvise", level="warn"))

    idle = host.get("cpuidle") or {}
    if idle_halts_at_once(host):
        checks.append(Check("cpuidle", False,
                            "cpuidle-haltpoll does not poll (guest_halt_poll_ns=0): every "
                            "cross-CPU wake-up is an IPI through the outer hypervisor, paid by "
                            "each io.virtio notify=kernel kick", HALTPOLL_ADVICE, level="warn"))
    elif idle.get("driver"):
        checks.append(Check("cpuidle", True, f"cpuidle driver {idle['driver']}"
                            + (f", polls {idle['haltpoll_ns']} ns before halting"
                               if idle.get("haltpoll_ns") is not None else "")))
    return checks


def _hugetlb_checks(host: dict) -> list[Check]:
    """Reserved 2 MiB and 1 GiB hugetlb pools (backing=hugetlb-2m / hugetlb-1g)."""
    checks: list[Check] = []
    pools = host.get("hugepages") or {}
    p2m = pools.get("2048kB") or {}
    if p2m.get("nr"):
        checks.append(Check("hugetlb.2m", True,
                            f"{p2m['nr']} x 2 MiB pages reserved ({p2m.get('free')} free)"))
    else:
        checks.append(Check(
            "hugetlb.2m", False, "no 2 MiB hugetlb pages reserved: backing=hugetlb will skip",
            "echo 512 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages; "
            "or vlab host set hugepages.2m=512", level="warn"))

    p1g = pools.get("1048576kB") or {}
    if not (host.get("cpu") or {}).get("flags", {}).get("pdpe1gb"):
        checks.append(Check("hugetlb.1g", False, "CPU has no pdpe1gb flag: no 1 GiB pages"))
    elif p1g.get("nr"):
        checks.append(Check("hugetlb.1g", True,
                            f"{p1g['nr']} x 1 GiB pages reserved ({p1g.get('free')} free)"))
    else:
        checks.append(Check(
            "hugetlb.1g", False, "pdpe1gb present but no 1 GiB hugetlb pages reserved",
            "echo 2 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages; "
            "or vlab host set hugepages.1g=2", level="warn"))
    return checks


def _device_checks(host: dict) -> list[Check]:
    """Device assignment: a usable SR-IOV VF, and VFIO itself."""
    checks: list[Check] = []
    dev = host.get("devices") or {}
    vf = dev.get("sriov_usable_vf")
    if vf:
        checks.append(Check("sriov", True,
                            f"VF {vf['bdf']} on vfio-pci, IOMMU group {vf['iommu_group']}"))
    else:
        checks.append(Check("sriov", False, dev.get("sriov_reason") or "no usable SR-IOV VF",
                            dev.get("sriov_advice") or ""))
    if dev.get("vfio"):
        checks.append(Check("vfio", True,
                            f"/dev/vfio/vfio present, {dev.get('iommu_groups', 0)} IOMMU groups"))
    else:
        checks.append(Check("vfio", False, dev.get("vfio_reason") or "/dev/vfio/vfio missing",
                            dev.get("vfio_advice") or ""))
    return checks


def _tooling_checks(host: dict) -> list[Check]:
    """Observation tools: perf events and a PMU, bpf with bcc and headers, kvm tracepoints."""
    checks: list[Check] = []
    tooling = host.get("tooling") or {}
    perf = tooling.get("perf_events") or {}
    if not perf.get("available"):
        checks.append(Check("perf", False, perf.get("reason") or "perf events not available"))
    elif not perf.get("pmu"):
        checks.append(Check("perf", False,
                            f"perf_event_paranoid={perf.get('paranoid')}; no hardware PMU: "
                            "tracepoints and software events only", level="warn"))
    else:
        checks.append(Check("perf", True, f"perf_event_paranoid={perf.get('paranoid')}, "
                                          "hardware PMU present"))

    bpf = tooling.get("bpf") or {}
    if not bpf.get("syscall"):
        checks.append(Check("bpf", False, "kernel has no bpf() syscall (CONFIG_BPF_SYSCALL)"))
    else:
        parts = [f"jit={bpf.get('jit')}", "BTF" if bpf.get("btf") else "no BTF",
                 "bcc installed" if bpf.get("bcc") else "bcc not installed"]
        headers = bpf.get("kernel_headers") or bpf.get("bcc_kernel_source")
        parts.append("kernel headers found" if headers else "no kernel headers")
        ok = bool(bpf.get("bcc") and headers)
        advice = ""
        if not bpf.get("bcc"):
            advice = "apt-get install python3-bpfcc"
        elif not headers:
            advice = "install kernel headers or point BCC_KERNEL_SOURCE at a headers tree"
        checks.append(Check("bpf", ok, ", ".join(parts), advice, level="warn"))

    trace = tooling.get("tracing") or {}
    if trace.get("kvm_events"):
        checks.append(Check("tracefs", True, f"kvm tracepoints under {trace['tracefs']}"))
    else:
        checks.append(Check("tracefs", False,
                            "tracefs not mounted" if not trace.get("tracefs")
                            else f"no kvm events under {trace['tracefs']}",
                            "mount -t tracefs nodev /sys/kernel/tracing", level="warn"))
    return checks


# The doctor's groups, in the order their rows are shown.
CHECK_GROUPS = (_kvm_checks, _virtualization_checks, _interrupt_checks, _noise_checks,
                _hugetlb_checks, _device_checks, _tooling_checks)


def doctor_checks(host: dict, extra: Iterable[Check] = ()) -> list[Check]:
    """The `vlab doctor` checks for a host record, followed by `extra` (e.g. tracing checks).

    Every check states what it found; failed ones say what it costs and how to fix it.
    """
    checks = [c for group in CHECK_GROUPS for c in group(host)]
    checks.extend(extra)
    return checks


def format_doctor(host: dict, checks: Iterable[Check]) -> str:
    """`vlab doctor` as text: a header describing the host, then one aligned row per check."""
    cpu = host.get("cpu") or {}
    kvm = host.get("kvm") or {}
    count = cpu.get("count")
    api = kvm.get("api_version") if kvm.get("api_version") is not None else "-"
    cpl0 = {True: "emulated", False: "native"}.get(host.get("emulated_cpl0"), "-")
    lines = [
        f"host     {host.get('host_id')}  ({host.get('hostname') or '?'})",
        f"cpu      {host.get('cpu_model') or '?'}  [{host.get('cpu_vendor')}, family "
        f"{cpu.get('family')} model {cpu.get('model')} stepping {cpu.get('stepping')}, "
        f"microcode {cpu.get('microcode')}, {count} CPUs]",
        f"kernel   {host.get('kernel') or '?'}",
        f"kvm      flavor {kvm.get('flavor')}, paging {host.get('paging')}, api {api}, nested "
        f"{'yes' if host.get('nested') else 'no'}, CPL0 {cpl0}",
        f"tsc      {host.get('tsc_khz')} kHz" if host.get("tsc_khz") else "tsc      unknown",
        "",
    ]
    checks = list(checks)
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        row = f"{c.status:<8} {c.name:<{width}}  {c.detail}"
        if c.advice and not c.ok:
            row += f" ({c.advice})"
        lines.append(row)
    return "\n".join(lines) + "\n"
