"""Checkpoint manifests: what a checkpoint holds, checked before any of it is loaded (DESIGN §13, §16).

``seal`` writes ``COMPLETE`` last: the manifest (JSON) of a checkpoint directory: step, the identity of the run
that wrote it, and the size and SHA-256 of every other file. ``verify_checkpoint`` checks a directory against it
(none missing, none added, none truncated or changed: the message names the file) and opens every pickle in it
(DeepSpeed's ``.pt`` files) with torch's weights-only unpickler, which refuses any global outside tensors,
containers and an allow-list of DeepSpeed's plain state classes. A pickle that would run code is refused, naming
the file and what it asked for, and its code never runs, even when the manifest was rewritten to match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
FORMAT = 2  # of the manifest; 1 was a bare "step N" marker with a pickled driver.pt
# DeepSpeed's plain state classes its optimizer and model files hold (besides tensors and containers)
_PICKLE_ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used; the message names the file and what to do."""


def manifest(path: str | Path) -> dict[str, Any]:
    """A complete checkpoint's manifest (its ``COMPLETE`` file).

    Raises:
        CheckpointError: no marker (the checkpoint was interrupted while written), or one that is not a manifest.
    """
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE} marker): it was interrupted while being written. "
            "Resume or export an earlier complete checkpoint (those with a COMPLETE file)."
        )
    try:
        raw = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{marker} is not readable JSON ({err}): the checkpoint's manifest is damaged (a disk or copy fault, or "
            "an edit), so none of its files can be verified. Move that checkpoint out of the run_dir and resume an "
            "earlier complete one (--resume <run_dir>/checkpoints/step-N, or --resume auto once it is gone)."
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("files"), dict):
        raise CheckpointError(
            f"{marker} is not a checkpoint manifest of this version (format {FORMAT}): the checkpoint was written by "
            "an older tracerl (with a pickled driver.pt, which is no longer loaded because unpickling can run code) "
            "or the marker was changed. Start from its exported weights (model.path=<checkpoint>/learner/hf) in a "
            "new run_dir."
        )
    return raw


def seal(directory: str | Path, step: int, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``COMPLETE``: the manifest of everything in ``directory`` (size and SHA-256 per file), step and
    identity, fsynced. ``save_checkpoint`` calls it last, before the rename; returns the manifest."""
    root = Path(directory)
    names = _files(root)
    digests = _hashes(root, names)
    files = {n: {"bytes": (root / n).stat().st_size, "sha256": digests[n]} for n in names}
    record = {"format": FORMAT, "step": step, "identity": identity or {}, "files": files}
    with open(root / COMPLETE, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def verify_checkpoint(path: str | Path, under: str = "", use: str = "resume") -> dict[str, Any]:
    """Check a complete checkpoint before any of it is loaded; returns its manifest.

    Every file the manifest lists is there with its size and SHA-256, no other file is, and every pickle in it
    opens with torch's weights-only unpickler (tensors, containers and ``_PICKLE_ALLOWED`` only). ``under``
    (``"learner/hf/"``) checks only the files below that folder. ``use`` (``resume``, ``export``) is what the
    messages tell the user to do from another checkpoint.

    Raises:
        CheckpointError: the first problem, naming the file.
    """
    root = Path(path)
    record = manifest(root)
    listed = {name: entry for name, entry in record["files"].items() if name.startswith(under)}
    for name in _files(root):
        if name.startswith(under) and name not in listed:
            raise CheckpointError(
                f"{root / name} is not part of checkpoint {root} (its manifest does not list it): something was "
                f"added after the checkpoint was written. Remove it, or {use} from another checkpoint."
            )
    for name, entry in listed.items():
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from checkpoint {root}; {use} from another checkpoint.")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{file} has {file.stat().st_size} bytes, but {entry['bytes']} were written: the file is truncated "
                f"or was replaced. {use.capitalize()} from another checkpoint."
            )
    digests = _hashes(root, sorted(listed))
    for name, entry in listed.items():
        if digests[name] != entry["sha256"]:
            raise CheckpointError(
                f"{root / name} is not the file that was written (its SHA-256 differs from the manifest): it was "
                f"changed or damaged after the checkpoint was marked complete. {use.capitalize()} from another "
                "checkpoint."
            )
    for name in listed:
        _check_pickle(root / name, use)
    return record


def _files(root: Path) -> list[str]:
    """Every file under ``root`` but the marker, as sorted relative POSIX paths."""
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != COMPLETE:
                out.append(rel)
    return sorted(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _hashes(root: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each file, several files at once (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return dict(zip(names, pool.map(lambda n: _sha256(root / n), names), strict=True))


class _Inert:
    """Stands in for an allow-listed class while a pickle is only being checked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def __setstate__(self, state: Any) -> None:
        del state


def _check_pickle(path: Path, use: str = "resume") -> None:
    """A pickle (or torch zip archive) opens with the weights-only unpickler; other files are not pickles."""
    with open(path, "rb") as f:
        head = f.read(4)
    archive = head == b"PK\x03\x04" and zipfile.is_zipfile(path)
    if not archive and head[:1] != b"\x80":
        return  # JSON, safetensors, text
    try:
        with torch.serialization.safe_globals([(_Inert, name) for name in _PICKLE_ALLOWED]):
            torch.load(path, map_location="cpu", weights_only=True, mmap=archive)
    except Exception as err:  # noqa: BLE001 - the unpickler raises several types; all mean "refused"
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
        reason = next((line for line in lines if "GLOBAL" in line), lines[-1])  # what the pickle asked for
        raise CheckpointError(
            f"{path} holds more than tensors and plain state ({type(err).__name__}: {reason[:300]}); it was not "
            f"loaded, since unpickling it could run code. {use.capitalize()} from a checkpoint this tracerl wrote."
        ) from None
