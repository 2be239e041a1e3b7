"""Built-in reward functions (TRL's contract) and their registry; importable without torch or ray.

Importing the package registers every built-in: ``math_verify``, ``gsm8k``, ``format``, ``length``,
``soft_overlong``, ``code`` and the synthetic-task verifiers. See docs/rewards.md.
"""

from rewards import code, format, length, math, synthetic  # noqa: F401  (importing registers the built-ins)
from rewards.registry import REWARDS, available_rewards, get_reward, register_reward

__all__ = ["REWARDS", "available_rewards", "get_reward", "register_reward"]
