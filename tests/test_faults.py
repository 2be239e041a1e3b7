"""Faults an RL run survives (DESIGN §13, §16), each injected into a real ``tracerl train`` process on CPU with a
fixed seed: the driver SIGKILLed after a checkpoint and while one is written, Ctrl-C mid-step, rollout / reward /
learner actors SIGKILLed by pid mid-step. After ``--resume auto`` (or the loop's own recovery) every step's numbers
equal those of an uninterrupted run, and ``metrics.jsonl`` has each step exactly once.

The kill moments are read off the run's own files (a metrics row, the temporary checkpoint directory,
``cluster.json``), so the loop has no test-only branches.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 4
REWARD = """
def score(prompts, completions, **kwargs):
    return [len(set(c)) / 8.0 for c in completions]
"""
CONFIG = """
seed: 3
model: {{tiny: {{attention: block, hidden_size: 128, num_layers: 4, intermediate_size: 256}}}}
sampling: {{max_new_tokens: 8, temperature: 1.0}}
data: {{source: "synthetic:parity", num_synthetic: 200}}
objective: {{group_filter: drop_all_equal}}
learner: {{lr: 1.0e-3}}
reward: {{functions: [{{fn: "{reward}:score"}}], num_workers: 1}}
rollout: {{prompts_per_step: 4, samples_per_prompt: 4, num_workers: 1}}
train: {{steps: {steps}, eval_every: 2}}
eval: {{num_prompts: 4, samples: 2, k: 2}}
checkpoint: {{save_every: 1}}
wandb: {{mode: disabled}}
"""
TRACERL = [sys.executable, "-m", "tracerl.cli"]
# what depends on the machine's speed, or counts the faults themselves; everything else must be equal
VARYING = ("time/", "perf/", "fault/", "sync/weight_s")


class Run:
    """One ``tracerl train`` process in its own session (so the test can signal it like a terminal would, and
    remove whatever it leaves behind)."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "reward.py").write_text(REWARD)
        self.config = tmp / "config.yaml"
        self.config.write_text(CONFIG.format(reward=tmp / "reward.py", steps=STEPS))
        self.dir = tmp / name
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.args, self.env = args, os.environ | (env or {})

    def start(self, *extra: str) -> Run:
        cmd = [*TRACERL, "train", str(self.config), f"run_dir={self.dir}", *self.args, *extra]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        return self

    def wait(self, timeout: float = 600) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.cleanup()

    def when(self, condition: Callable[[], bool], timeout: float = 600, poll: float = 0.002) -> None:
        """Wait until ``condition()`` holds (fails if the run ends first)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before the moment to inject the fault:\n{self.output}"
            assert time.monotonic() < deadline, "timed out waiting for the moment to inject the fault"
            time.sleep(poll)

    def cleanup(self) -> None:
        """SIGKILL whatever is left of the run's session (its local Ray instance, after a SIGKILLed driver)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def rows(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def steps(self) -> list[int]:
        return [r["step"] for r in self.rows()]

    def has_row(self, step: int) -> bool:
        return step in self.steps()

    def complete(self, step: int) -> bool:
        return (self.dir / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()

    def layout(self) -> dict:
        return json.loads((self.dir / "cluster.json").read_text())


def numbers(rows: list[dict]) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k not in ("step", "time") and not k.startswith(VARYING)}
            for r in rows}  # fmt: skip


def assert_same_run(run: Run, reference: dict[int, dict[str, float]]) -> None:
    """Each step exactly once, and every number of every step equal to the uninterrupted run's."""
    assert run.steps() == sorted(reference), run.output
    got = numbers(run.rows())
    for step, want in reference.items():
        assert set(got[step]) == set(want), f"step {step}: metric names differ"
        for key, value in want.items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"step {step} {key}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict[str, float]]:
    run = Run(tmp_path_factory.mktemp("reference"), "run").start()
    assert run.wait() == 0, run.output
    rows = numbers(run.rows())
    assert sorted(rows) == list(range(STEPS + 1)) and "eval/greedy_reward" in rows[0]
    assert len({rows[s]["reward/mean"] for s in range(1, STEPS + 1)}) > 1  # the steps differ: a real comparison
    return rows


def test_driver_sigkilled_after_a_checkpoint_resumes_to_the_same_numbers(reference, tmp_path):
    run = Run(tmp_path, "run").start()
    run.when(lambda: run.complete(2))
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert "resumed from" in run.output and "(step 2)" in run.output
    assert_same_run(run, reference)


def test_driver_sigkilled_while_writing_a_checkpoint_resumes_from_the_one_before(reference, tmp_path):
    run = Run(tmp_path, "run").start()
    tmp = run.dir / "checkpoints" / ".tmp-step-2"
    run.when(tmp.exists)
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert tmp.exists() and not run.complete(2)  # killed mid-write: step 2's checkpoint is half-written
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert "(step 1)" in run.output  # the latest complete checkpoint
    assert not tmp.exists()  # the half-written one was cleared by the next save
    assert_same_run(run, reference)


def test_ctrl_c_mid_step_finishes_the_step_checkpoints_it_and_resumes(reference, tmp_path):
    run = Run(tmp_path, "run", "wandb.mode=offline", env={"WANDB_MODE": "offline"}).start()
    run.when(lambda: run.complete(1))
    time.sleep(0.5)  # past saving step 1: a later step is under way
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    assert run.wait() == 130, run.output
    assert "resume with --resume auto" in run.output
    saved = max(int(p.name[5:]) for p in (run.dir / "checkpoints").glob("step-*"))
    assert saved >= 2 and run.complete(saved)  # the step in flight finished and was saved
    assert run.steps() == list(range(saved + 1))
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert_same_run(run, reference)
    runs = sorted((run.dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1  # the same W&B run continued


def test_rollout_and_reward_actors_killed_mid_step_are_replaced_and_the_numbers_do_not_change(reference, tmp_path):
    run = Run(tmp_path, "run").start()
    run.when(lambda: run.has_row(1), poll=0.01)
    layout = run.layout()
    os.kill(layout["rollout"][0]["pid"], signal.SIGKILL)
    os.kill(layout["reward"][0]["pid"], signal.SIGKILL)
    assert run.wait() == 0, run.output
    last = run.rows()[-1]
    assert last["fault/rollout_restarts"] == 1 and last["fault/reward_restarts"] == 1
    assert last["fault/rollout_restart_s"] > 0 and last["fault/reward_restart_s"] > 0
    assert_same_run(run, reference)


def test_a_killed_learner_rank_is_rebuilt_from_the_last_checkpoint_and_the_run_completes(reference, tmp_path):
    run = Run(tmp_path, "run").start()
    run.when(lambda: run.complete(2), poll=0.01)
    os.kill(run.layout()["learner"][0]["pid"], signal.SIGKILL)
    assert run.wait() == 0, run.output
    assert "learner rebuilt from checkpoint step" in run.output
    last = run.rows()[-1]
    assert last["fault/learner_restarts"] == 1 and last["sync/weights_version"] == STEPS
    assert any("fault/learner_recovery_s" in r for r in run.rows())
    assert_same_run(run, reference)


def test_past_fault_max_learner_restarts_the_run_stops_saying_what_died_and_resumes(reference, tmp_path):
    run = Run(tmp_path, "run", "fault.max_learner_restarts=0").start()
    run.when(lambda: run.complete(1), poll=0.01)
    pid = run.layout()["learner"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert run.wait() == 2  # the CLI's exit code for an error it explains
    message = " ".join(run.output.split())
    assert f"learner rank 0 (pid {pid}) died" in message
    assert "fault.max_learner_restarts=0" in message and "resume with --resume auto" in message
    assert "Traceback" not in run.output
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert_same_run(run, reference)


def test_a_killed_rank_of_a_two_rank_learner_does_not_hang_the_survivor(tmp_path):
    run = Run(tmp_path, "run", "learner.num_ranks=2", "train.steps=3", "eval.num_prompts=0").start()
    run.when(lambda: run.complete(1), poll=0.01)
    before = run.layout()["learner"]
    os.kill(before[1]["pid"], signal.SIGKILL)  # rank 0 may be waiting for it in a collective
    assert run.wait(timeout=600) == 0, run.output
    assert "learner rank 1" in run.output and "learner rebuilt" in run.output
    rows = run.rows()
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["fault/learner_restarts"] == 1
    after = run.layout()["learner"]
    assert len(after) == 2 and not {w["pid"] for w in after} & {w["pid"] for w in before}  # a whole new group
