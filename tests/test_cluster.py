"""Two Ray nodes on one machine, started and stopped with scripts/ray_cluster.sh: ``tracerl train --ray-address``
puts the learner and the rollout actors on the nodes the config pins them to, and a 3-step run completes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ["bash", str(ROOT / "scripts" / "ray_cluster.sh")]
NODE = ["--node-ip-address", "127.0.0.1", "--num-cpus", "4", "--object-store-memory", str(200 * 2**20)]
CONFIG = """
model: {{tiny: {{attention: block, hidden_size: 64, num_layers: 2, intermediate_size: 128}}}}
sampling: {{max_new_tokens: 8, temperature: 1.0}}
data: {{source: "synthetic:parity", num_synthetic: 100}}
reward: {{functions: [{{fn: "{reward}:score"}}], num_workers: 1}}
rollout: {{prompts_per_step: 4, samples_per_prompt: 4, num_workers: 1}}
train: {{steps: 3, eval_every: 0}}
eval: {{num_prompts: 0}}
wandb: {{mode: disabled}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pgid: int) -> list[int]:
    """pids of the process group ``pgid`` that still run (a process that exited but is not yet reaped does not)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(int(proc.name))
    return out


def test_learner_and_rollout_actors_land_on_the_nodes_the_config_names(tmp_path):
    (tmp_path / "reward.py").write_text(
        "def score(prompts, completions, **kw):\n    return [len(set(c)) / 8 for c in completions]\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(reward=tmp_path / "reward.py"))
    env = os.environ | {"RAY_CLUSTER_DIR": str(tmp_path / "nodes")}
    port = free_port()
    address = f"127.0.0.1:{port}"

    def cluster(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SCRIPT, *args], env=env, capture_output=True, text=True, timeout=180, check=True)

    def train(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "tracerl.cli",
            "train",
            str(config),
            f"run_dir={run_dir}",
            "--ray-address",
            address,
        ]
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)

    cluster("head", "--port", str(port), *NODE, "--resources", '{"learner_node": 2}')
    pids = [int(p.read_text()) for p in (tmp_path / "nodes").glob("*.pid")]
    try:
        cluster("worker", address, *NODE, "--resources", '{"rollout_node": 2}')
        pids = [int(p.read_text()) for p in (tmp_path / "nodes").glob("*.pid")]
        assert len(pids) == 2

        pinned = ["cluster.num_nodes=2", "cluster.learner_resources={learner_node: 1}",
                  "cluster.rollout_resources={rollout_node: 1}"]  # fmt: skip
        done = train(tmp_path / "run", *pinned)
        assert done.returncode == 0, done.stdout + done.stderr
        layout = json.loads((tmp_path / "run" / "cluster.json").read_text())
        learner, rollout = {w["node"] for w in layout["learner"]}, {w["node"] for w in layout["rollout"]}
        assert len(learner) == len(rollout) == 1 and learner != rollout  # two different Ray nodes
        rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["sync/weights_version"] == 3
        assert (tmp_path / "run" / "final" / "config.json").is_file()

        missing = train(tmp_path / "missing", "cluster.rollout_resources={gpu_node: 1}")
        assert missing.returncode == 2
        assert "'gpu_node'" in missing.stderr and "cluster.rollout_resources" in missing.stderr
        assert not (tmp_path / "missing").exists()  # refused before anything was written

        crowded = train(tmp_path / "crowded", "rollout.num_cpus_per_worker=7")  # 1 + 7 + 1 of the nodes' 8 CPUs
        assert crowded.returncode == 2, crowded.stdout + crowded.stderr
        assert "reserve 9 Ray CPUs in all (learner 1, rollout 7, reward 1)" in crowded.stderr
        assert f"the Ray cluster at {address} offers 8" in crowded.stderr and not (tmp_path / "crowded").exists()
    finally:
        stopped = cluster("stop")
    assert stopped.stdout.count("stopped") == 2
    assert not [p for pgid in pids for p in running(pgid)]  # stop returned only once its nodes were gone
