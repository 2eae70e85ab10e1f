"""Checking what a user hands vlab: input files and numeric values.

Every check raises a one-line `UsageError` (CLI exit 2) that names the input and the problem.

* `read_file`: only a regular file, at most `limit` bytes, is read. `/dev/zero`, a FIFO or a
  terminal would block or never end; a directory or a huge file is not a results file.
* `check_fits`: an integer parameter must fit the register or field it goes into
  (`bits` wide, unsigned unless `signed`), or lie in an explicit range.
* `finite`: a float option must be a finite number (not nan or inf), within bounds.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from vlab._errors import UsageError

#: Largest results file vlab reads (samples of a long suite run are a few tens of MiB).
MAX_RESULTS_BYTES = 512 << 20


def read_file(path: str | os.PathLike[str], what: str = "input file",
              limit: int = MAX_RESULTS_BYTES) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; else a UsageError."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO without a writer must not hang before the type check
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise UsageError(f"{p}: is a directory, not a {what}") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{p}: is a directory, not a {what}")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{p}: not a regular file ({_kind(st.st_mode)}), not a {what}")
        if st.st_size > limit:
            raise UsageError(f"{p}: {st.st_size:,} bytes, larger than any {what} "
                             f"(limit {limit:,})")
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError as e:
                raise UsageError(f"{p}: cannot read: {e.strerror or e}") from None
            if not chunk:
                break
            total += len(chunk)
            if total > limit:                    # grew while being read
                raise UsageError(f"{p}: larger than any {what} (limit {limit:,} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def int_range(bits: int, signed: bool = False) -> tuple[int, int]:
    """The values a `bits`-wide register or field holds."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def check_fits(name: str, value: object, lo: int | float, hi: int | float,
               what: str = "") -> None:
    """`value` must be a number (not a bool) in [lo, hi]; `what` says where it goes."""
    where = f" ({what})" if what else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name}={value!r} is not a number{where}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{name}={value} is not a finite number{where}")
    if not lo <= value <= hi:
        raise UsageError(f"{name}={_show(value)} does not fit{where}: it must be "
                         f"{_show(lo)}..{_show(hi)}")


def _show(v: int | float) -> str:
    return f"{v:#x}" if isinstance(v, int) and abs(v) >= 1 << 20 else f"{v:g}" \
        if isinstance(v, float) else str(v)


def finite(name: str, value: float | None, lo: float = -math.inf, hi: float = math.inf,
           *, lo_open: bool = False) -> None:
    """A float option (e.g. --interval) must be finite and within [lo, hi] (or (lo, hi])."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, not {value}")
    if value < lo or (lo_open and value == lo) or value > hi:
        low = f"more than {lo:g}" if lo_open else f"at least {lo:g}"
        high = f" and at most {hi:g}" if math.isfinite(hi) else ""
        raise UsageError(f"{name} must be {low}{high}, not {value:g}")


_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1

#: `vlab migrate` options and the values each may take: (option, lo, hi, integer, what). The
#: guest's writer takes rate, seed and lag_us as arguments; the rest are counts and durations
#: (nan, inf or a 70-bit count once hung a migration or ended it in a traceback). Checked at
#: the command's entry (vlab/cli.py) so that vlab/migration/ need not change for it.
MIGRATE_OPTIONS = (
    ("rate", 0, _U32, True, "pages/s, 32 bits"),
    ("seed", 0, _U64, True, "the guest writer's 64-bit PRNG seed"),
    ("lag_us", 0, _U32, True, "microseconds, 32 bits"),
    ("max_rounds", 1, _U32, True, "rounds"),
    ("postcopy_rounds", 0, _U32, True, "rounds"),
    ("max_downtime_ms", 0, 3_600_000, False, "milliseconds, at most an hour"),
    ("warmup_s", 0, 3600, False, "seconds, at most an hour"),
    ("trace_s", 0, 3600, False, "seconds, at most an hour"),
    ("trace_interval_ms", 0.01, 60_000, False, "milliseconds"),
    ("run_after", 0, 3600, False, "seconds, at most an hour"),
    ("io_timeout", 0.001, 86400, False, "seconds, at most a day"),
    ("accept_timeout", 0.001, 86400, False, "seconds, at most a day"),
)
#: Guest memory and working set: within the 52-bit guest-physical address space.
MAX_GUEST_BYTES = 1 << 52
#: Link limit: 10 Tbit/s is beyond any link.
MAX_LINK_BIT_S = 1e13


def check_migrate_options(args) -> None:
    """Every numeric option of `vlab migrate` fits where it goes; a one-line UsageError if not."""
    from vlab._units import parse_rate, parse_size

    for attr, lo, hi, integer, what in MIGRATE_OPTIONS:
        v = getattr(args, attr, None)
        if v is None:
            continue
        name = "--" + attr.replace("_", "-")
        if integer:
            check_fits(name, v, lo, hi, what)
        else:
            finite(name, v, lo, hi)
    for attr in ("mem", "ws"):
        text = getattr(args, attr, None)
        if text is None:
            continue
        try:
            v = parse_size(text, f"--{attr}")
        except (ValueError, OverflowError):
            raise UsageError(f"--{attr}: {text!r} is not a size (e.g. 64M, 1G)") from None
        check_fits(f"--{attr}", v, 1, MAX_GUEST_BYTES, "bytes, 52-bit guest-physical space")
    if getattr(args, "bandwidth", None):
        v = parse_rate(args.bandwidth, "--bandwidth")
        finite("--bandwidth", v, 0.0, MAX_LINK_BIT_S, lo_open=True)


#: `vlab host set` integer settings and the width of the kernel variable each is written to
#: (module parameters declared `uint`; nr_hugepages an unsigned long).
HOST_SETTING_BITS = {"kvm.halt_poll_ns": 32, "haltpoll.guest_halt_poll_ns": 32,
                     "hugepages.2m": 64, "hugepages.1g": 64}


def check_host_setting(key: str, value: str) -> None:
    """An integer `vlab host set KEY=VALUE` must fit the kernel variable it is written to."""
    bits = HOST_SETTING_BITS.get(key)
    if bits is None:
        return
    try:
        n = int(value.strip(), 10)
    except ValueError:
        return                      # not a number: the setting's own parser says so
    check_fits(key, n, 0, (1 << bits) - 1, f"a {bits}-bit kernel variable")
