"""Metrics sinks: metrics.jsonl always, W&B offline without credentials, rank > 0 silent; trace picture."""

from __future__ import annotations

import json

import torch

from tracerl.config import WandbConfig
from tracerl.metrics import MetricsLogger, Timers, decoding_order_picture, wandb_mode


def test_jsonl_rows_and_nonfinite_values_dropped(tmp_path):
    log = MetricsLogger(tmp_path, wandb_cfg=WandbConfig(mode="disabled"))
    log.log({"reward/mean": 0.5, "train/clipfrac": float("nan")}, step=1)
    log.log({"reward/mean": 0.75}, step=2)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward/mean"] == 0.5 and "train/clipfrac" not in rows[0]


def test_nonzero_rank_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "r1", rank=1, wandb_cfg=WandbConfig(mode="offline"))
    log.log({"a": 1.0}, step=0)
    log.close()
    assert not (tmp_path / "r1").exists()


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("online") == "offline"
    assert wandb_mode("disabled") == "disabled"


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
