"""The ``diffusion_gemma`` part of ``scripts/gpu_check.py``: tracerl's renoising canvas sampler on a
DiffusionGemma-shaped random model (google/diffusiongemma-26B-A4B-it's released text config, all 30 layers,
bf16, the tiny vision tower), one canvas of 256 tokens, 16 denoising steps (adaptive stopping off: a random model
never becomes confident, so every step runs), at batch 1 and batch 64; tok/s against vLLM's published ≈1,756
tok/s at batch 1 on one H100 in FP8 (256-token canvas, 16 steps), and against transformers' own
``DiffusionGemmaForBlockDiffusion.generate`` at batch 1 measured in the same run. ``--smoke``: a tiny
DiffusionGemma on CPU, batch 1 and 4, 4 steps.
"""

from __future__ import annotations

from typing import Any

import torch
from gpu_check_setup import Plan, clock, free, log, peak_memory_gib, reset_peak, vocab_tokenizer

VLLM_TOK_S = 1756.0  # DiffusionGemma-26B-A4B, batch 1, one H100, FP8, canvas 256, 16 denoising steps
VLLM_SOURCE = "vLLM's published DiffusionGemma figure: ≈1,756 tok/s, batch 1, one H100, FP8, canvas 256, 16 steps"
STEPS = 16
PROMPT_TOKENS = 128


def materialized(cls: Any, config: Any, device: str, dtype: torch.dtype) -> Any:
    """``cls(config)`` built with its parameters on the meta device, then each *distinct* parameter allocated
    once on ``device`` and initialised by the model's own ``_init_weights``. Built directly, the encoder's and
    the decoder's layers are allocated apart and tied afterwards: twice the weights (about 100 GB in bf16 for
    the released shape) at the peak, more than an 80 GB GPU holds."""
    from accelerate import init_empty_weights

    with torch.device(device), init_empty_weights(include_buffers=False):
        model = cls(config)
    model.tie_weights()  # on the meta parameters: the shared ones become one object each
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False
                )
            module._parameters[name] = made[id(param)]
    with torch.no_grad():
        for name, module in model.named_modules():
            if "vision" in name:  # never run here; its rotary buffers are built in __init__ already
                for param in module.parameters(recurse=False):
                    if param.ndim > 1:
                        param.normal_(0.0, 0.02)
                    else:
                        param.fill_(1.0)
            else:
                model._init_weights(module)
    return model.eval().requires_grad_(False)


def build(plan: Plan) -> Any:
    """A random DiffusionGemma policy of the released shape (smoke: tiny) on the plan's device and dtype."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from tracerl.config import TinyModelConfig
    from tracerl.models.diffusion_gemma import CanvasPolicy, released_config, tiny_config

    if plan.device == "cpu":
        tok = vocab_tokenizer(96)
        config = tiny_config(TinyModelConfig(canvas_length=16), 96, tok.pad_token_id, tok.eos_token_id)
    else:
        config = released_config(vision=False)
        tok = vocab_tokenizer(config.text_config.vocab_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(plan.dtype)  # initialise in the target dtype: 25B fp32 parameters would not fit
    try:
        model = materialized(DiffusionGemmaForBlockDiffusion, config, plan.device, plan.dtype)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = -1  # no EOS stop: every sequence decodes its whole canvas
    model.generation_config.pad_token_id = tok.pad_token_id
    return CanvasPolicy(model, tok)


def part_diffusion_gemma(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from tracerl.config import CanvasSamplingConfig, SamplingConfig
    from tracerl.sampling import generate

    log(f"building the DiffusionGemma-shaped model on {plan.device}")
    policy = build(plan)
    c, steps = policy.canvas_length, STEPS if plan.device != "cpu" else 4
    canvas = CanvasSamplingConfig(max_denoising_steps=steps, stability_threshold=None, confidence_threshold=None)
    out: dict[str, Any] = {
        "model": {
            "params": sum(p.numel() for p in policy.model.parameters()),
            "layers": policy.model.config.text_config.num_hidden_layers,
            "experts": policy.model.config.text_config.num_experts,
            "top_k_experts": policy.model.config.text_config.top_k_experts,
            "dtype": str(plan.dtype),
        },
        "canvas_length": c,
        "denoising_steps": steps,
        "prompt_tokens": PROMPT_TOKENS if plan.device != "cpu" else 6,
        "reference_tokens_per_s": VLLM_TOK_S,
        "reference": VLLM_SOURCE,
    }
    g = torch.Generator().manual_seed(1)
    for batch in (1, 64) if plan.device != "cpu" else (1, 4):
        prompts = torch.randint(4, policy.vocab_size, (batch, out["prompt_tokens"]), generator=g).tolist()
        s = SamplingConfig(max_new_tokens=c, batch_size=batch, canvas=canvas)
        generate(policy, prompts[:1], s, seed=0)  # warm-up: kernels, allocator
        reset_peak(plan.device)
        start = clock()
        rollout = generate(policy, prompts, s, seed=0)
        seconds = clock() - start
        tokens = int(rollout.canvas_valid.sum()) * c
        out[f"batch_{batch}"] = {
            "seconds": seconds,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "steps_run": int(rollout.step_valid.sum()),
            "peak_memory_gib": peak_memory_gib(plan.device),
            "ratio_to_reference": tokens / seconds / VLLM_TOK_S,
        }
        free()
    # transformers' own generate at batch 1, same prompt, steps and canvas (the naive way, same run)
    ids = torch.tensor(prompts[:1], device=plan.device)
    kw = dict(max_new_tokens=c, max_denoising_steps=steps, confidence_threshold=1e-30, eos_token_id=-1)
    policy.model.generate(ids, **kw)
    start = clock()
    policy.model.generate(ids, **kw)
    hf = c / (clock() - start)
    out["transformers_generate_batch_1_tokens_per_s"] = hf
    out["ratio_batch_1_to_transformers_generate"] = out["batch_1"]["tokens_per_s"] / hf
    del policy
    free()
    return out
