"""Shared fixtures: tiny policies of both layouts, built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray instance stays on loopback

from tracerl.config import ModelConfig, TinyModelConfig  # noqa: E402
from tracerl.models import load_policy  # noqa: E402

torch.set_num_threads(2)


def tiny_policy(attention: str = "full", block_size: int = 4, **kw):  # noqa: ANN201
    cfg = ModelConfig(tiny=TinyModelConfig(attention=attention, block_size=block_size, **kw))
    return load_policy(cfg)


@pytest.fixture(scope="session")
def full_policy():  # noqa: ANN201
    return tiny_policy("full")


@pytest.fixture(scope="session")
def block_policy():  # noqa: ANN201
    return tiny_policy("block")


def encode(policy, texts: list[str]) -> list[list[int]]:  # noqa: ANN001
    return [policy.tokenizer(t)["input_ids"] for t in texts]
