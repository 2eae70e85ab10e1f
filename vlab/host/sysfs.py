"""Reading a host's files through a root: procfs, sysfs, device nodes and the kernel config.

Every reader takes `root` and reads `root + path`, so the same code describes the live host
(`root="/"`) and the recorded trees under tests/data/hosts; none raises for a missing or
unreadable file (it answers None, False or an empty list), because what cannot be read is
recorded as unknown, not an error. Used by the fingerprint, SR-IOV detection and `vlab host set`.
"""
from __future__ import annotations

import gzip
import os
from typing import Any

# Kernel config options worth recording ("y", "m", "n"; absent options are left out).
KCONFIG_KEYS = (
    "CONFIG_KVM", "CONFIG_KVM_INTEL", "CONFIG_KVM_AMD", "CONFIG_KVM_PVM", "CONFIG_VFIO",
    "CONFIG_VFIO_PCI", "CONFIG_PCI_IOV", "CONFIG_IOMMU_SUPPORT", "CONFIG_INTEL_IOMMU",
    "CONFIG_AMD_IOMMU", "CONFIG_VHOST_NET", "CONFIG_TRANSPARENT_HUGEPAGE", "CONFIG_HUGETLBFS",
    "CONFIG_PERF_EVENTS", "CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT", "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_KPROBES", "CONFIG_UPROBES", "CONFIG_FTRACE",
)


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


def cpulist_count(text: str | None) -> int | None:
    """Number of entries in a kernel cpu/node list such as "0-3,8-11" (None if unparsable)."""
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

