"""The exceptions vlab raises. Every one carries enough to act on without a traceback."""
from __future__ import annotations


class VlabError(Exception):
    """Base class of every error vlab raises on purpose."""


class UsageError(VlabError):
    """Bad input from the user: unknown experiment, impossible parameter, bad file. CLI exit 2."""


class KvmError(VlabError):
    """A KVM ioctl (or a syscall the VMM made) failed.

    `op` names the ioctl, `errno` is the OS error, and `vm_dead` says whether the VM can still
    be used (KVM marks a VM dead after some failures; we also treat a failed KVM_RUN as fatal).
    """

    def __init__(self, op: str, errno: int, message: str = "", vm_dead: bool = False):
        import os

        self.op = op
        self.errno = errno
        self.vm_dead = vm_dead
        text = f"{op} failed: {os.strerror(errno) if errno else 'error'} (errno {errno})"
        if message:
            text += f": {message}"
        if vm_dead:
            text += " [VM is dead]"
        super().__init__(text)


class MissingCapability(KvmError):
    """A KVM capability an operation needs is not offered by this host."""

    def __init__(self, cap: str, what: str = ""):
        self.cap = cap
        VlabError.__init__(self, f"KVM capability {cap} is not available on this host"
                           + (f" (needed for {what})" if what else ""))
        self.op = "KVM_CHECK_EXTENSION"
        self.errno = 0
        self.vm_dead = False


class GuestFault(VlabError):
    """The guest took an exception it could not handle, or shut down (triple fault)."""

    def __init__(self, vector: int, error_code: int, rip: int, cpl: int, message: str = ""):
        self.vector = vector
        self.error_code = error_code
        self.rip = rip
        self.cpl = cpl
        name = _VECTOR_NAMES.get(vector, f"vector {vector}")
        text = f"guest fault {name} (vector {vector}) error_code={error_code:#x} rip={rip:#x} cpl={cpl}"
        if message:
            text += f": {message}"
        super().__init__(text)


class GuestTimeout(VlabError):
    """The watchdog stopped a KVM_RUN that did not return in time (runaway or livelocked guest)."""

    def __init__(self, seconds: float, rip: int | None = None, detail: str = ""):
        self.seconds = seconds
        self.rip = rip
        text = f"guest did not finish within {seconds:g} s (watchdog)"
        if rip is not None:
            text += f", last rip={rip:#x}"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class GuestFailure(VlabError):
    """The guest reported failure through its ucall channel (GUEST_ASSERT-style)."""

    def __init__(self, code: int, message: str):
        self.code = code
        self.guest_message = message
        super().__init__(f"guest failed (code {code}): {message}")


# Vector 0xFF is what vlab reports for a triple fault / KVM_EXIT_SHUTDOWN.
_VECTOR_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP", 255: "triple fault (shutdown)",
}
