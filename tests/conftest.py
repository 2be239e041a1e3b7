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
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray instance stays on loopback

from tracerl.config import ModelConfig, TinyModelConfig  # noqa: E402
from tracerl.models import load_policy  # noqa: E402

torch.set_num_threads(2)

# A deprecation warning that tracerl's or rewards' own code causes fails the test where it happens: the first
# caller outside the warning library (Module.__call__ dispatch aside) is ours, e.g. a deprecated argument passed
# to transformers. A library warning about its own internals (deepspeed calling torch.jit) does not.
_OWN_PACKAGES = ("tracerl", "rewards")
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_warn = warnings.warn


def _caller_package(frame):  # noqa: ANN001, ANN202
    """The top-level package of the first frame outside the package that issued the warning."""
    issuer = frame.f_globals.get("__name__", "").split(".")[0]
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] != issuer and not module.startswith("torch.nn.modules"):
            return module.split(".")[0], frame
        frame = frame.f_back
    return None, None


def _strict_warn(message, category=None, stacklevel=1, source=None, **kwargs):  # noqa: ANN001, ANN202
    kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
    if issubclass(kind, _DEPRECATIONS):
        package, frame = _caller_package(sys._getframe(1))
        if package in _OWN_PACKAGES:
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            raise kind(f"{message} (caused by tracerl's own call at {where})")
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


def wandb_history(run_dir) -> list[dict]:  # noqa: ANN001
    """The history rows of an offline W&B run directory, in the order they were written, read back with W&B's own
    reader (``wandb leet inspect --json``); NaN values read back as the string "NaN"."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]
