"""vlab compare with replicate runs on a side: the run as the unit, and what keeps runs from
being replicates (different host keys, missing cases, different experiment versions)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from test_compare import doc, only, proc_row, row
from vlab import results
from vlab._errors import UsageError
from vlab.compare import compare, format_compare

# Three processes per run, tight within the run; the runs themselves drift by a few percent, as
# exits.pio_user's do on the build host. Both sides are drawn from the same run offsets.
DRIFT_A = (1.00, 1.05, 0.97)
DRIFT_B = (1.04, 0.98, 1.01)


def run_doc(offset: float, run_id: str, scale: float = 1.0, **host_over) -> dict:
    base = 80_000.0 * offset * scale
    return doc([proc_row([base, base * 1.002, base * 0.998])], run_id=run_id, **host_over)


def side(drifts, prefix: str, scale: float = 1.0) -> list[dict]:
    return [run_doc(o, f"{prefix}{i}", scale) for i, o in enumerate(drifts)]


def test_two_single_runs_that_drifted_differ_by_process_but_replicate_runs_do_not():
    single = only(compare([run_doc(DRIFT_A[1], "a"), run_doc(DRIFT_B[1], "b")]))
    (r1,) = single["rows"]
    assert r1["tested_unit"] == "process" and r1["significant"]  # the run drift, caught
    c = only(compare([side(DRIFT_A, "a"), side(DRIFT_B, "b")]))
    (r,) = c["rows"]
    assert r["tested_unit"] == "run" and r["n_a"] == r["n_b"] == 3
    assert not r["significant"] and r["direction"] == "same"
    assert r["a"]["runs"] == 3 and len(r["a"]["run_medians"]) == 3
    assert r["a"]["median"] == pytest.approx(sorted(x["median"] for x in
                                                    (d["rows"][0] for d in side(DRIFT_A, "a")))[1])


def test_a_real_change_across_replicate_runs_is_called():
    c = only(compare([side(DRIFT_A, "a"), side(DRIFT_B, "b", scale=1.5)]))
    (r,) = c["rows"]
    assert r["tested_unit"] == "run" and r["test"] == "welch"
    assert r["significant"] and r["direction"] == "worse"
    assert r["ratio"] == pytest.approx(1.5 * 1.01 / 1.00, rel=0.01)
    text = format_compare(compare([side(DRIFT_A, "a"), side(DRIFT_B, "b", scale=1.5)],
                                  names=["a0,a1,a2", "b0,b1,b2"]))
    assert "1 rows tested (run medians)" in text
    assert "1 of them had fewer than 4 runs a side and were tested by Welch's t" in text
    assert "A: a0,a1,a2  host h1  3 runs (a0, a1, a2)" in text


def test_four_runs_a_side_get_the_exact_permutation_test():
    a = side((1.00, 1.05, 0.97, 1.02), "a")
    b = side((1.00, 1.05, 0.97, 1.02), "b", scale=2.0)
    (r,) = only(compare([a, b]))["rows"]
    assert r["tested_unit"] == "run" and r["test"] == "permutation"
    assert r["p_value"] == pytest.approx(2 / 70, rel=0.2)  # the smallest two-sided p of 4 vs 4


def test_one_run_against_several_pools_processes_and_warns():
    c = only(compare([run_doc(1.0, "a"), side(DRIFT_B, "b")]))
    (r,) = c["rows"]
    assert r["tested_unit"] == "process" and r["n_a"] == 3 and r["n_b"] == 9
    assert any("pooled" in w and "drift" in w for w in c["warnings"])


def test_runs_of_one_side_on_different_hosts_are_named_in_a_warning():
    a = [run_doc(1.0, "a0"), run_doc(1.0, "a1", thp="never")]
    c = only(compare([a, side(DRIFT_B, "b")], names=["A", "B"]))
    assert any(w.startswith("A: run 2 differs from run 1 in thp") for w in c["warnings"])
    assert c["host_diff"] == []  # the sides' first runs share their host


def test_a_case_missing_from_some_runs_uses_the_runs_that_have_it():
    a = side(DRIFT_A, "a")
    a[2]["rows"].append(row([5.0, 5.1, 4.9], experiment="exits.nop"))
    b = side(DRIFT_B, "b")
    for d in b:
        d["rows"].append(row([5.0, 5.1, 4.9], experiment="exits.nop"))
    c = only(compare([a, b], names=["A", "B"]))
    nop = [r for r in c["rows"] if r["experiment"] == "exits.nop"]
    assert len(nop) == 1 and nop[0]["a"]["n"] == 3 and nop[0]["tested_unit"] == "sample"
    assert any(w.startswith("A: 1 case(s) are missing from some of its 3 runs (exits.nop")
               for w in c["warnings"])


def test_experiment_versions_that_differ_within_a_side_are_incomparable():
    a = side(DRIFT_A, "a")
    for i, d in enumerate(a):
        d["rows"][0]["exp_version"] = "v1" if i else "v0"
    c = only(compare([a, side(DRIFT_B, "b")]))
    assert c["rows"] == [] and len(c["incomparable"]) == 1
    assert "between the runs of A (v0, v1)" in c["incomparable"][0]["reason"]


def test_a_failed_run_on_a_side_is_not_compared_and_named():
    a = side(DRIFT_A, "a")
    a[1]["rows"][0] = results.error_row("exits.cpuid", {"cpl": 3}, "guest_cycles", "cycles",
                                        "watchdog")
    c = only(compare([a, side(DRIFT_B, "b")]))
    assert c["rows"] == [] and c["not_compared"][0]["reason"].startswith("A run 2 error")


def test_an_invalid_run_in_a_side_is_refused_naming_it():
    bad = run_doc(1.0, "a1")
    del bad["rows"]
    with pytest.raises(UsageError, match="A run 2"):
        compare([[run_doc(1.0, "a0"), bad], side(DRIFT_B, "b")], names=["A", "B"])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlab", "compare", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_joins_a_sides_runs_with_commas(tmp_path):
    paths = {}
    for name, d in [*((f"a{i}", x) for i, x in enumerate(side(DRIFT_A, "a"))),
                    *((f"b{i}", x) for i, x in enumerate(side(DRIFT_B, "b", scale=1.5)))]:
        paths[name] = tmp_path / f"{name}.json"
        results.write_atomic(d, paths[name])
    a = ",".join(str(paths[f"a{i}"]) for i in range(3))
    b = ",".join(str(paths[f"b{i}"]) for i in range(3))
    proc = cli(a, b, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    (r,) = only(out)["rows"]
    assert r["tested_unit"] == "run" and r["significant"]
    assert out["files"][0]["name"] == "a0.json,a1.json,a2.json"
    assert [x["run_id"] for x in out["files"][1]["runs"]] == ["b0", "b1", "b2"]


def test_cli_a_file_whose_name_has_a_comma_is_one_file(tmp_path):
    p = tmp_path / "x,y.json"
    p.write_text(json.dumps(run_doc(1.0, "a")))
    q = tmp_path / "b.json"
    q.write_text(json.dumps(run_doc(1.0, "b")))
    proc = cli(str(p), str(q))
    assert proc.returncode == 0, proc.stderr
    assert "A: x,y.json  host h1  run a" in proc.stdout


@pytest.mark.parametrize("arg,why", [("{a},", "empty file name"),
                                     ("{a},{d}/missing.json", "missing.json")])
def test_cli_bad_side_is_one_line_and_exit_2(tmp_path, arg, why):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(run_doc(1.0, "a")))
    proc = cli(arg.format(a=a, d=tmp_path), str(a))
    assert proc.returncode == 2 and why in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_case_repeated_in_a_run_that_the_first_run_lacks_is_reported_not_counted_as_a_run():
    a = side(DRIFT_A, "a")
    nop = row([5.0, 5.1, 4.9], experiment="exits.nop")
    a[1]["rows"] += [nop, copy.deepcopy(nop)]
    a[2]["rows"].append(copy.deepcopy(nop))
    b = side(DRIFT_B, "b")
    for d in b:
        d["rows"].append(copy.deepcopy(nop))
    c = only(compare([a, b], names=["A", "B"]))
    (r,) = [r for r in c["rows"] if r["experiment"] == "exits.nop"]
    assert r["a"]["runs"] == 2  # runs 2 and 3, once each
    assert any(w.startswith("A: case exits.nop cpl=3 guest_cycles (run 2) appears more than once")
               for w in c["warnings"])
