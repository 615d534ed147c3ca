"""atomic_write: whole or nothing, and readable by the team (the umask's mode, not mkstemp's 0600)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rnalm.files import atomic_write, check_out_dir, remove_stale_temps


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("content", ["text\n", b"\x00bytes", "callable"])
def test_written_whole_with_the_umask_mode(tmp_path, umask, content):
    path = tmp_path / "out.json"
    path.write_text("old")
    old_mask = os.umask(umask)
    try:
        if content == "callable":
            atomic_write(path, lambda p: (os.unlink(p), open(p, "w").write("from a writer")), durable=True)
        else:
            atomic_write(path, content)
    finally:
        os.umask(old_mask)
    expected = {"callable": b"from a writer", "text\n": b"text\n"}.get(content, content)
    assert path.read_bytes() == expected
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text("old")

    def half_then_crash(p):
        open(p, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("durable", [True, False])
def test_the_temp_is_beside_the_target_and_durable_flushes_it_before_the_rename_and_the_directory_after(
        tmp_path, monkeypatch, durable):
    """Beside it: a rename within one file system is atomic (from /tmp it may be a copy). The directory's fsync
    makes the rename itself survive a node crash."""
    import rnalm.files as files

    path, temps, flushed = tmp_path / "latest", [], []
    path.write_text("old")
    monkeypatch.setattr(files, "fsync_path", lambda p: flushed.append((Path(p), path.read_text())))
    atomic_write(path, lambda p: (temps.append(Path(p)), Path(p).write_text("new")), durable=durable)
    assert temps[0].parent == tmp_path and temps[0].name.endswith(".tmp")
    assert flushed == ([(temps[0], "old"), (tmp_path, "new")] if durable else [])


def test_stale_temps_of_a_killed_write_are_removed_and_nothing_else(tmp_path, monkeypatch):
    """Hidden (a leading dot: no `*.safetensors` glob or `ls` sees them) and found by the literal name, even one
    holding glob characters."""
    import rnalm.files as files

    path = tmp_path / "model[1].safetensors"
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))  # killed
    monkeypatch.setattr(files.os, "unlink", lambda p: None)  # before its cleanup
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"weights")
    monkeypatch.undo()
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".model[1].safetensors.") and stale.name.endswith(".tmp")
    others = [tmp_path / n for n in (".model1.safetensors.x.tmp", ".other.safetensors.x.tmp", "model[1].safetensors")]
    for other in others:
        other.write_text("keep")
    remove_stale_temps(path)
    assert sorted(tmp_path.iterdir()) == sorted(others)


def test_an_output_directory_is_checked_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    assert check_out_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"  # made later
    for path, message in (("", "--out is required: an output directory"),
                          (tmp_path / "a_file", "a_file is a file, not a directory"),
                          (tmp_path / "a_file" / "sub", "a_file is a file, not a directory")):
        with pytest.raises(ValueError, match=message):
            check_out_dir(path, "--out")
    asked = []  # root may write anywhere: the permission check is seen through os.access
    monkeypatch.setattr(os, "access", lambda p, mode: asked.append(mode) or mode == os.W_OK)
    with pytest.raises(ValueError, match=rf"--out={tmp_path}/new: {tmp_path} is not writable"):
        check_out_dir(tmp_path / "new", "--out")
    assert asked == [os.W_OK | os.X_OK]  # writing into a directory needs its search permission too
