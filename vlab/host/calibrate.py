"""Host record collection and per-run calibration.

Calibration is measured once per run and stored in the host section: the rdtsc bracket
overhead, a CPL3 and a CPL0 nop loop, the cost of an empty sample (one ucall round trip), and the
KVM_RUN round trip with immediate_exit. When the CPL0 loop costs orders of magnitude more than
the CPL3 one, the host emulates CPL0 and every CPL0 figure carries that flag.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from vlab._errors import KvmError, VlabError

# A CPL0 nop-loop iteration this many times the CPL3 one means KVM emulates CPL0 code.
EMULATION_FACTOR = 50


def kvm_info() -> tuple[dict | None, str | None]:
    """What /dev/kvm says (for the fingerprint), or None and the reason it cannot be used."""
    try:
        from vlab.vmm.kvm import Kvm
    except ImportError as e:  # native part not built
        return None, f"vlab's native module is not built ({e})"
    try:
        with Kvm() as k:
            caps = k.caps()
            info = {"api_version": k.api_version, "caps": caps,
                    "nr_vcpus": caps.get("NR_VCPUS"), "max_vcpus": caps.get("MAX_VCPUS"),
                    "guest_cpuid": guest_cpuid(k)}
            with k.create_vm() as vm:
                info["tsc_khz"] = vm.create_vcpu(0).tsc_khz
            return info, None
    except KvmError as e:
        return None, str(e)


def guest_cpuid(k) -> dict[str, bool] | None:
    """The interrupt-related CPUID.1 ECX bits KVM_GET_SUPPORTED_CPUID offers guests of the open
    /dev/kvm `k`: x2APIC (bit 21) and the TSC-deadline timer (bit 24); None if it cannot say."""
    regs = k.supported_cpuid(1)
    if regs is None:
        return None
    ecx = regs[2]
    return {"x2apic": bool(ecx >> 21 & 1), "tsc_deadline_timer": bool(ecx >> 24 & 1)}


def collect_host(root: str = "/") -> dict:
    """The fingerprint of this host, with what KVM itself reports."""
    from vlab.host import fingerprint

    info, why = kvm_info()
    host = fingerprint(root, info)
    if why:
        host.setdefault("kvm", {})["usable"] = False
        host["kvm"]["reason"] = why
    return host


def _median_samples(m, op: str, iters: int, samples: int) -> np.ndarray:
    from vlab.vmm.payloads import MICRO_F_MARK, MICRO_OPS

    m.restart()
    m.set_args(MICRO_OPS[op], iters, samples, 0, 0, MICRO_F_MARK, 0)
    m.vcpus[0].record_marks(samples + 2)
    m.run_to_done(timeout=60)
    return m.results(0).astype(np.float64)


def calibrate() -> dict:
    """Measure the calibration figures on this host (about a second)."""
    from vlab.vmm.machine import Machine

    out: dict = {}
    try:
        with Machine(cpl=3) as m:
            bracket = float(np.median(_median_samples(m, "empty", 0, 256)))
            marks = np.diff(m.vcpus[0].marks().astype(np.int64))
            nop3 = (np.median(_median_samples(m, "nop", 4000, 64)) - bracket) / 4000
            trips = [m.vcpus[0].run_immediate_exit(200) / 200 for _ in range(20)]
            out.update({
                "rdtsc_bracket_cycles": bracket,
                "cpl3_nop_cycles_per_iter": float(nop3),
                "empty_sample_ns": float(np.median(marks)),
                "kvm_run_immediate_exit_ns": float(np.median(trips)),
                "kvm_run_immediate_exit_ns_p99": float(np.percentile(trips, 99)),
                "tsc_khz": m.vcpus[0].tsc_khz,
            })
        with Machine(cpl=0) as m:
            bracket0 = float(np.median(_median_samples(m, "empty", 0, 32)))
            nop0 = (np.median(_median_samples(m, "nop", 20, 16)) - bracket0) / 20
            out.update({"cpl0_rdtsc_bracket_cycles": bracket0,
                        "cpl0_nop_cycles_per_iter": float(nop0)})
    except VlabError as e:
        out["error"] = str(e)
        return out
    out["emulated_cpl0"] = bool(out["cpl0_nop_cycles_per_iter"]
                                > EMULATION_FACTOR * max(out["cpl3_nop_cycles_per_iter"], 1.0))
    return out


def merge_calibration(host: dict, cal: dict) -> dict:
    """Put calibration figures `cal` into the host record: `host["calibration"]`, and
    `host["emulated_cpl0"]` replaced by what the calibration measured (the record's value is
    only the flavor's expectation). Returns `host`."""
    host["calibration"] = cal
    if "emulated_cpl0" in cal:
        host["emulated_cpl0"] = cal["emulated_cpl0"]
    return host


def calibrate_host(host: dict, on_start: Callable[[], None] | None = None) -> dict | None:
    """Calibrate when the host record says /dev/kvm is usable, and merge the figures into it
    (`merge_calibration`); `on_start` is called just before measuring. Returns the figures, or
    None when KVM is not usable and nothing was measured."""
    if not (host.get("kvm") or {}).get("usable"):
        return None
    if on_start is not None:
        on_start()
    cal = calibrate()
    merge_calibration(host, cal)
    return cal
