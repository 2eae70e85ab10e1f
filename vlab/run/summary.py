"""The table `vlab run` prints: readable at a glance, one line per case.

Exit experiments get the exit table (kind, handled by, guest cycles p50/p99, host ns p50/p99,
exits/op measured and expected for this host's flavor, and each cost as a multiple of the host's
own system call, from the stored `x_syscall` row where there is one); other areas use the
generic results table.
"""
from __future__ import annotations

from collections import defaultdict


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if abs(v) >= 100000:
        s = f"{v / 1000:,.0f}k"
    elif abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + unit


def _params(p: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in p.items() if k != "iters")


def exits_table(doc: dict) -> str:
    """The exit-cost table of a results document ('' when it has no exit rows)."""
    cases: dict[tuple, dict] = defaultdict(dict)
    order: list[tuple] = []
    for r in doc["rows"]:
        if not (r["experiment"].startswith("exits.") or r["experiment"] == "native.syscall"):
            continue
        key = (r["experiment"], _params(r["params"]))
        if key not in cases:
            order.append(key)
        cases[key][r["metric"]] = r
    if not order:
        return ""
    native = cases.get(("native.syscall", ""), {})
    native_cycles = (native.get("cycles") or {}).get("median")
    native_ns = (native.get("host_ns") or {}).get("median")
    emulated = doc.get("host", {}).get("emulated_cpl0")
    head = (f"{'kind':<19} {'params':<28} {'handled by':<28} {'guest cyc p50':>13} {'p99':>9} "
            f"{'host ns p50':>11} {'p99':>9} {'exits/op':>8} {'expect':>6} {'x syscall':>9}")
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    for key in order:
        rows = cases[key]
        any_row = next(iter(rows.values()))
        name = key[0].removeprefix("exits.")
        if any_row["status"] != "ok":
            lines.append(f"{name:<19} {key[1]:<28} {any_row['status']}: {any_row['reason']}")
            continue
        # exits.irq_inject has no operation loop: its latency fills the two time columns
        g = rows.get("guest_cycles") or rows.get("cycles") or rows.get("latency_cycles") or {}
        h = rows.get("host_ns") or rows.get("latency_ns") or {}
        e = rows.get("exits_per_op") or {}
        extra = (g or h).get("extra") or {}
        handled = str(extra.get("handled_by", ""))[:28]
        mult = "-"
        x = rows.get("x_syscall") or {}
        if x.get("median") is not None:
            mult = f"{x['median']:.1f}x"
        elif g.get("median") is not None and native_cycles:
            mult = f"{g['median'] / native_cycles:.1f}x"
        elif h.get("median") is not None and native_ns and not g:
            mult = f"{h['median'] / native_ns:.1f}x"
        flag = ""
        if (g.get("flags") or {}).get("emulated_cpl0"):
            flag = " *"
        warn = [w for row in rows.values() for w in row.get("warnings") or []]
        if warn:
            flag += " !"
            notes += [f"  ! {name} {key[1]}: {w}" for w in dict.fromkeys(warn)]
        want = (e.get("extra") or {}).get("expected_exits_per_op")
        lines.append(f"{name:<19} {key[1]:<28} {handled:<28} {_fmt(g.get('median')):>13} "
                     f"{_fmt(g.get('p99')):>9} {_fmt(h.get('median')):>11} {_fmt(h.get('p99')):>9} "
                     f"{_fmt(e.get('median')):>8} {_fmt(want):>6} {mult:>9}{flag}")
    if emulated and any((r.get("params") or {}).get("cpl") == 0 for rows in cases.values()
                        for r in rows.values()):
        lines.append("  * CPL0 is emulated by KVM on this host: CPL0 figures are the excess over "
                     "the CPL0 nop loop, i.e. emulation cost, not hardware exit cost")
    lines += notes
    irq = interrupts_table(cases, order)
    if irq:
        lines += ["", irq]
    return "\n".join(lines)


def interrupts_table(cases: dict, order: list) -> str:
    """The interrupt rows' own figures: a delivery's IPI and EOI parts (guest cycles p50), the
    TSC-deadline timer's deadline-to-handler latency, the irqfd injection latency, and how many
    interrupts the guest's handler counted per operation ('' when there are none)."""
    head = (f"{'interrupts':<19} {'params':<34} {'ipi cyc':>9} {'eoi cyc':>9} "
            f"{'timer lat cyc':>13} {'inject ns p50':>13} {'p99':>9} {'irqs/op':>7}")
    lines = []
    for key in order:
        rows = cases[key]
        if not any(m in rows for m in ("eoi_cycles", "timer_latency_cycles", "latency_ns")):
            continue
        if next(iter(rows.values()))["status"] != "ok":
            continue
        med = {m: (rows.get(m) or {}).get("median") for m in
               ("ipi_cycles", "eoi_cycles", "timer_latency_cycles", "latency_ns")}
        p99 = (rows.get("latency_ns") or {}).get("p99")
        per = ((rows.get("exits_per_op") or {}).get("extra") or {}).get("interrupts_per_op")
        lines.append(f"{key[0].removeprefix('exits.'):<19} {key[1]:<34} "
                     f"{_fmt(med['ipi_cycles']):>9} {_fmt(med['eoi_cycles']):>9} "
                     f"{_fmt(med['timer_latency_cycles']):>13} {_fmt(med['latency_ns']):>13} "
                     f"{_fmt(p99):>9} {_fmt(per):>7}")
    if not lines:
        return ""
    return "\n".join([head, "-" * len(head), *lines])


def summary(doc: dict) -> str:
    """The whole summary: the exit table (if any), then the generic table for the rest."""
    from vlab import results

    parts = []
    ex = exits_table(doc)
    if ex:
        parts.append(ex)
    rest = [r for r in doc["rows"]
            if not (r["experiment"].startswith("exits.") or r["experiment"] == "native.syscall")]
    if rest:
        parts.append(results.format_table(dict(doc, rows=rest)).rstrip())
    host = doc.get("host", {})
    parts.insert(0, f"host {host.get('host_id')}  {host.get('cpu_model')}  kvm={host.get('kvm', {}).get('flavor')}"
                    f"  paging={host.get('paging')}  kernel={host.get('kernel')}")
    return "\n\n".join(parts)
