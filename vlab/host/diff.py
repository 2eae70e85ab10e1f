"""What changed between two host records, and which host keys are noise.

One definition of both, used by `vlab compare` (its "what changed on the host" table) and
`vlab report` (which rows it highlights): a host record flattened to dotted paths
(`kvm.params.kvm_intel.ept`), compared key by key, with the keys that vary between runs of an
unchanged host left out so that what remains is configuration.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Host keys that change from one run to the next without anyone changing the host: free memory
# and free huge pages, times and uptimes, process ids, and the per-run calibration measurements.
# Matched against each component of a dotted key path ("hugepages.2048kB.free" is volatile
# through its last component, "calibration.tsc_khz" through its first).
_VOLATILE_PARTS = re.compile(
    r"^(mem_available(_kb)?|mem_free(_kb)?|memfree|memavailable|free(_kb|_pages)?|surplus"
    r"|surplus_pages|uptime(_s)?|boot_time|loadavg|load_avg|load|timestamp|time"
    r"|date|now|pid|ppid|hostname_seen_at|calibration)$|(_free|_free_kb|_free_pages|_at"
    r"|_timestamp|_time_s)$|^(free|nr_free)_")
# "available" is volatile only as an amount of memory: `tooling.perf_events.available` says
# whether perf works on the host, which is configuration.
_VOLATILE_PATHS = re.compile(r"(^|\.)(mem|memory|meminfo)\.available$")

# Keys derived from other keys: `host_id` hashes the configuration, so when it differs the keys
# that differ are listed instead.
DERIVED_KEYS = ("host_id",)


def is_volatile(key: str) -> bool:
    """True for dotted host keys that vary between runs of an unchanged host (not configuration)."""
    return bool(_VOLATILE_PATHS.search(key)) or \
        any(_VOLATILE_PARTS.search(part) for part in key.split("."))


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k in value:
            _flatten(value[k], f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def flatten_host(host: Mapping[str, Any]) -> dict[str, Any]:
    """The host record as {dotted.key: value}: nested dicts flattened, lists and empty dicts
    kept whole as values."""
    out: dict[str, Any] = {}
    _flatten(host, "", out)
    return out


def host_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """What changed from host record `a` to `b`: `(dotted.path, old, new)` tuples sorted by path.

    A key missing on one side shows as None there. Volatile keys (`is_volatile`) and derived
    ones (`DERIVED_KEYS`) are left out, so an empty list means "same configuration".
    """
    fa, fb = flatten_host(a), flatten_host(b)
    changes = []
    for path in sorted(set(fa) | set(fb)):
        if path in DERIVED_KEYS or is_volatile(path):
            continue
        old, new = fa.get(path), fb.get(path)
        if old != new:
            changes.append((path, old, new))
    return changes
