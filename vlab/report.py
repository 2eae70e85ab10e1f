"""`vlab report`: one self-contained HTML file from one or more results files.

Self-contained means the file can be mailed, attached to a ticket or opened years later: CSS is
inline, figures are embedded as base64 PNG, there are no external resources (no fonts, scripts or
images fetched from anywhere). A few lines of inline JavaScript record, on `<body>`, how many
figures decoded (`data-figures-loaded` out of `data-figures-expected`) so a headless-browser test
can check the report renders, not only that it was written.

What a reader needs to trust the numbers comes before the numbers: the host record of each file,
then the warnings (noisy metrics, emulated CPL0, nested virtualization, CPU governor, model
rows), then per area a "how to read this" paragraph, figures and tables, then what was skipped
or failed and why, and, for two or more files, the comparison of each file with the first.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlab import results
from vlab.compare import compare
from vlab._files import atomic_open
from vlab._outputs import check_file
from vlab.host.diff import flatten_host, is_volatile
from vlab.plot import (AREAS, FIGURE_TITLES, area_figure, area_of, compare_figure, host_caption,
                       is_interrupt)
from vlab.host import emulation as _emulation

_HOW_TO_READ = {
    "exits": (
        "Each bar is the median (p50) cost of one operation that makes the guest leave guest "
        "mode; the whisker reaches the 99th percentile. <em>Guest cycles</em> are timed by the "
        "guest itself with <code>rdtsc</code> around the operation; <em>host ns</em> is the wall "
        "time of one <code>KVM_RUN</code> round trip seen by the VMM. <code>exits.nop</code> and "
        "<code>native.*</code> are baselines: the cost of an exit is its distance from them. "
        "Hatched bars ran at guest CPL0 on a host that <strong>emulates CPL0 instruction by "
        "instruction</strong> (e.g. KVM's PVM backend): they include the emulator's cost "
        "(thousands of cycles per instruction) and are not pure exit costs; compare them with "
        "the CPL0 calibration in the host record. The axis is logarithmic when values span "
        "more than 20&times;."),
    "interrupts": (
        "The interrupt experiments, by part; the guest's handler counted every delivery and "
        "timestamped its entry. <em>Delivery</em>: for each self-IPI, IPI to the other vCPU "
        "(running or halted) and TSC-deadline case, two bars: the handler's EOI write "
        "(<code>eoi_cycles</code>, one mean per measurement call, hence few samples) and the "
        "rest of the round (<code>ipi_cycles</code>: the round's <code>guest_cycles</code> less "
        "that EOI, i.e. sending the IPI or arming the timer, the delivery, the handler and its "
        "return). The axis is logarithmic: compare the values, not the bars' lengths. Below "
        "the dashed line, <code>exits.eoi</code> (an EOI with nothing in service) and "
        "<code>exits.cr8</code> (a task-priority access) are whole operations. <em>Timer</em>: "
        "from the deadline to the handler's entry, for a deadline armed in the future (an "
        "expired one fires at once and has no such latency). <em>Injection</em>: from the "
        "host's irqfd write (host TSC) to the guest handler's entry (guest TSC), the vCPU "
        "spinning or halted; the two clocks are related by a measured offset whose "
        "uncertainty is the grey band on the median and the &plusmn; after its value (method "
        "in the table below). The right-hand column gives VM exits per operation as KVM "
        "counted them, host-caused exits left out; for injection, KVM's raw exit count per "
        "injection over one call, host-caused exits and the wait before each write included. "
        "With hardware APIC virtualization (APICv, AVIC) an EOI needs no exit, nor an IPI "
        "with IPI virtualization: this column shows which. Whiskers reach p99; hatched bars "
        "ran at guest CPL0 on a host that <strong>emulates CPL0</strong> and include the "
        "emulator's cost."),
    "paging": (
        "Cost of one memory access against the working-set size (log scale). Each solid line "
        "is a guest page size on a host backing; <strong>dashed</strong> lines are the same "
        "loop run natively on the host; <strong>dotted</strong> lines are a model's prediction, "
        "not a measurement. While the working set fits in the TLB's reach the cost is flat; "
        "beyond it every access pays a page walk. Under nested paging (EPT/NPT) a walk touches "
        "both the guest's and the host's tables; under shadow paging the hardware walks one "
        "table, so accesses cost about what they cost natively and the price moves to page "
        "faults and page-table updates (the bar panel, when present). Whiskers reach p99."),
    "io": (
        "Throughput of each path between guest and world against the message size (log "
        "scale), and how many VM exits each message costs. <code>notify</code> says how the "
        "other side learns of new data: <code>poll</code> spins on shared memory (no exits), "
        "<code>kernel</code> uses an ioeventfd handled inside KVM, <code>user</code> exits to "
        "the VMM process, <code>doorbell</code> rings an ivshmem register that interrupts the "
        "peer VM (<code>vmm_wait</code>: the peer waits for it in its VMM instead). "
        "<code>used=interrupt</code>: the virtio device signals completions with an interrupt "
        "instead of being polled. Batching divides the exits per message. Dashed lines are "
        "host-only baselines."),
    "migration": (
        "How much memory the guest dirties, as the migration's dirty log sees it. "
        "<em>Dirty pages per interval</em> is the time series of pages reported dirty each "
        "harvest; the <em>WWS curve</em> is the number of distinct pages written within a "
        "window of the given length; <em>pre-copy rounds</em> show the pages sent in each round "
        "of a pre-copy migration, which converges only when a round's pages can be sent within "
        "the downtime budget. Dotted lines are model results, solid lines measurements."),
    "other": "Experiments outside the four main areas; table only.",
}

_CSS = """
:root { --fg:#1b1b1b; --muted:#5a5a5a; --line:#d6d6d6; --bg-alt:#f5f6f8; --warn:#8a4b00;
        --bad:#b33900; --good:#00745a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1400px; padding: 0 24px 48px; }
h1 { font-size: 1.6em; margin: 24px 0 4px; }
h2 { font-size: 1.3em; margin: 36px 0 8px; padding-top: 8px; border-top: 2px solid var(--line); }
h3 { font-size: 1.08em; margin: 22px 0 6px; }
p.meta, .muted { color: var(--muted); }
nav { margin: 8px 0 16px; } nav a { margin-right: 14px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.92em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 10px; text-align: left;
         vertical-align: top; }
th { background: var(--bg-alt); position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.differs td { background: #fff4e0; }
tr.model td { font-style: italic; }
.tag { display: inline-block; padding: 0 6px; margin: 0 3px 1px 0; border-radius: 8px;
       font-size: 11px; background: #e8eaee; white-space: nowrap; }
.tag.emul { background: #ffe3c2; } .tag.model { background: #e4dcf0; }
.tag.noisy { background: #fde0dc; } .tag.hib { background: #dcefe8; }
.worse { color: var(--bad); font-weight: 600; } .better { color: var(--good); font-weight: 600; }
.howto { background: var(--bg-alt); border-left: 4px solid #0072B2; padding: 8px 12px;
         max-width: 75em; }
ul.warnings li { margin: 3px 0; } ul.warnings .kind { color: var(--warn); font-weight: 600; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; height: auto;
         border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12px; }
.status-skip { color: var(--warn); } .status-error { color: var(--bad); font-weight: 600; }
.wrap { overflow-x: auto; }
"""

# Counts decoded figures onto <body> so a headless browser (or a curious reader with devtools)
# can tell a broken image from a missing one. Plain ES5: nothing here should be able to fail.
_SCRIPT = """
(function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img.fig"));
  var body = document.body;
  body.setAttribute("data-figures-expected", String(imgs.length));
  function count() {
    var ok = 0, done = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete) { done++; if (imgs[i].naturalWidth > 0) { ok++; } }
    }
    body.setAttribute("data-figures-loaded", String(ok));
    if (done === imgs.length) { body.setAttribute("data-figures-done", "1"); }
  }
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].addEventListener("load", count);
    imgs[i].addEventListener("error", count);
  }
  window.addEventListener("load", count);
  count();
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _png_data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Figures:
    """Collects embedded figures so the report can say how many it holds."""

    def __init__(self) -> None:
        self.count = 0

    def html(self, fig: Any, alt: str, caption: str) -> str:
        self.count += 1
        return (f'<figure id="fig-{self.count}"><img class="fig" src="{_png_data_uri(fig)}" '
                f'alt="{_e(alt)}"><figcaption>Figure {self.count}. {_e(caption)}</figcaption>'
                "</figure>")


def _flags_html(row: Mapping[str, Any]) -> str:
    flags = row.get("flags") or {}
    tags = []
    if flags.get("emulated_cpl0"):
        tags.append('<span class="tag emul">emulated CPL0</span>')
    if flags.get("model"):
        tags.append('<span class="tag model">model</span>')
    if flags.get("higher_is_better"):
        tags.append('<span class="tag hib">higher is better</span>')
    cv = results._cv(row)
    if cv is not None and cv > results.NOISY_CV:
        tags.append(f'<span class="tag noisy" title="stdev / mean">noisy {cv * 100:.0f}%</span>')
    other = [w for w in row.get("warnings") or [] if not w.startswith("stdev is ")]
    for w in other:
        tags.append(f'<span class="tag" title="{_e(w)}">warning</span>')
    for k, v in flags.items():
        if k not in ("emulated_cpl0", "model", "higher_is_better") and v:
            tags.append(f'<span class="tag">{_e(k)}{"" if v is True else "=" + _e(v)}</span>')
    return "".join(tags)


def _params_html(params: Mapping[str, Any]) -> str:
    """The canonical params string, allowed to wrap after each comma in a narrow column."""
    return _e(results.params_key(params) or "-").replace(",", ",<wbr>")


def _num(v: Any) -> str:
    return _e(results.format_number(v))


def _table(headers: Sequence[str], rows: Sequence[str], numeric: set[int]) -> str:
    head = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    return f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>' \
           f'{"".join(rows)}</tbody></table></div>'


def _area_table(rows: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for r in rows:
        cls = ' class="model"' if (r.get("flags") or {}).get("model") else ""
        mean_sd = results.format_number(r["mean"])
        if r["stdev"] is not None:
            # A constant metric's stdev is rounding noise (1e-19); it reads better as 0.
            sd = r["stdev"] if r["stdev"] > abs(r["mean"] or 0) * 1e-9 else 0
            mean_sd += " ± " + results.format_number(sd)
        out.append(
            f"<tr{cls}><td><code>{_e(r['experiment'])}</code></td>"
            f"<td><code>{_params_html(r['params'])}</code></td>"
            f"<td>{_e(r['metric'])}</td><td class=\"num\">{_num(r['median'])}</td>"
            f"<td class=\"num\">{_num(r['p90'])}</td><td class=\"num\">{_num(r['p99'])}</td>"
            f"<td class=\"num\">{_e(mean_sd)}</td><td class=\"num\">{_e(r['n'])}</td>"
            f"<td>{_e(r['unit'])}</td><td>{_flags_html(r)}</td></tr>")
    return _table(["experiment", "params", "metric", "p50", "p90", "p99", "mean ± stdev", "n",
                   "unit", "flags"], out, {3, 4, 5, 6, 7})


# Report sections in order: the areas, with the exits area's interrupt experiments in a
# section of their own after it (their figure is "interrupts"), then anything else.
_SECTIONS = ("exits", "interrupts", *(a for a in AREAS if a != "exits"), "other")


def _in_section(row: Mapping[str, Any], section: str, figure: bool = False) -> bool:
    """Whether a section tabulates `row` (with `figure`: or draws it -- the exits figure draws
    the interrupt experiments' guest_cycles and host_ns bars too)."""
    if section == "interrupts":
        return is_interrupt(row["experiment"])
    return area_of(row["experiment"]) == section and (figure or not is_interrupt(
        row["experiment"]))


def _tsc_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """How exits.irq_inject related the host's TSC to the guest's, per case: the offset's
    method and uncertainty qualify every injection latency."""
    out, seen = [], set()
    for r in rows:
        tsc = (r.get("extra") or {}).get("tsc_relation")
        key = (r["experiment"], results.params_key(r["params"]))
        if not isinstance(tsc, dict) or key in seen:
            continue
        seen.add(key)
        khz, unc = tsc.get("guest_tsc_khz"), tsc.get("uncertainty_cycles")
        unc_ns = unc * 1e6 / khz if khz and unc is not None else None
        agrees = tsc.get("kvm_agrees_with_guest")
        out.append(f"<tr><td><code>{_e(r['experiment'])}</code></td>"
                   f"<td><code>{_params_html(r['params'])}</code></td>"
                   f"<td>{_e(tsc.get('method'))}</td>"
                   f"<td class=\"num\">{_num(tsc.get('offset_cycles'))}</td>"
                   f"<td class=\"num\">{_num(unc)}</td><td class=\"num\">{_num(unc_ns)}</td>"
                   f"<td>{_e('-' if agrees is None else 'yes' if agrees else 'no')}</td></tr>")
    if not out:
        return ""
    return ("<p>Host-to-guest TSC relation of the injection rows (guest TSC = host TSC + "
            "offset):</p>" + _table(["experiment", "params", "method", "offset (cycles)",
                                     "± (cycles)", "± (ns)", "KVM_GET_MSRS agrees with guest "
                                     "rdtsc"], out, {3, 4, 5}))


def _host_value(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


# The host keys a reader needs first; the full record (often 100+ keys) is folded below them.
_HOST_SUMMARY = ("host_id", "hostname", "cpu_model", "cpu_vendor", "kernel", "kvm.flavor",
                 "paging", "nested", "emulated_cpl0", "cpl0_emulated", "thp.enabled", "thp",
                 "hugepages", "governor", "tsc_khz")


def _host_rows(keys: Sequence[str], flat: Sequence[Mapping[str, Any]], multi: bool) -> list[str]:
    rows = []
    for key in keys:
        values = [_host_value(f.get(key)) if key in f else "(absent)" for f in flat]
        differs = multi and len(set(values)) > 1 and not is_volatile(key)
        cls = ' class="differs"' if differs else ""
        rows.append(f"<tr{cls}><td><code>host.{_e(key)}</code></td>"
                    + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    return rows


def _host_section(items: Sequence[tuple[Mapping[str, Any], str]]) -> str:
    flat = [flatten_host(doc.get("host", {})) for doc, _ in items]
    multi = len(items) > 1
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    run_keys = ("run_id", "started_at", "finished_at", "vlab_version", "suite", "argv")
    run_rows = []
    for key in run_keys:
        values = [_host_value(doc.get(key) if key != "argv" else " ".join(doc.get("argv", [])))
                  for doc, _ in items]
        run_rows.append(f"<tr><td><code>{_e(key)}</code></td>"
                        + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    summary: list[str] = []
    for key in _HOST_SUMMARY:  # a dict-valued key (thp, hugepages) shows its flattened leaves
        summary += [k for k in keys if (k == key or k.startswith(key + "."))
                    and k not in summary and not is_volatile(k)]
    differing = [k for k in keys if multi and k not in summary and not is_volatile(k)
                 and len({_host_value(f.get(k)) if k in f else "(absent)" for f in flat}) > 1]
    headers = ["key"] + [f"{name} (host {doc['host'].get('host_id')})" for doc, name in items]
    out = ['<h2 id="host">Host record</h2>']
    if multi:
        out.append('<p class="muted">Highlighted rows differ between files (volatile keys such '
                   "as free memory are not highlighted).</p>")
    out.append(_table(headers, run_rows + _host_rows(summary + differing, flat, multi), set()))
    out.append(f"<details><summary>Full host record ({len(keys)} keys)</summary>"
               + _table(headers, _host_rows(keys, flat, multi), set()) + "</details>")
    return "".join(out)


def _warnings(items: Sequence[tuple[Mapping[str, Any], str]]
              ) -> list[tuple[str, str, list[str]]]:
    """(kind, text, details) for the warnings section, in reading order.

    Host-level warnings first (they qualify every number), then per-row ones grouped by kind
    so that twenty noisy rows make one item with a list, not twenty paragraphs.
    """
    out: list[tuple[str, str, list[str]]] = []
    multi = len(items) > 1
    for doc, name in items:
        where = f"{name}: " if multi else ""
        host = doc.get("host", {})
        tcg = _emulation.warning(host)
        if tcg:
            out.append(("emulated CPU", f"{where}host {host.get('host_id')}: {tcg}.", []))
        if host.get("nested"):
            out.append(("nested virtualization", f"{where}host {host.get('host_id')} is itself "
                        "a virtual machine; every figure includes the outer hypervisor's cost "
                        "and noise.", []))
        emulated = [r for r in doc["rows"] if (r.get("flags") or {}).get("emulated_cpl0")]
        if results.host_cpl0_emulated(host) or emulated:
            cal = host.get("calibration") or {}
            cal_text = ", ".join(
                f"{k} = {_cal_value(v)}"
                for k, v in cal.items()) if isinstance(cal, dict) else ""
            out.append(("emulated CPL0", f"{where}guest CPL0 code is emulated instruction by "
                        f"instruction on this host; {len(emulated)} row(s) ran at CPL0 and "
                        "include the emulator's cost, so they are not exit costs"
                        + (f" (calibration: {cal_text})" if cal_text else "") + ".",
                        [_case(r) for r in emulated]))
        gov = host.get("governor")
        govs = set(map(str, gov.values())) if isinstance(gov, dict) else {str(gov)} if gov \
            else set()
        bad = sorted(g for g in govs if g != "performance")
        if bad:
            out.append(("CPU governor", f"{where}CPU frequency governor is {', '.join(bad)}, "
                        "not performance: clock changes add noise and bias.", []))
        noisy, models, other = [], [], []
        for r in doc["rows"]:
            cv = results._cv(r)
            if cv is not None and cv > results.NOISY_CV:
                noisy.append(f"{_case(r)}: stdev {cv * 100:.1f}% of the mean (n={r['n']})")
            if (r.get("flags") or {}).get("model") and r["status"] == "ok":
                models.append(_case(r))
            other += [f"{_case(r)}: {w}" for w in r.get("warnings") or []
                      if not w.startswith("stdev is ")]
        if noisy:
            out.append(("noisy", f"{where}{len(noisy)} metric(s) have a standard deviation "
                        "above 10% of the mean: treat their medians with care.", noisy))
        if models:
            out.append(("model", f"{where}{len(models)} row(s) are model results, not "
                        "measurements (drawn dotted, flagged 'model' in tables).", models))
        if other:
            out.append(("warning", f"{where}{len(other)} warning(s) recorded with rows.", other))
    return out


def _cal_value(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return results.format_number(v)
    return _host_value(v)


def _case(r: Mapping[str, Any]) -> str:
    return " ".join(x for x in (r["experiment"], results.params_key(r["params"]), r["metric"])
                    if x)


def _skips_section(items: Sequence[tuple[Mapping[str, Any], str]]) -> str:
    rows = []
    multi = len(items) > 1
    for doc, name in items:
        for r in doc["rows"]:
            if r["status"] == "ok":
                continue
            rows.append(f"<tr>{f'<td>{_e(name)}</td>' if multi else ''}"
                        f"<td><code>{_e(r['experiment'])}</code></td>"
                        f"<td><code>{_params_html(r['params'])}</code></td>"
                        f"<td>{_e(r['metric'])}</td>"
                        f"<td class=\"status-{_e(r['status'])}\">{_e(r['status'])}</td>"
                        f"<td>{_e(r['reason'])}</td></tr>")
    text = '<h2 id="skips">Skipped and failed</h2>'
    if not rows:
        return text + "<p>Every case ran.</p>"
    headers = (["file"] if multi else []) + ["experiment", "params", "metric", "status", "reason"]
    return text + ("<p>These cases have no numbers. A skip means the host cannot run the case "
                   "(the reason names what is missing); an error means it was attempted and "
                   "failed.</p>") + _table(headers, rows, set())


def _verdict_html(r: Mapping[str, Any]) -> str:
    cls = {"worse": "worse", "better": "better"}.get(r.get("direction", "same"), "")
    return f'<span class="{cls}">{_e(r["verdict"])}</span>' if cls else _e(r["verdict"])


def _compare_section(result: Mapping[str, Any], figs: _Figures) -> str:
    out = ['<h2 id="compare">Comparison</h2>',
           '<div class="howto"><strong>How to read this.</strong> Each file after the first is '
           "compared with the first (A). The ratio is B/A of the metric; each worker process "
           "counts once, by its median, and the 95% confidence interval is of the ratio of "
           "those medians' geometric means. A change is reported only when it is significant "
           "after false-discovery control, larger than "
           f"{result['min_effect'] * 100:g}% (the grey band in the figure) and larger than 1 "
           "cycle or ns per operation; for throughput-like metrics (↑) a ratio above 1 is "
           "better. Host keys "
           "that differ are listed first because they usually explain the change.</div>"]
    for c in result["comparisons"]:
        a, b = c["a"], c["b"]
        out.append(f"<h3>B = {_e(b['name'])} vs A = {_e(a['name'])}</h3>")
        if c["host_diff"]:
            out.append("<p>What changed on the host:</p>")
            out.append(_table(["key", "A", "B"], [
                f"<tr><td><code>{_e(d['key'])}</code></td><td>{_e(_host_value(d['a']))}</td>"
                f"<td>{_e(_host_value(d['b']))}</td></tr>" for d in c["host_diff"]], set()))
        else:
            out.append("<p>No host key differs (volatile keys ignored).</p>")
        fig = compare_figure(c, result["min_effect"])
        if fig is not None:
            out.append(figs.html(fig, f"ratio B/A per metric, {b['name']} vs {a['name']}",
                                 f"Ratio B/A per case with 95% CI: {b['name']} vs {a['name']}."))
        rows = []
        for r in c["rows"]:
            ci = "-" if r.get("ci_low") is None else f"{r['ci_low']:.3f} – {r['ci_high']:.3f}"
            p = r.get("p_value")
            ptxt = "-" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            rows.append(
                f"<tr><td><code>{_e(r['experiment'])}</code></td>"
                f"<td><code>{_params_html(r['params'])}</code></td><td>{_e(r['metric'])}"
                f"{' ↑' if r.get('higher_is_better') else ''}</td>"
                f"<td class=\"num\">{_num(r['a']['median'])}</td>"
                f"<td class=\"num\">{_num(r['b']['median'])}</td><td>{_e(r['unit'])}</td>"
                f"<td class=\"num\">{ratio}</td><td class=\"num\">{_e(ci)}</td>"
                f"<td class=\"num\">{_e(ptxt)}</td>"
                f"<td>{_verdict_html(r)}</td></tr>")
        if rows:
            out.append(_table(["experiment", "params", "metric", "A p50", "B p50", "unit", "B/A",
                               "95% CI", "p", "verdict"], rows, {3, 4, 6, 7, 8}))
        else:
            out.append("<p>No case was measured in both files.</p>")
        for title, key, why in (("Only in A", "only_in_a", "status"),
                                ("Only in B", "only_in_b", "status"),
                                ("Incomparable: experiment version differs", "incomparable",
                                 "reason"),
                                ("Not compared (skipped or failed on a side)", "not_compared",
                                 "reason")):
            items = c[key]
            if not items:
                continue
            out.append(f"<p><strong>{_e(title)}</strong> ({len(items)}):</p><ul>")
            out += [f"<li><code>{_e(r['experiment'])}</code> "
                    f"<code>{_params_html(r['params'])}</code> "
                    f"{_e(r['metric'])}: {_e(r[why])}</li>" for r in items]
            out.append("</ul>")
        if c["warnings"]:
            out.append("<ul>" + "".join(f"<li>{_e(w)}</li>" for w in c["warnings"]) + "</ul>")
    return "".join(out)


def render(docs: Sequence[tuple[Mapping[str, Any], str]], *, min_effect: float = 0.02,
           title: str = "vlab report") -> str:
    """The report's HTML for already-read documents, each given with its display name."""
    items = [(doc, name) for doc, name in docs]
    figs = _Figures()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    from vlab import __version__

    present = []
    for area in _SECTIONS:
        if any(_in_section(r, area, figure=True) for doc, _ in items for r in doc["rows"]):
            present.append(area)
    nav = ['<a href="#host">host</a>', '<a href="#warnings">warnings</a>']
    nav += [f'<a href="#area-{a}">{_e(a)}</a>' for a in present]
    nav.append('<a href="#skips">skipped and failed</a>')
    if len(items) > 1:
        nav.append('<a href="#compare">comparison</a>')
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="meta">Generated {now} by vlab {_e(__version__)} from '
            + ", ".join(f"<code>{_e(name)}</code> ({_e(host_caption(doc))})"
                        for doc, name in items) + "</p>",
            "<nav>" + "".join(nav) + "</nav>"]
    total = {s: sum(1 for doc, _ in items for r in doc["rows"] if r["status"] == s)
             for s in results.STATUSES}
    body.append(f"<p>{total['ok']} measured rows, {total['skip']} skipped, {total['error']} "
                "failed.</p>")
    body.append(_host_section(items))
    warn = _warnings(items)
    body.append('<h2 id="warnings">Warnings</h2>')
    if warn:
        lis = []
        for kind, text, details in warn:
            sub = ""
            if details:
                # Short lists open, long ones (every CPL0 row) folded to keep the page usable.
                opened = " open" if len(details) <= 8 else ""
                sub = f"<details{opened}><summary>{len(details)} row(s)</summary><ul>" + "".join(
                    f"<li><code>{_e(d)}</code></li>" for d in details) + "</ul></details>"
            lis.append(f'<li><span class="kind">{_e(kind)}:</span> {_e(text)}{sub}</li>')
        body.append('<ul class="warnings">' + "".join(lis) + "</ul>")
    else:
        body.append("<p>None: no noisy metric, no emulated CPL0, not nested, performance "
                    "governor (or not reported), no model rows.</p>")
    for area in present:
        title_text = FIGURE_TITLES.get(area, "Other experiments")
        body.append(f'<h2 id="area-{area}">{_e(title_text)}</h2>')
        body.append(f'<div class="howto"><strong>How to read this.</strong> '
                    f"{_HOW_TO_READ[area]}</div>")
        for doc, name in items:
            if not any(_in_section(r, area, figure=True) for r in doc["rows"]):
                continue
            rows = [r for r in doc["rows"] if _in_section(r, area)]
            if len(items) > 1:
                body.append(f"<h3>{_e(name)} — host {_e(doc['host'].get('host_id'))}</h3>")
            fig = area_figure(doc, area) if area in FIGURE_TITLES else None
            if fig is not None:
                body.append(figs.html(fig, f"{title_text}, {name}",
                                      f"{title_text} — {name} ({host_caption(doc)})."))
            ok = [r for r in rows if r["status"] == "ok"]
            if ok:
                body.append(_area_table(ok))
            if area == "exits" and any(is_interrupt(r["experiment"]) for r in doc["rows"]):
                body.append('<p class="muted">The interrupt experiments\' rows (drawn above '
                            'too) are tabulated under <a href="#area-interrupts">interrupts</a>.'
                            "</p>")
            if area == "interrupts":
                body.append(_tsc_table(ok))
            not_ok = len(rows) - len(ok)
            if not_ok:
                body.append(f'<p class="muted">{not_ok} case(s) of this area have no numbers: '
                            'see <a href="#skips">skipped and failed</a>.</p>')
    body.append(_skips_section(items))
    if len(items) > 1:
        result = compare([d for d, _ in items], min_effect=min_effect,
                         names=[n for _, n in items])
        body.append(_compare_section(result, figs))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
            f"<body data-figures-embedded=\"{figs.count}\">\n" + "\n".join(body)
            + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def report(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
           out_html: str | os.PathLike[str], *, min_effect: float = 0.02) -> Path:
    """Read results files and write one self-contained HTML report to `out_html`.

    With two or more files the report includes the comparison of each with the first. Any
    unreadable or invalid file raises `UsageError` naming it before anything is written; the
    HTML itself is written atomically (temp file + rename), like results files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    items = [(results.read(p), str(p)) for p in paths]
    if not items:
        from vlab._errors import UsageError

        raise UsageError("report needs at least one results file")
    out = check_file(out_html, "report")     # its directory created and writable, or UsageError
    text = render(items, min_effect=min_effect)
    with atomic_open(out, "w", perms=0o644) as f:
        f.write(text)
    return out
