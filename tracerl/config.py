"""The typed configuration schema and its loader.

Dataclasses are the schema: every field has a comment saying what it does. YAML files only override the
defaults, and ``key=value`` overrides from the command line come last. Unknown keys, wrong types and values
outside a field's choices fail before anything starts, with an error that lists what is valid.

Example:
    >>> cfg = load(None, ["sampling.max_new_tokens=32", "sampling.remasking=sequential"])
    >>> cfg.sampling.max_new_tokens, cfg.sampling.remasking
    (32, 'sequential')
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


# ---------------------------------------------------------------------------------------------- schema


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny model (used when ``model.family=tiny`` and no ``model.path`` is given)."""

    hidden_size: int = 64  # width of the residual stream
    num_layers: int = 2  # transformer layers
    num_heads: int = 4  # attention heads (head dim = hidden_size / num_heads)
    intermediate_size: int = 128  # MLP width
    attention: Literal["full", "block"] = "full"  # full bidirectional (LLaDA-like) or block diffusion (SDAR-like)
    block_size: int = 4  # block size of the block-diffusion variant
    max_position_embeddings: int = 2048  # longest prompt + response the rotary tables cover
    alphabet: str = "0123456789+-*=?:#., abcdefghijklmnopqrstuvwxyz"  # characters of the char-level tokenizer


@dataclass
class ModelConfig:
    """Which diffusion language model to load and how."""

    family: str = "tiny"  # model family: tiny | llada | dream | sdar | masked_lm (see tracerl.models)
    path: str | None = None  # local directory or hub name; None builds a random tiny model (family tiny only)
    trust_remote_code: bool = False  # load the checkpoint's own modeling code instead of the native class
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype of the policy
    mask_token_id: int | None = None  # override the mask token id (otherwise config, then tokenizer)
    block_size: int | None = None  # block size of a block-diffusion model (None: from its config)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # shape of a random tiny model


@dataclass
class SamplingConfig:
    """How the rollout sampler denoises a response (DESIGN §6)."""

    max_new_tokens: int = 64  # response length L; generation also stops after the block holding EOS
    block_size: int = 4  # semi-autoregressive block length (must equal the model's block size for block models)
    steps_per_block: int | None = None  # denoising steps per block (None: one token per step, = block_size)
    steps: int | None = None  # alternative LLaDA-style total step count over max_new_tokens (sets steps_per_block)
    remasking: str = "low_confidence_static"  # which masked positions to commit each step (sampling registry)
    threshold: float = 0.9  # confidence threshold of low_confidence_dynamic
    eb_threshold: float = 0.35  # cumulative-entropy budget of entropy_bounded
    temperature: float = 1.0  # candidate sampling temperature; 0 = greedy
    top_k: int = 0  # keep the k most likely candidates (0 = off)
    top_p: float = 1.0  # nucleus sampling mass (1.0 = off)
    cache: Literal["auto", "none", "prefix", "kv"] = "auto"  # auto: exact kv for block models, none for full
    trainable_pad_tokens: int = 0  # tokens after the first EOS that still count for the loss (TraceRL post_num)
    batch_size: int = 64  # sequences decoded together in one sampler call


@dataclass
class Config:
    """The whole run."""

    seed: int = 0  # seeds sampling, data order and initialisation
    run_dir: str = "runs/default"  # where metrics, the resolved config and checkpoints go
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


# ---------------------------------------------------------------------------------------------- checks


def resolved_steps_per_block(s: SamplingConfig) -> int:
    """Denoising steps per block implied by ``steps`` / ``steps_per_block`` (validated)."""
    if s.steps is None:
        return s.steps_per_block if s.steps_per_block is not None else s.block_size
    num_blocks = s.max_new_tokens // s.block_size
    return s.steps // num_blocks


def check_sampling(s: SamplingConfig) -> None:
    """Reject impossible sampling settings with an error naming the setting and the fix."""
    if s.max_new_tokens <= 0:
        raise ConfigError(
            f"sampling.max_new_tokens must be a positive number of tokens to generate, got {s.max_new_tokens}."
        )
    if s.block_size <= 0:
        raise ConfigError(f"sampling.block_size must be positive, got {s.block_size}.")
    if s.steps is not None and s.steps_per_block is not None:
        raise ConfigError("set only one of sampling.steps (total) and sampling.steps_per_block, not both.")
    if s.steps is not None:
        if s.max_new_tokens % s.block_size:
            raise ConfigError(
                f"sampling.steps={s.steps} spreads steps over blocks, so sampling.max_new_tokens "
                f"({s.max_new_tokens}) must be a multiple of sampling.block_size ({s.block_size}); "
                "change one of them or set sampling.steps_per_block instead."
            )
        num_blocks = s.max_new_tokens // s.block_size
        if s.steps <= 0 or s.steps % num_blocks:
            raise ConfigError(
                f"sampling.steps={s.steps} is not divisible by the number of blocks "
                f"({s.max_new_tokens} / {s.block_size} = {num_blocks}): the block size does not divide the "
                f"step schedule. Use a multiple of {num_blocks}, e.g. sampling.steps={num_blocks * 2}."
            )
    spb = resolved_steps_per_block(s)
    if not 1 <= spb <= s.block_size:
        raise ConfigError(
            f"denoising steps per block must be between 1 and sampling.block_size ({s.block_size}), got {spb}; "
            "every step commits at least one token of the block."
        )
    if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise ConfigError(
            "sampling.temperature must be >= 0, sampling.top_p in (0, 1] and sampling.top_k >= 0; got "
            f"temperature={s.temperature}, top_p={s.top_p}, top_k={s.top_k}."
        )
    from tracerl.sampling.remasking import REMASKING  # the registry is the list of valid names

    if s.remasking not in REMASKING:
        raise ConfigError(f"unknown remasking '{s.remasking}'; choose from {sorted(REMASKING)}.")


def check(cfg: Config) -> None:
    """Cross-field checks that the type system cannot express."""
    from tracerl.models import FAMILIES

    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"unknown model family '{cfg.model.family}'; choose from {sorted(FAMILIES)}.")
    if cfg.model.path is None and cfg.model.family != "tiny":
        raise ConfigError(
            f"model.path is required for model.family={cfg.model.family}: give a local directory or a hub name."
        )
    check_sampling(cfg.sampling)


# ---------------------------------------------------------------------------------------------- loading


def _literal_problems(obj: Any, prefix: str = "") -> list[str]:
    """Values of ``Literal[...]`` fields that are not among the choices (OmegaConf only checks types)."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            problems.append(f"{prefix}{f.name}='{value}' is not valid; choose from {list(typing.get_args(hint))}")
        elif dataclasses.is_dataclass(value):
            problems.extend(_literal_problems(value, f"{prefix}{f.name}."))
    return problems


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf exception into one paragraph naming the key, the problem and the valid keys."""
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    parent_type = getattr(err, "object_type", None)
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        valid = [f.name for f in dataclasses.fields(parent_type)] if dataclasses.is_dataclass(parent_type) else []
        hint = f" Valid keys here: {valid}." if valid else ""
        return ConfigError(f"unknown config key '{key}' (from {source}).{hint}")
    return ConfigError(f"bad value for config key '{key}' (from {source}): {msg}.")


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain containers (for saving and for W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def load(yaml_path: str | Path | None = None, overrides: list[str] | None = None, schema: type = Config) -> Any:
    """Build a config from the schema defaults, a YAML file of overrides, then ``a.b=c`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, value outside a field's choices, or an impossible combination.
    """
    base = OmegaConf.structured(schema)
    layers = []
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file.")
        layers.append((OmegaConf.load(path), str(path)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. sampling.temperature=0.7).")
    if overrides:
        layers.append((OmegaConf.from_dotlist(list(overrides)), "command-line overrides"))
    merged = base
    for layer, source in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, source) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, "the merged config") from None
    problems = _literal_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    if schema is Config:
        check(cfg)
    return cfg
