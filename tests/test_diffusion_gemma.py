"""The diffusion_gemma family: loading, the tiny configuration, and bad input refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tracerl.checks import load_config
from tracerl.config import CanvasSamplingConfig, ConfigError, ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.models import CanvasPolicy, char_tokenizer, load_policy
from tracerl.sampling import check_compatible, check_positions, generate

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, canvas_length=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    policy = load_policy(ModelConfig(family="diffusion_gemma", tiny=SMALL))
    path = tmp_path_factory.mktemp("dg")
    policy.model.save_pretrained(path)
    policy.tokenizer.save_pretrained(path)
    return path


def test_the_tiny_model_is_a_small_moe_without_the_default_vision_tower() -> None:
    policy = load_policy(ModelConfig(family="diffusion_gemma", tiny=SMALL))
    assert isinstance(policy, CanvasPolicy) and type(policy.model).__name__ == "DiffusionGemmaForBlockDiffusion"
    text = policy.model.config.text_config
    assert (text.num_experts, text.top_k_experts, text.num_hidden_layers) == (4, 2, 2)
    assert text.layer_types == ["sliding_attention", "full_attention"]
    vision = sum(p.numel() for p in policy.model.model.encoder.vision_tower.parameters())
    assert vision < 5_000  # the default Gemma 4 vision config alone is ~167M parameters
    frozen = {n for n, p in policy.model.named_parameters() if not p.requires_grad}
    assert frozen and all("vision" in n for n in frozen)  # the vision tower and its projector only
    assert policy.canvas_length == 8 and policy.eos_ids == (policy.tokenizer.eos_token_id,)


def test_a_saved_model_loads_back_with_the_same_weights(saved: Path) -> None:
    again = load_policy(ModelConfig(family="diffusion_gemma", path=str(saved)))
    first = load_policy(ModelConfig(family="diffusion_gemma", tiny=SMALL))
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((saved / "generation_config.json").read_text())["eos_token_id"] == again.eos_id


@pytest.mark.parametrize("family", ["tiny", "sdar", "llada", "dream", "masked_lm"])
def test_a_diffusion_gemma_checkpoint_named_as_another_family_names_its_own(saved: Path, family: str) -> None:
    with pytest.raises(ConfigError, match="set model.family=diffusion_gemma"):
        load_policy(ModelConfig(family=family, path=str(saved)))


@pytest.mark.parametrize(
    ("raw", "family"),
    [
        ({"model_type": "sdar", "architectures": ["SDARForCausalLM"], "block_size": 4}, "sdar"),
        ({"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 32, "n_layers": 1}, "llada"),
    ],
)
def test_another_familys_checkpoint_named_as_diffusion_gemma_names_it(tmp_path: Path, raw: dict, family: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"set model.family={family}"):
        load_policy(ModelConfig(family="diffusion_gemma", path=str(tmp_path)))


def test_a_vision_only_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gemma4_vision", "architectures": ["Gemma4VisionModel"]})
    )
    with pytest.raises(ConfigError, match="vision-only model .* model.family=diffusion_gemma loads"):
        load_policy(ModelConfig(family="diffusion_gemma", path=str(tmp_path)))


def test_a_plain_decoder_checkpoint_is_not_diffusion_gemma(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ConfigError, match="that is not a DiffusionGemma checkpoint"):
        load_policy(ModelConfig(family="diffusion_gemma", path=str(tmp_path)))


def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_refused(saved: Path, tmp_path: Path) -> None:
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    char_tokenizer("0123456789" * 3 + "abcdefghijklmnopqrstuvwxyz!$%&()[]{}<>").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="do not belong together"):
        load_policy(ModelConfig(family="diffusion_gemma", path=str(tmp_path)))


def test_image_tokens_in_a_prompt_are_refused_before_sampling() -> None:
    policy = load_policy(ModelConfig(family="diffusion_gemma", tiny=SMALL))
    policy.image_ids = (5,)  # the tiny vocabulary has no image tokens; pretend one of its ids is
    with pytest.raises(ConfigError, match="image tokens"):
        generate(policy, [[5, 6, 7]], SamplingConfig(max_new_tokens=8), seed=0)


def test_a_canvas_length_that_is_not_the_checkpoints_is_refused() -> None:
    policy = load_policy(ModelConfig(family="diffusion_gemma", tiny=SMALL))
    s = SamplingConfig(canvas=CanvasSamplingConfig(canvas_length=256))
    with pytest.raises(ConfigError, match=r"canvas_length=256 but the model's canvas_length is 8 .*model.tiny"):
        check_compatible(policy, s)
    with pytest.raises(ConfigError, match="canvas_length"):
        check_positions(policy, 10, s)
    check_compatible(policy, SamplingConfig(canvas=CanvasSamplingConfig(canvas_length=8)))


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("sampling.remasking=low_confidence_dynamic", "sampling.remasking"),
        ("sampling.block_size=8", "sampling.block_size"),
        ("sampling.steps_per_block=2", "sampling.steps_per_block"),
        ("sampling.top_p=0.9", "sampling.top_p"),
        ("eval.remasking=random", "eval.remasking"),
    ],
)
def test_absorbing_sampler_settings_are_refused_for_this_family(override: str, names: str) -> None:
    with pytest.raises(ConfigError, match=rf"{names}: model.family=diffusion_gemma is a renoising canvas model"):
        load_config(None, ["model.family=diffusion_gemma", override])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("objective.shrink=2", "objective.shrink=2"),
        ("objective.views=d1", "objective.views=d1"),
        ("objective.value_model=true", "no value model"),
        ("sampling.temperature=0.7", None),
    ],
)
def test_estimators_that_do_not_replay_a_renoising_trajectory_are_refused(override: str, match: str | None) -> None:
    if match is None:  # the sampler's own temperatures come from its schedule: checked against the policy
        cfg = load_config(None, ["model.family=diffusion_gemma", override, "model.tiny.canvas_length=8"])
        with pytest.raises(ConfigError, match="sampling.temperature=0.7"):
            check_compatible(load_policy(cfg.model), cfg.sampling)
        return
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.family=diffusion_gemma", override])


@pytest.mark.parametrize(
    ("canvas", "match"),
    [
        (dict(t_min=0.9, t_max=0.5), "t_min < t_max"),
        (dict(t_max=float("inf")), "t_min < t_max, both finite"),  # generate printed τ=inf and a canvas of noise
        (dict(entropy_bound=0.0), "entropy_bound"),
        (dict(max_denoising_steps=0), "max_denoising_steps"),
        (dict(stability_threshold=None), "both"),
    ],
)
def test_impossible_canvas_sampler_settings_name_the_setting(canvas: dict, match: str) -> None:
    policy = load_policy(ModelConfig(family="diffusion_gemma", tiny=SMALL))
    with pytest.raises(ConfigError, match=match):
        check_compatible(policy, SamplingConfig(canvas=CanvasSamplingConfig(**canvas)))


def test_canvas_settings_for_a_policy_that_unmasks_are_refused() -> None:
    """The reverse of the test above: sampling.canvas.* on a masked-diffusion model was silently ignored."""
    with pytest.raises(ConfigError, match=r"sampling.canvas.t_max is a setting of the renoising canvas sampler .*"
                       r"the tiny policy decodes by unmasking"):  # fmt: skip
        check_compatible(load_policy(ModelConfig()), SamplingConfig(canvas=CanvasSamplingConfig(t_max=0.9)))
    check_compatible(load_policy(ModelConfig()), SamplingConfig())  # the defaults are no setting


def test_a_random_tiny_model_needs_no_path_and_its_tokenizer_loads_without_weights() -> None:
    from tracerl.models import load_tokenizer

    cfg = load_config(None, ["model.family=diffusion_gemma"])
    assert cfg.model.path is None
    assert load_tokenizer(cfg.model).eos_token_id == load_policy(cfg.model).eos_id
