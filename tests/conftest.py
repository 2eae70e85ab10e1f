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
    """Whether KVM counts a CPL3 cpuid as a VM exit on this host.

    VMX and SVM always intercept CPUID, so KVM counts one exit each. Some builds of the PVM
    backend answer CPUID in their world switcher instead: the instruction still traps (it costs
    thousands of guest cycles) but never reaches KVM's exit handler, so KVM's statistics and the
    kvm_cpuid tracepoint see nothing. Tests that count cpuid exits ask this probe which of the two
    hosts they are on; any count other than exactly N or (on PVM) zero fails here.
    """
    from vlab import Machine
    from vlab.vmm.payloads import MICRO_OPS
    from vlab.vmm.stats import diff, guest_exits

    n = 1000
    with Machine(kvm=kvm) as m:
        v = m.vcpus[0]
        k0 = v.stats()
        m.set_args(MICRO_OPS["cpuid"], n, 1, 0, 0)
        m.run_to_done(timeout=60)
        got = guest_exits(diff(v.stats(), k0))
    if n <= got <= n + 3:
        return True
    flavor = m_flavor()
    assert got <= 3 and flavor == "pvm", (
        f"{n} cpuid instructions gave {got} KVM exits on a {flavor} host: neither one exit each "
        "nor a PVM switcher that answers CPUID without KVM")
    return False


def m_flavor() -> str:
    """The KVM flavor of this host (vmx, svm, pvm), from the host record."""
    from vlab.host.fingerprint import fingerprint

    return fingerprint()["kvm"]["flavor"]
