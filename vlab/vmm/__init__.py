"""The binding to the C VMM: /dev/kvm, VMs, vCPUs, guest memory, devices, KVM statistics, the
guest payload images and the one vCPU thread. The only package that imports the cffi extension
`vlab.vmm._native`; everything above it (dirty tracking, migration, experiments, the runner)
uses these classes.

One module per object: `kvm` (Kvm, capabilities), `vm` (Vm), `vcpu` (Vcpu, Stop, the stop ->
exception mapping), `memory` (MemorySlot, BACKINGS, PAGE_SIZES), `devices` (Sink, EventFd,
virtqueues, doorbells, rings, VFIO), `thread` (VcpuThread), `machine` (Machine: a ready guest),
`payloads` (guest images, the parameter ABI), `stats` (KVM binary statistics), `hostkernels`
(native measurement kernels that run on the host, outside any VM). The names below are
re-exported lazily, so `import vlab.vmm.stats` does not load the native extension.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "kvm": ("Kvm", "cap_number", "known_caps", "default_path"),
    "vm": ("Vm",),
    "vcpu": ("Vcpu", "Stop", "STOP_NAMES", "stop_error", "unexpected_stop"),
    "memory": ("MemorySlot", "BACKINGS", "PAGE_SIZES"),
    "devices": ("Sink", "EventFd", "Virtqueue", "VirtqueueError", "QueueLayout", "Vfio"),
    "thread": ("VcpuThread",),
    "machine": ("Machine", "pt_pool_for", "DEFAULT_PT_POOL"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'vlab.vmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vlab.vmm.{mod}"), name)
    globals()[name] = value
    return value
