"""Checks that run before any actor starts and before anything is written (``Session.open``, ``run_eval``,
``tracerl validate``): sampler settings against the model (built from its config alone), prompt plus response
length, and whether the tokenizer can write the data and the rewards' answer formats; and the reward functions
on stand-in completions (in a reward actor, before anything is written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tracerl.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def refused(capsys, tmp_path: Path, *argv: str) -> str:  # noqa: ANN001
    """Run ``tracerl train QUICK run_dir=... argv``: it must fail with one paragraph, start no Ray instance (so no
    actor) and write nothing."""
    import ray

    capsys.readouterr()  # what the test itself printed before
    rc = main(["train", QUICK, f"run_dir={tmp_path / 'run'}", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not ray.is_initialized()  # refused before Ray (and any actor) started
    assert not (tmp_path / "run").exists()  # nothing written
    return err


def test_a_block_size_the_model_does_not_have(capsys, tmp_path):
    err = refused(capsys, tmp_path, "sampling.block_size=8")
    assert "sampling.block_size=8 differs from the model's block size 4" in err


def test_a_cache_mode_the_model_cannot_use(capsys, tmp_path):
    err = refused(capsys, tmp_path, "sampling.cache=dual", "objective.old_logp_source=learner")
    assert "sampling.cache=dual is for full-attention models" in err
    err = refused(capsys, tmp_path, "model.tiny.attention=full", "sampling.cache=kv")
    assert "sampling.cache=kv needs a block-diffusion model" in err


def test_cuda_graph_on_a_model_or_device_that_cannot_take_it(capsys, tmp_path):
    err = refused(capsys, tmp_path, "model.tiny.attention=full", "sampling.cuda_graph=true")
    assert "sampling.cuda_graph=true is for block-diffusion models" in err
    err = refused(capsys, tmp_path, "sampling.cuda_graph=true")  # the block model, but no GPU here
    assert "needs a CUDA device; the sampler runs on cpu" in err


def test_an_evaluation_setting_is_checked_too(capsys, tmp_path):
    err = refused(capsys, tmp_path, "eval.max_new_tokens=2040")  # fits for training, not for evaluation
    assert "sampling.max_new_tokens=2040" in err and "max_position_embeddings=2048" in err


def test_a_prompt_plus_response_longer_than_the_model(capsys, tmp_path):
    err = refused(capsys, tmp_path, "model.tiny.max_position_embeddings=24")
    assert "max_position_embeddings=24" in err and "sampling.max_new_tokens" in err


def test_a_reward_format_the_tiny_alphabet_cannot_write(capsys, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(20)))
    own = [f"data.source={data}", "eval.source=null", "eval.num_prompts=2", "reward.functions=[{fn: math_verify}]"]
    err = refused(capsys, tmp_path, *own)
    assert "reward 'math_verify' reads answers written like '\\\\boxed{42}'" in err
    assert "'\\\\', 'b', 'o', 'x', 'e', 'd'" not in err and "'{', '}'" in err  # the characters, sorted
    assert "model.tiny.alphabet" in err
    assert main(["validate", QUICK, *own, "model.tiny.alphabet=0123456789+=\\boxed{}"]) == 0  # with them, fine


def test_data_the_tiny_alphabet_cannot_write(capsys, tmp_path):
    data = tmp_path / "upper.jsonl"
    rows = [{"prompt": f"ADD {i} AND {i}:", "answer": str(2 * i)} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = refused(capsys, tmp_path, f"data.source={data}", "eval.source=null", "eval.num_prompts=2",
                  "reward.functions=[{fn: synthetic_exact}]")  # fmt: skip
    assert "of the prompts of data.source" in err and "unknown token '<unk>'" in err
    assert "'A', 'D', 'N'" in err and "model.tiny.alphabet" in err


def test_validate_says_what_the_tokenizer_cannot_write(capsys, tmp_path):
    data = tmp_path / "upper.jsonl"
    data.write_text("".join(json.dumps({"prompt": "QQQ:", "answer": "1"}) + "\n" for _ in range(5)))
    rc = main(["validate", QUICK, f"data.source={data}", "eval.source=null", "eval.num_prompts=1",
               "reward.functions=[{fn: synthetic_exact}]"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 2 and "data: ok" not in captured.out and "the tokenizer cannot write the data" in captured.err


def test_a_masked_lm_directory_without_its_tokenizer_config(capsys, tmp_path):
    """An AntiBERTy-like protein masked LM saved with vocab.txt only: transformers falls back to a lower-casing
    BERT tokenizer, every residue (upper case in the vocabulary) becomes [UNK], and the run is refused."""
    from transformers import BertConfig, BertForMaskedLM

    residues = list("ACDEFGHIKLMNPQRSTVWY")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *residues, ":"]
    model_dir = tmp_path / "antiberty"
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(model_dir)
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")  # no tokenizer_config.json
    data = tmp_path / "heavy.jsonl"
    rows = [{"prompt": "EVQLVESGGGLVQPGGSLRLSCAAS:", "answer": "GFTFS"}] * 10
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = ["model.family=masked_lm", f"model.path={model_dir}", f"data.source={data}", "data.chat_template=false",
           "eval.source=null", "eval.num_prompts=1", "reward.functions=[{fn: synthetic_exact}]",
           "sampling.max_new_tokens=8", "sampling.block_size=8", "sampling.cache=none"]  # fmt: skip
    err = refused(capsys, tmp_path, *own)
    assert "unknown token '[UNK]'" in err and "tokenizer_config.json" in err and str(model_dir) in err
    capsys.readouterr()
    rc = main(["validate", QUICK, *own])
    captured = capsys.readouterr()
    assert rc == 2 and "data: ok" not in captured.out and "[UNK]" in captured.err


REWARDS = """
import os

from tracerl.reward_service import is_trial


def one_number(prompts, completions, **kwargs):
    return 1.0  # a number for the batch, not one per completion


def first_digit(prompts, completions, **kwargs):
    return [float(c[0] == "1") for c in completions]  # IndexError on an empty completion


def fine(prompts, completions, **kwargs):
    return [float(len(c) > 0) for c in completions]


def nones(prompts, completions, **kwargs):
    return [None] * len(completions)  # reads a column under a name the dataset does not have, say


def fmt(prompts, completions, **kwargs):  # cannot score an empty completion: None (TRL's "does not apply")
    return [None if not c.strip() else float("1" in c) for c in completions]


def not_the_first(prompts, completions, **kwargs):  # TRL's None: it does not apply to the first row (2 stand-ins)
    return [None] * len(completions) if len(set(prompts)) == 1 else [1.0] * len(completions)


def where(prompts, completions, **kwargs):  # the trial runs where the functions run in a step: a reward actor
    if is_trial() and os.environ.get("TRIAL_PID_FILE"):
        with open(os.environ["TRIAL_PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
    return 1.0 if is_trial() else [1.0] * len(completions)
"""


def refused_before_writing(capsys, tmp_path: Path, *argv: str) -> str:  # noqa: ANN001
    """Run ``tracerl train QUICK run_dir=... argv``: it must fail with one paragraph and write nothing (a reward is
    tried in a reward actor, so Ray has started and stopped again)."""
    capsys.readouterr()
    rc = main(["train", QUICK, f"run_dir={tmp_path / 'run'}", "wandb.mode=disabled", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written
    return err


def test_a_reward_that_breaks_its_contract_is_refused_before_the_run(capsys, tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    err = refused_before_writing(capsys, tmp_path, f"reward.functions=[{{fn: '{path}:one_number'}}]")
    assert "reward function 'one_number' failed before the run started: it returned a float; a reward function " in err
    assert "returns a list of 2 floats" in err and "stand-in completions of the first row of data.source" in err
    assert "reward.on_error=nan" not in err  # scoring NaN would not help a function that never returns numbers
    # in a reward actor, not in the driver (a function that loads a model would hold it in the driver all run)
    pid_file = tmp_path / "trial.pid"
    monkeypatch.setenv("TRIAL_PID_FILE", str(pid_file))
    err = refused_before_writing(capsys, tmp_path, f"reward.functions=[{{fn: '{path}:where'}}]", "reward.on_error=nan")
    assert "'where' failed before the run started: it returned a float" in err  # whatever on_error says
    assert int(pid_file.read_text()) != os.getpid()


def test_a_reward_that_raises_on_an_empty_completion(capsys, tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    both = f"reward.functions=[{{fn: '{path}:fine'}}, {{fn: '{path}:first_digit'}}]"
    err = refused_before_writing(capsys, tmp_path, both)
    assert "reward function 'first_digit' failed on sample 1 before the run started: IndexError" in err
    assert "and '' (sample 1, an empty completion, which a model can write)" in err
    assert "or set reward.on_error=nan" in err
    capsys.readouterr()
    assert main(["validate", QUICK, both, "reward.on_error=nan"]) == 0  # the user chose NaN for such samples
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "tried on the first row: fine 1.00/0.00, first_digit failed, NaN under on_error=nan on its answer and an" in out
    )
    assert main(["validate", "--offline", QUICK, both]) == 0  # --offline runs no reward function
    assert "tried on the first row" not in capsys.readouterr().out


def test_a_reward_that_scores_no_row_is_refused_before_the_run(capsys, tmp_path):
    # it passed validate ("nones nan/nan on its answer"), then stopped the run at its first evaluation, after
    # run_dir was written
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    capsys.readouterr()
    assert main(["validate", QUICK, f"reward.functions=[{{fn: '{path}:nones'}}]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no reward function gave a score before the run started: nones [nan, nan] on the first row" in err
    assert "nothing but None or NaN on the answers of 7 more rows either" in err and "data.answer_column" in err
    # a function that does not apply to the first row but scores the next ones is a run's business
    assert main(["validate", QUICK, f"reward.functions=[{{fn: '{path}:not_the_first'}}]"]) == 0
    assert "not_the_first nan/nan on its answer" in " ".join(capsys.readouterr().out.split())
    # prompts without answers: only empty stand-ins to try, which a function need not score
    prompts_only = _rows(tmp_path / "p.jsonl", [{"prompt": f"{i}+1="} for i in range(8)])
    own = [f"data.source={prompts_only}", "eval.source=null", "eval.num_prompts=2", "data.chat_template=false"]
    assert main(["validate", QUICK, *own, f"reward.functions=[{{fn: '{path}:fmt'}}]"]) == 0, capsys.readouterr().err
    # no answer in the first row, answers in the next: those are tried, and a function that scores them passes
    rows = [{"prompt": "0+1="}] + [{"prompt": f"{i}+1=", "answer": f"1{i}"} for i in range(1, 8)]
    own[0] = f"data.source={_rows(tmp_path / 'partial.jsonl', rows)}"
    assert main(["validate", QUICK, *own, f"reward.functions=[{{fn: '{path}:fmt'}}]"]) == 0, capsys.readouterr().err
    assert main(["validate", QUICK, *own, f"reward.functions=[{{fn: '{path}:nones'}}]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "(an empty stand-in (it has no answer) and an empty completion), and nothing but None or NaN on the " in err


def test_a_cluster_with_fewer_cpus_than_the_actors_reserve_is_refused_naming_them():
    """Actors that cannot get their CPUs would wait forever, printing nothing (a joined cluster is not sized to
    the run as a local one is)."""
    import pytest

    from tracerl.config import ConfigError, load
    from tracerl.orchestrator.setup import check_resources, cpus_needed

    cfg = load(QUICK, ["rollout.num_workers=2", "rollout.num_cpus_per_worker=0.5", "cluster.address=10.0.0.1:6379"])
    assert cpus_needed(cfg) == {"learner": 1.0, "rollout": 1.0, "reward": 1.0}
    assert cpus_needed(cfg, learner=False) == {"rollout": 1.0, "reward": 1.0}  # tracerl eval starts no learner
    check_resources(cfg, {"CPU": 3.0})
    check_resources(cfg, {"CPU": 2.0}, learner=False)
    with pytest.raises(ConfigError) as err:
        check_resources(cfg, {"CPU": 2.0})
    message = str(err.value)
    assert "reserve 3 Ray CPUs in all (learner 1, rollout 1, reward 1)" in message
    assert "the Ray cluster at 10.0.0.1:6379 offers 2" in message and "--num-cpus N" in message
    assert "rollout.num_cpus_per_worker" in message
    # reward models only: no reward-function actor is started, so none reserves a CPU
    rm = load(QUICK, ["reward.functions=[{fn: runs/rm, kind: model, model: {placement: cpu, num_cpus: 2}}]"])
    assert cpus_needed(rm) == {"learner": 1.0, "rollout": 1.0, "reward model": 2.0}


def _rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_held_out_prompts_that_are_all_too_long_are_named_as_such(capsys, tmp_path):
    from tracerl.stats import heldout_split

    rows = [{"prompt": f"{i:02d}" * 150, "answer": "1"} for i in range(40)]  # 300 characters: too long
    train, held = heldout_split([r["prompt"] for r in rows], 4, seed=0)  # the quickstart's seed
    for i in train[:2]:  # two short prompts, both left for training
        rows[i] = {"prompt": f"{i}+1=", "answer": str(i + 1)}
    own = [f"data.source={_rows(tmp_path / 'long.jsonl', rows)}", "eval.source=null", "eval.num_prompts=4",
           "reward.functions=[{fn: synthetic_exact}]"]  # fmt: skip
    err = refused(capsys, tmp_path, *own)  # was: "every prompt of data.source ... is longer", untrue
    assert "every one of the 4 prompts held out for evaluation (eval.num_prompts=4) of data.source" in err
    assert "longer than data.max_prompt_tokens=256; 2 of the prompts left for training fit" in err
    assert "every prompt of data.source" not in err and "set eval.source" in err


def test_an_eval_source_without_the_column_a_reward_needs(capsys, tmp_path):
    train = _rows(tmp_path / "train.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)])
    held = _rows(tmp_path / "held.jsonl", [{"prompt": f"{i}+2="} for i in range(4)])
    own = [f"data.source={train}", f"eval.source={held}", "eval.split=train", "eval.num_prompts=4",
           "reward.functions=[{fn: synthetic_exact}]", "data.synthetic_options={}"]  # fmt: skip
    err = refused(capsys, tmp_path, *own)  # was: a run directory, then an error from the reward function
    assert "reward function 'synthetic_exact' needs the dataset column(s) ['answer'], which eval.source" in err
    assert f"'{held}' lacks (its columns: ['prompt'])" in err
    assert main(["validate", QUICK, *own]) == 2


def test_a_seed_outside_the_range_every_command_takes(capsys, tmp_path):
    """A seed NumPy (SFT) cannot take, or so large that a derived seed overflowed at RL step 1, is refused first."""
    for seed in ("-1", str(2**32), "9223372036854775807"):
        err = refused(capsys, tmp_path, f"seed={seed}")
        assert (
            f"seed must be between 0 and 2**32 - 1 = 4294967295 (the range NumPy, which SFT seeds, takes), got {seed}"
            in err
        )
    from tracerl.learner.micro import minibatches

    (mb,) = minibatches(5, 1, 1, seed=2**32 - 1, rl_step=10**9, salt=1)  # the largest seed, far into a run
    assert sorted(mb.tolist()) == [0, 1, 2, 3, 4]


def test_a_reward_kind_that_contradicts_its_fn(capsys, tmp_path):
    """kind=http on a file's function skipped the functions' pre-start trial and failed at RL step 1."""
    score = tmp_path / "score.py"
    score.write_text("def f(prompts, completions, **kwargs):\n    return {'r': 1.0}\n")
    err = refused(capsys, tmp_path, f"reward.functions=[{{fn: '{score}:f', kind: http}}]")
    assert f"reward.functions[0] ({score}:f) is kind=http but fn is not an http(s):// URL" in err
    err = refused(capsys, tmp_path, "reward.functions=[{fn: 'http://127.0.0.1:9/score', kind: function}]")
    assert "reward.functions[0] (http://127.0.0.1:9/score) is kind=function but fn is an endpoint URL" in err


def test_a_reward_file_that_exits_while_importing(capsys, tmp_path, monkeypatch):
    """A script's `raise SystemExit` / argparse at import time ended the CLI silently with the script's exit code."""
    script = tmp_path / "script.py"
    script.write_text(
        "raise SystemExit(4)\n\ndef f(prompts, completions, **kwargs):\n    return [1.0] * len(prompts)\n"
    )
    err = refused(capsys, tmp_path, f"reward.functions=[{{fn: '{script}:f'}}]")
    assert f"reward file {script} failed to import: it exited while importing (SystemExit: 4)" in err
    assert 'belongs under `if __name__ == "__main__":`' in err
    capsys.readouterr()
    assert main(["validate", QUICK, f"reward.functions=[{{fn: '{script}:f'}}]"]) == 2
    assert "exited while importing (SystemExit: 4)" in capsys.readouterr().err
    package = tmp_path / "pkg_exits"
    package.mkdir()
    (package / "__init__.py").write_text("import sys\nsys.exit('usage: score.py [-h]')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = refused(capsys, tmp_path, "reward.functions=[{fn: 'pkg_exits:f'}]")
    assert (
        "module 'pkg_exits' (reward 'pkg_exits:f') failed to import: it exited while importing (SystemExit: usage"
        in err
    )
