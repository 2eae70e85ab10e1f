"""The exit-cost suite under real KVM: exit counts, ground truth, orderings, and agreement with
an independent bare C measurement (native/bench/exitbench.c)."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import needs_kvm

pytestmark = needs_kvm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXITING_CPL3 = ["exits.cpuid", "exits.pio_user", "exits.pio_kernel", "exits.mmio_user",
                "exits.mmio_kernel"]
USER_EXITS_CPL0 = ["exits.hlt", "exits.msr_user"]


@pytest.fixture(scope="module")
def exits_run():
    """One quick-grid run of every exit experiment, through the real runner and pyperf."""
    from vlab.run.runner import RunOptions, execute

    doc, code = execute(RunOptions(selectors=["exits.*"], overrides={"vcpus": [1], "leaf": [0]},
                                   pyperf={"processes": 2, "values": 2}))
    rows = {}
    for r in doc["rows"]:
        rows.setdefault(r["experiment"], []).append(r)
    return doc, code, rows


def _row(rows, exp: str, metric: str, **params) -> dict:
    for r in rows[exp]:
        if r["metric"] == metric and all(r["params"].get(k) == v for k, v in params.items()):
            return r
    raise KeyError((exp, metric, params))


def test_no_case_failed(exits_run):
    doc, code, rows = exits_run
    errors = [(r["experiment"], r["reason"]) for r in doc["rows"] if r["status"] == "error"]
    assert not errors and code == 0


@pytest.mark.parametrize("exp", EXITING_CPL3)
def test_one_exit_per_operation_at_cpl3(exits_run, exp):
    """Port and MMIO accesses exit once on every flavor; cpuid does too, except on a PVM host
    without CPUID faulting, where the guest runs it itself (experiments/_expect.py)."""
    _, _, rows = exits_run
    for r in rows[exp]:
        if r["metric"] == "exits_per_op" and r["status"] == "ok":
            want = r["extra"]["expected_exits_per_op"]
            assert want == 1 or (exp == "exits.cpuid" and want == 0), (exp, want)
            assert abs(r["mean"] - want) <= 0.01, (exp, r["params"], r["mean"])


@pytest.mark.parametrize("exp", USER_EXITS_CPL0)
def test_one_user_space_exit_per_operation_at_cpl0(exits_run, exp):
    _, _, rows = exits_run
    r = _row(rows, exp, "exits_per_op")
    # KVM's count within the row's expectation (its tolerance is wider for CPL0 code that PVM
    # emulates: the emulator's own returns add a few exits per thousand); the VMM's own count of
    # user-space exits is exact to 1%
    assert r["extra"]["expectation"]["exits"] == 1
    assert abs(r["mean"] - 1.0) <= r["extra"]["expectation"]["tol"]
    assert abs(r["extra"]["vmm_exits_per_op"] - 1.0) <= 0.01


def test_nop_causes_no_exit(exits_run):
    """The nop loop expects no exit; on PVM a CPL0 nop runs in KVM's emulator, whose own returns
    to the run loop show as a few counted exits per thousand (the expectation's tolerance)."""
    _, _, rows = exits_run
    for r in rows["exits.nop"]:
        if r["metric"] == "exits_per_op":
            e = r["extra"]["expectation"]
            assert e["exits"] == 0 and r["mean"] <= e["tol"], (r["params"], r["mean"], e["tol"])


def test_every_unexpected_exit_count_is_explained(exits_run):
    """Every exits_per_op row records the expectation it was checked against; a count outside
    it carries the warning that names both numbers and the setting, and a count inside it
    carries no such warning."""
    from vlab.experiments import _expect

    _, _, rows = exits_run
    checked = 0
    for exp, rs in rows.items():
        for r in rs:
            if r["metric"] != "exits_per_op" or r["status"] != "ok":
                continue
            e = _expect.Expectation(**r["extra"]["expectation"])
            assert r["extra"]["expected_exits_per_op"] == e.exits
            want = _expect.check(e, r["mean"])
            mine = [w for w in r.get("warnings", []) if w.startswith("exits_per_op is")]
            if want is None:
                assert mine == [], (exp, r["params"], mine)
            else:
                assert mine == [want], (exp, r["params"], mine)
                assert f"{r['mean']:.2f}" in want and f"{e.exits:.2f}" in want
                assert e.setting in want
            checked += 1
    assert checked >= 28


def test_live_exit_counts_match_their_expectation(exits_run):
    """On this host every measured exit count fits the table in experiments/_expect.py."""
    _, _, rows = exits_run
    off = [(exp, r["params"], r["mean"], r["extra"]["expectation"]["exits"])
           for exp, rs in rows.items() for r in rs
           if r["metric"] == "exits_per_op" and r["status"] == "ok"
           and any(w.startswith("exits_per_op is") for w in r.get("warnings", []))]
    assert off == []


def test_every_msr_row_records_its_msr(exits_run):
    _, _, rows = exits_run
    for exp in ("exits.msr_kernel", "exits.msr_passthrough", "exits.msr_user",
                "exits.tsc_adjust", "exits.kernel_gs_base", "exits.spec_ctrl", "exits.pred_cmd",
                "exits.tsx_ctrl"):
        for r in rows[exp]:
            if r["status"] == "ok":
                assert r["extra"]["msr"] and r["extra"]["msr_index"].startswith("0x"), exp
            else:
                assert r["status"] == "skip" and r["reason"], (exp, r)
    r = _row(rows, "exits.msr_kernel", "exits_per_op", direction="read")
    assert r["extra"]["msr"] == "IA32_MISC_ENABLE"


def test_single_operation_distribution_describes_single_operations(exits_run):
    """guest_cycles_single has one operation per sample: for an exiting operation its median
    is close to the batched per-operation figure, and p99 >= p50."""
    _, _, rows = exits_run
    for exp in ("exits.cpuid", "exits.pio_user"):
        single = _row(rows, exp, "guest_cycles_single")
        batched = _row(rows, exp, "guest_cycles")
        assert single["n"] >= 32 and single["p99"] >= single["median"]
        assert 0.5 < single["median"] / batched["median"] < 2.0, (exp, single["median"],
                                                                  batched["median"])
        assert batched["extra"]["guest_cycles_batch"] == batched["extra"]["iters"]


def test_the_two_views_are_compared_on_every_row(exits_run):
    _, _, rows = exits_run
    for exp, rs in rows.items():
        for r in rs:
            if r["metric"] == "guest_cycles" and r["status"] == "ok":
                v = r["extra"]["views"]
                # both are numbers; for a sub-nanosecond operation (a CPL3 nop) the host's
                # mark-to-mark view is jitter and may even come out negative
                assert np.isfinite(v["guest_cycles"]) and np.isfinite(v["host_cycles"])
                assert v["agree"] == (abs(v["host_cycles"] - v["guest_cycles"])
                                      <= v["tolerance_cycles"])
                if not v["agree"]:
                    assert any("views disagree" in w for w in r["warnings"]), (exp, r["params"])
    # an exit that costs tens of microseconds is seen alike from both sides
    v = _row(rows, "exits.pio_user", "guest_cycles", direction="out")["extra"]["views"]
    assert v["agree"], v


def test_x_syscall_is_a_derived_row(exits_run):
    _, _, rows = exits_run
    for mech in ("syscall", "int3"):
        x = _row(rows, "exits.syscall", "x_syscall", mechanism=mech)
        g = _row(rows, "exits.syscall", "guest_cycles", mechanism=mech)
        assert x["flags"]["derived"] and x["unit"] == "x"
        assert x["median"] == pytest.approx(g["median"] / g["extra"]["host_syscall_cycles"],
                                            rel=1e-5)   # stored to 6 significant digits
        assert x["median"] > 0


@pytest.mark.parametrize("exp", ["exits.pio_user", "exits.pio_kernel", "exits.mmio_user",
                                 "exits.mmio_kernel"])
def test_ground_truth_counts_equal_the_loop_count(exits_run, exp):
    """Sink hits (user-space exits) and eventfd counts (ioeventfd) are exactly one per op."""
    _, _, rows = exits_run
    r = _row(rows, exp, "exits_per_op")
    assert r["extra"]["truth_per_op"] == 1.0


def test_user_space_exits_cost_more_than_ioeventfd(exits_run):
    _, _, rows = exits_run
    user = _row(rows, "exits.pio_user", "guest_cycles", direction="out")["median"]
    kernel = _row(rows, "exits.pio_kernel", "guest_cycles")["median"]
    assert user > kernel
    user = _row(rows, "exits.mmio_user", "guest_cycles", direction="write")["median"]
    kernel = _row(rows, "exits.mmio_kernel", "guest_cycles")["median"]
    assert user > kernel


def test_cpl0_rows_carry_the_calibration(exits_run):
    doc, _, rows = exits_run
    emulated = doc["host"]["emulated_cpl0"]
    for exp, rs in rows.items():
        for r in rs:
            if r["status"] == "ok" and r["params"].get("cpl") == 0:
                assert bool((r.get("flags") or {}).get("emulated_cpl0")) == emulated
                if "nop_cycles_per_iter" in r["extra"]:
                    assert r["extra"]["nop_cycles_per_iter"] > 0


def test_loop_count_is_calibrated_and_stated(exits_run):
    _, _, rows = exits_run
    r = _row(rows, "exits.cpuid", "guest_cycles")
    assert r["extra"]["iters"] >= 1 and r["extra"]["loops"] >= 1
    assert r["extra"]["pyperf_loops"] >= 1


def test_hypercall_cases_that_cannot_run_are_skips_with_reasons(exits_run):
    doc, _, rows = exits_run
    vendor = doc["host"]["cpu_vendor"]
    other = "vmmcall" if vendor != "amd" else "vmcall"
    r = _row(rows, "exits.hypercall", "guest_cycles", insn=other)
    assert r["status"] == "skip" and other in r["reason"]


@pytest.fixture(scope="module")
def exitbench(tmp_path_factory):
    from vlab.vmm.payloads import load_payload

    d = tmp_path_factory.mktemp("exitbench")
    image = d / "micro.bin"
    image.write_bytes(load_payload("micro").image)
    exe = d / "exitbench"
    src = os.path.join(ROOT, "native")
    vmm = sorted(os.path.join(src, "vmm", f) for f in os.listdir(os.path.join(src, "vmm"))
                 if f.endswith(".c"))
    proc = subprocess.run(["gcc", "-O2", "-std=gnu11", f"-I{src}/include", f"-I{src}/vmm",
                           f"{src}/bench/exitbench.c", *vmm, "-lrt", "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    def run(op: str, iters: int = 8, samples: int = 1500) -> dict:
        p = subprocess.run([str(exe), str(image), op, str(iters), str(samples)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    return run


def test_exitbench_counts_its_exits(exitbench):
    r = exitbench("out", 4, 100)
    assert r["sink_hits"] == 400


@pytest.mark.parametrize("exp,op", [("exits.cpuid", "cpuid"), ("exits.pio_user", "out")])
def test_vlab_agrees_with_the_bare_c_measurement(exitbench, exp, op):
    """`vlab run` (Python, pyperf workers) within 10% of exitbench (C only), same session.

    Both are medians of many samples. The exit's cost drifts here by 20% within a minute (one CI
    run: exitbench 93,030 then vlab 77,518 cycles, a second later), so one pair says little:
    seven rounds, each a pair taken back to back in alternating order, and the median of the
    seven vlab/bare ratios must be within 10% of 1. A harness that adds or loses cycles per
    operation moves every ratio, so the median still sees it.
    """
    from vlab import host as _host
    from vlab.experiments import _expect
    from vlab.run.runner import RunOptions, execute

    if op == "cpuid" and not _expect.expectation(exp, {"cpl": 3}, _host.fingerprint("/")).exits:
        pytest.skip("cpuid is not a KVM exit on this host (PVM without CPUID faulting): it times "
                    "the outer hypervisor, whose cost moved by 30% between processes here")
    over = {"vcpus": [1], **({"leaf": [0]} if op == "cpuid" else {"direction": ["out"]})}

    def ours() -> float:
        doc, _ = execute(RunOptions(selectors=[exp], overrides=over,
                                    pyperf={"processes": 2, "values": 2}))
        return [r for r in doc["rows"] if r["metric"] == "guest_cycles"][0]["median"]

    pairs = []
    for k in range(7):
        if k % 2:
            a = ours()
            b = exitbench(op)["guest_cycles"]
        else:
            b = exitbench(op)["guest_cycles"]
            a = ours()
        pairs.append((a, b))
    ratio = float(np.median([a / b for a, b in pairs]))
    assert abs(ratio - 1) <= 0.10, (exp, ratio, pairs)


def test_a_guest_fault_on_an_msr_is_reported_not_a_crash():
    """IA32_PRED_CMD is write-only: reading it takes a #GP in the guest on every flavor. The
    VMM reports the fault (vector, CPL) and the host side carries on."""
    from vlab._errors import GuestFault
    from vlab.vmm.payloads import MICRO_OPS
    from vlab.vmm.machine import Machine

    with Machine(cpl=0) as m:
        m.restart()
        m.set_args(MICRO_OPS["rdmsr_value"], 0, 0, 0x49)
        with pytest.raises(GuestFault) as e:
            m.run_to_done(timeout=10)
        assert e.value.vector == 13 and e.value.cpl == 0
        # the same machine still runs guest code afterwards
        m.restart()
        m.set_args(MICRO_OPS["nop"], 10, 2, 0, 0, 0, 0)
        m.run_to_done(timeout=10)
        assert len(m.results(0)) == 2
