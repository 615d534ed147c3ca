"""Checkpoint bookkeeping: which tag is good, what a crash leaves, keep-K, RNG state round trip."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.checkpoint import (LATEST, STATE_FILE, UNIVERSAL_SUFFIX, Checkpointer, CheckpointError, check_files,
                                 complete_tags, latest_tag, read_trainer_state, rng_state, set_rng_state, tag_for)


def make_tag(root, step: int, complete: bool = True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / STATE_FILE).write_text(f'{{"step": {step}}}')
    return d


def test_latest_is_the_newest_complete_checkpoint_whatever_the_pointer_says(tmp_path):
    assert latest_tag(tmp_path / "missing") is None and latest_tag(tmp_path) is None
    make_tag(tmp_path, 4)
    make_tag(tmp_path, 8)
    make_tag(tmp_path, 12, complete=False)              # renamed dirs always hold the state file; be strict anyway
    (tmp_path / ".tmp-step00000016").mkdir()            # a save that crashed
    assert complete_tags(tmp_path) == [tag_for(4), tag_for(8)]
    assert latest_tag(tmp_path) == tag_for(8)           # no pointer (crash before the first pointer write)
    (tmp_path / LATEST).write_text(tag_for(4))
    assert latest_tag(tmp_path) == tag_for(8)           # a crash between step 8's rename and the pointer's update
    (tmp_path / LATEST).write_text(tag_for(12))
    assert latest_tag(tmp_path) == tag_for(8)           # a dangling pointer is not trusted
    assert read_trainer_state(tmp_path, tag_for(8)) == {"step": 8}
    with pytest.raises(Exception, match="unreadable trainer state"):
        read_trainer_state(tmp_path, tag_for(12))


def test_partial_saves_are_removed_at_start_up(tmp_path):
    make_tag(tmp_path, 4)
    partial = tmp_path / ".tmp-step00000008"
    partial.mkdir()
    (partial / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")
    half_pruned = make_tag(tmp_path, 2, complete=False)       # a crash while pruning: state file deleted first
    (tmp_path / (half_pruned.name + UNIVERSAL_SUFFIX)).mkdir()  # ... before its universal form
    (tmp_path / ".latest.x1y2.tmp").write_text("step000")      # a crash while the pointer was written
    ckpt = Checkpointer(tmp_path, keep=2, rank=0, world_size=1)
    assert ckpt.remove_partial_saves() == [partial.name, half_pruned.name]
    assert not partial.exists() and not half_pruned.exists() and complete_tags(tmp_path) == [tag_for(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(4)]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(tmp_path, keep=0, rank=0, world_size=1)


def test_replacing_a_checkpoint_of_the_same_step_survives_a_crash_at_any_point(tmp_path, monkeypatch):
    import os

    import pretrain.checkpoint as checkpoint

    ckpt = Checkpointer(tmp_path, keep=2, rank=0, world_size=1)

    def new_save(marker: str):
        tmp = tmp_path / ".tmp-step00000008"
        tmp.mkdir()
        (tmp / STATE_FILE).write_text(f'{{"step": 8, "run": "{marker}"}}')
        return tmp

    make_tag(tmp_path, 8)
    ckpt._publish(new_save("second"), tmp_path / tag_for(8))  # no crash: replaced, nothing left aside
    assert read_trainer_state(tmp_path, tag_for(8))["run"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(8)]

    real_rename = os.rename
    for crash_at in (1, 2):  # during the move aside, then between the move aside and the new name
        calls = []

        def rename(src, dst, _crash_at=crash_at, _calls=calls):
            _calls.append(src)
            if len(_calls) == _crash_at:
                raise OSError("node lost")
            real_rename(src, dst)

        monkeypatch.setattr(checkpoint.os, "rename", rename)
        with pytest.raises(OSError, match="node lost"):
            ckpt._publish(new_save("third"), tmp_path / tag_for(8))
        monkeypatch.setattr(checkpoint.os, "rename", real_rename)
        ckpt.remove_partial_saves()  # the next start
        assert complete_tags(tmp_path) == [tag_for(8)]
        assert read_trainer_state(tmp_path, tag_for(8))["run"] == "second"
        assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(8)]

    def lost(path):  # after the new checkpoint got its name, before the replaced one is deleted
        raise OSError("node lost")

    monkeypatch.setattr(checkpoint, "fsync_path", lost)
    with pytest.raises(OSError, match="node lost"):
        ckpt._publish(new_save("third"), tmp_path / tag_for(8))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-" + tag_for(8), tag_for(8)]
    assert ckpt.remove_partial_saves() == [".old-" + tag_for(8)]  # the next start: the replaced one goes
    assert read_trainer_state(tmp_path, tag_for(8))["run"] == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(8)]


def test_every_file_is_flushed_by_the_rank_that_wrote_it_before_the_checkpoint_gets_its_name(tmp_path, monkeypatch):
    """DeepSpeed fsyncs nothing: without our flush a node crash could leave `latest` naming empty partitions."""
    import pretrain.checkpoint as checkpoint

    class Engine:  # writes as DeepSpeed does: one file set per rank, ZeRO-1/2 also an unnamed model file
        def save_checkpoint(self, root, tag, client_state, save_latest):
            for r in range(12):
                for kind in ("zero_pp_rank_{}_mp_rank_00_model_states.pt",
                             "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt"):
                    (tmp_path / tag / kind.format(r)).parent.mkdir(exist_ok=True)
                    (tmp_path / tag / kind.format(r)).write_bytes(b"w")
            (tmp_path / tag / "mp_rank_00_model_states.pt").write_bytes(b"w")

    import rnalm.files as files

    flushed: dict[int, list[str]] = {}
    published: list[str] = []   # atomic_write's flushes: the temp file, then its directory

    def publish(path):  # a temp file named without its random part and .tmp
        name = Path(path).name
        published.append(name.rsplit(".", 2)[0] if name.endswith(".tmp") else name)

    monkeypatch.setattr(files, "fsync_path", publish)
    for rank in (11, 1, 0):  # rank 0 last: it publishes
        calls = flushed.setdefault(rank, [])
        monkeypatch.setattr(checkpoint, "fsync_path",
                            lambda p, _calls=calls: _calls.append(f"{p.parent.name}/{p.name}"))
        Checkpointer(tmp_path, keep=2, rank=rank, world_size=12).save(Engine(), 8, {"step": 8})
    assert published == [".trainer_state.json", ".tmp-" + tag_for(8), ".latest", tmp_path.name]
    tmp = ".tmp-" + tag_for(8)
    assert flushed[11] == [f"{tmp}/bf16_zero_pp_rank_11_mp_rank_00_optim_states.pt", f"{tmp}/rng_rank11.pt",
                           f"{tmp}/zero_pp_rank_11_mp_rank_00_model_states.pt"]   # not rank 1's
    assert flushed[1] == [f"{tmp}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", f"{tmp}/rng_rank1.pt",
                          f"{tmp}/zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert flushed[0][:4] == [f"{tmp}/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                              f"{tmp}/mp_rank_00_model_states.pt", f"{tmp}/rng_rank0.pt",
                              f"{tmp}/zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert flushed[0][4] == f"{tmp_path.name}/{tmp}"  # its entries, before the rename (then the parent's)
    assert latest_tag(tmp_path) == tag_for(8)


def test_only_failed_writes_become_one_line_save_errors(tmp_path):
    import errno

    from pretrain.checkpoint import CheckpointSaveError

    ckpt = Checkpointer(tmp_path, keep=2, rank=1, world_size=2)
    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2816 vs 2708\nmore")):
        with pytest.raises(CheckpointSaveError) as got, ckpt._failing_save_named(tmp_path / ".tmp-step00000002"):
            raise error
        assert str(got.value).startswith(f"rank 1 could not write checkpoint {tmp_path / '.tmp-step00000002'}: ")
        assert "GiB free there" in str(got.value) and "\n" not in str(got.value)
    lost_peer = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    with pytest.raises(RuntimeError) as got, ckpt._failing_save_named(tmp_path / ".tmp-step00000002"):
        raise lost_peer
    assert got.value is lost_peer                                # not a disk problem: its own traceback
    gone = Checkpointer(tmp_path / "gone", keep=2, rank=0, world_size=1)
    with pytest.raises(CheckpointSaveError, match="free space unknown"), gone._failing_save_named(tmp_path / "x"):
        raise OSError(errno.EIO, "Input/output error")


def test_a_checkpoint_deepspeed_did_not_load_is_an_error_not_a_fresh_start(tmp_path):
    """DeepSpeed's load_checkpoint logs a warning and returns (None, None) when it finds no checkpoint files: the
    run would go on from its fresh weights at the checkpoint's step."""
    class Engine:
        def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
            return None, None

    with pytest.raises(CheckpointError, match=re.escape(f"DeepSpeed could not load checkpoint {tmp_path / 'step8'}")):
        Checkpointer(tmp_path, keep=2, rank=0, world_size=1).load(Engine(), "step8")


def test_a_crash_while_pruning_leaves_no_complete_looking_half_checkpoint(tmp_path, monkeypatch):
    import pretrain.checkpoint as checkpoint

    for step in (4, 8, 12):
        make_tag(tmp_path, step)

    def killed(path, ignore_errors=False):
        raise SystemExit("killed while deleting " + str(path))

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        Checkpointer(tmp_path, keep=2, rank=0, world_size=1)._prune(keep_also=tag_for(12))
    assert complete_tags(tmp_path) == [tag_for(8), tag_for(12)]


def test_pruning_keeps_the_newest_and_removes_the_universal_forms_of_the_pruned(tmp_path):
    for step in (4, 8, 12):
        make_tag(tmp_path, step)
    for step in (4, 8):
        (tmp_path / (tag_for(step) + UNIVERSAL_SUFFIX)).mkdir()
    Checkpointer(tmp_path, keep=2, rank=0, world_size=1)._prune(keep_also=tag_for(12))
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(8), tag_for(8) + UNIVERSAL_SUFFIX, tag_for(12)]
    # the tag just saved survives even when it sorts among the oldest (a roll-back to an earlier step)
    make_tag(tmp_path, 2)
    Checkpointer(tmp_path, keep=1, rank=0, world_size=1)._prune(keep_also=tag_for(2))
    assert complete_tags(tmp_path) == [tag_for(2), tag_for(12)]


@pytest.mark.parametrize("earlier", ["replaced", "deleted"])
def test_a_new_checkpoint_of_a_step_removes_the_universal_form_of_the_earlier_one(tmp_path, earlier):
    # step 8 converted for another world size, then saved again (a resumed run stopped before its first step)
    # or deleted by hand and trained again (a roll-back): the old universal form must not be resumed from
    if earlier == "replaced":
        make_tag(tmp_path, 8)
    universal = tmp_path / (tag_for(8) + UNIVERSAL_SUFFIX)
    universal.mkdir()
    new = tmp_path / ".tmp-step00000008"
    new.mkdir()
    (new / STATE_FILE).write_text('{"step": 8}')
    Checkpointer(tmp_path, keep=2, rank=0, world_size=1)._publish(new, tmp_path / tag_for(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(8)]


def test_straight_run_kept_the_newest_two_and_points_at_the_last(straight_run):
    root = straight_run / "checkpoints"
    assert complete_tags(root) == [tag_for(8), tag_for(12)]
    assert (root / LATEST).read_text() == tag_for(12)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    state = read_trainer_state(root, tag_for(12))
    assert state["step"] == 12 and state["world_size"] == 2
    assert [s["rank"] for s in state["loader_states"]] == [0, 1]
    assert sorted(p.name for p in (root / tag_for(12)).glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]


FILE_SIZE_LIMIT = 256 * 1024  # the tiny model's optimizer state file is ~1.3 MB on one rank


def _file_size_limited():
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


@pytest.mark.slow
def test_a_save_that_cannot_be_written_names_the_checkpoint_and_keeps_the_last_good_one(pretrain_shards, tmp_path):
    """A full disk (here a file size limit: Python ignores SIGXFSZ, so the write fails with EFBIG) during a save:
    torch.save said only 'basic_ios::clear: iostream error' deep in a traceback; now one line names the
    checkpoint, the free space and what is intact, and the next start resumes from the last good checkpoint."""
    import subprocess

    from .trainer_runs import PY, REPO, run_trainer, trainer_cmd, trainer_env

    out = tmp_path / "run"
    run_trainer(pretrain_shards, out, "--train.max_steps=1", nproc=1)
    args = trainer_cmd(pretrain_shards, out, "--train.max_steps=2", nproc=1)[5:]  # plain python: one rank's stderr
    proc = subprocess.run([PY, "-m", "pretrain.train", *args], cwd=REPO,
                          env=trainer_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limited)
    assert proc.returncode != 0
    tmp = out / "checkpoints" / f".tmp-{tag_for(2)}"
    assert f"python -m pretrain.train: error: rank 0 could not write checkpoint {tmp}: " in proc.stderr, \
        proc.stderr[-3000:]
    assert "GiB free there" in proc.stderr and "Traceback" not in proc.stderr
    assert latest_tag(out / "checkpoints") == tag_for(1)
    run_trainer(pretrain_shards, out, "--train.max_steps=2", nproc=1)     # room again: resumes at step 1
    assert latest_tag(out / "checkpoints") == tag_for(2) and not tmp.exists()


def test_rng_state_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves numpy's second Gaussian cached: part of the state too
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.normal(size=3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.normal(size=3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


class FakeGpuNode:
    """torch.cuda's RNG functions over one CPU generator per device (CI has no GPU); `current` is the device
    torch.cuda.set_device chose, the rank's LOCAL_RANK in the trainer."""

    def __init__(self, monkeypatch, devices: int, current: int):
        self.generators = [torch.Generator().manual_seed(100 + d) for d in range(devices)]
        self.current = current
        for name, fake in (("is_available", lambda: True), ("device_count", lambda: devices),
                           ("current_device", lambda: self.current),
                           ("get_rng_state", lambda: self.generators[self.current].get_state()),
                           ("set_rng_state", lambda state: self.generators[self.current].set_state(state)),
                           ("get_rng_state_all", lambda: [g.get_state() for g in self.generators])):
            monkeypatch.setattr(torch.cuda, name, fake)

    def draw(self, device: int | None = None) -> torch.Tensor:
        return torch.rand(3, generator=self.generators[self.current if device is None else device])


def save_and_reload(state, path):
    torch.save(state, path)
    return torch.load(path, weights_only=True)


def test_a_rank_resumes_its_own_gpus_rng_on_a_node_with_fewer_gpus(tmp_path, monkeypatch):
    """Saved by local rank 5 of an 8-GPU node, resumed by local rank 1 of a 4-GPU node (same world size): the
    dropout stream goes on where rank 5's device left it, and a device index the node lacks is never touched."""
    saved_on = FakeGpuNode(monkeypatch, devices=8, current=5)
    saved_on.draw(5)
    state = save_and_reload(rng_state(), tmp_path / "rng.pt")
    expected = saved_on.draw(5)
    resumed_on = FakeGpuNode(monkeypatch, devices=4, current=1)
    others = {d: resumed_on.generators[d].get_state() for d in (0, 2, 3)}
    set_rng_state(state)
    assert torch.equal(resumed_on.draw(), expected)
    assert all(torch.equal(resumed_on.generators[d].get_state(), s) for d, s in others.items())


def test_a_checkpoint_with_every_devices_rng_resumes_only_where_the_node_matches(tmp_path, monkeypatch):
    """Checkpoints saved before 2026-12-07 hold torch.cuda.get_rng_state_all(): the entry of this rank's device
    where the node has as many GPUs, else the CUDA generator is left alone (no IndexError)."""
    node = FakeGpuNode(monkeypatch, devices=4, current=2)
    legacy = rng_state() | {"cuda": torch.cuda.get_rng_state_all()}
    state = save_and_reload(legacy, tmp_path / "rng.pt")
    expected = node.draw(2)
    set_rng_state(state)
    assert torch.equal(node.draw(), expected)
    bigger = save_and_reload(legacy | {"cuda": legacy["cuda"] * 2}, tmp_path / "rng8.pt")  # an 8-GPU node's
    before = [g.get_state() for g in node.generators]
    set_rng_state(bigger)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(node.generators, before))


def whole_checkpoint(folder, world: int, bf16: bool = False):
    """The files of a ZeRO-3 checkpoint of `world` ranks, each a real torch.save archive."""
    folder.mkdir(parents=True)
    prefix = "bf16_" if bf16 else ""
    for r in range(world):
        for name in (f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                     f"rng_rank{r}.pt"):
            torch.save({"rank": r}, folder / name)
    (folder / STATE_FILE).write_text("{}")
    return folder


@pytest.mark.parametrize("damage, named", [
    ("rm zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt: missing"),
    ("rm zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt: missing"),
    ("rm rng_rank2.pt", "rng_rank2.pt: missing"),
    ("truncate zero_pp_rank_2_mp_rank_00_optim_states.pt", "zero_pp_rank_2_mp_rank_00_optim_states.pt: damaged"),
    ("truncate rng_rank0.pt", "rng_rank0.pt: damaged"),
    ("rm rng_rank0.pt rng_rank1.pt rng_rank2.pt", "rng_rank0.pt: missing"),  # every rank's: still named
])
def test_a_missing_or_truncated_file_of_any_rank_is_named(tmp_path, damage, named):
    folder = whole_checkpoint(tmp_path / tag_for(4), world=3)
    check_files(folder, 3)  # whole: no error
    action, *names = damage.split()
    if action == "rm":
        for name in names:
            (folder / name).unlink()
    else:
        name = names[0]
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=named):
        check_files(folder, 3)


def test_file_checks_follow_the_ranks_that_wrote_the_checkpoint(tmp_path):
    folder = whole_checkpoint(tmp_path / tag_for(4), world=2, bf16=True)
    check_files(folder, 2)
    with pytest.raises(CheckpointError, match="bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt: missing"):
        check_files(folder, 3)  # the state file says 3 ranks wrote it: one rank's files are gone


def test_a_bit_flipped_inside_any_archive_is_named(tmp_path):
    """check_archives reads every member against its CRC: torch.load would read the damaged bytes without a word.
    The first damaged file in name order is named, whichever file a rank reads."""
    import struct
    import zipfile

    from pretrain.checkpoint import check_archives

    folder = whole_checkpoint(tmp_path / tag_for(4), world=3)
    check_archives(folder)
    for name in ("zero_pp_rank_2_mp_rank_00_optim_states.pt", "rng_rank1.pt"):
        path = folder / name
        with zipfile.ZipFile(path) as archive:
            member = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
        data = bytearray(path.read_bytes())
        name_len, extra_len = struct.unpack_from("<HH", data, member.header_offset + 26)  # the local header's
        data[member.header_offset + 30 + name_len + extra_len + 2] ^= 0x01
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{folder / 'rng_rank1.pt'}: damaged checkpoint file \\(its member "
                                              ".*data.pkl fails its CRC check\\)"):
        check_archives(folder)


def test_a_save_starts_from_an_empty_temp_folder(tmp_path):
    """A crashed save of the same step by a larger world leaves its files in the temp folder (rank 0 removes them at
    start-up, but a save may follow a crash without a restart in between, e.g. a retried save): none gets into the
    new checkpoint."""
    class Engine:  # writes as DeepSpeed does
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (tmp_path / tag).mkdir(exist_ok=True)
            (tmp_path / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"w")

    stale = tmp_path / (".tmp-" + tag_for(8))
    stale.mkdir()
    (stale / "zero_pp_rank_5_mp_rank_00_model_states.pt").write_bytes(b"old")
    Checkpointer(tmp_path, keep=2, rank=0, world_size=1).save(Engine(), 8, {"step": 8})
    assert sorted(p.name for p in (tmp_path / tag_for(8)).iterdir()) == [
        "rng_rank0.pt", STATE_FILE, "zero_pp_rank_0_mp_rank_00_model_states.pt"]
