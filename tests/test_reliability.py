"""Issue 19: a run stops on Ctrl-C/SIGTERM and keeps its finished cases, a killed run resumes,
no results file is overwritten or lost, and every bad input is one line and exit 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_kvm

# the cheapest cases there are: exits.nop at CPL3, two cases (vcpus 1 and 2)
NOP2 = ["exits.nop", "-p", "cpl=3", "-p", "vcpus=1,2", "--processes", "2", "--values", "2"]
NOP1 = ["exits.nop", "-p", "cpl=3", "-p", "vcpus=1", "--processes", "1", "--values", "1"]


def vlab(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None,
         timeout: float = 300, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlab", *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, cwd=cwd,
                          env=dict(os.environ, **(env or {})))


def _bad(proc: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2, exactly one line on stderr, no traceback, naming the problem."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle.lower() in lines[0].lower(), lines[0]


def _start(args: list[str], cwd=None, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlab", "run", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, **(env or {})))


def _read_until(proc: subprocess.Popen, needle: str, count: int = 1,
                timeout: float = 240) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while seen.count(needle) < count and time.monotonic() < deadline:
        c = proc.stderr.read(1)
        if not c:
            break
        seen += c
    assert seen.count(needle) >= count, seen
    return seen


def _workers_of(pid: int) -> set[int]:
    from vlab.run.interrupt import children

    out = set()
    for p in children(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"vlab.run.worker" in f.read():
                    out.add(p)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    from vlab.run.interrupt import alive

    return alive(pid)


def _interrupt_midrun(tmp_path: Path, sig: int, group: bool, name: str = "r.json"):
    """Start a two-case run, wait until the first case is done and a worker of the second is
    running, send `sig` (to the process group, as a terminal does, or to the runner alone)."""
    out = tmp_path / name
    proc = _start([*NOP2, "-o", str(out)])
    seen = _read_until(proc, " ok (")
    assert "Ctrl-C" in seen and "--resume" in seen, seen     # progress says how to stop/resume
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while not workers and time.monotonic() < deadline and proc.poll() is None:
        workers = _workers_of(proc.pid)
        time.sleep(0.05)
    assert workers, "the second case never started a worker"
    t0 = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    err = seen + err
    time.sleep(0.2)
    return out, proc, err, took, workers


@needs_kvm
def test_sigint_to_the_process_group_saves_the_finished_cases(tmp_path):
    from vlab import results

    out, proc, err, took, workers = _interrupt_midrun(tmp_path, signal.SIGINT, group=True)
    assert proc.returncode == 130, err
    assert took < 30, took                       # "within a few seconds", with slack for load
    assert "Traceback" not in err
    doc = results.read(out)
    assert doc["interrupted"] is True and doc["signal"] == "SIGINT"
    cases = {json.dumps(r["params"], sort_keys=True) for r in doc["rows"]}
    assert cases == {json.dumps({"cpl": 3, "vcpus": 1}, sort_keys=True)}, cases
    assert all(r["status"] == "ok" for r in doc["rows"])
    assert (tmp_path / "r.json.journal").exists()        # kept: the run can be resumed
    assert f"--resume {tmp_path / 'r.json.journal'}" in err
    assert not [p for p in workers if _alive(p)], "a worker of the run survived it"


@needs_kvm
def test_sigterm_to_the_runner_alone_ends_its_workers(tmp_path):
    from vlab import results

    out, proc, err, took, workers = _interrupt_midrun(tmp_path, signal.SIGTERM, group=False)
    assert proc.returncode == 143, err
    assert took < 30, took
    doc = results.read(out)
    assert doc["interrupted"] is True and doc["signal"] == "SIGTERM"
    assert len({json.dumps(r["params"]) for r in doc["rows"]}) == 1
    assert not [p for p in workers if _alive(p)], "a worker of the run survived it"


@needs_kvm
def test_kill9_then_resume_measures_every_case_once(tmp_path):
    from vlab import results
    from vlab.run.journal import Journal

    out = tmp_path / "r.json"
    proc = _start([*NOP2, "-o", str(out)])
    _read_until(proc, " ok (")
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while not workers and time.monotonic() < deadline and proc.poll() is None:
        workers = _workers_of(proc.pid)
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)            # the runner alone, as `kill -9 PID` does
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15              # its workers die with it (PDEATHSIG)
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "a worker outlived its killed runner"
    journal = tmp_path / "r.json.journal"
    assert not out.exists() and journal.exists()
    done = Journal.read(journal).done
    assert len(done) == 1
    first_rows = next(iter(done.values()))

    res = vlab("run", "--resume", str(journal))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(" ok (") == 1, res.stderr          # only the missing case ran
    assert res.stderr.count("done before (journal)") == 1, res.stderr
    doc = results.read(out)
    assert "interrupted" not in doc
    keys = [(json.dumps(r["params"], sort_keys=True), r["metric"]) for r in doc["rows"]]
    from vlab.run import registry

    n_metrics = len(registry.get("exits.nop").metrics)
    assert len(keys) == len(set(keys)) == 2 * n_metrics          # 2 cases x its metrics, once each
    assert doc["rows"][:len(first_rows)] == first_rows         # kept as measured, not rerun
    assert not journal.exists()


@needs_kvm
@pytest.mark.parametrize("name", ["r.json", "r.json.gz"])
def test_an_interrupted_run_resumes_into_the_same_file(tmp_path, name):
    """Also for a gzip'ed results file: the partial results and the resumed ones are both
    written compressed, and resuming recognizes the partial file as its own run's."""
    from vlab import results

    out, proc, err, _took, _w = _interrupt_midrun(tmp_path, signal.SIGINT, group=True,
                                                  name=name)
    assert proc.returncode == 130, err
    assert (out.read_bytes()[:2] == results.GZIP_MAGIC) == name.endswith(".gz")
    res = vlab("run", "--resume", str(out))          # the results file names its journal
    assert res.returncode == 0, res.stderr
    assert (out.read_bytes()[:2] == results.GZIP_MAGIC) == name.endswith(".gz")
    doc = results.read(out)
    assert "interrupted" not in doc
    assert len({json.dumps(r["params"], sort_keys=True) for r in doc["rows"]}) == 2


def _journal_for(tmp_path: Path, **change) -> Path:
    """A journal as `vlab run exits.nop -p cpl=3 -p vcpus=1` would start it, with `change`."""
    from vlab.host.calibrate import collect_host
    from vlab.run import runner
    from vlab.run.journal import Journal, plan_record

    host = collect_host()
    opts = runner.RunOptions(selectors=["exits.nop"], overrides={"cpl": [3], "vcpus": [1]})
    cases, pyperf, _ = runner.plan(opts, host)
    header = {"run_id": "0123456789ab", "started_at": "2026-01-01T00:00:00+00:00",
              "output": str(tmp_path / "r.json"), "host_id": host["host_id"], "host": host,
              "suite": None, "argv": [], "options": {"selectors": ["exits.nop"], "suite": None,
                                                     "overrides": opts.overrides, "trace": False,
                                                     "pyperf": {}},
              "plan": plan_record(cases, pyperf, False)}
    header.update(change)
    j = Journal(tmp_path / "r.json.journal")
    j.write_header(header)
    return j.path


@needs_kvm
def test_resume_refuses_another_host(tmp_path):
    path = _journal_for(tmp_path, host_id="someotherhost")
    _bad(vlab("run", "--resume", str(path)), "recorded on host someotherhost")


@needs_kvm
def test_resume_refuses_another_plan(tmp_path):
    path = _journal_for(tmp_path)
    doc = json.loads(path.read_text())
    doc["plan"]["cases"][0]["exp_version"] = "000000000000"      # the experiment changed since
    path.write_text(json.dumps(doc) + "\n")
    _bad(vlab("run", "--resume", str(path)), "not the same plan")
    _bad(vlab("run", "--resume", str(path), "exits.nop", "-p", "cpl=3", "-p", "vcpus=2"),
         "not the same plan")


@needs_kvm
def test_resume_needs_a_journal(tmp_path):
    _bad(vlab("run", "--resume", str(tmp_path / "nothing.json")), "no such journal")
    f = tmp_path / "x.json.journal"
    f.write_text("{}\n")
    _bad(vlab("run", "--resume", str(f)), "not a vlab run journal")


@needs_kvm
def test_two_same_second_runs_leave_two_files(tmp_path):
    from vlab import results

    procs = [_start(NOP1, cwd=tmp_path) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    files = sorted(tmp_path.glob("results/*/*.json"))
    assert len(files) == 2, files
    docs = [results.read(f) for f in files]
    assert docs[0]["run_id"] != docs[1]["run_id"]
    assert not list(tmp_path.glob("results/*/*.journal"))


def test_default_names_are_unique_within_a_second(tmp_path):
    from vlab._outputs import reserve

    first = reserve(tmp_path / "20260101T000000Z.json", "aaaaaaaaaaaa", default=True)
    second = reserve(tmp_path / "20260101T000000Z.json", "bbbbbbbbbbbb", default=True)
    assert first != second and second.name == "20260101T000000Z-bbbbbbbbbbbb.json"


def test_write_new_never_replaces(tmp_path):
    from vlab._outputs import write_new

    f = tmp_path / "r.json"
    write_new(b"one", f)
    with pytest.raises(FileExistsError):
        write_new(b"two", f)
    assert f.read_bytes() == b"one"
    write_new(b"two", f, replace=True)
    assert f.read_bytes() == b"two"


@needs_kvm
def test_an_existing_output_is_refused_without_force(tmp_path):
    f = tmp_path / "r.json"
    f.write_text("precious")
    _bad(vlab("run", *NOP1, "-o", str(f)), "already exists")
    assert f.read_text() == "precious"


@needs_kvm
def test_a_failed_final_write_saves_the_results_elsewhere(tmp_path):
    from vlab import results

    sub = tmp_path / "sub"
    fb = tmp_path / "fallback"
    fb.mkdir()
    proc = _start([*NOP1, "-o", str(sub / "r.json")], env={"VLAB_FALLBACK_DIR": str(fb)})
    _read_until(proc, "[1/1]")
    sub.rename(tmp_path / "gone")                  # the destination becomes unwritable:
    sub.write_text("a regular file where the directory was")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    saved = list(fb.glob("r-*.json"))
    assert len(saved) == 1, (err, list(fb.iterdir()))
    line = [ln for ln in err.splitlines() if str(saved[0]) in ln]
    assert len(line) == 1 and "cannot write" in line[0], err
    doc = results.read(saved[0])
    assert doc["rows"] and all(r["status"] == "ok" for r in doc["rows"])


# ---------------------------------------------------------------- bad input: exit 2, one line

def _unwritable(tmp_path: Path) -> Path:
    """A path no one can write, root included: under a regular file."""
    f = tmp_path / "file"
    f.write_text("x")
    return f / "sub"


@needs_kvm
def test_unwritable_run_output_is_refused_before_measuring(tmp_path):
    t0 = time.monotonic()
    _bad(vlab("run", *NOP1, "-o", str(_unwritable(tmp_path) / "r.json")), "not a directory")
    assert time.monotonic() - t0 < 60


def test_unwritable_report_plot_trace_migrate_outputs(tmp_path):
    good = Path(__file__).parent / "data" / "results"
    files = sorted(good.glob("*.json"))
    if not files:
        pytest.skip("no results file in tests/data")
    bad = _unwritable(tmp_path)
    _bad(vlab("report", str(files[0]), "-o", str(bad / "r.html")), "not a directory")
    _bad(vlab("plot", str(files[0]), "-o", str(bad)), "not a directory")
    _bad(vlab("plot", str(files[0]), "-o", "/proc/vlab-no-such-dir"), "cannot create")
    _bad(vlab("trace", "--pid", str(os.getpid()), "-o", str(bad / "t.json")), "not a directory")
    _bad(vlab("migrate", "--trace-out", str(bad / "t.npz")), "not a directory")
    with open("/dev/full", "w") as full:
        _bad(vlab("show", str(files[0]), "--csv", stdout=full), "standard output")


def test_non_regular_and_oversized_input_files(tmp_path):
    _bad(vlab("show", "/dev/zero", timeout=30), "not a regular file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _bad(vlab("show", str(fifo), timeout=30), "not a regular file")
    _bad(vlab("show", str(tmp_path)), "is a directory")
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(600 << 20)                       # sparse: costs no disk
    _bad(vlab("show", str(big), timeout=30), "larger than")
    _bad(vlab("compare", str(big), "/dev/zero", timeout=30), "larger than")


@needs_kvm
def test_values_that_do_not_fit_their_register():
    _bad(vlab("run", "exits.cpuid", "-p", "leaf=99999999999999999999999"), "32-bit EAX")
    _bad(vlab("run", "exits.cpuid", "-p", "leaf=-1"), "does not fit")
    _bad(vlab("run", "exits.cpuid", "-p", "leaf=1.5"), "not an integer")
    _bad(vlab("run", "exits.nop", "-p", "iters=99999999999999999999"), "iters")
    _bad(vlab("run", "exits.pio_user", "-p", "direction=sideways"), "direction must be one of")
    _bad(vlab("run", "migration.precopy_sim", "-p", "trace=/dev/zero"), "not a regular file")
    _bad(vlab("run", "exits.nop", "--processes", "99999999999999999999"), "--processes")


def test_migrate_values_that_do_not_fit():
    _bad(vlab("migrate", "--rate", "99999999999999999999999"), "--rate")
    _bad(vlab("migrate", "--lag-us", "-5"), "--lag-us")
    _bad(vlab("migrate", "--warmup-s", "nan"), "finite")
    _bad(vlab("migrate", "--io-timeout", "inf"), "finite")
    _bad(vlab("migrate", "--mem", "99999999999999999999999"), "--mem")
    _bad(vlab("migrate", "--mem", "nan"), "not a size")
    # the one rate parser (vlab._units) takes no exponent forms at all: refused by name
    _bad(vlab("migrate", "--bandwidth", "1e400"), "--bandwidth")


def test_host_set_values_that_do_not_fit():
    _bad(vlab("host", "set", "kvm.halt_poll_ns=4294967296", "--dry-run"), "32-bit")
    _bad(vlab("host", "set", "hugepages.2m=99999999999999999999", "--dry-run"), "64-bit")


def test_bad_float_options():
    _bad(vlab("trace", "--pid", str(os.getpid()), "--interval", "nan"), "--interval")
    _bad(vlab("trace", "--pid", "99999999999999999999"), "no process")
    _bad(vlab("compare", "a.json", "b.json", "--min-effect", "inf"), "--min-effect")


def _every_param():
    from vlab.run import registry as reg

    return [(e.name, k, v) for e in reg.discover().values() for k, v in e.params.items()]


@pytest.fixture(scope="module")
def host_record() -> dict:
    from vlab.host.calibrate import collect_host

    return collect_host()


@pytest.mark.parametrize("name,key,values", _every_param(),
                         ids=[f"{n}-{k}" for n, k, _ in _every_param()])
def test_every_parameter_refuses_a_value_that_does_not_fit(name, key, values, host_record):
    """Walk every parameter `vlab list --json` shows: a number declares the range it must fit
    in, and an absurd value (70 bits, negative, nan, a word for a number, a number for a
    word) is a UsageError before anything runs. The declared values themselves pass."""
    from vlab._errors import UsageError
    from vlab.run import registry as reg
    from vlab.run.runner import RunOptions, plan

    host = host_record
    exp = reg.get(name)
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numeric or all(isinstance(v, bool) for v in values):
        assert key in exp.limits, f"{name}: parameter {key} declares no Limit"
    for v in values:
        exp.limits[key].check(key, v) if key in exp.limits else None
    if numeric:
        bads = [1 << 70, -(1 << 70), float("nan"), "many"]
    elif all(isinstance(v, bool) for v in values):
        bads = [7, "maybe"]
    else:
        bads = ["no-such-value", 1 << 70] if key != "trace" else ["/dev/zero"]
    for bad in bads:
        with pytest.raises(UsageError):
            plan(RunOptions(selectors=[name], overrides={key: [bad]}), host)


def test_results_schema_accepts_interrupted_and_signal():
    from vlab import results
    from vlab._errors import UsageError

    doc = {"schema": "vlab.run/1", "run_id": "x", "started_at": "t", "finished_at": "t",
           "vlab_version": "0", "argv": [], "host": {"host_id": "h"}, "suite": None, "rows": []}
    results.validate(doc)
    results.validate(dict(doc, interrupted=True, signal="SIGINT"))
    results.validate(dict(doc, interrupted=False))
    with pytest.raises(UsageError, match="interrupted"):
        results.validate(dict(doc, interrupted="yes"))
    with pytest.raises(UsageError, match="signal"):
        results.validate(dict(doc, signal=2))


def test_a_journal_is_held_by_one_run_at_a_time(tmp_path):
    from vlab._errors import UsageError
    from vlab.run.journal import Journal

    path = tmp_path / "r.json.journal"
    first = Journal(path)
    first.write_header({"run_id": "x"})
    first.lock()
    with pytest.raises(UsageError, match="still going"):
        Journal.read(path).lock()


_FAIL_FIRST = '''
import sys

import vlab.run.registry as _reg

_get = _reg.get


def get(name):
    exp = _get(name)
    if not sys.argv[0].endswith("worker.py"):
        return exp

    class Failing:
        def __getattr__(self, attr):
            return getattr(exp, attr)

        def setup(self, params, host):
            if params.get("vcpus") == 1:
                raise RuntimeError("injected worker failure")
            return exp.setup(params, host)

    return Failing()


_reg.get = get
'''


@needs_kvm
def test_a_case_whose_workers_fail_does_not_fail_the_cases_after_it(tmp_path):
    """pyperf numbers the cases its workers run; a failed case must not shift that numbering,
    or every later case of the run is measured as the wrong case (and reported as failed). The
    failure is injected into the workers of the first case only (a sitecustomize on their
    PYTHONPATH), the guest path is real."""
    (tmp_path / "sitecustomize.py").write_text(_FAIL_FIRST)
    out = tmp_path / "r.json"
    proc = vlab("run", *NOP2, "-o", str(out),
                env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    by_vcpus = {r["params"]["vcpus"]: r for r in rows if r["metric"] == "guest_cycles"}
    assert by_vcpus[1]["status"] == "error" and "injected worker failure" in by_vcpus[1]["reason"]
    assert by_vcpus[2]["status"] == "ok", by_vcpus[2]["reason"]
