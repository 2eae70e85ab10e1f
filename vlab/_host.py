"""Host fingerprint: what machine, kernel and KVM a result was measured on.

Every vlab result carries the `host` record built here, because a VM-exit cost is meaningless
without knowing whether it came from VMX with EPT, SVM with NPT, or KVM on PVM (shadow paging,
emulated guest CPL0). The record is built from files only (procfs, sysfs, the kernel config),
always read through `root`, so tests can feed recorded trees and no privilege is needed; what only
the KVM API can tell (API version, capabilities, TSC rate) is passed in by the caller.

`host_id` hashes the fields that make two results incomparable (`HOST_ID_KEYS`); `host_diff`
lists what changed between two records; `doctor_checks` / `format_doctor` turn a record into the
`vlab doctor` table.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable

# KVM modules whose parameters are recorded (kvm_intel, kvm_amd, kvm_pvm also decide the flavor).
KVM_MODULES = ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")

# CPU flags recorded as booleans (from both the `flags` and the `vmx flags` lines of cpuinfo).
CPU_FLAGS = (
    "vmx", "svm", "ept", "npt", "vpid", "ept_ad", "unrestricted_guest", "flexpriority",
    "tpr_shadow", "vnmi", "posted_intr", "pml", "avic", "x2avic", "nrip_save", "tsc_scale",
    "pdpe1gb", "pse", "la57", "pcid", "invpcid", "hypervisor", "constant_tsc", "nonstop_tsc",
    "tsc_known_freq", "tsc_deadline_timer", "rdtscp", "x2apic", "arch_perfmon",
)

# Kernel config options worth recording ("y", "m", "n"; absent options are left out).
KCONFIG_KEYS = (
    "CONFIG_KVM", "CONFIG_KVM_INTEL", "CONFIG_KVM_AMD", "CONFIG_KVM_PVM", "CONFIG_VFIO",
    "CONFIG_VFIO_PCI", "CONFIG_PCI_IOV", "CONFIG_IOMMU_SUPPORT", "CONFIG_INTEL_IOMMU",
    "CONFIG_AMD_IOMMU", "CONFIG_VHOST_NET", "CONFIG_TRANSPARENT_HUGEPAGE", "CONFIG_HUGETLBFS",
    "CONFIG_PERF_EVENTS", "CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT", "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_KPROBES", "CONFIG_UPROBES", "CONFIG_FTRACE",
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

# Dotted-path patterns host_diff ignores: values that change between runs on the same host.
VOLATILE_KEYS = (
    "host_id",
    "mem_available_kb",
    "hugepages.*.free",
)

# What the flavor means for guest CPL0 code before any calibration has been measured.
_CPL0_EMULATED = {"vmx": False, "svm": False, "pvm": True, "none": None}

_KVM_API_VERSION = 12


# ----------------------------------------------------------------------------------------------
# Reading files through root


def rootpath(root: str, path: str) -> str:
    """`path` (absolute, as on a live host) inside the tree at `root`."""
    return os.path.join(root, path.lstrip("/"))


def read_text(root: str, path: str) -> str | None:
    """Stripped contents of `path` under `root`, or None if it is missing or unreadable."""
    try:
        with open(rootpath(root, path), encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def read_int(root: str, path: str) -> int | None:
    """`path` parsed as an integer (decimal or 0x-prefixed hex), or None."""
    return to_int(read_text(root, path))


def exists(root: str, path: str) -> bool:
    """Whether `path` exists under `root`. A dangling symlink counts: it is a recorded link."""
    return os.path.lexists(rootpath(root, path))


def listdir(root: str, path: str) -> list[str]:
    """Sorted entries of a directory under `root`; empty if it is missing or unreadable."""
    try:
        return sorted(os.listdir(rootpath(root, path)))
    except OSError:
        return []


def link_name(root: str, path: str) -> str | None:
    """Last component of the symlink target at `path` (sysfs `driver`, `iommu_group`, ...)."""
    try:
        return os.path.basename(os.readlink(rootpath(root, path)).rstrip("/"))
    except OSError:
        return None


def module_state(root: str, name: str) -> str:
    """"loaded" (a loadable module), "builtin" (compiled into the kernel) or "absent".

    A loaded module has /sys/module/<name>/initstate; a built-in one only shows up there when it
    has parameters, and then without initstate. Only loaded modules can be reloaded with new
    parameters.
    """
    if not exists(root, f"/sys/module/{name}"):
        return "absent"
    return "loaded" if exists(root, f"/sys/module/{name}/initstate") else "builtin"


def kernel_config(root: str = "/", release: str | None = None) -> dict[str, str] | None:
    """The `KCONFIG_KEYS` options of the running kernel, or None when no config is readable.

    Looks at /proc/config.gz (CONFIG_IKCONFIG_PROC), then /boot/config-<release>. Values are
    "y", "m", "n" (for "is not set") or the literal value; options absent from the file are omitted.
    """
    text = None
    try:
        with gzip.open(rootpath(root, "/proc/config.gz"), "rt", encoding="utf-8",
                       errors="replace") as f:
            text = f.read()
    except (OSError, EOFError):
        if release is None:
            release = read_text(root, "/proc/sys/kernel/osrelease")
        if release:
            text = read_text(root, f"/boot/config-{release}")
    if text is None:
        return None
    wanted = set(KCONFIG_KEYS)
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            name = line[2:-len(" is not set")]
            if name in wanted:
                found[name] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            if name in wanted:
                found[name] = value.strip('"')
    return {k: found[k] for k in KCONFIG_KEYS if k in found}


def to_int(text: str | None) -> int | None:
    """`text` as an integer (decimal or 0x-prefixed hex), or None if it is not one."""
    if text is None:
        return None
    try:
        return int(text, 0) if text.lower().startswith("0x") else int(text)
    except ValueError:
        return None


def _cpulist_count(text: str | None) -> int | None:
    """Number of entries in a kernel cpu/node list such as "0-3,8-11"."""
    if not text:
        return None
    count = 0
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            count += (int(hi) - int(lo) + 1) if hi else 1
    except ValueError:
        return None
    return count


def bracketed(text: str | None) -> str | None:
    """The selected word of a sysfs choice file: "always [madvise] never" -> "madvise"."""
    if not text:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.split()[0] if len(text.split()) == 1 else None


def param_true(value: Any) -> bool:
    """Whether a module parameter value means enabled ("Y", "y", "1", 1, True)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    return str(value).strip().lower() in ("y", "1", "yes", "true", "on")


# ----------------------------------------------------------------------------------------------
# Sections of the record


def _cpu(root: str) -> dict[str, Any]:
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
    flags = set(first.get("flags", "").split()) | set(first.get("vmx flags", "").split())
    vendor_id = first.get("vendor_id", "")
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "hygon",
              "CentaurHauls": "centaur"}.get(vendor_id, vendor_id.lower() or "unknown")
    count = _cpulist_count(read_text(root, "/sys/devices/system/cpu/online")) or processors or None
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
    online = _cpulist_count(read_text(root, "/sys/devices/system/node/online"))
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
    from . import _emulation, _sriov  # both read files with this module's helpers

    cpu = _cpu(root)
    release = read_text(root, "/proc/sys/kernel/osrelease")
    kconfig = kernel_config(root, release)
    kvm_rec = _kvm_section(root, kvm)
    paging = _paging(kvm_rec["flavor"], kvm_rec["params"], cpu["flags"])
    mem_total, mem_available = _memory(root)
    sriov = _sriov.detect(root)
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
        "emulation": _emulation.detect(root, cpu["model_name"]),
        "kernel": release,
        "kernel_version": read_text(root, "/proc/sys/kernel/version"),
        "kernel_cmdline": read_text(root, "/proc/cmdline"),
        "kernel_config": kconfig,
        "mitigations": {name: read_text(root, f"/sys/devices/system/cpu/vulnerabilities/{name}")
                        for name in listdir(root, "/sys/devices/system/cpu/vulnerabilities")},
        "kvm": kvm_rec,
        "paging": paging,
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


# ----------------------------------------------------------------------------------------------
# Identity and differences


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


def _flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(record, dict) and record:
        flat: dict[str, Any] = {}
        for key, value in record.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: record}


def host_diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """What changed from host record `a` to `b`: sorted `(dotted.path, old, new)` tuples.

    Nested dicts are flattened to dotted paths (`kvm.params.kvm_intel.ept`); a key missing on one
    side shows as None. Values that vary between runs on one host (`VOLATILE_KEYS`) are ignored,
    so an empty list means "same configuration".
    """
    fa, fb = _flatten(a), _flatten(b)
    changes = []
    for path in sorted(set(fa) | set(fb)):
        if any(fnmatch.fnmatchcase(path, pat) for pat in VOLATILE_KEYS):
            continue
        old, new = fa.get(path), fb.get(path)
        if old != new:
            changes.append((path, old, new))
    return changes


# ----------------------------------------------------------------------------------------------
# Doctor


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


# (capability names accepted, the experiments that need it)
NEEDED_CAPS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("IOEVENTFD",), "exits.pio_kernel, exits.mmio_kernel, io.virtio notify=kernel"),
    (("IRQFD",), "io.virtio interrupts"),
    (("DIRTY_LOG_RING", "DIRTY_LOG_RING_ACQ_REL"), "migration.* mode=ring"),
    (("MANUAL_DIRTY_LOG_PROTECT2",), "migration.* mode=clear"),
    (("X86_USER_SPACE_MSR",), "exits.msr_user"),
    (("BINARY_STATS_FD", "STATS_BINARY_FD"), "per-vCPU exit counters without tracing"),
    (("READONLY_MEM",), "read-only memory slots"),
    (("EXIT_HYPERCALL",), "exits.hypercall"),
    (("SYNC_REGS",), "cheap register access on exits"),
    (("IMMEDIATE_EXIT",), "exits.run_overhead and the watchdog"),
    (("GET_TSC_KHZ",), "converting guest cycles to time"),
)


def cap_value(caps: dict, name: str) -> int | None:
    """A capability's value from `caps`, accepting names with or without the KVM_CAP_ prefix."""
    bare = name[len("KVM_CAP_"):] if name.startswith("KVM_CAP_") else name
    for candidate in (bare, "KVM_CAP_" + bare):
        if candidate in caps:
            return caps[candidate]
    return None


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


def doctor_checks(host: dict, extra: Iterable[Check] = ()) -> list[Check]:
    """The `vlab doctor` checks for a host record, followed by `extra` (e.g. tracing checks).

    Every check states what it found; failed ones say what it costs and how to fix it.
    """
    kvm = host.get("kvm") or {}
    flavor = kvm.get("flavor", "none")
    checks: list[Check] = []

    flags = (host.get("cpu") or {}).get("flags") or {}
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

    from ._emulation import warning as emulation_warning
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
