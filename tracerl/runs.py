"""One run per run directory (DESIGN §13, §16): whose files a ``run_dir`` holds, what a resume may take, and the
checks done before anything is written.

A run writes ``run.json`` (its id and command) into its directory with its first file. Its checkpoints carry that
id in their manifest, with the settings a resume must match (``identity``). ``claim`` decides, before anything
is written, what a ``tracerl train`` or ``tracerl sft`` may do with its ``run_dir``:

- a fresh run (``checkpoint.resume=none``) needs a directory without another run's files;
- ``--resume auto`` continues the directory's own run from its newest complete checkpoint (verified first); a
  run that never finished a checkpoint starts over under the same id (the half-written checkpoint is reported,
  its metrics rows dropped); a directory without a run starts a fresh one;
- ``--resume DIR`` continues the run that wrote that checkpoint, here or in a new directory;
- a checkpoint written with other model or learner settings, or by another run, is refused naming both.

So metrics are appended only on resume, ``keep_last`` and ``--resume auto`` only see the run's own checkpoints,
and a tampered, truncated or code-carrying checkpoint is refused at once, naming the file.

One command at a time in a directory: ``lock`` holds an exclusive ``flock`` on ``run_dir/.tracerl.lock`` for the
whole command (taken before ``claim``), so a second ``tracerl train`` or ``tracerl sft`` there is refused before it
writes anything. The OS drops the lock with the process, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracerl import checkpoint
from tracerl.config import Config, ConfigError, to_dict, value_lr

RUN = "run.json"
LOCK = ".tracerl.lock"  # held by the process running a command in the directory (``lock``); not a run's file
# what marks a directory as holding a run (eval/, pictures/, wandb/ alone do not)
RUN_FILES = ("run.json", "config.json", "metrics.jsonl", "checkpoints", "final", "cluster.json")
_MODEL_SHAPE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim")  # fmt: skip


@dataclass(frozen=True)
class Claim:
    """What a run may do with its directory, decided before anything is written."""

    run_id: str  # the run's id (new, or the one it continues)
    command: str  # "train" or "sft"
    resume: Path | None  # the verified checkpoint to resume from; None: start from step 0
    restart: bool = False  # the run's own earlier attempt left files but no complete checkpoint: start over
    notes: list[str] = field(default_factory=list)  # what the console should say about the directory
    settings: dict[str, Any] = field(default_factory=dict)  # what every checkpoint of the run records
    restored: dict[str, Any] = field(default_factory=dict)  # the optimizer settings a resume takes from a checkpoint
    meaning: dict[str, Any] = field(default_factory=dict)  # the settings that give the run's numbers their meaning

    @property
    def identity(self) -> dict[str, Any]:
        """What each checkpoint's manifest records about the run that wrote it."""
        return {
            "run_id": self.run_id, "command": self.command, "settings": self.settings, "restored": self.restored,
            "meaning": self.meaning,
        }  # fmt: skip


def settings(cfg: Config) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed with: the model's identity and shape, how the learner's
    state is laid out (ZeRO stage, ranks, precision, LoRA adapters) and which extra models it holds."""
    model = to_dict(cfg)["model"]
    out: dict[str, Any] = {"model.family": cfg.model.family, "model.path": cfg.model.path}
    if cfg.model.path is None:
        out |= {f"model.tiny.{k}": v for k, v in model["tiny"].items()}
    out |= {
        "learner.zero_stage": cfg.learner.zero_stage,
        "learner.precision": cfg.learner.precision,
        "learner.num_ranks": cfg.learner.num_ranks if cfg.learner.zero_stage > 0 else None,
        "objective.value_model": cfg.objective.value_model,
        "objective.kl_to_ref_coef > 0": cfg.objective.kl_to_ref_coef > 0,
        "learner.lora.enabled": cfg.learner.lora.enabled,
    }
    lora = cfg.learner.lora
    if lora.enabled:  # the adapters' shapes (which layers have them, their rank) and scaling (alpha / rank)
        out |= {
            "learner.lora.rank": lora.rank,
            "learner.lora.alpha": lora.alpha,
            "learner.lora.target_modules": lora.target_modules,
        }
    return out


def restored_settings(cfg: Config, command: str) -> dict[str, Any]:
    """The settings a resume takes from the checkpoint, not from the config: the optimizers' state holds the
    learning rates and AdamW's settings, and the schedulers' the schedule (``scoring.LRSchedule``), so a changed value
    does not take effect. A resume with one changed says so (``claim``'s notes)."""
    lc = cfg.learner
    out: dict[str, Any] = {
        "learner.lr_schedule": lc.lr_schedule, "learner.warmup_steps": lc.warmup_steps,
        "learner.weight_decay": lc.weight_decay, "learner.beta1": lc.beta1, "learner.beta2": lc.beta2,
        "learner.adam_eps": lc.adam_eps,
    }  # fmt: skip
    decays = lc.lr_schedule != "constant"  # only then does the schedule's length matter
    if command == "sft":  # the schedule spans sft.steps
        return out | {"sft.lr": cfg.sft.lr} | ({"sft.steps": cfg.sft.steps} if decays else {})
    out |= {"learner.lr": lc.lr} | ({"learner.total_steps": lc.total_steps} if decays else {})
    if cfg.objective.value_model:  # the rate the value engine was built with
        out |= {"learner.value_lr": value_lr(lc)}
    return out


def claim(cfg: Config, command: str) -> Claim:
    """Decide what ``command`` may do with ``cfg.run_dir`` (see the module docstring); nothing is written.

    Raises:
        ConfigError: the directory cannot be written, holds another run, or the checkpoint to resume from does not
            belong to this run or was written with other settings.
        CheckpointError: the checkpoint to resume from failed verification, or (``--resume auto``) a checkpoint of
            the run_dir has a damaged manifest (the message names the file).
        FileNotFoundError: ``checkpoint.resume`` names a directory that is not a complete checkpoint.
    """
    run_dir, resume = Path(cfg.run_dir), cfg.checkpoint.resume
    checkpoint.check_writable(run_dir)
    owner = read_owner(run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    wanted, restored = settings(cfg), restored_settings(cfg, command)
    if resume == "none":
        if owner is not None:
            _same_command(run_dir, owner, command)
        if present:
            model = _config_json(run_dir) or {}
            if owner is None and "model_type" in model and "run_dir" not in model:  # a model's config.json
                raise ConfigError(
                    f"run_dir '{run_dir}' is a model directory (its config.json is a '{model['model_type']}' "
                    "model's); a run writes its own config.json, metrics, checkpoints and final model there and "
                    "would overwrite or mix with the model's files. Give the run a directory of its own "
                    "(run_dir=<new directory>); model.path can stay this one."
                )
            if owner is None:  # without run.json, --resume auto cannot tell whose the files are
                how = f"Continue that run from a checkpoint by path (--resume {run_dir}/checkpoints/step-N)"
            elif checkpoint.list_checkpoints(run_dir):
                how = "Continue that run with --resume auto (checkpoint.resume=auto)"
            else:  # a run that failed before its first checkpoint: nothing in it to keep
                how = (
                    "That run has no complete checkpoint: --resume auto (checkpoint.resume=auto) starts it over from "
                    "step 0 with these settings, in this run_dir"
                )
            raise ConfigError(
                f"run_dir '{run_dir}' holds another run ({', '.join(present)}); a fresh run there would mix its "
                f"metrics, checkpoints and final model with that run's. {how}, or give a new run_dir."
            )
        return Claim(uuid.uuid4().hex, command, None, settings=wanted, restored=restored, meaning=meaning(cfg))
    if resume != "auto":
        return _explicit(cfg, command, Path(resume), owner, present, wanted, restored)
    if owner is None:
        if present:
            raise ConfigError(
                f"run_dir '{run_dir}' holds files of a run ({', '.join(present)}) but no {RUN}, so --resume auto "
                f"cannot tell whose they are. Resume a checkpoint by path (--resume {run_dir}/checkpoints/step-N) "
                "or give a new run_dir."
            )
        return Claim(uuid.uuid4().hex, command, None, settings=wanted, restored=restored, meaning=meaning(cfg))
    _same_command(run_dir, owner, command)
    for path in checkpoint.list_checkpoints(run_dir):
        checkpoint.manifest(path)  # a damaged marker says so, rather than look like another run's checkpoint
        if checkpoint.run_id_of(path) != owner["run_id"]:
            raise ConfigError(
                f"checkpoint {path} was not written by the run of run_dir '{run_dir}' (run {owner['run_id']}): the "
                "directory mixes runs, and --resume auto takes only the directory's own checkpoints. Move that "
                "checkpoint out, or resume it by path into a new run_dir."
            )
    latest = checkpoint.latest_checkpoint(run_dir, owner["run_id"])
    partial = [str(p) for p in checkpoint.half_written(run_dir)]
    if latest is None:
        note = f"no complete checkpoint in {checkpoint.checkpoint_dir(run_dir)}"
        note += f" (half-written, ignored: {', '.join(partial)})" if partial else ""
        notes = [f"{note}: starting the run over from step 0"]
        return Claim(owner["run_id"], command, None, True, notes, wanted, restored, meaning(cfg))
    notes = [f"half-written checkpoint ignored: {', '.join(partial)}"] if partial else []
    notes += _check_resumable(latest, wanted, restored) + _changed_meaning(cfg, latest) + _pruned(cfg, owner["run_id"])
    notes += _check_steps_left(cfg, command, latest)  # once the checkpoint is verified
    return Claim(owner["run_id"], command, latest, False, notes, wanted, restored, meaning(cfg))


def _check_steps_left(cfg: Config, command: str, path: Path) -> list[str]:
    """The run has steps left after checkpoint ``path``; a resume past its last step would train nothing and write
    its final model again. A checkpoint at the last step (a run stopped while writing ``final/``) gets a note.

    Raises:
        ConfigError: the checkpoint's step is past ``train.steps`` (``sft.steps``), naming both and the fix.
    """
    key = "sft.steps" if command == "sft" else "train.steps"
    total, step = cfg.sft.steps if command == "sft" else cfg.train.steps, checkpoint.driver_state(path).step
    if step > total:
        raise ConfigError(
            f"checkpoint {path} is at step {step}, past {key}={total}: resuming it would train nothing and write the "
            f"run's final model again from step {step}. To train on, set {key} above {step}; the model at that "
            f"step is {path}/learner/hf (tracerl export {path} OUT makes a Hugging Face directory of it)."
        )
    if step == total:
        return [
            f"checkpoint {path} is the run's last step ({key}={total}): nothing is left to train, and the final "
            f"model is written again from it. To train on, set {key} above {step}."
        ]
    return []


def _pruned(cfg: Config, run_id: str | None) -> list[str]:
    """A note when the run already has more complete checkpoints than ``checkpoint.keep_last`` keeps (it was
    started with a larger one): the next save deletes the oldest."""
    have = checkpoint.list_checkpoints(Path(cfg.run_dir), run_id)
    extra = len(have) - cfg.checkpoint.keep_last
    if extra < 1:
        return []
    return [
        f"checkpoint.keep_last={cfg.checkpoint.keep_last}, and {len(have)} complete checkpoints of this run are in "
        f"{checkpoint.checkpoint_dir(Path(cfg.run_dir))}: the next save deletes the oldest {extra + 1} "
        f"({', '.join(p.name for p in have[: extra + 1])}). Give checkpoint.keep_last={len(have) + 1} to keep them."
    ]


def _explicit(
    cfg: Config,
    command: str,
    path: Path,
    owner: dict | None,
    present: list[str],
    wanted: dict[str, Any],
    restored: dict[str, Any],
) -> Claim:
    """``--resume DIR``: continue the run that wrote it, in its own directory or a new one."""
    run_dir = Path(cfg.run_dir)
    path = checkpoint.resolve_resume(run_dir, str(path))
    assert path is not None
    record = checkpoint.manifest(path)
    run_id, wrote = record.get("identity", {}).get("run_id"), record.get("identity", {}).get("command")
    if wrote is not None and wrote != command:
        raise ConfigError(
            f"checkpoint {path} was written by tracerl {wrote}; tracerl {command} cannot resume it (its optimizer "
            f"state and counters are {wrote}'s). To start tracerl {command} from that model, set "
            f"model.path={path}/learner/hf and leave --resume out."
        )
    if owner is not None and owner["run_id"] != run_id:
        raise ConfigError(
            f"checkpoint {path} belongs to run {run_id}, but run_dir '{run_dir}' holds run {owner['run_id']}: "
            "resuming it there would mix the two. Give a new run_dir to continue that checkpoint's run."
        )
    if owner is None and present:
        raise ConfigError(
            f"run_dir '{run_dir}' holds files of another run ({', '.join(present)}); give a new run_dir to continue "
            f"checkpoint {path}."
        )
    if owner is not None:
        _same_command(run_dir, owner, command)
    notes = _check_resumable(path, wanted, restored) + _changed_meaning(cfg, path)
    notes += _check_steps_left(cfg, command, path)  # once the checkpoint is verified
    return Claim(run_id or uuid.uuid4().hex, command, path, notes=notes, settings=wanted, restored=restored,
                 meaning=meaning(cfg))  # fmt: skip


def _same_command(run_dir: Path, owner: dict, command: str) -> None:
    if owner.get("command") != command:
        raise ConfigError(
            f"run_dir '{run_dir}' holds a tracerl {owner.get('command')} run; tracerl {command} needs its own run_dir. "
            f"Give tracerl {command} a new run_dir (run_dir=DIR)."
        )


def _check_resumable(path: Path, wanted: dict[str, Any], restored: dict[str, Any]) -> list[str]:
    """The checkpoint verifies (files, hashes, pickles) and was written with the settings this run has; → a note for
    each optimizer setting that differs from the checkpoint's (the checkpoint's applies)."""
    record = checkpoint.verify_checkpoint(path)
    checkpoint.driver_state(path)  # parses
    had = record.get("identity", {}).get("settings", {})
    for key, value in wanted.items():
        if key == "model.path" or key not in had or had[key] == value:
            continue
        raise ConfigError(
            f"checkpoint {path} was written with {key}={had[key]!r}; this run has {key}={value!r}. Resume it with "
            "the settings it was written with, or start a new run_dir."
        )
    saved = _config_json(path / "learner" / "hf")
    current = _config_json(Path(wanted["model.path"])) if wanted.get("model.path") else None
    for key in _MODEL_SHAPE:
        if saved and current and key in saved and key in current and saved[key] != current[key]:
            raise ConfigError(
                f"checkpoint {path} holds a model with {key}={saved[key]!r}, but model.path has {key}="
                f"{current[key]!r}: it is a checkpoint of another model. Point model.path at the model it was "
                "trained from, or start a new run_dir."
            )
    saved_opt = record.get("identity", {}).get("restored", {})
    changed = [
        f"{k}={v!r} (checkpoint: {saved_opt[k]!r})" for k, v in restored.items() if not _same(saved_opt.get(k, v), v)
    ]
    if not changed:
        return []
    return [
        f"{', '.join(changed)}: the optimizer and its learning-rate schedule resume from checkpoint {path} as they "
        "were saved, so the checkpoint's values apply and these do not (config.json records this run's). To train "
        "with them, start a new run from this run's weights (its final/ directory or an export)."
    ]


# What a run's numbers mean: a resume that changes one of these is allowed (a curriculum may change the data or the
# reward), and said, since the run's curves and evaluations then compare unlike things across the resumed step.
MEANING = (
    "seed", "model.path", "data.source", "data.split", "data.prompt_column", "data.answer_column", "reward.functions",
    "eval.source", "eval.split", "eval.num_prompts", "eval.samples", "eval.k", "eval.temperature",
    "eval.pass_threshold", "eval.max_new_tokens", "eval.remasking", "eval.steps_per_block",
)  # fmt: skip


def meaning(cfg: Config) -> dict[str, Any]:
    """The ``MEANING`` settings of ``cfg`` as JSON holds them (each checkpoint records them: ``Claim.identity``)."""
    tree = json.loads(json.dumps(to_dict(cfg)))
    out = {}
    for key in MEANING:
        value = tree
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return out


def _changed_meaning(cfg: Config, path: Path) -> list[str]:
    """A note naming each ``MEANING`` setting of ``cfg`` that differs from what checkpoint ``path`` recorded (a
    checkpoint that recorded none gives no note)."""
    before = checkpoint.manifest(path).get("identity", {}).get("meaning")
    if not isinstance(before, dict):
        return []
    now = meaning(cfg)
    changed = [f"{k}={now[k]!r} (was {before[k]!r})" for k in MEANING if k in before and not _same(before[k], now[k])]
    if not changed:
        return []
    return [
        f"{'; '.join(changed)}: the run resumed from {path} was trained and evaluated with the earlier values, so its "
        "curves, tracerl plot's before/after table and the divergence guard compare unlike things across this step. "
        "To keep them apart, start a new run_dir from its weights (its final/ directory or an export) instead."
    ]


def _same(a: Any, b: Any) -> bool:
    """Equal, numbers up to float rounding (5 × 1e-6 is 4.9999999999999996e-06)."""
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _config_json(folder: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def read_owner(run_dir: Path) -> dict[str, Any] | None:
    """The ``run.json`` of a directory (None when there is none).

    Raises:
        ConfigError: it exists but is not a run record.
    """
    path = run_dir / RUN
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, dict) or not isinstance(raw.get("run_id"), str):
        raise ConfigError(f"{path} is not a tracerl run record; give a new run_dir.")
    return raw


def record(run_dir: Path, claimed: Claim) -> None:
    """Write ``run.json`` (first among the run's files) and, when the run starts over, drop the metrics rows of
    its earlier attempt: metrics are appended only on resume."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if read_owner(run_dir) is None:
        entry = {"run_id": claimed.run_id, "command": claimed.command, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (run_dir / RUN).write_text(json.dumps(entry, indent=1) + "\n")
    if claimed.restart:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)


_HELD: set[int] = set()  # the descriptors of the locks this process holds


def _forget_held() -> None:
    """In a forked child: close its copies of the lock descriptors, so a child that outlives its parent does not
    keep the parent's run_dir locked (the parent's own copies keep the lock)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_held)


class RunDirBusy(ConfigError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def lock(run_dir: Path | str, command: str, setting: str = "run_dir") -> Iterator[None]:
    """Hold ``run_dir`` for this process while ``command`` runs in it: an exclusive, non-blocking ``flock`` on
    ``run_dir/.tracerl.lock``, which records this process's pid. The OS releases it when the process ends, killed
    or not; on the way out the lock file is removed, and so are the folders made for it if nothing else was written.
    ``setting`` is what the user set to name the folder (``run_dir``; ``tracerl eval``'s ``--out``), for the error.

    Raises:
        RunDirBusy: another process holds the lock (the message names its pid and the fix); nothing is written.
        ConfigError: ``run_dir`` cannot be written (``checkpoint.check_writable``).
    """
    run_dir = Path(run_dir)
    checkpoint.check_writable(run_dir)
    made = []  # the folders made here, deepest first
    folder = run_dir
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    path = run_dir / LOCK
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # its holder removed the folder on its way out: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            pid = holder[0] if holder else "not yet recorded"
            what = f", tracerl {holder[1]}" if len(holder) > 1 else ""
            raise RunDirBusy(
                f"{setting} '{run_dir}' is in use by another tracerl process (pid {pid}{what}; it holds the lock "
                f"{path}): a second command there would mix its files with that one's. Wait for that process to "
                "finish, or stop it (Ctrl-C or kill; a train or sft run continues with --resume auto), or give "
                f"{setting} another directory."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed that file while this process waited to lock it: lock the new one
    _HELD.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked, so no other process takes this file in between
        _HELD.discard(fd)
        os.close(fd)
        for folder in made:
            with contextlib.suppress(OSError):  # only where nothing else was written
                folder.rmdir()


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the run stopped after a finished step, with a checkpoint of it (exit code 130)."""


@contextlib.contextmanager
def stop_signals(say: Callable[[str], Any], what: str) -> Iterator[list[str]]:
    """The first Ctrl-C / SIGTERM asks the loop to finish the current ``what`` (an RL step, an SFT step), checkpoint
    it and stop: the list it yields becomes non-empty, and ``say`` prints one line. A second one stops at once
    (KeyboardInterrupt)."""
    requested: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        del frame
        if requested:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)
        say(f"[yellow]stopping after this {what} (a checkpoint follows); again to stop at once[/yellow]")

    previous = {}
    with contextlib.suppress(ValueError):  # signals can only be caught in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
