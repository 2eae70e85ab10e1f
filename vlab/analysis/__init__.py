"""Analysis of measured samples, dirty-page traces and paging models.

* `stats`: summaries and A/B comparison of samples (plain NumPy).
* `pagewalk`: page-walk reference counts per translation mode and a TLB simulator (numba).
* `dirty`: dirty-page traces, writable-working-set curves and the pre-copy migration model
  (numba, with NumPy oracles).

The names below are re-exported lazily so that `from vlab.analysis import summarize` does not
pay for importing numba; the numba modules load on first use of one of their names.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "stats": ("summarize", "cv", "mann_whitney_u", "compare_samples"),
    "pagewalk": ("PAGE_SIZES", "MODES", "page_bytes", "walk_refs", "model_table",
                 "predicted_cycles", "tlb_miss_rate", "tlb_miss_curve", "predicted_curve"),
    "dirty": ("DirtyTrace", "SparseDirtyTrace", "UnionTable", "load_trace", "union_table",
              "synthetic_trace", "wws_curve", "wws_curve_numpy", "precopy_sim",
              "precopy_sim_numpy", "precopy_sweep", "stop_and_copy", "TABLE_MAX_INTERVALS",
              "TRACE_FORMAT"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["stats", "pagewalk", "dirty"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return importlib.import_module(f".{name}", __name__)
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'vlab.analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
