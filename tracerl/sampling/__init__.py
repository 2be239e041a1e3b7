"""Samplers that generate from a diffusion policy and record the trace (DESIGN §6).

``generate`` picks the sampler from the policy: block diffusion when the policy has a block size, else the
full-attention semi-autoregressive sampler.
"""

from __future__ import annotations

import dataclasses

import torch

from tracerl.config import ConfigError, SamplingConfig, check_sampling
from tracerl.records import CanvasRollout, Rollout
from tracerl.sampling.block import block_grid, sample_block
from tracerl.sampling.full import sample_full
from tracerl.sampling.graphs import graph_capturable
from tracerl.sampling.remasking import REMASKING, get_remasking, register_remasking
from tracerl.sampling.renoise import check_canvas_sampling, sample_canvas, sample_seeds
from tracerl.seeding import RowStreams, row_seeds

__all__ = [
    "REMASKING",
    "block_grid",
    "check_compatible",
    "check_device",
    "check_positions",
    "generate",
    "get_remasking",
    "register_remasking",
    "renoising",
    "resolve_cache",
    "sample_block",
    "sample_canvas",
    "sample_full",
]


def resolve_cache(policy, s: SamplingConfig) -> str:  # noqa: ANN001
    """The cache mode a run will use: ``kv`` / ``none`` for block models, ``none`` / ``prefix`` / ``dual`` for
    full attention."""
    if policy.block_size is not None:
        if s.cache in ("prefix", "dual"):
            raise ConfigError(
                f"sampling.cache={s.cache} is for full-attention models; block models use cache=kv (exact)."
            )
        return "none" if s.cache == "none" else "kv"
    if s.cache == "kv":
        raise ConfigError(
            f"sampling.cache=kv needs a block-diffusion model; {policy.family} uses full attention. "
            "Use sampling.cache=dual or prefix (approximate) or none."
        )
    if s.cache in ("prefix", "dual") and not policy.supports_cache:
        raise ConfigError(f"the {policy.family} family has no key/value cache; use sampling.cache=none.")
    return s.cache if s.cache in ("prefix", "dual") else "none"


def renoising(policy) -> bool:  # noqa: ANN001
    """The policy denoises canvases of uniform noise (DiffusionGemma), not masks: the canvas sampler serves it."""
    return getattr(policy, "trajectory", "absorbing") == "renoising"


def check_compatible(policy, s: SamplingConfig) -> None:  # noqa: ANN001
    """Sampling settings are valid on their own and fit this policy (block size, cache mode, whether its forward
    can be captured as a CUDA graph; a renoising policy's canvas settings); the device is ``check_device``'s.
    Needs no weights: the driver runs it on ``load_policy(..., weights=False)`` before any actor starts."""
    if renoising(policy):
        check_canvas_sampling(policy, s)
        return
    changed = [f.name for f in dataclasses.fields(s.canvas) if getattr(s.canvas, f.name) != f.default]
    if changed:
        raise ConfigError(
            f"sampling.canvas.{changed[0]} is a setting of the renoising canvas sampler (model.family="
            f"diffusion_gemma); the {policy.family} policy decodes by unmasking and would ignore it. Remove the "
            "sampling.canvas settings, or set model.family=diffusion_gemma."
        )
    check_sampling(s)
    if s.remasking not in REMASKING:
        raise ConfigError(f"unknown sampling.remasking '{s.remasking}'; choose from {sorted(REMASKING)}.")
    if policy.block_size is not None and s.block_size != policy.block_size:
        raise ConfigError(
            f"sampling.block_size={s.block_size} differs from the model's block size {policy.block_size}; "
            f"a block-diffusion model decodes on its own grid: set sampling.block_size={policy.block_size}."
        )
    if s.cuda_graph:
        if policy.block_size is None:
            raise ConfigError(
                "sampling.cuda_graph=true is for block-diffusion models (it captures the fixed-shape block step); "
                f"the {policy.family} policy uses full attention. Set sampling.cuda_graph=false."
            )
        if s.cache == "none" or s.kv_storage != "static":
            raise ConfigError(
                "sampling.cuda_graph=true captures the cached block step over the static KV cache; got "
                f"sampling.cache={s.cache}, sampling.kv_storage={s.kv_storage}. Set sampling.cache=kv (or auto) "
                "and sampling.kv_storage=static, or sampling.cuda_graph=false."
            )
        if not graph_capturable(policy.model):
            raise ConfigError(
                "sampling.cuda_graph=true captures tracerl's lean decoder forward (a plain Llama / Qwen2 / Qwen3 "
                f"in eval mode, without dynamic RoPE); this {policy.family} model "
                f"({type(policy.model).__name__}) runs the transformers forward, which may synchronise with the "
                "host inside the step and so cannot be captured. Set sampling.cuda_graph=false."
            )


def check_device(s: SamplingConfig, device: str) -> None:
    """Sampling settings fit the device the sampler runs on (``cuda_graph`` needs CUDA)."""
    if s.cuda_graph and device != "cuda":
        raise ConfigError(
            "sampling.cuda_graph=true is to capture the block step as a CUDA graph and needs a CUDA device; "
            f"the sampler runs on {device}. Set sampling.cuda_graph=false (the static cache still applies), or "
            "run the rollout actors on GPUs (cluster.gpus_per_node)."
        )


def position_limit(policy) -> int | None:  # noqa: ANN001
    """The model's ``max_position_embeddings`` (a multimodal config's text part), or None when it has none."""
    config = policy.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def check_positions(
    policy,  # noqa: ANN001
    longest_prompt: int,
    s: SamplingConfig,
    prompt_setting: str = "data.max_prompt_tokens",
) -> None:
    """The longest prompt plus the response (and one block of slack for block models) fits the model's positions;
    ``prompt_setting`` is what the message tells the user to shorten the prompt with.

    Raises:
        ConfigError: it does not; the message names both settings.
    """
    if renoising(policy):  # whole canvases, counted in the text config
        check_canvas_sampling(policy, s)
        longest = longest_prompt + -(-s.max_new_tokens // policy.canvas_length) * policy.canvas_length
    else:
        longest = longest_prompt + s.max_new_tokens + (s.block_size if policy.block_size else 0)
    limit = position_limit(policy)
    if limit is not None and longest > limit:
        raise ConfigError(
            f"the longest prompt ({longest_prompt} tokens) plus sampling.max_new_tokens={s.max_new_tokens} needs "
            f"{longest} positions but the model has max_position_embeddings={limit}; shorten "
            f"{prompt_setting} or sampling.max_new_tokens."
        )


def generate(
    policy,  # noqa: ANN001
    prompts: list[list[int]],
    s: SamplingConfig,
    seed: int = 0,
    group: torch.Tensor | None = None,
    seeds: list[int] | None = None,
    logp_temperature: float = 1.0,
) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups) and return the Rollout with its trace (a
    ``CanvasRollout`` for a renoising policy). The trace's log-probs are log softmax(logits / ``logp_temperature``)
    of the committed tokens (``config.logp_temperature``: 1, the model's own; a renoising policy records those of
    its temperature schedule and takes only 1).

    Sequences are decoded ``s.batch_size`` at a time. Each draws its random numbers from its own stream:
    ``seeds`` [N] (e.g. ``seeding.sample_seed`` of each sample), or ``seeding.row_seeds(seed, N)``. A sequence's
    draws do not depend on the other sequences; its arithmetic may, in the last bits (kernels chosen by batch
    shape), so the same prompts in the same batches give the same tokens.
    """
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if renoising(policy):
        if logp_temperature != 1.0:
            raise ValueError("a renoising policy records the log-probs of its own temperature schedule")
        check_positions(policy, max(len(p) for p in prompts), s)
        seeds = list(seeds) if seeds is not None else sample_seeds(seed, len(prompts))
        group = group if group is not None else torch.arange(len(prompts))
        parts = [
            sample_canvas(policy, prompts[lo : lo + s.batch_size], s, seed + lo, group[lo : lo + s.batch_size],
                          seeds=seeds[lo : lo + s.batch_size])
            for lo in range(0, len(prompts), s.batch_size)
        ]  # fmt: skip
        if len(parts) == 1:
            return parts[0]
        joined = CanvasRollout.concat(parts)
        joined.group = group.clone()
        return joined
    check_compatible(policy, s)
    check_device(s, policy.device.type)
    mode = resolve_cache(policy, s)
    check_positions(policy, max(len(p) for p in prompts), s)
    seeds = list(seeds) if seeds is not None else row_seeds(seed, len(prompts))
    if len(seeds) != len(prompts):
        raise ValueError(f"generate() got {len(seeds)} seeds for {len(prompts)} prompts (one per sequence)")
    streams = RowStreams(seeds, next(policy.model.parameters()).device)
    group = group if group is not None else torch.arange(len(prompts))
    shards = []
    for lo in range(0, len(prompts), s.batch_size):
        rows = slice(lo, lo + s.batch_size)
        chunk, grp, noise = prompts[rows], group[rows], streams.select(rows)
        if policy.block_size is not None:
            shards.append(sample_block(policy, chunk, s, noise, cache=mode == "kv", group=grp,
                                       logp_temperature=logp_temperature))  # fmt: skip
        else:
            shards.append(
                sample_full(policy, chunk, s, noise, cache=mode, group=grp, logp_temperature=logp_temperature)
            )
    if len(shards) == 1:
        return shards[0]
    out = Rollout.concat(shards)
    out.group = group.clone()
    return out
