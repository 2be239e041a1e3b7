"""DiffusionGemma in the RL loop on CPU: Ray rollout actors sample renoising trajectories, the DeepSpeed learner
(ZeRO 0 and 3, several ranks) replays them, weights sync, eval, checkpoints, resume, export, tracerl generate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from tracerl.checks import load_config
from tracerl.cli import canvas_frames, main
from tracerl.config import Config
from tracerl.models import load_policy
from tracerl.orchestrator import run
from tracerl.sampling import generate

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

REWARD = """
def score(prompts, completions, **kwargs):
    return [len(set(c)) / 8.0 for c in completions]
"""
BASE = [
    "model.family=diffusion_gemma",
    "model.tiny.hidden_size=32",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "model.tiny.moe_intermediate_size=32",
    "model.tiny.canvas_length=8",
    "sampling.max_new_tokens=16",
    "sampling.canvas.max_denoising_steps=4",
    "sampling.canvas.entropy_bound=1.0",
    "data.source=synthetic:parity",
    "data.num_synthetic=100",
    "learner.lr=1e-3",
    "train.steps=2",
    "rollout.prompts_per_step=2",
    "rollout.samples_per_prompt=4",
    "eval.num_prompts=4",
    "eval.samples=2",
    "eval.k=2",
    "train.log_samples_every=1",
    "checkpoint.save_every=1",
    "wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cfg_for(tmp_path: Path, *overrides: str) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "spread.py").write_text(REWARD)
    cfg = load_config(None, [*BASE, f"run_dir={tmp_path / 'run'}", *overrides])
    cfg.reward.functions[0].fn = f"{tmp_path / 'spread.py'}:score"
    return cfg


def rows(cfg: Config) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("ranks", "stage"), [(1, 0), (2, 3)])
def test_train_replays_renoising_trajectories_and_exports_a_loadable_model(local_ray, tmp_path, ranks, stage) -> None:
    cfg = cfg_for(tmp_path, f"learner.num_ranks={ranks}", f"learner.zero_stage={stage}")
    last = run(cfg)
    steps = [r for r in rows(cfg) if "train/policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["rollout/logp_mismatch"] < 1e-5  # the learner's chain pass replays the sampler
        assert r["rollout/accepted_per_step"] >= 1 and r["rollout/steps_per_canvas"] <= 4
        assert r["trace/rows_per_sample"] >= 1
    assert "eval/greedy_reward" in last and (Path(cfg.run_dir) / "eval" / "step-2.jsonl").is_file()
    assert (Path(cfg.run_dir) / "pictures" / "decoding-order-1.png").is_file()
    # the trained policy moved, and the export loads back with transformers' own class, whole
    start = load_policy(cfg.model).model.state_dict()
    model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(Path(cfg.run_dir) / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    end = model.state_dict()
    moved = [k for k in start if not torch.equal(start[k], end[k])]
    assert any("experts" in k for k in moved) and not any("vision" in k for k in moved)


def test_a_resumed_run_reproduces_the_uninterrupted_one(local_ray, tmp_path) -> None:
    whole = cfg_for(tmp_path / "a")
    run(whole)
    half = cfg_for(tmp_path / "b", "train.steps=1")
    run(half)
    rest = cfg_for(tmp_path / "b", "checkpoint.resume=auto")
    run(rest)
    key = "train/policy_loss"
    assert [r[key] for r in rows(whole) if key in r] == pytest.approx([r[key] for r in rows(rest) if key in r])


def test_generate_shows_every_step_of_a_canvas(capsys, tmp_path) -> None:
    cfg = cfg_for(tmp_path)
    policy = load_policy(cfg.model)
    rollout = generate(policy, [policy.tokenizer("1011")["input_ids"]], cfg.sampling, seed=0)
    lines = [line.plain for line in canvas_frames(rollout, policy.tokenizer, policy.eos_ids)]
    live = int((rollout.step_valid & rollout.canvas_valid[..., None])[0].sum())
    assert len(lines) == live + int(rollout.canvas_valid[0].sum())  # a line per step, then each canvas's output
    assert lines[0].startswith("canvas 0 step  0") and "accepted" in lines[0]
    assert sum(" output " in line for line in lines) == int(rollout.canvas_valid[0].sum())
    # the output line: bold through the first EOS, dim after it (not part of the response); the untrained model
    # writes no EOS, so the response is cut after 5 tokens here
    c, valid = rollout.canvas_length, int(rollout.canvas_valid[0].sum())
    mask = rollout.response_mask.clone()
    mask[0, 5:] = False
    rollout = dataclasses.replace(rollout, response_mask=mask)
    outputs = [t for t in canvas_frames(rollout, policy.tokenizer, policy.eos_ids) if " output " in t.plain]
    prefix = len("canvas 0 output") + 9
    styles = [
        str(span.style) for t in outputs for i in range(prefix, prefix + c) for span in t.spans if span.start == i
    ]
    assert styles == ["bold"] * 5 + ["dim"] * (valid * c - 5)
    rc = main(["generate", *BASE, "--prompt", "1011", "--no-animate"])
    out = capsys.readouterr().out
    assert rc == 0 and "canvas 0 step  0" in out and "renoised each step" in out
