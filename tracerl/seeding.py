"""Seeds and per-sample random streams (DESIGN §6, §13, §17).

A run's randomness is addressed, not consumed. Every sample has its own seed, a function of the run seed, the
stage (RL rollout, evaluation), the RL step, the prompt's place in its batch and the sample's index in its group;
every random number a sampler draws for it is a function of that seed and of where in the sample's own decoding
it is drawn (a key such as (block, step), and the position in the block). So a sample's tokens do not depend on
which rollout actor drew it, what else was in its batch, or how many numbers were drawn before it, and a redone
or resumed step samples exactly what the lost one did.

    sample_seed(run_seed, step, prompt, sample)     the seed of sample g of prompt p at RL step s
    eval_seed(run_seed, prompt, sample, mode)        the same for a held-out evaluation (the same at every step)
    stage_seed(run_seed, step, stage)                one seed per RL step and stage (views, minibatch order)
    RowStreams(seeds).uniform(key, width)            [N, width] uniforms, row i from its own stream
    categorical(probs, u)                            one draw per row of ``probs`` from one uniform each

The uniforms come from a counter-based hash (integer arithmetic only), so the same seeds give the same numbers
on every device and every PyTorch build; what may still differ between machines is the model's arithmetic. The
renoising canvas sampler (DiffusionGemma, ``sampling/renoise.py``) is the exception: like transformers' ``generate``
it draws from one ``torch.Generator`` per sample, seeded from the same per-sample seed, so its draws do not depend
on the batch but may differ between a CPU and a GPU.

dims: N rows (samples) · W positions per draw · V vocab
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
STAGES = {"rollout": 1, "eval": 2, "views": 3, "minibatches": 4, "row": 5}  # stage ids mixed into seeds
EVAL_MODES = {"greedy": 1, "sampled": 2}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix(*words: int) -> int:
    """A 63-bit hash of a sequence of integers (splitmix64 folded over them); any ints, negative ones too.

    Example:
        >>> mix(0, 1) == mix(0, 1) != mix(1, 0)
        True
    """
    h = 0x6A09E667F3BCC908
    for w in words:
        h = _splitmix64(h ^ (int(w) & MASK64))
    return h >> 1


def sample_seed(run_seed: int, step: int, prompt: int, sample: int) -> int:
    """The seed of sample ``sample`` (0..G-1) of prompt ``prompt`` (its place in the step's batch, 0..P-1) at RL
    step ``step`` of a run seeded ``run_seed``: the same whoever samples it, and in a resumed run."""
    return mix(run_seed, STAGES["rollout"], step, prompt, sample)


def eval_seed(run_seed: int, prompt: int, sample: int, mode: str = "sampled") -> int:
    """The seed of sample ``sample`` of held-out prompt ``prompt`` (its index in the evaluation set) in an evaluation
    of ``mode`` (greedy / sampled). It does not depend on the RL step: every evaluation of a run draws with the
    same numbers, so two checkpoints are compared on the same draws (a paired comparison), and ``tracerl eval``
    of a model gives the loop's numbers for it."""
    return mix(run_seed, STAGES["eval"], EVAL_MODES[mode], prompt, sample)


def stage_seed(run_seed: int, step: int, stage: str) -> int:
    """One seed per RL step and stage (``views``: d1 / random masks; ``minibatches``: row order)."""
    return mix(run_seed, STAGES[stage], step)


def batch_seeds(run_seed: int, step: int, prompts: int, samples: int) -> list[int]:
    """Seeds of a whole RL step's batch, prompt-major ([P·G], sample g of prompt p at p·G + g)."""
    return [sample_seed(run_seed, step, p, g) for p in range(prompts) for g in range(samples)]


def eval_seeds(run_seed: int, prompts: int, samples: int, mode: str) -> list[int]:
    """Seeds of an evaluation's draws, prompt-major ([P·n])."""
    return [eval_seed(run_seed, p, g, mode) for p in range(prompts) for g in range(samples)]


def row_seeds(seed: int, n: int) -> list[int]:
    """Seeds of ``n`` rows from one seed (what ``sampling.generate(..., seed=s)`` uses without explicit seeds)."""
    return [mix(seed, STAGES["row"], i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- streams


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 tensors holding 32-bit values, without int64 overflow (16-bit halves of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding 32-bit values; elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class RowStreams:
    """One random stream per row, addressed by a key: ``uniform(key, width)[i]`` depends only on row i's seed,
    the key and the width's positions, never on the other rows.

    Example:
        >>> both = RowStreams([7, 8]).uniform((0, 1), 3)
        >>> torch.equal(both[1], RowStreams([8]).uniform((0, 1), 3)[0]), both.shape, bool((both > 0).all())
        (True, torch.Size([2, 3]), True)
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        mixed = [_splitmix64(int(s) & MASK64) for s in seeds]
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.lo = torch.tensor([m & MASK32 for m in mixed], dtype=torch.long, device=self.device)  # [N]
        self.hi = torch.tensor([m >> 32 for m in mixed], dtype=torch.long, device=self.device)  # [N]
        self._positions: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def select(self, rows: Sequence[int] | slice) -> RowStreams:
        """The streams of a subset of rows (a sampler's batch of them)."""
        picked = self.seeds[rows] if isinstance(rows, slice) else [self.seeds[i] for i in rows]
        return RowStreams(picked, self.device)

    def _position_words(self, width: int) -> torch.Tensor:
        if width not in self._positions:
            pos = torch.arange(width, dtype=torch.long, device=self.device)
            self._positions[width] = hash32(hash32(pos ^ 0x2545F491) ^ 0x9E3779B9)
        return self._positions[width]

    def uniform(self, key: Sequence[int], width: int) -> torch.Tensor:
        """[N, width] float64 uniforms in (0, 1) with 53 random bits each, for draw ``key`` (e.g. (block, step,
        what)) at positions 0..width-1 of every row."""
        k = mix(*key)
        a = hash32(self.lo.unsqueeze(1) ^ (k & MASK32))  # [N, 1]
        a = hash32(a ^ self._position_words(width).unsqueeze(0))  # [N, W]
        a = hash32(a ^ self.hi.unsqueeze(1) ^ ((k >> 32) & MASK32))
        b = hash32(a ^ 0x68E31DA4)
        bits = (a >> 5) * (1 << 26) + (b >> 6)  # 27 + 26 = 53 bits
        return (bits.double() + 0.5) / float(1 << 53)


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: for each row of ``probs`` [..., V] (non-negative, any positive total) the index i with
    cdf[i-1] ≤ u·total < cdf[i], from one uniform ``u`` [...] in (0, 1). Zero-probability entries are never drawn.

    Example:
        >>> categorical(torch.tensor([[0.0, 0.25, 0.0, 0.75]] * 3), torch.tensor([0.1, 0.3, 0.9])).tolist()
        [1, 3, 3]
    """
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [..., V]
    top = cdf[..., -1:]
    target = torch.minimum(u.unsqueeze(-1).to(torch.float64) * top, torch.nextafter(top, torch.zeros_like(top)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
