#!/usr/bin/env bash
# Create (or refresh) .venv with the CPU build of torch and tracerl installed in editable mode.
# Re-running is cheap: the install is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.tracerl-installed
want=$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # pip's own warnings (index locations, build backends) go to the log; it is shown when the install fails
  log=.venv/install.log
  echo "installing tracerl and its dependencies into .venv (CPU torch; a few minutes the first time; log: $log)"
  .venv/bin/python -m pip install --quiet --upgrade pip >"$log" 2>&1 || true
  if ! .venv/bin/python -m pip install --quiet -c constraints-cpu.txt -e '.[dev]' >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup_venv.sh: pip could not install tracerl into .venv (the lines above; the whole log is $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
