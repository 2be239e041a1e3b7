"""LoRA adapters through PEFT (DESIGN §20): ``learner.lora`` turns a policy's model into frozen base weights plus
trainable low-rank adapters, in place, so every caller of ``policy.model`` keeps working.

What the rest of tracerl uses:

- ``apply_lora``: inject the adapters (PEFT's ``get_peft_model``; the same seeded initialisation on every learner
  rank and rollout actor); the model object stays the one the policy holds, and only adapter parameters keep
  ``requires_grad``;
- ``adapters_disabled``: the base model, for the reference policy (no second copy of the weights);
- ``load_trained``: load what the learner trains (every weight, or the adapters only) into a copy;
- ``merged_state_dict``: the merged weights under the native model's names (export, comparisons).

Adapters run unmerged everywhere (learner and rollout actors): the sampler then computes exactly the learner's
function (DESIGN §7), and a weight sync replaces adapter tensors without touching the base.

dims: none (modules and state dicts)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tracerl.config import ConfigError, LoRAConfig

DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The default target modules of each family: every linear layer of attention and MLP of the decoders (Llama,
# Qwen2, Qwen3 classes), PEFT's "all-linear" (every linear layer but the output head) for encoder masked LMs.
LORA_TARGETS: dict[str, list[str] | str] = {
    "tiny": DECODER_TARGETS,
    "llada": DECODER_TARGETS,
    "dream": DECODER_TARGETS,
    "sdar": DECODER_TARGETS,
    "masked_lm": "all-linear",
}
# Families LoRA cannot apply to, with the reason (refused even with target_modules).
LORA_UNSUPPORTED: dict[str, str] = {
    "diffusion_gemma": "its canvas learner (renoising trajectories, self-conditioning, DESIGN §18) has no adapter "
    "path: the reference, weight sync and export of that family handle full weights only",
}
ADAPTER = "default"  # PEFT's adapter name; parameter names carry it (``...q_proj.lora_A.default.weight``)


def lora_targets(family: str, lora: LoRAConfig) -> list[str] | str:
    """``learner.lora.target_modules``, or the family's default; a clear error for a family without one or one
    LoRA cannot apply to."""
    if family in LORA_UNSUPPORTED:
        raise ConfigError(
            f"learner.lora cannot apply to model.family={family}: {LORA_UNSUPPORTED[family]}. Set "
            "learner.lora.enabled=false to train every weight."
        )
    if lora.target_modules:
        return list(lora.target_modules)
    if family not in LORA_TARGETS:
        raise ConfigError(
            f"learner.lora has no default target modules for model.family={family} (families with a default: "
            f"{sorted(LORA_TARGETS)}). Name the linear layers that should get adapters in "
            "learner.lora.target_modules, or set learner.lora.enabled=false."
        )
    return LORA_TARGETS[family]


def apply_lora(policy: Any, lora: LoRAConfig, seed: int = 0) -> Any:
    """Inject LoRA adapters into ``policy.model`` in place and return PEFT's ``PeftModel`` around it (for saving
    the adapter directory); ``policy.model`` is still the same object. Adapter initialisation is seeded by
    ``seed`` (and leaves the global RNG untouched), so every rank and rollout actor starts from the same adapters."""
    from peft import LoraConfig, get_peft_model

    family = policy.family
    targets = lora_targets(family, lora)
    check_each_target(policy, lora)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=targets, lora_dropout=0.0, bias="none", inference_mode=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with warnings.catch_warnings():  # PEFT reads transformers' deprecated gradient-checkpointing flag
                warnings.simplefilter("ignore", FutureWarning)
                peft_model = get_peft_model(policy.model, config)
        except ValueError as err:
            if "not found" not in str(err) and "match" not in str(err):
                raise
            raise no_targets(policy, targets) from None
    if peft_model.base_model.model is not policy.model:  # PEFT injects in place; everything relies on it
        raise RuntimeError("PEFT did not inject the adapters in place; tracerl cannot use this PEFT version")
    return peft_model


def _linear_names(policy: Any) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in policy.model.named_modules() if isinstance(m, nn.Linear)})


def _matches(policy: Any, target: str) -> int:
    """Modules PEFT gives an adapter for ``target`` in a list: named ``target`` or ending with ``.<target>``."""
    return sum(n == target or n.endswith(f".{target}") for n, _ in policy.model.named_modules())


def no_targets(policy: Any, targets: list[str] | str) -> ConfigError:
    """The error for ``learner.lora.target_modules`` that match no module of the model: its linear layers' names."""
    return ConfigError(
        f"learner.lora.target_modules={targets} match no module of the {policy.family} model; its linear layers "
        f"are named {_linear_names(policy)}. Set learner.lora.target_modules to some of them (or leave it unset for "
        "the family's default)."
    )


def check_each_target(policy: Any, lora: LoRAConfig) -> None:
    """Every name the user gave in ``learner.lora.target_modules`` matches a module (PEFT adapts what matches
    and drops the rest without a word: a misspelt ``v_prj`` beside ``q_proj`` would leave ``v_proj`` frozen)."""
    if lora.target_modules is None:
        return
    missing = [t for t in lora.target_modules if not _matches(policy, t)]
    if missing and len(missing) < len(lora.target_modules):
        raise ConfigError(
            f"learner.lora.target_modules names {missing}, which match no module of the {policy.family} model "
            f"(the others do); its linear layers are named {_linear_names(policy)}. Fix or remove "
            f"{'it' if len(missing) == 1 else 'them'}."
        )


def check_lora_targets(policy: Any, lora: LoRAConfig) -> int:
    """How many modules of ``policy.model`` ``learner.lora`` would give adapters, without injecting any (PEFT's rule
    for a list: a module whose name is a target or ends with ``.<target>``; a family default such as
    ``all-linear`` is counted as every linear layer); what ``tracerl validate`` checks.

    Raises:
        ConfigError: as ``apply_lora``, for targets that match no module.
    """
    targets = lora_targets(policy.family, lora)
    if isinstance(targets, str):  # all-linear: every linear layer but the output head, as PEFT picks them
        head = policy.model.get_output_embeddings() if hasattr(policy.model, "get_output_embeddings") else None
        return sum(isinstance(m, nn.Linear) and m is not head for m in policy.model.modules())
    found = sum(any(n == t or n.endswith(f".{t}") for t in targets) for n, _ in policy.model.named_modules())
    if not found:
        raise no_targets(policy, targets)
    check_each_target(policy, lora)
    return found


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """PEFT's tuner layers inside ``model`` (empty for a model without adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_layers(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base inside the block: each adapter layer computes its base layer alone (exactly the
    base layer's output, no added zeros)."""
    layers = adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def trained_names(model: nn.Module) -> list[str]:
    """State-dict names of the parameters the learner trains (``requires_grad``), in state-dict order."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return [n for n in model.state_dict(keep_vars=True) if n in trained]


def load_trained(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what the learner sends into a copy of the policy: every weight (a model without adapters: strict), or
    the adapter weights alone (every adapter tensor must be there; the base stays as loaded)."""
    if not has_adapters(model):
        model.load_state_dict(state)
        return
    adapters = {n for n in model.state_dict() if ".lora_" in n}
    missing = sorted(adapters - state.keys())
    unexpected = sorted(state.keys() - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(
            f"adapter weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]} (the learner "
            "and the rollout copy must use the same learner.lora settings)"
        )
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` with every adapter merged in, on CPU, under the native model's names (what a
    ``from_pretrained`` of the base architecture loads). Each merged weight is PEFT's merge, ``W + ΔW`` with
    ``ΔW = get_delta_weight`` in W's dtype, computed from the live modules; a model without adapters gives its
    own state dict."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if not has_adapters(model):
        return state
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
            base = module.get_base_layer()
            weight = base.weight.detach().clone()
            if ADAPTER in getattr(module, "lora_A", {}) or ADAPTER in getattr(module, "lora_embedding_A", {}):
                weight += module.get_delta_weight(ADAPTER).to(weight.dtype)
            merged[f"{name}.weight"] = weight.cpu()
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out[plain] = merged.get(plain, value) if plain.endswith(".weight") else value
    return out
