"""Results as JSON (atomic write) plus a markdown table."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], first: str = "test set") -> str:
    """One row per key of `rows`, one column per name in `columns` (missing values left blank)."""
    lines = ["| " + " | ".join([first, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        lines.append("| " + " | ".join([name, *(_fmt(row[c]) if c in row else "" for c in columns)]) + " |")
    return "\n".join(lines) + "\n"
