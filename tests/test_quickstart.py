"""The main job end to end, shortened: scripts/quickstart.sh runs SFT, TraceRL, eval, the before/after table, the
curves PNG and a denoising demo, and leaves every output it announces."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]
SHORT = [
    "sft.steps=6", "sft.eval_every=3", "sft.eval_prompts=8", "data.num_synthetic=300",
    "train.steps=2", "train.eval_every=1", "train.log_samples_every=1",
    "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.num_prompts=8", "eval.samples=2", "eval.k=2",
]  # fmt: skip


def test_shortened_quickstart_end_to_end(tmp_path):
    run_dir = tmp_path / "quick"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", f"run_dir={run_dir}", *SHORT],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    sft, rl = run_dir / "sft", run_dir / "rl"
    # SFT: a metrics row per step and its exact-match checks
    sft_rows = [json.loads(x) for x in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_rows if "train/loss" in r] == list(range(1, 7))
    assert [r["step"] for r in sft_rows if "eval/accuracy" in r] == [0, 3, 6]
    # RL: a metrics row per step with the reward of sudoku_cells, evaluations at steps 0, 1 and 2 on 8 prompts
    rows = [json.loads(x) for x in (rl / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert all(0.0 <= r["reward/mean"] <= 1.0 and "reward/sudoku_cells/mean" in r for r in rows if "reward/mean" in r)
    assert [r["step"] for r in rows if "eval/greedy_reward" in r] == [0, 1, 2]
    assert sorted(p.name for p in (rl / "eval").glob("step-*.json")) == ["step-0.json", "step-1.json", "step-2.json"]
    final = json.loads((rl / "eval-final" / "eval.json").read_text())
    last = json.loads((rl / "eval" / "step-2.json").read_text())
    assert final["metrics"]["eval/prompts"] == 8.0
    # the exported model decodes the held-out prompts exactly as the loop's last evaluation did, greedy and sampled
    # (evaluation draws are seeded per held-out prompt and sample, the same at every step)
    assert final["metrics"] == last["metrics"]
    completions = [[json.loads(x)["completion"] for x in (d / name).read_text().splitlines()]
                   for d, name in ((rl / "eval-final", "eval.jsonl"), (rl / "eval", "step-2.jsonl"))]  # fmt: skip
    assert completions[0] == completions[1]
    png = rl / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (rl / "final" / "config.json").is_file() and list((rl / "wandb").glob("offline-run-*"))
    # the console: the table, the demo and where everything is
    assert "SFT start (step 0)" in out and "after RL (step 2)" in out and "greedy reward" in out
    assert "tokens in" in out and "denoising steps" in out
    # one line per phase: SFT's progress line ends with its held-back exact match and where its outputs are
    assert "sft" in out and "exact match" in out and "on 8 held-back prompts" in out
    assert f"model: {sft}/final" in out and f"metrics: {rl}/metrics.jsonl" in out
    assert [line for line in out.splitlines() if line.startswith("eval step")] and "Warning" not in out
    for announced in ("metrics.jsonl", "curves.png", "final model", "W&B run", "offline-run-"):
        assert announced in out


@pytest.mark.parametrize(
    ("script", "argument", "named"),
    [
        ("scripts/quickstart.sh", "learner.lrr=1", "unknown config key 'learner.lrr'"),
        ("scripts/rlhf.sh", "seed=abc", "seed"),
        ("scripts/quickstart.sh", "--verbose learner.lrr=1", "unknown config key 'learner.lrr'"),
    ],
)
def test_a_bad_override_to_a_script_is_one_line_and_writes_nothing(tmp_path, script, argument, named):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["bash", script, f"run_dir={run_dir}", *argument.split()],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and named in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()
