"""First step of every GPU call: what is installed and what the GPU is, in OUT/env.json; fails fast and clearly.

    python bench/gpu/env_check.py OUT_JSON [--require-cuda]
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# import name -> why the runs need it
NEEDED = {"torch": "everything", "numpy": "everything", "deepspeed": "pretrain.train (pretrain_bench, levers, e2e)",
          "webdataset": "pretrain.data", "zstandard": "shards", "safetensors": "rnalm.io",
          "yaml": "configs", "prometheus_client": "trainer metrics", "rnalm": "the repository (run from its root)",
          "pretrain.train": "the trainer", "finetune": "e2e fine-tuning"}
OPTIONAL = {"RNA": "RNAfold row of the e2e table (else added on the CPU machine)", "triton": "torch.compile on GPU",
            "flash_attn": "flash_attn attention backend"}


def versions(names: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    found, missing = {}, {}
    for name, why in names.items():
        try:
            module = importlib.import_module(name)
            found[name] = str(getattr(module, "__version__", "ok"))
        except Exception as e:  # noqa: BLE001 - any import failure is reported, with its reason
            missing[name] = f"{type(e).__name__}: {e} (needed for {why})"
    return found, missing


def host_info() -> dict:
    """The host's CPU and its time to dispatch one small torch op on the CPU. Host-side time per step (Python,
    DeepSpeed's hooks, launches) measured on one machine scales to another by the ratio of the two times."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    x = torch.ones(8)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(2000):
            x.add(1)
        best = min(best, time.perf_counter() - t0)
    return {"cpu_model": model, "host_op_us": round(best / 2000 * 1e6, 3)}


def gpu_info() -> dict:
    import torch

    info = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
            "nvcc": shutil.which("nvcc"), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_total_gib=round(total / 2**30, 2), memory_free_gib=round(free / 2**30, 2),
                    bf16=torch.cuda.is_bf16_supported())
        try:
            from rnalm.attention import available_backends
            info["attention_backends"] = available_backends("cuda")
        except Exception as e:  # noqa: BLE001
            info["attention_backends"] = f"error: {e}"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,"
                              "utilization.gpu,memory.used", "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def main() -> int:
    out = Path(sys.argv[1])
    require_cuda = "--require-cuda" in sys.argv
    found, missing = versions(NEEDED)
    optional, absent = versions(OPTIONAL)
    report = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
              "modules": found, "missing": missing, "optional": optional, "optional_absent": absent,
              "pythonpath": os.environ.get("PYTHONPATH", "")}
    if "torch" in found:
        report.update(host_info(), **gpu_info())
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report.get(k) for k in ("python", "modules", "device", "memory_free_gib",
                                                  "attention_backends", "nvcc", "cpu_model", "host_op_us")}))
    problems = [f"cannot import {k}: {v}" for k, v in missing.items()]
    if require_cuda and not report.get("cuda_available"):
        problems.append("no CUDA device visible to torch (this needs the lent GPU machine)")
    for p in problems:
        print(f"env_check: ERROR: {p}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
