"""One run per run directory, and checkpoints that hold data only (DESIGN §13, §16).

A fresh run in a directory that holds another run is refused, naming it, before anything is written; so is any
command on a directory another process runs one in (its lock), while a lock left by a killed process does not
block; ``--resume auto`` takes only the directory's own checkpoints; a half-written checkpoint is reported; a
checkpoint whose files were truncated, changed, added to, or replaced by pickled code is refused naming the file,
and the code never runs (a marker file it would create is never created), even when its manifest was rewritten to
match.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tracerl import runs
from tracerl.checkpoint import (
    COMPLETE,
    CheckpointError,
    DriverState,
    capture_rng,
    check_writable,
    driver_state,
    latest_checkpoint,
    list_checkpoints,
    restore_rng,
    save_checkpoint,
    seal,
    verify_checkpoint,
)
from tracerl.cli import main
from tracerl.config import Config, ConfigError, load, to_dict

from .test_checkpoint import FileLearner

MARKER = "/tmp/tracerl-pickle-ran-{}"


class Planted:
    """A pickle that runs code when loaded: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def cfg_for(run_dir: Path, *overrides: str) -> Config:
    return load(None, [f"run_dir={run_dir}", "wandb.mode=disabled", *overrides])


def fake_run(run_dir: Path, steps: tuple[int, ...] = (1, 2), command: str = "train", cfg: Config | None = None) -> str:
    """A run directory as a run leaves it: run.json, metrics, checkpoints that carry its id and settings."""
    claim = runs.claim(cfg or cfg_for(run_dir), command)
    runs.record(run_dir, claim)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))
    for step in steps:
        driver = DriverState(step=step, data={"epoch": 0, "cursor": step}, rng=capture_rng())
        save_checkpoint(run_dir, step, FileLearner(str(step)), driver, keep_last=0, identity=claim.identity)
    return claim.run_id


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- the directory


def test_a_fresh_run_in_a_directory_of_another_run_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError) as err:
        runs.claim(cfg_for(run_dir), "train")
    message = str(err.value)
    assert f"run_dir '{run_dir}' holds another run" in message and "--resume auto" in message
    assert "metrics.jsonl" in message and "checkpoints" in message
    assert snapshot(run_dir) == before


def test_a_model_directory_as_run_dir_is_named_as_such(tmp_path: Path) -> None:
    """run_dir=model.path was called another run and told to continue it from a checkpoint, which it never had."""
    from tracerl.models import build_tiny, save_tiny

    model = tmp_path / "model"
    save_tiny(*build_tiny(cfg_for(tmp_path).model.tiny), model)
    before = snapshot(model)
    with pytest.raises(ConfigError) as err:
        runs.claim(cfg_for(model, f"model.path={model}"), "train")
    message = str(err.value)
    assert f"run_dir '{model}' is a model directory (its config.json is a '" in message
    assert "Give the run a directory of its own (run_dir=<new directory>); model.path can stay this one." in message
    assert "holds another run" not in message and "--resume" not in message
    assert snapshot(model) == before


def test_a_run_that_failed_before_its_first_checkpoint_is_started_over_with_resume_auto(tmp_path: Path) -> None:
    # a reward that breaks the contract stops the run at step 1, after run.json was written: the fixed command is
    # refused as "another run", and the message says that --resume auto starts it over with the new settings
    run_dir = tmp_path / "run"
    fake_run(run_dir, steps=())
    with pytest.raises(ConfigError, match="has no complete checkpoint: --resume auto .* starts it over from step 0"):
        runs.claim(cfg_for(run_dir, "objective.value_model=true"), "train")
    claim = runs.claim(cfg_for(run_dir, "objective.value_model=true", "checkpoint.resume=auto"), "train")
    assert claim.restart and claim.resume is None and claim.settings["objective.value_model"] is True


def test_resume_auto_continues_the_own_run_and_verifies_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_id = fake_run(run_dir, (1, 2, 3))
    claim = runs.claim(cfg_for(run_dir, "checkpoint.resume=auto"), "train")
    assert claim.run_id == run_id and claim.resume == run_dir / "checkpoints" / "step-3" and not claim.restart
    assert claim.identity["settings"]["model.tiny.hidden_size"] == Config().model.tiny.hidden_size
    with pytest.raises(ConfigError, match="holds a tracerl train run; tracerl sft needs its own run_dir"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto"), "sft")


def test_a_resume_past_the_last_step_is_refused_naming_both(tmp_path: Path) -> None:
    # it trained nothing, wrote final/ again from the checkpoint and exited 0
    run_dir = tmp_path / "run"
    fake_run(run_dir, (1, 2, 3))
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"step-3 is at step 3, past train.steps=2: .* set train.steps above 3"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", "train.steps=2"), "train")
    step3 = run_dir / "checkpoints" / "step-3"
    with pytest.raises(ConfigError, match=r"past train.steps=1"):
        runs.claim(cfg_for(tmp_path / "new", f"checkpoint.resume={step3}", "train.steps=1"), "train")
    assert snapshot(run_dir) == before and not (tmp_path / "new").exists()
    at_end = runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", "train.steps=3"), "train")
    assert at_end.resume == step3  # a run stopped while writing final/: allowed, and said
    assert f"checkpoint {step3} is the run's last step (train.steps=3): nothing is left to train" in at_end.notes[-1]
    assert not any("last step" in n for n in runs.claim(cfg_for(run_dir, "checkpoint.resume=auto"), "train").notes)
    sft = tmp_path / "sft"
    fake_run(sft, (4,), command="sft")
    with pytest.raises(ConfigError, match=r"past sft.steps=3"):
        runs.claim(cfg_for(sft, "checkpoint.resume=auto", "sft.steps=3"), "sft")


def test_a_resume_with_a_smaller_keep_last_names_the_checkpoints_it_will_delete(tmp_path: Path) -> None:
    # the run was started with checkpoint.keep_last=5; resumed without it, the next save deleted step-1 unsaid
    run_dir = tmp_path / "run"
    fake_run(run_dir, (1, 2, 3))
    notes = runs.claim(cfg_for(run_dir, "checkpoint.resume=auto"), "train").notes
    assert any("checkpoint.keep_last=2, and 3 complete checkpoints" in n and "oldest 2 (step-1, step-2)" in n
               for n in notes), notes  # fmt: skip
    assert not any("keep_last" in n for n in runs.claim(cfg_for(run_dir, "checkpoint.resume=auto",
                                                                 "checkpoint.keep_last=3"), "train").notes)  # fmt: skip


def test_a_damaged_manifest_under_resume_auto_says_it_is_damaged(tmp_path: Path) -> None:
    # it was called a checkpoint of another run ("the directory mixes runs")
    run_dir = tmp_path / "run"
    fake_run(run_dir, (1, 2))
    (run_dir / "checkpoints" / "step-2" / "COMPLETE").write_text("{bad")
    with pytest.raises(CheckpointError, match=r"step-2/COMPLETE is not readable JSON .* resume an earlier"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto"), "train")


def test_a_fresh_run_in_a_directory_of_the_other_command_says_so_first(tmp_path: Path) -> None:
    """A fresh ``tracerl sft`` in a train run's directory is refused naming the other command (not with advice to
    resume the run, which the other command would refuse next); nothing is written."""
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError) as err:
        runs.claim(cfg_for(run_dir), "sft")
    message = str(err.value)
    assert "holds a tracerl train run; tracerl sft needs its own run_dir" in message and "--resume" not in message
    assert snapshot(run_dir) == before


def test_files_of_a_run_without_its_record_are_not_sent_to_resume_auto(tmp_path: Path) -> None:
    """Without run.json, --resume auto cannot tell whose the files are (it refuses them): the advice is a resume by
    path or a new run_dir."""
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    (run_dir / runs.RUN).unlink()
    with pytest.raises(ConfigError) as err:
        runs.claim(cfg_for(run_dir), "train")
    assert "--resume auto" not in str(err.value) and f"--resume {run_dir}/checkpoints/step-N" in str(err.value)


def test_resume_from_a_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"checkpoint.resume '{missing}' does not exist"):
        runs.claim(cfg_for(tmp_path / "run", f"checkpoint.resume={missing}"), "train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match=f"checkpoint.resume '{tmp_path / 'file'}' is a file"):
        runs.claim(cfg_for(tmp_path / "run", f"checkpoint.resume={tmp_path / 'file'}"), "train")
    assert not (tmp_path / "run").exists()


def test_resuming_a_checkpoint_of_the_other_command_by_path_is_refused(tmp_path: Path) -> None:
    fake_run(tmp_path / "sft", steps=(1,), command="sft")
    ckpt = tmp_path / "sft" / "checkpoints" / "step-1"
    with pytest.raises(
        ConfigError, match=rf"written by tracerl sft; tracerl train cannot resume it.*{ckpt}/learner/hf"
    ):
        runs.claim(cfg_for(tmp_path / "rl", f"checkpoint.resume={ckpt}"), "train")
    assert not (tmp_path / "rl").exists()
    assert runs.claim(cfg_for(tmp_path / "sft2", f"checkpoint.resume={ckpt}"), "sft").resume == ckpt


def test_resume_auto_takes_only_the_own_checkpoints(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    fake_run(mine, (1, 2))
    fake_run(other, (7,))
    shutil.copytree(other / "checkpoints" / "step-7", mine / "checkpoints" / "step-7")  # mixed in by hand
    with pytest.raises(ConfigError, match=r"checkpoints/step-7 was not written by the run of run_dir"):
        runs.claim(cfg_for(mine, "checkpoint.resume=auto"), "train")


def test_keep_last_counts_only_the_runs_own_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fake_run(tmp_path / "other", (9,))
    shutil.copytree(tmp_path / "other" / "checkpoints", run_dir / "checkpoints")
    identity = {"run_id": "mine"}
    for step in (1, 2, 3):
        save_checkpoint(run_dir, step, FileLearner(), DriverState(step=step), keep_last=2, identity=identity)
    assert [p.name for p in list_checkpoints(run_dir, "mine")] == ["step-2", "step-3"]
    assert (run_dir / "checkpoints" / "step-9").is_dir()  # another run's checkpoint is not this run's to delete
    assert latest_checkpoint(run_dir, "mine").name == "step-3" and latest_checkpoint(run_dir).name == "step-9"


def test_a_run_with_only_a_half_written_checkpoint_starts_over_and_says_so(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    claim = runs.claim(cfg_for(run_dir), "train")
    runs.record(run_dir, claim)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run_dir / "checkpoints" / ".tmp-step-2" / "learner").mkdir(parents=True)  # killed while saving step 2
    again = runs.claim(cfg_for(run_dir, "checkpoint.resume=auto"), "train")
    assert again.run_id == claim.run_id and again.resume is None and again.restart
    assert "no complete checkpoint" in again.notes[0] and ".tmp-step-2" in again.notes[0]
    runs.record(run_dir, again)
    assert not (run_dir / "metrics.jsonl").exists()  # the redone steps are not appended to the lost ones


def test_resume_by_path_continues_that_run_here_or_in_a_new_directory(tmp_path: Path) -> None:
    first, second, busy = tmp_path / "first", tmp_path / "second", tmp_path / "busy"
    run_id = fake_run(first, (1, 2))
    step = first / "checkpoints" / "step-2"
    claim = runs.claim(cfg_for(second, f"checkpoint.resume={step}"), "train")
    assert claim.run_id == run_id and claim.resume == step
    fake_run(busy, (1,))
    with pytest.raises(ConfigError, match=f"checkpoint {step} belongs to run {run_id}, but run_dir '{busy}'"):
        runs.claim(cfg_for(busy, f"checkpoint.resume={step}"), "train")


def test_a_checkpoint_of_other_settings_or_another_model_is_refused_naming_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fake_run(run_dir, (1,))
    with pytest.raises(ConfigError, match="written with model.tiny.hidden_size=64; this run has model.tiny.hidden"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", "model.tiny.hidden_size=32"), "train")
    with pytest.raises(ConfigError, match="written with objective.value_model=False"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", "objective.value_model=true"), "train")
    # a model directory: the checkpoint's own config.json against model.path's
    models = tmp_path / "models"
    for name, width in (("small", 32), ("big", 64)):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": width}))
    trained = tmp_path / "trained"
    fake_run(trained, (1,), cfg=cfg_for(trained, f"model.path={models / 'small'}"))
    hf = trained / "checkpoints" / "step-1" / "learner" / "hf"
    hf.mkdir()
    shutil.copy(models / "small" / "config.json", hf / "config.json")
    seal(hf.parents[1], 1, json.loads((hf.parents[1] / COMPLETE).read_text())["identity"])
    assert runs.claim(cfg_for(trained, "checkpoint.resume=auto", f"model.path={models / 'small'}"), "train").resume
    with pytest.raises(ConfigError, match="holds a model with hidden_size=32, but model.path has hidden_size=64"):
        runs.claim(cfg_for(trained, "checkpoint.resume=auto", f"model.path={models / 'big'}"), "train")


def test_a_resume_with_changed_optimizer_settings_says_the_checkpoints_apply(tmp_path: Path) -> None:
    """The optimizer and scheduler states restore the learning rates and the schedule as saved, so a changed
    learner.lr or value_lr would be ignored silently; the resume goes on, and its notes name each change."""
    run_dir = tmp_path / "run"
    fake_run(run_dir, (1,), cfg=cfg_for(run_dir, "objective.value_model=true", "learner.value_lr=7e-4"))
    same = runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", "objective.value_model=true",
                              "learner.value_lr=7e-4"), "train")  # fmt: skip
    assert same.notes == []
    changed = runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", "objective.value_model=true",
                                 "learner.value_lr=1e-9", "learner.lr=2e-6"), "train")  # fmt: skip
    assert changed.resume == run_dir / "checkpoints" / "step-1"
    (note,) = changed.notes
    assert "learner.lr=2e-06 (checkpoint: 1e-06)" in note and "learner.value_lr=1e-09 (checkpoint: 0.0007)" in note
    assert "the checkpoint's values apply" in note
    # the same rate spelt differently (null = 5 × learner.lr) and a schedule length a constant schedule ignores
    quiet = runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", "objective.value_model=true",
                               "learner.value_lr=7e-4", "learner.total_steps=50"), "train")  # fmt: skip
    assert quiet.notes == []


def test_a_resume_that_changes_what_the_numbers_mean_says_so(tmp_path: Path) -> None:
    """A resume may change the reward, the data or the held-out set (a curriculum does), but then the run's curves and
    tracerl plot's before/after table compare unlike things: the resume names each such change."""
    run_dir = tmp_path / "run"
    fake_run(run_dir, (1,), cfg=cfg_for(run_dir, "eval.num_prompts=4"))
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg_for(run_dir, "seed=5"))))  # a later attempt's
    same = runs.claim(cfg_for(run_dir, "eval.num_prompts=4", "checkpoint.resume=auto", "train.steps=200"), "train")
    assert same.notes == []  # more steps, same meaning
    other = "reward.functions=[{fn: sudoku_cells, weight: 1.0}]"
    changed = runs.claim(cfg_for(run_dir, "eval.num_prompts=12", other, "seed=5", "checkpoint.resume=auto"), "train")
    (note,) = changed.notes
    assert note.startswith("seed=5 (was 0); ") and "eval.num_prompts=12 (was 4)" in note
    assert "reward.functions=[{'fn': 'sudoku_cells'" in note and "(was [{'fn': 'synthetic_exact'" in note
    assert f"the run resumed from {run_dir / 'checkpoints' / 'step-1'} was trained and evaluated with" in note
    assert changed.resume == run_dir / "checkpoints" / "step-1"  # a note, not a refusal
    # compared with what the checkpoint recorded, not with config.json, which every attempt rewrites
    assert runs.claim(cfg_for(run_dir, "eval.num_prompts=4", "checkpoint.resume=auto"), "train").notes == []


def test_resume_notes_name_a_schedule_length_only_where_the_schedule_decays(tmp_path: Path) -> None:
    run_dir, sft_dir = tmp_path / "run", tmp_path / "sft"
    fake_run(run_dir, (1,), cfg=cfg_for(run_dir, "objective.value_model=true"))  # value_lr null: 5 × 1e-6
    same = runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", "objective.value_model=true",
                              "learner.value_lr=5e-6"), "train")  # fmt: skip
    assert same.notes == []
    fake_run(sft_dir, (1,), "sft", cfg=cfg_for(sft_dir, "learner.lr_schedule=linear", "sft.steps=8"))
    (note,) = runs.claim(cfg_for(sft_dir, "checkpoint.resume=auto", "learner.lr_schedule=linear", "sft.steps=16"),
                         "sft").notes  # fmt: skip
    assert note.startswith("sft.steps=16 (checkpoint: 8)")  # a linear decay to 0 at step 8: the rest at lr 0


def test_a_run_dir_that_is_a_file_or_read_only_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"run_dir '{tmp_path / 'file'}' is a file"):
        runs.claim(cfg_for(tmp_path / "file"), "sft")
    with pytest.raises(ConfigError, match="cannot be created: .* is a file"):
        runs.claim(cfg_for(tmp_path / "file" / "run"), "sft")
    read_only = next((p for p in ("/proc/sys",) if os.path.isdir(p) and not os.access(p, os.W_OK)), None)
    if read_only is None:
        pytest.skip("no read-only folder to try here")
    with pytest.raises(ConfigError, match=f"'{read_only}' is read-only"):
        runs.claim(cfg_for(Path(read_only) / "tracerl-run"), "train")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_run_dir_where_no_folder_can_be_made_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """/proc passes os.access for root, yet no folder can be made there: the check makes (and removes) one."""
    with pytest.raises(ConfigError, match=r"^run_dir '/proc/tracerl-run' cannot be (written|created)"):
        runs.claim(cfg_for(Path("/proc/tracerl-run")), "train")
    check_writable(tmp_path / "new" / "run")
    assert list(tmp_path.iterdir()) == []  # the test folder is gone, and nothing else was made


def test_the_write_check_makes_a_folder_because_permissions_do_not_tell(tmp_path: Path, monkeypatch) -> None:
    """As root, os.access says yes also where nothing can be created: the check's own folder says no."""
    import tempfile

    def fails(*args: object, **kwargs: object) -> str:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(tempfile, "mkdtemp", fails)
    with pytest.raises(ConfigError, match=r"making a folder in '.*' fails \(No such file or directory\)"):
        check_writable(tmp_path / "run", "run_dir")


# ---------------------------------------------------------------------------------------------- the checkpoint


def test_driver_state_is_json_and_round_trips_every_rng(tmp_path: Path) -> None:
    driver = DriverState(step=3, data={"epoch": 1, "cursor": 5}, wandb_run_id="w", rng=capture_rng(), extra={"k": 1})
    path = save_checkpoint(tmp_path, 3, None, driver)
    raw = json.loads((path / "driver.json").read_text())  # plain JSON: nothing there can run
    assert raw["step"] == 3 and isinstance(raw["rng"]["torch"], str)
    want = (torch.rand(1).item(),)
    restore_rng(driver_state(path).rng)
    assert (torch.rand(1).item(),) == want
    assert driver_state(path).data == driver.data and not (path / "driver.pt").exists()


@pytest.mark.parametrize("damage", ["truncated", "one byte changed", "file added", "file removed", "driver.json"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    run_dir = tmp_path / "run"
    fake_run(run_dir, (1,))
    step = run_dir / "checkpoints" / "step-1"
    weights = step / "learner" / "weights.txt"
    if damage == "truncated":
        weights.write_text("")
        expected = f"{weights} has 0 bytes, but 1 were written"
    elif damage == "one byte changed":
        weights.write_text("9")
        expected = f"{weights} is not the file that was written"
    elif damage == "file added":
        (step / "learner" / "extra.pt").write_bytes(b"\x80\x02N.")
        expected = f"{step / 'learner' / 'extra.pt'} is not part of checkpoint"
    elif damage == "file removed":
        weights.unlink()
        expected = f"{weights} is missing"
    else:
        (step / "driver.json").write_text("{")
        seal(step, 1, json.loads((step / COMPLETE).read_text())["identity"])  # even with a matching manifest
        expected = f"{step / 'driver.json'} is not a readable driver state"
    with pytest.raises((CheckpointError, ConfigError)) as err:
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto"), "train")
    assert expected in str(err.value)


@pytest.mark.parametrize("manifest", ["as written", "rewritten to match"])
def test_a_pickle_replaced_by_code_is_refused_and_the_code_never_runs(tmp_path: Path, manifest: str) -> None:
    marker = Path(MARKER.format(f"{os.getpid()}-{manifest.replace(' ', '-')}"))
    marker.unlink(missing_ok=True)
    run_dir = tmp_path / "run"
    fake_run(run_dir, (1,))
    step = run_dir / "checkpoints" / "step-1"
    state = step / "learner" / "model_states.pt"
    torch.save({"module": torch.zeros(2), "trap": Planted(str(marker))}, state)
    if manifest == "rewritten to match":
        seal(step, 1, json.loads((step / COMPLETE).read_text())["identity"])
        expected = f"{state} holds more than tensors and plain state"
    else:
        expected = f"{state} is not part of checkpoint"
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(step)
    assert expected in str(err.value)
    if manifest == "rewritten to match":
        assert "system" in str(err.value)  # names what the pickle asked for
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- on the command line

SFT = [
    "data.source=synthetic:parity", "data.chat_template=false", "data.num_synthetic=80", "sft.batch_size=8",
    "sft.eval_every=0", "sampling.max_new_tokens=8", "sampling.block_size=8", "wandb.mode=disabled",
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
]  # fmt: skip


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_the_mixed_run_dir_sequence_is_refused_at_the_first_step(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A run of 4 steps, then a fresh run of 2 in the same run_dir: refused before anything is written (the old
    run's metrics, checkpoints and final model untouched); the same run continued with --resume auto."""
    run_dir = tmp_path / "run"
    code, err = cli(capsys, "sft", *SFT, f"run_dir={run_dir}", "sft.steps=4", "checkpoint.save_every=2")
    assert code == 0, err
    before = snapshot(run_dir)
    start = time.monotonic()
    code, err = cli(capsys, "sft", *SFT, f"run_dir={run_dir}", "sft.steps=2")
    assert code == 2 and f"run_dir '{run_dir}' holds another run" in err and "Traceback" not in err
    assert time.monotonic() - start < 5.0  # at once, not after the model, data and learner started
    assert snapshot(run_dir) == before
    code, err = cli(capsys, "train", "model.tiny.hidden_size=32", f"run_dir={run_dir}", "--resume", "auto")
    assert code == 2 and "holds a tracerl sft run; tracerl train needs its own run_dir" in err
    assert snapshot(run_dir) == before
    code, err = cli(capsys, "sft", *SFT, f"run_dir={run_dir}", "sft.steps=6", "checkpoint.save_every=2",
                    "checkpoint.resume=auto")  # fmt: skip
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_resume_from_a_checkpoint_with_planted_code_is_refused_at_once(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    marker = Path(MARKER.format(f"{os.getpid()}-cli"))
    marker.unlink(missing_ok=True)
    run_dir = tmp_path / "run"
    code, err = cli(capsys, "sft", *SFT, f"run_dir={run_dir}", "sft.steps=2", "checkpoint.save_every=1")
    assert code == 0, err
    step = run_dir / "checkpoints" / "step-2"
    [states] = (step / "learner" / "policy" / "state").glob("*model_states.pt")
    torch.save({"module": torch.zeros(2), "trap": Planted(str(marker))}, states)  # DeepSpeed's own file
    seal(step, 2, json.loads((step / COMPLETE).read_text())["identity"])  # the manifest rewritten to match
    start = time.monotonic()
    code, err = cli(capsys, "sft", *SFT, f"run_dir={run_dir}", "sft.steps=3", "checkpoint.resume=auto")
    assert code == 2 and str(states) in err and "could run code" in err and "Traceback" not in err
    assert time.monotonic() - start < 5.0
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- one command at a time

HOLD = """import sys, time
from tracerl import runs
with runs.lock(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def holder(run_dir: Path) -> Iterator[subprocess.Popen]:
    """Another process that holds ``run_dir``'s lock (as a running ``tracerl train`` does) until it is killed."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_command_on_a_run_dir_another_process_is_running_in_is_refused_naming_it(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """train (fresh and --resume auto) and sft on a run_dir whose lock another process holds: exit 2 at once, one
    paragraph naming the run_dir, the holder's pid and the fix, and nothing written there; so also in a new one."""
    run_dir, new = tmp_path / "run", tmp_path / "new"
    fake_run(run_dir)
    with holder(run_dir) as proc, holder(new) as other:
        assert (run_dir / runs.LOCK).read_text().split() == [str(proc.pid), "train"]
        before, start = snapshot(run_dir), time.monotonic()
        for argv in (["train", "--resume", "auto"], ["train"], ["sft", *SFT], ["sft", *SFT, "--resume", "auto"]):
            code, err = cli(capsys, *argv, "model.tiny.hidden_size=32", f"run_dir={run_dir}")
            assert code == 2 and "Traceback" not in err and "\n" not in err.strip(), err
            assert f"run_dir '{run_dir}' is in use by another tracerl process (pid {proc.pid}, tracerl train" in err
            assert "Wait for that process to finish, or stop it" in err and "give run_dir another directory" in err
            assert snapshot(run_dir) == before
        code, err = cli(capsys, "sft", *SFT, f"run_dir={new}")
        assert code == 2 and f"run_dir '{new}' is in use by another tracerl process (pid {other.pid}," in err
        assert [p.name for p in new.iterdir()] == [runs.LOCK]
        code, err = cli(capsys, "eval", *SFT, f"run_dir={tmp_path / 'any'}", "--out", str(new))  # its output folder
        assert code == 2 and f"--out '{new}' is in use by another tracerl process (pid {other.pid}," in err
        assert "give --out another directory" in err and [p.name for p in new.iterdir()] == [runs.LOCK]
        assert time.monotonic() - start < 10.0  # at once: before the model, the data or Ray start
    with runs.lock(run_dir, "train"):  # released with the process that held it
        pass


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The OS drops a SIGKILLed process's lock: its lock file stays, is not taken for a run's file, and the next
    command (a fresh run, then --resume auto) proceeds and removes it."""
    run_dir = tmp_path / "run"
    with holder(run_dir) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert (run_dir / runs.LOCK).read_text().split() == [str(proc.pid), "train"]
    assert runs.claim(cfg_for(run_dir), "sft").resume is None  # a fresh run: the lock file is not another run's
    code, err = cli(capsys, "sft", *SFT, f"run_dir={run_dir}", "sft.steps=2", "checkpoint.save_every=1")
    assert code == 0, err
    assert not (run_dir / runs.LOCK).exists()
    with holder(run_dir) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    code, err = cli(capsys, "sft", *SFT, f"run_dir={run_dir}", "sft.steps=3", "checkpoint.resume=auto")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and not (run_dir / runs.LOCK).exists()


def held_by_this_process(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``runs.claim`` (called inside the lock) checks that this process holds the run_dir's lock: a second lock
    there, even in this process, is refused naming this pid. → the commands it saw."""
    claim, held = runs.claim, []

    def locked(cfg: Config, command: str) -> runs.Claim:
        busy = f"'{cfg.run_dir}' is in use .* \\(pid {os.getpid()}, tracerl {command};"
        with pytest.raises(runs.RunDirBusy, match=busy), runs.lock(cfg.run_dir, command):
            pass
        held.append(command)
        return claim(cfg, command)

    monkeypatch.setattr(runs, "claim", locked)
    return held


@pytest.mark.slow
def test_run_sft_locks_the_run_dir_and_releases_it_on_return_and_on_error(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The Python API: run_sft holds the lock while it runs and releases it when it returns or raises, so it runs
    twice in sequence in one process (and a refused call does not block the next)."""
    from tracerl.sft import run_sft

    run_dir, held = tmp_path / "run", held_by_this_process(monkeypatch)
    cfg = load(None, [*SFT, f"run_dir={run_dir}", "sft.steps=2", "checkpoint.save_every=1"])
    run_sft(cfg, progress=False)
    assert not (run_dir / runs.LOCK).exists()
    with pytest.raises(ConfigError, match="holds another run"):
        run_sft(cfg, progress=False)
    run_sft(load(None, [*SFT, f"run_dir={run_dir}", "sft.steps=3", "checkpoint.resume=auto"]), progress=False)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and held == ["sft"] * 3 and not (run_dir / runs.LOCK).exists()


TINY_RL = [
    "sampling.max_new_tokens=8", "sampling.block_size=4", "data.source=synthetic:addition", "data.num_synthetic=64",
    "data.chat_template=false", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "learner.engine=torch",
    "train.log_samples_every=0", "eval.num_prompts=4", "eval.samples=2", "eval.k=2", "wandb.mode=disabled",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_run_locks_the_run_dir_and_releases_it_on_return_and_on_error(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The Python API: orchestrator.run holds the lock while it runs (its Ray actors are other processes) and
    releases it when it returns or raises: run(), a refused run(), then run() with --resume auto, in one process."""
    from tracerl.orchestrator import run

    run_dir, held = tmp_path / "run", held_by_this_process(monkeypatch)
    run(load(None, [*TINY_RL, f"run_dir={run_dir}", "train.steps=1"]))
    assert not (run_dir / runs.LOCK).exists()
    with pytest.raises(ConfigError, match="holds another run"):
        run(load(None, [*TINY_RL, f"run_dir={run_dir}", "train.steps=2"]))
    run(load(None, [*TINY_RL, f"run_dir={run_dir}", "train.steps=2", "checkpoint.resume=auto"]))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2] and held == ["train"] * 3 and not (run_dir / runs.LOCK).exists()


def test_the_checkpoint_benchmark_runs_and_reports_its_ratio() -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_checkpoint.py"), "--mb", "4", "--files", "2", "--json"],
        capture_output=True, text=True, timeout=120, cwd=root,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mb"] == 4 and result["seal_s"] > 0 and result["verify_mb_per_s"] > 0 and result["seal_over_save"] > 0
