"""The DiffusionPolicy protocol and the adapter shared by the decoder families (DESIGN §5).

A policy answers one question for the samplers and the learner: "what are the logits at these positions,
given these tokens, position ids and this attention pattern?". It computes the LM head only at the requested
positions, because full-vocab logits for every position are the memory wall of dLLM RL.

dims: N sequences · T tokens in the forward · Q query tokens · K key tokens (cache + query) · H hidden · V vocab
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tracerl.models.attention import PackedAttention, backbone_hidden_states
from tracerl.models.cache import StaticKVCache
from tracerl.models.lean import lean_hidden_states, lean_supported


@runtime_checkable
class DiffusionPolicy(Protocol):
    """What samplers and learners need from a diffusion LM, whatever its family."""

    family: str  # registry name of the family
    mask_id: int  # id of the mask token the model denoises
    pad_id: int  # id used for left padding of prompts and unused response slots
    eos_id: int  # end of sequence
    vocab_size: int  # size of the LM head
    block_size: int | None  # None: full bidirectional attention; else block-causal with this block size
    shift: bool  # True when logits for position i come from hidden state i-1 (AR-initialised, Dream)
    supports_cache: bool  # True when key/value caches can be kept between calls
    device: torch.device  # where the parameters live
    model: nn.Module
    tokenizer: Any

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor, cache: Any = None
    ) -> torch.Tensor:
        """[N, Q, H] final hidden states; ``visible`` [N, Q, K] bool says which keys each query sees (or, for packed
        training views without a cache, a ``models.attention.PackedAttention`` pattern)."""
        ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on any [..., H] hidden states → [..., V] logits."""
        ...

    def logits_at(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visible: torch.Tensor,
        positions: torch.Tensor,
        cache: Any = None,
    ) -> torch.Tensor:
        """Logits predicting the token *at* ``positions`` (query coordinates).

        ``positions`` is an index tensor [N, M] → [N, M, V], or a bool mask [N, Q] → [n_true, V] (row-major).
        """
        ...

    def new_cache(self, width: int | None = None, full_width: bool = False) -> Any:
        """An empty key/value cache for ``hidden_states(..., cache=...)``: growing (``DynamicCache``) when
        ``width`` is None, else preallocated ``width`` columns wide and written in place (``StaticKVCache``;
        ``full_width``: attended over every column, written at device columns, the CUDA-graph mode)."""
        ...


def truncate_cache(cache: Any, length: int) -> None:
    """Drop cached keys/values beyond the first ``length`` positions (in place)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def cache_argument(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes a key/value cache: ``cache`` in transformers' models
    (``past_key_values`` is deprecated there), ``past_key_values`` for a forward that names it so (custom code)."""
    name = _CACHE_ARGUMENT.get(type(module))
    if name is None:
        name = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
        _CACHE_ARGUMENT[type(module)] = name
    return name


_CACHE_ARGUMENT: dict[type, str] = {}


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, Q, K] bool → [N, 1, Q, K] additive mask (0 where visible, most negative value elsewhere).

    Additive masks behave the same under the eager and SDPA attention kernels.
    """
    out = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    out.masked_fill_(~visible, torch.finfo(dtype).min)
    return out.unsqueeze(1)


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor, shift: bool) -> torch.Tensor:
    """Pick the hidden states that predict ``positions``; with ``shift`` the state one to the left does."""
    offset = 1 if shift else 0
    if positions.dtype == torch.bool:
        if shift:
            if bool(positions[:, 0].any()):
                raise ValueError("a shifted (AR-initialised) model cannot predict the first query position")
            positions = torch.roll(positions, -1, dims=1)
        return hidden[positions]
    idx = positions - offset
    if bool((idx < 0).any()):
        raise ValueError("a shifted (AR-initialised) model cannot predict the first query position")
    return torch.gather(hidden, 1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


class DecoderPolicy:
    """A transformers decoder (Llama / Qwen2 / Qwen3 class) used as a bidirectional or block diffusion LM.

    The attention pattern is supplied as a 4D mask on every call, so the same native class serves LLaDA
    (full), Dream (full, shifted logits) and SDAR (block-causal); key/value caches are transformers' own
    ``DynamicCache`` or tracerl's preallocated ``StaticKVCache``. With the static cache, a plain Llama / Qwen2 /
    Qwen3 model runs ``tracerl.models.lean``'s forward: the same function in far fewer operator calls.
    """

    supports_cache = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        family: str,
        mask_id: int,
        block_size: int | None,
        shift: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.mask_id = int(mask_id)
        self.block_size = block_size
        self.shift = shift
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def backbone(self) -> nn.Module:
        """The transformer without its LM head (``model.model`` for every transformers decoder)."""
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor, cache: Any = None
    ) -> torch.Tensor:
        backbone = self.backbone()
        if isinstance(visible, PackedAttention):  # packed training views: block-sparse, no cache
            return backbone_hidden_states(backbone, input_ids, position_ids, visible)
        mask = additive_mask(visible, self.dtype)
        if isinstance(cache, StaticKVCache) and lean_supported(self.model):
            return lean_hidden_states(backbone, input_ids, position_ids, mask, cache)
        out = backbone(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=cache is not None,
            **{cache_argument(backbone): cache},
        )
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def logits_at(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visible: torch.Tensor,
        positions: torch.Tensor,
        cache: Any = None,
    ) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, position_ids, visible, cache)
        return self.head(gather_positions(hidden, positions, self.shift))

    def new_cache(self, width: int | None = None, full_width: bool = False) -> Any:
        if width is not None:
            return StaticKVCache(self.model.config.num_hidden_layers, width, full_width=full_width)
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)
