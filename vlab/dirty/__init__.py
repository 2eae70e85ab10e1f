"""Dirty-page tracking and exact dirty rates: the one tracker, the guest workloads, `record()`.

- `tracker`: `DirtyTracker` over KVM's three dirty-log interfaces (bitmap, clear, ring), used by
  the dirty-rate experiments and by live migration alike.
- `workloads`: the `dirty` guest payload's workloads on their own vCPU thread.
- `record`: `record(...)` runs a workload, harvests every interval and returns a
  `DirtyRecording` checked page by page against the guest's own record.

The names below are the public surface (``vlab.dirty.record``, ``vlab.dirty.DirtyRecording``...).
"""
from vlab.dirty.record import (MODES, RECORDING_FORMAT, REGIONS, WORKLOADS, DirtyRecording,
                               DirtyTracker, Epoch, Harvest, RecordLayout, WorkloadGuest,
                               bitmap_pages, coarsen, pages_bitmap, popcount, record, zipf_table)

__all__ = ["record", "DirtyRecording", "DirtyTracker", "Harvest", "WorkloadGuest", "Epoch",
           "RecordLayout", "WORKLOADS", "MODES", "REGIONS", "coarsen", "zipf_table",
           "RECORDING_FORMAT", "popcount", "pages_bitmap", "bitmap_pages"]
