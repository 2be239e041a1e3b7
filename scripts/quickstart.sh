#!/usr/bin/env bash
# The main job on a laptop or CI machine (no GPU, no downloads): set up .venv (CPU torch), then
#   1. tracerl sft    a tiny block-diffusion model imitates a teacher with a habit on 4x4 Sudoku (pinned by steps and seed)
#   2. tracerl train  TraceRL against the verifier: Ray rollout actors, a reward worker, a DeepSpeed learner
#   3. tracerl eval   the exported model on the held-out puzzles (solution grids never trained on)
#   4. tracerl plot   the before/after table and the reward / held-out curves (PNG)
#   5. tracerl generate  one held-out puzzle being denoised
# Extra key=value arguments override configs/quickstart.yaml for every phase (e.g. seed=1 train.steps=5);
# QUICKSTART_CONFIG picks another config. docs/quickstart.md explains what the run prints and writes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # CPU on purpose: no "accelerator" warning
# One torch thread per process (the Ray actors get one from Ray anyway): with two threads each, SFT and evaluation
# steps ran 8-10x slower on a 2-core machine shared with other work. The documented numbers were measured so.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# One instruction set for torch's, MKL's and oneDNN's CPU kernels: they otherwise pick kernels by the CPU's (AVX-512
# on one machine, AVX2 on another), whose rounding differs and compounds over training (measured: another ISA gives
# another SFT model). It does not make two machines agree to the last digit (docs/quickstart.md: two AVX-512
# machines gave different SFT models with it). docs/quickstart.md's numbers were measured so.
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} MKL_CBWR=${MKL_CBWR:-AVX2} ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
config=${QUICKSTART_CONFIG:-configs/quickstart.yaml}
tracerl=.venv/bin/tracerl
run_dir=$(.venv/bin/python scripts/run_dir.py "$config" "$@")  # a bad config or override: one line, exit 2
sft_dir="$run_dir/sft" rl_dir="$run_dir/rl"
if [ -e "$run_dir" ]; then
  echo "$run_dir exists: remove it or pass run_dir=<new directory>" >&2
  exit 2
fi
phase() { printf '\n\033[1m%s\033[0m  (%ds so far)\n' "$1" "$SECONDS"; }
SECONDS=0
$tracerl validate "$config" "$@" run_dir="$sft_dir"
phase "1/5 SFT: imitate the teacher, habit included (it writes 1 for 2 and 3 for 4 in 60% of those cells)"
$tracerl sft "$config" "$@" run_dir="$sft_dir"
t_sft=$SECONDS
phase "2/5 TraceRL: learn from the verifier"
$tracerl train "$config" "$@" model.path="$sft_dir/final" run_dir="$rl_dir"
t_rl=$((SECONDS - t_sft))
phase "3/5 eval: the exported model on the held-out puzzles"
$tracerl eval "$config" "$@" model.path="$rl_dir/final" run_dir="$rl_dir" --out "$rl_dir/eval-final"
phase "4/5 before / after"
$tracerl plot "$rl_dir" --sft "$sft_dir"
phase "5/5 one held-out puzzle, denoised by the trained model"
first=$(head -1 "$rl_dir/eval-final/eval.jsonl")
field() { .venv/bin/python -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$first" "$1"; }
$tracerl generate "$config" "$@" model.path="$rl_dir/final" sampling.temperature=0 --prompt "$(field prompt)" --delay 0.15
echo "solution: $(field answer) · reward of this completion $(LC_ALL=C printf '%.2f' "$(field reward)")"
wandb_dir=$(ls -d "$rl_dir"/wandb/*run-* 2>/dev/null | head -1 || true)
cat <<EOF

done in ${SECONDS}s (SFT ${t_sft}s, TraceRL ${t_rl}s)
  metrics:     $sft_dir/metrics.jsonl (SFT) · $rl_dir/metrics.jsonl (RL)
  curves:      $rl_dir/curves.png
  held-out:    $rl_dir/eval/step-*.jsonl (every sample, reward and sampling settings) · $rl_dir/eval-final/
  W&B run:     ${wandb_dir:-off (wandb.mode=disabled)}${wandb_dir:+ (offline: wandb sync $wandb_dir)}
  final model: $rl_dir/final (a Hugging Face directory; tracerl generate/eval take it as model.path)
EOF
