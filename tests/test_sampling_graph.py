"""``sampling.cuda_graph``: the fixed-shape block step gives what the default cached step gives (CPU), and its
CUDA-graph replay gives what the eager step gives (CUDA only).

Tokens and step maps are compared with ``torch.equal``. Log-probs are compared to 1e-5 (measured: at most
1.2e-6 apart, Qwen3 with q/k norms; 4.8e-7 for the tiny model): the fixed-shape step attends over the cache's
full width, so softmax and attention·V reduce over W columns instead of the valid prefix, and the extra,
exactly-zero terms move where the vectorised reductions split, which changes float rounding
(tests/test_lean_forward.py shows it per forward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import tracerl.models.base as base
import tracerl.sampling.graphs as graphs
from tracerl.config import ConfigError, SamplingConfig
from tracerl.models.base import DecoderPolicy
from tracerl.models.tiny import char_tokenizer
from tracerl.sampling import generate
from tracerl.sampling.block import sample_block
from tracerl.seeding import RowStreams, row_seeds

from .conftest import encode
from .test_sampling import PROMPTS, check_invariants, eos_biased

SHORT = ["1+", "ab", "7"]  # every prompt inside the first block: no complete prompt block (C = 0)
ONE_BLOCK = ["1+2=", "12+34=?", "7*8=9"]  # one complete prompt block each (C = B: the fused prefill is 2B wide)


def forwards_seen(policy, eos_bias: float):  # noqa: ANN001, ANN201
    """``policy`` (a shallow copy) with its EOS logit raised by ``eos_bias``, recording per model forward its
    query width, key width and whether its cache is full width."""
    inner, seen = policy.hidden_states, []

    def hidden_states(input_ids, position_ids, visible, cache=None):  # noqa: ANN001, ANN202
        seen.append((input_ids.shape[1], visible.shape[-1], getattr(cache, "full_width", False)))
        return inner(input_ids, position_ids, visible, cache)

    policy = eos_biased(policy, eos_bias)  # EOS mid-block in some rows: finished rows stay in the batch
    policy.hidden_states = hidden_states
    return policy, seen


def run(policy, prompts, s: SamplingConfig, cache: bool = True, capture: bool | None = None):  # noqa: ANN001, ANN201
    streams = RowStreams(row_seeds(4, len(prompts)), policy.device)
    return sample_block(policy, prompts, s, streams, cache=cache, capture=capture)


def assert_same(a, b, atol: float = 1e-5) -> None:  # noqa: ANN001
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.step_map, b.step_map)
    torch.testing.assert_close(a.rollout_logp, b.rollout_logp, atol=atol, rtol=0)


def compare_paths(policy, prompts: list[list[int]], eos_bias: float = 1.0, **kw) -> None:  # noqa: ANN001
    """Fixed-shape (eager) vs the default cached path vs the uncached reference, fused commits on and off."""
    block = policy.block_size
    for fused in (True, False):
        s = SamplingConfig(block_size=block, fused_commit=fused, **kw)
        watched, seen = forwards_seen(policy, eos_bias)
        fixed = run(watched, prompts, SamplingConfig(**{**s.__dict__, "cuda_graph": True}))
        cached = run(watched, prompts, s)
        plain = run(watched, prompts, s, cache=False)
        assert_same(fixed, cached)
        assert_same(fixed, plain)
        check_invariants(fixed, s.steps_per_block or block)
        assert (plain.step_map < 0).any() and (plain.step_map >= 0).any(), "the test needs an EOS early stop"
        n_fixed = next(i for i, f in enumerate(seen) if not f[2])  # the fixed-shape run's forwards come first
        graph_forwards = seen[:n_fixed]
        width = max(w for _, w, _ in graph_forwards)
        # every forward of the fixed-shape run attends over the full width; after the first (the prompt
        # prefill, any width) every query width is B (a step, an unfused clean write) or 2B (a fused step)
        assert all(full and keys == width for _, keys, full in graph_forwards)
        assert {q for q, _, _ in graph_forwards[1:]} <= {block, 2 * block}
        assert (2 * block in {q for q, _, _ in graph_forwards[1:]}) == fused


@pytest.mark.parametrize("remasking", ["low_confidence_static", "low_confidence_dynamic"])
@pytest.mark.parametrize("prompts", [PROMPTS, SHORT, ONE_BLOCK], ids=["mixed", "short", "one_block"])
def test_fixed_shape_step_equals_the_cached_and_uncached_paths(block_policy, prompts, remasking):
    kw = dict(max_new_tokens=18, remasking=remasking, threshold=0.05, steps_per_block=3)
    compare_paths(block_policy, encode(block_policy, prompts), **kw)


def decoder_policy(kind: str) -> DecoderPolicy:
    """A random block-diffusion policy of each architecture the lean forward takes: Llama, Qwen2 (q/k/v
    biases), Qwen3 (q/k norms, head dim ≠ hidden / heads), all with grouped key/value heads (2 per 4)."""
    tok = char_tokenizer("0123456789+-*=?:#., abcdefghijklmnopqrstuvwxyz")
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    shape |= dict(num_key_value_heads=2, vocab_size=len(tok), rms_norm_eps=1e-5)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=500.0, **shape))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=24, **shape))
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # confident enough that the dynamic threshold commits several at once
    return DecoderPolicy(model.eval(), tok, family="sdar", mask_id=tok.mask_token_id, block_size=4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fixed_shape_step_on_each_lean_architecture(kind):
    policy = decoder_policy(kind)
    assert graphs.graph_capturable(policy.model)
    kw = dict(max_new_tokens=14, remasking="low_confidence_dynamic", threshold=0.3)
    compare_paths(policy, encode(policy, PROMPTS), eos_bias=2.0, **kw)


def test_fixed_shape_step_over_the_transformers_forward(block_policy, monkeypatch):
    """A model the lean forward does not take runs the transformers forward over the same full-width cache
    (eagerly: such a model is refused for capture)."""
    monkeypatch.setattr(base, "lean_supported", lambda model: False)
    kw = dict(max_new_tokens=14, remasking="low_confidence_static", steps_per_block=2)
    compare_paths(block_policy, encode(block_policy, PROMPTS), **kw)


def test_cuda_graph_settings_that_cannot_be_captured_are_refused(block_policy, monkeypatch):
    prompts = encode(block_policy, ["1+2="])
    for bad in (dict(cache="none"), dict(kv_storage="dynamic")):
        with pytest.raises(ConfigError, match="captures the cached block step over the static KV cache"):
            generate(block_policy, prompts, SamplingConfig(max_new_tokens=4, cuda_graph=True, **bad))
    monkeypatch.setattr(graphs, "lean_supported", lambda model: False)
    with pytest.raises(ConfigError, match="runs the transformers forward, .* cannot be captured"):
        generate(block_policy, prompts, SamplingConfig(max_new_tokens=4, cuda_graph=True))
    monkeypatch.undo()
    block_policy.model.model.rotary_emb.rope_type = "dynamic"
    try:
        assert not graphs.graph_capturable(block_policy.model)  # dynamic RoPE compares positions on the host
    finally:
        block_policy.model.model.rotary_emb.rope_type = "default"


def replays_counted(monkeypatch) -> dict[str, int]:  # noqa: ANN001
    """Count graph captures and replays."""
    stats = {"captures": 0, "replays": 0}
    init, call = graphs.CapturedForward.__init__, graphs.CapturedForward.__call__

    def counted_init(self, *args):  # noqa: ANN001, ANN002, ANN202
        stats["captures"] += 1
        init(self, *args)

    def counted_call(self, *args):  # noqa: ANN001, ANN002, ANN202
        stats["replays"] += 1
        return call(self, *args)

    monkeypatch.setattr(graphs.CapturedForward, "__init__", counted_init)
    monkeypatch.setattr(graphs.CapturedForward, "__call__", counted_call)
    return stats


class ReplayedOnCPU(graphs.CapturedForward):
    """What a replay computes, on the CPU: ``fn`` re-run on the graph's own input buffers and written into its
    one output buffer, after the warm-up runs a capture makes (each of them writes the cache too)."""

    def _record(self, fn):  # noqa: ANN001, ANN202
        self.fn = fn
        for _ in range(graphs.WARMUP_RUNS):
            fn(*self.inputs)
        return fn(*self.inputs)

    def _replay(self) -> None:
        self.output.copy_(self.fn(*self.inputs))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("prompts", [PROMPTS, SHORT, ONE_BLOCK], ids=["mixed", "short", "one_block"])
def test_replays_on_the_graphs_own_buffers_give_the_default_rollout(block_policy, monkeypatch, prompts, fused):
    """The capture bookkeeping without a GPU: every forward but the first (it allocates the cache) goes through
    one of two graphs, fed by copies into their input buffers; the warm-ups' repeated cache writes are
    harmless."""
    prompts = encode(block_policy, prompts)
    s = SamplingConfig(max_new_tokens=18, block_size=4, steps_per_block=3, fused_commit=fused)
    default_run, seen = forwards_seen(block_policy, 1.0)
    policy = eos_biased(block_policy, 1.0)  # the same EOS bias, no forward counter (it would count warm-ups)
    default = run(default_run, prompts, s)
    monkeypatch.setattr(graphs, "CapturedForward", ReplayedOnCPU)
    stats = replays_counted(monkeypatch)
    replayed = run(policy, prompts, SamplingConfig(**{**s.__dict__, "cuda_graph": True}), capture=True)
    assert_same(replayed, default)
    assert stats == {"captures": 2, "replays": len(seen) - 1}


# --------------------------------------------------------------------------------------------- CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_graph_replay_equals_the_eager_step(block_policy, monkeypatch, dtype, fused):
    model = copy.deepcopy(block_policy.model).to("cuda", dtype)
    policy = DecoderPolicy(model, block_policy.tokenizer, family="tiny", mask_id=block_policy.mask_id, block_size=4)
    policy = eos_biased(policy, 1.0)
    prompts = encode(policy, PROMPTS)  # the 13-token prompt makes the fused prefill 16 wide: eager
    s = SamplingConfig(max_new_tokens=18, block_size=4, steps_per_block=3, fused_commit=fused, cuda_graph=True)
    stats = replays_counted(monkeypatch)
    eager = run(policy, prompts, s, capture=False)
    assert stats == {"captures": 0, "replays": 0}
    graphed = generate(policy, prompts, s, seed=4)  # check_compatible accepts it on CUDA; capture is on
    assert stats["captures"] == 2  # fused: steps of widths B and 2B; unfused: a B-wide step and clean write
    assert stats["replays"] > 10
    assert_same(graphed, eager, atol=0.0)  # the same kernels on the same shapes: bitwise
    if dtype == torch.float32:  # in bf16 the full-width rounding may flip a near tie against the prefix path
        assert_same(graphed, generate(policy, prompts, SamplingConfig(**{**s.__dict__, "cuda_graph": False}), 4))
    check_invariants(graphed, 3)
