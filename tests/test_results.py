"""vlab.results: validation, reading, atomic writing, rows, the tidy table and `show` output."""
from __future__ import annotations

import copy
import io
import json
import math
import os
from pathlib import Path

import pytest

from vlab import results
from vlab._errors import UsageError

DATA = Path(__file__).parent / "data" / "results"
QUICK = DATA / "pvm_quick.json"
THP_NEVER = DATA / "pvm_quick_thp_never.json"


def minimal_doc(rows: list | None = None) -> dict:
    return {"schema": "vlab.run/1", "run_id": "r1", "started_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:01:00Z", "vlab_version": "0.1.0",
            "argv": ["vlab", "run"], "host": {"host_id": "h1"}, "suite": None,
            "rows": rows if rows is not None else [
                results.make_row("exits.cpuid", {"cpl": 3}, "guest_cycles", "cycles",
                                 [100, 101, 99, 100])]}


def one_line_usage_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    assert text.strip() == text and text
    return text


# --------------------------------------------------------------------------------------------
# validate / read


def test_fixtures_are_valid_and_small():
    for path in (QUICK, THP_NEVER):
        assert path.stat().st_size < 200_000
        doc = results.read(path)
        assert doc["schema"] == results.SCHEMA == "vlab.run/1"
        statuses = {r["status"] for r in doc["rows"]}
        assert statuses == {"ok", "skip", "error"}


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ("", "empty file"),
    ("[1, 2]", "top level is array"),
    ('{"rows": []}', "no 'schema'"),
    ('{"schema": "vlab.run/2", "rows": []}', "unsupported schema 'vlab.run/2'"),
])
def test_read_refuses_bad_files_with_one_line(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UsageError) as excinfo:
        results.read(path)
    text = one_line_usage_error(excinfo)
    assert str(path) in text
    assert needle in text


def test_read_binary_and_missing_and_directory(tmp_path):
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError) as excinfo:
        results.read(binary)
    assert "bin.json" in one_line_usage_error(excinfo)
    with pytest.raises(UsageError) as excinfo:
        results.read(tmp_path / "nope.json")
    assert "cannot read" in one_line_usage_error(excinfo)
    with pytest.raises(UsageError) as excinfo:
        results.read(tmp_path)
    assert "directory" in one_line_usage_error(excinfo)


def _mutated(mutate) -> dict:
    doc = copy.deepcopy(minimal_doc())
    mutate(doc)
    return doc


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("host"), "missing top-level key host"),
    (lambda d: d.pop("rows"), "missing top-level key rows"),
    (lambda d: d["host"].pop("host_id"), "host.host_id"),
    (lambda d: d.update(argv="vlab run"), "'argv'"),
    (lambda d: d["rows"][0].pop("median"), "missing key median"),
    (lambda d: d["rows"][0].update(status="done"), "bad status 'done'"),
    (lambda d: d["rows"][0].update(median="fast"), "'median' must be a number"),
    (lambda d: d["rows"][0].update(n=True), "'n' must be a non-negative integer"),
    (lambda d: d["rows"][0].update(n=2.5), "'n' must be a non-negative integer"),
    (lambda d: d["rows"][0].update(p99=None), "ok row has null 'p99'"),
    (lambda d: d["rows"][0].update(samples=[1, "2"]), "samples[1] must be a number"),
    (lambda d: d["rows"][0].update(params=[]), "'params' must be an object"),
    (lambda d: d["rows"][0].update(flags=["model"]), "'flags' has the wrong type"),
    (lambda d: d["rows"][0].update(series={"x": [1, 2], "y": [1]}), "differ in length"),
    (lambda d: d["rows"].append(results.skip_row("io.sriov", {}, "gbit_per_s", "Gbit/s", "x")
                                | {"reason": None}), "needs a non-empty 'reason'"),
    (lambda d: d["rows"].append(42), "row 1: must be an object"),
])
def test_validate_names_the_problem(mutate, needle):
    with pytest.raises(UsageError) as excinfo:
        results.validate(_mutated(mutate))
    assert needle in one_line_usage_error(excinfo)


def test_validate_row_message_names_the_row():
    doc = _mutated(lambda d: d["rows"][0].update(median="x"))
    with pytest.raises(UsageError, match=r"row 0 \(exits\.cpuid cpl=3 guest_cycles\)"):
        results.validate(doc)


def test_read_prefixes_validation_errors_with_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_mutated(lambda d: d["rows"][0].update(status="maybe"))))
    with pytest.raises(UsageError) as excinfo:
        results.read(path)
    text = one_line_usage_error(excinfo)
    assert text.startswith(str(path) + ": ") and "bad status" in text


def test_validate_accepts_unknown_extra_keys():
    doc = minimal_doc()
    doc["comment"] = "forward compatible"
    doc["rows"][0]["extra"] = {"loops": 1000}
    results.validate(doc)


# --------------------------------------------------------------------------------------------
# write_atomic


def test_write_atomic_round_trip_creates_dirs_and_leaves_no_temp(tmp_path):
    target = tmp_path / "results" / "h1" / "run.json"
    doc = minimal_doc()
    assert results.write_atomic(doc, target) == target
    assert results.read(target) == doc
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_atomic_crash_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    old = minimal_doc()
    results.write_atomic(old, target)
    before = target.read_bytes()

    real_fsync = os.fsync

    def crashing_fsync(fd):
        # the new document went into the temporary file's buffers: the disk fills up as they
        # are written back (where ENOSPC shows with buffered writes)
        real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crashing_fsync)
    new = minimal_doc()
    new["run_id"] = "r2"
    with pytest.raises(OSError):
        results.write_atomic(new, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_write_atomic_crash_leaves_no_partial_new_file(tmp_path, monkeypatch):
    target = tmp_path / "new.json"

    def interrupted_fsync(fd):
        raise KeyboardInterrupt          # Ctrl-C while the new file is being written back

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        results.write_atomic(minimal_doc(), target)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_refuses_invalid_doc_before_touching_disk(tmp_path):
    target = tmp_path / "run.json"
    with pytest.raises(UsageError):
        results.write_atomic({"schema": "vlab.run/1"}, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# rows


def test_make_row_statistics_come_from_summarize():
    from vlab.analysis.stats import summarize

    samples = [10.0, 11.0, 12.0, 13.0, 100.0]
    row = results.make_row("paging.random_read", {"wss": 4096, "backing": "4K"},
                           "cycles_per_access", "cycles", samples, exp_version="abc",
                           flags={"model": False}, extra={"loops": 5})
    expected = summarize(samples)
    for key in results.STAT_KEYS:
        assert row[key] == pytest.approx(expected[key])
    assert row["status"] == "ok" and row["reason"] is None
    assert row["samples"] == samples
    assert row["exp_version"] == "abc" and row["extra"] == {"loops": 5}
    assert list(row)[:len(results.ROW_KEYS)] == list(results.ROW_KEYS)
    results.validate(minimal_doc([row]))


def test_make_row_noisy_warning_like_pyperf():
    # mean 100, sample stdev 12.3 exactly: two values symmetric around the mean
    d = 12.3 / math.sqrt(2)
    row = results.make_row("x.y", {}, "m", "ns", [100 - d, 100 + d])
    assert row["warnings"] == ["stdev is 12.3% of the mean: results may be noisy"]
    steady = results.make_row("x.y", {}, "m", "ns", [100, 101, 99])
    assert "warnings" not in steady


def test_make_row_accepts_numpy_and_stays_json():
    np = pytest.importorskip("numpy")
    row = results.make_row("x.y", {"n": 1}, "m", "ns", np.array([1, 2, 3], dtype=np.int64),
                           series={"x": np.arange(3), "y": np.array([1.5, 2.5, 3.5]),
                                   "x_label": "t (s)", "y_label": "pages"})
    text = json.dumps(row, allow_nan=False)
    assert json.loads(text)["series"]["x"] == [0, 1, 2]
    assert all(type(s) is int for s in row["samples"])


def test_make_row_refuses_empty_and_unknown_options():
    with pytest.raises(ValueError):
        results.make_row("x.y", {}, "m", "ns", [])
    with pytest.raises(ValueError):
        results.make_row("x.y", {}, "m", "ns", [1.0, float("nan")])
    with pytest.raises(TypeError, match="colour"):
        results.make_row("x.y", {}, "m", "ns", [1.0], colour="red")


def test_skip_and_error_rows():
    skip = results.skip_row("io.sriov", {"msg_bytes": 64}, "gbit_per_s", "Gbit/s",
                            "no SR-IOV device\n(VFIO missing)", flags={"higher_is_better": True})
    err = results.error_row("exits.hypercall", {"cpl": 0}, "guest_cycles", "cycles",
                            "guest did not finish within 5 s (watchdog)")
    assert skip["status"] == "skip" and skip["reason"] == "no SR-IOV device (VFIO missing)"
    assert err["status"] == "error"
    for row in (skip, err):
        assert all(row[k] is None for k in results.STAT_KEYS) and row["samples"] == []
    results.validate(minimal_doc([skip, err]))
    with pytest.raises(ValueError):
        results.skip_row("io.sriov", {}, "gbit_per_s", "Gbit/s", "   ")


def test_params_key_is_canonical():
    assert results.params_key({"leaf": 0, "cpl": 3}) == "cpl=3,leaf=0"
    assert results.params_key({}) == ""
    assert results.params_key({"ad": True, "x": None, "l": [1, 2]}) == "ad=true,l=[1,2],x=null"


# --------------------------------------------------------------------------------------------
# load / show / csv


def test_load_gives_a_tidy_frame():
    df = results.load(QUICK)
    expected = ["experiment", "metric", "unit", "status", "reason", "n", "mean", "median",
                "stdev", "min", "max", "p90", "p99", "cv", "samples", "exp_version",
                "host_id", "run_id", "file", "params"]
    for col in expected:
        assert col in df.columns, col
    doc = results.read(QUICK)
    assert len(df) == len(doc["rows"])
    assert {"p_cpl", "p_wss", "p_msg_bytes", "p_notify"} <= set(df.columns)
    cpuid = df[(df.experiment == "exits.cpuid") & (df.metric == "guest_cycles")].iloc[0]
    assert cpuid["params"] == "cpl=3" and cpuid["p_cpl"] == 3
    assert cpuid["cv"] == pytest.approx(cpuid["stdev"] / cpuid["mean"])
    assert cpuid["host_id"] == doc["host"]["host_id"] and cpuid["file"] == str(QUICK)
    skipped = df[df.status == "skip"].iloc[0]
    assert math.isnan(skipped["median"]) and skipped["reason"]
    assert str(df["n"].dtype) == "Int64"


def test_load_many_files_and_directories(tmp_path):
    df = results.load([QUICK, THP_NEVER])
    assert set(df["file"]) == {str(QUICK), str(THP_NEVER)}
    assert set(df["run_id"]) == {results.read(QUICK)["run_id"], results.read(THP_NEVER)["run_id"]}
    sub = tmp_path / "h1"
    results.write_atomic(minimal_doc(), sub / "a.json")
    assert len(results.load(tmp_path)) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no results files"):
        results.load(empty)


def test_format_table_is_readable():
    doc = results.read(QUICK)
    text = results.format_table(doc)
    lines = text.splitlines()
    assert lines[0].startswith(f"host {doc['host']['host_id']} | Intel Xeon")
    assert "kvm pvm" in lines[0] and "CPL0 emulated" in lines[0]
    header = next(line for line in lines if line.startswith("experiment"))
    for col in ("params", "metric", "median", "p99", "unit", "n", "notes", "status"):
        assert col in header
    assert "error: guest did not finish" in text
    assert "skip: no SR-IOV virtual function" in text
    assert "emulated CPL0" in text and "model" in text and "noisy" in text
    assert "results may be noisy" in text  # footnote carries the warning text
    cpuid = next(line for line in lines if line.startswith("exits.cpuid") and "guest_cycles"
                 in line)
    assert "15," in cpuid  # thousands separator on the median
    # the same table from the DataFrame (no host header)
    from_df = results.format_table(results.load(QUICK))
    assert from_df.splitlines()[0].startswith("experiment")


def test_to_csv_round_trips_through_pandas():
    import pandas as pd

    text = results.to_csv(results.read(QUICK))
    df = pd.read_csv(io.StringIO(text))
    assert len(df) == len(results.read(QUICK)["rows"])
    assert "samples" not in df.columns
    assert "emulated_cpl0=true" in set(df["flags"].dropna())


def test_format_number():
    f = results.format_number
    assert f(15600) == "15,600" and f(15636.4) == "15,636" and f(752.0) == "752"
    assert f(84.44) == "84.44" and f(0.0039) == "0.0039" and f(None) == "-"
    assert f(0) == "0" and f(float("nan")) == "-"


def test_new_document_is_the_one_header():
    import datetime as dt
    import re

    started = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    host = {"host_id": "h1"}
    doc = results.new_document(host, [], argv=["run"], suite="quick", started=started,
                               duration_s=1.5)
    results.validate(doc)
    assert doc["schema"] == results.SCHEMA and re.fullmatch(r"[0-9a-f]{12}", doc["run_id"])
    assert doc["started_at"] == "2026-01-01T00:00:00+00:00" and doc["finished_at"]
    assert doc["duration_s"] == 1.5 and doc["host"] is host and doc["suite"] == "quick"
    assert list(doc)[-2:] == ["host", "rows"]
    trace = results.new_document(host, [], argv=[], suite=None, started=started,
                                 finished=started)
    assert "duration_s" not in trace and trace["finished_at"] == trace["started_at"]
    assert trace["run_id"] != doc["run_id"]


# --------------------------------------------------------------------------------------------
# compact and compressed files


def test_gzip_results_round_trip_and_are_read_whatever_their_name(tmp_path):
    doc = minimal_doc()
    gz = results.write_atomic(doc, tmp_path / "run.json.gz")
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert results.read(gz) == results.read(results.write_atomic(doc, tmp_path / "run.json"))
    renamed = tmp_path / "renamed.json"
    renamed.write_bytes(gz.read_bytes())
    assert results.read(renamed)["run_id"] == doc["run_id"]
    assert len(results.load(tmp_path)) > 0          # a directory holds .json and .json.gz


def test_a_corrupt_or_truncated_gzip_is_one_line(tmp_path):
    gz = results.write_atomic(minimal_doc(), tmp_path / "run.json.gz")
    data = gz.read_bytes()
    (tmp_path / "cut.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated gzip"):
        results.read(tmp_path / "cut.json.gz")
    (tmp_path / "bad.json.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(UsageError, match="not a valid gzip"):
        results.read(tmp_path / "bad.json.gz")


def test_a_gzip_bomb_is_refused(tmp_path, monkeypatch):
    import gzip

    monkeypatch.setattr(results, "MAX_INFLATED", 1 << 20)
    (tmp_path / "bomb.json.gz").write_bytes(gzip.compress(b" " * (4 << 20)))
    with pytest.raises(UsageError, match="inflates to more than 1 MiB"):
        results.read(tmp_path / "bomb.json.gz")


def test_samples_are_stored_to_six_significant_digits_and_rows_one_per_line(tmp_path):
    row = results.make_row("exits.cpuid", {"cpl": 3}, "guest_cycles", "cycles",
                           [15583.333333333334, 2.0 / 3.0, 7, 0.0])
    assert row["samples"] == [15583.3, 0.666667, 7, 0.0]
    assert row["median"] == pytest.approx((0.666667 + 7) / 2)
    doc = minimal_doc()
    doc["rows"] = [row, row]
    text = results.dumps(doc)
    assert json.loads(text) == doc
    lines = text.splitlines()
    assert sum(1 for ln in lines if ln.startswith(' {"experiment":')) == 2
