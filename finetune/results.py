"""Results as JSON (atomic write) plus a markdown table."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rnalm.files import atomic_write


def write_json(obj: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "n/a" if v is None else str(v)


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], first: str = "test set") -> str:
    """One row per key of `rows`, one column per name in `columns` (missing values left blank)."""
    lines = ["| " + " | ".join([first, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        lines.append("| " + " | ".join([name, *(_fmt(row[c]) if c in row else "" for c in columns)]) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, name: str, result: Mapping[str, Any], table: str) -> None:
    """OUT/<name>.json (everything) and OUT/<name>.md (the table), both atomically."""
    write_json(result, Path(out_dir) / f"{name}.json")
    atomic_write(Path(out_dir) / f"{name}.md", table)
