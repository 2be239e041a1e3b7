"""Can the value model predict a task's rewards? Train only the value model (the policy stays frozen) on fresh
rollouts of one policy, and measure, step by step, the explained variance of its values on a batch it has
never trained on (before the update: what ``value/explained_var`` logs in training) and on the batch it has just
trained on (after the update: whether it fits at all).

    .venv/bin/python scripts/value_probe.py configs/quickstart.yaml model.path=<sft>/final [key=value ...]
        [--steps 40] [--targets centered,reward] [--seed 0]

It also splits the raw reward's variance into the part between prompts (what the group mean predicts) and the
part within groups (what the ``centered`` target asks the value model to predict). A value model whose
after-update explained variance rises while the before-update one stays near 0 learns, but what it learns on one
batch does not carry to the next: the rewards are not predictable from the states by this model from this much
data. One whose after-update explained variance stays near 0 does not learn.

Rewards come from the config's ``reward.functions``, as in training, so the probe runs on a task of your own.
Beside them it prints how much of the variance any value could explain on the same batches:

- ``--oracle-samples K`` (default 32 where an oracle exists, else off): an oracle that knows the answer, on tasks
  whose tokens are one character each and whose reward counts the positions written right
  (``synthetic:sudoku4`` with ``sudoku_cells``, the quickstart; ``synthetic:copy`` with ``digit_accuracy``). It
  reads every digit committed so far as right or wrong, and expects each cell still to come to be right as often
  as K fresh samples of the same prompt got it right; every token (``oracle_batch``).
- ``--mc-samples K`` (default 0: off, it costs K generations per block and sample): the policy's own value
  V^π(s) = E[reward | s], the best any function of the state can predict, by K continuations of each state at a
  block start (``block_start_values``); the block layout, with prompts that fill whole blocks.

    .venv/bin/python scripts/value_probe.py configs/quickstart.yaml model.path=<sft>/final --steps 10 \
        --targets centered --mc-samples 32
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variance_split(rewards: torch.Tensor, group: torch.Tensor) -> tuple[float, float]:
    """(total variance, within-group variance) of ``rewards`` [N] (population variances; groups of equal size).

    Example:
        >>> variance_split(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
        (0.1875, 0.125)
    """
    r = rewards.double()
    sums = torch.zeros(int(group.max()) + 1, dtype=r.dtype).index_add_(0, group, r)
    means = sums / torch.bincount(group).to(r.dtype)
    return float(r.var(unbiased=False)), float((r - means[group]).pow(2).mean())


def sudoku_token_cells(
    token_texts: list[list[str]], puzzles: list[str], solutions: list[str], mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each response position means for ``sudoku_cells`` when every token is one character (the tiny model's
    tokenizer) → (blank [N, L]: a blank cell of the puzzle, right [N, L]: a blank cell filled right, spoiler [N, L]:
    a token that makes the sample score 0: a changed clue or separator, or a character after the grid).
    ``token_texts[i][j]`` is position j's text ("" for EOS and padding); ``mask`` [N, L] the generated positions.

    Example:
        >>> texts = [list("13 43") + [""], list("12 4") + ["", ""]]  # the second drops the clue 3
        >>> b, r, s = sudoku_token_cells(texts, ["1. .3"] * 2, ["12 43"] * 2, torch.ones(2, 6, dtype=torch.bool))
        >>> b.int().tolist()
        [[0, 1, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0]]
        >>> r.int().tolist(), s.int().tolist()
        ([[0, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0]], [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]])
    """
    n, length = mask.shape
    blank, right, spoiler = (torch.zeros(n, length, dtype=torch.bool) for _ in range(3))
    for i, (texts, puzzle, solution) in enumerate(zip(token_texts, puzzles, solutions, strict=True)):
        for j in range(length):
            if not mask[i, j]:
                continue
            text = texts[j]
            if j >= len(solution):
                spoiler[i, j] = text.strip() != ""
            elif puzzle[j] == ".":
                blank[i, j], right[i, j] = True, text == solution[j]
            else:
                spoiler[i, j] = text != solution[j]
    return blank, right, spoiler


def copy_token_cells(
    token_texts: list[list[str]], answers: list[str], mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sudoku_token_cells`` for ``synthetic:copy`` scored by ``digit_accuracy``: every answer position is a cell,
    right when its character is the answer's there; nothing is a spoiler. Positions are aligned from the left, which
    is ``digit_accuracy``'s alignment (from the right) for completions of the answer's length.

    Example:
        >>> b, r, s = copy_token_cells([list("4081") + [""]], ["4071"], torch.ones(1, 5, dtype=torch.bool))
        >>> b.int().tolist(), r.int().tolist(), s.any().item()
        ([[1, 1, 1, 1, 0]], [[1, 1, 0, 1, 0]], False)
    """
    n, length = mask.shape
    blank, right = (torch.zeros(n, length, dtype=torch.bool) for _ in range(2))
    for i, (texts, answer) in enumerate(zip(token_texts, answers, strict=True)):
        for j in range(min(len(answer), length)):
            if mask[i, j]:
                blank[i, j], right[i, j] = True, texts[j] == answer[j]
    return blank, right, torch.zeros(n, length, dtype=torch.bool)


def oracle_cells(cfg: Any) -> Callable[[list[list[str]], list[str], list[str], torch.Tensor], tuple] | None:
    """The cell reader of the oracle for this config's task and reward, ``cells(token_texts, prompts, answers,
    mask)`` → (blank, right, spoiler); None where there is no oracle (any other task, or more than one reward)."""
    names = [f.fn for f in cfg.reward.functions]
    if cfg.data.source == "synthetic:sudoku4" and names == ["sudoku_cells"]:
        return lambda texts, prompts, answers, mask: sudoku_token_cells(
            texts, [str(p).split(":")[0] for p in prompts], [str(a) for a in answers], mask
        )
    if cfg.data.source == "synthetic:copy" and names == ["digit_accuracy"]:
        return lambda texts, prompts, answers, mask: copy_token_cells(texts, [str(a) for a in answers], mask)
    return None


def sudoku_oracle_values(
    blank: torch.Tensor,
    right: torch.Tensor,
    spoiler: torch.Tensor,
    steps: torch.Tensor,
    mask: torch.Tensor,
    rate: torch.Tensor,
    clean_rate: torch.Tensor,
) -> torch.Tensor:
    """[N, L] an oracle's value of the state each token was committed from (the tokens of earlier steps): 0 once a
    spoiler is committed; else (the right blank cells committed + Σ over blank cells to come of ``rate``) / blank
    cells, times ``clean_rate``. ``blank``, ``right``, ``spoiler`` as ``sudoku_token_cells`` gives them, ``steps``
    [N, L] the commit step of each position (−1: none), ``mask`` [N, L] the tokens that get a value; ``rate`` [N, L]
    how often the policy gets each cell of the sample's puzzle right and ``clean_rate`` [N] how often it writes no
    spoiler, measured on other samples of the same puzzle (``group_rates``).

    Example (two blank cells, committed one per step, the first right; the policy gets each right half the time):
        >>> blank, right = torch.tensor([[True, True]]), torch.tensor([[True, False]])
        >>> steps, none = torch.tensor([[0, 1]]), torch.zeros(1, 2, dtype=torch.bool)
        >>> rate, clean = torch.tensor([[0.5, 0.5]]), torch.tensor([1.0])
        >>> sudoku_oracle_values(blank, right, none, steps, ~none, rate, clean).tolist()
        [[0.5, 0.75]]
    """
    r, b = right.double(), blank.double()
    # committed[i, j, c]: position c was committed before the state of token j (an earlier step)
    committed = (steps.unsqueeze(1) >= 0) & (steps.unsqueeze(1) < steps.unsqueeze(2))
    known = (committed.double() * (r * b).unsqueeze(1)).sum(-1)
    expected = ((~committed).double() * (rate.double() * b).unsqueeze(1)).sum(-1)
    spoilt = (committed & spoiler.unsqueeze(1)).any(-1)
    values = (known + expected) / b.sum(1, keepdim=True).clamp(min=1) * clean_rate.double().unsqueeze(1)
    return torch.where(spoilt | ~mask, 0.0, values).float()


def group_rates(right: torch.Tensor, spoiler: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (``group`` [N] in 0..G−1): how often each position is a blank cell filled right [G, L], and how
    often a sample has no spoiler [G].

    Example:
        >>> right = torch.tensor([[True, False], [True, True], [False, False]])
        >>> rate, clean = group_rates(right, torch.tensor([[False, True], [False, False], [False, False]]),
        ...                           torch.tensor([0, 0, 1]))
        >>> rate.tolist(), clean.tolist()
        ([[1.0, 0.5], [0.0, 0.0]], [0.5, 1.0])
    """
    num = int(group.max()) + 1
    count = torch.bincount(group, minlength=num).double().clamp(min=1)
    rate = torch.zeros(num, right.shape[1], dtype=torch.float64).index_add_(0, group, right.double())
    clean = torch.zeros(num, dtype=torch.float64).index_add_(0, group, (~spoiler.any(1)).double())
    return (rate / count.unsqueeze(1)).float(), (clean / count).float()


def oracle_metrics(
    values: torch.Tensor,
    rewards: torch.Tensor,
    group: torch.Tensor,
    mask: torch.Tensor,
    target: str,
    advantage: str = "group_zscore",
    noise: torch.Tensor | None = None,
) -> tuple[float, float]:
    """(explained variance, GAE advantage variance / the group baseline's) of oracle ``values`` [N, L] (expected raw
    rewards) under value ``target`` (``centered``: values and returns minus the group's mean reward), over
    ``mask``, the advantages scaled per group as ``advantage`` scales them (``advantages.value_outcome``), as
    training logs ``value/explained_var`` and ``value/advantage_var_ratio``. With ``noise`` [N, L], the variances
    of Monte Carlo ``values``, the explained variance is that of the exact values (``debiased_explained_variance``).

    Example (a perfect oracle explains everything and leaves no advantage variance):
        >>> r, g = torch.tensor([1.0, 0.0, 0.5, 0.0]), torch.tensor([0, 0, 1, 1])
        >>> oracle_metrics(r.unsqueeze(1), r, g, torch.ones(4, 1, dtype=torch.bool), "centered")
        (1.0, 0.0)
    """
    from tracerl import advantages as adv_lib

    r = rewards.float()
    _, baseline, scale = adv_lib.value_outcome(r, group, "centered", advantage)
    mean = (r - adv_lib.group_mean(r, group)).double().unsqueeze(1)  # [N, 1] each sample's group mean
    returns, v = r.double().unsqueeze(1).expand_as(values), values.double()
    if target != "reward":
        returns, v = returns - mean, v - mean
    ev = (
        adv_lib.explained_variance(v, returns, mask)
        if noise is None
        else debiased_explained_variance(v, noise, returns, mask)
    )
    adv = (returns - v) * scale.double().unsqueeze(1)
    base_var = baseline.double().unsqueeze(1).expand_as(values)[mask].var(unbiased=False)
    ratio = float(adv[mask].var(unbiased=False) / base_var) if base_var > 0 else 1.0
    return ev, ratio


NO_BLOCKS = (
    "--mc-samples continues the state at each block start, which a full-attention model does not have (its every "
    "step sees the whole canvas); give a block-layout model, or pass --mc-samples 0."
)


def block_start_values(
    policy: Any,
    sampling: Any,
    prompts: list[list[int]],
    rollout: Any,
    score: Callable[[list[int], list[str]], list[float]],
    samples: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] the policy's own value V^π(s) = E[reward | s] of the state each block's first token was committed from
    (the prompt and the blocks before it, all clean), by Monte Carlo: ``samples`` continuations of that state, sampled
    with ``sampling`` from the prompt extended by those blocks, which the block layout sees exactly as the sampler did
    (block-causal attention on the same columns; the prompts must fill whole blocks). NaN for every other token.
    ``score(samples, completions)`` rewards the completions of the given rollout samples.

    Returns (values, noise): noise [N, L] is the variance of each Monte Carlo mean (the continuations' sample
    variance / ``samples``; NaN with one sample), which ``debiased_explained_variance`` takes out of the error.
    """
    from tracerl.sampling import generate

    size = rollout.block_size
    if rollout.layout != "block":
        raise ValueError(NO_BLOCKS)
    if any(len(p) % size for p in prompts):
        raise ValueError(
            "block_start_values needs a block-layout rollout whose prompts fill whole blocks (a prompt of "
            f"{size}·k tokens), so that the prompt extended by the committed blocks is the sampler's state; "
            "use the quickstart's bare 20-character puzzles (data.chat_template=false)."
        )
    n, length = rollout.response_ids.shape
    values = torch.full((n, length), float("nan"))
    noise = torch.full((n, length), float("nan"))
    for b in range((length + size - 1) // size):
        steps = rollout.step_map[:, b * size : (b + 1) * size]
        rows = [i for i in range(n) if (steps[i] >= 0).any()]  # samples that decoded block b
        if not rows:
            break
        head = [rollout.response_ids[i, : b * size].tolist() for i in rows]
        idx = [k for k in range(len(rows)) for _ in range(samples)]
        with torch.no_grad():
            cont = generate(policy, [list(prompts[rows[k]]) + head[k] for k in idx],
                            dataclasses.replace(sampling, max_new_tokens=length - b * size), seed=seed + b)  # fmt: skip
        prefix = [policy.tokenizer.decode(h, skip_special_tokens=True) for h in head]
        rewards = score([rows[k] for k in idx], [prefix[k] + text for k, text in zip(idx, cont.texts, strict=True)])
        per_state = torch.tensor(rewards, dtype=torch.float64).view(len(rows), samples)
        mean = per_state.mean(1)
        var = per_state.var(1) / samples if samples > 1 else torch.full_like(mean, float("nan"))
        for k, i in enumerate(rows):
            made = steps[i] >= 0
            cols = b * size + (made & (steps[i] == steps[i][made].min())).nonzero().squeeze(1)
            values[i, cols], noise[i, cols] = float(mean[k]), float(var[k])
    return values, noise


def debiased_explained_variance(
    values: torch.Tensor, noise: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> float:
    """Explained variance of the exact values of which ``values`` [N, L] are unbiased Monte Carlo estimates with
    variances ``noise`` [N, L]: 1 − (Var(R − V̂) − mean noise) / Var(R) over ``mask``. The estimates' own noise
    adds its variance to the error, so the plain explained variance of V̂ is too low by mean noise / Var(R).

    Example (returns 0 and 1 estimated as 0.25 and 0.75: plainly 0.75 explained; if the estimates' noise is
    0.0625 each, the whole error is noise and the exact values explain everything):
        >>> r, v, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.25, 0.75]]), torch.ones(1, 2, dtype=torch.bool)
        >>> debiased_explained_variance(v, torch.zeros(1, 2), r, mask), debiased_explained_variance(
        ...     v, torch.full((1, 2), 0.0625), r, mask)
        (0.75, 1.0)
    """
    from tracerl import advantages as adv_lib

    total = returns[mask].double().var(unbiased=False)
    if not total > 0:
        return 0.0
    return adv_lib.explained_variance(values, returns, mask) + float(noise[mask].double().mean() / total)


def oracle_batch(
    policy: Any,
    cfg: Any,
    batch: Any,
    rollout: Any,
    group: torch.Tensor,
    mask: torch.Tensor,
    steps: torch.Tensor,
    samples: int,
    seed: int,
    cells: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """[N, L] ``sudoku_oracle_values`` of one probe batch (``group`` [N] its prompt indices), its cells read by
    ``cells`` (``oracle_cells``): ``samples`` fresh completions per prompt measure how often the policy gets each
    cell right (``group_rates``), independent of the batch itself."""
    from tracerl.sampling import generate

    tok = policy.tokenizer
    prompts, answers = list(batch.prompts), [str(a) for a in batch.columns["answer"]]

    def read(ro: Any, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        texts = [[tok.decode([t], skip_special_tokens=True) for t in row] for row in ro.response_ids.tolist()]
        return cells(texts, [prompts[i] for i in idx], [answers[i] for i in idx], ro.response_mask)

    n_prompts = len(prompts)
    ref_idx = [i for i in range(n_prompts) for _ in range(samples)]
    with torch.no_grad():
        ref = generate(policy, [batch.prompt_ids[i] for i in ref_idx], cfg.sampling, seed=seed,
                       group=torch.tensor(ref_idx))  # fmt: skip
    _, ref_right, ref_spoiler = read(ref, ref_idx)
    rate, clean = group_rates(ref_right, ref_spoiler, torch.tensor(ref_idx))
    blank, right, spoiler = read(rollout, group.tolist())
    return sudoku_oracle_values(blank, right, spoiler, steps, mask, rate[group], clean[group])


def batch_scorer(service: Any, texts: list[str], columns: dict[str, list]) -> Callable[[list[int], list[str]], list]:
    """``score(ids, completions)``: the rewards of ``completions`` for the samples ``ids`` of a batch whose prompts
    are ``texts`` and dataset columns ``columns`` (one entry per sample), by the run's ``RewardService``."""

    def score(ids: list[int], completions: list[str]) -> list[float]:
        picked = {k: [col[i] for i in ids] for k, col in columns.items()}
        return service.score([texts[i] for i in ids], completions, columns=picked).total

    return score


class FinalStateRegression:
    """An independent check on how learnable a task's rewards are from a batch budget: a plain PyTorch regression
    of each sample's reward (minus its group's mean for ``centered``) on its whole final sequence, prompt and
    completion all visible, so the state holds everything the reward depends on (its ceiling is 1 for a
    deterministic reward of the text). A fresh copy of the policy's backbone with a zero head (``ValueModel``,
    ``state`` readout: the mean of the head over the sequence), AdamW at ``lr``, gradients clipped at
    ``max_grad_norm``; none of the learner's code. If it cannot learn the rewards from these batches, a value model
    that sees less (each token's state before it was committed) cannot either.
    """

    def __init__(self, policy: Any, lr: float, max_grad_norm: float = 1.0) -> None:
        from tracerl.models.value import ValueModel

        self.model = ValueModel.from_policy(policy, "state")
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm

    def predict(self, rollout: Any) -> torch.Tensor:
        """[N] the model's value of each sample's final sequence (left-padded prompt, then the generated tokens)."""
        ids = torch.cat([rollout.prompt_ids, rollout.response_ids.clamp(min=0)], 1)
        valid = torch.cat([rollout.prompt_mask, rollout.step_map >= 0], 1)
        visible = (valid.unsqueeze(1) & valid.unsqueeze(2)) | torch.eye(ids.shape[1], dtype=torch.bool)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        first = valid.long().argmax(1)  # every valid column sees the same keys, so any of them gives the mean
        return self.model(ids, positions, visible).gather(1, first.unsqueeze(1)).squeeze(1)

    def update(self, rollout: Any, targets: torch.Tensor, minibatches: int, passes: int, seed: int) -> None:
        """``passes`` × ``minibatches`` AdamW steps on ½ (V − target)², each on a random part of the batch."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(passes):
            for part in torch.randperm(len(targets), generator=g).chunk(minibatches):
                loss = 0.5 * (self.predict(rollout.select(part)) - targets[part]).pow(2).mean()
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                self.optimizer.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--targets", default="centered,reward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-every", type=int, default=5, help="steps between printed lines (means over them)")
    p.add_argument(
        "--oracle-samples",
        type=int,
        default=None,
        help="samples per prompt that measure the oracle's per-cell rates (0: no oracle; default 32 where the task "
        "has one)",
    )
    p.add_argument("--final-state", action="store_true",
                   help="also train FinalStateRegression (it sees each final sequence) on the batches")  # fmt: skip
    p.add_argument("--mc-samples", type=int, default=0,
                   help="continuations per state for the policy's own value at block starts (0: off)")  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="third-party logs and progress bars")
    p.add_argument("--debug", action="store_true", help="a traceback instead of a one-paragraph error")
    ns = p.parse_intermixed_args(argv)  # key=value overrides before or after the options
    bad = [t for t in ns.targets.split(",") if t not in ("centered", "reward", "advantage")]
    if bad:
        p.error(f"--targets {ns.targets}: {bad} unknown; give a comma-separated list of centered, reward, advantage")
    if ns.steps < 1 or ns.print_every < 1 or ns.mc_samples < 0 or (ns.oracle_samples or 0) < 0:
        p.error(
            f"--steps ({ns.steps}) and --print-every ({ns.print_every}) must be ≥ 1, --mc-samples ({ns.mc_samples}) "
            f"and --oracle-samples ({ns.oracle_samples if ns.oracle_samples is not None else 'its default'}) ≥ 0"
        )
    from tracerl.cli import quiet_third_party

    quiet_third_party(ns.verbose)
    try:
        return probe(ns)
    except Exception as err:  # noqa: BLE001 - one paragraph, as the tracerl commands print it
        if ns.debug:
            raise
        print(f"value_probe.py: error: {err} (--debug for the traceback)", file=sys.stderr)
        return 2


def probe(ns: argparse.Namespace) -> int:
    """The measurements of ``main``'s arguments (module docstring)."""
    from tracerl import advantages as adv_lib
    from tracerl.checks import load_config
    from tracerl.config import value_lr as resolve_value_lr
    from tracerl.learner import Learner
    from tracerl.learner.value_phase import value_phase
    from tracerl.models import load_policy
    from tracerl.orchestrator.setup import check_rewards, load_prompts
    from tracerl.sampling import generate
    from tracerl.scoring import response_token_steps

    torch.manual_seed(ns.seed)
    if load_config(ns.config, ns.overrides).model.path is None:
        print(
            "note: model.path is unset, so this probes an untrained tiny model; a trained policy's value is what "
            "the docs measure (e.g. model.path=runs/qs/sft/final)",
            flush=True,
        )
    for target in ns.targets.split(","):
        cfg = load_config(ns.config, [*ns.overrides, "objective.value_model=true", f"objective.value_target={target}"])
        cells = oracle_cells(cfg)
        oracle_samples = ns.oracle_samples if ns.oracle_samples is not None else (32 if cells else 0)
        if oracle_samples > 0 and cells is None:
            raise SystemExit(
                f"--oracle-samples {oracle_samples}: the oracle knows only synthetic:sudoku4 scored by sudoku_cells "
                f"and synthetic:copy scored by digit_accuracy, not {cfg.data.source} scored by "
                f"{[f.fn for f in cfg.reward.functions]}; pass --oracle-samples 0 (or --mc-samples K for V^π)."
            )
        service = check_rewards(cfg, None, cfg.data.source)  # the run's own reward functions, weighted
        policy = load_policy(cfg.model)
        if ns.mc_samples > 0 and policy.block_size is None:  # said before any step is spent
            raise ValueError(NO_BLOCKS)
        stream, _ = load_prompts(cfg)
        g, n_prompts = cfg.rollout.samples_per_prompt, cfg.rollout.prompts_per_step
        learner = Learner(cfg, policy)
        lc = learner.lc
        value_lr = resolve_value_lr(lc)  # the value engine's
        regression = FinalStateRegression(policy, value_lr, lc.max_grad_norm) if ns.final_state else None
        final_ev: list[float] = []
        print(f"== target {target}: value lr {value_lr:g}, {lc.value_updates_per_step} pass(es) × "
              f"{lc.minibatches} minibatches per step")  # fmt: skip
        before, after, totals, within, oracle, oracle_ratio = [], [], [], [], [], []
        mc, mc_exact, oracle_at_starts = [], [], []
        stopped = False
        try:
            for step in range(1, ns.steps + 1):
                batch = stream.next_batch(n_prompts)
                prompts = [ids for ids in batch.prompt_ids for _ in range(g)]
                group = torch.arange(n_prompts).repeat_interleave(g)
                with torch.no_grad():
                    rollout = generate(policy, prompts, cfg.sampling, seed=ns.seed * 100_003 + step, group=group)
                texts = [p for p in batch.prompts for _ in range(g)]
                columns = {k: [v for v in col for _ in range(g)] for k, col in batch.columns.items()}
                score = batch_scorer(service, texts, columns)
                rewards = torch.tensor(score(list(range(len(texts))), rollout.texts))
                tot, win = variance_split(rewards, group)
                totals.append(tot)
                within.append(win)
                views = learner.views_of(rollout, seed=step)
                table = views.targets()
                everything = torch.arange(len(views))
                n, length = rollout.response_ids.shape
                _, m = value_phase(learner, rollout, rewards, views, table, views.seq_sample, n)  # pre-update values
                learner.rl_steps += 1
                # after the update, on the same batch: in sample
                values = table.place(learner.micro.infer(learner.value_engine, views, table, everything)[0], n, length)
                mask = (table.place(torch.ones(len(table)), n, length) > 0) & rollout.response_mask
                outcome, *_ = adv_lib.value_outcome(rewards.float(), group, target, cfg.objective.advantage)
                steps = response_token_steps(rollout, cfg.objective.shrink)
                token_rewards = adv_lib.outcome_token_rewards(outcome, steps, mask)
                o = cfg.objective
                _, returns = adv_lib.step_gae(values, steps, token_rewards, mask, o.gamma, o.lam)
                before.append(m["value/explained_var"])
                adv = o.advantage
                if oracle_samples > 0:
                    oracle_v = oracle_batch(policy, cfg, batch, rollout, group, mask, steps, oracle_samples,
                                            seed=ns.seed * 100_003 + step + 50_000, cells=cells)  # fmt: skip
                    ev, ratio = oracle_metrics(oracle_v, rewards, group, mask, target, adv)
                    oracle.append(ev)
                    oracle_ratio.append(ratio)
                if ns.mc_samples > 0:
                    seed = ns.seed * 100_003 + step + 70_000
                    mc_v, noise = block_start_values(policy, cfg.sampling, prompts, rollout, score, ns.mc_samples, seed)
                    starts = ~mc_v.isnan() & mask
                    mc_v = mc_v.nan_to_num()
                    mc.append(oracle_metrics(mc_v, rewards, group, starts, target, adv)[0])
                    if ns.mc_samples > 1:  # the same with the Monte Carlo noise taken out
                        mc_exact.append(oracle_metrics(mc_v, rewards, group, starts, target, adv, noise)[0])
                    if oracle_samples > 0:
                        oracle_at_starts.append(oracle_metrics(oracle_v, rewards, group, starts, target, adv)[0])
                after.append(adv_lib.explained_variance(values, returns, mask))
                if regression is not None:  # out of sample, then trained on this batch like the value model
                    target_r = outcome.float()  # the value model's own outcome target
                    with torch.no_grad():
                        guess = regression.predict(rollout)
                    one = torch.ones(len(target_r), 1, dtype=torch.bool)
                    final_ev.append(adv_lib.explained_variance(guess.unsqueeze(1), target_r.unsqueeze(1), one))
                    regression.update(rollout, target_r, lc.minibatches, lc.value_updates_per_step, seed=step)
                if step % ns.print_every == 0:
                    last = slice(-ns.print_every, None)
                    print(f"step {step:3d}  explained variance before update (new batch) "
                          f"{statistics.fmean(before[last]):+.3f}  after update (same batch) "
                          f"{statistics.fmean(after[last]):+.3f}  value loss {m['train/value_loss']:.4f}  "
                          f"advantage var ratio {m['value/advantage_var_ratio']:.3f}"
                          + (f"  oracle {statistics.fmean(oracle[last]):+.3f}" if oracle else "")
                          + (f"  final-state regression {statistics.fmean(final_ev[last]):+.3f}" if final_ev else ""),
                          flush=True)  # fmt: skip
        except KeyboardInterrupt:  # Ctrl-C: the summary of the steps measured whole so far, then stop
            stopped = True
            for part in (before, totals, within, oracle, oracle_ratio, mc, mc_exact, oracle_at_starts, final_ev):
                del part[len(after) :]  # the step under way is left out
            print(f"interrupted during step {len(after) + 1}: the summary of the {len(after)} step(s) measured",
                  flush=True)  # fmt: skip
        finally:
            learner.destroy()
        if not after:
            return 130
        total, inside = statistics.fmean(totals), statistics.fmean(within)
        share = inside / total if total else 0.0
        last = f"the last {min(10, len(before))} step(s)"
        print(f"reward variance: total {total:.4f}, within groups {inside:.4f} ({share:.0%}); explained "
              f"variance over {last}: before update {statistics.fmean(before[-10:]):+.3f}, after "
              f"{statistics.fmean(after[-10:]):+.3f}")  # fmt: skip
        if total == 0:
            print("note: every sample scored the same reward, so there was nothing to explain: the explained "
                  "variances read 0 by construction, whatever the value model knows")  # fmt: skip
        if final_ev:
            print(
                f"final-state regression (sees each whole final sequence, trained on the same batches): explained "
                f"variance before update {statistics.fmean(final_ev[-10:]):+.3f} over {last}"
            )
        if oracle:
            print(
                f"oracle (knows the solution; per-cell rates from {oracle_samples} other samples per prompt): "
                f"explained variance {statistics.fmean(oracle):+.3f}, advantage variance "
                f"{statistics.fmean(oracle_ratio):.3f} × the group baseline's (mean of {len(oracle)} batches)"
            )
        if mc:
            print(
                f"the policy's own value V^π at block starts ({ns.mc_samples} continuations per state): explained "
                f"variance {statistics.fmean(mc):+.3f} on those tokens"
                + (f", {statistics.fmean(mc_exact):+.3f} without the Monte Carlo noise" if mc_exact else "")
                + (f" (the oracle there: {statistics.fmean(oracle_at_starts):+.3f})" if oracle_at_starts else "")
            )
        if stopped:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
