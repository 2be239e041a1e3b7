"""Diffusion policies: the protocol, one adapter per family, the tiny model and the family registry."""

# First: refuses a transformers below the floor before the modules below import its API (tracerl.models.compat).
from tracerl.models import compat  # noqa: F401
from tracerl.models.base import DecoderPolicy, DiffusionPolicy, truncate_cache
from tracerl.models.diffusion_gemma import CanvasPolicy, build_tiny_diffusion_gemma, load_diffusion_gemma
from tracerl.models.families import (
    FAMILIES,
    LLADA_KEY_MAPPING,
    ignored_tiny_settings,
    load_policy,
    load_tokenizer,
    register_family,
)
from tracerl.models.masked_lm import MaskedLMPolicy
from tracerl.models.tiny import build_tiny, char_tokenizer, save_tiny
from tracerl.models.value import ValueModel

__all__ = [
    "FAMILIES",
    "CanvasPolicy",
    "build_tiny_diffusion_gemma",
    "load_diffusion_gemma",
    "LLADA_KEY_MAPPING",
    "DecoderPolicy",
    "DiffusionPolicy",
    "MaskedLMPolicy",
    "ValueModel",
    "build_tiny",
    "char_tokenizer",
    "ignored_tiny_settings",
    "load_policy",
    "load_tokenizer",
    "register_family",
    "save_tiny",
    "truncate_cache",
]
