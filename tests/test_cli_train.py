"""tracerl train / eval / validate: bad input is one paragraph, exit 2, and nothing is written or started."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tracerl.checks import load_config
from tracerl.cli import main
from tracerl.config import ConfigError

from .conftest import save_tiny_classifier

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def fails(capsys, *argv: str) -> str:  # noqa: ANN001
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_offline(capsys, path, tmp_path):
    # a config that scores with a reward model trained earlier in its pipeline gets one (random weights) to check
    needs = [f"reward_model.out_dir={save_tiny_classifier(tmp_path / 'rm')}"] if path.name == "rlhf.yaml" else []
    capsys.readouterr()
    assert main(["validate", "--offline", str(path), *needs]) == 0
    out = capsys.readouterr().out
    assert "config: ok" in out and "cluster: ok" in out and "rewards: ok" in out
    # the 8-GPU configs describe another machine: this one's cores say nothing about their 8 rollout actors
    assert "warning" not in out, out


def test_validate_catches_a_bad_reward_name(capsys):
    err = fails(capsys, "validate", QUICK, "reward.functions=[{fn: no_such_reward}]")
    assert "no_such_reward" in err


def test_validate_catches_a_missing_mapped_column(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(5)))
    own = [f"data.source={data}", "data.prompt_column=question", "eval.num_prompts=1", "eval.source=null"]
    err = fails(capsys, "validate", QUICK, *own)
    assert "'answer'" in err and "sudoku_cells" in err and "data.answer_column" in err
    assert main(["validate", QUICK, *own, "data.answer_column=solution"]) == 0


def test_validate_catches_more_gpus_than_the_cluster_has(capsys):
    err = fails(capsys, "validate", "--offline", QUICK, "cluster.gpus_per_node=2", "learner.num_ranks=2",
                "rollout.num_workers=2")  # fmt: skip
    assert "needs 4 GPUs" in err and "has 2" in err and "rollout.placement=colocated" in err


@pytest.mark.ray  # starts a local Ray instance to count its GPUs
def test_train_on_a_cpu_only_cluster_that_asks_for_gpus_starts_nothing(capsys, tmp_path):
    err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'run'}", "cluster.gpus_per_node=1")
    assert "needs 2 GPUs" in err and "the Ray cluster has 0" in err  # 1 learner rank + 1 rollout actor
    assert not (tmp_path / "run").exists()


def test_unreachable_ray_address_is_clear_and_writes_nothing(capsys, tmp_path):
    err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'run'}", "--ray-address", "127.0.0.1:9")
    assert "--ray-address" in err and "127.0.0.1:9" in err and "ray start --head" in err
    assert not (tmp_path / "run").exists()


def test_an_address_that_answers_but_is_no_ray_cluster_is_refused_at_once(capsys, tmp_path):
    """Something accepts connections at --ray-address but is not a Ray GCS (here a plain HTTP server; a proxy in
    front of an unroutable address answers the same): refused before ray.init, which would retry while its C++
    client filled the console; the error says how to start a cluster and which setting to check."""

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002, ANN001, ANN002, ANN202
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'run'}", "--ray-address", address)
    finally:
        server.shutdown()
        server.server_close()
    assert f"--ray-address / cluster.address '{address}'" in err and "no Ray cluster answers as one" in err
    assert "scripts/ray_cluster.sh" in err and "gcs_client" not in err
    assert not (tmp_path / "run").exists()
    err = fails(capsys, "validate", QUICK, f"cluster.address=127.0.0.1:{free_port()}")  # validate checks it too
    assert "cluster.address '127.0.0.1:" in err and "no Ray cluster answers there" in err


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_prompt_that_fits_is_clear(capsys, tmp_path):
    err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'run'}", "data.max_prompt_tokens=2")
    assert "data.max_prompt_tokens" in err


def test_zero_prompts_per_step_is_clear(capsys, tmp_path):
    err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'run'}", "rollout.prompts_per_step=0")
    assert "rollout.prompts_per_step" in err


def test_debug_is_accepted_after_the_command(capsys):
    with pytest.raises(ConfigError):
        main(["validate", QUICK, "rollout.prompts_per_step=0", "--debug"])


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["objective.shrink=2"], "objective.shrink=2"),
        (["objective.views=d1"], "objective.views=d1"),
        (["rollout.dtype=bfloat16"], "rollout.dtype=bfloat16"),
        (["learner.precision=bf16"], "learner.precision=bf16"),
        (["sampling.cache=prefix", "model.tiny.attention=full"], "sampling.cache=prefix"),
    ],
)
def test_rollout_old_logps_need_exact_replay(overrides, reason):
    from tracerl.config import check_training

    cfg = load_config(None, ["objective.old_logp_source=rollout", *overrides])  # sft, eval, generate: no old log-probs
    with pytest.raises(ConfigError, match="only true when the views replay the sampler exactly") as err:
        check_training(cfg)  # train and validate
    assert reason in str(err.value) and "old_logp_source=learner" in str(err.value)
    check_training(load_config(None, ["objective.old_logp_source=rollout"]))


def test_sft_on_a_config_with_rollout_old_logps_is_not_refused_for_them(capsys, tmp_path):
    """The quickstart config sets old_logp_source=rollout for its RL step; SFT in bf16 has no old log-probs."""
    quick = ["sft.steps=1", "sft.eval_every=0", "wandb.mode=disabled", "learner.precision=bf16"]
    assert main(["sft", QUICK, f"run_dir={tmp_path / 'sft'}", *quick]) == 0, capsys.readouterr().err
    err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'rl'}", "learner.precision=bf16")
    assert "learner.precision=bf16 is not fp32" in err and not (tmp_path / "rl").exists()


def test_train_checks_positions_before_anything_is_written(capsys, tmp_path):
    err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'run'}", "model.tiny.max_position_embeddings=24")
    assert "max_position_embeddings=24" in err and "sampling.max_new_tokens" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_non_finite_weights_and_updates_stop_the_run_before_they_are_saved(capsys, tmp_path):
    """A model.path with one NaN weight is refused before anything is written. learner.lr=1e30 turned the loss NaN
    at step 2, every later step trained on it, NaN checkpoints replaced the good ones and the run exited 0 with a
    NaN final/: it now stops at step 2 with exit 2, naming the step, the loss, the checkpoint and the fixes."""
    from tracerl.models import build_tiny, save_tiny

    small = ["model.family=tiny", "sampling.max_new_tokens=8", "sampling.block_size=4", "data.chat_template=false",
             "data.source=synthetic:addition", "data.num_synthetic=64", "rollout.prompts_per_step=2",
             "rollout.samples_per_prompt=2", "learner.engine=torch", "train.log_samples_every=0",
             "eval.num_prompts=0", "wandb.mode=disabled", "reward.functions=[{fn: length}]",
             "objective.group_filter=keep_all"]  # fmt: skip
    model, tok = build_tiny(load_config(None, small).model.tiny)
    model.lm_head.weight.data[0, 0] = float("nan")
    save_tiny(model, tok, tmp_path / "nan")
    capsys.readouterr()  # transformers' progress bar while saving it
    err = fails(capsys, "train", *small, f"model.path={tmp_path / 'nan'}", f"run_dir={tmp_path / 'run'}")
    assert f"model.path '{tmp_path / 'nan'}' holds weights that are not finite numbers" in err
    assert "['lm_head.weight']" in err
    assert not (tmp_path / "run").exists()

    run = tmp_path / "run2"
    rc = main(["train", *small, f"run_dir={run}", "learner.lr=1e30", "train.steps=4", "checkpoint.save_every=1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "RL step 2 failed: the policy loss is nan (not a finite number)" in err and "lower learner.lr" in err
    assert f"a checkpoint of step 1 is in {run / 'checkpoints'}: resume with --resume auto" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"] and not (run / "final").exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.ray
@pytest.mark.slow
def test_a_reward_that_scores_nothing_stops_the_run_at_its_first_step(capsys, tmp_path):
    """A reward that returns None for every sample would train nothing, step after step, and exit 0. One that gives
    the reference answers of the first rows nothing either is refused before the run starts, with nothing written;
    one that scores those but no completion of the model stops the run at its first step, naming the function and
    the columns it reads."""
    reward = tmp_path / "nothing.py"
    reward.write_text(
        "from tracerl.reward_service import is_trial\n\n"
        "def score(prompts, completions, **kwargs):\n    return [None] * len(completions)\n\n"
        "def only_trial(prompts, completions, **kwargs):\n"
        "    return [1.0 if is_trial() else None for _ in completions]\n"
    )
    small = ["eval.num_prompts=0", "train.steps=3", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
             "wandb.mode=disabled"]  # fmt: skip
    err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'run'}", f"reward.functions=[{{fn: '{reward}:score'}}]",
                *small)  # fmt: skip
    assert "no reward function gave a score before the run started: score [nan, nan] on the first row" in err
    assert not (tmp_path / "run").exists()
    reward_fn = f"reward.functions=[{{fn: '{reward}:only_trial'}}]"
    err = fails(capsys, "train", QUICK, f"run_dir={tmp_path / 'run'}", reward_fn, *small)
    assert "every sample of RL step 1 was scored None (or NaN) by reward function(s) ['only_trial']" in err
    assert "data.answer_column" in err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_an_evaluation_that_scores_nothing_is_an_error_not_a_zero(capsys, tmp_path):
    """tracerl eval with a reward that gives None for every sample reported greedy reward 0.000 and exited 0."""
    reward = tmp_path / "nothing.py"
    reward.write_text("def score(prompts, completions, **kwargs):\n    return [None] * len(completions)\n")
    from tracerl.models import build_tiny, save_tiny

    save_tiny(*build_tiny(load_config(QUICK).model.tiny), tmp_path / "model")  # an untrained model will do
    capsys.readouterr()  # transformers' progress bar while saving it
    small = [
        "eval.num_prompts=2",
        "eval.samples=2",
        "eval.k=2",
        "wandb.mode=disabled",
        f"model.path={tmp_path / 'model'}",
    ]
    reward_fn = f"reward.functions=[{{fn: '{reward}:score'}}]"
    err = fails(capsys, "eval", QUICK, f"run_dir={tmp_path / 'run'}", reward_fn, *small)
    assert "every sample of the held-out evaluation at step 0 was scored None (or NaN) by reward function(s) " in err
    assert "['score']" in err and "(6 samples), so there is nothing to report" in err
    assert "of eval.source 'synthetic:sudoku4'" in err  # the quickstart's held-out prompts are a dataset of their own
    assert not list((tmp_path / "run").rglob("eval.json"))  # no summary with a made-up score
