"""Random crop and MLM masking of many records at once (numpy over all tokens, no per-record loop).

RiNALMo's recipe: records longer than `max_len - 2` nt are cropped to a random `max_len - 2` nt window and get
no <cls>/<eos> (the model sees that it is a fragment); the others become `<cls> seq <eos>`. 15% of nucleotide
tokens are selected; of those 80% become <mask>, 10% a random standard nucleotide, 10% stay. Special tokens
are never selected. Every draw is a hash of the record key and the nucleotide's position in the record, so a
record gets the same crop and mask in a given epoch whichever rank, worker or batch reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnalm.batch import IGNORE_INDEX, ragged_arange
from rnalm.tokenizer import CLS_ID, EOS_ID, MASK_ID, NUCLEOTIDE_IDS, STANDARD_NUCLEOTIDE_IDS, encode_bytes

from .sampling import splitmix64, stream_at

_CROP_SALT = np.uint64(0x43524F50)
_STANDARD = np.array(STANDARD_NUCLEOTIDE_IDS, dtype=np.uint8)
_U24 = float(1 << 24)
MASK_TOKEN_SHARE = 0.8   # of the selected tokens become <mask>; 0.1 a random nucleotide, 0.1 stay as they are


@dataclass
class Samples:
    """Consecutive training samples: `tokens[offsets[i]:offsets[i + 1]]` is sample i."""

    tokens: np.ndarray   # uint8 [T] token ids
    targets: np.ndarray  # int8 [T] original id at selected positions, IGNORE_INDEX elsewhere
    offsets: np.ndarray  # int64 [n+1], offsets[0] == 0 (tokens per sample include <cls>/<eos> when present)
    ids: np.ndarray      # object [n] record ids
    cropped: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def slice(self, i: int, j: int) -> "Samples":
        a, b = int(self.offsets[i]), int(self.offsets[j])
        return Samples(self.tokens[a:b], self.targets[a:b], self.offsets[i:j + 1] - a, self.ids[i:j],
                       self.cropped[i:j])


def crop_and_mask(seq: np.ndarray, starts: np.ndarray, lengths: np.ndarray, keys: np.ndarray,
                  ids: np.ndarray, max_len: int, mask_prob: float) -> Samples:
    """Tokenise, crop and mask records `seq[starts[i]:starts[i] + lengths[i]]` with their uint64 `keys`."""
    n = len(lengths)
    room = max_len - 2
    cropped = lengths > room
    offset = np.zeros(n, dtype=np.int64)
    if cropped.any():
        spans = (lengths[cropped] - room + 1).astype(np.uint64)
        offset[cropped] = (splitmix64(keys[cropped] ^ _CROP_SALT) % spans).astype(np.int64)
    body = np.minimum(lengths, room)
    special = (~cropped).astype(np.int64)
    out_len = body + 2 * special
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(out_len, out=offsets[1:])
    out_start = offsets[:-1]

    within = ragged_arange(body)                 # nucleotide index inside the (cropped) body
    src = np.repeat(starts + offset, body) + within
    dst = np.repeat(out_start + special, body) + within
    tokens = np.empty(int(offsets[-1]), dtype=np.uint8)
    body_tokens = encode_bytes(seq[src])
    tokens[dst] = body_tokens
    tokens[out_start[~cropped]] = CLS_ID
    tokens[(out_start + out_len - 1)[~cropped]] = EOS_ID

    targets = np.full(len(tokens), IGNORE_INDEX, dtype=np.int8)
    if mask_prob > 0 and len(body_tokens):
        # One 64-bit draw per nucleotide, indexed by its position in the *uncropped* record.
        h = stream_at(np.repeat(keys, body), np.repeat(offset, body) + within)
        pick = ((h >> np.uint64(40)).astype(np.float64) < mask_prob * _U24) & (body_tokens >= NUCLEOTIDE_IDS[0])
        where, hp = dst[pick], h[pick]
        targets[where] = body_tokens[pick]
        action = ((hp >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float64) / _U24
        tokens[where[action < MASK_TOKEN_SHARE]] = MASK_ID
        rand = (action >= MASK_TOKEN_SHARE) & (action < 0.9)
        tokens[where[rand]] = _STANDARD[(hp[rand] & np.uint64(3)).astype(np.int64)]
    return Samples(tokens=tokens, targets=targets, offsets=offsets, ids=ids, cropped=cropped)
