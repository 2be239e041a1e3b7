"""Metrics sinks: metrics.jsonl always (NaN included), W&B offline without credentials and off when the environment
says so, one kind per key, every row in a resumed W&B run; rank > 0 silent; trace picture."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tracerl.config import WandbConfig
from tracerl.metrics import (
    MetricKindError,
    MetricsLogger,
    Timers,
    decoding_order_picture,
    read_jsonl,
    truncate_jsonl,
    wandb_mode,
)

from .conftest import wandb_history


def test_jsonl_rows_keep_nan_and_infinities(tmp_path):
    log = MetricsLogger(tmp_path, wandb_cfg=WandbConfig(mode="disabled"))
    log.log({"reward/mean": 0.5, "train/policy_loss": float("nan"), "train/grad_norm": float("inf")}, step=1)
    log.log({"reward/mean": 0.75}, step=2)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward/mean"] == 0.5 and math.isnan(rows[0]["train/policy_loss"])  # a NaN loss is visible
    assert rows[0]["train/grad_norm"] == math.inf
    assert '"train/policy_loss": NaN' in (tmp_path / "metrics.jsonl").read_text()


def test_a_key_keeps_one_kind(tmp_path):
    log = MetricsLogger(tmp_path, wandb_cfg=WandbConfig(mode="disabled"))
    log.log({"rollout/samples": 16.0}, step=1)
    with pytest.raises(MetricKindError, match="'rollout/samples' is logged as a table but was a scalar"):
        log.log_table("rollout/samples", ["a"], [[1]], step=1)
    log.log_table("samples/rollout", ["a"], [[1]], step=1)
    with pytest.raises(MetricKindError, match="'samples/rollout' is logged as a scalar but was a table"):
        log.log({"samples/rollout": 1.0}, step=2)
    log.close()


def test_wandb_mode_from_the_environment_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("offline") == "disabled" and wandb_mode("online") == "disabled"
    log = MetricsLogger(tmp_path, wandb_cfg=WandbConfig(mode="offline"))
    log.log({"a": 1.0}, step=0)
    log.close()
    assert log.run_id is None and not (tmp_path / "wandb").exists()  # no W&B run, no wandb/ folder
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode("disabled") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert wandb_mode("offline") == "disabled"
    monkeypatch.delenv("WANDB_DISABLED")
    assert wandb_mode("offline") == "offline"


def test_a_resumed_offline_run_holds_every_row_once_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = WandbConfig(mode="offline", project="t")
    first = MetricsLogger(tmp_path, wandb_cfg=cfg)
    for step in range(4):  # steps 0-3 logged; the checkpoint is of step 2; then the process dies
        first.log({"reward/mean": step / 10, "train/policy_loss": float("nan") if step == 1 else 0.1}, step=step)
    run_id = first.run_id
    first.close()
    # W&B names an offline run directory by its start second and run id: a resumed process starts seconds later,
    # never within the same second (which would reuse the directory), so neither does this one.
    time.sleep(1.05 - time.time() % 1)
    second = MetricsLogger(tmp_path, wandb_cfg=cfg, resume_id=run_id)
    second.resume(2)  # metrics.jsonl cut back to step 2; the new W&B run directory gets steps 0-2
    for step in (3, 4):
        second.log({"reward/mean": step / 10, "train/policy_loss": 0.2}, step=step)
    second.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2
    history = wandb_history(runs[-1])
    assert [h["_step"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["reward/mean"] for h in history] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert history[1]["train/policy_loss"] == "NaN"  # the NaN reached W&B


def test_nonzero_rank_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "r1", rank=1, wandb_cfg=WandbConfig(mode="offline"))
    log.log({"a": 1.0}, step=0)
    log.close()
    assert not (tmp_path / "r1").exists()


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("online") == "offline"
    assert wandb_mode("disabled") == "disabled"


def test_online_without_credentials_says_so_once(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    log = MetricsLogger(tmp_path / "run", config={}, wandb_cfg=WandbConfig(mode="online", project="t"))
    log.close()
    out = capsys.readouterr().out
    assert out.count("W&B runs offline: wandb.mode=online needs credentials") == 1 and "wandb sync" in out
    MetricsLogger(tmp_path / "run2", config={}, wandb_cfg=WandbConfig(mode="offline", project="t")).close()
    assert "W&B runs offline" not in capsys.readouterr().out  # asked for offline: nothing to say


def test_online_without_a_route_to_wandb_runs_offline_at_once(monkeypatch, tmp_path, capsys):
    """With credentials but no route to the server, wandb.init stalled for 90 s and then printed advice about its
    init_timeout setting; one TCP connect now tells, and the run goes offline with one line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.monotonic()
    log = MetricsLogger(tmp_path / "run", config={}, wandb_cfg=WandbConfig(mode="online", project="t"))
    run_id = log.run_id
    log.close()
    assert time.monotonic() - start < 60
    out = " ".join(capsys.readouterr().out.split())
    assert "W&B runs offline: wandb.mode=online, but 127.0.0.1 cannot be reached (ConnectionRefusedError" in out
    assert "wandb sync" in out and list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = MetricsLogger(tmp_path, config={"seed": 1}, wandb_cfg=WandbConfig(mode="offline", project="t"))
    log.log({"reward/mean": 1.0}, step=0)
    run_id = log.run_id
    log.close()
    assert run_id and list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_timers_sum_by_name():
    timers = Timers()
    for _ in range(2):
        with timers("rollout"):
            pass
    out = timers.pop()
    assert set(out) == {"time/rollout"} and out["time/rollout"] >= 0 and timers.pop() == {}


def test_decoding_order_picture(tmp_path):
    step_map = torch.tensor([[0, 1, 2, 3], [3, 2, 1, -1]])
    path = decoding_order_picture(step_map, tmp_path / "order.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_a_resume_drops_later_rows_and_the_half_written_last_one(tmp_path):
    """A run killed while writing a metrics row leaves half a line; the resume's truncation parsed every line and
    failed on it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_jsonl(path, 2)
    assert [row["step"] for row in read_jsonl(path)] == [1, 2] and path.read_text().endswith("}\n")
