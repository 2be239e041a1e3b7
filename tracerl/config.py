"""The typed configuration schema and its loader.

Dataclasses are the schema: every field has a comment saying what it does. YAML files only override the
defaults, and ``key=value`` overrides from the command line come last. Unknown keys, wrong types and values
outside a field's choices fail before anything starts, with an error that lists what is valid.

Example:
    >>> cfg = load(None, ["sampling.max_new_tokens=32", "sampling.remasking=sequential"])
    >>> cfg.sampling.max_new_tokens, cfg.sampling.remasking
    (32, 'sequential')
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


# ---------------------------------------------------------------------------------------------- schema


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny model (used when ``model.family=tiny`` and no ``model.path`` is given; a saved
    tiny model keeps the shape it was built with: with ``model.family=tiny``, settings here that differ from it
    are a warning)."""

    hidden_size: int = 64  # width of the residual stream
    num_layers: int = 2  # transformer layers
    num_heads: int = 4  # attention heads (head dim = hidden_size / num_heads)
    intermediate_size: int = 128  # MLP width
    attention: Literal["full", "block"] = "full"  # full bidirectional (LLaDA-like) or block diffusion (SDAR-like)
    block_size: int = 4  # block size of the block-diffusion variant
    max_position_embeddings: int = 2048  # longest prompt + response the rotary tables cover
    alphabet: str = "0123456789+-*=?:#., abcdefghijklmnopqrstuvwxyz"  # characters of the char-level tokenizer
    canvas_length: int = 16  # diffusion_gemma: tokens per canvas (the released model has 256)
    num_experts: int = 4  # diffusion_gemma: experts of each MoE layer
    top_k_experts: int = 2  # diffusion_gemma: experts each token is routed to
    moe_intermediate_size: int = 64  # diffusion_gemma: width of each expert
    sliding_window: int = 64  # diffusion_gemma: window of the sliding-attention layers (every other layer)


@dataclass
class ModelConfig:
    """Which diffusion language model to load and how."""

    family: str = "tiny"  # model family: tiny | llada | dream | sdar | masked_lm | diffusion_gemma (tracerl.models)
    path: str | None = None  # local directory or hub name; None builds a random tiny model (tiny, diffusion_gemma)
    trust_remote_code: bool = False  # load the checkpoint's own modeling code instead of the native class
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype of the policy
    mask_token_id: int | None = None  # override the mask token id (otherwise config, then tokenizer)
    block_size: int | None = None  # block size of a block-diffusion model (None: from its config)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # shape of a random tiny model


@dataclass
class CanvasSamplingConfig:
    """The renoising canvas sampler of model.family=diffusion_gemma (DESIGN §18); defaults are the released
    model's generation_config.json (transformers' ``DiffusionGemmaGenerationConfig``)."""

    canvas_length: int | None = None  # tokens per canvas; None: the checkpoint's (another value is refused)
    max_denoising_steps: int = 48  # denoising steps per canvas at most
    entropy_bound: float = 0.1  # accept the lowest-entropy positions while Σ entropy − max entropy ≤ this
    t_max: float = 0.8  # temperature of the first denoising step (linear schedule)
    t_min: float = 0.4  # temperature the schedule approaches at the last step
    stability_threshold: int | None = 1  # adaptive stopping: steps the argmax canvas must stay the same (None: off)
    confidence_threshold: float | None = 0.005  # adaptive stopping: mean entropy below this (None: off)
    noise: Literal["sample", "batch"] = "sample"  # one random stream per sample, or one per batch (as generate)


@dataclass
class SamplingConfig:
    """How the rollout sampler denoises a response (DESIGN §6)."""

    max_new_tokens: int = 64  # response length L; generation also stops after the block holding EOS
    block_size: int = 4  # semi-autoregressive block length (must equal the model's block size for block models)
    steps_per_block: int | None = None  # denoising steps per block (None: one token per step, = block_size)
    steps: int | None = None  # alternative LLaDA-style total step count over max_new_tokens (sets steps_per_block)
    remasking: str = "low_confidence_static"  # which masked positions to commit each step (sampling registry)
    threshold: float = 0.9  # confidence threshold of low_confidence_dynamic
    eb_threshold: float = 0.35  # cumulative-entropy budget of entropy_bounded
    temperature: float = 1.0  # candidate sampling temperature; 0 = greedy
    top_k: int = 0  # keep the k most likely candidates (0 = off)
    top_p: float = 1.0  # nucleus sampling mass (1.0 = off)
    cache: Literal["auto", "none", "prefix", "dual", "kv"] = "auto"  # auto: exact kv for block models, none for full
    kv_storage: Literal["static", "dynamic"] = "static"  # kv/prefix caches: preallocated in place, or DynamicCache
    fused_commit: bool = True  # block models: cache a finished block in the same forward as the next block's step
    cuda_graph: bool = False  # block models on CUDA: the denoising step as replayed CUDA graphs (run on an H100)
    trainable_pad_tokens: int = 0  # tokens after the first EOS that still count for the loss (TraceRL post_num)
    batch_size: int = 64  # sequences decoded together in one sampler call
    canvas: CanvasSamplingConfig = field(default_factory=CanvasSamplingConfig)  # diffusion_gemma's sampler


@dataclass
class DataConfig:
    """Where prompts (and SFT responses) come from (DESIGN §3 data.py)."""

    source: str = "synthetic:addition"  # synthetic:<task>, a hub dataset name, or a local json/jsonl/parquet/csv path
    split: str = "train"  # dataset split
    prompt_column: str = "prompt"  # the question: text, or chat messages [{role, content}]; wins over a "prompt" column
    answer_column: str = "answer"  # reference answer for the rewards (its lack is a warning); wins over "answer"
    response_column: str = "response"  # target completion for SFT; wins over a "response" column
    chat_template: bool = True  # wrap prompts with the tokenizer's chat template
    system_prompt: str | None = None  # optional system message when the chat template is used
    max_prompt_tokens: int = 256  # longer prompts are dropped (and counted), never truncated
    num_synthetic: int = 2000  # examples generated for a synthetic task
    synthetic_options: dict[str, Any] = field(default_factory=dict)  # the synthetic task's options, e.g. noise: 0.3
    shuffle: bool = True  # shuffle every epoch (seeded)
    max_unknown_rate: float = 0.01  # most unknown tokens per token of prompt/answer/response (checked before start)


@dataclass
class RolloutConfig:
    """How many samples each RL step draws, and where (DESIGN §11)."""

    prompts_per_step: int = 8  # P prompts per RL step
    samples_per_prompt: int = 4  # G samples per prompt (a group)
    num_workers: int = 1  # K rollout actors (0 = auto: from cluster.* and rollout.placement)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype of the rollout copies
    sync: Literal["object_store", "collective"] = "object_store"  # how weights reach the actors after an update
    sync_bucket_mb: int = 256  # collective sync: parameters are broadcast in flat buckets of this size
    placement: Literal["separate", "colocated"] = "separate"  # own accelerators, or share the learner ranks'
    offload_during_train: bool = True  # colocated on GPU: move the rollout copy to CPU while the learner trains
    num_cpus_per_worker: float = 1.0  # Ray CPUs each rollout actor reserves


JUDGE_TEMPLATE = (
    "Rate how well the response answers the request, from 0 (useless) to 10 (perfect).\n\n"
    "Request:\n{{ prompt }}\n\nResponse:\n{{ completion }}\n\nEnd with a line 'Score: N'."
)


@dataclass
class RewardModelConfig:
    """A sequence-classification reward model (``kind: model``): how it scores and where its Ray actors run."""

    label_index: int | None = None  # the logit that is the score; None: 0, for a model with one label (num_labels=1)
    max_length: int = 1024  # tokens of prompt + completion scored; longer inputs are cut (reward/truncated/<name>)
    truncation_side: Literal["left", "right"] = "left"  # left: keep the completion's end, which the score is read at
    template: Literal["auto", "chat", "plain"] = "auto"  # auto: the tokenizer's chat template when it has one
    separator: str = "\n"  # plain: the text is prompt + separator + completion + EOS
    batch_tokens: int = 16384  # padded tokens per forward; inputs are sorted by length and packed up to it
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    pad_token: str | None = None  # padding token when the tokenizer has none (e.g. its EOS token)
    trust_remote_code: bool = False  # load the checkpoint's own modeling code
    placement: Literal["cpu", "separate", "colocated"] = "colocated"  # CPU, own GPUs, or beside each rollout actor
    num_workers: int = 0  # Ray actors, each with a copy (0: one per rollout actor when colocated, else 1)
    gpu_fraction: float = 0.25  # colocated on GPUs: the share of a rollout actor's GPU each actor takes
    num_cpus: float = 1.0  # Ray CPUs each actor reserves


@dataclass
class JudgeConfig:
    """A generative judge behind an OpenAI-compatible chat endpoint (``kind: judge``; vLLM, SGLang, ...)."""

    model: str | None = None  # served model name; None: the only model the endpoint lists
    template: str = JUDGE_TEMPLATE  # the user message: a Jinja template over prompt, completion and dataset columns
    system: str | None = None  # optional system message
    parser: Literal["regex", "json"] = "regex"  # read the score with a regex, or from a JSON object in the answer
    pattern: str = r"(?i)score\W*?(-?\d+(?:\.\d+)?)"  # regex: the last match's first group (or the match) is the score
    json_field: str = "score"  # json: the field holding the score (a.b for a nested one)
    concurrency: int = 8  # requests in flight at once (per reward actor)
    request_timeout_s: float = 60.0  # seconds one request may take before it is retried
    retries: int = 2  # retries after a connection error, a timeout, 429 or 5xx, with exponential backoff
    backoff_s: float = 0.5  # first backoff; doubled after every retry
    max_tokens: int = 256  # answer length the judge may use
    temperature: float = 0.0  # judge sampling temperature
    api_key_env: str | None = None  # name of the environment variable holding the API key (never the key itself)


@dataclass
class RewardFnConfig:
    """One reward function and its weight in the total."""

    fn: str = "synthetic_exact"  # registered name, pkg.module:fn, path/to/file.py:fn, http(s) URL, model dir or hub id
    weight: float = 1.0  # weight in the weighted sum (0: computed and logged, not optimised)
    name: str | None = None  # metric name (defaults to the function's name)
    kwargs: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments passed on every call
    completion_format: Literal["as_given", "chat", "text"] = "as_given"  # chat: wrap text as an assistant message
    factory_kwargs: dict[str, Any] | None = None  # fn builds the reward: the reward is fn(**factory_kwargs)
    kind: Literal["auto", "function", "http", "model", "judge"] = "auto"  # auto: from fn and the model/judge block
    model: RewardModelConfig | None = None  # fn is a sequence-classification reward model: its settings
    judge: JudgeConfig | None = None  # fn is an OpenAI-compatible chat endpoint used as a judge: its settings


@dataclass
class SandboxConfig:
    """The code sandbox of code-execution rewards (DESIGN §16, docs/rewards.md)."""

    # below this level generated code is never run: full (separate user + private filesystem + no network +
    # pid, IPC namespaces + process limit + system-call filter) | namespaces (the same without a separate user) |
    # network | none
    min_isolation: Literal["full", "namespaces", "network", "none"] = "full"
    paths: list[str] = field(default_factory=list)  # host paths programs may read (no socket, FIFO or device)


@dataclass
class RewardConfig:
    """The reward service (DESIGN §9)."""

    functions: list[RewardFnConfig] = field(default_factory=lambda: [RewardFnConfig()])
    on_error: Literal["raise", "nan"] = "raise"  # raise a clear error, or score NaN and count reward/errors/<name>
    timeout_s: float = 60.0  # per-call timeout of a reward function
    num_workers: int = 1  # reward actors (CPU)
    num_cpus_per_worker: float = 1.0  # Ray CPUs each reward actor reserves
    imports: list[str] = field(default_factory=list)  # modules imported in the driver and every reward worker
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # the code sandbox's minimum isolation, paths


@dataclass
class ObjectiveConfig:
    """The TraceRL objective: views, advantages and the policy loss (DESIGN §7-§8)."""

    views: str = "trace"  # trace | d1 | random_masking | coupled
    shrink: int = 1  # merge s neighbouring denoising steps (trace views); 1 = exact replay
    advantage: str = "group_zscore"  # group_zscore | group_mean | rloo
    group_filter: str = "keep_all"  # keep_all | keep_acc_range | drop_all_equal
    filter_low: float = 0.2  # keep_acc_range: drop groups with mean score below this
    filter_high: float = 0.8  # keep_acc_range: drop groups with mean score above this
    truncated_is_wrong: bool = False  # responses without EOS get reward 0
    eps_low: float = 0.2  # lower clip range of the importance ratio
    eps_high: float = 0.2  # upper clip range (clip-higher when > eps_low)
    aggregation: str = "token_sum_over_max_len"  # or row_mean | row_sum | token_mean | seq_mean_token_mean
    kl_aggregation: str = "auto"  # KL reduction; auto: row_sum under row_mean (as the anchor), else = aggregation
    kl_to_old_coef: float = 0.01  # beta of the KL to the old (rollout-step) policy; TraceRL default 0.01
    kl_to_old_kind: str = "k3"  # k1 | k2 | k3
    kl_to_ref_coef: float = 0.0  # beta of the KL to a frozen reference model (0 = no reference model)
    kl_to_ref_kind: str = "k3"  # k1 | k2 | k3
    old_logp_source: Literal["learner", "rollout"] = "learner"  # recompute old log-probs, or use rollout_logp
    # model = TraceRL's: log-probs of softmax(logits), whatever sampling.temperature; sampling = verl's and TRL's:
    # of softmax(logits / sampling.temperature), the distribution the rollouts are drawn from (top-k/p aside)
    logp_temperature: Literal["model", "sampling"] = "model"  # which distribution the ratio and the KLs compare
    d1_prompt_mask_prob: float = 0.15  # d1 views: prompt tokens masked with this probability
    mask_ratio_low: float = 0.1  # random_masking / coupled: lowest mask ratio
    mask_ratio_high: float = 0.9  # random_masking / coupled: highest mask ratio
    value_model: bool = False  # train a value model and use step-level GAE advantages
    # centered = the reward minus its group's mean, so a value that has learnt nothing leaves the group baseline as
    # it is; reward = the raw reward (a plain PPO critic); both scale R − V per group as the advantage function
    # scales r − mean (group_zscore: 1/std). advantage = the group advantage itself (TraceRL's: the z-scored reward)
    value_target: Literal["centered", "reward", "advantage"] = "centered"  # what the value model learns (estimators.md)
    # token = TraceRL's: the head on the column that predicts the token; state = the mean of the head over every
    # column the token's view sees (the whole state), ahead of token out of sample on the quickstart (estimators.md)
    value_readout: Literal["token", "state"] = "token"  # where the value model reads a token's value
    gamma: float = 1.0  # GAE discount over denoising steps
    lam: float = 1.0  # GAE lambda
    value_eps: float = 0.0  # clip range of the value loss around the pre-update values (0 = off; TraceRL: 0.2)


@dataclass
class LoRAConfig:
    """LoRA adapters through PEFT (DESIGN §20): the policy trains low-rank adapters over frozen base weights."""

    enabled: bool = False  # train adapters instead of every weight (reference = base; weight sync sends adapters)
    rank: int = 16  # r, the adapters' rank (≥ 1)
    alpha: float = 32.0  # scaling numerator: the update is (alpha / rank) · B A
    target_modules: list[str] | None = None  # module names (suffixes) that get adapters; None = the family's default
    dropout: float = 0.0  # adapter dropout; must be 0 (the learner runs every pass without dropout)


@dataclass
class LearnerConfig:
    """The learner (DESIGN §10, §20)."""

    engine: Literal["deepspeed", "torch"] = "deepspeed"  # what trains a module: DeepSpeed, or plain PyTorch (ZeRO 0)
    num_ranks: int = 1  # learner ranks (Ray actors, data-parallel; 0 = auto from cluster.*)
    num_cpus_per_rank: float = 1.0  # Ray CPUs each learner rank reserves
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    precision: Literal["fp32", "bf16"] = "fp32"  # training precision
    lr: float = 1e-6  # policy learning rate (AdamW)
    value_lr: float | None = None  # value model learning rate (None: 5 × learner.lr, TraceRL's ratio 5e-6 / 1e-6)
    value_updates_per_step: int = 1  # value model passes per RL step (its schedule is stretched to the same RL steps)
    weight_decay: float = 0.0  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warmup
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    total_steps: int = 1000  # optimizer steps the schedule spans (linear / cosine)
    max_grad_norm: float = 1.0  # gradient clipping by the global norm, owned by the engine (0 = off)
    updates_per_step: int = 1  # mu: passes over an RL step's samples
    minibatches: int = 1  # optimizer steps per pass (the step's samples split into this many; at most P × G)
    kl_after_step: bool = False  # one more forward after the step: train/kl_to_old_after_step (what it moved)
    micro_batch_tokens: int = 8192  # token budget of one micro-batch (sequences are packed up to it)
    packed_views: bool = True  # block layout: one sequence per sample, every denoising state computed once
    packed_attention: Literal["auto", "grouped", "flex", "dense"] = "auto"  # auto: grouped (flex measured slower)
    gradient_checkpointing: bool = False  # recompute activations in backward (large models)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # torch.distributed backend (auto: nccl on GPU)
    logprob_chunk_tokens: int = 1024  # target tokens per chunk of the chunked log-softmax (memory O(chunk × V))
    zero3_persistence_threshold: int = 100_000  # ZeRO-3: parameters with fewer elements stay whole on every rank
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # train LoRA adapters instead of full weights


VALUE_LR_RATIO = 5.0  # learner.value_lr = null: TraceRL's value / policy learning rates (5e-6 / 1e-6)
GROUP_ADVANTAGES = ("group_zscore", "group_mean", "rloo")  # the built-in advantages: 0 for a group of one sample


DETERMINISTIC_REMASKING = ("low_confidence_static", "low_confidence_dynamic", "entropy_bounded", "sequential")


def check_reward_total(cfg: Config) -> None:
    """The commands that score samples (train, eval, validate) have a total reward to read: at least one reward
    function, not every weight 0."""
    functions = cfg.reward.functions
    if not functions:
        raise ConfigError(
            "reward.functions is empty: give at least one reward function, e.g. reward.functions=[{fn: "
            "sudoku_cells}] (docs/rewards.md lists the built-in ones)."
        )
    if all(f.weight == 0 for f in functions):
        raise ConfigError(
            f"every reward weight is 0 ({', '.join(f.name or f.fn for f in functions)}): the total reward is 0 for "
            "every sample, so a run has nothing to optimise and an evaluation nothing to report. Give at least one "
            "reward a weight other than 0, e.g. reward.functions[0].weight=1."
        )


def check_training(cfg: Config) -> None:
    """What ``tracerl train`` (and ``validate``) need beyond ``check``: a total reward (``check_reward_total``),
    and samples of one prompt that can differ. Greedy decoding is fine for ``generate`` and ``eval``, but at
    temperature 0 a deterministic remasking rule writes every sample of a prompt the same, so every group
    advantage is 0 and nothing trains. And the old log-probs' source (``check_old_logp_source``), which SFT,
    ``eval`` and ``generate`` never use, the learner's CUDA-only settings on a CPU learner
    (``check_learner_device``), and held-out prompts that are not the training prompts (``check_eval_not_training``;
    ``tracerl eval`` may measure a training set on purpose)."""
    check_reward_total(cfg)
    check_old_logp_source(cfg)
    check_learner_device(cfg)
    check_eval_not_training(cfg)
    s, r = cfg.sampling, cfg.rollout
    if cfg.objective.logp_temperature == "sampling" and cfg.model.family == "diffusion_gemma":
        raise ConfigError(
            "objective.logp_temperature=sampling: model.family=diffusion_gemma samples each step at its schedule's "
            "temperature (sampling.canvas.t_max → t_min), and its log-probs are already those; leave "
            "objective.logp_temperature=model."
        )
    if cfg.objective.logp_temperature == "sampling" and s.temperature == 0:
        raise ConfigError(
            "objective.logp_temperature=sampling divides the logits by sampling.temperature, which is 0 (greedy "
            "decoding has no sampling distribution to train); sample at a temperature above 0, or set "
            "objective.logp_temperature=model."
        )
    # a value model's GAE advantage R - V is no group difference: it is not 0 for a group of equal samples
    grouped = r.samples_per_prompt > 1 and cfg.objective.advantage in GROUP_ADVANTAGES and not cfg.objective.value_model
    greedy = cfg.model.family != "diffusion_gemma" and s.temperature == 0 and s.remasking in DETERMINISTIC_REMASKING
    if grouped and greedy:
        raise ConfigError(
            f"sampling.temperature=0 with sampling.remasking={s.remasking} decodes every sample of a prompt the same "
            f"way, so each group of rollout.samples_per_prompt={r.samples_per_prompt} is one answer repeated: every "
            f"{cfg.objective.advantage} advantage is 0 and the run learns nothing. Sample at a temperature above 0 "
            "(the quickstart uses 1.0); greedy decoding is for tracerl eval and generate."
        )


def check_eval_not_training(cfg: Config) -> None:
    """A run's held-out prompts are not its training prompts: ``eval.source`` is not ``data.source`` (the same
    local file, however written, whose split is ignored; or the same dataset name and split)."""
    e, d = cfg.eval, cfg.data
    if e.source is None or not e.num_prompts:
        return
    here = [os.path.realpath(os.path.expanduser(p)) for p in (e.source, d.source)]
    if all(os.path.exists(p) for p in here):
        same, what = here[0] == here[1], f"the file {here[0]}"
    else:
        same, what = e.source == d.source and e.split == d.split, f"'{d.source}', split '{d.split}'"
    if same:
        raise ConfigError(
            f"eval.source and data.source are both {what}: the held-out prompts would be training prompts, and the "
            "evaluation would measure recall, not what the policy learnt. Leave eval.source unset (null) to hold "
            "out eval.num_prompts prompts of data.source and train on the rest, or give the evaluation another "
            "dataset (eval.source; for a hub or synthetic dataset, another eval.split)."
        )


def check_learner_device(cfg: Config) -> None:
    """Learner settings that need CUDA are not given to a learner on the CPU (``cluster.gpus_per_node=0``): they
    would fail only once the learner actors start, with the libraries' own messages. ``nccl`` only matters where
    the learner makes a process group: DeepSpeed, or more than one rank."""
    lc = cfg.learner
    grouped = lc.engine == "deepspeed" or lc.num_ranks > 1
    if cfg.cluster.gpus_per_node == 0 and (lc.packed_attention == "flex" or (lc.backend == "nccl" and grouped)):
        setting, fix = (
            ("learner.packed_attention=flex", "FlexAttention has no backward on the CPU; set it to auto or grouped")
            if lc.packed_attention == "flex"
            else ("learner.backend=nccl", "NCCL moves CUDA tensors only; set it to auto or gloo")
        )
        raise ConfigError(
            f"{setting} needs CUDA, but the learner runs on the CPU (cluster.gpus_per_node=0): {fix}, or declare the "
            "cluster's GPUs with cluster.gpus_per_node."
        )


def logp_temperature(cfg: Config) -> float:
    """τ of the log-probs the sampler records and the learner computes, log softmax(logits / τ):
    ``sampling.temperature`` under ``objective.logp_temperature=sampling``, else 1 (the model's own).

    Example:
        >>> cfg = Config()
        >>> cfg.sampling.temperature = 0.7
        >>> first = logp_temperature(cfg)
        >>> cfg.objective.logp_temperature = "sampling"
        >>> first, logp_temperature(cfg)
        (1.0, 0.7)
    """
    return cfg.sampling.temperature if cfg.objective.logp_temperature == "sampling" else 1.0


def value_lr(lc: LearnerConfig) -> float:
    """The value model's learning rate: ``learner.value_lr``, or null = ``VALUE_LR_RATIO`` × ``learner.lr``."""
    return lc.value_lr or VALUE_LR_RATIO * lc.lr


@dataclass
class CheckpointConfig:
    """Resumable state (DESIGN §13)."""

    save_every: int = 0  # RL (or SFT) steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept
    resume: str = "none"  # none | auto (latest complete checkpoint in run_dir) | a checkpoint directory


@dataclass
class SFTConfig:
    """Masked-diffusion SFT (tracerl sft)."""

    steps: int = 300  # optimizer steps
    batch_size: int = 32  # examples per optimizer step
    lr: float = 1e-3  # learning rate (the learner's other settings apply)
    eval_every: int = 100  # steps between accuracy checks on held-out prompts (0 = off)
    eval_prompts: int = 64  # held-out prompts per check
    # full attention: per example; block: per block; diffusion_gemma: the corruption rate per canvas
    mask_eps: float = 1e-3  # the smallest mask ratio: t ~ U(mask_eps, 1]
    self_conditioning_prob: float = 0.5  # diffusion_gemma: canvases trained with a detached self-conditioning pass
    eos_padding: bool = True  # pad responses with EOS up to sampling.max_new_tokens and train on it (LLaDA)


@dataclass
class RewardModelTrainConfig:
    """tracerl train-reward-model: preference pairs → a reward-model directory, trained with TRL's RewardTrainer."""

    out_dir: str = "runs/reward_model"  # the reward-model directory written (must not exist yet)
    pairs: str | None = None  # preference pairs (json/jsonl/parquet: prompt, chosen, rejected); None: sample them
    base: str = "policy"  # policy: model.path with a new score head; tiny: a fresh tiny classifier; or a dir / hub id
    bidirectional: bool = True  # full attention in the classifier (a diffusion backbone was trained so)
    label_with: str = "synthetic_exact"  # sampled pairs: the reward that orders two completions of a prompt
    pair_prompts: int = 1000  # sampled pairs: training prompts, each sampled samples_per_prompt times by model.path
    samples_per_prompt: int = 4  # sampled pairs: every two completions of a prompt with different rewards make a pair
    heldout_fraction: float = 0.1  # prompts whose pairs are kept out of training to measure pair accuracy
    epochs: float = 2.0  # passes over the training pairs
    lr: float = 1e-3  # learning rate (AdamW)
    batch_size: int = 32  # pairs per optimizer step
    max_length: int = 256  # longer pairs are left out of training (TRL's rule)
    center_rewards_coefficient: float | None = None  # TRL's penalty on the mean reward (keeps scores near 0)


@dataclass
class TrainConfig:
    """The RL loop (tracerl train, DESIGN §2)."""

    steps: int = 100  # RL steps (each: rollout, reward, advantages, views, learner update, weight sync)
    eval_every: int = 0  # RL steps between evaluations on the held-out prompts (0 = only before and at the end)
    log_samples_every: int = 10  # RL steps between sample tables and decoding-order pictures (0 = off)
    log_samples: int = 8  # samples per table / picture


@dataclass
class GuardConfig:
    """The divergence guard: one console line and a W&B alert when a run looks broken (orchestrator/guards.py)."""

    enabled: bool = True  # watch every RL step's metrics
    window: int = 3  # RL steps a sign must last (windowed training reward, filtered-out steps, KL above the bound)
    reward_fraction: float = 0.5  # below this fraction of its best so far is a collapse (from its start if below 0)
    max_kl_to_old: float = 0.5  # train/kl_to_old above this (nats per token) for `window` steps is a warning
    value_window: int = 10  # objective.value_model: RL steps over which value/explained_var is averaged
    min_value_explained_var: float = 0.05  # a mean below this over `value_window` steps: the value model is idle


@dataclass
class EvalConfig:
    """Held-out evaluation, in the loop and as ``tracerl eval`` (DESIGN §17)."""

    source: str | None = None  # a separate dataset (as data.source); None: hold out prompts of data.source
    split: str = "test"  # split of eval.source
    num_prompts: int = 64  # held-out prompts (None source: removed from training, whole prompts, seeded)
    k: int = 4  # pass@k and mean@k use k samples per prompt
    samples: int = 4  # samples per prompt drawn for pass@k (≥ k; more samples, lower-variance estimate)
    temperature: float = 1.0  # sampling temperature of the k samples (greedy reward always uses 0)
    pass_threshold: float = 1.0  # a sample passes when its total reward is at least this
    max_new_tokens: int | None = None  # override sampling.max_new_tokens for evaluation
    remasking: str | None = None  # override sampling.remasking for evaluation
    steps_per_block: int | None = None  # override sampling.steps_per_block for evaluation


@dataclass
class ClusterConfig:
    """The Ray cluster a run expects (checked before any actor starts; ``--ray-address`` joins a running one)."""

    address: str | None = None  # host:port of a running Ray cluster; None starts a local instance on loopback
    num_nodes: int = 1  # nodes the run may use
    gpus_per_node: int = 0  # accelerators per node (0 = CPU only)
    dashboard: bool = False  # start the Ray dashboard of a local instance
    # Custom Ray resources pin actors to the nodes that offer them: start the learner nodes with
    # `ray start ... --resources '{"learner_node": 8}'` and set learner_resources={learner_node: 1}.
    learner_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each learner rank wants
    rollout_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each rollout actor wants


@dataclass
class FaultConfig:
    """What the loop does when an actor dies (DESIGN §16)."""

    max_restarts: int = 3  # a rollout or reward actor that dies is replaced and its shard redone, this often per step
    # A DeepSpeed group cannot take a new rank: the whole learner is rebuilt from the latest complete checkpoint and
    # the steps after it are redone.
    max_learner_restarts: int = 2  # a learner rank that dies: rebuild the learner this often per run (0 = stop)


@dataclass
class WandbConfig:
    """Weights & Biases monitoring (DESIGN §12)."""

    mode: Literal["online", "offline", "disabled"] = "offline"  # offline when no credentials
    project: str = "tracerl"  # W&B project
    entity: str | None = None  # W&B entity (team)
    name: str | None = None  # run name (defaults to the run directory's name)


@dataclass
class Config:
    """The whole run."""

    seed: int = 0  # seeds sampling, data order and initialisation (0 to 2**32 - 1)
    run_dir: str = "runs/default"  # where metrics, the resolved config and checkpoints go
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward_model: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---------------------------------------------------------------------------------------------- checks


def resolved_steps_per_block(s: SamplingConfig) -> int:
    """Denoising steps per block implied by ``steps`` / ``steps_per_block`` (validated)."""
    if s.steps is None:
        return s.steps_per_block if s.steps_per_block is not None else s.block_size
    num_blocks = s.max_new_tokens // s.block_size
    return s.steps // num_blocks


def check_sampling(s: SamplingConfig) -> None:
    """Reject impossible sampling settings with an error naming the setting and the fix."""
    if s.max_new_tokens <= 0:
        raise ConfigError(
            f"sampling.max_new_tokens must be a positive number of tokens to generate, got {s.max_new_tokens}."
        )
    if s.block_size <= 0:
        raise ConfigError(f"sampling.block_size must be positive, got {s.block_size}.")
    if s.steps is not None and s.steps_per_block is not None:
        raise ConfigError("set only one of sampling.steps (total) and sampling.steps_per_block, not both.")
    if s.steps is not None:
        if s.max_new_tokens % s.block_size:
            raise ConfigError(
                f"sampling.steps={s.steps} spreads steps over blocks, so sampling.max_new_tokens "
                f"({s.max_new_tokens}) must be a multiple of sampling.block_size ({s.block_size}); "
                "change one of them or set sampling.steps_per_block instead."
            )
        num_blocks = s.max_new_tokens // s.block_size
        if s.steps <= 0:
            raise ConfigError(
                f"sampling.steps={s.steps}: the total number of denoising steps must be positive, a multiple of the "
                f"number of blocks ({num_blocks}), e.g. sampling.steps={num_blocks * 2} (or null: "
                "sampling.steps_per_block)."
            )
        if s.steps % num_blocks:
            raise ConfigError(
                f"sampling.steps={s.steps} is not divisible by the number of blocks "
                f"({s.max_new_tokens} / {s.block_size} = {num_blocks}): the block size does not divide the "
                f"step schedule. Use a multiple of {num_blocks}, e.g. sampling.steps={num_blocks * 2}."
            )
    spb = resolved_steps_per_block(s)
    if not 1 <= spb <= s.block_size:
        raise ConfigError(
            f"denoising steps per block must be between 1 and sampling.block_size ({s.block_size}), got {spb}; "
            "every step commits at least one token of the block."
        )
    if not 0 <= s.temperature < math.inf or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise ConfigError(
            "sampling.temperature must be a finite number >= 0 (0 = greedy), sampling.top_p in (0, 1] and "
            f"sampling.top_k >= 0; got temperature={s.temperature}, top_p={s.top_p}, top_k={s.top_k}."
        )
    if not 0 < s.threshold <= 1 or not s.eb_threshold > 0 or math.isinf(s.eb_threshold):
        raise ConfigError(
            "sampling.threshold (the confidence that commits a token, low_confidence_dynamic) must be in (0, 1] and "
            "sampling.eb_threshold (the entropy budget of a step, entropy_bounded) a finite number above 0; got "
            f"threshold={s.threshold}, eb_threshold={s.eb_threshold}."
        )


def check_finite(node: Any, prefix: str = "") -> None:
    """Every number of the config is finite: ``inf`` passes the range checks written as ``x > 0`` (a learning rate
    of inf trains the model to NaN without a word), so no ``inf`` or ``nan`` is accepted anywhere. Free mappings (a
    reward's ``kwargs``, ``cluster.*_resources``) are the user's own and are checked where they are read."""
    if dataclasses.is_dataclass(node):
        items = [(f"{prefix}.{f.name}" if prefix else f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    else:
        items = [(f"{prefix}[{i}]", value) for i, value in enumerate(node)]
    for key, value in items:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}.")
        if dataclasses.is_dataclass(value) or isinstance(value, list):
            check_finite(value, key)


def check_optimizer(lr: LearnerConfig) -> None:
    """AdamW's settings, in the ranges where torch accepts them, named by key before anything starts."""
    problems = []
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(lr, key) < 1:
            problems.append(f"learner.{key} must be in [0, 1) (an Adam moment's decay), got {getattr(lr, key)}")
    if not lr.adam_eps > 0:
        problems.append(f"learner.adam_eps must be positive (it keeps Adam's denominator off 0), got {lr.adam_eps}")
    if not lr.weight_decay >= 0:
        problems.append(f"learner.weight_decay must be ≥ 0 (0 = none), got {lr.weight_decay}")
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def check_tiny_shape(m: ModelConfig) -> None:
    """The shape of a tiny model built from ``model.tiny`` (no ``model.path``): sizes positive, whole heads of an
    even width (rotary embeddings rotate pairs), DiffusionGemma's experts and key/value heads consistent, and no
    setting that only a loaded model reads (``model.mask_token_id``, ``model.block_size``)."""
    if m.path is not None or m.family not in ("tiny", "diffusion_gemma"):
        return
    t, problems = m.tiny, []
    loaded_only = {"model.mask_token_id": m.mask_token_id, "model.block_size": m.block_size}
    given = [f"{key}={value}" for key, value in loaded_only.items() if value is not None]
    if given:
        problems.append(
            f"{', '.join(given)} applies to a model loaded from model.path, and none is given: the model is built "
            f"from model.tiny, with its own mask token and model.tiny.block_size (with model.tiny.attention=block). "
            "Set model.tiny.block_size instead, or leave these out"
        )
    sizes = ["hidden_size", "num_layers", "num_heads", "intermediate_size", "block_size", "max_position_embeddings"]
    if m.family == "diffusion_gemma":
        sizes += ["canvas_length", "num_experts", "top_k_experts", "moe_intermediate_size", "sliding_window"]
    small = [f"model.tiny.{k}={getattr(t, k)}" for k in sizes if getattr(t, k) < 1]
    if small:
        problems.append(f"{', '.join(small)}: sizes must be ≥ 1")
    elif t.hidden_size // t.num_heads < 2 or (t.hidden_size // t.num_heads) % 2:
        problems.append(
            f"model.tiny.hidden_size={t.hidden_size} and model.tiny.num_heads={t.num_heads} give heads of width "
            f"{t.hidden_size // t.num_heads} (hidden_size // num_heads), which must be even and at least 2: rotary "
            "embeddings rotate pairs of dimensions (e.g. 64 and 4)"
        )
    elif m.family == "diffusion_gemma" and t.num_heads % max(1, t.num_heads // 2):
        problems.append(
            f"model.tiny.num_heads={t.num_heads}: the tiny DiffusionGemma shares each key/value head between two "
            "query heads, so num_heads must be even (or 1-3)"
        )
    if not small and m.family == "diffusion_gemma" and t.top_k_experts > t.num_experts:
        problems.append(
            f"model.tiny.top_k_experts={t.top_k_experts} routes each token to more experts than model.tiny.num_experts"
            f"={t.num_experts}; set top_k_experts ≤ num_experts"
        )
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def check(cfg: Config) -> None:
    """Cross-field checks that the type system cannot express (registry names are checked by tracerl.checks)."""
    check_sampling(cfg.sampling)
    check_optimizer(cfg.learner)
    check_tiny_shape(cfg.model)
    resolve_resources(cfg)
    lr = cfg.learner
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(
            f"seed must be between 0 and 2**32 - 1 = {2**32 - 1} (the range NumPy, which SFT seeds, takes), got "
            f"{cfg.seed}; pick another seed in that range."
        )
    if cfg.objective.shrink < 1:
        raise ConfigError(f"objective.shrink must be ≥ 1 (1 = exact replay), got {cfg.objective.shrink}.")
    if not 0 <= lr.zero_stage <= 3:
        raise ConfigError(f"learner.zero_stage must be 0, 1, 2 or 3, got {lr.zero_stage}.")
    if lr.engine == "torch" and lr.zero_stage != 0:
        raise ConfigError(
            f"learner.engine=torch keeps the whole model on every rank and has no ZeRO; got learner.zero_stage="
            f"{lr.zero_stage}. Set learner.zero_stage=0, or learner.engine=deepspeed for ZeRO."
        )
    if min(lr.num_ranks, lr.minibatches, lr.updates_per_step, lr.value_updates_per_step, lr.micro_batch_tokens) < 1:
        raise ConfigError(
            "learner.num_ranks, minibatches, updates_per_step, value_updates_per_step and micro_batch_tokens must be "
            "≥ 1."
        )
    counts = {
        "learner.logprob_chunk_tokens": (lr.logprob_chunk_tokens, 1),
        "learner.total_steps": (lr.total_steps, 1),
        "learner.warmup_steps": (lr.warmup_steps, 0),
        "sampling.trainable_pad_tokens": (cfg.sampling.trainable_pad_tokens, 0),
    }
    for key, (value, least) in counts.items():
        if value < least:
            raise ConfigError(f"{key} must be ≥ {least}, got {value}.")
    if not (math.isfinite(lr.max_grad_norm) and lr.max_grad_norm >= 0):
        raise ConfigError(
            f"learner.max_grad_norm is the global gradient norm to clip to, ≥ 0 (0 = no clipping); got "
            f"{lr.max_grad_norm}."
        )
    if lr.value_lr is not None and not lr.value_lr > 0 or cfg.objective.value_eps < 0:
        raise ConfigError(
            f"learner.value_lr must be positive (or null for 5 × learner.lr), got {lr.value_lr}, and "
            f"objective.value_eps ≥ 0 (0 = no value clipping), got {cfg.objective.value_eps}."
        )
    if cfg.rollout.prompts_per_step < 1 or cfg.rollout.samples_per_prompt < 1:
        raise ConfigError(
            f"rollout.prompts_per_step and rollout.samples_per_prompt must be ≥ 1 (got {cfg.rollout.prompts_per_step}"
            f" and {cfg.rollout.samples_per_prompt}): an RL step needs at least one prompt and one sample of it."
        )
    if not 0 <= cfg.sft.self_conditioning_prob <= 1:
        raise ConfigError(
            f"sft.self_conditioning_prob is the probability that a canvas is trained with a self-conditioning pass, "
            f"in [0, 1]; got {cfg.sft.self_conditioning_prob}."
        )
    if not 0 < cfg.sft.mask_eps < 1:
        raise ConfigError(
            f"sft.mask_eps must be in (0, 1) (the smallest mask ratio t ~ U(mask_eps, 1] of an SFT example; the loss "
            f"weighs a masked token by 1/t), got {cfg.sft.mask_eps}."
        )
    samples = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    if lr.minibatches > samples:
        raise ConfigError(
            f"learner.minibatches={lr.minibatches} splits each RL step's {samples} samples (rollout.prompts_per_step"
            f" × samples_per_prompt) into more minibatches than there are samples: a pass would take only {samples}"
            f" optimizer steps, not {lr.minibatches}. Set learner.minibatches ≤ {samples}, or sample more per step."
        )
    if cfg.rollout.samples_per_prompt == 1 and cfg.objective.advantage in GROUP_ADVANTAGES:
        raise ConfigError(
            f"rollout.samples_per_prompt=1 with objective.advantage={cfg.objective.advantage}: a group of one sample "
            "has nothing to compare its reward with, so every advantage is 0 (and the value model's, which is scaled "
            "per group), and the run learns nothing. Use rollout.samples_per_prompt ≥ 2 (4-16 is usual)."
        )
    check_lora(lr.lora, lr.zero_stage)
    check_objective_ranges(cfg.objective)
    check_loop(cfg)
    check_guard(cfg.guard)
    check_counts(cfg)
    check_reward_entries(cfg)
    check_renoising(cfg)
    check_finite(cfg)  # last: the specific checks above say more where they catch a value


def reward_model_workers(m: RewardModelConfig, rollout_workers: int) -> int:
    """Actors of a reward model: ``num_workers``, or (0) one beside each rollout actor when colocated, else one."""
    if m.num_workers:
        return m.num_workers
    return rollout_workers if m.placement == "colocated" else 1


def check_reward_entries(cfg: Config) -> None:
    """The ``reward.functions`` entries: finite weights (``check_reward_total`` asks for a total reward where samples
    are scored), and their ``model`` / ``judge`` blocks (kind, counts and GPU shares)."""
    for i, f in enumerate(cfg.reward.functions):
        if not math.isfinite(f.weight):
            raise ConfigError(
                f"reward.functions[{i}] ({f.name or f.fn}) has weight {f.weight}: a weight is a finite number (0 "
                "logs the reward without optimising it)."
            )
    shares = 0.0
    for i, f in enumerate(cfg.reward.functions):
        where = f"reward.functions[{i}] ({f.name or f.fn})"
        if f.model is not None and f.judge is not None:
            raise ConfigError(f"{where} has both a model and a judge block; an entry is one or the other.")
        if f.kind in ("function", "http") and (f.model is not None or f.judge is not None):
            raise ConfigError(f"{where} is kind={f.kind} but has a model/judge block; drop the block or the kind.")
        if f.kind == "model" and f.judge is not None or f.kind == "judge" and f.model is not None:
            raise ConfigError(f"{where} is kind={f.kind}: give its settings as '{f.kind}: {{...}}'.")
        url = isinstance(f.fn, str) and f.fn.strip().startswith(("http://", "https://"))
        if f.kind == "http" and not url or f.kind == "function" and url:
            raise ConfigError(
                f"{where} is kind={f.kind} but fn is {'an endpoint URL' if url else 'not an http(s):// URL'}: an "
                "endpoint is kind=http (or auto) and written 'http://host:port/score'; a function is kind=function "
                "(or auto) and written as a registered name, 'pkg.module:function' or 'path/to/file.py:function'."
            )
        m, j = f.model, f.judge
        if m is not None:
            if m.max_length < 1 or m.batch_tokens < m.max_length:
                raise ConfigError(
                    f"{where}: model.max_length must be ≥ 1 and model.batch_tokens ≥ model.max_length (one input must "
                    f"fit a forward); got max_length={m.max_length}, batch_tokens={m.batch_tokens}."
                )
            if m.num_workers < 0 or not (math.isfinite(m.num_cpus) and m.num_cpus >= 0) or not 0 < m.gpu_fraction < 1:
                raise ConfigError(
                    f"{where}: model.num_workers ≥ 0 (0 = auto), model.num_cpus ≥ 0 and 0 < model.gpu_fraction < 1; "
                    f"got {m.num_workers}, {m.num_cpus}, {m.gpu_fraction}."
                )
            if m.placement == "colocated":
                if reward_model_workers(m, cfg.rollout.num_workers) != cfg.rollout.num_workers:
                    raise ConfigError(
                        f"{where}: model.placement=colocated puts one reward-model actor beside each rollout actor, so "
                        f"model.num_workers ({m.num_workers}) must equal rollout.num_workers "
                        f"({cfg.rollout.num_workers}); set it to 0 (auto), or use model.placement=separate (own GPUs) "
                        "or cpu."
                    )
                shares += m.gpu_fraction
        if j is not None and (j.concurrency < 1 or j.retries < 0 or j.max_tokens < 1 or not j.request_timeout_s > 0):
            raise ConfigError(
                f"{where}: judge.concurrency and judge.max_tokens must be ≥ 1, judge.retries ≥ 0 and "
                f"judge.request_timeout_s > 0; got {j.concurrency}, {j.max_tokens}, {j.retries}, {j.request_timeout_s}."
            )
    room = 0.5 if cfg.rollout.placement == "colocated" else 1.0  # a rollout actor's share of its GPU
    if shares >= room:
        raise ConfigError(
            f"the colocated reward models take {shares:g} of each rollout actor's GPU, which holds only {room:g} for "
            "the rollout copy and them; lower their model.gpu_fraction or place one with model.placement=separate."
        )


def check_lora(lora: LoRAConfig, zero_stage: int) -> None:
    """``learner.lora``'s numbers (its target modules are checked against the model when it is built)."""
    if not lora.enabled:
        return
    if lora.rank < 1:
        raise ConfigError(
            f"learner.lora.rank must be ≥ 1 (the adapters' rank), got {lora.rank}; d1 uses 128 for LLaDA-8B, 16 is a "
            "common start. Set learner.lora.enabled=false to train every weight instead."
        )
    if not (math.isfinite(lora.alpha) and lora.alpha > 0):
        raise ConfigError(
            f"learner.lora.alpha must be a finite number > 0 (the update is alpha / rank · B A), got {lora.alpha}."
        )
    if lora.dropout != 0:
        raise ConfigError(
            f"learner.lora.dropout={lora.dropout} is refused: the learner computes old and new log-probs with "
            "dropout off so that their ratio is exactly 1 before an update, and adapter dropout would make every "
            "pass differ. Set learner.lora.dropout=0."
        )
    if lora.target_modules is not None and not lora.target_modules:
        raise ConfigError(
            "learner.lora.target_modules is an empty list: give module names (e.g. [q_proj, v_proj]) or leave it "
            "unset for the model family's default."
        )
    if zero_stage == 3:
        raise ConfigError(
            "learner.lora with learner.zero_stage=3 is not supported yet (the adapters and their optimizer state "
            "are small, so ZeRO-3 would only partition the frozen base weights). Set learner.zero_stage=2."
        )


def check_objective_ranges(o: ObjectiveConfig) -> None:
    """The objective's numbers, each within the range where it means something; every problem in one message."""
    problems = []
    if not 0 < o.mask_ratio_low <= o.mask_ratio_high <= 1:
        problems.append(
            f"objective.mask_ratio_low and mask_ratio_high must satisfy 0 < low ≤ high ≤ 1 (the share of a sample's "
            f"tokens a random_masking or coupled view masks, drawn from U[low, high]; a ratio of 0 trains on nothing),"
            f" got {o.mask_ratio_low} and {o.mask_ratio_high}"
        )
    if not 0 <= o.d1_prompt_mask_prob < 1:
        problems.append(
            f"objective.d1_prompt_mask_prob must be in [0, 1) (the probability that d1 masks a prompt token), got "
            f"{o.d1_prompt_mask_prob}"
        )
    if not (0 <= o.eps_low <= 1 and o.eps_high >= 0):
        problems.append(
            f"objective.eps_low must be in [0, 1] and eps_high ≥ 0 (the ratio is clipped to [1 − eps_low, 1 + "
            f"eps_high]), got {o.eps_low} and {o.eps_high}"
        )
    if o.group_filter == "keep_acc_range" and not o.filter_low <= o.filter_high:
        problems.append(
            f"objective.group_filter=keep_acc_range keeps groups whose mean score lies in [filter_low, filter_high], "
            f"but objective.filter_low={o.filter_low} > filter_high={o.filter_high} would drop every group and train "
            "on nothing; set filter_low ≤ filter_high"
        )
    for key in ("kl_to_old_coef", "kl_to_ref_coef"):
        if not getattr(o, key) >= 0:
            problems.append(f"objective.{key} must be ≥ 0 (0 turns the penalty off), got {getattr(o, key)}")
    if not (0 <= o.gamma <= 1 and 0 <= o.lam <= 1):
        problems.append(f"objective.gamma and objective.lam must be in [0, 1] (GAE), got {o.gamma} and {o.lam}")
    if o.value_model and o.views != "trace":
        problems.append(
            f"objective.value_model=true with objective.views={o.views}: the value model reads each token's value in "
            "the state just before the sampler committed it and runs GAE over the denoising steps, which only trace "
            f"views replay; {o.views} views score tokens in masked states the sampler never produced (d1: the "
            "whole completion masked), where a value means neither. Use objective.views=trace with the value model, "
            "or objective.value_model=false"
        )
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def check_old_logp_source(cfg: Config) -> None:
    """``old_logp_source=rollout`` trusts the sampler's log-probs as the learner's own: only exact replay allows it."""
    o = cfg.objective
    if o.old_logp_source != "rollout":
        return
    reasons = []
    if o.views != "trace":
        reasons.append(f"objective.views={o.views} scores states the sampler never saw")
    if o.shrink != 1:
        reasons.append(f"objective.shrink={o.shrink} merges steps, so a view is not the state a token was sampled in")
    if cfg.sampling.cache not in ("auto", "none", "kv"):
        reasons.append(f"sampling.cache={cfg.sampling.cache} is approximate")
    dtypes = {"model.dtype": cfg.model.dtype, "rollout.dtype": cfg.rollout.dtype}
    reasons += [f"{k}={v} is not float32" for k, v in dtypes.items() if v != "float32"]
    if cfg.learner.precision != "fp32":
        reasons.append(f"learner.precision={cfg.learner.precision} is not fp32")
    if reasons:
        raise ConfigError(
            "objective.old_logp_source=rollout uses the sampler's log-probs as the old policy's, which is only true "
            "when the views replay the sampler exactly (trace views, shrink 1, an exact cache, float32 throughout); "
            f"here {'; '.join(reasons)}. Set objective.old_logp_source=learner (the learner recomputes them)."
        )


def check_guard(g: GuardConfig) -> None:
    """The divergence guard's bounds."""
    if g.window < 1 or not 0 < g.reward_fraction < 1 or not g.max_kl_to_old > 0:
        raise ConfigError(
            f"guard.window must be ≥ 1 step, guard.reward_fraction in (0, 1) and guard.max_kl_to_old > 0; got "
            f"{g.window}, {g.reward_fraction} and {g.max_kl_to_old} (guard.enabled=false turns the guard off)."
        )
    if g.value_window < 1 or not g.min_value_explained_var < 1:
        raise ConfigError(
            f"guard.value_window must be ≥ 1 step and guard.min_value_explained_var below 1 (an explained variance "
            f"is at most 1); got {g.value_window} and {g.min_value_explained_var}."
        )


# Sampler settings of the absorbing-mask samplers (block grid, remasking, candidate filters, caches): a renoising
# canvas model (model.family=diffusion_gemma) takes none of them; its sampler is sampling.canvas.
ABSORBING_SAMPLING = (
    "block_size", "steps_per_block", "steps", "remasking", "threshold", "eb_threshold", "top_k", "top_p", "cache",
    "kv_storage", "fused_commit", "cuda_graph", "trainable_pad_tokens",
)  # fmt: skip


def check_renoising(cfg: Config) -> None:
    """model.family=diffusion_gemma: no absorbing-mask sampler settings, and only the estimators that replay its
    renoising trajectory (trace views, exact steps; no value model yet)."""
    if cfg.model.family != "diffusion_gemma":
        return
    default = SamplingConfig()
    changed = [k for k in ABSORBING_SAMPLING if getattr(cfg.sampling, k) != getattr(default, k)]
    changed += [f"eval.{k}" for k in ("remasking", "steps_per_block") if getattr(cfg.eval, k) is not None]
    if changed:
        shown = ", ".join(k if k.startswith("eval.") else f"sampling.{k}" for k in changed)
        raise ConfigError(
            f"{shown}: model.family=diffusion_gemma is a renoising canvas model, which has no mask token, no "
            "remasking rule and no block grid of its own choosing; its sampler is set under sampling.canvas "
            "(canvas_length, max_denoising_steps, entropy_bound, t_max, t_min, stability_threshold, "
            "confidence_threshold). Remove these settings."
        )
    o = cfg.objective
    if o.views != "trace" or o.shrink != 1:
        raise ConfigError(
            f"objective.views={o.views}, objective.shrink={o.shrink}: model.family=diffusion_gemma trains on the "
            "renoising trajectory itself (each step's accepted tokens from the step's own canvas and "
            "self-conditioning); masking estimators (d1, random_masking, coupled) and merged steps have no "
            "meaning for it. Set objective.views=trace and objective.shrink=1."
        )
    if o.value_model:
        raise ConfigError(
            "objective.value_model=true: tracerl has no value model for model.family=diffusion_gemma yet (its "
            "state is a canvas and a self-conditioning signal, not a masked sequence). Set "
            "objective.value_model=false (group-relative advantages need none)."
        )


def check_loop(cfg: Config) -> None:
    """Settings of the RL loop and its evaluation."""
    t, e = cfg.train, cfg.eval
    if t.steps < 1:
        raise ConfigError(f"train.steps must be ≥ 1 RL step, got {t.steps}.")
    for key, value in (("train.eval_every", t.eval_every), ("train.log_samples_every", t.log_samples_every)):
        if value < 0:
            raise ConfigError(f"{key} must be ≥ 0 (0 = off), got {value}.")
    if e.k < 1 or e.samples < e.k:
        raise ConfigError(
            f"eval.k={e.k} and eval.samples={e.samples}: pass@k needs 1 ≤ k ≤ samples; raise eval.samples to at "
            f"least {max(1, e.k)}."
        )
    if e.num_prompts < 0:
        raise ConfigError(f"eval.num_prompts must be ≥ 0 (0 = no evaluation), got {e.num_prompts}.")
    if not 0 <= e.temperature < math.inf or not math.isfinite(e.pass_threshold):
        raise ConfigError(
            f"eval.temperature must be a finite number ≥ 0 (the k samples' temperature) and eval.pass_threshold a "
            f"finite reward (a sample passes at or above it); got {e.temperature} and {e.pass_threshold}."
        )
    if e.max_new_tokens is not None and e.max_new_tokens < 1:
        raise ConfigError(
            f"eval.max_new_tokens must be a positive number of tokens (or null: sampling.max_new_tokens), got "
            f"{e.max_new_tokens}."
        )
    block = cfg.sampling.block_size
    if e.steps_per_block is not None and not 1 <= e.steps_per_block <= block:
        raise ConfigError(
            f"eval.steps_per_block must be between 1 and sampling.block_size ({block}) (or null: the sampler's own); "
            f"got {e.steps_per_block}. Every step commits at least one token of the block."
        )


def resolve_resources(cfg: Config) -> None:
    """Fill ``learner.num_ranks`` / ``rollout.num_workers`` given as 0 (auto) from the declared cluster, and check
    that the placement can work: colocated puts one rollout actor beside each learner rank."""
    c, lc, r = cfg.cluster, cfg.learner, cfg.rollout
    if c.num_nodes < 1 or c.gpus_per_node < 0:
        raise ConfigError(
            f"cluster.num_nodes must be ≥ 1 and cluster.gpus_per_node ≥ 0 (got {c.num_nodes}, {c.gpus_per_node})."
        )
    total = c.num_nodes * c.gpus_per_node
    if lc.num_ranks < 0 or r.num_workers < 0:
        raise ConfigError("learner.num_ranks and rollout.num_workers must be ≥ 1, or 0 for auto.")
    if r.placement == "colocated":
        n = lc.num_ranks or r.num_workers or max(1, total)
        lc.num_ranks, r.num_workers = lc.num_ranks or n, r.num_workers or n
        if lc.num_ranks != r.num_workers:
            raise ConfigError(
                f"rollout.placement=colocated puts one rollout actor beside each learner rank, so rollout.num_workers "
                f"({r.num_workers}) must equal learner.num_ranks ({lc.num_ranks}); set both (or one of them to 0)."
            )
    else:
        learner_share = max(1, total // 2)
        lc.num_ranks = lc.num_ranks or learner_share
        r.num_workers = r.num_workers or max(1, total - lc.num_ranks)


def gpus_needed(cfg: Config) -> int:
    """Accelerators the run asks for: one per learner rank, plus one per rollout actor unless colocated, plus one per
    actor of a reward model placed on GPUs of its own."""
    if cfg.cluster.gpus_per_node == 0:
        return 0
    own = reward_model_gpus(cfg)
    if cfg.rollout.placement == "colocated":
        return cfg.learner.num_ranks + own
    return cfg.learner.num_ranks + cfg.rollout.num_workers + own


def reward_model_gpus(cfg: Config) -> int:
    """GPUs of the reward models placed on GPUs of their own (``model.placement=separate``)."""
    return sum(
        reward_model_workers(f.model, cfg.rollout.num_workers)
        for f in cfg.reward.functions
        if f.model is not None and f.model.placement == "separate"
    )


def check_cluster(cfg: Config, available_gpus: float, source: str) -> None:
    """The GPUs the run needs fit into ``available_gpus`` (from the declared cluster or a live one)."""
    need = gpus_needed(cfg)
    if need > available_gpus:
        layout = (
            f"{cfg.learner.num_ranks} learner ranks"
            + ("" if cfg.rollout.placement == "colocated" else f" + {cfg.rollout.num_workers} rollout actors")
            + (f" + {reward_model_gpus(cfg)} reward-model actors" if reward_model_gpus(cfg) else "")
        )
        raise ConfigError(
            f"the run needs {need} GPUs ({layout}, rollout.placement={cfg.rollout.placement}) but {source} has "
            f"{available_gpus:g}. Lower learner.num_ranks / rollout.num_workers, use rollout.placement=colocated, or "
            "add nodes (cluster.num_nodes)."
        )


def check_counts(cfg: Config) -> None:
    """Counts and durations that must be positive (or non-negative), each named by its full key."""
    rules = (
        ("sft.steps", cfg.sft.steps, 1, "optimizer steps to train"),
        ("sft.batch_size", cfg.sft.batch_size, 1, "examples per optimizer step"),
        ("sft.eval_every", cfg.sft.eval_every, 0, "0 turns evaluation off"),
        ("sft.eval_prompts", cfg.sft.eval_prompts, 0, "held-out prompts per check"),
        ("reward.num_workers", cfg.reward.num_workers, 1, "reward actors"),
        ("rollout.num_workers", cfg.rollout.num_workers, 1, "rollout actors"),
        ("data.max_prompt_tokens", cfg.data.max_prompt_tokens, 1, "longer prompts are dropped"),
        ("data.num_synthetic", cfg.data.num_synthetic, 1, "examples of a synthetic task"),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last, 1, "complete checkpoints kept"),
        ("checkpoint.save_every", cfg.checkpoint.save_every, 0, "0 saves only at the end"),
        ("sampling.batch_size", cfg.sampling.batch_size, 1, "sequences decoded together"),
        ("fault.max_restarts", cfg.fault.max_restarts, 0, "0 stops at the first dead actor"),
        ("fault.max_learner_restarts", cfg.fault.max_learner_restarts, 0, "0 stops at the first dead learner"),
    )
    for key, value, least, meaning in rules:
        if value < least:
            bound = "positive" if least == 1 else "0 or more"
            raise ConfigError(f"{key} must be {bound} ({meaning}), got {value}.")
    positive = (("reward.timeout_s", cfg.reward.timeout_s), ("sft.lr", cfg.sft.lr), ("learner.lr", cfg.learner.lr),
                ("reward_model.lr", cfg.reward_model.lr))  # fmt: skip
    for key, value in positive:
        if not value > 0:
            raise ConfigError(f"{key} must be a positive number, got {value}.")
    if not 0.0 <= cfg.data.max_unknown_rate <= 1.0:
        raise ConfigError(f"data.max_unknown_rate is a fraction of tokens in [0, 1], got {cfg.data.max_unknown_rate}.")
    cpus = (("learner.num_cpus_per_rank", cfg.learner.num_cpus_per_rank),
            ("rollout.num_cpus_per_worker", cfg.rollout.num_cpus_per_worker),
            ("reward.num_cpus_per_worker", cfg.reward.num_cpus_per_worker))  # fmt: skip
    for key, value in cpus:
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key} must be a number ≥ 0 (the Ray CPUs each actor reserves), got {value}.")
    for key in ("learner_resources", "rollout_resources"):
        for name, amount in getattr(cfg.cluster, key).items():
            if name in ("CPU", "GPU"):  # Ray's own names; lower-case ones are custom resources
                raise ConfigError(
                    f"cluster.{key} names {name!r}, which Ray counts through tracerl's own settings: CPUs with "
                    "learner.num_cpus_per_rank / rollout.num_cpus_per_worker, GPUs with cluster.gpus_per_node. Keep "
                    f"custom resources here, e.g. cluster.{key}={{my_resource: 1}}."
                )
            if not (math.isfinite(amount) and amount >= 0):
                raise ConfigError(
                    f"cluster.{key}.{name} must be a number ≥ 0 (of Ray resource '{name}'), got {amount}."
                )


# ---------------------------------------------------------------------------------------------- loading


DATA_FILE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")
MODEL_FILE_EXTENSIONS = (".json", ".yaml", ".yml", ".safetensors", ".bin", ".pt", ".pth")


def local_path_reason(value: str, extensions: tuple[str, ...] = ()) -> str | None:
    """Why a setting that takes a local path or a hub name (``data.source``, ``model.path``) must mean a local
    path, or None when it could be a hub name ``org/name``: a missing local path is then an error at once, with no
    network access.

    Example:
        >>> local_path_reason("w/nope.jsonl", DATA_FILE_EXTENSIONS), local_path_reason("runs/a/model")
        ('a local file, by its extension', "a local path: a hub name has one '/', as in org/name")
        >>> local_path_reason("./model"), local_path_reason("GSAI-ML/LLaDA-8B-Instruct")
        ('a local path, by its start', None)
    """
    if value.startswith(("/", "~", ".")):  # ./, ../ and hidden names: a hub name starts with a letter or digit
        return "a local path, by its start"
    if value.count("/") > 1 or "\\" in value:
        return "a local path: a hub name has one '/', as in org/name"
    if Path(value).suffix.lower() in extensions:
        return "a local file, by its extension"
    return None


def _literal_problems(obj: Any, prefix: str = "") -> list[str]:
    """Values of ``Literal[...]`` fields that are not among the choices (OmegaConf only checks types)."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            problems.append(f"{prefix}{f.name}='{value}' is not valid; choose from {list(typing.get_args(hint))}")
        elif dataclasses.is_dataclass(value):
            problems.extend(_literal_problems(value, f"{prefix}{f.name}."))
    return problems


_INDEXED = re.compile(r"^([A-Za-z_][\w.]*)\[(\d+)\]((?:\.\w+)*)$")


def _set_indexed(merged: DictConfig, item: str) -> None:
    """Apply one override of a list entry, ``reward.functions[0].weight=1``, or replace a whole entry,
    ``reward.functions[1]={fn: sudoku_cells}``, in the merged config: the entry must exist."""
    key, _, text = item.partition("=")
    match = _INDEXED.match(key.strip())
    if match is None:
        raise ConfigError(
            f"override '{item}': write one list entry as key[index].setting=value, e.g. reward.functions[0].weight=1."
        )
    name, index, rest = match.group(1), int(match.group(2)), match.group(3)
    entries = OmegaConf.select(merged, name, default=None)
    if not isinstance(entries, ListConfig):
        raise ConfigError(f"override '{item}': {name} is not a list setting, so it has no entry [{index}].")
    if index >= len(entries):
        raise ConfigError(
            f"override '{item}': {name} has {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, so there is no "
            f"[{index}]; give the whole list instead, e.g. {name}=[...]."
        )
    value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    try:
        if rest:  # a free-form mapping given whole replaces the one there, like a setting of any other type
            merge = not _is_free_mapping(Config, f"{name}[{index}]{rest}")
            OmegaConf.update(merged, f"{name}[{index}]{rest}", value, merge=merge)
        else:  # a whole entry replaces the one there: what it leaves out takes the defaults, not the old values
            kind = entries._metadata.element_type
            entries[index] = (
                OmegaConf.merge(OmegaConf.structured(kind), value) if dataclasses.is_dataclass(kind) else value
            )
    except OmegaConfBaseException as err:
        raise _explain(err, f"the override '{item}'") from None


def _set_mapping(merged: DictConfig, item: str) -> None:
    """Apply ``key={...}`` to a free-form mapping setting: the mapping given replaces the one there (``{}``
    clears it), where a YAML layer or ``key.entry=value`` merges entry by entry."""
    key = item.partition("=")[0]
    layer = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)  # ${...} resolves after the merge
    if problem := _shape_problem(layer, Config):
        raise ConfigError(f"{problem} (from command-line overrides).")
    value: Any = layer
    for part in key.split("."):
        value = value[part]
    try:
        OmegaConf.update(merged, key, value, merge=False)
    except OmegaConfBaseException as err:
        if value is None:
            raise ConfigError(
                f"override '{item}': {key} is a mapping and cannot be null; write {key}={{}} to clear it."
            ) from None
        raise _explain(err, f"the override '{item}'") from None


def _is_free_mapping(schema: type, key: str) -> bool:
    """Whether ``key`` (dotted, list entries as ``[i]``) names a free-form mapping setting of the schema
    (``dict[str, ...]``, e.g. ``data.synthetic_options``), which a command-line override replaces whole.

    Example:
        >>> _is_free_mapping(Config, "data.synthetic_options"), _is_free_mapping(Config, "reward.functions[0].kwargs")
        (True, True)
        >>> _is_free_mapping(Config, "data.synthetic_options.noise"), _is_free_mapping(Config, "learner")
        (False, False)
    """
    kind: Any = schema
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        kind = _strip_optional(kind)
        if part.startswith("["):
            if typing.get_origin(kind) is not list:
                return False
            (kind,) = typing.get_args(kind) or (Any,)
        elif dataclasses.is_dataclass(kind) and part in (hints := typing.get_type_hints(kind)):
            kind = hints[part]
        else:
            return False
    return typing.get_origin(_strip_optional(kind)) is dict


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf exception into one paragraph naming the key, the problem and the valid keys."""
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    parent_type = getattr(err, "object_type", None)
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        valid = [f.name for f in dataclasses.fields(parent_type)] if dataclasses.is_dataclass(parent_type) else []
        hint = f" Valid keys here: {valid}." if valid else ""
        return ConfigError(f"unknown config key '{key}' (from {source}).{hint}")
    if "Incompatible value 'None'" in msg:  # `key=` with nothing after it
        msg += f"; an empty value means null, which {key} does not take: give it a value"
    return ConfigError(f"bad value for config key '{key}' (from {source}): {msg}.")


def _shape_problem(value: Any, schema: type, prefix: str = "") -> str | None:
    """A value of the wrong shape for the schema, in a layer before it is merged (OmegaConf names neither the key
    nor the fix for these): a section set to a single value, a list setting given something else, a list of
    sections given bare values. None if every known key has the right shape (types and unknown keys: OmegaConf).

    Example:
        >>> _shape_problem({"learner": 3}, Config).split(":")[0]
        "'learner' is a section of settings (learner.engine, learner.num_ranks, ...), not a value"
        >>> _shape_problem({"reward": {"functions": "sudoku_cells"}}, Config).split(";")[0]
        "reward.functions takes a list, got 'sudoku_cells'"
        >>> _shape_problem({"reward": {"functions": [{"fn": "sudoku_cells", "weight": "abc"}]}}, Config)
        "reward.functions[0].weight is 'abc', not a number"
    """
    if not isinstance(value, dict) or not dataclasses.is_dataclass(schema):
        return None
    hints = typing.get_type_hints(schema)
    for key, item in value.items():
        if key not in hints or item is None:
            continue
        name, kind = f"{prefix}{key}", _strip_optional(hints[key])
        if isinstance(item, str) and (item.startswith("${") or item == "???"):
            continue  # an interpolation or a missing value: OmegaConf resolves and checks it after the merge
        if kind in (int, float) and isinstance(item, str) and not _is_number(item):
            return f"{name} is {item!r}, not a number"  # inside a list OmegaConf names the key without its path
        if dataclasses.is_dataclass(kind):
            if not isinstance(item, dict):
                keys = [f"{name}.{f.name}" for f in dataclasses.fields(kind)]
                return (
                    f"'{name}' is a section of settings ({', '.join(keys[:2])}, ...), not a value: set its keys, "
                    f"e.g. {keys[0]}=..."
                )
            if problem := _shape_problem(item, kind, f"{name}."):
                return problem
        elif typing.get_origin(kind) is dict and not isinstance(item, dict):
            return f"{name} takes a mapping, got {item!r}; write it as {name}={{key: value}}"
        elif typing.get_origin(kind) is list:
            (inner,) = typing.get_args(kind) or (Any,)
            example = "[{fn: sudoku_cells}]" if name == "reward.functions" else "[a, b]"
            if isinstance(item, dict) and item and all(str(k).isdigit() for k in item):
                entry = f"{name}[{next(iter(item))}]"
                return f"{name} is a list: set one entry as {entry}.<setting>=..., or give {name}={example}"
            if not isinstance(item, list):
                return f"{name} takes a list, got {item!r}; write it as {name}={example}"
            for i, entry in enumerate(item):
                if dataclasses.is_dataclass(inner) and not isinstance(entry, dict):
                    keys = [f.name for f in dataclasses.fields(inner)]
                    return (
                        f"{name}[{i}] is {entry!r}, but each entry of {name} is a mapping of {keys[:3]}, ...; write "
                        f"it as {name}={example}"
                    )
                if problem := _shape_problem(entry, inner, f"{name}[{i}]."):
                    return problem
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _strip_optional(kind: Any) -> Any:
    """``X`` for ``X | None``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(kind) else kind


def _top_level(path: Path) -> str | None:
    """What a YAML file holds at the top when it is a single value, which OmegaConf takes for a key ('just a
    string' becomes {'just a string': None}): "string", "number", ...; None for a mapping or an empty file."""
    try:
        top = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return None  # what OmegaConf read, it reads with its own loader
    if top is None or isinstance(top, dict):
        return None
    return {str: "string", bool: "boolean", int: "number", float: "number"}.get(type(top), type(top).__name__)


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain containers (for saving and for W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def load(
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type = Config,
    names: Callable[[Any], None] | None = None,
) -> Any:
    """Build a config from the schema defaults, a YAML file of overrides, then ``a.b=c`` overrides. ``names``
    (``tracerl.checks``' registry-name check) runs before the cross-field checks, so a misspelt name is reported
    as such rather than as a combination it takes part in.

    Raises:
        ConfigError: unknown key, wrong type, value outside a field's choices, or an impossible combination.
    """
    base = OmegaConf.structured(schema)
    layers = []
    if yaml_path is not None:
        path = Path(yaml_path)
        if path.is_dir():
            inside = sorted(p.name for p in path.glob("*.y*ml"))
            some = f" (it holds {', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})" if inside else ""
            raise ConfigError(f"config file '{path}' is a directory{some}; pass the path of a YAML file.")
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file.")
        try:
            layer = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - yaml and omegaconf raise several types; the text says where
            if _top_level(path) is None:
                detail = " ".join(str(err).split())
                raise ConfigError(f"config file '{path}' is not valid YAML: {detail}") from None
            layer = None  # a single value (OmegaConf refuses a number): said below
        top = _top_level(path) or (None if isinstance(layer, DictConfig) else "list")
        if top is not None:
            raise ConfigError(
                f"config file '{path}' holds a {top} at the top, not a mapping of settings; write it as keys, "
                "e.g. 'sampling: {max_new_tokens: 64}'."
            )
        layers.append((layer, str(path)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. sampling.temperature=0.7).")
    for item in overrides or []:  # in their order: a run of plain ones is one layer, an indexed one its own step
        key = item.partition("=")[0]
        if "[" in key:  # reward.functions[0].weight=1
            layers.append(((_set_indexed, item), "command-line overrides"))
        elif schema is Config and _is_free_mapping(Config, key):  # data.synthetic_options={...} replaces the mapping
            layers.append(((_set_mapping, item), "command-line overrides"))
        elif layers and isinstance(layers[-1][0], list):
            layers[-1][0].append(item)
        else:
            layers.append(([item], "command-line overrides"))
    merged = base
    for layer, source in layers:
        if isinstance(layer, tuple):  # one override applied on its own: (setter, "key=value")
            setter, item = layer
            setter(merged, item)
            continue
        layer = OmegaConf.from_dotlist(layer) if isinstance(layer, list) else layer
        if problem := _shape_problem(OmegaConf.to_container(layer, resolve=False), schema):
            raise ConfigError(f"{problem} (from {source}).")
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, source) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, "the merged config") from None
    problems = _literal_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    if names is not None:
        names(cfg)
    if schema is Config:
        check(cfg)
    return cfg
