"""Vectorised 64-bit digests of many byte segments at once (exact-dedup candidate keys).

Each segment is read as little-endian 64-bit words (unaligned loads from one strided view, the last word
masked to the segment's end); every word is keyed by its index in the segment, mixed (multiply-xorshift)
and summed per segment; the sum and the length go through the murmur3 64-bit finaliser.
"""
from __future__ import annotations

import numpy as np

_U = np.uint64
_C1, _C2, _C3 = _U(0xFF51AFD7ED558CCD), _U(0xC4CEB9FE1A85EC53), _U(0x9E3779B97F4A7C15)
_K_LEN = _U(0xD6E8FEB86659FD93)
_S33, _S29 = _U(33), _U(29)
PAD = 8  # bytes the caller must append after the last segment


def _fmix(x: np.ndarray) -> np.ndarray:
    x ^= x >> _S33
    x *= _C1
    x ^= x >> _S33
    x *= _C2
    x ^= x >> _S33
    return x


def segment_digests(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit digest (uint64 [n]) of each buf[offsets[i]:offsets[i+1]].

    `buf` (uint8) must have at least PAD readable bytes after offsets[-1]. Equal digests are candidates
    only: dedup confirms them by comparing the bytes, so a weak spot in the mixing costs time, not data.
    """
    n = len(offsets) - 1
    lens = np.diff(offsets).astype(np.int64)
    if len(buf) < offsets[-1] + PAD:
        raise ValueError("segment_digests needs PAD bytes after the last segment")
    h = np.zeros(n, np.uint64)
    nonempty = lens > 0
    if nonempty.any():
        starts, sl = offsets[:-1][nonempty], lens[nonempty]
        nw = (sl + 7) // 8
        wstart = np.cumsum(nw) - nw
        j = np.arange(int(nw.sum()), dtype=np.int64)
        j -= np.repeat(wstart, nw)  # word index within its segment
        pos = np.repeat(starts, nw)
        j <<= 3
        pos += j
        j >>= 3
        words = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))  # unaligned loads
        x = words[pos]
        del pos
        rem = (sl - 8 * (nw - 1)).astype(np.uint64)  # bytes used in the last word, 1..8
        x[wstart + nw - 1] &= np.where(rem == 8, _U(0xFFFFFFFFFFFFFFFF), (_U(1) << (_U(8) * (rem % _U(8)))) - _U(1))
        jk = j.view(np.uint64)
        jk *= _C3
        x ^= jk
        x *= _C1
        x ^= x >> _S29
        h[nonempty] = np.add.reduceat(x, wstart)
    return _fmix(h ^ (lens.astype(np.uint64) * _K_LEN))
