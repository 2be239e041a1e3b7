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


@pytest.mark.parametrize("source", ["model", "sampling"])
def test_generate_prints_the_log_prob_the_learner_reads(capsys, source):
    """Under objective.logp_temperature=sampling the learner reads log softmax(logits / 0.7), and so does the line."""
    from tracerl.checks import load_config
    from tracerl.config import logp_temperature
    from tracerl.data import encode_prompt
    from tracerl.models import load_policy
    from tracerl.sampling import generate

    overrides = ["sampling.max_new_tokens=8", "sampling.block_size=4", "sampling.temperature=0.7"]
    overrides.append(f"objective.logp_temperature={source}")
    assert main(["generate", "--prompt", "1+2=", "--no-animate", *overrides]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    cfg = load_config(None, overrides)
    policy = load_policy(cfg.model)
    tau = logp_temperature(cfg)
    rollout = generate(
        policy, [encode_prompt(policy.tokenizer, "1+2=", cfg.data)], cfg.sampling, seed=cfg.seed, logp_temperature=tau
    )
    mean = float(rollout.rollout_logp[0][rollout.response_mask[0]].mean())
    assert f"mean log-prob {mean:.3f} at temperature {tau:g}" in line
    assert tau == (0.7 if source == "sampling" else 1.0)
    greedy = ["sampling.max_new_tokens=8", "sampling.block_size=4", "sampling.temperature=0"]
    assert main(["generate", "--prompt", "1+2=", "--no-animate", *greedy, f"objective.logp_temperature={source}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]  # greedy under "sampling" divided by 0: nan
    assert "nan" not in line and line.endswith("at temperature 1"), line


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


def test_sigterm_while_a_command_starts_is_an_interrupt_not_a_silent_death(monkeypatch, capsys):
    """Before the RL loop installs its own handler (checks, Ray, model loading), SIGTERM stops a command as Ctrl-C
    does: the teardown runs (actors shut down), the command says so, exit 130; the handler is restored after."""
    import signal
    import time

    import tracerl.cli as cli

    def starting(ns):  # noqa: ANN001 - stands in for a command still starting up
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "cmd_validate", starting)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["validate", "--offline"]) == 130
    assert "tracerl validate: interrupted." in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    ("error", "printed"),
    [
        (KeyError("held out"), "error: KeyError: 'held out' (run with --debug for the traceback)"),  # a dict lookup
        (KeyError("reward"), "error: KeyError: 'reward' (run with --debug for the traceback)"),
        (None, "error: unknown remasking 'x'; choose from ['entropy_bounded',"),  # the registry's sentence
    ],
)
def test_a_bare_key_error_is_named_and_a_registry_sentence_printed_as_it_is(monkeypatch, capsys, error, printed):
    import tracerl.cli as cli
    from tracerl.sampling.remasking import REMASKING

    def failing(ns):  # noqa: ANN001
        if error is None:
            REMASKING.lookup("x")
        raise error

    monkeypatch.setattr(cli, "cmd_validate", failing)
    assert cli.main(["validate", "--offline"]) == 2
    assert f"tracerl validate: {printed}" in capsys.readouterr().err


def test_ray_init_does_not_take_sigterm_away_from_the_command():
    """ray.init installs Ray's SIGTERM handler (sys.exit(15) while it connects, a stack dump and exit 1 after):
    tracerl's handler comes back after it, and a SIGTERM caught by Ray's meanwhile becomes an interrupt, after
    Ray is shut down."""
    import signal

    from tracerl.orchestrator.setup import keep_sigterm_handler

    def ours(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, ours)
    try:
        shut = []
        with keep_sigterm_handler(on_exit=lambda: shut.append(1)):
            signal.signal(signal.SIGTERM, lambda signum, frame: None)  # what ray.init does
        assert signal.getsignal(signal.SIGTERM) is ours and not shut
        with pytest.raises(KeyboardInterrupt), keep_sigterm_handler(on_exit=lambda: shut.append(1)):
            raise SystemExit(signal.SIGTERM)  # Ray's handler during ray.init
        assert shut == [1] and signal.getsignal(signal.SIGTERM) is ours
        with pytest.raises(SystemExit), keep_sigterm_handler(on_exit=lambda: shut.append(1)):
            raise SystemExit(3)  # any other exit goes on as it is
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the Python API without a handler of its own: Ray's stays
        with keep_sigterm_handler(on_exit=lambda: None):
            signal.signal(signal.SIGTERM, ours)
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)


def test_every_commands_help_names_the_global_flags_and_the_summary_names_every_option():
    import argparse

    from tracerl import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        if name != "serve-reward":  # its own parser (tracerl.reward_server) says the same
            assert "--debug" in command.format_help() and "--verbose" in command.format_help(), name
        options = {o for a in command._actions for o in a.option_strings if o not in ("-h", "--help")}
        line = next(x for x in cli.__doc__.splitlines() if x.strip().startswith(f"tracerl {name} "))
        assert all(o in line for o in options), (name, options, line)  # the summary at the top of tracerl --help
