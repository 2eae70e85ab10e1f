"""The quick suite (`make run`): every area covered, fixed pyperf loops per entry (no
calibration worker per case), and the `loops` key of a suite entry checked and planned."""
from __future__ import annotations

import pytest


def test_quick_covers_the_four_areas_with_fixed_loops():
    from vlab.run import registry

    suite = registry.load_suite("quick")
    assert len(suite.loops) == len(suite.entries)
    areas = {sel.split(".")[0] for sel, _ in suite.entries}
    assert {"exits", "paging", "io", "migration"} <= areas
    for (sel, _), loops in zip(suite.entries, suite.loops):
        kinds = {e.kind for e in registry.select([sel])}
        if kinds == {"loop"}:
            assert loops is not None and loops >= 1, sel


def test_entry_loops_are_checked_and_reach_the_cases(tmp_path, monkeypatch):
    from vlab._errors import UsageError
    from vlab.run import registry
    from vlab.run.runner import RunOptions, plan

    monkeypatch.setattr(registry, "suite_dir", lambda: str(tmp_path))
    (tmp_path / "s.toml").write_text('quick = true\n[[experiment]]\nselect = "exits.nop"\n'
                                     'loops = 16\n[[experiment]]\nselect = "exits.cpuid"\n')
    (tmp_path / "bad.toml").write_text('[[experiment]]\nselect = "exits.nop"\nloops = 0\n')
    host = {"host_id": "x", "cpu_vendor": "amd", "kvm": {"flavor": "pvm", "caps": {}}}
    cases, pyperf, _ = plan(RunOptions(suite="s"), host)
    assert {c.loops for c in cases if c.exp.name == "exits.nop"} == {16}
    assert {c.loops for c in cases if c.exp.name == "exits.cpuid"} == {None}
    assert pyperf["pin"] is None
    # the command line's pyperf loops win over a suite entry's
    cases, _, _ = plan(RunOptions(suite="s", pyperf={"loops": 4}), host)
    assert {c.loops for c in cases} == {None}
    with pytest.raises(UsageError, match="loops of 'exits.nop' must be an integer"):
        registry.load_suite("bad")
