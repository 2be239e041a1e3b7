#!/usr/bin/env bash
# Build wheels/ for scripts/gpu_check.py on the GPU machine, which has torch, transformers, numpy, pyyaml,
# msgpack, ninja, einops, psutil, py-cpuinfo and tqdm but no package registry. What the learner's and the
# config's imports need beyond that: DeepSpeed and its hjson and pydantic (pydantic-core, annotated-types,
# typing-inspection, and a typing-extensions new enough for this pydantic), omegaconf and its antlr4 runtime,
# transformers (the machine's 5.17 is below the 5.24 tracerl needs, tracerl/models/compat.py; 5.24's
# huggingface-hub and tokenizers ranges admit the machine's 1.33 and 0.23), and tracerl itself (with rewards/). Versions are those installed in .venv, so the GPU machine runs what the
# tests here ran.
#
# Pure-Python packages are built here with `pip wheel --no-deps` (DeepSpeed builds no ops: they JIT-compile
# on first use, and the check uses none). pydantic-core is compiled code: its CPython wheel for the GPU
# machine's Python (GPU_PYTHON, default 3.12) and platform is downloaded instead.
#
#   bash scripts/gpu_wheels.sh       # → wheels/*.whl (ignored by git), sizes listed, fails over 48 MiB
#
# On the GPU machine, with wheels/ carried along (it must fit the 64 MiB the working tree travels in):
#   python3 -m pip install -q --no-deps --no-index wheels/*.whl && \
#       PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out "$OUT/gpu_check.json"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
LIMIT_MIB=${LIMIT_MIB:-48}  # of the 64 MiB a device call carries; the rest is the working tree
out=wheels

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

pure=(deepspeed hjson pydantic annotated-types typing-inspection typing-extensions omegaconf antlr4-python3-runtime
  transformers)
specs=()
for name in "${pure[@]}"; do
  specs+=("$name==$(version "$name")")
done

rm -rf "$out"
mkdir -p "$out"
# no build isolation: DeepSpeed's setup.py imports torch, which is in .venv (CPU build) and must not be fetched
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" "${specs[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$out" \
  --python-version "$GPU_PYTHON" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "pydantic-core==$(version pydantic-core)"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" .

ls -l "$out"
total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
echo "wheels/: $(ls "$out"/*.whl | wc -l) wheels, $((total / 1024)) KiB"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "wheels/ is over ${LIMIT_MIB} MiB: the device call carries at most 64 MiB with the working tree" >&2
  exit 1
fi
