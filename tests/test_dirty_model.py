"""vlab.analysis.dirty: traces, working-set curves and the pre-copy migration model.

Hand-computed cases pin the model's semantics; hypothesis checks that every numba path (range
table or direct OR/popcount, dense bitmaps or CSR) agrees exactly with the NumPy oracle.
"""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlab._errors import UsageError
from vlab.analysis import dirty as d

GBIT = 1e9
MS = 1_000_000  # ns


@pytest.fixture(scope="module", autouse=True)
def _warm_jit():
    """Compile (or load from cache) every kernel once, before the timed-by-hypothesis tests."""
    tr = d.DirtyTrace.from_page_sets(130, 4096, [MS, MS], [{1, 2, 129}, {2, 3}])
    for t in (tr, tr.to_sparse()):
        d.wws_curve(t, [1, 2])
        for method in ("table", "direct"):
            d.precopy_sim(t, bandwidth_bps=GBIT, max_downtime_ms=1, max_rounds=3, method=method)
    d.synthetic_trace(1000, 2, seed=1)


def _sets(trace) -> list[set[int]]:
    return [set(trace.dirty_pages(k).tolist()) for k in range(trace.n_intervals)]


# --------------------------------------------------------------------------- representation

def test_dense_sparse_roundtrip_and_counts():
    sets = [{0, 5, 64, 199}, set(), {199}, {1, 2, 3}]
    tr = d.DirtyTrace.from_page_sets(200, 4096, [MS] * 4, sets)
    assert tr.bitmaps.shape == (4, 4) and tr.bitmaps.dtype == np.uint64
    assert tr.pages_per_interval().tolist() == [4, 0, 1, 3]
    assert _sets(tr) == sets
    sp = tr.to_sparse()
    assert sp.offsets.tolist() == [0, 4, 4, 5, 8]
    assert _sets(sp) == sets and sp.pages_per_interval().tolist() == [4, 0, 1, 3]
    assert np.array_equal(sp.to_dense().bitmaps, tr.bitmaps)
    assert tr.bitmaps[0, 1] == 1 and tr.bitmaps[0, 0] == (1 | 1 << 5)


def test_trace_validation():
    with pytest.raises(UsageError, match="shape"):
        d.DirtyTrace(100, 4096, np.array([MS], np.int64), np.zeros((1, 1), np.uint64))
    with pytest.raises(UsageError, match="uint64"):
        d.DirtyTrace(64, 4096, np.array([MS], np.int64), np.zeros((1, 1), np.int64))
    with pytest.raises(UsageError, match="beyond"):
        d.DirtyTrace(10, 4096, np.array([MS], np.int64), np.full((1, 1), 1 << 12, np.uint64))
    with pytest.raises(UsageError, match="> 0"):
        d.DirtyTrace(64, 4096, np.array([0], np.int64), np.zeros((1, 1), np.uint64))
    with pytest.raises(UsageError, match="increasing"):
        d.SparseDirtyTrace(10, 4096, np.array([MS]), np.array([0, 2]), np.array([3, 1]))
    with pytest.raises(UsageError, match="out of"):
        d.SparseDirtyTrace(10, 4096, np.array([MS]), np.array([0, 1]), np.array([10]))
    # a decrease across an interval boundary is fine
    d.SparseDirtyTrace(10, 4096, np.array([MS, MS]), np.array([0, 2, 3]), np.array([3, 5, 1]))


def test_save_load_roundtrip(tmp_path):
    tr = d.DirtyTrace.from_page_sets(300, 4096, [MS, 2 * MS, 3 * MS],
                                     [{1, 299}, {2, 3, 64}, set()])
    tr.save(tmp_path / "t.npz")
    back = d.DirtyTrace.load(tmp_path / "t.npz")
    assert (back.n_pages, back.page_size) == (300, 4096)
    assert np.array_equal(back.bitmaps, tr.bitmaps)
    assert np.array_equal(back.interval_ns, tr.interval_ns)
    sp = tr.to_sparse()
    sp.save(tmp_path / "s.npz")
    loaded = d.load_trace(tmp_path / "s.npz")
    assert isinstance(loaded, d.SparseDirtyTrace) and _sets(loaded) == _sets(tr)
    assert np.array_equal(d.DirtyTrace.load(tmp_path / "s.npz").bitmaps, tr.bitmaps)
    assert not list(tmp_path.glob(".dirty-*"))   # no temp files left behind


def _one_line_usage_error(path) -> str:
    with pytest.raises(UsageError) as info:
        d.DirtyTrace.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_corrupt_files_raise_usage_error(tmp_path):
    tr = d.DirtyTrace.from_page_sets(100, 4096, [MS, MS], [{1}, {2}])
    good = tmp_path / "good.npz"
    tr.save(good)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file\n" * 10)
    _one_line_usage_error(garbage)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    _one_line_usage_error(truncated)

    _one_line_usage_error(tmp_path / "missing.npz")

    def variant(name, **changes):
        arrays = {"format": np.array(d.TRACE_FORMAT), "kind": np.array("dense"),
                  "n_pages": np.array(100), "page_size": np.array(4096),
                  "interval_ns": tr.interval_ns, "bitmaps": tr.bitmaps}
        arrays.update(changes)
        arrays = {k: v for k, v in arrays.items() if v is not None}
        path = tmp_path / name
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    assert "shape" in _one_line_usage_error(variant("shape.npz", n_pages=np.array(1000)))
    assert "dtype" in _one_line_usage_error(
        variant("dtype.npz", bitmaps=tr.bitmaps.astype(np.int64)))
    assert "missing" in _one_line_usage_error(variant("nobits.npz", bitmaps=None))
    assert "format" in _one_line_usage_error(variant("fmt.npz", format=np.array("other/1")))
    _one_line_usage_error(variant("ivdtype.npz", interval_ns=tr.interval_ns.astype(np.float64)))
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    _one_line_usage_error(tmp_path / "empty.npz")
    np.save(tmp_path / "plain.npy", tr.bitmaps)
    assert ".npy" in _one_line_usage_error(tmp_path / "plain.npy")
    compressed = tmp_path / "compressed.npz"
    with open(compressed, "wb") as f:
        np.savez_compressed(f, format=np.array(d.TRACE_FORMAT), kind=np.array("dense"),
                            n_pages=np.array(100), page_size=np.array(4096),
                            interval_ns=tr.interval_ns, bitmaps=np.zeros((2, 2), np.uint64))
    assert d.DirtyTrace.load(compressed).n_pages == 100
    raw = bytearray(compressed.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 40] = b"\xff" * 40
    compressed.write_bytes(bytes(raw))
    _one_line_usage_error(compressed)


# ----------------------------------------------------------------------------- wws curve

def test_wws_hand_made():
    tr = d.DirtyTrace.from_page_sets(10, 4096, [MS] * 3, [{1, 2}, {2, 3}, {3}])
    for t in (tr, tr.to_sparse()):
        for method in ("table", "direct"):
            curve = d.wws_curve(t, [1, 2, 3], method=method)
            assert curve["window"].tolist() == [1, 2, 3]
            assert curve["mean"] == pytest.approx([5 / 3, 2.5, 3.0])
            assert curve["max"].tolist() == [2, 3, 3]
    oracle = d.wws_curve_numpy(tr, [3, 1])
    assert oracle["mean"] == pytest.approx([3.0, 5 / 3])
    with pytest.raises(UsageError):
        d.wws_curve(tr, [4])


def test_union_table_on_a_multi_chunk_trace():
    """A trace wide enough for several 256-word chunks and both threads' groups."""
    rng = np.random.default_rng(5)
    n = 100_003
    sets = [set(rng.integers(0, n, rng.integers(0, 3000)).tolist()) | set(range(500, 700))
            for _ in range(5)]
    sets[2] |= set(range(n - 70, n))
    tr = d.DirtyTrace.from_page_sets(n, 4096, [MS] * 5, sets)
    table = d.union_table(tr).counts
    assert np.array_equal(table, d.union_table(tr.to_sparse()).counts)
    for a in range(5):
        for length in range(6):
            want = len(set().union(*(sets[(a + j) % 5] for j in range(length))))
            assert table[a, length] == want


# ------------------------------------------------------------------------ pre-copy model

def _all_impls(trace, **kw):
    """Every implementation's result; asserts they agree, returns the oracle's."""
    oracle = d.precopy_sim_numpy(trace, **kw)
    for t in (trace, trace.to_sparse()):
        for method in ("auto", "table", "direct"):
            got = d.precopy_sim(t, method=method, **kw)
            for key in ("pages_per_round", "outcome", "downtime_ms", "total_ms",
                        "trace_wrapped", "throttle_per_round", "bytes_sent"):
                assert got.get(key) == oracle.get(key), (key, method, type(t).__name__)
    assert d.precopy_sim_numpy(trace.to_sparse(), **kw)["pages_per_round"] == \
        oracle["pages_per_round"]
    return oracle


def test_same_hundred_pages_converges_to_a_hundred_page_final_round():
    hot = set(range(100))
    tr = d.DirtyTrace.from_page_sets(10_000, 4096, [10 * MS] * 50, [hot] * 50)
    r = _all_impls(tr, bandwidth_bps=GBIT, max_downtime_ms=300, max_rounds=30)
    assert r["pages_per_round"] == [10_000, 100]
    assert r["converged"] and r["outcome"] == "converged" and r["rounds"] == 2
    assert r["downtime_ms"] == pytest.approx(100 * 4096 * 8 / GBIT * 1000)
    assert r["total_ms"] == pytest.approx(10_100 * 4096 * 8 / GBIT * 1000)
    assert r["bytes_sent"] == 10_100 * 4096
    assert r["model"] is True and not r["trace_wrapped"]


def test_dirtying_faster_than_the_link_never_converges():
    n = 1000
    tr = d.DirtyTrace.from_page_sets(n, 4096, [MS] * 10, [range(n)] * 10)
    r = _all_impls(tr, bandwidth_bps=GBIT, max_downtime_ms=1, max_rounds=5)
    assert r["outcome"] == "max_rounds_stop_copy" and not r["converged"]
    assert r["pages_per_round"] == [n] * 6
    assert r["downtime_ms"] == pytest.approx(n * 4096 * 8 / GBIT * 1000)
    assert r["trace_wrapped"]
    a = _all_impls(tr, bandwidth_bps=GBIT, max_downtime_ms=1, max_rounds=5, policy="abort")
    assert a["outcome"] == "aborted" and not a["converged"] and a["downtime_ms"] is None
    assert a["pages_per_round"] == [n] * 5 and a["live_rounds"] == 5


def test_round_spans_hand_computed():
    """Four 2 s intervals dirtying page k in interval k; 1 page = 1 s on the link."""
    tr = d.DirtyTrace.from_page_sets(4, 1000, [2000 * MS] * 4, [{0}, {1}, {2}, {3}])
    kw = dict(bandwidth_bps=8000.0)
    # round 0: [0,4s) -> intervals 0,1 -> 2 pages; round 1: [4,6) -> interval 2 -> 1 page
    r = _all_impls(tr, max_downtime_ms=1000, max_rounds=10, **kw)
    assert r["pages_per_round"] == [4, 2, 1] and r["total_ms"] == 7000.0
    r = _all_impls(tr, max_downtime_ms=999, max_rounds=3, **kw)
    assert r["pages_per_round"] == [4, 2, 1, 1] and r["outcome"] == "max_rounds_stop_copy"
    assert not r["trace_wrapped"]
    r = _all_impls(tr, max_downtime_ms=999, max_rounds=5, **kw)   # round 4 reads interval 0 again
    assert r["pages_per_round"] == [4, 2, 1, 1, 1, 1] and r["trace_wrapped"]
    # partial overlap counts the whole interval: 1 page = 0.75 s, round 1 is [3, 4.5) s
    r = _all_impls(tr, max_downtime_ms=750, max_rounds=10, page_size=750, **kw)
    assert r["pages_per_round"] == [4, 2, 2, 1]
    # starting in the middle of the trace
    r = _all_impls(tr, max_downtime_ms=1000, max_rounds=10, start_interval=2, **kw)
    assert r["pages_per_round"] == [4, 2, 1] and r["trace_wrapped"]


def test_throttle_makes_a_diverging_workload_converge():
    # 40 intervals of 1 ms, each dirtying 10 new pages: 10 pages/ms; the link sends 5 pages/ms
    n, k = 400, 40
    tr = d.DirtyTrace.from_page_sets(n, 4096, [MS] * k,
                                     [range(10 * i, 10 * i + 10) for i in range(k)])
    bw = 5 * 4096 * 8 * 1000.0
    base = _all_impls(tr, bandwidth_bps=bw, max_downtime_ms=3, max_rounds=20)
    assert not base["converged"] and set(base["pages_per_round"]) == {n}
    thr = _all_impls(tr, bandwidth_bps=bw, max_downtime_ms=3, max_rounds=20,
                     throttle={"step": 0.2, "max": 0.99})
    assert thr["converged"]
    # a round never dirties less than one whole interval (10 pages = 2 ms): the upper bound
    assert thr["pages_per_round"][-1] == 10
    t = thr["throttle_per_round"]
    assert t[0] == 0.0 and t[1] == pytest.approx(0.2) and t[2] == pytest.approx(0.4)
    assert all(b >= a for a, b in zip(t, t[1:]))


def test_stop_and_copy_and_sweep():
    tr = d.DirtyTrace.from_page_sets(1000, 4096, [MS] * 4, [{1}, {2}, {3}, {4}])
    s = d.stop_and_copy(tr, GBIT)
    assert s["downtime_ms"] == s["total_ms"] == pytest.approx(1000 * 4096 * 8 / GBIT * 1000)
    assert s["outcome"] == "stop_and_copy" and s["model"] is True
    grid = d.precopy_sweep(tr, bandwidths_bps=[1e8, GBIT], max_downtimes_ms=[0.01, 100],
                           max_rounds=5)
    assert len(grid) == 4
    for res, (bw, dt) in zip(grid, [(1e8, 0.01), (1e8, 100), (GBIT, 0.01), (GBIT, 100)]):
        assert res["pages_per_round"] == d.precopy_sim_numpy(
            tr, bandwidth_bps=bw, max_downtime_ms=dt, max_rounds=5)["pages_per_round"]


def test_bad_parameters():
    tr = d.DirtyTrace.from_page_sets(10, 4096, [MS], [{1}])
    ok = dict(bandwidth_bps=GBIT, max_downtime_ms=1, max_rounds=3)
    for bad in (dict(bandwidth_bps=0), dict(max_rounds=0), dict(policy="retry"),
                dict(start_interval=1), dict(throttle={"speed": 1}),
                dict(throttle={"step": 0.1, "max": 1.5}), dict(method="magic")):
        with pytest.raises(UsageError):
            d.precopy_sim(tr, **{**ok, **bad})


def test_synthetic_trace_shape():
    tr = d.synthetic_trace(10_000, 3, hot_fraction=0.01, warm_fraction=0.1, warm_rate=0.1,
                           cold_rate=0.001, seed=3)
    per = tr.pages_per_interval()
    assert all(100 <= p <= 100 + 100 + 10 for p in per)
    assert all(set(range(100)) <= s for s in _sets(tr))
    again = d.synthetic_trace(10_000, 3, hot_fraction=0.01, warm_fraction=0.1, warm_rate=0.1,
                              cold_rate=0.001, seed=3)
    assert np.array_equal(tr.bitmaps, again.bitmaps)


# -------------------------------------------------------------------- property: numba == oracle

@st.composite
def traces(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(0, 150))
    page = st.integers(0, max(n - 1, 0))
    sets = [draw(st.sets(page, max_size=n)) if n else set() for _ in range(k)]
    scale = draw(st.sampled_from([1_000, 100_000, 10_000_000, 1_000_000_000]))
    intervals = draw(st.lists(st.integers(1, scale), min_size=k, max_size=k))
    return d.DirtyTrace.from_page_sets(n, 4096, intervals, sets)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tr=traces(),
       bw=st.sampled_from([1e5, 1e6, 1e7, 1e8, 1e9, 1e10]),
       downtime=st.sampled_from([0.0, 0.01, 0.1, 1.0, 10.0, 100.0]),
       max_rounds=st.integers(1, 8),
       policy=st.sampled_from(["stop_copy", "abort"]),
       start=st.integers(0, 5),
       throttle=st.sampled_from([None, {"step": 0.2, "max": 0.9}, True]))
def test_numba_matches_numpy_oracle(tr, bw, downtime, max_rounds, policy, start, throttle):
    _all_impls(tr, bandwidth_bps=bw, max_downtime_ms=downtime, max_rounds=max_rounds,
               policy=policy, start_interval=start % tr.n_intervals, throttle=throttle)


@settings(max_examples=100, deadline=None)
@given(tr=traces())
def test_union_table_and_wws_match_brute_force(tr):
    sets = _sets(tr)
    k = tr.n_intervals
    table = d.union_table(tr).counts
    assert np.array_equal(table, d.union_table(tr.to_sparse()).counts)
    for a in range(k):
        for length in range(k + 1):
            assert table[a, length] == len(set().union(*(sets[(a + j) % k]
                                                          for j in range(length))))
    windows = list(range(1, k + 1))
    want = d.wws_curve_numpy(tr, windows)
    for t in (tr, tr.to_sparse()):
        for method in ("table", "direct"):
            got = d.wws_curve(t, windows, method=method)
            assert got["mean"].tolist() == want["mean"].tolist()
            assert got["max"].tolist() == want["max"].tolist()
