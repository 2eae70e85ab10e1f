"""Mutual authentication of the two ends of a live migration, before any guest memory moves.

A migration destination is a root process that builds a VM from whatever its peer sends, so
a destination reachable from other machines must only accept a source that proves it holds the
migration key, and a source must only hand its guest to a destination that proves the same.
The mechanism is a pre-shared-key challenge-response (`vlab-psk-hmac-sha256/1`), exchanged as
newline-terminated JSON lines before the migration stream's first frame:

    source -> destination   {"auth": "vlab-psk-hmac-sha256/1", "nonce": Ns}
    destination -> source   {"nonce": Nd, "mac": HMAC(K, "dst" | Ns | Nd)}
    source -> destination   {"mac": HMAC(K, "src" | Ns | Nd)}      (after checking the above)
    destination -> source   {"ok": true, "host": {...its host record...}}

Both nonces are 32 fresh random bytes, so an old exchange cannot be replayed; the two proofs
are bound to a side ("dst"/"src"), so one side's proof cannot be reflected back as the other's.
Either side that finds a wrong proof answers {"refused": reason} and closes. The destination
creates no VM, and reads no HELLO, before this succeeds.

Why a pre-shared key and not TLS: QEMU offers both; here TLS with certificates would need a CA
and a certificate per host (and the `openssl` tool or the `cryptography` package on every host),
and Python 3.11's `ssl` has no TLS-PSK. One key file copied to the inventory hosts (Ansible's
`copy` with mode 0600) is what an operator already does for other secrets. What it does not do:
it authenticates the peers, it does not encrypt the stream or protect it against an active
attacker on the path after the exchange (the pages carry hashes against corruption, not against
forgery). Across an untrusted network, run the migration inside a tunnel (IPsec, WireGuard,
SSH port forwarding).

A source without a key opens with {"auth": null}; a destination without a key answers
{"ok": true} and the plain stream follows (as before this module; a stream that starts with no
line at all is accepted too): that is for loopback only, and `vlab migrate --listen` refuses a non-loopback address
without `--psk-file`.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import stat
import time
from typing import Any

from vlab._errors import UsageError, VlabError

METHOD = "vlab-psk-hmac-sha256/1"
NONCE_BYTES = 32
MIN_KEY_BYTES = 16
_LINE_MAX = 1 << 20                 # the host record travels in the last line


class AuthError(VlabError):
    """The peer was refused (or refused us); the message is one line saying why."""


def load_key(path: str) -> bytes:
    """The migration key in `path` (surrounding whitespace stripped). Refused with a one-line
    UsageError: a missing or unreadable file, a key shorter than 16 bytes, or a file that
    other users can read."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read(1 << 16).strip()
    except OSError as e:
        raise UsageError(f"--psk-file {path}: {e.strerror or e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"--psk-file {path}: readable by other users (chmod 600 it)")
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"--psk-file {path}: the key has {len(key)} bytes; at least "
                         f"{MIN_KEY_BYTES} are needed (e.g. `head -c 32 /dev/urandom | "
                         f"base64 > FILE`)")
    return key


def new_key_file(path: str) -> str:
    """Write a fresh random key to `path` (mode 0600); its path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _mac(key: bytes, side: bytes, ns: bytes, nd: bytes) -> str:
    return hmac.new(key, side + b"|" + ns + b"|" + nd, hashlib.sha256).hexdigest()


def _send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")


def _recv(sock: socket.socket, deadline: float, who: str) -> dict[str, Any]:
    """One JSON line, read byte by byte so that nothing of the stream after it is consumed."""
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AuthError(f"authentication: no answer from the {who} in time")
        sock.settimeout(left)
        try:
            b = sock.recv(1)
        except socket.timeout:
            raise AuthError(f"authentication: no answer from the {who} in time") from None
        except OSError as e:
            raise AuthError(f"authentication: connection to the {who} failed: "
                            f"{e.strerror or e}") from None
        if not b:
            raise AuthError(f"authentication: the {who} closed the connection")
        if b == b"\n":
            break
        buf += b
        if len(buf) > _LINE_MAX:
            raise AuthError(f"authentication: the {who} sent an over-long line")
    try:
        obj = json.loads(buf.decode())
    except (UnicodeDecodeError, ValueError):
        raise AuthError(f"authentication: the {who} sent something that is not the "
                        f"{METHOD} exchange") from None
    if not isinstance(obj, dict):
        raise AuthError(f"authentication: malformed message from the {who}")
    if "refused" in obj:
        raise AuthError(f"the {who} refused: {' '.join(str(obj['refused']).split())}")
    return obj


def _nonce(obj: dict[str, Any], who: str) -> bytes:
    try:
        n = bytes.fromhex(obj["nonce"])
    except (KeyError, TypeError, ValueError):
        n = b""
    if len(n) != NONCE_BYTES:
        raise AuthError(f"authentication: the {who} sent no valid nonce")
    return n


def _refuse(sock: socket.socket, reason: str) -> AuthError:
    try:
        _send(sock, {"refused": reason})
    except OSError:
        pass
    return AuthError(reason)


def authenticate_source(sock: socket.socket, key: bytes | None, *,
                        timeout: float = 30.0) -> dict[str, Any]:
    """The source's side, on a connected socket, before the stream. Without a key it says so
    ({"auth": null}), so that a destination that wants a key refuses with a reason before any
    frame is sent. Returns {"authenticated", "method", "peer_host"}."""
    deadline = time.monotonic() + timeout
    ns = secrets.token_bytes(NONCE_BYTES)
    try:
        _send(sock, {"auth": METHOD if key is not None else None, "nonce": ns.hex()})
    except OSError as e:
        raise AuthError(f"authentication: cannot send to the destination: "
                        f"{e.strerror or e}") from None
    m = _recv(sock, deadline, "destination")
    if key is None:
        if m.get("ok") is not True:
            raise AuthError("authentication: the destination did not confirm")
        return {"authenticated": False, "method": None, "peer_host": None}
    nd = _nonce(m, "destination")
    if not hmac.compare_digest(str(m.get("mac", "")), _mac(key, b"dst", ns, nd)):
        raise _refuse(sock, "authentication failed: the destination's proof does not match "
                            "this source's key (wrong key)")
    _send(sock, {"mac": _mac(key, b"src", ns, nd)})
    m = _recv(sock, deadline, "destination")
    if m.get("ok") is not True:
        raise AuthError("authentication: the destination did not confirm")
    host = m.get("host") if isinstance(m.get("host"), dict) else None
    return {"authenticated": True, "method": METHOD, "peer_host": host}


def _peek(sock: socket.socket, deadline: float) -> bytes:
    """The first byte the peer sent, without consuming it (b"" if it closed)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AuthError("the source sent nothing in time")
        sock.settimeout(left)
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            raise AuthError("the source sent nothing in time") from None
        except InterruptedError:
            continue


def authenticate_destination(sock: socket.socket, key: bytes | None, *, host_record=None,
                             timeout: float = 30.0) -> dict[str, Any]:
    """The destination's side, on an accepted socket, before anything of the stream is read.

    With a key the source must prove it holds it (and gets this side's proof); without one a
    source without a key, or a plain stream, is accepted. Anything else raises AuthError with a one-line reason
    (the source is told it too). `host_record` is called after success and its result is sent
    to the source, so that its results carry both hosts' records."""
    deadline = time.monotonic() + timeout
    no_key = ("authentication failed: the source holds no migration key (--psk-file); "
              "refused before any guest memory moved")
    if _peek(sock, deadline) != b"{":
        # a plain stream (a source that does not say whether it has a key)
        if key is None:
            return {"authenticated": False, "method": None}
        _stream_error(sock, no_key)
        raise AuthError(no_key)
    m = _recv(sock, deadline, "source")
    if m.get("auth") is None:
        if key is not None:
            raise _refuse(sock, no_key)
        _send(sock, {"ok": True, "host": None})
        return {"authenticated": False, "method": None}
    if key is None:
        raise _refuse(sock, "authentication refused: the source wants to authenticate but "
                            "this destination has no migration key (--psk-file)")
    if m.get("auth") != METHOD:
        raise _refuse(sock, f"authentication failed: the source offers {m.get('auth')!r}, "
                            f"this destination {METHOD}")
    ns = _nonce(m, "source")
    nd = secrets.token_bytes(NONCE_BYTES)
    _send(sock, {"nonce": nd.hex(), "mac": _mac(key, b"dst", ns, nd)})
    m = _recv(sock, deadline, "source")
    if not hmac.compare_digest(str(m.get("mac", "")), _mac(key, b"src", ns, nd)):
        raise _refuse(sock, "authentication failed: the source's proof does not match this "
                            "destination's key (wrong key)")
    host = host_record() if host_record is not None else None
    _send(sock, {"ok": True, "host": host})
    return {"authenticated": True, "method": METHOD}


def _stream_error(sock: socket.socket, reason: str) -> None:
    """Tell a source that speaks the plain stream why it is refused (an ERROR frame)."""
    from vlab.migration import stream as ms

    try:
        sock.settimeout(2.0)
        ms.Writer(sock).send_json(ms.ERROR, {"reason": reason})
    except (ms.StreamError, OSError):
        pass


def listen_key(args, host: str) -> bytes | None:
    """The key a destination listening on `host` uses (`--psk-file`); refuses (UsageError) to
    listen beyond loopback without one, since anyone who reaches the port could then feed this
    root process a guest."""
    path = getattr(args, "psk_file", None)
    key = load_key(path) if path else None
    if key is None and not is_loopback(host):
        raise UsageError(f"--listen {host}: a destination reachable from other machines needs "
                         f"a migration key (--psk-file FILE)")
    return key


def host_record() -> dict[str, Any]:
    """This host's record (as in every results file), sent to an authenticated source."""
    from vlab.host.calibrate import collect_host

    return collect_host()
