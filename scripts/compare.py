"""Compare tracerl's estimators on one task: methods × seeds from one SFT model, at equal RL steps and at equal
counted learner compute, for the block and the full-attention layout.

    .venv/bin/python scripts/compare.py configs/quickstart.yaml --out runs/compare [key=value ...]
        [--layouts block,full] [--methods trace,trace_value,coupled,random_masking,d1] [--seeds 0,1,2,3,4]
        [--steps 20] [--eval-every 5] [--report]

For each layout:
1. one SFT model (``tracerl sft`` at seed 0, reused when ``<out>/<layout>/sft/final`` exists);
2. the learner FLOPs of one RL step of every method, counted on the same rollout of that model
   (``scoring.learner_flops``): a method whose step costs less gets more steps, so that at its equal-compute step
   it has spent what ``trace`` spends in ``--steps`` steps (rounded to ``--eval-every``);
3. one ``tracerl train`` per method and seed, for max(--steps, its equal-compute step) steps, evaluated every
   ``--eval-every`` steps on the held-out prompts (greedy); a method the config check refuses is listed with the
   reason. A finished run is kept; one stopped midway, or shorter than now asked, resumes from its last checkpoint;
   a run made with other settings is refused (``check_same_settings``), not reported as this comparison's;
4. ``<out>/compare.md`` (the table: held-out greedy reward, mean ± sd over seeds, at equal steps and at equal
   compute; how many seeds rose above the SFT start; divergence warnings), ``compare.png`` (held-out reward
   against RL steps and against counted learner FLOPs) and ``compare.json`` (every number).

Runs go one at a time (the machine is shared); extra key=value arguments apply to every SFT and RL run.
``--report`` runs nothing and writes the table and PNG of the runs finished so far.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Only the estimator changes between methods (objective.views / objective.value_model); the learner recomputes
# the old log-probs where the views are not the sampler's states (objective.old_logp_source=rollout is refused).
METHODS: dict[str, list[str]] = {
    "trace": [],
    "trace_value": ["objective.value_model=true"],
    "coupled": ["objective.views=coupled", "objective.old_logp_source=learner"],
    "random_masking": ["objective.views=random_masking", "objective.old_logp_source=learner"],
    "d1": ["objective.views=d1", "objective.old_logp_source=learner"],
}
# The full-attention variant of the task: the same model shape with bidirectional attention, SFT for 600 steps at
# lr 1e-3 (the block recipe's 200 at 2e-3 leaves it at a greedy reward of 0.17, from which every method only learns
# to write 1 in every blank cell, 0.25; this recipe starts it at 0.46, near the block model's 0.41). Trace views
# merge 4 neighbouring steps (TraceRL's shrink for full attention; 8 on LLaDA): 5 rows of 40 tokens per sample
# instead of 20, which merged steps need the learner's own old log-probs for.
# RL on both layouts takes half the quickstart's learning rate (3.5e-4). On full attention at 7e-4, trace seed 0
# rose to 0.78 held-out by step 10, then drifted into writing digits over the clues (training reward 0.83 → 0.20
# over steps 11-12, at 0.02 nats a step: a drift, not a jump); at 3.5e-4 the same run stays below 0.005 nats a
# step and reaches 0.82 by step 16. On blocks at 7e-4 (the quickstart's, tuned for trace) coupled seed 1 collapsed
# by step 20; at 3.5e-4 every method rises on every seed (docs/estimators.md; `learner.lr=7e-4` reruns it).
# On blocks d1 runs without its prompt perturbation, which the block sampler never produces (refused there).
# On full attention every method carries a KL to the SFT model (β 0.05, the RLHF recipe's): at equal compute random
# masking and d1 get 100 RL steps, and without it they drifted down after step 20 and 3 of 10 runs collapsed (to
# rewards of 0.01-0.12, at per-step KLs under 0.1); with it all 10 ended at 0.79-0.86, each within 0.04 of its best.
LAYOUTS: dict[str, list[str]] = {
    "block": ["objective.d1_prompt_mask_prob=0", "learner.lr=3.5e-4"],
    "full": ["model.tiny.attention=full", "sft.steps=600", "sft.lr=1e-3", "objective.shrink=4",
             "objective.old_logp_source=learner", "learner.lr=3.5e-4", "objective.kl_to_ref_coef=0.05"],
}  # fmt: skip
# Every method: a learning-rate warmup over the first 10 optimizer steps. Adam's first updates move every parameter
# by the full learning rate (the update is the gradient's sign), which d1 cannot take (docs/estimators.md). The
# comparison reads the greedy reward only: one sampled completion per prompt keeps evaluations cheap.
# learner.kl_after_step: the KL column reads how far each whole step moved the policy (one more forward pass, not
# counted as learner compute: it trains nothing), not the in-loss reading before each minibatch's update.
COMMON = ["learner.warmup_steps=10", "eval.samples=1", "eval.k=1", "train.log_samples_every=0", "wandb.mode=disabled",
          "learner.kl_after_step=true"]  # fmt: skip
REFERENCE = "trace"


@dataclass
class Run:
    """One (layout, method, seed) RL run and what it measured."""

    layout: str
    method: str
    seed: int
    steps: int  # RL steps it runs
    equal_compute_step: int  # its step that has spent what the reference spends in --steps steps
    run_dir: str
    refused: str | None = None  # the config check's reason, when the method is refused for this layout
    overrides: list[str] = field(default_factory=list)  # the key=value overrides of its tracerl train
    evals: dict[int, float] = field(default_factory=dict)  # RL step → held-out greedy reward
    flops: dict[int, float] = field(default_factory=dict)  # RL step → cumulative counted learner FLOPs
    warnings: list[str] = field(default_factory=list)  # divergence guard warnings
    series: dict[str, dict[int, float]] = field(default_factory=dict)  # SERIES key → RL step → value


SERIES = ("train/kl_to_old", "train/kl_to_old_after_step", "train/log_ratio_abs_max", "value/explained_var",
          "value/advantage_var_ratio")  # fmt: skip
KL_AFTER_STEP = "train/kl_to_old_after_step"


# ---------------------------------------------------------------------------------------------- pure parts


def equal_compute_step(steps: int, reference_flops: float, flops: float, every: int) -> int:
    """The step at which a method spending ``flops`` per step has spent what the reference spends in ``steps``,
    rounded to a multiple of ``every`` (where it is evaluated), at least ``every``.

    Example:
        >>> [equal_compute_step(20, 4.0, flops, 5) for flops in (1.0, 2.2, 32.0)]
        [80, 35, 5]
    """
    exact = steps * reference_flops / flops
    return max(every, every * round(exact / every))


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def read_run(run: Run) -> None:
    """Fill ``evals``, ``flops`` and ``warnings`` from a finished run directory; the warnings are the divergence
    guard's (default settings) replayed over its metrics, so every run is judged alike."""
    from tracerl.config import GuardConfig
    from tracerl.orchestrator.guards import DivergenceGuard

    rows = [json.loads(x) for x in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    total, run.evals, run.flops, run.warnings = 0.0, {}, {0: 0.0}, []
    guard = DivergenceGuard(GuardConfig())
    for row in sorted(rows, key=lambda r: r["step"]):
        total += row.get("perf/learner_flops", 0.0)
        run.flops[int(row["step"])] = total
        if "eval/greedy_reward" in row:
            run.evals[int(row["step"])] = float(row["eval/greedy_reward"])
        for key in SERIES:
            if key in row:
                run.series.setdefault(key, {})[int(row["step"])] = float(row[key])
        run.warnings += [f"step {row['step']}: {w}" for w in guard.check(int(row["step"]), row)]


def summarise(runs: list[Run], steps: int) -> list[dict[str, Any]]:
    """One row per (layout, method): held-out greedy reward at the start, at ``steps`` and at the equal-compute
    step (mean, sd over seeds), its change, how many seeds rose, the learner FLOPs spent, the warnings."""
    out = []
    for layout, method in dict.fromkeys((r.layout, r.method) for r in runs):
        group = [r for r in runs if (r.layout, r.method) == (layout, method)]
        row: dict[str, Any] = {"layout": layout, "method": method, "seeds": len(group)}
        if group[0].refused:
            out.append(row | {"refused": group[0].refused})
            continue
        done = [r for r in group if r.evals and max(r.evals) >= r.steps]
        row["finished"] = len(done)
        if not done:
            out.append(row)
            continue
        eq = done[0].equal_compute_step
        for key, at in (("steps", steps), ("compute", eq)):
            start = [r.evals[0] for r in done]
            end = [r.evals[at] for r in done]
            delta = [e - s for s, e in zip(start, end, strict=True)]
            row[key] = {
                "step": at,
                "reward": mean_sd(end),
                "delta": mean_sd(delta),
                "rose": sum(d > 0 for d in delta),
                "flops": statistics.fmean(r.flops[at] for r in done),
            }
        row["start"] = mean_sd([r.evals[0] for r in done])
        row["warnings"] = sum(bool(r.warnings) for r in done)
        # the whole step's movement where the runs measured it, else the in-loss reading (runs before kl_after_step)
        row["kl_metric"] = KL_AFTER_STEP if all(KL_AFTER_STEP in r.series for r in done) else "train/kl_to_old"
        kl = [v for r in done for s, v in r.series.get(row["kl_metric"], {}).items() if s <= steps]
        row["kl_to_old_max"] = max(kl, default=math.nan)  # over the first `steps` steps of every seed
        if any("value/explained_var" in r.series for r in done):
            at = [r.series["value/explained_var"].get(steps, math.nan) for r in done]
            ratio = [statistics.fmean(v for s, v in r.series["value/advantage_var_ratio"].items() if s <= steps)
                     for r in done]  # fmt: skip
            row["value"] = {"explained_var": mean_sd(at), "advantage_var_ratio": mean_sd(ratio)}
        out.append(row)
    return out


def strict(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None, so that ``compare.json`` is strict JSON (a mean over no
    finished run, a run that logged no KL, a metric that was NaN).

    Example:
        >>> strict({"kl": math.nan, "reward": (0.5, math.inf), "runs": [1.0]})
        {'kl': None, 'reward': [0.5, None], 'runs': [1.0]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def write_json(path: Path, rows: list[dict[str, Any]], runs: list[Run]) -> None:
    """The summary rows and every run's numbers, as strict JSON (no NaN)."""
    data = strict({"rows": rows, "runs": [vars(r) for r in runs]})
    path.write_text(json.dumps(data, indent=1, allow_nan=False))


def markdown(rows: list[dict[str, Any]], steps: int) -> str:
    """The comparison table (one line per layout and method)."""

    def pm(x: tuple[float, float], sign: bool = False) -> str:
        return f"{x[0]:+.3f} ± {x[1]:.3f}" if sign else f"{x[0]:.3f} ± {x[1]:.3f}"

    def kl(x: float | None) -> str:  # none logged (every step trained nothing): a dash, as compare.json's null
        return "—" if x is None or math.isnan(x) else f"{x:.3f}"

    read = {r["kl_metric"].removeprefix("train/") for r in rows if "kl_metric" in r}
    kl_name = read.pop() if len(read) == 1 else "kl_to_old or kl_to_old_after_step"
    lines = [
        f"| layout | method | SFT start | step {steps}: greedy reward | Δ (seeds up) | equal compute: step | greedy "
        f"reward | Δ (seeds up) | learner FLOPs | max {kl_name} (steps ≤ {steps}) | runs warned |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['layout']} | {r['method']} "
        if "refused" in r:
            lines.append(head + f"| refused: {r['refused']} |" + " |" * 8)
        elif "steps" not in r:
            lines.append(head + f"| {r.get('finished', 0)} of {r['seeds']} runs finished |" + " |" * 8)
        else:
            s, c = r["steps"], r["compute"]
            lines.append(
                head + f"| {pm(r['start'])} | {pm(s['reward'])} | {pm(s['delta'], True)} ({s['rose']}/{r['finished']}) "
                f"| {c['step']} | {pm(c['reward'])} | {pm(c['delta'], True)} ({c['rose']}/{r['finished']}) "
                f"| {c['flops']:.3g} | {kl(r['kl_to_old_max'])} | {r['warnings']}/{r['finished']} |"
            )
    values = [r for r in rows if "value" in r]
    if values:
        lines += ["", f"| layout | value model: explained variance at step {steps} | GAE / group-baseline advantage "
                  f"variance (mean of steps 1-{steps}) |", "|---|---|---|"]  # fmt: skip
        for r in values:
            v = r["value"]
            lines.append(f"| {r['layout']} | {pm(v['explained_var'])} | {pm(v['advantage_var_ratio'])} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path) -> None:
    """Held-out greedy reward (mean ± sd over seeds) against RL steps and against counted learner FLOPs, one row of
    two panels per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys(r.layout for r in runs))
    fig, axes = plt.subplots(len(layouts), 2, figsize=(11, 4 * len(layouts)), squeeze=False, constrained_layout=True)
    for row, layout in zip(axes, layouts, strict=True):
        for method in dict.fromkeys(r.method for r in runs if r.layout == layout):
            group = [r for r in runs if (r.layout, r.method) == (layout, method) and r.evals and not r.refused]
            if not group:
                continue
            steps = sorted(set.intersection(*(set(r.evals) for r in group)))
            mean = [statistics.fmean(r.evals[s] for r in group) for s in steps]
            sd = [mean_sd([r.evals[s] for r in group])[1] for s in steps]
            flops = [statistics.fmean(r.flops.get(s, math.nan) for r in group) / 1e12 for s in steps]
            for ax, x in zip(row, (steps, flops), strict=True):
                (line,) = ax.plot(
                    x, mean, "o-", ms=3, label=f"{method} ({len(group)} seed{'s' if len(group) > 1 else ''})"
                )
                low = [m - d for m, d in zip(mean, sd, strict=True)]
                high = [m + d for m, d in zip(mean, sd, strict=True)]
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        row[0].set_xlabel("RL step")
        row[1].set_xlabel("counted learner compute (TFLOP)")
        for ax in row:
            ax.set_ylabel("held-out greedy reward")
            ax.set_title(f"{layout} layout")
            ax.grid(alpha=0.3)
        if row[0].lines:
            row[0].legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- running


RESUME = "compare.py: interrupted. Rerun the same command to go on: finished runs are kept, and a run stopped "
RESUME += "midway resumes from its last checkpoint."


def tracerl(args: list[str], log: Path) -> None:
    """Run one tracerl command, its console appended to ``log``; a failure stops the comparison with the log's tail.

    The command runs in a session of its own, and Ctrl-C or SIGTERM to the comparison (or to its terminal's
    group) is passed on to it once per signal: the command finishes its step, checkpoints it and exits, and only
    then does the comparison stop, saying how to go on. A second one stops the command at once.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    # one torch thread per command unless the user set OMP_NUM_THREADS: runs of different methods and seeds get
    # the same float arithmetic whatever else the machine runs (given to the command, this process's environment
    # is left as it is)
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("a") as f:
        cmd = [sys.executable, "-m", "tracerl.cli", *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        stopped: list[str] = []

        def forward(signum: int, frame: Any) -> None:
            del frame
            stopped.append(signal.Signals(signum).name)
            proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if stopped or code == 130:
        raise SystemExit(RESUME)
    if code:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"tracerl {args[0]} failed (exit {code}); {log}:\n{tail}")


# what the comparison decides for every run; the same keys among the overrides are refused
OWNED = {
    "seed": "from --seeds; the SFT model is seed 0's",
    "run_dir": "from --out",
    "train.steps": "from --steps and each method's equal-compute step",
    "train.eval_every": "from --eval-every",
    "checkpoint.resume": "a rerun resumes every unfinished run",
    "model.path": "each layout's SFT model, <out>/<layout>/sft/final",
    "model.tiny.attention": "from --layouts",
    "objective.views": "from --methods",
    "objective.value_model": "from --methods: trace_value",
    "objective.old_logp_source": "from --methods and --layouts",
}


def check_overrides(overrides: list[str]) -> None:
    """No override sets what the comparison decides (``OWNED``): it would be ignored, or change what a row
    labelled with a method measures."""
    owned = [(o.split("=", 1)[0].strip(), o) for o in overrides if o.split("=", 1)[0].strip() in OWNED]
    if owned:
        raise SystemExit(
            "compare.py: "
            + "; ".join(f"{o}: the comparison sets {key} itself ({OWNED[key]})" for key, o in owned)
            + ". Leave these out of the overrides."
        )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "synthetic_options":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_differ(config: str, args: list[str], run_dir: Path, free: tuple[str, ...]) -> list[str]:
    """The settings in which the run already in ``run_dir`` (its ``config.json``) differs from the one these
    arguments ask for, except the keys in ``free``; [] where it holds no run yet."""
    from tracerl.checks import load_config
    from tracerl.config import to_dict

    written = run_dir / "config.json"
    if not written.is_file():
        return []
    want = _flat(json.loads(json.dumps(to_dict(load_config(config, args)))))
    have = _flat(json.loads(written.read_text()))
    free = (*free, "run_dir", "model.path")  # derived from --out, which may be written another way each time
    keys = sorted(k for k in set(want) | set(have) if k not in free and want.get(k) != have.get(k))
    return [f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in keys]


def check_same_settings(config: str, args: list[str], run_dir: Path, free: tuple[str, ...]) -> None:
    if differ := settings_differ(config, args, run_dir, free):
        shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise SystemExit(
            f"compare.py: {run_dir} holds a run made with other settings ({shown}). Its numbers would be reported "
            "as this comparison's. Give another --out, or remove that run to have it made again."
        )


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """One comparison at a time in ``out``: a second one would delete and remake the first one's runs."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with (out / ".compare.lock").open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SystemExit(
                f"compare.py: another comparison is running in {out} (pid {f.read().strip() or '?'}). Wait for it, "
                "or give another --out."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def refusal(config: str, overrides: list[str], layout: str) -> str | None:
    """Why these overrides are refused (the config checks, ``tracerl train``'s, and ``trace.check_estimator`` for
    the layout), or None."""
    from tracerl import trace
    from tracerl.checks import load_config
    from tracerl.config import ConfigError, check_training

    try:
        cfg = load_config(config, overrides)
        check_training(cfg)
        o = cfg.objective
        trace.check_estimator(o.views, layout, o.d1_prompt_mask_prob)
    except ConfigError as err:
        return str(err)
    return None


def step_flops(config: str, overrides: list[str], methods: list[str], layout: str, seed: int) -> dict[str, float]:
    """Counted learner FLOPs of one RL step of each method, on the same rollout of the SFT model."""
    import torch

    from tracerl import scoring, trace
    from tracerl.checks import load_config
    from tracerl.models import load_policy
    from tracerl.orchestrator.setup import load_prompts
    from tracerl.sampling import generate

    cfg = load_config(config, overrides)
    policy = load_policy(cfg.model)
    stream, _ = load_prompts(cfg)
    g = cfg.rollout.samples_per_prompt
    prompts = [p for p in stream.next_batch(cfg.rollout.prompts_per_step).prompt_ids for _ in range(g)]
    with torch.no_grad():
        rollout = generate(policy, prompts, cfg.sampling, seed=seed)
    params = sum(p.numel() for p in policy.model.parameters())
    out = {}
    for method in methods:
        if refusal(config, [*overrides, *METHODS[method]], layout):
            continue
        c = load_config(config, [*overrides, *METHODS[method]])
        o, lc = c.objective, c.learner
        views = trace.make_views(
            rollout,
            o.views,
            policy.mask_id,
            shift=policy.shift,
            seed=seed,
            shrink_s=o.shrink,
            prompt_mask_prob=o.d1_prompt_mask_prob,
            low=o.mask_ratio_low,
            high=o.mask_ratio_high,
            pack=lc.packed_views,
            max_tokens=lc.micro_batch_tokens,
        )  # the learner's own views: packed on blocks unless learner.packed_views=false
        out[method] = scoring.learner_flops(
            float(views.seq_tokens().sum()), params, old_logp_pass=o.old_logp_source == "learner",
            reference=o.kl_to_ref_coef > 0, value=o.value_model, updates_per_step=lc.updates_per_step,
            value_updates_per_step=lc.value_updates_per_step,
        )  # fmt: skip
    return out


def sft_line(sft: Path) -> str:
    """What an SFT run ended at: its steps, last loss and held-back exact match (from its metrics.jsonl).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.0}\\n'
        ...     '{"step": 200, "train/loss": 0.29, "eval/accuracy": 0.05}\\n')
        >>> sft_line(d)
        'SFT: 200 steps, loss 0.290, held-back exact match 0.05'
    """
    rows = [json.loads(x) for x in (sft / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = max(rows, key=lambda r: r["step"])
    loss = next((f", loss {r['train/loss']:.3f}" for r in reversed(rows) if "train/loss" in r), "")
    acc = next(
        (f", held-back exact match {r['eval/accuracy']:.2f}" for r in reversed(rows) if "eval/accuracy" in r), ""
    )
    return f"SFT: {last['step']} steps{loss}{acc}"


def finished(run_dir: Path, steps: int) -> bool:
    return all(
        p.exists() for p in (run_dir / "eval" / f"step-{steps}.json", run_dir / "final", run_dir / "metrics.jsonl")
    )


def check_selection(
    layouts: str, methods: str, seeds: str, steps: int, eval_every: int
) -> tuple[list[str], list[str], list[int]]:
    """The comma-separated choices as lists, each entry once in the order given; a SystemExit that names every
    problem otherwise."""

    def items(text: str) -> list[str]:
        return list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))

    problems = []
    lay, meth = items(layouts), items(methods)
    if unknown := [x for x in lay if x not in LAYOUTS]:
        problems.append(f"unknown layouts {unknown}: choose from {list(LAYOUTS)}")
    if unknown := [x for x in meth if x not in METHODS]:
        problems.append(f"unknown methods {unknown}: choose from {list(METHODS)}")
    if REFERENCE not in meth:
        problems.append(f"--methods must include '{REFERENCE}' (got {meth}): it sets the compute budget")
    try:
        seed_list = [int(x) for x in items(seeds)]
    except ValueError:
        problems.append(f"--seeds must be comma-separated integers, got '{seeds}'")
        seed_list = []
    if not seed_list and not any(p.startswith("--seeds") for p in problems):
        problems.append("--seeds names no seed")
    if eval_every < 1 or steps < 1 or steps % eval_every:
        problems.append(
            f"--steps ({steps}) and --eval-every ({eval_every}) must be ≥ 1, --steps a multiple of --eval-every"
        )
    if problems:
        raise SystemExit("compare.py: " + "; ".join(problems) + ".")
    return lay, meth, seed_list


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the task's config (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every SFT and RL run")
    p.add_argument("--out", required=True, help="output directory (runs, table, PNG)")
    p.add_argument("--layouts", default="block,full", help=f"comma-separated, from {list(LAYOUTS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated RL seeds (the SFT model is seed 0's)")
    p.add_argument("--steps", type=int, default=20, help="RL steps of the equal-steps comparison")
    p.add_argument("--eval-every", type=int, default=5, help="RL steps between held-out evaluations")
    p.add_argument("--report", action="store_true", help="run nothing: the table and PNG of the finished runs")
    p.add_argument("--verbose", action="store_true", help="third-party logs and progress bars")
    ns = p.parse_intermixed_args(argv)  # key=value overrides before or after the options
    from tracerl.cli import quiet_third_party

    quiet_third_party(ns.verbose)
    layouts, methods, seeds = check_selection(ns.layouts, ns.methods, ns.seeds, ns.steps, ns.eval_every)
    from tracerl.checks import load_config
    from tracerl.config import ConfigError

    check_overrides(ns.overrides)
    try:  # the config and overrides load before anything is written under --out
        load_config(ns.config, ns.overrides)
    except ConfigError as err:
        p.error(str(err))
    for layout in layouts:  # the reference method runs on every layout chosen
        if reason := refusal(ns.config, [*COMMON, *LAYOUTS[layout], *ns.overrides, *METHODS[REFERENCE]], layout):
            raise SystemExit(
                f"compare.py: {REFERENCE} on the {layout} layout is refused with these overrides: {reason}"
            )
    out = Path(ns.out)
    try:
        if ns.report:  # runs nothing: reads what is there, even while a comparison runs
            return compare(ns, out, layouts, methods, seeds)
        with lock(out):
            return compare(ns, out, layouts, methods, seeds)
    except KeyboardInterrupt:  # between commands (counting FLOPs, reading runs, drawing)
        raise SystemExit(RESUME) from None


def compare(ns: argparse.Namespace, out: Path, layouts: list[str], methods: list[str], seeds: list[int]) -> int:
    """Steps 1-4 of the module docstring, in ``out`` (locked)."""
    t0 = time.time()
    verbose = ["--verbose"] if ns.verbose else []  # the commands' own third-party logs, in their log files
    plans: dict[tuple[str, int, str], Run] = {}
    for layout in layouts:  # 1-2: the SFT model and every method's equal-compute step, per layout
        sft = out / layout / "sft"
        if not (sft / "final").is_dir() and ns.report:
            raise SystemExit(f"{sft / 'final'} does not exist: nothing to report for the {layout} layout yet.")
        args = [*LAYOUTS[layout], *ns.overrides, "wandb.mode=disabled", "seed=0", f"run_dir={sft}"]
        check_same_settings(ns.config, args, sft, free=("checkpoint.resume",))
        if not (sft / "final").is_dir():  # the task's own SFT recipe (COMMON is for the RL runs only)
            again = sft.exists()
            print(f"[{layout}] SFT → {sft}" + (" (resuming where it stopped)" if again else ""), flush=True)
            resume = ["checkpoint.resume=auto"] if again else []
            tracerl(["sft", ns.config, *args, *resume, *verbose], out / layout / "sft.log")
            print(f"    {sft_line(sft)}", flush=True)
        base = [*COMMON, *LAYOUTS[layout], *ns.overrides, f"model.path={sft / 'final'}"]
        flops = step_flops(ns.config, base, methods, layout, seed=0)
        budget = flops[REFERENCE]
        print(f"[{layout}] learner FLOPs per RL step, relative to {REFERENCE}: "
              + ", ".join(f"{m} {f / budget:.2f}" for m, f in flops.items()), flush=True)  # fmt: skip
        for method in methods:
            reason = refusal(ns.config, [*base, *METHODS[method]], layout)
            eq = equal_compute_step(ns.steps, budget, flops[method], ns.eval_every) if method in flops else ns.steps
            for seed in seeds:
                run_dir = out / layout / method / f"seed{seed}"
                run = Run(layout, method, seed, max(ns.steps, eq), eq, str(run_dir), reason, [*base, *METHODS[method]])
                plans[(layout, seed, method)] = run
    # 3: seed by seed, so that a comparison stopped early has every method on the same seeds
    for seed in seeds:
        for layout in layouts:
            for method in methods:
                run = plans[(layout, seed, method)]
                run_dir = Path(run.run_dir)
                if run.refused or ns.report and not finished(run_dir, run.steps):
                    continue
                args = [*run.overrides, f"seed={seed}", f"train.steps={run.steps}", f"run_dir={run_dir}"]
                args.append(f"train.eval_every={ns.eval_every}")
                check_same_settings(ns.config, args, run_dir, free=("checkpoint.resume", "train.steps"))
                if not finished(run_dir, run.steps):  # a run stopped midway, or a shorter one: resumed
                    again = " (resuming where it stopped)" if run_dir.exists() else ""
                    print(f"[{layout}] {method} seed {seed}: {run.steps} RL steps{again} "
                          f"({time.time() - t0:.0f}s so far)", flush=True)  # fmt: skip
                    args += ["checkpoint.resume=auto"] if run_dir.exists() else []
                    tracerl(["train", ns.config, *args, *verbose], run_dir.with_suffix(".log"))
                    read_run(run)
                    first, last = min(run.evals, default=0), max(run.evals, default=0)
                    if run.evals:
                        print(f"    held-out greedy reward {run.evals[first]:.3f} at step {first} → "
                              f"{run.evals[last]:.3f} at step {last}", flush=True)  # fmt: skip
                else:
                    read_run(run)
    runs = [plans[(layout, seed, method)] for layout in layouts for method in methods for seed in seeds]
    if ns.report and not any(r.evals for r in runs):
        raise SystemExit(
            f"compare.py: no run of {ns.steps} RL steps is finished in {out}, so --report would write an empty table "
            "over compare.md, compare.json and compare.png; it wrote nothing. Give the --steps (and --seeds) the "
            "comparison ran with."
        )
    rows = summarise(runs, ns.steps)
    (out / "compare.md").write_text(markdown(rows, ns.steps))
    write_json(out / "compare.json", rows, runs)
    plot(runs, out / "compare.png")
    print(markdown(rows, ns.steps))
    print(f"table: {out / 'compare.md'} · curves: {out / 'compare.png'} · numbers: {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
