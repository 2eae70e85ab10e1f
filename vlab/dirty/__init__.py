"""Dirty-page tracking and exact dirty rates: the one tracker, the guest workloads, `record()`.

- `modes`: the three dirty-log interfaces by name (bitmap, clear, ring);
- `tracker`: `DirtyTracker` over them, used by the dirty-rate experiments and by live migration
  alike;
- `workloads`: the `dirty` guest payload's workloads on their own vCPU thread;
- `recording`: `record(...)` runs a workload, harvests every interval and returns a
  `DirtyRecording` checked page by page against the guest's own record.

The names below are the public surface (``vlab.dirty.record``, ``vlab.dirty.DirtyRecording``...).
They are loaded on first use, so that `vlab.dirty.modes` (what command-line parsers need) does
not pull in numpy and the native binding.
"""
from vlab.dirty.modes import MODES

__all__ = ["record", "DirtyRecording", "DirtyTracker", "Harvest", "WorkloadGuest", "Epoch",
           "RecordLayout", "WORKLOADS", "MODES", "REGIONS", "coarsen", "zipf_table",
           "RECORDING_FORMAT", "popcount", "pages_bitmap", "bitmap_pages"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'vlab.dirty' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module("vlab.dirty.recording"), name)
    globals()[name] = value
    return value
