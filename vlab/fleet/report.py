"""`vlab fleet report DIR`: one self-contained HTML page across a fleet's hosts.

* the hosts: status (an unreachable or failing host is an error row with its reason), vlab's
  host_id, CPU, microcode, kernel, KVM flavor and paging mode (from the results file, or from
  the host's `vlab doctor --json` when it has no results);
* the host differences: for every host, the configuration keys whose values differ from the
  baseline's (`vlab.compare.host_diff`: volatile keys such as free memory left out);
* the matrix: one line per case (experiment, parameters, metric) of the baseline, one column
  per other host: the ratio host/baseline of the medians, coloured by the verdict of
  `vlab.compare` (significant and larger than `min_effect`, with the false-discovery rate
  controlled across each host's column).

The baseline is a host named with `--baseline`, by default the first host with results.
`fleet_matrix` is the same comparison as data, for other readers (and the tests).
"""
from __future__ import annotations

import html
import json
import os
from typing import Any

from vlab._errors import UsageError
from vlab._files import atomic_open

_SHOWN_KEYS = 40          # host-difference keys shown per host (the rest are counted)


def _load(fleet_dir: str) -> tuple[dict[str, Any], dict[str, dict], dict[str, dict]]:
    """The manifest, the results documents of the hosts that have them, and doctor records."""
    from vlab import results
    from vlab.fleet.run import read_manifest

    if not os.path.isdir(fleet_dir):
        raise UsageError(f"{fleet_dir}: not a directory")
    manifest = read_manifest(fleet_dir)
    if manifest is None:
        raise UsageError(f"{fleet_dir}: no fleet.json (not a `vlab fleet run` directory)")
    docs: dict[str, dict] = {}
    doctors: dict[str, dict] = {}
    for host, entry in manifest["hosts"].items():
        path = os.path.join(fleet_dir, f"{host}.json")
        if entry.get("status") == "ok" and os.path.exists(path):
            docs[host] = results.read(path)
        dpath = os.path.join(fleet_dir, f"{host}.doctor.json")
        if os.path.exists(dpath):
            try:
                with open(dpath, encoding="utf-8") as f:
                    d = json.load(f)
                if isinstance(d, dict):
                    doctors[host] = d
            except (OSError, ValueError):
                pass
    return manifest, docs, doctors


def fleet_matrix(fleet_dir: str, baseline: str | None = None, *,
                 min_effect: float = 0.02) -> dict[str, Any]:
    """Every host with results against the baseline: {"baseline", "hosts", "errors",
    "comparison" (vlab.compare's result, baseline first), "cases" (the matrix)}."""
    from vlab.compare import compare

    manifest, docs, doctors = _load(fleet_dir)
    ok = [h for h in manifest["hosts"] if h in docs]
    errors = {h: e.get("reason") or "no results" for h, e in manifest["hosts"].items()
              if h not in docs}
    if not ok:
        raise UsageError(f"{fleet_dir}: no host has results "
                         f"({'; '.join(f'{h}: {r}' for h, r in errors.items())})")
    if baseline is None:
        baseline = ok[0]
    elif baseline not in manifest["hosts"]:
        raise UsageError(f"--baseline {baseline}: not a host of this fleet "
                         f"({', '.join(manifest['hosts'])})")
    elif baseline not in docs:
        raise UsageError(f"--baseline {baseline}: that host has no results ({errors[baseline]})")
    others = [h for h in ok if h != baseline]
    comparison = None
    cases: list[dict[str, Any]] = []
    if others:
        comparison = compare([docs[baseline]] + [docs[h] for h in others],
                             min_effect=min_effect, names=[baseline] + others)
        index: dict[tuple, dict[str, Any]] = {}
        for row in docs[baseline]["rows"]:
            from vlab import results

            key = (row["experiment"], results.params_key(row["params"]), row["metric"])
            if key not in index:
                index[key] = {"experiment": key[0], "params": key[1], "metric": key[2],
                              "unit": row["unit"], "baseline": row.get("median"),
                              "baseline_status": row["status"], "cells": {}}
                cases.append(index[key])
        for host, comp in zip(others, comparison["comparisons"]):
            for r in comp["rows"]:
                c = index.get((r["experiment"], r["params_str"], r["metric"]))
                if c is not None:
                    c["cells"][host] = {"ratio": r.get("ratio"), "ci_low": r.get("ci_low"),
                                        "ci_high": r.get("ci_high"),
                                        "q_value": r.get("q_value"),
                                        "verdict": r.get("verdict"),
                                        "direction": r.get("direction", "same"),
                                        "median": r["b"]["median"]}
            for kind in ("not_compared", "incomparable", "only_in_a"):
                for r in comp[kind]:
                    c = index.get((r["experiment"], r["params_str"], r["metric"]))
                    if c is not None:
                        c["cells"][host] = {"ratio": None, "direction": "none",
                                            "verdict": r.get("reason") or
                                            ("missing on this host" if kind == "only_in_a"
                                             else kind)}
    return {"baseline": baseline, "hosts": ok, "others": others, "errors": errors,
            "manifest": manifest, "docs": docs, "doctors": doctors,
            "comparison": comparison, "cases": cases}


def _host_summary(doc_host: dict[str, Any] | None) -> dict[str, str]:
    h = doc_host or {}
    kvm = h.get("kvm") if isinstance(h.get("kvm"), dict) else {}
    cpu = h.get("cpu") if isinstance(h.get("cpu"), dict) else {}
    return {"host_id": str(h.get("host_id") or "-"), "cpu": str(h.get("cpu_model") or "-"),
            "microcode": str(cpu.get("microcode") or "-"),
            "kernel": str(h.get("kernel") or h.get("kernel_version") or "-"),
            "kvm": f"{kvm.get('flavor') or '-'}, paging {h.get('paging') or kvm.get('paging') or '-'}"}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= 80 else text[:77] + "..."


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
.worse{background:#f8c9c4} .better{background:#c9ecc9} .same{background:#fff}
.none{background:#eee;color:#777} tr.error td{background:#fde2e0}
code{font-size:12px}
"""


def render(m: dict[str, Any]) -> str:
    """The HTML page of a `fleet_matrix` result."""
    e = html.escape
    man = m["manifest"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>vlab fleet "
           f"{e(man['stamp'])}</title><style>{_CSS}</style></head><body>",
           f"<h1>vlab fleet {e(man['stamp'])}</h1>",
           f"<p><code>vlab run {e(' '.join(man['run_args']))}</code> on {len(man['hosts'])} "
           f"hosts: {len(m['hosts'])} with results, {len(m['errors'])} error rows. Baseline: "
           f"<b>{e(m['baseline'])}</b>.</p>",
           "<h2>Hosts</h2><table><tr><th>host</th><th>status</th><th>reason</th>"
           "<th>host_id</th><th>CPU</th><th>microcode</th><th>kernel</th><th>KVM</th></tr>"]
    for host, entry in man["hosts"].items():
        rec = (m["docs"].get(host) or {}).get("host") or m["doctors"].get(host)
        s = _host_summary(rec)
        cls = " class='error'" if host in m["errors"] else ""
        out.append(f"<tr{cls}><td>{e(host)}</td><td>{e(str(entry.get('status')))}</td>"
                   f"<td>{e(entry.get('reason') or '')}</td><td><code>{e(s['host_id'])}</code>"
                   f"</td><td>{e(s['cpu'])}</td><td>{e(s['microcode'])}</td>"
                   f"<td>{e(s['kernel'])}</td><td>{e(s['kvm'])}</td></tr>")
    out.append("</table>")
    out.append(f"<h2>Host differences against {e(m['baseline'])}</h2>")
    comp = m["comparison"]
    if comp is None:
        out.append("<p>Only one host has results: nothing to compare.</p>")
    else:
        for host, c in zip(m["others"], comp["comparisons"]):
            diff = c["host_diff"]
            if not diff:
                out.append(f"<p><b>{e(host)}</b>: the same configuration as the baseline "
                           f"(no host key differs).</p>")
                continue
            out.append(f"<p><b>{e(host)}</b>: {len(diff)} keys differ</p><table><tr><th>key"
                       f"</th><th>{e(m['baseline'])}</th><th>{e(host)}</th></tr>")
            for d in diff[:_SHOWN_KEYS]:
                out.append(f"<tr><td><code>{e(d['key'])}</code></td><td>{e(_fmt(d['a']))}</td>"
                           f"<td>{e(_fmt(d['b']))}</td></tr>")
            if len(diff) > _SHOWN_KEYS:
                out.append(f"<tr><td colspan='3'>... and {len(diff) - _SHOWN_KEYS} more</td></tr>")
            out.append("</table>")
        out.append(f"<h2>Matrix: each host / {e(m['baseline'])}</h2>"
                   "<p>Ratio of medians; red: significantly worse, green: significantly better "
                   f"(larger than {comp['min_effect']:.0%}, false-discovery rate "
                   f"{comp['fdr']:.0%} per host); grey: not compared (the reason is in the "
                   "cell's title).</p><table><tr><th>experiment</th><th>params</th>"
                   f"<th>metric</th><th>{e(m['baseline'])}</th>"
                   + "".join(f"<th>{e(h)}</th>" for h in m["others"]) + "</tr>")
        for c in m["cases"]:
            base = f"{_fmt(c['baseline'])} {c['unit']}" if c["baseline_status"] == "ok" \
                else c["baseline_status"]
            cells = []
            for h in m["others"]:
                cell = c["cells"].get(h)
                if cell is None:
                    cells.append("<td class='none'>-</td>")
                    continue
                title = cell.get("verdict") or ""
                if cell.get("ci_low") is not None:
                    title += f"; CI [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]"
                text = f"{cell['ratio']:.3f}" if cell.get("ratio") is not None else "n/a"
                cells.append(f"<td class='num {e(cell.get('direction') or 'same')}' "
                             f"title='{e(title)}'>{text}</td>")
            out.append(f"<tr><td>{e(c['experiment'])}</td><td><code>{e(c['params'])}</code>"
                       f"</td><td>{e(c['metric'])}</td><td class='num'>{e(base)}</td>"
                       + "".join(cells) + "</tr>")
        out.append("</table>")
    if m["errors"]:
        out.append("<h2>Error rows</h2><table><tr><th>host</th><th>reason</th></tr>")
        for h, why in m["errors"].items():
            out.append(f"<tr class='error'><td>{e(h)}</td><td>{e(why)}</td></tr>")
        out.append("</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def fleet_report(fleet_dir: str, output: str | None = None, *, baseline: str | None = None,
                 min_effect: float = 0.02) -> str:
    """Write the fleet's HTML report (default DIR/report.html); its path."""
    m = fleet_matrix(fleet_dir, baseline, min_effect=min_effect)
    path = output or os.path.join(fleet_dir, "report.html")
    with atomic_open(path, "w") as f:
        f.write(render(m))
    return path
