"""The tracerl command: exit codes and one-paragraph errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tracerl.cli import main


def test_generate_prints_the_denoised_text(capsys):
    rc = main(["generate", "--prompt", "1+2=", "--no-animate", "sampling.max_new_tokens=8", "sampling.block_size=4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("1+2=") and "tokens in" in out and "denoising steps" in out


def test_bad_override_is_one_paragraph_and_nonzero(capsys):
    rc = main(["generate", "--prompt", "x", "sampling.max_new_tokns=8"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown config key 'sampling.max_new_tokns'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_validate_reports_each_part(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  tiny:\n    attention: block\nreward:\n  functions:\n    - fn: synthetic_exact\n")
    rc = main(["validate", str(cfg)])
    out = capsys.readouterr().out
    assert rc == 0
    for part in ("config: ok", "model: ok", "block attention", "data: ok", "rewards: ok"):
        assert part in out


def test_validate_refuses_d1_prompt_perturbation_on_a_block_model(capsys):
    d1 = ["objective.views=d1", "objective.old_logp_source=learner"]
    assert main(["validate", "model.tiny.attention=block", *d1]) == 2
    assert "objective.d1_prompt_mask_prob=0" in capsys.readouterr().err
    assert main(["validate", "model.tiny.attention=full", *d1]) == 0  # d1's own setting on full attention


def test_validate_fails_on_missing_model_path(capsys, tmp_path):
    rc = main(["validate", "model.family=llada", f"model.path={tmp_path / 'missing'}"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed warns only when it falls back to the CPU")
def test_sft_on_a_cpu_machine_prints_no_third_party_warning_unless_verbose(tmp_path):
    """DeepSpeed, imported by ``tracerl sft``, logs a WARNING line that it fell back to the CPU: a third-party line,
    shown with --verbose only."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    args = [sys.executable, "-m", "tracerl.cli", "sft", "data.source=synthetic:parity", "data.num_synthetic=100",
            "sft.steps=1", "sft.batch_size=4", "sft.eval_prompts=4", "sampling.max_new_tokens=8",
            "sampling.block_size=8", "wandb.mode=disabled"]  # fmt: skip
    quiet = subprocess.run([*args, f"run_dir={tmp_path / 'quiet'}"], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert "WARNING" not in quiet.stdout + quiet.stderr and "exact match" in quiet.stdout
    loud = subprocess.run([*args, f"run_dir={tmp_path / 'loud'}", "--verbose"], env=env, capture_output=True, text=True)
    assert loud.returncode == 0, loud.stderr
    assert "Setting accelerator to CPU" in loud.stdout + loud.stderr
