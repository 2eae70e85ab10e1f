"""Pinning (`vlab run --pin`, a suite's `pin`): the spec parser, affinity really applied to
vCPU threads, device backend threads and host peer threads (read back from the kernel), the
placement every row records, bad specs (exit 2, one line), and the io starvation check."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import needs_kvm

TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                              reason="needs two CPUs to pin threads apart")


def _allowed_list(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


@pytest.fixture
def placed():
    """Set a placement for the test and always take it (and the CPUs) back."""
    from vlab.vmm import thread

    own = os.sched_getaffinity(0)

    def place(p):
        thread.set_placement(p)
        return p
    yield place
    thread.set_placement(None)
    os.sched_setaffinity(0, own)


# ---- the spec ----

def test_auto_on_two_cpus_puts_the_first_vcpu_and_the_backend_apart():
    from vlab.run.pinning import parse_pin

    p = parse_pin("auto", allowed=[0, 1])
    assert (p.worker, p.vcpu, p.backend) == ((0, 1), (0, 1), (1,))
    assert p.cpus("vcpu", 0) == {0} and p.cpus("vcpu", 1) == {1} and p.cpus("vcpu", 2) == {0}
    assert p.cpus("backend") == {1} and p.cpus("worker") == {0, 1}
    four = parse_pin(["auto"], allowed=[0, 1, 2, 3])
    assert (four.vcpu, four.backend) == ((0, 1, 2), (3,))
    one = parse_pin("auto", allowed=[3])
    assert (one.worker, one.vcpu, one.backend) == ((3,), (3,), (3,))


def test_none_list_and_roles():
    from vlab.run.pinning import DEFAULT_PIN, describe, format_cpus, parse_cpus, parse_pin

    assert parse_pin("none", allowed=[0, 1]) is None
    assert parse_pin(None, allowed=[0, 1]) == parse_pin(DEFAULT_PIN, allowed=[0, 1])
    assert parse_cpus("0-2,5, 7") == [0, 1, 2, 5, 7]
    assert format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    lst = parse_pin("1", allowed=[0, 1])
    assert (lst.worker, lst.vcpu, lst.backend, lst.spec) == ((1,), (1,), (1,), "1")
    roles = parse_pin(["vcpu=0", "backend=1"], allowed=[0, 1])
    assert (roles.worker, roles.vcpu, roles.backend) == ((0, 1), (0,), (1,))
    assert "vCPU threads 0" in describe(roles) and "not pinned" in describe(None)


@pytest.mark.parametrize("spec, needle", [
    ("7", "CPU 7 is not one this process may use"),
    ("1-0", "not a CPU or an ascending range"),
    ("x", "bad CPU list"),
    (["vcpu=0", "vcpu=1"], "given twice"),
    ("gpu=0", "unknown role 'gpu'"),
    (["auto", "0"], "stand alone"),
    (["0", "backend=1"], "not both"),
    (["0", "1"], "one CPU list"),
])
def test_bad_specs_are_usage_errors(spec, needle):
    from vlab._errors import UsageError
    from vlab.run.pinning import parse_pin

    with pytest.raises(UsageError, match=needle):
        parse_pin(spec, allowed=[0, 1])


@pytest.mark.parametrize("spec, needle", [("99", "CPU 99"), ("cpu=0", "unknown role"),
                                          ("0-", "bad CPU list")])
def test_cli_bad_pin_exits_2_with_one_line(spec, needle):
    proc = subprocess.run([sys.executable, "-m", "vlab", "run", "--pin", spec, "exits.nop"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and needle in lines[0], lines


def test_suite_pin_is_read(tmp_path, monkeypatch):
    from vlab._errors import UsageError
    from vlab.run import registry

    monkeypatch.setattr(registry, "suite_dir", lambda: str(tmp_path))
    (tmp_path / "a.toml").write_text('pin = "none"\n[[experiment]]\nselect = "exits.nop"\n')
    (tmp_path / "b.toml").write_text('[pin]\nvcpu = "0"\nbackend = "1"\n')
    (tmp_path / "c.toml").write_text('pin = 3\n')
    (tmp_path / "d.toml").write_text('description = "no pin"\n')
    assert registry.load_suite("a").pin == ["none"]
    assert registry.load_suite("b").pin == ["vcpu=0", "backend=1"]
    assert registry.load_suite("d").pin is None
    with pytest.raises(UsageError, match="pin must be"):
        registry.load_suite("c")


# ---- affinity really applied (KVM) ----

@needs_kvm
@TWO_CPUS
def test_vcpu_threads_take_their_slot_cpu(kvm, placed):
    from vlab import Machine, VcpuThread
    from vlab.run.pinning import parse_pin
    from vlab.vmm.payloads import MICRO_OPS
    from vlab.vmm.thread import placement_record

    cpus = sorted(os.sched_getaffinity(0))[:2]
    placed(parse_pin("auto", allowed=cpus))
    seen: dict[int, str] = {}

    with Machine(kvm=kvm, cpl=3) as a, Machine(kvm=kvm, cpl=3) as b:
        for m in (a, b):
            m.set_args(MICRO_OPS["nop"], 100_000_000, 4)      # ~0.2 s each
        threads = [VcpuThread(m.vcpus[0], timeout=60) for m in (a, b)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            for t in threads:
                if t.tid and t.slot >= 0 and not t.finished:
                    try:
                        seen[t.slot] = _allowed_list(t.tid)
                    except FileNotFoundError:
                        pass
            time.sleep(0.001)
        for t in threads:
            t.wait_done(60)
    assert seen == {0: str(cpus[0]), 1: str(cpus[1])}
    rec = placement_record()
    assert rec["pin"] == "auto" and rec["vcpu"] == cpus and rec["worker"] == cpus
    # the slots are free again, and the threads' own CPUs do not leak into this one
    assert os.sched_getaffinity(0) == set(cpus)


@needs_kvm
@TWO_CPUS
def test_virtio_backend_is_born_on_the_backend_cpu(kvm, placed):
    from vlab.experiments._iopaths import VirtioPath
    from vlab.run.pinning import parse_pin
    from vlab.vmm.thread import inherit, placement_record

    cpus = sorted(os.sched_getaffinity(0))[:2]
    placed(parse_pin([f"vcpu={cpus[0]}", f"backend={cpus[1]}"], allowed=cpus))
    path = VirtioPath(notify="poll", msg_bytes=64, kvm=kvm)
    try:
        with inherit("backend"):
            path.tx.start()
        try:
            deadline = time.monotonic() + 10
            while not path.tx.stats()["backend_tid"] and time.monotonic() < deadline:
                time.sleep(0.001)
            tid = path.tx.stats()["backend_tid"]
            assert _allowed_list(tid) == str(cpus[1])
            assert os.sched_getaffinity(tid) == {cpus[1]}
        finally:
            path.tx.stop()
        assert os.sched_getaffinity(0) == set(cpus)         # the creator got its CPUs back
        run = path.stream(chunk_msgs=256, chunks=4)
        assert run.received == run.total_msgs
        rec = placement_record()
        assert rec["vcpu"] == [cpus[0]] and rec["backend"] == [cpus[1]]
    finally:
        path.close()


@needs_kvm
@TWO_CPUS
def test_host_ring_threads_are_pinned_by_the_c_side(placed):
    from vlab._errors import KvmError, VlabError
    from vlab.experiments._iopaths import HostPath
    from vlab.run.pinning import parse_pin
    from vlab.vmm import devices
    from vlab.vmm.thread import placement_record

    cpus = sorted(os.sched_getaffinity(0))[:2]
    placed(parse_pin("auto", allowed=cpus))
    run = HostPath("io.native_ring", msg_bytes=64).stream(chunk_msgs=512, chunks=4)
    assert run.received == run.total_msgs
    rec = placement_record()
    assert rec["vcpu"] == [cpus[0]] and rec["backend"] == [cpus[1]]
    # the mask really reaches sched_setaffinity: a CPU this process may not use is refused
    outside = max(os.cpu_count() or 1, max(cpus) + 1)
    if outside >= 64 or outside in os.sched_getaffinity(0):
        pytest.skip("no CPU below 64 outside this process's set")
    with pytest.raises((KvmError, VlabError), match="sched_setaffinity"):
        devices.native_ring(64, chunk_msgs=64, chunks=1, tx_cpus=1 << outside)


@needs_kvm
@pytest.mark.parametrize("pin, expect", [("auto", "auto"), ("none", "none")])
def test_every_row_records_where_it_ran(pin, expect, tmp_path):
    from vlab.run.runner import RunOptions, execute

    opts = RunOptions(selectors=["exits.nop", "migration.harvest"],
                      overrides={"cpl": [3], "vcpus": [1], "mode": ["bitmap"]},
                      pyperf={"processes": 1, "values": 1, "warmups": 0}, pin=[pin])
    doc, code = execute(opts)
    assert code == 0
    assert doc["placement"]["pin"] == expect
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert {r["experiment"] for r in ok} == {"exits.nop", "migration.harvest"}
    allowed = sorted(os.sched_getaffinity(0))
    for r in ok:
        where = r["placement"]
        assert where["pin"] == expect and where["worker"] == allowed, r
    nop = [r for r in ok if r["experiment"] == "exits.nop"][0]["placement"]
    if expect == "auto":
        assert nop["vcpu"] == [allowed[0]]
    else:
        assert nop["vcpu"] == allowed
    assert os.sched_getaffinity(0) == set(allowed)          # the run gave this process back


# ---- starvation ----

def test_starvation_detects_a_slow_tail_or_a_long_wait():
    from vlab.experiments.io import STARVED_FACTOR, starvation

    steady = [100.0 + i % 7 for i in range(200)]
    assert not starvation("ns_per_msg", steady, 0.01)["starved"]
    # 10% of the chunks waited out a time slice: hundreds of times slower
    tail = steady[:180] + [30_000.0] * 20
    s = starvation("ns_per_msg", tail, 0.01)
    assert s["starved"] and abs(s["slow_share"] - 0.10) < 1e-9 and s["factor"] == STARVED_FACTOR
    # throughput: the slow samples are the small ones
    gbit = [5.0] * 180 + [0.01] * 20
    assert starvation("gbit_per_s", gbit, 0.0)["starved"]
    assert not starvation("gbit_per_s", [5.0] * 200, 0.0)["starved"]
    # a 2x spread is noise, not starvation; a long wait for a CPU is starvation on its own
    assert not starvation("rtt_ns", [100.0, 200.0] * 50, 0.05)["starved"]
    assert starvation("rtt_ns", steady, 0.5)["starved"]


def test_annotate_flags_and_names_starvation():
    from vlab.experiments.io import annotate

    samples = [100.0] * 90 + [50_000.0] * 10
    extras = [{"cpu_wait_share": 0.02, "rtt_cpu_wait_share": 0.02}]
    warnings, flags, extra = annotate({"notify": "poll", "msg_bytes": 64}, {}, "ns_per_msg",
                                      samples, extras)
    assert flags.get("starved") is True
    assert extra["starvation"]["starved"] and any(w.startswith("starved:") for w in warnings)
    warnings, flags, _ = annotate({"notify": "poll", "msg_bytes": 64}, {}, "ns_per_msg",
                                  [100.0] * 100, extras)
    assert "starved" not in flags and not any(w.startswith("starved") for w in warnings)
