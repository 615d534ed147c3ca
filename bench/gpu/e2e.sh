#!/usr/bin/env bash
# One device call: finetune_gpu_e2e.py --stage all: micro pretraining -> convert -> SS fine-tune vs random
# init vs RNAfold (issue 6 step 10).
# Writes $OUT/summary.json (after every step), $OUT/session.log and each bench's JSON; see BENCHMARKS.md,
# "GPU session runbook", for the exact run call and bench/gpu/runner.py for the plan.
PLAN=e2e
source "$(dirname "$0")/common.sh"
