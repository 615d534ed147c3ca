#!/usr/bin/env bash
# The first device call: pretrain_bench giga packed vs padded (issue 4 step 7, issue 7 baseline), model_bench giga
# (issue 2 step 6), then issue 7's levers until the time is up (RNALM_GPU_LEVERS=a,b to pick).
# Writes $OUT/summary.json (after every step), $OUT/session.log and each bench's JSON; see BENCHMARKS.md,
# "GPU session runbook", for the exact run call and bench/gpu/runner.py for the plan.
PLAN=session
source "$(dirname "$0")/common.sh"
