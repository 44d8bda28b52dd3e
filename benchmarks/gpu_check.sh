#!/usr/bin/env bash
# GPU readiness check from a fresh clone, offline: bash benchmarks/gpu_check.sh [--cpu] [--steps N]
# At most ~8 minutes on one H200; --cpu runs the same checks CI-sized in well under a minute.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 480 python benchmarks/gpu_check.py "$@"
