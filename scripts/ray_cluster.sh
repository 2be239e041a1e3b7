#!/usr/bin/env bash
# Start and stop the Ray nodes of a tracerl cluster (docs/cluster.md).
#
#   scripts/ray_cluster.sh head [--port 6379] [ray start options ...]   make this machine the head node
#   scripts/ray_cluster.sh worker HOST:PORT [ray start options ...]     join this machine to a head
#   scripts/ray_cluster.sh stop                                          stop the nodes this script started here
#
# Then, on the head: tracerl train CONFIG.yaml --ray-address HOST:PORT
#
# Each node runs as `ray start --block` in the background; its pid and log go to $RAY_CLUSTER_DIR (default
# .ray-cluster/), and `stop` sends SIGTERM to exactly those pids, then ends what is left of their process groups
# (never `ray stop`, which ends every Ray process of the user, other people's runs included). The dashboard stays off unless you pass --include-dashboard=true.
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

start() {  # start NAME ray-start-args...: launch, record the pid, wait until the node is up
  local name=$1; shift
  mkdir -p "$state"
  local log="$state/$name.log" n=0
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
    for file in "$state"/*.pid; do
      pid=$(cat "$file")
      if kill -TERM "$pid" 2>/dev/null; then  # ray start --block stops its node
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        echo "stopped $(basename "$file" .pid) (pid $pid)"
      fi
      kill -KILL -- "-$pid" 2>/dev/null || true  # what its node left behind (agents), by its process group
      rm -f "$file"
    done
    ;;
  *) usage ;;
esac
