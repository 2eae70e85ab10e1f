"""The run journal, resuming a run, and saving its results so that none is ever lost.

Every `vlab run` keeps a journal beside its results file (`<results>.json.journal`): one JSON
line naming the run (run id, host, plan, options), then one line per finished case with that
case's rows, each appended and fsync'ed as the case ends. The journal is the run's claim on its
results name (created exclusively, see `vlab._outputs.reserve`), and what `vlab run --resume`
reads after a run was killed (SIGKILL, a lost machine) or interrupted:

* a complete run writes its results file and removes the journal;
* an interrupted run (SIGINT, SIGTERM) writes its finished cases with `interrupted: true` and
  the signal's name, and keeps the journal;
* `vlab run --resume FILE` (the journal or the results file) checks that this is the same host
  (`host_id`) and the same plan (cases, experiment versions, pyperf options), refuses with the
  reason if not, then measures only the cases the journal does not hold. Its results file holds
  every case once, in plan order.

`RunSession` is what `vlab run` uses: `start` or `resume` it, hand its hooks to the runner
(`RunOptions.on_start`, `on_case`, `done`, `host`), and `finish` it with the document.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vlab import _inputs, _outputs
from vlab._errors import UsageError
from vlab.run import interrupt

FORMAT = "vlab.journal/1"
#: A journal holds every sample of every finished case; larger than this it is not one.
MAX_JOURNAL_BYTES = 2 << 30


def journal_path(results: str | os.PathLike[str]) -> Path:
    """The journal of the results file `results`."""
    p = Path(results)
    return p.with_name(p.name + _outputs.JOURNAL_SUFFIX)


def plan_record(cases: list, pyperf: dict, trace: bool) -> dict:
    """What makes two runs the same plan: each case (id, experiment, parameters, experiment
    version), the pyperf options and whether exits are traced."""
    return {"cases": [{"id": c.id, "experiment": c.exp.name, "params": c.params,
                       "exp_version": c.exp.version(), "skip": c.skip} for c in cases],
            "pyperf": {k: pyperf[k] for k in sorted(pyperf)}, "trace": bool(trace)}


def plan_difference(old: dict, new: dict) -> str | None:
    """None if `new` is the plan `old` recorded, else the first difference, in words."""
    if old.get("pyperf") != new["pyperf"]:
        return f"pyperf options differ (journal {old.get('pyperf')}, now {new['pyperf']})"
    if bool(old.get("trace")) != new["trace"]:
        return "--trace differs"
    a, b = old.get("cases") or [], new["cases"]
    if len(a) != len(b):
        return f"the journal plans {len(a)} cases, this run {len(b)}"
    for x, y in zip(a, b):
        if (x.get("experiment"), x.get("params")) != (y["experiment"], y["params"]):
            return (f"case {y['id']} differs (journal {x.get('experiment')} {x.get('params')}, "
                    f"now {y['experiment']} {y['params']})")
        if x.get("exp_version") != y["exp_version"]:
            return (f"{y['experiment']} changed since (experiment version "
                    f"{x.get('exp_version')} in the journal, {y['exp_version']} now)")
        if x.get("skip") != y["skip"]:
            return f"case {y['id']} ({y['experiment']}) runs here now but not then, or back"
    return None


@dataclass
class Journal:
    """A journal file: its header and the rows of each finished case (by case id)."""
    path: Path
    header: dict[str, Any] = field(default_factory=dict)
    done: dict[str, list[dict]] = field(default_factory=dict)
    broken: str | None = None       # why appending failed (the run goes on without it)
    _lock_fd: int | None = None

    def lock(self) -> None:
        """Hold the journal for this run (an exclusive flock, released when the process
        ends): a second `--resume` of a run still going is refused instead of measuring its
        cases twice."""
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{self.path}: the run it journals is still going (another "
                             "vlab run holds it); stop that run first") from None
        self._lock_fd = fd

    def write_header(self, header: dict[str, Any]) -> None:
        self.header = header
        self._append({"journal": FORMAT, **header})

    def record(self, case_id: str, rows: list[dict]) -> None:
        """Append one finished case (signals are held back so the line is whole). A journal
        that cannot be written any more is reported once and the run goes on: the results
        are kept in memory and saved at the end (or to a fallback)."""
        self.done[case_id] = rows
        if self.broken is not None:
            return
        try:
            self._append({"case": case_id, "rows": rows})
        except OSError as e:
            self.broken = e.strerror or str(e)
            print(f"vlab: warning: cannot append to the journal {self.path} ({self.broken}); "
                  "the run goes on, but cannot be resumed if it is killed", file=sys.stderr)

    def _append(self, obj: dict) -> None:
        line = (json.dumps(obj, allow_nan=False) + "\n").encode()
        with interrupt.deferred():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:         # gone already, or its directory went away (results saved elsewhere)
            pass

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "Journal":
        """Read a journal; a bad one is a one-line UsageError. A torn last line (the run was
        killed while appending it) is dropped: that case was not finished."""
        p = Path(path)
        text = _inputs.read_file(p, "journal", MAX_JOURNAL_BYTES).decode("utf-8", "replace")
        lines = text.split("\n")
        recs = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError):
                if i >= len(lines) - 2:          # the last line, cut short by a kill
                    break
                raise UsageError(f"{p}: line {i + 1} is not JSON: not a vlab run journal") \
                    from None
        if not recs or not isinstance(recs[0], dict) or recs[0].get("journal") != FORMAT:
            raise UsageError(f"{p}: not a vlab run journal (no {FORMAT} header line; "
                             "the run may have been stopped before its first case)")
        j = cls(p, {k: v for k, v in recs[0].items() if k != "journal"})
        for r in recs[1:]:
            if isinstance(r, dict) and isinstance(r.get("case"), str) \
                    and isinstance(r.get("rows"), list):
                j.done[r["case"]] = r["rows"]
        return j


def resume_options(session: "RunSession", file: str, opts: Any) -> None:
    """Set up `opts` (a runner RunOptions) to continue the run journaled in `file`.

    Without selectors, --suite, -p, --processes, --values or --trace, the plan is the one the
    journal recorded; with them, they must give the same plan (checked before any case)."""
    if opts.output is not None:
        raise UsageError("--resume continues a run where it was writing; give no -o")
    saved = session.resume(file)
    given = (opts.selectors or opts.suite or opts.overrides or opts.pyperf or opts.trace
             or opts.pin is not None)
    if not given:
        opts.selectors = list(saved.get("selectors") or [])
        opts.suite = saved.get("suite")
        opts.overrides = dict(saved.get("overrides") or {})
        opts.pyperf = dict(saved.get("pyperf") or {})
        opts.trace = bool(saved.get("trace"))
        opts.pin = saved.get("pin")
    assert session.resumed is not None
    opts.run_id = session.resumed.header.get("run_id")
    opts.host = session.resumed.header.get("host")
    opts.done = session.resumed.done
    opts.argv = list(session.resumed.header.get("argv") or opts.argv)


class RunSession:
    """One `vlab run` from reserving its output to saving its results."""

    def __init__(self, output: str | None, results_dir: str, force: bool,
                 progress: TextIO | None = sys.stderr):
        self.output = output
        self.results_dir = results_dir
        self.force = force
        self.progress = progress
        self.path: Path | None = None
        self.journal: Journal | None = None
        self.resumed: Journal | None = None
        self.replace = force
        self.total = 0

    # ---- starting ----

    def check_early(self) -> None:
        """Check an explicit `-o` before anything runs (the default name needs the host)."""
        if self.output is not None:
            p = _outputs.check_file(self.output, "results file", force=True)
            if p.exists() and not self.force:
                raise UsageError(f"results file {p}: already exists (give --force to replace "
                                 "it, or another -o)")
            if journal_path(p).exists():
                raise UsageError(f"results file {p}: a journal {journal_path(p)} of another "
                                 f"run exists (resume it with `vlab run --resume "
                                 f"{journal_path(p)}`, or remove it)")

    def on_start(self, *, run_id: str, started_at: str, host: dict, cases: list,
                 pyperf: dict, suite: str | None, trace: bool, argv: list[str],
                 options: dict) -> None:
        """Runner hook, after planning and calibration, before the first case."""
        from vlab.run.runner import default_output

        self.total = len(cases)
        plan = plan_record(cases, pyperf, trace)
        if self.resumed is not None:
            why = plan_difference(self.resumed.header.get("plan") or {}, plan)
            if why:
                raise UsageError(f"cannot resume {self.resumed.path}: not the same plan: {why}")
            self.journal = self.resumed
            self._say(f"resuming run {run_id}: {len(self.journal.done)} of {len(cases)} cases "
                      f"from {self.journal.path}; results: {self.path}")
        else:
            if self.output is None:
                path = default_output({"started_at": started_at, "host": host},
                                      self.results_dir)
                self.path = _outputs.reserve(path, run_id, default=True)
            else:
                self.path = _outputs.reserve(self.output, run_id, default=False,
                                             force=self.force)
            self.journal = Journal(journal_path(self.path))
            self.journal.lock()
            self.journal.write_header({
                "run_id": run_id, "started_at": started_at, "output": str(self.path),
                "host_id": host.get("host_id"), "host": host, "suite": suite, "argv": argv,
                "options": options, "plan": plan})
            self._say(f"run {run_id}: {len(cases)} cases; results: {self.path}")
        self._say(f"  Ctrl-C (or SIGTERM) stops the run and saves the finished cases; if it "
                  f"is killed, continue it with: vlab run --resume {self.journal.path}")

    def on_case(self, case_id: str, rows: list[dict]) -> None:
        """Runner hook: one case finished (its rows, in order)."""
        if self.journal is not None:
            self.journal.record(case_id, rows)

    def resume(self, file: str) -> dict:
        """Open the journal of `file` (a journal or its results file) for `--resume`; check
        the host. Returns the run options recorded in it; the plan is checked in on_start."""
        from vlab import results
        from vlab.host.calibrate import collect_host

        p = Path(file)
        if not p.name.endswith(_outputs.JOURNAL_SUFFIX) and journal_path(p).exists():
            p = journal_path(p)
        if not p.exists():
            raise UsageError(f"{file}: no such journal (a complete run leaves none; "
                             "nothing to resume)")
        j = Journal.read(p)
        j.lock()
        here = collect_host()
        if j.header.get("host_id") != here.get("host_id"):
            raise UsageError(f"cannot resume {p}: it was recorded on host "
                             f"{j.header.get('host_id')}, this is host {here.get('host_id')} "
                             "(results of different hosts are not comparable)")
        out = Path(j.header.get("output") or str(p)[: -len(_outputs.JOURNAL_SUFFIX)])
        if out.exists():
            # the partial results of this same run (interrupted before) may be replaced
            try:
                theirs = results.read(out).get("run_id")     # plain or gzip'ed
            except UsageError:
                theirs = None
            if theirs != j.header.get("run_id"):
                raise UsageError(f"cannot resume {p}: its results file {out} now holds "
                                 "another run's results")
            self.replace = True
        _outputs.check_file(out, "results file", force=True)
        self.resumed, self.path = j, out
        return dict(j.header.get("options") or {})

    # ---- finishing ----

    def finish(self, doc: dict, code: int) -> tuple[Path, int]:
        """Save the results document (at its path, or a fallback named on stderr); keep the
        journal only if the run was interrupted (`doc["interrupted"]`). Returns where the
        results went and the exit code."""
        from vlab import results

        assert self.path is not None
        results.validate(doc)
        data = results.encode(doc, self.path.name)
        with interrupt.ignored():
            where, problem = _outputs.save(data, self.path, replace=self.replace)
            if problem:
                print(f"vlab: {problem}", file=sys.stderr)
                code = code or 1
                if where is None:
                    return self.path, code       # nothing written: the journal is kept
            if self.journal is not None:
                if not doc.get("interrupted"):
                    self.journal.remove()
                else:
                    n = len(self.journal.done)
                    self._say(f"vlab: interrupted by {doc.get('signal')}: {n} of {self.total} "
                              f"cases finished, saved in {where}; continue with: "
                              f"vlab run --resume {self.journal.path}")
        return where, code

    def abandon(self) -> None:
        """Stopped before the first case finished: drop the new run's journal (a resumed
        run's journal is kept as it was)."""
        if self.resumed is None and self.path is not None:
            if self.journal is None or not self.journal.done:
                Journal(journal_path(self.path)).remove()

    def _say(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write(text + "\n")
            self.progress.flush()
