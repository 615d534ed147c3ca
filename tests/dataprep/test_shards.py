"""Shard format: round trip, checksums, and clear errors on corrupt or truncated shards."""
from __future__ import annotations

import struct
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import zstandard

from dataprep.shards import (FORMAT_VERSION, RecordBlock, ShardError, ShardInfo, Manifest, ShardWriter, block_length,
                             decode_block, compress_block, iter_blocks, iter_records, read_manifest, write_manifest,
                             blocks_from_arrays)


def make_block(n: int = 50, seed: int = 0, labels: bool = True) -> RecordBlock:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 40, n)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    seq = np.frombuffer(b"ACGU", np.uint8)[rng.integers(0, 4, offsets[-1])]
    size = rng.integers(1, 5, n)
    return RecordBlock(seq=seq, offsets=offsets, ids=[f"r{seed}_{i}" for i in range(n)],
                       cluster_id=rng.integers(0, 1000, n), cluster_size=size,
                       index_in_cluster=rng.integers(0, size), source=rng.integers(0, 3, n).astype(np.int32),
                       labels=[f"RF{i % 7:05d}" if i % 3 else "" for i in range(n)] if labels else None)


def assert_same(a: RecordBlock, b: RecordBlock) -> None:
    assert len(a) == len(b)
    assert np.array_equal(a.seq, b.seq) and np.array_equal(a.offsets, b.offsets)
    assert a.ids == b.ids and a.labels == b.labels
    for f in ("cluster_id", "cluster_size", "index_in_cluster", "source"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("labels", [True, False])
def test_block_round_trip(labels):
    block = make_block(labels=labels)
    back = decode_block(compress_block(block))
    assert_same(block, back)
    assert back.sequence(3) == block.seq[block.offsets[3]:block.offsets[4]].tobytes()
    assert back.offsets.dtype == np.int64 and back.source.dtype == np.int32


def test_empty_block_round_trip():
    block = make_block(n=0)
    assert len(decode_block(compress_block(block))) == 0


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_block_length_reads_the_header_alone(n):
    assert block_length(compress_block(make_block(n=n))) == n
    for garbage in (b"not zstd at all", b"\x28\xb5\x2f\xfd" + b"\x00" * 20):
        with pytest.raises(ShardError, match="where-x: "):
            block_length(garbage, "where-x")
    with pytest.raises(ShardError, match="where-x: no dataprep record block header"):
        block_length(zstandard.ZstdCompressor().compress(b"RNB0" + b"\x00" * 60), "where-x")


def write_shard(path, blocks):
    w = ShardWriter(path)
    for b in blocks:
        w.write(b)
    return w, w.close()


def test_shard_round_trip_and_manifest(tmp_path):
    blocks = [make_block(seed=s) for s in range(3)]
    w, (nbytes, sha) = write_shard(tmp_path / "train" / "shard-000000.tar", blocks)
    assert not list((tmp_path / "train").glob("*.tmp-*"))
    with tarfile.open(tmp_path / "train" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000.rec.zst", "000001.rec.zst", "000002.rec.zst"]
    info = ShardInfo("train/shard-000000.tar", "train", w.records, w.blocks, w.tokens, nbytes, sha)
    write_manifest(tmp_path, Manifest(shards=[info], sources=[{"path": "x.fa"}], params={}, tools={}))
    m = read_manifest(tmp_path)
    assert m.shards == [info] and m.split_shards("valid") == []
    got = list(iter_blocks(m.shard_path(info), verify_checksum=True))
    for a, b in zip(blocks, got):
        assert_same(a, b)
    recs = list(iter_records(m.shard_path(info)))
    assert len(recs) == sum(len(b) for b in blocks) == info.records
    assert recs[0][0] == "r0_0" and recs[0][1] == blocks[0].sequence(0)


def test_a_shard_reads_as_a_webdataset_and_each_block_header_is_its_first_zstd_block(tmp_path):
    """The shards are WebDataset tars for anyone's pipeline: one sample per block, its key the block number. The
    header's zstd block of its own is what lets the loader count a member's records from its first bytes."""
    import io

    import webdataset as wds

    blocks = [make_block(n=3000, seed=s) for s in range(2)]
    write_shard(tmp_path / "shard-000000.tar", blocks)
    samples = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000", "000001"]
    for sample, block in zip(samples, blocks):
        assert_same(decode_block(sample["rec.zst"]), block)
        head = sample["rec.zst"][:64]  # frame header + the header's block: nothing of the columns
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(head)) as reader:
            assert len(reader.read(40)) == 40
        assert block_length(io.BytesIO(sample["rec.zst"])) == 3000


def test_blocks_from_arrays_rebases_offsets():
    big = make_block(n=10)
    parts = list(blocks_from_arrays(big.seq, big.offsets, big.ids, big.cluster_id, big.cluster_size,
                                    big.index_in_cluster, big.source, big.labels, block_records=4))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert all(p.offsets[0] == 0 for p in parts)
    assert b"".join(p.sequence(i) for p in parts for i in range(len(p))) == big.seq.tobytes()


def test_checksum_mismatch_names_file(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [make_block()])
    with pytest.raises(ShardError, match="s.tar.*sha256"):
        list(iter_blocks(path, verify_checksum=True, expected_sha256="0" * 64))


def test_truncated_shard(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [make_block(seed=s, n=500) for s in range(3)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="s.tar"):
        list(iter_blocks(path))


@pytest.mark.parametrize("damage", ["cut before a member", "cut inside a header", "a header byte flipped"])
def test_a_shard_cut_or_damaged_between_members_is_an_error_not_a_shorter_shard(tmp_path, damage):
    """tarfile's stream mode stopped quietly at the third member's header: 2 of 4 blocks, no error."""
    path = tmp_path / "s.tar"
    write_shard(path, [make_block(seed=s, n=500) for s in range(4)])
    assert len(list(iter_blocks(path))) == 4
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        third = tar.getmembers()[2].offset
    flipped = data[:third + 100] + bytes([data[third + 100] ^ 0xFF]) + data[third + 101:]
    path.write_bytes({"cut before a member": data[:third], "cut inside a header": data[:third + 100],
                      "a header byte flipped": flipped}[damage])
    with pytest.raises(ShardError, match=r"s.tar: truncated, or a damaged tar header, after 2 whole block"):
        list(iter_blocks(path))


def test_corrupt_block_names_member(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [make_block(n=500)])
    data = bytearray(path.read_bytes())
    data[512 + 200] ^= 0xFF  # inside the first member's zstd payload
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"s.tar:000000.rec.zst"):
        list(iter_blocks(path))


def test_unexpected_member(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(__file__, arcname="000000.txt")
    with pytest.raises(ShardError, match="unexpected tar member"):
        list(iter_blocks(path))


@pytest.mark.parametrize("payload", [b"", b"not zstd at all", b"\x28\xb5\x2f\xfd" + b"\x00" * 20])
def test_decode_garbage(payload):
    with pytest.raises(ShardError, match="where-x"):
        decode_block(payload, "where-x")


def test_missing_manifest(tmp_path):
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="malformed manifest"):
        read_manifest(tmp_path)
    # a manifest of another format version (a newer dataprep's, say) is refused, not read as this one
    write_manifest(tmp_path, Manifest(shards=[], sources=[], params={}, tools={}))
    text = (tmp_path / "manifest.json").read_text()
    assert read_manifest(tmp_path).shards == []
    (tmp_path / "manifest.json").write_text(text.replace(f'"version": {FORMAT_VERSION}', '"version": 999'))
    with pytest.raises(ShardError, match=f"unsupported manifest version 999 \\(want {FORMAT_VERSION}\\)"):
        read_manifest(tmp_path)


def test_block_length_refuses_a_header_that_does_not_match_the_frame():
    """The count is read without the rest of the frame, so its checksum cannot vouch for it: the header's sizes
    must add up to the frame's content size."""
    from dataprep.shards import compress_encoded, compressor, encode_block

    raw = bytearray(encode_block(make_block(n=50)))
    struct.pack_into("<Q", raw, 8, 51)                       # the count says 51 records, the frame holds 50
    with pytest.raises(ShardError, match=r"where-x: block header \(51 records\) does not match the frame's"):
        block_length(compress_encoded(compressor(), bytes(raw)), "where-x")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(encode_block(make_block(n=50)))
    with pytest.raises(ShardError, match="does not match the frame's unknown size"):
        block_length(no_size, "where-x")


def _tampered(block: RecordBlock, **fields) -> bytes:
    """`block` compressed with some of its fields replaced, as a damaged or foreign writer could leave it."""
    return compress_block(replace(block, **fields))


def test_a_shard_whose_block_numbers_skip_one_is_refused(tmp_path):
    """Members 000000 and 000002: a block lost from the middle of a shard (not only one out of order)."""
    import io

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for k in (0, 2):
            data = compress_block(make_block(n=5, seed=k))
            info = tarfile.TarInfo(f"{k:06d}.rec.zst")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"block 2 out of order \(expected 1\)"):
        list(iter_blocks(path))


def test_a_shard_whose_blocks_fail_midway_leaves_no_file(tmp_path):
    """A failed block (a read error, a stop) ends the shard: neither it nor its temp file is left in the set."""
    from dataprep.split import ShardJob
    from dataprep.write import WriteContext, _write_one

    def payloads():
        yield b"a block", 1, 1
        raise OSError("read error")

    job = ShardJob("train", 0, np.arange(8), np.arange(8))
    ctx = WriteContext(out_dir=str(tmp_path), store_dir="", cluster_dir="", block_records=4)
    with pytest.raises(OSError, match="read error"):
        _write_one(ctx, job, payloads())
    assert list((tmp_path / "train").iterdir()) == []


def test_encoding_refuses_ids_or_labels_of_another_count():
    good = make_block(n=4)
    for bad in (replace(good, ids=good.ids[:3]), replace(good, labels=[*good.labels, "x"])):
        with pytest.raises(ValueError, match="ids/labels length does not match the number of records"):
            compress_block(bad)


def test_each_inconsistency_of_a_decoded_block_is_refused():
    """Each consistency check of decode_block, on blocks whose zstd frame is intact (so no checksum catches them)
    but whose content a damaged or foreign writer left inconsistent; the error names the member."""
    from dataprep.shards import encode_block

    good = make_block(n=6, seed=3)
    raw = encode_block(good)

    def frame(content: bytes) -> bytes:
        return zstandard.ZstdCompressor().compress(content)

    short_end, swapped = good.offsets.copy(), good.offsets.copy()
    short_end[-1] -= 1
    swapped[2], swapped[3] = swapped[3], swapped[2]  # a record of negative length
    ids = b"".join(f"{i}\n".encode() for i in good.ids)
    at = raw.index(ids)
    moved = raw[:at] + b"\n" + ids[:-1] + raw[at + len(ids):]  # 6 newlines, but an id after the last one
    cases = [
        (r"block shorter than its header \(10 bytes\)", frame(raw[:10])),
        ("bad block magic b'RNB0'", frame(b"RNB0" + raw[4:])),
        (rf"block size {len(raw) + 1} does not match its header \(expected {len(raw)}\)", frame(raw + b"A")),
        ("record offsets are not monotonic from 0", frame(raw[:40] + struct.pack("<q", 1) + raw[48:])),
        ("record offsets are not monotonic from 0", _tampered(good, offsets=short_end)),
        ("record offsets are not monotonic from 0", _tampered(good, offsets=swapped)),
        ("index_in_cluster outside", _tampered(good, index_in_cluster=good.cluster_size.copy())),  # one past the last
        ("index_in_cluster outside", _tampered(good, cluster_size=np.zeros(6, np.int64),
                                               index_in_cluster=np.zeros(6, np.int64))),
        ("index_in_cluster outside", _tampered(good, index_in_cluster=np.full(6, -1))),
        ("expected 6 ids, found 7", _tampered(good, ids=[*good.ids[:5], "a\nb"])),
        ("expected 6 ids, found 6", frame(moved)),
    ]
    for message, payload in cases:
        with pytest.raises(ShardError, match=f"m.tar:000001.rec.zst: {message}"):
            decode_block(payload, "m.tar:000001.rec.zst")


def test_the_block_limit_is_the_frame_content_size(monkeypatch):
    import dataprep.shards as shards

    payload = compress_block(make_block(n=50))
    size = zstandard.get_frame_parameters(payload).content_size
    monkeypatch.setattr(shards, "_MAX_BLOCK_BYTES", size)
    assert len(decode_block(payload, "m")) == 50
    monkeypatch.setattr(shards, "_MAX_BLOCK_BYTES", size - 1)
    with pytest.raises(ShardError, match=f"m: block claims {size} bytes"):
        decode_block(payload, "m")


def test_a_member_that_is_not_a_file_is_refused(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("000000.rec.zst")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    with pytest.raises(ShardError, match="000000.rec.zst: unexpected tar member"):
        list(iter_blocks(path))


def test_the_checksum_is_found_in_the_manifest_for_a_path_relative_to_the_shards_folder(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "shard-000000.tar"
    _, (size, sha) = write_shard(path, [make_block(n=5)])
    write_manifest(tmp_path, Manifest(shards=[ShardInfo("train/shard-000000.tar", "train", 5, 1, 1, size, sha)],
                                      sources=[], params={}, tools={}))
    monkeypatch.chdir(tmp_path / "train")
    assert len(list(iter_blocks("shard-000000.tar", verify_checksum=True))) == 1
    (tmp_path / "train" / "other.tar").write_bytes(path.read_bytes())
    with pytest.raises(ShardError, match="other.tar: not listed in"):
        list(iter_blocks("other.tar", verify_checksum=True))


def test_a_missing_manifest_names_the_likely_mix_up(tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    write_manifest(out, Manifest(shards=[], sources=[], params={}, tools={}))
    with pytest.raises(ShardError, match=f"{out / 'train' / 'manifest.json'}: no manifest; give the build's output "
                                         f"folder {out}$"):
        read_manifest(out / "train")
    with pytest.raises(ShardError, match=f"{out / 'manifest.json'} is a file, not the output folder .*: give {out}$"):
        read_manifest(out / "manifest.json")
    with pytest.raises(ShardError, match=f"{tmp_path / 'nowhere'}: no such folder"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ShardError, match="was build_shards interrupted or never run"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("text", [b'{"shards": [{"path": "a", "extra": 1}], "version": 1}',
                                  b'{"shards": [], "\xff": 1}'])
def test_a_manifest_of_unknown_fields_or_bytes_is_malformed(tmp_path, text):
    (tmp_path / "manifest.json").write_bytes(text)
    with pytest.raises(ShardError, match=f"{tmp_path / 'manifest.json'}: malformed manifest"):
        read_manifest(tmp_path)
