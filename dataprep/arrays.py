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


def fill_ranges(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray, value: int) -> None:
    """buf[starts[i]:starts[i] + lens[i]] = value for every i (buf: writeable uint8). A range of 8 bytes or more
    is covered by 8-byte stores, the last one ending at the range's end, so no store leaves its range and an
    index costs 8 bytes instead of 1 (overlapping stores write the same value)."""
    starts, lens = np.asarray(starts, np.int64), np.asarray(lens, np.int64)
    short = lens < 8
    if short.any():
        buf[concat_ranges(starts[short], lens[short])] = value
        starts, lens = starts[~short], lens[~short]
    if len(lens) == 0:
        return
    nw = (lens + 7) >> 3
    at = concat_ranges(np.zeros(len(nw), np.int64), nw)  # word number within its range
    at <<= 3
    np.minimum(at, np.repeat(lens - 8, nw), out=at)
    at += np.repeat(starts, nw)
    words = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))  # unaligned 8-byte stores
    words[at] = np.uint64(value * 0x0101010101010101)
