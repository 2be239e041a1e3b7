"""A run in one picture and one table: the training reward and held-out curves drawn from ``metrics.jsonl``, and
the before/after table of the held-out evaluations the loop writes (``eval/step-*.json``: the starting point at
step 0, the trained policy at the last step). ``tracerl plot RUN_DIR`` prints the table and writes the PNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tracerl.metrics import read_jsonl

HEADLINE = ("eval/greedy_reward", "eval/exact_match")  # the table's rows, then mean@k and pass@k


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/metrics.jsonl``, in file order.

    Raises:
        FileNotFoundError: the run directory has no ``metrics.jsonl`` (not a tracerl run, or it has not started).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the run_dir of a tracerl train or sft run.")
    return read_jsonl(path)


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over the rows that have it, by step; a step logged twice (a run resumed
    from an earlier checkpoint redoes steps) keeps its last value.

    Example:
        >>> series([{"step": 0, "a": 1.0}, {"step": 1}, {"step": 2, "a": 3.0}, {"step": 2, "a": 4.0}], "a")
        ([0, 2], [1.0, 4.0])
    """
    points = {int(r["step"]): float(r[key]) for r in rows if key in r and math.isfinite(float(r[key]))}
    return sorted(points), [points[s] for s in sorted(points)]


def eval_summaries(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``eval/step-N.json`` of a run (metrics and exact sampling settings), ordered by step."""
    found = []
    for path in Path(run_dir).glob("eval/step-*.json"):
        try:
            summary = json.loads(path.read_text())
            found.append((int(summary["step"]), summary))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} is not an evaluation summary ({type(err).__name__}: {err}): the file is damaged. Remove it "
                "(its step's samples are in the .jsonl beside it), or rerun tracerl eval for that step."
            ) from None
    return [summary for _, summary in sorted(found, key=lambda pair: pair[0])]


def before_after(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first and the last held-out evaluation of an RL run (the starting point and the trained policy).

    Raises:
        FileNotFoundError: fewer than two evaluations (``eval.num_prompts=0``, or the run did not finish).
    """
    found = eval_summaries(run_dir)
    if len(found) < 2:
        raise FileNotFoundError(
            f"{Path(run_dir) / 'eval'} holds {len(found)} evaluation(s); a before/after table needs the step-0 and "
            "the final one (tracerl train with eval.num_prompts ≥ 1 writes both)."
        )
    return found[0], found[-1]


def table_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(metric, before, after, change) for the headline metrics both evaluations have.

    Example:
        >>> b = {"k": 4, "metrics": {"eval/greedy_reward": 0.5, "eval/mean@4": 0.25}}
        >>> a = {"k": 4, "metrics": {"eval/greedy_reward": 0.75, "eval/mean@4": 0.5}}
        >>> table_rows(b, a)
        [('greedy reward', 0.5, 0.75, 0.25), ('mean@4 reward', 0.25, 0.5, 0.25)]
    """
    k = after.get("k", 1)
    keys = [*HEADLINE, f"eval/mean@{k}", f"eval/pass@{k}"]
    labels = {HEADLINE[0]: "greedy reward", HEADLINE[1]: "exact match (greedy)", keys[2]: f"mean@{k} reward",
              keys[3]: f"pass@{k}"}  # fmt: skip
    out = []
    for key in keys:
        if key in before["metrics"] and key in after["metrics"]:
            b, a = float(before["metrics"][key]), float(after["metrics"][key])
            out.append((labels[key], b, a, a - b))
    return out


def start_label(run_dir: str | Path) -> str:
    """What step 0 of an RL run is: "SFT start" where its model.path is the final model or a checkpoint of a
    tracerl sft run, else "before RL"."""
    try:
        path = json.loads((Path(run_dir) / "config.json").read_text())["model"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return "before RL"
    if not path:
        return "before RL"
    # a relative model.path is the launch folder's: the current one, or one above the run (runs/q/sft/final)
    given = Path(str(path)).expanduser()
    places = [given] if given.is_absolute() else [Path.cwd() / given]
    places += [] if given.is_absolute() else [up / given for up in Path(run_dir).resolve().parents]
    model = next((p for p in places if p.exists()), None)
    for folder in model.parents if model is not None else ():
        owner = folder / "run.json"
        if owner.is_file():
            try:
                return "SFT start" if json.loads(owner.read_text()).get("command") == "sft" else "before RL"
            except (OSError, ValueError, AttributeError):
                return "before RL"
    return "before RL"


def _temperature(run_dir: str | Path) -> str:
    """``", temperature T"`` of the run's rollouts, from its config.json (empty where that cannot be read)."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
        return f", temperature {float(config['sampling']['temperature']):g}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def plot_curves(run_dir: str | Path, out: str | Path | None = None, sft_dir: str | Path | None = None) -> Path:
    """Draw a run's curves (``curves_figure``) to a PNG (default ``<run_dir>/curves.png``) and return its path."""
    import matplotlib.pyplot as plt

    fig = curves_figure(run_dir, sft_dir)
    path = Path(out) if out else Path(run_dir) / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(run_dir: str | Path, sft_dir: str | Path | None = None) -> Any:
    """A run's curves as a matplotlib figure. Left: the training reward of every RL step (mean ± std over the
    step's samples). Right: the held-out greedy reward, mean@k and exact match at every evaluation, on the scale
    0-1 where they lie in it. With ``sft_dir``, a first panel shows the SFT run before it (loss and held-out exact
    match)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    k = next((s.get("k") for s in eval_summaries(run_dir)), 4)
    panels = 3 if sft_dir else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    axes = list(axes)
    if sft_dir:
        ax = axes.pop(0)
        sft = read_metrics(sft_dir)
        ax.plot(*series(sft, "train/loss"), color="tab:gray", lw=1, label="SFT loss")
        ax.set_xlabel("SFT step")
        ax.set_ylabel("masked-diffusion loss")
        ax.set_title("1. SFT (imitating the demonstrations)")
        steps, acc = series(sft, "eval/accuracy")
        if steps:
            twin = ax.twinx()
            twin.plot(steps, acc, "o-", color="tab:purple", label="exact match")
            twin.set_ylim(-0.02, 1.02)
            twin.set_ylabel("exact match (prompts SFT holds back)")
        ax.legend(loc="upper right")
    ax = axes[0]
    steps, mean = series(rows, "reward/mean")
    _, std = series(rows, "reward/std")
    ax.plot(steps, mean, color="tab:blue", label="reward: mean ± std of the step's samples")
    if len(std) == len(mean):
        ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], color="tab:blue", alpha=0.15)  # fmt: skip
    if len(steps) == 1:  # one step: a point, which a line would not show
        ax.plot(steps, mean, "o", color="tab:blue")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_title(f"{panels - 1}. TraceRL: training reward (rollouts{_temperature(run_dir)})")
    ax.legend(loc="lower right")
    ax = axes[1]
    drawn: list[float] = []
    for key, label, style in (
        ("eval/greedy_reward", "greedy reward", "o-"),
        (f"eval/mean@{k}", f"mean@{k} reward (sampled)", "s-"),
        ("eval/exact_match", "exact match (greedy)", "^--"),
    ):
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, style, label=label)
            drawn += values
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out score")
    if drawn and min(drawn) >= 0 and max(drawn) <= 1:  # scores in [0, 1] on the whole scale; others (a reward
        ax.set_ylim(-0.02, 1.02)  # model's) as matplotlib fits them
    ax.set_title(f"{panels}. held-out prompts (never trained on)")
    ax.legend(loc="lower right")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    return fig
