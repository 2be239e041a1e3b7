"""Shapes, sizes and helpers of ``scripts/gpu_check.py``: random policies of real shapes built on the device,
a char tokenizer grown to the model's vocabulary, timers that wait for the GPU, peak memory."""

from __future__ import annotations

import gc
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """A decoder's shape (Qwen3 field names in comments)."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim
    intermediate: int  # intermediate_size
    vocab: int  # vocab_size
    tie: bool = True  # tie_word_embeddings


QWEN3_4B = Shape(2560, 36, 32, 8, 128, 9728, 151936)  # Qwen/Qwen3-4B config.json, the base of SDAR-4B
QWEN3_0_6B = Shape(1024, 28, 16, 8, 128, 3072, 151936)  # Qwen/Qwen3-0.6B config.json
TINY = Shape(64, 2, 4, 2, 16, 128, 96)
LLAMA3_8B = Shape(4096, 32, 32, 8, 128, 14336, 128256, tie=False)  # meta-llama/Meta-Llama-3-8B: 8B reward models' base


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the real check or the CPU smoke run."""

    device: str
    dtype: torch.dtype  # of the sampled models
    big: Shape  # sampler + learner model
    small: Shape  # replay + RL-step model
    batch: int = 128
    new_tokens: int = 256
    prompt_tokens: int = 64
    replay_batch: int = 32
    replay_new_tokens: int = 128
    micro_batch_tokens: int = 16384
    rl_prompts: int = 32
    rl_group: int = 4
    rl_new_tokens: int = 256
    rm: Shape = LLAMA3_8B  # the sequence-classification reward model
    rm_samples: int = 128  # completions scored
    rm_tokens: int = 1024  # tokens of each (prompt + completion)
    rm_batch_tokens: int = 32768  # padded tokens per forward (model.batch_tokens)


def make_plan(smoke: bool) -> Plan:
    if smoke:
        return Plan(
            "cpu",
            torch.float32,
            TINY,
            TINY,
            batch=4,
            new_tokens=8,
            prompt_tokens=6,
            replay_batch=4,
            replay_new_tokens=8,
            micro_batch_tokens=128,
            rl_prompts=2,
            rl_group=2,
            rl_new_tokens=8,
            rm=TINY,
            rm_samples=8,
            rm_tokens=32,
            rm_batch_tokens=96,
        )
    return Plan("cuda", torch.bfloat16, QWEN3_4B, QWEN3_0_6B)


# ---------------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock() -> float:
    sync()
    return time.perf_counter()


def peak_memory_gib(device: str) -> float:
    """Peak device memory since the last reset (CUDA), else the process's peak RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vocab_tokenizer(vocab: int) -> Any:
    """tracerl's char tokenizer grown to exactly ``vocab`` ids (the tiny alphabet, then filler characters), so
    every id the model can sample decodes to text."""
    from tracerl.config import TinyModelConfig
    from tracerl.models.tiny import SPECIAL_TOKENS, char_tokenizer

    base = TinyModelConfig().alphabet
    need = vocab - len(SPECIAL_TOKENS) - len(set(base) | {"\n", " "})
    if need < 0:
        raise ValueError(f"vocab {vocab} is smaller than the char tokenizer's own {vocab - need}")
    tok = char_tokenizer(base + "".join(chr(0x10000 + i) for i in range(need)))
    assert len(tok) == vocab, (len(tok), vocab)
    return tok


def build_policy(shape: Shape, plan: Plan, *, block: int | None, seed: int = 0) -> Any:
    """A random decoder of ``shape`` built on the device in the plan's dtype, as a DecoderPolicy: Qwen3 with
    block-causal attention (SDAR) when ``block`` is set, else Llama with full attention (LLaDA)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tracerl.models import DecoderPolicy

    tok = vocab_tokenizer(shape.vocab)
    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        mask_token_id=tok.mask_token_id,
    )
    cls, config = (Qwen3ForCausalLM, Qwen3Config(**common)) if block else (LlamaForCausalLM, LlamaConfig(**common))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(plan.dtype)  # initialise in place on the device: no fp32 copy of a 4B model
    try:
        with torch.device(plan.device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    family = "sdar" if block else "llada"
    return DecoderPolicy(model.eval(), tok, family=family, mask_id=tok.mask_token_id, block_size=block)


def count_calls(policy: Any) -> dict[str, int]:
    """Count the policy's model calls (instance attribute over the method)."""
    stats = {"calls": 0}
    inner = policy.hidden_states

    def hidden_states(*args: Any, **kwargs: Any) -> torch.Tensor:
        stats["calls"] += 1
        return inner(*args, **kwargs)

    policy.hidden_states = hidden_states
    return stats


def random_prompts(policy: Any, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` random non-special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, policy.vocab_size, (n, length), generator=g).tolist()


def sampling(block: int, new_tokens: int, batch: int, cache: str) -> Any:
    from tracerl.config import SamplingConfig

    return SamplingConfig(max_new_tokens=new_tokens, block_size=block, steps_per_block=4, batch_size=batch, cache=cache)


def params(policy: Any) -> int:
    return sum(p.numel() for p in policy.model.parameters())


def learner_config(plan: Plan, *, checkpointing: bool) -> Any:
    from tracerl.config import Config

    cfg = Config()
    cfg.learner.precision = "bf16"
    cfg.learner.zero_stage = 0
    cfg.learner.micro_batch_tokens = plan.micro_batch_tokens
    cfg.learner.gradient_checkpointing = checkpointing
    return cfg


def agreement(a: Any, b: Any) -> dict[str, Any]:
    """How far two rollouts of the same prompts and seed agree: tokens, step maps, log-probs."""
    same = a.response_ids == b.response_ids
    return {
        "tokens_match": bool(same.all()),
        "step_map_match": bool(torch.equal(a.step_map, b.step_map)),
        "token_agreement": float(same.float().mean()),
        "logp_max_abs_diff": float((a.rollout_logp - b.rollout_logp).abs().max()),
    }


def count_captures() -> tuple[dict[str, float], Any]:
    """Count and time the CUDA-graph captures and replays of ``tracerl.sampling.graphs`` until ``restore()``."""
    from tracerl.sampling import graphs

    stats = {"graphs_captured": 0, "capture_s": 0.0, "replays": 0}
    init, call = graphs.CapturedForward.__init__, graphs.CapturedForward.__call__

    def timed_init(self: Any, *args: Any) -> None:
        start = clock()
        init(self, *args)
        stats["capture_s"] += clock() - start
        stats["graphs_captured"] += 1

    def counted_call(self: Any, *args: Any) -> Any:
        stats["replays"] += 1
        return call(self, *args)

    graphs.CapturedForward.__init__, graphs.CapturedForward.__call__ = timed_init, counted_call

    def restore() -> None:
        graphs.CapturedForward.__init__, graphs.CapturedForward.__call__ = init, call

    return stats, restore
