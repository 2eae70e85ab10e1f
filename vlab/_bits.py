"""Page bitmaps, defined once: bit i of uint64 word w is 4 KiB page 64*w + i (KVM's dirty-log
layout, and the one vlab's traces, migration stream and dirty tracker use).

Plain NumPy and nothing else of vlab, so both the binding's users (dirty tracking, migration)
and the analysis models can import it.
"""
from __future__ import annotations

import numpy as np

_BYTE_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def bit_counts(a: np.ndarray) -> np.ndarray:
    """Set bits of each element of an unsigned integer array (same shape)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(a)
    a = np.ascontiguousarray(a)
    return _BYTE_COUNTS[a.view(np.uint8)].reshape(*a.shape, a.itemsize).sum(-1)


def popcount(words: np.ndarray, axis: int | None = None):
    """Set bits in a bitmap: an int, or with `axis` an int64 array (e.g. per row)."""
    if axis is None:
        return int(bit_counts(words).sum(dtype=np.int64))
    return bit_counts(words).sum(axis=axis, dtype=np.int64)


def bitmap_pages(words: np.ndarray, n_pages: int | None = None) -> np.ndarray:
    """Sorted indices (uint64) of the set bits of a uint64 bitmap, below `n_pages` if given."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")
    if n_pages is not None:
        bits = bits[:n_pages]
    return np.flatnonzero(bits).astype(np.uint64)


def pages_bitmap(pages: np.ndarray, n_pages: int) -> np.ndarray:
    """The uint64 bitmap (ceil(n_pages/64) words) with the given page indices set."""
    flags = np.zeros((n_pages + 63) // 64 * 64, dtype=bool)
    flags[np.asarray(pages).astype(np.int64)] = True
    return np.packbits(flags, bitorder="little").view(np.uint64)
