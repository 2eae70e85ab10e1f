"""Dirty-page traces and the live-migration models that read them (numba kernels).

A *dirty trace* records, for K consecutive intervals of a running guest, which pages were
written in each interval (what KVM's dirty log reports per harvest). Two representations hold
the same information and give identical results everywhere in this module:

* `DirtyTrace` (dense): a (K, ceil(n_pages/64)) uint64 bitmap, bit i of row k = page i dirtied
  in interval k. 1 TiB of 4 KiB pages is 32 MiB per interval.
* `SparseDirtyTrace` (CSR): `offsets` (K+1) and sorted page indices `pages`, for huge sparse
  traces where 32 MiB per interval would be mostly zeros.

What is computed from a trace:

* `wws_curve`: writable working set: unique pages dirtied within windows of w intervals.
* `precopy_sim`: a pre-copy live-migration model in the style of Clark et al. (NSDI 2005),
  with stop-and-copy or abort when it does not converge and an auto-converge (throttle)
  variant. `precopy_sim_numpy` is a plain NumPy implementation of the same model, kept as the
  test oracle; the two agree exactly.

How the numba path is fast: every question above reduces to "how many distinct pages were
dirtied in the circular interval range [a, a+len)?". Two ways to answer it:

* direct: OR the range's bitmap rows chunk by chunk in cache and popcount (or mark the pages of
  a CSR trace in a scratch bitmap). Cost: reading the rows a round spans. This is what one
  simulation uses by default.
* `UnionTable`: one pass over the trace answers it for all K*(K+1) ranges at once. For each
  dirty (page, interval) event it notes the page's previous dirty interval, and
  |union of [a, b]| = number of events in [a, b] whose previous interval is before a (each page
  counts once, at its first event in the range). Runs of consecutive dirty intervals are counted
  in bulk with popcount, so the pass costs one read of the bitmaps plus work proportional to the
  number of dirty-run starts and ends. After it, every round of every simulation is a lookup:
  WWS curves, sweeps over bandwidth and downtime, and long non-converging runs use it.

Both run on all cores only when the work is large enough (> 16 MB of bitmap): a parallel
region costs microseconds on an idle host but milliseconds on an oversubscribed one.
"""
from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from vlab._bits import bitmap_pages, popcount
from vlab._errors import UsageError
from vlab._files import atomic_open

__all__ = ["DirtyTrace", "SparseDirtyTrace", "UnionTable", "load_trace", "union_table",
           "synthetic_trace", "wws_curve", "wws_curve_numpy", "precopy_sim", "precopy_sim_numpy",
           "precopy_sweep", "stop_and_copy", "TABLE_MAX_INTERVALS", "TRACE_FORMAT"]

TRACE_FORMAT = "vlab.dirty/1"
TABLE_MAX_INTERVALS = 4096  # building the table takes ~(4 * threads + 8) * 8 * K^2 bytes: 2 GB at 4096
_U64 = np.uint64

WWS_DTYPE = np.dtype([("window", np.int64), ("mean", np.float64), ("max", np.int64)])


# ------------------------------------------------------------------------------ bit helpers

@intrinsic
def _popc(typingctx, x):
    """Population count of a uint64 (LLVM ctpop: the POPCNT instruction where available)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@intrinsic
def _ctz(typingctx, x):
    """Count of trailing zero bits of a non-zero uint64 (LLVM cttz: TZCNT/BSF)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], cgutils.true_bit)  # zero input is undefined

    return sig, codegen


def _n_words(n_pages: int) -> int:
    return (n_pages + 63) // 64


_PARALLEL_MIN_WORDS = 1 << 21  # below ~16 MB of reads a parallel region costs more than it
                               # saves, and far more (milliseconds) on an oversubscribed host


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """Run the numba kernels in this block on one thread when `work` (words, or page indices)
    is too small to repay a parallel region."""
    if work >= _PARALLEL_MIN_WORDS:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(old)


# ------------------------------------------------------------------------------- the traces

def _check_common(n_pages: Any, page_size: Any, interval_ns: Any) -> tuple[int, int, np.ndarray]:
    if isinstance(n_pages, bool) or not isinstance(n_pages, (int, np.integer)) or n_pages < 0:
        raise UsageError(f"dirty trace: n_pages must be an integer >= 0, got {n_pages!r}")
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) \
            or page_size <= 0:
        raise UsageError(f"dirty trace: page_size must be an integer > 0, got {page_size!r}")
    iv = np.asarray(interval_ns)
    if iv.ndim != 1 or iv.size == 0:
        raise UsageError(f"dirty trace: interval_ns must be a non-empty 1-D array, "
                         f"got shape {iv.shape}")
    if iv.dtype.kind not in "iu":
        raise UsageError(f"dirty trace: interval_ns must be integers (ns), got {iv.dtype}")
    if np.any(iv <= 0):
        raise UsageError("dirty trace: every interval_ns must be > 0")
    return int(n_pages), int(page_size), np.ascontiguousarray(iv, dtype=np.int64)


class _Intervals:
    """What every trace form (and the UnionTable) derives from its `interval_ns` array."""

    interval_ns: np.ndarray

    @property
    def n_intervals(self) -> int:
        """K, the number of intervals."""
        return int(self.interval_ns.size)

    @property
    def duration_ns(self) -> int:
        """Total traced time."""
        return int(self.interval_ns.sum())


@dataclass(eq=False)
class DirtyTrace(_Intervals):
    """Dense dirty trace: `bitmaps[k, i // 64] >> (i % 64) & 1` says page i was dirtied in
    interval k, which lasted `interval_ns[k]` nanoseconds.

    The arrays are validated (dtype uint64 / int64, shape (K, ceil(n_pages/64)), no bits set
    past n_pages) and treated as read-only by this module.
    """

    n_pages: int
    page_size: int
    interval_ns: np.ndarray
    bitmaps: np.ndarray

    def __post_init__(self) -> None:
        self.n_pages, self.page_size, self.interval_ns = _check_common(
            self.n_pages, self.page_size, self.interval_ns)
        bm = self.bitmaps
        if not isinstance(bm, np.ndarray) or bm.dtype != np.uint64 or bm.ndim != 2:
            raise UsageError("dirty trace: bitmaps must be a 2-D uint64 array, got "
                             f"{getattr(bm, 'dtype', type(bm).__name__)} "
                             f"{getattr(bm, 'shape', '')}")
        want = (self.interval_ns.size, _n_words(self.n_pages))
        if bm.shape != want:
            raise UsageError(f"dirty trace: bitmaps shape {bm.shape} does not match "
                             f"{want} (intervals, ceil(n_pages/64))")
        self.bitmaps = np.ascontiguousarray(bm)
        tail = self.n_pages % 64
        if tail and want[1] and np.any(self.bitmaps[:, -1] >> _U64(tail)):
            raise UsageError(f"dirty trace: bits set beyond n_pages={self.n_pages}")

    def pages_per_interval(self) -> np.ndarray:
        """Number of pages dirtied in each interval (int64, length K)."""
        with _threads_for(self.bitmaps.size):
            return _popcount_rows(self.bitmaps)

    def dirty_pages(self, k: int) -> np.ndarray:
        """Sorted indices of the pages dirtied in interval k."""
        return bitmap_pages(self.bitmaps[k], self.n_pages).astype(np.int64)

    @classmethod
    def from_page_sets(cls, n_pages: int, page_size: int, interval_ns: Sequence[int] | np.ndarray,
                       page_sets: Iterable[Iterable[int]]) -> "DirtyTrace":
        """Build a trace from one collection of dirtied page indices per interval."""
        sparse = SparseDirtyTrace.from_page_sets(n_pages, page_size, interval_ns, page_sets)
        return sparse.to_dense()

    def to_sparse(self) -> "SparseDirtyTrace":
        """The same trace as CSR (offsets + sorted page indices)."""
        counts = self.pages_per_interval()
        offsets = np.zeros(self.n_intervals + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        pages = np.empty(int(offsets[-1]), dtype=np.int64)
        with _threads_for(self.bitmaps.size):
            _bitmaps_to_csr(self.bitmaps, offsets, pages)
        return SparseDirtyTrace(self.n_pages, self.page_size, self.interval_ns.copy(), offsets,
                                pages)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an .npz (format tag `vlab.dirty/1`, kind "dense"), atomically."""
        _atomic_savez(path, kind="dense", n_pages=self.n_pages, page_size=self.page_size,
                      interval_ns=self.interval_ns, bitmaps=self.bitmaps)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "DirtyTrace":
        """Read a trace written by `save` (a sparse file is converted to dense).

        A missing, corrupt or mismatched file raises `UsageError` with a one-line message.
        """
        trace = load_trace(path)
        return trace if isinstance(trace, DirtyTrace) else trace.to_dense()


@dataclass(eq=False)
class SparseDirtyTrace(_Intervals):
    """CSR dirty trace: the pages dirtied in interval k are
    `pages[offsets[k]:offsets[k+1]]`, strictly increasing, each in [0, n_pages)."""

    n_pages: int
    page_size: int
    interval_ns: np.ndarray
    offsets: np.ndarray
    pages: np.ndarray

    def __post_init__(self) -> None:
        self.n_pages, self.page_size, self.interval_ns = _check_common(
            self.n_pages, self.page_size, self.interval_ns)
        off = np.asarray(self.offsets)
        pg = np.asarray(self.pages)
        k = self.interval_ns.size
        if off.ndim != 1 or off.size != k + 1 or off.dtype.kind not in "iu":
            raise UsageError(f"sparse dirty trace: offsets must be {k + 1} integers, got "
                             f"{off.dtype} {off.shape}")
        if pg.ndim != 1 or pg.dtype.kind not in "iu":
            raise UsageError(f"sparse dirty trace: pages must be a 1-D integer array, got "
                             f"{pg.dtype} {pg.shape}")
        off = np.ascontiguousarray(off, dtype=np.int64)
        pg = np.ascontiguousarray(pg, dtype=np.int64)
        if off[0] != 0 or off[-1] != pg.size or np.any(np.diff(off) < 0):
            raise UsageError("sparse dirty trace: offsets must start at 0, never decrease and "
                             f"end at len(pages)={pg.size}")
        if pg.size:
            if pg.min() < 0 or pg.max() >= self.n_pages:
                raise UsageError(f"sparse dirty trace: page index out of [0, {self.n_pages})")
            step = np.diff(pg)
            # a decrease is allowed only where a new interval starts
            starts = np.zeros(pg.size, dtype=bool)
            inner = off[1:-1]
            starts[inner[inner < pg.size]] = True
            if np.any((step <= 0) & ~starts[1:]):
                raise UsageError("sparse dirty trace: pages within an interval must be "
                                 "strictly increasing")
        self.offsets, self.pages = off, pg

    def pages_per_interval(self) -> np.ndarray:
        """Number of pages dirtied in each interval (int64, length K)."""
        return np.diff(self.offsets)

    def dirty_pages(self, k: int) -> np.ndarray:
        """Sorted indices of the pages dirtied in interval k."""
        return self.pages[self.offsets[k]:self.offsets[k + 1]]

    @classmethod
    def from_page_sets(cls, n_pages: int, page_size: int, interval_ns: Sequence[int] | np.ndarray,
                       page_sets: Iterable[Iterable[int]]) -> "SparseDirtyTrace":
        """Build a trace from one collection of dirtied page indices per interval (duplicates
        are merged)."""
        chunks = [np.unique(np.asarray(list(s), dtype=np.int64)) for s in page_sets]
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([c.size for c in chunks])
        pages = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        return cls(n_pages, page_size, np.asarray(interval_ns, dtype=np.int64), offsets, pages)

    def to_dense(self) -> DirtyTrace:
        """The same trace as bitmaps."""
        bm = np.zeros((self.n_intervals, _n_words(self.n_pages)), dtype=np.uint64)
        with _threads_for(bm.size):
            _csr_to_bitmaps(self.offsets, self.pages, bm)
        return DirtyTrace(self.n_pages, self.page_size, self.interval_ns.copy(), bm)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an .npz (format tag `vlab.dirty/1`, kind "sparse"), atomically."""
        _atomic_savez(path, kind="sparse", n_pages=self.n_pages, page_size=self.page_size,
                      interval_ns=self.interval_ns, offsets=self.offsets, pages=self.pages)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SparseDirtyTrace":
        """Read a trace written by `save` (a dense file is converted to CSR)."""
        trace = load_trace(path)
        return trace if isinstance(trace, SparseDirtyTrace) else trace.to_sparse()


AnyTrace = DirtyTrace | SparseDirtyTrace


def _atomic_savez(path: str | os.PathLike[str], *, kind: str, **arrays: Any) -> None:
    with atomic_open(path, "wb", perms=0o644) as f:   # a trace is an ordinary data file
        np.savez(f, format=np.array(TRACE_FORMAT), kind=np.array(kind),
                 **{k: np.asarray(v) for k, v in arrays.items()})


_DENSE_KEYS = {"format", "kind", "n_pages", "page_size", "interval_ns", "bitmaps"}
_SPARSE_KEYS = {"format", "kind", "n_pages", "page_size", "interval_ns", "offsets", "pages"}


def load_trace(path: str | os.PathLike[str]) -> AnyTrace:
    """Read a dirty trace file (dense or sparse, as saved). Any problem with the file (missing,
    not an .npz, wrong format tag, missing arrays, wrong dtypes or shapes) raises `UsageError`
    with a one-line message naming the file."""
    name = os.fspath(path)

    def bad(why: str) -> UsageError:
        return UsageError(f"{name}: not a valid dirty trace ({' '.join(str(why).split())})")

    try:
        z = np.load(name, allow_pickle=False)
        if not hasattr(z, "files"):
            raise bad("a single .npy array, not an .npz archive")
        with z:
            keys = set(z.files)
            if "format" not in keys or str(z["format"]) != TRACE_FORMAT:
                raise bad(f"missing or unknown format tag, expected {TRACE_FORMAT}")
            kind = str(z["kind"]) if "kind" in keys else ""
            want = {"dense": _DENSE_KEYS, "sparse": _SPARSE_KEYS}.get(kind)
            if want is None:
                raise bad(f"unknown kind {kind!r}")
            missing = want - keys
            if missing:
                raise bad(f"missing arrays: {', '.join(sorted(missing))}")
            arrays = {k: z[k] for k in want - {"format", "kind"}}
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{name}: no such dirty trace file") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise bad(f"{type(exc).__name__}: {exc}") from None
    for key in ("n_pages", "page_size"):
        v = arrays[key]
        if v.shape != () or v.dtype.kind not in "iu":
            raise bad(f"{key} must be an integer scalar")
        arrays[key] = int(v)
    if arrays["interval_ns"].dtype != np.int64:
        raise bad(f"interval_ns has dtype {arrays['interval_ns'].dtype}, expected int64")
    try:
        if kind == "dense":
            if arrays["bitmaps"].dtype != np.uint64:
                raise bad(f"bitmaps has dtype {arrays['bitmaps'].dtype}, expected uint64")
            return DirtyTrace(arrays["n_pages"], arrays["page_size"], arrays["interval_ns"],
                              arrays["bitmaps"])
        for key in ("offsets", "pages"):
            if arrays[key].dtype != np.int64:
                raise bad(f"{key} has dtype {arrays[key].dtype}, expected int64")
        return SparseDirtyTrace(arrays["n_pages"], arrays["page_size"], arrays["interval_ns"],
                                arrays["offsets"], arrays["pages"])
    except UsageError as exc:
        if str(exc).startswith(name):
            raise
        raise bad(str(exc)) from None


# ------------------------------------------------------------------------- conversion kernels

@njit(parallel=True, cache=True)
def _popcount_rows(bitmaps):
    k_n, w_n = bitmaps.shape
    out = np.zeros(k_n, dtype=np.int64)
    for k in prange(k_n):
        s = 0
        for w in range(w_n):
            s += _popc(bitmaps[k, w])
        out[k] = s
    return out


@njit(parallel=True, cache=True)
def _bitmaps_to_csr(bitmaps, offsets, pages):
    k_n, w_n = bitmaps.shape
    for k in prange(k_n):
        j = offsets[k]
        for w in range(w_n):
            x = bitmaps[k, w]
            while x != 0:
                pages[j] = w * 64 + _ctz(x)
                j += 1
                x &= x - _U64(1)


@njit(parallel=True, cache=True)
def _csr_to_bitmaps(offsets, pages, bitmaps):
    k_n = offsets.size - 1
    for k in prange(k_n):
        for i in range(offsets[k], offsets[k + 1]):
            p = pages[i]
            bitmaps[k, p >> 6] |= _U64(1) << _U64(p & 63)


# ----------------------------------------------------------------- synthetic trace generator

@njit(parallel=True, cache=True)
def _fill_synthetic(bitmaps, n_pages, hot_n, warm_lo, warm_n, warm_per_interval,
                    cold_per_interval, seed):
    k_n = bitmaps.shape[0]
    for k in prange(k_n):
        row = bitmaps[k]
        # hot pages [0, hot_n): dirtied in every interval
        full = hot_n // 64
        for w in range(full):
            row[w] = ~_U64(0)
        if hot_n % 64:
            row[full] |= (_U64(1) << _U64(hot_n % 64)) - _U64(1)
        # splitmix64-seeded xorshift64* stream per interval
        z = _U64(seed) + _U64(k + 1) * _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        state = z ^ (z >> _U64(31))
        if state == _U64(0):
            state = _U64(1)
        for j in range(warm_per_interval + cold_per_interval):
            state ^= state >> _U64(12)
            state ^= state << _U64(25)
            state ^= state >> _U64(27)
            r = (state * _U64(0x2545F4914F6CDD1D)) >> _U64(11)
            if j < warm_per_interval:
                p = warm_lo + np.int64(r % _U64(warm_n))
            else:
                p = np.int64(r % _U64(n_pages))
            row[p >> 6] |= _U64(1) << _U64(p & 63)


def synthetic_trace(n_pages: int, n_intervals: int, *, interval_ms: float = 100.0,
                    page_size: int = 4096, hot_fraction: float = 0.005,
                    warm_fraction: float = 0.1, warm_rate: float = 0.05,
                    cold_rate: float = 0.0005, seed: int = 0) -> DirtyTrace:
    """A synthetic dense trace (for benchmarks, tests and what-if models; not a measurement).

    Pages [0, hot) are dirtied in every interval; each interval also dirties warm_rate * warm
    random pages (with replacement) of the next warm_fraction of memory, and cold_rate *
    n_pages random pages anywhere. Deterministic for a given seed.
    """
    if n_pages <= 0 or n_intervals <= 0:
        raise UsageError("synthetic_trace needs n_pages > 0 and n_intervals > 0")
    for name, v in (("hot_fraction", hot_fraction), ("warm_fraction", warm_fraction),
                    ("warm_rate", warm_rate), ("cold_rate", cold_rate)):
        if not 0.0 <= v <= 1.0:
            raise UsageError(f"synthetic_trace: {name} must be in [0, 1], got {v}")
    hot_n = int(n_pages * hot_fraction)
    warm_n = min(int(n_pages * warm_fraction), n_pages - hot_n)
    bm = np.zeros((n_intervals, _n_words(n_pages)), dtype=np.uint64)
    with _threads_for(bm.size):
        _fill_synthetic(bm, np.int64(n_pages), np.int64(hot_n), np.int64(hot_n),
                        np.int64(max(warm_n, 1)), np.int64(int(warm_n * warm_rate)),
                        np.int64(int(n_pages * cold_rate)), np.uint64(seed & (2**64 - 1)))
    iv = np.full(n_intervals, int(round(interval_ms * 1e6)), dtype=np.int64)
    return DirtyTrace(int(n_pages), int(page_size), iv, bm)


# ---------------------------------------------------------------- range-union table kernels

@njit(parallel=True, cache=True)
def _events_dense(bitmaps, n_groups, chunk_words):
    """Per-group event matrices of a dense trace.

    m1[g, prev + 1, k]: pages dirtied in interval k whose previous dirty interval (within
    this period) is prev, -1 for none. mx[g, l, f]: pages whose first dirty interval is f and
    last is l -- their first event in the *next* period of the looped trace has prev = l.
    """
    k_n, w_n = bitmaps.shape
    m1 = np.zeros((n_groups, k_n + 1, k_n), dtype=np.int64)
    mx = np.zeros((n_groups, k_n, k_n), dtype=np.int64)
    n_chunks = (w_n + chunk_words - 1) // chunk_words
    for g in prange(n_groups):
        last = np.empty(chunk_words * 64, dtype=np.int32)   # last dirty before a falling edge
        first = np.empty(chunk_words * 64, dtype=np.int32)
        prev = np.empty(chunk_words, dtype=np.uint64)
        ever = np.empty(chunk_words, dtype=np.uint64)
        g1 = m1[g]
        gx = mx[g]
        # chunks are dealt round-robin: dirty pages cluster, so contiguous halves would leave
        # one thread with most of the work
        for c in range(g, n_chunks, n_groups):
            w0 = c * chunk_words
            nw = min(chunk_words, w_n - w0)
            for i in range(nw):
                prev[i] = 0
                ever[i] = 0
            for k in range(k_n):
                for i in range(nw):
                    d = bitmaps[k, w0 + i]
                    dp = prev[i]
                    if d == dp:
                        if d != 0:
                            g1[k, k] += _popc(d)        # all continue: prev = k-1
                        continue
                    cont = d & dp
                    if cont != 0:
                        g1[k, k] += _popc(cont)
                    rise = d & ~dp
                    ev = ever[i]
                    while rise != 0:
                        b = _ctz(rise)
                        lane = i * 64 + b
                        if (ev >> _U64(b)) & _U64(1):
                            g1[last[lane] + 1, k] += 1
                        else:
                            g1[0, k] += 1
                            first[lane] = k
                        rise &= rise - _U64(1)
                    ever[i] = ev | d
                    fall = dp & ~d
                    while fall != 0:
                        b = _ctz(fall)
                        last[i * 64 + b] = k - 1
                        fall &= fall - _U64(1)
                    prev[i] = d
            for i in range(nw):
                x = ever[i]
                end = prev[i]                               # row K-1
                while x != 0:
                    b = _ctz(x)
                    lane = i * 64 + b
                    lp = k_n - 1 if (end >> _U64(b)) & _U64(1) else last[lane]
                    gx[lp, first[lane]] += 1
                    x &= x - _U64(1)
    return m1, mx


@njit(cache=True)
def _lower_bound(a, lo, hi, x):
    """First index in a[lo:hi] (sorted) with a[i] >= x."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(parallel=True, cache=True)
def _events_sparse(n_pages, offsets, pages, n_groups):
    """The event matrices of `_events_dense` from a CSR trace (groups split the page range)."""
    k_n = offsets.size - 1
    m1 = np.zeros((n_groups, k_n + 1, k_n), dtype=np.int64)
    mx = np.zeros((n_groups, k_n, k_n), dtype=np.int64)
    last = np.empty(n_pages, dtype=np.int16)
    for g in prange(n_groups):
        lo = g * n_pages // n_groups
        hi = (g + 1) * n_pages // n_groups
        for p in range(lo, hi):
            last[p] = -1
        for k in range(k_n):
            i0 = _lower_bound(pages, offsets[k], offsets[k + 1], lo)
            i1 = _lower_bound(pages, i0, offsets[k + 1], hi)
            for i in range(i0, i1):
                p = pages[i]
                m1[g, last[p] + 1, k] += 1
                last[p] = k
        for k in range(k_n):
            i0 = _lower_bound(pages, offsets[k], offsets[k + 1], lo)
            i1 = _lower_bound(pages, i0, offsets[k + 1], hi)
            for i in range(i0, i1):
                p = pages[i]
                lp = last[p]
                if lp < k_n:
                    mx[g, lp, k] += 1
                    last[p] = k_n + k
    return m1, mx


class UnionTable(_Intervals):
    """|pages dirtied in intervals a, a+1, ..., a+len-1 (mod K)| for every a and len.

    `counts[a, len]` (shape (K, K+1), int64), built in one pass over a trace; `counts[a, K]` is
    the number of pages dirtied anywhere in the trace. It also keeps the trace's n_pages,
    page_size and interval_ns so that `precopy_sim` and `wws_curve` can run from it alone --
    build it once and reuse it for sweeps.
    """

    def __init__(self, n_pages: int, page_size: int, interval_ns: np.ndarray,
                 counts: np.ndarray) -> None:
        self.n_pages = int(n_pages)
        self.page_size = int(page_size)
        self.interval_ns = np.ascontiguousarray(interval_ns, dtype=np.int64)
        self.counts = np.ascontiguousarray(counts, dtype=np.int64)

    def union(self, a: int, length: int) -> int:
        """Distinct pages dirtied in `length` intervals starting at interval `a` (circular)."""
        k = self.n_intervals
        return int(self.counts[a % k, min(max(length, 0), k)])


def _table_from_events(m1: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """counts[a, len] from the event matrices (see the module docstring for the identity)."""
    k = mx.shape[0]
    # c1[a, j] = events at interval j whose previous dirty interval is < a (prev + 1 <= a)
    c1 = np.cumsum(m1, axis=0)[:k]
    # cx[a, j] = next-period first events at interval j whose previous (last) interval is < a
    cx = np.zeros((k, k), dtype=np.int64)
    if k > 1:
        np.cumsum(mx[:k - 1], axis=0, out=cx[1:])
    s1 = np.zeros((k, k + 1), dtype=np.int64)
    np.cumsum(c1, axis=1, out=s1[:, 1:])
    s2 = np.zeros((k, k + 1), dtype=np.int64)
    np.cumsum(cx, axis=1, out=s2[:, 1:])
    a = np.arange(k)[:, None]
    ln = np.arange(k + 1)[None, :]
    end1 = np.minimum(a + ln, k)
    rows = np.broadcast_to(a, end1.shape)
    counts = s1[rows, end1] - s1[a, a]
    end2 = np.maximum(a + ln - k, 0)
    counts += s2[rows, end2]
    return counts


def union_table(trace: AnyTrace) -> UnionTable:
    """Build the `UnionTable` of a trace (numba; one pass over the trace)."""
    k = trace.n_intervals
    if k > TABLE_MAX_INTERVALS:
        raise UsageError(f"union table: {k} intervals is more than {TABLE_MAX_INTERVALS}; "
                         "use method='direct'")
    if isinstance(trace, DirtyTrace):
        with _threads_for(trace.bitmaps.size):
            groups = max(1, numba.get_num_threads())
            n_chunks = -(-trace.bitmaps.shape[1] // 256)
            m1, mx = _events_dense(trace.bitmaps, min(groups, max(n_chunks, 1)), 256)
    elif isinstance(trace, SparseDirtyTrace):
        with _threads_for(trace.pages.size * 2):
            groups = max(1, numba.get_num_threads())
            g = min(groups, max(trace.n_pages, 1))
            m1, mx = _events_sparse(np.int64(trace.n_pages), trace.offsets, trace.pages, g)
    else:
        raise UsageError(f"expected a DirtyTrace or SparseDirtyTrace, got {type(trace).__name__}")
    return UnionTable(trace.n_pages, trace.page_size, trace.interval_ns,
                      _table_from_events(m1.sum(axis=0), mx.sum(axis=0)))


# ------------------------------------------------------------------- direct union kernels

_UNION_CHUNK = 512


@njit(cache=True)
def _or_popcount_chunk(bitmaps, a, length, w0, nw, acc):
    """popcount(OR of rows a .. a+length-1 (mod K)) over words [w0, w0+nw).

    Four rows per pass over `acc`: one load and store of the accumulator per four row words
    instead of per word. With one row per pass the kernel ran at ~58% of the speed of simply
    reading the rows (a 1 TiB trace: 0.19 s for 89 rows vs 0.11 s); four per pass, ~90%."""
    k_n = bitmaps.shape[0]
    for i in range(nw):
        acc[i] = 0
    j = 0
    while j + 4 <= length:
        r0 = bitmaps[(a + j) % k_n]
        r1 = bitmaps[(a + j + 1) % k_n]
        r2 = bitmaps[(a + j + 2) % k_n]
        r3 = bitmaps[(a + j + 3) % k_n]
        for i in range(nw):
            acc[i] |= r0[w0 + i] | r1[w0 + i] | r2[w0 + i] | r3[w0 + i]
        j += 4
    while j < length:
        r0 = bitmaps[(a + j) % k_n]
        for i in range(nw):
            acc[i] |= r0[w0 + i]
        j += 1
    s = 0
    for i in range(nw):
        s += _popc(acc[i])
    return s


@njit(parallel=True, cache=True)
def _union_dense_parallel(bitmaps, a, length):
    w_n = bitmaps.shape[1]
    n_chunks = (w_n + _UNION_CHUNK - 1) // _UNION_CHUNK
    total = 0
    for c in prange(n_chunks):
        acc = np.empty(_UNION_CHUNK, dtype=np.uint64)
        w0 = c * _UNION_CHUNK
        total += _or_popcount_chunk(bitmaps, a, length, w0, min(_UNION_CHUNK, w_n - w0), acc)
    return total


@njit(cache=True)
def _union_dense(bitmaps, a, length):
    """Distinct pages dirtied in intervals a .. a+length-1 (mod K): OR rows, popcount."""
    w_n = bitmaps.shape[1]
    if length * w_n >= _PARALLEL_MIN_WORDS:
        return _union_dense_parallel(bitmaps, a, length)
    acc = np.empty(_UNION_CHUNK, dtype=np.uint64)
    total = 0
    for w0 in range(0, w_n, _UNION_CHUNK):
        total += _or_popcount_chunk(bitmaps, a, length, w0, min(_UNION_CHUNK, w_n - w0), acc)
    return total


@njit(cache=True)
def _union_sparse(offsets, pages, a, length, buf):
    """The same from CSR, marking pages in `buf` (a zeroed bitmap, left zeroed on return)."""
    k_n = offsets.size - 1
    count = 0
    for j in range(length):
        k = (a + j) % k_n
        for i in range(offsets[k], offsets[k + 1]):
            p = pages[i]
            bit = _U64(1) << _U64(p & 63)
            if buf[p >> 6] & bit == 0:
                buf[p >> 6] |= bit
                count += 1
    for j in range(length):
        k = (a + j) % k_n
        for i in range(offsets[k], offsets[k + 1]):
            buf[pages[i] >> 6] = 0
    return count


# ---------------------------------------------------------------------------- wws curve

def _check_windows(windows: Iterable[int] | np.ndarray, k: int) -> np.ndarray:
    w = np.asarray(list(windows) if not isinstance(windows, np.ndarray) else windows)
    if w.ndim != 1 or w.dtype.kind not in "iu":
        raise UsageError("wws_curve: windows must be a 1-D list of integers (intervals)")
    w = w.astype(np.int64)
    if w.size and (w.min() < 1 or w.max() > k):
        raise UsageError(f"wws_curve: window lengths must be in [1, {k}] (the trace has {k} "
                         "intervals)")
    return w


@njit(cache=True)
def _wws_from_table(counts, windows):
    k_n = counts.shape[0]
    mean = np.zeros(windows.size, dtype=np.float64)
    mx = np.zeros(windows.size, dtype=np.int64)
    for j in range(windows.size):
        w = windows[j]
        s = 0
        m = 0
        for a in range(k_n - w + 1):
            v = counts[a, w]
            s += v
            if v > m:
                m = v
        mean[j] = s / (k_n - w + 1)
        mx[j] = m
    return mean, mx


def wws_curve(trace: AnyTrace | UnionTable, windows: Iterable[int] | np.ndarray, *,
              method: str = "auto") -> np.ndarray:
    """Writable working set vs window length (numba).

    For each window length w (in intervals), the mean and the max over the K-w+1 sliding
    (non-wrapping) windows of w consecutive intervals of the number of distinct pages dirtied
    in the window. Returns a structured array with fields `window`, `mean` (float) and `max`
    (int), one element per window length, in the order given. Multiply by page_size for bytes
    and divide by the window's duration for a rate.
    """
    k = trace.n_intervals
    w = _check_windows(windows, k)
    out = np.zeros(w.size, dtype=WWS_DTYPE)
    out["window"] = w
    if isinstance(trace, UnionTable) or _use_table(method, k):
        table = trace if isinstance(trace, UnionTable) else union_table(trace)
        mean, mx = _wws_from_table(table.counts, w)
    else:
        mean = np.zeros(w.size)
        mx = np.zeros(w.size, dtype=np.int64)
        for j, wl in enumerate(w):
            vals = np.array([_direct_union(trace, a, int(wl)) for a in range(k - wl + 1)])
            mean[j], mx[j] = vals.mean(), vals.max()
    out["mean"] = mean
    out["max"] = mx
    return out


def wws_curve_numpy(trace: AnyTrace, windows: Iterable[int] | np.ndarray) -> np.ndarray:
    """`wws_curve` by brute force in NumPy (OR every window, popcount): the test oracle."""
    k = trace.n_intervals
    w = _check_windows(windows, k)
    out = np.zeros(w.size, dtype=WWS_DTYPE)
    out["window"] = w
    for j, wl in enumerate(w):
        vals = [_numpy_union(trace, range(a, a + int(wl))) for a in range(k - int(wl) + 1)]
        out["mean"][j] = float(np.mean(vals))
        out["max"][j] = int(np.max(vals))
    return out


def _use_table(method: str, k: int) -> bool:
    if method == "auto":
        return k <= TABLE_MAX_INTERVALS
    if method == "table":
        return True
    if method == "direct":
        return False
    raise UsageError(f"method must be 'auto', 'table' or 'direct', got {method!r}")


def _direct_union(trace: AnyTrace, a: int, length: int) -> int:
    if isinstance(trace, DirtyTrace):
        return int(_union_dense(trace.bitmaps, np.int64(a), np.int64(length)))
    buf = np.zeros(_n_words(trace.n_pages), dtype=np.uint64)
    return int(_union_sparse(trace.offsets, trace.pages, np.int64(a), np.int64(length), buf))


def _numpy_union(trace: AnyTrace, intervals: Iterable[int]) -> int:
    """Distinct pages dirtied in the given intervals, plain NumPy."""
    ks = sorted({int(k) % trace.n_intervals for k in intervals})
    if not ks:
        return 0
    if isinstance(trace, DirtyTrace):
        acc = trace.bitmaps[ks[0]].copy()
        for k in ks[1:]:
            np.bitwise_or(acc, trace.bitmaps[k], out=acc)
        return popcount(acc)
    parts = [trace.pages[trace.offsets[k]:trace.offsets[k + 1]] for k in ks]
    return int(np.unique(np.concatenate(parts)).size)


# ------------------------------------------------------------------------ pre-copy model

_OUTCOMES = ("converged", "max_rounds_stop_copy", "aborted")
_METHOD_CODES = {"table": 0, "dense": 1, "sparse": 2}

PRECOPY_ASSUMPTIONS = (
    "Clark et al. pre-copy: round 0 sends every page, each later round the pages dirtied "
    "during the previous round; the link runs at bandwidth_bps with no protocol overhead, "
    "zero-page or compression savings. The trace is known per interval only, so a round that "
    "overlaps an interval even partly counts all of that interval's dirty pages (an upper "
    "bound); the trace is looped if the migration outlasts it. Throttle t dilates time: a round "
    "of duration d lets the guest run, and dirty pages, for d*(1-t) of trace time.")


@njit(cache=True)
def _interval_of(starts, x):
    """Index of the interval containing trace time x (starts[0] = 0, x < total)."""
    lo = 0
    hi = starts.size
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if starts[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo


@njit(cache=True)
def _precopy_loop(method, counts, bitmaps, offsets, pages, buf, starts, total_ns, n_pages,
                  page_size, bandwidth_bps, max_downtime_ms, max_rounds, abort, start_pos,
                  thr_initial, thr_step, thr_max, budget):
    """The pre-copy round loop. method 0: table lookup, 1: dense OR/popcount, 2: CSR.

    With budget >= 0 (direct methods), gives up with outcome -1 as soon as the intervals
    read would exceed `budget`; the caller then builds the table and runs again.
    """
    visits = 0
    consumed = 0          # trace time used so far, until the trace has been looped
    k_n = starts.size
    sent = np.zeros(max_rounds + 1, dtype=np.int64)
    thr_used = np.zeros(max_rounds + 1, dtype=np.float64)
    pos = start_pos
    thr = 0.0
    wrapped = False
    to_send = n_pages
    r = 0
    outcome = 0
    throttling = thr_initial > 0.0 or thr_step > 0.0
    while True:
        sent[r] = to_send
        thr_used[r] = thr
        dur_s = float(to_send) * 8.0 * float(page_size) / bandwidth_bps
        span = math.ceil(dur_s * 1e9 * (1.0 - thr))
        dirty = 0
        if span > 0:
            a = _interval_of(starts, pos)
            if not wrapped:
                consumed += span
                wrapped = start_pos + consumed > total_ns
            if span >= total_ns:
                length = k_n
            else:
                end = pos + span - 1
                if end >= total_ns:
                    b = _interval_of(starts, end - total_ns) + k_n
                else:
                    b = _interval_of(starts, end)
                length = min(b - a + 1, k_n)
            if budget >= 0:
                visits += length
                if visits > budget:
                    return sent[:0], thr_used[:0], -1, wrapped
            if method == 0:
                dirty = counts[a, length]
            elif method == 1:
                dirty = _union_dense(bitmaps, a, length)
            else:
                dirty = _union_sparse(offsets, pages, a, length, buf)
            pos = (pos + span) % total_ns
        r += 1
        down_ms = float(dirty) * 8.0 * float(page_size) / bandwidth_bps * 1000.0
        if down_ms <= max_downtime_ms:
            sent[r] = dirty
            thr_used[r] = thr
            r += 1
            outcome = 0
            break
        if r >= max_rounds:
            if abort:
                outcome = 2
            else:
                sent[r] = dirty
                thr_used[r] = thr
                r += 1
                outcome = 1
            break
        to_send = dirty
        if throttling:
            thr = thr_initial if thr == 0.0 else min(thr + thr_step, thr_max)
    return sent[:r], thr_used[:r], outcome, wrapped


def _parse_throttle(throttle: Any) -> tuple[float, float, float] | None:
    if throttle is None or throttle is False:
        return None
    if throttle is True:
        throttle = {}
    if not isinstance(throttle, dict):
        raise UsageError("throttle must be None, True or a dict with step/max/initial")
    unknown = set(throttle) - {"step", "max", "initial"}
    if unknown:
        raise UsageError(f"throttle: unknown keys {sorted(unknown)} (use step, max, initial)")
    step = float(throttle.get("step", 0.1 if not throttle else 0.2))
    tmax = float(throttle.get("max", 0.99))
    initial = float(throttle.get("initial", 0.2 if "step" not in throttle else step))
    if not (0.0 <= step <= 1.0 and 0.0 < initial <= tmax < 1.0):
        raise UsageError(f"throttle: need 0 <= step <= 1 and 0 < initial <= max < 1, got "
                         f"step={step} initial={initial} max={tmax}")
    return initial, step, tmax


def _precopy_params(trace: Any, bandwidth_bps: float, max_downtime_ms: float, max_rounds: int,
                    page_size: int | None, policy: str, start_interval: int) -> tuple[int, bool]:
    if not isinstance(trace, (DirtyTrace, SparseDirtyTrace, UnionTable)):
        raise UsageError(f"expected a dirty trace or UnionTable, got {type(trace).__name__}")
    if not (bandwidth_bps > 0 and math.isfinite(bandwidth_bps)):
        raise UsageError(f"bandwidth_bps must be a positive number, got {bandwidth_bps}")
    if not max_downtime_ms >= 0:
        raise UsageError(f"max_downtime_ms must be >= 0, got {max_downtime_ms}")
    if isinstance(max_rounds, bool) or int(max_rounds) != max_rounds or max_rounds < 1:
        raise UsageError(f"max_rounds must be an integer >= 1, got {max_rounds}")
    if policy not in ("stop_copy", "abort"):
        raise UsageError(f"policy must be 'stop_copy' or 'abort', got {policy!r}")
    if not 0 <= start_interval < trace.n_intervals:
        raise UsageError(f"start_interval must be in [0, {trace.n_intervals}), got "
                         f"{start_interval}")
    ps = trace.page_size if page_size is None else int(page_size)
    if ps <= 0:
        raise UsageError(f"page_size must be > 0, got {page_size}")
    longest_ns = trace.n_pages * 8.0 * ps / bandwidth_bps * 1e9
    if longest_ns > 2.0 ** 62:
        raise UsageError("precopy_sim: bandwidth too low, a round would last over 100 years")
    return ps, policy == "abort"


def _precopy_result(pages: Sequence[int], throttles: Sequence[float] | None, outcome: str,
                    wrapped: bool, *, n_pages: int, page_size: int, bandwidth_bps: float,
                    max_downtime_ms: float, max_rounds: int, policy: str,
                    implementation: str) -> dict[str, Any]:
    round_ms = [p * 8.0 * page_size / bandwidth_bps * 1000.0 for p in pages]
    switched = outcome != "aborted"
    res: dict[str, Any] = {
        "rounds": len(pages),
        "live_rounds": len(pages) - 1 if switched else len(pages),
        "pages_per_round": [int(p) for p in pages],
        "round_ms": round_ms,
        "total_ms": float(sum(round_ms)),
        "downtime_ms": round_ms[-1] if switched else None,
        "converged": outcome == "converged",
        "outcome": outcome,
        "bytes_sent": int(sum(pages)) * page_size,
        "trace_wrapped": bool(wrapped),
        "n_pages": n_pages, "page_size": page_size, "bandwidth_bps": float(bandwidth_bps),
        "max_downtime_ms": float(max_downtime_ms), "max_rounds": int(max_rounds),
        "policy": policy, "implementation": implementation,
        "assumptions": PRECOPY_ASSUMPTIONS, "model": True,
    }
    if throttles is not None:
        res["throttle_per_round"] = [float(t) for t in throttles]
    return res


def precopy_sim(trace: AnyTrace | UnionTable, *, bandwidth_bps: float, max_downtime_ms: float,
                max_rounds: int, page_size: int | None = None, policy: str = "stop_copy",
                start_interval: int = 0, throttle: dict[str, float] | bool | None = None,
                method: str = "auto") -> dict[str, Any]:
    """Pre-copy live migration over a dirty trace (model, numba).

    Round 0 sends all n_pages while the guest runs from the start of `start_interval`. A
    round sending P pages lasts P * page_size * 8 / bandwidth_bps; the pages dirtied during it
    are the union of the trace intervals its time span overlaps (the trace loops when it runs
    out: `trace_wrapped`), and the next round sends those. When the remaining dirty set can be
    sent within `max_downtime_ms` the guest is paused and it is sent: converged. After
    `max_rounds` live rounds without converging, policy "stop_copy" pauses and sends the
    remaining set anyway (downtime = that round's time, converged False) and "abort" cancels
    the migration (no switch-over, downtime_ms None).

    `throttle` (auto-converge, like QEMU's): a dict with `initial` (default = step, or 0.2),
    `step` (0.2) and `max` (0.99), or True for QEMU's defaults 0.2/0.1/0.99. After each
    non-converging round the throttle becomes `initial`, then grows by `step` up to `max`.
    Approximation: a guest throttled by t runs (1-t) of the time, so a round of duration d
    covers only d*(1-t) of trace time (time dilation); the pages it dirties are those of the
    shorter span. This assumes dirtying scales with guest run time.

    `trace` may be a `UnionTable` (from `union_table`) to reuse across many runs (see also
    `precopy_sweep`). `method`: "direct" ORs and popcounts the intervals each round spans;
    "table" builds the `UnionTable` first (one pass) and looks every round up; "auto" runs
    direct but switches to the table as soon as the rounds would read more than 4*K intervals:
    building the table costs about as much as reading 4*K rows directly (per-event work), so
    this bounds one run at about twice the cheaper of the two (the ski-rental rule). All give
    identical results. Returns `rounds, live_rounds, pages_per_round` (the last entry is the
    stop-and-copy round unless aborted), `round_ms, total_ms, downtime_ms, converged, outcome,
    bytes_sent, trace_wrapped`, the inputs, `throttle_per_round` when throttling, and
    `model: True`.
    """
    ps, abort = _precopy_params(trace, bandwidth_bps, max_downtime_ms, max_rounds, page_size,
                                policy, start_interval)
    thr = _parse_throttle(throttle)
    if method not in ("auto", "table", "direct"):
        raise UsageError(f"method must be 'auto', 'table' or 'direct', got {method!r}")
    k = trace.n_intervals
    starts = np.zeros(k, dtype=np.int64)
    np.cumsum(trace.interval_ns[:-1], out=starts[1:])
    t_init, t_step, t_max = thr if thr else (0.0, 0.0, 0.0)
    common = (starts, np.int64(trace.interval_ns.sum()), np.int64(trace.n_pages), np.int64(ps),
              float(bandwidth_bps), float(max_downtime_ms), np.int64(max_rounds), bool(abort),
              np.int64(starts[start_interval]), float(t_init), float(t_step), float(t_max))
    dummy2 = np.zeros((1, 1), dtype=np.int64)
    dummy_bm = np.zeros((1, 1), dtype=np.uint64)
    dummy1 = np.zeros(1, dtype=np.int64)
    dummy_buf = np.zeros(1, dtype=np.uint64)
    out = None
    impl = "numba-table"
    table = trace if isinstance(trace, UnionTable) else None
    if table is None and method != "table":
        # direct: OR + popcount of the intervals each round spans. "auto" gives up once that
        # would read more than four passes' worth of intervals (about what the table build
        # costs, measured on a 1 TiB synthetic trace) and uses the table instead.
        budget = 4 * k if (method == "auto" and k <= TABLE_MAX_INTERVALS) else -1
        if isinstance(trace, DirtyTrace):
            args = (np.int64(1), dummy2, trace.bitmaps, dummy1, dummy1, dummy_buf)
        else:
            args = (np.int64(2), dummy2, dummy_bm, trace.offsets, trace.pages,
                    np.zeros(_n_words(trace.n_pages), dtype=np.uint64))
        out = _precopy_loop(*args, *common, np.int64(budget))
        impl = "numba-direct"
        if out[2] < 0:
            out = None
    if out is None:
        if table is None:
            table = union_table(trace)
        out = _precopy_loop(np.int64(0), table.counts, dummy_bm, dummy1, dummy1, dummy_buf,
                            *common, np.int64(-1))
        impl = "numba-table"
    sent, thr_used, outcome, wrapped = out
    return _precopy_result(sent.tolist(), thr_used.tolist() if thr else None,
                           _OUTCOMES[outcome], wrapped, n_pages=trace.n_pages, page_size=ps,
                           bandwidth_bps=bandwidth_bps, max_downtime_ms=max_downtime_ms,
                           max_rounds=max_rounds, policy=policy, implementation=impl)


def precopy_sweep(trace: AnyTrace | UnionTable, *, bandwidths_bps: Iterable[float],
                  max_downtimes_ms: Iterable[float], max_rounds: int,
                  **kwargs: Any) -> list[dict[str, Any]]:
    """`precopy_sim` for every (bandwidth, max downtime) pair, sharing one `UnionTable` (built
    once), so a grid costs one pass over the trace plus microseconds per point. Other keyword
    arguments go to `precopy_sim` unchanged. Returns the results in row-major order
    (bandwidth outer)."""
    table = trace if isinstance(trace, UnionTable) else union_table(trace)
    downtimes = list(max_downtimes_ms)
    return [precopy_sim(table, bandwidth_bps=bw, max_downtime_ms=dt, max_rounds=max_rounds,
                        **kwargs)
            for bw in bandwidths_bps for dt in downtimes]


def precopy_sim_numpy(trace: AnyTrace, *, bandwidth_bps: float, max_downtime_ms: float,
                      max_rounds: int, page_size: int | None = None, policy: str = "stop_copy",
                      start_interval: int = 0,
                      throttle: dict[str, float] | bool | None = None) -> dict[str, Any]:
    """`precopy_sim` written plainly in Python/NumPy: the test oracle.

    It walks a cursor (interval, offset) through the trace interval by interval and ORs the
    bitmaps (or merges the page lists) of every interval a round touches, with no tables.
    Same arguments and result as `precopy_sim` (implementation "numpy").
    """
    if isinstance(trace, UnionTable):
        raise UsageError("precopy_sim_numpy needs the trace itself, not a UnionTable")
    ps, abort = _precopy_params(trace, bandwidth_bps, max_downtime_ms, max_rounds, page_size,
                                policy, start_interval)
    thr_cfg = _parse_throttle(throttle)
    iv = [int(x) for x in trace.interval_ns]
    k_n = len(iv)
    total = sum(iv)
    k, off = start_interval, 0
    wrapped = False      # an interval was read after the cursor had passed the trace's end
    passed_end = False
    thr = 0.0
    to_send = trace.n_pages
    pages: list[int] = []
    throttles: list[float] = []
    outcome = "converged"
    while True:
        pages.append(to_send)
        throttles.append(thr)
        dur_s = to_send * 8.0 * ps / bandwidth_bps
        remaining = math.ceil(dur_s * 1e9 * (1.0 - thr))
        touched: set[int] = set()
        while remaining > 0:
            if off == 0 and remaining >= total:
                # whole loops of the trace: every interval is touched
                loops = remaining // total
                if passed_end or k > 0 or loops > 1:
                    wrapped = True
                touched.update(range(k_n))
                remaining -= loops * total
                passed_end = True
                continue
            if passed_end:
                wrapped = True
            touched.add(k)
            left = iv[k] - off
            if remaining < left:
                off += remaining
                remaining = 0
            else:
                remaining -= left
                k, off = k + 1, 0
                if k == k_n:
                    k = 0
                    passed_end = True
        dirty = _numpy_union(trace, touched)
        if dirty * 8.0 * ps / bandwidth_bps * 1000.0 <= max_downtime_ms:
            pages.append(dirty)
            throttles.append(thr)
            outcome = "converged"
            break
        if len(pages) >= max_rounds:
            if abort:
                outcome = "aborted"
            else:
                pages.append(dirty)
                throttles.append(thr)
                outcome = "max_rounds_stop_copy"
            break
        to_send = dirty
        if thr_cfg:
            thr = thr_cfg[0] if thr == 0.0 else min(thr + thr_cfg[1], thr_cfg[2])
    return _precopy_result(pages, throttles if thr_cfg else None, outcome, wrapped,
                           n_pages=trace.n_pages, page_size=ps, bandwidth_bps=bandwidth_bps,
                           max_downtime_ms=max_downtime_ms, max_rounds=max_rounds, policy=policy,
                           implementation="numpy")


def stop_and_copy(trace: AnyTrace | UnionTable, bandwidth_bps: float, *,
                  page_size: int | None = None) -> dict[str, Any]:
    """Non-live migration (model): pause, send every page, resume on the destination.

    downtime = total time = n_pages * page_size * 8 / bandwidth_bps. Same keys as
    `precopy_sim`, outcome "stop_and_copy".
    """
    if not (bandwidth_bps > 0 and math.isfinite(bandwidth_bps)):
        raise UsageError(f"bandwidth_bps must be a positive number, got {bandwidth_bps}")
    ps = trace.page_size if page_size is None else int(page_size)
    res = _precopy_result([trace.n_pages], None, "converged", False, n_pages=trace.n_pages,
                          page_size=ps, bandwidth_bps=bandwidth_bps, max_downtime_ms=0.0,
                          max_rounds=0, policy="stop_copy", implementation="closed-form")
    res.update(outcome="stop_and_copy", live_rounds=0, max_downtime_ms=None, max_rounds=None,
               assumptions="the guest is paused for the whole transfer at bandwidth_bps")
    return res
