"""Fixtures for finetune tests: a tiny randomly initialised checkpoint written with rnalm.io."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnalm.config import ModelConfig
from rnalm.io import save_pretrained
from rnalm.model import RiNALMo

TINY = dict(dim=32, num_layers=2, num_heads=4)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_ckpt")
    save_pretrained(RiNALMo(ModelConfig.preset("nano", **TINY)), out, provenance={"source": "random init, tests"})
    return out
