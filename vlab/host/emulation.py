"""Whether the host's CPU is emulated (QEMU's TCG) rather than hardware, from files only.

A KVM host can itself be a QEMU guest whose CPU is emulated instruction by instruction by TCG
(vlab's SVM/NPT lane, `make test-svm`, is one). Such a host runs KVM for real: its exit counts,
exit reasons and paging modes are KVM's own. Its timings are not hardware timings: every
instruction, every VM entry and exit and every page walk is emulated, at a speed that depends on
the machine QEMU runs on. The host record says so in `host["emulation"]`, and `vlab doctor`,
`show` and `report` warn with `WARNING_TEXT`.

Signals, strongest first, each read through `root` like the rest of the host record:

- the CPU model name: QEMU names its TCG-only CPU models "QEMU TCG CPU version ..." (`-cpu max`
  under TCG); a model name with "TCG" in it cannot come from hardware or a hardware-assisted VM;
- DMI says QEMU (`sys_vendor`) and the kernel found no paravirtual clock (no kvm-clock,
  hyperv_clocksource or xen among the clocksources): QEMU with KVM, Hyper-V (WHPX) or Xen
  acceleration offers one, TCG does not. This covers TCG with a named CPU model
  (`-cpu EPYC`), whose model name looks like hardware.
"""
from __future__ import annotations

from typing import Any

from vlab.host.sysfs import read_text

# Clocksources only a hardware-assisted hypervisor offers its guests.
PARAVIRT_CLOCKSOURCES = ("kvm-clock", "hyperv_clocksource_tsc_page", "hyperv_clocksource_msr",
                         "xen")

WARNING_TEXT = ("the CPU of this host is emulated by QEMU's TCG: exit counts and reasons are "
                "KVM's own, but its timings are not hardware timings")


def detect(root: str, model_name: str | None) -> dict[str, Any]:
    """`{"emulated": bool, "by": "qemu-tcg" | None, "evidence": [str, ...]}` for the tree at
    `root` whose /proc/cpuinfo gave `model_name`. Evidence lists every signal found, so a
    reader can judge it; `emulated` is True when any signal says TCG."""
    evidence: list[str] = []
    if model_name and "TCG" in model_name.split():
        evidence.append(f"cpu model name {model_name!r}")
    vendor = read_text(root, "/sys/class/dmi/id/sys_vendor")
    clocks = read_text(root, "/sys/devices/system/clocksource/clocksource0/available_clocksource")
    if vendor == "QEMU" and clocks is not None:
        paravirt = [c for c in clocks.split() if c in PARAVIRT_CLOCKSOURCES]
        if not paravirt:
            evidence.append(f"DMI sys_vendor QEMU and no paravirtual clocksource ({clocks})")
    emulated = bool(evidence)
    return {"emulated": emulated, "by": "qemu-tcg" if emulated else None, "evidence": evidence}


def is_emulated(host: dict) -> bool:
    """Whether a host record (from any vlab version) says its CPU is emulated. Older records
    without the `emulation` field are judged by their CPU model name."""
    emu = host.get("emulation")
    if isinstance(emu, dict) and "emulated" in emu:
        return bool(emu["emulated"])
    model = host.get("cpu_model") or ""
    return "TCG" in str(model).split()


def warning(host: dict) -> str | None:
    """The one-line warning `vlab show`, `report` and `doctor` print for an emulated host, or
    None for hardware. It names the evidence when the record has it."""
    if not is_emulated(host):
        return None
    evidence = (host.get("emulation") or {}).get("evidence") or []
    return WARNING_TEXT + (f" ({'; '.join(evidence)})" if evidence else "")


# What make test-svm found (QEMU 10.0.2 TCG, Debian 6.1.0-57, kvm_amd.npt=0): every guest that
# loads CR3 or runs invlpg at CPL0 ends in a triple fault on the instruction after it, while
# cpuid, port I/O and MMIO exits work. TCG's SVM has neither NRIPS nor DecodeAssists, so KVM
# takes its instruction-emulator path for these intercepts, a path AMD hardware does not take;
# whether the fault is QEMU's or KVM's is not established.
TCG_SHADOW_REASON = ("not run: on an SVM host whose CPU is emulated by QEMU's TCG, with "
                     "kvm_amd.npt=0 a guest CR3 load or invlpg at CPL0 ends in a triple fault "
                     "(found by make test-svm; TCG's SVM lacks NRIPS and DecodeAssists, so KVM "
                     "emulates these intercepts); the result would measure that, not paging")


def tcg_shadow_requirement():
    """A `Requirement` that skips, with `TCG_SHADOW_REASON`, the cases that load CR3 or run
    invlpg in the guest (exits.cr3_write, exits.invlpg, the paging area) on a TCG-emulated
    SVM host with shadow paging; anywhere else it holds."""
    from vlab.run.registry import Requirement

    def check(host: dict, params: dict) -> str | None:
        if (host.get("kvm", {}).get("flavor") == "svm" and host.get("paging") == "shadow"
                and is_emulated(host)):
            return TCG_SHADOW_REASON
        return None
    return Requirement("tcg_shadow", check)
