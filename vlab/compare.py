"""`vlab compare`: what changed between runs, and what it did to each metric.

Two questions, answered together because one explains the other:

* which host keys differ (THP, paging mode, kernel, kvm params ...), flattened to dotted paths
  and with volatile keys (free memory, free huge pages, timestamps, calibration measurements)
  left out so that the list shows configuration, not noise (`vlab.host.diff`, the one
  definition of both);
* per case (experiment, params, metric) present in both files: the ratio B/A of the row
  medians, a confidence interval and a p-value, and a verdict that flags a change only when it
  is significant *and* bigger than `min_effect` (Firecracker's A/B rule). The unit of
  replication is the worker process (each process counts once, by its median; see
  `vlab.analysis.stats.compare_units`), and Benjamini-Hochberg controls the false-discovery rate
  across all rows of one comparison, so testing hundreds of rows at once does not produce a
  handful of "changes" by chance.

A case whose `exp_version` differs between the files measured different code: comparing it
would be meaningless, so it is listed as incomparable (or, with `strict`, the whole comparison is
refused), as asv does. With more than two files every file is compared to the first.

A side may be several runs of the same configuration (replicates, ideally interleaved with the
other side's: A B A B ...). On a noisy host a run's processes share a drift that the next
run's do not, so two single runs can differ significantly by process although nothing changed.
With two or more runs on both sides the unit of replication is the run (each run counts once,
by its row median), which is the test that answers "do these configurations differ" rather than
"do these two runs differ".
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from vlab import results
from vlab._errors import UsageError
from vlab.host.diff import host_diff

COMPARE_SCHEMA = "vlab.compare/1"

# Top-level run keys worth showing next to host keys (a new vlab version can explain a change).
_RUN_KEYS = ("vlab_version", "suite")

# The smallest change per operation a verdict calls, by unit, beside the relative `min_effect`.
# vlab's costs are per operation; a figure near zero by construction (exits.nop is its own
# baseline: ~0.8 cycles and 0-5 ns per operation here) has a ratio of noise over noise, and a
# statistically clear shift of 0.1 cycle per operation between two runs of the same code (the
# CPU the vCPU thread landed on) is not a change of any exit's cost.
ABS_FLOOR = {"cycles": 1.0, "ns": 1.0}


def run_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What differs between two results documents' settings: `vlab.host.host_diff` of their
    host records (volatile and derived keys left out, sorted by key), then `run.vlab_version`
    and `run.suite`. Each entry is `{"key", "a", "b"}`; a key missing on one side is None."""
    out = [{"key": key, "a": va, "b": vb}
           for key, va, vb in host_diff(a.get("host", {}), b.get("host", {}))]
    for key in _RUN_KEYS:
        if a.get(key) != b.get(key):
            out.append({"key": f"run.{key}", "a": a.get(key), "b": b.get(key)})
    return out


def _label(side: Sequence[Mapping[str, Any]], name: str | None, index: int) -> dict[str, Any]:
    """A side's name, host and run; a side of several runs names its first run's host and
    lists every run."""
    first = side[0]
    out = {"name": name or f"file {index + 1}", "run_id": first.get("run_id"),
           "host_id": first.get("host", {}).get("host_id"), "started_at": first.get("started_at")}
    if len(side) > 1:
        out["runs"] = [{"run_id": d.get("run_id"), "host_id": d.get("host", {}).get("host_id"),
                        "started_at": d.get("started_at")} for d in side]
    return out


def _case(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return (row["experiment"], results.params_key(row["params"]), row["metric"])


def _index(side: Sequence[Mapping[str, Any]]) -> tuple[dict[tuple[str, str, str], list[dict]],
                                                        list[str]]:
    """Rows by case, one per run of the side; a case repeated in one file keeps its first row
    and is reported."""
    rows: dict[tuple[str, str, str], list[dict]] = {}
    dupes: list[str] = []
    for i, doc in enumerate(side):
        seen: set[tuple[str, str, str]] = set()
        for row in doc["rows"]:
            key = _case(row)
            if key in seen:
                dupes.append(" ".join(k for k in key if k)
                             + (f" (run {i + 1})" if len(side) > 1 else ""))
                continue
            seen.add(key)
            rows.setdefault(key, []).append(row)
    return rows, dupes


def _side_warnings(side: Sequence[Mapping[str, Any]], name: str,
                   rows: Mapping[tuple[str, str, str], list[dict]]) -> list[str]:
    """What makes a side's runs less than replicates: host keys that differ between them, and
    cases some runs lack (the runs that have them are used)."""
    out = []
    for i, doc in enumerate(side[1:], start=2):
        keys = [d["key"] for d in run_diff(side[0], doc)]
        if keys:
            out.append(f"{name}: run {i} differs from run 1 in {', '.join(keys)}; runs of one "
                       "side are replicates only when their host and settings are the same")
    partial = [" ".join(k for k in key if k) for key, rs in rows.items() if len(rs) < len(side)]
    if partial:
        more = f" and {len(partial) - 1} more" if len(partial) > 1 else ""
        out.append(f"{name}: {len(partial)} case(s) are missing from some of its {len(side)} "
                   f"runs ({partial[0]}{more}); the runs that have them are used")
    return out


def _version_conflict(ra: Sequence[Mapping[str, Any]],
                      rb: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a case's rows measured different code, if they did."""
    va = {r.get("exp_version") for r in ra} - {None}
    vb = {r.get("exp_version") for r in rb} - {None}
    for name, v in (("A", va), ("B", vb)):
        if len(v) > 1:
            return f"experiment version differs between the runs of {name} ({', '.join(sorted(v))})"
    if va and vb and va != vb:
        return f"experiment version differs ({va.pop()} vs {vb.pop()})"
    return None


def _side(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One side of a case: its row, or for several runs their median of row medians (each run
    counts once), the summed sample count and each run's median (`run_medians`); a pooled
    stdev or p99 across runs would mix run drift into one figure, so it is left out."""
    row = rows[0]
    if len(rows) == 1:
        return {"status": row["status"], "reason": row["reason"], "n": row["n"],
                "median": row["median"], "mean": row["mean"], "stdev": row["stdev"],
                "p99": row["p99"], "exp_version": row.get("exp_version")}
    medians = [r["median"] for r in rows]
    known = [m for m in medians if m is not None]
    return {"status": row["status"], "reason": row["reason"], "n": sum(r["n"] or 0 for r in rows),
            "median": statistics.median(known) if known else None, "mean": None, "stdev": None,
            "p99": None, "exp_version": row.get("exp_version"), "runs": len(rows),
            "run_medians": medians}


def _below_floor(row: Mapping[str, Any]) -> float | None:
    """The unit's absolute floor when the row's change of medians is smaller than it, else None."""
    floor = ABS_FLOOR.get(row.get("unit"))
    a, b = row["a"].get("median"), row["b"].get("median")
    if floor is None or a is None or b is None or abs(b - a) >= floor:
        return None
    return floor


def _direction(ratio: float | None, significant: bool, higher_is_better: bool,
               min_effect: float) -> str:
    """'worse', 'better' or 'same' -- what a plot colours by. A significant change smaller
    than `min_effect` is 'same', as in the verdict."""
    if not significant or ratio is None or abs(ratio - 1.0) < min_effect:
        return "same"
    up = ratio > 1
    return "better" if up == higher_is_better else "worse"


def _process_medians(row: Mapping[str, Any]) -> list[float] | None:
    """The row's per-worker-process medians, when the file recorded them."""
    v = (row.get("extra") or {}).get("process_medians")
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and math.isfinite(x)
                                         for x in v):
        return [float(x) for x in v]
    return None


def _pooled(rows: Sequence[Mapping[str, Any]]) -> tuple[list[float] | None, list[float]]:
    """A side's process medians (None unless every run recorded them) and samples, over all of
    its runs."""
    procs: list[float] | None = []
    for r in rows:
        pm = _process_medians(r)
        procs = procs + pm if (procs is not None and pm) else None
    return procs, [v for r in rows for v in (r.get("samples") or [])]


def _test_case(ra: Sequence[Mapping[str, Any]], rb: Sequence[Mapping[str, Any]],
               ma: float | None, mb: float | None, *, min_effect: float, alpha: float,
               hib: bool) -> dict[str, Any]:
    """Ratio, interval, p-value and test of one case measured on both sides (each side one row
    per run; `ma` and `mb` the sides' medians, from `_side`).

    With two or more runs on both sides the run is the unit of replication: each run counts
    once, by its row median, because a run's processes share a drift the other runs' do not.
    Otherwise the worker process is the unit: its samples share a CPU placement, caches and
    calibration, so each process counts once, by its median (`compare_units`); a side of
    several runs facing a single run pools its runs' processes. Rows from files that recorded
    no per-process medians, or from one-shot experiments with a single process, fall back to
    the samples (`compare_samples`), and the row's `tested_unit` says which was tested.
    """
    # lazily: the analysis package pulls in scipy (and may pull in numba)
    from vlab.analysis.stats import compare_samples, compare_units

    ratio = (mb / ma) if ma and mb is not None else None
    (pa, sa), (pb, sb) = _pooled(ra), _pooled(rb)
    if len(ra) >= 2 and len(rb) >= 2 and all(r["median"] is not None for r in (*ra, *rb)):
        res = compare_units([r["median"] for r in ra], [r["median"] for r in rb], ratio=ratio,
                            min_effect=min_effect, alpha=alpha, higher_is_better=hib)
        unit = "run"
    elif pa and pb and (len(pa) >= 2 or len(pb) >= 2):
        res = compare_units(pa, pb, ratio=ratio, min_effect=min_effect, alpha=alpha,
                            higher_is_better=hib)
        unit = "process"
    elif sa and sb:
        res = compare_samples(sa, sb, min_effect=min_effect, alpha=alpha, higher_is_better=hib)
        res["test"] = "mann-whitney"
        unit = "sample"
    else:
        # A row may carry its statistics without the raw samples; there is nothing to test
        # then, so say so rather than pretend to a significance we cannot compute.
        return {"ratio": ratio, "ci_low": None, "ci_high": None, "p_value": None, "q_value": None,
                "significant": False, "test": None, "tested_unit": None,
                "verdict": "no samples to test"}
    entry = {"tested_unit": unit, "test": res.get("test"), "n_a": res.get("n_a"),
             "n_b": res.get("n_b")}
    for k in ("ratio", "ci_low", "ci_high", "p_value"):
        v = res.get(k)
        entry[k] = None if v is None or not math.isfinite(v) else float(v)
    entry["significant"] = bool(res.get("significant"))
    entry["verdict"] = str(res.get("verdict"))
    return entry


def _control_fdr(rows: list[dict[str, Any]], *, fdr: float, min_effect: float) -> None:
    """Benjamini-Hochberg across every tested row of one comparison: a row stays significant
    only when its q-value is below `fdr` (and its interval excludes 1, as before). A significant
    change is called (verdict, direction) only beyond `min_effect` and the unit's `ABS_FLOOR`."""
    from vlab.analysis.stats import fdr_bh, verdict

    qs = fdr_bh([r.get("p_value") for r in rows])
    for r, q in zip(rows, qs):
        r["q_value"] = q
        if q is not None:
            r["significant"] = bool(r["significant"] and q < fdr)
            r["verdict"] = verdict(r["significant"], r["ratio"], min_effect,
                                   r["higher_is_better"])
        r["direction"] = _direction(r["ratio"], r["significant"], r["higher_is_better"],
                                    min_effect)
        floor = _below_floor(r) if r["significant"] else None
        if floor is not None and r["direction"] != "same":
            r["direction"] = "same"
            unit = "cycle" if r["unit"] == "cycles" and floor == 1 else r["unit"]
            r["verdict"] = f"within {floor:g} {unit} per operation"


def _compare_pair(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], *,
                  min_effect: float, ia: int, ib: int, names: Sequence[str | None],
                  alpha: float = 0.05, fdr: float = 0.05) -> dict[str, Any]:
    """Side B against side A; each side is one or more runs (results documents)."""
    rows_a, dupes_a = _index(a)
    rows_b, dupes_b = _index(b)
    out: dict[str, Any] = {
        "a": _label(a, names[ia], ia), "b": _label(b, names[ib], ib),
        "host_diff": run_diff(a[0], b[0]), "rows": [], "only_in_a": [], "only_in_b": [],
        "incomparable": [], "not_compared": [], "warnings": []}
    for which, dupes in (("a", dupes_a), ("b", dupes_b)):
        for d in dupes:
            out["warnings"].append(f"{out[which]['name']}: case {d} appears more than once; "
                                   "the first row is used")
    for which, side, rows in (("a", a, rows_a), ("b", b, rows_b)):
        out["warnings"] += _side_warnings(side, out[which]["name"], rows)
    if (len(a) > 1) != (len(b) > 1):
        out["warnings"].append(
            f"one side has {max(len(a), len(b))} runs and the other 1: testing runs needs two or "
            "more runs a side, so the runs' worker processes are pooled as if from one run, and "
            "run-to-run drift is not accounted for")
    for key, ra in rows_a.items():
        experiment, pkey, metric = key
        base = {"experiment": experiment, "params": dict(ra[0]["params"]), "params_str": pkey,
                "metric": metric, "unit": ra[0]["unit"]}
        rb = rows_b.get(key)
        if rb is None:
            out["only_in_a"].append({**base, "status": ra[0]["status"]})
            continue
        conflict = _version_conflict(ra, rb)
        if conflict:
            out["incomparable"].append({**base, "reason": conflict, "a": _side(ra),
                                        "b": _side(rb)})
            continue
        why = [f"{side}{f' run {i + 1}' if len(rs) > 1 else ''} {r['status']}: {r['reason']}"
               for side, rs in (("A", ra), ("B", rb)) for i, r in enumerate(rs)
               if r["status"] != "ok"]
        if why:
            out["not_compared"].append({**base, "reason": "; ".join(why),
                                        "a": _side(ra), "b": _side(rb)})
            continue
        flags: dict[str, Any] = {}
        for r in (*rb, *ra):
            flags.update(r.get("flags") or {})
        hib = bool(flags.get("higher_is_better", False))
        sa, sb = _side(ra), _side(rb)
        entry = {**base, "higher_is_better": hib, "a": sa, "b": sb,
                 "flags": {k: v for k, v in flags.items() if k != "higher_is_better"}}
        entry.update(_test_case(ra, rb, sa["median"], sb["median"], min_effect=min_effect,
                                alpha=alpha, hib=hib))
        out["rows"].append(entry)
    _control_fdr(out["rows"], fdr=fdr, min_effect=min_effect)
    for key, rb in rows_b.items():
        if key not in rows_a:
            experiment, pkey, metric = key
            out["only_in_b"].append({"experiment": experiment, "params": dict(rb[0]["params"]),
                                     "params_str": pkey, "metric": metric,
                                     "unit": rb[0]["unit"], "status": rb[0]["status"]})
    return out


def compare(docs: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]], *,
            min_effect: float = 0.02, strict: bool = False,
            names: Sequence[str] | None = None, fdr: float = 0.05) -> dict[str, Any]:
    """Compare results documents: each side after the first against the first.

    A side is one results document, or a sequence of documents: replicate runs of one
    configuration, tested with the run as the unit when both sides of a comparison have two or
    more (see the module docstring).

    Returns ``{"schema": "vlab.compare/1", "min_effect", "files": [...], "comparisons": [...]}``
    where `files` labels each side (a side of several runs lists them under `runs`) and each
    comparison holds `a`, `b` (side labels), `host_diff` (between the sides' first runs),
    `rows` (ratio, CI, p-value, its Benjamini-Hochberg q-value across the comparison's rows,
    the test and the unit tested, significant, verdict, direction per case), `tested`,
    `significant` and `changed` (row counts: significant after false-discovery control, and
    called a change: significant and beyond both `min_effect` and the unit's `ABS_FLOOR`),
    `welch` (rows tested by Welch's t for want of processes or runs), `only_in_a`,
    `only_in_b`, `incomparable` (experiment version differs), `not_compared` (skipped or failed
    on a side) and `warnings` (among them: runs of one side whose host keys differ).

    Raises `UsageError` when fewer than two sides are given, when their schemas differ,
    when one is not a valid results document, or (with `strict`) when any case is
    incomparable. `names` label the sides (e.g. their paths) in the output.
    """
    sides = [[d] if isinstance(d, Mapping) else list(d) for d in docs]
    if len(sides) < 2:
        raise UsageError(f"compare needs at least two results files, got {len(sides)}")
    names_list: list[str | None] = list(names) if names is not None else [None] * len(sides)
    if len(names_list) != len(sides):
        raise UsageError(f"compare got {len(sides)} sides but {len(names_list)} names")
    for i, side in enumerate(sides):
        if not side:
            raise UsageError(f"{names_list[i] or f'file {i + 1}'}: a side needs a results file")
    schemas = [[d.get("schema") if isinstance(d, Mapping) else None for d in side]
               for side in sides]
    if len({str(x) for side in schemas for x in side}) > 1:
        shown = ", ".join(f"{names_list[i] or f'file {i + 1}'}: {', '.join(map(repr, side))}"
                          for i, side in enumerate(schemas))
        raise UsageError(f"cannot compare results with different schema versions ({shown})")
    for i, side in enumerate(sides):
        for k, d in enumerate(side):
            try:
                results.validate(d)
            except UsageError as e:
                run = f" run {k + 1}" if len(side) > 1 else ""
                raise UsageError(f"{names_list[i] or f'file {i + 1}'}{run}: {e}") from None
    if not (0 <= min_effect < 1):
        raise UsageError(f"min_effect must be in [0, 1), got {min_effect}")
    if not (0 < fdr < 1):
        raise UsageError(f"the false-discovery rate must be in (0, 1), got {fdr}")
    comparisons = [_compare_pair(sides[0], sides[i], min_effect=min_effect, ia=0, ib=i,
                                 names=names_list, fdr=fdr) for i in range(1, len(sides))]
    for c in comparisons:
        tested = [r for r in c["rows"] if r.get("q_value") is not None]
        c["tested"] = len(tested)
        c["significant"] = sum(1 for r in tested if r["significant"])
        c["changed"] = sum(1 for r in tested if r["direction"] != "same")
        c["welch"] = sum(1 for r in tested if r.get("test") == "welch")
    if strict:
        bad = [(c["b"]["name"], r) for c in comparisons for r in c["incomparable"]]
        if bad:
            name, r = bad[0]
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise UsageError(f"refusing to compare (--strict): {r['experiment']} "
                             f"{r['params_str']} {r['metric']} in {name}: {r['reason']}{more}")
    return {"schema": COMPARE_SCHEMA, "min_effect": min_effect, "fdr": fdr,
            "files": [_label(side, names_list[i], i) for i, side in enumerate(sides)],
            "comparisons": comparisons}


# --------------------------------------------------------------------------------------------
# Output


def _fmt_ratio(r: Mapping[str, Any]) -> str:
    if r.get("ratio") is None:
        return "-"
    return f"{r['ratio']:.3f}"


def _fmt_ci(r: Mapping[str, Any]) -> str:
    if r.get("ci_low") is None or r.get("ci_high") is None:
        return "-"
    return f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _fmt_p(r: Mapping[str, Any]) -> str:
    p = r.get("p_value")
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _fdr_line(c: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    """How many rows were tested, at what false-discovery rate, and on what unit."""
    units = sorted({r.get("tested_unit") for r in c["rows"] if r.get("tested_unit")})
    on = {"process": "worker-process medians", "sample": "samples (no per-process medians)",
          "run": "run medians"}
    line = (f"{c.get('tested', 0)} rows tested ({', '.join(on[u] for u in units) or 'none'}); "
            f"Benjamini-Hochberg false-discovery rate {result.get('fdr', 0.05) * 100:g}%: "
            f"{c.get('significant', 0)} significant")
    if "changed" in c:
        line += (f", {c['changed']} changed (beyond ±{result.get('min_effect', 0.02) * 100:g}% "
                 "and 1 cycle or ns per operation)")
    welch = {u: sum(1 for r in c["rows"] if r.get("test") == "welch" and r["tested_unit"] == u)
             for u in ("process", "run")}
    if welch["process"]:
        line += (f". {welch['process']} of them had fewer than 4 processes a side and were "
                 "tested by Welch's t, which assumes normally distributed process medians; give "
                 "--processes 4 or more for an exact permutation test")
    if welch["run"]:
        line += (f". {welch['run']} of them had fewer than 4 runs a side and were tested by "
                 "Welch's t, which assumes normally distributed run medians; 4 or more runs a "
                 "side get an exact permutation test")
    return line


def _fmt_value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return "(absent)"
    return str(v)


def _case_text(r: Mapping[str, Any]) -> str:
    return " ".join(x for x in (r["experiment"], r.get("params_str") or "", r["metric"]) if x)


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return out


def format_compare(result: Mapping[str, Any], fmt: str = "text") -> str:
    """Render a `compare` result as plain text (terminal), Markdown (`md`) or JSON (`json`)."""
    if fmt == "json":
        return json.dumps(result, indent=1, sort_keys=False) + "\n"
    if fmt not in ("text", "md"):
        raise UsageError(f"unknown compare format {fmt!r} (expected text, md or json)")
    md = fmt == "md"
    table = _md_table if md else _table
    out: list[str] = []

    def heading(text: str, level: int = 2) -> None:
        if md:
            out.extend(["#" * level + " " + text, ""])
        else:
            out.extend([text, "=" * len(text) if level <= 2 else "-" * len(text)])

    for c in result["comparisons"]:
        a, b = c["a"], c["b"]
        heading(f"{b['name']} vs {a['name']} (B/A; min effect "
                f"{result['min_effect'] * 100:g}%)")
        for side, lab in (("A", a), ("B", b)):
            ids = [str(r["run_id"]) for r in lab.get("runs", [])]
            runs = f"{len(ids)} runs ({', '.join(ids)})" if ids else f"run {lab['run_id']}"
            out.append(f"- {side}: `{lab['name']}` host `{lab['host_id']}` {runs}" if md
                       else f"{side}: {lab['name']}  host {lab['host_id']}  {runs}")
        out.append("")
        heading("What changed on the host", 3)
        if c["host_diff"]:
            out.extend(table(["key", "A", "B"],
                             [[d["key"], _fmt_value(d["a"]), _fmt_value(d["b"])]
                              for d in c["host_diff"]], set()))
        else:
            out.append("no host key differs (volatile keys ignored)")
        out.append("")
        heading("Metrics", 3)
        if c["rows"]:
            rows = []
            for r in c["rows"]:
                rows.append([r["experiment"], r["params_str"] or "-", r["metric"],
                             results.format_number(r["a"]["median"]),
                             results.format_number(r["b"]["median"]), r["unit"],
                             _fmt_ratio(r), _fmt_ci(r), _fmt_p(r),
                             _fmt_p({"p_value": r.get("q_value")}), r["verdict"]])
            out.extend(table(["experiment", "params", "metric", "A median", "B median", "unit",
                              "B/A", "95% CI", "p", "q", "verdict"], rows, {3, 4, 6, 8, 9}))
            out.append("")
            out.append(_fdr_line(c, result))
        else:
            out.append("no case was measured in both files")
        out.append("")
        sections = (("Only in A", c["only_in_a"], lambda r: r["status"]),
                    ("Only in B", c["only_in_b"], lambda r: r["status"]),
                    ("Incomparable: experiment version differs", c["incomparable"],
                     lambda r: r["reason"]),
                    ("Not compared (skipped or failed)", c["not_compared"],
                     lambda r: r["reason"]))
        for title, items, why in sections:
            if not items:
                continue
            heading(f"{title} ({len(items)})", 3)
            for r in items:
                text = f"{_case_text(r)}: {why(r)}"
                out.append(f"- {_md_escape(text)}" if md else f"  {text}")
            out.append("")
        if c["warnings"]:
            heading("Warnings", 3)
            out.extend(f"- {w}" if md else f"  {w}" for w in c["warnings"])
            out.append("")
    return "\n".join(out).rstrip() + "\n"
