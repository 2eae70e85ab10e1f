"""vlab: a virtualization performance lab for x86 Linux/KVM hosts.

The public surface is small: the VMM objects (`Kvm`, `Vm`, `Vcpu`, `MemorySlot`, `Machine`,
`VcpuThread`), the errors, and the submodules `vlab.results`, `vlab.analysis`, `vlab.trace`,
`vlab.dirty`.
The native binding is imported lazily so that reading results works without /dev/kvm.
"""
from __future__ import annotations

from vlab._errors import (GuestFailure, GuestFault, GuestTimeout, KvmError, MissingCapability,
                      UsageError, VlabError)

__version__ = "0.1.0"

_LAZY = {
    "Kvm": "vlab.vmm.kvm", "Vm": "vlab.vmm.vm", "Vcpu": "vlab.vmm.vcpu",
    "MemorySlot": "vlab.vmm.memory", "Machine": "vlab.vmm.machine",
    "VcpuThread": "vlab.vmm.thread", "Payload": "vlab.vmm.payloads",
    "load_payload": "vlab.vmm.payloads",
}

__all__ = ["GuestFailure", "GuestFault", "GuestTimeout", "KvmError", "MissingCapability",
           "UsageError", "VlabError", "__version__", *_LAZY]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'vlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
