#!/usr/bin/env bash
# The main job on a laptop or CI machine: set up .venv (CPU torch), check the quickstart config, train a tiny
# block-diffusion model on a synthetic task with masked-diffusion SFT, then watch it answer a prompt.
# Extra key=value arguments override the config (e.g. sft.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
.venv/bin/tracerl validate configs/quickstart.yaml "$@"
.venv/bin/tracerl sft configs/quickstart.yaml "$@"
run_dir=$(.venv/bin/python -c "import sys; from tracerl.config import load; print(load('configs/quickstart.yaml', sys.argv[1:]).run_dir)" "$@")
.venv/bin/tracerl generate configs/quickstart.yaml "$@" model.path="$run_dir/final" --prompt "parity 37:" --delay 0.2
echo "metrics: $run_dir/metrics.jsonl · model: $run_dir/final"
