"""Stopping a run on SIGINT or SIGTERM, and never leaving a worker process behind.

pyperf catches KeyboardInterrupt itself and turns it into `sys.exit(1)`, which the runner used
to record as one failed case before going on with the next: Ctrl-C did not stop `vlab run`.
While a run is going, `catching()` replaces the handlers of SIGINT and SIGTERM by one that
raises `Interrupted`, an exception neither pyperf nor the runner's per-case error handling
catches (it is not a KeyboardInterrupt, and the runner lets it through by name). pyperf's own
clean-up (`popen_killer`) still kills the worker it was waiting for; `stop_children()` then
ends whatever else this process started (a worker started a moment before, a one-shot
experiment's helper processes), first politely, then with SIGKILL. The kernel tears down a
guest with the process that holds its file descriptors.

`deferred()` holds both signals back for a few lines (appending to the journal, writing the
results), so a signal cannot tear a record in half; it is delivered when the block ends.

`die_with_parent()` is for pyperf workers: if the runner is killed with SIGKILL (which no
handler sees), each worker gets SIGKILL from the kernel too instead of running on as an orphan.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):
    """The run got SIGINT or SIGTERM. A BaseException (like KeyboardInterrupt) so that
    `except Exception` clauses in experiments and libraries do not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def name(self) -> str:
        """The signal's name, e.g. "SIGINT"."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def _raise(signum: int, _frame) -> None:
    # once: a second Ctrl-C while the run stops its workers and saves must not cut that short
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def catching() -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM raises `Interrupted` in the main thread
    (later ones are ignored: the run is already stopping). The previous handlers are put
    back at the end."""
    old = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back within the block (they are delivered when it ends)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def ignored() -> Iterator[None]:
    """Within the block, further SIGINT/SIGTERM are ignored (saving the results of an
    interrupted run is quick, and a second Ctrl-C must not lose them)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def children(pid: int | None = None) -> list[int]:
    """Every descendant process of `pid` (default: this process), children first."""
    root = os.getpid() if pid is None else pid
    parent_of: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: parse after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            parent_of[int(name)] = int(fields[1])
    out: list[int] = []
    frontier = [root]
    while frontier:
        nxt = [p for p, pp in parent_of.items() if pp in frontier and p not in out]
        out += nxt
        frontier = nxt
    return out


def stop_children(timeout: float = 3.0) -> list[int]:
    """SIGTERM every descendant of this process, SIGKILL those still there after `timeout`
    seconds, and reap the direct children. Returns the pids that were signalled."""
    pids = children()
    for p in pids:
        _kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        _reap()
        time.sleep(0.05)
    for p in pids:
        if alive(p):
            _kill(p, signal.SIGKILL)
    end = time.monotonic() + 5.0
    while time.monotonic() < end and any(alive(p) for p in pids):
        _reap()
        time.sleep(0.05)
    _reap()
    return pids


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it holds no guest any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def worker_command(args: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(program, arguments) that start a pyperf worker `python *args` in a session of its
    own, through util-linux `setsid` (which, in a child that leads no process group, calls
    setsid() and execs in place: same pid, still our child). A terminal's Ctrl-C then reaches
    the runner alone, which ends its workers itself, instead of hitting a worker in the middle
    of its start-up. Without `setsid`, the interpreter itself (workers ignore SIGINT)."""
    setsid = shutil.which("setsid")
    if setsid is None:
        return sys.executable, args
    return setsid, (sys.executable, *args)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux prctl
    PR_SET_PDEATHSIG); if the parent is already gone, exit now."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:          # the parent died before prctl took effect
        os._exit(1)
