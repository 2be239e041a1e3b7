"""The runnable examples in docstrings stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "tracerl.registry",
    "tracerl.config",
    "tracerl.trace",
    "tracerl.models.tiny",
    "tracerl.stats",
    "tracerl.objectives",
    "tracerl.weight_sync",
    "tracerl.advantages",
    "tracerl.models.cache",
    "tracerl.models.compat",
    "tracerl.data",
    "rewards.synthetic",
    "tracerl.report",
    "tracerl.config_docs",
    "tracerl.learner.micro",
    "tracerl.learner.core",
    "tracerl.seeding",
    "tracerl.workers.rollout",
    "tracerl.orchestrator.guards",
    "tracerl.reward_resolve",
    "tracerl.reward_service",
    "tracerl.reward_server",
    "tracerl.reward_models.classifier",
    "tracerl.reward_models.judge",
    "tracerl.reward_models.train",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
