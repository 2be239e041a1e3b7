"""Masked-diffusion SFT: the MDLM loss against a plain loop, its 1/t weighting, learning, resume and export."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from tracerl import data
from tracerl.config import ModelConfig, load
from tracerl.models import load_policy
from tracerl.sft import _Sampler, clean_rollout, exact_match_accuracy, mdlm_masks, run_sft, sft_views
from tracerl.trace import region_blocks, view_logprobs

from .conftest import encode

PAIRS = [("12+7=", "19"), ("3+4=", "7"), ("40+41=", "81")]


def rollout_of(policy, layout: str, length: int = 6, eos_padding: bool = True):  # noqa: ANN001, ANN201
    pairs = [
        (p, r + [policy.eos_id])
        for p, r in zip(encode(policy, [p for p, _ in PAIRS]), encode(policy, [r for _, r in PAIRS]), strict=True)
    ]
    return clean_rollout(
        pairs,
        length=length,
        pad_id=policy.pad_id,
        eos_id=policy.eos_id,
        block_size=4,
        layout=layout,
        eos_padding=eos_padding,
    )


def test_mdlm_loss_matches_a_plain_per_example_loop(full_policy):
    """−Σ weights·log p over the views = mean_i Σ_{j masked} −log p(x_j | x_t) / t_i / n_i, each example's
    noised sequence run on its own through the model."""
    rollout = rollout_of(full_policy, "full")
    masks, t = mdlm_masks(rollout, 1e-3, torch.Generator().manual_seed(0))
    views, weights = sft_views(rollout, full_policy.mask_id, False, 1e-3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = -(weights * view_logprobs(full_policy, views)).sum()

    want = 0.0
    n = len(rollout)
    for i in range(n):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i]]
        response = rollout.response_ids[i].masked_fill(masks.masked[i], full_policy.mask_id)
        ids = torch.cat([prompt, response]).unsqueeze(0)  # [1, T], no padding, bidirectional
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        everything = torch.ones(1, ids.shape[1], ids.shape[1], dtype=torch.bool)
        response_cols = positions >= len(prompt)
        with torch.no_grad():
            logits = full_policy.logits_at(ids, positions, everything, response_cols)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, rollout.response_ids[i].unsqueeze(-1)).squeeze(-1)
        t_i = t[i, 0]  # one ratio per example (full attention)
        want += -(logp[masks.target[i]]).sum() / t_i / rollout.response_mask[i].sum() / n
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=1e-4, atol=1e-5)


def test_one_over_t_weighting_makes_every_token_count_once_on_average(full_policy):
    """E[mask_j / t] = 1, so the weights of a batch sum to 1 on average (each example: mean over its tokens)."""
    rollout = rollout_of(full_policy, "full")
    totals = []
    for seed in range(3000):
        masks, t = mdlm_masks(rollout, 0.05, torch.Generator().manual_seed(seed))
        w = masks.target.float() / t / rollout.response_mask.sum(1, keepdim=True) / len(rollout)
        totals.append(float(w.sum()))
    assert sum(totals) / len(totals) == pytest.approx(1.0, abs=0.05)


def test_block_sft_draws_one_ratio_per_block_and_keeps_the_clean_copy(block_policy):
    rollout = rollout_of(block_policy, "block", length=9)
    masks, t = mdlm_masks(rollout, 1e-3, torch.Generator().manual_seed(1))
    blocks = region_blocks(rollout)
    for i in range(len(rollout)):
        for b in blocks[i].unique():
            assert t[i][blocks[i] == b].unique().numel() == 1  # one t per block of the sampler's grid
    assert len({round(float(x), 6) for x in t[0]}) > 1  # and different blocks draw different ratios
    views, weights = sft_views(rollout, block_policy.mask_id, False, 1e-3, torch.Generator().manual_seed(1))
    assert views.layout == "block" and len(views) == len(rollout)
    clean = views.input_ids[~views.col_noisy & views.col_valid]
    assert (clean != block_policy.mask_id).all()  # only the noisy copy is masked
    assert (weights[views.target_mask] > 0).all() and (weights[~views.target_mask] == 0).all()


def test_non_trainable_padding_is_masked_and_never_scored(full_policy):
    rollout = rollout_of(full_policy, "full", length=8, eos_padding=False)
    masks, _ = mdlm_masks(rollout, 1e-3, torch.Generator().manual_seed(0))
    pad = ~rollout.response_mask
    assert pad.any() and masks.masked[pad].all() and not masks.target[pad].any()


def sft_cfg(tmp_path, *extra: str):  # noqa: ANN001, ANN201
    return load(None, sft_overrides(tmp_path, *extra))


def sft_overrides(tmp_path, *extra: str) -> list[str]:  # noqa: ANN001
    return [
        "data.source=synthetic:parity",
        "data.chat_template=false",
        "data.num_synthetic=600",
        "sft.batch_size=32",
        "sft.eval_prompts=32",
        "sampling.max_new_tokens=8",
        "sampling.block_size=8",
        "sampling.temperature=0",
        "wandb.mode=disabled",
        f"run_dir={tmp_path / 'run'}",
        *extra,
    ]


@pytest.mark.slow  # real SFT
def test_sft_learns_a_synthetic_task_and_exports_it(tmp_path):
    """Parity ("parity 37:" → "odd"): the loss falls and exact-match accuracy of sampled answers on held-out
    prompts rises from 0 to nearly 1; the exported directory loads and samples the same answers."""
    cfg = sft_cfg(tmp_path, "sft.steps=120", "sft.eval_every=120", "checkpoint.save_every=60")
    result = run_sft(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 120
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10
    assert result["eval/accuracy_before"] < 0.2
    assert result["eval/accuracy"] >= 0.9
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-120", "step-60"]

    final = tmp_path / "run" / "final"
    AutoModelForCausalLM.from_pretrained(final)  # the family's own class loads it
    policy = load_policy(ModelConfig(family="tiny", path=str(final)))
    ds = data.load_examples(cfg.data, cfg.seed, require=("prompt", "answer", "response"))
    held = ds.select(range(len(ds) - 32, len(ds)))
    prompts = [data.encode_prompt(policy.tokenizer, p, cfg.data) for p in held["prompt"]]
    assert exact_match_accuracy(policy, prompts, held["answer"], cfg) == result["eval/accuracy"]


def test_a_learning_rate_that_blows_up_stops_sft_before_the_nan_step_is_saved(tmp_path, capsys):
    """sft.lr=1e30 turns the gradient (or the loss) NaN at step 2: the run stops there, exit 2, naming the step, the
    quantity and the fixes; the checkpoint of step 1 is the latest and no NaN checkpoint or final/ export is written."""
    from tracerl.cli import main

    args = sft_overrides(tmp_path, "sft.lr=1e30", "sft.steps=6", "sft.eval_every=0", "checkpoint.save_every=1")
    assert main(["sft", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(r"SFT step 2 failed: the SFT (loss|gradient norm) is nan \(not a finite number\)", err)
    assert "lower sft.lr" in err
    run = tmp_path / "run"
    assert f"The latest checkpoint is {run / 'checkpoints' / 'step-1'}: resume with --resume auto." in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"] and not (run / "final").exists()


@pytest.mark.slow  # real SFT
def test_block_diffusion_sft_learns(tmp_path):
    cfg = sft_cfg(
        tmp_path,
        "sft.steps=120",
        "sft.eval_every=120",
        "model.tiny.attention=block",
        "model.tiny.block_size=4",
        "sampling.block_size=4",
    )
    result = run_sft(cfg, progress=False)
    assert result["eval/accuracy_before"] < 0.2 and result["eval/accuracy"] >= 0.9


@pytest.mark.slow  # real SFT
def test_the_sft_sampler_resumed_over_fewer_examples_begins_a_new_epoch_instead_of_failing():
    big = _Sampler(12, seed=0)
    big.next(8)
    small = _Sampler(3, seed=0)  # data.source (or sft.eval_prompts) changed on resume
    note = small.load_state_dict(big.state_dict())
    assert note is not None and "sft.eval_prompts" in note and "epoch 1" in note, note
    assert sorted(small.next(3)) == [0, 1, 2]  # one whole epoch over the 3: an IndexError before
    same = _Sampler(12, seed=0)
    assert same.load_state_dict(big.state_dict()) is None and same.next(4) == big.next(4)


def test_sft_resume_continues_exactly(tmp_path):
    """8 steps, stop, resume to 16 = 16 steps straight (same masks, data order, optimizer state)."""
    straight = sft_cfg(tmp_path / "a", "sft.steps=16", "sft.eval_every=0")
    run_sft(straight, progress=False)
    first = sft_cfg(tmp_path / "b", "sft.steps=8", "sft.eval_every=0")
    run_sft(first, progress=False)
    resumed = sft_cfg(tmp_path / "b", "sft.steps=16", "sft.eval_every=0", "checkpoint.resume=auto")
    run_sft(resumed, progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "run" / "final").state_dict()
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


@pytest.mark.slow  # a real tracerl sft process
def test_ctrl_c_checkpoints_the_last_sft_step_and_the_resume_equals_a_straight_run(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-run: the step under way finishes, is saved,
    the command says how to resume and exits 130; resuming gives the weights of a run that was never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    overrides = sft_overrides(tmp_path / "stopped", "sft.steps=100000", "sft.eval_every=0", "sft.batch_size=4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracerl.cli", "sft", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    metrics = tmp_path / "stopped" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and proc.poll() is None:
        assert time.monotonic() < deadline, "the SFT run never logged 3 steps"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output
    saved = [int(p.name[5:]) for p in (tmp_path / "stopped" / "run" / "checkpoints").glob("step-*")]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert len(saved) == 1 and saved[0] == steps[-1] >= 3 and steps == list(range(1, saved[0] + 1)), (saved, steps)
    assert f"stopped by SIGINT after SFT step {saved[0]} of 100000" in output and "--resume auto" in output, output

    end = f"sft.steps={saved[0] + 3}"
    run_sft(sft_cfg(tmp_path / "stopped", end, "sft.eval_every=0", "sft.batch_size=4", "checkpoint.resume=auto"),
            progress=False)  # fmt: skip
    run_sft(sft_cfg(tmp_path / "straight", end, "sft.eval_every=0", "sft.batch_size=4"), progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "run" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stopped" / "run" / "final").state_dict()
    assert all(torch.equal(b[name], tensor) for name, tensor in a.items())


def test_sft_trains_the_policy_alone_whatever_the_rl_settings(tmp_path):
    """One YAML serves SFT and RL: a value model and a reference KL in it must not make SFT build (and checkpoint)
    a second and third copy of the backbone; the run learns the same as without them."""
    plain = sft_cfg(tmp_path / "a", "sft.steps=3", "sft.eval_every=0", "checkpoint.save_every=3")
    rl = sft_cfg(tmp_path / "b", "sft.steps=3", "sft.eval_every=0", "checkpoint.save_every=3",
                 "objective.value_model=true", "objective.kl_to_ref_coef=0.05")  # fmt: skip
    run_sft(plain, progress=False)
    run_sft(rl, progress=False)
    saved = tmp_path / "b" / "run" / "checkpoints" / "step-3" / "learner"
    assert saved.is_dir() and not (saved / "value").exists()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "run" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_sft_from_python_keeps_third_party_output_hidden_and_the_callers_settings(tmp_path):
    """The README's Python API: run_sft prints its own lines only (no DeepSpeed CPU-fallback warning, no
    'Writing model shards' bar from transformers), and leaves transformers' settings as the caller had them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    script = f"""
from transformers.utils import logging as hf_logging
from tracerl.checks import load_config
from tracerl.sft import run_sft
cfg = load_config(None, ["run_dir={run}", "sft.steps=2", "sft.eval_every=0", "wandb.mode=disabled",
                         "data.source=synthetic:parity", "data.num_synthetic=40"])
print("before", hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity())
run_sft(cfg)
print("after", hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity())
"""
    # as a user's shell has it: none of the variables the CLI sets (an earlier test's main() set them here)
    quieting = ("TRANSFORMERS_VERBOSITY", "WANDB_SILENT", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_VERBOSITY",
                "HF_DATASETS_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in quieting}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Setting accelerator to CPU" not in output and "Writing model shards" not in output, output
    assert "before True 30" in proc.stdout and "after True 30" in proc.stdout  # bars on, WARNING (30), as before
    assert (run / "final" / "config.json").is_file()
