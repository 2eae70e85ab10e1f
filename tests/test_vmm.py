"""The native VMM under real KVM: exit counts, faults, watchdog, backings, sharing, leaks."""
from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest

from conftest import needs_kvm

pytestmark = needs_kvm

N = 300          # operations per sample
S = 4            # samples


def _micro():
    from vlab.vmm.payloads import MICRO_F_SYNC, MICRO_OPS
    return MICRO_OPS, MICRO_F_SYNC


def run_counted(m, op: str, a0: int = 0, a1: int = 0, n: int = N, s: int = S):
    """Run op n*s times after a SYNC; return (vmm counter delta, KVM stats delta, samples)."""
    from vlab.vmm.stats import diff

    ops, f_sync = _micro()
    m.restart()
    m.set_args(ops[op], n, s, a0, a1, f_sync, 0)
    st = m.run(timeout=20)
    assert st.reason == "sync"
    v = m.vcpus[0]
    c0, k0 = v.counters(), v.stats()
    m.run_to_done(timeout=60)
    c1, k1 = v.counters(), v.stats()
    dc = {k: c1[k] - c0[k] for k in ("exits_total", "io_sunk", "mmio_sunk", "ucalls", "hlt", "msr_user")}
    return dc, diff(k1, k0), m.results(0)


def assert_kvm_exits(delta: dict, expected: int, emulated: bool = False) -> None:
    """KVM's own exit counter, less host-caused background exits, equals what the guest did.

    One or two unattributed exits (a preemption that KVM does not classify) are tolerated. With
    `emulated` (CPL0 code on PVM, which runs in KVM's instruction emulator), the emulator's own
    returns to the run loop add a few counted exits per thousand operations (docs/exits.md:
    1206 for 1201 under load here), so up to 1% more are tolerated; never fewer.
    """
    from vlab.vmm.stats import guest_exits

    got = guest_exits(delta)
    slack = 3 + (expected // 100 if emulated else 0)
    assert expected <= got <= expected + slack, (got, expected, delta)


def kvm_flavor() -> str:
    from vlab.host import fingerprint

    return fingerprint("/")["kvm"]["flavor"]


def assert_kernel_handled(delta: dict, n: int) -> None:
    """An operation KVM handles in the kernel: one exit each, or, where KVM emulates the
    whole CPL0 instruction stream (PVM), one emulated instruction each and no exit."""
    from vlab.vmm.stats import guest_exits

    if guest_exits(delta) >= n:
        assert_kvm_exits(delta, n)
    else:
        assert delta.get("insn_emulation", 0) >= n, delta


@pytest.mark.parametrize("cpl", [3, 0])
def test_out_exits_exactly_n_user_exits(kvm, cpl):
    from vlab import Machine

    with Machine(kvm=kvm, cpl=cpl) as m:
        sink = m.vm.add_pio_sink(0x80)
        dc, dk, samples = run_counted(m, "out", 0x80)
        total = N * S
        assert sink.hits == total
        assert dc["io_sunk"] == total
        # every user-space exit is either one of our outs or the final DONE ucall
        assert dc["exits_total"] == total + 1
        assert dc["ucalls"] == 1
        assert_kvm_exits(dk, total + 1, emulated=cpl == 0 and kvm_flavor() == "pvm")
        assert len(samples) == S and (samples > 0).all()


@pytest.mark.parametrize("cpl", [3, 0])
def test_ioeventfd_counts_exactly_n_and_no_user_exits(kvm, cpl):
    from vlab import Machine

    with Machine(kvm=kvm, cpl=cpl) as m:
        ev = m.vm.add_ioeventfd(0x81, 1, pio=True)
        dc, dk, _ = run_counted(m, "out", 0x81)
        assert ev.read() == N * S
        assert dc["exits_total"] == 1          # only the DONE ucall reached user space
        assert_kernel_handled(dk, N * S + 1)


@pytest.mark.parametrize("cpl", [3, 0])
def test_cpuid_is_handled_in_kernel(kvm, cpl, cpuid_exits_counted):
    from vlab import Machine

    with Machine(kvm=kvm, cpl=cpl) as m:
        dc, dk, samples = run_counted(m, "cpuid", 0)
        assert dc["exits_total"] == 1           # no user-space exit for cpuid
        if cpl == 3 and cpuid_exits_counted:
            assert_kvm_exits(dk, N * S + 1)      # a real exit per cpuid at CPL3 (VMX, SVM, most PVM)
        elif cpl == 3:
            # PVM without CPUID faulting: the guest executes cpuid itself and only the outer
            # hypervisor traps it; no KVM exit but the DONE ucall, yet it costs far more than
            # the same number of nops
            assert_kvm_exits(dk, 1)
            _, _, nops = run_counted(m, "nop")
            assert np.median(samples) > 100 * max(np.median(nops), 1), (samples, nops)
        else:
            assert_kernel_handled(dk, N * S + 1)
        assert (samples > 0).all()


def test_mmio_sink_counts_reads_and_writes(kvm):
    from vlab import Machine
    from vlab.vmm._native import lib

    with Machine(kvm=kvm) as m:
        sink = m.vm.add_mmio_sink(lib.VLAB_GPA_MMIO, 0x1000, read_value=0x1234)
        dc, dk, _ = run_counted(m, "mmio_write", lib.VLAB_GPA_MMIO + 8, 7)
        assert sink.hits == N * S and dc["mmio_sunk"] == N * S
        dc, dk, _ = run_counted(m, "mmio_read", lib.VLAB_GPA_MMIO + 16)
        assert sink.hits == 2 * N * S
        assert_kvm_exits(dk, N * S + 1)


def test_binary_stats_names_come_from_descriptors(kvm):
    from vlab import Machine

    with Machine(kvm=kvm) as m:
        vstats, mstats = m.vcpus[0].stats(), m.vm.stats()
        assert "exits" in vstats and all(isinstance(k, str) and k for k in vstats)
        assert mstats and all(isinstance(v, (int, list)) for v in mstats.values())


# ---- misbehaving guests: each ends in the right exception, in time, and the process lives ----

# "In time" for a 1 s watchdog: a stopped guest ends well within this on a loaded 2-CPU host (a
# watchdog that did not fire would leave the spinning or livelocked guests running forever).
_LATE = 10.0


@pytest.mark.parametrize("op,cpl,exc,vector", [
    ("triple_fault", 3, "GuestFault", 255),
    ("hlt", 3, "GuestFault", 13),           # privileged at CPL3: #GP delivered to the guest IDT
    ("ud2", 0, "GuestFault", 6),
    ("spin", 3, "GuestTimeout", None),
    ("vmcall", 0, "GuestTimeout", None),     # livelocks in the emulator on PVM; exits elsewhere
])
def test_misbehaving_guest_is_stopped(kvm, op, cpl, exc, vector):
    import vlab
    from vlab import Machine

    ops, _ = _micro()
    m = Machine(kvm=kvm, cpl=cpl)
    try:
        m.set_args(ops[op], 10, 1, 0)
        t0 = time.monotonic()
        try:
            m.run_to_done(timeout=1.0)
        except vlab.GuestFault as e:
            assert exc == "GuestFault", f"{op}: unexpected {e}"
            assert e.vector == vector
            assert e.rip >= 0x100000
            if vector != 255:
                assert e.cpl == cpl
        except vlab.GuestTimeout as e:
            if op == "vmcall" and exc == "GuestTimeout":
                pass
            assert exc == "GuestTimeout", f"{op}: unexpected timeout {e}"
            assert 0.9 <= time.monotonic() - t0 < _LATE
        else:
            if op != "vmcall":     # vmcall at CPL0 completes on hosts that do not livelock
                pytest.fail(f"{op} did not fail")
        assert time.monotonic() - t0 < _LATE
    finally:
        m.close()
    # the process survives and the next VM works
    with Machine(kvm=kvm) as m2:
        sink = m2.vm.add_pio_sink(0x80)
        m2.set_args(ops["out"], 5, 1, 0x80)
        m2.run_to_done(timeout=5)
        assert sink.hits == 5


def test_guest_assertion_reports_file_line_and_expression(kvm):
    import vlab
    from vlab import Machine

    ops, _ = _micro()
    with Machine(kvm=kvm) as m:
        m.set_args(ops["assert_fail"], 0, 0, 1, 2)
        with pytest.raises(vlab.GuestFailure) as ei:
            m.run_to_done(timeout=5)
        assert "native/guest/payloads/micro.c" in str(ei.value)
        assert "a0 == a1" in str(ei.value)


def test_guest_print_is_collected(kvm):
    from vlab import Machine

    ops, _ = _micro()
    with Machine(kvm=kvm) as m:
        m.set_args(ops["print"])
        st = m.run_to_done(timeout=5)
        assert st.prints == ["hello from the guest"]


def test_unhandled_port_is_reported_not_ignored(kvm):
    import vlab
    from vlab import Machine

    ops, _ = _micro()
    with Machine(kvm=kvm) as m:
        m.set_args(ops["out"], 1, 1, 0x1234)
        with pytest.raises(vlab.VlabError, match="unhandled port out on 0x1234"):
            m.run_to_done(timeout=5)


def test_kvm_error_names_ioctl_and_errno(kvm):
    import vlab
    from vlab import Machine

    with Machine(kvm=kvm) as m:
        with pytest.raises(vlab.KvmError) as ei:
            m.vm.enable_cap(99999, 0)
        assert ei.value.op == "KVM_ENABLE_CAP"
        assert ei.value.errno == errno.EINVAL
        assert "KVM_ENABLE_CAP" in str(ei.value) and "errno 22" in str(ei.value)


def test_missing_dev_kvm_is_a_clear_error():
    import vlab

    with pytest.raises(vlab.KvmError) as ei:
        vlab.Kvm("/nonexistent/kvm")
    assert ei.value.op == "open" and ei.value.errno == errno.ENOENT


# ---- memory backings and guest page sizes ----

def _reserve_hugepages(size_kb: int, count: int):
    path = f"/sys/kernel/mm/hugepages/hugepages-{size_kb}kB/nr_hugepages"
    if not os.path.exists(path):
        return None, f"no {size_kb} kB hugetlb pool on this kernel"
    old = int(open(path).read())
    free = int(open(path.replace("nr_hugepages", "free_hugepages")).read())
    if free >= count:
        return old, None
    if os.geteuid() != 0:
        return None, f"no free {size_kb} kB huge pages reserved and not root to reserve them"
    try:
        with open(path, "w") as f:
            f.write(str(old + count - free))
    except OSError as e:
        return None, f"could not reserve {size_kb} kB huge pages: {e}"
    if int(open(path.replace("nr_hugepages", "free_hugepages")).read()) < count:
        with open(path, "w") as f:
            f.write(str(old))
        return None, f"kernel could not reserve {count} free {size_kb} kB huge pages"
    return old, None


@pytest.mark.parametrize("guest_page,backing,size", [
    ("4k", "4k", 32 << 20),
    ("4k", "thp", 32 << 20),
    ("2m", "4k", 32 << 20),
    ("2m", "thp", 32 << 20),
    ("2m", "hugetlb-2m", 32 << 20),
    ("1g", "thp", 1 << 30),
    ("1g", "hugetlb-1g", 1 << 30),
])
def test_guest_runs_on_every_backing(kvm, guest_page, backing, size):
    from vlab import Machine
    from vlab.vmm.machine import pt_pool_for

    ops, _ = _micro()
    if guest_page == "1g" and not kvm.has_1g_pages():
        pytest.skip("CPU does not offer 1 GiB pages to guests (no pdpe1gb in supported CPUID)")
    restore = None
    if backing.startswith("hugetlb"):
        kb = 2048 if backing == "hugetlb-2m" else 1048576
        old, why = _reserve_hugepages(kb, size // (kb * 1024))
        if why:
            pytest.skip(why)
        restore = (kb, old)
    try:
        with Machine(kvm=kvm, pt_pool=pt_pool_for(size, 4096)) as m:
            slot = m.add_data(size, backing=backing, guest_page=guest_page)
            m.set_args(ops["touch"], 0, 0, slot.gpa, size)
            m.run_to_done(timeout=60)
            (checksum,) = m.results(0)
            words = slot.array(np.uint64)
            offs = np.arange(0, size, 4096, dtype=np.uint64)
            expect = (slot.gpa + offs) ^ np.uint64(0x5A5A5A5A5A5A5A5A)
            # the host sees every page the guest wrote, at the right place
            assert (words[offs // 8] == expect).all()
            assert int(checksum) == int(expect.sum(dtype=np.uint64))
            _, _, ps = m.vm.translate(m.cr3, slot.gpa + size - 4096)
            assert ps == {"4k": 4096, "2m": 2 << 20, "1g": 1 << 30}[guest_page]
    finally:
        if restore:
            kb, old = restore
            with open(f"/sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages", "w") as f:
                f.write(str(old))


def test_two_vms_share_a_memfd_slot(kvm):
    from vlab import Machine

    ops, _ = _micro()
    with Machine(kvm=kvm) as a, Machine(kvm=kvm) as b:
        sa = a.add_data(2 << 20, backing="memfd")
        sb = b.add_data(2 << 20, share=sa, gpa=sa.gpa)
        # A writes, B reads the same guest-physical word
        a.set_args(ops["write_word"], 0, 0, sa.gpa + 0x100, 0xC0FFEE)
        a.run_to_done(timeout=5)
        b.set_args(ops["read_word"], 0, 0, sb.gpa + 0x100)
        b.run_to_done(timeout=5)
        assert int(b.results(0)[0]) == 0xC0FFEE
        # and the other way round, seen by the host through both mappings
        b.restart()
        b.set_args(ops["write_word"], 0, 0, sb.gpa + 0x200, 0xBEEF)
        b.run_to_done(timeout=5)
        assert int(sa.array(np.uint64)[0x200 // 8]) == 0xBEEF


def test_two_vcpus_run_concurrently(kvm):
    from vlab import Machine

    ops, _ = _micro()
    with Machine(kvm=kvm, vcpus=2) as m:
        sink = m.vm.add_pio_sink(0x80)
        m.set_args(ops["out"], 100, 3, 0x80)
        m.run_all(timeout=30)
        assert sink.hits == 2 * 100 * 3
        assert len(m.results(0)) == 3 and len(m.results(1)) == 3


def test_vcpu_state_round_trip(kvm):
    from vlab import Machine

    with Machine(kvm=kvm) as m:
        blob = m.vcpus[0].save_state()
        with Machine(kvm=kvm) as m2:
            m2.vcpus[0].load_state(blob)
            assert m2.vcpus[0].save_state()[:64] == blob[:64]
        with pytest.raises(Exception, match="malformed"):
            m.vcpus[0].load_state(blob[:-8])


# ---- no leaks ----

def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_200_vms_leak_no_fds_or_mappings(kvm):
    from vlab import Machine

    ops, _ = _micro()

    def one():
        with Machine(kvm=kvm) as m:
            m.add_data(2 << 20, backing="thp")
            m.vm.add_ioeventfd(0x81)
            m.vcpus[0].stats()
            m.vm.stats()
            m.set_args(ops["nop"], 10, 1)
            m.run_to_done(timeout=5)

    one()
    fds, maps = _fds(), _maps()
    for _ in range(200):
        one()
    assert _fds() == fds
    assert _maps() == maps
