"""The RLHF demo's table and picture over seeds and variants (docs/rlhf.md), from ``tracerl train`` run directories
of ``scripts/rlhf.sh`` (``<run_dir>/rl``, its reward model in ``<run_dir>/reward_model``).

    python scripts/rlhf_report.py "recipe=runs/rlhf-seed0/rl,runs/rlhf-seed1/rl,runs/rlhf-seed2/rl" \\
        "no KL to the SFT model=runs/rlhf-seed0/rl-nokl,runs/rlhf-seed1/rl-nokl" --png docs/rlhf-curves.png

A variant is ``LABEL=DIR,DIR,...``. For each run: the reward model's held-out pair accuracy, and at the first and
last evaluation the held-out greedy and mean@k rewards of the reward model (what RL optimised) and of the verifier
(weight 0, never optimised). Prints a markdown table per variant (``--json``: one JSON object). The PNG has, per
seed (colour) and variant (line style), the held-out verifier, the held-out reward-model score and the training
batches' correlation between the two (``reward/corr/rm/sudoku_cells``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

RM, VERIFIER = "rm", "sudoku_cells"
STYLES = ("-", "--", ":", "-.")


def rows(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"{path} does not exist: give tracerl train run directories (<run_dir>/rl of scripts/rlhf.sh)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            sys.exit(f"{path} line {n} is not valid JSON ({err.msg}): the file is damaged")
    return out


def summary(run: Path, k: int) -> dict[str, Any]:
    """Start and end of one run: reward model and verifier, greedy and mean@k, and the pair accuracy."""
    history = rows(run)
    evals = [r for r in history if f"eval/greedy_reward/{VERIFIER}" in r and f"eval/greedy_reward/{RM}" in r]
    if not evals:
        sys.exit(
            f"{run} has {len(evals)} evaluation(s) that score both '{RM}' and '{VERIFIER}': give the <run_dir>/rl of "
            "scripts/rlhf.sh runs, whose rewards are the reward model 'rm' and the verifier (weight 0)."
        )
    first, last = evals[0], evals[-1]
    info_path = run.parent / "reward_model" / "reward_model.json"
    if not info_path.is_file():
        sys.exit(f"{info_path} does not exist: scripts/rlhf.sh keeps the reward model beside each run's rl/ folder.")
    info = json.loads(info_path.read_text())
    out: dict[str, Any] = {"run": str(run), "steps": last["step"], "pair_accuracy": info["accuracy"]["heldout"]}
    for part in (RM, VERIFIER):
        for mode, key in (("greedy", f"eval/greedy_reward/{part}"), (f"mean@{k}", f"eval/mean@{k}/{part}")):
            out[f"{part}/{mode}"] = (first[key], last[key])
    return out


def table(label: str, summaries: list[dict[str, Any]], k: int) -> str:
    lines = [
        f"**{label}**\n",
        f"| run | RM held-out pair accuracy | RM score, greedy: start → end | verifier greedy: start → end (change) "
        f"| verifier mean@{k}: start → end (change) |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        rm0, rm1 = s[f"{RM}/greedy"]
        g0, g1 = s[f"{VERIFIER}/greedy"]
        m0, m1 = s[f"{VERIFIER}/mean@{k}"]
        accuracy = "none held out" if s["pair_accuracy"] is None else f"{s['pair_accuracy']:.3f}"
        lines.append(
            f"| {s['run']} | {accuracy} | {rm0:+.2f} → {rm1:+.2f} | {g0:.3f} → {g1:.3f} ({g1 - g0:+.3f}) "
            f"| {m0:.3f} → {m1:.3f} ({m1 - m0:+.3f}) |"
        )
    if len(summaries) > 1:
        g = [s[f"{VERIFIER}/greedy"][1] - s[f"{VERIFIER}/greedy"][0] for s in summaries]
        m = [s[f"{VERIFIER}/mean@{k}"][1] - s[f"{VERIFIER}/mean@{k}"][0] for s in summaries]
        lines.append(
            f"| mean ± std | | | {statistics.mean(g):+.3f} ± {statistics.stdev(g):.3f} "
            f"| {statistics.mean(m):+.3f} ± {statistics.stdev(m):.3f} |"
        )
    return "\n".join(lines)


def seed_of(run: Path) -> str:
    return run.parent.name


def plot(variants: dict[str, list[Path]], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    seeds = sorted({seed_of(r) for runs in variants.values() for r in runs})
    for style, (label, runs) in zip(STYLES, variants.items(), strict=False):
        for run in runs:
            history, colour = rows(run), f"C{seeds.index(seed_of(run))}"
            evals = [r for r in history if f"eval/greedy_reward/{VERIFIER}" in r]
            steps = [r["step"] for r in evals]
            name = f"{seed_of(run)}, {label}"
            axes[0].plot(steps, [r[f"eval/greedy_reward/{VERIFIER}"] for r in evals], style, marker="o",
                         color=colour, label=name)  # fmt: skip
            axes[1].plot(steps, [r[f"eval/greedy_reward/{RM}"] for r in evals], style, marker="o", color=colour)
            train = [r for r in history if f"reward/corr/{RM}/{VERIFIER}" in r]
            axes[2].plot([r["step"] for r in train], [r[f"reward/corr/{RM}/{VERIFIER}"] for r in train], style,
                         color=colour)  # fmt: skip
    titles = (
        f"1. held-out verifier {VERIFIER} (greedy; weight 0, never optimised)",
        "2. held-out reward-model score (greedy; what RL optimises)",
        "3. training batches: correlation of the two per RL step",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[2].axhline(0.0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    return png


def parse_variant(text: str) -> tuple[str, list[Path]]:
    label, sep, dirs = text.partition("=")
    if not sep or not dirs:
        sys.exit(f"'{text}' is not LABEL=DIR,DIR,...")
    return label, [Path(d) for d in dirs.split(",") if d]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="LABEL=DIR,DIR,... (tracerl train run directories)")
    parser.add_argument("--png", type=Path, help="write the curves here")
    parser.add_argument("--k", type=int, default=4, help="eval.k of the runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    variants = dict(parse_variant(v) for v in args.variants)
    summaries = {label: [summary(run, args.k) for run in runs] for label, runs in variants.items()}
    if args.json:
        print(json.dumps(summaries))
    else:
        print("\n\n".join(table(label, s, args.k) for label, s in summaries.items()))
    if args.png:
        print(f"curves: {plot(variants, args.png)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
