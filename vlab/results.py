"""Results files (`vlab.run/1`): build rows, validate, read, write atomically, tabulate.

A results file is the one thing every other part of vlab agrees on: the runner writes it, and
`show`, `compare`, `plot` and `report` read it, possibly years later and on another machine. So
this module is strict about the shape (a bad file is refused with a one-line message naming the
file and the problem, CLI exit 2) and careful about writing (a crash never leaves a half-written
file behind).

Row conventions this module relies on (and `make_row` produces):

* one row per experiment x params x metric; a case that could not run is a row with
  ``status`` "skip" or "error", a ``reason`` and null statistics, never a missing row;
* ``flags`` carries booleans readers act on: ``emulated_cpl0`` (the number includes the cost of
  KVM's instruction emulator), ``model`` (computed, not measured), ``higher_is_better``
  (throughput-like metrics; compare flips its verdict);
* ``exp_version`` is a hash of the experiment's source and payload; rows whose versions differ
  are not compared;
* ``warnings`` are one-line strings; ``make_row`` adds the noisy-result warning itself.

The native extension is never imported here: reading results must work on any machine.
"""
from __future__ import annotations

import datetime as _dt
import gzip
import io
import json
import math
import os
import uuid
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlab._errors import UsageError
from vlab._files import atomic_open
from vlab._inputs import read_file

if TYPE_CHECKING:  # pandas is imported lazily: `vlab show` of one file should start fast
    import pandas as pd

SCHEMA = "vlab.run/1"

#: Keys every results file has at top level, in the order the file is written.
TOP_KEYS = ("schema", "run_id", "started_at", "finished_at", "vlab_version", "argv", "host",
            "suite", "rows")
#: Optional top-level keys and the JSON type each must have: a run stopped by SIGINT/SIGTERM
#: holds its finished cases, `interrupted` true and the signal's name ("SIGINT").
OPTIONAL_TOP_KEYS = {"interrupted": bool, "signal": (str, type(None))}
#: Statistics every row carries (null for skip/error rows).
STAT_KEYS = ("n", "mean", "median", "stdev", "min", "max", "p90", "p99")
#: Keys every row has.
ROW_KEYS = ("experiment", "params", "metric", "unit", "status", "reason", *STAT_KEYS, "samples")
#: Optional row keys and the JSON type each must have.
OPTIONAL_ROW_KEYS = {"exp_version": (str, type(None)), "warnings": list, "flags": dict,
                     "series": dict, "extra": dict, "placement": dict}
STATUSES = ("ok", "skip", "error")
#: Above this coefficient of variation a result is flagged as noisy (pyperf uses the same 10%).
NOISY_CV = 0.10
#: Significant digits a float sample keeps in a results file (see `_compact`).
SAMPLE_DIGITS = 6
#: The first bytes of a gzip file: `read` takes `.json.gz` files whatever their name.
GZIP_MAGIC = b"\x1f\x8b"
#: The most a gzip'ed results file may inflate to.
MAX_INFLATED = 1 << 30

#: Columns of the DataFrame `load` returns, before the per-parameter `p_*` columns.
COLUMNS = ("experiment", "params", "metric", "unit", "status", "reason", *STAT_KEYS, "cv",
           "samples", "exp_version", "flags", "warnings", "host_id", "run_id", "file")


# --------------------------------------------------------------------------------------------
# Validation


def _is_number(v: Any) -> bool:
    # bool is an int subclass in Python, but `true` is never a valid statistic.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


def params_key(params: Mapping[str, Any]) -> str:
    """The canonical string of a params dict: keys sorted, ``"cpl=3,leaf=0"``.

    Used as the identity of a case in tables, comparisons and plots, so it must not depend on
    the order the experiment happened to list its parameters in.
    """
    parts = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (str, int, float)) or value is None:
            text = "null" if value is None else str(value)
        else:
            text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        parts.append(f"{key}={text}")
    return ",".join(parts)


def _row_label(i: int, row: Any) -> str:
    if not isinstance(row, dict):
        return f"row {i}"
    bits = [str(row.get("experiment", "?"))]
    if isinstance(row.get("params"), dict) and row["params"]:
        bits.append(params_key(row["params"]))
    if isinstance(row.get("metric"), str):
        bits.append(row["metric"])
    return f"row {i} ({' '.join(bits)})"


def _validate_row(i: int, row: Any) -> None:
    where = _row_label(i, row)
    if not isinstance(row, dict):
        raise UsageError(f"{where}: must be an object, got {_type_name(row)}")
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise UsageError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)}")
    for key in ("experiment", "metric", "unit"):
        if not isinstance(row[key], str):
            raise UsageError(f"{where}: '{key}' must be a string, got {_type_name(row[key])}")
    if not row["experiment"] or not row["metric"]:
        raise UsageError(f"{where}: 'experiment' and 'metric' must not be empty")
    if not isinstance(row["params"], dict):
        raise UsageError(f"{where}: 'params' must be an object, got {_type_name(row['params'])}")
    status = row["status"]
    if status not in STATUSES:
        raise UsageError(f"{where}: bad status {status!r} (expected one of {', '.join(STATUSES)})")
    reason = row["reason"]
    if status == "ok":
        if reason is not None and not isinstance(reason, str):
            raise UsageError(f"{where}: 'reason' must be a string or null")
    elif not isinstance(reason, str) or not reason.strip():
        raise UsageError(f"{where}: a {status} row needs a non-empty 'reason'")
    for key in STAT_KEYS:
        value = row[key]
        if value is None:
            if status == "ok" and key != "stdev":
                raise UsageError(f"{where}: ok row has null '{key}'")
            continue
        if key == "n":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"{where}: 'n' must be a non-negative integer, "
                                 f"got {_type_name(value)} {value!r}")
            if status == "ok" and value < 1:
                raise UsageError(f"{where}: ok row has n={value}")
        elif not _is_number(value):
            raise UsageError(f"{where}: '{key}' must be a number or null, got {_type_name(value)}")
        elif not math.isfinite(value):
            raise UsageError(f"{where}: '{key}' is not finite ({value!r})")
    samples = row["samples"]
    if not isinstance(samples, list):
        raise UsageError(f"{where}: 'samples' must be an array, got {_type_name(samples)}")
    for j, s in enumerate(samples):
        if not _is_number(s):
            raise UsageError(f"{where}: samples[{j}] must be a number, got {_type_name(s)}")
    for key, types in OPTIONAL_ROW_KEYS.items():
        if key in row and not isinstance(row[key], types):
            raise UsageError(f"{where}: '{key}' has the wrong type ({_type_name(row[key])})")
    for w in row.get("warnings", ()):
        if not isinstance(w, str):
            raise UsageError(f"{where}: 'warnings' must hold strings, got {_type_name(w)}")
    if "series" in row:
        series = row["series"]
        for key in ("x", "y"):
            if not isinstance(series.get(key), list):
                raise UsageError(f"{where}: 'series.{key}' must be an array")
        if len(series["x"]) != len(series["y"]):
            raise UsageError(f"{where}: 'series' x and y differ in length "
                             f"({len(series['x'])} vs {len(series['y'])})")
        for key in ("x", "y"):
            bad = [v for v in series[key] if not (_is_number(v) or v is None)]
            if bad:
                raise UsageError(f"{where}: 'series.{key}' holds a {_type_name(bad[0])}")


def validate(doc: Any) -> None:
    """Check that `doc` is a `vlab.run/1` results document; raise `UsageError` if not.

    The message is one line naming the first problem found (wrong schema, missing key, bad row
    status, a statistic of the wrong type ...), so the CLI can print it as is.
    """
    if not isinstance(doc, dict):
        raise UsageError(f"not a vlab results document (top level is {_type_name(doc)}, "
                         "expected an object)")
    if "schema" not in doc:
        raise UsageError("not a vlab results document (no 'schema' key)")
    if doc["schema"] != SCHEMA:
        raise UsageError(f"unsupported schema {doc['schema']!r} (this vlab reads {SCHEMA})")
    missing = [k for k in TOP_KEYS if k not in doc]
    if missing:
        raise UsageError(f"missing top-level key{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)}")
    for key in ("run_id", "started_at", "vlab_version"):
        if not isinstance(doc[key], str):
            raise UsageError(f"'{key}' must be a string, got {_type_name(doc[key])}")
    # finished_at is null only in a checkpoint written while a run is still going.
    if not isinstance(doc["finished_at"], (str, type(None))):
        raise UsageError(f"'finished_at' must be a string, got {_type_name(doc['finished_at'])}")
    if not isinstance(doc["argv"], list) or not all(isinstance(a, str) for a in doc["argv"]):
        raise UsageError("'argv' must be an array of strings")
    if not isinstance(doc["suite"], (str, type(None))):
        raise UsageError(f"'suite' must be a string or null, got {_type_name(doc['suite'])}")
    for key, types in OPTIONAL_TOP_KEYS.items():
        if key in doc and not isinstance(doc[key], types):
            raise UsageError(f"'{key}' has the wrong type ({_type_name(doc[key])})")
    host = doc["host"]
    if not isinstance(host, dict):
        raise UsageError(f"'host' must be an object, got {_type_name(host)}")
    if not isinstance(host.get("host_id"), str) or not host["host_id"]:
        raise UsageError("'host.host_id' is missing or not a string")
    if not isinstance(doc["rows"], list):
        raise UsageError(f"'rows' must be an array, got {_type_name(doc['rows'])}")
    for i, row in enumerate(doc["rows"]):
        _validate_row(i, row)


# --------------------------------------------------------------------------------------------
# Reading and writing


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate one results file; any problem is a one-line `UsageError` naming it."""
    p = Path(path)
    text = read_file(p, "results file")     # a regular file of sane size, or UsageError
    if text[:2] == GZIP_MAGIC:
        text = _gunzip(p, text)
    if not text.strip():
        raise UsageError(f"{p}: empty file, not a vlab results file")
    try:
        doc = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not a text (UTF-8) file, not a vlab results file") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from None
    except RecursionError:
        raise UsageError(f"{p}: JSON nested too deeply") from None
    try:
        validate(doc)
    except UsageError as e:
        raise UsageError(f"{p}: {e}") from None
    return doc


def _gunzip(p: Path, data: bytes) -> bytes:
    """The content of a gzip'ed results file, refusing one that inflates past the limit (a
    results file of a full suite is a few MB; a gzip bomb should not fill the memory)."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, MAX_INFLATED)
    except zlib.error as e:
        raise UsageError(f"{p}: not a valid gzip file ({e})") from None
    if d.unconsumed_tail:
        raise UsageError(f"{p}: inflates to more than {MAX_INFLATED >> 20} MiB, "
                         "not a vlab results file")
    if not d.eof:
        raise UsageError(f"{p}: truncated gzip file")
    return out


def dumps(doc: Mapping[str, Any]) -> str:
    """The JSON text of a results document: the header indented, one row per line.

    One row per line keeps a file readable and diffable (`grep exits.cpuid`) at a fraction of
    the size of indenting every sample on its own line.
    """
    lines = ["{"]
    items = list(doc.items())
    for i, (key, value) in enumerate(items):
        if key == "rows":
            body = ",\n".join(" " + json.dumps(r, separators=(",", ":"), allow_nan=False)
                              for r in value)
            text = "[\n" + body + "\n ]" if value else "[]"
        else:
            text = json.dumps(value, indent=1, allow_nan=False).replace("\n", "\n ")
        lines.append(f" {json.dumps(key)}: {text}" + ("," if i < len(items) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def encode(doc: Mapping[str, Any], name: str) -> bytes:
    """The bytes of a results file called `name`: `dumps`, gzip-compressed when the name ends
    in `.gz` (as pyperf does); `read` takes either form."""
    data = dumps(doc).encode("utf-8")
    if name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return data


def write_atomic(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate `doc` and write it to `path` so that readers see the old file or the new one
    (`vlab._files.atomic_open`: temporary file, fsync, rename, directory fsync; on failure
    `path` keeps its previous content). Parent directories are created. A path ending in
    `.gz` is written gzip-compressed (as pyperf does); `read` takes either form.
    """
    validate(doc)
    target = Path(path)
    data = encode(doc, target.name)
    # a results file is meant to be shared like any other: the umask decides its mode
    with atomic_open(target, "wb") as f:
        f.write(data)
    return target


# --------------------------------------------------------------------------------------------
# Building documents


def new_run_id() -> str:
    """A run's id: 12 random hex digits."""
    return uuid.uuid4().hex[:12]


def new_document(host: dict[str, Any], rows: list[dict[str, Any]], *, argv: list[str],
                 suite: str | None, started: _dt.datetime,
                 finished: _dt.datetime | None = None,
                 duration_s: float | None = None, run_id: str | None = None) -> dict[str, Any]:
    """A `vlab.run/1` document: the header every results file starts with (schema, a fresh
    12-hex-digit run id, start and finish times in UTC to the second, vlab's version, argv,
    suite), then `duration_s` when given, the host record and the rows. `finished` defaults to
    now; `run_id` to a fresh one (a run that journals its cases names itself at its start). The one place the header is built, for `vlab run` and `vlab trace` alike."""
    from vlab import __version__

    finished = finished or _dt.datetime.now(_dt.timezone.utc)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "run_id": run_id or new_run_id(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "vlab_version": __version__, "argv": list(argv), "suite": suite}
    if duration_s is not None:
        doc["duration_s"] = duration_s
    doc["host"] = host
    doc["rows"] = rows
    return doc


# --------------------------------------------------------------------------------------------
# Building rows


def _compact(v: int | float | None) -> int | float | None:
    """A sample as stored: floats to SAMPLE_DIGITS significant digits.

    Samples are per-operation figures from batches (cycles or ns over k operations) whose
    resolution is one cycle or ns per batch and whose spread is percent, not parts per million:
    `15583.333333333334` carries nothing that `15583.3` does not, at three times the bytes.
    """
    if isinstance(v, float) and v != 0.0:
        return float(f"{v:.{SAMPLE_DIGITS}g}")
    return v


def _clean_number(v: Any) -> int | float | None:
    """A plain Python number from numpy scalars and friends; NaN/inf become None (not JSON)."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError(f"a boolean is not a statistic: {v!r}")
    if isinstance(v, int):
        return v
    f = float(v)
    if not math.isfinite(f):
        return None
    if hasattr(v, "dtype") and getattr(v.dtype, "kind", "") in "iu":
        return int(v)
    return f


_ROW_OPTIONS = ("exp_version", "warnings", "flags", "series", "extra")


def _apply_options(row: dict[str, Any], opt: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(opt) - set(_ROW_OPTIONS))
    if unknown:
        raise TypeError(f"unknown row option(s): {', '.join(unknown)} "
                        f"(expected {', '.join(_ROW_OPTIONS)})")
    for key in _ROW_OPTIONS:
        value = opt.get(key)
        if value is None:
            continue
        if key == "warnings":
            row["warnings"] = [str(w) for w in value]
        elif key == "flags":
            row["flags"] = {str(k): bool(v) if isinstance(v, (bool, int)) else v
                            for k, v in dict(value).items()}
        elif key == "series":
            s = dict(value)
            s["x"] = [_clean_number(v) for v in s.get("x", [])]
            s["y"] = [_clean_number(v) for v in s.get("y", [])]
            row["series"] = s
        else:
            row[key] = dict(value) if key == "extra" else value
    return row


def noisy_warning(mean: float | None, stdev: float | None) -> str | None:
    """The pyperf-style warning when stdev exceeds 10% of the mean, else None."""
    if mean is None or stdev is None or mean == 0:
        return None
    cv = stdev / abs(mean)
    if cv <= NOISY_CV:
        return None
    return f"stdev is {cv * 100:.1f}% of the mean: results may be noisy"


def make_row(experiment: str, params: Mapping[str, Any], metric: str, unit: str,
             samples: Iterable[float], **opt: Any) -> dict[str, Any]:
    """An ok row: statistics of `samples` (via `vlab.analysis.stats.summarize`) plus options.

    `opt` may hold `exp_version`, `warnings`, `flags`, `series`, `extra`. A warning is added
    when stdev is more than 10% of the mean, as pyperf does, so noisy numbers are never
    presented as if they were steady.
    """
    values = [_compact(_clean_number(s)) for s in samples]
    if not values:
        raise ValueError(f"{experiment} {metric}: an ok row needs at least one sample")
    if any(v is None for v in values):
        raise ValueError(f"{experiment} {metric}: samples must be finite numbers")
    from vlab.analysis.stats import summarize  # lazily: the analysis package may pull in numba

    stats = summarize(values)
    row: dict[str, Any] = {"experiment": experiment, "params": dict(params), "metric": metric,
                           "unit": unit, "status": "ok", "reason": None}
    for key in STAT_KEYS:
        row[key] = _clean_number(stats.get(key))
    row["n"] = int(row["n"]) if row["n"] is not None else len(values)
    row["samples"] = values
    _apply_options(row, opt)
    warning = noisy_warning(row["mean"], row["stdev"])
    if warning and row["n"] >= 2:
        row.setdefault("warnings", [])
        if warning not in row["warnings"]:
            row["warnings"].append(warning)
    return row


def _not_ok_row(status: str, experiment: str, params: Mapping[str, Any], metric: str, unit: str,
                reason: str, opt: dict[str, Any]) -> dict[str, Any]:
    reason = " ".join(str(reason).split())  # one line, whatever the exception text was
    if not reason:
        raise ValueError(f"a {status} row needs a reason")
    row: dict[str, Any] = {"experiment": experiment, "params": dict(params), "metric": metric,
                           "unit": unit, "status": status, "reason": reason}
    for key in STAT_KEYS:
        row[key] = None
    row["samples"] = []
    return _apply_options(row, opt)


def skip_row(experiment: str, params: Mapping[str, Any], metric: str, unit: str, reason: str,
             **opt: Any) -> dict[str, Any]:
    """A row for a case that cannot run on this host (missing capability, no hardware ...).

    Skips are not failures (exit code 0), but they are rows, so a report shows what was not
    measured and why.
    """
    return _not_ok_row("skip", experiment, params, metric, unit, reason, opt)


def error_row(experiment: str, params: Mapping[str, Any], metric: str, unit: str, reason: str,
              **opt: Any) -> dict[str, Any]:
    """A row for a case that was attempted and failed; `reason` is the error's one-line text."""
    return _not_ok_row("error", experiment, params, metric, unit, reason, opt)


# --------------------------------------------------------------------------------------------
# The tidy table


def _expand_paths(path_or_paths: Any) -> list[Path]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        items = [path_or_paths]
    else:
        items = list(path_or_paths)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted({*p.rglob("*.json"), *p.rglob("*.json.gz")})
            if not found:
                raise UsageError(f"{p}: directory holds no results files (*.json, *.json.gz)")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise UsageError("no results files given")
    return out


def _cv(row: Mapping[str, Any]) -> float | None:
    mean, stdev = row.get("mean"), row.get("stdev")
    if row.get("status") != "ok" or mean in (None, 0) or stdev is None:
        return None
    return stdev / abs(mean)


def frame(docs: Iterable[tuple[Mapping[str, Any], str]]) -> "pd.DataFrame":
    """The tidy DataFrame of already-read documents, each given with the name to show as file."""
    import pandas as pd

    records: list[dict[str, Any]] = []
    param_keys: list[str] = []
    for doc, name in docs:
        host_id = doc.get("host", {}).get("host_id")
        for row in doc["rows"]:
            rec: dict[str, Any] = {
                "experiment": row["experiment"], "params": params_key(row["params"]),
                "metric": row["metric"], "unit": row["unit"], "status": row["status"],
                "reason": row["reason"]}
            for key in STAT_KEYS:
                rec[key] = row[key]
            rec["cv"] = _cv(row)
            rec["samples"] = list(row["samples"])
            rec["exp_version"] = row.get("exp_version")
            rec["flags"] = dict(row.get("flags") or {})
            rec["warnings"] = list(row.get("warnings") or [])
            rec["host_id"] = host_id
            rec["run_id"] = doc.get("run_id")
            rec["file"] = name
            for k, v in row["params"].items():
                col = f"p_{k}"
                if col not in param_keys:
                    param_keys.append(col)
                rec[col] = v
            records.append(rec)
    columns = [*COLUMNS, *sorted(param_keys)]
    df = pd.DataFrame.from_records(records, columns=columns)
    df["n"] = df["n"].astype("Int64")
    for key in STAT_KEYS[1:] + ("cv",):
        df[key] = pd.to_numeric(df[key], errors="coerce").astype("float64")
    return df


def load(path_or_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
         ) -> "pd.DataFrame":
    """Read one or more results files (or directories of them) into one tidy DataFrame.

    One row per results row. Columns: experiment, params (canonical "k=v,..." string), metric,
    unit, status, reason, n, mean, median, stdev, min, max, p90, p99, cv (stdev/mean), samples,
    exp_version, flags, warnings, host_id, run_id, file, then one `p_<key>` column per
    parameter key seen (missing where a row has no such parameter).
    """
    paths = _expand_paths(path_or_paths)
    return frame((read(p), str(p)) for p in paths)


# --------------------------------------------------------------------------------------------
# Text output


def format_number(v: Any) -> str:
    """A statistic for humans: thousands separators for big numbers, ~4 significant digits."""
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "-"
    a = abs(f)
    if a >= 1000:
        return f"{f:,.0f}"
    if a >= 100:
        return f"{f:.1f}".rstrip("0").rstrip(".")
    if a == 0:
        return "0"
    if a >= 0.01:
        return f"{f:.4g}"
    return f"{f:.3g}"


def row_notes(flags: Mapping[str, Any] | None, warnings: Iterable[str] | None,
              cv: float | None = None) -> list[str]:
    """Short notes for a row: 'emulated CPL0', 'model', 'noisy 12%', 'N warnings'."""
    notes = []
    flags = flags or {}
    if flags.get("emulated_cpl0"):
        notes.append("emulated CPL0")
    if flags.get("model"):
        notes.append("model")
    warnings = list(warnings or [])
    noisy = cv is not None and cv > NOISY_CV
    if noisy:
        notes.append(f"noisy {cv * 100:.0f}%")
    other = [w for w in warnings if not w.startswith("stdev is ")]
    if other:
        notes.append(f"{len(other)} warning{'s' if len(other) > 1 else ''}")
    return notes


def _as_frame(doc_or_df: Any) -> tuple["pd.DataFrame", Mapping[str, Any] | None]:
    if isinstance(doc_or_df, Mapping):
        validate(doc_or_df)
        return frame([(doc_or_df, "")]), doc_or_df
    return doc_or_df, None


def _host_line(doc: Mapping[str, Any]) -> str:
    host = doc.get("host", {})
    kvm = host.get("kvm") or {}
    bits = [f"host {host.get('host_id')}"]
    if host.get("cpu_model"):
        bits.append(str(host["cpu_model"]))
    if kvm.get("flavor"):
        bits.append(f"kvm {kvm['flavor']}")
    if host.get("paging"):
        bits.append(f"paging {host['paging']}")
    if host.get("nested"):
        bits.append("nested")
    if host_cpl0_emulated(host):
        bits.append("CPL0 emulated")
    return " | ".join(bits)


def host_cpl0_emulated(host: Mapping[str, Any]) -> bool:
    """Whether the host record says guest CPL0 code is emulated (KVM on PVM).

    The fingerprint writes `emulated_cpl0` (the runner overwrites it with what its CPL0-vs-CPL3
    nop calibration measured); `cpl0_emulated` and `calibration.emulated_cpl0` are accepted too.
    """
    cal = host.get("calibration")
    cal = cal if isinstance(cal, Mapping) else {}
    return any(bool(v) for v in (host.get("emulated_cpl0"), host.get("cpl0_emulated"),
                                 cal.get("emulated_cpl0"), cal.get("cpl0_emulated")))


def _clip(text: str, width: int) -> str:
    """A table cell at most `width` characters (the file keeps the full text)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(doc_or_df: Any) -> str:
    """The fixed-width table `vlab show` prints.

    Columns: experiment, params, metric, median, p99, unit, n, notes (emulated CPL0, model,
    noisy, a footnote number) and status (`ok`, or `skip: reason`). Status comes last and is not
    padded because skip reasons are free text; row warnings are listed under the table, keyed
    by the footnote number, so that long messages do not widen it.
    """
    df, doc = _as_frame(doc_or_df)
    headers = ["experiment", "params", "metric", "median", "p99", "unit", "n", "notes",
               "status"]
    right = {"median", "p99", "n"}
    rows: list[list[str]] = []
    footnotes: list[str] = []
    counts = dict.fromkeys(STATUSES, 0)
    for rec in df.to_dict("records"):
        cv = rec["cv"] if rec["cv"] == rec["cv"] else None  # NaN -> None
        notes = row_notes(rec.get("flags"), rec.get("warnings"), cv)
        warnings = list(rec.get("warnings") or [])
        if warnings:
            footnotes.append("; ".join(warnings))
            notes.append(f"[{len(footnotes)}]")
        ok = rec["status"] == "ok"
        counts[rec["status"]] += 1
        n = rec["n"]
        rows.append([
            rec["experiment"], _clip(rec["params"] or "-", 64), rec["metric"],
            format_number(rec["median"]) if ok else "-",
            format_number(rec["p99"]) if ok else "-",
            rec["unit"],
            str(int(n)) if ok and n is not None and n == n else "-",
            " ".join(notes),
            "ok" if ok else f"{rec['status']}: {_clip(str(rec['reason']), 90)}",
        ])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        out = []
        for i, (h, c) in enumerate(zip(headers, cells)):
            if i == len(headers) - 1:
                out.append(c)
            elif h in right:
                out.append(c.rjust(widths[i]))
            else:
                out.append(c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    out = []
    if doc is not None:
        out.append(_host_line(doc))
        out.append(f"run {doc.get('run_id')}  suite {doc.get('suite') or '-'}  "
                   f"{len(rows)} rows: {counts['ok']} ok, {counts['skip']} skipped, "
                   f"{counts['error']} errors")
        out.append("")
    out.append(fmt(headers))
    out.append(fmt(["-" * w for w in widths]))
    out.extend(fmt(r) for r in rows)
    if footnotes:
        out.append("")
        out.extend(f"[{i}] {text}" for i, text in enumerate(footnotes, 1))
    return "\n".join(out) + "\n"


def to_csv(doc_or_df: Any) -> str:
    """CSV of the tidy table (one line per row) for spreadsheets: samples are left out,
    flags and warnings are flattened to `k=v;...` and `;`-joined text."""
    df, _ = _as_frame(doc_or_df)
    out = df.drop(columns=["samples"]).copy()
    out["flags"] = [";".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                             for k, v in sorted((f or {}).items())) for f in out["flags"]]
    out["warnings"] = [";".join(w or []) for w in out["warnings"]]
    buf = io.StringIO()
    out.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()
