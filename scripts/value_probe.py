"""Can the value model predict the quickstart's rewards? Train only the value model (the policy stays frozen) on
fresh rollouts of one policy, and measure, step by step, the explained variance of its values on a batch it has
never trained on (before the update: what ``value/explained_var`` logs in training) and on the batch it has just
trained on (after the update: whether it fits at all).

    .venv/bin/python scripts/value_probe.py configs/quickstart.yaml model.path=<sft>/final [key=value ...]
        [--steps 40] [--targets centered,reward] [--seed 0]

It also splits the raw reward's variance into the part between prompts (what the group mean predicts) and the
part within groups (what the ``centered`` target asks the value model to predict). A value model whose
after-update explained variance rises while the before-update one stays near 0 learns, but what it learns on one
batch does not carry to the next: the rewards are not predictable from the states by this model from this much
data. One whose after-update explained variance stays near 0 does not learn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--targets", default="centered,reward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-every", type=int, default=5, help="steps between printed lines (means over them)")
    ns = p.parse_args(argv)

    from rewards.synthetic import sudoku_cells
    from tracerl import advantages as adv_lib
    from tracerl.checks import load_config
    from tracerl.learner import Learner
    from tracerl.learner.value_phase import value_phase
    from tracerl.models import load_policy
    from tracerl.orchestrator.setup import load_prompts
    from tracerl.sampling import generate
    from tracerl.scoring import response_token_steps

    torch.manual_seed(ns.seed)
    for target in ns.targets.split(","):
        cfg = load_config(ns.config, [*ns.overrides, "objective.value_model=true", f"objective.value_target={target}"])
        policy = load_policy(cfg.model)
        stream, _ = load_prompts(cfg)
        g, n_prompts = cfg.rollout.samples_per_prompt, cfg.rollout.prompts_per_step
        learner = Learner(cfg, policy)
        lc = learner.lc
        print(f"== target {target}: value lr {lc.value_lr or 5 * lc.lr:g}, {lc.value_updates_per_step} pass(es) × "
              f"{lc.minibatches} minibatches per step")  # fmt: skip
        before, after, totals, within = [], [], [], []
        try:
            for step in range(1, ns.steps + 1):
                batch = stream.next_batch(n_prompts)
                prompts = [ids for ids in batch.prompt_ids for _ in range(g)]
                group = torch.arange(n_prompts).repeat_interleave(g)
                with torch.no_grad():
                    rollout = generate(policy, prompts, cfg.sampling, seed=ns.seed * 100_003 + step, group=group)
                texts = [p for p in batch.prompts for _ in range(g)]
                answers = [a for a in batch.columns["answer"] for _ in range(g)]
                rewards = torch.tensor(sudoku_cells(texts, rollout.texts, answer=answers))
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
                after.append(adv_lib.explained_variance(values, returns, mask))
                if step % ns.print_every == 0:
                    last = slice(-ns.print_every, None)
                    print(f"step {step:3d}  explained variance before update (new batch) "
                          f"{statistics.fmean(before[last]):+.3f}  after update (same batch) "
                          f"{statistics.fmean(after[last]):+.3f}  value loss {m['train/value_loss']:.4f}  "
                          f"advantage var ratio {m['value/advantage_var_ratio']:.3f}", flush=True)  # fmt: skip
        finally:
            learner.destroy()
        total, inside = statistics.fmean(totals), statistics.fmean(within)
        share = inside / total if total else 0.0
        print(f"reward variance: total {total:.4f}, within groups {inside:.4f} ({share:.0%}); explained "
              f"variance over the last 10 steps: before update {statistics.fmean(before[-10:]):+.3f}, after "
              f"{statistics.fmean(after[-10:]):+.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
