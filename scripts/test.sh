#!/usr/bin/env bash
# The test command: set up .venv (CPU torch) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check tracerl rewards tests scripts
exec .venv/bin/python -m pytest -q "$@"
