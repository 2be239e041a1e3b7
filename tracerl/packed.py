"""Packed training views of the block layout: every denoising state of a sample computed once (DESIGN §20).

The block layout's rows (``trace.build_views``) are R rows of ``[prompt | clean | noisy copy of round r]`` per
sample: the prompt and the clean copy are the same in every row and give the same hidden states, because the
clean copy is block-causal and never sees a noisy copy. A packed view is one sequence per sample

    [clean context: prompt + generated response | noisy segment | noisy segment | …]

where a noisy segment is one block of one round that holds targets of that round, in the state before the round's
step (positions committed at that step or later masked); segments are ordered by block, then round. A block
without targets in a round is left out: its noisy copy is seen by nothing else (a noisy block sees only earlier
clean blocks and itself). The attention pattern (``models.attention.PackedAttention``) lets every column see
exactly what it sees in its row, so the log-probs are the rows' (the replay invariant; tests compare them to
1e-5 in fp32).

A sample whose packed sequence exceeds the token budget is split into chunks of segments, each chunk with its own
copy of the clean context. Full-attention views are not packed: there the prompt attends to the response state of
its row, so no part of a row is shared with another row.

dims: N samples · Lp prompt length · L response length · B block size · R rows (sample, round) · S sequences ·
T columns (C clean + K·B noisy) · K noisy segments · M targets
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracerl.models.attention import PackedAttention
from tracerl.records import Rollout
from tracerl.trace import ModelInputs, RowMasks, TargetTable


@dataclass
class PackedViews:
    """Packed block-layout views: sequences padded to ``clean`` clean columns and ``segments`` noisy segments."""

    input_ids: torch.Tensor  # [S, T] long
    position_ids: torch.Tensor  # [S, T] long, the sampler's absolute positions (a segment shares its block's)
    col_block: torch.Tensor  # [S, T] long, absolute block of each column (a noisy column: the block it renoises)
    col_valid: torch.Tensor  # [S, T] bool, a real token
    target_mask: torch.Tensor  # [S, T] bool
    target_ids: torch.Tensor  # [S, T] long
    target_row: torch.Tensor  # [S, T] long, the row (sample, round) of each target; -1 elsewhere
    target_pos: torch.Tensor  # [S, T] long, response position of each target; -1 elsewhere
    seq_clean: torch.Tensor  # [S] long, real clean columns of each sequence (prompt + generated response)
    seq_segments: torch.Tensor  # [S] long, noisy segments of each sequence
    seq_sample: torch.Tensor  # [S] long, the sample of each sequence
    row_sample: torch.Tensor  # [R] long
    row_step: torch.Tensor  # [R] long, the round of each row
    clean: int  # C, clean columns of the padded layout
    block: int  # B
    attention: str = "grouped"  # PackedAttention backend: grouped | flex | dense
    layout: str = "packed"
    shift: bool = False

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_rows(self) -> int:
        return len(self.row_sample)

    def seq_tokens(self) -> torch.Tensor:
        """[S] tokens each sequence puts through the model (its own clean context and segments)."""
        return self.seq_clean + self.seq_segments * self.block

    def columns(self, seqs: torch.Tensor) -> torch.Tensor:
        """The columns a micro-batch of ``seqs`` needs: their widest clean context and their most segments."""
        c = int(self.seq_clean[seqs].max()) if len(seqs) else 0
        k = int(self.seq_segments[seqs].max()) if len(seqs) else 0
        return torch.cat([torch.arange(c), self.clean + torch.arange(k * self.block)])

    def model_inputs(self, seqs: torch.Tensor) -> ModelInputs:
        """The scorer's inputs for sequences ``seqs``, trimmed to the columns they use."""
        cols = self.columns(seqs)
        rows = seqs.unsqueeze(1)
        clean = int(self.seq_clean[seqs].max()) if len(seqs) else 0
        pattern = PackedAttention(
            clean, self.block, self.col_block[rows, cols], self.col_valid[rows, cols], backend=self.attention
        )
        return ModelInputs(
            self.input_ids[rows, cols],
            self.position_ids[rows, cols],
            pattern,
            self.target_mask[rows, cols],
            self.target_ids[rows, cols],
        )

    def targets(self) -> TargetTable:
        """Every target, sequence by sequence and by column (the order a scorer returns them)."""
        seqs, cols = self.target_mask.nonzero(as_tuple=True)
        rows = self.target_row[seqs, cols]
        start = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(self.target_mask.sum(1), 0)])
        return TargetTable(rows, self.row_sample[rows], self.target_pos[seqs, cols], start)


def pack_views(
    rollout: Rollout, masks: RowMasks, mask_id: int, *, max_tokens: int | None = None, attention: str = "grouped"
) -> PackedViews:
    """Pack the block-layout rows described by ``masks`` one sequence per sample (see the module docstring).

    Args:
        rollout: a block-layout rollout; masks: the view builder's rows (``prompt_masked`` must be None: a masked
            prompt is part of a row's own context and cannot be shared).
        max_tokens: split a sample whose sequence would be longer into chunks of segments (each at least one
            segment, each with the clean context); None: never.
        attention: the ``PackedAttention`` backend the sequences run with.
    """
    if rollout.layout != "block":
        raise ValueError("packed views are for the block layout; full-attention rows share nothing (see trace.py)")
    if masks.prompt_masked is not None:
        raise ValueError("packed views need unmasked prompts: a masked prompt belongs to one row's context")
    b = rollout.block_size
    lp_all, lp_max = rollout.prompt_lengths, rollout.prompt_ids.shape[1]
    n_gen_all = (rollout.step_map >= 0).sum(1)  # generated positions form a prefix of the response
    pad = int(rollout.sampler.get("pad_id", 0))
    parts: list[dict[str, torch.Tensor]] = []
    for i in range(len(rollout)):
        rows = (masks.sample == i).nonzero().squeeze(1)
        if not len(rows):  # no targets: the sample trains nothing
            continue
        lp, n_gen = int(lp_all[i]), int(n_gen_all[i])
        prompt = rollout.prompt_ids[i, lp_max - lp :]
        response = rollout.response_ids[i, :n_gen]
        context = torch.cat([prompt, response])  # the clean context, column = absolute position
        # noisy segments: (row, block) pairs that hold targets, by row then block
        target = masks.target[rows, :n_gen]  # [r, n_gen]
        if not bool(target.any()):  # rows without a target among the generated positions: nothing to score
            continue
        block_of = (lp + torch.arange(n_gen)) // b
        has = torch.zeros((len(rows), int(block_of.max()) + 1), dtype=torch.bool)  # [r, blocks]: targets there
        has[torch.arange(len(rows)).unsqueeze(1).expand_as(target)[target], block_of.expand_as(target)[target]] = True
        seg_block, seg_row = has.t().nonzero(as_tuple=True)  # [K], by block then round: groups need few blocks
        abs_pos = seg_block.unsqueeze(1) * b + torch.arange(b)  # [K, B] absolute positions of each segment
        j = abs_pos - lp  # response position (negative: the prompt's tail in the first decoding block)
        in_prompt, in_response = j < 0, (j >= 0) & (j < n_gen)
        jc = j.clamp(0, max(n_gen - 1, 0))
        seg_rows = rows[seg_row].unsqueeze(1)  # [K, 1] the row each segment belongs to
        masked = masks.masked[seg_rows, jc] & in_response
        tokens = torch.where(in_prompt, prompt[abs_pos.clamp(max=lp - 1)], pad)
        tokens = torch.where(in_response, torch.where(masked, mask_id, response[jc]), tokens)
        seg_target = masks.target[seg_rows, jc] & in_response
        per_chunk = len(seg_row) if max_tokens is None else max(1, (max_tokens - len(context)) // b)
        for lo in range(0, len(seg_row), per_chunk):
            k = slice(lo, lo + per_chunk)
            parts.append(
                {
                    "sample": torch.tensor(i),
                    "context": context,
                    "seg_tokens": tokens[k],
                    "seg_pos": abs_pos[k],
                    "seg_block": seg_block[k],
                    "seg_valid": (in_prompt | in_response)[k],
                    "seg_target": seg_target[k],
                    "seg_target_ids": torch.where(in_response, response[jc], 0)[k],
                    "seg_row": rows[seg_row][k],
                    "seg_pos_resp": j[k],
                }
            )
    return _assemble(parts, masks, b, attention)


def _assemble(parts: list[dict[str, torch.Tensor]], masks: RowMasks, b: int, attention: str) -> PackedViews:
    """Lay the sequences out on one padded grid: clean columns [0, C), then K segments of B columns."""
    s = len(parts)
    c = max((len(p["context"]) for p in parts), default=0)
    k = max((len(p["seg_tokens"]) for p in parts), default=0)
    t = c + k * b
    input_ids = torch.zeros((s, t), dtype=torch.long)
    position_ids = torch.zeros((s, t), dtype=torch.long)
    col_block = torch.zeros((s, t), dtype=torch.long)
    col_valid = torch.zeros((s, t), dtype=torch.bool)
    target_mask = torch.zeros((s, t), dtype=torch.bool)
    target_ids = torch.zeros((s, t), dtype=torch.long)
    target_row = torch.full((s, t), -1, dtype=torch.long)
    target_pos = torch.full((s, t), -1, dtype=torch.long)
    for i, p in enumerate(parts):
        n, kk = len(p["context"]), len(p["seg_tokens"])
        input_ids[i, :n] = p["context"]
        position_ids[i, :n] = torch.arange(n)
        col_block[i, :n] = torch.arange(n) // b
        col_valid[i, :n] = True
        seg = slice(c, c + kk * b)
        input_ids[i, seg] = p["seg_tokens"].flatten()
        position_ids[i, seg] = p["seg_pos"].flatten()
        col_block[i, seg] = p["seg_block"].repeat_interleave(b)
        col_valid[i, seg] = p["seg_valid"].flatten()
        target_mask[i, seg] = p["seg_target"].flatten()
        target_ids[i, seg] = p["seg_target_ids"].flatten()
        target_row[i, seg] = torch.where(p["seg_target"], p["seg_row"].unsqueeze(1), -1).flatten()
        target_pos[i, seg] = torch.where(p["seg_target"], p["seg_pos_resp"], -1).flatten()
    none = torch.zeros(0, dtype=torch.long)
    return PackedViews(
        input_ids,
        position_ids,
        col_block,
        col_valid,
        target_mask,
        target_ids,
        target_row,
        target_pos,
        torch.tensor([len(p["context"]) for p in parts], dtype=torch.long) if parts else none,
        torch.tensor([len(p["seg_tokens"]) for p in parts], dtype=torch.long) if parts else none,
        torch.stack([p["sample"] for p in parts]) if parts else none,
        masks.sample,
        masks.step,
        c,
        b,
        attention,
    )
