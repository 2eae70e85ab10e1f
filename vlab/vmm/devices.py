"""Typed wrappers over the VMM's devices and io-area native code: PIO/MMIO sinks, ioeventfds,
the virtqueue device, doorbells, SPSC rings, host transfers, VFIO.

The C side (native/vmm/virtio.c, io.c, vfio.c) does the work; this module checks results and
turns failures into exceptions that name the operation. A broken virtqueue raises
`VirtqueueError` (a `KvmError` whose op is "virtqueue") carrying the reason code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vlab._errors import KvmError
from vlab.vmm._checks import _check, _raise_last
from vlab.vmm._native import ffi, lib
from vlab.vmm.memory import MemorySlot

if TYPE_CHECKING:
    from vlab.vmm.vm import Vm

NOTIFY = {"user": lib.VLAB_VQ_NOTIFY_USER, "kernel": lib.VLAB_VQ_NOTIFY_KERNEL,
          "poll": lib.VLAB_VQ_NOTIFY_POLL}
MODES = {"tx": lib.VLAB_VQ_MODE_TX, "echo": lib.VLAB_VQ_MODE_ECHO}
VQ_ERRORS = {getattr(lib, n): n[len("VLAB_VQ_ERR_"):].lower() for n in dir(lib)
             if n.startswith("VLAB_VQ_ERR_")}
XFER_VERIFY = lib.VLAB_XFER_F_VERIFY
XFER_DOORBELL = lib.VLAB_XFER_F_DOORBELL
XFER_BAD_SEQ = lib.VLAB_XFER_F_BAD_SEQ
XFER_BAD_SUM = lib.VLAB_XFER_F_BAD_SUM
ISR_PENDING, ISR_CLOSED, ISR_ONE = lib.VLAB_VQ_ISR_PENDING, lib.VLAB_VQ_ISR_CLOSED, lib.VLAB_VQ_ISR_ONE
MSG_MIN, MSG_MAX = 64, 65536
VFIO_REGION_MMAP = lib.VLAB_VFIO_REGION_MMAP     # a region flag: the region can be mmapped

_STAT_FIELDS = ("chains", "descs", "bytes", "kicks", "wakeups", "irqs", "empty_polls",
                "bad_notifies", "seq_next", "seq_errors", "len_errors", "sum_errors", "busy_ns", "cpu_ns",
                "wait_ns",
                "backend_tid", "error", "last_avail", "used_idx", "irqs_sent", "irqs_masked")
_XFER_OUT = ("received", "bytes", "seq_errors", "len_errors", "sum_errors", "tx_cpu_ns",
             "rx_cpu_ns", "tx_wait_ns", "rx_wait_ns", "tx_tid", "rx_tid", "wall_ns", "kicks", "waits", "full_spins",
             "empty_spins")


@dataclass
class Sink:
    """A PIO or MMIO range whose exits the VMM consumes in C, counting each one."""
    vm: "Vm"
    index: int
    kind: str
    base: int
    length: int

    @property
    def hits(self) -> int:
        return lib.vlab_vm_sink_hits(self.vm._h, self.index)


class EventFd:
    """An ioeventfd: KVM signals it on a guest write without leaving the kernel."""

    def __init__(self, fd: int, addr: int, length: int, pio: bool):
        self.fd, self.addr, self.length, self.pio = fd, addr, length, pio
        self.total = 0

    def read(self) -> int:
        """Writes since the last read (eventfd counters accumulate), added to `total`."""
        try:
            n = int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            n = 0
        self.total += n
        return n


class IrqFd:
    """An irqfd: every write to `fd` makes KVM deliver the MSI (`dest`, `vector`) through GSI
    `gsi`, without leaving the kernel. `fire()` writes it and returns the host TSC just before
    the write (the start of an injection-latency measurement)."""

    def __init__(self, fd: int, gsi: int, dest: int, vector: int):
        self.fd, self.gsi, self.dest, self.vector = fd, gsi, dest, vector
        self.fired = 0

    def fire(self) -> int:
        tsc = ffi.new("uint64_t *")
        _check(lib.vlab_irq_fire(self.fd, tsc))
        self.fired += 1
        return int(tsc[0])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VirtqueueError(KvmError):
    """The virtqueue device found the driver's queue malformed and marked it broken."""

    def __init__(self, message: str, kind: str = ""):
        KvmError.__init__(self, "virtqueue", 71, message)   # EPROTO
        self.kind = kind


def _stats_dict(st) -> dict:
    out = {k: int(getattr(st, k)) for k in _STAT_FIELDS}
    out["error"] = VQ_ERRORS.get(out["error"], str(out["error"]))
    out["message"] = ffi.string(st.message).decode(errors="replace")
    return out


@dataclass(frozen=True)
class QueueLayout:
    """Where a split virtqueue of `size` entries lives (virtio 1.x section 2.7 alignment)."""
    size: int
    desc: int
    avail: int
    used: int

    @classmethod
    def at(cls, base: int, size: int) -> "QueueLayout":
        """Descriptor table at `base`, the available and used rings on the following pages."""
        avail = base + _page_up(16 * size)
        used = avail + _page_up(6 + 2 * size)
        return cls(size, base, avail, used)

    @property
    def end(self) -> int:
        return self.used + _page_up(6 + 8 * self.size)


def _page_up(n: int) -> int:
    return (n + 4095) & ~4095


def _config(layout: QueueLayout, mode: str, flags: int, max_bytes: int):
    cfg = ffi.new("struct vlab_virtq_config *")
    cfg.size, cfg.mode, cfg.flags, cfg.max_bytes = layout.size, MODES[mode], flags, max_bytes
    cfg.desc_gpa, cfg.avail_gpa, cfg.used_gpa = layout.desc, layout.avail, layout.used
    return cfg


def _virtq_raise(kind: int = 0, message: str = "") -> None:
    e = lib.vlab_last_error()
    op = ffi.string(e.op).decode()
    msg = ffi.string(e.msg).decode(errors="replace")
    if op == "virtqueue":
        raise VirtqueueError(msg or message, VQ_ERRORS.get(kind, ""))
    _raise_last()


class Virtqueue:
    """A virtio split virtqueue device attached to a VM (the VM owns and frees it).

    `notify`: "user" (backend in the PIO exit), "kernel" (ioeventfd + backend thread) or "poll"
    (backend thread spinning, kicks suppressed). `flags`: VLAB_VQ_F_EVENT_IDX / _CHECK / _VERIFY.
    """

    def __init__(self, vm: Vm, layout: QueueLayout, *, notify: str, port: int, mode: str = "tx",
                 event_idx: bool = False, check: bool = True, verify: bool = False,
                 max_bytes: int = MSG_MAX):
        flags = ((lib.VLAB_VQ_F_EVENT_IDX if event_idx else 0) | (lib.VLAB_VQ_F_CHECK if check else 0)
                 | (lib.VLAB_VQ_F_VERIFY if verify else 0))
        out = ffi.new("struct vlab_virtq **")
        if lib.vlab_virtq_create(vm._h, _config(layout, mode, flags, max_bytes), NOTIFY[notify],
                                 port, out) < 0:
            _virtq_raise()
        self.vm, self._h, self.layout, self.notify, self.port = vm, out[0], layout, notify, port
        self.mode = mode
        self.irq: IrqFd | None = None

    def _ptr(self):
        if self.vm.closed:
            raise KvmError("virtqueue", 9, "virtqueue used after its VM was closed")
        return self._h

    def reset(self) -> None:
        """Device reset: zero the rings, indices and statistics (backend thread stopped)."""
        _check(lib.vlab_virtq_reset(self._ptr()))

    def set_irq(self, irq: IrqFd, isr_gpa: int) -> None:
        """Send used-buffer notifications as interrupts through `irq` (an irqfd of this VM),
        at most one outstanding, with the interrupt status word at `isr_gpa` (8 bytes of guest
        memory the driver shares; VLAB_VQ_ISR_* in vlab.h, see native/vmm/virtio.c)."""
        _check(lib.vlab_virtq_set_irq(self._ptr(), irq.fd, isr_gpa))
        self.irq = irq

    def start(self) -> None:
        """Start the backend thread (kernel and poll modes; nothing to do in user mode)."""
        _check(lib.vlab_virtq_start(self._ptr()))

    def stop(self) -> None:
        _check(lib.vlab_virtq_stop(self._ptr()))

    def stats(self) -> dict:
        st = ffi.new("struct vlab_virtq_stats *")
        lib.vlab_virtq_get_stats(self._ptr(), st)
        return _stats_dict(st)


def process_buffer(memory: bytearray, gpa: int, layout: QueueLayout, *, mode: str = "tx",
                   event_idx: bool = False, check: bool = False, verify: bool = False,
                   max_bytes: int = MSG_MAX, last_avail: int = 0, used_idx: int = 0,
                   budget: int = 0) -> tuple[int, dict]:
    """Run the device once over `memory` standing for guest memory at `gpa` (no guest needed).

    `memory` (a multiple of 4 KiB) is updated in place with what the device wrote. Returns
    (chains processed, stats); a malformed queue raises VirtqueueError, with `.kind` saying why.
    """
    buf = ffi.from_buffer("uint8_t[]", memory)
    st = ffi.new("struct vlab_virtq_stats *")
    st.last_avail, st.used_idx = last_avail & 0xFFFF, used_idx & 0xFFFF
    flags = ((lib.VLAB_VQ_F_EVENT_IDX if event_idx else 0) | (lib.VLAB_VQ_F_CHECK if check else 0)
             | (lib.VLAB_VQ_F_VERIFY if verify else 0))
    r = lib.vlab_virtq_process_buffer(buf, len(memory), gpa, _config(layout, mode, flags, max_bytes),
                                      budget, st)
    stats = _stats_dict(st)
    if r < 0:
        _virtq_raise(st.error)
    return r, stats


# ---------------------------------------------------------------- doorbells and aborts

def add_doorbell_wait(vm: Vm, port: int, peer: EventFd) -> int:
    """Guest writes to `port` block the vCPU thread until `peer` (another VM's ioeventfd) fires
    (or 50 ms pass). Returns the handler index for `doorbell_counts`."""
    return _check(lib.vlab_vm_add_doorbell_wait(vm._h, port, peer.fd))


def doorbell_irqfd(vm: Vm, peer: EventFd, dest: int, vector: int) -> IrqFd:
    """Make `peer` (another VM's doorbell ioeventfd) an irqfd of `vm`: each time the peer's
    guest rings, KVM signals the eventfd and, still in the kernel, delivers the MSI (`dest`,
    `vector`) to `vm` — QEMU's ivshmem-doorbell with ioeventfd and irqfd. KVM keeps its own
    reference to the eventfd; the returned IrqFd holds a duplicate, closed with `vm`."""
    return vm.add_irqfd(dest, vector, fd=os.dup(peer.fd))


def doorbell_counts(vm: Vm, index: int) -> tuple[int, int]:
    """(waits, doorbell rings consumed) of a doorbell wait handler."""
    w, r = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    _check(lib.vlab_vm_doorbell_counts(vm._h, index, w, r))
    return w[0], r[0]


def abort_vm(vm: Vm, message: str) -> None:
    """Make the VM's running (and future) vCPU runs fail with `message`; any thread may call."""
    if not vm.closed:
        lib.vlab_vm_abort(vm._h, message.encode())


def task_cpu_ns(tid: int) -> int:
    """On-CPU ns of thread `tid` of this process (/proc/self/task/<tid>/schedstat, or stat)."""
    return _check(lib.vlab_task_cpu_ns(tid))


def task_wait_ns(tid: int) -> int:
    """ns thread `tid` of this process spent runnable but waiting for a CPU (schedstat)."""
    return _check(lib.vlab_task_wait_ns(tid))


def copy_ns(msg_bytes: int, nbufs: int, iters: int, *, memcpy: bool) -> float:
    """Host ns per copy of `msg_bytes` into `nbufs` rotating buffers (memcpy or rep movsb)."""
    out = ffi.new("uint64_t *")
    _check(lib.vlab_copy_cost(msg_bytes, nbufs, iters, 1 if memcpy else 0, out))
    return out[0] / iters


def ring_bytes(msg_bytes: int) -> int:
    """Bytes one SPSC ring for `msg_bytes` messages occupies (header page + slots)."""
    return lib.vlab_ring_bytes(msg_bytes)


def ring_setup(slot: MemorySlot, offset: int, msg_bytes: int) -> int:
    """Initialise an SPSC ring at `offset` of a (shared) slot; returns its size in bytes."""
    size = slot.size - offset
    if offset < 0 or size <= 0:
        raise ValueError(f"offset {offset:#x} outside the slot")
    ptr = ffi.cast("uint8_t *", lib.vlab_slot_hva(slot._h)) + offset
    return _check(lib.vlab_ring_setup(ptr, size, msg_bytes))


# ---------------------------------------------------------------- host transfers

def _xfer(fn, msg_bytes: int, *, chunk_msgs: int, chunks: int, warm_chunks: int = 1,
          batch: int = 1, echo: bool = False, flags: int = 0, timeout_ms: int = 10000,
          tx_cpus: int = 0, rx_cpus: int = 0) -> tuple[np.ndarray, dict]:
    """One host transfer; tx_cpus / rx_cpus pin the producer / consumer thread (CPU bit masks,
    0: not pinned)."""
    x = ffi.new("struct vlab_xfer *")
    x.tx_cpus, x.rx_cpus = tx_cpus, rx_cpus
    x.msg_bytes, x.batch, x.flags, x.echo = msg_bytes, batch, flags, 1 if echo else 0
    x.chunk_msgs, x.chunks, x.warm_chunks, x.timeout_ms = chunk_msgs, chunks, warm_chunks, timeout_ms
    cap = chunks * chunk_msgs if echo else chunks + 1
    samples = np.zeros(cap, dtype=np.uint64)
    _check(fn(x, ffi.from_buffer("uint64_t[]", samples), cap))
    return samples, {k: int(getattr(x, k)) for k in _XFER_OUT}


def native_ring(msg_bytes: int, **kw) -> tuple[np.ndarray, dict]:
    """The SPSC ring between two fresh host threads. Stream: chunk-boundary TSC stamps (chunks+1)
    taken by the consumer; echo: one TSC round-trip sample per message."""
    return _xfer(lib.vlab_xfer_native_ring, msg_bytes, **kw)


def ring_solo(msg_bytes: int, *, batch: int, rounds: int, chunks: int) -> tuple[np.ndarray, int]:
    """The SPSC ring code with both ends on one host thread: (TSC cycles of each of `chunks`
    samples of `rounds` passes over the ring, the ring's slot count)."""
    samples = np.zeros(chunks, dtype=np.uint64)
    slots = _check(lib.vlab_ring_solo(msg_bytes, batch, rounds, chunks,
                                      ffi.from_buffer("uint64_t[]", samples)))
    return samples, slots


def tcp_loopback(msg_bytes: int, **kw) -> tuple[np.ndarray, dict]:
    """TCP over 127.0.0.1 between two fresh host threads (TCP_NODELAY, bounded by timeouts)."""
    return _xfer(lib.vlab_xfer_tcp_loopback, msg_bytes, **kw)


# ---------------------------------------------------------------- VFIO

class Vfio:
    """A VF opened through VFIO: container + IOMMU group + device fd (type-1 IOMMU)."""

    def __init__(self, group_dev: str, bdf: str, container: str = "/dev/vfio/vfio"):
        out = ffi.new("struct vlab_vfio **")
        _check(lib.vlab_vfio_open(container.encode(), group_dev.encode(), bdf.encode(), out))
        self._h = out[0]

    def region(self, index: int) -> tuple[int, int, int]:
        """(size, offset, flags) of VFIO region `index` (0-5 are BARs)."""
        size, off, flags = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint32_t *")
        _check(lib.vlab_vfio_region(self._h, index, size, off, flags))
        return size[0], off[0], flags[0]

    def map_bar(self, vm: Vm, index: int, gpa: int) -> int:
        """mmap BAR `index` and make it a memory slot of `vm` at `gpa`; returns its size."""
        size = ffi.new("uint64_t *")
        _check(lib.vlab_vfio_map_bar(self._h, vm._h, index, gpa, size))
        return size[0]

    def dma_map_cost(self, slot: MemorySlot, iova: int, pages: int) -> tuple[int, int]:
        """ns to VFIO_IOMMU_MAP_DMA `pages` pages of `slot` one page at a time, and to unmap."""
        m, u = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        _check(lib.vlab_vfio_dma_map_cost(self._h, lib.vlab_slot_hva(slot._h), iova, pages, m, u))
        return m[0], u[0]

    def close(self) -> None:
        if self._h is not None:
            lib.vlab_vfio_close(self._h)
            self._h = None

    def __enter__(self) -> "Vfio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
