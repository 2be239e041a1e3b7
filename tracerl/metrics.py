"""Metrics to two sinks, W&B and ``metrics.jsonl`` in the run directory (DESIGN §12); the console line a person
reads is the orchestrator's (``orchestrator/console.py``), built from the same metrics.

Only rank 0 logs; other ranks get a logger whose sinks are all off, so callers never branch on the rank or on
whether W&B is on. W&B runs offline when there are no credentials, and never blocks a run: if it cannot start,
the run goes on with ``metrics.jsonl`` and says so. Every value is written, NaN and infinities included (a NaN
loss is what a person most needs to see: ``metrics.jsonl`` spells it ``NaN``, as Python's json reads and writes
it). A key keeps one kind for the whole run (scalar, table or image), so its W&B chart never breaks. A resumed
run sends W&B the rows of ``metrics.jsonl`` that the W&B run lacks, in order, before its first new step.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tracerl.config import WandbConfig

WANDB_MODES = ("online", "offline", "disabled")
_ENV_MODES = {"dryrun": "offline", "run": "online"}  # W&B's older spellings


def wandb_mode(requested: str) -> str:
    """The W&B mode of a run: ``WANDB_MODE`` from the environment when it names one (online / offline / disabled;
    ``WANDB_DISABLED=true`` means disabled), else ``wandb.mode``; ``online`` only with credentials, otherwise
    ``offline``. The environment wins so that ``WANDB_MODE=disabled`` always means no W&B run, whatever the
    config says.
    """
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = _ENV_MODES.get(env, env)
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        env = "disabled"
    mode = env if env in WANDB_MODES else requested
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
        return "offline"
    return mode


def wandb_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why W&B's server (``WANDB_BASE_URL``, else api.wandb.ai) cannot be reached, from one TCP connect; None when
    it answers, or when a proxy carries the connection (W&B's client then says what goes wrong). An online run
    without a route would otherwise stall in ``wandb.init`` for 90 s and end in a hint about W&B's settings."""
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not host or (url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)):
        return None
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{host} cannot be reached ({type(err).__name__}: {err})"
    return None


class MetricKindError(TypeError):
    """A metric key logged as another kind (scalar, table, image) than before in the same run."""


class MetricsLogger:
    """Log namespaced scalars (``reward/mean``, ``train/clipfrac``, ...), tables and images.

    ``verbose=False`` keeps W&B's own console messages off (the CLI's ``--verbose`` turns them on).
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any] | None = None,
        wandb_cfg: WandbConfig | None = None,
        rank: int = 0,
        resume_id: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self.run = None
        self._jsonl = None
        self._wandb_step = 0  # W&B takes steps in order: rows of redone steps (after a rewind) are not sent again
        self._kinds: dict[str, str] = {}  # key -> "scalar" | "table" | "image": one kind per key for the run
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        wandb_cfg = wandb_cfg or WandbConfig(mode="disabled")
        mode = wandb_mode(wandb_cfg.mode)
        asked = os.environ.get("WANDB_MODE", "").strip().lower() or wandb_cfg.mode
        sync = f"sync the run later with wandb sync {self.run_dir / 'wandb'}/offline-run-*"
        if asked in ("online", "run") and mode == "offline":  # asked for online, said once: it syncs later
            print(
                "W&B runs offline: wandb.mode=online needs credentials (WANDB_API_KEY or wandb login) and none were "
                f"found; {sync}."
            )
        elif mode == "online" and (problem := wandb_unreachable()):
            mode = "offline"
            print(f"W&B runs offline: wandb.mode=online, but {problem}; {sync}.")
        if mode != "disabled":
            try:
                import wandb

                self.run = wandb.init(
                    project=wandb_cfg.project,
                    entity=wandb_cfg.entity,
                    name=wandb_cfg.name or self.run_dir.name,
                    dir=str(self.run_dir),
                    config=config or {},
                    mode=mode,
                    id=resume_id,
                    resume="allow" if resume_id else None,
                    settings=wandb.Settings(silent=not verbose, show_info=verbose, show_warnings=verbose),
                )
            except Exception as err:  # noqa: BLE001 - monitoring must never stop training
                print(f"W&B could not start ({err}); metrics go to {self.run_dir / 'metrics.jsonl'} only.")

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Write one row of scalars for ``step`` to every sink; NaN and infinities are written as they are."""
        if not self.enabled:
            return
        row = {k: float(v) for k, v in metrics.items() if v is not None}
        self._claim(row, "scalar")
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")
        self._jsonl.flush()
        if self._to_wandb(step):
            self.run.log(row, step=step)

    def _claim(self, keys: Any, kind: str) -> None:
        for key in keys:
            seen = self._kinds.setdefault(key, kind)
            if seen != kind:
                raise MetricKindError(
                    f"metric '{key}' is logged as a {kind} but was a {seen} before in this run; one key, one kind "
                    "(a W&B chart cannot hold both). Log it under another name."
                )

    def _to_wandb(self, step: int) -> bool:
        if self.run is None or step < self._wandb_step:
            return False
        self._wandb_step = step
        return True

    def rewind(self, step: int) -> None:
        """Drop the ``metrics.jsonl`` rows of the steps after ``step``: they are about to be redone (a rebuilt
        learner), so each step appears once. W&B takes steps in order only: it keeps the rows it has (the redone
        steps reproduce them)."""
        if not self.enabled:
            return
        self._jsonl.close()
        truncate_jsonl(self.run_dir / "metrics.jsonl", step)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")

    def resume(self, step: int) -> None:
        """A run resumed from its checkpoint of ``step``: ``metrics.jsonl`` is cut back to it (the later rows are
        redone), and the W&B run gets every row up to it that it lacks, in order: all of them in a new offline
        run directory, those from the server's next step on in an online one. So a run killed at any moment ends
        with every step in W&B once, in order. (Tables and images of the steps before are not sent again.)"""
        if not self.enabled:
            return
        self.rewind(step)
        if self.run is None:
            return
        first = int(getattr(self.run, "starting_step", 0) or 0)
        for row in read_jsonl(self.run_dir / "metrics.jsonl"):
            at = int(row.pop("step", 0))
            row.pop("time", None)
            if first <= at <= step and self._to_wandb(at):
                self._claim(row, "scalar")
                self.run.log(row, step=at)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (e.g. sample completions with their rewards); W&B only, and a JSON copy in the run dir."""
        if not self.enabled:
            return
        self._claim([name], "table")
        (self.run_dir / f"{name.replace('/', '_')}-{step}.json").write_text(
            json.dumps({"columns": columns, "rows": rows})
        )
        if self._to_wandb(step):
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        """An image (a decoding-order picture); W&B only (the file stays where it is)."""
        if not self.enabled:
            return
        self._claim([name], "image")
        if self._to_wandb(step):
            import wandb

            self.run.log({name: wandb.Image(str(path))}, step=step)

    def alert(self, title: str, text: str, step: int) -> None:
        """A warning a person must see: a W&B alert (mail or Slack when the run is online) and a row of
        ``alerts.jsonl`` in the run directory."""
        if not self.enabled:
            return
        with (self.run_dir / "alerts.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "title": title, "text": text}) + "\n")
        if self.run is not None:
            try:
                import wandb

                self.run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
            except Exception:  # noqa: BLE001 - offline runs may not support alerts; monitoring never stops a run
                pass

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def jsonl_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each row of a JSON Lines file with its text (NaN and infinities as floats); [] when there is none. A last
    line that does not parse is left out: it is the half-written row of a run killed while writing it.

    Raises:
        ValueError: a line before the last does not parse; the message names the file and the line.
    """
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(
                f"{path} line {n} is not valid JSON ({err.msg}): the file is damaged (a row of a killed run is only "
                "ever the last). Repair or remove that line."
            ) from None
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (``jsonl_lines``)."""
    return [row for _, row in jsonl_lines(path)]


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the rows of steps after ``last_step`` (a resumed run redoes them, so each step appears once), and a
    half-written last row."""
    if not path.is_file():
        return
    kept = [line for line, row in jsonl_lines(path) if row.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class Timers:
    """Named wall-clock timers: ``with timers("rollout"): ...`` → ``time/rollout`` (seconds, summed)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Count time measured elsewhere (e.g. a stage that overlaps another) under ``time/<name>``."""
        self.seconds[name] += seconds

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds.clear()
        return out


def decoding_order_picture(step_map: torch.Tensor, path: str | Path, title: str = "decoding order") -> Path:
    """Save a heatmap of when each position was committed: rows = samples, columns = response positions,
    colour = the denoising step (normalised per sample, so left-to-right decoding is a smooth gradient)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sm = step_map.float()
    lo = sm.masked_fill(sm < 0, float("inf")).min(-1, keepdim=True).values
    hi = sm.max(-1, keepdim=True).values
    rel = ((sm - lo) / (hi - lo).clamp_min(1)).masked_fill(sm < 0, float("nan"))
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(sm) + 1.2))
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("response position")
    ax.set_ylabel("sample")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="commit step (0 = first, 1 = last)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
