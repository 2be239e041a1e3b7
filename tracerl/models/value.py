"""The diffusion value model: the policy's backbone plus a zero-initialised scalar head (TraceRL §value).

The value of a response token is read in the token's own training view, i.e. in the state just before the
sampler committed it, at the column whose hidden state predicts it (one to the left for shifted models). Two
readouts (``objective.value_readout``):

- ``token`` (TraceRL's): the head's output at that column;
- ``state``: the mean of the head's output over every column that column sees, i.e. over the whole state the
  token was committed in (prompt, committed and masked tokens). A reward that adds up over positions (a fraction
  of cells right, of tests passed) is then a sum of per-column parts, each column scoring its own token, instead
  of one column having to summarise every other; on the quickstart it learns faster out of sample
  (docs/estimators.md).

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
    """Switch on transformers' activation (gradient) checkpointing, non-reentrant (``gradient_checkpointing_enable``
    is the deprecated name)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


READOUTS = ("token", "state")


def state_mean(scores: torch.Tensor, visible: torch.Tensor | PackedAttention) -> torch.Tensor:
    """[N, Q] the mean of ``scores`` [N, K] over the keys each query sees under ``visible`` ([N, Q, K] bool or a
    packed pattern, materialised: O(Q · K) per sequence, like the ``dense`` backend's mask).

    Example:
        >>> seen = torch.tensor([[[True, False, False], [True, True, False], [True, True, True]]])
        >>> state_mean(torch.tensor([[3.0, 1.0, 2.0]]), seen)
        tensor([[3., 2., 2.]])
    """
    dense = visible.dense() if isinstance(visible, PackedAttention) else visible
    weights = dense.to(scores.dtype)
    return torch.einsum("nqk,nk->nq", weights, scores) / weights.sum(-1).clamp(min=1.0)


class ValueModel(nn.Module):
    """A copy of a policy's transformer (no LM head) with a ``Linear(H, 1)`` head set to zero (weight and bias).

    ``forward(input_ids, position_ids, visible)`` → [N, Q] fp32 values, one per view column (``readout``: the
    head at the column, or its mean over the columns it sees); the caller picks the columns that predict its
    targets (``models.base.gather_positions`` with the policy's shift).

    Example:
        >>> value = ValueModel.from_policy(policy)          # doctest: +SKIP
        >>> value(ids, pos, visible).abs().max().item()     # doctest: +SKIP
        0.0
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int,
        *,
        encoder: bool = False,
        shift: bool = False,
        readout: str = "token",
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"unknown value readout '{readout}'; choose from {list(READOUTS)}")
        self.backbone = backbone
        # A bias, unlike TraceRL's head: raw rewards have a mean far from 0 (0.5 in the quickstart), which a
        # bias learns in a few steps; without one the backbone must build a constant direction first.
        self.head = nn.Linear(hidden_size, 1, bias=True)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).dtype)
        self.encoder = encoder  # masked LMs take a key-padding mask, not a 4D pattern
        self.shift = shift  # the policy's logit shift, so values are read where the policy reads logits
        self.readout = readout

    @classmethod
    def from_policy(cls, policy: Any, readout: str = "token") -> ValueModel:
        """A value model initialised from (a copy of) ``policy``'s backbone; the policy is left untouched."""
        if policy.family == "masked_lm":
            backbone = copy.deepcopy(policy.model.base_model)
            return cls(backbone, int(policy.model.config.hidden_size), encoder=True, readout=readout)
        backbone = copy.deepcopy(policy.backbone())
        return cls(backbone, int(backbone.config.hidden_size), shift=bool(policy.shift), readout=readout)

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
        scores = self.head(hidden).squeeze(-1).float()
        return scores if self.readout == "token" else state_mean(scores, visible)
