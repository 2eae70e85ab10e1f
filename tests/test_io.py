"""io area: the virtqueue device against hostile queues (fuzzed, with a reference model as the
oracle), data integrity of every path and notify mode, exit accounting, doorbells, aborts,
SR-IOV detection on recorded trees, and CLI input checks. No timed assertions."""
from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import needs_kvm
from vlab.vmm import devices as _io
from vlab.vmm.devices import QueueLayout, VirtqueueError, process_buffer

DATA = Path(__file__).parent / "data"
KINDS = {"ring", "avail_idx", "head", "next", "loop", "addr", "oversize", "indirect", "order",
         "direction"}
GPA = 0x10000


# ================================================================ a reference virtqueue device

def reference(mem: bytearray, gpa: int, lay: QueueLayout, *, mode: str, max_bytes: int,
              last_avail: int, used_idx: int, event_idx: bool) -> tuple[str, int]:
    """What the device must do to `mem` (modified in place, as the device would): the virtio
    1.x split-queue rules of native/vmm/virtio.c written independently. Returns (outcome,
    chains), outcome "ok" or the kind of error that breaks the queue."""
    size = lay.size

    def rd(addr: int, fmt: str):
        return struct.unpack_from(fmt, mem, addr - gpa)

    def wr(addr: int, fmt: str, *v) -> None:
        struct.pack_into(fmt, mem, addr - gpa, *v)

    def inside(addr: int, n: int) -> bool:
        return addr >= gpa and n <= len(mem) and addr - gpa <= len(mem) - n

    avail_idx = rd(lay.avail + 2, "<H")[0]
    n = 0

    def publish() -> None:
        wr(lay.used + 2, "<H", used_idx)

    if (avail_idx - last_avail) & 0xFFFF > size:
        return "avail_idx", 0
    while last_avail != avail_idx:
        head = rd(lay.avail + 4 + 2 * (last_avail % size), "<H")[0]
        err = None
        segs: list[tuple[int, int, bool]] = []
        if head >= size:
            err = "head"
        idx, rbytes, wbytes, saw_w = head, 0, 0, False
        while err is None:
            if len(segs) == size:
                err = "loop"
                break
            addr, ln, fl, nxt = rd(lay.desc + 16 * idx, "<QIHH")
            if fl & 4:
                err = "indirect"
            elif ln > max_bytes:
                err = "oversize"
            elif not inside(addr, ln):
                err = "addr"
            elif fl & 2 and mode == "tx":
                err = "direction"
            elif not fl & 2 and saw_w:
                err = "order"
            if err:
                break
            if fl & 2:
                saw_w, wbytes = True, wbytes + ln
            else:
                rbytes += ln
            if rbytes > max_bytes or wbytes > max_bytes:
                err = "oversize"
                break
            segs.append((addr, ln, bool(fl & 2)))
            if not fl & 1:
                break
            if nxt >= size:
                err = "next"
                break
            idx = nxt
        if err is None and mode == "echo" and wbytes < rbytes:
            err = "direction"
        if err:
            if n:
                publish()
            return err, n
        written = 0
        if mode == "echo":
            rd_segs = [(a, ln) for a, ln, w in segs if not w]
            wr_segs = [(a, ln) for a, ln, w in segs if w]
            ri = wi = roff = woff = 0
            left = rbytes
            while left:
                while rd_segs[ri][1] == roff:
                    ri, roff = ri + 1, 0
                while wr_segs[wi][1] == woff:
                    wi, woff = wi + 1, 0
                c = min(rd_segs[ri][1] - roff, wr_segs[wi][1] - woff, left)
                s, d = rd_segs[ri][0] + roff - gpa, wr_segs[wi][0] + woff - gpa
                mem[d:d + c] = mem[s:s + c]
                roff, woff, left = roff + c, woff + c, left - c
            written = rbytes
        wr(lay.used + 4 + 8 * (used_idx % size), "<II", head, written)
        used_idx = (used_idx + 1) & 0xFFFF
        last_avail = (last_avail + 1) & 0xFFFF
        n += 1
        if n % 16 == 0:
            publish()
    if n:
        publish()
    if event_idx:
        wr(lay.used + 4 + 8 * size, "<H", last_avail)     # notifications re-armed
    else:
        wr(lay.used, "<H", 0)
    return "ok", n


def run_device(mem: bytearray, lay: QueueLayout, **kw) -> tuple[str, int, dict]:
    try:
        n, stats = process_buffer(mem, GPA, lay, **kw)
        return "ok", n, stats
    except VirtqueueError as e:
        assert e.op == "virtqueue" and e.kind in KINDS, (e.kind, str(e))
        assert "queue broken: " in str(e)
        return e.kind, -1, {}


# ---------------------------------------------------------------- hand-built queues

def _queue(size: int = 8, pages: int = 4) -> tuple[bytearray, QueueLayout]:
    lay = QueueLayout(size, GPA, GPA + 0x400, GPA + 0x800)
    return bytearray(pages * 4096), lay


def _desc(mem, lay, i, addr, ln, flags=0, nxt=0):
    struct.pack_into("<QIHH", mem, lay.desc - GPA + 16 * i, addr, ln, flags, nxt)


def _avail(mem, lay, heads, start=0):
    for k, h in enumerate(heads):
        struct.pack_into("<H", mem, lay.avail - GPA + 4 + 2 * ((start + k) % lay.size), h)
    struct.pack_into("<H", mem, lay.avail - GPA + 2, (start + len(heads)) & 0xFFFF)


def _used(mem, lay, i):
    return struct.unpack_from("<II", mem, lay.used - GPA + 4 + 8 * (i % lay.size))


def _msg(seq: int, n: int, verify: bool = True) -> bytes:
    """A message as the producers build it (vlab_spsc.h), built here independently."""
    M = (1 << 64) - 1

    def mix(x):
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & M
        x ^= x >> 33
        x = (x * 0xC4CEB9FE1A85EC53) & M
        return x ^ (x >> 33)

    base = ((seq + 1) * 0x9E3779B97F4A7C15) & M
    payload = bytearray()
    for i in range(0, n - 16, 8):
        payload += mix((base + i) & M).to_bytes(8, "little")
    payload = bytes(payload[:n - 16])
    h = 0xCBF29CE484222325
    i = 0
    while i + 8 <= len(payload):
        h = ((h ^ int.from_bytes(payload[i:i + 8], "little")) * 0x100000001B3) & M
        i += 8
    for b in payload[i:]:
        h = ((h ^ b) * 0x100000001B3) & M
    h ^= len(payload)
    s = (h ^ (h >> 32)) & 0xFFFFFFFF
    return struct.pack("<QII", seq, n, s if verify else 0) + payload


def test_valid_tx_chains_are_consumed_and_checked():
    mem, lay = _queue()
    data = GPA + 0x1000
    for seq in range(3):                  # 3 chains: header descriptor + payload descriptor
        m = _msg(seq, 200)
        mem[data - GPA + 512 * seq:data - GPA + 512 * seq + 200] = m
        _desc(mem, lay, 2 * seq, data + 512 * seq, 16, 1, 2 * seq + 1)
        _desc(mem, lay, 2 * seq + 1, data + 512 * seq + 16, 184)
    _avail(mem, lay, [0, 2, 4])
    n, stats = process_buffer(mem, GPA, lay, check=True, verify=True)
    assert n == 3 and [_used(mem, lay, i) for i in range(3)] == [(0, 0), (2, 0), (4, 0)]
    assert struct.unpack_from("<H", mem, lay.used - GPA + 2)[0] == 3
    assert stats["bytes"] == 600 and stats["descs"] == 6 and stats["seq_next"] == 3
    assert stats["seq_errors"] == stats["len_errors"] == stats["sum_errors"] == 0
    # the checks can fail: a corrupted payload byte and a skipped sequence number are counted
    mem[data - GPA + 100] ^= 1
    struct.pack_into("<Q", mem, data - GPA + 1024, 7)
    n, stats = process_buffer(mem, GPA, lay, check=True, verify=True)
    assert stats["sum_errors"] == 1 and stats["seq_errors"] == 1


def test_echo_copies_readable_into_writable_across_segments():
    mem, lay = _queue()
    src, dst = GPA + 0x1000, GPA + 0x2000
    payload = bytes(range(256)) * 3
    mem[src - GPA:src - GPA + len(payload)] = payload
    _desc(mem, lay, 5, src, 100, 1, 3)               # readable 100 + 668, any order of indices
    _desc(mem, lay, 3, src + 100, 668, 1, 0)
    _desc(mem, lay, 0, dst, 500, 3, 7)               # writable 500 + 400
    _desc(mem, lay, 7, dst + 600, 400, 2)
    _avail(mem, lay, [5], start=65535)               # indices wrap at 16 bits
    n, _ = process_buffer(mem, GPA, lay, mode="echo", last_avail=65535, used_idx=65535)
    assert n == 1 and _used(mem, lay, 65535) == (5, 768)
    got = bytes(mem[dst - GPA:dst - GPA + 500]) + bytes(mem[dst - GPA + 600:dst - GPA + 868])
    assert got == payload


@pytest.mark.parametrize("kind", sorted(KINDS - {"ring"}))
def test_each_malformation_breaks_the_queue_with_its_name(kind):
    mem, lay = _queue()
    buf, mode, start = GPA + 0x1000, "tx", 0
    _desc(mem, lay, 0, buf, 64, 1, 1)
    _desc(mem, lay, 1, buf + 64, 64)
    heads = [0]
    if kind == "avail_idx":
        heads = [0] * (lay.size + 1)
    elif kind == "head":
        heads = [lay.size]
    elif kind == "next":
        _desc(mem, lay, 1, buf + 64, 64, 1, lay.size + 4)
    elif kind == "loop":
        _desc(mem, lay, 1, buf + 64, 64, 1, 0)
    elif kind == "addr":
        _desc(mem, lay, 1, GPA + len(mem) - 63, 64)       # one byte past the end of memory
    elif kind == "oversize":
        _desc(mem, lay, 1, buf + 64, 0xFFFFFFFF)
    elif kind == "indirect":
        _desc(mem, lay, 1, buf + 64, 64, 4)
    elif kind == "order":
        mode = "echo"
        _desc(mem, lay, 0, buf, 64, 3, 1)                 # writable, then readable
    elif kind == "direction":
        _desc(mem, lay, 1, buf + 64, 64, 2)               # writable in a transmit queue
    _avail(mem, lay, heads, start)
    before = bytes(mem)
    with pytest.raises(VirtqueueError) as exc:
        process_buffer(mem, GPA, lay, mode=mode, max_bytes=4096)
    assert exc.value.kind == kind
    # a broken chain is never consumed: the used ring is untouched
    assert mem[lay.used - GPA:lay.used - GPA + 4 + 8 * lay.size] == \
        before[lay.used - GPA:lay.used - GPA + 4 + 8 * lay.size]


def test_buffer_ending_exactly_at_the_end_of_memory_is_fine_and_wraparound_is_not():
    mem, lay = _queue()
    _desc(mem, lay, 0, GPA + len(mem) - 64, 64)
    _avail(mem, lay, [0])
    assert process_buffer(mem, GPA, lay)[0] == 1
    mem, lay = _queue()
    _desc(mem, lay, 0, (1 << 64) - 8, 64)                 # addr + len wraps around 2^64
    _avail(mem, lay, [0])
    with pytest.raises(VirtqueueError) as exc:
        process_buffer(mem, GPA, lay)
    assert exc.value.kind == "addr"


def test_ring_areas_must_be_in_memory_and_aligned():
    mem, _ = _queue()
    for lay in (QueueLayout(8, GPA + 8, GPA + 0x400, GPA + 0x800),          # desc misaligned
                QueueLayout(8, GPA, GPA + 0x400, GPA + len(mem) - 16),       # used runs off
                QueueLayout(8, GPA - 0x1000, GPA + 0x400, GPA + 0x800)):     # desc below
        with pytest.raises(VirtqueueError) as exc:
            process_buffer(mem, GPA, lay)
        assert exc.value.kind == "ring"
    with pytest.raises(VirtqueueError, match="power of two"):
        process_buffer(mem, GPA, QueueLayout(6, GPA, GPA + 0x400, GPA + 0x800))


def test_notification_suppression_fields():
    mem, lay = _queue()
    _desc(mem, lay, 0, GPA + 0x1000, 64)
    _avail(mem, lay, [0, 0, 0], start=10)
    struct.pack_into("<H", mem, lay.used - GPA, 1)            # NO_NOTIFY left by someone
    n, st_ = process_buffer(mem, GPA, lay, last_avail=10, used_idx=10, event_idx=True)
    assert n == 3
    # with EVENT_IDX the device re-arms by publishing avail_event = its next index
    assert struct.unpack_from("<H", mem, lay.used - GPA + 4 + 8 * lay.size)[0] == 13
    n, st_ = process_buffer(mem, GPA, lay, last_avail=10, used_idx=10)
    assert struct.unpack_from("<H", mem, lay.used - GPA)[0] == 0      # flags cleared
    # used_event = 11 lies inside the 3 entries returned (used 10..13): one interrupt is due
    struct.pack_into("<H", mem, lay.avail - GPA + 4 + 2 * lay.size, 11)
    assert process_buffer(mem, GPA, lay, last_avail=10, used_idx=10, event_idx=True)[1]["irqs"] == 1
    struct.pack_into("<H", mem, lay.avail - GPA + 4 + 2 * lay.size, 20)
    assert process_buffer(mem, GPA, lay, last_avail=10, used_idx=10, event_idx=True)[1]["irqs"] == 0
    struct.pack_into("<H", mem, lay.avail - GPA, 1)           # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert process_buffer(mem, GPA, lay, last_avail=10, used_idx=10)[1]["irqs"] == 0


# ---------------------------------------------------------------- fuzzing against the reference

REGION = 4 * 4096
FUZZ_LAYOUT_BASE = (GPA, GPA + 0x400, GPA + 0x800)


def _mostly(common, rare, n: int = 3):
    """`common` about n times as often as `rare`."""
    return st.integers(0, n).flatmap(lambda i: rare if i == n else common)


@st.composite
def descriptor_queues(draw):
    """Descriptor tables that are mostly plausible (in-range buffers, short chains, valid
    `next`), so valid chains, loops and each malformation all occur."""
    size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    lay = QueueLayout(size, *FUZZ_LAYOUT_BASE)
    mem = bytearray(REGION)
    mem[0x1000:] = draw(st.binary(min_size=64, max_size=64)) * ((REGION - 0x1000) // 64)
    addr = _mostly(st.integers(GPA + 0x1000, GPA + REGION - 700),
                   st.one_of(st.integers(GPA, GPA + REGION), st.integers(GPA - 64, GPA + 64),
                             st.integers(GPA + REGION - 600, GPA + REGION + 64),
                             st.integers(0, (1 << 64) - 1)))
    length = _mostly(st.integers(0, 600),
                     st.one_of(st.integers(0, (1 << 32) - 1), st.sampled_from([0, 1000, 4096])))
    flags = _mostly(st.sampled_from([0, 1, 1, 2, 3, 3]), st.integers(0, 0xFFFF), 6)
    nxt = _mostly(st.integers(0, max(size - 1, 0)), st.integers(size, size + 2), 6)
    for i in range(size):
        struct.pack_into("<QIHH", mem, lay.desc - GPA + 16 * i, draw(addr), draw(length),
                         draw(flags), draw(nxt))
    last_avail = draw(st.integers(0, 0xFFFF))
    used_idx = draw(st.integers(0, 0xFFFF))
    pending = draw(_mostly(st.integers(1, size), st.integers(0, 0xFFFF), 5))
    head = _mostly(st.integers(0, size - 1), st.integers(size, size + 1), 8)
    for k in range(min(pending, size)):
        struct.pack_into("<H", mem, lay.avail - GPA + 4 + 2 * ((last_avail + k) % size),
                         draw(head))
    struct.pack_into("<H", mem, lay.avail - GPA + 2, (last_avail + pending) & 0xFFFF)
    struct.pack_into("<H", mem, lay.avail - GPA + 4 + 2 * size, draw(st.integers(0, 0xFFFF)))
    mode = draw(st.sampled_from(["tx", "echo"]))
    return mem, lay, dict(mode=mode, max_bytes=draw(st.sampled_from([64, 1000, 65536])),
                          last_avail=last_avail, used_idx=used_idx,
                          event_idx=draw(st.booleans()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descriptor_queues())
def test_fuzz_descriptor_tables_match_the_reference_device(q):
    mem, lay, kw = q
    expect_mem = bytearray(mem)
    expect, expect_n = reference(expect_mem, GPA, lay, **kw)
    got, n, stats = run_device(mem, lay, check=True, verify=True, **kw)
    assert got == expect
    if got == "ok":
        assert n == expect_n == stats["chains"]
    assert mem == expect_mem          # the device wrote exactly what the rules allow, no more


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([1, 4, 16, 64]), rings=st.binary(min_size=0x800, max_size=0x800),
       last_avail=st.integers(0, 0xFFFF), used_idx=st.integers(0, 0xFFFF),
       mode=st.sampled_from(["tx", "echo"]), event_idx=st.booleans())
def test_fuzz_random_ring_bytes_never_crash(size, rings, last_avail, used_idx, mode, event_idx):
    """Random bytes for the whole descriptor table and available ring: a clean outcome, and in
    transmit mode nothing but the used ring changes."""
    lay = QueueLayout(size, *FUZZ_LAYOUT_BASE)
    mem = bytearray(REGION)
    mem[:0x800] = rings
    before = bytes(mem)
    expect_mem = bytearray(mem)
    expect, _ = reference(expect_mem, GPA, lay, mode=mode, max_bytes=65536,
                          last_avail=last_avail, used_idx=used_idx, event_idx=event_idx)
    got, _, _ = run_device(mem, lay, mode=mode, last_avail=last_avail, used_idx=used_idx,
                           event_idx=event_idx)
    assert got == expect and mem == expect_mem
    if mode == "tx":
        u0, u1 = lay.used - GPA, lay.used - GPA + 6 + 8 * size
        assert mem[:u0] == before[:u0] and mem[u1:] == before[u1:]


# ================================================================ host baselines (no KVM)

@pytest.mark.parametrize("fn", [_io.native_ring, _io.tcp_loopback], ids=["native_ring", "tcp"])
@pytest.mark.parametrize("msg_bytes", [64, 1000, 65536])
def test_host_paths_deliver_every_byte_in_order(fn, msg_bytes):
    chunk = 40 if msg_bytes > 4096 else 300
    _, r = fn(msg_bytes, chunk_msgs=chunk, chunks=3, warm_chunks=1, batch=7,
              flags=_io.XFER_VERIFY)
    assert r["received"] == 4 * chunk and r["bytes"] == 4 * chunk * msg_bytes
    assert r["seq_errors"] == r["len_errors"] == r["sum_errors"] == 0
    rtt, r = fn(msg_bytes, chunk_msgs=50, chunks=1, warm_chunks=0, echo=True,
                flags=_io.XFER_VERIFY)
    assert r["received"] == 50 and (rtt > 0).all()
    assert r["seq_errors"] == r["len_errors"] == r["sum_errors"] == 0


@pytest.mark.parametrize("fn", [_io.native_ring, _io.tcp_loopback], ids=["native_ring", "tcp"])
def test_host_paths_detect_lost_and_corrupted_messages(fn):
    flags = _io.XFER_VERIFY | _io.XFER_BAD_SEQ | _io.XFER_BAD_SUM
    _, r = fn(256, chunk_msgs=20, chunks=2, flags=flags)
    assert r["seq_errors"] == 1 and r["sum_errors"] == 1


def test_host_transfer_rejects_bad_sizes():
    from vlab._errors import KvmError

    with pytest.raises(KvmError, match="msg_bytes 0"):
        _io.native_ring(0, chunk_msgs=1, chunks=1)
    with pytest.raises(KvmError, match="msg_bytes 65537"):
        _io.tcp_loopback(65537, chunk_msgs=1, chunks=1)


def test_thread_cpu_time_of_self_and_of_another_thread():
    tid = threading.get_native_id()
    c0 = _io.task_cpu_ns(tid)
    t = time.thread_time_ns()
    while time.thread_time_ns() - t < 30_000_000:
        pass
    assert _io.task_cpu_ns(tid) - c0 >= 25_000_000
    box: dict = {}
    done = threading.Event()

    def other():
        box["tid"] = threading.get_native_id()
        t = time.thread_time_ns()
        while time.thread_time_ns() - t < 30_000_000:
            pass
        done.set()
        time.sleep(0.2)

    th = threading.Thread(target=other)
    th.start()
    done.wait()
    assert _io.task_cpu_ns(box["tid"]) >= 25_000_000      # read from /proc (a sleeping thread)
    th.join()


# ================================================================ guests (KVM)

def _paths():
    from vlab.experiments import _iopaths
    return _iopaths


@needs_kvm
@pytest.mark.parametrize("event_idx", [False, True], ids=["no_event_idx", "event_idx"])
@pytest.mark.parametrize("notify", ["user", "kernel", "poll"])
def test_virtio_delivers_every_byte_in_order(kvm, notify, event_idx):
    P = _paths()
    for mb, chunk in ((64, 150), (4096, 40), (65536, 12)):
        p = P.VirtioPath(notify=notify, msg_bytes=mb, event_idx=event_idx, verify=True, kvm=kvm)
        try:
            for batch in (1, 5):
                r = p.stream(chunk_msgs=chunk, chunks=3, warm=1, batch=batch)
                assert r.received == r.total_msgs == 4 * chunk
                assert r.extra["bytes"] == 4 * chunk * mb
                assert (r.seq_errors, r.len_errors, r.sum_errors) == (0, 0, 0)
                assert r.extra["completed"] == r.total_msgs and len(r.chunk_cycles) == 3
            e = p.echo(rounds=30, warm=2)
            assert e.received == 32 and len(e.rtt_cycles) == 30
            assert (e.seq_errors, e.len_errors, e.sum_errors) == (0, 0, 0)
            # the checks can fail: a skipped sequence number and a corrupted byte are seen
            r = p.stream(chunk_msgs=10, chunks=1, faults=_io.XFER_BAD_SEQ | _io.XFER_BAD_SUM)
            assert r.seq_errors == 1 and r.sum_errors == 1
            e = p.echo(rounds=10, warm=0, faults=_io.XFER_BAD_SUM)
            assert e.sum_errors == 1
        finally:
            p.close()


@needs_kvm
def test_virtio_kicks_exits_and_eventfd_counts_agree(kvm):
    P = _paths()
    n = 4 * 64
    for notify in ("user", "kernel", "poll"):
        p = P.VirtioPath(notify=notify, msg_bytes=256, kvm=kvm)
        try:
            for batch in (1, 8):
                r = p.stream(chunk_msgs=64, chunks=3, warm=1, batch=batch)
                kicks = r.extra["guest_kicks"]
                assert r.extra["device_kicks"] == kicks        # PIO exits / eventfd counts
                assert r.extra["bad_notifies"] == 0
                if notify == "user":
                    # the backend re-arms after every exit: one kick per published batch
                    assert kicks == n // batch
                    assert r.exits == kicks                    # KVM saw exactly those exits
                elif notify == "kernel":
                    assert 1 <= kicks <= n // batch
                    assert abs(r.exits - kicks) <= 2           # ioeventfd writes are exits
                else:
                    assert kicks == 0 and r.exits <= 2         # notifications suppressed
            if notify != "poll":
                # the model's kick: every notify write reaches the live device exactly once
                assert len(p.kicks(chunk_msgs=50, chunks=2, live=True)) == 2
                assert p.tx.stats()["kicks"] == 150 and p.tx.stats()["chains"] == 0
        finally:
            p.close()


@needs_kvm
@pytest.mark.parametrize("what", sorted(["loop", "addr", "oversize", "head", "avail_idx",
                                         "indirect", "next", "write_tx"]))
@pytest.mark.parametrize("notify", ["user", "kernel", "poll"])
def test_hostile_guest_breaks_its_queue_not_the_host(kvm, notify, what):
    P = _paths()
    p = P.VirtioPath(notify=notify, msg_bytes=64, kvm=kvm)
    try:
        with pytest.raises(VirtqueueError) as exc:
            p.hostile(what)
        want = {"write_tx": "direction"}.get(what, what)
        assert exc.value.kind == want and "queue broken" in str(exc.value)
        assert p.tx.stats()["error"] == want
        # a device reset makes the queue usable again
        r = p.stream(chunk_msgs=20, chunks=1)
        assert r.received == 40 and r.errors == 0
    finally:
        p.close()


@needs_kvm
@pytest.mark.parametrize("notify", ["poll", "doorbell", "vmm_wait"])
def test_ivshmem_delivers_every_byte_in_order(kvm, notify):
    P = _paths()
    for mb, chunk in ((64, 200), (4096, 40), (65536, 10)):
        p = P.IvshmemPath(notify=notify, msg_bytes=mb, verify=True, kvm=kvm)
        try:
            for batch in (1, 4):
                r = p.stream(chunk_msgs=chunk, chunks=3, warm=1, batch=batch)
                assert r.received == r.total_msgs == 4 * chunk
                assert (r.seq_errors, r.len_errors, r.sum_errors) == (0, 0, 0)
            e = p.echo(rounds=25, warm=3)
            assert e.received == 28 and e.errors == 0 and len(e.rtt_cycles) == 25
            r = p.stream(chunk_msgs=10, chunks=1, faults=_io.XFER_BAD_SEQ | _io.XFER_BAD_SUM)
            assert r.seq_errors == 1 and r.sum_errors == 1
        finally:
            p.close()


@needs_kvm
def test_ivshmem_vmm_wait_accounting(kvm):
    """notify=vmm_wait: the doorbell waited for in the VMM (tests/test_io_irq.py has the
    doorbell as an interrupt)."""
    P = _paths()
    p = P.IvshmemPath(notify="vmm_wait", msg_bytes=64, kvm=kvm)
    try:
        e = p.echo(rounds=20, warm=0)
        assert e.received == 20 and e.errors == 0
        # the guests' own counts agree with the VMM's: every wait the guests announced was one
        # exit to the wait handler, and no handler consumed more rings than were rung
        w_a = _io.doorbell_counts(p.a.vm, p.wait_a)
        w_b = _io.doorbell_counts(p.b.vm, p.wait_b)
        assert w_a[0] + w_b[0] == e.extra["waits"] >= 1
        assert 1 <= w_a[1] + w_b[1] <= e.extra["kicks"]
        # kicks are ioeventfd exits, waits are user-space exits: KVM counted both
        assert e.exits >= e.extra["waits"] + e.extra["kicks"]
        # every wait is one exit to user space (the VMM's count), and no interrupt is involved
        assert e.user_exits == e.extra["waits"] and e.irqs == 0
    finally:
        p.close()
    p = P.IvshmemPath(notify="poll", msg_bytes=64, kvm=kvm)
    try:
        r = p.stream(chunk_msgs=100, chunks=2)
        assert r.exits <= 2 and r.extra["kicks"] == 0 and r.extra["waits"] == 0
    finally:
        p.close()


@needs_kvm
def test_ring_code_alone_runs_in_guest_and_host(kvm):
    P = _paths()
    p = P.IvshmemPath(notify="poll", msg_bytes=256, kvm=kvm)
    try:
        assert p.solo(rounds=4, chunks=2) > 0
    finally:
        p.close()
    assert P.host_solo(256, rounds=4, chunks=2) > 0


@needs_kvm
def test_abort_stops_a_spinning_guest(kvm):
    from vlab import Machine
    from vlab._errors import KvmError
    from vlab.vmm.payloads import MICRO_OPS

    with Machine(kvm=kvm) as m:
        m.set_args(MICRO_OPS["spin"])
        timer = threading.Timer(0.3, _io.abort_vm, (m.vm, "stop it"))
        timer.start()
        with pytest.raises(KvmError) as exc:
            m.run(timeout=120)
        timer.join()
        assert exc.value.op == "vlab_vm_abort" and "stop it" in str(exc.value)
        with pytest.raises(KvmError):              # an aborted VM stays stopped
            m.run(timeout=120)


@needs_kvm
def test_ivshmem_peer_failure_does_not_hang_the_other_vm(kvm):
    """A consumer that fails (it refuses the ring's geometry) aborts the producer, which would
    otherwise spin on the full ring until the watchdog."""
    from vlab._errors import GuestFailure

    P = _paths()
    p = P.IvshmemPath(notify="poll", msg_bytes=64, kvm=kvm, timeout=120)
    try:
        from vlab.vmm.payloads import P_ARG0

        p._setup(1, 2, 1, 100000, 4, 1, 0)
        p.b.params[P_ARG0 + 1] = 4096        # the consumer expects messages the ring cannot hold
        with pytest.raises(GuestFailure, match="shared ring malformed"):
            p._run_pair()
    finally:
        p.close()


# ================================================================ SR-IOV

@pytest.mark.parametrize("tree,reason", [
    ("none", "no SR-IOV capable device (kernel built without CONFIG_PCI_IOV)"),
    ("pf_no_vfs", "SR-IOV PF 0000:3b:00.0 has no VFs enabled (sriov_numvfs = 0)"),
    ("vf_other_driver", "VF 0000:3b:10.0 is bound to ixgbevf, not vfio-pci"),
    ("vf_vfio", None),
])
def test_sriov_precondition_on_recorded_trees(tree, reason):
    from vlab import host as _host
    from vlab.experiments import io

    host = _host.fingerprint(str(DATA / "sriov" / tree))
    got = io.sriov_reason(host)
    if reason is None:
        assert got is None
        assert io.sriov_target(host) == {"bdf": "0000:3b:10.2", "group_dev": "/dev/vfio/91",
                                         "iommu_group": 91, "pf": "0000:3b:00.0"}
    else:
        assert got.startswith(reason)
        from vlab._errors import UsageError
        with pytest.raises(UsageError, match="io.sriov: "):
            io.sriov_target(host)


def test_sriov_requirement_skips_with_the_reason():
    from vlab.run import registry as _experiment
    from vlab import host as _host

    exp = _experiment.get("io.sriov")
    host = _host.fingerprint(str(DATA / "sriov" / "pf_no_vfs"))
    host["kvm"] = {"usable": True}
    assert exp.check(host, {}) == "SR-IOV PF 0000:3b:00.0 has no VFs enabled (sriov_numvfs = 0)"
    host = _host.fingerprint(str(DATA / "sriov" / "vf_vfio"))
    host["kvm"] = {"usable": True}
    assert exp.check(host, {}) is None


def test_vfio_open_failures_name_what_failed(tmp_path):
    from vlab._errors import KvmError

    with pytest.raises(KvmError) as exc:
        _io.Vfio("/dev/vfio/91", "0000:3b:10.2", container=str(tmp_path / "no-vfio"))
    assert exc.value.op == "open" and "VFIO container" in str(exc.value)
    fake = tmp_path / "not-a-container"
    fake.write_text("")
    with pytest.raises(KvmError) as exc:
        _io.Vfio("/dev/vfio/91", "0000:3b:10.2", container=str(fake))
    assert exc.value.op == "VFIO_GET_API_VERSION"


# ================================================================ CLI and parameters

def _vlab(*args):
    return subprocess.run([sys.executable, "-m", "vlab", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["io.virtio", "-p", "msg_bytes=0"], "msg_bytes must be an integer from 64 to 65536"),
    (["io.ivshmem", "-p", "msg_bytes=70000"], "msg_bytes must be"),
    (["io.virtio", "-p", "qsize=100"], "qsize must be a power of two"),
    (["io.virtio", "-p", "msg_bytes=65536", "-p", "qsize=16"], "cannot hold a 65536-byte"),
    (["io.ivshmem", "-p", "notify=kernel"], "notify must be one of poll, doorbell"),
    (["io.native_ring", "-p", "batch=0"], "batch must be"),
])
def test_bad_io_parameters_exit_2_with_one_line(args, msg, tmp_path):
    proc = _vlab("run", *args, "-o", str(tmp_path / "r.json"))
    assert proc.returncode == 2, proc.stderr
    assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


@needs_kvm
def test_sriov_run_on_this_host_is_a_skip_row(tmp_path):
    import json

    out = tmp_path / "r.json"
    proc = _vlab("run", "io.sriov", "--processes", "1", "--values", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    from vlab.host import sriov as _sriov
    reason = _sriov.detect("/")["reason"]
    if reason is None:
        pytest.skip("this host has a VF on vfio-pci: io.sriov runs for real")
    assert {r["metric"] for r in rows} == {"mmio_read_cycles", "mmio_write_cycles",
                                           "exits_per_access", "dma_map_ns_per_page",
                                           "dma_unmap_ns_per_page"}
    assert all(r["status"] == "skip" and r["reason"] == reason for r in rows)


def test_virtio_model_row_names_the_idle_ipi_when_the_host_halts_at_once():
    """The kernel-mode model row says why a kick costs more than exits.pio_kernel on a host
    whose idle CPUs halt at once (recorded in host.cpuidle), and says nothing otherwise."""
    from vlab.experiments import io as io_exp

    extras = [{"ns_per_msg_mean": 21_000.0,
               "model": {"exits_pio_plus_copy_ns": 16_400.0, "kick_live_ns": 18_800.0}}]
    args = ("model_ns_per_msg", [20_000.0], extras)
    halts = {"cpuidle": {"driver": "haltpoll", "governor": "haltpoll", "haltpoll_ns": 0}}
    polls = {"cpuidle": {"driver": "haltpoll", "governor": "haltpoll", "haltpoll_ns": 200_000}}
    warnings, flags, extra = io_exp.annotate({"notify": "kernel"}, halts, *args)
    assert flags == {"model": True}
    assert any("IPI" in w and "haltpoll.guest_halt_poll_ns" in w for w in warnings)
    assert extra["measured_over_exits_pio_plus_copy"] == pytest.approx(21_000 / 16_400)
    other_driver = {"cpuidle": {"driver": "intel_idle", "governor": "menu", "haltpoll_ns": 0}}
    for params, host in (({"notify": "kernel"}, polls), ({"notify": "user"}, halts),
                         ({"notify": "kernel"}, other_driver), ({"notify": "kernel"}, {})):
        warnings, _, extra = io_exp.annotate(params, host, *args)
        assert not any("IPI" in w for w in warnings) and "host_idle" not in extra
