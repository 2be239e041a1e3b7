#!/usr/bin/env bash
# Start and stop the Ray nodes of a tracerl cluster (docs/cluster.md).
#
#   scripts/ray_cluster.sh head [--port 6379] [ray start options ...]   make this machine the head node
#   scripts/ray_cluster.sh worker HOST:PORT [ray start options ...]     join this machine to a head
#   scripts/ray_cluster.sh stop                                          stop the nodes this script started here
#
# Then, on the head: tracerl train CONFIG.yaml --ray-address HOST:PORT
#
# Each node runs as `ray start --block` in its own process group in the background; its pid and log go to
# $RAY_CLUSTER_DIR (default .ray-cluster/). `stop` sends SIGTERM to exactly those pids, waits for each to end (at
# most $RAY_CLUSTER_STOP_S seconds, default 30), SIGKILLs what is left of its process group (agents), and returns
# only when no process of those groups is running (exit 1, naming them, if any still is after the SIGKILL): never
# `ray stop`, which ends every Ray process of the user, other people's runs included. The dashboard stays off
# unless you pass --include-dashboard=true.
# Options go to `ray start` unchanged: --node-ip-address, --num-cpus, --num-gpus, and --resources to pin tracerl's
# actors (e.g. head: --resources '{"learner_node": 8}' with cluster.learner_resources={learner_node: 1}).
# RAY_AUTH_MODE defaults to disabled here and in `tracerl train --ray-address`, so both sides agree; export
# RAY_AUTH_MODE=token on every node and on the driver to use Ray's token authentication instead.
set -euo pipefail
cd "$(dirname "$0")/.."
state=${RAY_CLUSTER_DIR:-.ray-cluster}
ray=ray
[ -x .venv/bin/ray ] && ray=.venv/bin/ray
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # set to 0 (as tracerl does for a local instance) it refuses to add nodes

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

running() {  # running PGID [pid]: pids of that process group still running (exited, unreaped ones are not)
  ps -e -o pid=,pgid=,stat= | awk -v g="$1" -v p="${2:-}" '$2 == g && $3 !~ /^Z/ && (p == "" || $1 == p) {print $1}'
}

wait_gone() {  # wait_gone SECONDS PGID [pid]: 0 once none of them runs, 1 if one still does after SECONDS
  local deadline=$((SECONDS + $1))
  while [ -n "$(running "$2" "${3:-}")" ]; do
    [ $SECONDS -ge "$deadline" ] && return 1
    sleep 0.1
  done
}

start() {  # start NAME ray-start-args...: launch, record the pid, wait until the node is up
  local name=$1; shift
  mkdir -p "$state"
  local log="$state/$name.log" n=0
  : >"$log"  # exists before the first grep below (the background start may not have opened it yet)
  setsid nohup "$ray" start --block --disable-usage-stats "$@" >"$log" 2>&1 &  # its own process group
  echo $! >"$state/$name.pid"
  until grep -q "Ray runtime started" "$log"; do
    if ! kill -0 "$(cat "$state/$name.pid")" 2>/dev/null || [ $((n += 1)) -gt 600 ]; then
      echo "ray start ($name) did not come up; its log, $log:" >&2
      tail -20 "$log" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "$name up (pid $(cat "$state/$name.pid"), log $log)"
}

case ${1:-} in
  head)
    shift
    port=6379
    args=()
    while [ $# -gt 0 ]; do
      case $1 in
        --port) port=$2; shift 2 ;;
        --port=*) port=${1#--port=}; shift ;;
        *) args+=("$1"); shift ;;
      esac
    done
    start "head-$port" --head --port="$port" --include-dashboard=false "${args[@]}"
    echo "join workers with: scripts/ray_cluster.sh worker <this host's address>:$port"
    ;;
  worker)
    [ $# -ge 2 ] || usage
    address=$2; shift 2
    start "worker-$(date +%s%N)" --address="$address" "$@"
    ;;
  stop)
    shopt -s nullglob
    status=0
    for file in "$state"/*.pid; do
      pid=$(cat "$file") name=$(basename "$file" .pid)
      if [ -n "$(running "$pid")" ]; then
        kill -TERM "$pid" 2>/dev/null || true  # ray start --block stops its node
        wait_gone "${RAY_CLUSTER_STOP_S:-30}" "$pid" "$pid" || true
        kill -KILL -- "-$pid" 2>/dev/null || true  # what its node left behind (agents), by its process group
        if ! wait_gone 10 "$pid"; then
          echo "$name (pid $pid): processes $(running "$pid" | tr '\n' ' ')still run after SIGKILL" >&2
          status=1
          continue
        fi
        echo "stopped $name (pid $pid)"
      fi
      rm -f "$file"
    done
    exit $status
    ;;
  *) usage ;;
esac
