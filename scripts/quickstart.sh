#!/usr/bin/env bash
# The main job on a laptop or CI machine: set up .venv (CPU torch), check the quickstart config, train a tiny
# block-diffusion model on a synthetic task with masked-diffusion SFT, then with TraceRL (tracerl train: Ray
# rollout actors, reward workers, a DeepSpeed learner), then watch it answer a prompt.
# Extra key=value arguments override the config (e.g. sft.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
.venv/bin/tracerl validate configs/quickstart.yaml "$@"
.venv/bin/tracerl sft configs/quickstart.yaml "$@"
run_dir=$(.venv/bin/python -c "import sys; from tracerl.config import load; print(load('configs/quickstart.yaml', sys.argv[1:]).run_dir)" "$@")
.venv/bin/tracerl train configs/quickstart.yaml "$@" model.path="$run_dir/final" run_dir="$run_dir/rl"
.venv/bin/tracerl generate configs/quickstart.yaml "$@" model.path="$run_dir/rl/final" sampling.temperature=0 \
  --prompt "parity 37:" --delay 0.2
echo "SFT: $run_dir/metrics.jsonl · RL: $run_dir/rl/metrics.jsonl, $run_dir/rl/eval/ · model: $run_dir/rl/final"
