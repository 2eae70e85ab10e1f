"""Small synthetic results documents with interrupt rows, for the plot and report tests.

Built with `results.make_row` on the recorded PVM host of tests/data/results/pvm_quick.json; the
magnitudes are those of the interrupt rows measured on the PVM host (tests/data/results/
pvm_interrupts.json.gz is one such run, unmodified), so the figure is exercised on realistic
ranges: EOIs of ~35k cycles beside rounds of 0.3M-30M, CR8 reads of a few hundred.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from vlab import results

DATA = Path(__file__).parent / "data" / "results"
QUICK = DATA / "pvm_quick.json"
REAL = DATA / "pvm_interrupts.json.gz"

TSC_KHZ = 2_596_098
TSC = {"offset_cycles": 6812, "uncertainty_cycles": 8191, "method": "KVM_GET_MSRS(IA32_TSC)",
       "kvm_get_msrs_offset": 6812, "kvm_get_msrs_uncertainty": 8191,
       "guest_rdtsc_bracket": [-53664, 53404], "kvm_agrees_with_guest": True,
       "guest_tsc_khz": TSC_KHZ}


def spread(median: float, n: int = 12) -> list[float]:
    """`n` samples around `median` (the middle one is it), the largest 1.6x: a p99 whisker."""
    return [median * (0.9 + 0.2 * i / (n - 1)) for i in range(n - 1)] + [median * 1.6]


def _row(exp: str, params: dict, metric: str, unit: str, samples: list[float],
         cpl0: bool, **extra: Any) -> dict:
    flags = {"emulated_cpl0": True} if cpl0 else None
    return results.make_row(exp, params, metric, unit, samples, flags=flags,
                            extra=extra or None)


def delivery_rows(exp: str, params: dict, guest: float, eoi: float, exits: float) -> list[dict]:
    """The rows of one delivery case: the round, its EOI and the rest, and exits per op."""
    cpl0 = params.get("cpl") == 0
    return [_row(exp, params, "guest_cycles", "cycles", spread(guest), cpl0),
            _row(exp, params, "host_ns", "ns", spread(guest / 2.6), cpl0),
            _row(exp, params, "exits_per_op", "exits", [exits] * 3, cpl0),
            _row(exp, params, "eoi_cycles", "cycles", spread(eoi, 5), cpl0),
            _row(exp, params, "ipi_cycles", "cycles", spread(guest - eoi), cpl0)]


def alone_rows(exp: str, params: dict, guest: float, exits: float) -> list[dict]:
    cpl0 = params.get("cpl") == 0
    return [_row(exp, params, "guest_cycles", "cycles", spread(guest), cpl0),
            _row(exp, params, "host_ns", "ns", spread(guest / 2.6), cpl0),
            _row(exp, params, "exits_per_op", "exits", [exits] * 3, cpl0)]


def inject_rows(wait: str, ns: float, exits: int, injections: int = 32) -> list[dict]:
    extra = {"injections": injections, "wait": wait, "tsc_relation": TSC,
             "kvm": {"irq_injections": injections, "exits": exits}}
    p = {"wait": wait}
    return [_row("exits.irq_inject", p, "latency_cycles", "cycles",
                 spread(ns * TSC_KHZ / 1e6), True, **extra),
            _row("exits.irq_inject", p, "latency_ns", "ns", spread(ns), True, **extra)]


def irq_doc(timer_latency: list[float] | None = None) -> dict:
    """Every interrupt experiment: ipi_self at CPL3 and (emulated) CPL0, ipi_other, eoi, cr8,
    tsc_deadline (expired: no latency, an error row; future: `timer_latency` samples) and
    irq_inject spinning and halted; plus one non-interrupt exits row (exits.nop)."""
    rows = []
    rows += delivery_rows("exits.ipi_self", {"apic": "xapic", "cpl": 3}, 340_000, 34_000, 2.02)
    rows += delivery_rows("exits.ipi_self", {"apic": "x2apic", "cpl": 0}, 2_470_000, 37_000, 1.03)
    rows += delivery_rows("exits.ipi_other", {"apic": "xapic", "cpl": 3, "target": "halted"},
                          650_000, 36_000, 5.05)
    rows += alone_rows("exits.eoi", {"apic": "xapic", "cpl": 3}, 9_300, 1.0)
    rows += alone_rows("exits.cr8", {"direction": "read", "cpl": 0}, 445, 0.0049)
    expired, future = ({"timer": "expired", "apic": "xapic", "cpl": 0},
                       {"timer": "future", "apic": "xapic", "cpl": 0})
    rows += delivery_rows("exits.tsc_deadline", expired, 3_060_000, 37_000, 1.06)
    rows.append(results.error_row("exits.tsc_deadline", expired, "timer_latency_cycles",
                                  "cycles", "no samples were recorded"))
    rows += delivery_rows("exits.tsc_deadline", future, 3_200_000, 36_000, 1.09)
    rows.append(_row("exits.tsc_deadline", future, "timer_latency_cycles", "cycles",
                     timer_latency or spread(4_650_000, 9), True))
    rows += inject_rows("spin", 151_000, 145)
    rows += inject_rows("halt", 79_000, 105)
    rows.append(results.skip_row("exits.ipi_self", {"apic": "x2apic", "cpl": 3}, "ipi_cycles",
                                 "cycles", "x2APIC registers are MSRs: rdmsr/wrmsr need CPL0"))
    rows += alone_rows("exits.nop", {"cpl": 3}, 60, 0.0)
    return doc_of(rows)


def doc_of(rows: list[dict]) -> dict:
    """A valid results document of `rows` on the recorded PVM host."""
    host = results.read(QUICK)["host"]
    start = _dt.datetime(2026, 12, 3, 20, 0, tzinfo=_dt.timezone.utc)
    doc = results.new_document(host, rows, argv=["run", "exits.ipi_self"], suite=None,
                               started=start, finished=start, run_id="0123456789ab")
    results.validate(doc)
    return doc
