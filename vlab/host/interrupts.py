"""The host's interrupt virtualization, derived for the host record's `interrupts` section.

What an IPI, an EOI, a TPR write or a timer interrupt costs a guest depends less on the CPU than
on how KVM was configured to virtualize the local APIC: APICv (Intel) or AVIC/x2AVIC (AMD)
decide which APIC accesses exit at all, posted interrupts decide whether an interrupt reaches a
running vCPU without a kick, IPI virtualization whether the sender exits, halt polling and the
timer settings how quickly a halted vCPU wakes. The raw facts are module parameters and CPU
flags that the record already holds (`kvm.params`, `cpu.flags`) plus what /dev/kvm answers
(`kvm.caps`, `kvm.guest_cpuid`); `summarize` turns them into one value per question, and
`sources` says for each value which files or answers it came from, so a reader can check it.

Facts used (Linux sources): kvm_intel.enable_apicv is cleared at load when the CPU lacks APICv,
and kvm_intel.enable_ipiv (5.19+) when APICv is off or the CPU lacks IPI virtualization
(vmx.c hardware setup); APICv requires posted interrupts; kvm_amd.avic ends up 0/N unless NPT
is on and the CPU has AVIC (svm.c/avic.c); KVM offers x2APIC to guests whatever the host CPU
(cpuid.c: "KVM emulates x2apic in software"); the guest's TSC-deadline timer runs on the VMX
preemption timer when kvm_intel.preemption_timer is on, on a host hrtimer otherwise (lapic.c).
KVM on PVM has no APICv/AVIC at all: its local APIC is emulated.
"""
from __future__ import annotations

from typing import Any

from vlab.host.sysfs import param_true, to_int

# The values `apic_virtualization` takes.
APIC_MODES = ("apicv", "avic", "x2avic", "none")


def _param(params: dict[str, dict[str, str]], module: str, name: str) -> str | None:
    return (params.get(module) or {}).get(name)


def _flag_word(on: bool) -> str:
    return "set" if on else "absent"


def _apic(flavor: str, params: dict, flags: dict) -> tuple[str | None, str]:
    """(apic_virtualization, its source)."""
    if flavor == "vmx":
        value = _param(params, "kvm_intel", "enable_apicv")
        if value is None:
            return None, "kvm_intel has no enable_apicv parameter"
        on = param_true(value)
        return ("apicv" if on else "none"), f"kvm_intel.enable_apicv={value}"
    if flavor == "svm":
        value = _param(params, "kvm_amd", "avic")
        if value is None:
            return None, "kvm_amd has no avic parameter"
        if not param_true(value):
            return "none", (f"kvm_amd.avic={value} (cpu flag avic "
                            f"{_flag_word(bool(flags.get('avic')))})")
        x2 = bool(flags.get("x2avic"))
        return ("x2avic" if x2 else "avic"), (f"kvm_amd.avic={value}, cpu flag x2avic "
                                              f"{_flag_word(x2)}")
    if flavor == "pvm":
        return "none", "KVM on PVM: no APICv/AVIC, KVM emulates the local APIC"
    return None, "no KVM"


def _posted(flavor: str, apic: str | None, flags: dict) -> tuple[bool | None, str]:
    if flavor == "vmx":
        if apic is None:
            return None, "unknown without kvm_intel.enable_apicv"
        return apic == "apicv", ("APICv on (it requires posted interrupts; cpu flag posted_intr "
                                 f"{_flag_word(bool(flags.get('posted_intr')))})"
                                 if apic == "apicv" else "APICv off: KVM kicks a running vCPU "
                                 "to inject")
    if flavor == "svm":
        if apic is None:
            return None, "unknown without kvm_amd.avic"
        on = apic in ("avic", "x2avic")
        return on, ("AVIC on: the doorbell delivers into a running vCPU's backing page"
                    if on else "AVIC off: KVM kicks a running vCPU to inject")
    if flavor == "pvm":
        return False, "KVM on PVM: interrupts are injected by KVM on the next entry"
    return None, "no KVM"


def _ipiv(flavor: str, params: dict, apic: str | None) -> tuple[bool | None, str]:
    if flavor == "vmx":
        value = _param(params, "kvm_intel", "enable_ipiv")
        if value is None:
            return False, "kvm_intel has no enable_ipiv parameter (Linux before 5.19)"
        return param_true(value), f"kvm_intel.enable_ipiv={value}"
    if flavor == "svm":
        value = _param(params, "kvm_amd", "enable_ipiv")
        if value is not None:
            return param_true(value) and apic in ("avic", "x2avic"), f"kvm_amd.enable_ipiv={value}"
        if apic is None:
            return None, "unknown without kvm_amd.avic"
        on = apic in ("avic", "x2avic")
        return on, ("AVIC on: IPIs to running vCPUs are delivered without an exit (kvm_amd "
                    "has no enable_ipiv parameter)" if on else "AVIC off: every IPI exits")
    if flavor == "pvm":
        return False, "KVM on PVM: every IPI exits to KVM"
    return None, "no KVM"


def _x2apic(flavor: str, params: dict, flags: dict,
            guest_cpuid: dict | None) -> tuple[bool | None, str]:
    host = f"host cpu flag x2apic {_flag_word(bool(flags.get('x2apic')))}"
    if guest_cpuid and guest_cpuid.get("x2apic") is not None:
        return bool(guest_cpuid["x2apic"]), f"KVM_GET_SUPPORTED_CPUID 1.ECX[21]; {host}"
    if flavor == "pvm":
        value = _param(params, "kvm_pvm", "no_x2apic")
        if value is None:
            return None, f"kvm_pvm has no no_x2apic parameter; {host}"
        return not param_true(value), f"kvm_pvm.no_x2apic={value}; {host}"
    if flavor in ("vmx", "svm"):
        return True, f"KVM emulates x2APIC for guests whatever the host CPU; {host}"
    return None, "no KVM"


def _x2apic_accel(flavor: str, apic: str | None) -> tuple[bool | None, str]:
    if apic is None:
        return None, "unknown APIC virtualization"
    if apic == "apicv":
        return True, "APICv virtualizes x2APIC MSR accesses"
    if apic == "x2avic":
        return True, "x2AVIC virtualizes x2APIC MSR accesses"
    if apic == "avic":
        return False, "AVIC without x2AVIC: x2APIC MSR accesses exit to KVM"
    return False, "no APIC virtualization: every x2APIC MSR access exits to KVM"


def _halt_poll(params: dict) -> dict[str, tuple[int | None, str]]:
    """kvm.halt_poll_ns and its grow/grow_start/shrink: {name: (value, source)}."""
    out = {}
    for name in ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start",
                 "halt_poll_ns_shrink"):
        text = _param(params, "kvm", name)
        out[name] = (to_int(text), f"kvm.{name}={text}" if text is not None
                     else f"kvm has no {name} parameter")
    return out


def _timer_advance(params: dict) -> tuple[str | None, int | None, str]:
    """(mode adaptive/off/fixed, fixed ns, source) from kvm.lapic_timer_advance (bool, newer
    kernels) or kvm.lapic_timer_advance_ns (-1 adaptive, 0 off, N fixed; older kernels)."""
    flag = _param(params, "kvm", "lapic_timer_advance")
    if flag is not None:
        return ("adaptive" if param_true(flag) else "off"), None, f"kvm.lapic_timer_advance={flag}"
    text = _param(params, "kvm", "lapic_timer_advance_ns")
    ns = to_int(text)
    if ns is None:
        return None, None, "kvm has no lapic_timer_advance(_ns) parameter"
    source = f"kvm.lapic_timer_advance_ns={text}"
    if ns < 0:
        return "adaptive", None, source
    return ("off", None, source) if ns == 0 else ("fixed", ns, source)


def _pi_timer(params: dict) -> tuple[bool | None, str]:
    text = _param(params, "kvm", "pi_inject_timer")
    value = to_int(text)
    if value is None:
        return None, "kvm has no pi_inject_timer parameter"
    if value < 0:
        return None, f"kvm.pi_inject_timer={text} (auto: on with nohz_full, decided at load)"
    return value != 0, f"kvm.pi_inject_timer={text}"


def _tsc_deadline(cap: int | None, flags: dict,
                  guest_cpuid: dict | None) -> tuple[bool | None, str]:
    """(whether guests get a TSC-deadline timer, source)."""
    host = f"host cpu flag tsc_deadline_timer {_flag_word(bool(flags.get('tsc_deadline_timer')))}"
    if cap is not None:
        return bool(cap), f"KVM_CAP_TSC_DEADLINE_TIMER={cap}; {host}"
    if guest_cpuid and guest_cpuid.get("tsc_deadline_timer") is not None:
        return bool(guest_cpuid["tsc_deadline_timer"]), f"KVM_GET_SUPPORTED_CPUID 1.ECX[24]; {host}"
    return None, f"not asked (/dev/kvm not opened); {host}"


def _timer_backend(flavor: str, params: dict) -> tuple[str | None, str]:
    """(what runs a guest's TSC-deadline timer, source)."""
    if flavor == "vmx":
        value = _param(params, "kvm_intel", "preemption_timer")
        if value is None:
            return None, "kvm_intel has no preemption_timer parameter"
        return ("vmx_preemption_timer" if param_true(value) else "hrtimer",
                f"kvm_intel.preemption_timer={value}")
    if flavor in ("svm", "pvm"):
        return "hrtimer", "no VMX preemption timer on SVM or PVM: a host hrtimer"
    return None, "no KVM"


def summarize(flavor: str, params: dict[str, dict[str, str]], flags: dict[str, bool],
              tsc_deadline_cap: int | None = None,
              guest_cpuid: dict | None = None) -> dict[str, Any]:
    """The `interrupts` section of a host record.

    `flavor` is the record's kvm.flavor, `params` its kvm.params, `flags` its cpu.flags;
    `tsc_deadline_cap` (KVM_CAP_TSC_DEADLINE_TIMER) and `guest_cpuid` (x2apic and
    tsc_deadline_timer as KVM_GET_SUPPORTED_CPUID offers them) are what /dev/kvm answered, None
    when it was not opened. Every value is None where the host does not say; `sources` names,
    per key, the parameters, flags or KVM answers the value was derived from.
    """
    out: dict[str, Any] = {}
    src: dict[str, str] = {}
    apic, src["apic_virtualization"] = _apic(flavor, params, flags)
    out["apic_virtualization"] = apic
    out["posted_interrupts"], src["posted_interrupts"] = _posted(flavor, apic, flags)
    out["ipi_virtualization"], src["ipi_virtualization"] = _ipiv(flavor, params, apic)
    out["x2apic"], src["x2apic"] = _x2apic(flavor, params, flags, guest_cpuid)
    out["x2apic_virtualization"], src["x2apic_virtualization"] = _x2apic_accel(flavor, apic)
    for name, (value, source) in _halt_poll(params).items():
        out[name], src[name] = value, source
    mode, ns, src["lapic_timer_advance"] = _timer_advance(params)
    out["lapic_timer_advance"], out["lapic_timer_advance_ns"] = mode, ns
    src["lapic_timer_advance_ns"] = src["lapic_timer_advance"]
    out["pi_inject_timer"], src["pi_inject_timer"] = _pi_timer(params)
    out["tsc_deadline_timer"], src["tsc_deadline_timer"] = _tsc_deadline(tsc_deadline_cap, flags,
                                                                         guest_cpuid)
    out["timer_backend"], src["timer_backend"] = _timer_backend(flavor, params)
    if flavor == "none":
        for key in out:
            out[key] = None
            src[key] = "no KVM"
    out["sources"] = src
    return out
