"""The renoising canvas sampler (DiffusionGemma, DESIGN §18), recording the trajectory it takes.

It makes the calls ``DiffusionGemmaForBlockDiffusion.generate`` makes, in the same order, so with the same noise
it returns the same sequences: per canvas, one encoder pass over the tokens not yet cached; then up to
``max_denoising_steps`` decoder steps, step j at temperature τ_j = t_min + (t_max − t_min)·(S − j)/S:

1. logits of the current canvas x_j given the cache and the self-conditioning input (the previous step's
   processed logits; none at the first step); processed = logits / τ_j;
2. a denoiser canvas x̃ ~ softmax(processed) (argmax when greedy);
3. accept the lowest-entropy positions whose entropies sum, minus their largest, to at most ``entropy_bound``;
   x_{j+1} = x̃ on them and fresh uniform tokens everywhere else (renoising);
4. adaptive stopping: a row stops once its argmax canvas is stable for ``stability_threshold`` steps and the
   mean entropy is below ``confidence_threshold``; a stopped row keeps its canvas and self-conditioning.

The argmax canvas of the last step is appended; tokens after an EOS become pad and a finished sequence gets no
more canvases. The record keeps, per canvas and step, what the learner needs to replay the step: the input
canvas, the accepted positions and tokens, their fp32 log-probs under the step's processed logits, and τ_j.

Noise: ``batch`` draws one stream for the whole batch in generate's order (equal to ``generate`` after
``torch.manual_seed(seed)``); ``sample`` gives each sample its own stream and draws only for its live steps, so a
sample's trajectory does not depend on the rest of its batch (equal to ``generate`` on that prompt alone).

dims: N samples · Lp prompt width · K canvases · S steps · C canvas length · V vocab
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Protocol

import torch

from tracerl.config import CanvasSamplingConfig, ConfigError, SamplingConfig
from tracerl.records import CanvasRollout


class CanvasNoise(Protocol):
    """Where the sampler's randomness comes from (the environment's noise and the policy's draws)."""

    def uniform(self, rows: torch.Tensor, length: int, vocab: int) -> torch.Tensor:
        """[N, length] uniform tokens; rows [N] bool: which rows draw (the others are left 0)."""
        ...

    def categorical(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[N, C] one token per position from probs [N, C, V]; rows [N] bool as above."""
        ...


class BatchNoise:
    """One generator for the batch; every row draws at every call, as ``generate`` does with the global RNG."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def uniform(self, rows: torch.Tensor, length: int, vocab: int) -> torch.Tensor:
        shape = (rows.shape[0], length)
        return torch.randint(0, vocab, shape, generator=self.generator, device=self.device)

    def categorical(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        n, c, v = probs.shape
        return torch.multinomial(probs.view(-1, v), num_samples=1, generator=self.generator).view(n, c)


class SampleNoise:
    """One generator per sample, drawn only for the rows that are live, so each sample's draws are those of
    ``generate`` on its prompt alone."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device = device

    def uniform(self, rows: torch.Tensor, length: int, vocab: int) -> torch.Tensor:
        out = torch.zeros((len(self.generators), length), dtype=torch.long, device=self.device)
        for i in rows.nonzero().flatten().tolist():
            out[i] = torch.randint(0, vocab, (1, length), generator=self.generators[i], device=self.device)[0]
        return out

    def categorical(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        n, c, v = probs.shape
        out = torch.zeros((n, c), dtype=torch.long, device=probs.device)
        for i in rows.nonzero().flatten().tolist():
            out[i] = torch.multinomial(probs[i], num_samples=1, generator=self.generators[i]).view(c)
        return out


def sample_seeds(seed: int, n: int) -> list[int]:
    """One noise seed per sample of a sampler call (``noise=sample``)."""
    return [(seed * 1_000_003 + i) % 2**63 for i in range(n)]


def temperature(step: int, s: CanvasSamplingConfig) -> torch.Tensor:
    """τ of the denoising step counted ``step`` from the end (S … 1), computed as transformers'
    ``LinearTemperatureScheduleLogitsProcessor`` does (float32: t_min + (t_max − t_min) · step / S).

    Example:
        >>> s = CanvasSamplingConfig(max_denoising_steps=4, t_min=0.4, t_max=0.8)
        >>> [round(float(temperature(k, s)), 6) for k in (4, 3, 2, 1)]
        [0.8, 0.7, 0.6, 0.5]
    """
    ratio = torch.tensor(step, dtype=torch.int32) / s.max_denoising_steps
    return s.t_min + (s.t_max - s.t_min) * ratio


def accept_lowest_entropy(processed: torch.Tensor, bound: float) -> torch.Tensor:
    """[N, C] bool: the lowest-entropy positions with Σ entropy − max entropy ≤ ``bound`` (the entropy-bounded
    sampler, arXiv 2505.24857; the lowest one is always accepted). processed [N, C, V]."""
    entropy = torch.distributions.Categorical(logits=processed).entropy()
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    keep = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.scatter(torch.zeros_like(keep), -1, order, keep)


class StableAndConfident:
    """Adaptive stopping as transformers' ``StableAndConfidentStoppingCriteria``: the argmax canvas equal over
    the last ``stability`` steps and the mean entropy of the processed logits below ``confidence``."""

    def __init__(self, stability: int, confidence: float) -> None:
        self.stability, self.confidence = stability, confidence
        self.history: torch.Tensor | None = None

    def __call__(self, argmax: torch.Tensor, processed: torch.Tensor) -> torch.Tensor:
        if self.stability == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        entropy = torch.distributions.Categorical(logits=processed).entropy()
        return stable & (entropy.mean(-1) < self.confidence)


def check_canvas_sampling(policy, s: SamplingConfig) -> None:  # noqa: ANN001
    """Settings of the canvas sampler are valid and fit this checkpoint.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    c = s.canvas
    if c.canvas_length is not None and c.canvas_length != policy.canvas_length:
        raise ConfigError(
            f"sampling.canvas.canvas_length={c.canvas_length} but the model's canvas_length is "
            f"{policy.canvas_length} (the config.json at model.path, or model.tiny.canvas_length when model.path is "
            "unset); the decoder denoises canvases of that size. "
            f"Set sampling.canvas.canvas_length={policy.canvas_length} or leave it unset (null)."
        )
    if c.max_denoising_steps < 1:
        raise ConfigError(f"sampling.canvas.max_denoising_steps must be ≥ 1, got {c.max_denoising_steps}.")
    if not c.entropy_bound > 0:
        raise ConfigError(f"sampling.canvas.entropy_bound must be > 0, got {c.entropy_bound}.")
    if not 0 <= c.t_min < c.t_max < math.inf:
        raise ConfigError(
            f"sampling.canvas needs 0 ≤ t_min < t_max, both finite (the temperature falls from t_max to t_min); got "
            f"t_min={c.t_min}, t_max={c.t_max}."
        )
    if (c.stability_threshold is None) != (c.confidence_threshold is None):
        raise ConfigError(
            "adaptive stopping needs both sampling.canvas.stability_threshold and confidence_threshold (or both "
            f"null to turn it off); got {c.stability_threshold} and {c.confidence_threshold}."
        )
    if c.stability_threshold is not None and (c.stability_threshold < 0 or not c.confidence_threshold > 0):
        raise ConfigError(
            "sampling.canvas.stability_threshold must be ≥ 0 and confidence_threshold > 0; got "
            f"{c.stability_threshold} and {c.confidence_threshold}."
        )
    if s.temperature not in (0.0, 1.0):
        raise ConfigError(
            f"sampling.temperature={s.temperature}: model.family=diffusion_gemma samples at the temperatures of "
            "its schedule (sampling.canvas.t_max → t_min); sampling.temperature may only be 1 (sample the denoiser "
            "canvas) or 0 (take its argmax, greedy)."
        )


@torch.no_grad()
def sample_canvas(
    policy,  # noqa: ANN001
    prompts: list[list[int]],
    s: SamplingConfig,
    seed: int = 0,
    group: torch.Tensor | None = None,
    seeds: list[int] | None = None,
) -> CanvasRollout:
    """Generate with the renoising canvas sampler and record the trajectory (see the module docstring).

    Args:
        policy: a ``CanvasPolicy``.
        prompts: token ids, one list per sample (left-padded together, as ``generate`` takes them).
        s: ``s.canvas`` holds the sampler's settings; ``s.max_new_tokens`` rounds up to whole canvases;
            ``s.temperature`` 0 takes the argmax denoiser canvas (greedy).
        seed: the batch stream's seed (``noise=batch``), or the base of per-sample seeds.
        seeds: per-sample noise seeds (``noise=sample``); default ``sample_seeds(seed, N)``.
    """
    check_canvas_sampling(policy, s)
    c, device = s.canvas, policy.device
    n, length, vocab = len(prompts), policy.canvas_length, policy.vocab_size
    steps, greedy = c.max_denoising_steps, s.temperature == 0.0
    lp = max(len(p) for p in prompts)
    input_ids = torch.full((n, lp), policy.pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((n, lp), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, lp - len(p) :] = torch.tensor(p, device=device)
        attention[i, lp - len(p) :] = True
    policy.check_text(input_ids)
    num_canvases = math.ceil(s.max_new_tokens / length)
    noise: CanvasNoise = (
        BatchNoise(seed, device) if c.noise == "batch" else SampleNoise(seeds or sample_seeds(seed, n), device)
    )
    stopper = (
        StableAndConfident(c.stability_threshold, c.confidence_threshold)
        if c.stability_threshold is not None and c.confidence_threshold is not None
        else None
    )
    eos = torch.tensor(policy.eos_ids, device=device)
    rec = _Recorder(n, num_canvases, steps, length, device)
    taus = torch.stack([temperature(k, c) for k in range(steps, 0, -1)])  # [S] τ of step j (0-based)

    cache = policy.new_cache()
    cur = lp
    finished = torch.zeros(n, dtype=torch.bool, device=device)  # sequence ended at an EOS of an earlier canvas
    new_ids = input_ids
    positions = torch.arange(0, lp, device=device).unsqueeze(0)
    for k in range(num_canvases):
        # 1. encode what the cache lacks: the prompt, then each finished canvas
        policy.encode(new_ids, attention, positions, cache)
        attention = torch.nn.functional.pad(attention, (0, length), value=True)
        dec_positions = torch.arange(cur, cur + length, device=device).unsqueeze(0)
        live_seq = ~finished
        canvas = noise.uniform(live_seq if c.noise == "sample" else torch.ones_like(live_seq), length, vocab)
        masks = policy.decoder_masks(canvas, cache, attention)
        argmax = canvas
        sc_logits = None
        stopped = torch.zeros(n, dtype=torch.bool, device=device)
        if stopper is not None:
            stopper.history = None
        # 2. denoise: steps counted S … 1 (the remaining steps), τ falling from t_max
        for j in range(steps):
            live = live_seq & ~stopped
            draw = live if c.noise == "sample" else torch.ones_like(live)
            logits = policy.denoise(canvas, cache, masks, dec_positions, self_conditioning_logits=sc_logits)
            processed = logits / taus[j]
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            denoiser = processed.argmax(-1) if greedy else noise.categorical(probs, draw)
            new_argmax = torch.argmax(processed, dim=-1)
            accepted = accept_lowest_entropy(processed, c.entropy_bound)
            renoise = noise.uniform(draw, length, vocab)
            new_canvas = torch.where(accepted, denoiser, renoise)
            logp = torch.log_softmax(processed.float(), dim=-1).gather(-1, denoiser.unsqueeze(-1)).squeeze(-1)
            rec.step(k, j, canvas, accepted, denoiser, logp, live)
            if stopper is not None:
                if stopped.any():  # a stopped row keeps what it had
                    new_argmax = torch.where(stopped[:, None], argmax, new_argmax)
                    new_canvas = torch.where(stopped[:, None], canvas, new_canvas)
                    processed = torch.where(stopped[:, None, None], sc_logits, processed)
                stopped = stopped | stopper(new_argmax, processed)
            canvas, argmax = new_canvas, new_argmax
            sc_logits = processed.to(policy.dtype)
            if bool(stopped.all()):
                break
        # 3. append the argmax canvas; pad after EOS; a sequence with an EOS gets no more canvases
        rec.canvas_done(k, argmax, live_seq)
        block = argmax.clone()
        block[finished] = policy.pad_id
        is_eos = torch.isin(block, eos)
        ends_here = is_eos.any(-1) & ~finished
        seen = is_eos.cumsum(-1)
        after = (seen > 0) & ~((seen == 1) & is_eos)
        block[after & ends_here[:, None]] = policy.pad_id
        rec.response[:, k * length : (k + 1) * length] = block
        finished = finished | ends_here
        if bool(finished.all()):
            break
        new_ids, positions = block, dec_positions
        cur += length
    return rec.rollout(policy, prompts, input_ids, lp, taus, s, seed, group)


class _Recorder:
    """Accumulates the trajectory while ``sample_canvas`` runs (on the sampler's device)."""

    def __init__(self, n: int, k: int, s: int, c: int, device: torch.device) -> None:
        self.canvases = torch.zeros((n, k, s, c), dtype=torch.long, device=device)
        self.accepted = torch.zeros((n, k, s, c), dtype=torch.bool, device=device)
        self.tokens = torch.zeros((n, k, s, c), dtype=torch.long, device=device)
        self.logp = torch.zeros((n, k, s, c), dtype=torch.float32, device=device)
        self.step_valid = torch.zeros((n, k, s), dtype=torch.bool, device=device)
        self.canvas_valid = torch.zeros((n, k), dtype=torch.bool, device=device)
        self.response = torch.zeros((n, k * c), dtype=torch.long, device=device)
        self.last_accept = torch.full((n, k, c), -1, dtype=torch.long, device=device)  # step a position last settled

    def step(
        self,
        k: int,
        j: int,
        canvas: torch.Tensor,
        accepted: torch.Tensor,
        tokens: torch.Tensor,
        logp: torch.Tensor,
        live: torch.Tensor,
    ) -> None:
        rows = live[:, None]
        self.canvases[:, k, j] = canvas
        self.accepted[:, k, j] = accepted & rows
        self.tokens[:, k, j] = torch.where(accepted & rows, tokens, 0)
        self.logp[:, k, j] = torch.where(accepted & rows, logp, 0.0)
        self.step_valid[:, k, j] = live
        self.last_accept[:, k] = torch.where(accepted & rows, j, self.last_accept[:, k])

    def canvas_done(self, k: int, argmax: torch.Tensor, live_seq: torch.Tensor) -> None:
        self.canvas_valid[:, k] = live_seq

    def rollout(self, policy, prompts, input_ids, lp, taus, s, seed, group) -> CanvasRollout:  # noqa: ANN001
        n = len(prompts)
        k_used = int(self.canvas_valid.any(0).sum()) if self.canvas_valid.any() else 1
        steps_used = int(self.step_valid.any(0).any(0).nonzero().max()) + 1 if self.step_valid.any() else 1
        c = self.canvases.shape[-1]
        cut = slice(0, k_used)
        response = self.response[:, : k_used * c].cpu()
        prompt_mask = torch.zeros((n, lp), dtype=torch.bool)
        for i, p in enumerate(prompts):
            prompt_mask[i, lp - len(p) :] = True
        canvas_valid = self.canvas_valid[:, cut].cpu()
        positions_valid = canvas_valid.repeat_interleave(c, dim=1)
        is_eos = torch.isin(response, torch.tensor(policy.eos_ids)) & positions_valid
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full((n,), response.shape[1]))
        idx = torch.arange(response.shape[1]).expand(n, -1)
        response_mask = (idx <= first[:, None]) & positions_valid
        # per position: the step (counted per sequence over its canvases) at which it last settled
        steps_per_canvas = self.step_valid[:, cut].sum(-1).cpu()  # [N, K]
        before = torch.cumsum(steps_per_canvas, dim=1) - steps_per_canvas
        last = self.last_accept[:, cut].cpu()
        settled = torch.where(last >= 0, last, (steps_per_canvas - 1).clamp(min=0)[:, :, None].expand_as(last))
        step_map = torch.where(
            canvas_valid[:, :, None], settled + before[:, :, None], torch.full_like(settled, -1)
        ).reshape(n, -1)
        texts = []
        for i in range(n):
            ids = response[i][: int(first[i])][positions_valid[i][: int(first[i])]].tolist()
            texts.append(policy.tokenizer.decode(ids, skip_special_tokens=True))
        sampler = asdict(s) | {"pad_id": policy.pad_id, "eos_id": policy.eos_id, "eos_ids": list(policy.eos_ids)}
        sampler["canvas"]["canvas_length"] = c
        sampler["seed"] = seed
        return CanvasRollout(
            prompt_ids=input_ids.cpu(),
            prompt_mask=prompt_mask,
            position_offset=(~prompt_mask).sum(-1),
            response_ids=response,
            response_mask=response_mask,
            step_map=step_map,
            canvases=self.canvases[:, cut, :steps_used].cpu(),
            accepted=self.accepted[:, cut, :steps_used].cpu(),
            accepted_ids=self.tokens[:, cut, :steps_used].cpu(),
            rollout_logp=self.logp[:, cut, :steps_used].cpu(),
            step_valid=self.step_valid[:, cut, :steps_used].cpu(),
            canvas_valid=canvas_valid,
            temperature=taus[:steps_used].float().cpu(),
            group=group if group is not None else torch.arange(n),
            sampler=sampler,
            texts=texts,
            truncated=~is_eos.any(-1),
        )
