"""DiffusionGemma: a renoising canvas diffusion model (DESIGN §18), loaded as transformers'
``DiffusionGemmaForBlockDiffusion``.

Generation is autoregressive over canvases of ``canvas_length`` tokens: a causal encoder turns everything before
the canvas into a key/value cache, and a bidirectional decoder denoises the canvas against it, reading the
current canvas plus the previous step's logits as soft embeddings (self-conditioning). The encoder and decoder
share their layers; the decoder owns a self-conditioning MLP. Only the text path is used: a checkpoint's vision
tower is kept (so the model saves and loads whole) but frozen, and prompts holding image tokens are refused.

``CanvasPolicy`` exposes the two calls a sampler and a learner need, each through the model's own modules and
mask builders, exactly as ``DiffusionGemmaForBlockDiffusion.generate`` makes them: ``encode`` (context → cache)
and ``denoise`` (canvas, self-conditioning, cache → logits).

dims: N rows · T context tokens · C canvas length · H hidden · V vocab
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DynamicCache

from tracerl.config import ConfigError, ModelConfig, TinyModelConfig
from tracerl.models.families import (
    _check_tokenizer,
    _dtype,
    _from_pretrained,
    _raw_config,
    _tokenizer,
    check_family,
    register_family,
)
from tracerl.models.tiny import char_tokenizer

FAMILY = "diffusion_gemma"
ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"

# A vision tower of the smallest shape transformers builds (~1.3k parameters): the default Gemma 4 vision config
# alone is ~167M parameters, and text RL never runs it.
TINY_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=4,
    patch_size=4,
    pooling_kernel_size=1,
    position_embedding_size=16,
)


# google/diffusiongemma-26B-A4B-it's text config as published on the hub (model_type diffusion_gemma,
# DiffusionGemmaForBlockDiffusion, canvas_length 256; read from the hub config as quoted in public test fixtures,
# e.g. a NeMo-style model summary test of "google/diffusiongemma-26B-A4B-it"); its generation_config.json gives
# max_denoising_steps 48, entropy_bound 0.1, t_max 0.8, t_min 0.4, stability 1, confidence 0.005, EOS [1, 106, 50],
# pad 0 (tracerl's sampling.canvas defaults). The vision tower keeps transformers' Gemma 4 default.
RELEASED_TEXT = dict(
    vocab_size=262_144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    sliding_window=1024,
    max_position_embeddings=262_144,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
    use_bidirectional_attention="vision",
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
RELEASED_CANVAS = 256
RELEASED_EOS = [1, 106, 50]


def released_config(num_layers: int | None = None, vision: bool = True) -> DiffusionGemmaConfig:
    """The released 26B-A4B configuration, optionally with its first ``num_layers`` layers only (random-weight
    measurements that must fit one GPU) and the tiny vision tower instead of the Gemma 4 one."""
    text = dict(RELEASED_TEXT)
    if num_layers is not None:
        text["num_hidden_layers"] = num_layers
        text["layer_types"] = text["layer_types"][:num_layers]
        text["layer_types"][-1] = "full_attention"
    return DiffusionGemmaConfig(
        text_config=text, vision_config=None if vision else dict(TINY_VISION), canvas_length=RELEASED_CANVAS
    )


def tiny_config(cfg: TinyModelConfig, vocab_size: int, pad_id: int, eos_id: int) -> DiffusionGemmaConfig:
    """A DiffusionGemma of tiny shape: ``cfg.num_layers`` layers alternating sliding and full attention (the
    last is full, as in the released model), a MoE of ``cfg.num_experts`` experts (top ``cfg.top_k_experts``)
    beside the dense MLP, and the tiny vision tower."""
    head_dim = cfg.hidden_size // cfg.num_heads
    layers = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_layers)]
    layers[-1] = "full_attention"
    text = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=max(1, cfg.num_heads // 2),
        head_dim=head_dim,
        global_head_dim=head_dim,
        num_global_key_value_heads=max(1, cfg.num_heads // 2),
        num_experts=cfg.num_experts,
        top_k_experts=cfg.top_k_experts,
        moe_intermediate_size=cfg.moe_intermediate_size,
        sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_types=layers,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    return DiffusionGemmaConfig(text_config=text, vision_config=dict(TINY_VISION), canvas_length=cfg.canvas_length)


def build_tiny_diffusion_gemma(cfg: TinyModelConfig, seed: int = 0) -> tuple[nn.Module, Any]:
    """A randomly initialised tiny DiffusionGemma and its char tokenizer (the generation config names its EOS
    and pad tokens, so ``generate`` and tracerl's sampler stop at the same EOS)."""
    tok = char_tokenizer(cfg.alphabet)
    config = tiny_config(cfg, len(tok), tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def freeze_vision(model: nn.Module) -> None:
    """Text RL never runs the vision tower: no gradients and no optimizer state for it."""
    encoder = model.model.encoder
    for part in (encoder.vision_tower, encoder.embed_vision):
        part.requires_grad_(False)


class CanvasPolicy:
    """A renoising canvas diffusion policy (DiffusionGemma) for the canvas sampler and the canvas learner.

    Attributes mirror ``DiffusionPolicy`` where they mean the same (``family``, ``eos_id``, ``pad_id``,
    ``vocab_size``, ``model``, ``tokenizer``); ``canvas_length`` and ``eos_ids`` (every token that ends a
    sequence) are its own. It has no mask token: a canvas starts as uniform random tokens.
    """

    trajectory = "renoising"  # the samplers' dispatch: not an absorbing-mask model
    family = FAMILY
    mask_id = -1  # no mask token (kept for the fields rollout actors report)
    block_size = None
    shift = False
    supports_cache = True

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # Makes parameters whole while code outside their module's forward reads them (the learner sets
        # DeepSpeed's GatheredParameters under ZeRO-3, where a parameter is a shard between forwards).
        self.gather: Any = lambda params: contextlib.nullcontext()
        config = model.config
        text = config.text_config
        self.canvas_length = int(config.canvas_length)
        self.vocab_size = int(text.vocab_size)
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else text.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
        self.eos_id = self.eos_ids[0]
        pad = gen.pad_token_id if gen.pad_token_id is not None else text.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.pad_token_id)
        self.image_ids = tuple(
            int(t) for t in (config.image_token_id, config.boi_token_id, config.eoi_token_id) if t is not None
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.decoder.embed_tokens.weight.dtype

    def new_cache(self) -> DynamicCache:
        """An empty encoder cache (``generate``'s default: dynamic, sliding layers keep their window)."""
        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def check_text(self, ids: torch.Tensor) -> None:
        """Refuse image inputs: this family trains the text path only."""
        if self.image_ids and bool(torch.isin(ids, torch.tensor(self.image_ids, device=ids.device)).any()):
            raise ConfigError(
                f"a prompt holds image tokens (ids {list(self.image_ids)}): model.family={FAMILY} is trained on "
                "text only in tracerl (the vision tower is kept frozen and never run). Remove the images from the "
                "prompts (or their placeholders from the chat template)."
            )

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> None:
        """Run the causal encoder over ``input_ids`` [N, T] (the tokens not yet in ``cache``), writing their
        keys/values into ``cache``. ``attention_mask`` [N, cached + T] bool covers every column so far."""
        encoder = self.model.model.encoder
        dummy = torch.empty((input_ids.shape[0], input_ids.shape[1], 0), dtype=self.dtype, device=input_ids.device)
        masks = encoder.create_masks_for_generate(
            config=self.model.config,
            inputs_embeds=dummy,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        encoder(input_ids=input_ids, attention_mask=masks, cache=cache, position_ids=position_ids)

    def decoder_masks(self, canvas: torch.Tensor, cache: Any, attention_mask: torch.Tensor) -> dict:
        """The decoder's attention masks for a canvas [N, C] over ``cache`` + itself (``attention_mask``
        [N, cached + C]), built once per canvas as ``generate`` does."""
        return self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            cache=cache,
            decoder_attention_mask=attention_mask,
        )

    def decoder_hidden(
        self,
        canvas: torch.Tensor,
        cache: Any,
        masks: dict,
        position_ids: torch.Tensor,
        self_conditioning_logits: torch.Tensor | None = None,
        self_conditioning_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N, C, H] final hidden states of the decoder for ``canvas`` [N, C] (the LM head is ``head``).

        Self-conditioning is given either as the previous step's processed logits [N, C, V] (what ``generate``
        passes) or as the soft embeddings the decoder computes from them [N, C, H] (``soft_embeddings``; the
        learner keeps these as part of the state); neither means the first step (a zero signal).
        """
        inject = self._inject(self_conditioning_embeds) if self_conditioning_embeds is not None else None
        with inject or contextlib.nullcontext():
            out = self.model.model(
                decoder_input_ids=canvas,
                self_conditioning_logits=self_conditioning_logits,
                decoder_attention_mask=masks,
                cache=cache,
                decoder_position_ids=position_ids,
            )
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., V] float32 logits: the LM head, then the final soft-capping (as the model's own forward)."""
        cap = self.model.final_logit_softcapping
        logits = self.model.lm_head(hidden).to(torch.float32)
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    def denoise(
        self, canvas: torch.Tensor, cache: Any, masks: dict, position_ids: torch.Tensor, **sc: Any
    ) -> torch.Tensor:
        """[N, C, V] float32 logits (before any temperature) for ``canvas`` [N, C]; ``sc`` as ``decoder_hidden``."""
        return self.head(self.decoder_hidden(canvas, cache, masks, position_ids, **sc))

    def soft_embeddings(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, C, H] the self-conditioning signal the decoder computes from processed logits [N, C, V]:
        softmax (fp32) · embedding matrix · embedding scale, in the embedding dtype (as the decoder does)."""
        embed = self.model.model.decoder.embed_tokens
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(embed.weight.dtype)
        with self.gather([embed.weight]):  # read outside the embedding's own forward: whole under ZeRO-3
            return torch.matmul(probs, embed.weight) * embed.embed_scale.to(embed.weight.dtype)

    @contextlib.contextmanager
    def _inject(self, embeds: torch.Tensor) -> Iterator[None]:
        """Hand ``embeds`` to the decoder's self-conditioning module in place of the zero signal it gets when no
        logits are passed (a forward pre-hook: the rest of the forward is transformers' own)."""

        def hook(module: nn.Module, args: tuple) -> tuple:
            del module
            return (args[0], embeds.to(args[0].dtype))

        handle = self.model.model.decoder.self_conditioning.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _not_diffusion_gemma(cfg: ModelConfig, raw: dict) -> ConfigError:
    """The error for a checkpoint that is not a DiffusionGemma text diffusion model (vision-only, AR, other)."""
    model_type = str(raw.get("model_type"))
    what = f"model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}"
    vision = "vision" in model_type or any("vision" in a.lower() for a in raw.get("architectures") or [])
    kind = "a vision-only model" if vision else "a checkpoint that is not a DiffusionGemma checkpoint"
    return ConfigError(
        f"model.path '{cfg.path}' holds {kind} ({what}), but model.family={FAMILY} loads "
        f"{ARCHITECTURE} checkpoints (model_type 'diffusion_gemma', e.g. google/diffusiongemma-26B-A4B-it). Point "
        "model.path at a DiffusionGemma checkpoint, or set model.family to the family this one was trained as."
    )


@register_family(FAMILY)
def load_diffusion_gemma(cfg: ModelConfig) -> CanvasPolicy:
    """DiffusionGemma through transformers' ``DiffusionGemmaForBlockDiffusion`` (text only: the vision tower is
    loaded, so the model saves whole, and frozen); a random tiny one from ``model.tiny`` without a path."""
    if cfg.path is None:
        model, tok = build_tiny_diffusion_gemma(cfg.tiny)
        model.to(_dtype(cfg))
    else:
        raw = _raw_config(cfg)
        check_family(cfg, raw)  # another family's checkpoint is named, with the fix
        if raw.get("model_type") != "diffusion_gemma":
            raise _not_diffusion_gemma(cfg, raw)
        if cfg.trust_remote_code:
            raise ConfigError(
                f"model.trust_remote_code=true: model.family={FAMILY} loads transformers' own "
                f"{ARCHITECTURE}, never a checkpoint's code; set model.trust_remote_code=false."
            )
        model = _from_pretrained(DiffusionGemmaForBlockDiffusion, cfg)
        tok = _tokenizer(cfg)
        _check_tokenizer(tok, cfg, int(model.config.text_config.vocab_size))
    freeze_vision(model)
    return CanvasPolicy(model.eval(), tok)
