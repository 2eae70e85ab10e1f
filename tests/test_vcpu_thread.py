"""VcpuThread, the one vCPU thread, under real KVM: done, the stop -> exception mapping, the
watchdog, pause/resume, throttle, quit, guest-requested pauses, a full dirty ring."""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import needs_kvm

pytestmark = needs_kvm


def _ops():
    from vlab.vmm.payloads import MICRO_F_SYNC, MICRO_OPS
    return MICRO_OPS, MICRO_F_SYNC


def _machine(kvm, op: str, *args: int, cpl: int = 3):
    from vlab import Machine

    ops, _ = _ops()
    m = Machine(kvm=kvm, cpl=cpl)
    m.set_args(ops[op], *args)
    return m


def _counter_guest():
    """The migration payload's counter workload: a page whose count the guest keeps raising."""
    from vlab.migration.guest import GuestSpec, build_guest

    return build_guest(GuestSpec(workload="counter", mem=2 << 20))


def _count(m) -> int:
    from vlab.migration.guest import counter_of

    return counter_of(m.vm, m.data[0].gpa) or 0


def _advances(m, within: float = 5.0) -> bool:
    c0 = _count(m)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _count(m) != c0:
            return True
        time.sleep(0.01)
    return False


def test_runs_to_done_and_reports_the_stop_and_its_cpu_time(kvm):
    from vlab import VcpuThread

    with _machine(kvm, "nop", 100000, 4) as m:
        t = VcpuThread(m.vcpus[0], timeout=30).start()
        assert t.wait_done(60) == "done"
        assert t.last_stop.reason == "done" and t.error is None and t.finished
        assert t.cpu_ns > 0 and t.run_ns > 0 and t.tid > 0
        assert len(m.results(0)) == 4


@pytest.mark.parametrize("op, cpl, args, exc, check", [
    ("ud2", 0, (), "GuestFault", lambda e: e.vector == 6),
    ("triple_fault", 3, (), "GuestFault", lambda e: e.vector == 255),
    ("assert_fail", 3, (0, 0, 1, 2), "GuestFailure", lambda e: "a0 == a1" in str(e)),
])
def test_guest_trouble_maps_to_the_same_exceptions_as_vcpu_run(kvm, op, cpl, args, exc, check):
    import vlab
    from vlab import VcpuThread

    with _machine(kvm, op, *args, cpl=cpl) as m:
        errors = []
        t = VcpuThread(m.vcpus[0], timeout=10, on_error=errors.append).start()
        with pytest.raises(getattr(vlab, exc)) as ei:
            t.wait_done(30)
        assert check(ei.value) and errors == [ei.value] and t.error is ei.value
    with _machine(kvm, op, *args, cpl=cpl) as m:  # the single trip raises the same
        with pytest.raises(getattr(vlab, exc)):
            m.vcpus[0].run(10)


def test_watchdog_stops_a_runaway_guest(kvm):
    from vlab import GuestTimeout, VcpuThread

    with _machine(kvm, "spin") as m:
        t0 = time.monotonic()
        t = VcpuThread(m.vcpus[0], timeout=0.5).start()
        with pytest.raises(GuestTimeout):
            t.wait_done(30)
        assert time.monotonic() - t0 < 10
        assert t.error.rip is not None


def test_an_event_nobody_handles_is_an_error(kvm):
    from vlab import VcpuThread, VlabError

    with _machine(kvm, "out", 1, 1, 0x1234) as m:
        t = VcpuThread(m.vcpus[0], timeout=10).start()
        with pytest.raises(VlabError, match="unhandled port out on 0x1234"):
            t.wait_done(30)


def test_on_stop_pauses_at_the_guests_sync_and_resume_runs_on(kvm):
    from vlab import VcpuThread

    ops, f_sync = _ops()
    with _machine(kvm, "nop", 1000, 2, 0, 0, f_sync) as m:
        seen = []

        def at_sync(stop):
            seen.append(stop.reason)
            return True

        t = VcpuThread(m.vcpus[0], timeout=30, on_stop=at_sync).start()
        st = t.wait_paused(30)
        assert st is not None and st.reason == "sync" and t.paused and not t.finished
        runs = m.vcpus[0].counters()["runs"]
        time.sleep(0.05)
        assert m.vcpus[0].counters()["runs"] == runs          # really out of the guest
        t.resume(timeout=30)
        assert t.wait_done(30) == "done" and seen == ["sync"]


def test_pause_stops_the_guest_and_resume_lets_it_run_on():
    from vlab import VcpuThread

    with _counter_guest() as m:
        t = VcpuThread(m.vcpus[0], slice_ms=20).start()
        try:
            assert _advances(m)
            paused_at = t.pause(10)
            assert t.paused and paused_at > 0
            c = _count(m)
            time.sleep(0.2)
            assert _count(m) == c                            # nothing runs while paused
            t.resume()
            assert _advances(m)
            assert not t.finished and t.error is None
        finally:
            t.quit(5)
        assert t.finished and t.stop_reason == "quit" and t.error is None


def test_quit_ends_a_guest_that_never_stops(kvm):
    from vlab import VcpuThread

    with _machine(kvm, "spin") as m:
        t = VcpuThread(m.vcpus[0]).start()                   # no watchdog, no slices
        time.sleep(0.1)
        t0 = time.monotonic()
        t.quit(10)
        assert t.finished and time.monotonic() - t0 < 5
        assert t.stop_reason == "quit" and t.error is None


def test_throttle_runs_the_guest_a_fraction_of_the_time():
    from vlab import VcpuThread

    def share(t, seconds: float = 1.0) -> float:
        r0, w0 = t.run_ns, time.monotonic_ns()
        time.sleep(seconds)
        return (t.run_ns - r0) / (time.monotonic_ns() - w0)

    with _counter_guest() as m:
        t = VcpuThread(m.vcpus[0], slice_ms=20, period_ms=20).start()
        try:
            free = share(t)
            t.set_throttle(0.9)
            time.sleep(0.05)
            throttled = share(t)
            assert t.throttle == 0.9
            assert throttled < 0.4 < 0.6 < free, (throttled, free)
            assert _advances(m)                              # throttled, not stopped
            t.set_throttle(5)
            assert t.throttle == 0.99                        # clamped
        finally:
            t.quit(5)
        assert t.error is None


def test_a_full_dirty_ring_calls_the_harvester_and_without_one_is_an_error():
    from vlab import KvmError
    from vlab.dirty import DirtyTracker, WorkloadGuest

    # the smallest ring (4 KiB: 256 entries) fills many times over while the guest sweeps 8 MiB
    with WorkloadGuest.build("uniform", wss=8 << 20, dirty_ring=4096) as g:
        tr = DirtyTracker(g.machine, "ring")
        tr.start()
        g.start(on_ring_full=tr.on_ring_full)
        g.pause()
        h = tr.harvest()
        g.take_epoch()
        g.resume()
        g.stop()
        assert g.ring_full_exits > 0 and tr.ring_full_exits == g.ring_full_exits
        assert h.count() > 256
    with WorkloadGuest.build("uniform", wss=8 << 20, dirty_ring=4096) as g:
        tr = DirtyTracker(g.machine, "ring")
        tr.start()
        with pytest.raises(KvmError, match="dirty ring full and nobody harvests it"):
            g.start()
            g.pause()


def test_machine_run_all_uses_one_thread_per_vcpu_and_re_raises(kvm):
    from vlab import GuestFault, Machine

    ops, _ = _ops()
    with Machine(kvm=kvm, vcpus=2) as m:
        m.set_args(ops["ud2"])
        with pytest.raises(GuestFault):
            m.run_all(timeout=10)
    with Machine(kvm=kvm, vcpus=2) as m:
        m.set_args(ops["nop"], 10, 1)
        stops = m.run_all(timeout=10)
        assert [s.reason for s in stops] == ["done", "done"]
        assert np.all([len(m.results(i)) == 1 for i in range(2)])
