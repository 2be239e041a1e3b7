#!/usr/bin/env bash
# RLHF for a diffusion LM on a laptop (docs/rlhf.md): set up .venv (CPU torch), then
#   1. tracerl sft                 the quickstart's SFT recipe (4x4 Sudoku from a teacher with a habit)
#   2. tracerl train-reward-model  preference pairs of the SFT model's own completions → a reward model (TRL)
#   3. tracerl train               TraceRL against the reward model only (KL to the SFT model); the verifier
#                                  sudoku_cells at weight 0
#   4. tracerl plot                the before/after table and curves of the RL run
# Extra key=value arguments override configs/rlhf.yaml for every phase (e.g. seed=1 run_dir=runs/rlhf-seed1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
config=${RLHF_CONFIG:-configs/rlhf.yaml}
tracerl=.venv/bin/tracerl
run_dir=$(.venv/bin/python scripts/run_dir.py "$config" "$@")  # a bad config or override: one line, exit 2
if [ -e "$run_dir" ]; then
  echo "$run_dir exists: remove it or pass run_dir=<new directory>" >&2
  exit 2
fi
sft_dir="$run_dir/sft" rm_dir="$run_dir/reward_model" rl_dir="$run_dir/rl"
phase() { printf '\n\033[1m%s\033[0m  (%ds so far)\n' "$1" "$SECONDS"; }
SECONDS=0
$tracerl validate --offline "$config" "$@" reward.functions='[{fn: sudoku_cells}]' run_dir="$sft_dir"
phase "1/4 SFT: imitate the teacher, habit included"
$tracerl sft "$config" "$@" run_dir="$sft_dir"
t_sft=$SECONDS
phase "2/4 reward model: pairs of the SFT model's completions, ordered by cells right; TRL's RewardTrainer"
$tracerl train-reward-model "$config" "$@" model.path="$sft_dir/final" reward_model.out_dir="$rm_dir"
t_rm=$((SECONDS - t_sft))
phase "3/4 TraceRL against the reward model, with a KL to the SFT model (the verifier watches at weight 0)"
$tracerl train "$config" "$@" model.path="$sft_dir/final" reward_model.out_dir="$rm_dir" run_dir="$rl_dir"
t_rl=$((SECONDS - t_sft - t_rm))
phase "4/4 before / after (the reward is the reward model's score; eval/greedy_reward/sudoku_cells is the verifier)"
$tracerl plot "$rl_dir" --sft "$sft_dir"
cat <<DONE

done in ${SECONDS}s (SFT ${t_sft}s, reward model ${t_rm}s, TraceRL ${t_rl}s)
  reward model: $rm_dir (reward_model.json: pairs and held-out pair accuracy)
  metrics:      $rl_dir/metrics.jsonl (reward/rm/mean, reward/sudoku_cells/mean, reward/corr/rm/sudoku_cells, eval/*)
  curves:       $rl_dir/curves.png
DONE
