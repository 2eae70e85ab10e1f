"""Real-KVM checks whose expectations depend on the KVM flavor and paging mode.

Marked `svm_lane`: `make test-svm` runs exactly these inside its TCG-emulated SVM host (with NPT),
and `make test` runs them on whatever host it is on (VMX, SVM or PVM), so each flavor checks its
own expectations: which hypercall instruction exists, which MSR KVM passes through, whether a
cr3 write or an invlpg exits under two-dimensional paging. Small on purpose (one process, one
value per case): under TCG every case costs tens of seconds.
"""
from __future__ import annotations

import pytest

from conftest import needs_kvm

pytestmark = [needs_kvm, pytest.mark.svm_lane]

# CPL0 only: every operation below is a CPL0 one (the hypercall too; on PVM it is a skip).
OVERRIDES = {"direction": ["read"], "cpl": [0]}
SELECTORS = ["exits.hypercall", "exits.msr_kernel", "exits.msr_passthrough", "exits.cr3_write",
             "exits.invlpg"]


@pytest.fixture(scope="module")
def flavor_run():
    from vlab.run.runner import RunOptions, execute

    doc, code = execute(RunOptions(selectors=SELECTORS, overrides=OVERRIDES,
                                   pyperf={"processes": 1, "values": 1, "warmups": 0,
                                           "loops": 16}))
    return doc, code


def _rows(doc: dict, exp: str, metric: str) -> list[dict]:
    return [r for r in doc["rows"] if r["experiment"] == exp and r["metric"] == metric]


def test_host_record_names_the_loaded_vendor_module_and_its_paging(flavor_run):
    doc, _ = flavor_run
    host = doc["host"]
    flavor, paging = host["kvm"]["flavor"], host["paging"]
    params = host["kvm"]["params"]
    if flavor == "svm":
        assert paging == ("npt" if params["kvm_amd"]["npt"] in ("Y", "1") else "shadow")
        assert host["cpu_vendor"] in ("amd", "hygon")
    elif flavor == "vmx":
        assert paging == ("ept" if params["kvm_intel"]["ept"] in ("Y", "1") else "shadow")
    else:
        assert flavor == "pvm" and paging == "shadow"


def test_no_case_failed(flavor_run):
    doc, code = flavor_run
    errors = [(r["experiment"], r["params"], r["reason"]) for r in doc["rows"]
              if r["status"] == "error"]
    assert not errors and code == 0


def _fits_its_expectation(row: dict) -> None:
    """The row's measured exits/op against the expectation it recorded (experiments/_expect.py),
    within that expectation's tolerance."""
    want = row["extra"]["expectation"]
    assert abs(row["mean"] - want["exits"]) <= want["tol"], (row["experiment"], row["mean"], want)


@pytest.mark.parametrize("exp", ["exits.cr3_write", "exits.invlpg"])
def test_paging_decides_whether_cr3_writes_and_invlpg_exit(flavor_run, exp):
    doc, _ = flavor_run
    host = doc["host"]
    (row,) = _rows(doc, exp, "exits_per_op")
    assert row["status"] == "ok", row.get("reason")
    if host["kvm"]["flavor"] in ("vmx", "svm"):
        # hardware virtualization: intercepted only when KVM shadows the guest's page tables
        tdp = host["paging"] in ("ept", "npt")
        assert row["extra"]["expected_exits_per_op"] == (0 if tdp else 1)
    _fits_its_expectation(row)


def test_sysenter_cs_is_passed_through_on_hardware_virtualization(flavor_run):
    doc, _ = flavor_run
    flavor = doc["host"]["kvm"]["flavor"]
    (through,) = _rows(doc, "exits.msr_passthrough", "exits_per_op")
    (kernel,) = _rows(doc, "exits.msr_kernel", "exits_per_op")
    assert through["status"] == kernel["status"] == "ok"
    assert through["extra"]["msr"] == "IA32_SYSENTER_CS"
    if flavor in ("vmx", "svm"):
        # the MSR bitmap passes SYSENTER_CS through; IA32_MISC_ENABLE is intercepted
        assert through["extra"]["expected_exits_per_op"] == 0 and through["mean"] <= 0.01
        assert kernel["extra"]["expected_exits_per_op"] == 1
    _fits_its_expectation(through)
    _fits_its_expectation(kernel)


def test_hypercall_instruction_follows_the_vendor(flavor_run):
    doc, _ = flavor_run
    vendor = doc["host"]["cpu_vendor"]
    own, other = ("vmmcall", "vmcall") if vendor == "amd" else ("vmcall", "vmmcall")
    for r in _rows(doc, "exits.hypercall", "exits_per_op"):
        if r["params"]["insn"] == other:
            assert r["status"] == "skip" and other in r["reason"]
        elif r["status"] == "ok" and doc["host"]["kvm"]["flavor"] in ("vmx", "svm"):
            assert r["params"]["insn"] == own and abs(r["mean"] - 1) <= 0.01, r["params"]
    ran = [r for r in _rows(doc, "exits.hypercall", "exits_per_op") if r["status"] == "ok"]
    assert all(r["params"]["insn"] == own for r in ran)
    if doc["host"]["kvm"]["flavor"] in ("vmx", "svm"):
        assert ran, "the vendor's own hypercall instruction did not run at CPL0"


def test_host_ns_is_never_negative_and_unresolved_samples_are_said(flavor_run):
    doc, _ = flavor_run
    rows = [r for r in doc["rows"] if r["metric"] == "host_ns" and r["status"] == "ok"]
    assert rows
    for r in rows:
        assert min(r["samples"]) >= 0, (r["experiment"], r["params"])
        if r["extra"].get("host_ns_below_resolution"):
            assert any("less than an empty sample" in w for w in r.get("warnings") or [])
