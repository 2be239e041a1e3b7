"""A static (preallocated) key/value cache that transformers decoders write in place (DESIGN §6, §15).

transformers' ``DynamicCache`` appends by concatenation, so every denoising step that appends a block and is
cropped again copies the whole cache. ``StaticKVCache`` holds one ``[N, H, W, D]`` buffer per layer at the
final width ``W``: a forward writes its ``Q`` keys/values into columns ``[at, at + Q)`` in place and attends
over the valid columns ``[0, max(length, at + Q))`` only, as a view. ``crop`` just moves the valid length, so
the samplers' "append the block, then drop it again" costs no copy. By default a forward appends at the valid
length (the ``DynamicCache`` contract, so ``truncate_cache`` works on both); ``seek(col)`` makes the next
forwards overwrite columns from ``col`` instead (the dual cache's refresh of one block inside a full sequence).

``full_width=True`` is the mode a CUDA graph can replay: a forward writes its keys/values at the columns of a
device tensor (``write_at(cols)``, an ``index_copy_``) and attends over all ``W`` columns, so its shapes and
its Python state do not change from one denoising step to the next; the attention mask must hide the columns
that hold nothing valid yet (never-written columns hold zeros, so they stay finite under the mask).

dims: N sequences · H key/value heads · W width (columns) · Q query tokens of one forward · D head dim
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class StaticKVLayer(CacheLayerMixin):
    """One layer's keys/values [N, H, W, D], allocated on the first write."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, width: int, full_width: bool = False) -> None:
        super().__init__()
        self.width = width
        self.full_width = full_width  # every forward attends over all columns (the mask hides the invalid ones)
        self.length = width if full_width else 0  # valid columns [0, length)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = torch.zeros((n, h, self.width, d), dtype=key_states.dtype, device=self.device)
        dv = value_states.shape[-1]
        self.values = torch.zeros((n, h, self.width, dv), dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        at: int | None = None,
        cols: torch.Tensor | None = None,
        **_: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [N, H, Q, D] at columns [at, at + Q) (``at=None``: append at the valid length) → valid views.

        With ``cols`` (a [Q] long device tensor) write at those columns instead and return the whole [N, H, W, D]
        buffers: no host-side index, no Python state change (the full-width mode a CUDA graph replays).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if cols is not None:
            self.keys.index_copy_(2, cols, key_states)
            self.values.index_copy_(2, cols, value_states)
            return self.keys, self.values
        at = self.length if at is None else at
        stop = at + key_states.shape[-2]
        if stop > self.width:
            raise ValueError(
                f"a forward writes up to column {stop} but the static cache was allocated {self.width} wide"
            )
        self.keys[:, :, at:stop].copy_(key_states)
        self.values[:, :, at:stop].copy_(value_states)
        self.length = max(self.length, stop)
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.width if self.full_width else self.length + query_length), 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.width

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` columns (negative, as ``DynamicLayer.crop``); no data moves."""
        if self.full_width:
            raise ValueError("a full-width static cache attends over all its columns; it is not cropped")
        self.length = max(0, self.length - abs(tokens_to_remove))


class StaticKVCache(Cache):
    """Preallocated, in-place key/value cache for ``num_layers`` layers of width ``width`` columns.

    Example:
        >>> cache = StaticKVCache(num_layers=1, width=6)
        >>> k = torch.ones(1, 1, 4, 2)
        >>> cache.update(k, k, 0)[0].shape[-2], cache.get_seq_length()
        (4, 4)
        >>> cache.crop(-2); cache.get_seq_length()
        2
        >>> cache.update(2 * k[:, :, :3], 2 * k[:, :, :3], 0)[0][0, 0, :, 0].tolist()  # appended at column 2
        [1.0, 1.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, num_layers: int, width: int, full_width: bool = False) -> None:
        super().__init__(layers=[StaticKVLayer(width, full_width) for _ in range(num_layers)])
        self.full_width = full_width  # attend over all columns; write where ``write_at`` says
        self.at: int | None = None  # column the next forwards write from; None: append at the valid length
        self.cols: torch.Tensor | None = None  # full width: [Q] device columns the next forwards write

    def seek(self, col: int | None) -> None:
        """Make the following forwards write their keys/values from column ``col`` (None: append)."""
        if self.full_width:
            raise ValueError("a full-width static cache writes at device columns: use write_at(cols), not seek")
        self.at = col

    def write_at(self, cols: torch.Tensor) -> None:
        """Full width: make the following forwards write their Q keys/values at columns ``cols`` [Q] (long, on
        the cache's device). The tensor is read when the forward runs, so a CUDA graph captured with it writes
        wherever its contents say at each replay."""
        if not self.full_width:
            raise ValueError("write_at(cols) is for a full-width static cache (StaticKVCache(..., full_width=True))")
        self.cols = cols

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.full_width:
            if self.cols is None:
                raise ValueError("a full-width static cache needs write_at(cols) before its first forward")
            return self.layers[layer_idx].update(key_states, value_states, cols=self.cols)
        return self.layers[layer_idx].update(key_states, value_states, at=self.at)
