"""Shared fixtures. KVM tests run for real: they skip only when /dev/kvm cannot be opened."""
from __future__ import annotations

import os

import pytest


def _kvm_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no KVM on this host)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


KVM_REASON = _kvm_reason()
needs_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=KVM_REASON or "")


@pytest.fixture(scope="session")
def kvm():
    if KVM_REASON:
        pytest.skip(KVM_REASON)
    from vlab import Kvm

    k = Kvm()
    yield k
    k.close()


@pytest.fixture(scope="session")
def cpuid_exits_counted(kvm) -> bool:
    """Whether KVM sees a CPL3 cpuid as a VM exit on this host, by the exit table's expectation
    for the host (experiments/_expect.py, docs/exits.md): VMX and SVM always intercept CPUID;
    a PVM host traps a guest's CPL3 cpuid only when the CPU has CPUID faulting (the
    `cpuid_fault` flag). Without it the guest runs cpuid itself (the outer hypervisor still
    makes it cost thousands of cycles), and KVM's statistics and the kvm_cpuid tracepoint see
    nothing. Tests that count cpuid exits hold the count to this expectation."""
    from vlab.experiments import _expect
    from vlab.host import fingerprint

    return _expect.expectation("exits.cpuid", {"cpl": 3}, fingerprint("/")).exits == 1
