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
