"""Benchmark: the learner's unit layout for renoising trajectories (one encoder pass per (sample, canvas), all its
denoising steps in one decoder batch) against the naive per-step replay (encoder and decoder again for every
step), forward + backward of the same log-probs, measured in the same run on a tiny DiffusionGemma.

    python scripts/bench_canvas.py [--prompts 16] [--steps 8] [--repeats 3] [--json]

Prints the encoder tokens each way runs (counted), the seconds (median of the repeats) and the ratio, and checks
that both give the same log-probs and gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tracerl.canvas_trace import CanvasScorer, chain_pass, make_units
from tracerl.config import CanvasSamplingConfig, ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.models import load_policy
from tracerl.sampling import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="max denoising steps per canvas")
    parser.add_argument("--canvas", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = TinyModelConfig(canvas_length=args.canvas)
    policy = load_policy(ModelConfig(family="diffusion_gemma", tiny=shape))
    with torch.no_grad():
        policy.model.model.decoder.norm.weight.mul_(10.0)  # peaked logits: several tokens accepted per step
    prompts = torch.randint(4, policy.vocab_size, (args.prompts, args.prompt_tokens)).tolist()
    canvas = CanvasSamplingConfig(max_denoising_steps=args.steps, stability_threshold=None, confidence_threshold=None)
    rollout = generate(policy, prompts, SamplingConfig(max_new_tokens=2 * args.canvas, canvas=canvas), seed=0)
    units = make_units(rollout, policy.pad_id, train_final_step=True)
    _, sc = chain_pass(policy, units)
    scorer = CanvasScorer(policy, 1024)
    r, s, _ = units.canvases.shape

    def units_way() -> torch.Tensor:
        out = scorer(units, sc, units.accepted)[0]
        out.sum().backward()
        return out.detach()

    def per_step_way() -> torch.Tensor:  # every step of every unit on its own: the encoder again each time
        parts = []
        for t in range(s):
            rows = units.step_valid[:, t].nonzero().flatten()
            if not len(rows):
                continue
            one = units.select(rows)
            one.canvases = one.canvases[:, t : t + 1]
            one.step_valid = one.step_valid[:, t : t + 1]
            one.target_mask = one.accepted = one.accepted[:, t : t + 1]
            one.target_ids = one.target_ids[:, t : t + 1]
            one.temperature = units.temperature[t : t + 1]
            out = scorer(one, sc[rows][:, t : t + 1], one.accepted)[0]
            out.sum().backward()
            parts.append((rows, t, out.detach()))
        logp = torch.zeros(units.accepted.shape)
        for rows, t, out in parts:
            block = torch.zeros(units.accepted[rows, t].shape)
            block[units.accepted[rows, t]] = out
            logp[rows, t] = block
        return logp[units.accepted]

    def timed(fn):  # noqa: ANN001, ANN202
        seconds, result, grads = [], None, None
        for _ in range(args.repeats):
            policy.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            result = fn()
            seconds.append(time.perf_counter() - start)
            grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        return statistics.median(seconds), result, grads

    t_units, lp_units, g_units = timed(units_way)
    t_steps, lp_steps, g_steps = timed(per_step_way)
    live = int(units.step_valid.sum())
    context = int(units.context_mask.sum())
    per_unit_context = units.context_mask.sum(-1)
    report = {
        "units": r,
        "live_steps": live,
        "encoder_tokens_units": context,
        "encoder_tokens_per_step": int((per_unit_context * units.step_valid.sum(-1)).sum()),
        "decoder_tokens": live * args.canvas,
        "seconds_units": t_units,
        "seconds_per_step": t_steps,
        "speedup": t_steps / t_units,
        "max_logp_difference": float((lp_units - lp_steps).abs().max()),
        "max_grad_difference_relative": max(
            float((g_units[k] - g_steps[k]).abs().max() / g_units[k].abs().max().clamp(min=1e-30)) for k in g_units
        ),
    }
    report["encoder_token_ratio"] = report["encoder_tokens_per_step"] / report["encoder_tokens_units"]
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
