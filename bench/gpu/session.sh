#!/usr/bin/env bash
# One device call: model_bench giga (issue 2 step 6) + pretrain_bench giga packed vs padded
# (issue 4 step 7, issue 7 baseline).
# Writes $OUT/summary.json (after every step), $OUT/session.log and each bench's JSON; see BENCHMARKS.md,
# "GPU session runbook", for the exact run call and bench/gpu/runner.py for the plan.
PLAN=session
source "$(dirname "$0")/common.sh"
