"""Guest payloads compiled into the native library, and the parameter/results conventions.

A payload is a flat image with a `vlab_image_header` at its start, loaded at VLAB_GPA_IMAGE.
The host passes parameters in a page of u64 slots (0-15 the runtime's, 16+ the payload's) and
reads each vCPU's samples from its results area ([count][capacity][samples...]).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from vlab.vmm._native import ffi, lib

PARAM_MAGIC = 0x564C4142504152   # "VLABPAR"

# the guest-physical layout every payload shares (native/include/vlab.h)
GPA_PARAMS = lib.VLAB_GPA_PARAMS          # the parameter page
GPA_IMAGE = lib.VLAB_GPA_IMAGE            # where the payload image is loaded
GPA_RESULTS = lib.VLAB_GPA_RESULTS        # the vCPUs' results areas ...
RESULTS_SIZE = lib.VLAB_RESULTS_SIZE      # ... and their total size
GPA_MMIO = lib.VLAB_GPA_MMIO              # the unbacked MMIO window (accesses exit) ...
MMIO_SIZE = lib.VLAB_MMIO_SIZE            # ... and its size
GPA_DATA = lib.VLAB_GPA_DATA              # the first data slot
MAX_VCPUS = lib.VLAB_MAX_VCPUS            # vCPUs one Machine can have

# parameter slots owned by the runtime (mirrors native/guest/rt/rt.h)
P_MAGIC, P_NR_VCPUS, P_RESULTS_BASE, P_RESULTS_STRIDE, P_DATA_BASE, P_DATA_SIZE = range(6)
P_MMIO_BASE, P_TSC_KHZ, P_CR3, P_CR3_ALT, P_SHARED_BASE, P_SHARED_SIZE = range(6, 12)
P_ARG0 = 16
P_VCPU0 = 128        # per-vCPU blocks of 64 slots
P_VCPU_STRIDE = 64

# micro payload operations (mirrors enum op in native/guest/payloads/micro.c)
MICRO_OPS = {
    "nop": 0, "cpuid": 1, "out": 2, "in": 3, "mmio_write": 4, "mmio_read": 5, "vmcall": 6,
    "vmmcall": 7, "hlt": 8, "rdmsr": 9, "wrmsr": 10, "cr3_write": 11, "invlpg": 12,
    "syscall": 13, "rdtsc": 14, "rdtscp": 15, "pause": 16, "empty": 17, "int3": 18,
    "cr0_wp": 19, "cr4_pge": 20, "dr_write": 21, "dr_read": 22, "wbinvd": 23, "invd": 24,
    "ipi_self": 25, "eoi": 26, "cr8_write": 27, "cr8_read": 28, "timer_expired": 29,
    "timer_future": 30, "ipi_other": 31,
    "spin": 100, "triple_fault": 101, "assert_fail": 102, "print": 103, "touch": 104,
    "write_word": 105, "read_word": 106, "ud2": 107, "wait_word": 108,
    "syscall_cs": 109, "cpl0_cr3": 110, "rdmsr_value": 111,
    "irq_wait": 112, "irq_no_eoi": 113, "irq_masked": 114, "timer_storm": 115,
    "tsc_probe": 116, "apic_state": 117,
}
# Workload codes of the two payloads that take one (a payload's own enum, so each table mirrors
# its C file; the same word can name different loops in different payloads):
#: native/guest/payloads/dirty.c, enum workload
DIRTY_WORKLOADS = {"uniform": 0, "hotcold": 1, "sequential": 2, "ratelimited": 3, "readmostly": 4,
                   "counts": 5}
#: native/guest/payloads/migrate.c, W_COUNTER / W_UNIFORM (its "uniform" is a rate-limited
#: writer with a sequence table, not dirty.c's uniform random writer)
MIGRATE_WORKLOADS = {"counter": 0, "uniform": 1}

MICRO_F_MARK = 1
MICRO_F_SYNC = 2
MICRO_F_KEEP = 4      # wrmsr writes back the MSR's current value
MICRO_F_X2APIC = 8    # interrupt ops drive the local APIC in x2APIC mode (MSRs; CPL0)
MICRO_F_HALT = 16     # ipi_other's target halts between IPIs; irq_wait halts while waiting
# micro's argument slots beyond the seven every op takes (see native/guest/payloads/micro.c)
MICRO_ARG_STOP, MICRO_ARG_READY, MICRO_ARG_HALTING = 7, 8, 9
GPA_APIC = 0xFEE00000  # the local APIC's xAPIC page (identity-mapped when a Machine has an irqchip)


@dataclass(frozen=True)
class Payload:
    """A guest image and what its header says."""
    name: str
    image: bytes
    entry: int
    image_end: int

    @property
    def version(self) -> str:
        """Short hash of the image: results from another build of the payload don't compare."""
        return hashlib.sha256(self.image).hexdigest()[:12]


def payload_names() -> list[str]:
    out, i = [], 0
    while (p := lib.vlab_guest_image_name(i)) != ffi.NULL:
        out.append(ffi.string(p).decode())
        i += 1
    return out


@lru_cache(maxsize=None)
def load_payload(name: str) -> Payload:
    """The named payload compiled into this build of vlab."""
    size = ffi.new("uint64_t *")
    p = lib.vlab_guest_image(name.encode(), size)
    if p == ffi.NULL:
        raise ValueError(f"no guest payload {name!r}; built: {', '.join(payload_names())}")
    image = bytes(ffi.buffer(p, size[0]))
    hdr = ffi.cast("struct vlab_image_header *", ffi.from_buffer(image))
    return Payload(name, image, hdr.entry, hdr.image_end)
