"""Dirty-page tracking: exact under real KVM in every mode and guest page size, the workloads,
ratelimited pacing against the guest TSC, validation of what the guest records, recordings on
disk, and the working-set and pre-copy models on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_kvm
from vlab import GuestFailure, UsageError, VlabError
from vlab.analysis import dirty as model

PAGE = 4096

# Per-interval write counts for the exactness test: mostly 0-5 pages, and once per cycle of
# 120 intervals right below, at and beyond what a 4 KiB dirty ring holds (256 entries, soft
# limit 192), so that intervals end with and without KVM_EXIT_DIRTY_RING_FULL in the middle.
COUNTS = [0, 1, 2, 0, 1, 3, 0, 5, 1, 0] * 11 + [64, 191, 192, 193, 256, 300, 600, 1, 0, 2]
EXACT_INTERVALS = 2000


# ------------------------------------------------------------------ models (no KVM needed)

def _trace(n_pages: int, sets: list, interval_ms: float = 1.0) -> model.DirtyTrace:
    return model.DirtyTrace.from_page_sets(n_pages, PAGE, [int(interval_ms * 1e6)] * len(sets),
                                           sets)


def test_wws_curve_hand_computed():
    # intervals: {0,1} {1,2} {3} {} -> window 1: 2,2,1,0; window 2: 3,3,1; window 3: 4,3; 4: 4
    tr = _trace(8, [{0, 1}, {1, 2}, {3}, set()])
    for curve in (model.wws_curve(tr, [1, 2, 3, 4]), model.wws_curve_numpy(tr, [1, 2, 3, 4]),
                  model.wws_curve(tr.to_sparse(), [1, 2, 3, 4], method="direct")):
        assert curve["mean"].tolist() == pytest.approx([1.25, 7 / 3, 3.5, 4.0])
        assert curve["max"].tolist() == [2, 3, 4, 4]


@pytest.mark.parametrize("sim", [model.precopy_sim, model.precopy_sim_numpy])
def test_precopy_same_100_pages_forever_converges_to_a_100_page_final_round(sim):
    n = 10_000
    tr = _trace(n, [range(100)] * 50)
    r = sim(tr, bandwidth_bps=1e9, max_downtime_ms=10, max_rounds=30)
    assert r["pages_per_round"] == [n, 100]
    assert r["converged"] and r["outcome"] == "converged" and r["model"]
    page_ms = PAGE * 8 / 1e9 * 1e3
    assert r["downtime_ms"] == pytest.approx(100 * page_ms)
    assert r["total_ms"] == pytest.approx((n + 100) * page_ms)


@pytest.mark.parametrize("sim", [model.precopy_sim, model.precopy_sim_numpy])
def test_precopy_dirtying_faster_than_the_link_never_converges_and_says_so(sim):
    # every 1 ms interval dirties 5000 of 10000 pages (halves alternating); at 1 Gbit/s one
    # page takes 32.8 us, so every round lasts >= 3 intervals and finds all 10000 pages dirty
    n = 10_000
    tr = _trace(n, [range((k % 2) * 5000, (k % 2) * 5000 + 5000) for k in range(50)])
    r = sim(tr, bandwidth_bps=1e9, max_downtime_ms=10, max_rounds=5)
    assert r["pages_per_round"] == [n] * 6
    assert not r["converged"] and r["outcome"] == "max_rounds_stop_copy"
    assert r["downtime_ms"] == pytest.approx(n * PAGE * 8 / 1e9 * 1e3)
    a = sim(tr, bandwidth_bps=1e9, max_downtime_ms=10, max_rounds=5, policy="abort")
    assert a["pages_per_round"] == [n] * 5
    assert not a["converged"] and a["outcome"] == "aborted" and a["downtime_ms"] is None


@pytest.mark.parametrize("sim", [model.precopy_sim, model.precopy_sim_numpy])
def test_precopy_auto_converge_throttles_a_runaway_guest_into_convergence(sim):
    # 100 new pages per ms against a link that sends ~30.5 pages per ms
    n = 100_000
    tr = _trace(n, [range(k * 100, k * 100 + 100) for k in range(1000)])
    plain = sim(tr, bandwidth_bps=1e9, max_downtime_ms=5, max_rounds=30)
    assert not plain["converged"]
    thr = sim(tr, bandwidth_bps=1e9, max_downtime_ms=5, max_rounds=30, throttle=True)
    assert thr["converged"] and thr["pages_per_round"][-1] <= 152   # 5 ms of link
    t = thr["throttle_per_round"]
    assert t[0] == 0 and all(b >= a for a, b in zip(t, t[1:])) and max(t) >= 0.7


def test_stop_and_copy_sends_everything_with_the_guest_paused():
    tr = _trace(1000, [range(10)] * 3)
    r = model.stop_and_copy(tr, 10e9)
    assert r["pages_per_round"] == [1000] and r["model"]
    assert r["downtime_ms"] == r["total_ms"] == pytest.approx(1000 * PAGE * 8 / 10e9 * 1e3)


def test_precopy_kernel_matches_numpy_oracle_on_random_traces():
    rng = np.random.default_rng(7)
    for _ in range(40):
        n, k = int(rng.integers(1, 2000)), int(rng.integers(1, 30))
        sets = [rng.integers(0, n, size=int(rng.integers(0, n + 1))) for _ in range(k)]
        tr = model.DirtyTrace.from_page_sets(n, PAGE, rng.integers(1, 5_000_000, size=k), sets)
        kw = dict(bandwidth_bps=float(10 ** rng.uniform(6, 10)),
                  max_downtime_ms=float(rng.uniform(0, 50)), max_rounds=int(rng.integers(1, 12)),
                  throttle=True if rng.random() < 0.3 else None,
                  start_interval=int(rng.integers(0, k)))
        ref = model.precopy_sim_numpy(tr, **kw)
        for method in ("auto", "direct", "table"):
            got = model.precopy_sim(tr, method=method, **kw)
            assert (got["pages_per_round"], got["outcome"]) == (ref["pages_per_round"],
                                                                 ref["outcome"])


def test_coarsen_marks_a_large_page_dirty_when_any_small_page_is():
    from vlab.dirty import coarsen

    tr = _trace(1500, [{0}, {511, 512}, set(), {1499}])
    big = coarsen(tr, 2 << 20)
    assert big.n_pages == 3 and big.page_size == 2 << 20
    assert [big.dirty_pages(i).tolist() for i in range(4)] == [[0], [0, 1], [], [2]]
    with pytest.raises(UsageError):
        coarsen(tr, 6000)


@pytest.mark.parametrize("kw, match", [
    (dict(workload="nope", intervals=1), "unknown workload"),
    (dict(workload="uniform", mode="pml", intervals=1), "mode"),
    (dict(workload="uniform", interval_ms=5000, intervals=1), "interval_ms"),
    (dict(workload="uniform", interval_ms=0, intervals=1), "counts"),
    (dict(workload="uniform"), "exactly one"),
    (dict(workload="uniform", mode="ring", ring_size=5000, intervals=1), "ring_size"),
    (dict(workload="uniform", wss=12345, intervals=1), "wss"),
    (dict(workload="uniform", wss=4 << 20, guest_page="2m", intervals=1, clear_chunk_pages=100,
          mode="clear"), "clear_chunk_pages"),
    (dict(workload="ratelimited", intervals=1), "rate"),
    (dict(workload="readmostly", write_pct=150, intervals=1), "write_pct"),
    (dict(workload="counts", counts=[1 << 30], intervals=1, wss=1 << 20), "counts"),
    (dict(workload="hotcold", zipf=-1.0, intervals=1), "zipf"),
])
def test_record_rejects_bad_arguments(kw, match):
    import vlab.dirty as vd

    with pytest.raises(UsageError, match=match):
        vd.record(**kw)


# ------------------------------------------------------------------------ under real KVM

@needs_kvm
@pytest.mark.parametrize("guest_page", ["4k", "2m"])
@pytest.mark.parametrize("mode", ["bitmap", "clear", "ring"])
def test_dirty_log_is_exact_over_thousands_of_intervals(mode, guest_page):
    import vlab.dirty as vd

    # guest-driven intervals (a ucall ends each one): thousands of them in a few seconds
    r = vd.record("counts", counts=COUNTS, mode=mode, interval_ms=0, sync=True,
                  intervals=EXACT_INTERVALS, wss=4 << 20, guest_page=guest_page,
                  ring_size=4096)
    _check_exact(r, EXACT_INTERVALS, mode)


@needs_kvm
@pytest.mark.parametrize("mode", ["bitmap", "clear", "ring"])
def test_dirty_log_is_exact_with_a_concurrent_harvester(mode):
    import vlab.dirty as vd

    # the guest runs on its own vCPU thread while this thread ends intervals and harvests;
    # in ring mode full rings are harvested on the vCPU thread at the same time
    n = len(COUNTS) * 3
    r = vd.record("counts", counts=COUNTS, mode=mode, interval_ms=0, intervals=n,
                  wss=4 << 20, ring_size=4096)
    _check_exact(r, n, mode)


def _check_exact(r, n: int, mode: str) -> None:
    want = np.array([COUNTS[k % len(COUNTS)] for k in range(n)])
    # the guest wrote what it was asked to, and KVM reported exactly that
    assert r.truth.pages_per_interval().tolist() == want.tolist()
    assert r.missing_pages().sum() == 0
    assert r.extra_pages().sum() == 0
    assert r.dirty_pages().tolist() == want.tolist()
    # the recorder's own pages are dirty and reported as such, outside the buffer
    assert r.outside["recorder"][want > 0].min() >= 1
    if mode == "ring":
        assert r.ring_full_exits.sum() > 0       # intervals beyond the ring's soft limit
    else:
        assert r.ring_full_exits.sum() == 0
    if mode == "clear":
        assert r.clear_calls.min() >= 1


@needs_kvm
@pytest.mark.parametrize("workload, kw", [
    ("uniform", {}), ("hotcold", {}), ("hotcold", {"zipf": 1.1}), ("sequential", {}),
    ("readmostly", {"write_pct": 5.0}), ("ratelimited", {"rate": 20000}),
])
def test_every_workload_is_recorded_exactly(workload, kw):
    import vlab.dirty as vd

    r = vd.record(workload, mode="ring", interval_ms=20, intervals=15, wss=8 << 20, **kw)
    assert r.dirty_pages().sum() > 0
    assert r.missing_pages().sum() == 0 and r.extra_pages().sum() == 0
    if workload == "readmostly":
        assert r.reads.sum() > 5 * r.writes.sum()
    if workload == "sequential":
        # whole pages, one after the other: an interval dirties as many pages as it wrote, or
        # every page once it wrapped around the buffer (a long interval on a loaded host)
        assert np.all(r.writes % 512 == 0)
        assert np.all(r.truth.pages_per_interval() == np.minimum(r.writes // 512, r.n_pages))


@needs_kvm
def test_hot_pages_take_the_share_of_writes_they_are_given():
    import vlab.dirty as vd

    # 1% of the pages take 90% of the writes: over a short interval the hot pages are nearly
    # all dirty while only a small share of the cold ones are
    r = vd.record("hotcold", hot_fraction=0.01, hot_share=0.9, mode="bitmap", interval_ms=5,
                  intervals=20, wss=64 << 20)
    n = r.n_pages
    hot = round(n * 0.01)                       # the payload's hot set: the first pages
    bits = np.unpackbits(r.truth.bitmaps.view(np.uint8), axis=1, bitorder="little")[:, :n]
    hot_share = bits[:, :hot].mean()
    cold_share = bits[:, hot:].mean()
    # what W uniform writes into each class dirty: 1 - (1 - share/pages)^W, interval by interval.
    # The interval's length (and so W) depends on the host's load; the shares given W do not.
    w = r.writes.astype(np.float64)
    want_hot = np.mean(1 - (1 - 0.9 / hot) ** w)
    want_cold = np.mean(1 - (1 - 0.1 / (n - hot)) ** w)
    assert abs(hot_share - want_hot) < 0.05, (hot_share, want_hot)
    assert abs(cold_share - want_cold) < 0.15 * want_cold + 0.002, (cold_share, want_cold)
    assert hot_share > 5 * cold_share


@needs_kvm
def test_reads_alone_dirty_nothing_after_the_warm_up():
    import vlab.dirty as vd

    r = vd.record("readmostly", write_pct=0.0, mode="bitmap", interval_ms=10, intervals=10,
                  wss=8 << 20, guest_page="2m")
    assert r.reads.sum() > 0 and r.writes.sum() == 0
    assert r.dirty_pages().sum() == 0


@needs_kvm
@pytest.mark.parametrize("rate", [1_000, 10_000, 100_000])
def test_ratelimited_rate_is_within_2_percent_of_target(rate):
    import vlab.dirty as vd

    r = vd.record("ratelimited", rate=rate, mode="bitmap", interval_ms=100, intervals=25,
                  wss=64 << 20)
    hz = r.tsc_khz * 1e3
    # guest TSC seconds the workload ran: the pacing leaves out the harvest pauses
    span = (r.tsc_ack - r.tsc_go).sum() / hz
    lag = r.lag_cycles[-1] / hz
    pages = int(r.dirty_pages().sum())
    assert pages == int(r.truth.pages_per_interval().sum())
    if lag > 0.01 * span:
        pytest.skip(f"the guest fell {lag * 1e3:.0f} ms behind a {rate} pages/s schedule: this "
                    f"host cannot take {rate} write-protection faults per second right now "
                    f"(reached {pages / span:.0f} pages/s)")
    assert pages / span == pytest.approx(rate, rel=0.02)
    # and interval by interval, once the guest is on schedule
    per = r.pages_per_s()[r.lag_cycles == 0]
    if per.size > 5:
        assert np.median(per) == pytest.approx(rate, rel=0.02)


@needs_kvm
def test_clear_mode_clears_chunk_by_chunk():
    from vlab.dirty import DirtyTracker, WorkloadGuest

    with WorkloadGuest.build("counts", counts=[300], wss=8 << 20) as g:
        tr = DirtyTracker(g.machine, "clear", clear_chunk_pages=128)
        tr.start()
        g.start(on_ring_full=tr.on_ring_full)
        g.pause(); tr.harvest(); g.take_epoch(); g.resume()
        g.wait_idle()
        g.pause()
        h = tr.harvest()
        ep = g.take_epoch()
        chunks = sum(int(np.count_nonzero(bm.reshape(-1, 2).any(axis=1)))
                     for bm in h.bitmaps.values())
        assert h.clear_calls == chunks > 1
        assert h.pages(g.buffer.id).tolist() == ep.pages.tolist()
        g.resume()
        g.wait_idle()
        g.pause()
        h2 = tr.harvest()      # the chunks cleared above were re-protected: seen again
        assert h2.pages(g.buffer.id).tolist() == g.take_epoch().pages.tolist()
        g.stop()


@needs_kvm
def test_ring_mode_needs_a_vm_with_a_ring():
    from vlab.dirty import DirtyTracker, WorkloadGuest

    with WorkloadGuest.build("uniform", wss=1 << 20) as g:
        with pytest.raises(UsageError, match="dirty ring"):
            DirtyTracker(g.machine, "ring")


@needs_kvm
@pytest.mark.parametrize("corrupt, match", [
    (lambda g: g._list.__setitem__(0, 1 << 20), "page index"),
    (lambda g: g._list.__setitem__(1, g._list[0]), "twice"),
    (lambda g: g._epochs.__setitem__((1, 0), 7), "entry says epoch 7"),
    (lambda g: g._epochs.__setitem__((1, 2), 1 << 40), "impossible"),
])
def test_a_bad_guest_record_is_rejected(corrupt, match):
    from vlab.dirty import WorkloadGuest

    with WorkloadGuest.build("counts", counts=[10], wss=1 << 20) as g:
        g.start()
        g.pause(); g.take_epoch(); g.resume()
        g.wait_idle()
        g.pause()
        corrupt(g)              # what a broken guest could have written
        with pytest.raises(VlabError, match=match):
            g.take_epoch()
        g.stop()


@needs_kvm
def test_a_guest_that_sees_epochs_out_of_order_fails_cleanly():
    from vlab.dirty import WorkloadGuest

    with WorkloadGuest.build("uniform", wss=1 << 20) as g:
        g.start()
        g._ctrl[0] = 5          # a request that skips epochs: the guest refuses it
        with pytest.raises(GuestFailure, match="out of order"):
            g.stop()


@needs_kvm
def test_recording_round_trips_through_npz(tmp_path):
    import vlab.dirty as vd

    r = vd.record("uniform", mode="bitmap", interval_ms=10, intervals=5, wss=2 << 20)
    p = tmp_path / "rec.npz"
    r.save(p)
    back = vd.DirtyRecording.load(p)
    assert np.array_equal(back.trace.bitmaps, r.trace.bitmaps)
    assert np.array_equal(back.truth.bitmaps, r.truth.bitmaps)
    assert np.array_equal(back.harvest_ns, r.harvest_ns)
    assert back.meta["workload"] == "uniform" and back.summary() == r.summary()
    # the same file is a plain dirty trace for the models
    tr = model.load_trace(p)
    assert np.array_equal(tr.bitmaps, r.trace.bitmaps)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UsageError):
        vd.DirtyRecording.load(bad)
    model.synthetic_trace(100, 2).save(tmp_path / "plain.npz")
    with pytest.raises(UsageError, match="not a vlab recording"):
        vd.DirtyRecording.load(tmp_path / "plain.npz")


def test_benchmark_times_numba_against_the_oracle_and_checks_the_targets():
    from vlab.analysis import benchmarks as benchmarks

    rows = benchmarks.run(1 << 16, 20, 1, wws_oracle_pages=1 << 16)
    by = {r["kernel"]: r for r in rows}
    for name in ("precopy_sim_numpy (oracle)", "precopy_sim numba method=auto",
                 "precopy_sim numba 100 rounds", "precopy_sweep 4x4 grid"):
        assert by[name]["seconds"] > 0 and by[name]["oracle_seconds"] > 0, name
    assert "101 rounds" in by["precopy_sim numba 100 rounds"]["note"]
    assert by["read-once floor (round 0 rows)"]["oracle_seconds"] > 0
    lines = benchmarks.targets(rows, 1 << 16)
    assert any(line.startswith("numba vs NumPy oracle, one simulation") for line in lines)
    assert any(line.startswith("  ceiling for any implementation") for line in lines)
    assert all(("met" in line) for line in lines if not line.startswith("  "))
