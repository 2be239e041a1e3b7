"""The transformers releases tracerl is built and tested against, checked when this module is imported
(``tracerl.models`` imports it first).

pip enforces pyproject's range on an ordinary install; this check is for the environments where it does not
(``pip install --no-deps`` into a provisioned image, a GPU machine with its own transformers). Below the floor
tracerl fails deep inside a forward: transformers 4.57's cache-layer API lacks what the samplers' static
key/value cache implements, and 5.17-5.23 call DiffusionGemma's encoder cache ``past_key_values`` where
tracerl passes ``cache=``. A release above the tested ones is let through (pip's cap says what CI tested).
"""

from __future__ import annotations

import transformers
from packaging.requirements import Requirement
from packaging.version import Version

# pyproject.toml's transformers requirement, word for word (tests/test_model_checks.py compares them).
TRANSFORMERS_REQUIREMENT = "transformers>=5.24,<5.25"
FLOOR = Version(next(s.version for s in Requirement(TRANSFORMERS_REQUIREMENT).specifier if s.operator == ">="))


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers below the floor, naming the release found and the install that fixes it.

    Example:
        >>> check_transformers("5.24.0"); check_transformers("5.25.0.dev0")
        >>> check_transformers("5.17.0")
        Traceback (most recent call last):
        ...
        ImportError: tracerl needs transformers>=5.24,<5.25 and this environment has transformers 5.17.0 ...
    """
    found = transformers.__version__ if version is None else version
    if Version(found).release < FLOOR.release:  # a 5.24 pre-release counts as 5.24
        raise ImportError(
            f"tracerl needs {TRANSFORMERS_REQUIREMENT} and this environment has transformers {found} (an install "
            "with --no-deps keeps the one that was there): its samplers' key/value cache and DiffusionGemma follow "
            f"the API of {FLOOR}. Install a supported release: pip install '{TRANSFORMERS_REQUIREMENT}'."
        )


check_transformers()
