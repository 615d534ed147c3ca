"""The `--section.key` overrides that the docs, scripts and messages show name settings that exist: a renamed config
field must take its docs (and the error messages that suggest it) along."""
from __future__ import annotations

import dataclasses
import re
import typing

from finetune.tasks.classify import ClassifyConfig
from finetune.tasks.mrl import MRLConfig
from finetune.tasks.regress import RegressConfig
from finetune.tasks.splice import SpliceConfig
from finetune.tasks.ss import SSConfig
from pretrain.config import PretrainConfig
from tests.conftest import REPO

CONFIGS = (PretrainConfig, SSConfig, SpliceConfig, MRLConfig, ClassifyConfig, RegressConfig)
NOT_OURS = {"section.key", "config.file", "storage.tsdb.path"}  # the placeholder; Prometheus's own flags
OVERRIDE = re.compile(r"--([a-z_]+\.[a-z_-]+(?:\.[a-z_-]+)?)")


def settings(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    found = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            found.add(prefix + f.name)
    return found


def test_every_override_the_docs_show_is_a_setting():
    known = set().union(*map(settings, CONFIGS)) | NOT_OURS
    files = [REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md"),
             *(REPO / "deploy" / "slurm").glob("*.sh"),
             *(path for package in ("rnalm", "dataprep", "pretrain", "finetune", "deploy", "bench")
               for path in (REPO / package).rglob("*.py"))]
    unknown = [f"{path.relative_to(REPO)}:{n}: --{key}" for path in files
               for n, line in enumerate(path.read_text().splitlines(), 1)
               for key in OVERRIDE.findall(line) if key.replace("-", "_") not in known]
    assert len(files) > 80 and not unknown, unknown
