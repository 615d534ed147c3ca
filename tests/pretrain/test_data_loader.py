"""PretrainLoader end to end on small shard sets written with dataprep.shards' writer."""
from __future__ import annotations

import errno
import gzip
import itertools
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zstandard

from dataprep.shards import ShardError, read_manifest
from pretrain.data import DataConfig, PretrainLoader
from pretrain.data.stream import read_records, read_shard
from pretrain.data.synthetic import cluster_members, synthetic_corpus, write_shards
from rnalm.tokenizer import CLS_ID, encode


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(3000, seed=11, valid_fraction=0.15)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, **corpus, records_per_shard=300, block_records=64)
    return out


@pytest.fixture(scope="module")
def cluster_of(corpus):
    return dict(zip(corpus["ids"], corpus["cluster_id"].tolist()))


# A kept pytest.raises error holds the test's frame in a reference cycle, and with it the loader's DataLoader
# iterator. Left to the cyclic collector, the iterator's semaphores are unlinked before its __del__ stops the
# workers, and a spawned worker still starting (seconds on a loaded machine) cannot open them: an ignored 'DataLoader
# worker exited unexpectedly' warning in whichever later test the collector ran. Tests `del` such errors.


def train_ids(corpus) -> set[str]:
    return {i for i, s in zip(corpus["ids"], corpus["split"]) if s == "train"}


def config(shards, **kw) -> DataConfig:
    base = dict(token_budget=2048, max_len=256, shuffle_buffer=200, num_workers=0, seed=7)
    return DataConfig(str(shards), **{**base, **kw})


def take(loader, n=None):
    """(ids, tokens, targets) per batch, for n batches (or the whole pass)."""
    return [(b.ids, b.tokens.numpy().tobytes(), b.targets.numpy().tobytes()) for b in itertools.islice(loader, n)]


def sample_ids(batches) -> list[str]:
    return [i for ids, _, _ in batches for i in ids]


@pytest.mark.parametrize("world", [1, 3])
def test_one_pass_covers_the_split_once_disjoint_across_ranks(shards, corpus, world):
    cfg = config(shards, sampling="uniform", infinite=False, num_workers=2 if world == 1 else 0)
    per_rank = [sample_ids(take(PretrainLoader(cfg, rank=r, world_size=world))) for r in range(world)]
    every = [i for ids in per_rank for i in ids]
    assert Counter(every) == Counter(train_ids(corpus))
    sizes = [len(ids) for ids in per_rank]
    assert max(sizes) - min(sizes) <= 1  # records are split evenly at record granularity


def test_validation_pass_is_identical_every_time(shards, corpus):
    cfg = config(shards, split="valid", sampling="uniform", infinite=False, num_workers=2)
    loader = PretrainLoader(cfg)
    first = take(loader)
    assert take(loader) == first  # same records, crops and masks; the finished pass resets the position
    assert set(sample_ids(first)) == {i for i, s in zip(corpus["ids"], corpus["split"]) if s == "valid"}
    assert loader.state_dict()["streams"] == PretrainLoader(cfg).state_dict()["streams"]


@pytest.mark.parametrize("max_records", [1, 157, 10**6])
def test_a_capped_validation_pass_reads_the_same_records_at_any_world_size(shards, corpus, max_records):
    """max_records (train.valid_max_records): the split's first N records in its seeded order, shared by the ranks,
    so a run requeued on another node count validates on the same records (it was N batches per rank)."""
    valid = {i for i, s in zip(corpus["ids"], corpus["split"]) if s == "valid"}
    layouts = {}
    for world, workers in ((1, 0), (2, 2), (3, 1)):
        cfg = config(shards, split="valid", sampling="uniform", infinite=False, max_records=max_records,
                     num_workers=workers)
        layouts[world, workers] = [i for r in range(world) for i in sample_ids(take(PretrainLoader(cfg, r, world)))]
    one = layouts[1, 0]
    assert len(one) == len(set(one)) == min(max_records, len(valid)) and set(one) <= valid
    assert all(sorted(ids) == sorted(one) for ids in layouts.values())


def test_uniform_epochs_are_permutations_in_new_orders(shards, corpus):
    train = train_ids(corpus)
    ids = sample_ids(take(PretrainLoader(config(shards, sampling="uniform")), 2 * len(train) // 16))
    e0, e1 = ids[:len(train)], ids[len(train):2 * len(train)]
    assert len(ids) >= 2 * len(train)
    assert sorted(e0) == sorted(train) == sorted(e1) and e0 != e1


def test_each_epoch_draws_new_crops_masks_and_order_even_from_one_shard(tmp_path):
    """One shard (the shard order cannot change): the next epoch must still shuffle anew and give every record a
    new crop and mask; a shuffle or record key that left out the epoch repeated epoch 0 exactly."""
    small = synthetic_corpus(150, seed=4)
    write_shards(tmp_path, **small, records_per_shard=1000, block_records=64)
    assert len(read_manifest(tmp_path).split_shards("train")) == 1
    rows = []
    for b in PretrainLoader(config(tmp_path, sampling="uniform", shuffle_buffer=64)):
        cu = b.cu_seqlens.tolist()
        rows += [(i, b.tokens[a:z].tolist(), b.targets[a:z].tolist()) for i, a, z in zip(b.ids, cu[:-1], cu[1:])]
        if len(rows) >= 300:
            break
    e0, e1 = rows[:150], rows[150:300]
    assert sorted(r[0] for r in e0) == sorted(r[0] for r in e1) == sorted(small["ids"])
    assert [r[0] for r in e0] != [r[0] for r in e1]
    again = {i: (tok, tgt) for i, tok, tgt in e1}
    assert sum(again[i] != (tok, tgt) for i, tok, tgt in e0) > 140


def test_cluster_sampling_takes_one_member_per_cluster_per_epoch(shards, corpus, cluster_of):
    clusters = {cluster_of[i] for i in train_ids(corpus)}
    ids = sample_ids(take(PretrainLoader(config(shards)), 2 * len(clusters) // 8))
    e0, e1 = ids[:len(clusters)], ids[len(clusters):2 * len(clusters)]
    for epoch in (e0, e1):
        assert sorted(cluster_of[i] for i in epoch) == sorted(clusters)
    sizes = Counter(cluster_of.values())
    pick0 = {cluster_of[i]: i for i in e0}
    changed = [c for c in clusters if sizes[c] > 1 and pick0[c] != {cluster_of[i]: i for i in e1}[c]]
    assert len(changed) > len([c for c in clusters if sizes[c] > 1]) // 2  # a new draw each epoch


def test_a_record_gets_the_same_crop_and_mask_on_any_layout(shards):
    def samples(world, workers):
        got = {}
        for r in range(world):
            for b in PretrainLoader(config(shards, infinite=False, num_workers=workers), r, world):
                cu = b.cu_seqlens.tolist()
                for i, (a, z) in enumerate(zip(cu[:-1], cu[1:])):
                    got[b.ids[i]] = (b.tokens[a:z].tolist(), b.targets[a:z].tolist())
        return got
    one, three = samples(1, 0), samples(3, 2)
    assert one.keys() == three.keys() and one == three
    assert any(tokens[0] != CLS_ID for tokens, _ in one.values())  # crops (no <cls>) are among them


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_with_the_same_world_size_continues_the_exact_stream(shards, workers, world):
    cfg = config(shards, num_workers=workers)
    n, cuts = 45, (11, 26)  # crosses an epoch boundary (~17-35 batches per epoch and rank)
    full = [take(PretrainLoader(cfg, r, world), n) for r in range(world)]
    loaders = [PretrainLoader(cfg, r, world) for r in range(world)]
    got = [[] for _ in range(world)]
    done = 0
    for cut in (*cuts, n):
        for r, loader in enumerate(loaders):
            got[r] += take(loader, cut - done)
        states = json.loads(json.dumps([loader.state_dict() for loader in loaders]))  # as a checkpoint stores it
        loaders = [PretrainLoader(cfg, r, world) for r in range(world)]
        for loader in loaders:
            loader.load_state_dict(states)
        done = cut
    assert got == full


def test_resume_twice_inside_one_shuffle_window_continues_the_exact_stream(shards):
    """The test above resumes in other windows each time; here both resumes fall in the first window (400
    records), the first past its middle, so the second starts from a state that already skipped most of it and
    must still count the window's records as the skipped ones plus those read since."""
    cfg = config(shards, sampling="uniform", shuffle_buffer=400)
    full = take(PretrainLoader(cfg), 30)
    got, state, skips = [], None, []
    for cut in (16, 20, 30):
        loader = PretrainLoader(cfg)
        if state:
            loader.load_state_dict(state)
        got += take(loader, cut - len(got))
        state = json.loads(json.dumps([loader.state_dict()]))
        (stream,) = state[0]["streams"]
        skips.append(stream["pieces"][0][3] if stream["pieces"][0][1] == 0 else None)
    assert 200 < skips[0] < skips[1]  # both resumes inside the window that starts at 0, the first past half of it
    assert got == full


@pytest.mark.parametrize("stages", [[(2, 2), (1, 0)], [(1, 2), (3, 1)], [(2, 0), (1, 2)],
                                    [(2, 2), (3, 0), (3, 0), (1, 2)]])
def test_resume_with_another_world_size_repeats_nothing(shards, corpus, stages):
    """Each stage (world size, workers) reads a few batches per rank and hands over; the last one finishes."""
    seen, states = [], None
    for k, (world, workers) in enumerate(stages):
        cfg = config(shards, sampling="uniform", infinite=False, num_workers=workers)
        loaders = [PretrainLoader(cfg, r, world) for r in range(world)]
        last = k == len(stages) - 1
        for r, loader in enumerate(loaders):
            if states:
                loader.load_state_dict(states)
            seen += sample_ids(take(loader, None if last else 3 + 2 * r))
        states = [loader.state_dict() for loader in loaders]
    assert Counter(seen) == Counter(train_ids(corpus))


def test_infinite_resume_on_fewer_ranks_finishes_the_epoch_without_repeats(shards, corpus):
    train = train_ids(corpus)
    cfg = config(shards, sampling="uniform")
    before = [PretrainLoader(cfg, r, 2) for r in range(2)]
    seen = [i for loader in before for i in sample_ids(take(loader, 9))]
    after = PretrainLoader(cfg)
    after.load_state_dict([loader.state_dict() for loader in before])
    rest = sample_ids(take(after, (len(train) - len(seen)) // 10))
    assert sorted(seen + rest[:len(train) - len(seen)]) == sorted(train)
    assert after.stats["epoch"] >= 1  # went on into the next epoch


def test_state_is_small_json_and_checked_on_load(shards):
    cfg = config(shards, num_workers=2)
    loaders = [PretrainLoader(cfg, r, 2) for r in range(2)]
    for loader in loaders:
        take(loader, 3)
    states = [loader.state_dict() for loader in loaders]
    assert len(json.dumps(states)) < 2000
    with pytest.raises(ValueError, match="seed"):
        PretrainLoader(config(shards, num_workers=2, seed=8)).load_state_dict(states)
    with pytest.raises(ValueError, match="ranks"):
        PretrainLoader(cfg).load_state_dict(states[:1])
    with pytest.raises(TypeError):
        PretrainLoader(cfg).load_state_dict(states[0])
    older = [{**st, "format": 1} for st in states]
    with pytest.raises(ValueError, match="loader state format 1 \\(want 2\\): a checkpoint of an earlier version"):
        PretrainLoader(cfg).load_state_dict(older)


def test_an_endless_loader_wants_a_record_per_stream(shards, corpus):
    records = sum(s == "train" for s in corpus["split"])
    with pytest.raises(ValueError, match=f"has {records} records, fewer than the {records + 1} streams"):
        PretrainLoader(config(shards, infinite=True), 0, records + 1)
    PretrainLoader(config(shards, infinite=False), 0, records + 1)  # one pass: a stream may get nothing


def test_stats_count_what_was_delivered(shards):
    loader = PretrainLoader(config(shards))
    batches = list(itertools.islice(loader, 5))
    assert loader.stats["batches"] == 5
    assert loader.stats["samples"] == sum(b.num_sequences for b in batches)
    assert loader.stats["tokens"] == sum(b.num_tokens for b in batches) <= 5 * 2048
    masked = sum(int((b.targets != -100).sum()) for b in batches)
    assert loader.stats["masked_tokens"] == masked and 0.1 < masked / loader.stats["tokens"] < 0.2
    crops = sum(int(n) == 254 and int(b.tokens[a]) != CLS_ID  # max_len - 2 nt, no <cls>
                for b in batches for a, n in zip(b.cu_seqlens[:-1].tolist(), b.lengths.tolist()))
    assert loader.stats["cropped"] == crops > 0


def corrupt_copy(shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    train = [s.path for s in read_manifest(out).split_shards("train")]
    truncated, garbled = out / train[1], out / train[4]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(garbled.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    garbled.write_bytes(bytes(data))
    missing = out / train[6]
    missing.unlink()
    return out, [str(truncated), str(garbled), str(missing)]


def test_corrupt_shards_are_reported_counted_and_skipped(shards, corpus, tmp_path, caplog):
    out, bad = corrupt_copy(shards, tmp_path)
    loader = PretrainLoader(config(out, sampling="uniform", infinite=False))
    with caplog.at_level(logging.WARNING, logger="pretrain.data.stream"):
        ids = sample_ids(take(loader))
    assert loader.stats["corrupt_shards_skipped"] == 3 and sorted(loader.stats["corrupt_shards"]) == sorted(bad)
    assert all(p in caplog.text for p in bad)
    assert len(ids) == len(set(ids)) and set(ids) < train_ids(corpus)
    intact = {i for s in read_manifest(out).split_shards("train") if str(out / s.path) not in bad
              for i in _shard_ids(out / s.path)}
    assert intact <= set(ids) and len(ids) > len(intact)  # the part before the damage is kept too


def test_the_blocks_before_damage_inside_a_shard_are_read(shards, tmp_path):
    """Truncated inside its second block, a shard still gives its first: reading grouped webdataset samples lost
    it, since a sample is handed out only once the next member has been read."""
    intact = shards / read_manifest(shards).split_shards("train")[0].path
    with tarfile.open(intact) as tar:
        second = tar.getmembers()[1]
    damaged = tmp_path / "shard.tar"
    damaged.write_bytes(intact.read_bytes()[: second.offset_data + second.size // 2])
    read = []
    with pytest.raises(ShardError) as e:
        read.extend((pos, len(block)) for pos, block in read_shard(damaged, 0, 300))
    assert read == [(0, 64)]
    assert str(e.value) == f"{damaged}: corrupt or truncated tar (ReadError: unexpected end of data)"


def test_a_range_inside_a_shard_decodes_only_its_blocks(shards, monkeypatch):
    """The blocks before the range are counted from their headers (a stream that starts late in a 1 GB shard
    once decoded all of it, every epoch and every resume)."""
    import pretrain.data.stream as stream
    from dataprep.shards import iter_blocks

    path = shards / read_manifest(shards).split_shards("train")[0].path
    every = list(iter_blocks(path))
    assert len(every) >= 3 and all(len(b) == 64 for b in every[:-1])
    decoded = []
    real = stream.decode_block
    monkeypatch.setattr(stream, "decode_block", lambda payload, where: decoded.append(where) or real(payload, where))
    got = list(read_shard(path, 130, 140))  # records 130..139: all in the third block
    assert [(pos, b.ids) for pos, b in got] == [(128, every[2].ids)]
    assert [w.rsplit(":", 1)[1] for w in decoded] == ["000002.rec.zst"]
    decoded.clear()
    got = list(read_shard(path, 128, 140))  # from the third block's first record: the second is not decoded
    assert [(pos, b.ids) for pos, b in got] == [(128, every[2].ids)]
    assert [w.rsplit(":", 1)[1] for w in decoded] == ["000002.rec.zst"]


def test_a_range_gives_exactly_its_records_and_a_shard_short_of_its_range_is_an_error(shards, tmp_path):
    path = _train_shard(shards, 0)
    every = _shard_ids(path)
    assert [(pos, b.ids) for pos, b in read_records(path, 60, 70)] == [(60, every[60:64]), (64, every[64:70])]
    short = tmp_path / "short.tar"  # a well-formed tar of the first block only: cut at a member boundary
    with tarfile.open(path) as tar, tarfile.open(short, "w") as out:
        first = tar.getmembers()[0]
        out.addfile(first, tar.extractfile(first))
    with pytest.raises(ShardError, match=r"short\.tar: ends after 64 records .* the manifest lists at least 70"):
        list(read_records(short, 60, 70))


def test_a_range_late_in_a_shard_reads_little_of_the_blocks_before_it(tmp_path, monkeypatch):
    """webdataset's tar iterator read every byte before the range: a stream starting late in a shard (at scale,
    every stream: 512 streams over 43 shards of 256 MB read ~7x the split each epoch) read all of it."""
    import pretrain.data.stream as stream

    write_shards(tmp_path, **synthetic_corpus(16000, seed=3, valid_fraction=0.0), records_per_shard=16000,
                 block_records=4000)
    path = _train_shard(tmp_path, 0)
    read = []

    def counting_open(name, mode="r", *args, **kwargs):
        f = open(name, mode, *args, **kwargs)
        real_read = f.read
        f.read = lambda n=-1: read.append(len(data := real_read(n))) or data
        return f
    monkeypatch.setattr(stream, "open", counting_open, raising=False)
    got = list(read_shard(path, 15990, 16000))
    assert [(pos, len(b)) for pos, b in got] == [(12000, 4000)]
    with tarfile.open(path) as tar:
        sizes = [m.size for m in tar]
    # the last block whole; of the three before it, their tar headers and a buffer's worth of their first bytes
    # (where the record count is)
    # (>= the last block: the reads went through the counted open, not around it)
    assert len(sizes) == 4 and sizes[-1] <= sum(read) <= sizes[-1] + 4 * 512 + 3 * 10_000, read


def test_a_block_header_whose_count_is_damaged_stops_the_shard_instead_of_shifting_its_records(tmp_path):
    """A stream starting late in a shard counts the blocks before its range from their headers alone, so the
    frame's checksum is never checked there: one flipped bit in a count (it lies near verbatim in the header's
    own zstd block) delivered records 11999-12008 as 12000-12009, 11999 twice over the run and 15999 never."""
    import struct

    from dataprep.shards import _HEADER

    write_shards(tmp_path, **synthetic_corpus(16000, seed=3, valid_fraction=0.0), records_per_shard=16000,
                 block_records=4000)
    path = _train_shard(tmp_path, 0)
    with tarfile.open(path) as tar:
        member = tar.getmembers()[1]
    data = bytearray(path.read_bytes())
    payload = bytes(data[member.offset_data: member.offset_data + member.size])

    def count(raw: bytes) -> int | None:  # the header's count as a reader without the check sees it
        try:
            with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
                return struct.unpack_from("<Q", reader.read(_HEADER.size), 8)[0]
        except (zstandard.ZstdError, struct.error):
            return None

    flip = next(i for i in range(64) if count(payload[:i] + bytes([payload[i] ^ 1]) + payload[i + 1:]) == 4001)
    data[member.offset_data + flip] ^= 1
    path.write_bytes(data)
    with pytest.raises(ShardError, match=r"000001\.rec\.zst: block header \(4001 records\) does not match"):
        list(read_shard(path, 12000, 12010))


def test_a_shard_restored_after_a_checkpoint_that_skipped_it_repeats_no_record(shards, tmp_path):
    """The RnalmShardsSkipped alert says: restore the shards, and the run resumes. A window's shuffle permuted the
    records that were read, so the restored shard's records moved every other one in the order, and the resumed
    epoch delivered again records it had delivered before the checkpoint (13 of them here)."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    cfg = config(copy, sampling="uniform", infinite=False)
    loader = PretrainLoader(cfg)
    victim = copy / loader.table.paths[3]
    order, cum = loader.table._epoch_order(0)
    at = list(order).index(3)
    lo, hi = int(cum[at]), int(cum[at + 1])
    saved = victim.read_bytes()
    victim.unlink()
    seen, states = [], []
    for batch in loader:
        seen.append(list(batch.ids))
        states.append(json.loads(json.dumps([loader.state_dict()])))
    victim.write_bytes(saved)
    # checkpoints taken inside a window that overlaps the missing shard, part of that window delivered
    inside = [k for k, st in enumerate(states) if (p := st[0]["streams"][0]["pieces"]) and p[0][3] > 0
              and p[0][1] < hi and p[0][1] + cfg.shuffle_buffer > lo]
    assert inside
    for k in inside:
        resumed = PretrainLoader(cfg)
        resumed.load_state_dict(states[k])
        delivered = [i for ids in seen[:k + 1] for i in ids] + sample_ids(take(resumed))
        assert len(delivered) == len(set(delivered)), k
        assert set(delivered) >= {i for ids in seen for i in ids}  # nothing read before the restore is lost


class FailingReads:
    """A shard file whose reads past byte `at` fail with EIO, `times` times (what a network file system can do)."""

    def __init__(self, path, at: int, times: int) -> None:
        self.path, self.at, self.times = str(path), at, times

    def open(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if str(path) != self.path:
            return f
        real_read = f.read

        def read(n=-1):
            if self.times and (n < 0 or f.tell() + n > self.at):
                self.times -= 1
                raise OSError(errno.EIO, "Input/output error")
            return real_read(n)
        f.read = read
        return f


def _train_shard(shards, i):
    return shards / read_manifest(shards).split_shards("train")[i].path


def test_a_read_error_is_retried_from_the_record_reached(shards, monkeypatch, caplog):
    """An I/O error inside a shard is retried; the pass delivers exactly what an undisturbed pass does (it used
    to skip the rest of the shard as corrupt for the epoch)."""
    import pretrain.data.stream as stream

    want = take(PretrainLoader(config(shards, sampling="uniform", infinite=False)))
    path = _train_shard(shards, 2)
    failing = FailingReads(path, at=path.stat().st_size // 2, times=2)
    monkeypatch.setattr(stream, "open", failing.open, raising=False)
    monkeypatch.setattr(stream, "RETRY_DELAY_S", 0.0)
    loader = PretrainLoader(config(shards, sampling="uniform", infinite=False))
    with caplog.at_level(logging.WARNING, logger="pretrain.data.stream"):
        got = take(loader)
    assert failing.times == 0 and caplog.text.count(f"{path}: read error after") == 2
    assert loader.stats["corrupt_shards_skipped"] == 0
    assert got == want


def test_a_read_error_that_persists_skips_the_shard_after_the_retries(shards, monkeypatch):
    import pretrain.data.stream as stream

    path = _train_shard(shards, 2)
    monkeypatch.setattr(stream, "open", FailingReads(path, at=path.stat().st_size // 2, times=-1).open,
                        raising=False)
    slept = []
    monkeypatch.setattr(stream.time, "sleep", slept.append)  # the back-off, recorded instead of waited for
    loader = PretrainLoader(config(shards, sampling="uniform", infinite=False))
    ids = sample_ids(take(loader))
    assert slept == [stream.RETRY_DELAY_S * 2 ** k for k in range(stream.READ_ATTEMPTS - 1)] and slept[0] == 1.0
    (reason,) = loader.stats["corrupt_shards"].values()
    assert re.fullmatch(rf"{re.escape(str(path))}: read error after \d+ records \(OSError: Input/output error\) "
                        rf"\(tried {stream.READ_ATTEMPTS} times\)", reason), reason
    assert set(_shard_ids(path)[:64]) <= set(ids)  # its first block lies before the failing byte


def _shard_ids(path):
    from dataprep.shards import iter_blocks
    return [i for block in iter_blocks(path) for i in block.ids]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_fatal_on_request(shards, tmp_path, workers):
    """The error is the shard's own one line also from a worker (a DataLoader re-raises a worker's exception
    as 'Caught ShardError in DataLoader worker process 0. Original Traceback ...')."""
    out, bad = corrupt_copy(shards, tmp_path)
    loader = PretrainLoader(config(out, sampling="uniform", infinite=False, on_corrupt="fail", num_workers=workers))
    with pytest.raises(ShardError) as e:
        take(loader)
    assert str(e.value).split(": ")[0] in bad and "\n" not in str(e.value)
    del e  # ends the loader's workers now (see above train_ids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_that_reads_nothing_pass_after_pass_names_the_shards_instead_of_spinning(shards, tmp_path, workers):
    """on_corrupt=skip skips damage while a stream has other records; a stream whose every record lies behind
    damage would retry for ever (and in training stall every other rank). With 0 workers every train shard is
    missing; with 2, every one is truncated inside its first member, and the error comes from a worker."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    train = {str(out / s.path) for s in read_manifest(out).split_shards("train")}
    for path in map(Path, train):
        if workers:
            path.write_bytes(path.read_bytes()[:1000])
        else:
            path.unlink()
    delivered = []
    with pytest.raises(ShardError, match="read no record in 16 whole pass") as e:
        delivered.extend(PretrainLoader(config(out, num_workers=workers)))
    named = set(re.findall(r"(/\S+?\.tar): ", str(e.value)))
    assert named <= train and (named == train or workers)  # a stream names the shards it met
    assert not delivered
    del e  # ends the loader's workers now (see above train_ids)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_validation_pass_over_unreadable_shards_ends_empty_and_names_them(shards, tmp_path, caplog, workers):
    """One pass cannot spin, so a validation stream whose part lies in missing shards ends its pass (it used to
    raise, and that rank took the job down although on_corrupt=skip); the trainer skips such a validation. The
    shards are counted although no batch follows them (the count used to travel with batches only: 0 here)."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    valid = {str(out / s.path) for s in read_manifest(out).split_shards("valid")}
    for path in valid:
        Path(path).unlink()
    loader = PretrainLoader(config(out, split="valid", sampling="uniform", infinite=False, num_workers=workers),
                            rank=0, world_size=2)
    assert take(loader) == []
    counted = set(loader.stats["corrupt_shards"])
    assert counted and counted <= valid and loader.stats["corrupt_shards_skipped"] == len(counted)
    if not workers:  # a worker's log records go to its own process
        assert set(re.findall(r"(/\S+?\.tar): ", caplog.text)) == counted
    with pytest.raises(ShardError):
        take(PretrainLoader(config(out, split="valid", sampling="uniform", infinite=False, on_corrupt="fail")))


def test_a_missing_shard_that_holds_a_streams_whole_part_of_an_epoch_is_skipped(shards, tmp_path):
    """With more streams than shards, one stream's part of an epoch can lie inside a single missing shard; the
    next epoch maps it to other shards, so on_corrupt=skip goes on (it used to end training at that epoch)."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    missing = out / read_manifest(out).split_shards("train")[3].path
    missing.unlink()
    world, met = 16, set()  # ~160 train records per stream, shards of 300
    for rank in range(world):
        loader = PretrainLoader(config(out, sampling="uniform"), rank, world)
        take(loader, 30)
        assert loader.stats["epoch"] >= 3
        met |= set(loader.stats["corrupt_shards"])
    assert met == {str(missing)}


def test_a_script_that_stops_mid_shard_exits_without_noise(shards):
    """A loader left suspended inside a shard (num_workers=0) is closed at interpreter exit; that used to print
    'Exception ignored in: <generator object read_shard ...> TypeError: catching classes that do not inherit
    from BaseException' (its except clause named tarfile.TarError, already torn down)."""
    script = ("from pretrain.data import DataConfig, PretrainLoader\n"
              f"batches = iter(PretrainLoader(DataConfig({str(shards)!r}, num_workers=0, shuffle_buffer=100)))\n"
              "print(next(batches).num_tokens)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and int(proc.stdout) > 0
    assert proc.stderr == ""


def test_bad_configs_are_refused_with_reasons(shards):
    with pytest.raises(ValueError, match="token_budget"):
        DataConfig(str(shards), token_budget=512, max_len=1024)
    with pytest.raises(ValueError, match="sampling"):
        DataConfig(str(shards), sampling="random")
    with pytest.raises(ValueError, match="one-pass"):
        DataConfig(str(shards), max_records=10)  # an endless (training) loader: every epoch would read other records
    with pytest.raises(ValueError, match="splits present"):
        PretrainLoader(config(shards, split="test"))
    with pytest.raises(ValueError, match="rank"):
        PretrainLoader(config(shards), rank=2, world_size=2)
    with pytest.raises(ShardError, match="nowhere: no such folder"):
        PretrainLoader(config(shards.parent / "nowhere"))


def read_fasta(path, limit):
    ids, seqs = [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if len(ids) == limit:
                    break
                ids.append(line[1:].split()[0])
                fam = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv).get("rfam_acc", "NA")
                seqs.append([fam, ""])
            else:
                seqs[-1][1] += line.strip().upper()
    return ids, seqs


def test_real_ncrna_records_come_out_as_their_tokens(ncrna_fasta, tmp_path):
    ids, seqs = read_fasta(ncrna_fasta, 3000)
    fams = sorted({f for f, _ in seqs})
    cluster = np.array([fams.index(f) if f != "NA" else len(fams) + k for k, (f, _) in enumerate(seqs)])
    raw = [s.encode() for _, s in seqs]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in raw], out=offsets[1:])
    write_shards(tmp_path, np.frombuffer(b"".join(raw), np.uint8), offsets, ids, cluster,
                 np.array(["train"] * len(ids)), records_per_shard=1000)
    cfg = DataConfig(str(tmp_path), sampling="uniform", infinite=False, mask_prob=0.0, max_len=512,
                     token_budget=4096, num_workers=2)
    by_id = dict(zip(ids, raw))
    seen = []
    for b in PretrainLoader(cfg):
        cu = b.cu_seqlens.tolist()
        for i, (a, z) in enumerate(zip(cu[:-1], cu[1:])):
            want = encode(by_id[b.ids[i]]).tolist()
            got = b.tokens[a:z].tolist()
            if len(want) <= 512:
                assert got == want
            else:  # cropped: 510 nt of the record, without <cls>/<eos>
                body = want[1:-1]
                assert len(got) == 510 and any(body[k:k + 510] == got for k in range(len(body) - 509))
            seen.append(b.ids[i])
    assert sorted(seen) == sorted(ids)


def test_hand_over_while_streams_are_in_different_epochs(shards, corpus):
    """Two workers' streams cross the epoch boundary at different times; a save in between is handed to one
    stream, which first finishes epoch 0, then the rest of epoch 1: each epoch is delivered exactly once."""
    from pretrain.data.sampling import cluster_pick

    cfg = config(shards, num_workers=2)
    train = corpus["split"] == "train"
    size, index = (a[train] for a in cluster_members(corpus["cluster_id"]))  # as write_shards stores them
    cid, ids = corpus["cluster_id"][train], np.array(corpus["ids"], dtype=object)[train]
    picks = Counter()
    for epoch in (0, 1):
        picks.update(ids[cluster_pick(cfg.seed, epoch, cid, size) == index].tolist())

    loader, seen = PretrainLoader(cfg), []
    it = iter(loader)
    for _ in range(200):
        seen += next(it).ids
        epochs = {s["pieces"][0][0] if s["pieces"] else s["next_epoch"] for s in loader.state_dict()["streams"]}
        if len(epochs) == 2:
            break
    assert epochs == {0, 1}
    states = [loader.state_dict()]
    del it
    after = PretrainLoader(config(shards, num_workers=0))
    after.load_state_dict(states)
    need = sum(picks.values()) - len(seen)
    rest = sample_ids(take(after, need // 10 + 2))
    assert Counter(seen + rest[:need]) == picks


def test_workers_are_spawned_not_forked(shards):
    """A fork of a process that runs threads (the trainer's metrics server, gloo, old DataLoader feeder
    threads) can deadlock in the child (CPython gh-112275, Python <= 3.11; a rank hung so in CI)."""
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    batches = iter(PretrainLoader(config(shards, num_workers=2)))
    next(batches)
    children = me.children()
    assert not [p for p in children if p.cmdline() == me.cmdline()]     # no fork of this process
    assert len([p for p in children if "multiprocessing.spawn" in " ".join(p.cmdline())]) >= 2
    batches.close()
