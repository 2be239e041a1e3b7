"""The RL loop (DESIGN §2) and what it runs on: ``loop`` (run, the Session), ``setup`` (Ray, prompts, rewards),
``evaluation`` (collecting scored rollouts, held-out evaluation, ``tracerl eval``) and ``console``.
"""

from tracerl.orchestrator.evaluation import collect, evaluate, run_eval
from tracerl.orchestrator.loop import Interrupted, RunError, Session, run
from tracerl.orchestrator.setup import check_device, check_model, check_rewards, load_prompts, try_rewards

__all__ = [
    "Interrupted",
    "RunError",
    "Session",
    "check_device",
    "check_model",
    "check_rewards",
    "collect",
    "evaluate",
    "load_prompts",
    "run",
    "run_eval",
    "try_rewards",
]
