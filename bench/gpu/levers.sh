#!/usr/bin/env bash
# The second device call: issue 7's levers the first left (RNALM_GPU_LEVERS=a,b; default all; see runner.py
# LEVERS), one pretrain_bench packed run each, then the loader alone and a giga block's activation memory.
# Writes $OUT/summary.json (after every step), $OUT/session.log and each bench's JSON; see BENCHMARKS.md,
# "GPU session runbook", for the exact run call and bench/gpu/runner.py for the plan.
PLAN=levers
source "$(dirname "$0")/common.sh"
