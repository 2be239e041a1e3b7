"""One loader per model family: each turns a checkpoint into a DiffusionPolicy (DESIGN §5).

LLaDA, Dream and SDAR are exactly Llama, Qwen2 and Qwen3 with another attention pattern, so they load into
transformers' own maintained classes; tracerl supplies the attention mask, the logit shift and the cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tracerl.config import ConfigError, ModelConfig
from tracerl.models.base import DecoderPolicy
from tracerl.models.masked_lm import MaskedLMPolicy
from tracerl.models.tiny import build_tiny, char_tokenizer

FAMILIES: dict[str, Callable[[ModelConfig], Any]] = {}

# LLaDA's OLMo-style parameter names → LlamaForCausalLM's (checkpoint keys are prefixed "model.transformer.").
LLADA_KEY_MAPPING = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
}
LLADA_DEFAULT_MASK_ID = 126336


def register_family(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        FAMILIES[name] = fn
        return fn

    return wrap


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return getattr(torch, cfg.dtype)


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def _raw_config(cfg: ModelConfig) -> dict:
    """The checkpoint's config.json as a dict, with a clear error when the path is wrong."""
    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    if _is_local(cfg.path):
        if not path.exists():
            raise ConfigError(
                f"model.path '{cfg.path}' does not exist. Give a local model directory (with config.json) "
                "or a Hugging Face hub name such as 'GSAI-ML/LLaDA-8B-Instruct'."
            )
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path '{cfg.path}' has no config.json: it is not a Hugging Face model directory.")
        return json.loads((path / "config.json").read_text())
    try:
        return PretrainedConfig.get_config_dict(cfg.path)[0]
    except OSError as err:
        raise ConfigError(
            f"could not fetch model '{cfg.path}' from the hub ({err.__class__.__name__}). Check the name and your "
            "network, or download it and set model.path to the local directory."
        ) from None


def _tokenizer(cfg: ModelConfig) -> Any:
    try:
        return AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load the tokenizer from model.path '{cfg.path}': {err}") from None


def resolve_mask_id(cfg: ModelConfig, raw: dict, tokenizer: Any, vocab_size: int, default: int | None = None) -> int:
    """Mask token id from, in order: the config override, the model config, the tokenizer, the family default."""
    for source, value in (
        ("model.mask_token_id", cfg.mask_token_id),
        ("the model's config.json", raw.get("mask_token_id")),
        ("the tokenizer's mask token", getattr(tokenizer, "mask_token_id", None)),
        ("the family default", default),
    ):
        if value is None:
            continue
        if not 0 <= int(value) < vocab_size:
            raise ConfigError(
                f"mask token id {value} (from {source}) is outside the model's vocabulary of {vocab_size}; "
                "set model.mask_token_id to the id of the token the model was trained to denoise."
            )
        return int(value)
    raise ConfigError(
        f"model '{cfg.path}' has no usable mask token: neither its config.json (mask_token_id) nor its tokenizer "
        "(mask_token) names one. A diffusion LM needs the token it was trained to denoise; set "
        "model.mask_token_id=<id>."
    )


def _check_tokenizer(tokenizer: Any, cfg: ModelConfig) -> None:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of '{cfg.path}' has no EOS token; generation could never stop.")


def _decoder_policy(
    cfg: ModelConfig,
    raw: dict,
    model: torch.nn.Module,
    family: str,
    block_size: int | None,
    shift: bool = False,
    default_mask: int | None = None,
) -> DecoderPolicy:
    tok = _tokenizer(cfg)
    _check_tokenizer(tok, cfg)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    mask_id = resolve_mask_id(cfg, raw, tok, vocab, default_mask)
    return DecoderPolicy(model.eval(), tok, family=family, mask_id=mask_id, block_size=block_size, shift=shift)


def _from_pretrained(cls: type, cfg: ModelConfig, **kwargs: Any) -> torch.nn.Module:
    """``cls.from_pretrained`` that fails when a weight of the model is missing from the checkpoint."""
    model, info = cls.from_pretrained(cfg.path, dtype=_dtype(cfg), output_loading_info=True, **kwargs)
    missing = [k for k in info["missing_keys"] if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise ConfigError(
            f"the checkpoint at model.path '{cfg.path}' does not fit model.family={cfg.family}: {len(missing)} "
            f"weights are missing (e.g. {missing[:3]}). Check the family, or set model.trust_remote_code=true."
        )
    return model


def _native_config(cls: type, raw: dict) -> PretrainedConfig:
    skip = ("model_type", "architectures", "auto_map", "transformers_version")
    fields = {k: v for k, v in raw.items() if k not in skip}
    return cls(**fields)


def _remote(cfg: ModelConfig, family: str, block_size: int | None, shift: bool) -> DecoderPolicy:
    model = AutoModelForCausalLM.from_pretrained(cfg.path, trust_remote_code=True, dtype=_dtype(cfg))
    return _decoder_policy(cfg, _raw_config(cfg), model, family, block_size, shift)


@register_family("tiny")
def load_tiny(cfg: ModelConfig) -> DecoderPolicy:
    """The built-in tiny model: random from ``model.tiny`` when no path is given, else a saved one."""
    if cfg.path is None:
        model, tok = build_tiny(cfg.tiny)
        block = cfg.tiny.block_size if cfg.tiny.attention == "block" else None
        policy = DecoderPolicy(model, tok, family="tiny", mask_id=tok.mask_token_id, block_size=block)
        policy.model.to(_dtype(cfg))
        return policy
    raw = _raw_config(cfg)
    cls = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}.get(raw.get("model_type"))
    if cls is None:
        raise ConfigError(f"'{cfg.path}' is not a tiny tracerl model (model_type {raw.get('model_type')!r}).")
    model = _from_pretrained(cls, cfg)
    block = cfg.block_size or raw.get("tracerl_block_size")
    return _decoder_policy(cfg, raw, model, "tiny", block)


@register_family("llada")
def load_llada(cfg: ModelConfig) -> DecoderPolicy:
    """LLaDA / LLaDA-1.5 into ``LlamaForCausalLM`` with the OLMo-style weight names remapped."""
    if cfg.trust_remote_code:
        return _remote(cfg, "llada", None, shift=False)
    raw = _raw_config(cfg)
    hidden = raw.get("mlp_hidden_size") or raw["mlp_ratio"] * raw["d_model"]
    native = LlamaConfig(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        hidden_size=raw["d_model"],
        intermediate_size=hidden,
        num_hidden_layers=raw["n_layers"],
        num_attention_heads=raw["n_heads"],
        num_key_value_heads=raw.get("n_kv_heads") or raw["n_heads"],
        max_position_embeddings=raw.get("max_sequence_length", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=raw.get("rope_theta", 10000.0),
        attention_bias=bool(raw.get("include_bias") or raw.get("include_qkv_bias")),
        mlp_bias=bool(raw.get("include_bias")),
        tie_word_embeddings=bool(raw.get("weight_tying", False)),
        pad_token_id=raw.get("pad_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )
    model = _from_pretrained(LlamaForCausalLM, cfg, config=native, key_mapping=LLADA_KEY_MAPPING)
    return _decoder_policy(cfg, raw, model, "llada", None, default_mask=LLADA_DEFAULT_MASK_ID)


@register_family("dream")
def load_dream(cfg: ModelConfig) -> DecoderPolicy:
    """Dream / DiffuCoder into ``Qwen2ForCausalLM``; logits for position i come from position i-1."""
    if cfg.trust_remote_code:
        return _remote(cfg, "dream", None, shift=True)
    raw = _raw_config(cfg)
    model = _from_pretrained(Qwen2ForCausalLM, cfg, config=_native_config(Qwen2Config, raw))
    return _decoder_policy(cfg, raw, model, "dream", None, shift=True)


@register_family("sdar")
def load_sdar(cfg: ModelConfig) -> DecoderPolicy:
    """SDAR / TraDo into ``Qwen3ForCausalLM`` with block-causal attention and an exact KV cache."""
    raw = _raw_config(cfg)
    block = cfg.block_size or raw.get("block_size") or 4
    if cfg.trust_remote_code:
        return _remote(cfg, "sdar", block, shift=False)
    model = _from_pretrained(Qwen3ForCausalLM, cfg, config=_native_config(Qwen3Config, raw))
    return _decoder_policy(cfg, raw, model, "sdar", block)


@register_family("masked_lm")
def load_masked_lm(cfg: ModelConfig) -> MaskedLMPolicy:
    """Any ``AutoModelForMaskedLM`` (BERT, RoBERTa, ModernBERT, ...) as a full-attention denoiser."""
    raw = _raw_config(cfg)
    model = AutoModelForMaskedLM.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, dtype=_dtype(cfg))
    tok = _tokenizer(cfg)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    mask_id = resolve_mask_id(cfg, {}, tok, vocab)
    if tok.eos_token_id is None:  # encoder tokenizers: [SEP] ends a sequence
        tok.eos_token = tok.sep_token
    _check_tokenizer(tok, cfg)
    del raw
    return MaskedLMPolicy(model.eval(), tok, mask_id=mask_id)


def load_policy(cfg: ModelConfig) -> Any:
    """Load the policy a model config describes (family registry lookup)."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"unknown model family '{cfg.family}'; choose from {sorted(FAMILIES)}.")
    return FAMILIES[cfg.family](cfg)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of a model config, without loading weights (the driver encodes prompts with it)."""
    if cfg.family == "tiny" and cfg.path is None:
        return char_tokenizer(cfg.tiny.alphabet)
    return _tokenizer(cfg)
