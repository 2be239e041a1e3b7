"""Metrics to three sinks: W&B, the console and ``metrics.jsonl`` in the run directory (DESIGN §12).

Only rank 0 logs; other ranks get a logger whose sinks are all off, so callers never branch on the rank or on
whether W&B is on. W&B runs offline when there are no credentials, and never blocks a run: if it cannot start,
the run goes on with the other sinks and says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tracerl.config import WandbConfig


def wandb_mode(requested: str) -> str:
    """``online`` only with credentials; otherwise ``offline`` (or ``disabled`` when asked)."""
    if requested == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
        return "offline"
    return requested


class MetricsLogger:
    """Log namespaced scalars (``reward/mean``, ``train/clipfrac``, ...), tables and images."""

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any] | None = None,
        wandb_cfg: WandbConfig | None = None,
        rank: int = 0,
        resume_id: str | None = None,
    ) -> None:
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self.run = None
        self._jsonl = None
        self._wandb_step = 0  # W&B takes steps in order: rows of redone steps (after a rewind) are not sent again
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        wandb_cfg = wandb_cfg or WandbConfig(mode="disabled")
        mode = wandb_mode(wandb_cfg.mode)
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
                )
            except Exception as err:  # noqa: BLE001 - monitoring must never stop training
                print(f"W&B could not start ({err}); metrics go to {self.run_dir / 'metrics.jsonl'} only.")

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Write one row of scalars for ``step`` to every sink."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._to_wandb(step):
            self.run.log(clean, step=step)

    def _to_wandb(self, step: int) -> bool:
        if self.run is None or step < self._wandb_step:
            return False
        self._wandb_step = step
        return True

    def rewind(self, step: int) -> None:
        """Drop the ``metrics.jsonl`` rows of the steps after ``step``: they are about to be redone (a resume, a
        rebuilt learner), so each step appears once. W&B takes steps in order only: it keeps the rows it has."""
        if not self.enabled:
            return
        self._jsonl.close()
        truncate_jsonl(self.run_dir / "metrics.jsonl", step)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (e.g. sample completions with their rewards); W&B only, and a JSON copy in the run dir."""
        if not self.enabled:
            return
        (self.run_dir / f"{name.replace('/', '_')}-{step}.json").write_text(
            json.dumps({"columns": columns, "rows": rows})
        )
        if self._to_wandb(step):
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        if self.enabled and self._to_wandb(step):
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


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the rows of steps after ``last_step`` (a resumed run redoes them, so each step appears once)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
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
