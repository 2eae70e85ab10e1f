"""What an exits.* row is checked against, per flavor and paging mode, and the host_ns floor
warning; pure functions, no KVM needed (tests/test_flavor.py checks them on real KVM)."""
from __future__ import annotations

import pytest

from vlab.experiments.exits import annotate_exits, expect_sysenter_cs, expect_trap_without_tdp


@pytest.mark.parametrize("flavor, paging, traps", [
    ("svm", "npt", 0), ("svm", "shadow", 1), ("vmx", "ept", 0), ("vmx", "shadow", 1),
    ("pvm", "shadow", 1),
])
def test_cr3_write_and_invlpg_exit_only_under_shadow_paging(flavor, paging, traps):
    host = {"kvm": {"flavor": flavor}, "paging": paging}
    assert expect_trap_without_tdp({"cpl": 0}, host) == traps


@pytest.mark.parametrize("flavor, exits", [("svm", 0), ("vmx", 0), ("pvm", 1), ("none", 1)])
def test_sysenter_cs_passes_through_on_vmx_and_svm(flavor, exits):
    assert expect_sysenter_cs({"cpl": 0}, {"kvm": {"flavor": flavor}}) == exits


def test_unexpected_exit_count_under_npt_is_flagged_with_the_paging_expectation():
    host = {"kvm": {"flavor": "svm"}, "paging": "npt", "emulated_cpl0": False}
    extras = [{"expected_exits_per_op": 0}]
    warnings, _, _ = annotate_exits({"cpl": 0}, host, "exits_per_op", [1.0], extras)
    assert warnings == ["exits_per_op is 1.00, expected 0"]
    warnings, _, _ = annotate_exits({"cpl": 0}, host, "exits_per_op", [0.0], extras)
    assert warnings == []


def test_host_ns_samples_below_the_empty_sample_are_said():
    host = {"kvm": {"flavor": "svm"}, "paging": "npt"}
    extras = [{"host_ns_below_resolution": 3, "host_ns_samples": 8},
              {"host_ns_below_resolution": 1, "host_ns_samples": 8}]
    warnings, _, _ = annotate_exits({"cpl": 0}, host, "host_ns", [0.0] * 16, extras)
    assert len(warnings) == 1 and warnings[0].startswith("host_ns: 4 of 16 samples took less")
    clean = [{"host_ns_below_resolution": 0, "host_ns_samples": 8}]
    assert annotate_exits({"cpl": 0}, host, "host_ns", [5.0] * 8, clean)[0] == []


@pytest.mark.parametrize("args, message", [
    (["exits.mmio_user", "-p", "direction=out"], "direction must be one of write, read"),
    (["exits.hypercall", "-p", "insn=syscall"], "insn must be one of vmcall, vmmcall"),
])
def test_a_word_outside_the_declared_axis_is_one_line_and_exit_2(args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vlab", "run", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"vlab: {message}, not "
                                                f"{args[-1].split('=')[1]!r}"]
