"""/dev/kvm itself: the `Kvm` handle (API version, capabilities, supported CPUID, VM factory).

Every native call that fails raises `KvmError` naming the ioctl and errno (`_check` and
`_raise_last`, defined in `vlab.vmm._checks` and importable from here, turn the C side's last
error into it). Guest-side trouble raises `GuestFault`, `GuestFailure` or `GuestTimeout` (see
`vlab.vmm.vcpu`). Everything is released deterministically by `close()` or a `with` block; a
finalizer is only the safety net.
"""
from __future__ import annotations

import os
import weakref

from vlab._errors import MissingCapability
from vlab.vmm._checks import _check, _raise_last, cap_number
from vlab.vmm._native import ffi, lib
from vlab.vmm.vm import Vm

__all__ = ["Kvm", "default_path", "cap_number", "known_caps", "_check", "_raise_last"]


def default_path() -> str:
    """/dev/kvm, or $VLAB_DEV_KVM (lets tests and odd hosts point vlab elsewhere)."""
    return os.environ.get("VLAB_DEV_KVM") or "/dev/kvm"


def known_caps() -> list[str]:
    """The capability names vlab knows how to query."""
    out, i = [], 0
    while (p := lib.vlab_kvm_cap_name(i)) != ffi.NULL:
        out.append(ffi.string(p).decode())
        i += 1
    return out


class Kvm:
    """An open /dev/kvm: API version, capabilities, supported CPUID, VM factory."""

    def __init__(self, path: str | None = None):
        path = path or default_path()
        out = ffi.new("struct vlab_kvm **")
        _check(lib.vlab_kvm_open(path.encode(), out))
        self._h = out[0]
        self.path = path
        self._fin = weakref.finalize(self, lib.vlab_kvm_close, self._h)

    @property
    def api_version(self) -> int:
        return lib.vlab_kvm_api_version(self._h)

    def check_cap(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm; 0 means absent."""
        nr = cap_number(cap) if isinstance(cap, str) else cap
        if nr < 0:
            return 0
        return _check(lib.vlab_kvm_check_cap(self._h, nr))

    def caps(self) -> dict[str, int]:
        """Every capability vlab knows, with KVM's answer."""
        return {name: self.check_cap(name) for name in known_caps()}

    def require(self, cap: str, what: str = "") -> int:
        """The capability's value, or MissingCapability naming it."""
        v = self.check_cap(cap)
        if not v:
            raise MissingCapability("KVM_CAP_" + cap.removeprefix("KVM_CAP_"), what)
        return v

    def supported_cpuid(self, leaf: int, index: int = 0) -> tuple[int, int, int, int] | None:
        regs = ffi.new("uint32_t[4]")
        if not _check(lib.vlab_kvm_supported_cpuid(self._h, leaf, index, regs)):
            return None
        return tuple(regs)  # type: ignore[return-value]

    def feature_msr(self, index: int) -> int | None:
        """A feature MSR's value as KVM offers it to guests (KVM_GET_MSRS on /dev/kvm, e.g.
        IA32_ARCH_CAPABILITIES), or None when KVM does not offer that MSR."""
        import fcntl
        import struct

        buf = bytearray(struct.pack("IIIIQ", 1, 0, index, 0, 0))   # struct kvm_msrs, 1 entry
        try:
            if fcntl.ioctl(lib.vlab_kvm_fd(self._h), 0xC008AE88, buf) != 1:   # KVM_GET_MSRS
                return None
        except OSError:
            return None
        return struct.unpack("IIIIQ", bytes(buf))[4]

    def has_1g_pages(self) -> bool:
        """pdpe1gb offered to guests (CPUID 0x80000001 EDX bit 26)."""
        r = self.supported_cpuid(0x80000001)
        return bool(r and r[3] & (1 << 26))

    def create_vm(self) -> "Vm":
        return Vm(self)

    def close(self) -> None:
        self._fin()

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
