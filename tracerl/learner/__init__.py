"""The learner (DESIGN §10, §20): one ``Learner`` per data-parallel rank, its modules trained through an ``Engine``
(DeepSpeed, or plain PyTorch). See ``core.py`` for the layout of the package."""

from tracerl.learner.core import Learner
from tracerl.learner.engine import (
    ENGINES,
    Engine,
    NonFiniteGradient,
    TorchEngine,
    free_port,
    init_distributed,
    make_engine,
)
from tracerl.learner.micro import NonFiniteUpdate, set_learner_mode
from tracerl.learner.rl import mismatch_metrics

__all__ = [
    "ENGINES",
    "Engine",
    "Learner",
    "NonFiniteGradient",
    "NonFiniteUpdate",
    "TorchEngine",
    "free_port",
    "init_distributed",
    "make_engine",
    "mismatch_metrics",
    "set_learner_mode",
]
