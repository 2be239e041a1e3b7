"""The console lines a person reads: one per RL step, one per evaluation."""

from __future__ import annotations


def step_line(step: int, total: int, m: dict[str, float]) -> str:
    """One console line per RL step with the numbers that matter: the reward as scored (mean ± std), the kept
    fraction and, when some kept groups scored flat (every sample the same reward: advantage 0, nothing to learn),
    their share; a step with no signal at all says so."""
    train = (
        f"loss {m['train/policy_loss']:+.4f} kl {m.get('train/kl_to_old', 0.0):.4f} "
        f"clip {m.get('train/clipfrac', 0.0):.2f}"
        if "train/policy_loss" in m
        else "[yellow]skipped: every group filtered out[/yellow]"
    )
    flat = m.get("advantage/flat_groups", 0.0)
    if "train/policy_loss" in m and flat >= 1.0 and m.get("advantage/no_signal", 0.0):
        kept = f"kept {m.get('advantage/kept_fraction', 0.0):.0%} [yellow](all flat: no signal)[/yellow]"
    else:
        kept = f"kept {m.get('advantage/kept_fraction', 0.0):.0%}" + (f" ({flat:.0%} flat)" if flat > 0 else "")
    return (
        f"step {step:>4}/{total}  reward {m.get('reward/mean', float('nan')):.3f}±{m.get('reward/std', 0.0):.2f}  "
        f"{kept}  {train}  len {m['rollout/response_length']:.1f}  "
        f"[dim]│ rollout {m.get('time/rollout', 0.0):.1f}s ({m['perf/rollout_share']:.0%}) "
        f"reward {m.get('time/reward', 0.0):.1f}s train {m.get('time/train', 0.0):.1f}s "
        f"sync {m.get('time/sync', 0.0):.2f}s · {m['perf/tokens_per_s']:.0f} tok/s[/dim]"
    )


def eval_line(step: int, m: dict[str, float], k: int) -> str:
    exact = f"  exact {m['eval/exact_match']:.3f}" if "eval/exact_match" in m else ""
    return (
        f"[bold cyan]eval[/bold cyan] step {step:>4}  greedy reward {m['eval/greedy_reward']:.3f}{exact}  "
        f"mean@{k} {m[f'eval/mean@{k}']:.3f}  pass@{k} {m[f'eval/pass@{k}']:.3f}  "
        f"({int(m['eval/prompts'])} held-out prompts)"
    )
