"""Vectorised 64-bit digests of many byte segments at once (exact-dedup candidate keys).

Each segment is read as little-endian 64-bit words (unaligned loads from one strided view, the last word
masked to the segment's end); every word is mixed (multiply-xorshift) and weighted by a power of an odd
constant for its position in the segment (a polynomial hash mod 2**64); the sum and the length go through
the murmur3 64-bit finaliser.
"""
from __future__ import annotations

import numpy as np

_U = np.uint64
_C1, _C2, _C3 = _U(0xFF51AFD7ED558CCD), _U(0xC4CEB9FE1A85EC53), _U(0x9E3779B97F4A7C15)
_K_LEN = _U(0xD6E8FEB86659FD93)
_S33, _S29 = _U(33), _U(29)
PAD = 8  # bytes the caller must append after the last segment


def fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, in place."""
    x ^= x >> _S33
    x *= _C1
    x ^= x >> _S33
    x *= _C2
    x ^= x >> _S33
    return x


_P = _U(0x9E3779B97F4A7C15 | 1)  # odd, so its powers are invertible mod 2**64
_powers = np.ones(1, np.uint64)
_inverse_powers = np.ones(1, np.uint64)
_word_starts = np.zeros(1, np.int64)  # 8 * k


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**k and P**-k (mod 2**64) for k < n, grown by doubling and kept for the next call."""
    global _powers, _inverse_powers, _word_starts
    if len(_powers) < n:
        size = 1 << max(16, (n - 1).bit_length())  # next power of two: one build covers every chunk of a size
        p = np.empty(size, np.uint64)
        p[0] = 1
        k = 1
        with np.errstate(over="ignore"):
            while k < size:  # p[k:2k] = p[:k] * P**k
                m = min(k, size - k)
                np.multiply(p[:m], p[k - 1] * _P, out=p[k: k + m])
                k *= 2
        inv = _U(pow(int(_P), -1, 1 << 64))
        q = np.empty(size, np.uint64)
        q[0], k = 1, 1
        with np.errstate(over="ignore"):
            while k < size:
                m = min(k, size - k)
                np.multiply(q[:m], q[k - 1] * inv, out=q[k: k + m])
                k *= 2
        _powers, _inverse_powers, _word_starts = p, q, np.arange(0, 8 * size, 8, dtype=np.int64)
    return _powers, _inverse_powers


def segment_digests(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit digest (uint64 [n]) of each buf[offsets[i]:offsets[i+1]].

    `buf` (uint8) must have at least PAD readable bytes after offsets[-1]. Each 64-bit word is mixed and
    weighted by P**(its global word index); multiplying a segment's sum by P**-(its first word index) makes
    the weights relative to the segment start. Equal digests are candidates only: dedup confirms them by
    comparing the bytes, so a weak spot in the mixing costs time, not data.
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
        total = int(nw.sum())
        powers, inverse = _power_tables(total)
        pos = np.repeat(starts - 8 * wstart, nw)
        pos += _word_starts[:total]
        words = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))  # unaligned loads
        x = words[pos]
        del pos
        rem = (sl - 8 * (nw - 1)).astype(np.uint64)  # bytes used in the last word, 1..8
        x[wstart + nw - 1] &= np.where(rem == 8, _U(0xFFFFFFFFFFFFFFFF), (_U(1) << (_U(8) * (rem % _U(8)))) - _U(1))
        x *= _C1
        x ^= x >> _S29
        x *= powers[:total]
        h[nonempty] = np.add.reduceat(x, wstart) * inverse[wstart]
    return fmix64(h ^ (lens.astype(np.uint64) * _K_LEN))
