"""Small vectorised helpers over concatenated variable-length records."""
from __future__ import annotations

import numpy as np


def concat_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [starts[i], starts[i] + lens[i]) as one int64 array."""
    lens = np.asarray(lens, dtype=np.int64)
    out_start = np.cumsum(lens) - lens
    return np.repeat(np.asarray(starts, dtype=np.int64) - out_start, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def offsets_from_lengths(lens: np.ndarray) -> np.ndarray:
    """[0, cumsum(lens)...] as int64 (n + 1 entries)."""
    out = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=out[1:])
    return out
