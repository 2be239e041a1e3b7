"""The RLHF demo's table and picture over seeds (docs/rlhf.md), from the run directories of ``scripts/rlhf.sh``.

    python scripts/rlhf_report.py runs/rlhf-seed0 runs/rlhf-seed1 runs/rlhf-seed2 --png docs/rlhf-curves.png

For each run: the reward model's held-out pair accuracy (``reward_model/reward_model.json``), and at the first and
last evaluation the held-out greedy and mean@k rewards of the reward model (what RL optimised) and of the verifier
(weight 0, never optimised). Prints a markdown table (``--json`` for one JSON object); the PNG has the training
batches' reward-model score and verifier reward per RL step, and the held-out ones at every evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

RM, VERIFIER = "rm", "sudoku_cells"


def rows(run: Path) -> list[dict[str, Any]]:
    path = run / "rl" / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"{path} does not exist: give run directories of scripts/rlhf.sh")
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(run: Path, k: int) -> dict[str, Any]:
    history = rows(run)
    evals = [r for r in history if f"eval/greedy_reward/{VERIFIER}" in r]
    first, last = evals[0], evals[-1]
    rm_info = json.loads((run / "reward_model" / "reward_model.json").read_text())
    out: dict[str, Any] = {"run": str(run), "steps": last["step"], "pair_accuracy": rm_info["accuracy"]["heldout"]}
    for part in (RM, VERIFIER):
        for mode, key in (("greedy", f"eval/greedy_reward/{part}"), (f"mean@{k}", f"eval/mean@{k}/{part}")):
            out[f"{part}/{mode}"] = (first[key], last[key])
    train = [r for r in history if f"reward/{RM}/mean" in r]
    out["train_corr"] = [r.get(f"reward/corr/{RM}/{VERIFIER}") for r in train]
    return out


def table(summaries: list[dict[str, Any]], k: int) -> str:
    head = (
        f"| seed run | RM held-out pair accuracy | RM score, greedy: start → end | verifier greedy: start → end "
        f"(change) | verifier mean@{k}: start → end (change) |\n|---|---|---|---|---|"
    )
    lines = [head]
    for s in summaries:
        rm0, rm1 = s[f"{RM}/greedy"]
        g0, g1 = s[f"{VERIFIER}/greedy"]
        m0, m1 = s[f"{VERIFIER}/mean@{k}"]
        lines.append(
            f"| {Path(s['run']).name} | {s['pair_accuracy']:.3f} | {rm0:+.2f} → {rm1:+.2f} | {g0:.3f} → {g1:.3f} "
            f"({g1 - g0:+.3f}) | {m0:.3f} → {m1:.3f} ({m1 - m0:+.3f}) |"
        )
    if len(summaries) > 1:
        gains = [s[f"{VERIFIER}/greedy"][1] - s[f"{VERIFIER}/greedy"][0] for s in summaries]
        mgains = [s[f"{VERIFIER}/mean@{k}"][1] - s[f"{VERIFIER}/mean@{k}"][0] for s in summaries]
        lines.append(
            f"| mean ± std | | | {statistics.mean(gains):+.3f} ± {statistics.stdev(gains):.3f} | "
            f"{statistics.mean(mgains):+.3f} ± {statistics.stdev(mgains):.3f} |"
        )
    return "\n".join(lines)


def plot(runs: list[Path], png: Path, k: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(13, 4.5))
    twin_train, twin_eval = ax_train.twinx(), ax_eval.twinx()
    for i, run in enumerate(runs):
        history, colour = rows(run), f"C{i}"
        train = [r for r in history if f"reward/{RM}/mean" in r]
        steps = [r["step"] for r in train]
        ax_train.plot(steps, [r[f"reward/{RM}/mean"] for r in train], "-", color=colour, label=f"{run.name}: RM score")
        twin_train.plot(steps, [r[f"reward/{VERIFIER}/mean"] for r in train], "--", color=colour,
                        label=f"{run.name}: verifier")  # fmt: skip
        evals = [r for r in history if f"eval/greedy_reward/{VERIFIER}" in r]
        steps = [r["step"] for r in evals]
        ax_eval.plot(steps, [r[f"eval/greedy_reward/{RM}"] for r in evals], "o-", color=colour,
                     label=f"{run.name}: RM score")  # fmt: skip
        twin_eval.plot(steps, [r[f"eval/greedy_reward/{VERIFIER}"] for r in evals], "s--", color=colour,
                       label=f"{run.name}: verifier")  # fmt: skip
    ax_train.set_title("1. training batches (temperature 1): RM score (solid) and verifier (dashed)")
    ax_eval.set_title("2. held-out puzzles, greedy: RM score (solid) and verifier (dashed)")
    for ax, twin in ((ax_train, twin_train), (ax_eval, twin_eval)):
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward model score (optimised)")
        twin.set_ylabel("sudoku_cells (weight 0, never optimised)")
        ax.grid(alpha=0.3)
    handles = [h for ax in (ax_eval, twin_eval) for h in ax.get_legend_handles_labels()[0]]
    ax_eval.legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of scripts/rlhf.sh (run_dir=...)")
    parser.add_argument("--png", type=Path, help="write the curves here")
    parser.add_argument("--k", type=int, default=4, help="eval.k of the runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    summaries = [summary(run, args.k) for run in args.runs]
    print(json.dumps(summaries) if args.json else table(summaries, args.k))
    if args.png:
        print(f"curves: {plot(args.runs, args.png, args.k)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
