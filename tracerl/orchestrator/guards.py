"""What the loop watches besides the config checks: run inputs that are valid one by one but wrong for the run
(many actors on few cores: a warning before anything starts; a reward that scores nothing: an error at the first step
it shows), and a run that goes wrong while it trains (``DivergenceGuard``: one console line and a W&B alert).

The divergence guard checks four signs after every RL step, from the metrics the loop already has:

- the training reward collapses: its mean over the last ``guard.window`` steps falls below
  ``guard.reward_fraction`` × the best such mean so far, or every group was filtered out for ``guard.window``
  steps in a row (nothing is learnt any more: d1 on the block layout ended so, every sample scoring 0);
- the held-out greedy reward collapses: an evaluation below ``guard.reward_fraction`` × the best one so far;
- ``train/kl_to_old`` (``train/kl_to_old_after_step`` when ``learner.kl_after_step`` logs it) stays above
  ``guard.max_kl_to_old`` for ``guard.window`` steps in a row (NaN counts as above);
- a reward function of weight 0 (logged, not trained on: a verifier beside a reward model) collapses as the
  training reward would, on the training batches or in the held-out greedy evaluation; while the trained reward
  holds up there, the policy may be gaming the reward it is trained on.

A fraction of the best is measured from 0 for rewards that start at 0 or above (verifiers, scores in [0, 1]). A
reward that starts below 0 (a reward model's scores) is measured from its start instead: a collapse is a fall below
``start + guard.reward_fraction × (best − start)``, i.e. the run lost more than ``1 − reward_fraction`` of what it
had gained, or, if it never rose beyond its noise, a fall below its start beyond its noise.

A fall from the best is a collapse only beyond ``NOISE_Z`` standard errors of the difference of the two means (each
reading's standard error: ``reward/sem``, ``reward/sem/<name>``, ``eval/greedy_reward_sem[/<name>]``; none logged:
no margin), so a reward near 0 does not warn on noise. A held-out evaluation, which scores the same prompts each
time, is compared with the best one prompt by prompt when the loop passes the per-prompt rewards (``check``'s
``per_prompt``): the standard error of the per-prompt differences (``paired_error``).

Each sign is reported when it appears, and again only after it has cleared. Both watches keep their state in the
checkpoint (``state_dict``), so a resumed run warns exactly where an uninterrupted one does.

``ValueWatch`` reports, with ``objective.value_model`` on, a value model that has learnt nothing: its
``value/explained_var`` averaged over ``guard.value_window`` steps below ``guard.min_value_explained_var``. Its
advantages are then the group baseline's, at about twice the learner compute (docs/estimators.md).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tracerl.config import Config, GuardConfig
from tracerl.reward_service import RewardResult
from tracerl.stats import mean_error

KL_AFTER_STEP = "train/kl_to_old_after_step"  # measured after the step's last update (learner.kl_after_step)
NOISE_Z = 3.0  # a fall of the mean within this many standard errors (of the difference) is noise
ACTOR_MB = 430  # what an actor process that imports torch holds before its model (docs: ENV / cluster)


def oversubscription(cfg: Config, cores: int) -> str | None:
    """A warning when a local instance would start more rollout or reward actors than the machine has cores
    (they take turns on the cores: each one costs start-up time and memory and adds no speed); None otherwise.

    Example:
        >>> cfg = Config()
        >>> cfg.reward.num_workers = 16
        >>> oversubscription(cfg, 2).split(":")[0]
        'reward.num_workers=16 on a machine with 2 CPU cores'
    """
    if cfg.cluster.address:
        return None
    counts = (("rollout.num_workers", cfg.rollout.num_workers), ("reward.num_workers", cfg.reward.num_workers))
    crowded = [(name, count) for name, count in counts if count > cores]
    if not crowded:
        return None
    names = " and ".join(f"{name}={count}" for name, count in crowded)
    processes = sum(count for _, count in crowded)
    return (
        f"{names} on a machine with {cores} CPU cores: the actors take turns on the cores, so beyond {cores} each one "
        f"adds start-up time and memory (about {ACTOR_MB} MB per rollout actor before its model, {processes} "
        f"processes in all) and no speed. Use at most {cores} here, or run on a cluster (--ray-address)."
    )


def schedule_ends_early(cfg: Config) -> str | None:
    """A warning when a decaying learning-rate schedule reaches 0 before the run's last optimizer step (its
    horizon, ``learner.total_steps``, is set apart from the run's length); None otherwise.

    Example:
        >>> cfg = Config()
        >>> cfg.learner.lr_schedule, cfg.learner.total_steps, cfg.train.steps = "cosine", 10, 20
        >>> schedule_ends_early(cfg).split(":")[0]
        'learner.lr_schedule=cosine reaches 0 at learner.total_steps=10 optimizer steps, but the run takes 20'
    """
    lc = cfg.learner
    steps = cfg.train.steps * lc.minibatches * lc.updates_per_step
    if lc.lr_schedule == "constant" or steps <= lc.total_steps:
        return None
    return (
        f"learner.lr_schedule={lc.lr_schedule} reaches 0 at learner.total_steps={lc.total_steps} optimizer steps, "
        f"but the run takes {steps}: train.steps={cfg.train.steps} × learner.minibatches={lc.minibatches} × "
        f"learner.updates_per_step={lc.updates_per_step}, so its last {steps - lc.total_steps} train at learning "
        f"rate 0. Set learner.total_steps={steps} to decay over the whole run."
    )


def start_warnings(cfg: Config, cores: int | None) -> list[str]:
    """The warnings ``tracerl train`` and ``validate`` print before anything starts: more actors than the ``cores``
    of the machine the run starts on (None: it runs elsewhere, so not checked), a learning-rate schedule that ends
    early, and ``model.tiny`` settings a saved tiny model does not have.

    Example:
        >>> cfg = Config()
        >>> cfg.reward.num_workers = 16
        >>> [w.split(" on ")[0] for w in start_warnings(cfg, 2)], start_warnings(cfg, None)
        (['reward.num_workers=16'], [])
    """
    from tracerl.models import ignored_tiny_settings  # the models import transformers: not at module import

    crowded = oversubscription(cfg, cores) if cores is not None else None
    return [w for w in (crowded, schedule_ends_early(cfg), ignored_tiny_settings(cfg.model)) if w]


def nothing_scored(
    scored: RewardResult, step: int, cfg: Config, evaluation: bool = False, failures_too: bool = False
) -> str | None:
    """The error when every sample of an RL step (or of a held-out ``evaluation``) got None from its reward
    functions, so nothing can be trained on (or reported); None otherwise. Calls that failed under
    ``reward.on_error=nan`` are counted and logged, and excused, unless ``failures_too`` (``tracerl eval``: an
    evaluation of nothing but failures reports nothing either)."""
    if not scored.total or not all(math.isnan(v) for v in scored.total):
        return None
    if not failures_too and any(v for k, v in scored.metrics.items() if k.startswith("reward/errors/")):
        return None  # failures under on_error="nan": counted and logged, not this
    silent = [name for name, values in scored.parts.items() if all(math.isnan(v) for v in values)]
    what = "the held-out evaluation at step" if evaluation else "RL step"
    held_out = evaluation and cfg.eval.source is not None
    key, source = ("eval.source", cfg.eval.source) if held_out else ("data.source", cfg.data.source)
    errors = {k: v for k, v in scored.metrics.items() if k.startswith("reward/errors/") and v}
    failed = f" (failures counted under reward.on_error=nan: {errors})" if errors else ""
    consequence = "there is nothing to report" if evaluation else "there is nothing to train on"
    return (
        f"every sample of {what} {step} was scored None (or NaN) by reward function(s) {silent}{failed} "
        f'({len(scored.total)} samples), so {consequence}: None and NaN mean "cannot score this sample". Check '
        f"that the dataset columns they read hold what they expect (data.answer_column='{cfg.data.answer_column}' "
        f"of {key} '{source}'), or the reward's kwargs."
    )


@dataclass
class Windowed:
    """A reward's mean over the last ``window`` steps against the best such mean so far, measured from its floor
    (min(0, the first finite mean)): the training reward's track, each monitor's, and the held-out reward's (a
    window of 1 evaluation, read to ``fmt``). Each reading may come with its standard error (``sem``: the batch's
    ``reward/sem``); a fall that the noise of the two means can explain is no collapse.

    Example:
        >>> track = Windowed(window=2)
        >>> [track.add(r, fraction=0.5) for r in (0.6, 0.6, 0.2, 0.0)]
        [None, (0.6, None), (0.4, None), (0.1, 'below 0.5 × its best (0.60)')]
    """

    window: int
    fmt: str = ".2f"  # how the messages write rewards
    values: deque = field(default_factory=deque)  # the last `window` rewards
    sems: deque = field(default_factory=deque)  # their standard errors (NaN: not known)
    best: float = float("-inf")  # best windowed mean so far
    best_sem: float = float("nan")  # the standard error of that mean
    floor: float | None = None  # what a fraction of the best is measured from
    best_values: list[float] | None = None  # the per-prompt rewards of the best reading (held out: the same prompts)

    def add(
        self, value: float, fraction: float, sem: float = float("nan"), values: list[float] | None = None
    ) -> tuple[float, str | None] | None:
        """One step's reward (and its standard error) in; once ``window`` steps are in, (windowed mean, how it
        collapsed or None). ``values``: the per-prompt rewards of a reading on a fixed prompt set (the held-out
        evaluation, window 1); against the best reading's, the noise is that of their per-prompt differences."""
        self.values.append(value)
        self.sems.append(sem)
        while len(self.values) > self.window:
            self.values.popleft()
            self.sems.popleft()
        if len(self.values) < self.window:
            return None
        mean = sum(self.values) / self.window
        mean_sem = math.sqrt(sum(e * e for e in self.sems)) / self.window  # NaN if one is not known
        if self.floor is None and math.isfinite(mean):
            self.floor = min(0.0, mean)
        paired = paired_error(values, self.best_values) if self.window == 1 else math.nan
        margin = NOISE_Z * (paired if math.isfinite(paired) else math.hypot(mean_sem, self.best_sem))
        fell = collapse(mean, self.best, self.floor, fraction, self.fmt, margin if math.isfinite(margin) else 0.0)
        if mean > self.best:
            self.best, self.best_sem, self.best_values = mean, mean_sem, values
        return mean, fell

    def state_dict(self) -> dict[str, Any]:
        best_values = None if self.best_values is None else [finite_or_none(v) for v in self.best_values]
        return {"values": [finite_or_none(v) for v in self.values], "best": finite_or_none(self.best),
                "floor": self.floor, "sems": [finite_or_none(e) for e in self.sems],
                "best_sem": finite_or_none(self.best_sem), "best_values": best_values}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a state written before the standard errors were kept: each one unknown (no noise margin, as then)
        self.values = deque(none_or(v, float("nan")) for v in state["values"])
        self.sems = deque(none_or(e, float("nan")) for e in state.get("sems") or [None] * len(self.values))
        self.best = none_or(state["best"], float("-inf"))
        self.best_sem = none_or(state.get("best_sem"), float("nan"))
        best_values = state.get("best_values")
        self.best_values = None if best_values is None else [none_or(v, float("nan")) for v in best_values]
        self.floor = state["floor"]


@dataclass
class DivergenceGuard:
    """Watch a run's metrics step by step; ``check`` returns the new warnings of this step (usually none).
    ``monitors``: the names of the reward functions of weight 0 (logged as ``reward/<name>/mean`` and
    ``eval/greedy_reward/<name>``, not trained on).

    Example:
        >>> guard = DivergenceGuard(GuardConfig(window=2, reward_fraction=0.5))
        >>> trained = [{"reward/mean": r, "train/policy_loss": 0.1} for r in (0.6, 0.6, 0.2, 0.1)]
        >>> [guard.check(s, m) for s, m in enumerate(trained, start=1)]
        [[], [], [], ['training reward collapsed: 0.15 over the last 2 steps, below 0.5 × its best (0.60)']]
    """

    cfg: GuardConfig
    monitors: tuple[str, ...] = ()
    training: Windowed = field(init=False)  # the training reward
    watched: dict[str, Windowed] = field(init=False)  # each monitor's reward
    held_out: Windowed = field(init=False)  # the held-out greedy reward, evaluation by evaluation
    held_out_watched: dict[str, Windowed] = field(init=False)  # each monitor's held-out greedy reward
    skipped: int = 0  # consecutive steps with every group filtered out
    high_kl: int = 0  # consecutive steps with kl_to_old above the bound
    last_kl: tuple[str, float, float] = ("", 0.0, 0.0)  # the last KL read: metric, value, largest token log-ratio
    active: set[str] = field(default_factory=set)  # signs reported and not yet cleared

    def __post_init__(self) -> None:
        self.training = Windowed(self.cfg.window)
        self.watched = {name: Windowed(self.cfg.window) for name in self.monitors}
        self.held_out = Windowed(1, fmt=".3f")
        self.held_out_watched = {name: Windowed(1, fmt=".3f") for name in self.monitors}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, as JSON values, so a resumed run warns exactly where an uninterrupted one does."""
        training, held_out = self.training.state_dict(), self.held_out.state_dict()
        return {
            "rewards": training["values"], "best_reward": training["best"], "reward_floor": training["floor"],
            "reward_sems": training["sems"], "best_reward_sem": training["best_sem"],
            "best_eval": held_out["best"], "eval_floor": held_out["floor"], "best_eval_sem": held_out["best_sem"],
            "best_eval_values": held_out["best_values"],
            "monitors": {name: track.state_dict() for name, track in self.watched.items()},
            "eval_monitors": {name: track.state_dict() for name, track in self.held_out_watched.items()},
            "skipped": self.skipped, "high_kl": self.high_kl,
            "last_kl": [self.last_kl[0], *map(finite_or_none, self.last_kl[1:])], "active": sorted(self.active),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a checkpoint written before the floors were kept measured every fraction from 0; one written before the
        # monitors were watched starts their tracks afresh
        floor = state.get("reward_floor", 0.0 if state["best_reward"] is not None else None)
        self.training.load_state_dict(
            {
                "values": state["rewards"],
                "best": state["best_reward"],
                "floor": floor,
                "sems": state.get("reward_sems"),
                "best_sem": state.get("best_reward_sem"),
            }
        )
        floor = state.get("eval_floor", 0.0 if state["best_eval"] is not None else None)
        self.held_out.load_state_dict({"values": [], "best": state["best_eval"], "floor": floor,
                                       "best_sem": state.get("best_eval_sem"),
                                       "best_values": state.get("best_eval_values")})  # fmt: skip
        for watched, key in ((self.watched, "monitors"), (self.held_out_watched, "eval_monitors")):
            for name, track in state.get(key, {}).items():
                if name in watched:
                    watched[name].load_state_dict(track)
        self.skipped, self.high_kl = int(state["skipped"]), int(state["high_kl"])
        name, kl, peak = state["last_kl"]
        self.last_kl = (name, none_or(kl, float("nan")), none_or(peak, float("nan")))
        self.active = set(state["active"])

    def check(self, step: int, m: dict[str, float], per_prompt: dict[str, list[float]] | None = None) -> list[str]:
        """This step's new warnings. ``per_prompt``: the per-prompt greedy rewards of this step's evaluation (``""``:
        the total, and each part by name), so that an evaluation is compared with the best one prompt by prompt."""
        c, found = self.cfg, {}
        per_prompt = per_prompt or {}
        if not c.enabled:
            return []

        def unread(sign: str, read: tuple[float, str | None] | None) -> None:
            # A reading that is not a number (every sample scored None) says nothing: the sign stands as it was.
            if read is not None and not math.isfinite(read[0]) and sign in self.active:
                found[sign] = ""

        def monitors(evaluation: bool, trained: float) -> None:
            # A reward of weight 0 (a verifier beside a reward model) that collapses, on the training batches or held
            # out; while the trained reward holds up there, the policy may be gaming the reward it is trained on.
            tracks = self.held_out_watched if evaluation else self.watched
            sign, trained_sign = ("eval/", "eval") if evaluation else ("monitor/", "reward")
            what = "held-out greedy reward" if evaluation else "reward"
            trained_what = "held-out greedy reward" if evaluation else "training reward"
            over, fmt = ("", ".3f") if evaluation else (f" over the last {c.window} steps", ".2f")
            for name, track in tracks.items():
                key = f"eval/greedy_reward/{name}" if evaluation else f"reward/{name}/mean"
                sem = m.get(f"eval/greedy_reward_sem/{name}" if evaluation else f"reward/sem/{name}", math.nan)
                values = per_prompt.get(name) if evaluation else None
                read = track.add(m[key], c.reward_fraction, sem, values) if key in m else None
                unread(sign + name, read)
                if read and read[1]:
                    found[sign + name] = (
                        f"{what} '{name}' (weight 0, not trained on) collapsed: {read[0]:{fmt}}{over}, {read[1]}"
                    )
                    if trained_sign not in found and math.isfinite(trained):
                        found[sign + name] += (
                            f", while the {trained_what} holds up ({trained:{fmt}}): the policy may be gaming the "
                            "reward it is trained on"
                        )

        # 1. Training reward: windowed mean against its best, and steps that trained nothing.
        trained = m.get("reward/mean", float("nan"))
        if "reward/mean" in m:
            read = self.training.add(trained, c.reward_fraction, m.get("reward/sem", math.nan))
            unread("reward", read)
            if read and read[1]:
                found["reward"] = f"training reward collapsed: {read[0]:.2f} over the last {c.window} steps, {read[1]}"
        monitors(evaluation=False, trained=trained)
        if "reward/mean" in m:  # a training step (an evaluation alone, as at step 0, is not one)
            self.skipped = self.skipped + 1 if "train/policy_loss" not in m else 0
        if self.skipped >= c.window:
            found["skipped"] = (
                f"nothing trained for {self.skipped} steps: every group was filtered out (all its rewards equal; "
                f"training reward {m.get('reward/mean', float('nan')):.2f})"
            )
        # 2. Held-out greedy reward against its best evaluation, and each monitor's.
        if "eval/greedy_reward" in m:
            value, fell = self.held_out.add(m["eval/greedy_reward"], c.reward_fraction,
                                            m.get("eval/greedy_reward_sem", math.nan), per_prompt.get(""))  # fmt: skip
            unread("eval", (value, fell))
            if fell:
                found["eval"] = f"held-out greedy reward collapsed: {value:.3f}, {fell}"
            monitors(evaluation=True, trained=value)
        else:  # no evaluation this step: the last one still stands
            found.update((key, "") for key in self.active if key == "eval" or key.startswith("eval/"))
        # 3. KL to the old policy above its bound (or not a number) for several steps. A step that trained nothing
        #    has no KL: it neither extends nor breaks the run of high steps, and the last reading stands.
        key = KL_AFTER_STEP if KL_AFTER_STEP in m else "train/kl_to_old"
        if key in m:
            kl = m[key]
            self.high_kl = self.high_kl + 1 if not kl <= c.max_kl_to_old else 0  # NaN counts as high
            self.last_kl = (key, kl, m.get(key.replace("kl_to_old", "log_ratio_abs_max"), float("nan")))
        if self.high_kl >= c.window:
            name, kl, peak = self.last_kl
            found["kl"] = (
                f"{name} above {c.max_kl_to_old:g} for {self.high_kl} steps (last {kl:.3g}, largest token "
                f"log-ratio {peak:.1f})"
            )
        new = [msg for key, msg in found.items() if key not in self.active and msg]
        self.active = set(found)
        return new


def collapse(
    value: float, best: float, floor: float | None, fraction: float, fmt: str, margin: float = 0.0
) -> str | None:
    """How ``value`` fell below ``fraction`` of the way from ``floor`` to ``best``: a fraction of the best for
    ``floor`` 0, of the gain since the start for a reward that started below 0. None if it did not, if the fall
    from the best is within ``margin`` (the noise of the two means), or before a finite reading set ``floor``.
    A reward that never rose above its floor by more than ``margin`` collapses when it falls more than ``margin``
    below it (only with the noise known, ``margin`` > 0): a reward model's score that only falls.

    Example:
        >>> collapse(0.2, 0.6, 0.0, 0.5, ".2f")
        'below 0.5 × its best (0.60)'
        >>> collapse(0.009, 0.02, 0.0, 0.5, ".3f", margin=0.03) is None  # near 0, within the noise
        True
        >>> collapse(-2.5, 1.0, -2.0, 0.5, ".2f")  # a reward model's score: from -2.0 up to 1.0, then down
        'below -0.50, half-way back from its best (1.00) to its start (-2.00)'
        >>> collapse(-0.4, 1.0, -2.0, 0.5, ".2f") is None
        True
        >>> collapse(-1.5, -0.85, -0.88, 0.5, ".2f", margin=0.2)  # a reward model's score that only fell
        '0.62 below its start (-0.88), beyond its noise (0.20), and it never rose'
    """
    if floor is None or not value < best - margin:
        return None
    if margin > 0 and best - floor <= margin:  # never rose beyond the noise: a fall below the start
        if not value < floor - margin:
            return None
        start = f"its start ({floor:{fmt}})" if floor < 0 else "0"
        return f"{floor - value:{fmt}} below {start}, beyond its noise ({margin:{fmt}}), and it never rose"
    if not best > floor or not value < floor + fraction * (best - floor):
        return None
    if floor == 0:
        return f"below {fraction:g} × its best ({best:{fmt}})"
    way = "half-way" if fraction == 0.5 else f"{1 - fraction:g} of the way"
    threshold = floor + fraction * (best - floor)
    return f"below {threshold:{fmt}}, {way} back from its best ({best:{fmt}}) to its start ({floor:{fmt}})"


def paired_error(values: list[float] | None, best: list[float] | None) -> float:
    """The standard error of the mean per-prompt difference between two readings on the same prompts (NaN when
    either is missing, their prompts differ in number, or fewer than two prompts have both): the noise of the change
    between two held-out evaluations, smaller than that of two independent means when easy prompts stay easy.

    Example:
        >>> round(paired_error([0.5, 0.6, 0.7, 0.8], [0.9, 0.9, 1.0, 1.2]), 3)  # each prompt fell by 0.3-0.4
        0.029
    """
    if values is None or best is None or len(values) != len(best):
        return math.nan
    return mean_error([a - b for a, b in zip(values, best, strict=True) if math.isfinite(a) and math.isfinite(b)])


def finite_or_none(x: float) -> float | None:
    """A float as strict JSON takes it: None for ±inf and NaN."""
    return x if math.isfinite(x) else None


def none_or(x: float | None, default: float) -> float:
    return default if x is None else float(x)


def guard_line(step: int, message: str) -> str:
    """The console line of one warning."""
    return f"[bold yellow]⚠ divergence at RL step {step}:[/bold yellow] [yellow]{message}[/yellow]"


@dataclass
class ValueWatch:
    """Watch the value model's explained variance step by step; ``check`` returns the message of this step when the
    value model has just been found idle (None otherwise, and while it stays idle).

    Example:
        >>> watch = ValueWatch(GuardConfig(value_window=2))
        >>> rows = [{"value/explained_var": ev, "value/advantage_var_ratio": 1.0} for ev in (0.01, -0.01, 0.0)]
        >>> [watch.check(m) is not None for m in rows]
        [False, True, False]
    """

    cfg: GuardConfig
    recent: deque = field(init=False)  # (explained variance, advantage variance ratio) of the last `value_window` steps
    idle: bool = False  # reported and not yet cleared

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.cfg.value_window)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON values)."""
        return {"recent": [[finite_or_none(x) for x in pair] for pair in self.recent], "idle": self.idle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(tuple(none_or(x, float("nan")) for x in pair) for pair in state["recent"])
        self.idle = bool(state["idle"])

    def check(self, m: dict[str, float]) -> str | None:
        c = self.cfg
        if not c.enabled or "value/explained_var" not in m:
            return None
        self.recent.append((m["value/explained_var"], m.get("value/advantage_var_ratio", float("nan"))))
        if len(self.recent) < c.value_window:
            return None
        mean, ratio = (sum(x) / len(self.recent) for x in zip(*self.recent, strict=True))
        was, self.idle = self.idle, mean < c.min_value_explained_var
        if not self.idle or was:
            return None
        return (
            f"value/explained_var {mean:+.3f} on average over the last {len(self.recent)} steps (below "
            f"{c.min_value_explained_var:g}; advantage variance {ratio:.2f} × the group baseline's): its advantages "
            "are the group baseline's at about twice the learner compute. scripts/value_probe.py measures what a "
            "value can learn on this task (docs/estimators.md); objective.value_model=false saves the compute."
        )


def value_line(step: int, message: str) -> str:
    """The console line of an idle value model."""
    return f"[bold yellow]⚠ value model idle at RL step {step}:[/bold yellow] [yellow]{message}[/yellow]"
