"""vlab.trace: live KVM exit tracing with bcc (eBPF) on kvm tracepoints.

Public surface:

- `Tracer(pids, source="auto")`: context manager; `snapshot()` gives a `TraceResult` with
  `.source` ("kvm_exit" | "fallback"), `.counts`, `.latency` (`Histogram`s), `.unavailable`.
- `run_traced(argv)`: run a command traced from its first instruction.
- `status()`: `(ok, reason, detail)`: whether tracing works on this host (for `vlab doctor`).
- `format_table(result)`: the text table `vlab trace` prints.
- `ensure_headers()`, `ensure_tracefs()`, `read_format()`, `parse_symbolic()`: the pieces, for
  tools and tests. Exit-reason names always come from the kernel's tracepoint format files.

Importing this package is cheap and never imports bcc; bcc is loaded only when a Tracer starts
(or `status()` checks it), so hosts without bcc, headers or root lose tracing and nothing else.
"""
from __future__ import annotations

from vlab.trace._bpf import (FALLBACK_EVENTS, Decoder, Histogram, RawMaps, TraceResult, Tracer,
                   bpf_syscall_permitted, event_key, format_table, kvm_backend, run_traced,
                   status)
from vlab.trace._headers import HeaderStatus, ensure_headers
from vlab.trace._tracefs import (Field, SymbolicTable, TraceFormat, TracingUnavailable, ensure_tracefs,
                       eval_c_int, event_exists, list_events, parse_format, parse_symbolic,
                       read_format, select_table, symbolic_tables, tracefs_path)

__all__ = [
    "Tracer", "TraceResult", "Histogram", "run_traced", "status", "format_table",
    "TracingUnavailable", "HeaderStatus", "ensure_headers", "ensure_tracefs", "tracefs_path",
    "read_format", "parse_format", "parse_symbolic", "symbolic_tables", "select_table",
    "SymbolicTable", "TraceFormat", "Field", "eval_c_int", "event_exists", "list_events",
    "kvm_backend", "bpf_syscall_permitted", "event_key", "Decoder", "RawMaps", "FALLBACK_EVENTS",
]
