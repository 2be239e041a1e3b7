"""A name that is no local path is asked of the hub once, before the libraries' retried downloads (tracerl/hub.py):
a name the hub does not know, or a machine without network, is refused at once, naming the setting."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, errors

from tracerl import hub
from tracerl.config import ConfigError, DataConfig, ModelConfig, load
from tracerl.data import load_examples
from tracerl.models import load_policy, load_tokenizer


def _status(code: int, cls: type[Exception] = errors.RepositoryNotFoundError) -> Exception:
    """The hub's answer ``code`` as huggingface_hub raises it (its HTTP client's Response, with a request)."""
    client = importlib.import_module(errors.Response.__module__.split(".")[0])
    request = client.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(f"{code} from the hub", response=client.Response(code, request=request))


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, object]:
    """Online, as a user is (conftest sets the offline variables), with an empty cache, every probe recorded and
    answered with ``answer['error']`` (None: the hub knows the name), and the libraries' own downloads refused."""
    from transformers import AutoTokenizer, PretrainedConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    answer: dict[str, object] = {"error": ConnectionError("[Errno -2] Name or service not known"), "asked": []}

    def probe(kind: str):
        def info(self: HfApi, name: str, timeout: float | None = None, **kwargs: object) -> object:
            answer["asked"].append(f"{kind}:{name}")
            assert timeout is not None and timeout <= 10, "the probe must not wait for long"
            if answer["error"] is not None:
                raise answer["error"]
            return object()

        return info

    def download(name: str, *args: object, **kwargs: object) -> None:
        answer["asked"].append(f"download:{name}")
        raise OSError(f"no download of {name} in this test")

    monkeypatch.setattr(hub, "_FOUND", set())
    monkeypatch.setattr(HfApi, "model_info", probe("model"))
    monkeypatch.setattr(HfApi, "dataset_info", probe("dataset"))
    monkeypatch.setattr(PretrainedConfig, "get_config_dict", download)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", download)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", download)
    return answer


def test_no_network_refuses_a_hub_model_at_once_naming_the_nearby_folder(online, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    for load_ in (load_tokenizer, load_policy):
        online["asked"].clear()
        with pytest.raises(ConfigError, match=r"^could not fetch model 'w/nope' from the hub: the hub cannot be "
                           r"reached \(ConnectionError: .*Name or service not known\); and model.path is not a local "
                           r"directory either, though 'w' is a local folder"):  # fmt: skip
            load_(ModelConfig(family="dream", path="w/nope"))
        assert online["asked"] == ["model:w/nope"]  # one probe, no retried download


def test_a_name_the_hub_does_not_know_is_refused_and_a_known_one_is_downloaded(online) -> None:
    online["error"] = _status(404)
    with pytest.raises(ConfigError, match="the hub has no model of that name.*hf auth login"):
        load_policy(ModelConfig(family="dream", path="org/no-such-model"))
    assert online["asked"] == ["model:org/no-such-model"]
    for i, error in enumerate((None, _status(403, errors.GatedRepoError), _status(429, errors.HfHubHTTPError))):
        online["error"], online["asked"] = error, []
        with pytest.raises(ConfigError, match=r"the download failed \(OSError\)"):
            load_policy(ModelConfig(family="dream", path=f"org/model-{i}"))
        assert online["asked"] == [f"model:org/model-{i}", f"download:org/model-{i}"]


def test_a_name_the_hub_knows_is_asked_once_and_a_refused_one_again(online) -> None:
    online["error"] = None
    assert hub.hub_problem("org/model") is None and hub.hub_problem("org/model") is None  # config, tokenizer
    assert hub.hub_problem("org/model", "dataset") is None  # a dataset of the same name is another question
    assert online["asked"] == ["model:org/model", "dataset:org/model"]
    online["error"], online["asked"] = _status(404), []
    assert "the hub has no model" in hub.hub_problem("org/other")
    online["error"] = None
    assert hub.hub_problem("org/other") is None  # created since, or a login since: asked again
    assert online["asked"] == ["model:org/other", "model:org/other"]


def test_a_probe_that_fails_oddly_leaves_the_name_to_the_library(online) -> None:
    online["error"] = ValueError("an answer the client could not parse")
    assert hub.hub_problem("org/model") is None
    online["error"] = TimeoutError("timed out")
    assert hub.hub_problem("org/model") == "the hub cannot be reached (TimeoutError: timed out)"
    client = importlib.import_module(errors.Response.__module__.split(".")[0])
    online["error"] = client.ConnectTimeout("connect timed out")
    assert hub.hub_problem("org/model") == "the hub cannot be reached (ConnectTimeout: connect timed out)"


def test_a_cached_or_offline_name_is_left_to_the_library(online, monkeypatch) -> None:
    (Path(constants.HF_HUB_CACHE) / "models--org--model" / "snapshots").mkdir(parents=True)
    assert hub.hub_problem("org/model") is None and online["asked"] == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_problem("org/other") is None and online["asked"] == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.hub_problem("org/data", "dataset") is None and online["asked"] == []
    assert hub.hub_problem("org/other") is not None and online["asked"] == ["model:org/other"]


def test_a_dataset_in_datasets_own_cache_is_left_to_datasets(online, tmp_path, monkeypatch) -> None:
    """datasets keeps a hub dataset as org___snake_case_name; without network it loads it from there."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    (tmp_path / "ds-cache" / "DigitalLearningGmbH___math-lighteval").mkdir(parents=True)
    assert hub.hub_problem("DigitalLearningGmbH/MATH-lighteval", "dataset") is not None  # an empty folder: no data
    (tmp_path / "ds-cache" / "DigitalLearningGmbH___math-lighteval" / "default").mkdir()
    online["asked"].clear()
    assert hub.hub_problem("DigitalLearningGmbH/MATH-lighteval", "dataset") is None and online["asked"] == []
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub.hub_problem("org/other") is None and online["asked"] == []


def test_an_invalid_name_is_named_without_a_request(online) -> None:
    online["error"] = None
    assert "not a valid hub name" in hub.hub_problem("not a/name")
    assert online["asked"] == []


@pytest.mark.parametrize("key", ["data.source", "eval.source"])
def test_a_hub_dataset_is_probed_once(online, key) -> None:
    with pytest.raises(ConfigError, match=rf"^could not fetch dataset 'org/nope' \({key}\) from the hub: the hub "
                       "cannot be reached"):  # fmt: skip
        load_examples(DataConfig(source="org/nope"), 0, key=key)
    assert online["asked"] == ["dataset:org/nope"]
    online["error"], online["asked"] = _status(404), []
    with pytest.raises(ConfigError, match="the hub has no dataset of that name"):
        load_examples(DataConfig(source="org/nope"), 0, key=key)
    online["error"], online["asked"] = None, []
    with pytest.raises(ConfigError, match=rf"could not load {key} 'org/nope'"):
        load_examples(DataConfig(source="org/nope"), 0, key=key)
    assert online["asked"] == ["dataset:org/nope", "download:org/nope"]


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("w/x", r"^could not fetch model 'w/x' from the hub: the hub cannot be reached.*reward_model.base is not"),
        ("./nope", r"^reward_model.base './nope' does not exist \(a local path, by its start\)"),
    ],
)
def test_reward_model_base_gets_the_model_path_checks(online, tmp_path, monkeypatch, base, message) -> None:
    from tracerl.reward_models.train import build_classifier

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        build_classifier(load(overrides=[f"reward_model.base={base}"]))
    assert online["asked"] == ([f"model:{base}"] if base == "w/x" else [])


def test_a_reward_model_by_hub_name_is_probed(online) -> None:
    from tracerl.config import RewardModelConfig
    from tracerl.reward_models.classifier import SequenceClassifierReward
    from tracerl.reward_service import RewardError

    online["error"] = _status(404)
    with pytest.raises(RewardError, match=r"reward model 'rm' \(org/no-rm\).*the hub has no model of that name"):
        SequenceClassifierReward("org/no-rm", RewardModelConfig(), "rm")
    assert online["asked"] == ["model:org/no-rm"]
