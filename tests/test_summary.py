"""The table `vlab run` prints for exit and interrupt rows (vlab.run.summary), on synthetic
documents: no KVM needed."""
from __future__ import annotations

from vlab.run.summary import exits_table, interrupts_table


def _row(exp, params, metric, median, p99=None, **extra):
    return {"experiment": exp, "params": params, "metric": metric, "status": "ok",
            "median": median, "p99": p99 if p99 is not None else median, "unit": "",
            "flags": {}, "warnings": [], "extra": extra}


def test_interrupt_rows_get_their_own_table():
    p = {"apic": "xapic", "cpl": 3}
    doc = {"host": {}, "rows": [
        _row("exits.ipi_self", p, "guest_cycles", 340_000.0),
        _row("exits.ipi_self", p, "ipi_cycles", 305_000.0),
        _row("exits.ipi_self", p, "eoi_cycles", 35_000.0),
        _row("exits.ipi_self", p, "exits_per_op", 2.02, interrupts_per_op=1.0,
             expected_exits_per_op=2),
        _row("exits.irq_inject", {"wait": "halt"}, "latency_cycles", 206_000.0),
        _row("exits.irq_inject", {"wait": "halt"}, "latency_ns", 79_455.0, 402_000.0),
        _row("exits.cpuid", {"cpl": 3}, "guest_cycles", 15_000.0),
    ]}
    table = exits_table(doc)
    ipi = next(line for line in table.splitlines() if line.startswith("ipi_self "))
    assert "340k" in ipi and "2.02" in ipi
    inj = next(line for line in table.splitlines() if line.startswith("irq_inject "))
    assert "206k" in inj and "79,455" in inj          # latency fills the time columns
    irq = table.split("\n\ninterrupts")[1]
    assert "305k" in irq and "35,000" in irq and "1.00" in irq and "402k" in irq
    assert "cpuid" not in irq


def test_no_interrupt_rows_no_interrupt_table():
    doc = {"host": {}, "rows": [_row("exits.cpuid", {"cpl": 3}, "guest_cycles", 15_000.0)]}
    assert "interrupts" not in exits_table(doc)
    assert interrupts_table({}, []) == ""
