"""`--pin`: which CPUs a run's threads may use, from the user's text to a `Placement`.

A spec is one or more items (repeated `--pin`, or a suite's `pin = "..."` / `pin = [...]`):

  none          pin nothing: the kernel places every thread (the pre-pinning behaviour)
  auto          choose from the CPUs this process may use: the worker processes keep all of
                them, vCPU threads take them round robin (slot 0 on the first), device backend
                and host peer threads take the last one; on 2 CPUs the first vCPU and the
                backend never share a CPU
  0-3 / 0,2     the same as auto within these CPUs
  ROLE=CPUS     a role's CPUs by hand (roles: worker, vcpu, backend; several items allowed);
                a role left out gets the union of the CPUs named

`DEFAULT_PIN` is what a run uses when neither the command line nor the suite says.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from vlab._errors import UsageError
from vlab.vmm.thread import ROLES, Placement

#: A run's pinning when nobody chose one; see the README's "Pinning" for the measurement
#: behind this choice.
DEFAULT_PIN = "auto"


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, ascending."""
    return sorted(os.sched_getaffinity(0))


def parse_cpus(text: str, what: str = "CPU list") -> list[int]:
    """`0-3,6` -> [0, 1, 2, 3, 6]; a UsageError for anything else (empty, reversed, junk)."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise UsageError(f"bad {what} {text!r}: expected CPU numbers like 0-3,6") from None
        if a < 0 or b < a:
            raise UsageError(f"bad {what} {text!r}: {part!r} is not a CPU or an ascending range")
        cpus += [c for c in range(a, b + 1) if c not in cpus]
    return sorted(cpus)


def _auto(cpus: list[int], spec: str) -> Placement:
    if len(cpus) == 1:
        return Placement(tuple(cpus), tuple(cpus), tuple(cpus), spec)
    vcpu = cpus if len(cpus) == 2 else cpus[:-1]
    return Placement(tuple(cpus), tuple(vcpu), (cpus[-1],), spec)


def parse_pin(items: str | Iterable[str] | None,
              allowed: Iterable[int] | None = None) -> Placement | None:
    """The placement a spec asks for (None for `none`); `allowed` defaults to this process's
    CPUs and every CPU named must be one of them. Bad text: a one-line UsageError."""
    if items is None:
        items = [DEFAULT_PIN]
    elif isinstance(items, str):
        items = [items]
    items = [str(i).strip() for i in items if str(i).strip()] or [DEFAULT_PIN]
    ok = sorted(allowed) if allowed is not None else allowed_cpus()
    spec = " ".join(items)
    words = [i.lower() for i in items]
    if words in (["none"], ["auto"]):
        return None if words == ["none"] else _auto(ok, spec)
    if "none" in words or "auto" in words:
        raise UsageError(f"--pin {spec!r}: 'none' and 'auto' stand alone")
    roles: dict[str, list[int]] = {}
    plain: list[int] | None = None
    for item in items:
        role, eq, cpus = item.partition("=")
        if eq:
            role = role.strip().lower()
            if role not in ROLES:
                raise UsageError(f"--pin {item!r}: unknown role {role!r} "
                                 f"(roles: {', '.join(ROLES)})")
            if role in roles:
                raise UsageError(f"--pin: role {role} given twice")
            roles[role] = parse_cpus(cpus, f"CPU list for {role}")
        elif plain is None:
            plain = parse_cpus(item)
        else:
            raise UsageError(f"--pin {spec!r}: give one CPU list, or ROLE=CPUS items")
    if plain is not None and roles:
        raise UsageError(f"--pin {spec!r}: give a CPU list or ROLE=CPUS items, not both")
    named = sorted({c for cs in ([plain] if plain else roles.values()) for c in cs})
    missing = [c for c in named if c not in ok]
    if missing:
        raise UsageError(f"--pin {spec!r}: CPU {missing[0]} is not one this process may use "
                         f"(allowed: {format_cpus(ok)})")
    if plain is not None:
        return _auto(plain, spec)
    return Placement(tuple(roles.get("worker", named)), tuple(roles.get("vcpu", named)),
                     tuple(roles.get("backend", named)), spec)


def format_cpus(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the kernel's list format)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def to_plan(p: Placement | None) -> dict | None:
    """The placement as JSON for a worker's plan (None: no pinning)."""
    if p is None:
        return None
    return {"worker": list(p.worker), "vcpu": list(p.vcpu), "backend": list(p.backend),
            "spec": p.spec}


def from_plan(d: dict | None) -> Placement | None:
    if not d:
        return None
    return Placement(tuple(d["worker"]), tuple(d["vcpu"]), tuple(d["backend"]), d.get("spec", ""))


def describe(p: Placement | None) -> str:
    """One line for the progress output, e.g. "pinned (auto): worker 0-1, vCPU 0-1, backend 1"."""
    if p is None:
        return "not pinned (--pin none)"
    return (f"pinned ({p.spec}): worker {format_cpus(p.worker)}, vCPU threads "
            f"{format_cpus(p.vcpu)}, backend threads {format_cpus(p.backend)}")


def merge_records(records: Iterable[dict]) -> dict:
    """One row's `placement`: the records of the processes (vlab.vmm.thread.placement_record)
    that measured it, each role's CPU sets united."""
    out: dict = {}
    for rec in records:
        if not rec:
            continue
        out.setdefault("pin", rec.get("pin"))
        for role in ROLES:
            if role in rec:
                out[role] = sorted(set(out.get(role, [])) | set(rec[role]))
    return out
