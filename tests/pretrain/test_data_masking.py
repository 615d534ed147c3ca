"""Crop, MLM masking and token-budget packing on in-memory records."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data.masking import Samples, crop_and_mask
from pretrain.data.packing import Packer
from pretrain.data.plan import StreamState
from pretrain.data.stream import WindowPosition
from rnalm.batch import IGNORE_INDEX
from rnalm.tokenizer import CLS_ID, EOS_ID, MASK_ID, STANDARD_NUCLEOTIDE_IDS, UNK_ID, encode


def records(lengths, seed=0, alphabet=b"ACGU"):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    seq = np.frombuffer(alphabet, np.uint8)[rng.integers(0, len(alphabet), int(lengths.sum()))]
    starts = np.cumsum(lengths) - lengths
    keys = rng.integers(0, 2**63, len(lengths)).astype(np.uint64)
    ids = np.array([f"r{i}" for i in range(len(lengths))], dtype=object)
    return seq, starts, lengths, keys, ids


def split(s: Samples):
    return [(s.tokens[a:b], s.targets[a:b]) for a, b in zip(s.offsets[:-1], s.offsets[1:])]


def test_short_records_get_cls_eos_and_long_ones_are_cropped_without():
    seq, starts, lengths, keys, ids = records([10, 30, 31, 500])
    out = crop_and_mask(seq, starts, lengths, keys, ids, max_len=32, mask_prob=0.0)
    assert out.lengths.tolist() == [12, 32, 30, 30] and out.cropped.tolist() == [False, False, True, True]
    for (tok, tgt), a, n, cropped in zip(split(out), starts, lengths, out.cropped):
        body = encode(seq[a:a + n].tobytes(), add_special=False)
        assert np.all(tgt == IGNORE_INDEX)
        if not cropped:
            assert tok[0] == CLS_ID and tok[-1] == EOS_ID and np.array_equal(tok[1:-1], body)
        else:  # a window of max_len - 2 nucleotides of the record, no special tokens
            windows = np.lib.stride_tricks.sliding_window_view(body, 30)
            assert np.any(np.all(windows == tok, axis=1))


def test_a_slice_is_a_samples_of_its_own():
    out = crop_and_mask(*records([5, 40, 7, 3]), max_len=32, mask_prob=0.5)
    part = out.slice(1, 3)
    assert part.offsets.tolist() == [0, 30, 39] and part.ids.tolist() == ["r1", "r2"]
    assert [t.tolist() for t, _ in split(part)] == [t.tolist() for t, _ in split(out)[1:3]]
    assert np.array_equal(part.targets, out.targets[out.offsets[1]:out.offsets[3]])
    assert part.cropped.tolist() == [True, False]


def test_crop_offsets_vary_with_the_key_and_cover_the_record():
    seq, starts, lengths, keys, ids = records([200] * 400)
    seq[:] = ord("A")
    seq[starts] = ord("C")            # first nucleotide of every record
    seq[starts + 199] = ord("G")      # last nucleotide
    out = crop_and_mask(seq, starts, lengths, keys, ids, max_len=52, mask_prob=0.0)
    firsts = [tok[0] for tok, _ in split(out)]
    lasts = [tok[-1] for tok, _ in split(out)]
    c_id, g_id = encode("C", False)[0], encode("G", False)[0]
    assert 0 < firsts.count(c_id) < 30 and 0 < lasts.count(g_id) < 30  # offset 0 and the last offset both occur


def test_mask_rates_80_10_10_and_specials_never_masked():
    seq, starts, lengths, keys, ids = records(np.full(2000, 150))
    out = crop_and_mask(seq, starts, lengths, keys, ids, max_len=1024, mask_prob=0.15)
    specials = np.zeros(len(out.tokens), bool)
    specials[out.offsets[:-1]] = specials[out.offsets[1:] - 1] = True
    assert np.all(out.targets[specials] == IGNORE_INDEX)
    assert np.all(np.isin(out.tokens[specials], [CLS_ID, EOS_ID]))
    original = np.concatenate([encode(seq[a:a + n].tobytes()) for a, n in zip(starts, lengths)])
    sel = out.targets != IGNORE_INDEX
    assert np.array_equal(out.targets[sel], original[sel])          # targets are the original tokens
    assert np.array_equal(out.tokens[~sel], original[~sel])         # unselected tokens are untouched
    n_nt = int((~specials).sum())
    assert abs(sel.sum() / n_nt - 0.15) < 0.005
    masked = out.tokens[sel] == MASK_ID
    changed = (out.tokens[sel] != MASK_ID) & (out.tokens[sel] != original[sel])
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(changed.mean() - 0.1 * 3 / 4) < 0.01                 # random nucleotide, 1/4 equals the original
    assert np.all(np.isin(out.tokens[sel][~masked], STANDARD_NUCLEOTIDE_IDS))
    # the random 10% is uniform over the four standard nucleotides: with uniform records, so are the 20% left
    # unmasked (a draw over three of them still changes 3/4 of the tokens, so the rate above cannot tell)
    shares = np.array([np.mean(out.tokens[sel][~masked] == t) for t in STANDARD_NUCLEOTIDE_IDS])
    assert np.all(np.abs(shares - 0.25) < 0.02), shares
    drawn = out.tokens[sel][changed]
    assert np.all(np.abs([np.mean(drawn == t) - 0.25 for t in STANDARD_NUCLEOTIDE_IDS]) < 0.03)


def test_unknown_tokens_are_never_selected():
    seq, starts, lengths, keys, ids = records(np.full(300, 100), alphabet=b"AX")
    out = crop_and_mask(seq, starts, lengths, keys, ids, max_len=1024, mask_prob=0.5)
    original = np.concatenate([encode(seq[a:a + n].tobytes()) for a, n in zip(starts, lengths)])
    assert np.all(out.targets[original == UNK_ID] == IGNORE_INDEX)
    nucleotides = original > 4
    assert abs((out.targets[nucleotides] != IGNORE_INDEX).mean() - 0.5) < 0.03


def test_crop_and_mask_of_a_record_does_not_depend_on_its_neighbours():
    seq, starts, lengths, keys, ids = records([50, 700, 120, 3000, 33], seed=3)
    together = split(crop_and_mask(seq, starts, lengths, keys, ids, max_len=256, mask_prob=0.3))
    for i in range(5):
        alone = crop_and_mask(seq, starts[i:i + 1], lengths[i:i + 1], keys[i:i + 1], ids[i:i + 1], 256, 0.3)
        assert np.array_equal(alone.tokens, together[i][0]) and np.array_equal(alone.targets, together[i][1])
    keys2 = keys.copy()
    keys2[1] ^= np.uint64(1)
    other = split(crop_and_mask(seq, starts, lengths, keys2, ids, max_len=256, mask_prob=0.3))
    assert not np.array_equal(other[1][0], together[1][0])  # another key (epoch/seed) draws anew


def test_a_nucleotides_draw_follows_its_position_in_the_record_not_in_the_crop():
    """The module's promise: a nucleotide's selection is a hash of the key and its position in the uncropped
    record, so two crops of one record (other max_len) select the same nucleotides where they overlap."""
    seq, starts, lengths, keys, ids = records([400] * 60, seed=5)
    selected = []
    for max_len in (64, 130):
        out = crop_and_mask(seq, starts, lengths, keys, ids, max_len=max_len, mask_prob=0.5)
        assert out.cropped.all()
        per_record = []
        for (tok, tgt), a in zip(split(out), starts):
            body = encode(seq[a:a + 400].tobytes(), add_special=False)
            windows = np.lib.stride_tricks.sliding_window_view(body, max_len - 2)
            (offset,) = np.flatnonzero(np.all(windows == np.where(tgt >= 0, tgt, tok), axis=1))
            per_record.append((int(offset), {int(offset + k) for k in np.flatnonzero(tgt != IGNORE_INDEX)}))
        selected.append(per_record)
    overlaps = 0
    for (a, short), (b, long) in zip(*selected):
        common = set(range(max(a, b), min(a + 62, b + 128)))
        overlaps += len(common)
        assert short & common == long & common
    assert overlaps > 1000


def position(n: int) -> WindowPosition:
    return WindowPosition(epoch=0, start=0, piece_stop=1000, skip=0, ends=np.arange(1, n + 1), rest=(), next_epoch=1,
                          window=1000)


@pytest.mark.parametrize("budget", [64, 100, 257])
def test_packer_fills_greedily_never_splits_and_keeps_order(budget):
    rng = np.random.default_rng(budget)
    chunks = []
    for c in range(6):
        seq, starts, lengths, keys, ids = records(rng.integers(1, 62, 40), seed=c)
        s = crop_and_mask(seq, starts, lengths, keys, ids, max_len=64, mask_prob=0.15)
        s.ids = np.array([f"c{c}_{i}" for i in range(len(s))], dtype=object)
        chunks.append(s)
    packer = Packer(budget)
    out = []
    for c, s in enumerate(chunks):
        out += [(b.to_batch(), st) for b, st in packer.add(s, position(len(s)))]
    out.append((packer.flush()[0].to_batch(), None))
    all_ids = [i for s in chunks for i in s.ids]
    assert [i for b, _ in out for i in b.ids] == all_ids
    lengths = {i: int(n) for s in chunks for i, n in zip(s.ids, s.lengths)}
    pos = 0
    for k, (b, state) in enumerate(out):
        assert b.num_tokens <= budget
        assert b.lengths.tolist() == [lengths[i] for i in b.ids]
        assert int(b.cu_seqlens[-1]) == b.num_tokens and b.max_seqlen == max(b.lengths.tolist())
        assert b.cu_seqlens.dtype == torch.int32  # what the GPU's varlen kernels take (the CPU's sdpa takes any)
        starts = b.cu_seqlens[:-1].long()
        assert b.positions[starts].eq(0).all() and b.positions.max() == b.max_seqlen - 1
        if k + 1 < len(out):  # the next sample did not fit
            assert b.num_tokens + lengths[all_ids[pos + b.num_sequences]] > budget
            assert isinstance(state, StreamState)
        pos += b.num_sequences
    tokens = np.concatenate([s.tokens for s in chunks])
    assert np.array_equal(np.concatenate([b.tokens.numpy() for b, _ in out]), tokens)
    targets = np.concatenate([s.targets for s in chunks]).astype(np.int64)
    assert np.array_equal(np.concatenate([b.targets.numpy() for b, _ in out]), targets)


def test_packer_state_points_after_the_last_batched_sample():
    seq, starts, lengths, keys, ids = records(np.full(10, 18))
    s = crop_and_mask(seq, starts, lengths, keys, ids, max_len=64, mask_prob=0.0)  # 20 tokens each
    # the window's shuffled order from slot 3 on: its samples' slots (slots of unread or unselected records between)
    ends = np.array([5, 7, 8, 10, 11, 12, 15, 16, 17, 20])
    pos = WindowPosition(epoch=2, start=100, piece_stop=500, skip=3, ends=ends, rest=([2, 600, 700, 0],),
                         next_epoch=3, window=128)
    batches = list(Packer(60).add(s, pos))
    assert [b.lengths.tolist() for b, _ in batches] == [[20, 20, 20]] * 3
    assert batches[0][1].pieces == [[2, 100, 500, 8], [2, 600, 700, 0]]
    assert pos.after(0).pieces[0] == [2, 100, 500, 3]
    assert pos.after(10).pieces == [[2, 128, 500, 0], [2, 600, 700, 0]]  # window done: next window
    last = WindowPosition(epoch=2, start=384, piece_stop=500, skip=0, ends=ends, rest=(), next_epoch=3, window=128)
    assert last.after(10).to_dict() == {"pieces": [], "next_epoch": 3}  # the piece's last window: no empty piece left
