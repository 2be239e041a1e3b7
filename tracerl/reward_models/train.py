"""``tracerl train-reward-model``: preference pairs → a reward-model directory (DESIGN §19), trained with TRL's
``RewardTrainer`` (we write no trainer). The directory is what a ``reward.functions`` entry of kind ``model``
loads.

1. Pairs: ``reward_model.pairs`` (a json / jsonl / parquet file with ``prompt``, ``chosen``, ``rejected``), or
   sampled: ``pair_prompts`` training prompts of ``data.source``, each sampled ``samples_per_prompt`` times by the
   policy at ``model.path`` (its own sampler, ``sampling.*``) and scored by the reward ``label_with``; every two
   completions of a prompt with different rewards make a pair, the better one chosen. Held-out prompts of the RL
   run (``eval.num_prompts`` of ``data.source`` when ``eval.source`` is unset) are never used.
2. ``heldout_fraction`` of the prompts, with their pairs, are kept out of training to measure pair accuracy.
3. The classifier: ``base=policy`` is ``model.path`` loaded with ``AutoModelForSequenceClassification`` (the
   backbone, a new one-logit head: the usual RLHF start); ``tiny`` a fresh tiny one of ``model.tiny``'s shape;
   else a directory or hub id. ``bidirectional`` turns off the causal mask (a diffusion backbone was trained so).
4. Every pair is tokenised by ``SequenceClassifierReward.encode``, the function that scores in the RL loop, so
   the reward model is trained on exactly the text it will read.
5. ``RewardTrainer`` (bfloat16 on a GPU, float32 on CPU), then the held-out pair accuracy; the model, its
   tokenizer, ``pairs.jsonl`` and ``reward_model.json`` (pairs, accuracies, settings) go to ``out_dir``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tracerl import data, stats
from tracerl.checkpoint import check_writable
from tracerl.config import Config, ConfigError, RewardModelConfig, RewardModelTrainConfig
from tracerl.reward_models.classifier import SequenceClassifierReward
from tracerl.reward_service import RewardError, RewardService, RewardSpec

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def pairs_of_group(prompt: Any, completions: list[str], rewards: list[float]) -> list[dict[str, Any]]:
    """Every two completions of one prompt with different rewards, as ``{prompt, chosen, rejected, margin}``
    (the better one chosen; ``margin`` = the reward difference).

    Example:
        >>> [(p["chosen"], p["rejected"]) for p in pairs_of_group("q", ["a", "b", "c"], [0.5, 1.0, 0.5])]
        [('b', 'a'), ('b', 'c')]
    """
    out = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if rewards[i] == rewards[j] or math.isnan(rewards[i]) or math.isnan(rewards[j]):  # ties, unscored
                continue
            win, lose = (i, j) if rewards[i] > rewards[j] else (j, i)
            out.append(
                {"prompt": prompt, "chosen": completions[win], "rejected": completions[lose],
                 "margin": rewards[win] - rewards[lose]}
            )  # fmt: skip
    return out


def label_service(cfg: Config) -> RewardService:
    """The reward ``reward_model.label_with`` that orders sampled completions, resolved (checked before anything
    is loaded or sampled).

    Raises:
        ConfigError: the reward cannot be resolved; the message names the setting.
    """
    label_with = cfg.reward_model.label_with
    try:
        return RewardService([RewardSpec(label_with)], imports=cfg.reward.imports)
    except (RewardError, ValueError) as err:
        raise ConfigError(
            f"reward_model.label_with={label_with!r} (the reward that orders sampled completions): {err}"
        ) from None


def sample_pairs(cfg: Config, console: Console, service: RewardService | None = None) -> list[dict[str, Any]]:
    """Pairs from the policy at ``model.path`` on ``reward_model.pair_prompts`` training prompts (step 1), ordered
    by ``service`` (default: ``label_service(cfg)``)."""
    from tracerl.models import load_policy
    from tracerl.sampling import generate

    r = cfg.reward_model
    ds = data.load_examples(cfg.data, cfg.seed, require=("prompt",))
    if cfg.eval.num_prompts and cfg.eval.source is None:  # the RL run's held-out prompts stay unseen
        ds = ds.select(stats.heldout_split(ds["prompt"], cfg.eval.num_prompts, cfg.seed)[0])
    rows = random.Random(cfg.seed).sample(range(len(ds)), min(r.pair_prompts, len(ds)))
    ds = ds.select(rows)
    policy = load_policy(cfg.model)
    prompt_ids = [data.encode_prompt(policy.tokenizer, p, cfg.data) for p in ds["prompt"]]
    repeated = [ids for ids in prompt_ids for _ in range(r.samples_per_prompt)]
    with console.status(f"sampling {len(repeated)} completions of {len(prompt_ids)} prompts from {cfg.model.path}"):
        texts = generate(policy, repeated, cfg.sampling, seed=cfg.seed).texts
    columns = {k: [v for v in ds[k] for _ in range(r.samples_per_prompt)] for k in ds.column_names if k != "prompt"}
    prompts = [p for p in ds["prompt"] for _ in range(r.samples_per_prompt)]
    service = service if service is not None else label_service(cfg)
    scores = service.score(prompts, texts, columns=columns).total
    g = r.samples_per_prompt
    pairs = [
        pair | {"prompt_index": i}
        for i in range(len(prompt_ids))
        for pair in pairs_of_group(ds["prompt"][i], texts[i * g : (i + 1) * g], scores[i * g : (i + 1) * g])
    ]
    console.print(
        f"pairs: {len(pairs)} from {len(prompt_ids)} prompts × {g} samples of {cfg.model.path}, ordered by "
        f"{r.label_with} (mean {sum(scores) / len(scores):.3f}); ties dropped"
    )
    if not pairs:  # pairs are made within a prompt: its completions all tied
        everywhere = len(set(scores)) == 1
        what = (
            f"every completion the same reward ({scores[0]:.3f})"
            if everywhere
            else "the completions of each prompt the same reward as each other"
        )
        raise ConfigError(
            f"reward_model.label_with={r.label_with} gave {what} ({len(scores)} completions of {cfg.model.path}, "
            f"{g} per prompt), so no pair orders two completions of a prompt"
            + ("; more prompts would tie as well" if everywhere else "")
            + ". Sample more varied completions (sampling.temperature, reward_model.samples_per_prompt, a policy "
            "trained further), label with another reward, or give pairs from a file (reward_model.pairs)."
        )
    return pairs


def check_settings(r: RewardModelTrainConfig) -> None:
    """``reward_model``'s numbers, each named by its key, before anything is read, sampled or written."""
    c = r.center_rewards_coefficient
    problems = [
        (0 <= r.heldout_fraction < 1, f"heldout_fraction must be in [0, 1), got {r.heldout_fraction}"),
        (r.samples_per_prompt >= 2, f"samples_per_prompt must be ≥ 2 (a pair needs two), got {r.samples_per_prompt}"),
        (r.pair_prompts >= 1, f"pair_prompts must be ≥ 1, got {r.pair_prompts}"),
        (math.isfinite(r.epochs) and r.epochs > 0, f"epochs must be > 0 (passes over the pairs), got {r.epochs}"),
        (math.isfinite(r.lr) and r.lr > 0, f"lr must be > 0, got {r.lr}"),
        (r.batch_size >= 1, f"batch_size must be ≥ 1 (pairs per optimizer step), got {r.batch_size}"),
        (r.max_length >= 1, f"max_length must be ≥ 1 (tokens of prompt and completion), got {r.max_length}"),
        (c is None or math.isfinite(c) and c >= 0, f"center_rewards_coefficient must be ≥ 0 (unset: none), got {c}"),
    ]
    for ok, problem in problems:
        if not ok:
            raise ConfigError(f"reward_model.{problem}.")


def load_pairs(path: str, console: Console | None = None) -> list[dict[str, Any]]:
    """Preference pairs from a json / jsonl / parquet file with ``prompt``, ``chosen``, ``rejected`` columns. A
    pair whose chosen completion is the rejected one (a tie) prefers nothing: it is dropped, and ``console`` says
    how many were."""
    import datasets

    suffix = Path(path).suffix.lstrip(".")
    kind = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(suffix)
    if kind is None or not Path(path).is_file():
        raise ConfigError(
            f"reward_model.pairs='{path}' is not a json, jsonl or parquet file; give a file of preference pairs "
            "(prompt, chosen, rejected), or leave it unset to sample pairs from model.path."
        )
    if Path(path).stat().st_size == 0:
        raise ConfigError(f"reward_model.pairs='{path}' is empty; give a file of preference pairs.")
    try:
        with data.datasets_quiet():  # a parse error is reported below, as one paragraph, not as its log lines
            ds = datasets.load_dataset(kind, data_files=path, split="train")
        data.check_utf8(ds, Path(path), f"reward_model.pairs='{path}'", "reward_model.pairs")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets wraps a JSON or Parquet parse error in its own
        if kind == "json" and (problem := data.utf8_problem(Path(path))):
            raise data.not_utf8(f"reward_model.pairs='{path}'", problem, "reward_model.pairs") from None
        detail = (data.json_problem(Path(path)) if kind == "json" else None) or data.root_cause(err)
        raise ConfigError(
            f"reward_model.pairs='{path}' cannot be read as {kind}: {detail}. Give one JSON object per line (jsonl), "
            "a JSON list, or a Parquet file, with prompt, chosen and rejected."
        ) from None
    missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"reward_model.pairs='{path}' lacks the column(s) {missing} (it has {ds.column_names}); preference pairs "
            "need prompt, chosen and rejected."
        )
    rows = list(ds)
    for i, row in enumerate(rows):  # the prompt may be empty (pairs whose completions hold the whole dialogue)
        bad = [c for c in PAIR_COLUMNS if not isinstance(row[c], str | list) or c != "prompt" and not row[c]]
        if bad:
            raise ConfigError(
                f"reward_model.pairs='{path}' row {i + 1}: {', '.join(f'{c} is {row[c]!r}' for c in bad)}; every pair "
                "needs a chosen and a rejected completion (and a prompt, which may be empty), each text or chat "
                "messages. Fix or drop the row."
            )
    ties = [i + 1 for i, row in enumerate(rows) if row["chosen"] == row["rejected"]]
    if len(ties) == len(rows):
        raise ConfigError(
            f"reward_model.pairs='{path}': in every pair the chosen completion is the rejected one, which prefers "
            "nothing. Check which columns hold chosen and rejected."
        )
    if ties:
        rows = [row for row in rows if row["chosen"] != row["rejected"]]
        if console is not None:
            shown = f"rows {ties[:5]}{' ...' if len(ties) > 5 else ''}"
            console.print(
                f"pairs: dropped {len(ties)} of {len(rows) + len(ties)} whose chosen is the rejected ({shown})"
            )
    prompts = {p: i for i, p in enumerate(dict.fromkeys(json.dumps(row["prompt"]) for row in rows))}
    return [row | {"prompt_index": prompts[json.dumps(row["prompt"])]} for row in rows]


def check_pair_coverage(tokenizer: Any, pairs: list[dict[str, Any]], cfg: Config) -> None:
    """The reward model's tokenizer can read the pairs: on the first pairs, at most ``data.max_unknown_rate`` of
    the tokens of each column are its unknown token (``data.check_coverage``'s rule for datasets).

    Raises:
        ConfigError: naming the column, the rate, the characters and what to change.
    """
    r, rows = cfg.reward_model, pairs[: data.COVERAGE_ROWS]
    columns = {column: [p[column] for p in rows] for column in PAIR_COLUMNS}
    unreadable = data.first_unreadable(tokenizer, columns, cfg.data.max_unknown_rate)
    if unreadable is None:
        return
    column, rate, chars = unreadable
    fix = (
        f"Add the missing characters to model.tiny.alphabet (now {cfg.model.tiny.alphabet!r}); "
        "reward_model.base=tiny reads exactly those characters"
        if r.base == "tiny"
        else "Check the tokenizer files of the base model (reward_model.base, or model.path for base=policy)"
    )
    raise ConfigError(
        f"the reward model's tokenizer cannot read reward_model.pairs='{r.pairs}': {rate:.1%} of the tokens "
        f"of its {column} texts (first {len(rows)} pairs) are its unknown token {tokenizer.unk_token!r}, "
        f"from the characters {chars[:24]}, so it could not tell such pairs apart (data.max_unknown_rate="
        f"{cfg.data.max_unknown_rate}). {fix}, or raise data.max_unknown_rate if the pairs really hold them."
    )


def split_pairs(
    pairs: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, held-out) pairs: ``fraction`` of the prompts, with all their pairs, are held out.

    Example:
        >>> pairs = [{"prompt_index": i // 2} for i in range(8)]
        >>> [len(x) for x in split_pairs(pairs, 0.25, seed=0)]
        [6, 2]
    """
    prompts = sorted({p["prompt_index"] for p in pairs})
    held = set(random.Random(seed).sample(prompts, round(len(prompts) * fraction)))
    return [p for p in pairs if p["prompt_index"] not in held], [p for p in pairs if p["prompt_index"] in held]


def build_classifier(cfg: Config) -> tuple[torch.nn.Module, Any]:
    """The classifier to train and its tokenizer (step 3): one logit, its pad token set in the config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from tracerl.models.families import local_model_dir

    r = cfg.reward_model
    if r.base == "tiny":
        from transformers import LlamaConfig, LlamaForSequenceClassification

        from tracerl.models.tiny import char_tokenizer

        t = cfg.model.tiny
        tok = char_tokenizer(t.alphabet)
        torch.manual_seed(cfg.seed)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
            max_position_embeddings=t.max_position_embeddings, pad_token_id=tok.pad_token_id, num_labels=1,
        )  # fmt: skip
        config.is_causal = not r.bidirectional
        return LlamaForSequenceClassification(config), tok
    source = cfg.model.path if r.base == "policy" else r.base
    if source is None:
        raise ConfigError(
            "reward_model.base=policy starts the reward model from model.path, which is unset; give model.path (the "
            "SFT policy), or reward_model.base=tiny / a model directory."
        )
    local_model_dir(source, "model.path" if r.base == "policy" else "reward_model.base")
    config = AutoConfig.from_pretrained(source, num_labels=1)
    config.is_causal = not r.bidirectional
    torch.manual_seed(cfg.seed)  # the new head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # TRL's rule
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def tokenized(scorer: SequenceClassifierReward, pairs: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of ``chosen_ids`` / ``rejected_ids`` (step 4): TRL skips its own tokenisation."""
    import datasets

    return datasets.Dataset.from_dict(
        {
            "chosen_ids": [scorer.encode(p["prompt"], p["chosen"]) for p in pairs],
            "rejected_ids": [scorer.encode(p["prompt"], p["rejected"]) for p in pairs],
        }
    )


def pair_accuracy(scorer: SequenceClassifierReward, pairs: list[dict[str, Any]]) -> float:
    """Fraction of pairs whose chosen completion the reward model scores higher (scored as the RL loop scores)."""
    if not pairs:
        return float("nan")
    chosen = scorer([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


# What a launcher (torchrun, or an earlier torch.distributed group in this process) leaves in the environment.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """Train in this process alone. Accelerate (under TRL's trainer) starts a process group whenever LOCAL_RANK is
    set, at the inherited MASTER_PORT, and fails with EADDRINUSE when that port belongs to another process (a run
    or test that set the variables earlier). Reward-model training is one process, so the launcher variables are
    hidden while it runs and restored after."""
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_VARS if k in os.environ}
    if int(saved.get("WORLD_SIZE", "1")) > 1:
        os.environ.update(saved)
        raise ConfigError(
            f"tracerl train-reward-model runs in one process, but WORLD_SIZE={saved['WORLD_SIZE']} says it was "
            "started by a multi-process launcher; run it directly (python or the tracerl command), not under torchrun."
        )
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _scratch() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="tracerl-rm-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fit(
    model: Any, tok: Any, train: Any, r: RewardModelTrainConfig, seed: int, cuda: bool, console: Console,
    verbose: bool, scratch: str,
) -> Any:  # fmt: skip
    """TRL's RewardTrainer on ``train`` (``tokenized`` pairs); its progress printing only with ``verbose``."""
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:  # transformers prints a line when its W&B integration is imported in offline mode
        from transformers import ProgressCallback
        from transformers.trainer_callback import PrinterCallback
        from trl import RewardConfig, RewardTrainer

    args = RewardConfig(
        output_dir=scratch, use_cpu=not cuda, bf16=cuda, activation_checkpointing=cuda,  # GPUs only
        num_train_epochs=r.epochs, learning_rate=r.lr,
        per_device_train_batch_size=r.batch_size, max_length=r.max_length,
        center_rewards_coefficient=r.center_rewards_coefficient, seed=seed, data_seed=seed, logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=not verbose,
    )  # fmt: skip
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    if not verbose:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    with console.status(f"training the reward model on {len(train)} pairs ({r.epochs:g} epochs, TRL)"):
        return trainer.train()


def train_reward_model(cfg: Config, console: Console | None = None, verbose: bool = False) -> dict[str, Any]:
    """Steps 1-5; returns the summary written to ``<out_dir>/reward_model.json``.

    Raises:
        ConfigError: ``out_dir`` exists, pairs cannot be read or made, or there are too few to train on; nothing
            is written then.
    """
    console = console or Console(soft_wrap=True)
    r = cfg.reward_model
    out = Path(r.out_dir)
    if out.exists():
        raise ConfigError(f"reward_model.out_dir '{out}' exists; give a new directory (nothing is overwritten).")
    check_writable(out, "reward_model.out_dir")  # before the pairs are sampled and the model trained
    check_settings(r)
    pairs = load_pairs(r.pairs, console) if r.pairs else None
    labels = label_service(cfg) if pairs is None else None
    if pairs is None and not cfg.model.path:
        raise ConfigError(
            "reward_model.pairs is unset, so the pairs would be sampled from model.path, which is unset too (a "
            "randomly initialised tiny model would write them). Set model.path to the policy whose completions the "
            "reward model should score, or reward_model.pairs to a file of preference pairs."
        )
    model, tok = build_classifier(cfg)
    if pairs is not None:
        check_pair_coverage(tok, pairs, cfg)
    scorer = SequenceClassifierReward.from_model(model, tok, RewardModelConfig(max_length=r.max_length), "reward_model")
    pairs = pairs if pairs is not None else sample_pairs(cfg, console, labels)
    train, held = split_pairs(pairs, r.heldout_fraction, cfg.seed)
    if len(train) < r.batch_size:
        raise ConfigError(
            f"only {len(train)} training pairs (fewer than reward_model.batch_size={r.batch_size}); sample more "
            "prompts (reward_model.pair_prompts, samples_per_prompt) or give more pairs."
        )
    ids = tokenized(scorer, train)
    shortest = min(max(len(a), len(b)) for a, b in zip(ids["chosen_ids"], ids["rejected_ids"], strict=True))
    if shortest > r.max_length:  # TRL leaves out every pair longer than max_length
        raise ConfigError(
            f"every training pair is longer than reward_model.max_length={r.max_length} tokens (prompt and completion; "
            f"the shortest has {shortest}), so none would be trained on. Raise reward_model.max_length."
        )
    cuda = torch.cuda.is_available()
    with _one_process(), _scratch() as scratch:
        result = _fit(model, tok, ids, r, cfg.seed, cuda, console, verbose, scratch)
    model.eval()
    scorer.device = next(model.parameters()).device
    summary = {
        "pairs": {"train": len(train), "heldout": len(held), "source": r.pairs or f"sampled from {cfg.model.path}"},
        "accuracy": {"train": pair_accuracy(scorer, train), "heldout": pair_accuracy(scorer, held) if held else None},
        "train_loss": result.training_loss,
        "base": r.base if r.base != "policy" else cfg.model.path,
        "label_with": r.label_with if not r.pairs else None,
        "settings": {k: v for k, v in vars(r).items()},
    }
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    held_ids = {id(p) for p in held}
    with (out / "pairs.jsonl").open("w") as f:
        for p in pairs:
            f.write(json.dumps(p | {"heldout": id(p) in held_ids}) + "\n")
    (out / "reward_model.json").write_text(json.dumps(summary, indent=2))
    heldout = (
        f"{summary['accuracy']['heldout']:.3f} held out ({len(held)} pairs of unseen prompts)"
        if held
        else f"none held out (reward_model.heldout_fraction={r.heldout_fraction})"
    )
    console.print(
        f"reward model: {out} · pair accuracy {summary['accuracy']['train']:.3f} train, {heldout} · loss "
        f"{result.training_loss:.3f}"
    )
    return summary
