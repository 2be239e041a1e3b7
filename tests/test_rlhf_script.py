"""scripts/rlhf.sh end to end, shortened: SFT, preference pairs and a reward model (TRL), TraceRL against it with
the verifier at weight 0, and the before/after table."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]
SHORT = [
    "sft.steps=80", "sft.eval_every=0", "data.num_synthetic=300", "reward_model.pair_prompts=40",
    "reward_model.epochs=1", "reward_model.batch_size=16", "train.steps=2", "train.eval_every=1",
    "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.num_prompts=8", "eval.samples=2", "eval.k=2",
]  # fmt: skip


def test_shortened_rlhf_end_to_end(tmp_path):
    run_dir = tmp_path / "rlhf"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        ["bash", "scripts/rlhf.sh", f"run_dir={run_dir}", *SHORT],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rm = json.loads((run_dir / "reward_model" / "reward_model.json").read_text())
    assert rm["pairs"]["train"] > 16 and rm["label_with"] == "sudoku_cells" and rm["base"] == f"{run_dir}/sft/final"
    rows = [json.loads(x) for x in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in rows if "reward/mean" in r):
        assert r["reward/mean"] == pytest.approx(r["reward/rm/mean"])  # only the reward model is optimised
        assert 0.0 <= r["reward/sudoku_cells/mean"] <= 1.0 and "train/kl_to_ref" in r
    assert [r["step"] for r in rows if "eval/greedy_reward/sudoku_cells" in r] == [0, 1, 2]
    out = proc.stdout
    assert "pair accuracy" in out and "reward model rm on 1 actor(s)" in out and "after RL (step 2)" in out
    assert "Running in WANDB offline mode" not in out and "Warning" not in out
