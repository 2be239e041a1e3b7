"""Shared fixtures: tiny policies of both layouts, built from configs (no downloads)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import rewards  # noqa: E402
import tracerl  # noqa: E402
from tracerl.config import ModelConfig, TinyModelConfig  # noqa: E402
from tracerl.models import load_policy  # noqa: E402

torch.set_num_threads(2)

# A deprecation warning raised while tracerl's or rewards' own code is on the stack (a deprecated argument passed
# to a library) fails the test where it happens; third-party code warning about itself does not.
_OWN_CODE = tuple(os.path.join(os.path.realpath(p), "") for p in (*tracerl.__path__, *rewards.__path__))
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_warn = warnings.warn


def _strict_warn(message, category=None, stacklevel=1, source=None, **kwargs):  # noqa: ANN001, ANN202
    kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
    if issubclass(kind, _DEPRECATIONS):
        frame = sys._getframe(1)
        while frame is not None:
            if os.path.realpath(frame.f_code.co_filename).startswith(_OWN_CODE):
                where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                raise kind(f"{message} (raised through tracerl's own call at {where})")
            frame = frame.f_back
    return _warn(message, category, stacklevel + 1, source, **kwargs)


warnings.warn = _strict_warn


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
