"""Any Hugging Face masked LM (BERT, RoBERTa, ModernBERT, ...) as a full-attention diffusion policy.

Encoders take a key-padding mask, not a 4D pattern, and have no key/value cache, so this adapter supports the
full-attention sampler without a prefix cache. A one-step-trained denoiser is still a valid policy.

dims: N sequences · Q tokens · K keys (= Q) · H hidden · V vocab
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from tracerl.models.base import gather_positions


class MaskedLMPolicy:
    """Adapter for ``AutoModelForMaskedLM`` models."""

    family = "masked_lm"
    block_size = None
    shift = False
    supports_cache = False

    def __init__(self, model: nn.Module, tokenizer: Any, *, mask_id: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.mask_id = int(mask_id)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        # A full-attention pattern is a key-padding mask: a key is valid if any query may see it.
        kwargs = {"position_ids": position_ids} if self._takes_positions else {}
        key_valid = visible.any(dim=1).long()  # [N, K]
        return self.model(input_ids=input_ids, attention_mask=key_valid, **kwargs).logits

    def hidden_states(self, input_ids, position_ids, visible, cache=None):  # noqa: ANN001, ANN201
        raise NotImplementedError("masked_lm policies expose logits only; use logits_at")

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("masked_lm policies expose logits only; use logits_at")

    def logits_at(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visible: torch.Tensor,
        positions: torch.Tensor,
        cache: Any = None,
    ) -> torch.Tensor:
        if cache is not None:
            raise ValueError("masked_lm models have no key/value cache; use sampling.cache=none")
        return gather_positions(self._logits(input_ids, position_ids, visible), positions, shift=False)

    def new_cache(self, width: int | None = None, full_width: bool = False) -> Any:
        raise ValueError("masked_lm models have no key/value cache; use sampling.cache=none")
