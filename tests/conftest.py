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
