"""bench/gemm_alignment.py with the real DeepSpeed engine (one rank, gloo): under the trainer's config and parameter
groups, ZeRO-2 and ZeRO-3 hand out biases at odd offsets of their flat buffers; no matmul may see one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", [2, 3])
def test_no_matmul_operand_is_misaligned_under_deepspeed_zero(stage, tmp_path):
    out = tmp_path / "alignment.json"
    subprocess.run([sys.executable, "bench/gemm_alignment.py", "--config", "pretrain/configs/tiny_cpu.yaml",
                    "--set", f"train.ds_config=ds_configs/zero{stage}.json", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["zero_stage"] == stage and result["gemm_calls"] > 50
    assert result["misaligned_operands"] == 0, result["misaligned"]
