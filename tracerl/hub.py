"""One quick question to the Hugging Face hub before a model or dataset is downloaded by name.

transformers and datasets retry a failed download five times with backoff (about 25 s, with a warning per try)
before they give up, also when the name does not exist or there is no network at all. ``hub_problem`` asks the
hub once, with a short timeout, so that a mistyped name (``model.path=w/nope``, where ``w/`` was meant as a local
folder) or a machine without network is refused at once; a name the hub knows, a gated one, or one in the local cache
goes on to the library's own loading.
"""

from __future__ import annotations

import os
from pathlib import Path

PROBE_TIMEOUT_S = 10.0
_FOUND: set[tuple[str, str]] = set()  # (kind, name) the hub has answered for in this process: not asked again


def offline(kind: str = "model") -> bool:
    """The offline variables huggingface_hub (and, for a dataset, datasets) honour are set: names come from the
    local cache only."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if kind == "dataset" else [])
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in names)


def _cached(name: str, kind: str) -> bool:
    """Something of ``name`` is in the hub's cache (or, for a dataset, in datasets' own, in the folder datasets
    names it: ``org___snake_case_name``): the library may load it without the network, so the probe leaves it to
    the library."""
    from huggingface_hub import constants

    folders = [Path(constants.HF_HUB_CACHE) / f"{kind}s--{name.replace('/', '--')}"]
    if kind == "dataset":
        import datasets
        from datasets.naming import camelcase_to_snakecase

        parts = name.split("/")
        parts[-1] = camelcase_to_snakecase(parts[-1])
        folders.append(Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(parts))
    return any(f.is_dir() and any(f.iterdir()) for f in folders)


def local_folder_hint(name: str) -> str:
    """``", though 'w' is a local folder"`` when the part of ``name`` before its last ``/`` is a local folder (the
    name was likely meant as a path in it), else ``""``."""
    parent = Path(name).expanduser().parent
    return f", though '{parent}' is a local folder" if parent != Path(".") and parent.is_dir() else ""


def hub_problem(name: str, kind: str = "model", timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot give the ``kind`` (``model`` or ``dataset``) ``name``, from one request; None when it
    can or may (the download then says what goes wrong), when the name is in the local cache, or offline (the
    caller says that). A name the hub has answered for is asked once per process (a model's config and its
    tokenizer are checked one after the other).

    Example:
        >>> hub_problem("not a hub name/x")
        "it is not a valid hub name ('org/name' of letters, digits, '-', '_' and '.')"
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return "it is not a valid hub name ('org/name' of letters, digits, '-', '_' and '.')"
    if offline(kind) or _cached(name, kind) or (kind, name) in _FOUND:
        return None
    api = HfApi()
    try:
        (api.dataset_info if kind == "dataset" else api.model_info)(name, timeout=timeout)
        _FOUND.add((kind, name))
    except GatedRepoError:
        return None  # it exists; the download says what access it needs
    except RepositoryNotFoundError:
        return f"the hub has no {kind} of that name (a private one needs `hf auth login` first)"
    except HfHubHTTPError:
        return None  # the hub answered with something else (rate limit, server error): the download retries
    except (OSError, HfHubHTTPError.__bases__[0]) as err:  # the HTTP client's own errors: connection, DNS, timeout
        return f"the hub cannot be reached ({err.__class__.__name__}: {err})"
    except Exception:  # noqa: BLE001 - anything else is the library's to report, on its own download
        return None
    return None
