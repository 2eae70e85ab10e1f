"""migration.* experiments: parameters, skips decided on recorded host data, the model run from a
saved recording (no KVM), and the measured experiments end to end under real KVM."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import needs_kvm
from vlab import UsageError, results
from vlab import host as _host
from vlab.run.registry import get

DATA = Path(__file__).parent / "data" / "hosts"
PVM_CAPS = {"DIRTY_LOG_RING": 1048576, "DIRTY_LOG_RING_ACQ_REL": 1048576,
            "MANUAL_DIRTY_LOG_PROTECT2": 3, "IOEVENTFD": 1}
PVM_KVM = {"api_version": 12, "tsc_khz": 2700000, "nr_vcpus": 2, "caps": PVM_CAPS}


def host(caps: dict | None = None, tree: str = "pvm") -> dict:
    kvm = None if tree == "nokvm" else dict(PVM_KVM, caps=dict(PVM_CAPS if caps is None else caps))
    return _host.fingerprint(str(DATA / tree), kvm)


@pytest.mark.parametrize("spec, name, kw", [
    ("uniform", "uniform", {}),
    ("zipf", "hotcold", {"zipf": 1.0}),
    ("zipf:1.3", "hotcold", {"zipf": 1.3}),
    ("hotcold", "hotcold", {"hot_fraction": 0.2, "hot_share": 0.8}),
    ("hotcold:0.1/0.9", "hotcold", {"hot_fraction": 0.1, "hot_share": 0.9}),
    ("ratelimited:50000", "ratelimited", {"rate": 50000.0}),
    ("readmostly:5", "readmostly", {"write_pct": 5.0}),
])
def test_workload_specs(spec, name, kw):
    from vlab.experiments.migration import workload_kwargs

    assert workload_kwargs(spec) == (name, kw)


@pytest.mark.parametrize("exp, params, match", [
    ("migration.dirty_rate", {"workload": "bogus"}, "unknown workload"),
    ("migration.dirty_rate", {"workload": "zipf:x"}, "bad workload argument"),
    ("migration.dirty_rate", {"workload": "ratelimited:0"}, "rate"),
    ("migration.dirty_rate", {"mode": "pml"}, "mode"),
    ("migration.dirty_rate", {"interval_ms": 0}, "interval_ms"),
    ("migration.dirty_rate", {"wss": 12345}, "multiple"),
    ("migration.dirty_rate", {"guest_page": "2m", "wss": 3 << 20}, "multiple"),
    ("migration.harvest", {"slot": 3 << 20}, "2 MiB"),
    ("migration.harvest", {"dirty": -1}, "dirty"),
    ("migration.harvest", {"ring_size": 5000}, "ring_size"),
    ("migration.harvest", {"clear_chunk_pages": 100}, "clear_chunk_pages"),
    ("migration.precopy_sim", {"variant": "postcopy"}, "variant"),
    ("migration.precopy_sim", {"bandwidth_gbit": 0}, "bandwidth"),
    ("migration.precopy_sim", {"page_size": "1g"}, "page_size"),
])
def test_bad_parameters_are_usage_errors(exp, params, match):
    e = get(exp)
    p = dict(e.grid()[0], **params)
    with pytest.raises(UsageError, match=match):
        e.validate(p, host())


def test_every_default_case_validates():
    for name in ("migration.dirty_rate", "migration.wws", "migration.harvest",
                 "migration.precopy_sim"):
        e = get(name)
        for quick in (False, True):
            for p in e.grid(quick=quick):
                e.validate(p, host())
                why = e.check(host(), p)
                assert why is None or "do not fit" in why, (name, p)


@pytest.mark.parametrize("caps, mode, match", [
    ({k: v for k, v in PVM_CAPS.items() if not k.startswith("DIRTY_LOG_RING")}, "ring",
     "KVM_CAP_DIRTY_LOG_RING"),
    ({k: v for k, v in PVM_CAPS.items() if k != "MANUAL_DIRTY_LOG_PROTECT2"}, "clear",
     "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"),
    (dict(PVM_CAPS, DIRTY_LOG_RING=4096, DIRTY_LOG_RING_ACQ_REL=4096), "ring", "maximum dirty ring"),
])
def test_missing_capabilities_skip_with_the_capability_named(caps, mode, match):
    e = get("migration.harvest")
    p = dict(e.grid()[0], mode=mode)
    assert match in e.check(host(caps), p)
    assert e.check(host(), p) is None
    # bitmap mode needs nothing beyond KVM
    assert e.check(host(caps), dict(p, mode="bitmap")) is None


def test_no_kvm_skips_measurements_but_not_a_model_over_a_saved_trace():
    h = host(tree="nokvm")
    dr = get("migration.dirty_rate")
    assert "KVM unusable" in dr.check(h, dr.grid()[0])
    ps = get("migration.precopy_sim")
    p = ps.grid()[0]
    assert "KVM unusable" in ps.check(h, p)
    assert ps.check(h, dict(p, trace="/some/recording.npz")) is None


def test_a_dirty_count_larger_than_the_slot_skips():
    e = get("migration.harvest")
    p = dict(e.grid()[0], slot=16 << 20, dirty=10000)
    assert "do not fit in a 16M slot" in e.check(host(), p)


def test_not_enough_memory_skips():
    e = get("migration.dirty_rate")
    h = host()
    h["mem_available_kb"] = 100 * 1024
    assert "MiB available" in e.check(h, e.grid()[0])


def _validate(rows: list[dict], h: dict) -> None:
    """The rows pass the results-file schema."""
    results.validate({"schema": "vlab.run/1", "run_id": "x", "started_at": "",
                      "finished_at": "", "vlab_version": "0", "argv": [], "suite": None,
                      "host": h, "rows": rows})


def _fake_recording(tmp_path: Path, n_pages: int = 2048, k: int = 40) -> Path:
    """A DirtyRecording file built from a synthetic trace (what `record` would save)."""
    from vlab.analysis.dirty import DirtyTrace, synthetic_trace
    from vlab.dirty import REGIONS, DirtyRecording

    tr = synthetic_trace(n_pages, k, interval_ms=50.0, hot_fraction=0.02, seed=3)
    z = np.zeros(k, dtype=np.int64)
    rec = DirtyRecording(
        trace=tr, truth=DirtyTrace(n_pages, 4096, tr.interval_ns.copy(), tr.bitmaps.copy()),
        outside={r: z.copy() for r in REGIONS}, tsc_go=np.arange(k) * 135_000_000,
        tsc_ack=np.arange(k) * 135_000_000 + 134_000_000, tsc_idle=z.copy(), tsc_khz=2_700_000,
        writes=tr.pages_per_interval(), reads=z.copy(), lag_cycles=z.copy(),
        harvest_ns=np.zeros((k, 4), np.int64), clear_calls=z.copy(), ring_entries=z.copy(),
        ring_full_exits=z.copy(), ack_ns=z.copy(), pause_ns=z.copy() + 100_000,
        meta={"workload": "synthetic"})
    path = tmp_path / "rec.npz"
    rec.save(path)
    return path


@pytest.mark.parametrize("variant", ["precopy", "stop_and_copy", "auto_converge"])
def test_precopy_model_runs_from_a_saved_recording(tmp_path, variant):
    from vlab.analysis.dirty import precopy_sim
    from vlab.dirty import DirtyRecording

    path = _fake_recording(tmp_path)
    e = get("migration.precopy_sim")
    p = dict(e.grid()[0], trace=str(path), variant=variant, bandwidth_gbit=1,
             max_downtime_ms=5)
    e.validate(p, host(tree="nokvm"))
    rows = e.run(p, host(tree="nokvm"), lambda s: None)
    _validate(rows, host(tree="nokvm"))
    by = {r["metric"]: r for r in rows}
    assert all(r["flags"]["model"] for r in rows)
    if variant == "stop_and_copy":
        assert "series" not in by["rounds"]
    else:
        assert by["rounds"]["series"]["y"] == by["rounds"]["extra"]["pages_per_round"]
    if variant == "stop_and_copy":
        assert by["rounds"]["median"] == 1 and by["pages_sent"]["median"] == 2048
    else:
        want = precopy_sim(DirtyRecording.load(path).trace, bandwidth_bps=1e9,
                           max_downtime_ms=5, max_rounds=p["max_rounds"],
                           throttle=True if variant == "auto_converge" else None)
        assert by["rounds"]["median"] == want["rounds"]
        assert by["converged"]["median"] == float(want["converged"])
        if not want["converged"]:
            assert any("did not converge" in w for w in by["rounds"].get("warnings", []))


def test_precopy_over_2m_pages_coarsens_the_trace(tmp_path):
    path = _fake_recording(tmp_path)
    e = get("migration.precopy_sim")
    p = dict(e.grid()[0], trace=str(path), variant="stop_and_copy", page_size="2m",
             bandwidth_gbit=10)
    by = {r["metric"]: r for r in e.run(p, host(tree="nokvm"), lambda s: None)}
    assert by["pages_sent"]["median"] == 4          # 8 MiB in 2 MiB pages


# ------------------------------------------------------------------------ under real KVM

def _rows(name: str, **over) -> list[dict]:
    from vlab.host.calibrate import collect_host

    e = get(name)
    p = dict(e.grid(quick=True)[0], **over)
    h = collect_host()
    e.validate(p, h)
    assert e.check(h, p) is None
    rows = e.run(p, h, lambda s: None)
    _validate(rows, h)
    return rows


@needs_kvm
def test_dirty_rate_rows_are_exact_and_carry_the_time_series():
    rows = _rows("migration.dirty_rate", duration_s=0.5, mode="ring")
    by = {r["metric"]: r for r in rows}
    assert by["missing_pages"]["max"] == 0 and by["extra_pages"]["max"] == 0
    assert by["dirty_pages_per_s"]["flags"]["exact"]
    s = by["dirty_pages_per_s"]["series"]
    assert len(s["x"]) == len(s["y"]) == by["dirty_pages_per_s"]["n"] == 10
    assert set(by["dirty_pages_per_s"]["extra"]["links"]) == {"1gbit", "10gbit", "25gbit"}
    assert by["extra_pages_runtime"]["extra"]["recorder_pages"] > 0


@needs_kvm
def test_wws_curve_grows_with_the_window_and_the_rate_falls():
    rows = _rows("migration.wws", intervals=30)
    by = {r["metric"]: r for r in rows}
    y = by["wws_pages"]["series"]["y"]
    assert y == sorted(y) and y[-1] > y[0]
    rate = by["wws_pages_per_s"]["samples"]
    assert rate[0] > rate[-1]


@needs_kvm
@pytest.mark.parametrize("mode", ["bitmap", "clear", "ring"])
def test_harvest_rows_name_the_cost_of_each_ioctl(mode):
    rows = _rows("migration.harvest", mode=mode, dirty=200, intervals=3)
    by = {r["metric"]: r for r in rows}
    assert by["harvest_us"]["extra"]["exact"]
    assert {"bitmap": "get_us", "clear": "clear_us", "ring": "reset_us"}[mode] in by
    assert by["write_slowdown"]["median"] > 1
