"""The host record: what machine, kernel and KVM a result was measured on.

Every vlab result carries the `host` record built here, because a VM-exit cost is meaningless
without knowing whether it came from VMX with EPT, SVM with NPT, or KVM on PVM (shadow paging,
emulated guest CPL0). The record is built from files only (procfs, sysfs, the kernel config, read
through `vlab.host.sysfs` under `root`), so tests can feed recorded trees and no privilege is
needed; what only the KVM API can tell (API version, capabilities, TSC rate) is passed in by the
caller.

`host_id` hashes the fields that make two results incomparable (`HOST_ID_KEYS`); `cap_value` and
`idle_halts_at_once` read a record for the experiments and the doctor. What changed between two
records is `vlab.host.diff`; the `vlab doctor` table is `vlab.host.doctor`.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any

from vlab.host.emulation import detect as _detect_emulation
from vlab.host.interrupts import summarize as _interrupts
from vlab.host.sriov import detect as _detect_sriov
from vlab.host.sysfs import (bracketed, cpulist_count, exists, kernel_config, listdir,
                             module_state, param_true, read_int, read_text, to_int)

# KVM modules whose parameters are recorded (kvm_intel, kvm_amd, kvm_pvm also decide the flavor).
KVM_MODULES = ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")

# CPU flags recorded as booleans (from both the `flags` and the `vmx flags` lines of cpuinfo).
CPU_FLAGS = (
    "vmx", "svm", "ept", "npt", "vpid", "ept_ad", "unrestricted_guest", "flexpriority",
    "tpr_shadow", "vnmi", "posted_intr", "pml", "avic", "x2avic", "nrip_save", "tsc_scale",
    "pdpe1gb", "pse", "la57", "pcid", "invpcid", "hypervisor", "constant_tsc", "nonstop_tsc",
    "tsc_known_freq", "tsc_deadline_timer", "rdtscp", "x2apic", "arch_perfmon",
    "cpuid_fault",      # PVM traps a guest's CPL3 cpuid only with CPUID faulting
    "apicv", "ipi_virt",  # vmx flags: the CPU can do APICv / IPI virtualization (when shown)
)

# Dotted paths hashed into host_id: change any of these and results stop being comparable.
# Not included on purpose: hostname (same box renamed is the same host), free memory and free
# hugepages (vary from run to run), the kernel command line (its effect shows in mitigations and
# module params), tooling (tracing availability does not change what the hardware costs).
HOST_ID_KEYS = (
    "cpu_model",
    "cpu.microcode",
    "cpu.count",
    "nested",
    "smt",
    "kernel",
    "kvm.flavor",
    "paging",
    "kvm.params.kvm.tdp_mmu",
    "kvm.params.kvm.nx_huge_pages",
    "kvm.params.kvm.halt_poll_ns",
    "kvm.params.kvm.enable_pmu",
    "kvm.params.kvm.eager_page_split",
    "kvm.params.kvm_intel.ept",
    "kvm.params.kvm_intel.vpid",
    "kvm.params.kvm_intel.enable_apicv",
    "kvm.params.kvm_intel.pml",
    "kvm.params.kvm_intel.unrestricted_guest",
    "kvm.params.kvm_intel.eptad",
    "kvm.params.kvm_intel.preemption_timer",
    "kvm.params.kvm_amd.npt",
    "kvm.params.kvm_amd.avic",
    "kvm.params.kvm_amd.vls",
    "kvm.params.kvm_amd.vgif",
    "kvm.params.kvm_pvm",
    "thp.enabled",
    "mitigations",
)

# What the flavor means for guest CPL0 code before any calibration has been measured.
_CPL0_EMULATED = {"vmx": False, "svm": False, "pvm": True, "none": None}


# ----------------------------------------------------------------------------------------------
# Sections of the record


def _first_processor(root: str) -> tuple[dict[str, str], int]:
    """The fields of /proc/cpuinfo's first processor block, and how many blocks there are."""
    text = read_text(root, "/proc/cpuinfo") or ""
    first: dict[str, str] = {}
    processors = 0
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" in fields:
            processors += 1
            if not first:
                first = fields
    return first, processors


def cpu_flag_lines(root: str = "/") -> dict[str, set[str]]:
    """The `flags` and `vmx flags` lines of the first CPU in /proc/cpuinfo, as sets of names;
    a line the kernel does not print (`vmx flags` before Linux 5.8, or on AMD) is absent."""
    first, _ = _first_processor(root)
    return {line: set(first[line].split()) for line in ("flags", "vmx flags") if line in first}


def _cpu(root: str) -> dict[str, Any]:
    first, processors = _first_processor(root)
    flags = set(first.get("flags", "").split()) | set(first.get("vmx flags", "").split())
    vendor_id = first.get("vendor_id", "")
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "hygon",
              "CentaurHauls": "centaur"}.get(vendor_id, vendor_id.lower() or "unknown")
    count = cpulist_count(read_text(root, "/sys/devices/system/cpu/online")) or processors or None
    smt_active = read_text(root, "/sys/devices/system/cpu/smt/active")
    if smt_active in ("0", "1"):
        smt = smt_active == "1"
    else:  # older kernels: more logical siblings per package than cores means SMT is on
        siblings, cores = to_int(first.get("siblings")), to_int(first.get("cpu cores"))
        smt = bool(siblings and cores and siblings > cores)
    return {
        "model_name": first.get("model name"),
        "vendor": vendor,
        "vendor_id": vendor_id or None,
        "family": to_int(first.get("cpu family")),
        "model": to_int(first.get("model")),
        "stepping": to_int(first.get("stepping")),
        "microcode": first.get("microcode"),
        "flags": {name: name in flags for name in CPU_FLAGS},
        "bugs": sorted(first.get("bugs", "").split()),
        "count": count,
        "smt": smt,
    }


def _kvm_section(root: str, kvm: dict | None) -> dict[str, Any]:
    modules = [m for m in listdir(root, "/sys/module") if m == "kvm" or m.startswith("kvm_")]
    builtin = [m for m in modules if module_state(root, m) == "builtin"]
    params: dict[str, dict[str, str]] = {}
    for mod in KVM_MODULES:
        values: dict[str, str] = {}
        for name in listdir(root, f"/sys/module/{mod}/parameters"):
            value = read_text(root, f"/sys/module/{mod}/parameters/{name}")
            if value is not None:
                values[name] = value
        params[mod] = values
    dev_kvm = exists(root, "/dev/kvm")
    if "kvm_intel" in modules:
        flavor = "vmx"
    elif "kvm_amd" in modules:
        flavor = "svm"
    elif "kvm_pvm" in modules:
        flavor = "pvm"
    else:
        flavor = "none"

    if kvm is not None:
        usable, reason = True, None
    elif not dev_kvm:
        usable, reason = False, "/dev/kvm does not exist (no KVM vendor module loaded)"
    elif root == "/" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        usable, reason = False, f"/dev/kvm is not readable and writable by uid {os.getuid()}"
    else:
        usable, reason = False, "/dev/kvm exists but was not opened (native layer unavailable)"
    kvm = kvm or {}
    return {
        "flavor": flavor,
        "usable": usable,
        "reason": reason,
        "dev_kvm": dev_kvm,
        "api_version": kvm.get("api_version"),
        "caps": dict(kvm.get("caps") or {}),
        # What KVM_GET_SUPPORTED_CPUID offers guests of the features the interrupt rows use.
        "guest_cpuid": dict(kvm["guest_cpuid"]) if kvm.get("guest_cpuid") else None,
        "nr_vcpus": kvm.get("nr_vcpus"),
        "max_vcpus": kvm.get("max_vcpus"),
        "params": params,
        "modules": modules,
        "builtin": builtin,
    }


def _paging(flavor: str, params: dict[str, dict[str, str]], flags: dict[str, bool]) -> str:
    """ept/npt when KVM uses two-dimensional paging, shadow when it shadows guest page tables."""
    if flavor == "vmx":
        ept = params.get("kvm_intel", {}).get("ept")
        enabled = param_true(ept) if ept is not None else flags.get("ept", False)
        return "ept" if enabled else "shadow"
    if flavor == "svm":
        npt = params.get("kvm_amd", {}).get("npt")
        enabled = param_true(npt) if npt is not None else flags.get("npt", False)
        return "npt" if enabled else "shadow"
    if flavor == "pvm":
        # PVM has no TDP at all: even kvm.tdp_mmu=Y would only change the MMU code path.
        return "shadow"
    return "none"


def _memory(root: str) -> tuple[int | None, int | None]:
    total = available = None
    for line in (read_text(root, "/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        value = to_int(rest.split()[0]) if rest.split() else None
        if key == "MemTotal":
            total = value
        elif key == "MemAvailable":
            available = value
    return total, available


def _hugepages(root: str) -> dict[str, dict[str, int | None]]:
    pools = {}
    for entry in listdir(root, "/sys/kernel/mm/hugepages"):
        if entry.startswith("hugepages-"):
            base = f"/sys/kernel/mm/hugepages/{entry}"
            pools[entry[len("hugepages-"):]] = {
                "nr": read_int(root, f"{base}/nr_hugepages"),
                "free": read_int(root, f"{base}/free_hugepages"),
            }
    return dict(sorted(pools.items(), key=lambda kv: to_int(kv[0].rstrip("kB")) or 0))


def _numa_nodes(root: str) -> int | None:
    online = cpulist_count(read_text(root, "/sys/devices/system/node/online"))
    if online:
        return online
    nodes = [e for e in listdir(root, "/sys/devices/system/node")
             if e.startswith("node") and e[4:].isdigit()]
    return len(nodes) or None


def _tooling(root: str, kconfig: dict[str, str] | None, release: str | None) -> dict[str, Any]:
    paranoid = read_int(root, "/proc/sys/kernel/perf_event_paranoid")
    sources = listdir(root, "/sys/bus/event_source/devices")
    # The core PMU driver registers "cpu" (or "cpu_core"/"cpu_atom" on hybrid parts); without it
    # perf has software events and tracepoints only.
    pmu = any(s == "cpu" or s.startswith("cpu_") for s in sources)
    if paranoid is None:
        perf = {"available": False, "paranoid": None, "pmu": pmu,
                "reason": "perf events not available (no /proc/sys/kernel/perf_event_paranoid)"}
    else:
        reason = None
        if not pmu:
            reason = "no hardware PMU exposed: cycles/instructions counters are unsupported"
        perf = {"available": True, "paranoid": paranoid, "pmu": pmu, "reason": reason}

    unpriv = read_int(root, "/proc/sys/kernel/unprivileged_bpf_disabled")
    syscall = unpriv is not None or (kconfig or {}).get("CONFIG_BPF_SYSCALL") == "y"
    bpf = {
        "syscall": syscall,
        "unprivileged_disabled": unpriv,
        "jit": read_int(root, "/proc/sys/net/core/bpf_jit_enable"),
        "btf": exists(root, "/sys/kernel/btf/vmlinux"),
        "bcc": exists(root, "/usr/lib/python3/dist-packages/bcc"),
        "kernel_headers": bool(release) and exists(root, f"/lib/modules/{release}/build"),
    }
    if root == "/" and os.environ.get("BCC_KERNEL_SOURCE"):
        bpf["bcc_kernel_source"] = os.environ["BCC_KERNEL_SOURCE"]

    tracefs = None
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if exists(root, f"{path}/events"):
            tracefs = path
            break
    trace = {"tracefs": tracefs,
             "kvm_events": bool(tracefs) and exists(root, f"{tracefs}/events/kvm")}
    return {"perf_events": perf, "bpf": bpf, "tracing": trace}


def fingerprint(root: str = "/", kvm: dict | None = None) -> dict:
    """The `host` section of a results file, for the tree at `root` (default: this host).

    `kvm` comes from the native layer after opening /dev/kvm: `{"api_version", "caps": {NAME:
    value}, "tsc_khz", "nr_vcpus", "max_vcpus"}`; pass None when /dev/kvm could not be used and
    the record says why. Everything else is read from files, so this never needs privileges and
    never fails: what cannot be read is recorded as None.
    """
    cpu = _cpu(root)
    release = read_text(root, "/proc/sys/kernel/osrelease")
    kconfig = kernel_config(root, release)
    kvm_rec = _kvm_section(root, kvm)
    paging = _paging(kvm_rec["flavor"], kvm_rec["params"], cpu["flags"])
    mem_total, mem_available = _memory(root)
    sriov = _detect_sriov(root)
    hostname = read_text(root, "/proc/sys/kernel/hostname")
    if hostname is None and root == "/":
        hostname = socket.gethostname()
    cpl0 = _CPL0_EMULATED[kvm_rec["flavor"]]

    host: dict[str, Any] = {
        "host_id": None,
        "hostname": hostname,
        "cpu_model": cpu["model_name"],
        "cpu_vendor": cpu["vendor"],
        "cpu": {k: cpu[k] for k in ("family", "model", "stepping", "microcode", "flags", "bugs",
                                    "count")},
        "nested": cpu["flags"]["hypervisor"],
        # Not in host_id: the CPU model already differs, and old records stay comparable.
        "emulation": _detect_emulation(root, cpu["model_name"]),
        "kernel": release,
        "kernel_version": read_text(root, "/proc/sys/kernel/version"),
        "kernel_cmdline": read_text(root, "/proc/cmdline"),
        "kernel_config": kconfig,
        "mitigations": {name: read_text(root, f"/sys/devices/system/cpu/vulnerabilities/{name}")
                        for name in listdir(root, "/sys/devices/system/cpu/vulnerabilities")},
        "kvm": kvm_rec,
        "paging": paging,
        # APICv/AVIC, posted interrupts, IPI virtualization, x2APIC, halt polling and the
        # guest timer, derived from kvm.params, cpu.flags and KVM's answers, each with its
        # source (vlab.host.interrupts). Not in host_id: the parameters that matter already are.
        "interrupts": _interrupts(kvm_rec["flavor"], kvm_rec["params"], cpu["flags"],
                                  cap_value(kvm_rec["caps"], "TSC_DEADLINE_TIMER"),
                                  kvm_rec["guest_cpuid"]),
        # Default expectation from the flavor; the runner replaces emulated_cpl0 with what its
        # CPL0-vs-CPL3 nop calibration measured and keeps cpl0_emulated_expected as is.
        "cpl0_emulated_expected": cpl0,
        "emulated_cpl0": cpl0,
        "tsc_khz": (kvm or {}).get("tsc_khz"),
        "thp": {
            "enabled": bracketed(read_text(root, "/sys/kernel/mm/transparent_hugepage/enabled")),
            "defrag": bracketed(read_text(root, "/sys/kernel/mm/transparent_hugepage/defrag")),
        },
        "hugepages": _hugepages(root),
        "mem_total_kb": mem_total,
        "mem_available_kb": mem_available,
        "numa_nodes": _numa_nodes(root),
        "smt": cpu["smt"],
        "governor": read_text(root, "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        # How an idle CPU waits: when this host is itself a guest, cpuidle-haltpoll with
        # guest_halt_poll_ns=0 halts at once, so waking a thread there (an ioeventfd waking a
        # backend thread) costs an IPI through the outer hypervisor. Recorded, not in host_id,
        # so results from before this field existed stay comparable; `vlab compare` shows it.
        "cpuidle": {
            "driver": read_text(root, "/sys/devices/system/cpu/cpuidle/current_driver"),
            "governor": read_text(root, "/sys/devices/system/cpu/cpuidle/current_governor"),
            "haltpoll_ns": to_int(read_text(
                root, "/sys/module/haltpoll/parameters/guest_halt_poll_ns")),
        },
        "devices": {
            "iommu_groups": sriov["vfio"]["iommu_groups"],
            "vfio": sriov["vfio"]["dev_vfio"],
            "sriov": sriov["pfs"],
            "sriov_vfs": sriov["vfs"],
            "sriov_usable_vf": sriov["usable_vf"],
            "sriov_reason": sriov["reason"],
            "sriov_advice": sriov["advice"],
            "vfio_reason": sriov["vfio_reason"],
            "vfio_advice": sriov["vfio_advice"],
        },
        "tooling": _tooling(root, kconfig, release),
    }
    host["host_id"] = host_id(host)
    return host


HALTPOLL_ADVICE = "vlab host set haltpoll.guest_halt_poll_ns=200000"


def idle_halts_at_once(host: dict) -> bool:
    """Whether this host's idle CPUs halt without polling (cpuidle-haltpoll driving idle with
    guest_halt_poll_ns=0): then every cross-CPU wake-up is an IPI through the outer hypervisor."""
    idle = host.get("cpuidle") or {}
    return idle.get("driver") == "haltpoll" and idle.get("haltpoll_ns") == 0


def cap_value(caps: dict, name: str) -> int | None:
    """A capability's value from `caps`, accepting names with or without the KVM_CAP_ prefix."""
    bare = name[len("KVM_CAP_"):] if name.startswith("KVM_CAP_") else name
    for candidate in (bare, "KVM_CAP_" + bare):
        if candidate in caps:
            return caps[candidate]
    return None


# ----------------------------------------------------------------------------------------------
# Identity


def _lookup(record: dict, dotted: str) -> Any:
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def host_id(host: dict) -> str:
    """12 hex digits of sha256 over the `HOST_ID_KEYS` of a host record.

    Stable across calls and runs of the same configuration; any change to a key that makes
    results incomparable (microcode, kernel, EPT on/off, THP mode, mitigations...) changes it.
    """
    key = {path: _lookup(host, path) for path in HOST_ID_KEYS}
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
