"""Figures of results files (`vlab plot`) and of comparisons, with matplotlib.

One figure per area that has ok rows (exits, paging, io, migration), plus a ratio figure per
comparison. Design choices, and why:

* Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so nothing
  depends on (or changes) the process's interactive backend; PNGs are rendered by Agg.
* Colours come from the Okabe-Ito palette, which stays distinguishable under the common forms
  of colour blindness; line style and hatching carry meaning too (native dashed, model dotted,
  emulated CPL0 hatched) so a grey-scale print still reads.
* Every axis names its quantity and unit, and every title carries the host id, CPU, KVM flavor
  and paging mode: a figure copied out of its report must still say where it was measured.
* Skip/error rows are not drawn (there is nothing to draw) and an area with no ok rows gets no
  figure at all -- never an empty placeholder. The report lists skips and errors instead.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlab import results
from vlab._errors import UsageError
from vlab._outputs import check_dir
from vlab._units import format_size, size_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Okabe & Ito (2008), ordered so the first colours have the most contrast on white.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000",
             "#F0E442")
#: Areas in the order a report presents them, with their titles.
AREAS = {"exits": "VM exits: cost per operation",
         "paging": "Guest paging: cost per memory access",
         "io": "I/O paths: throughput and exits",
         "migration": "Migration: dirty pages"}
#: Every figure's title: the areas', and the exits area's second figure.
FIGURE_TITLES = {**AREAS, "interrupts": "Interrupts: delivery, timer and injection latency"}
FORMATS = ("png", "svg")

_RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
       "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.dpi": 100, "savefig.dpi": 110,
       "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
       "axes.spines.right": False, "svg.fonttype": "path", "hatch.linewidth": 0.8}

_METRIC_LABELS = {"guest_cycles": "guest cycles per operation",
                  "host_ns": "host ns per KVM_RUN trip",
                  "cycles_per_access": "cycles per access",
                  "cycles_per_op": "cycles per operation",
                  "gbit_per_s": "throughput", "exits_per_msg": "exits per message",
                  "msgs_per_s": "messages per second", "rtt_ns": "round-trip time"}


def area_of(experiment: str) -> str:
    """The area an experiment belongs to, from its name prefix (`native.*` goes with exits,
    whose baselines they are); anything unknown is 'other'."""
    prefix = experiment.split(".", 1)[0]
    if prefix == "native":
        return "exits"
    return prefix if prefix in AREAS else "other"


def host_caption(doc: Mapping[str, Any]) -> str:
    """'host X · CPU · kvm pvm, shadow paging' -- the provenance line of every figure."""
    host = doc.get("host", {})
    kvm = host.get("kvm") or {}
    bits = [f"host {host.get('host_id', '?')}"]
    if host.get("cpu_model"):
        bits.append(str(host["cpu_model"]))
    flavor = kvm.get("flavor")
    paging = host.get("paging")
    if flavor or paging:
        bits.append(", ".join(x for x in (f"kvm {flavor}" if flavor else "",
                                          f"{paging} paging" if paging else "") if x))
    thp = host.get("thp")
    if isinstance(thp, dict):  # the fingerprint records {"enabled": ..., "defrag": ...}
        thp = thp.get("enabled")
    if thp is not None:
        bits.append(f"THP {thp}")
    return " · ".join(bits)


def _new_figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _suptitle(fig: "Figure", title: str, doc: Mapping[str, Any]) -> None:
    fig.suptitle(f"{title}\n{host_caption(doc)}", fontsize=10)


def _ok_rows(doc: Mapping[str, Any], area: str) -> list[dict[str, Any]]:
    return [r for r in doc["rows"] if r["status"] == "ok" and area_of(r["experiment"]) == area]


def _unit_label(metric: str, unit: str) -> str:
    name = _METRIC_LABELS.get(metric, metric.replace("_", " "))
    if not unit or name.split()[0] == unit:  # "cycles per access", not "... (cycles)"
        return name
    return f"{name} ({unit})"


def _short(experiment: str) -> str:
    return experiment.split(".", 1)[1] if "." in experiment else experiment


def _bytes_axis(ax: "Axes", values: Iterable[float], axis: str = "x") -> None:
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    vals = sorted(set(v for v in values if v and v > 0))
    getattr(ax, f"set_{axis}scale")("log", base=2)
    if not vals:
        return
    target = getattr(ax, f"{axis}axis")
    # Tick at the measured sizes (thinned to at most 10) so the labels are the sweep's points.
    step = max(1, math.ceil(len(vals) / 10))
    ticks = vals[::step]
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(_FuncFmt(format_size))
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


def _FuncFmt(fn):  # noqa: N802 -- reads like the class it builds
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: fn(v))


def _value_scale(ax: "Axes", values: Sequence[float], axis: str = "y") -> None:
    """Log scale when the values span more than ~20x (exit costs do: 60 to 35,000 cycles).

    With zeros among them (a polled path makes no exits) the scale is symmetric-log, linear
    below the smallest positive value, so that zero stays on the axis instead of vanishing.
    """
    vals = [v for v in values if v is not None]
    pos = [v for v in vals if v > 0]
    if not pos or max(pos) / min(pos) <= 20 or any(v < 0 for v in vals):
        return
    if len(pos) == len(vals):
        getattr(ax, f"set_{axis}scale")("log")
    else:
        getattr(ax, f"set_{axis}scale")("symlog", linthresh=min(pos))


def _vary(rows: Sequence[Mapping[str, Any]], exclude: Iterable[str]) -> list[str]:
    """Parameter keys whose value differs between rows (the ones worth naming in a legend)."""
    exclude = set(exclude)
    keys: list[str] = []
    for r in rows:
        for k in r["params"]:
            if k not in exclude and k not in keys:
                keys.append(k)
    return [k for k in keys if len({repr(r["params"].get(k)) for r in rows}) > 1]


_SIZE_KEYS = ("wss", "msg_bytes", "size", "slot", "bytes", "buffer")


def _pvalue(key: str, value: Any) -> str:
    """A parameter value for a label: byte sizes as 4K/1G (the canonical string keeps raw
    numbers; a figure wants to be read)."""
    if key in _SIZE_KEYS and isinstance(value, int) and not isinstance(value, bool) \
            and value >= 1024:
        return format_size(value)
    return results.params_key({key: value}).split("=", 1)[1]


def _pstr(params: Mapping[str, Any], keys: Iterable[str]) -> str:
    return " ".join(f"{k}={_pvalue(k, params[k])}" for k in keys if k in params)


def case_label(experiment: str, params: Mapping[str, Any], metric: str | None = None) -> str:
    """'paging.random_read backing=4K wss=1G cycles_per_access': a case, short enough for an
    axis label."""
    text = " ".join(x for x in (experiment, _pstr(params, sorted(params))) if x)
    return f"{text} · {metric}" if metric else text


# --------------------------------------------------------------------------------------------
# Areas


def _exit_label(experiment: str, params: Mapping[str, Any], name: bool = True) -> str:
    """'ipi_self @CPL0 (apic=x2apic)': an exits.* case as the bar charts label it (without the
    experiment when `name` is false: a panel whose title names it)."""
    rest = ", ".join(f"{k}={v}" for k, v in params.items() if k != "cpl")
    label = (_short(experiment) if not experiment.startswith("native.") else experiment) \
        if name else ""
    if "cpl" in params:
        label += f" @CPL{params['cpl']}"
    if rest:
        label += f" ({rest})" if label else rest
    return label.strip()


def _exits_figure(doc: Mapping[str, Any]) -> "Figure | None":
    from matplotlib.patches import Patch

    rows = [r for r in _ok_rows(doc, "exits") if r["metric"] in ("guest_cycles", "host_ns")]
    if not rows:
        return None
    cases: list[tuple[str, str]] = []
    for r in rows:
        key = (r["experiment"], results.params_key(r["params"]))
        if key not in cases:
            cases.append(key)
    by = {(r["experiment"], results.params_key(r["params"]), r["metric"]): r for r in rows}
    metrics = [m for m in ("guest_cycles", "host_ns") if any(r["metric"] == m for r in rows)]
    labels = []
    for exp, pkey in cases:
        params = next(r["params"] for r in rows
                      if r["experiment"] == exp and results.params_key(r["params"]) == pkey)
        labels.append(_exit_label(exp, params))
    height = max(2.8, 0.32 * len(cases) + 1.6)
    fig = _new_figure(5.2 * len(metrics) + 1.6, height)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    any_emulated = False
    cpl_levels: list[Any] = []
    for ax, metric in zip(axes, metrics):
        unit = ""
        values = []
        for i, (exp, pkey) in enumerate(cases):
            r = by.get((exp, pkey, metric))
            if r is None:
                continue
            unit = r["unit"]
            flags = r.get("flags") or {}
            cpl = r["params"].get("cpl")
            if cpl not in cpl_levels:
                cpl_levels.append(cpl)
            emulated = bool(flags.get("emulated_cpl0"))
            any_emulated |= emulated
            colour = OKABE_ITO[1] if cpl == 0 else OKABE_ITO[0] if cpl is not None \
                else OKABE_ITO[2]
            med, p99 = r["median"], r["p99"]
            ax.barh(i, med, height=0.65, color=colour, alpha=0.85 if not emulated else 0.45,
                    edgecolor=colour if not emulated else "#333333",
                    hatch="///" if emulated else None, linewidth=0.6)
            if p99 is not None and p99 > med:
                ax.errorbar(med, i, xerr=[[0], [p99 - med]], fmt="none", ecolor="#222222",
                            elinewidth=0.9, capsize=3)
            ax.annotate(results.format_number(med), (max(med, p99 or med), i),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
            values += [med, p99 or med]
        _value_scale(ax, values, "x")
        if ax.get_xscale() == "log" and values:
            ax.set_xlim(min(values) / 2, max(values) * 4)
        elif values:
            ax.set_xlim(0, max(values) * 1.25)
        ax.set_xlabel(_unit_label(metric, unit) + " — bar p50, whisker p99")
        ax.set_title({"guest_cycles": "guest side (rdtsc around the operation)",
                      "host_ns": "host side (VMM wall time per operation)"}.get(metric, metric))
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(range(len(cases)), labels)
    axes[0].invert_yaxis()
    handles = []
    if any(c not in (0, None) for c in cpl_levels):
        handles.append(Patch(facecolor=OKABE_ITO[0], alpha=0.85,
                             label="CPL3 (guest code runs natively)"))
    if None in cpl_levels:
        handles.append(Patch(facecolor=OKABE_ITO[2], alpha=0.85,
                             label="host-side baseline (no guest code)"))
    if 0 in cpl_levels:
        if any_emulated:
            handles.append(Patch(facecolor=OKABE_ITO[1], alpha=0.45, edgecolor="#333333",
                                 hatch="///", label="emulated CPL0 (includes KVM's "
                                 "instruction emulator)"))
        else:
            handles.append(Patch(facecolor=OKABE_ITO[1], alpha=0.85, label="CPL0"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    _suptitle(fig, AREAS["exits"], doc)
    return fig


# The interrupt experiments (experiments/exits.py, "interrupts"): the exits figure draws their
# guest_cycles/host_ns bars like every exits.* row; the interrupts figure draws them by part.
# Delivery rounds first (split into EOI and the rest), then the APIC accesses that deliver
# nothing, then the two latencies.
INTERRUPT_EXPERIMENTS = ("exits.ipi_self", "exits.ipi_other", "exits.tsc_deadline", "exits.eoi",
                         "exits.cr8", "exits.irq_inject")
_DELIVERIES = INTERRUPT_EXPERIMENTS[:3]
#: Colour per quantity of the interrupts figure (never per CPL: the label carries the CPL).
_IRQ_COLOURS = {"ipi_cycles": OKABE_ITO[0], "eoi_cycles": OKABE_ITO[3], "exits.eoi": OKABE_ITO[3],
                "exits.cr8": "#999999", "timer_latency_cycles": OKABE_ITO[5],
                "latency": OKABE_ITO[2]}
_IRQ_LEGEND = {"ipi_cycles": "rest of the round: send or arm, deliver, handler, iret "
                             "(ipi_cycles)",
               "eoi_cycles": "EOI write: in the handler (eoi_cycles), or exits.eoi with nothing "
                             "in service",
               "exits.cr8": "TPR access, mov CR8 (exits.cr8)",
               "timer_latency_cycles": "TSC deadline to handler entry (timer_latency_cycles)",
               "latency": "irqfd write to handler entry (latency_ns)"}


def is_interrupt(experiment: str) -> bool:
    """True for the interrupt experiments, which the interrupts figure draws (and the report
    tabulates in its own section)."""
    return experiment in INTERRUPT_EXPERIMENTS


def _irq_bar(ax: "Axes", y: float, row: Mapping[str, Any], colour: str, height: float,
             note: str = "") -> list[float]:
    """One p50 bar with its p99 whisker and value (and `note`), hatched when the row ran in
    an emulated CPL0; returns the values it spans (for the axis limits)."""
    emulated = bool((row.get("flags") or {}).get("emulated_cpl0"))
    med = row["median"]
    p99 = row["p99"] if row["p99"] is not None else med
    ax.barh(y, med, height=height, color=colour, alpha=0.45 if emulated else 0.85,
            edgecolor="#333333" if emulated else colour, hatch="///" if emulated else None,
            linewidth=0.6)
    if p99 > med:
        ax.errorbar(med, y, xerr=[[0], [p99 - med]], fmt="none", ecolor="#222222",
                    elinewidth=0.9, capsize=2.5)
    ax.annotate(results.format_number(med) + note, (max(med, p99, 0), y), xytext=(3, 0),
                textcoords="offset points", va="center", fontsize=6.5)
    return [med, p99]


def _short_tick(v: float) -> str:
    """'4M', '250k': tick labels of a linear axis of millions that stay legible."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _irq_axis(ax: "Axes", values: list[float], labels: list[str], xlabel: str, title: str,
              exits: list[str], exits_label: str, room: float = 1.0) -> None:
    """Scale, limits, case labels on the left and the exits-per-operation column on the right
    (a twin axis, so the layout makes room for it); `room` widens the space for long values."""
    _value_scale(ax, values, "x")
    if ax.get_xscale() == "log":
        ax.set_xlim(min(v for v in values if v > 0) / 2, max(values) * 6 * room ** 2)
    else:
        lo = min(0.0, min(values))
        ax.set_xlim(lo * 1.3, max(values) * 1.35 * room or 1)
        ax.xaxis.set_major_formatter(_FuncFmt(_short_tick))
        if lo < 0:
            ax.axvline(0, color="#222222", lw=0.7)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="y", visible=False)
    twin = ax.twinx()
    twin.set_ylim(ax.get_ylim())
    twin.set_yticks(range(len(exits)), exits)
    twin.tick_params(axis="y", length=0)
    twin.grid(False)
    twin.set_ylabel(exits_label)


def _exits_text(row: Mapping[str, Any] | None) -> str:
    return "-" if row is None else results.format_number(row["median"])


def _inject_exits(row: Mapping[str, Any]) -> str:
    """KVM's exits per injection over the row's last measurement call (extra.kvm.exits over
    extra.injections): irq_inject has no exits_per_op metric."""
    extra = row.get("extra") or {}
    exits, n = (extra.get("kvm") or {}).get("exits"), extra.get("injections")
    return results.format_number(exits / n) if exits is not None and n else "-"


def _tsc_uncertainty(row: Mapping[str, Any]) -> float | None:
    """The host-to-guest TSC offset's uncertainty in the row's unit (cycles or ns)."""
    tsc = (row.get("extra") or {}).get("tsc_relation") or {}
    unc = tsc.get("uncertainty_cycles")
    if unc is None:
        return None
    if row["unit"] == "ns":
        khz = tsc.get("guest_tsc_khz")
        return unc * 1e6 / khz if khz else None
    return float(unc)


def _interrupts_figure(doc: Mapping[str, Any]) -> "Figure | None":
    """Per interrupt case, the delivery split into its EOI write and the rest; the TSC-deadline
    timer's deadline-to-handler latency; the irqfd injection latency, spinning or halted."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [r for r in _ok_rows(doc, "exits") if is_interrupt(r["experiment"])]
    by = {(r["experiment"], results.params_key(r["params"]), r["metric"]): r for r in rows}
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for r in sorted(rows, key=lambda r: INTERRUPT_EXPERIMENTS.index(r["experiment"])):
        case = (r["experiment"], results.params_key(r["params"]), r["params"])
        if case not in cases:
            cases.append(case)

    def has(case: tuple, metric: str) -> bool:
        return (case[0], case[1], metric) in by

    delivery = [c for c in cases if c[0] in _DELIVERIES
                and (has(c, "ipi_cycles") or has(c, "eoi_cycles"))]
    alone = [c for c in cases if c[0] in ("exits.eoi", "exits.cr8") and has(c, "guest_cycles")]
    timer = [c for c in cases if has(c, "timer_latency_cycles")]
    lat_metric = "latency_ns" if any(has(c, "latency_ns") for c in cases) else "latency_cycles"
    inject = [c for c in cases if has(c, lat_metric)]
    if not (delivery or alone or timer or inject):
        return None
    top = delivery + alone
    bottom = [p for p, cs in (("timer", timer), ("inject", inject)) if cs]
    top_h = 0.42 * len(top) + 1.0 if top else 0
    bottom_h = 0.42 * max((len(timer), len(inject))) + 1.3 if bottom else 0
    fig = _new_figure(11.0, top_h + bottom_h + 1.3)
    heights = [h for h in (top_h, bottom_h) if h]
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights)
    used: list[str] = []
    emulated = any((r.get("flags") or {}).get("emulated_cpl0") for r in rows)
    uncertainty = False
    if top:
        ax = fig.add_subplot(grid[0, :])
        values: list[float] = []
        labels, exits = [], []
        for i, c in enumerate(top):
            labels.append(_exit_label(c[0], c[2]))
            exits.append(_exits_text(by.get((c[0], c[1], "exits_per_op"))))
            parts = ((("ipi_cycles", -0.2), ("eoi_cycles", 0.2)) if c[0] in _DELIVERIES
                     else (("guest_cycles", 0.0),))
            for metric, offset in parts:
                r = by.get((c[0], c[1], metric))
                if r is None:
                    continue
                key = metric if metric != "guest_cycles" else c[0]
                values += _irq_bar(ax, i + offset, r, _IRQ_COLOURS[key],
                                   0.38 if len(parts) > 1 else 0.5)
                legend_key = "eoi_cycles" if key == "exits.eoi" else key
                if legend_key not in used:
                    used.append(legend_key)
        if delivery and alone:
            ax.axhline(len(delivery) - 0.5, color="#777777", lw=0.6, ls="--")
        _irq_axis(ax, values, labels, "guest cycles per operation (guest rdtsc) — bar p50, "
                  "whisker p99", "delivery, split into the handler's EOI write and the rest "
                  "of the round" + ("; below the line, APIC accesses alone" if alone else ""),
                  exits, "VM exits per operation (p50)")
    for j, panel in enumerate(bottom):
        ax = fig.add_subplot(grid[len(heights) - 1, j if len(bottom) > 1 else slice(None)])
        values, labels, exits = [], [], []
        group = timer if panel == "timer" else inject
        metric = "timer_latency_cycles" if panel == "timer" else lat_metric
        colour = _IRQ_COLOURS[metric if panel == "timer" else "latency"]
        for i, c in enumerate(group):
            r = by[(c[0], c[1], metric)]
            labels.append(_exit_label(c[0], c[2], name=False) or _short(c[0]))
            if panel == "timer":
                values += _irq_bar(ax, i, r, colour, 0.55)
                exits.append(_exits_text(by.get((c[0], c[1], "exits_per_op"))))
                continue
            unc = _tsc_uncertainty(r)
            values += _irq_bar(ax, i, r, colour, 0.55,
                               f" ± {results.format_number(unc)}" if unc else "")
            exits.append(_inject_exits(r))
            if unc:
                # the offset shifts every sample alike: a band on the p50, not a whisker
                ax.errorbar(r["median"], i, xerr=unc, fmt="none", ecolor="#222222", alpha=0.4,
                            elinewidth=5, capsize=0)
                values.append(r["median"] - unc)
                uncertainty = True
        used.append(metric if panel == "timer" else "latency")
        if panel == "timer":
            _irq_axis(ax, values, labels, "latency (guest TSC cycles) — bar p50 of per-call "
                      "means, whisker p99", "TSC-deadline timer: deadline to handler entry\n"
                      "(exits.tsc_deadline)", exits, "VM exits per operation (p50)")
        else:
            unit = "ns" if lat_metric == "latency_ns" else "cycles"
            _irq_axis(ax, values, labels, f"latency ({unit}), host TSC to guest TSC — bar p50, "
                      "whisker p99", "interrupt injection: host irqfd write to guest handler\n"
                      "(exits.irq_inject)", exits, "KVM exits per injection (one call)",
                      room=1.5 if uncertainty else 1.0)
    handles: list[Any] = [Patch(facecolor=_IRQ_COLOURS[k], alpha=0.85, label=_IRQ_LEGEND[k])
                          for k in used]
    if emulated:
        handles.append(Patch(facecolor="#dddddd", edgecolor="#333333", hatch="///",
                             label="emulated CPL0 (includes KVM's instruction emulator)"))
    if uncertainty:
        handles.append(Line2D([], [], color="#222222", alpha=0.4, lw=5,
                              label="± uncertainty of the host-to-guest TSC offset (on p50)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    _suptitle(fig, FIGURE_TITLES["interrupts"], doc)
    return fig


def _series_style(i: int, native: bool, model: bool) -> dict[str, Any]:
    markers = "osD^v<>ph*"
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": markers[i % len(markers)],
            "linestyle": ":" if model else ("--" if native else "-"), "markersize": 4,
            "linewidth": 1.4}


def _is_native(params: Mapping[str, Any]) -> bool:
    return params.get("where") == "native"


def _paging_figure(doc: Mapping[str, Any]) -> "Figure | None":
    rows = _ok_rows(doc, "paging")
    sweep = [r for r in rows if size_bytes(r["params"].get("wss")) is not None]
    single = [r for r in rows if r not in sweep]
    experiments: list[tuple[str, str]] = []
    for r in sweep:
        if (r["experiment"], r["metric"]) not in experiments:
            experiments.append((r["experiment"], r["metric"]))
    if not experiments and not single:
        return None
    cols = max(1, min(len(experiments), 3))
    sweep_rows = math.ceil(len(experiments) / cols) if experiments else 0
    bar_height = 0.45 * len(single) + 1.2 if single else 0
    fig = _new_figure(5.6 * cols + 0.8, 4.3 * sweep_rows + bar_height + 0.6)
    heights = [4.3] * sweep_rows + ([bar_height] if single else [])
    grid = fig.add_gridspec(len(heights), cols, height_ratios=heights)
    axes = [fig.add_subplot(grid[i // cols, i % cols]) for i in range(len(experiments))]
    # Colour = host backing, line style = where it ran (solid guest, dashed native, dotted
    # model), marker = guest page size: three independent cues that survive grey-scale.
    backings: list[Any] = []
    for r in sweep:
        if r["params"].get("backing") not in backings:
            backings.append(r["params"].get("backing"))
    pages: list[Any] = []
    for ax, (exp, metric) in zip(axes, experiments):
        group = [r for r in sweep if r["experiment"] == exp and r["metric"] == metric]
        name_keys = [k for k in ("guest_page", "backing") if any(k in r["params"] for r in group)]
        extra = _vary(group, exclude={"wss", "where", *name_keys})
        lines: dict[tuple, list[dict]] = {}
        for r in group:
            p = r["params"]
            native = _is_native(p)
            model = bool((r.get("flags") or {}).get("model"))
            gp = None if native else p.get("guest_page")
            key = (native, model, gp, p.get("backing"), *(repr(p.get(k)) for k in extra))
            lines.setdefault(key, []).append(r)
        xs_all = []
        for key, members in lines.items():
            native, model, gp, backing = key[:4]
            members.sort(key=lambda r: size_bytes(r["params"]["wss"]))
            xs = [size_bytes(r["params"]["wss"]) for r in members]
            ys = [r["median"] for r in members]
            up = [max(0.0, (r["p99"] or r["median"]) - r["median"]) for r in members]
            xs_all += xs
            p = members[0]["params"]
            if native:
                label = f"native, {backing if backing is not None else '?'} pages"
            else:
                label = " on ".join(x for x in (f"guest {gp}" if gp is not None else "",
                                                f"{backing} backing" if backing is not None
                                                else "") if x) or "guest"
            detail = _pstr(p, extra)
            if detail:
                label += f" ({detail})"
            if model:
                label += " — model"
            page_key = "native" if native else gp
            if page_key not in pages:
                pages.append(page_key)
            style = _series_style(0, native, model)
            style["color"] = OKABE_ITO[backings.index(backing) % len(OKABE_ITO)]
            style["marker"] = "osD^v<>ph*"[pages.index(page_key) % 10]
            if model:
                style["color"] = OKABE_ITO[5]
            ax.plot(xs, ys, label=label, **style)
            if not model and any(up):
                ax.errorbar(xs, ys, yerr=[[0] * len(up), up], fmt="none",
                            ecolor=style["color"], elinewidth=0.7, capsize=2, alpha=0.7)
        _bytes_axis(ax, xs_all)
        ax.set_xlabel("working-set size (bytes, log scale)")
        ax.set_ylabel(_unit_label(metric, group[0]["unit"]) + " — p50, whisker p99")
        ax.set_title(_short(exp))
        ax.set_ylim(bottom=0)
        ax.legend(frameon=False)
    if single:
        ax = fig.add_subplot(grid[len(heights) - 1, :])
        single.sort(key=lambda r: (r["experiment"], results.params_key(r["params"]), r["metric"]))
        # an experiment with several metrics per case (pte_update: total, write, invlpg, ...)
        # needs the metric in the label, or its bars look like repeats
        multi = {e for e in {r["experiment"] for r in single}
                 if len({r["metric"] for r in single if r["experiment"] == e}) > 1}
        labels, values = [], []
        for i, r in enumerate(single):
            model = bool((r.get("flags") or {}).get("model"))
            emulated = bool((r.get("flags") or {}).get("emulated_cpl0"))
            colour = OKABE_ITO[5] if model else OKABE_ITO[1] if emulated else OKABE_ITO[2]
            ax.barh(i, r["median"], color=colour, alpha=0.4 if model or emulated else 0.85,
                    hatch="..." if model else "///" if emulated else None,
                    edgecolor="#333333" if model or emulated else colour, height=0.6)
            if r["p99"] and r["p99"] > r["median"]:
                ax.errorbar(r["median"], i, xerr=[[0], [r["p99"] - r["median"]]], fmt="none",
                            ecolor="#222222", elinewidth=0.9, capsize=3)
            ax.annotate(f"{results.format_number(r['median'])} {r['unit']}",
                        (max(r["median"], r["p99"] or 0), i), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7)
            note = " (model)" if model else " (emulated CPL0)" if emulated else ""
            metric = f" · {r['metric'].replace('_', ' ')}" if r["experiment"] in multi else ""
            labels.append(f"{_short(r['experiment'])} "
                          f"{_pstr(r['params'], sorted(r['params']))}{metric}{note}")
            values += [r["median"], r["p99"] or r["median"]]
        ax.set_yticks(range(len(single)), labels)
        ax.invert_yaxis()
        _value_scale(ax, values, "x")
        ax.set_xlim(right=max(values) * (3 if ax.get_xscale() == "log" else 1.2))
        metrics = sorted({r["metric"].replace("_", " ") for r in single})
        ax.set_xlabel(f"{' / '.join(metrics)} — bar p50, whisker p99")
        ax.set_title("fault and page-table costs")
        ax.grid(axis="y", visible=False)
    _suptitle(fig, AREAS["paging"], doc)
    return fig


_IO_LINESTYLES = ("-", "--", "-.", (0, (1, 1)))
_IO_MARKERS = "oxs^vD"


def _io_figure(doc: Mapping[str, Any]) -> "Figure | None":
    """Throughput and exits per message against message size, one line per path and setting.

    A full `vlab run io` has ~17 lines, so the encoding is factored to stay readable: colour =
    path and notify mode (the same in both panels), line style = batch, marker = event_idx (or
    whatever other parameter varies), and one legend below both panels.
    """
    rows = [r for r in _ok_rows(doc, "io") if size_bytes(r["params"].get("msg_bytes")) is not None]
    metrics = [m for m in ("gbit_per_s", "exits_per_msg") if any(r["metric"] == m for r in rows)]
    if not metrics:
        return None
    group_rows = [r for r in rows if r["metric"] in metrics]
    extra = _vary(group_rows, exclude={"msg_bytes", "notify"})
    style_keys = [k for k in extra if k != "batch"]
    families: list[tuple] = []
    values: dict[str, list[str]] = {k: [] for k in extra}
    for r in group_rows:
        fam = (r["experiment"], r["params"].get("notify"))
        if fam not in families:
            families.append(fam)
        for k in extra:
            v = repr(r["params"].get(k))
            if v not in values[k]:
                values[k].append(v)

    def key_of(r: Mapping[str, Any]) -> tuple:
        return (r["experiment"], r["params"].get("notify"),
                *(repr(r["params"].get(k)) for k in extra))

    def style_of(r: Mapping[str, Any], model: bool) -> dict[str, Any]:
        p = r["params"]
        fam = families.index((r["experiment"], p.get("notify")))
        ls = _IO_LINESTYLES[values["batch"].index(repr(p.get("batch"))) % len(_IO_LINESTYLES)] \
            if "batch" in extra else "-"
        mk = "o"
        if style_keys:
            k = style_keys[0]
            mk = _IO_MARKERS[values[k].index(repr(p.get(k))) % len(_IO_MARKERS)]
        return {"color": OKABE_ITO[fam] if fam < len(OKABE_ITO) else f"C{fam % 10}",
                "marker": mk, "linestyle": ":" if model else ls,
                "markersize": 4, "linewidth": 1.3}

    # label only what distinguishes lines: qsize is constant where it exists (None elsewhere)
    shown = [k for k in extra if len({v for v in values[k] if v != "None"}) > 1]
    n_lines = len({key_of(r) for r in group_rows})
    legend_rows = -(-n_lines // 3)
    fig = _new_figure(5.6 * len(metrics) + 0.8, 4.2 + 0.2 * legend_rows)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    handles: dict[str, Any] = {}
    for ax, metric in zip(axes, metrics):
        group = [r for r in rows if r["metric"] == metric]
        lines: dict[tuple, list[dict]] = {}
        for r in group:
            lines.setdefault(key_of(r), []).append(r)
        xs_all, ys_all = [], []
        for key, members in lines.items():
            members.sort(key=lambda r: size_bytes(r["params"]["msg_bytes"]))
            xs = [size_bytes(r["params"]["msg_bytes"]) for r in members]
            ys = [r["median"] for r in members]
            xs_all += xs
            ys_all += ys
            p = members[0]["params"]
            model = bool((members[0].get("flags") or {}).get("model"))
            label = _short(members[0]["experiment"])
            if p.get("notify") is not None:
                label += f" {p['notify']}"
            parts = [f"{k}={_pvalue(k, p.get(k))}" if k != "batch" else f"batch {p.get(k)}"
                     for k in shown if p.get(k) is not None]
            if parts:
                label += " · " + " ".join(parts)
            if model:
                label += " — model"
            (line,) = ax.plot(xs, ys, label=label, **style_of(members[0], model))
            handles.setdefault(label, line)
        _bytes_axis(ax, xs_all)
        if metric == "exits_per_msg":
            _value_scale(ax, ys_all, "y")
            if ax.get_yscale() != "log" and ys_all:
                top = max(ys_all)
                ax.set_ylim(0, top * 2 if ax.get_yscale() == "symlog" else top * 1.1 or 1)
            ax.set_title("VM exits per message (fewer is cheaper)")
        else:
            ax.set_title("throughput (higher is better)")
            _value_scale(ax, ys_all, "y")
            if ax.get_yscale() == "linear":
                ax.set_ylim(bottom=0)
        ax.set_xlabel("message size (bytes, log scale)")
        ax.set_ylabel(_unit_label(metric, group[0]["unit"]) + " — p50")
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
               ncol=3, frameon=False, fontsize="small")
    _suptitle(fig, AREAS["io"], doc)
    return fig


# Experiments that share a panel: the pre-copy simulation (a model) is drawn over the measured
# live migration so that the reader sees at once whether the model predicts the rounds.
_MIGRATION_PANELS = {"migration.dirty_rate": ("dirty", "dirty pages per interval"),
                     "migration.wws": ("wws", "writable working set (WWS) curve"),
                     "migration.live": ("precopy", "pre-copy: pages sent per round"),
                     "migration.precopy_sim": ("precopy", "pre-copy: pages sent per round"),
                     "migration.harvest": ("harvest", "dirty-log harvest")}


def _migration_figure(doc: Mapping[str, Any]) -> "Figure | None":
    rows = [r for r in _ok_rows(doc, "migration") if r.get("series")
            and len(r["series"].get("x", [])) > 0]
    if not rows:
        return None
    panels: dict[str, tuple[str, list[dict]]] = {}
    for r in rows:
        key, title = _MIGRATION_PANELS.get(r["experiment"],
                                           (r["experiment"], _short(r["experiment"])))
        panels.setdefault(key, (title, []))[1].append(r)
    order = ["dirty", "wws", "precopy", "harvest"]
    keys = sorted(panels, key=lambda k: order.index(k) if k in order else len(order))
    n = len(keys)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig = _new_figure(5.2 * cols + 0.6, 4.3 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, key in zip(axes, keys):
        title, group = panels[key]
        vary = _vary(group, exclude=())
        several_exps = len({g["experiment"] for g in group}) > 1
        several_metrics = any(len({g["metric"] for g in group if g["experiment"] == e}) > 1
                              for e in {g["experiment"] for g in group})
        has_model = any((g.get("flags") or {}).get("model") for g in group)
        for i, r in enumerate(group):
            s = r["series"]
            model = bool((r.get("flags") or {}).get("model"))
            bits = []
            if several_exps:
                bits.append(_short(r["experiment"]))
            label = _pstr(r["params"], [k for k in vary if k in r["params"]])
            if label:
                bits.append(label)
            if several_metrics:
                bits.append(f"[{r['metric']}]")
            label = " ".join(bits) or _pstr(r["params"], sorted(r["params"])) or r["metric"]
            if has_model:
                label += " — model" if model else " — measured"
            style = _series_style(i, False, model)
            if len(s["x"]) > 40:
                style["marker"] = None
            ax.plot(s["x"], s["y"], label=label, **style)
        s0 = group[0]["series"]
        if all(isinstance(v, int) for r in group for v in r["series"]["x"]):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(s0.get("x_label") or "x")
        ax.set_ylabel(s0.get("y_label") or group[0]["metric"])
        ax.set_title(title)
        ys = [v for r in group for v in r["series"]["y"] if v is not None]
        if key == "wws":
            xs = [v for r in group for v in r["series"]["x"] if v is not None]
            if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        _value_scale(ax, ys, "y")
        if ax.get_yscale() != "log":
            ax.set_ylim(bottom=0)
        ax.legend(frameon=False)
    _suptitle(fig, AREAS["migration"], doc)
    return fig


# Figure name -> builder, in the order `plot` writes them. "interrupts" is the exits area's
# second figure (area_of puts the interrupt experiments in exits).
_BUILDERS = {"exits": _exits_figure, "interrupts": _interrupts_figure, "paging": _paging_figure,
             "io": _io_figure, "migration": _migration_figure}


def area_figure(doc: Mapping[str, Any], area: str) -> "Figure | None":
    """The figure of one area of one results document, or None when it has no ok rows to draw.

    `area` is an area of AREAS or "interrupts", the exits area's figure of its interrupt
    experiments (INTERRUPT_EXPERIMENTS)."""
    import matplotlib

    if area not in _BUILDERS:
        raise UsageError(f"no figure for area {area!r} (areas: {', '.join(_BUILDERS)})")
    with matplotlib.rc_context(_RC):
        return _BUILDERS[area](doc)


# --------------------------------------------------------------------------------------------
# Comparison figure


def compare_figure(comparison: Mapping[str, Any], min_effect: float = 0.02) -> "Figure | None":
    """Ratio B/A per case with its confidence interval, coloured by verdict; None if no case
    had a ratio. The shaded band is +-min_effect: inside it a change is too small to count."""
    import matplotlib
    from matplotlib.patches import Patch

    rows = [r for r in comparison["rows"] if r.get("ratio") is not None]
    if not rows:
        return None
    colours = {"worse": OKABE_ITO[3], "better": OKABE_ITO[2], "same": "#999999"}
    names = {"worse": "significantly worse", "better": "significantly better",
             "same": "no change called"}
    with matplotlib.rc_context({**_RC, "ytick.labelsize": 7.5 if len(rows) > 30 else 8}):
        fig = _new_figure(11.0, max(3.0, 0.2 * len(rows) + 1.6))
        ax = fig.subplots()
        ax.margins(y=0.01)
        labels = []
        lo_all, hi_all = [1.0], [1.0]
        for i, r in enumerate(rows):
            ratio = r["ratio"]
            colour = colours[r.get("direction", "same")]
            ax.barh(i, ratio - 1.0, left=1.0, color=colour, height=0.65, alpha=0.85)
            if r.get("ci_low") is not None and r.get("ci_high") is not None:
                ax.errorbar(ratio, i, xerr=[[max(0.0, ratio - r["ci_low"])],
                                            [max(0.0, r["ci_high"] - ratio)]],
                            fmt="none", ecolor="#222222", elinewidth=0.9, capsize=3)
                lo_all.append(r["ci_low"])
                hi_all.append(r["ci_high"])
            lo_all.append(ratio)
            hi_all.append(ratio)
            label = case_label(r["experiment"], r["params"], r["metric"])
            if r.get("higher_is_better"):
                label += " ↑"
            labels.append(label)
        ax.axvspan(1 - min_effect, 1 + min_effect, color="#bbbbbb", alpha=0.35, lw=0)
        ax.axvline(1.0, color="#222222", lw=0.8)
        ax.set_yticks(range(len(rows)), labels)
        ax.invert_yaxis()
        lo = min(min(lo_all), 1.0 - 2 * min_effect)
        hi = max(max(hi_all), 1.0 + 2 * min_effect)
        pad = (hi - lo) * 0.06
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel("ratio B/A (1 = unchanged), whisker 95% CI; ↑ = higher is better")
        ax.grid(axis="y", visible=False)
        a, b = comparison["a"], comparison["b"]
        present = [d for d in ("worse", "better", "same")
                   if any(r.get("direction", "same") == d for r in rows)]
        handles = [Patch(color=colours[d], label=names[d]) for d in present]
        handles.append(Patch(color="#bbbbbb", alpha=0.35,
                             label=f"±{min_effect * 100:g}% (below minimum effect)"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                   frameon=False)
        fig.suptitle(f"B = {b['name']} (host {b['host_id']}) vs A = {a['name']} "
                     f"(host {a['host_id']})", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# Files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "run"


def _save(fig: "Figure", out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        meta = {"Date": None} if fmt == "svg" else {"Software": None} if fmt == "png" else None
        fig.savefig(path, format=fmt, metadata=meta)
        paths.append(path)
    return paths


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise UsageError(f"unsupported figure format {', '.join(bad) or '(none)'} "
                         "(use png, svg or pdf)")
    return formats


def _as_docs(docs: Any) -> list[tuple[dict[str, Any], str]]:
    if isinstance(docs, (Mapping, str, os.PathLike)):
        docs = [docs]
    out = []
    for i, d in enumerate(docs):
        if isinstance(d, Mapping):
            results.validate(d)
            out.append((dict(d), d.get("run_id") or f"run{i + 1}"))
        else:
            out.append((results.read(d), Path(d).stem))
    return out


def plot(docs: Any, out_dir: str | os.PathLike[str],
         formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write one figure per area with ok rows, per document, in each format; return the paths.

    `docs` are results documents (dicts) or paths to results files. With one document the
    files are `exits.png`, `paging.svg` ...; with several each name is prefixed with the
    document's host id and run (file stem) so nothing is overwritten.
    """
    formats = _check_formats(formats)
    items = _as_docs(docs)
    out = check_dir(out_dir, "plot output directory")   # created, writable, or UsageError
    written: list[Path] = []
    seen: set[str] = set()
    for doc, name in items:
        prefix = ""
        if len(items) > 1:
            prefix = _slug(f"{doc['host'].get('host_id')}-{name}")
            while prefix in seen:
                prefix += "_"
            seen.add(prefix)
            prefix += "-"
        for area in _BUILDERS:
            fig = area_figure(doc, area)
            if fig is not None:
                written += _save(fig, out, prefix + area, formats)
    return written


def plot_compare(compare_result: Mapping[str, Any], out_dir: str | os.PathLike[str],
                 formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write the ratio figure of each comparison in a `compare` result; return the paths.

    Named `compare.<fmt>` for a single comparison, else `compare-<B>-vs-<A>.<fmt>`.
    """
    formats = _check_formats(formats)
    out = check_dir(out_dir, "plot output directory")
    written: list[Path] = []
    comps = compare_result["comparisons"]
    for i, c in enumerate(comps):
        fig = compare_figure(c, compare_result.get("min_effect", 0.02))
        if fig is None:
            continue
        stem = "compare" if len(comps) == 1 else \
            f"compare-{i + 1}-{_slug(Path(str(c['b']['name'])).stem)}-vs-" \
            f"{_slug(Path(str(c['a']['name'])).stem)}"
        written += _save(fig, out, stem, formats)
    return written
