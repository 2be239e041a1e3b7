"""Checkpoints are checked against model.family before any model is built; bad model directories fail clearly."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from tracerl.config import ConfigError, ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.models import build_tiny, char_tokenizer, load_policy, save_tiny
from tracerl.models.families import checkpoint_family
from tracerl.sampling import generate

TOK = char_tokenizer("0123456789+=abc ")
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLADA_CONFIG = {
    "model_type": "llada",
    "architectures": ["LLaDAModelLM"],
    "d_model": 32,
    "n_heads": 4,
    "n_layers": 2,
    "mlp_ratio": 2,
    "vocab_size": len(TOK),
    "max_sequence_length": 64,
    "mask_token_id": TOK.mask_token_id,
}


def _retag(path: Path, **fields: object) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(fields)
    (path / "config.json").write_text(json.dumps(raw))


def _write(kind: str, path: Path) -> Path:
    """A small checkpoint laid out as ``kind``'s own modeling code writes it (config.json, weights, tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    if kind == "llada":
        (path / "config.json").write_text(json.dumps(LLADA_CONFIG))
        (path / "model.safetensors").write_bytes(b"")  # never read: the family check comes first
    elif kind == "dream":
        Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), **SHAPE)).save_pretrained(path)
        _retag(path, model_type="Dream", architectures=["DreamModel"], mask_token_id=TOK.mask_token_id)
    elif kind == "sdar":
        Qwen3ForCausalLM(Qwen3Config(vocab_size=len(TOK), head_dim=8, **SHAPE)).save_pretrained(path)
        _retag(path, model_type="sdar", architectures=["SDARForCausalLM"], block_size=2)
    elif kind == "masked_lm":
        config = BertConfig(
            vocab_size=len(TOK), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
        BertForMaskedLM(config).save_pretrained(path)
    elif kind == "tiny":
        model, _ = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=32, attention="block"))
        save_tiny(model, TOK, path)
    TOK.save_pretrained(path)
    return path


KINDS = ["llada", "dream", "sdar", "masked_lm", "tiny"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: _write(kind, root / kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_each_checkpoint_is_recognised(kind: str, checkpoints: dict[str, Path]) -> None:
    assert checkpoint_family(json.loads((checkpoints[kind] / "config.json").read_text())) == kind


@pytest.mark.parametrize(("kind", "family"), [(k, f) for k in KINDS for f in KINDS if k != f])
def test_a_checkpoint_loaded_as_another_family_names_its_own(kind: str, family: str, checkpoints) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_policy(ModelConfig(family=family, path=str(checkpoints[kind])))
    message = str(err.value)
    assert f"holds a {kind} checkpoint" in message and f"model.family={family}" in message
    assert f"set model.family={kind}" in message
    assert time.monotonic() - start < 5.0  # refused from config.json alone: no 10B default model is built


def test_an_autoregressive_decoder_as_masked_lm_names_model_family(tmp_path: Path) -> None:
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), **SHAPE)).save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_policy(ModelConfig(family="masked_lm", path=str(tmp_path)))
    message = str(err.value)
    assert "'qwen2' model" in message and "model.family" in message
    assert "albert" not in message  # not transformers' list of 50 masked-LM classes


def test_a_tokenizer_smaller_than_the_vocabulary_fails(tmp_path: Path) -> None:
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)  # 20 tokens for a 64-token model: not its tokenizer
    with pytest.raises(ConfigError) as err:
        load_policy(ModelConfig(family="masked_lm", path=str(tmp_path)))
    assert f"has {len(TOK)} tokens but the model's vocabulary has 64" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_a_masked_lm_without_tokenizer_files_fails(tmp_path: Path) -> None:
    config = BertConfig(
        vocab_size=len(TOK), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForMaskedLM(config).save_pretrained(tmp_path)  # no tokenizer saved
    with pytest.raises(ConfigError) as err:
        load_policy(ModelConfig(family="masked_lm", path=str(tmp_path)))
    assert "model.path" in str(err.value) and "tokenizer" in str(err.value)


def test_a_model_directory_without_tokenizer_files_names_them_before_any_prompt_is_read(tmp_path: Path) -> None:
    """Without tokenizer files transformers loads a tokenizer of one token: every prompt read as empty, and the error
    blamed data.prompt_column."""
    from tracerl.models import load_tokenizer

    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=32))
    save_tiny(model, tok, tmp_path / "m")
    for name in tmp_path.joinpath("m").glob("tokenizer*"):
        name.unlink()
    with pytest.raises(ConfigError, match=r"^model.path '.*' has no tokenizer \(none of tokenizer.json"):
        load_tokenizer(ModelConfig(family="tiny", path=str(tmp_path / "m")))


def test_a_decoder_tokenizer_larger_than_the_vocabulary_fails(tmp_path: Path) -> None:
    Qwen3ForCausalLM(Qwen3Config(vocab_size=8, head_dim=8, **SHAPE)).save_pretrained(tmp_path)
    _retag(tmp_path, model_type="sdar", architectures=["SDARForCausalLM"], block_size=2)
    TOK.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=f"has {len(TOK)} tokens but the model's vocabulary has 8"):
        load_policy(ModelConfig(family="sdar", path=str(tmp_path)))


def test_flex_attention_in_a_config_is_replaced_by_one_that_honours_the_mask(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _write("sdar", tmp_path)
    _retag(tmp_path, attn_implementation="flex_attention")
    policy = load_policy(ModelConfig(family="sdar", path=str(tmp_path)))
    assert policy.model.config._attn_implementation == "sdpa"
    rollout = generate(policy, [TOK("1+1=")["input_ids"]], SamplingConfig(max_new_tokens=4, block_size=2))
    assert rollout.response_ids.shape == (1, 4)


def test_a_directory_without_weights_names_model_path(tmp_path: Path) -> None:
    _write("dream", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        load_policy(ModelConfig(family="dream", path=str(tmp_path)))
    assert f"model.path '{tmp_path}' has a config.json but no weights" in str(err.value)


def test_truncated_weights_name_model_path(tmp_path: Path) -> None:
    _write("dream", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConfigError) as err:
        load_policy(ModelConfig(family="dream", path=str(tmp_path)))
    assert f"could not load the weights at model.path '{tmp_path}'" in str(err.value)


def test_a_config_json_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    _write("dream", tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json \\(model.path\\) is not valid JSON"):
        load_policy(ModelConfig(family="dream", path=str(tmp_path)))


def test_a_hub_name_while_offline_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1"):
        load_policy(ModelConfig(family="sdar", path="no-such-org/no-such-model"))
    assert time.monotonic() - start < 5.0


def test_decoder_forwards_use_the_current_cache_argument() -> None:
    policy = load_policy(ModelConfig(tiny=TinyModelConfig(attention="block")))
    ids, pos = torch.tensor([[5, 6, 7, 8]]), torch.arange(4)[None]
    visible = torch.ones(1, 4, 4, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5 deprecates past_key_values
        policy.hidden_states(ids, pos, visible, policy.new_cache())
        policy.hidden_states(ids, pos, visible)


def test_a_deprecation_warning_raised_through_tracerl_fails_the_suite() -> None:
    from tracerl.reward_service import RewardError, RewardService

    def old_api(prompts: list, completions: list, **kwargs: object) -> list[float]:
        warnings.warn("this argument is deprecated", DeprecationWarning, stacklevel=2)
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="DeprecationWarning: this argument is deprecated"):
        RewardService([old_api]).score(["q"], ["c"])  # tests/conftest.py turns it into an error
    with pytest.warns(DeprecationWarning):  # outside tracerl's code it stays a warning
        warnings.warn("a library's own deprecation", DeprecationWarning, stacklevel=1)


def test_the_old_cache_argument_would_fail_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    from tracerl.models import base

    policy = load_policy(ModelConfig(tiny=TinyModelConfig(attention="block")))
    monkeypatch.setattr(base, "cache_argument", lambda module: "past_key_values")  # what tracerl used to pass
    visible = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(FutureWarning, match="past_key_values.*caused by tracerl's own call"):
        policy.hidden_states(torch.tensor([[5, 6, 7, 8]]), torch.arange(4)[None], visible, policy.new_cache())


def _no_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Online, as a user is (conftest sets HF_HUB_OFFLINE), with every hub lookup recorded and refused."""
    from huggingface_hub import HfApi
    from transformers import AutoTokenizer, PretrainedConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked: list[str] = []

    def hub(name: str, *args: object, **kwargs: object) -> None:
        asked.append(str(name))
        raise OSError(f"no network for {name}")

    monkeypatch.setattr(PretrainedConfig, "get_config_dict", hub)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", hub)
    monkeypatch.setattr(HfApi, "model_info", lambda self, name, **kwargs: hub(name))  # tracerl.hub's probe
    return asked


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("w/nope/model", "a local path: a hub name has one '/'"),
        ("./nope", "a local path, by its start"),
        ("../nope", "a local path, by its start"),
        ("~/no-such-tracerl-model", "a local path, by its start"),
        ("w/model.safetensors", "a local file, by its extension"),
    ],
)
def test_a_mistyped_local_model_path_is_refused_without_the_hub(tmp_path, monkeypatch, path, why) -> None:
    from tracerl.models import load_tokenizer

    monkeypatch.chdir(tmp_path)
    asked = _no_hub(monkeypatch)
    for family in ("tiny", "dream"):
        cfg = ModelConfig(family=family, path=path)
        for load in (load_tokenizer, load_policy):
            with pytest.raises(ConfigError, match=rf"^model.path '{path}' does not exist \({why}"):
                load(cfg)
    assert asked == []


def test_a_hub_name_is_still_asked_of_the_hub(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    asked = _no_hub(monkeypatch)
    with pytest.raises(ConfigError, match=r"could not fetch model 'w/nope'.*though 'w' is a local folder"):
        load_policy(ModelConfig(family="dream", path="w/nope"))
    assert asked == ["w/nope"]  # once, by the probe (tests/test_hub.py: what follows each of its answers)


def test_a_directory_without_config_json_is_refused_before_its_tokenizer_loads(tmp_path, monkeypatch) -> None:
    from tracerl.models import load_tokenizer

    asked = _no_hub(monkeypatch)
    (tmp_path / "readme").mkdir()
    (tmp_path / "readme" / "README.md").write_text("a model card")
    cfg = ModelConfig(family="tiny", path=str(tmp_path / "readme"))
    message = rf"^model.path '{cfg.path}' is not a model directory: it has no config.json \(it holds \['README.md'\]\)"
    with pytest.raises(ConfigError, match=message):
        load_tokenizer(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"it has no config.json \(it is empty\)"):
        load_policy(ModelConfig(family="dream", path=str(tmp_path / "empty")))
    assert asked == []


def test_a_file_as_model_path_is_refused_before_anything_loads(tmp_path, monkeypatch) -> None:
    from tracerl.models import load_tokenizer

    asked = _no_hub(monkeypatch)
    config = tmp_path / "quickstart.yaml"
    config.write_text("model: {family: tiny}\n")
    for load in (load_tokenizer, load_policy):
        with pytest.raises(ConfigError, match=rf"^model.path '{config}' is a file, not a model directory"):
            load(ModelConfig(family="tiny", path=str(config)))
    assert asked == []


def test_a_model_directory_that_keeps_a_checkpoints_folder_is_still_a_model(tmp_path: Path) -> None:
    from tracerl.checkpoint import run_folder_advice
    from tracerl.models import load_tokenizer

    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=32))
    save_tiny(model, tok, tmp_path / "m")
    (tmp_path / "m" / "checkpoints").mkdir()  # a user's own folder beside the model's files
    assert len(load_tokenizer(ModelConfig(family="tiny", path=str(tmp_path / "m")))) == len(tok)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run that has not saved yet: nothing to point at
    text, target = run_folder_advice(tmp_path / "run")
    assert target is None and "no complete checkpoint yet" in text
    with pytest.raises(ConfigError, match=r"no complete checkpoint yet \(in '.*checkpoints'\)\.$"):
        load_tokenizer(ModelConfig(family="tiny", path=str(tmp_path / "run")))


@pytest.mark.parametrize(
    ("version", "refused"),
    [
        ("4.57.6", True),
        ("5.17.0", True),
        ("5.23.0", True),
        ("5.24.0", False),
        ("5.24.0rc1", False),
        ("5.25.0.dev0", False),
        ("5.26.1", False),
    ],
)
def test_a_transformers_below_the_floor_is_refused_naming_it_and_the_install(version: str, refused: bool) -> None:
    from tracerl.models.compat import TRANSFORMERS_REQUIREMENT, check_transformers

    if not refused:
        check_transformers(version)
        return
    with pytest.raises(ImportError) as err:
        check_transformers(version)
    assert f"this environment has transformers {version}" in str(err.value)
    assert f"pip install '{TRANSFORMERS_REQUIREMENT}'" in str(err.value)


def test_the_checked_transformers_range_is_the_one_pyproject_declares() -> None:
    import tomllib

    from tracerl.models.compat import FLOOR, TRANSFORMERS_REQUIREMENT

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = [d for d in project["dependencies"] if d.startswith("transformers")]
    assert declared == [TRANSFORMERS_REQUIREMENT]
    assert str(FLOOR) == "5.24"


_OLD_TRANSFORMERS = """
import sys
import transformers
transformers.__version__ = "5.17.0"  # the release a provisioned GPU image ships
from tracerl.cli import main
sys.exit(main(["train", sys.argv[1], "run_dir=" + sys.argv[2]]))
"""


def test_tracerl_train_with_a_transformers_below_the_floor_says_so_and_writes_nothing(tmp_path: Path) -> None:
    """pip keeps a supported transformers; ``pip install --no-deps`` into an image with its own does not."""
    import subprocess
    import sys

    config = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-c", _OLD_TRANSFORMERS, str(config), str(run_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("tracerl train: error: ImportError: tracerl needs transformers>=5.24")
    assert "this environment has transformers 5.17.0" in done.stderr and "Traceback" not in done.stderr
    assert not run_dir.exists()
