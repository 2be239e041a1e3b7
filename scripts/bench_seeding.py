"""What per-sample random streams cost: the sampler with ``tracerl.seeding`` (each sequence draws from its own
counter-based stream, one uniform per position, inverse-CDF candidates) against the single shared generator it
replaced (one ``torch.rand`` over [N, B, V] per step, Gumbel-max), measured in one run on the same models.

    python scripts/bench_seeding.py            # a table
    python scripts/bench_seeding.py --json     # one JSON object

Rows:
- ``candidates``: the candidate draw alone at one denoising step, N sequences × B positions × V vocabulary;
- ``generate``: a whole ``sampling.generate`` of the tiny block model (static KV cache), tokens/s.
Ratios are per-row streams / single generator (below 1: the streams are faster). CPU seconds of this process
are the figure used (steadier than wall clock on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator

import torch

import tracerl.sampling.core as core
from tracerl.config import ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.models import load_policy
from tracerl.sampling import generate
from tracerl.sampling.core import Candidates, StepNoise, filter_logits
from tracerl.seeding import RowStreams, row_seeds


def shared_generator_candidates(generator: torch.Generator) -> Callable[..., Candidates]:
    """The candidate draw as it was: Gumbel-max over [N, B, V] noise from one generator shared by the batch."""

    def sample(logits: torch.Tensor, s: SamplingConfig, mask_id: int, noise: object) -> Candidates:
        del noise
        logits = logits.float()
        logp_all = torch.log_softmax(logits, dim=-1)
        scores = logits.clone()
        scores[..., mask_id] = float("-inf")
        scores = filter_logits(scores / s.temperature, s.top_k, s.top_p)
        probs = torch.softmax(scores, dim=-1)
        u = torch.rand(scores.shape, generator=generator)
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
        tokens = (torch.log(probs) + gumbel).argmax(-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        return Candidates(
            tokens=tokens,
            confidence=probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
            entropy=entropy,
            logp=logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        )

    return sample


@contextlib.contextmanager
def shared_generator(seed: int) -> Iterator[None]:
    original = core.sample_candidates
    core.sample_candidates = shared_generator_candidates(torch.Generator().manual_seed(seed))
    try:
        yield
    finally:
        core.sample_candidates = original


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best of ``repeats`` CPU-second timings of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def bench_candidates(n: int, block: int, vocab: int, repeats: int) -> dict[str, float]:
    logits = torch.randn(n, block, vocab, generator=torch.Generator().manual_seed(0)) * 3
    s = SamplingConfig(temperature=1.0)
    noise = StepNoise(RowStreams(row_seeds(0, n)), block=0, step=0, width=block)
    streams = cpu_seconds(lambda: core.sample_candidates(logits, s, 1, noise), repeats)
    single = cpu_seconds(lambda: shared_generator_candidates(torch.Generator().manual_seed(0))(logits, s, 1, None),
                         repeats)  # fmt: skip
    return {"n": n, "block": block, "vocab": vocab, "streams_s": streams, "single_s": single, "ratio": streams / single}


def bench_generate(batch: int, new_tokens: int, hidden: int, repeats: int) -> dict[str, float]:
    cfg = TinyModelConfig(attention="block", hidden_size=hidden, num_layers=4, num_heads=max(1, hidden // 64),
                          intermediate_size=4 * hidden, max_position_embeddings=new_tokens + 64)  # fmt: skip
    policy = load_policy(ModelConfig(tiny=cfg))
    policy.eos_id = -1  # EOS off: every sequence decodes every token
    prompts = [policy.tokenizer(f"{i}+{2 * i}=")["input_ids"] for i in range(batch)]
    s = SamplingConfig(max_new_tokens=new_tokens, block_size=4, temperature=1.0, batch_size=batch)
    tokens = batch * new_tokens
    with torch.inference_mode():
        generate(policy, prompts[:2], s, seed=0)  # warm-up
        streams = cpu_seconds(lambda: generate(policy, prompts, s, seed=0), repeats)
        with shared_generator(0):
            single = cpu_seconds(lambda: generate(policy, prompts, s, seed=0), repeats)
    return {"batch": batch, "new_tokens": new_tokens, "hidden": hidden, "streams_tok_s": tokens / streams,
            "single_tok_s": tokens / single, "ratio": streams / single}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = {
        "candidates": [bench_candidates(n, 4, v, args.repeats) for n, v in ((64, 64), (64, 32_000), (32, 152_000))],
        "generate": [bench_generate(b, t, h, args.repeats) for b, t, h in ((16, 64, 128), (64, 128, 256))],
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print("candidate draw, one step (CPU s): per-row streams vs one shared generator")
    for r in report["candidates"]:
        print(f"  N={r['n']:>3} B={r['block']} V={r['vocab']:>6}  streams {r['streams_s'] * 1e3:8.2f} ms  "
              f"single {r['single_s'] * 1e3:8.2f} ms  ratio {r['ratio']:.2f}")  # fmt: skip
    print("generate, tiny block model (tok/s per CPU second)")
    for r in report["generate"]:
        print(f"  batch {r['batch']:>3} × {r['new_tokens']} tokens, hidden {r['hidden']}  streams "
              f"{r['streams_tok_s']:8.0f}  single {r['single_tok_s']:8.0f}  ratio {r['ratio']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
