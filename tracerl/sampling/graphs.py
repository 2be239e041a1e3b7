"""The block sampler's denoising step in fixed shapes, and its capture as a CUDA graph (``sampling.cuda_graph``).

A CUDA graph replays a recorded sequence of kernels on the same memory, so the recorded forward must have the
same shapes and read the same buffers at every step. The default cached step does not: its keys span the
valid prefix ``[0, hi)`` (a view whose width grows by a block), it writes the cache at a Python-int column,
and the cache's valid length is Python state. ``BlockForwards`` runs the same function with fixed shapes over
a full-width static cache (``StaticKVCache(..., full_width=True)``): queries of fixed width, keys over all W
columns (the attention mask hides the columns past the current block, so the function is unchanged), the
write columns a device tensor (``index_copy_``). Off CUDA, or with ``capture=False``, it runs that step
eagerly; this is how the CPU tests check it against the default path.

What is captured, on CUDA: one model forward per query width, namely the embedding, every decoder layer (its
keys/values written into the cache at the device columns, attention over the whole cache under the additive
mask), the final norm and the LM head on the last B queries (a static slice: ``logits_at``'s index gather checks
its positions on the host). The widths are B (a plain denoising step, or the clean write of an unfused commit)
and 2B (a step fused with the previous block's clean write). Inputs: token ids and position ids [N, Q], the
visibility pattern [N, Q, W] and the write columns [Q], copied into the graph's own buffers before each replay.
Output: the [N, B, V] logits (a clean write: its hidden states, unused), the graph's own buffer, which the next
replay overwrites. Not captured: the prompt prefill (its width depends on the prompts) and everything after the
logits, i.e. candidate sampling, remasking, the trace and the loop's stop checks. Those hold the host syncs
(``bool(tensor)``, ``nonzero``) that a capture cannot contain.

Capture fails or replays wrongly on a GPU when the captured forward does any of the following, so none may
be in it. A host sync (``.item()``, ``bool(tensor)``, a data-dependent shape): the lean forward has none, while
the transformers forward's mask handling and dynamic RoPE may (``graph_capturable`` refuses those models). A
Python-int index that changes per step: the write columns and the mask are data, not shapes. A buffer that
is (re)allocated after capture: the cache is allocated by the uncaptured first forward of the sampler call,
before any capture. RNG: the policy is in eval mode, with no dropout. The graphs live for one sampler call,
one set per batch size and cache width. Warm-up runs on a side stream with the call's real first inputs, so
its cache writes are the ones the first replay makes again.

dims: N sequences · Q query tokens of one forward · W cache columns · B block size · V vocab
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tracerl.models.cache import StaticKVCache
from tracerl.models.lean import lean_supported

WARMUP_RUNS = 3  # eager runs before capture (lazy cuBLAS / kernel initialisation happens outside the graph)


def graph_capturable(model: torch.nn.Module) -> bool:
    """True when a forward of ``model`` over a full-width static cache can be captured: it takes tracerl's lean
    forward (no host sync), and its rotary embedding is not dynamic (dynamic RoPE compares positions on the
    host)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    return lean_supported(model) and "dynamic" not in str(getattr(rotary, "rope_type", "default"))


class CapturedForward:
    """``fn(*inputs)`` recorded once as a CUDA graph, then replayed on new inputs of the same shapes.

    Built with the first real inputs: it warms ``fn`` up on a side stream, captures it, and the first call
    replays it. The returned tensor is the graph's output buffer, overwritten by the next replay.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
        self.inputs = tuple(x.clone() for x in inputs)  # the graph's own input buffers
        self.output = self._record(fn)

    def _record(self, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Warm up, capture ``fn`` on ``self.inputs``; the output buffer (capture runs no kernel)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return fn(*self.inputs)

    def _replay(self) -> None:
        self.graph.replay()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, x in zip(self.inputs, inputs, strict=True):
            if buffer.shape != x.shape:
                raise ValueError(f"a captured forward takes shape {tuple(buffer.shape)}, got {tuple(x.shape)}")
            buffer.copy_(x)
        self._replay()
        return self.output


class BlockForwards:
    """The block sampler's forwards over a full-width static cache, replayed as CUDA graphs where captured.

    ``logits`` runs queries [N, Q] (the clean columns not yet cached, then the block) and returns the logits
    of the last B queries; ``write`` only writes a clean block's keys/values. ``visible`` [N, Q, W] spans the
    whole cache; ``cols`` [Q] are the columns the queries occupy (and write).
    """

    def __init__(self, policy, kv: StaticKVCache, block: int, capture: bool) -> None:  # noqa: ANN001
        if not kv.full_width:
            raise ValueError("BlockForwards needs a full-width static cache (policy.new_cache(W, full_width=True))")
        self.policy, self.kv, self.block, self.capture = policy, kv, block, capture
        self.graphs: dict[tuple[str, int], CapturedForward] = {}  # (kind, query width) → its graph

    def _logits(self, ids: torch.Tensor, pos: torch.Tensor, vis: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        # a static slice, not ``logits_at``'s index gather: that one checks its positions on the host
        self.kv.write_at(cols)
        return self.policy.head(self.policy.hidden_states(ids, pos, vis, self.kv)[:, -self.block :])

    def _write(self, ids: torch.Tensor, pos: torch.Tensor, vis: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        self.kv.write_at(cols)
        return self.policy.hidden_states(ids, pos, vis, self.kv)

    def _run(self, kind: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        width = inputs[0].shape[1]
        # the prefill (any other width) and the very first forward, which allocates the cache, stay eager
        if not self.capture or width not in (self.block, 2 * self.block) or not self.kv.layers[0].is_initialized:
            return fn(*inputs)
        graph = self.graphs.get((kind, width))
        if graph is None:
            graph = self.graphs[kind, width] = CapturedForward(fn, inputs)
        return graph(*inputs)

    def logits(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """[N, B, V] logits of the last B of the Q queries."""
        return self._run("logits", self._logits, input_ids, position_ids, visible, cols)

    def write(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor, cols: torch.Tensor
    ) -> None:
        """Write the queries' keys/values into the cache (a clean block, or the prompt prefill)."""
        self._run("write", self._write, input_ids, position_ids, visible, cols)
