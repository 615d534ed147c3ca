"""Fixtures for dataprep tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fasta(tmp_path):
    """Write text/bytes to a file in tmp_path and return its path."""
    def make(content: str | bytes, name: str = "in.fa") -> Path:
        p = tmp_path / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p
    return make
