"""The bcc tracer: counts and latency of KVM events, per exit reason, for chosen processes.

Two sources, because hosts differ:

- `kvm_exit`: where `kvm:kvm_exit`/`kvm:kvm_entry` fire (VMX and SVM backends), every hardware
  exit is counted by reason and timed from exit to the next entry on the same vCPU thread.
- `fallback`: the PVM backend never fires `kvm_exit`. Exits are then seen through the events
  that do fire: `kvm_userspace_exit` (by `KVM_EXIT_*` reason), `kvm_pio` (port, direction),
  `kvm_mmio` (type), `kvm_msr` (read/write), and count-only events (`kvm_cpuid`,
  `kvm_emulate_insn`, `kvm_dirty_ring_push`, `kvmmmu:*`, ...). User-space round trips are timed
  from `kvm_userspace_exit` to the thread's next kvm event (the `kvm_fpu` load at KVM_RUN
  re-entry where it exists), and each KVM_RUN trip from re-entry to the next user-space exit.

Every name (exit reasons, `KVM_EXIT_*`, MMIO types) is read from the running kernel's format
files; the BPF side (kvm_trace.c) only handles numbers, and reads tracepoint arguments only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import math
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from vlab._errors import UsageError
from vlab.trace._headers import HeaderStatus, ensure_headers
from vlab.trace._tracefs import (SymbolicTable, TracingUnavailable, ensure_tracefs, event_exists,
                       list_events, parse_format, read_format, select_table, symbolic_tables,
                       tracefs_path)

BPF_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kvm_trace.c")

# Mirrors of the kinds in kvm_trace.c.
K_EXIT, K_USER_EXIT, K_PIO, K_MMIO, K_MSR = 1, 2, 3, 4, 5
L_EXIT, L_USER, L_RUN = 1, 2, 3
ERRNO_MARK = 0xFFFFFFFF
MAX_EVENT_SLOTS = 48

#: Count-only kvm events attached in fallback mode when they exist: (event, count key).
FALLBACK_EVENTS: tuple[tuple[str, str], ...] = (
    ("kvm_cpuid", "cpuid"),
    ("kvm_emulate_insn", "emulate_insn"),
    ("kvm_dirty_ring_push", "dirty_ring_push"),
    ("kvm_hypercall", "hypercall"),
    ("kvm_cr", "cr"),
    ("kvm_page_fault", "page_fault"),
    ("kvm_inj_exception", "inj_exception"),
    ("kvm_fast_mmio", "fast_mmio"),
    ("kvm_vcpu_wakeup", "vcpu_wakeup"),
)

_CAP_SYS_ADMIN = 21


# --------------------------------------------------------------------------------------------
# results

@dataclass
class Histogram:
    """A log2 latency histogram in nanoseconds.

    `buckets[k]` counts samples in [2**k, 2**(k+1)) ns (bucket 0 also holds 0). `count` and
    `total_ns` are exact (kept beside the histogram in BPF), so `mean_ns` is exact too; the
    quantiles are estimates, interpolated linearly inside a bucket (at most 2x off).
    """

    buckets: dict[int, int]
    count: int
    total_ns: int

    @property
    def mean_ns(self) -> float:
        """Exact mean of the samples (nan when empty)."""
        return self.total_ns / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """Estimated q-quantile (0 <= q <= 1) in ns; nan when empty."""
        n = sum(self.buckets.values())
        if n == 0:
            return math.nan
        if n == 1 and self.count == 1:
            return self.mean_ns  # one sample: the exact sum is the sample
        target = q * n
        cum = 0
        for k in sorted(self.buckets):
            c = self.buckets[k]
            if c and cum + c >= target:
                lo = 0.0 if k == 0 else float(2 ** k)
                hi = float(2 ** (k + 1))
                return lo + (hi - lo) * max(0.0, target - cum) / c
            cum += c
        k = max(self.buckets)
        return float(2 ** (k + 1))

    @property
    def p50(self) -> float:
        """Estimated median in ns."""
        return self.quantile(0.50)

    @property
    def p99(self) -> float:
        """Estimated 99th percentile in ns."""
        return self.quantile(0.99)

    def to_dict(self) -> dict:
        """JSON-friendly form: buckets keyed by their lower bound in ns."""
        return {"count": self.count, "total_ns": self.total_ns, "mean_ns": self.mean_ns,
                "p50_ns": self.p50, "p99_ns": self.p99,
                "buckets": {str(0 if k == 0 else 2 ** k): v for k, v in sorted(self.buckets.items())}}


@dataclass
class TraceResult:
    """What a `Tracer` saw.

    `source` is "kvm_exit" (hardware exits traced) or "fallback" (per-event tracepoints).
    `counts` keys: "exit:<REASON>", "userspace_exit:<REASON>" (or "userspace_exit:error:<ERRNO>"),
    "pio:out:0x3f8", "mmio:write", "msr:read", "cpuid", "emulate_insn", "mmu:get_page", ...
    `latency` keys: "exit:<REASON>" (exit -> entry); "userspace:<REASON>": the user-space round
    trip after that exit, from `kvm_userspace_exit` to the thread's next kvm event (normally the
    `kvm_fpu` load early in the next KVM_RUN), so it includes the ioctl return and re-entry
    path in the kernel (syscall, vcpu_load), not only user-space code; "run:<REASON>": from that
    FPU load to the exit (in-kernel + guest time of one KVM_RUN trip). `detail` holds finer keys not
    summed into `counts` ("msr:read:0x1b", with ":#GP" when the access faulted).
    `unavailable` lists what could not be traced here and why; `notes` what the tracer did to
    the host or chose on its own (mounted tracefs, which kernel headers bcc used).
    """

    source: str
    counts: dict[str, int]
    latency: dict[str, Histogram]
    unavailable: list[str]
    detail: dict[str, int] = field(default_factory=dict)
    backend: str = "unknown"
    pids: list[int] | None = None
    elapsed_s: float = 0.0
    attach_s: float = 0.0
    attached: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly form (for results files and `vlab trace --json`)."""
        return {"source": self.source, "backend": self.backend, "pids": self.pids,
                "elapsed_s": self.elapsed_s, "attach_s": self.attach_s,
                "counts": dict(self.counts), "detail": dict(self.detail),
                "latency": {k: h.to_dict() for k, h in self.latency.items()},
                "unavailable": list(self.unavailable), "attached": list(self.attached),
                "notes": list(self.notes)}


# --------------------------------------------------------------------------------------------
# host probing

def kvm_backend(sys_module: str = "/sys/module") -> str:
    """Which KVM backend is loaded: "vmx", "svm", "pvm", "none" (no kvm) or "unknown"."""
    has = lambda m: os.path.isdir(os.path.join(sys_module, m))  # noqa: E731
    if has("kvm_intel"):
        return "vmx"
    if has("kvm_amd"):
        return "svm"
    if has("kvm_pvm"):
        return "pvm"
    if not has("kvm"):
        return "none"
    return "unknown"


def _is_root() -> bool:
    return os.geteuid() == 0


def _has_cap(bit: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def bpf_syscall_permitted() -> tuple[bool, str]:
    """Try the bpf(2) syscall (create and close a 1-entry array map): (ok, reason).

    This is what lockdown, `kernel.unprivileged_bpf_disabled` or a seccomp filter would refuse,
    and it costs microseconds, unlike compiling a program.
    """
    nr = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
    if nr is None:
        return False, f"bpf syscall number unknown for {os.uname().machine}"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, ...
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, 4-byte key/value, 1 entry
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(0), ctypes.byref(attr), ctypes.c_uint(128))
    if fd < 0:
        err = ctypes.get_errno()
        return False, f"bpf() refused: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
    os.close(fd)
    return True, "bpf() map creation works"


def _import_bcc(tracefs: str | None):
    """Import Debian's bcc (exposed to the venv by scripts/bcc_shim.sh).

    bcc picks its tracefs path when imported, so import it after tracefs is mounted and fix
    the path up if it picked a directory that does not exist.
    """
    import bcc  # noqa: PLC0415 - optional system package, imported only when tracing

    if tracefs and not os.path.isdir(getattr(bcc, "TRACEFS", "")):
        bcc.TRACEFS = tracefs
    return bcc


def status(*, mount: bool = False) -> tuple[bool, str, dict]:
    """Whether bcc tracing of KVM works here: `(ok, one-line reason, detail)`.

    Checks, in order: root, tracefs (mounted, or mountable when `mount` is set), kernel headers,
    bcc importable, the bpf() syscall, and kvm tracepoints. Never raises; `vlab doctor` shows the
    reason and everything else in vlab keeps working without tracing.
    """
    detail: dict = {"backend": kvm_backend()}
    root = _is_root()
    detail["root"] = root
    if not root:
        return False, "not root: bcc tracing needs root (CAP_SYS_ADMIN/CAP_BPF/CAP_PERFMON)", detail
    path = tracefs_path()
    detail["tracefs"] = path
    detail["tracefs_mounted_by_us"] = False
    if path is None and mount:
        try:
            path, mounted = ensure_tracefs()
            detail.update(tracefs=path, tracefs_mounted_by_us=mounted)
        except TracingUnavailable as e:
            return False, str(e), detail
    try:
        hs: HeaderStatus = ensure_headers()
    except Exception as e:  # noqa: BLE001 - doctor must never crash
        return False, f"kernel headers: {e}", detail
    detail["headers"] = hs.as_dict()
    if not hs.ok:
        return False, hs.reason, detail
    try:
        bcc = _import_bcc(path)
        detail["bcc"] = getattr(bcc, "__version__", "unknown")
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (libbcc), anything
        detail["bcc"] = None
        return False, (f"bcc not importable ({type(e).__name__}: {e}); install python3-bpfcc "
                       "and run scripts/bcc_shim.sh"), detail
    ok, why = bpf_syscall_permitted()
    detail["bpf_syscall"] = why
    if not ok:
        return False, why, detail
    if detail["backend"] == "none":
        return False, "kvm is not loaded (no /sys/module/kvm): nothing to trace", detail
    if path is None:
        return True, ("tracing available (tracefs not mounted yet; the tracer mounts it at "
                      "/sys/kernel/tracing)"), detail
    kvm_events = list_events("kvm", path)
    detail["kvm_events"] = len(kvm_events)
    if "kvm_userspace_exit" not in kvm_events and "kvm_exit" not in kvm_events:
        return False, f"no kvm tracepoints under {path}/events/kvm", detail
    if detail["backend"] == "pvm":
        detail["expected_source"] = "fallback"
        return True, ("tracing available (fallback events: the PVM backend never fires "
                      "kvm_exit)"), detail
    detail["expected_source"] = "kvm_exit" if "kvm_exit" in kvm_events else "fallback"
    return True, f"tracing available ({detail['expected_source']})", detail


# --------------------------------------------------------------------------------------------
# decoding maps into a TraceResult (pure: unit-tested with recorded format files)

@dataclass
class RawMaps:
    """The tracer's BPF maps as plain dicts (keys are the C structs' fields in order)."""

    counts: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    slots: dict[int, int] = field(default_factory=dict)
    hist: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    sums: dict[tuple[int, int, int], tuple[int, int]] = field(default_factory=dict)
    drops: int = 0

    def minus(self, base: "RawMaps") -> "RawMaps":
        """Counts accumulated since `base` was read (maps only grow, so this is exact)."""
        def sub(a: dict, b: dict) -> dict:
            out = {}
            for k, v in a.items():
                d = v - b.get(k, 0)
                if d:
                    out[k] = d
            return out
        sums = {}
        for k, (n, t) in self.sums.items():
            bn, bt = base.sums.get(k, (0, 0))
            if n - bn:
                sums[k] = (n - bn, t - bt)
        return RawMaps(sub(self.counts, base.counts), sub(self.slots, base.slots),
                       sub(self.hist, base.hist), sums, self.drops - base.drops)


@dataclass
class Decoder:
    """Names for the numbers in `RawMaps`, all taken from format files."""

    exit_tables: list[SymbolicTable] = field(default_factory=list)
    exit_flags: list[SymbolicTable] = field(default_factory=list)
    user_names: dict[int, str] = field(default_factory=dict)
    mmio_names: dict[int, str] = field(default_factory=dict)
    slot_names: list[str] = field(default_factory=list)

    @classmethod
    def from_formats(cls, formats: dict[str, str], slot_names: Iterable[str] = ()) -> "Decoder":
        """Build from format texts keyed by event name ("kvm_exit", "kvm_userspace_exit", ...)."""
        d = cls(slot_names=list(slot_names))
        if "kvm_exit" in formats:
            d.exit_tables = symbolic_tables(formats["kvm_exit"], "exit_reason")
            d.exit_flags = symbolic_tables(formats["kvm_exit"], "exit_reason",
                                           call="__print_flags")
        if "kvm_userspace_exit" in formats:
            tables = symbolic_tables(formats["kvm_userspace_exit"], "reason")
            if tables:
                names = tables[0].entries
                prefix = os.path.commonprefix(list(names.values())) if len(names) > 1 else ""
                prefix = prefix[:prefix.rfind("_") + 1] if "_" in prefix else ""
                d.user_names = {k: v[len(prefix):] for k, v in names.items()}
        if "kvm_mmio" in formats:
            tables = symbolic_tables(formats["kvm_mmio"], "type")
            if tables:
                d.mmio_names = dict(tables[0].entries)
        return d

    def exit_name(self, isa: int, reason: int) -> str:
        """Name of a kvm_exit reason under instruction set `isa` (1 VMX, 2 SVM), as the kernel
        prints it, plus flags (e.g. "+FAILED_VMENTRY"); the number when the kernel has no name."""
        rec = {"isa": isa, "exit_reason": reason}
        table = select_table(self.exit_tables, rec)
        name = table.name("exit_reason", reason, rec=rec) if table else None
        if name is None:
            name = f"{reason:#x}" if isa == 2 else str(reason)
        for ft in self.exit_flags:
            if ft.applies(rec):
                flags = ft.flag_names("exit_reason", reason, rec=rec)
                if flags:
                    name += "+" + "+".join(flags)
                break
        return name

    def user_exit_name(self, a: int, b: int) -> str:
        """Name of a kvm_userspace_exit key: "IO", "MMIO", ... or "error:EINTR"."""
        if a == ERRNO_MARK:
            return "error:" + _errno.errorcode.get(b, str(b))
        return self.user_names.get(a, str(a))

    def decode(self, raw: RawMaps) -> tuple[dict[str, int], dict[str, int], dict[str, Histogram]]:
        """(counts, detail, latency) with names."""
        counts: dict[str, int] = {}
        detail: dict[str, int] = {}

        def add(d: dict[str, int], k: str, v: int) -> None:
            d[k] = d.get(k, 0) + v

        for (kind, a, b, c), v in raw.counts.items():
            if kind == K_EXIT:
                add(counts, "exit:" + self.exit_name(a, b), v)
            elif kind == K_USER_EXIT:
                add(counts, "userspace_exit:" + self.user_exit_name(a, b), v)
            elif kind == K_PIO:
                add(counts, f"pio:{'out' if b else 'in'}:{a:#x}", v)
            elif kind == K_MMIO:
                add(counts, "mmio:" + self.mmio_names.get(a, str(a)), v)
            elif kind == K_MSR:
                rw = "write" if a else "read"
                add(counts, f"msr:{rw}", v)
                add(detail, f"msr:{rw}:{b:#x}" + (":#GP" if c else ""), v)
        for slot, v in raw.slots.items():
            if v:
                name = self.slot_names[slot] if slot < len(self.slot_names) else f"slot{slot}"
                add(counts, name, v)

        latency: dict[str, Histogram] = {}
        for (kind, a, b, slot), v in raw.hist.items():
            key = self._lat_key(kind, a, b)
            h = latency.setdefault(key, Histogram({}, 0, 0))
            h.buckets[slot] = h.buckets.get(slot, 0) + v
        for (kind, a, b), (n, total) in raw.sums.items():
            key = self._lat_key(kind, a, b)
            h = latency.setdefault(key, Histogram({}, 0, 0))
            h.count += n
            h.total_ns += total
        return counts, detail, latency

    def _lat_key(self, kind: int, a: int, b: int) -> str:
        if kind == L_EXIT:
            return "exit:" + self.exit_name(a, b)
        prefix = {L_USER: "userspace:", L_RUN: "run:"}.get(kind, f"kind{kind}:")
        return prefix + self.user_exit_name(a, b)


# kvmmmu events that fire per guest page-table walk (not per fault or exit)
WALK_EVENTS = ("kvm_mmu_pagetable_walk", "kvm_mmu_paging_element", "kvm_mmu_walker_error")


def event_key(system: str, event: str) -> str:
    """Count key of a count-only event: "cpuid" for kvm:kvm_cpuid, "mmu:get_page" for
    kvmmmu:kvm_mmu_get_page."""
    if system == "kvmmmu":
        for prefix in ("kvm_mmu_", "kvm_"):
            if event.startswith(prefix):
                return "mmu:" + event[len(prefix):]
        return "mmu:" + event
    for ev, key in FALLBACK_EVENTS:
        if ev == event:
            return key
    return event[4:] if event.startswith("kvm_") else event


# --------------------------------------------------------------------------------------------
# the tracer

def _tgid_of(pid: int) -> int:
    """The process (tgid) a pid or thread id belongs to; UsageError if it does not exist."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    raise UsageError(f"no such process: {pid}")


class Tracer:
    """Trace the KVM activity of some processes (all of them when `pids` is None).

    Use as a context manager: attaching happens on entry (about 0.3-0.6 s, mostly clang), and
    `snapshot()` can be called any number of times while attached::

        with Tracer([vmm_pid]) as t:
            ...            # let the VMM run
            result = t.snapshot()

    `source`: "auto" (kvm_exit where it can fire, plus the fallback events), "kvm_exit" or
    "fallback". `follow_children`: processes forked by a traced process are traced too, which
    makes `Tracer([os.getpid()], follow_children=True)` followed by starting a command a
    race-free way to trace that command from its first instruction. `share_with_perf`: let
    the traced events through to other perf users of the same tracepoints (`perf stat -e kvm:*`
    reads 0 while we are attached otherwise; measured cost: within noise). Raises
    `TracingUnavailable` with the reason when tracing cannot work here.
    """

    def __init__(self, pids: list[int] | None = None, *, source: str = "auto",
                 follow_children: bool = False, share_with_perf: bool = True,
                 cache_dir: str | None = None, mmu: str = "faults"):
        if source not in ("auto", "kvm_exit", "fallback"):
            raise UsageError(f"unknown trace source {source!r} (auto, kvm_exit, fallback)")
        if mmu not in ("faults", "all", "none"):
            raise UsageError(f"unknown mmu event set {mmu!r} (faults, all, none)")
        # "faults": every kvmmmu event but the per-walk ones, which fire for each guest page
        # walk KVM performs (about 20 per emulated instruction under PVM) and would dominate
        # the tracer's cost; "all" counts them too.
        self.mmu = mmu
        self.pids = None if pids is None else sorted({_tgid_of(int(p)) for p in pids})
        self.source = source
        self.follow_children = follow_children and pids is not None
        self.share_with_perf = share_with_perf
        self.cache_dir = cache_dir
        self.tracefs: str | None = None
        self.tracefs_mounted_by_us = False
        self.headers: HeaderStatus | None = None
        self.backend = kvm_backend()
        self.attach_s = 0.0
        self.attached: list[str] = []
        self.unavailable: list[str] = []
        self.notes: list[str] = []
        self._bpf = None
        self._decoder = Decoder()
        self._plan_exit = False
        self._plan_fallback = False
        self._t0 = 0.0
        self._base = RawMaps()
        self._base_t = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Tracer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Compile kvm_trace.c and attach it; records `attach_s` (wall time of this call)."""
        if self._bpf is not None:
            return
        t0 = time.perf_counter()
        self.attached, self.unavailable = [], []
        self._plan_exit = self._plan_fallback = False
        if not _is_root() and not _has_cap(_CAP_SYS_ADMIN):
            raise TracingUnavailable("not root: bcc tracing needs root")
        self.tracefs, self.tracefs_mounted_by_us = ensure_tracefs()
        self.headers = ensure_headers(self.cache_dir)
        if not self.headers.ok:
            raise TracingUnavailable(self.headers.reason)
        self.notes = [f"kernel headers: {self.headers.path} ({self.headers.reason})"]
        if self.tracefs_mounted_by_us:
            self.notes.insert(0, f"mounted tracefs at {self.tracefs}")
        try:
            bcc = _import_bcc(self.tracefs)
        except Exception as e:  # noqa: BLE001
            raise TracingUnavailable(f"bcc not importable ({type(e).__name__}: {e}); install "
                                     "python3-bpfcc and run scripts/bcc_shim.sh") from e

        cflags, slot_events, formats = self._plan()
        try:
            b = bcc.BPF(src_file=BPF_SOURCE.encode(), cflags=cflags)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception on compile errors
            raise TracingUnavailable(f"BPF program did not compile/load: {e}") from e
        try:
            if self.pids is not None:
                table = b[b"pids"]
                for pid in self.pids:
                    table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            for i, (system, event) in enumerate(slot_events):
                b.attach_tracepoint(tp=f"{system}:{event}".encode(), fn_name=f"count_slot_{i}".encode())
        except Exception as e:  # noqa: BLE001
            b.cleanup()
            raise TracingUnavailable(f"attaching tracepoints failed: {e}") from e
        self._bpf = b
        self._decoder = Decoder.from_formats(formats, [event_key(s, e) for s, e in slot_events])
        self.attached += [f"{s}:{e}" for s, e in slot_events]
        self.attach_s = time.perf_counter() - t0
        self._t0 = self._base_t = time.monotonic()

    def _plan(self) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
        """Decide which tracepoints to use from what this kernel has: (cflags, slot events,
        format texts for naming)."""
        root = self.tracefs
        have = lambda ev: event_exists("kvm", ev, root)  # noqa: E731
        if not have("kvm_userspace_exit") and not have("kvm_exit"):
            raise TracingUnavailable("no kvm tracepoints (is kvm loaded?)")
        follow = self.follow_children
        if follow and not event_exists("sched", "sched_process_fork", root):
            follow = False
            self.unavailable.append("follow children: sched:sched_process_fork does not exist")
        cflags = [f"-DTP_RET={1 if self.share_with_perf else 0}",
                  f"-DFILTER_PIDS={0 if self.pids is None else 1}",
                  f"-DFOLLOW_CHILDREN={1 if follow else 0}"]
        if follow:
            self.attached.append("sched:sched_process_fork")
        formats: dict[str, str] = {}
        slot_events: list[tuple[str, str]] = []

        want_exit = self.source in ("auto", "kvm_exit")
        if want_exit and not (have("kvm_exit") and have("kvm_entry")):
            if self.source == "kvm_exit":
                raise TracingUnavailable("kvm:kvm_exit/kvm_entry tracepoints do not exist here")
            self.unavailable.append("kvm:kvm_exit/kvm_entry: tracepoints do not exist")
            want_exit = False
        if want_exit and self.source == "auto" and self.backend == "pvm":
            self.unavailable.append("kvm:kvm_exit/kvm_entry: not attached, the PVM backend "
                                    "never fires them (exits are seen through kvm_userspace_exit"
                                    " and per-event tracepoints)")
            want_exit = False
        if want_exit and self.backend == "pvm":
            self.unavailable.append("kvm:kvm_exit/kvm_entry: attached as asked, but the PVM "
                                    "backend never fires them")
        if want_exit:
            formats["kvm_exit"] = read_format("kvm", "kvm_exit", root)
            cflags.append("-DHAVE_KVM_EXIT")
            if "isa" in parse_format(formats["kvm_exit"]).fields:
                cflags.append("-DKVM_EXIT_HAS_ISA")
            self.attached += ["kvm:kvm_exit", "kvm:kvm_entry"]
            self._plan_exit = True

        if self.source in ("auto", "fallback"):
            self._plan_fallback = True
            for ev, define in (("kvm_userspace_exit", "HAVE_USERSPACE_EXIT"), ("kvm_pio", "HAVE_PIO"),
                               ("kvm_mmio", "HAVE_MMIO"), ("kvm_msr", "HAVE_MSR"),
                               ("kvm_fpu", "HAVE_FPU")):
                if have(ev):
                    cflags.append(f"-D{define}")
                    self.attached.append(f"kvm:{ev}")
                    formats[ev] = read_format("kvm", ev, root)
                else:
                    self.unavailable.append(f"kvm:{ev}: tracepoint does not exist")
            if "kvm_msr" in formats and "exception" in parse_format(formats["kvm_msr"]).fields:
                cflags.append("-DMSR_HAS_EXCEPTION")
            if "kvm_fpu" not in formats and "kvm_userspace_exit" in formats:
                self.unavailable.append("run:* latency (needs kvm:kvm_fpu as the KVM_RUN entry "
                                        "mark); userspace:* ends at the next kvm event instead")
            slot_events = [("kvm", ev) for ev, _k in FALLBACK_EVENTS if have(ev)]
            mmu_events = list_events("kvmmmu", root) if self.mmu != "none" else []
            if self.mmu == "faults":
                walk = [ev for ev in mmu_events if ev in WALK_EVENTS]
                mmu_events = [ev for ev in mmu_events if ev not in WALK_EVENTS]
                if walk:
                    self.unavailable.append(
                        "not counted by default: " + ", ".join(f"kvmmmu:{e}" for e in walk)
                        + " (one per guest page walk KVM performs; Tracer(mmu='all') counts them)")
            elif self.mmu == "none":
                self.unavailable.append("kvmmmu events: not attached (mmu='none')")
            slot_events += [("kvmmmu", ev) for ev in mmu_events]
            if len(slot_events) > MAX_EVENT_SLOTS:
                dropped = slot_events[MAX_EVENT_SLOTS:]
                slot_events = slot_events[:MAX_EVENT_SLOTS]
                self.unavailable.append("not counted (out of BPF slots): "
                                        + ", ".join(f"{s}:{e}" for s, e in dropped))
        cflags.append(f"-DNUM_EVENT_SLOTS={len(slot_events)}")
        return cflags, slot_events, formats

    def close(self, wait: bool = True) -> None:
        """Detach and free the BPF programs and maps (idempotent).

        Detaching is the slow part: the kernel waits for an RCU grace period per tracepoint
        (~70-90 ms each here, ~2.6 s for ~30 tracepoints one by one). Detaching from several
        threads at once overlaps part of that (~1 s here). With `wait=False` it happens in a
        background thread and this returns at once (the interpreter still waits for it at exit).
        """
        b, self._bpf = self._bpf, None
        if b is None:
            return
        if wait:
            _detach_all(b)
        else:
            threading.Thread(target=_detach_all, args=(b,), name="vlab-trace-detach").start()

    # -- use ---------------------------------------------------------------------------------

    def add_pid(self, pid: int) -> None:
        """Start tracing one more process (needs a Tracer created with a pid list)."""
        if self._bpf is None or self.pids is None:
            raise UsageError("add_pid needs a started Tracer created with a pid list")
        tgid = _tgid_of(pid)
        self._bpf[b"pids"][ctypes.c_uint32(tgid)] = ctypes.c_uint8(1)
        if tgid not in self.pids:
            self.pids.append(tgid)

    def read_raw(self) -> RawMaps:
        """The current contents of the BPF maps (cumulative since start)."""
        if self._bpf is None:
            raise UsageError("Tracer is not started")
        b = self._bpf
        raw = RawMaps()
        for k, v in b[b"counts"].items():
            raw.counts[(k.kind, k.a, k.b, k.c)] = v.value
        slots = b[b"slot_counts"]
        for i in range(len(self._decoder.slot_names)):
            raw.slots[i] = int(slots.sum(ctypes.c_int(i)).value)
        for k, v in b[b"hist"].items():
            raw.hist[(k.kind, k.a, k.b, k.slot)] = v.value
        for k, v in b[b"sums"].items():
            raw.sums[(k.kind, k.a, k.b)] = (v.n, v.total_ns)
        raw.drops = int(b[b"drops"].sum(ctypes.c_int(0)).value)
        return raw

    def snapshot(self, reset: bool = False, *, total: bool = False) -> TraceResult:
        """Counts and latency so far: since the last `reset=True` snapshot, or since start.

        With `reset`, the next snapshot starts from here (done by subtraction in Python, so no
        event is lost between reading and clearing maps). `total` ignores resets and reports
        everything since start.
        """
        raw = self.read_raw()
        now = time.monotonic()
        if total:
            delta, elapsed = raw, now - self._t0
        else:
            delta, elapsed = raw.minus(self._base), now - self._base_t
        if reset:
            self._base, self._base_t = raw, now
        counts, detail, latency = self._decoder.decode(delta)
        exit_seen = any(k.startswith("exit:") for k in counts)
        other_seen = any(not k.startswith("exit:") for k in counts)
        unavailable = list(self.unavailable)
        if delta.drops:
            unavailable.append(f"{delta.drops} updates lost: BPF maps full (counts are low)")
        if self._plan_exit and (exit_seen or not self._plan_fallback or not other_seen):
            source = "kvm_exit"
        else:
            source = "fallback"
            if self._plan_exit and other_seen:
                unavailable.append("kvm:kvm_exit attached but did not fire while other kvm "
                                   "events did (this KVM backend does not trace exits)")
        return TraceResult(source=source, counts=counts, latency=latency, unavailable=unavailable,
                           detail=detail, backend=self.backend,
                           pids=None if self.pids is None else list(self.pids),
                           elapsed_s=elapsed, attach_s=self.attach_s, attached=list(self.attached),
                           notes=list(self.notes))


def _detach_all(b) -> None:
    """Detach every tracepoint of a bcc BPF object in parallel, then free the rest."""
    tps = list(getattr(b, "tracepoint_fds", {}).keys())
    if tps:
        with ThreadPoolExecutor(max_workers=min(16, len(tps))) as pool:
            list(pool.map(lambda tp: _quiet(b.detach_tracepoint, tp), tps))
    b.cleanup()


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - cleanup() below retries whatever is left
        pass


def run_traced(argv: list[str], *, source: str = "auto", interval: float | None = None,
               on_tick: Callable[[TraceResult], None] | None = None,
               share_with_perf: bool = True, **popen_kwargs) -> tuple[int, TraceResult]:
    """Run a command under the tracer, from its first instruction: `(returncode, result)`.

    Traces this process with `follow_children`, so the command (and anything it forks) is
    traced as soon as it exists. With `interval` and `on_tick`, `on_tick` gets a snapshot of
    the last interval every `interval` seconds (what `vlab trace -- COMMAND` shows live).
    `popen_kwargs` go to subprocess.Popen (stdout, stderr, env, ...).
    """
    with Tracer([os.getpid()], source=source, follow_children=True,
                share_with_perf=share_with_perf) as tracer:
        proc = subprocess.Popen(argv, **popen_kwargs)
        try:
            while True:
                try:
                    proc.wait(timeout=interval if (interval and on_tick) else None)
                    break
                except subprocess.TimeoutExpired:
                    on_tick(tracer.snapshot(reset=True))  # type: ignore[misc]
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if interval and on_tick:
            on_tick(tracer.snapshot(reset=True))
        return proc.returncode, tracer.snapshot(total=True)


# --------------------------------------------------------------------------------------------
# display

def _fmt_ns(v: float) -> str:
    if math.isnan(v):
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f} ms"
    if v >= 1e3:
        return f"{v / 1e3:.2f} µs"
    return f"{v:.0f} ns"


def format_table(result: TraceResult, *, top: int | None = None) -> str:
    """A plain-text table of a TraceResult: counts (with rate), latency, and what is unavailable.

    Used by `vlab trace` for its live display and final summary.
    """
    pids = "all" if result.pids is None else ",".join(map(str, result.pids))
    lines = [f"source: {result.source}  backend: {result.backend}  pids: {pids}  "
             f"elapsed: {result.elapsed_s:.2f} s  attach: {result.attach_s:.2f} s"]
    rows = sorted(result.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if top is not None:
        rows = rows[:top]
    width = max([len(k) for k, _ in rows] + [len(k) for k in result.latency] + [12])
    lines.append(f"{'event':<{width}}  {'count':>12}  {'per s':>12}")
    if not rows:
        lines.append(f"{'(no events)':<{width}}")
    for key, n in rows:
        rate = n / result.elapsed_s if result.elapsed_s > 0 else math.nan
        lines.append(f"{key:<{width}}  {n:>12}  {rate:>12.1f}")
    if result.latency:
        lines.append("")
        lines.append(f"{'latency':<{width}}  {'n':>12}  {'mean':>12}  {'p50':>12}  {'p99':>12}")
        for key, h in sorted(result.latency.items(), key=lambda kv: (-kv[1].count, kv[0])):
            lines.append(f"{key:<{width}}  {h.count:>12}  {_fmt_ns(h.mean_ns):>12}  "
                         f"{_fmt_ns(h.p50):>12}  {_fmt_ns(h.p99):>12}")
    if result.unavailable:
        lines.append("")
        lines.append("unavailable:")
        lines.extend(f"  - {u}" for u in result.unavailable)
    if result.notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(f"  - {n}" for n in result.notes)
    return "\n".join(lines)
