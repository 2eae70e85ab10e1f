"""The binding's lowest layer: the C side's last error raised as `KvmError`, and capability
numbers. Every wrapper module of `vlab.vmm` uses these; they import nothing else of vlab.vmm,
so the wrappers (kvm, vm, vcpu, memory, devices) never import each other in a circle.
"""
from __future__ import annotations

from vlab._errors import KvmError
from vlab.vmm._native import ffi, lib


def _raise_last(default_op: str = "vlab") -> None:
    """Raise the C side's last error as KvmError (op, errno, message, whether the VM is dead)."""
    e = lib.vlab_last_error()
    op = ffi.string(e.op).decode() or default_op
    msg = ffi.string(e.msg).decode(errors="replace")
    raise KvmError(op, e.err, msg, vm_dead=bool(e.vm_dead))


def _check(ret: int) -> int:
    """`ret` of a native call, or its last error raised when it is negative."""
    if ret < 0:
        _raise_last()
    return ret


def cap_number(name: str) -> int:
    """KVM_CAP_<name> number from the headers vlab was built with (-1 if unknown)."""
    return lib.vlab_kvm_cap_number(name.removeprefix("KVM_CAP_").encode())
