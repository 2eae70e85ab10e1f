"""The live-migration stream: framing, message types, limits and validation (protocol 1).

Every message is a 24-byte header followed by a payload:

    magic u32 "VLMG" | version u16 | type u16 | seq u32 | length u32 | crc u32 | hcrc u32

`seq` counts messages in each direction from 0, so a dropped, repeated or reordered message is
caught. `length` is checked against the limit of the type before anything is read. `hcrc` is
the CRC32 of the header's first 20 bytes; `crc` is the CRC32 of the payload, except for PAGES,
where it covers the payload without the page data: each page carries its own 64-bit hash
instead, which the destination checks after writing the page into guest memory (the same hash
that verification uses, so integrity costs nothing extra).

Control messages are JSON objects whose keys and types are checked; bulk messages are binary:

    PAGES     slot u16, flags u16, count u32, index u64[count], hash u64[count], page data
    STATE     vcpu u32, size u32, the vCPU state blob (Vcpu.save_state)
    DIRTYMAP  slot u16, 0 u16, n_pages u32, bitmap u64[ceil(n_pages/64)]  (post-copy)
    HASHES    slot u16, 0 u16, first u32, count u32, 0 u32, hash u64[count]
    REQ       slot u16, 0 u16, count u32, index u64[count]  (post-copy demand fetches)
    CREDIT    installed u64: post-copy pages the destination has installed so far; the source
              keeps at most a small window of pushed pages in flight, so that a demand fetch
              never queues behind megabytes of background pages (head-of-line blocking)

Anything malformed, truncated or out of order raises `StreamError` with a one-line reason;
the peer closing the connection cleanly between messages raises `PeerGone`.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
import zlib
from typing import Any

import numpy as np

from vlab._errors import VlabError
from vlab._units import PAGE

MAGIC = 0x474D4C56          # "VLMG" little-endian
VERSION = 1
HEADER = struct.Struct("<IHHIIII")
MAX_BATCH = 1024             # pages per PAGES message
MAX_REQ = 1024
MAX_HASHES = 1 << 17

# source -> destination
HELLO, LAYOUT, ROUND, PAGES, STATE, DONE, GO, ABORT, FIN, DIRTYMAP, POSTDONE, SYNC = range(1, 13)
# destination -> source
READY, ACK, HASHES, REQ, REPORT, ERROR, CREDIT, SYNCED = range(20, 28)

NAMES = {HELLO: "HELLO", LAYOUT: "LAYOUT", ROUND: "ROUND", PAGES: "PAGES", STATE: "STATE",
         DONE: "DONE", GO: "GO", ABORT: "ABORT", FIN: "FIN", DIRTYMAP: "DIRTYMAP",
         POSTDONE: "POSTDONE", SYNC: "SYNC", SYNCED: "SYNCED", READY: "READY", ACK: "ACK", HASHES: "HASHES", REQ: "REQ",
         REPORT: "REPORT", ERROR: "ERROR", CREDIT: "CREDIT"}

_JSON_LIMIT = 1 << 16
LIMITS = {HELLO: _JSON_LIMIT, LAYOUT: _JSON_LIMIT, ROUND: _JSON_LIMIT, DONE: _JSON_LIMIT,
          GO: _JSON_LIMIT, ABORT: _JSON_LIMIT, FIN: _JSON_LIMIT, POSTDONE: _JSON_LIMIT,
          READY: _JSON_LIMIT, ACK: _JSON_LIMIT, REPORT: _JSON_LIMIT, ERROR: _JSON_LIMIT,
          SYNC: _JSON_LIMIT, SYNCED: _JSON_LIMIT,
          PAGES: 8 + MAX_BATCH * (16 + PAGE),
          STATE: 8 + (1 << 20),
          DIRTYMAP: 8 + (1 << 27),          # a bitmap for up to 2^30 pages (4 TiB)
          HASHES: 16 + 8 * MAX_HASHES,
          REQ: 8 + 8 * MAX_REQ,
          CREDIT: 8}
JSON_TYPES = {HELLO, LAYOUT, ROUND, DONE, GO, ABORT, FIN, POSTDONE, SYNC, READY, ACK, REPORT,
              ERROR, SYNCED}

# keys each JSON message must carry, with their types (more keys are allowed)
_NUM = (int, float)
SCHEMA: dict[int, dict[str, Any]] = {
    HELLO: {"protocol": int, "strategy": str, "tsc_khz": int, "boot_id": str, "state_size": int,
            "page_size": int, "vlab": str},
    LAYOUT: {"slots": list, "vcpus": int, "data_slot": int, "pages": int},
    ROUND: {"round": int, "pages": int, "final": bool},
    DONE: {"rounds": int, "pages_sent": int, "messages": int, "pause_ns": int},
    GO: {}, ABORT: {"reason": str}, FIN: {}, POSTDONE: {"pages_sent": int},
    SYNC: {"round": int}, SYNCED: {"round": int},
    READY: {"pages_received": int}, ACK: {"mark_ns": int, "boot_id": str, "resumed_ns": int},
    REPORT: {"guest": dict}, ERROR: {"reason": str},
}


class StreamError(VlabError):
    """The migration stream is malformed, truncated, out of order, or the peer failed."""


class PeerGone(StreamError):
    """The peer closed the connection (or it broke) between messages."""


def _recv_exact(sock: socket.socket, buf: memoryview, what: str) -> None:
    got = 0
    n = len(buf)
    while got < n:
        try:
            k = sock.recv_into(buf[got:], n - got)
        except socket.timeout:
            raise StreamError(f"peer silent for {sock.gettimeout():g} s while reading {what}") \
                from None
        except (ConnectionResetError, BrokenPipeError) as e:
            raise PeerGone(f"connection lost while reading {what}: {e.strerror}") from None
        if k == 0:
            if got == 0 and what.startswith("header"):
                raise PeerGone(f"peer closed the connection before {what}")
            raise StreamError(f"stream truncated: end of stream after {got} of {n} bytes of "
                              f"{what}")
        got += k


class Reader:
    """Reads and validates messages from a socket (one thread at a time)."""

    def __init__(self, sock: socket.socket, peer: str = "peer"):
        self.sock = sock
        self.peer = peer
        self.seq = 0
        self.bytes = 0
        self._hdr = bytearray(HEADER.size)
        self._buf = bytearray(1 << 20)

    def read(self, expect: set[int] | None = None) -> tuple[int, memoryview]:
        """The next message as (type, payload). The payload view is valid until the next read."""
        what = f"header of message #{self.seq}"
        _recv_exact(self.sock, memoryview(self._hdr), what)
        magic, version, mtype, seq, length, crc, hcrc = HEADER.unpack(self._hdr)
        if magic != MAGIC:
            raise StreamError(f"not a vlab migration stream: bad magic {magic:#010x} in message "
                              f"#{self.seq}")
        if zlib.crc32(self._hdr[:20]) != hcrc:
            raise StreamError(f"corrupted header in message #{self.seq} (header CRC mismatch)")
        if version != VERSION:
            raise StreamError(f"unsupported stream version {version} (this vlab speaks "
                              f"{VERSION})")
        name = NAMES.get(mtype)
        if name is None:
            raise StreamError(f"unknown message type {mtype} in message #{self.seq}")
        if seq != self.seq:
            raise StreamError(f"message #{self.seq} carries sequence number {seq}: a message "
                              f"was lost, repeated or reordered")
        if length > LIMITS[mtype]:
            raise StreamError(f"{name} message #{seq} claims {length} bytes, over the "
                              f"{LIMITS[mtype]}-byte limit")
        if expect is not None and mtype not in expect:
            want = "/".join(sorted(NAMES[t] for t in expect))
            raise StreamError(f"unexpected {name} (message #{seq}); expected {want}")
        if length > len(self._buf):
            self._buf = bytearray(length)
        view = memoryview(self._buf)[:length]
        _recv_exact(self.sock, view, f"{name} message #{seq} ({length} bytes)")
        covered = length
        if mtype == PAGES:
            covered = pages_meta_len(view, seq)
        if zlib.crc32(view[:covered]) != crc:
            raise StreamError(f"corrupted {name} message #{seq} (payload CRC mismatch)")
        self.seq += 1
        self.bytes += HEADER.size + length
        return mtype, view

    def read_json(self, mtype: int, payload: memoryview) -> dict:
        return decode_json(mtype, payload, self.seq - 1)


class Bucket:
    """Token bucket: at most `rate` bytes/s on average, bursts up to `burst` bytes."""

    def __init__(self, rate: float | None, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else (max(rate * 0.01, 2 << 20) if rate else 0)
        self.tokens = self.burst
        self.t = time.monotonic()
        self.waited_s = 0.0

    def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= n
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            self.waited_s += wait
            time.sleep(wait)


class Writer:
    """Frames and sends messages; safe to use from several threads."""

    def __init__(self, sock: socket.socket, bucket: Bucket | None = None):
        self.sock = sock
        self.bucket = bucket or Bucket(None)
        self.seq = 0
        self.bytes = 0
        self.messages = 0
        self._lock = threading.Lock()

    def send(self, mtype: int, *parts, crc_parts: int | None = None) -> int:
        """Send one message made of `parts` (bytes-like). `crc_parts`: how many leading parts
        the CRC covers (default all). Returns the bytes sent."""
        views = [memoryview(p).cast("B") for p in parts]
        length = sum(len(v) for v in views)
        if length > LIMITS[mtype]:
            raise StreamError(f"refusing to send a {NAMES[mtype]} message of {length} bytes "
                              f"(limit {LIMITS[mtype]})")
        crc = 0
        for v in views[:crc_parts if crc_parts is not None else len(views)]:
            crc = zlib.crc32(v, crc)
        with self._lock:
            head = bytearray(HEADER.pack(MAGIC, VERSION, mtype, self.seq, length, crc, 0))
            head[20:24] = struct.pack("<I", zlib.crc32(head[:20]))
            self.bucket.take(len(head) + length)
            _sendall(self.sock, [memoryview(head), *views])
            self.seq += 1
            self.bytes += len(head) + length
            self.messages += 1
        return len(head) + length

    def send_json(self, mtype: int, obj: dict) -> int:
        return self.send(mtype, json.dumps(obj, separators=(",", ":")).encode())

    def send_pages(self, slot: int, idx: np.ndarray, hashes: np.ndarray, data, flags: int = 0) -> int:
        count = len(idx)
        meta = struct.pack("<HHI", slot, flags, count)
        return self.send(PAGES, meta, np.ascontiguousarray(idx, np.uint64),
                         np.ascontiguousarray(hashes, np.uint64), memoryview(data)[:count * PAGE],
                         crc_parts=3)


def _sendall(sock: socket.socket, views: list[memoryview]) -> None:
    try:
        while views:
            n = sock.sendmsg(views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
    except socket.timeout:
        raise StreamError(f"peer did not take data for {sock.gettimeout():g} s") from None
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
        raise PeerGone(f"connection lost while sending: {e.strerror}") from None


# ------------------------------------------------------------------ payload decoding

def decode_json(mtype: int, payload: memoryview, seq: int = -1) -> dict:
    name = NAMES[mtype]
    try:
        obj = json.loads(bytes(payload).decode())
    except (UnicodeDecodeError, ValueError):
        raise StreamError(f"{name} message #{seq} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise StreamError(f"{name} message #{seq} is not a JSON object")
    for key, typ in SCHEMA.get(mtype, {}).items():
        val = obj.get(key)
        ok = isinstance(val, typ) and not (typ in (int, _NUM) and isinstance(val, bool))
        if not ok:
            raise StreamError(f"{name} message #{seq}: field {key!r} missing or not "
                              f"{getattr(typ, '__name__', 'a number')}")
    return obj


def pages_meta_len(payload: memoryview, seq: int = -1) -> int:
    """Length of the part of a PAGES payload before the page data (what its CRC covers)."""
    if len(payload) < 8:
        raise StreamError(f"PAGES message #{seq} is {len(payload)} bytes, shorter than its "
                          f"8-byte header")
    _, _, count = struct.unpack_from("<HHI", payload)
    if count == 0 or count > MAX_BATCH:
        raise StreamError(f"PAGES message #{seq} holds {count} pages (1..{MAX_BATCH} allowed)")
    if len(payload) != 8 + count * (16 + PAGE):
        raise StreamError(f"PAGES message #{seq}: {count} pages need "
                          f"{8 + count * (16 + PAGE)} bytes, the message has {len(payload)}")
    return 8 + 16 * count


def decode_pages(payload: memoryview, seq: int = -1):
    """(slot, flags, index u64[count], hash u64[count], data view) of a PAGES payload."""
    meta = pages_meta_len(payload, seq)
    slot, flags, count = struct.unpack_from("<HHI", payload)
    idx = np.frombuffer(payload, dtype=np.uint64, count=count, offset=8)
    hashes = np.frombuffer(payload, dtype=np.uint64, count=count, offset=8 + 8 * count)
    return slot, flags, idx, hashes, payload[meta:]


def decode_state(payload: memoryview, expected_size: int, seq: int = -1) -> tuple[int, bytes]:
    if len(payload) < 8:
        raise StreamError(f"STATE message #{seq} is shorter than its 8-byte header")
    vcpu, size = struct.unpack_from("<II", payload)
    if size != expected_size or len(payload) != 8 + size:
        raise StreamError(f"STATE message #{seq}: vCPU state of {len(payload) - 8} bytes "
                          f"(header says {size}); this vlab's state is {expected_size} bytes")
    return vcpu, bytes(payload[8:])


def decode_dirtymap(payload: memoryview, seq: int = -1) -> tuple[int, int, np.ndarray]:
    if len(payload) < 8:
        raise StreamError(f"DIRTYMAP message #{seq} is shorter than its 8-byte header")
    slot, _, n_pages = struct.unpack_from("<HHI", payload)
    words = (n_pages + 63) // 64
    if len(payload) != 8 + 8 * words:
        raise StreamError(f"DIRTYMAP message #{seq}: {n_pages} pages need {8 + 8 * words} "
                          f"bytes, the message has {len(payload)}")
    return slot, n_pages, np.frombuffer(payload, dtype=np.uint64, count=words, offset=8)


def decode_hashes(payload: memoryview, seq: int = -1) -> tuple[int, int, np.ndarray]:
    if len(payload) < 16:
        raise StreamError(f"HASHES message #{seq} is shorter than its 16-byte header")
    slot, _, first, count, _ = struct.unpack_from("<HHIII", payload)
    if count > MAX_HASHES or len(payload) != 16 + 8 * count:
        raise StreamError(f"HASHES message #{seq}: {count} hashes do not fit "
                          f"{len(payload)} bytes")
    return slot, first, np.frombuffer(payload, dtype=np.uint64, count=count, offset=16)


def decode_req(payload: memoryview, seq: int = -1) -> tuple[int, np.ndarray]:
    if len(payload) < 8:
        raise StreamError(f"REQ message #{seq} is shorter than its 8-byte header")
    slot, _, count = struct.unpack_from("<HHI", payload)
    if not 0 < count <= MAX_REQ or len(payload) != 8 + 8 * count:
        raise StreamError(f"REQ message #{seq}: {count} pages do not fit {len(payload)} bytes")
    return slot, np.frombuffer(payload, dtype=np.uint64, count=count, offset=8).copy()


def encode_hashes(slot: int, first: int, hashes: np.ndarray) -> tuple[bytes, np.ndarray]:
    return struct.pack("<HHIII", slot, 0, first, len(hashes), 0), np.ascontiguousarray(hashes,
                                                                                       np.uint64)


def encode_dirtymap(slot: int, n_pages: int, bitmap: np.ndarray) -> tuple[bytes, np.ndarray]:
    return struct.pack("<HHI", slot, 0, n_pages), np.ascontiguousarray(bitmap, np.uint64)


def encode_req(slot: int, idx: np.ndarray) -> tuple[bytes, np.ndarray]:
    return struct.pack("<HHI", slot, 0, len(idx)), np.ascontiguousarray(idx, np.uint64)


def encode_credit(installed: int) -> bytes:
    return struct.pack("<Q", installed)


def decode_credit(payload: memoryview, seq: int = -1) -> int:
    if len(payload) != 8:
        raise StreamError(f"CREDIT message #{seq} is {len(payload)} bytes, not 8")
    return struct.unpack_from("<Q", payload)[0]


def encode_state(vcpu: int, blob: bytes) -> tuple[bytes, bytes]:
    return struct.pack("<II", vcpu, len(blob)), blob


# ---------------------------------------------------------------- what HELLO and ACK carry

def boot_id() -> str:
    """This kernel's boot id (HELLO, ACK): two processes with the same one share
    CLOCK_MONOTONIC, so the source can take the downtime from the destination's timestamps."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
