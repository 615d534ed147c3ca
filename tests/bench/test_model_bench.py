"""The GPU benchmark's logic on CPU with a tiny model: agreement is exact in fp32 and the numbers are sane."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_model_bench_runs_on_cpu_with_exact_fp32_agreement(ncrna_fasta, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "bench/model_bench.py"), "--preset", "nano", "--dim", "64", "--layers", "2",
                    "--heads", "4", "--budget", "4096", "--padded-batch", "32", "--steps", "2", "--warmup", "1",
                    "--dtype", "fp32", "--corpus", str(ncrna_fasta), "--out", str(out)], check=True, cwd=REPO)
    result = json.loads(out.read_text())
    agreement = result["agreement"]
    assert agreement["packed_backend"] == "sdpa"
    assert agreement["packed_vs_padded_logits"] < 1e-5 and agreement["packed_vs_padded_grads"] < 1e-5
    assert 100 < result["corpus_mean_tokens"] < 150   # the ncRNA corpus: mean ~120 tokens
    for key in ("packed", "padded"):
        assert result[key]["real_tokens_per_s"] > 0 and 0 < result[key]["mfu"] < 1
