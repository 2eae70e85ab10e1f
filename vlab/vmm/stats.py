"""KVM binary statistics (KVM_GET_STATS_FD): names and layout come from the descriptors.

Nothing here hard-codes a statistic: the header says where the descriptors and data live, each
descriptor names one statistic, its type, unit and size. This is the tracer-less source of exit
counts, always available for vlab's own VMs.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

_HEADER = struct.Struct("<6I")          # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("<IhHII")         # flags, exponent, size, offset, bucket_size

TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
UNITS = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}


@dataclass(frozen=True)
class StatDesc:
    name: str
    kind: str
    unit: str
    exponent: int
    size: int
    offset: int


class StatsReader:
    """Reads one KVM stats file descriptor (a VM's or a vCPU's). Does not own the fd."""

    def __init__(self, fd: int):
        self.fd = fd
        head = os.pread(fd, _HEADER.size, 0)
        if len(head) != _HEADER.size:
            raise OSError("KVM stats: short header")
        _flags, name_size, num_desc, id_offset, desc_offset, self._data_offset = _HEADER.unpack(head)
        self.id = os.pread(fd, name_size, id_offset).split(b"\0", 1)[0].decode(errors="replace")
        dsize = _DESC.size + name_size
        raw = os.pread(fd, dsize * num_desc, desc_offset)
        descs = []
        for i in range(num_desc):
            chunk = raw[i * dsize:(i + 1) * dsize]
            flags, exponent, size, offset, _bucket = _DESC.unpack_from(chunk)
            name = chunk[_DESC.size:].split(b"\0", 1)[0].decode()
            descs.append(StatDesc(name, TYPES.get(flags & 0xF, str(flags & 0xF)),
                                  UNITS.get((flags >> 4) & 0xF, str((flags >> 4) & 0xF)),
                                  exponent, size, offset))
        self.descs = descs
        self._data_len = max((d.offset + 8 * d.size for d in descs), default=0)

    def read(self) -> dict[str, int | list[int]]:
        """All statistics now: scalars as int, histograms as lists of bucket counts."""
        data = os.pread(self.fd, self._data_len, self._data_offset)
        out: dict[str, int | list[int]] = {}
        for d in self.descs:
            vals = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            out[d.name] = vals[0] if d.size == 1 else list(vals)
        return out


def diff(after: dict, before: dict) -> dict[str, int]:
    """Change of every scalar statistic between two reads."""
    return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}


# Exits KVM counts that no guest instruction in a timed loop asked for: host interrupts,
# signals, and page faults KVM fixed on its own (as opposed to emulated MMIO faults).
def background_exits(delta: dict) -> int:
    """Exits in `delta` (a `diff`) caused by the host, not by the guest's operations."""
    bg = delta.get("irq_exits", 0) + delta.get("signal_exits", 0) + delta.get("nmi_window_exits", 0)
    bg += delta.get("irq_window_exits", 0) + delta.get("request_irq_exits", 0)
    if "pf_taken" in delta:
        bg += max(0, delta.get("pf_taken", 0) - delta.get("pf_emulate", 0))
    return bg


def guest_exits(delta: dict) -> int:
    """KVM's `exits` counter minus the background: the exits the guest's own code caused."""
    return delta.get("exits", 0) - background_exits(delta)
