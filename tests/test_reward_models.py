"""Sequence-classification reward models: trained with TRL's RewardTrainer (tracerl train-reward-model), they score
pairs in the order their training says, through the reward service; their bad inputs are clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tracerl.checks import load_config
from tracerl.cli import main
from tracerl.config import ConfigError, RewardModelConfig
from tracerl.reward_models.classifier import SequenceClassifierReward, token_budget_batches, truncate
from tracerl.reward_resolve import RewardError, RewardSpec, reward_kind
from tracerl.reward_service import RewardService

from .conftest import TINY_RM, ones_pairs, save_tiny_classifier

TINY = TINY_RM


# ---------------------------------------------------------------------------------------------- maths


def test_token_budget_batches_fill_the_budget_longest_first_and_cover_every_input() -> None:
    lengths = [5, 1, 7, 3, 3, 8, 2]
    batches = token_budget_batches(lengths, budget=16)
    assert sorted(i for b in batches for i in b) == list(range(7))  # every input once
    assert all(len(b) * max(lengths[i] for i in b) <= 16 for b in batches)
    # longest first: [8, 7] = 16; [5, 3, 3] = 15; [2, 1] = 4
    assert batches == [[5, 2], [0, 3, 4], [6, 1]]
    assert token_budget_batches([20], budget=16) == [[0]]  # one too long for the budget still gets a forward


def test_truncation_keeps_the_chosen_side_and_counts() -> None:
    ids = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    assert truncate(ids, 3, "left") == ([[3, 4, 5], [6, 7], [8, 9, 10]], 1)
    assert truncate(ids, 2, "right") == ([[1, 2], [6, 7], [8, 9]], 2)


# ---------------------------------------------------------------------------------------------- training, scoring


@pytest.mark.slow
def test_the_trained_model_scores_unseen_pairs_in_the_order_of_its_training(trained_rm: Path) -> None:
    summary = json.loads((trained_rm / "reward_model.json").read_text())
    assert summary["accuracy"]["train"] > 0.9 and summary["accuracy"]["heldout"] > 0.9
    rm = SequenceClassifierReward(str(trained_rm), RewardModelConfig(), name="rm")
    fresh = ones_pairs(100, seed=7)  # pairs never seen (another seed)
    chosen = rm([p["prompt"] for p in fresh], [p["chosen"] for p in fresh])
    rejected = rm([p["prompt"] for p in fresh], [p["rejected"] for p in fresh])
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 90
    assert not rm.model.training and not any(p.requires_grad for p in rm.model.parameters())
    assert rm.model.dtype == torch.float32  # CPU: fp32


@pytest.mark.slow
def test_a_reward_model_given_as_the_policy_is_named_as_such(trained_rm: Path) -> None:
    """It failed with "weights are missing (lm_head.weight) ... set model.trust_remote_code=true"."""
    from tracerl.config import ModelConfig
    from tracerl.models import load_policy

    with pytest.raises(ConfigError, match=r"is a sequence-classification model \(LlamaForSequenceClassification\), "
                       r"such as a reward model .* reward.functions=\[\{fn: "):  # fmt: skip
        load_policy(ModelConfig(family="tiny", path=str(trained_rm)))


def test_scoring_reads_the_text_it_was_trained_on(trained_rm: Path) -> None:
    """The saved pairs, encoded by the scorer, are the chat-templated prompt and completion of each pair."""
    rm = SequenceClassifierReward(str(trained_rm), RewardModelConfig(), name="rm")
    assert rm.template == "chat"
    text = rm.tokenizer.decode(rm.encode("count 3:", "0110"))
    assert text == "user: count 3:\nassistant: 0110\n"


@pytest.mark.slow
def test_batched_scores_equal_one_at_a_time_forwards(trained_rm: Path) -> None:
    """Packing by token budget and right padding change nothing: a plain loop of single forwards agrees."""
    rm = SequenceClassifierReward(str(trained_rm), RewardModelConfig(batch_tokens=64), name="rm")
    prompts = [f"count {i}:" for i in range(9)]
    completions = ["1" * (i % 5 + 1) + "0" * (i % 3) for i in range(9)]  # different lengths
    batched = rm(prompts, completions)
    rm.load()
    plain = []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor([rm.encode(p, c)])
        with torch.no_grad():
            plain.append(float(rm.model(input_ids=ids).logits[0, 0]))
    assert batched == pytest.approx(plain, abs=1e-5)


@pytest.mark.slow
def test_serve_reward_refuses_a_reward_model_whose_weights_do_not_load(trained_rm: Path, tmp_path: Path) -> None:
    """It used to start serving and answer every request with the load error."""
    import shutil

    from tracerl.reward_resolve import RewardError
    from tracerl.reward_server import make_server

    damaged = tmp_path / "rm"
    shutil.copytree(trained_rm, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2048])
    with pytest.raises(RewardError, match="reward 'rm' could not load: SafetensorError"):
        make_server(str(damaged), "127.0.0.1", 0)
    make_server(str(trained_rm), "127.0.0.1", 0).server_close()  # the whole one serves


@pytest.mark.slow
def test_a_model_directory_is_a_reward_where_a_function_would_be(trained_rm: Path) -> None:
    """TRL's spelling: a model name in the reward list beside functions; weighted, logged, counted."""
    assert reward_kind(RewardSpec(str(trained_rm))) == "model"
    assert reward_kind(RewardSpec("OpenAssistant/reward-model-deberta-v3-large-v2")) == "model"  # a hub id
    assert reward_kind(RewardSpec("sudoku_cells")) == "function"
    service = RewardService(
        [RewardSpec(str(trained_rm), name="rm", model=RewardModelConfig(max_length=12)), RewardSpec("length", 0.0)]
    )
    service.load()
    result = service.score(["count 1:"] * 3, ["111111", "000000", "11"], completion_ids=[[1] * 6, [1] * 6, [1] * 2])
    rm = result.parts["rm"]
    assert rm[0] > rm[1] and result.total == rm  # the weight-0 length part is logged, not in the total
    # "user: count 1:\nassistant: 111111\n" is 31 characters: cut to 12, so all three are counted
    assert result.metrics["reward/truncated/rm"] == 3.0
    assert "reward/corr/rm/length" in result.metrics and "reward/length/mean" in result.metrics


def test_the_label_index_picks_the_logit(tmp_path: Path) -> None:
    path = save_tiny_classifier(tmp_path / "two", num_labels=2)
    one = SequenceClassifierReward(str(path), RewardModelConfig(label_index=1), name="two")
    one.load()
    ids = one.encode("count 1:", "101")
    with torch.no_grad():
        logits = one.model(input_ids=torch.tensor([ids])).logits[0]
    assert one(["count 1:"], ["101"]) == pytest.approx([float(logits[1])], abs=1e-6)


# ---------------------------------------------------------------------------------------------- bad input


def test_a_directory_without_a_classification_head_is_refused(tmp_path: Path) -> None:
    path = save_tiny_classifier(tmp_path / "causal", head=False)
    with pytest.raises(RewardError) as err:
        RewardService([RewardSpec(str(path), name="rm")])
    text = str(err.value)
    assert "reward model 'rm'" in text and "LlamaForCausalLM" in text and "no sequence-classification head" in text
    assert "tracerl train-reward-model" in text and "kind: judge" in text


def test_a_tokenizer_without_a_pad_token_names_the_fix(tmp_path: Path) -> None:
    path = save_tiny_classifier(tmp_path / "nopad", pad=False)
    with pytest.raises(RewardError, match=r"reward model 'rm'.*no pad token.*model.pad_token.*'<eos>'"):
        SequenceClassifierReward(str(path), RewardModelConfig(), name="rm")
    fixed = SequenceClassifierReward(str(path), RewardModelConfig(pad_token="<eos>"), name="rm")
    assert len(fixed(["q:", "q:"], ["1", "111"])) == 2  # batched with the EOS token as padding


@pytest.mark.parametrize(
    ("labels", "index", "expected"),
    [(1, 1, "label_index=1 is out of range; the model has 1 label"), (3, None, "has 3 labels")],
)
def test_label_index_problems_are_named(tmp_path: Path, labels: int, index: int | None, expected: str) -> None:
    path = save_tiny_classifier(tmp_path / "m", num_labels=labels)
    with pytest.raises(RewardError, match=expected):
        SequenceClassifierReward(str(path), RewardModelConfig(label_index=index), name="rm")


def test_missing_head_weights_are_an_error_not_noise(tmp_path: Path) -> None:
    path = save_tiny_classifier(tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("score")}, path / "model.safetensors")
    rm = SequenceClassifierReward(str(path), RewardModelConfig(), name="rm")  # the config alone looks right
    with pytest.raises(RewardError, match=r"lacks the weights \['score.weight'\]"):
        rm.load()


@pytest.mark.slow
def test_validate_checks_reward_models_before_anything_starts(capsys, tmp_path: Path, trained_rm: Path) -> None:
    causal = save_tiny_classifier(tmp_path / "causal", head=False)
    capsys.readouterr()  # the helper's own progress bar
    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    assert main(["validate", "--offline", quick, f"reward.functions=[{{fn: {causal}, name: rm}}]"]) == 2
    err = capsys.readouterr().err
    assert "reward model 'rm'" in err and "no sequence-classification head" in err and len(err.splitlines()) == 1
    assert main(["validate", "--offline", quick, "reward.functions=[{fn: ./no/such/reward_model}]"]) == 2
    assert "does not exist" in capsys.readouterr().err
    ok = [f"reward.functions=[{{fn: {trained_rm}, name: rm}}, {{fn: sudoku_cells, weight: 0}}]"]
    assert main(["validate", "--offline", quick, *ok]) == 0
    out = capsys.readouterr().out
    assert "reward 'rm': ok (sequence classifier" in out and "weights not loaded" in out  # --offline: no weights


def test_train_reward_model_refuses_bad_pairs_and_writes_nothing(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "good": "a", "bad": "b"}) + "\n")
    out = tmp_path / "rm"
    assert main(["train-reward-model", *TINY, f"reward_model.pairs={bad}", f"reward_model.out_dir={out}"]) == 2
    assert "lacks the column(s) ['chosen', 'rejected']" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    assert main(["train-reward-model", f"reward_model.pairs={bad}", f"reward_model.out_dir={out}"]) == 2
    assert "exists" in capsys.readouterr().err and not any(out.iterdir())


def test_pairs_in_characters_the_tokenizer_lacks_are_refused_before_training(capsys, tmp_path: Path) -> None:
    rows = [{"prompt": f"{i}+{i}=", "chosen": "Ответ верный", "rejected": "Неверно"} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "rm"
    args = ["train-reward-model", *TINY, "reward_model.base=tiny", f"reward_model.pairs={path}"]
    assert main([*args, f"reward_model.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "cannot read reward_model.pairs=" in err and "of its chosen texts (first 8 pairs)" in err
    assert "'О'" in err and "model.tiny.alphabet" in err and not out.exists()
    assert len(err.strip().splitlines()) == 1  # one paragraph, no traceback


def test_a_pairs_file_with_a_few_ties_and_empty_prompts_trains_on_the_rest(tmp_path: Path) -> None:
    """Real preference sets hold a few ties (chosen = rejected), and some give the whole dialogue in the completions
    with an empty prompt: the ties are dropped and counted, the empty prompts kept."""
    from rich.console import Console

    from tracerl.reward_models.train import load_pairs

    rows = [{"prompt": "", "chosen": "Q: 1+1? A: 2", "rejected": "Q: 1+1? A: 3"}]
    rows += [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(3)]
    rows.insert(2, {"prompt": "tie", "chosen": "same", "rejected": "same"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    console = Console(record=True, width=200)
    pairs = load_pairs(str(path), console)
    assert [p["chosen"] for p in pairs] == ["Q: 1+1? A: 2", "0", "2", "4"] and pairs[0]["prompt"] == ""
    assert "pairs: dropped 1 of 5 whose chosen is the rejected (rows [3])" in console.export_text()


DISTINCT = """
def score(prompts, completions, **kwargs):
    return [len(set(c)) / 4.0 for c in completions]
"""


def test_sampled_pairs_come_from_the_policy_ordered_by_the_labelling_reward(tmp_path: Path) -> None:
    """Without a pairs file the policy samples them: in every pair the chosen completion scores higher."""
    from rich.console import Console

    from tracerl.reward_models.train import sample_pairs

    label = tmp_path / "distinct.py"
    label.write_text(DISTINCT)
    cfg = load_config(None, [*TINY, "data.source=synthetic:parity", "sampling.max_new_tokens=4",
                             "reward_model.pair_prompts=12", "reward_model.samples_per_prompt=3",
                             f"reward_model.label_with={label}:score", "eval.num_prompts=0"])  # fmt: skip
    pairs = sample_pairs(cfg, Console(quiet=True))
    assert len(pairs) >= 6  # a random tiny model's completions differ in their distinct characters
    for p in pairs:
        chosen, rejected = len(set(p["chosen"])) / 4.0, len(set(p["rejected"])) / 4.0
        assert chosen > rejected and p["margin"] == pytest.approx(chosen - rejected)
        assert p["prompt"].startswith("parity ")
    assert {p["prompt_index"] for p in pairs} <= set(range(12))


def test_nothing_held_out_is_written_as_null_not_nan(tmp_path: Path, capsys) -> None:
    """reward_model.heldout_fraction=0: reward_model.json is strict JSON (it held NaN) and the console says none."""
    from .conftest import TINY_RM, ones_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in ones_pairs(32, seed=0)))
    argv = ["train-reward-model", *TINY_RM, f"reward_model.out_dir={tmp_path / 'rm'}", f"reward_model.pairs={pairs}",
            "reward_model.base=tiny", "reward_model.epochs=1", "reward_model.batch_size=16",
            "reward_model.heldout_fraction=0"]  # fmt: skip
    assert main(argv) == 0
    assert "none held out (reward_model.heldout_fraction=0.0)" in " ".join(capsys.readouterr().out.split())

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    summary = json.loads((tmp_path / "rm" / "reward_model.json").read_text(), parse_constant=refuse)
    assert summary["accuracy"]["heldout"] is None and summary["pairs"]["heldout"] == 0


def test_sampled_completions_that_all_tie_are_named_as_such(tmp_path: Path) -> None:
    """A labelling reward that gives every completion the same score makes no pair: "sample more prompts" would not
    help, and the error says so."""
    from rich.console import Console

    from tracerl.reward_models.train import sample_pairs

    label = tmp_path / "flat.py"
    label.write_text("def score(prompts, completions, **kwargs):\n    return [0.0 for _ in completions]\n")
    cfg = load_config(None, [*TINY, "data.source=synthetic:parity", "sampling.max_new_tokens=4",
                             "reward_model.pair_prompts=4", "reward_model.samples_per_prompt=2",
                             f"reward_model.label_with={label}:score", "eval.num_prompts=0"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"gave every completion the same reward \(0.000\) \(8 completions .*more"):
        sample_pairs(cfg, Console(quiet=True))
    by_prompt = tmp_path / "by_prompt.py"
    by_prompt.write_text("def score(prompts, completions, **kwargs):\n    return [float(len(p)) for p in prompts]\n")
    cfg.reward_model.label_with = f"{by_prompt}:score"
    with pytest.raises(ConfigError) as err:  # ties within each prompt only: more prompts would not help
        sample_pairs(cfg, Console(quiet=True))
    assert "gave the completions of each prompt the same reward as each other" in str(err.value)
    assert "more prompts would tie" not in str(err.value)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ("{fn: a/b, model: {}, judge: {}}", "has both a model and a judge block"),
        ("{fn: sudoku_cells, kind: function, model: {}}", "is kind=function but has a model/judge block"),
        ("{fn: a/b, model: {max_length: 512, batch_tokens: 256}}", "model.batch_tokens ≥ model.max_length"),
        ("{fn: a/b, model: {num_workers: 3}}", "model.num_workers (3) must equal rollout.num_workers (1)"),
        ("{fn: a/b, model: {gpu_fraction: 0.6}}, {fn: c/d, model: {gpu_fraction: 0.5}}", "take 1.1 of each rollout"),
        ("{fn: 'http://h:1/v1', judge: {concurrency: 0}}", "judge.concurrency and judge.max_tokens must be ≥ 1"),
    ],
)
def test_impossible_reward_entries_are_refused_when_the_config_loads(entries: str, expected: str) -> None:
    from tracerl.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, [f"reward.functions=[{entries}]"])
    assert expected in str(err.value)
    if "take" not in expected:  # a problem of one entry names it
        assert "reward.functions[0]" in str(err.value)


def test_reward_models_on_their_own_gpus_count_in_the_gpus_a_run_needs(capsys) -> None:
    entry = "reward.functions=[{fn: a/b, model: {placement: separate, num_workers: 2}}]"
    assert main(["validate", "--offline", "cluster.gpus_per_node=3", entry]) == 2
    err = capsys.readouterr().err
    assert "needs 4 GPUs (1 learner ranks + 1 rollout actors + 2 reward-model actors" in err and "has 3" in err


def test_train_with_a_bad_reward_model_starts_nothing_and_writes_nothing(capsys, tmp_path: Path) -> None:
    causal = save_tiny_classifier(tmp_path / "causal", head=False)
    capsys.readouterr()
    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", quick, f"run_dir={run_dir}", f"reward.functions=[{{fn: {causal}, name: rm}}]"]) == 2
    err = capsys.readouterr().err
    assert "reward model 'rm'" in err and "no sequence-classification head" in err and not run_dir.exists()


def test_training_ignores_a_launcher_environment_whose_port_is_taken(monkeypatch, tmp_path: Path) -> None:
    """An earlier process group (or launcher) leaves RANK/LOCAL_RANK/MASTER_PORT behind; accelerate would start a
    group at that port and fail with EADDRINUSE. Training runs in one process and restores the variables."""
    import socket

    from tracerl.reward_models.train import train_reward_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in ones_pairs(40, seed=1)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        for k, v in launcher.items():
            monkeypatch.setenv(k, v)
        cfg = load_config(None, [*TINY_RM, f"reward_model.out_dir={tmp_path / 'rm'}", f"reward_model.pairs={pairs}",
                                 "reward_model.base=tiny", "reward_model.epochs=1", "reward_model.batch_size=8",
                                 "reward_model.heldout_fraction=0.25"])  # fmt: skip
        summary = train_reward_model(cfg)
    assert summary["pairs"]["train"] == 30 and (tmp_path / "rm" / "reward_model.json").exists()
    assert {k: os.environ[k] for k in launcher} == launcher

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(None, [*TINY_RM, f"reward_model.out_dir={tmp_path / 'rm4'}", f"reward_model.pairs={pairs}",
                             "reward_model.base=tiny", "reward_model.batch_size=8"])  # fmt: skip
    with pytest.raises(ConfigError, match="WORLD_SIZE=4"):
        train_reward_model(cfg)
    assert not (tmp_path / "rm4").exists() and os.environ["WORLD_SIZE"] == "4"
