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

from ._host import read_text

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
