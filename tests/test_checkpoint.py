"""Checkpoints: exact resume, atomic writes that survive a kill, keep-last-k, and the Hugging Face export."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tracerl.checkpoint import (
    COMPLETE,
    DriverState,
    capture_rng,
    checkpoint_dir,
    export_hf,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from tracerl.config import Config, ModelConfig, SamplingConfig
from tracerl.learner import Learner
from tracerl.models import load_policy
from tracerl.sampling import generate

from .conftest import encode, tiny_policy

ROOT = Path(__file__).resolve().parents[1]


class FileLearner:
    """A stand-in learner that writes one file (checkpoint mechanics need nothing more)."""

    def __init__(self, payload: str = "w") -> None:
        self.payload, self.loaded = payload, None

    def save(self, directory) -> None:  # noqa: ANN001
        Path(directory).mkdir(parents=True)
        (Path(directory) / "weights.txt").write_text(self.payload)

    def load(self, directory) -> None:  # noqa: ANN001
        self.loaded = (Path(directory) / "weights.txt").read_text()


def rl_cfg() -> Config:
    cfg = Config(seed=5)
    cfg.learner.lr = 1e-3
    cfg.learner.updates_per_step = 2
    cfg.learner.minibatches = 2
    cfg.learner.lr_schedule = "cosine"
    cfg.learner.warmup_steps = 2
    cfg.learner.total_steps = 12
    cfg.objective.value_model = True
    cfg.objective.kl_to_ref_coef = 0.05
    return cfg


def batches(policy, n: int):  # noqa: ANN001, ANN201
    out = []
    for i in range(n):
        prompts = encode(policy, ["1+2=", "12+34=", "7*8="])
        rollout = generate(policy, prompts, SamplingConfig(max_new_tokens=8, block_size=4), seed=10 + i)
        out.append((rollout, torch.tensor([1.0, -0.5, 0.25]) * (i + 1)))  # train_step's arguments
    return out


# ---------------------------------------------------------------------------------------------- resume


def untimed(metrics: list[dict[str, float]]) -> list[dict[str, float]]:
    """The metrics without ``time/*`` (wall-clock seconds differ from run to run)."""
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]


@pytest.mark.slow  # trains 4 steps twice
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 at ZeRO-0: DeepSpeed's unfused optimizer wrapper
def test_resume_reproduces_the_uninterrupted_run(tmp_path, precision):
    """Save after step 1, load into a fresh learner, continue: weights, value model and metrics equal a run
    that never stopped (fixed seed, CPU, μ = 2 passes × 2 minibatches, warmup + cosine schedule; in bf16 with
    weight decay, whose fp32 master weights the checkpoint must carry)."""
    data = batches(tiny_policy("full"), 3)

    def config() -> Config:
        cfg = rl_cfg()
        if precision == "bf16":
            cfg.learner.precision, cfg.learner.weight_decay = "bf16", 0.1
        return cfg

    straight = Learner(config(), tiny_policy("full"))
    want = [straight.train_step(*d) for d in data]
    want_weights = straight.state_dict_for_rollout()
    want_value = {k: v.clone() for k, v in straight.value_engine.module.state_dict().items()}
    straight.destroy()

    first = Learner(config(), tiny_policy("full"))
    first.train_step(*data[0])
    path = save_checkpoint(tmp_path, 1, first, DriverState(step=1, weights_version=first.version, rng=capture_rng()))
    first.destroy()

    resumed = Learner(config(), tiny_policy("full"))
    state = load_checkpoint(path, resumed)
    assert (state.step, state.weights_version, resumed.version) == (1, 1, 1)
    got = [resumed.train_step(*d) for d in data[1:]]
    version, weights = resumed.state_dict_for_rollout()
    value = resumed.value_engine.module.state_dict()
    resumed.destroy()

    assert untimed(got) == untimed(want[1:])  # every metric but the clock, lr included, identical
    assert version == want_weights[0] == 3
    for name, tensor in want_weights[1].items():
        assert torch.equal(weights[name], tensor), name
    for name, tensor in want_value.items():
        assert torch.equal(value[name], tensor), name


def test_rng_states_round_trip():
    state = capture_rng()
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_driver_state_round_trips(tmp_path):
    driver = DriverState(step=7, weights_version=7, data={"epoch": 1, "cursor": 3}, wandb_run_id="abc")
    path = save_checkpoint(tmp_path, 7, FileLearner("x"), driver)
    learner = FileLearner()
    assert load_checkpoint(path, learner) == driver
    assert learner.loaded == "x"


# ---------------------------------------------------------------------------------------------- atomicity


def test_keep_last_k_complete_checkpoints(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, FileLearner(str(step)), DriverState(step=step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-4"]
    assert latest_checkpoint(tmp_path).name == "step-4"
    save_checkpoint(tmp_path, 4, FileLearner("again"), DriverState(step=4), keep_last=2)  # re-save replaces
    assert (latest_checkpoint(tmp_path) / "learner" / "weights.txt").read_text() == "again"


def test_half_written_checkpoints_are_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, FileLearner(), DriverState(step=1))
    root = checkpoint_dir(tmp_path)
    (root / ".tmp-step-2" / "learner").mkdir(parents=True)  # killed while writing
    (root / "step-3").mkdir()  # renamed by hand, never marked complete
    (root / "step-3" / "driver.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == root / "step-1"
    assert resolve_resume(tmp_path, "auto") == root / "step-1"
    assert resolve_resume(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(root / "step-3"))
    save_checkpoint(tmp_path, 2, FileLearner(), DriverState(step=2))
    assert not (root / ".tmp-step-2").exists()  # the next save clears what the killed one left
    assert latest_checkpoint(tmp_path) == root / "step-2"


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """A real process is SIGKILLed while writing step 2; resume still finds the complete step 1."""
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from tracerl.checkpoint import DriverState, save_checkpoint

        class Slow:
            def save(self, directory):
                Path(directory).mkdir(parents=True)
                (Path(directory) / "part.bin").write_bytes(b"0" * 1000)
                Path({str(tmp_path / "ready")!r}).write_text("1")
                time.sleep(60)

        class Fast(Slow):
            def save(self, directory):
                Path(directory).mkdir(parents=True)

        save_checkpoint({str(tmp_path)!r}, 1, Fast(), DriverState(step=1))
        save_checkpoint({str(tmp_path)!r}, 2, Slow(), DriverState(step=2))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.time() < deadline, "the saving process did not start"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    root = checkpoint_dir(tmp_path)
    assert (root / ".tmp-step-2" / "learner" / "part.bin").exists() and not (root / "step-2").exists()
    assert latest_checkpoint(tmp_path) == root / "step-1"
    assert (root / "step-1" / COMPLETE).is_file()


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("attention", ["full", "block"])
def test_export_loads_with_from_pretrained_and_generates_like_the_learner(tmp_path, attention):
    policy = tiny_policy(attention)
    rollout = generate(policy, encode(policy, ["1+2=", "12+34="]), SamplingConfig(max_new_tokens=8, block_size=4))
    cfg = Config()
    cfg.learner.lr = 1e-2
    learner = Learner(cfg, policy)
    try:
        learner.train_step(rollout, torch.tensor([1.0, -1.0]))
        _, weights = learner.state_dict_for_rollout()
        export_hf(learner, tmp_path / "live")
        ckpt = save_checkpoint(tmp_path / "run", 1, learner, DriverState(step=1))
        export_hf(ckpt, tmp_path / "from_ckpt")
    finally:
        learner.destroy()

    prompts = encode(policy, ["3+4=", "10+20="])
    s = SamplingConfig(max_new_tokens=8, block_size=4, temperature=0.7)
    want = generate(policy, prompts, s, seed=4)  # the learner trained `policy` in place
    for out in ("live", "from_ckpt"):
        native = AutoModelForCausalLM.from_pretrained(tmp_path / out)
        for name, tensor in native.state_dict().items():
            assert torch.equal(tensor, weights[name]), name
        loaded = load_policy(ModelConfig(family="tiny", path=str(tmp_path / out)))
        assert loaded.block_size == policy.block_size and loaded.mask_id == policy.mask_id
        got = generate(loaded, prompts, s, seed=4)
        assert torch.equal(got.response_ids, want.response_ids) and got.texts == want.texts


def test_what_lies_inside_a_checkpoint(tmp_path):
    """Outputs are refused inside a checkpoint; a folder that merely holds a file named COMPLETE or driver.json (a
    project of the user's) is not one."""
    from tracerl.checkpoint import check_writable, checkpoint_holding
    from tracerl.config import ConfigError

    run = tmp_path / "run"
    step = run / "checkpoints" / "step-3"
    (step / "learner" / "hf").mkdir(parents=True)  # being written: no COMPLETE yet
    assert checkpoint_holding(step / "learner" / "hf" / "x") == step.resolve()
    assert checkpoint_holding(run / "final") is None and checkpoint_holding(run / "checkpoints") is None
    other = tmp_path / "project"
    (other / "data").mkdir(parents=True)
    (other / "COMPLETE").write_text("done")
    (other / "driver.json").write_text("{}")
    assert checkpoint_holding(other / "data" / "run") is None
    check_writable(other / "data" / "run")  # no error
    moved = tmp_path / "saved-step"  # a checkpoint copied out of its run keeps its manifest
    (moved / "learner").mkdir(parents=True)
    (moved / "COMPLETE").write_text("{}")
    assert checkpoint_holding(moved / "export") == moved.resolve()
    with pytest.raises(
        ConfigError, match=f"run_dir '{moved / 'export'}' lies inside the checkpoint '{moved.resolve()}'"
    ):
        check_writable(moved / "export")


def test_a_final_model_is_written_whole_or_not_at_all(tmp_path):
    """final/ of a run is written beside and renamed into place: a save that fails midway leaves the one before
    (a partial final/ would count as finished to a rerun), and a second save replaces the first whole."""

    class Source:
        def __init__(self, files: dict[str, str], fail: bool = False) -> None:
            self.files, self.fail = files, fail

        def save_hf(self, out: Path) -> None:
            out.mkdir(parents=True)
            for name, text in self.files.items():
                (out / name).write_text(text)
                if self.fail:
                    raise OSError("disk full")

    final = tmp_path / "run" / "final"
    export_hf(Source({"config.json": "{}", "model.safetensors": "old"}), final)
    with pytest.raises(OSError, match="disk full"):
        export_hf(Source({"config.json": "{}", "model.safetensors": "new"}, fail=True), final)
    assert (final / "model.safetensors").read_text() == "old"
    export_hf(Source({"config.json": "{}", "tokenizer.json": "t"}), final)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "tokenizer.json"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]  # no temporary or old copy left
