"""Shared fixtures: tiny policies of both layouts, built from configs (no downloads)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray instance stays on loopback

from tracerl.config import ModelConfig, TinyModelConfig  # noqa: E402
from tracerl.models import load_policy  # noqa: E402

torch.set_num_threads(2)

# A deprecation warning that tracerl's or rewards' own code causes fails the test where it happens: the first
# caller outside the warning library (Module.__call__ dispatch aside) is ours, e.g. a deprecated argument passed
# to transformers. A library warning about its own internals (deepspeed calling torch.jit) does not.
_OWN_PACKAGES = ("tracerl", "rewards")
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_warn = warnings.warn


def _caller_package(frame):  # noqa: ANN001, ANN202
    """The top-level package of the first frame outside the package that issued the warning."""
    issuer = frame.f_globals.get("__name__", "").split(".")[0]
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] != issuer and not module.startswith("torch.nn.modules"):
            return module.split(".")[0], frame
        frame = frame.f_back
    return None, None


def _strict_warn(message, category=None, stacklevel=1, source=None, **kwargs):  # noqa: ANN001, ANN202
    kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
    if issubclass(kind, _DEPRECATIONS):
        package, frame = _caller_package(sys._getframe(1))
        if package in _OWN_PACKAGES:
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            raise kind(f"{message} (caused by tracerl's own call at {where})")
    return _warn(message, category, stacklevel + 1, source, **kwargs)


warnings.warn = _strict_warn


# Thread settings in the environment decide how many threads every later subprocess of the test process uses, and
# so its float results: a test that leaves one behind makes later comparisons of a subprocess's numbers with this
# process's fail far from their cause (compare.py once did). Each test must leave them as it found them.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.fixture(autouse=True)
def _thread_settings_left_as_found():  # noqa: ANN202
    before = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    yield
    after = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    if after != before:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        pytest.fail(f"the test changed the environment's thread settings {before} -> {after} and left them")


def load_script(name: str):  # noqa: ANN201
    """``scripts/<name>.py`` imported as the module ``name`` (registered in ``sys.modules``, which dataclasses look
    their module up in while the class is built)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_policy(attention: str = "full", block_size: int = 4, **kw):  # noqa: ANN201
    cfg = ModelConfig(tiny=TinyModelConfig(attention=attention, block_size=block_size, **kw))
    return load_policy(cfg)


@pytest.fixture(scope="session")
def full_policy():  # noqa: ANN201
    return tiny_policy("full")


@pytest.fixture(scope="session")
def block_policy():  # noqa: ANN201
    return tiny_policy("block")


def encode(policy, texts: list[str]) -> list[list[int]]:  # noqa: ANN001
    return [policy.tokenizer(t)["input_ids"] for t in texts]


def wandb_history(run_dir) -> list[dict]:  # noqa: ANN001
    """The history rows of an offline W&B run directory, in the order they were written, read back with W&B's own
    reader (``wandb leet inspect --json``); NaN values read back as the string "NaN"."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, f"wandb leet inspect {run_dir} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def save_tiny_classifier(path, *, head: bool = True, pad: bool = True, num_labels: int = 1, seed: int = 0):  # noqa: ANN001, ANN201
    """A random tiny reward model directory (Llama sequence classifier, char tokenizer with a chat template):
    ``head=False`` saves a causal LM instead, ``pad=False`` a tokenizer without a pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from tracerl.models.tiny import char_tokenizer

    tok = char_tokenizer("0123456789abcdefghijklmnopqrstuvwxyz:?")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id, num_labels=num_labels,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if head else LlamaForCausalLM)(config)
    model.save_pretrained(path)
    if not pad:
        tok.pad_token = None
    tok.save_pretrained(path)
    return path


# a tiny model for reward-model tests
TINY_RM = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
           "model.tiny.intermediate_size=64"]  # fmt: skip


def ones_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs whose rule a tiny model learns fast: of two 0/1 strings, the one with more 1s is chosen."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        a, b = ("".join(rng.choice("01") for _ in range(6)) for _ in range(2))
        if a.count("1") != b.count("1"):
            chosen, rejected = (a, b) if a.count("1") > b.count("1") else (b, a)
            out.append({"prompt": f"count {len(out) % 40}:", "chosen": chosen, "rejected": rejected})
    return out


@pytest.fixture(scope="session")
def trained_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny reward model trained by ``tracerl train-reward-model`` on ``ones_pairs`` (TRL's RewardTrainer)."""
    from tracerl.checks import load_config
    from tracerl.reward_models.train import train_reward_model

    root = tmp_path_factory.mktemp("rm")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in ones_pairs(160, seed=0)))
    cfg = load_config(None, [*TINY_RM, f"reward_model.out_dir={root / 'rm'}", f"reward_model.pairs={pairs}",
                             "reward_model.base=tiny", "reward_model.epochs=3", "reward_model.lr=5e-3",
                             "reward_model.batch_size=16", "reward_model.heldout_fraction=0.25"])  # fmt: skip
    summary = train_reward_model(cfg)
    assert summary["pairs"] == {"train": 120, "heldout": 40, "source": str(pairs)}  # 10 of 40 prompts held out
    return root / "rm"
