"""The diffusion value model: the policy's backbone plus a zero-initialised scalar head (TraceRL §value).

The value of a response token is read in the token's own training view, i.e. in the state just before the
sampler committed it, at the column whose hidden state predicts it (one to the left for shifted models).
A zero-initialised head makes every value 0 at the start, so the first advantages equal the plain outcome
rewards and the head learns from there. Works for every family: decoders through ``policy.backbone()``,
masked LMs through ``model.base_model``.

dims: N sequences · Q query tokens · K key tokens · H hidden size
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tracerl.models.attention import PackedAttention, backbone_hidden_states
from tracerl.models.base import additive_mask


def enable_checkpointing(model: nn.Module) -> None:
    """Switch on transformers' activation (gradient) checkpointing, non-reentrant, on transformers 4.x and 5.x."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class ValueModel(nn.Module):
    """A copy of a policy's transformer (no LM head) with a ``Linear(H, 1)`` head set to zero (weight and bias).

    ``forward(input_ids, position_ids, visible)`` → [N, Q] fp32 values, one per view column; the caller
    picks the columns that predict its targets (``models.base.gather_positions`` with the policy's shift).

    Example:
        >>> value = ValueModel.from_policy(policy)          # doctest: +SKIP
        >>> value(ids, pos, visible).abs().max().item()     # doctest: +SKIP
        0.0
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, *, encoder: bool = False, shift: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        # A bias, unlike TraceRL's head: raw rewards have a mean far from 0 (0.5 in the quickstart), which a
        # bias learns in a few steps; without one the backbone must build a constant direction first.
        self.head = nn.Linear(hidden_size, 1, bias=True)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).dtype)
        self.encoder = encoder  # masked LMs take a key-padding mask, not a 4D pattern
        self.shift = shift  # the policy's logit shift, so values are read where the policy reads logits

    @classmethod
    def from_policy(cls, policy: Any) -> ValueModel:
        """A value model initialised from (a copy of) ``policy``'s backbone; the policy is left untouched."""
        if policy.family == "masked_lm":
            backbone = copy.deepcopy(policy.model.base_model)
            return cls(backbone, int(policy.model.config.hidden_size), encoder=True)
        backbone = copy.deepcopy(policy.backbone())
        return cls(backbone, int(backbone.config.hidden_size), shift=bool(policy.shift))

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the backbone's activations in backward (transformers' own switch)."""
        enable_checkpointing(self.backbone)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """[N, Q, H] last hidden states of the backbone under the attention pattern ``visible`` [N, Q, K]."""
        if isinstance(visible, PackedAttention):  # packed block-layout views
            return backbone_hidden_states(self.backbone, input_ids, position_ids, visible)
        if self.encoder:
            key_valid = visible.any(dim=1).long()  # full attention: a key is valid if any query sees it
            out = self.backbone(input_ids=input_ids, attention_mask=key_valid, output_hidden_states=True)
            return out.hidden_states[-1]
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=additive_mask(visible, dtype),
            use_cache=False,
        )
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, position_ids, visible)
        return self.head(hidden).squeeze(-1).float()
