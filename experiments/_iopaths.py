"""The I/O paths io.* measures, as runnable objects shared by the experiments and the tests.

Every path moves the same messages (vlab_spsc.h: 16-byte header with sequence number, length
and payload checksum) with two copies: the producer copies a message into the shared medium
(virtqueue buffer, ring slot, socket) and the consumer copies it out into a sink, checking the
sequence number and length of every message (and, with `verify`, every payload byte).

A stream run is `warm` chunks then `chunks` recorded chunks of `chunk_msgs` messages; the side
that receives stamps the TSC at each chunk boundary, so a sample is the time for `chunk_msgs`
messages to *arrive*. An echo run times round trips, one sample each. Each run also returns
the exits the guest(s) caused (KVM binary stats, less our own ucalls) and the CPU time of the
producing and consuming threads.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlab.vmm import devices as _io
from vlab._errors import KvmError, VlabError
from vlab.vmm.hostkernels import now_ns
from vlab.vmm.kvm import Kvm
from vlab.vmm.machine import Machine
from vlab.vmm.payloads import GPA_DATA
from vlab.vmm.stats import diff, guest_exits
from vlab.vmm.thread import (VcpuThread, cpu_mask, inherit, note_cpus, note_thread, placement,
                             run_together, vcpu_slot)

NOTIFY_PORT = 0x500         # virtio notify register (a 16-bit write of the queue index)
ECHO_PORT = 0x502           # notify register of the echo queue
RING_PORT = 0x510           # ivshmem: this VM's doorbell (ioeventfd)
WAIT_PORT = 0x511           # ivshmem: this VM's "wait for the peer's doorbell" exit
SEG_BYTES = 4096            # largest payload descriptor: a 64 KiB message is 1 + 16 descriptors
HOSTILE = {"loop": 1, "addr": 2, "oversize": 3, "head": 4, "avail_idx": 5, "indirect": 6,
           "next": 7, "write_tx": 8}
TRAILER = 9                 # virtio payload: kicks, full waits, completions, 3 echo error
                            # counts, interrupts handled, sleeps, interrupts the device sent
USED_MODES = {"poll": 0, "interrupt": 1}    # io.virtio's `used`: how completions reach the driver
VEC_TX, VEC_ECHO = 0x40, 0x41               # virtio: the queues' MSI vectors (to vCPU 0)
VEC_DOORBELL = 0x50                         # ivshmem: the peer's doorbell, as an interrupt
IV_TRAILER = 13             # ivshmem payload trailer (see payloads/ivshmem.c)
IV_FIELDS = ("kicks", "waits", "full_spins", "empty_spins", "received", "seq_errors",
             "len_errors", "sum_errors", "rings", "rings_masked", "irqs_handled", "irq_sleeps",
             "irqs_isr_sent")
IV_IRQ = {"poll": 0, "vmm_wait": 0, "doorbell": 1}   # io.ivshmem notify -> the payload's irq
SPSC_WAITING = 128          # offset of struct vlab_spsc's `waiting` (vlab_spsc.h)


@dataclass
class Run:
    """What one stream or echo run measured."""
    path: str
    msg_bytes: int
    tsc_khz: int
    total_msgs: int                       # messages moved, warm-up included
    chunk_msgs: int = 0
    chunk_cycles: np.ndarray = field(default_factory=lambda: np.zeros(0))   # stream samples
    rtt_cycles: np.ndarray = field(default_factory=lambda: np.zeros(0))     # echo samples
    exits: int | None = None              # guest-caused exits over the run (None: no guest)
    user_exits: int | None = None         # ... of them, exits to user space (the VMM)
    irqs: int | None = None               # interrupts the guest(s) handled (None: no guest)
    irqs_sent: int | None = None          # ... that the device / the peer's doorbell sent
    tx_cpu_ns: int = 0
    rx_cpu_ns: int = 0
    wait_ns: int = 0                      # run-queue wait of the threads that never block
    wall_ns: int = 0
    threads: int = 1                      # how many such threads (0: every thread sleeps)
    received: int = 0
    seq_errors: int = 0
    len_errors: int = 0
    sum_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.seq_errors + self.len_errors + self.sum_errors

    def seconds(self) -> float:
        c = self.chunk_cycles if len(self.chunk_cycles) else self.rtt_cycles
        return float(np.sum(c)) / (self.tsc_khz * 1e3)

    def msgs_per_s(self) -> np.ndarray:
        return self.chunk_msgs / (self.chunk_cycles.astype(np.float64) / (self.tsc_khz * 1e3))

    def gbit_per_s(self) -> np.ndarray:
        return self.msgs_per_s() * self.msg_bytes * 8 / 1e9

    def ns_per_msg(self) -> np.ndarray:
        return self.chunk_cycles.astype(np.float64) / (self.tsc_khz * 1e-6) / self.chunk_msgs

    def rtt_ns(self) -> np.ndarray:
        return self.rtt_cycles.astype(np.float64) / (self.tsc_khz * 1e-6)

    def exits_per_msg(self) -> float | None:
        return None if self.exits is None else self.exits / self.total_msgs

    def user_exits_per_msg(self) -> float | None:
        return None if self.user_exits is None else self.user_exits / self.total_msgs

    def irqs_per_msg(self) -> float | None:
        return None if self.irqs is None else self.irqs / self.total_msgs

    def wait_share(self) -> float | None:
        """Share of the run that its never-blocking threads (spinning, or kicking without
        sleeping) spent runnable but without a CPU: other load on the host. Threads that sleep
        are left out: their run-queue wait includes their own wake-up latency. None when every
        thread of the path sleeps."""
        if not self.threads:
            return None
        return self.wait_ns / (self.wall_ns * self.threads) if self.wall_ns else 0.0


_TSC_KHZ: int | None = None


def host_tsc_khz() -> int:
    global _TSC_KHZ
    if _TSC_KHZ is None:
        with Kvm() as k, k.create_vm() as vm:
            _TSC_KHZ = vm.create_vcpu(0).tsc_khz
    return _TSC_KHZ


def _cpu_now() -> int:
    """This thread's CPU time (vlab_task_cpu_ns: the thread's schedstat counter, up to date)."""
    return _io.task_cpu_ns(threading.get_native_id())


def _now_ns() -> int:
    return now_ns()


def _wait_now() -> int:
    """This thread's time spent waiting for a CPU so far (schedstat)."""
    return _io.task_wait_ns(threading.get_native_id())


def _exit_snapshot(vcpus) -> list[tuple[dict, dict]]:
    return [(v.counters(), v.stats()) for v in vcpus]


def _exits_since(vcpus, snap) -> int:
    """Exits the guests caused since `snap`, without our own ucalls (done/sync/mark)."""
    total = 0
    for v, (c0, k0) in zip(vcpus, snap):
        c1, k1 = v.counters(), v.stats()
        total += guest_exits(diff(k1, k0)) - (c1["ucalls"] - c0["ucalls"])
    return max(total, 0)


def _user_exits_since(vcpus, snap) -> int:
    """Exits to user space (KVM_RUN returning to the VMM) since `snap` that the guests caused:
    the VMM's own count by exit reason, without our ucalls and without KVM_EXIT_INTR (a
    signal, not the guest)."""
    total = 0
    for v, (c0, _k0) in zip(vcpus, snap):
        c1 = v.counters()
        total += (c1["exits_total"] - c0["exits_total"]) - (c1["ucalls"] - c0["ucalls"])
        total -= c1["exits"].get("INTR", 0) - c0["exits"].get("INTR", 0)
    return max(total, 0)


def _kvm_since(vcpus, snap, name: str) -> int:
    """A KVM vCPU statistic's change since `snap`, summed over `vcpus` (0 where KVM lacks it)."""
    return sum(int(v.stats().get(name, 0)) - int(k0.get(name, 0))
               for v, (_c0, k0) in zip(vcpus, snap))


def _virtq_error(e: KvmError, q: _io.Virtqueue) -> KvmError:
    """A run stopped by the device: the VirtqueueError naming why the queue broke."""
    if e.op == "virtqueue" and not isinstance(e, _io.VirtqueueError):
        st = q.stats()
        return _io.VirtqueueError(st["message"] or str(e), st["error"])
    return e


# ---------------------------------------------------------------- io.virtio

def chain_len(msg_bytes: int, echo: bool, seg: int = SEG_BYTES) -> int:
    """Descriptors per message chain (mirrors payloads/virtio.c)."""
    k = 1 + -(-(msg_bytes - 16) // seg)
    return k + -(-msg_bytes // seg) if echo else k


class VirtioPath:
    """One VM, a transmit queue and an echo queue, a device backend in the chosen notify mode.

    `notify` is the driver -> device kick (user, kernel, poll); `used` how completions reach the
    driver: "poll" (it spins on the used ring) or "interrupt" (the VM gets an in-kernel irqchip,
    each queue an irqfd to vCPU 0 that the device writes when the driver asks for a
    notification, and the driver sleeps in hlt until one arrives)."""

    def __init__(self, *, notify: str, msg_bytes: int, qsize: int = 256, event_idx: bool = False,
                 verify: bool = False, kvm: Kvm | None = None, timeout: float = 30.0,
                 used: str = "poll"):
        if chain_len(msg_bytes, True) > qsize:
            raise VlabError(f"queue size {qsize} cannot hold one {msg_bytes}-byte echo chain "
                            f"({chain_len(msg_bytes, True)} descriptors)")
        if used not in USED_MODES:
            raise VlabError(f"used must be one of {', '.join(USED_MODES)}, not {used!r}")
        self.notify, self.msg_bytes, self.qsize = notify, msg_bytes, qsize
        self.event_idx, self.verify, self.timeout = event_idx, verify, timeout
        self.used = used
        self.m = Machine("virtio", kvm=kvm, irqchip=used == "interrupt")
        try:
            self._layout()
            self.tx = _io.Virtqueue(self.m.vm, self.txq, notify=notify, port=NOTIFY_PORT,
                                    mode="tx", event_idx=event_idx, verify=verify)
            self.echo_q = _io.Virtqueue(self.m.vm, self.echoq, notify=notify, port=ECHO_PORT,
                                        mode="echo", event_idx=event_idx, check=False)
            if used == "interrupt":
                self.tx.set_irq(self.m.vm.add_irqfd(0, VEC_TX), self.isr_gpa)
                self.echo_q.set_irq(self.m.vm.add_irqfd(0, VEC_ECHO), self.isr_gpa + 64)
        except BaseException:
            self.m.close()
            raise
        self.tsc_khz = self.m.vcpus[0].tsc_khz
        self.capacity = max(1, qsize // chain_len(msg_bytes, False))    # chains in flight

    def _layout(self) -> None:
        mb, q = self.msg_bytes, self.qsize
        self.tx_stride = (mb + 63) & ~63
        self.echo_stride = 2 * self.tx_stride
        tx_slots = max(1, q // chain_len(mb, False))
        base = GPA_DATA
        self.txq = _io.QueueLayout.at(base, q)
        self.echoq = _io.QueueLayout.at(self.txq.end, q)
        self.tx_buf = self.echoq.end
        self.echo_buf = _page_up(self.tx_buf + (tx_slots + 1) * self.tx_stride)
        self.isr_gpa = _page_up(self.echo_buf + 2 * self.echo_stride)  # interrupt status words
        end = self.isr_gpa + 4096
        self.slot = self.m.add_data(_up(end - base, 2 << 20), prefault=True)

    def _args(self, op: int, layout, buf: int, stride: int, port: int, batch: int,
              chunk_msgs: int, chunks: int, warm: int, flags: int, hostile: int = 0,
              irq: int | None = None) -> None:
        echo = layout is self.echoq
        irq = USED_MODES[self.used] if irq is None else irq
        self.m.set_args(op, self.qsize, self.msg_bytes, batch, chunk_msgs, chunks,
                        flags | (0x100 if self.event_idx else 0), layout.desc, layout.avail,
                        layout.used, buf, stride, port, SEG_BYTES, hostile, warm, irq,
                        self.isr_gpa + (64 if echo else 0), VEC_ECHO if echo else VEC_TX)

    def _run(self, q: _io.Virtqueue) -> tuple[int, int, dict]:
        """Run the guest to done with the queue's backend live; (vcpu cpu ns, exits, stats).
        The stats gain the vCPU thread's run-queue wait, the run's wall time, the exits to user
        space and KVM's count of injected interrupts."""
        v = self.m.vcpus[0]
        self.m.restart()
        q.reset()
        with inherit("backend"):            # the backend thread is born on its CPUs
            q.start()
        snap = _exit_snapshot([v])
        with vcpu_slot():                   # this thread runs the vCPU: on a vCPU CPU
            c0, w0, t0 = _cpu_now(), _wait_now(), _now_ns()
            try:
                self.m.run_to_done(timeout=self.timeout)
                tid = q.stats()["backend_tid"] if self.notify != "user" else 0
                if tid > 0:                 # (0 would read this thread's own CPUs)
                    note_thread("backend", tid)
            except KvmError as e:
                raise _virtq_error(e, q) from None
            finally:
                cpu, wait, wall = _cpu_now() - c0, _wait_now() - w0, _now_ns() - t0
                q.stop()
        st = q.stats()
        st["vcpu_wait_ns"], st["wall_ns"] = wait, wall
        st["user_exits"] = _user_exits_since([v], snap)
        st["kvm_irq_injections"] = _kvm_since([v], snap, "irq_injections")
        return cpu, _exits_since([v], snap), st

    def _irq_extra(self, trail, st: dict) -> tuple[int, dict]:
        """(interrupts the guest handled, the interrupt accounting of a run): the handler's
        count, the device's (decided per 2.7.7.2 / sent / not sent while one was pending), what
        the driver read from the interrupt status word, KVM's injections, the driver's sleeps."""
        handled, sleeps, isr_sent = (int(x) for x in trail[6:9])
        return handled, {"irqs_handled": handled, "irqs_sent": st["irqs_sent"],
                         "irqs_isr_sent": isr_sent, "irqs_masked": st["irqs_masked"],
                         "irqs_would_send": st["irqs"],
                         "kvm_irq_injections": st["kvm_irq_injections"],
                         "irq_sleeps": sleeps, "user_exits": st["user_exits"]}

    def _contention(self, st: dict) -> dict:
        """The vCPU thread never blocks. The backend thread sleeps in kernel mode (ioeventfd)
        and, in poll mode, yields its CPU when idle (native/vmm/virtio.c, POLL_SPIN_NS): its
        run-queue wait then includes time it gave away, so only the vCPU thread counts here;
        the samples themselves show a starved backend (io.annotate)."""
        return {"wait_ns": st["vcpu_wait_ns"], "wall_ns": st["wall_ns"], "threads": 1}

    def stream(self, *, chunk_msgs: int, chunks: int, warm: int = 1, batch: int = 1,
               faults: int = 0) -> Run:
        flags = (_io.XFER_VERIFY if self.verify else 0) | faults
        self._args(1, self.txq, self.tx_buf, self.tx_stride, NOTIFY_PORT, batch, chunk_msgs,
                   chunks, warm, flags)
        cpu, exits, st = self._run(self.tx)
        res = self.m.results(0)
        stamps, trail = res[:chunks + 1].astype(np.int64), res[chunks + 1:]
        kicks, full_waits, completed = (int(x) for x in trail[:3])
        handled, irq_extra = self._irq_extra(trail, st)
        total = (warm + chunks) * chunk_msgs
        backend = st["busy_ns"] if self.notify == "user" else st["cpu_ns"]
        return Run("io.virtio", self.msg_bytes, self.tsc_khz, total, chunk_msgs,
                   np.diff(stamps), exits=exits, user_exits=st["user_exits"], irqs=handled,
                   irqs_sent=st["irqs_sent"],
                   **self._contention(st),
                   tx_cpu_ns=cpu - (st["busy_ns"] if self.notify == "user" else 0),
                   rx_cpu_ns=backend, received=st["chains"], seq_errors=st["seq_errors"],
                   len_errors=st["len_errors"], sum_errors=st["sum_errors"],
                   extra={"guest_kicks": kicks, "device_kicks": st["kicks"],
                          "full_waits": full_waits, "completed": completed,
                          "backend_wakeups": st["wakeups"], "irqs_would_send": st["irqs"],
                          "bytes": st["bytes"], "descs": st["descs"],
                          "bad_notifies": st["bad_notifies"], "vcpu_cpu_ns": cpu,
                          "backend_busy_ns": st["busy_ns"], **irq_extra})

    def echo(self, *, rounds: int, warm: int = 16, faults: int = 0) -> Run:
        flags = (_io.XFER_VERIFY if self.verify else 0) | faults
        # the payload runs warm*chunk_msgs untimed then chunks*chunk_msgs timed round trips
        self._args(2, self.echoq, self.echo_buf, self.echo_stride, ECHO_PORT, 1, 1, rounds,
                   warm, flags)
        cpu, exits, st = self._run(self.echo_q)
        res = self.m.results(0)
        rtt, trail = res[:rounds], res[rounds:]
        kicks, _, completed, seq_e, len_e, sum_e = (int(x) for x in trail[:6])
        handled, irq_extra = self._irq_extra(trail, st)
        return Run("io.virtio", self.msg_bytes, self.tsc_khz, rounds + warm,
                   rtt_cycles=rtt.astype(np.int64), exits=exits, user_exits=st["user_exits"],
                   irqs=handled, irqs_sent=st["irqs_sent"], tx_cpu_ns=cpu,
                   **self._contention(st),
                   rx_cpu_ns=st["busy_ns"] if self.notify == "user" else st["cpu_ns"],
                   received=completed, seq_errors=seq_e, len_errors=len_e, sum_errors=sum_e,
                   extra={"guest_kicks": kicks, "device_kicks": st["kicks"], **irq_extra})

    def copy(self, *, chunk_msgs: int, chunks: int, warm: int = 1) -> np.ndarray:
        """Guest cycles of the producer's copy alone, per message (into the TX slot buffers)."""
        self._args(4, self.txq, self.tx_buf, self.tx_stride, NOTIFY_PORT, 1, chunk_msgs, chunks,
                   warm, 0)
        self.m.restart()
        with vcpu_slot():
            self.m.run_to_done(timeout=self.timeout)
        return self.m.results(0)[:chunks].astype(np.float64) / chunk_msgs

    def kicks(self, *, chunk_msgs: int, chunks: int, live: bool) -> np.ndarray:
        """Guest cycles per notify write with nothing posted: with `live` the backend is
        running (kernel mode: its thread sleeps on the ioeventfd and each kick wakes it; user
        mode: the exit runs the device on an empty queue), else nobody waits on the kick."""
        self._args(5, self.txq, self.tx_buf, self.tx_stride, NOTIFY_PORT, 1, chunk_msgs, chunks,
                   1, 0)
        if live:
            self._run(self.tx)
        else:
            self.m.restart()
            self.tx.reset()
            with vcpu_slot():
                self.m.run_to_done(timeout=self.timeout)
        return self.m.results(0)[:chunks].astype(np.float64) / chunk_msgs

    def hostile(self, what: str, timeout: float = 20.0) -> None:
        """Let the guest break the transmit queue (`what` in HOSTILE) and kick; the run must
        end in VirtqueueError, which is re-raised."""
        self._args(3, self.txq, self.tx_buf, self.tx_stride, NOTIFY_PORT, 1, 1, 1, 1, 0,
                   HOSTILE[what], irq=0)
        old, self.timeout = self.timeout, timeout
        try:
            self._run(self.tx)
        finally:
            self.timeout = old

    def masked(self, *, chunk_msgs: int = 64, timeout: float = 3.0) -> None:
        """A hostile driver (used=interrupt only): it sets its APIC's task priority to 15,
        masking every vector, enables notifications, sends one message and sleeps for an
        interrupt that can never be delivered. The run must end at the watchdog (`timeout`)
        with an error, which is re-raised; the device's one interrupt stays pending."""
        if self.used != "interrupt":
            raise VlabError("masked needs used=interrupt")
        self._args(1, self.txq, self.tx_buf, self.tx_stride, NOTIFY_PORT, 1, chunk_msgs, 1, 1,
                   0, irq=2)
        old, self.timeout = self.timeout, timeout
        try:
            self._run(self.tx)
        finally:
            self.timeout = old

    def close(self) -> None:
        self.m.close()


def _page_up(n: int) -> int:
    return (n + 4095) & ~4095


def _ring_slots(msg_bytes: int) -> int:
    """Slots of the SPSC ring for this size (vlab_spsc_geometry: ~1 MiB, 8..256 slots)."""
    return (_io.ring_bytes(msg_bytes) - 4096) // ((msg_bytes + 63) & ~63)


def _up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# ---------------------------------------------------------------- io.ivshmem

class IvshmemPath:
    """Two VMs sharing a memfd slot that holds two SPSC rings (requests and replies).

    `notify`: "poll" (the consumer spins on an empty ring), "doorbell" (QEMU's
    ivshmem-doorbell: the producer's doorbell ioeventfd is an irqfd of the consumer VM, which
    sleeps in hlt on its in-kernel local APIC until the interrupt) or "vmm_wait" (the same
    doorbell, but the waiting consumer exits to its VMM, which blocks on the eventfd: no
    interrupt controller)."""

    def __init__(self, *, notify: str, msg_bytes: int, verify: bool = False,
                 kvm: Kvm | None = None, timeout: float = 30.0):
        if notify not in IV_IRQ:
            raise VlabError(f"notify must be one of {', '.join(IV_IRQ)}, not {notify!r}")
        self.notify, self.msg_bytes, self.verify, self.timeout = notify, msg_bytes, verify, timeout
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.a = self.b = None
        irqchip = notify == "doorbell"
        try:
            self.a = Machine("ivshmem", kvm=self.kvm, irqchip=irqchip)
            self.b = Machine("ivshmem", kvm=self.kvm, irqchip=irqchip)
            self.ring_bytes = _page_up(_io.ring_bytes(msg_bytes))
            self.isr_offset = 2 * self.ring_bytes      # the doorbells' interrupt status words
            size = _up(self.isr_offset + 4096, 2 << 20)
            self.shared = self.a.add_data(size, backing="memfd", prefault=True)
            self.b.add_data(size, share=self.shared, gpa=self.shared.gpa, prefault=True)
            priv = _up(2 * _page_up(msg_bytes), 2 << 20)
            self.buf_a = self.a.add_data(priv, prefault=True).gpa
            self.buf_b = self.b.add_data(priv, prefault=True).gpa
            self.wait_a = self.wait_b = None
            if notify in ("doorbell", "vmm_wait"):
                ev_a = self.a.vm.add_ioeventfd(RING_PORT, 1, pio=True)
                ev_b = self.b.vm.add_ioeventfd(RING_PORT, 1, pio=True)
            if notify == "vmm_wait":
                self.wait_a = _io.add_doorbell_wait(self.a.vm, WAIT_PORT, ev_b)
                self.wait_b = _io.add_doorbell_wait(self.b.vm, WAIT_PORT, ev_a)
            elif notify == "doorbell":
                _io.doorbell_irqfd(self.a.vm, ev_b, 0, VEC_DOORBELL)
                _io.doorbell_irqfd(self.b.vm, ev_a, 0, VEC_DOORBELL)
        except BaseException:
            self.close()
            raise
        self.tsc_khz = self.a.vcpus[0].tsc_khz
        self.capacity = _ring_slots(msg_bytes)

    def _flags(self, faults: int) -> int:
        return ((_io.XFER_VERIFY if self.verify else 0)
                | (_io.XFER_DOORBELL if self.notify != "poll" else 0) | faults)

    def _setup(self, role_a: int, role_b: int, batch: int, chunk_msgs: int, chunks: int,
               warm: int, flags: int, irq_b: int | None = None) -> None:
        _io.ring_setup(self.shared, 0, self.msg_bytes)
        _io.ring_setup(self.shared, self.ring_bytes, self.msg_bytes)
        self.shared.array(np.uint64)[self.isr_offset // 8:(self.isr_offset + 128) // 8] = 0
        g = self.shared.gpa
        irq = IV_IRQ[self.notify]
        for m, role, buf, i in ((self.a, role_a, self.buf_a, irq),
                                (self.b, role_b, self.buf_b, irq if irq_b is None else irq_b)):
            m.restart()
            m.set_args(role, self.msg_bytes, batch, chunk_msgs, chunks, warm, flags, g,
                       g + self.ring_bytes, self.ring_bytes, RING_PORT, WAIT_PORT, buf, i,
                       VEC_DOORBELL, g + self.isr_offset)

    def _run_pair(self) -> tuple[list[int], int, list[np.ndarray]]:
        """Run both VMs, each on its own thread; a failure on one aborts the other. Also sets
        `last_counts`: exits to user space and KVM's interrupt injections, per VM."""
        vms = [self.a, self.b]
        snap = _exit_snapshot([m.vcpus[0] for m in vms])

        def abort_peer(i: int):
            def on_error(e: BaseException) -> None:
                _io.abort_vm(vms[1 - i].vm, f"peer VM {'AB'[i]} failed: {e}")
            return on_error

        threads = [VcpuThread(m.vcpus[0], timeout=self.timeout, on_error=abort_peer(i),
                              name=f"ivshmem-{'ab'[i]}") for i, m in enumerate(vms)]
        t0 = _now_ns()
        run_together(threads)
        cpu = [t.cpu_ns for t in threads]
        wait = [t.wait_ns for t in threads]
        errors = [t.error for t in threads]
        # with a doorbell both vCPU threads sleep (in the VMM or in KVM's hlt): no contention
        # measure then
        spin = self.notify == "poll"
        self.last_contention = {"wait_ns": sum(wait) if spin else 0, "wall_ns": _now_ns() - t0,
                                "threads": 2 if spin else 0}
        for e in errors:                    # the first VM's own failure, not the abort it caused
            if e is not None and not (isinstance(e, KvmError) and e.op == "vlab_vm_abort"):
                raise e
        for e in errors:
            if e is not None:
                raise e
        vcpus = [m.vcpus[0] for m in vms]
        exits = _exits_since(vcpus, snap)
        self.last_counts = {
            "user_exits": [_user_exits_since([v], [s]) for v, s in zip(vcpus, snap)],
            "kvm_irq_injections": [_kvm_since([v], [s], "irq_injections")
                                   for v, s in zip(vcpus, snap)]}
        return cpu, exits, [self.a.results(0), self.b.results(0)]

    def _trailer(self, res: np.ndarray) -> dict:
        return dict(zip(IV_FIELDS, (int(x) for x in res[-IV_TRAILER:])))

    def _rung(self, ta: dict, tb: dict) -> int:
        """Doorbell interrupts sent: the rings of both VMs with notify=doorbell (with vmm_wait
        a ring is an eventfd signal the VMM waits for, not an interrupt)."""
        return ta["rings"] + tb["rings"] if IV_IRQ[self.notify] else 0

    def _irq_extra(self, ta: dict, tb: dict) -> dict:
        """The doorbell accounting of a run, VM A's then B's: rings made, rings not made while
        the last was pending, interrupts handled, what the consumer read from the status word,
        KVM's injections, sleeps, exits to user space."""
        c = self.last_counts
        return {"rings": [ta["rings"], tb["rings"]],
                "rings_masked": [ta["rings_masked"], tb["rings_masked"]],
                "irqs_handled": [ta["irqs_handled"], tb["irqs_handled"]],
                "irqs_isr_sent": [ta["irqs_isr_sent"], tb["irqs_isr_sent"]],
                "irq_sleeps": [ta["irq_sleeps"], tb["irq_sleeps"]],
                "kvm_irq_injections": c["kvm_irq_injections"],
                "user_exits_by_vm": c["user_exits"]}

    def stream(self, *, chunk_msgs: int, chunks: int, warm: int = 1, batch: int = 1,
               faults: int = 0) -> Run:
        self._setup(1, 2, batch, chunk_msgs, chunks, warm, self._flags(faults))
        (cpu_a, cpu_b), exits, (ra, rb) = self._run_pair()
        ta, tb = self._trailer(ra), self._trailer(rb)
        stamps = rb[:chunks + 1].astype(np.int64)
        waits = (_io.doorbell_counts(self.b.vm, self.wait_b) if self.wait_b is not None
                 else (0, 0))
        return Run("io.ivshmem", self.msg_bytes, self.tsc_khz, (warm + chunks) * chunk_msgs,
                   chunk_msgs, np.diff(stamps), exits=exits, tx_cpu_ns=cpu_a, rx_cpu_ns=cpu_b,
                   user_exits=sum(self.last_counts["user_exits"]),
                   irqs=ta["irqs_handled"] + tb["irqs_handled"], irqs_sent=self._rung(ta, tb),
                   **self.last_contention,
                   received=tb["received"], seq_errors=tb["seq_errors"],
                   len_errors=tb["len_errors"], sum_errors=tb["sum_errors"],
                   extra={"kicks": ta["kicks"], "waits": tb["waits"],
                          "full_spins": ta["full_spins"], "empty_spins": tb["empty_spins"],
                          "doorbell_waits": waits[0], "doorbell_rings": waits[1],
                          **self._irq_extra(ta, tb)})

    def echo(self, *, rounds: int, warm: int = 16, faults: int = 0) -> Run:
        self._setup(3, 4, 1, 1, rounds, warm, self._flags(faults))
        (cpu_a, cpu_b), exits, (ra, rb) = self._run_pair()
        ta, tb = self._trailer(ra), self._trailer(rb)
        return Run("io.ivshmem", self.msg_bytes, self.tsc_khz, rounds + warm,
                   rtt_cycles=ra[:rounds].astype(np.int64), exits=exits, tx_cpu_ns=cpu_a,
                   rx_cpu_ns=cpu_b, received=ta["received"], **self.last_contention,
                   user_exits=sum(self.last_counts["user_exits"]),
                   irqs=ta["irqs_handled"] + tb["irqs_handled"], irqs_sent=self._rung(ta, tb),
                   seq_errors=ta["seq_errors"] + tb["seq_errors"],
                   len_errors=ta["len_errors"] + tb["len_errors"],
                   sum_errors=ta["sum_errors"] + tb["sum_errors"],
                   extra={"kicks": ta["kicks"] + tb["kicks"], "waits": ta["waits"] + tb["waits"],
                          **self._irq_extra(ta, tb)})

    def masked(self, *, chunk_msgs: int = 64, timeout: float = 3.0) -> None:
        """A hostile consumer (notify=doorbell only): VM B sets its APIC's task priority to
        15, masking every vector, announces it waits and sleeps before reading anything; the
        producer's doorbell interrupt stays pending. B's run must end at the watchdog
        (`timeout`); the error is re-raised."""
        if self.notify != "doorbell":
            raise VlabError("masked needs notify=doorbell")
        self._setup(1, 2, 1, chunk_msgs, 1, 1, self._flags(0), irq_b=2)
        # B first, until it announced it waits (its APIC is enabled and masked by then), so
        # A's first publish rings it; then A runs to its end
        tb = VcpuThread(self.b.vcpus[0], timeout=timeout, name="ivshmem-b-masked")
        waiting = self.shared.array(np.uint64)[SPSC_WAITING // 8:SPSC_WAITING // 8 + 1]
        try:
            tb.start()
            t_end = _now_ns() + int(timeout * 1e9)
            while not waiting[0] and not tb.finished and _now_ns() < t_end:
                time.sleep(0.001)
            if waiting[0]:
                self.a.run_to_done(timeout=timeout)
            tb.join()
        finally:
            tb.quit()
        if tb.error is not None:
            raise tb.error

    def solo(self, *, rounds: int, chunks: int, batch: int = 1) -> float:
        """Guest cycles per message of the ring code with both ends on one vCPU (no second CPU,
        no cache-line transfers): the guest's compute cost alone."""
        self._setup(5, 5, batch, rounds, chunks, 1, 0)
        with vcpu_slot():
            self.a.run_to_done(timeout=self.timeout)
        return float(np.median(self.a.results(0)[:chunks])) / (rounds * self.capacity)

    def close(self) -> None:
        for m in (self.a, self.b):
            if m is not None:
                m.close()
        if self._own_kvm:
            self.kvm.close()


# ---------------------------------------------------------------- host baselines

class HostPath:
    """io.native_ring (the SPSC ring between two host threads) or io.tcp_loopback."""

    def __init__(self, path: str, *, msg_bytes: int, verify: bool = False,
                 timeout: float = 30.0):
        self.path, self.msg_bytes, self.verify = path, msg_bytes, verify
        self.fn = _io.native_ring if path == "io.native_ring" else _io.tcp_loopback
        self.timeout_ms = int(timeout * 1000)
        self.tsc_khz = host_tsc_khz()
        self.capacity = _ring_slots(msg_bytes) if path == "io.native_ring" else 1
        self.spins = path == "io.native_ring"

    def stream(self, *, chunk_msgs: int, chunks: int, warm: int = 1, batch: int = 1,
               faults: int = 0) -> Run:
        flags = (_io.XFER_VERIFY if self.verify else 0) | faults
        s, r = self.fn(self.msg_bytes, chunk_msgs=chunk_msgs, chunks=chunks, warm_chunks=warm,
                       batch=batch, flags=flags, timeout_ms=self.timeout_ms, **_host_pins())
        return self._run(r, (warm + chunks) * chunk_msgs, chunk_msgs,
                         np.diff(s.astype(np.int64)), np.zeros(0, np.int64))

    def echo(self, *, rounds: int, warm: int = 16, faults: int = 0) -> Run:
        flags = (_io.XFER_VERIFY if self.verify else 0) | faults
        s, r = self.fn(self.msg_bytes, chunk_msgs=rounds, chunks=1, warm_chunks=0, echo=True,
                       flags=flags, timeout_ms=self.timeout_ms, **_host_pins())
        return self._run(r, rounds, 0, np.zeros(0, np.int64), s.astype(np.int64))

    def _run(self, r: dict, total: int, chunk_msgs: int, chunks, rtt) -> Run:
        return Run(self.path, self.msg_bytes, self.tsc_khz, total, chunk_msgs, chunks, rtt,
                   exits=None, tx_cpu_ns=r["tx_cpu_ns"], rx_cpu_ns=r["rx_cpu_ns"],
                   # TCP threads block in recv/send: only the spinning ring is checked
                   wait_ns=(r["tx_wait_ns"] + r["rx_wait_ns"]) if self.spins else 0,
                   wall_ns=r["wall_ns"], threads=2 if self.spins else 0,
                   received=r["received"], seq_errors=r["seq_errors"],
                   len_errors=r["len_errors"], sum_errors=r["sum_errors"],
                   extra={k: r[k] for k in ("kicks", "waits", "full_spins", "empty_spins",
                                            "wall_ns")})

    @property
    def timeout(self) -> float:
        return self.timeout_ms / 1000

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self.timeout_ms = int(seconds * 1000)

    def close(self) -> None:
        pass


def _host_pins() -> dict[str, int]:
    """The producer of a host path where a first vCPU would run, the consumer where a device
    backend would (the same split as io.virtio's); nothing without a placement."""
    p = placement()
    if p is None:                   # both inherit this thread's CPUs
        note_cpus("backend", os.sched_getaffinity(0))
        return {}
    tx, rx = p.cpus("vcpu", 0), p.cpus("backend")
    note_cpus("vcpu", tx)
    note_cpus("backend", rx)
    return {"tx_cpus": cpu_mask(tx), "rx_cpus": cpu_mask(rx)}


def host_solo(msg_bytes: int, *, rounds: int, chunks: int, batch: int = 1) -> float:
    """Host TSC cycles per message of the same ring code with both ends on one thread."""
    samples, slots = _io.ring_solo(msg_bytes, batch=batch, rounds=rounds, chunks=chunks)
    return float(np.median(samples)) / (rounds * slots)


def make_path(experiment: str, params: dict, *, verify: bool = False, kvm: Kvm | None = None):
    """The runnable path of an io.* case."""
    mb = int(params["msg_bytes"])
    if experiment == "io.virtio":
        return VirtioPath(notify=params.get("notify", "kernel"), msg_bytes=mb,
                          qsize=int(params.get("qsize", 256)),
                          event_idx=bool(params.get("event_idx", False)), verify=verify, kvm=kvm,
                          used=params.get("used", "poll"))
    if experiment == "io.ivshmem":
        return IvshmemPath(notify=params.get("notify", "poll"), msg_bytes=mb, verify=verify,
                           kvm=kvm)
    return HostPath(experiment, msg_bytes=mb, verify=verify)
