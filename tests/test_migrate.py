"""Live migration: the stream's framing and validation, and real migrations under KVM between
two VMM processes on loopback, including the fault cases (a peer dies, a stream is corrupted or
truncated, a link too slow to converge). Guests are small (a few MiB) so the suite stays fast;
every wait is bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from conftest import needs_kvm

from vlab.migration import stream as ms
from vlab._errors import KvmError, UsageError

PY = sys.executable
SMALL = 4 << 20


# ------------------------------------------------------------------ helpers

def _pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def _frames(build) -> bytes:
    """The bytes a Writer produces for `build(writer)`."""
    a, b = _pair()
    out = bytearray()
    done = threading.Event()

    def drain():
        while True:
            try:
                chunk = b.recv(1 << 16)
            except socket.timeout:
                break
            if not chunk:
                break
            out.extend(chunk)
        done.set()

    t = threading.Thread(target=drain)
    t.start()
    build(ms.Writer(a))
    a.shutdown(socket.SHUT_WR)
    t.join(10)
    a.close()
    b.close()
    return bytes(out)


def _read_all(data: bytes, expect=None):
    """Feed `data` to a Reader; the messages, or the StreamError it raised."""
    a, b = _pair()
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    r = ms.Reader(b)
    msgs = []
    try:
        while True:
            mtype, pl = r.read(expect)
            msgs.append((mtype, bytes(pl)))
    except ms.StreamError as e:
        return msgs, e
    finally:
        a.close()
        b.close()


def _page_hashes(data: bytes) -> np.ndarray:
    from vlab.vmm._native import ffi, lib

    n = len(data) // 4096
    out = np.empty(n, dtype=np.uint64)
    lib.vlab_mem_buffer_hashes(ffi.from_buffer(data), n, ffi.from_buffer("uint64_t[]", out))
    return out


def _hello() -> dict:
    return {"protocol": 1, "strategy": "precopy", "tsc_khz": 1, "boot_id": "x", "state_size": 1,
            "page_size": 4096, "vlab": "0"}


def _with_header(data: bytes, off: int, **fields) -> bytes:
    """Rewrite fields of the header at `off` and fix its header CRC."""
    names = ("magic", "version", "type", "seq", "length", "crc", "hcrc")
    vals = dict(zip(names, ms.HEADER.unpack_from(data, off)))
    vals.update(fields)
    head = bytearray(ms.HEADER.pack(*(vals[n] for n in names)))
    head[20:24] = struct.pack("<I", zlib.crc32(head[:20]))
    return data[:off] + bytes(head) + data[off + ms.HEADER.size:]


# ------------------------------------------------------------------ the stream (no KVM)

def test_stream_round_trip_and_sequence():
    pages = os.urandom(2 * 4096)
    idx = np.array([7, 3], dtype=np.uint64)

    def build(w):
        w.send_json(ms.HELLO, _hello())
        w.send_pages(1, idx, _page_hashes(pages), pages)
        w.send(ms.STATE, *ms.encode_state(0, b"s" * 40))

    msgs, err = _read_all(_frames(build))
    assert isinstance(err, ms.PeerGone)          # clean end between messages
    assert [m[0] for m in msgs] == [ms.HELLO, ms.PAGES, ms.STATE]
    assert ms.decode_json(ms.HELLO, memoryview(msgs[0][1]))["strategy"] == "precopy"
    slot, flags, got_idx, got_h, data = ms.decode_pages(memoryview(msgs[1][1]))
    assert slot == 1 and flags == 0 and got_idx.tolist() == [7, 3]
    assert bytes(data) == pages and np.array_equal(got_h, _page_hashes(pages))
    assert ms.decode_state(memoryview(msgs[2][1]), 40) == (0, b"s" * 40)


@pytest.mark.parametrize("case, needle", [
    ("magic", "not a vlab migration stream"),
    ("header_crc", "header CRC mismatch"),
    ("version", "unsupported stream version 2"),
    ("type", "unknown message type 99"),
    ("seq", "was lost, repeated or reordered"),
    ("length", "over the"),
    ("payload_crc", "payload CRC mismatch"),
    ("cut_header", "stream truncated"),
    ("cut_payload", "stream truncated"),
    ("unexpected", "unexpected STATE"),
])
def test_stream_rejects_malformed(case, needle):
    good = _frames(lambda w: (w.send_json(ms.HELLO, _hello()),
                              w.send(ms.STATE, *ms.encode_state(0, b"s" * 40))))
    second = ms.HEADER.size + ms.HEADER.unpack_from(good, 0)[4]
    data = good
    expect = None
    if case == "magic":
        data = b"GET / HTTP/1.1\r\n" + b"x" * 64
    elif case == "header_crc":
        data = good[:5] + bytes([good[5] ^ 1]) + good[6:]
    elif case == "version":
        data = _with_header(good, 0, version=2)
    elif case == "type":
        data = _with_header(good, 0, type=99)
    elif case == "seq":
        data = _with_header(good, second, seq=5)
    elif case == "length":
        data = _with_header(good, 0, length=ms.LIMITS[ms.HELLO] + 1)
    elif case == "payload_crc":
        data = good[:ms.HEADER.size + 3] + b"#" + good[ms.HEADER.size + 4:]
    elif case == "cut_header":
        data = good[:second + 10]
    elif case == "cut_payload":
        data = good[:second + ms.HEADER.size + 3]
    elif case == "unexpected":
        expect = {ms.HELLO, ms.PAGES}
    msgs, err = _read_all(data, expect)
    assert isinstance(err, ms.StreamError) and not isinstance(err, ms.PeerGone)
    assert needle in str(err), str(err)


@pytest.mark.parametrize("mtype, payload, needle", [
    (ms.HELLO, b"{not json", "not valid JSON"),
    (ms.HELLO, b"[1, 2]", "not a JSON object"),
    (ms.HELLO, json.dumps({**_hello(), "protocol": True}).encode(), "'protocol' missing or not int"),
    (ms.ROUND, json.dumps({"round": 0, "pages": "3", "final": False}).encode(), "'pages'"),
])
def test_json_messages_are_checked(mtype, payload, needle):
    with pytest.raises(ms.StreamError, match=needle.replace("(", r"\(")):
        ms.decode_json(mtype, memoryview(payload))


def test_binary_messages_are_length_checked():
    with pytest.raises(ms.StreamError, match="need"):
        ms.decode_pages(memoryview(struct.pack("<HHI", 0, 0, 2) + b"\0" * 100))
    with pytest.raises(ms.StreamError, match="1..1024 allowed"):
        ms.decode_pages(memoryview(struct.pack("<HHI", 0, 0, 0)))
    with pytest.raises(ms.StreamError, match="this vlab's state is 64 bytes"):
        ms.decode_state(memoryview(struct.pack("<II", 0, 63) + b"\0" * 63), 64)
    with pytest.raises(ms.StreamError, match="need"):
        ms.decode_dirtymap(memoryview(struct.pack("<HHI", 0, 0, 65) + b"\0" * 8))
    with pytest.raises(ms.StreamError, match="do not fit"):
        ms.decode_req(memoryview(struct.pack("<HHI", 0, 0, 3) + b"\0" * 16))
    with pytest.raises(ms.StreamError, match="refusing to send"):
        ms.Writer(socket.socket()).send(ms.HELLO, b"x" * (ms.LIMITS[ms.HELLO] + 1))


def test_token_bucket_limits_rate():
    b = ms.Bucket(4e6, burst=1e5)            # 4 MB/s
    t0 = time.monotonic()
    for _ in range(10):
        b.take(100_000)                       # 1 MB in all, 0.1 MB of it burst
    assert time.monotonic() - t0 >= 0.9e6 / 4e6 * 0.95
    assert b.waited_s > 0
    free = ms.Bucket(None)
    free.take(1 << 40)
    assert free.waited_s == 0


def test_addresses_and_sizes():
    from vlab._units import parse_rate, parse_size
    from vlab.migration.session import parse_addr

    assert parse_addr("7000", listen=True) == ("127.0.0.1", 7000)
    assert parse_addr("0.0.0.0:0", listen=True) == ("0.0.0.0", 0)
    assert parse_addr("10.1.2.3:9", listen=False) == ("10.1.2.3", 9)
    for bad, listen in (("host", False), ("h:port", False), ("h:0", False), ("h:70000", True)):
        with pytest.raises(UsageError):
            parse_addr(bad, listen=listen)
    assert parse_size("64M", "m") == 64 << 20 and parse_size("1GiB", "m") == 1 << 30
    assert parse_rate("2G", "b") == 2e9 and parse_rate("100Mbit/s", "b") == 1e8
    for bad in ("fast", "-1M", "0"):
        with pytest.raises(UsageError):
            parse_size(bad, "m")


# ------------------------------------------------------------------ real migrations

def _start_dest(*extra: str, io_timeout: float = 10.0):
    p = subprocess.Popen([PY, "-m", "vlab.migrate", "--listen", "127.0.0.1:0", "--json",
                          "--accept-timeout", "30", "--io-timeout", str(io_timeout), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from vlab.migration.session import _read_line

    line = _read_line(p, 30)
    if not line.startswith("LISTENING "):
        p.kill()
        out, err = p.communicate(timeout=10)
        pytest.fail(f"destination did not start: {line!r} {err[-500:]}")
    return p, line.split()[1]


def _dest_status(p, timeout: float = 60.0) -> tuple[int, dict, str]:
    out, err = p.communicate(timeout=timeout)
    from vlab.migration.session import _last_json

    return p.returncode, _last_json(out) or {}, err


def _cfg(**kw):
    from vlab.migration.guest import GuestSpec
    from vlab.migration.options import MigrateOptions
    from vlab.migration.session import RunConfig

    spec = GuestSpec(**{k: v for k, v in kw.items() if k in GuestSpec.__dataclass_fields__})
    opts = MigrateOptions(**{k: v for k, v in kw.items()
                             if k in MigrateOptions.__dataclass_fields__})
    rc = {k: v for k, v in kw.items() if k in ("warmup_s", "trace_s", "trace_interval_ms")}
    rc.setdefault("warmup_s", 0.2)
    return RunConfig(spec=spec, opts=opts, **rc)


def _counter(src) -> int:
    from vlab.migration.guest import counter_of

    return counter_of(src.vm, src.data_gpa)


def _advances(src, timeout: float = 10.0) -> bool:
    """The guest's counter moves (it runs), within `timeout` on a busy host."""
    c0 = _counter(src)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.05)
        if _counter(src) != c0:
            return True
    return False


def _assert_verified(res: dict) -> None:
    assert res["error"] is None, res["error"]
    assert res["verified"] is True, (res.get("guest_problems"), res.get("memory_mismatches"))
    assert res["memory_mismatches"] == 0 and res["memory_verified"]
    rep = res["guest_report"]
    assert rep["bad_pages"] == 0 and rep["seq_sum"] == rep["writes"]
    assert rep["migrations"] == 1
    assert 0 <= rep["counter"] - res["counter_at_pause"] - rep["ticks_since_migration"] <= 1
    assert res["destination"]["status"] == "ok"
    assert res["destination"]["guest_resumed"] is True
    assert res["downtime_ms"] > 0 and res["total_ms"] > res["downtime_ms"]
    assert res["bytes_sent"] >= sum(res["pages_per_round"]) * 4096
    assert res["tsc_step_ms"] is not None and res["tsc_step_ms"] >= 0


@needs_kvm
@pytest.mark.parametrize("mode", ["bitmap", "clear", "ring"])
def test_precopy_migration_is_verified(mode):
    from vlab.migration.session import run_local

    # a link limit makes the convergence test use a fixed rate, not a measured one that a
    # busy host can make arbitrarily low
    res = run_local(_cfg(mem=SMALL, rate=20000, mode=mode, bandwidth=200e6, trace_s=0.3,
                         trace_interval_ms=25), run_after=0.3, timeout=120)
    _assert_verified(res)
    assert res["outcome"] == "converged" and res["rounds"] >= 2
    assert res["pages_per_round"][0] == res["guest_pages"]
    assert res["guest_report"]["writes"] > 0
    assert res["model"]["model"] is True and res["model"]["pages_per_round"][0] == res["guest_pages"]


@needs_kvm
def test_counter_workload_continues():
    from vlab.migration.session import run_local

    res = run_local(_cfg(workload="counter", mem=2 << 20, bandwidth=200e6), run_after=0.3,
                    timeout=120)
    _assert_verified(res)
    assert res["guest_report"]["ticks_since_migration"] > 0
    assert res["guest_report"]["counter"] > res["counter_at_pause"]


@needs_kvm
@pytest.mark.parametrize("rounds", [1, 0])
def test_postcopy_demand_faults(rounds):
    """Post-copy after one pre-copy round (staged pages installed locally, dirtied ones
    fetched) and pure post-copy (everything fetched): verified, demand faults reported."""
    from vlab.migration.postcopy import uffd_status
    from vlab.migration.session import run_local

    why = uffd_status()
    if why:
        pytest.skip(why)
    # a fast writer over a working set big enough that pages are still missing at resume
    res = run_local(_cfg(mem=16 << 20, rate=0, strategy="postcopy", postcopy_rounds=rounds,
                         bandwidth=40e6), run_after=0.5, timeout=120)
    _assert_verified(res)
    assert res["outcome"] == "postcopy" and res["rounds"] == rounds
    d = res["destination"]
    assert d["demand_faults"] > 0 and d["fault_latency_ms"]["n"] == d["demand_faults"]
    assert d["fault_latency_ms"]["median"] > 0
    assert res["postcopy_pages"] == res["postcopy_demand_served"] + res["postcopy_pushed"]
    if rounds == 0:
        assert res["postcopy_pages"] == res["guest_pages"] and d["local_faults"] == 0
    else:
        assert res["postcopy_pages"] < res["guest_pages"]


@needs_kvm
def test_stale_page_is_caught():
    """verified is computed: a page left out of the final round makes it false, and the guest
    itself finds the stale page on the destination."""
    from vlab.migration.session import connect
    from vlab.migration.source import Source

    dest, addr = _start_dest()
    # a limited link, so the migration lasts long enough for the writer to dirty pages in
    # the final round even when a busy host deschedules it for a while
    cfg = _cfg(mem=SMALL, rate=2000, drop_pages=1, bandwidth=20e6)
    src = Source(cfg.spec, cfg.opts)
    try:
        src.start()
        time.sleep(0.3)
        with connect(addr) as sock:
            res = src.migrate(sock)
    finally:
        src.close()
    code, st, err = _dest_status(dest)
    assert len(res["dropped_pages"]) == 1
    assert res["outcome"] in ("converged", "max_rounds_stop_copy")
    assert res["verified"] is False
    assert res["memory_mismatches"] >= 1 and res["first_mismatch"]["slot"] == 1
    assert res["guest_report"]["bad_pages"] >= 1
    assert res["guest_ok"] is False


@needs_kvm
def test_destination_killed_mid_migration():
    """The source notices, stops dirty logging, and its guest runs on with its state intact."""
    from vlab.migration.session import connect
    from vlab.migration.source import Source

    dest, addr = _start_dest()
    cfg = _cfg(mem=SMALL, rate=5000, bandwidth=2e6)       # round 0 alone takes ~6 s
    src = Source(cfg.spec, cfg.opts)
    out = {}
    try:
        src.start()
        time.sleep(0.2)
        sock = connect(addr)
        t = threading.Thread(target=lambda: out.update(src.migrate(sock)))
        t.start()
        time.sleep(1.0)
        dest.kill()
        t.join(40)
        assert not t.is_alive(), "source did not notice the destination died"
        sock.close()
        dest.wait(10)
        assert out["outcome"] == "failed" and out["guest_running"] is True
        assert "connection" in out["error"] or "closed" in out["error"]
        assert not src.tracker.active
        with pytest.raises(KvmError, match="KVM_GET_DIRTY_LOG"):
            src.vm.get_dirty_log(src.slots[1])             # logging is off in KVM itself
        assert _advances(src)                              # still running
        rep = src.finish_guest(30)
        assert rep["bad_pages"] == 0 and rep["seq_sum"] == rep["writes"] > 0
        assert rep["migrations"] == 0
    finally:
        src.close()


@needs_kvm
def test_destination_lost_at_switch_over_resumes_source():
    """A destination that vanishes after the source paused (mid final round): the source
    resumes its own copy, never having sent GO."""
    from vlab.migration.source import Source

    a, b = _pair()
    a.settimeout(10)
    b.settimeout(10)
    seen = []

    def fake_destination():
        r, w = ms.Reader(b), ms.Writer(b)
        try:
            while True:
                mtype, pl = r.read()
                seen.append(mtype)
                if mtype == ms.SYNC:
                    w.send_json(ms.SYNCED, ms.decode_json(mtype, pl))
                if mtype == ms.ROUND and ms.decode_json(mtype, pl)["final"]:
                    break
        finally:
            b.close()                                       # dies mid final round

    cfg = _cfg(mem=SMALL, rate=20000)
    src = Source(cfg.spec, cfg.opts)
    try:
        src.start()
        time.sleep(0.2)
        t = threading.Thread(target=fake_destination)
        t.start()
        res = src.migrate(a)
        t.join(10)
        assert ms.ROUND in seen and res["outcome"] == "failed" and res["guest_running"]
        assert _advances(src)
        rep = src.finish_guest(30)
        assert rep["bad_pages"] == 0 and rep["seq_sum"] == rep["writes"] and rep["migrations"] == 0
    finally:
        a.close()
        src.close()


@needs_kvm
def test_source_killed_before_final_round():
    """The destination discards everything and exits with an error; it never runs the guest."""
    dest, addr = _start_dest()
    src = subprocess.Popen([PY, "-m", "vlab.migrate", "--to", addr, "--mem", "4M",
                            "--rate", "5000", "--bandwidth", "8M", "--warmup-s", "0.1", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)                                     # round 0 takes ~13 s at 8 Mbit/s
        assert src.poll() is None, src.stderr.read()
        src.send_signal(signal.SIGKILL)
        src.wait(10)
        code, st, err = _dest_status(dest, 30)
    finally:
        for p in (src, dest):
            if p.poll() is None:
                p.kill()
    assert code == 1
    assert st["status"] == "error" and st["guest_resumed"] is False and st["vcpu_runs"] == 0
    assert "truncated" in st["reason"] or "closed" in st["reason"] or "lost" in st["reason"]
    assert "vlab migrate: destination:" in err and "Traceback" not in err


@needs_kvm
def test_corrupted_or_truncated_streams_are_refused():
    """A real stream, captured, then damaged in many ways: the destination refuses each one
    with a clear reason and never resumes the guest."""
    from vlab.migration.destination import Destination
    from vlab.migration.source import Source

    # capture a real source's stream up to DONE
    a, b = _pair()
    a.settimeout(10)
    b.settimeout(10)
    captured = bytearray()
    marks: list[tuple[int, int]] = []               # (offset, type) of every message

    class Tap:
        def recv_into(self, buf, n):
            k = b.recv_into(buf, n)
            captured.extend(bytes(buf[:k]))
            return k

        def gettimeout(self):
            return b.gettimeout()

    def capture():
        r, w = ms.Reader(Tap()), ms.Writer(b)
        try:
            while True:
                off = len(captured)
                mtype, pl = r.read()
                marks.append((off, mtype))
                if mtype == ms.SYNC:
                    w.send_json(ms.SYNCED, ms.decode_json(mtype, pl))
                if mtype == ms.DONE:
                    break
        finally:
            b.close()

    cfg = _cfg(mem=2 << 20, rate=20000)
    src = Source(cfg.spec, cfg.opts)
    try:
        src.start()
        time.sleep(0.2)
        t = threading.Thread(target=capture)
        t.start()
        res = src.migrate(a)
        t.join(10)
        assert res["outcome"] == "failed" and res["guest_running"]
    finally:
        a.close()
        src.close()
    stream = bytes(captured)
    types = [m[1] for m in marks]
    assert types[:3] == [ms.HELLO, ms.LAYOUT, ms.ROUND] and types[-1] == ms.DONE
    pages_at = [off for off, ty in marks if ty == ms.PAGES]
    done_at = marks[-1][0]
    p0 = pages_at[len(pages_at) // 2]
    n0 = struct.unpack_from("<HHI", stream, p0 + ms.HEADER.size)[2]
    data_at = p0 + ms.HEADER.size + 8 + 16 * n0
    second_pages = pages_at[1]
    cases = {
        "cut in a header": (stream[:p0 + 7], "truncated"),
        "cut in page data": (stream[:data_at + 5000], "truncated"),
        "cut between messages": (stream[:done_at], "closed the connection"),
        "page data flipped": (stream[:data_at + 100] + bytes([stream[data_at + 100] ^ 0x40])
                              + stream[data_at + 101:], "hash mismatch"),
        "header flipped": (stream[:p0 + 9] + bytes([stream[p0 + 9] ^ 1]) + stream[p0 + 10:],
                           "header CRC"),
        "layout flipped": (stream[:marks[1][0] + 30] + b"9" + stream[marks[1][0] + 31:],
                           "CRC mismatch"),
        "message dropped": (stream[:second_pages] + stream[pages_at[2]:], "sequence number"),
        "newer version": (_with_header(stream, 0, version=7), "unsupported stream version 7"),
        "complete but no GO": (stream, "closed the connection"),
    }
    for name, (data, needle) in cases.items():
        x, y = _pair()
        x.settimeout(10)
        y.settimeout(10)
        dest = Destination(run_after=0.1, io_timeout=10)
        status: dict = {}
        t = threading.Thread(target=lambda: status.update(dest.serve(y)))
        t.start()

        def send(data=data):
            try:
                x.sendall(data)
                x.shutdown(socket.SHUT_WR)
            except OSError:
                pass                                      # the destination already hung up

        sender = threading.Thread(target=send)
        sender.start()
        t.join(30)
        y.close()                                         # unblocks a sender it stopped reading
        sender.join(30)
        x.close()
        assert not t.is_alive(), name
        assert status["status"] == "error", (name, status)
        assert needle in status["reason"], (name, status["reason"])
        assert status["guest_resumed"] is False and status["vcpu_runs"] == 0, name


@needs_kvm
@pytest.mark.parametrize("policy", ["stop_copy", "abort"])
def test_too_slow_to_converge_follows_policy(policy):
    """A writer far faster than the link: after max_rounds the policy decides, the result says
    which, and the model agrees that it would not have converged."""
    from vlab.migration.session import run_local

    res = run_local(_cfg(mem=2 << 20, rate=20000, bandwidth=8e6, max_rounds=2,
                         max_downtime_ms=0.5, policy=policy, trace_s=0.3,
                         trace_interval_ms=50), run_after=0.2, timeout=120)
    assert res["error"] is None, res["error"]
    assert res["model"]["converged"] is False
    if policy == "stop_copy":
        assert res["outcome"] == "max_rounds_stop_copy"
        assert res["model"]["outcome"] == "max_rounds_stop_copy"
        assert res["rounds"] == 3                       # two live rounds and the stop-and-copy
        _assert_verified(res)
    else:
        assert res["outcome"] == "aborted" and res["model"]["outcome"] == "aborted"
        assert res["rounds"] == 2 and res["downtime_ms"] is None and not res["verified"]
        assert res["destination"]["status"] == "aborted"
        assert res["destination"]["guest_resumed"] is False
        assert res["source_guest_ok"] is True           # it ran on where it was, intact
        assert res["source_guest_report"]["migrations"] == 0
        assert res["destination_exit"] == 1 and res["source_exit"] == 0


@needs_kvm
def test_auto_converge_throttles_the_guest():
    """Auto-converge throttles a CPU-bound writer (it drops its backlog after 1 ms) round by
    round, and the throttle is what the result records."""
    from vlab.migration.session import run_local

    res = run_local(_cfg(mem=2 << 20, rate=20000, lag_us=1000, bandwidth=8e6, max_rounds=4,
                         max_downtime_ms=0.5, auto_converge=True), run_after=0.2, timeout=120)
    assert res["error"] is None, res["error"]
    thr = res["throttle_per_round"]
    assert thr[:3] == [0.0, 0.2, pytest.approx(0.3)]
    _assert_verified(res)


@needs_kvm
def test_cli_migrate_end_to_end(tmp_path):
    out = tmp_path / "migrate.json"
    r = subprocess.run([PY, "-m", "vlab", "migrate", "--mem", "2M", "--rate", "5000",
                        "--bandwidth", "1G",
                        "--run-after", "0.2", "--warmup-s", "0.1", "--json", "-o", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["verified"] is True and res["outcome"] == "converged"
    from vlab import results                  # `vlab migrate` writes a results file too
    doc = results.read(out)
    assert doc["host"]["host_id"] and doc["destination_host"]["host_id"]
    assert [r["median"] for r in doc["rows"] if r["metric"] == "verified"] == [1.0]
    bad = subprocess.run([PY, "-m", "vlab", "migrate", "--to", "127.0.0.1:1", "--mem", "2M"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "cannot connect" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    usage = subprocess.run([PY, "-m", "vlab", "migrate", "--mem", "3M"], capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "multiple of 2 MiB" in usage.stderr


@needs_kvm
def test_experiment_rows_measured_beside_model():
    from vlab.run import registry as reg
    from vlab import results

    exp = reg.get("migration.live")
    params = dict(exp.quick)
    params = {k: v[0] for k, v in params.items()}
    params.update(mem=4 << 20, link_mbit=500)
    rows = exp.run(params, {}, lambda s: None)
    measured = {r["metric"]: r for r in rows if r["params"]["estimate"] == "measured"}
    model = {r["metric"]: r for r in rows if r["params"]["estimate"] == "precopy_sim"}
    assert set(measured) == {"total_ms", "downtime_ms", "rounds", "bytes_sent", "verified"}
    assert set(model) == {"total_ms", "downtime_ms", "rounds", "bytes_sent"}
    assert all(r["flags"]["model"] for r in model.values())
    assert not any((r.get("flags") or {}).get("model") for r in measured.values())
    assert measured["verified"]["median"] == 1.0
    assert measured["rounds"]["series"]["y"][0] == model["rounds"]["series"]["y"][0]
    doc = {"schema": results.SCHEMA, "run_id": "t", "started_at": "x", "finished_at": "x",
           "vlab_version": "0", "argv": [], "host": {"host_id": "h"}, "suite": None,
           "rows": rows}
    results.validate(doc)


def test_userfaultfd_reasons_from_recorded_settings():
    import errno

    from vlab.migration.postcopy import uffd_reason

    why = uffd_reason(errno.ENOSYS, "userfaultfd", unprivileged=None, euid=0, dev_exists=False)
    assert "CONFIG_USERFAULTFD" in why
    why = uffd_reason(errno.EPERM, "userfaultfd", unprivileged="0\n", euid=1000, dev_exists=True)
    assert "vm.unprivileged_userfaultfd=0" in why and "Operation not permitted" in why
    why = uffd_reason(errno.EPERM, "USERFAULTFD_IOC_NEW", unprivileged="1", euid=1000,
                      dev_exists=True)
    assert "CAP_SYS_PTRACE" in why and "USERFAULTFD_IOC_NEW" in why


def test_run_config_travels_as_json(tmp_path):
    """run_local hands its source a RunConfig as JSON: every field comes back, bad ones are
    refused in one line."""
    from vlab.migration.session import RunConfig

    cfg = _cfg(mem=4 << 20, rate=123, bandwidth=3e6, mode="clear", auto_converge=True,
               trace_s=0.5, trace_interval_ms=20, drop_pages=2)
    cfg.trace_out = str(tmp_path / "t.npz")
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    for bad in ({"spec": {"mem": 3 << 20}}, {"opts": {"mode": "nope"}}, {"spec": {"bogus": 1}},
                {"warmup": 1}, []):
        with pytest.raises(UsageError):
            RunConfig.from_dict(bad)


def test_child_refuses_bad_jobs(tmp_path):
    for job, needle in (({"role": "x"}, "job role"), ({"role": "source"}, "source job"),
                        ({"role": "source", "to": "h:1", "config": {"opts": {"max_rounds": 0}}},
                         "max rounds")):
        path = tmp_path / "job.json"
        path.write_text(json.dumps(job))
        r = subprocess.run([PY, "-m", "vlab.migration.child", str(path)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@needs_kvm
def test_vmm_page_moves_hash_what_they_copy():
    """vlab.vmm.migration: gather, scatter (to a slot and to a staging array) and the hashes
    agree with each other; buffers too small for the pages asked are refused before C runs."""
    from vlab.vmm.kvm import Kvm, Vm
    from vlab.vmm.migration import buffer_hashes, gather_pages, page_hashes, scatter_pages

    with Kvm() as kvm, Vm(kvm) as vm:
        a = vm.add_slot(0, 16 * 4096)
        b = vm.add_slot(1 << 20, 16 * 4096)
        a.array()[:] = np.frombuffer(os.urandom(16 * 4096), dtype=np.uint8)
        idx = np.array([1, 5, 15], dtype=np.uint64)
        buf, h = bytearray(3 * 4096), np.empty(3, dtype=np.uint64)
        gather_pages(a, idx, buf, h)
        assert np.array_equal(h, buffer_hashes(buf, 3))
        assert np.array_equal(h, page_hashes(a)[idx.astype(np.int64)])
        assert np.array_equal(scatter_pages(b, b.pages, idx, buf), h)
        assert np.array_equal(page_hashes(b)[idx.astype(np.int64)], h)
        stage = np.zeros(16 * 4096, dtype=np.uint8)
        assert np.array_equal(scatter_pages(stage, 16, idx, buf), h)
        assert bytes(stage[4096:8192]) == bytes(buf[:4096])
        with pytest.raises(ValueError):
            gather_pages(a, idx, bytearray(2 * 4096), h)
        with pytest.raises(ValueError):
            scatter_pages(stage, 17, idx, buf)
