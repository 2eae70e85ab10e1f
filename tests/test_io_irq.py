"""io area, interrupts: io.virtio's used=interrupt (the device writes an irqfd, the driver
sleeps in hlt on the in-kernel local APIC) and io.ivshmem's notify=doorbell (the producer's
doorbell ioeventfd is an irqfd of the consumer VM). Every byte arrives in order, as for the
other modes; interrupt counts are exact (the guest handled what the sender sent and what KVM
injected, none lost or merged); a guest that masks every interrupt is stopped by the watchdog
with a clean error. No timed assertions."""
from __future__ import annotations

import pytest

from conftest import needs_kvm
from vlab._errors import VlabError
from vlab.vmm import devices as _io


def _paths():
    from vlab.experiments import _iopaths
    return _iopaths


def _virtio_counts_exact(r, notify: str) -> None:
    """Interrupts: handled by the guest = sent by the device = counted in the status word;
    KVM injected each (and injects again one whose delivery an exit interrupted, so its count
    is never lower); every notification the driver asked for was sent or held back while one
    was pending. Exits to user space: the kicks in user mode, the kicks that reached the
    poll-mode device's stray-write handler, none with the ioeventfd."""
    x = r.extra
    assert r.irqs == x["irqs_handled"] == x["irqs_sent"] == x["irqs_isr_sent"] == r.irqs_sent
    assert x["kvm_irq_injections"] >= r.irqs
    assert x["irqs_would_send"] == x["irqs_sent"] + x["irqs_masked"]
    if notify == "user":
        # the device runs inside the kick's exit: the driver never waits, nothing is sent
        assert r.irqs == 0 and x["irq_sleeps"] == 0
        assert r.user_exits == x["guest_kicks"] == x["device_kicks"]
    elif notify == "poll":
        assert r.user_exits == x["device_kicks"]
    else:
        assert r.user_exits == 0


@needs_kvm
@pytest.mark.parametrize("event_idx", [False, True], ids=["no_event_idx", "event_idx"])
@pytest.mark.parametrize("notify", ["user", "kernel", "poll"])
def test_virtio_interrupt_delivers_every_byte_in_order(kvm, notify, event_idx):
    P = _paths()
    irqs = 0
    for mb, chunk in ((64, 150), (4096, 40), (65536, 12)):
        p = P.VirtioPath(notify=notify, msg_bytes=mb, event_idx=event_idx, verify=True, kvm=kvm,
                         used="interrupt")
        try:
            for batch in (1, 5):
                r = p.stream(chunk_msgs=chunk, chunks=3, warm=1, batch=batch)
                assert r.received == r.total_msgs == 4 * chunk
                assert r.extra["bytes"] == 4 * chunk * mb
                assert (r.seq_errors, r.len_errors, r.sum_errors) == (0, 0, 0)
                assert r.extra["completed"] == r.total_msgs and len(r.chunk_cycles) == 3
                _virtio_counts_exact(r, notify)
                irqs += r.irqs
            e = p.echo(rounds=30, warm=2)
            assert e.received == 32 and len(e.rtt_cycles) == 30
            assert (e.seq_errors, e.len_errors, e.sum_errors) == (0, 0, 0)
            _virtio_counts_exact(e, notify)
            irqs += e.irqs
            # the checks can fail: a skipped sequence number and a corrupted byte are seen
            r = p.stream(chunk_msgs=10, chunks=1, faults=_io.XFER_BAD_SEQ | _io.XFER_BAD_SUM)
            assert r.seq_errors == 1 and r.sum_errors == 1
            e = p.echo(rounds=10, warm=0, faults=_io.XFER_BAD_SUM)
            assert e.sum_errors == 1
        finally:
            p.close()
    if notify == "user":
        assert irqs == 0
    else:
        # a backend thread on the other CPU: the driver ran out of work and slept at times
        assert irqs > 0


@needs_kvm
def test_virtio_poll_completions_take_no_interrupts(kvm):
    """used=poll keeps its meaning: no irqchip, the driver spins, the device only counts the
    notifications it would send."""
    P = _paths()
    p = P.VirtioPath(notify="kernel", msg_bytes=256, kvm=kvm)
    try:
        assert not p.m.irqchip
        r = p.stream(chunk_msgs=64, chunks=2)
        assert r.received == r.total_msgs and r.irqs == 0
        assert r.extra["irqs_sent"] == r.extra["irq_sleeps"] == r.extra["kvm_irq_injections"] == 0
    finally:
        p.close()


@needs_kvm
@pytest.mark.parametrize("notify", ["kernel", "poll"])
def test_virtio_guest_that_masks_interrupts_is_stopped_cleanly(kvm, notify):
    """TPR 15 masks every vector: the device's interrupt stays pending in the IRR, the guest
    sleeps for it, the watchdog ends the run with an error; the device sent one interrupt and
    no more, and after a device reset the queue works again with exact counts."""
    P = _paths()
    p = P.VirtioPath(notify=notify, msg_bytes=64, kvm=kvm, used="interrupt")
    try:
        with pytest.raises(VlabError, match="watchdog"):
            p.masked(timeout=2.0)
        st = p.tx.stats()
        assert st["chains"] == 1 and st["irqs_sent"] == 1
        lapic = p.m.vcpus[0].lapic()
        assert lapic[0x80] == 0xF0                                   # TPR
        irr = int.from_bytes(lapic[0x200 + 16 * (P.VEC_TX // 32):][:4], "little")
        assert irr >> (P.VEC_TX % 32) & 1                            # pending, not delivered
        r = p.stream(chunk_msgs=50, chunks=2)
        assert r.received == r.total_msgs and r.errors == 0
        assert r.irqs == r.extra["irqs_sent"] == r.extra["irqs_isr_sent"]
    finally:
        p.close()


@needs_kvm
def test_virtio_used_must_be_known(kvm):
    with pytest.raises(VlabError, match="used must be one of poll, interrupt"):
        _paths().VirtioPath(notify="kernel", msg_bytes=64, kvm=kvm, used="irq")


def _ivshmem_counts_exact(r) -> None:
    """Doorbell interrupts: each VM handled exactly the rings its peer made (and the count its
    status word holds) and KVM injected that many; no exit to user space."""
    x = r.extra
    rings, handled = x["rings"], x["irqs_handled"]
    assert handled == [rings[1], rings[0]] == x["irqs_isr_sent"]
    assert all(k >= h for k, h in zip(x["kvm_irq_injections"], handled))
    assert r.irqs == sum(handled) == r.irqs_sent and r.user_exits == 0
    assert x["user_exits_by_vm"] == [0, 0]


@needs_kvm
def test_ivshmem_doorbell_interrupt_delivers_every_byte_in_order(kvm):
    P = _paths()
    irqs = 0
    for mb, chunk in ((64, 200), (4096, 40), (65536, 10)):
        p = P.IvshmemPath(notify="doorbell", msg_bytes=mb, verify=True, kvm=kvm)
        try:
            assert p.a.irqchip and p.b.irqchip
            for batch in (1, 4):
                r = p.stream(chunk_msgs=chunk, chunks=3, warm=1, batch=batch)
                assert r.received == r.total_msgs == 4 * chunk
                assert (r.seq_errors, r.len_errors, r.sum_errors) == (0, 0, 0)
                _ivshmem_counts_exact(r)
                assert r.extra["irqs_handled"][0] == 0       # the producer is never rung
                irqs += r.irqs
            e = p.echo(rounds=25, warm=3)
            assert e.received == 28 and e.errors == 0 and len(e.rtt_cycles) == 25
            _ivshmem_counts_exact(e)
            irqs += e.irqs
            r = p.stream(chunk_msgs=10, chunks=1, faults=_io.XFER_BAD_SEQ | _io.XFER_BAD_SUM)
            assert r.seq_errors == 1 and r.sum_errors == 1
        finally:
            p.close()
    assert irqs > 0          # in echo each side waits for the other: it slept and was rung


@needs_kvm
def test_ivshmem_consumer_that_masks_interrupts_is_stopped_cleanly(kvm):
    P = _paths()
    p = P.IvshmemPath(notify="doorbell", msg_bytes=64, kvm=kvm)
    try:
        with pytest.raises(VlabError, match="watchdog"):
            p.masked(timeout=2.0)
        # the producer finished, ringing once: the interrupt it sent stays pending in B's IRR
        trailer = dict(zip(P.IV_FIELDS, (int(x) for x in p.a.results(0)[-P.IV_TRAILER:])))
        assert trailer["rings"] == 1
        lapic = p.b.vcpus[0].lapic()
        assert lapic[0x80] == 0xF0
        irr = int.from_bytes(lapic[0x200 + 16 * (P.VEC_DOORBELL // 32):][:4], "little")
        assert irr >> (P.VEC_DOORBELL % 32) & 1
    finally:
        p.close()


def test_io_modes_are_validated():
    from vlab._errors import UsageError
    from vlab.experiments import io

    io.validate_io("io.virtio", {"msg_bytes": 64, "used": "interrupt"})
    with pytest.raises(UsageError, match="used must be one of poll, interrupt"):
        io.validate_io("io.virtio", {"msg_bytes": 64, "used": "irq"})
    for notify in ("poll", "doorbell", "vmm_wait"):
        io.validate_io("io.ivshmem", {"msg_bytes": 64, "notify": notify})


def test_a_lost_or_extra_interrupt_fails_the_measurement():
    """io's integrity check compares the guests' count with the sender's: a mismatch is an
    error, not a figure."""
    from vlab.experiments import _iopaths, io

    ok = _iopaths.Run("io.virtio", 64, 1000, 10, received=10, irqs=3, irqs_sent=3)
    io._check_integrity(ok, "stream")
    for handled, sent in ((3, 4), (5, 4)):
        bad = _iopaths.Run("io.virtio", 64, 1000, 10, received=10, irqs=handled, irqs_sent=sent)
        with pytest.raises(RuntimeError, match=f"handled {handled} interrupts.*sent {sent}"):
            io._check_integrity(bad, "stream")


def test_every_io_row_reports_messages_total_and_per_message_counts():
    """annotate adds, to every row, the messages the case moved in all its measurements and
    the interrupts and user-space exits per message over them; a guest count that KVM's
    irq_injections contradicts is a warning on the irqs_per_msg row."""
    from vlab.experiments import io

    extras = [{"messages_moved": 300, "irqs": 30, "user_exits": 6, "kvm_irq_injections": [20, 10]},
              {"messages_moved": 100, "irqs": 10, "user_exits": 2, "kvm_irq_injections": [10, 0]}]
    for metric in ("gbit_per_s", "irqs_per_msg", "rtt_ns"):
        warnings, _, extra = io.annotate({"notify": "kernel", "used": "interrupt"}, {}, metric,
                                         [1.0], extras)
        assert extra["messages_total"] == 400
        assert extra["irqs_per_msg_all"] == pytest.approx(0.1)
        assert extra["user_exits_per_msg_all"] == pytest.approx(0.02)
        assert not any("KVM counted" in w for w in warnings)
    extras[0]["kvm_irq_injections"] = [21, 10]        # one delivery re-injected after an exit
    warnings, _, extra = io.annotate({}, {}, "irqs_per_msg", [1.0], extras)
    assert extra["kvm_reinjections"] == 1 and not any("KVM counted" in w for w in warnings)
    extras[0]["kvm_irq_injections"] = [20, 10]
    extras[1]["kvm_irq_injections"] = [9, 0]          # fewer injections than deliveries
    warnings, _, _ = io.annotate({}, {}, "irqs_per_msg", [1.0], extras)
    assert any("handled 40 interrupts, KVM counted 39" in w for w in warnings)
    _, _, extra = io.annotate({}, {}, "gbit_per_s", [1.0], [{"messages_moved": 64}])
    assert extra["messages_total"] == 64 and "irqs_per_msg_all" not in extra
