"""atomic_write: whole or nothing, and readable by the team (the umask's mode, not mkstemp's 0600)."""
from __future__ import annotations

import os
import stat

import pytest

from rnalm.files import atomic_write


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
