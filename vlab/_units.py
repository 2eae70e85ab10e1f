"""Units vlab reads and writes: the page size, byte sizes ("64M", "1GiB") and link rates ("1G").

One definition each, because the same text ("2m", "64M") reaches vlab through `-p KEY=VALUE`,
`vlab migrate --mem`, suite files and the params of recorded results, and must mean the same
bytes everywhere. Sizes are binary (K = 1024), as page and memory sizes are written; rates are
decimal bit/s (1G = 10^9 bit/s), as link speeds are.

Accepted sizes: a non-negative decimal number, optional blanks, an optional unit K, M, G or T
(any case), optionally followed by "B" or "iB"; a bare "B" suffix means bytes. The result must
be a whole number of bytes ("1.5K" is 1536, "1.3K" is refused). Nothing else: no signs,
exponents, "inf"/"nan", or hex (hex integers are parameter values, not sizes; see
`vlab.run.registry.parse_value`).
"""
from __future__ import annotations

import re
from typing import Any

from vlab._errors import UsageError

#: The x86 base page size, in bytes.
PAGE = 4096

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

#: Guest page sizes by the names experiments and `-p guest_page=` use.
PAGE_SIZES = {"4k": PAGE, "2m": 2 * MIB, "1g": GIB}

_SIZE_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": TIB}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?b)?|(b))?\s*", re.IGNORECASE)

_RATE_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit/s|bps|b)?\s*", re.IGNORECASE)


def size_bytes(value: Any) -> int | None:
    """Bytes from 4096, "4K", "64KiB", "1G", "1.5M", "512B" ...; None when it is not a size.

    Integers (and floats holding a whole number) are bytes already; booleans, negative numbers
    and anything else are not sizes.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value >= 0 and value.is_integer() else None
    if not isinstance(value, str):
        return None
    m = _SIZE_RE.fullmatch(value)
    if not m:
        return None
    number, unit = m.group(1), (m.group(2) or "").lower()
    scale = _SIZE_UNITS[unit]
    if "." in number:
        whole, frac = number.split(".")
        # exact arithmetic: 1.5K is 1536 bytes, 1.3K is not a whole number of bytes
        num = int(whole + frac) * scale
        den = 10 ** len(frac)
        return num // den if num % den == 0 else None
    return int(number) * scale


def parse_size(text: str, what: str) -> int:
    """A positive size in bytes from command-line text ("64M", "1GiB"); `UsageError` naming
    `what` (the option) when it is not one."""
    n = size_bytes(text) if isinstance(text, str) else None
    if n is None:
        raise UsageError(f"{what}: {text!r} is not a size (e.g. 64M, 1G)")
    if n <= 0:
        raise UsageError(f"{what} must be positive")
    return n


def parse_rate(text: str, what: str) -> float:
    """A positive link rate in bit/s from "1G", "100Mbit/s", "2.5gbps" (decimal units:
    1G = 10^9 bit/s); `UsageError` naming `what` when it is not one."""
    m = _RATE_RE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise UsageError(f"{what}: {text!r} is not a rate (e.g. 1G for 1 Gbit/s)")
    v = float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
    if v <= 0:
        raise UsageError(f"{what} must be positive")
    return v


def format_size(n: float) -> str:
    """4096 -> '4K', 1073741824 -> '1G', 1536 -> '1.5K' (binary units, as page sizes are
    written); below 1 KiB the plain number."""
    for suffix, scale in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if n >= scale:
            q = n / scale
            return f"{q:g}{suffix}" if q == int(q) else f"{q:.3g}{suffix}"
    return f"{n:g}"
