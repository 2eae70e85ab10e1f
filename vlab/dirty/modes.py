"""The three ways KVM reports dirty pages, by the names users type (`-p mode=`, `--mode`).

- `bitmap`: KVM_GET_DIRTY_LOG, which also write-protects the pages again;
- `clear`: KVM_GET_DIRTY_LOG with manual protect (KVM_CLEAR_DIRTY_LOG re-protects in batches);
- `ring`: the per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING), harvested and reset.

A module of its own so that command-line parsers can name the modes without importing the
tracker (numpy and the native binding).
"""
MODES = ("bitmap", "clear", "ring")
