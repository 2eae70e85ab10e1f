"""Exact dirty-page rates of guest workloads: ``vlab.dirty.record(...)`` and the recordings.

`record` runs one workload of the `dirty` guest payload (uniform, hotcold, sequential,
ratelimited, readmostly, counts) over a buffer of `wss` bytes, harvests KVM's dirty log every
`interval_ms` in one of the three modes (bitmap, clear, ring) while the guest runs on its own
vCPU thread, and returns a `DirtyRecording`: the dirty log of every interval as a
`vlab.analysis.dirty.DirtyTrace`, the pages the guest itself recorded as written (ground truth),
the dirty pages outside the buffer by region, and what every harvest cost.

Unlike an estimate by sampling (QEMU's ``calc-dirty-rate`` hashes 512 pages per GiB and reports
one MB/s figure per window), the figures here are exact and per interval: `missing_pages` (in
the guest's record, not in the dirty log) and `extra_pages` (in the dirty log inside the buffer,
not written by the guest) are checked for every interval.

How an interval ends: the host asks the guest for the next epoch; the guest closes the current
one and waits without writing while the host harvests (the pause is measured and excluded from
the interval's duration), then runs on. See vlab/_dirtyguest.py and the payload's comment.

A recording saves to and loads from a NumPy ``.npz`` (`DirtyRecording.save` / `load`); the file
is also a valid dirty trace for `vlab.analysis.dirty.load_trace`, so the migration models can be
rerun over it with other bandwidths without rerunning the guest.
"""
from __future__ import annotations

import json
import math
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlab.dirty.workloads import WORKLOADS, Epoch, RecordLayout, WorkloadGuest, zipf_table
from vlab.dirty.tracker import MODES, DirtyTracker, Harvest
from vlab._bits import bitmap_pages, pages_bitmap, popcount
from vlab._errors import UsageError, VlabError
from vlab._units import PAGE
from vlab._files import atomic_open

__all__ = ["record", "DirtyRecording", "DirtyTracker", "Harvest", "WorkloadGuest", "Epoch",
           "RecordLayout", "WORKLOADS", "MODES", "REGIONS", "coarsen", "zipf_table",
           "RECORDING_FORMAT", "popcount", "pages_bitmap", "bitmap_pages"]

RECORDING_FORMAT = "vlab.dirty.recording/1"
REGIONS = ("page_tables", "runtime", "recorder")     # dirty pages outside the buffer
# harvest cost columns (ns): KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, ring read, ring reset
HARVEST_COLUMNS = ("get_ns", "clear_ns", "collect_ns", "reset_ns")


@dataclass(eq=False)
class DirtyRecording:
    """One recorded run: K intervals of a workload under one tracking mode.

    * `trace`: KVM's dirty log of the buffer (a `DirtyTrace`: bitmaps (K, ceil(n/64)) and
      `interval_ns`, the time the guest ran in each interval, harvest pauses excluded).
    * `truth`: the pages the guest recorded as written, same shape.
    * `outside[region]`: per interval, dirty pages in the guest page tables, the runtime (code,
      stacks, parameter and results pages) and the ground-truth recorder's own region.
    * `tsc_go`, `tsc_ack`: guest TSC at the start and end of each interval; `tsc_idle`
      (counts workload): when the guest had written the interval's quota; `tsc_khz`.
    * `writes`, `reads`: 8-byte stores to / loads from the buffer per interval; `lag_cycles`:
      ratelimited, how far behind its schedule the guest was at the end of the interval.
    * `harvest_ns` (K, 4): get / clear / ring collect / ring reset; `clear_calls`,
      `ring_entries`, `ring_full_exits`: per interval. `ack_ns`: host wait from request to the
      guest's acknowledgement; `pause_ns`: acknowledgement to resume (the guest waited).
    * `meta`: what was run (workload and its parameters, mode, wss, guest page, host TSC ...).
    """

    trace: Any
    truth: Any
    outside: dict[str, np.ndarray]
    tsc_go: np.ndarray
    tsc_ack: np.ndarray
    tsc_idle: np.ndarray
    tsc_khz: int
    writes: np.ndarray
    reads: np.ndarray
    lag_cycles: np.ndarray
    harvest_ns: np.ndarray
    clear_calls: np.ndarray
    ring_entries: np.ndarray
    ring_full_exits: np.ndarray
    ack_ns: np.ndarray
    pause_ns: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- shape ----
    @property
    def n_intervals(self) -> int:
        return self.trace.n_intervals

    @property
    def n_pages(self) -> int:
        return self.trace.n_pages

    # ---- exactness ----
    def missing_pages(self) -> np.ndarray:
        """Per interval: pages the guest wrote that the dirty log did not report."""
        return popcount(self.truth.bitmaps & ~self.trace.bitmaps, axis=1)

    def extra_pages(self) -> np.ndarray:
        """Per interval: pages inside the buffer the dirty log reported but the guest did not
        write (outside the buffer see `outside`)."""
        return popcount(self.trace.bitmaps & ~self.truth.bitmaps, axis=1)

    # ---- rates ----
    def dirty_pages(self) -> np.ndarray:
        """Dirty pages of the buffer per interval (the dirty log)."""
        return self.trace.pages_per_interval()

    def seconds(self) -> np.ndarray:
        """How long the guest ran in each interval (s)."""
        return self.trace.interval_ns / 1e9

    def pages_per_s(self) -> np.ndarray:
        """Per interval: dirty pages / the time the guest ran."""
        return self.dirty_pages() / self.seconds()

    def mb_per_s(self) -> np.ndarray:
        """Per interval: dirty MB (10^6 bytes of 4 KiB pages) per second."""
        return self.pages_per_s() * PAGE / 1e6

    def wall_seconds(self) -> np.ndarray:
        """Per interval, from the start of the interval to the start of the next (guest TSC),
        i.e. including the pause in which the host harvested."""
        t = (self.tsc_ack - self.tsc_go).astype(np.float64)
        t[:-1] = np.diff(self.tsc_go).astype(np.float64)
        t[-1] += self.pause_ns[-1] * self.tsc_khz / 1e6
        return t / (self.tsc_khz * 1e3)

    def paused_fraction(self) -> float:
        """Share of the wall time the guest spent waiting for harvests."""
        wall = self.wall_seconds().sum()
        return float(max(0.0, 1.0 - self.seconds().sum() / wall)) if wall > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The headline figures (means over intervals) as plain numbers."""
        pps = self.pages_per_s()
        return {
            "intervals": self.n_intervals,
            "dirty_pages_per_interval": float(self.dirty_pages().mean()),
            "dirty_pages_per_s": float(pps.mean()),
            "dirty_mb_per_s": float(pps.mean() * PAGE / 1e6),
            "missing_pages": int(self.missing_pages().sum()),
            "extra_pages": int(self.extra_pages().sum()),
            **{f"extra_pages_{r}": int(self.outside[r].sum()) for r in REGIONS},
            "harvest_us": float(self.harvest_ns.sum(axis=1).mean() / 1e3),
            "paused_fraction": self.paused_fraction(),
            "ring_full_exits": int(self.ring_full_exits.sum()),
        }

    # ---- files ----
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an .npz (atomically) that `load` reads back and that is also a dense dirty
        trace for `vlab.analysis.dirty.load_trace`."""
        from vlab.analysis.dirty import TRACE_FORMAT

        arrays = {
            "format": np.array(TRACE_FORMAT), "kind": np.array("dense"),
            "recording": np.array(RECORDING_FORMAT),
            "n_pages": np.int64(self.trace.n_pages), "page_size": np.int64(self.trace.page_size),
            "interval_ns": self.trace.interval_ns, "bitmaps": self.trace.bitmaps,
            "truth_bitmaps": self.truth.bitmaps, "tsc_khz": np.int64(self.tsc_khz),
            "meta": np.array(json.dumps(self.meta, sort_keys=True, default=str)),
        }
        for name in _ARRAYS:
            arrays[name] = getattr(self, name)
        for r in REGIONS:
            arrays[f"outside_{r}"] = self.outside[r]
        with atomic_open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "DirtyRecording":
        """Read a recording written by `save`; a bad file raises `UsageError` (one line)."""
        from vlab.analysis.dirty import DirtyTrace, load_trace

        name = os.fspath(path)
        trace = load_trace(name)                 # validates the trace part
        try:
            with np.load(name, allow_pickle=False) as z:
                if "recording" not in z.files or str(z["recording"]) != RECORDING_FORMAT:
                    raise UsageError(f"{name}: a dirty trace but not a vlab recording "
                                     f"(expected {RECORDING_FORMAT})")
                need = {"truth_bitmaps", "tsc_khz", "meta", *_ARRAYS,
                        *(f"outside_{r}" for r in REGIONS)}
                missing = need - set(z.files)
                if missing:
                    raise UsageError(f"{name}: recording lacks {', '.join(sorted(missing))}")
                got = {k: z[k] for k in need}
        except UsageError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise UsageError(f"{name}: unreadable recording ({type(e).__name__}: {e})") from None
        if not isinstance(trace, DirtyTrace):
            trace = trace.to_dense()
        k = trace.n_intervals
        for key in _ARRAYS:
            want = (k, len(HARVEST_COLUMNS)) if key == "harvest_ns" else (k,)
            if got[key].shape != want or got[key].dtype.kind not in "iu":
                raise UsageError(f"{name}: {key} has shape {got[key].shape}, expected {want}")
        if got["truth_bitmaps"].shape != trace.bitmaps.shape or \
                got["truth_bitmaps"].dtype != np.uint64:
            raise UsageError(f"{name}: truth_bitmaps does not match bitmaps")
        try:
            meta = json.loads(str(got["meta"]))
        except json.JSONDecodeError as e:
            raise UsageError(f"{name}: meta is not JSON ({e})") from None
        truth = DirtyTrace(trace.n_pages, trace.page_size, trace.interval_ns.copy(),
                           got["truth_bitmaps"])
        return cls(trace=trace, truth=truth,
                   outside={r: got[f"outside_{r}"].astype(np.int64) for r in REGIONS},
                   tsc_khz=int(got["tsc_khz"]), meta=meta,
                   **{key: got[key].astype(np.int64) for key in _ARRAYS})


_ARRAYS = ("tsc_go", "tsc_ack", "tsc_idle", "writes", "reads", "lag_cycles", "harvest_ns", "clear_calls",
           "ring_entries", "ring_full_exits", "ack_ns", "pause_ns")


def coarsen(trace: Any, page_size: int) -> Any:
    """The same trace at a larger page granularity (`page_size` a multiple of the trace's): a
    large page is dirty when any of its small pages is. For pre-copy over huge pages."""
    from vlab.analysis.dirty import DirtyTrace

    if page_size == trace.page_size:
        return trace
    if page_size % trace.page_size or page_size < trace.page_size:
        raise UsageError(f"page_size {page_size} is not a multiple of the trace's "
                         f"{trace.page_size}")
    f = page_size // trace.page_size
    n = -(-trace.n_pages // f)
    bits = np.unpackbits(trace.bitmaps.view(np.uint8), axis=1, bitorder="little")
    bits = bits[:, :trace.n_pages]
    pad = n * f - trace.n_pages
    if pad:
        bits = np.pad(bits, ((0, 0), (0, pad)))
    big = bits.reshape(trace.n_intervals, n, f).any(axis=2)
    words = -(-n // 64)
    big = np.pad(big, ((0, 0), (0, words * 64 - n)))
    bm = np.packbits(big, axis=1, bitorder="little").view(np.uint64)
    return DirtyTrace(n, page_size, trace.interval_ns.copy(), np.ascontiguousarray(bm))


def _check_args(workload: str, mode: str, interval_ms: float, duration_s: float | None,
                intervals: int | None, ring_size: int, clear_chunk_pages: int) -> int:
    if workload not in WORKLOADS:
        raise UsageError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not (interval_ms == 0 or 1 <= interval_ms <= 1000):
        raise UsageError(f"interval_ms must be in [1, 1000] (or 0: guest-paced, counts "
                         f"workload), not {interval_ms}")
    if interval_ms == 0 and workload != "counts":
        raise UsageError("interval_ms=0 (the guest ends each interval) needs workload counts")
    if (duration_s is None) == (intervals is None):
        raise UsageError("give exactly one of duration_s and intervals")
    if intervals is not None:
        if isinstance(intervals, bool) or int(intervals) != intervals or intervals < 1:
            raise UsageError(f"intervals must be an integer >= 1, not {intervals!r}")
        k = int(intervals)
    else:
        if not duration_s > 0 or interval_ms == 0:
            raise UsageError("duration_s must be > 0 and needs interval_ms > 0")
        k = max(1, math.ceil(duration_s * 1000.0 / interval_ms - 1e-9))
    if mode == "ring" and (ring_size < 4096 or ring_size & (ring_size - 1)):
        raise UsageError(f"ring_size must be a power of two >= 4096 bytes, not {ring_size}")
    if clear_chunk_pages < 0 or clear_chunk_pages % 64:
        raise UsageError(f"clear_chunk_pages must be 0 or a multiple of 64, not "
                         f"{clear_chunk_pages}")
    return k


def record(workload: str, *, mode: str = "bitmap", interval_ms: float = 100.0,
           duration_s: float | None = None, intervals: int | None = None, wss: int = 64 << 20,
           guest_page: str = "4k", backing: str = "4k", ring_size: int = 65536,
           clear_chunk_pages: int = 0, seed: int = 1, warmup: bool = True,
           hot_fraction: float = 0.2, hot_share: float = 0.8, zipf: float | None = None,
           rate: float | None = None, write_pct: float = 10.0,
           counts: list[int] | np.ndarray | None = None, sync: bool = False,
           track: str = "all", kvm: Any = None,
           progress: Callable[[int, int], None] | None = None) -> DirtyRecording:
    """Run `workload` and record its dirty pages for `intervals` intervals (or `duration_s`).

    Workloads: uniform (random writes over `wss`), hotcold (`hot_fraction` of the pages take
    `hot_share` of the writes, or zipf(`zipf`) over page ranks), sequential (streaming
    full-page writes), ratelimited (`rate` distinct pages per second, paced by the guest TSC),
    readmostly (`write_pct` % writes, the rest reads), counts (interval k writes
    counts[(k-1) % len] distinct pages, then idles; with `interval_ms=0` the next interval
    starts as soon as the guest is done).

    `mode`: bitmap, clear (`clear_chunk_pages` per KVM_CLEAR_DIRTY_LOG, 0 = whole slot) or ring
    (`ring_size` bytes per vCPU; full rings are harvested and reset on the vCPU thread).
    `guest_page` (4k/2m/1g) maps the buffer; `backing` is its host memory. With `track="all"`
    every memory slot of the VM is tracked, so page-table and runtime pages are seen too;
    `track="buffer"` logs the buffer's slot alone (harvest costs of one slot; `outside` is 0).

    By default the host ends intervals (a harvester thread; the guest runs on its own vCPU
    thread). `sync=True` (counts workload, `interval_ms=0`) lets the guest end each interval
    itself with a ucall and harvests on the vCPU thread while it is out of the guest: no
    cross-thread wake-ups, which makes long exactness runs much faster on a busy host.
    """
    k_total = _check_args(workload, mode, interval_ms, duration_s, intervals, ring_size,
                          clear_chunk_pages)
    wl = dict(hot_fraction=hot_fraction, hot_share=hot_share, zipf=zipf, rate=rate,
              write_pct=write_pct, counts=counts)
    if track not in ("all", "buffer"):
        raise UsageError(f"track must be 'all' or 'buffer', not {track!r}")
    if sync and (workload != "counts" or interval_ms != 0):
        raise UsageError("sync=True (guest-driven intervals) needs workload counts and "
                         "interval_ms=0")
    g = WorkloadGuest.build(workload, wss=wss, guest_page=guest_page, backing=backing,
                            seed=seed, dirty_ring=ring_size if mode == "ring" else 0, kvm=kvm,
                            warmup=warmup, sync=sync, **wl)
    with g:
        tracker = DirtyTracker(g.machine, mode, clear_chunk_pages=clear_chunk_pages,
                               slots=None if track == "all" else [g.buffer])
        tracker.start()
        regions = g.regions()           # slot ids: read them while the VM exists
        watchdog = 60.0 + 4 * k_total * (max(interval_ms, 1.0) / 1000.0 + 0.05)
        if sync:
            rows = _record_synced(g, tracker, k_total, watchdog, regions, progress)
        else:
            g.start(timeout=watchdog, on_ring_full=tracker.on_ring_full)
            # epoch 0 is the warm-up: close it, harvest and drop it
            g.pause()
            tracker.harvest()
            g.take_epoch()
            g.resume()
            rows = _record_loop(g, tracker, k_total, interval_ms, regions, progress)
        tracker.stop()
    meta = {"workload": workload, "mode": mode, "interval_ms": interval_ms, "wss": wss,
            "guest_page": guest_page, "backing": backing, "seed": seed, "warmup": warmup,
            "ring_size": ring_size if mode == "ring" else None,
            "clear_chunk_pages": clear_chunk_pages if mode == "clear" else None,
            "payload_version": g.machine.payload.version, "sync": sync, "track": track,
            **{k: (list(map(int, v)) if k == "counts" else v) for k, v in wl.items()
               if v is not None and _relevant(workload, k)}}
    return _assemble(g, rows, regions, meta)


def _relevant(workload: str, key: str) -> bool:
    return key in {"hotcold": ("hot_fraction", "hot_share", "zipf"),
                   "ratelimited": ("rate",), "readmostly": ("write_pct",),
                   "counts": ("counts",)}.get(workload, ())


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(left if left > 0.002 else left / 2)


def _record_loop(g: WorkloadGuest, tracker: DirtyTracker, k_total: int, interval_ms: float,
                 regions: dict[str, tuple[int, int, int]],
                 progress: Callable[[int, int], None] | None) -> list[tuple]:
    rows = []
    next_t = time.monotonic()
    for k in range(k_total):
        if interval_ms:
            next_t = max(next_t + interval_ms / 1000.0, time.monotonic())
            _sleep_until(next_t)
        else:
            g.wait_idle()
        t_req = time.monotonic_ns()
        g.pause()
        t_ack = time.monotonic_ns()
        h = tracker.harvest()
        ep = g.take_epoch()
        if k + 1 < k_total:
            g.resume()
            t_go = time.monotonic_ns()
        else:
            t_go = time.monotonic_ns()
            g.stop()
        rows.append((ep, h, _outside_counts(h, regions), t_ack - t_req, t_go - t_ack))
        if progress is not None:
            progress(k + 1, k_total)
    return rows


def _record_synced(g: WorkloadGuest, tracker: DirtyTracker, k_total: int, watchdog: float,
                   regions: dict[str, tuple[int, int, int]],
                   progress: Callable[[int, int], None] | None) -> list[tuple]:
    rows: list[tuple] = []

    def on_epoch(gg: WorkloadGuest) -> bool:
        t0 = time.monotonic_ns()
        h = tracker.harvest()
        ep = gg.take_epoch()
        if ep.epoch == 0:               # the warm-up
            return True
        rows.append((ep, h, _outside_counts(h, regions), 0, time.monotonic_ns() - t0))
        if progress is not None:
            progress(len(rows), k_total)
        return len(rows) < k_total

    g.run_synced(on_epoch, timeout=watchdog, on_ring_full=tracker.on_ring_full)
    return rows


def _outside_counts(h: Harvest, regions: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    out = {}
    for name in REGIONS:
        slot, first, n = regions[name]
        bm = h.bitmaps.get(slot)
        if bm is None:
            out[name] = 0
            continue
        pages = bitmap_pages(bm)
        out[name] = int(np.count_nonzero((pages >= first) & (pages < first + n)))
    return out


def _assemble(g: WorkloadGuest, rows: list[tuple], regions: dict[str, tuple[int, int, int]],
              meta: dict) -> DirtyRecording:
    from vlab.analysis.dirty import DirtyTrace

    n = g.n_pages
    buf_id = regions["buffer"][0]
    k = len(rows)
    words = (n + 63) // 64
    log = np.zeros((k, words), dtype=np.uint64)
    truth = np.zeros((k, words), dtype=np.uint64)
    for i, (ep, h, *_rest) in enumerate(rows):
        bm = h.bitmaps[buf_id]
        if bm.size != words:
            raise VlabError(f"dirty log of the buffer has {bm.size} words, expected {words}")
        log[i] = bm
        truth[i] = pages_bitmap(ep.pages, n)
    eps: list[Epoch] = [r[0] for r in rows]
    hs: list[Harvest] = [r[1] for r in rows]
    tsc_go = np.array([e.tsc_go for e in eps], dtype=np.int64)
    tsc_ack = np.array([e.tsc_ack for e in eps], dtype=np.int64)
    khz = g.tsc_khz
    run_ns = np.maximum(1, ((tsc_ack - tsc_go) * 1e6 / khz).round().astype(np.int64))
    trace = DirtyTrace(n, PAGE, run_ns, log)
    truth_t = DirtyTrace(n, PAGE, run_ns.copy(), truth)
    meta = dict(meta, tsc_khz=khz, n_pages=n, regions={
        name: {"slot": s, "first_page": f, "pages": c} for name, (s, f, c) in regions.items()},
        guest_ring_full_exits=g.ring_full_exits)
    return DirtyRecording(
        trace=trace, truth=truth_t,
        outside={r: np.array([row[2][r] for row in rows], dtype=np.int64) for r in REGIONS},
        tsc_go=tsc_go, tsc_ack=tsc_ack, tsc_khz=khz,
        tsc_idle=np.array([e.tsc_idle for e in eps], dtype=np.int64),
        writes=np.array([e.writes for e in eps], dtype=np.int64),
        reads=np.array([e.reads for e in eps], dtype=np.int64),
        lag_cycles=np.array([e.lag for e in eps], dtype=np.int64),
        harvest_ns=np.array([[h.get_ns, h.clear_ns, h.collect_ns, h.reset_ns] for h in hs],
                            dtype=np.int64).reshape(k, len(HARVEST_COLUMNS)),
        clear_calls=np.array([h.clear_calls for h in hs], dtype=np.int64),
        ring_entries=np.array([h.ring_entries for h in hs], dtype=np.int64),
        ring_full_exits=np.array([h.ring_full_exits for h in hs], dtype=np.int64),
        ack_ns=np.array([r[3] for r in rows], dtype=np.int64),
        pause_ns=np.array([r[4] for r in rows], dtype=np.int64),
        meta=meta)
