"""The exit tracer on vlab's own guests: exact counts against loop counts, KVM's binary stats and
perf; `vlab run --trace` and `vlab trace` produce rows; unavailability is reported, not fatal."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import KVM_REASON

N = 500


def _trace_ok() -> str | None:
    if KVM_REASON:
        return KVM_REASON
    from vlab import trace

    ok, reason, _ = trace.status(mount=True)
    return None if ok else reason


TRACE_REASON = _trace_ok()
pytestmark = pytest.mark.skipif(TRACE_REASON is not None, reason=f"tracing: {TRACE_REASON}")


def test_tracer_counts_a_vlab_guest_exactly(cpuid_exits_counted):
    from vlab import Machine, trace
    from vlab.vmm.payloads import MICRO_OPS as O
    from vlab.vmm._native import lib
    from vlab.vmm.stats import diff, guest_exits

    with trace.Tracer([os.getpid()]) as tr, Machine() as m:
        sink = m.vm.add_pio_sink(0x80)
        mmio = m.vm.add_mmio_sink(lib.VLAB_GPA_MMIO, 0x1000)
        v = m.vcpus[0]
        tr.snapshot(reset=True)
        k0 = v.stats()
        for op, a0 in (("cpuid", 0), ("out", 0x80), ("mmio_write", lib.VLAB_GPA_MMIO)):
            m.restart()
            m.set_args(O[op], N, 1, a0, 1)
            m.run_to_done(timeout=60)
        res = tr.snapshot()
        delta = diff(v.stats(), k0)
    c = res.counts
    # kvm_cpuid fires once per cpuid wherever KVM handles it; where KVM never sees the cpuid (PVM
    # without CPUID faulting, see conftest.cpuid_exits_counted) its counter and the tracepoint
    # stay at 0
    n_cpuid = N if cpuid_exits_counted else 0
    assert c.get("cpuid", 0) == n_cpuid
    assert c.get("pio:out:0x80") == N == sink.hits
    assert c.get("mmio:write") == N == mmio.hits
    # user-space exits: N outs + N MMIO writes + one DONE ucall per run
    assert c.get("userspace_exit:IO") == N + 3
    assert c.get("userspace_exit:MMIO") == N
    # KVM's own exit counter agrees with the traced exits
    assert guest_exits(delta) - 3 <= 2 * N + n_cpuid + 3
    assert guest_exits(delta) >= 2 * N + n_cpuid


@pytest.mark.skipif(shutil.which("perf") is None, reason="perf is not installed")
def test_perf_agrees_with_the_tracer(tmp_path):
    """perf stat counts the same tracepoints for the same guest program."""
    script = tmp_path / "guest.py"
    script.write_text(
        "from vlab import Machine\nfrom vlab.vmm.payloads import MICRO_OPS as O\n"
        f"m = Machine(); s = m.vm.add_pio_sink(0x80); m.set_args(O['out'], {N}, 1, 0x80)\n"
        "m.run_to_done(); assert s.hits == %d\n" % N)
    proc = subprocess.run(["perf", "stat", "-x,", "-e", "kvm:kvm_pio", "-e", "kvm:kvm_userspace_exit",
                           sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "not supported" in proc.stderr:
        pytest.skip("perf cannot count kvm tracepoints here")
    assert proc.returncode == 0, proc.stderr
    counts = {line.split(",")[2]: int(line.split(",")[0]) for line in proc.stderr.splitlines()
              if line.count(",") >= 2 and line.split(",")[0].isdigit()}
    assert counts["kvm:kvm_pio"] == N + 1            # N outs + the DONE ucall
    assert counts["kvm:kvm_userspace_exit"] == N + 1


def test_vlab_run_trace_adds_rows(tmp_path):
    from vlab import results

    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "vlab", "run", "exits.pio_user", "-p", "vcpus=1",
                           "-p", "direction=out", "--processes", "1", "--values", "2", "--trace",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = results.read(out)
    trace_rows = [r for r in doc["rows"] if r["experiment"] == "trace.exits"]
    assert trace_rows and all(r["params"]["of"].startswith("exits.pio_user") for r in trace_rows)
    pio = [r for r in trace_rows if r["params"]["reason"] == "pio:out:0x80"]
    assert pio and pio[0]["median"] > 0 and pio[0]["median"] % 8 == 0   # whole samples of 8 outs
    assert any(r["experiment"] == "trace.exit_ns" for r in doc["rows"])
    assert doc["host"]["trace"]["source"] in ("kvm_exit", "fallback")


@pytest.mark.parametrize("name", ["t.json", "t.json.gz"])
def test_vlab_trace_command_saves_a_results_file(tmp_path, name):
    from vlab import results

    out = tmp_path / name
    code = ("from vlab import Machine\nfrom vlab.vmm.payloads import MICRO_OPS as O\n"
            "m = Machine(); s = m.vm.add_pio_sink(0x80); m.set_args(O['out'], 200, 1, 0x80)\n"
            "m.run_to_done()\n")
    proc = subprocess.run([sys.executable, "-m", "vlab", "trace", "-o", str(out), "--",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out.read_bytes()[:2] == results.GZIP_MAGIC) == name.endswith(".gz")
    rows = {r["params"]["reason"]: r for r in results.read(out)["rows"] if r["experiment"] == "trace.exits"}
    assert rows["pio:out:0x80"]["median"] == 200
    assert "event" in proc.stdout and "count" in proc.stdout


def test_unavailable_tracing_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    from vlab import trace
    from vlab.run.runner import RunOptions, execute

    monkeypatch.setattr(trace, "status", lambda mount=False: (False, "no BPF here (test)", {}))
    doc, code = execute(RunOptions(selectors=["native.syscall"], trace=True,
                                   pyperf={"processes": 1, "values": 1}))
    assert code == 0
    skips = [r for r in doc["rows"] if r["experiment"].startswith("trace.")]
    assert skips and all(r["status"] == "skip" and "no BPF here" in r["reason"] for r in skips)
    assert any(r["experiment"] == "native.syscall" and r["status"] == "ok" for r in doc["rows"])
