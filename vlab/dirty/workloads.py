"""The `dirty` guest payload seen from the host: workloads, the record region, the epoch protocol.

`WorkloadGuest` builds a Machine running one workload of native/guest/payloads/dirty.c over a
buffer (the first data slot) with its ground-truth record in a second slot, runs the vCPU on
its own thread, and drives the interval ("epoch") handshake:

    pause()      ask for epoch e+1; the guest closes epoch e and spins writing nothing
    take_epoch() read and validate what the guest recorded for epoch e (pages, TSC, counts)
    resume()     let it run epoch e+1           stop()   let it finish instead

Between `pause()` and `resume()` the guest does not write, so a dirty-log harvest done there
splits the guest's writes exactly at the epoch boundary. Everything the guest wrote into the
record region is validated before use: a broken or hostile guest raises `VlabError`, never
crashes or hangs the host (every wait has a timeout; the vCPU has a watchdog).

Live migration can run a workload without pauses: call `pause(); take_epoch(); resume()` once
to start epoch 1 and then never again until `stop()`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vlab._errors import UsageError, VlabError
from vlab._units import PAGE
from vlab.vmm.kvm import Kvm
from vlab.vmm.payloads import DIRTY_WORKLOADS as WORKLOADS
from vlab.vmm.machine import DEFAULT_PT_POOL, Machine, pt_pool_for
from vlab.vmm.memory import PAGE_SIZES, MemorySlot
from vlab.vmm.thread import VcpuThread
from vlab.vmm.vcpu import Stop, unexpected_stop

ZIPF_CELLS = 65536

# ctrl page words (mirrors native/guest/payloads/dirty.c)
C_REQ, C_GO, C_STOP, C_RIDX = 0, 1, 2, 3
C_ACK, C_STATE, C_IDLE, C_CUR, C_TSC_STOP, C_MAGIC = 16, 17, 18, 19, 20, 21
S_WARMING, S_READY, S_RUNNING, S_STOPPED = 1, 2, 3, 4
E_EPOCH, E_START, E_END, E_TSC_GO, E_TSC_ACK, E_WRITES, E_READS, E_TSC_IDLE, E_LAG = range(9)
E_WORDS = 16
GUEST_MAGIC = 0x7974726964
F_NO_WARMUP = 1
F_SYNC = 2
EPOCH_CAP = 64


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


@dataclass(frozen=True)
class RecordLayout:
    """Byte offsets inside the record region (see dirty.c)."""
    epoch_off: int
    table_off: int
    table_len: int
    stamp_off: int
    list_off: int
    list_cap: int
    size: int

    @classmethod
    def for_buffer(cls, n_pages: int, table_len: int) -> "RecordLayout":
        epoch_off = PAGE
        table_off = epoch_off + _round_up(EPOCH_CAP * E_WORDS * 8, PAGE)
        stamp_off = table_off + _round_up(table_len * 4, PAGE)
        list_off = stamp_off + _round_up(n_pages * 4, PAGE)
        # one epoch appends at most n_pages entries and the host consumes them before the next
        list_cap = 1 << max(10, (n_pages + 2 - 1).bit_length())
        size = _round_up(list_off + list_cap * 4, 2 << 20)
        return cls(epoch_off, table_off, table_len, stamp_off, list_off, list_cap, size)


def zipf_table(n_pages: int, s: float, cells: int = ZIPF_CELLS) -> np.ndarray:
    """Inverse CDF of a zipf(s) distribution over page ranks 0..n_pages-1, as `cells`+1 u32
    quantiles: the guest draws a cell uniformly and a rank uniformly within it."""
    if not s > 0:
        raise UsageError(f"zipf parameter must be > 0, not {s}")
    w = np.arange(1, n_pages + 1, dtype=np.float64) ** -float(s)
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    q = np.arange(cells + 1, dtype=np.float64) / cells
    return np.minimum(np.searchsorted(cdf, q, side="left"), n_pages - 1).astype(np.uint32)


@dataclass
class Epoch:
    """What the guest recorded for one closed epoch (validated)."""
    epoch: int
    pages: np.ndarray           # sorted distinct 4 KiB page indices written (uint32)
    tsc_go: int                 # guest TSC when the epoch started
    tsc_ack: int                # ... and when the guest closed it
    writes: int                 # 8-byte stores to the buffer
    reads: int                  # 8-byte loads from the buffer
    tsc_idle: int               # counts workload: when the quota was done (0 otherwise)
    lag: int                    # ratelimited: TSC cycles behind schedule at the last write


def workload_args(workload: str, n_pages: int, *, hot_fraction: float = 0.2,
                  hot_share: float = 0.8, zipf: float | None = None, rate: float | None = None,
                  write_pct: float = 10.0, counts: list[int] | np.ndarray | None = None
                  ) -> tuple[int, int, np.ndarray | None]:
    """(p1, p2, table) of a workload, validated (`UsageError` on bad values)."""
    if workload not in WORKLOADS:
        raise UsageError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    p1 = p2 = 0
    table = None
    if workload == "hotcold":
        if zipf is not None:
            table = zipf_table(n_pages, zipf)
        else:
            if not (0 < hot_fraction <= 1 and 0 <= hot_share <= 1):
                raise UsageError("hotcold needs 0 < hot_fraction <= 1 and 0 <= hot_share <= 1")
            p1 = max(1, min(n_pages, round(n_pages * hot_fraction)))
            p2 = round(hot_share * 1e6)
    elif workload == "ratelimited":
        if rate is None or not 1 <= rate <= 1e9:
            raise UsageError(f"ratelimited needs rate (pages/s) in [1, 1e9], not {rate!r}")
        p1 = int(round(rate))
    elif workload == "readmostly":
        if not 0 <= write_pct <= 100:
            raise UsageError(f"write_pct must be in [0, 100], not {write_pct}")
        p1 = round(write_pct * 1e4)
    elif workload == "counts":
        if counts is None or len(counts) == 0:
            raise UsageError("workload counts needs a non-empty list of per-interval counts")
        c = np.asarray(counts)
        if c.dtype.kind not in "iu" or c.min() < 0 or c.max() > n_pages:
            raise UsageError(f"counts must be integers in [0, {n_pages}] (the buffer's pages)")
        table = c.astype(np.uint32)
    return p1, p2, table


class WorkloadGuest:
    """A Machine running one `dirty` workload on its own vCPU thread, with the epoch handshake.

    Build one with `WorkloadGuest.build(...)`, attach dirty tracking to `machine` (before
    `start()`), then `start()`, and drive epochs. `close()` (or a with-block) stops the guest,
    waits for its thread and releases the VM.
    """

    def __init__(self, machine: Machine, buffer: MemorySlot, record: MemorySlot,
                 layout: RecordLayout, workload: str, n_pages: int, seed: int,
                 p1: int, p2: int, table: np.ndarray | None, warmup: bool = True,
                 sync: bool = False):
        self.machine = machine
        self.buffer = buffer
        self.record = record
        self.layout = layout
        self.workload = workload
        self.n_pages = n_pages
        self.tsc_khz = int(machine.params[7]) or 1
        mem = record.array(np.uint8)
        self._ctrl = mem[:PAGE].view(np.uint64)
        self._epochs = mem[layout.epoch_off:layout.epoch_off + EPOCH_CAP * E_WORDS * 8] \
            .view(np.uint64).reshape(EPOCH_CAP, E_WORDS)
        self._list = mem[layout.list_off:layout.list_off + layout.list_cap * 4].view(np.uint32)
        if table is not None:
            mem[layout.table_off:layout.table_off + table.size * 4].view(np.uint32)[:] = table
        self._ctrl[:] = 0
        self._epoch = 0                 # the epoch the guest is in (as far as the host knows)
        self._ridx = 0                  # list entries consumed
        self._paused = False
        self._runner: VcpuThread | None = None
        self._stopped = False
        self.on_ring_full: Callable[[], None] | None = None
        self.sync = sync
        if sync and workload != "counts":
            raise UsageError("guest-driven epochs (sync) need the counts workload")
        machine.set_args(WORKLOADS[workload], record.gpa, record.size, n_pages, seed, p1, p2,
                         layout.table_off, 0 if table is None else table.size,
                         layout.stamp_off, layout.list_off, layout.list_cap, layout.epoch_off,
                         EPOCH_CAP, (0 if warmup else F_NO_WARMUP) | (F_SYNC if sync else 0))

    @classmethod
    def build(cls, workload: str, *, wss: int, guest_page: str = "4k", backing: str = "4k",
              seed: int = 1, dirty_ring: int = 0, kvm: Kvm | None = None, warmup: bool = True,
              sync: bool = False, **params) -> "WorkloadGuest":
        """A new Machine with a `wss`-byte buffer and the record slot, ready to `start()`.

        `params` are the workload's: hot_fraction, hot_share, zipf, rate, write_pct, counts.
        `dirty_ring` (bytes per vCPU) is needed for ring-mode tracking. `sync`: guest-driven
        epochs (counts workload), run with `run_synced` instead of `start`.
        """
        if guest_page not in PAGE_SIZES:
            raise UsageError(f"guest_page must be one of {', '.join(PAGE_SIZES)}")
        ps = PAGE_SIZES[guest_page]
        if wss <= 0 or wss % ps:
            raise UsageError(f"wss must be a positive multiple of the {guest_page} guest page, "
                             f"not {wss}")
        n_pages = wss // PAGE
        if n_pages >= 1 << 32:
            raise UsageError("wss is too large (at most 2^32 pages of 4 KiB)")
        p1, p2, table = workload_args(workload, n_pages, **params)
        layout = RecordLayout.for_buffer(n_pages, 0 if table is None else table.size)
        pool = max(DEFAULT_PT_POOL, pt_pool_for(wss, ps) + pt_pool_for(layout.size, PAGE)
                   + (1 << 20))
        m = Machine("dirty", kvm=kvm, pt_pool=_round_up(pool, 1 << 20), dirty_ring=dirty_ring)
        try:
            buf = m.add_data(wss, backing=backing, guest_page=guest_page)
            rec = m.add_data(layout.size, backing="4k", guest_page="4k")
            return cls(m, buf, rec, layout, workload, n_pages, seed, p1, p2, table, warmup,
                       sync)
        except BaseException:
            m.close()
            raise

    # ---- regions, for classifying dirty pages outside the buffer ----
    def regions(self) -> dict[str, tuple[int, int, int]]:
        """name -> (slot id, first 4 KiB page, page count): the buffer, the guest page tables,
        the ground-truth recorder and the rest of the runtime (code, stacks, params, results)."""
        sys = self.machine.sys
        pool_first = 0x800000 // PAGE
        return {"buffer": (self.buffer.id, 0, self.buffer.pages),
                "page_tables": (sys.id, pool_first, sys.pages - pool_first),
                "recorder": (self.record.id, 0, self.record.pages),
                "runtime": (sys.id, 0, pool_first)}

    # ---- running ----
    @property
    def ring_full_exits(self) -> int:
        """KVM_EXIT_DIRTY_RING_FULL exits the vCPU thread handled."""
        return self._runner.ring_full if self._runner is not None else 0

    def start(self, timeout: float = 60.0, on_ring_full: Callable[[], None] | None = None,
              ready_timeout: float = 30.0) -> None:
        """Run the vCPU on its own thread (watchdog `timeout` s) and wait for the warm-up.

        `on_ring_full` is called on the vCPU thread for KVM_EXIT_DIRTY_RING_FULL."""
        self.on_ring_full = on_ring_full
        self._runner = VcpuThread(self.machine.vcpus[0], timeout=timeout,
                                  on_ring_full=on_ring_full, name="vlab-dirty-vcpu").start()
        self._wait(lambda: int(self._ctrl[C_STATE]) >= S_READY, ready_timeout, "warm up")
        if int(self._ctrl[C_MAGIC]) != GUEST_MAGIC:
            raise VlabError("dirty guest did not identify itself (record region magic missing)")

    def run_synced(self, on_epoch: Callable[["WorkloadGuest"], bool], timeout: float = 60.0,
                   on_ring_full: Callable[[], None] | None = None) -> None:
        """Guest-driven epochs (built with sync=True): the guest ends each epoch with a ucall;
        while the vCPU is out of the guest, `on_epoch(self)` runs on the vCPU thread (harvest,
        `take_epoch()`) and returns whether to go on. Epoch 0 is the warm-up. Returns once the
        guest is done; re-raises what stopped it (or `on_epoch`) badly."""
        if not self.sync:
            raise VlabError("run_synced() needs a guest built with sync=True")
        self._stopped = False

        def at_sync(st: Stop) -> bool:
            if st.reason != "sync":
                raise unexpected_stop(st)
            if int(st.args[0]) != self._epoch or int(self._ctrl[C_ACK]) != self._epoch + 1:
                raise VlabError(f"dirty guest reported epoch {int(st.args[0])}, expected "
                                f"{self._epoch}")
            self._paused = True
            go_on = on_epoch(self)
            self._paused = False
            if go_on:
                self._epoch += 1
                self._ctrl[C_REQ] = self._epoch
                self._ctrl[C_GO] = self._epoch
            else:
                self._stopped = True
                self._ctrl[C_STOP] = 1
            return False                    # run on: the guest goes on or finishes

        self._runner = VcpuThread(self.machine.vcpus[0], timeout=timeout,
                                  on_ring_full=on_ring_full, on_stop=at_sync,
                                  name="vlab-dirty-vcpu").start()
        try:
            self._runner.wait_done(timeout + 30)    # the vCPU's watchdog fires first
        finally:
            self._runner.quit()
        if not self._stopped:
            raise VlabError("dirty guest finished before it was told to stop")

    def _check(self) -> None:
        r = self._runner
        if r is not None and r.error is not None:
            raise r.error
        if r is not None and r.finished and not self._stopped:
            raise VlabError("dirty guest finished before it was told to stop")

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        spins = 0
        while not cond():
            self._check()
            spins += 1
            if time.monotonic() > deadline:
                raise VlabError(f"dirty guest did not {what} within {timeout:g} s "
                                f"(state {int(self._ctrl[C_STATE])}, epoch {self._epoch})")
            # yield the GIL so the vCPU thread can handle a full ring; sleep once it drags on
            time.sleep(1e-5 if spins < 20000 else 2e-4)

    @property
    def epoch(self) -> int:
        return self._epoch

    def pause(self, timeout: float = 10.0) -> int:
        """Ask for the next epoch; return once the guest has closed the current one and stopped
        writing. Returns the closed epoch's number."""
        if self._paused:
            raise VlabError("pause() twice without resume()")
        self._check()
        want = self._epoch + 1
        self._ctrl[C_REQ] = want
        self._wait(lambda: int(self._ctrl[C_ACK]) == want, timeout, f"close epoch {want - 1}")
        self._paused = True
        return self._epoch

    def wait_idle(self, timeout: float = 10.0) -> None:
        """counts workload: wait until the guest has written this epoch's quota."""
        e = self._epoch
        self._wait(lambda: int(self._ctrl[C_IDLE]) == e, timeout, f"finish epoch {e}'s writes")

    def take_epoch(self) -> Epoch:
        """What the guest recorded in the epoch it just closed (after `pause`), validated; its
        list entries are then released to the guest."""
        if not self._paused:
            raise VlabError("take_epoch() needs pause() first")
        e = self._epoch
        ent = self._epochs[e % EPOCH_CAP].copy()
        lay = self.layout

        def bad(why: str) -> VlabError:
            return VlabError(f"dirty guest record of epoch {e} is invalid: {why}")

        if int(ent[E_EPOCH]) != e:
            raise bad(f"entry says epoch {int(ent[E_EPOCH])}")
        start, end = int(ent[E_START]), int(ent[E_END])
        if start != self._ridx:
            raise bad(f"list starts at {start}, expected {self._ridx}")
        if end < start or end - start > self.n_pages or end - self._ridx >= lay.list_cap:
            raise bad(f"list range [{start}, {end}) is impossible")
        idx = np.arange(start, end, dtype=np.int64) & (lay.list_cap - 1)
        pages = self._list[idx].copy()
        if pages.size and int(pages.max()) >= self.n_pages:
            raise bad(f"page index {int(pages.max())} >= {self.n_pages}")
        pages.sort()
        if pages.size > 1 and np.any(pages[1:] == pages[:-1]):
            raise bad("a page is listed twice")
        tsc_go, tsc_ack = int(ent[E_TSC_GO]), int(ent[E_TSC_ACK])
        if tsc_ack < tsc_go:
            raise bad("epoch closed before it started (TSC)")
        writes, reads = int(ent[E_WRITES]), int(ent[E_READS])
        if writes < pages.size or writes >= 1 << 62 or reads >= 1 << 62:
            raise bad(f"{writes} writes for {pages.size} pages")
        self._ridx = end
        self._ctrl[C_RIDX] = end
        return Epoch(e, pages, tsc_go, tsc_ack, writes, reads, int(ent[E_TSC_IDLE]), int(ent[E_LAG]))

    def resume(self) -> None:
        """Let the guest run the next epoch."""
        if not self._paused:
            raise VlabError("resume() needs pause() first")
        self._epoch += 1
        self._paused = False
        self._ctrl[C_GO] = self._epoch

    def stop(self, timeout: float = 30.0) -> int:
        """Tell the guest to finish (at its next check, or now if paused) and wait for its
        thread. Returns the guest TSC at which it stopped."""
        self._stopped = True
        self._ctrl[C_STOP] = 1
        if self._runner is not None:
            if not self._runner.join(timeout):
                raise VlabError(f"dirty guest did not stop within {timeout:g} s")
            if self._runner.error is not None:
                raise self._runner.error
        return int(self._ctrl[C_TSC_STOP])

    def close(self) -> None:
        """Stop the guest if it runs, then release the VM (never while the vCPU thread runs)."""
        try:
            if self._runner is not None and not self._runner.finished:
                self._stopped = True
                self._ctrl[C_STOP] = 1
                # bounded by the vCPU watchdog if the guest ignores STOP
                self._runner.join()
        finally:
            self.machine.close()

    def __enter__(self) -> "WorkloadGuest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
