"""Resumable state (DESIGN §13): atomic checkpoints of the learner and the driver, resume, and HF export.

Layout of one checkpoint, ``<run_dir>/checkpoints/step-<N>/``:

    learner/     what the learner's ``save`` writes: DeepSpeed engine state (weights, optimizer, LR schedule) of
                 the policy and the value model, the reference weights, the learner's counters, and ``hf/``, the
                 policy as a Hugging Face directory (what ``export_hf`` copies)
    driver.json  DriverState: RL step, data cursor, RNG states of python / numpy / torch, W&B run id, version
    COMPLETE     written last: the manifest (JSON): step, the identity of the run that wrote it (run id, model
                 and learner settings), and the size and SHA-256 of every other file

A checkpoint is written into ``.tmp-step-<N>``, every file is fsynced, ``COMPLETE`` is written, and only then is
the directory renamed to ``step-<N>`` (an atomic rename on POSIX). A run killed at any moment leaves either no
``step-<N>`` or a complete one; ``latest_checkpoint`` ignores temporary and unmarked directories, and the next
save removes them.

A checkpoint holds data, never code. The driver's state is JSON. Before anything of a checkpoint is loaded,
``verify_checkpoint`` (``tracerl.manifest``) checks every file against the manifest and opens every pickle the
learner will load (DeepSpeed's ``.pt`` files) with torch's weights-only unpickler: a truncated, changed or added
file, or a pickle that would run code, is refused naming the file, and that code never runs.

This module never imports deepspeed or ray: the learner is anything with ``save(dir)`` / ``load(dir)`` (a
``Learner`` or a ``LearnerGroup``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tracerl.config import ConfigError
from tracerl.manifest import COMPLETE, CheckpointError, manifest, seal, verify_checkpoint

CHECKPOINTS = "checkpoints"
DRIVER = "driver.json"
_STEP = re.compile(r"^step-(\d+)$")


class Saveable(Protocol):
    """What a checkpoint needs from the learner side."""

    def save(self, directory: str | Path) -> None: ...

    def load(self, directory: str | Path) -> None: ...


@dataclass
class DriverState:
    """The driver's part of a checkpoint (everything that is not model or optimizer state)."""

    step: int = 0  # RL (or SFT) steps completed
    weights_version: int = 0  # learner version the rollout side holds
    data: dict[str, Any] = field(default_factory=dict)  # data cursor, e.g. PromptStream.state_dict()
    wandb_run_id: str | None = None  # resume the same W&B run
    rng: dict[str, Any] = field(default_factory=dict)  # capture_rng() at save time
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the caller wants back (JSON values)


def capture_rng() -> dict[str, Any]:
    """The RNG states of python, numpy and torch (CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what ``capture_rng`` returned (missing entries are left alone)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """``capture_rng()`` as JSON values: tuples as lists, arrays as lists, torch states as hex."""
    out: dict[str, Any] = {}
    if "python" in state:
        version, words, gauss = state["python"]
        out["python"] = [version, list(words), gauss]
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        out["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    if "torch" in state:
        out["torch"] = state["torch"].numpy().tobytes().hex()
    if "cuda" in state:
        out["cuda"] = [s.cpu().numpy().tobytes().hex() for s in state["cuda"]]
    return out


def rng_from_json(raw: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``rng_to_json``: what ``restore_rng`` takes."""

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8).clone()

    out: dict[str, Any] = {}
    if "python" in raw:
        version, words, gauss = raw["python"]
        out["python"] = (version, tuple(words), gauss)
    if "numpy" in raw:
        kind, keys, pos, has_gauss, cached = raw["numpy"]
        out["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    if "torch" in raw:
        out["torch"] = tensor(raw["torch"])
    if "cuda" in raw:
        out["cuda"] = [tensor(t) for t in raw["cuda"]]
    return out


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def run_id_of(path: str | Path) -> str | None:
    """The run id a complete checkpoint was written by (None: unreadable or none recorded)."""
    try:
        return manifest(path).get("identity", {}).get("run_id")
    except CheckpointError:
        return None


def list_checkpoints(run_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints of a run (``step-<N>`` with a ``COMPLETE`` marker), oldest first; with ``run_id``,
    only those that run wrote."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP.match(path.name)
        complete = match and path.is_dir() and (path / COMPLETE).is_file()
        if complete and (run_id is None or run_id_of(path) == run_id):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint of a run (of ``run_id``, if given), or None; half-written ones are ignored."""
    done = list_checkpoints(run_dir, run_id)
    return done[-1] if done else None


def half_written(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories without a ``COMPLETE`` marker: saves that were killed (the next save clears them)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and (p.name.startswith(".tmp-step-") or _STEP.match(p.name))
        and not (p / COMPLETE).is_file()
    )  # fmt: skip


def run_folder_advice(path: str | Path, want: str = "model") -> tuple[str, Path | None] | None:
    """When ``path`` is a tracerl run folder (``run.json``, ``checkpoints/``) given where a ``model`` directory
    (model.path) or a ``checkpoint`` (--resume, export) was wanted: what it is, and the path to give instead (its
    final model or latest complete checkpoint; None when it has neither yet). None for anything else.

    Example:
        >>> run_folder_advice("/nonexistent") is None
        True
    """
    path = Path(path)
    if not ((path / "run.json").is_file() or checkpoint_dir(path).is_dir()):
        return None
    latest, final = latest_checkpoint(path), path / "final"
    if want == "model" and (final / "config.json").is_file():
        return f"it is a tracerl run folder; its trained model is '{final}'", final
    if latest is not None:
        target = latest / "learner" / "hf" if want == "model" else latest
        return f"it is a tracerl run folder; its latest complete checkpoint is '{target}'", target
    return f"it is a tracerl run folder with no complete checkpoint yet (in '{checkpoint_dir(path)}')", None


def resolve_resume(run_dir: str | Path, resume: str, run_id: str | None = None) -> Path | None:
    """``checkpoint.resume`` → the directory to resume from: ``none`` → None, ``auto`` → the latest complete
    checkpoint (of ``run_id``, if given; None for a fresh run), anything else → that checkpoint directory (which
    must be complete)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir, run_id)
    path = Path(resume)
    if not path.is_dir():
        problem = "is a file" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"--resume / checkpoint.resume '{resume}' {problem}; give a checkpoint directory "
            f"(run_dir/checkpoints/step-N), or 'auto' to take the latest complete one in {checkpoint_dir(run_dir)}."
        )
    if not (path / COMPLETE).is_file():
        advice = run_folder_advice(path, want="checkpoint")
        if advice is None:
            why = f" (no {COMPLETE} marker); use"
        else:
            why = f": {advice[0]}. Give that, or" if advice[1] is not None else f": {advice[0]}; use"
        raise FileNotFoundError(
            f"checkpoint.resume='{resume}' is not a complete checkpoint{why} 'auto' to take the latest complete one "
            f"in {checkpoint_dir(run_dir)}."
        )
    return path


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    learner: Saveable | None,
    driver: DriverState,
    keep_last: int = 2,
    identity: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep the last ``keep_last`` complete ones of this run (≤ 0: keep
    all). ``identity`` (``run_id`` and the settings a resume must match) goes into the manifest.

    Returns the final directory ``<run_dir>/checkpoints/step-<step>``.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"

    # 1. Everything into the temporary directory, then onto the disk.
    tmp.mkdir()
    if learner is not None:
        learner.save(tmp / "learner")
    state = {**asdict(driver), "rng": rng_to_json(driver.rng)}
    (tmp / DRIVER).write_text(json.dumps(state))
    _fsync_tree(tmp)

    # 2. The manifest last, then the atomic rename (a re-save of the same step replaces the old one).
    seal(tmp, step, identity)
    if final.exists():
        old = root / f".old-step-{step}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)

    # 3. Keep the last k of this run.
    if keep_last > 0:
        for path in list_checkpoints(run_dir, (identity or {}).get("run_id"))[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, learner: Saveable | None, verified: bool = False) -> DriverState:
    """Verify a complete checkpoint (``verify_checkpoint``, unless ``verified``), restore the learner and return its
    DriverState (the caller restores the RNGs with ``restore_rng(state.rng)`` once everything else is set up).

    Raises:
        CheckpointError: the checkpoint failed verification, or its driver state does not parse.
    """
    path = Path(path)
    if not verified:
        verify_checkpoint(path)
    state = driver_state(path)
    if learner is not None:
        learner.load(path / "learner")
    return state


def driver_state(path: str | Path) -> DriverState:
    """The DriverState of a checkpoint (``driver.json``).

    Raises:
        CheckpointError: the file is missing or does not parse.
    """
    file = Path(path) / DRIVER
    try:
        raw = json.loads(file.read_text())
        return DriverState(**{**raw, "rng": rng_from_json(raw.get("rng", {}))})
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{file} is not a readable driver state ({type(err).__name__}: {err}).") from None


def checkpoint_holding(path: str | Path) -> Path | None:
    """The checkpoint that ``path`` is or lies in, complete or not, else None: a folder with a ``learner/`` folder
    and a ``COMPLETE`` manifest, a driver state, or the name ``step-<N>`` / ``.tmp-step-<N>`` in a ``checkpoints``
    folder (a file named like one of these alone does not make a checkpoint)."""
    path = Path(path).expanduser().resolve()
    for folder in (path, *path.parents):
        if not (folder / "learner").is_dir():
            continue
        named = folder.parent.name == CHECKPOINTS and (_STEP.match(folder.name) or folder.name.startswith(".tmp-step-"))
        if named or (folder / COMPLETE).is_file() or (folder / DRIVER).is_file():
            return folder
    return None


def check_writable(folder: Path, setting: str = "run_dir") -> None:
    """``folder`` (the value of ``setting``) is a directory this process can create or write into.

    Raises:
        ConfigError: it is a file, it lies inside a checkpoint (``checkpoint_holding``), or no folder can be made
            in its nearest existing folder (a test folder is made there and removed at once).
    """
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{setting} '{folder}' is a file; give a directory (it is created if missing).")
    if (inside := checkpoint_holding(folder)) is not None:
        raise ConfigError(
            f"{setting} '{folder}' lies inside the checkpoint '{inside}'. A checkpoint holds only what its run wrote "
            "(its manifest lists every file): a file added there makes it fail verification on resume and export, "
            "and the run deletes it with the checkpoint (checkpoint.keep_last). Give a folder outside "
            f"'{inside.parent}'."
        )
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{setting} '{folder}' cannot be created: '{existing}' is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{setting} '{folder}' cannot be written: '{existing}' is read-only for this user. Give a folder on a "
            "writable disk."
        )
    try:  # root passes os.access everywhere, also where nothing can be created (/proc, a read-only mount)
        os.rmdir(tempfile.mkdtemp(prefix=".tracerl-write-check-", dir=existing))
    except OSError as err:
        raise ConfigError(
            f"{setting} '{folder}' cannot be created: making a folder in '{existing}' fails ({err.strerror}). Give a "
            "folder on a writable disk."
        ) from None


def export_hf(source: str | Path | Any, out_dir: str | Path, adapter: bool = False) -> Path:
    """Write a Hugging Face directory of the policy (``save_pretrained`` of the native model + tokenizer, LoRA
    adapters merged in) that ``from_pretrained`` and ``load_policy(ModelConfig(family=..., path=out_dir))`` load;
    with ``adapter`` the LoRA adapter directory instead (``PeftModel.from_pretrained(base, out_dir)`` loads it).

    ``source`` is a checkpoint directory (``step-<N>``, or its ``learner/`` folder) or a live learner (anything
    with ``save_hf(dir)``: a ``Learner`` or a ``LearnerGroup``, which gathers ZeRO-3 weights first).
    """
    out = Path(out_dir)
    if hasattr(source, "save_hf") and not adapter:  # a run's final/: written whole or not at all, as below
        tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            source.save_hf(tmp)
            _fsync_tree(tmp)
            _put_in_place(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    if out.expanduser().resolve() == Path.cwd().resolve():
        raise FileExistsError(
            f"export target '{out_dir}' is the current folder; give a folder of its own, e.g. ./exported (it is "
            "written whole or not at all, by a rename)."
        )
    src = Path(source)
    if not src.is_dir():
        problem = "is a file" if src.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint '{src}' {problem}; give a directory like run_dir/checkpoints/step-N.")
    if advice := run_folder_advice(src, want="checkpoint"):
        final = src / "final"
        what = "; export that." if advice[1] is not None else "."
        ready = f" Its final model '{final}' is a standalone copy already." if (final / "config.json").is_file() else ""
        raise FileNotFoundError(f"'{src}' is not a checkpoint: {advice[0]}{what}{ready}")
    sub, marker = ("adapter", "adapter_config.json") if adapter else ("hf", "config.json")
    hf = next((c for c in (src / "learner" / sub, src / sub, src) if (c / marker).is_file()), None)
    if hf is None:
        root = checkpoint_holding(src) if adapter else None
        if adapter and root is None and _trained_lora(src.parent) is not False:
            raise FileNotFoundError(
                f"{src} is not a checkpoint: a model folder (a run's final/ or an export) holds the merged weights "
                "only. A LoRA run's adapter is in its checkpoints: export run_dir/checkpoints/step-N with "
                "--adapter, or this folder without it."
            )
        if adapter and root is None:
            raise FileNotFoundError(
                f"{src} is the final model of a run trained with learner.lora.enabled=false: it has no LoRA adapter. "
                "Export it without --adapter."
            )
        if adapter and (root / "learner" / sub / marker).is_file():
            raise FileNotFoundError(
                f"{src} is the merged model of the checkpoint '{root}'; its LoRA adapter is exported from the "
                f"checkpoint itself: tracerl export {root} OUT_DIR --adapter."
            )
        if adapter:
            raise FileNotFoundError(
                f"{src} holds no LoRA adapters (expected learner/adapter/adapter_config.json inside a checkpoint): "
                "it was trained with learner.lora.enabled=false. Export the merged model without --adapter."
            )
        raise FileNotFoundError(f"{src} holds no exported policy (expected learner/hf/config.json inside a checkpoint)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export target '{out}' is a file; give a new or empty directory.")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export target '{out}' exists and is not empty; give a new or empty directory.")
    check_writable(out, "export target")
    verify_export_source(src, hf, marker)
    # Copy into a temporary sibling, fsync, then rename: an interrupted export leaves no half-written directory.
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(hf, tmp)
        _fsync_tree(tmp)
        _put_in_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _put_in_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an ``out`` already there (a resumed run's final/ written again) is
    moved aside first and removed after, so ``out`` is at every moment either the old directory or the new one."""
    old = out.parent / f".old-{out.name}-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _trained_lora(run_dir: Path) -> bool | None:
    """Whether the run in ``run_dir`` trained LoRA adapters (its config.json), None where that cannot be read."""
    try:
        return bool(json.loads((run_dir / "config.json").read_text())["learner"]["lora"]["enabled"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_export_source(checkpoint: Path, hf: Path, config_name: str = "config.json") -> None:
    """What ``export_hf`` copies is whole: a complete checkpoint (``COMPLETE``), a JSON ``config_name``
    (``config.json``, or ``adapter_config.json`` for LoRA adapters) and readable weight files.

    Raises:
        ValueError: a check failed; the message names the file.
    """
    root = checkpoint_holding(hf)  # None: a model folder of its own (final/, an export), no manifest to check
    if root is None and hf != checkpoint:  # a folder that holds learner/hf (or hf/) is a checkpoint, complete or not
        root = hf.resolve().parent.parent
    if root is not None and not (root / COMPLETE).is_file():
        raise ValueError(
            f"checkpoint '{root}' is not complete (no {COMPLETE} marker): it was interrupted while being "
            "written. Export an earlier complete checkpoint (those with a COMPLETE file)."
        )
    if root is not None:  # the exported files are those the manifest recorded
        verify_checkpoint(root, under=hf.resolve().relative_to(root).as_posix() + "/", use="export")
    try:
        config = json.loads((hf / config_name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{hf / config_name} is not valid JSON ({err}); the checkpoint is damaged.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{hf / config_name} is not a JSON object; the checkpoint is damaged.")
    weights = sorted(hf.glob("*.safetensors")) + sorted(hf.glob("*.bin"))
    if not weights:
        raise ValueError(f"{hf} has no weight files (*.safetensors or *.bin); the checkpoint is damaged.")
    for path in weights:
        try:
            if path.suffix == ".safetensors":
                _check_safetensors(path)
            else:
                torch.load(path, map_location="meta", weights_only=True)
        except Exception as err:  # noqa: BLE001 - safetensors and torch raise their own types
            raise ValueError(
                f"weight file {path} is unreadable ({type(err).__name__}: {err}); it is truncated or damaged."
            ) from None


def _check_safetensors(path: Path) -> None:
    """The header parses and the tensors it lists end exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise ValueError(f"header of {length} bytes in a file of {size}")
        header = json.loads(f.read(length))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        raise ValueError(f"its tensors need {8 + length + max(ends, default=0)} bytes, the file has {size}")
