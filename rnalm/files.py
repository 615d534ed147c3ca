"""One way to write a file that readers (and a crash) see whole or not at all, and the check of an output
directory before any work. Standard library only, so the torch-free dataprep uses it too."""
from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[str], None],
                 durable: bool = False) -> None:
    """Write `content` (text, bytes, or a function that writes the given temp path) into a temp file beside
    `path`, then rename it over `path`. The file gets the umask's mode (mkstemp's 0600 would hide shared
    results from a team); the temp name ends in .tmp so no `*.json`-style glob sees it. `durable`: fsync the
    file and the directory (checkpoint pointers, manifests: must survive a node crash)."""
    atomic_write_all([(path, content)], durable)


def atomic_write_all(files: Sequence[tuple[str | os.PathLike, str | bytes | Callable[[str], None]]],
                     durable: bool = False) -> None:
    """`atomic_write` of several files: every temp file is written (and synced when `durable`) before the first
    rename, so a crash leaves each file old or new and the earlier versions all in place until the renames,
    which follow each other at once."""
    temps = []
    try:
        for path, content in files:
            prefix, suffix = _temp_affixes(Path(path))
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=prefix, suffix=suffix)
            os.close(fd)
            temps.append(tmp)
            if callable(content):
                content(tmp)
            else:
                Path(tmp).write_bytes(content.encode() if isinstance(content, str) else content)
            os.chmod(tmp, 0o666 & ~_umask())  # after the writer: some (safetensors) replace the file they are given
            if durable:
                fsync_path(tmp)
        for (path, _), tmp in zip(files, temps):
            os.replace(tmp, path)
        if durable:
            for parent in dict.fromkeys(Path(path).parent for path, _ in files):
                fsync_path(parent)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """The temp files of `atomic_write(path, ...)` calls whose process was killed mid-write (large for weights)."""
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    for stale in path.parent.glob(f"{glob.escape(prefix)}*{suffix}"):
        stale.unlink(missing_ok=True)


def _temp_affixes(path: Path) -> tuple[str, str]:
    return f".{path.name}.", ".tmp"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out_dir(path: str | Path, option: str) -> Path:
    """An output directory checked before any work: an empty value (which would write into the current
    directory), a file, a path under a file, or an unwritable place is refused with the option's name."""
    if not str(path):
        raise ValueError(f"{option} is required: an output directory")
    out = Path(path)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option}={path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option}={path}: {existing} is not writable")
    return out
