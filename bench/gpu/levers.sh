#!/usr/bin/env bash
# One device call: the loader alone, then issue 7's levers, one pretrain_bench packed run each
# (RNALM_GPU_LEVERS=a,b to pick; see runner.py LEVERS).
# Writes $OUT/summary.json (after every step), $OUT/session.log and each bench's JSON; see BENCHMARKS.md,
# "GPU session runbook", for the exact run call and bench/gpu/runner.py for the plan.
PLAN=levers
source "$(dirname "$0")/common.sh"
