"""One loader per model family: each turns a checkpoint into a DiffusionPolicy (DESIGN §5).

LLaDA, Dream and SDAR are exactly Llama, Qwen2 and Qwen3 with another attention pattern, so they load into
transformers' own maintained classes; tracerl supplies the attention mask, the logit shift and the cache.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
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
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from tracerl import hub
from tracerl.checkpoint import run_folder_advice
from tracerl.config import MODEL_FILE_EXTENSIONS, ConfigError, ModelConfig, TinyModelConfig, local_path_reason
from tracerl.models.base import DecoderPolicy
from tracerl.models.masked_lm import MaskedLMPolicy
from tracerl.models.tiny import build_tiny, char_tokenizer

log = logging.getLogger(__name__)
FAMILIES: dict[str, Callable[[ModelConfig], Any]] = {}
# load_policy(cfg, weights=False): the loaders build the model from its config on the meta device (no weights read)
_SKELETON = contextvars.ContextVar("tracerl_skeleton", default=False)

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


def checkpoint_family(raw: dict) -> str | None:
    """The family a checkpoint's config.json looks like, from its model type, architectures and keys (None:
    it could serve several, such as a plain Qwen2 or Llama config)."""
    model_type = str(raw.get("model_type", "")).lower()
    architectures = " ".join(raw.get("architectures") or []).lower()
    if model_type == "diffusion_gemma" or "diffusiongemma" in architectures:
        return "diffusion_gemma"
    if model_type == "llada" or "llada" in architectures or {"d_model", "n_layers"} <= raw.keys():
        return "llada"
    if model_type == "dream" or "dream" in architectures:
        return "dream"
    if model_type == "sdar" or "sdar" in architectures:
        return "sdar"
    if "tracerl_block_size" in raw:
        return "tiny"
    if "formaskedlm" in architectures:
        return "masked_lm"
    if architectures.endswith("forcausallm") and model_type not in ("llama", "qwen2", "qwen3"):
        return "causal"  # an autoregressive decoder of a type tracerl has no diffusion family for
    return None


def check_family(cfg: ModelConfig, raw: dict, needs: tuple[str, ...] = ()) -> None:
    """Before any model is built: the checkpoint at ``model.path`` fits ``model.family`` and its config has the
    keys the loader reads.

    Raises:
        ConfigError: it looks like another family (named, with the fix), or keys are missing.
    """
    looks = checkpoint_family(raw)
    what = f"model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}"
    if looks == "causal" or (looks is not None and looks != cfg.family):
        fix = (
            f"set model.family={looks}"
            if looks != "causal"
            else f"choose the family it was trained as ({sorted(set(FAMILIES) - {'tiny'})})"
        )
        kind = "an autoregressive" if looks == "causal" else f"a {looks}"
        raise ConfigError(
            f"model.path '{cfg.path}' holds {kind} checkpoint ({what}), but model.family={cfg.family}; {fix}."
        )
    missing = [k for k in needs if k not in raw]
    if missing:
        raise ConfigError(
            f"the config.json at model.path '{cfg.path}' ({what}) lacks {missing}, which a model.family="
            f"{cfg.family} checkpoint has; check model.path and model.family."
        )


def _attention(raw: dict) -> str:
    """An attention implementation that honours tracerl's 4D masks: the checkpoint's if eager or sdpa, else sdpa
    (``flex_attention``, found in published SDAR configs, crashes with a 4D mask on CPU)."""
    asked = raw.get("attn_implementation") or raw.get("_attn_implementation")
    if asked in (None, "eager", "sdpa"):
        return asked or "sdpa"
    log.warning("attn_implementation %r of the checkpoint is replaced by 'sdpa' (it must honour 4D masks)", asked)
    return "sdpa"


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return getattr(torch, cfg.dtype)


def _is_local(path: str) -> bool:
    return local_path_reason(path, MODEL_FILE_EXTENSIONS) is not None or Path(path).expanduser().exists()


def local_model_dir(name: str, setting: str = "model.path") -> Path | None:
    """The local model directory a setting (``model.path``, ``reward_model.base``) names, checked before anything
    reads it (a config.json in a directory); None for a hub name, asked of the hub once (``hub.hub_problem``). A
    path that cannot be a hub name and does not exist is an error at once, with no network access."""
    path = Path(name).expanduser()
    if not path.exists():
        reason = local_path_reason(name, MODEL_FILE_EXTENSIONS)
        if reason is None:
            problem = hub.hub_problem(name)
            if problem is not None:
                raise _not_fetched(name, problem, setting)
            return None
        raise ConfigError(
            f"{setting} '{name}' does not exist ({reason}). Give a local model directory (with config.json) "
            "or a Hugging Face hub name such as 'GSAI-ML/LLaDA-8B-Instruct'."
        )
    _not_a_checkpoint(name, setting)
    if not path.is_dir():
        raise ConfigError(
            f"{setting} '{name}' is a file, not a model directory: set it to the directory that holds the "
            "model's config.json, tokenizer and weights (as save_pretrained writes them)."
        )
    if not (path / "config.json").is_file():
        held = sorted(p.name for p in path.iterdir())
        what = f"it holds {held[:6]}{' ...' if len(held) > 6 else ''}" if held else "it is empty"
        raise ConfigError(
            f"{setting} '{name}' is not a model directory: it has no config.json ({what}). Set {setting} to "
            "the directory that holds the model's config.json, tokenizer and weights, or to a hub name 'org/name'."
        )
    return path


def _raw_config(cfg: ModelConfig) -> dict:
    """The checkpoint's config.json as a dict, with a clear error when the path is wrong or holds a classifier."""
    assert cfg.path is not None
    path = local_model_dir(cfg.path)
    if path is not None:
        try:
            raw = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path / 'config.json'} (model.path) is not valid JSON: {err}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path / 'config.json'} (model.path) is not a JSON object.")
        return _not_a_classifier(cfg.path, raw)
    try:
        return _not_a_classifier(
            cfg.path, PretrainedConfig.get_config_dict(cfg.path, local_files_only=hub.offline())[0]
        )
    except OSError as err:
        if hub.offline():
            raise ConfigError(
                f"model.path '{cfg.path}' is not a local directory and HF_HUB_OFFLINE=1 forbids the hub (it is not "
                "in the local cache either). Set model.path to a local model directory, or unset HF_HUB_OFFLINE to "
                "download it."
            ) from None
        raise _not_fetched(cfg.path, f"the download failed ({err.__class__.__name__})") from None


def _not_a_classifier(name: str, raw: dict) -> dict:
    """``raw`` unless its architecture is a sequence classifier (a reward model), which no policy family loads."""
    heads = [a for a in raw.get("architectures") or [] if str(a).endswith("ForSequenceClassification")]
    if heads:
        raise ConfigError(
            f"model.path '{name}' is a sequence-classification model ({heads[0]}), such as a reward model from "
            "tracerl train-reward-model: it scores text and has no language-model head to generate with. Set "
            f"model.path to the policy, and use this one as a reward: reward.functions=[{{fn: {name}}}]."
        )
    return raw


def _not_fetched(name: str, why: str, setting: str = "model.path") -> ConfigError:
    return ConfigError(
        f"could not fetch model '{name}' from the hub: {why}; and {setting} is not a local directory "
        f"either{hub.local_folder_hint(name)}. "
        f"Check the name and your network, or download it and set {setting} to the local directory."
    )


def _not_a_checkpoint(name: str, setting: str) -> None:
    """A tracerl checkpoint or run folder is not a model directory: say where its model is."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file() and not (path / "run.json").is_file():
        return  # a model directory (that may keep other things beside its model)
    if advice := run_folder_advice(path):
        fix = f" (set {setting} to that)" if advice[1] is not None else ""
        raise ConfigError(f"{setting} '{name}' is not a model directory: {advice[0]}{fix}.")
    for inner in (path / "learner" / "hf", path / "hf"):
        if (inner / "config.json").is_file() and not (path / "config.json").is_file():
            raise ConfigError(
                f"{setting} '{name}' is a tracerl checkpoint, not a model directory: its policy is in "
                f"'{inner}' (set {setting} to that), or write a standalone copy with tracerl export {name} OUT."
            )


# Files a saved tokenizer writes (fast, slow BPE / WordPiece / SentencePiece): a model directory with none of them
# loads as a tokenizer of one token, which reads every prompt as empty.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "merges.txt")  # fmt: skip


def _tokenizer(cfg: ModelConfig) -> Any:
    path = local_model_dir(str(cfg.path))
    if path is not None and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"model.path '{cfg.path}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's "
            "tokenizer into it (tokenizer.save_pretrained), or point model.path at a directory that has one."
        )
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


def _check_tokenizer(tokenizer: Any, cfg: ModelConfig, vocab_size: int | None = None) -> None:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of '{cfg.path}' has no EOS token; generation could never stop.")
    if vocab_size is None:
        return
    size = len(tokenizer)
    # A model's vocabulary may be padded beyond its tokenizer (to a multiple of 64 or so), never the reverse, and
    # a tokenizer of less than half the vocabulary is not the one the model was trained with.
    if size > vocab_size or size < vocab_size // 2:
        raise ConfigError(
            f"the tokenizer at model.path '{cfg.path}' has {size} tokens but the model's vocabulary has {vocab_size}: "
            "they do not belong together (are the tokenizer files missing from the checkpoint directory?). Save "
            "the model's own tokenizer into model.path."
        )


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
    vocab = int(model.get_output_embeddings().weight.shape[0])
    _check_tokenizer(tok, cfg, vocab)
    mask_id = resolve_mask_id(cfg, raw, tok, vocab, default_mask)
    return DecoderPolicy(model.eval(), tok, family=family, mask_id=mask_id, block_size=block_size, shift=shift)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _check_weights(cfg: ModelConfig) -> None:
    """A local model directory holds weights (checked before transformers looks for them)."""
    path = Path(str(cfg.path)).expanduser()
    if _is_local(str(cfg.path)) and path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            f"model.path '{cfg.path}' has a config.json but no weights (none of {list(WEIGHT_FILES)}); point "
            "model.path at a complete checkpoint directory."
        )


def _skeleton(loader: Callable, cfg: ModelConfig, **kwargs: Any) -> torch.nn.Module:
    """What ``loader`` (a ``from_pretrained``) would build, from the config alone, on the meta device."""
    cls = loader.__self__
    config = kwargs.get("config") or AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    extra = {k: v for k, v in kwargs.items() if k in ("attn_implementation", "trust_remote_code")}
    build = getattr(cls, "from_config", None) or cls._from_config
    with torch.device("meta"):
        return build(config, dtype=_dtype(cfg), **extra)


def _load(loader: Callable, cfg: ModelConfig, **kwargs: Any) -> Any:
    """``loader(cfg.path, ...)`` (a ``from_pretrained``) with unreadable or mismatched weights named."""
    _check_weights(cfg)
    if _SKELETON.get():
        model = _skeleton(loader, cfg, **kwargs)
        return (model, {"missing_keys": []}) if kwargs.get("output_loading_info") else model
    try:
        return loader(cfg.path, dtype=_dtype(cfg), **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors, torch and transformers raise many kinds here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "size mismatch" in str(err):
            first = "its weights have other shapes than its config.json says (size mismatch)"
        raise ConfigError(
            f"could not load the weights at model.path '{cfg.path}' as model.family={cfg.family}: "
            f"{type(err).__name__}: {first[:300]}. Check that the weight files are complete (not truncated) and "
            "that model.family is the checkpoint's."
        ) from None


def _from_pretrained(cls: type, cfg: ModelConfig, **kwargs: Any) -> torch.nn.Module:
    """``cls.from_pretrained`` that fails when a weight of the model is missing from the checkpoint."""
    model, info = _load(cls.from_pretrained, cfg, output_loading_info=True, **kwargs)
    missing = [k for k in info["missing_keys"] if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise ConfigError(
            f"the checkpoint at model.path '{cfg.path}' does not fit model.family={cfg.family}: {len(missing)} "
            f"weights are missing (e.g. {missing[:3]}). Check the family, or set model.trust_remote_code=true."
        )
    return model


def _native_config(cls: type, raw: dict) -> PretrainedConfig:
    skip = ("model_type", "architectures", "auto_map", "transformers_version", "attn_implementation")
    fields = {k: v for k, v in raw.items() if k not in skip and k != "_attn_implementation"}
    config = cls(**fields)
    config._attn_implementation = _attention(raw)
    return config


NATIVE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")  # no defaults for these


def _remote(cfg: ModelConfig, family: str, block_size: int | None, shift: bool) -> DecoderPolicy:
    raw = _raw_config(cfg)
    check_family(cfg, raw)
    attention = _attention(raw)
    model = _load(AutoModelForCausalLM.from_pretrained, cfg, trust_remote_code=True, attn_implementation=attention)
    return _decoder_policy(cfg, raw, model, family, block_size, shift)


@register_family("tiny")
def load_tiny(cfg: ModelConfig) -> DecoderPolicy:
    """The built-in tiny model: random from ``model.tiny`` when no path is given, else a saved one."""
    if cfg.path is None:
        with torch.device("meta" if _SKELETON.get() else "cpu"):
            model, tok = build_tiny(cfg.tiny)
        block = cfg.tiny.block_size if cfg.tiny.attention == "block" else None
        policy = DecoderPolicy(model, tok, family="tiny", mask_id=tok.mask_token_id, block_size=block)
        policy.model.to(_dtype(cfg))
        return policy
    raw = _raw_config(cfg)
    check_family(cfg, raw)
    cls = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}.get(raw.get("model_type"))
    if cls is None:
        raise ConfigError(f"'{cfg.path}' is not a tiny tracerl model (model_type {raw.get('model_type')!r}).")
    model = _from_pretrained(cls, cfg, attn_implementation=_attention(raw))
    block = cfg.block_size or raw.get("tracerl_block_size")
    return _decoder_policy(cfg, raw, model, "tiny", block)


def ignored_tiny_settings(cfg: ModelConfig) -> str | None:
    """A warning when ``model.tiny`` settings given (other than their defaults) disagree with the saved tiny model
    (``model.family=tiny``) at ``model.path``, which keeps the shape and tokenizer it was built with, so they are
    ignored; None otherwise (and when the path is not a readable local tiny model: the loader says what is wrong
    with it)."""
    if cfg.family != "tiny" or cfg.path is None or local_model_dir(cfg.path) is None:
        return None
    try:
        raw = _raw_config(cfg)
    except ConfigError:
        return None
    saved = {
        "attention": "block" if raw.get("tracerl_block_size") else "full",
        "block_size": raw.get("tracerl_block_size"),
        "hidden_size": raw.get("hidden_size"),
        "num_layers": raw.get("num_hidden_layers"),
        "num_heads": raw.get("num_attention_heads"),
        "intermediate_size": raw.get("intermediate_size"),
        "max_position_embeddings": raw.get("max_position_embeddings"),
    }
    default = TinyModelConfig()
    given = {key: getattr(cfg.tiny, key) for key in saved if getattr(cfg.tiny, key) != getattr(default, key)}
    if cfg.block_size is not None:  # model.block_size applies to a saved model: block attention of that size
        given.pop("block_size", None)
        given.pop("attention", None)
    ignored = [key for key, value in given.items() if saved[key] is not None and value != saved[key]]
    differ = [f"model.tiny.{key}={given[key]} (the model's: {saved[key]})" for key in ignored]
    if cfg.tiny.alphabet != default.alphabet:
        try:
            vocab = _tokenizer(cfg).get_vocab()
        except (ConfigError, OSError, ValueError):
            vocab = None  # the loader says what is wrong with the tokenizer files
        if vocab is not None and vocab != char_tokenizer(cfg.tiny.alphabet).get_vocab():
            differ.append(f"model.tiny.alphabet={cfg.tiny.alphabet!r} (the model's tokenizer has other characters)")
    if not differ:
        return None
    fix = " (model.block_size sets the block size of a saved block model)" if "block_size" in ignored else ""
    return (
        f"{', '.join(differ)} ignored: model.path '{cfg.path}' is a saved tiny model, which keeps the shape it was "
        f"built with. Remove the model.tiny settings{fix}, or leave model.path unset to build a new model from them."
    )


@register_family("llada")
def load_llada(cfg: ModelConfig) -> DecoderPolicy:
    """LLaDA / LLaDA-1.5 into ``LlamaForCausalLM`` with the OLMo-style weight names remapped."""
    if cfg.trust_remote_code:
        return _remote(cfg, "llada", None, shift=False)
    raw = _raw_config(cfg)
    check_family(cfg, raw, needs=("d_model", "n_layers", "n_heads", "vocab_size"))
    if not raw.get("mlp_hidden_size") and "mlp_ratio" not in raw:
        raise ConfigError(f"the LLaDA config.json at model.path '{cfg.path}' has no mlp_hidden_size or mlp_ratio.")
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
    native._attn_implementation = _attention(raw)
    model = _from_pretrained(LlamaForCausalLM, cfg, config=native, key_mapping=LLADA_KEY_MAPPING)
    return _decoder_policy(cfg, raw, model, "llada", None, default_mask=LLADA_DEFAULT_MASK_ID)


@register_family("dream")
def load_dream(cfg: ModelConfig) -> DecoderPolicy:
    """Dream / DiffuCoder into ``Qwen2ForCausalLM``; logits for position i come from position i-1."""
    if cfg.trust_remote_code:
        return _remote(cfg, "dream", None, shift=True)
    raw = _raw_config(cfg)
    check_family(cfg, raw, needs=NATIVE_KEYS)
    model = _from_pretrained(Qwen2ForCausalLM, cfg, config=_native_config(Qwen2Config, raw))
    return _decoder_policy(cfg, raw, model, "dream", None, shift=True)


@register_family("sdar")
def load_sdar(cfg: ModelConfig) -> DecoderPolicy:
    """SDAR / TraDo into ``Qwen3ForCausalLM`` with block-causal attention and an exact KV cache."""
    raw = _raw_config(cfg)
    block = cfg.block_size or raw.get("block_size") or 4
    if cfg.trust_remote_code:
        return _remote(cfg, "sdar", block, shift=False)
    check_family(cfg, raw, needs=NATIVE_KEYS)
    model = _from_pretrained(Qwen3ForCausalLM, cfg, config=_native_config(Qwen3Config, raw))
    return _decoder_policy(cfg, raw, model, "sdar", block)


@register_family("masked_lm")
def load_masked_lm(cfg: ModelConfig) -> MaskedLMPolicy:
    """Any ``AutoModelForMaskedLM`` (BERT, RoBERTa, ModernBERT, ...) as a full-attention denoiser."""
    raw = _raw_config(cfg)
    check_family(cfg, raw)
    if not cfg.trust_remote_code and raw.get("model_type") not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ConfigError(
            f"model.path '{cfg.path}' holds a {raw.get('model_type')!r} model, which has no masked-LM head in "
            "transformers, so model.family=masked_lm cannot load it; set model.family to the family it was trained "
            f"as ({sorted(set(FAMILIES) - {'masked_lm'})}), or model.trust_remote_code=true for a custom masked LM."
        )
    kwargs = {"attn_implementation": _attention(raw)} if raw.get("attn_implementation") else {}
    model = _load(AutoModelForMaskedLM.from_pretrained, cfg, trust_remote_code=cfg.trust_remote_code, **kwargs)
    tok = _tokenizer(cfg)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if tok.eos_token_id is None:  # encoder tokenizers: [SEP] ends a sequence
        tok.eos_token = tok.sep_token
    _check_tokenizer(tok, cfg, vocab)
    mask_id = resolve_mask_id(cfg, {}, tok, vocab)
    return MaskedLMPolicy(model.eval(), tok, mask_id=mask_id)


def load_policy(cfg: ModelConfig, weights: bool = True) -> Any:
    """Load the policy a model config describes (family registry lookup).

    ``weights=False`` builds it from its config.json and tokenizer alone, on the meta device, reading no weights
    (what the driver checks sampler settings against before any actor starts): every check of the loader that
    needs no weights still runs.
    """
    if cfg.family not in FAMILIES:
        raise ConfigError(f"unknown model.family '{cfg.family}'; choose from {sorted(FAMILIES)}.")
    token = _SKELETON.set(not weights)
    try:
        policy = FAMILIES[cfg.family](cfg)
    finally:
        _SKELETON.reset(token)
    if weights and cfg.path is not None:
        check_finite(policy.model, cfg)
    return policy


def check_finite(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Every weight ``model.path`` loaded is a finite number: one pass over the parameters (a min and a max each,
    which NaN and ±inf show in), at load. NaN weights would pass every other check, train NaN and sample garbage."""
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and p.numel() and not p.is_meta]
    if not params:
        return
    with torch.no_grad():
        ok = torch.stack([torch.stack(torch.aminmax(p.detach())).isfinite().all() for _, p in params]).cpu()
    bad = [name for (name, _), fine in zip(params, ok.tolist(), strict=True) if not fine]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ConfigError(
            f"model.path '{cfg.path}' holds weights that are not finite numbers (NaN or infinite): {bad[:3]}{more}. "
            "Training would be NaN from its first step and sampling garbage. Such weights usually come from a run "
            "whose updates blew up: point model.path at an earlier export of it (tracerl export CHECKPOINT OUT_DIR) "
            "or at the model it started from."
        )


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of a model config, without loading weights (the driver encodes prompts with it)."""
    if cfg.family in ("tiny", "diffusion_gemma") and cfg.path is None:
        return char_tokenizer(cfg.tiny.alphabet)
    return _tokenizer(cfg)
