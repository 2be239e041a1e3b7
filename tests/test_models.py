"""Model families load natively from checkpoints laid out like the real ones, and bad models fail clearly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tracerl.config import ConfigError, ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.models import LLADA_KEY_MAPPING, build_tiny, char_tokenizer, load_policy, save_tiny
from tracerl.models.base import additive_mask
from tracerl.sampling import generate

TOK = char_tokenizer("0123456789+=abc ")
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _inverse_llada(name: str) -> str:
    """Native Llama parameter name → LLaDA's OLMo-style name (the inverse of tracerl's mapping)."""
    inverse = {
        r"^model\.embed_tokens\.": "model.transformer.wte.",
        r"^model\.norm\.": "model.transformer.ln_f.",
        r"^lm_head\.": "model.transformer.ff_out.",
        r"^model\.layers\.(\d+)\.input_layernorm\.": r"model.transformer.blocks.\1.attn_norm.",
        r"^model\.layers\.(\d+)\.post_attention_layernorm\.": r"model.transformer.blocks.\1.ff_norm.",
        r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.": r"model.transformer.blocks.\1.\2_proj.",
        r"^model\.layers\.(\d+)\.self_attn\.o_proj\.": r"model.transformer.blocks.\1.attn_out.",
        r"^model\.layers\.(\d+)\.mlp\.gate_proj\.": r"model.transformer.blocks.\1.ff_proj.",
        r"^model\.layers\.(\d+)\.mlp\.up_proj\.": r"model.transformer.blocks.\1.up_proj.",
        r"^model\.layers\.(\d+)\.mlp\.down_proj\.": r"model.transformer.blocks.\1.ff_out.",
    }
    for pattern, repl in inverse.items():
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise AssertionError(f"unmapped parameter {name}")


def _bidirectional_logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    n = ids.shape[1]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.zeros(1, 1, n, n)).logits[0]


def assert_skeleton_matches(cfg: ModelConfig, policy) -> None:  # noqa: ANN001
    """``load_policy(cfg, weights=False)`` (what the driver checks sampler settings against) describes the policy
    ``load_policy(cfg)`` loads, without reading its weights (its parameters live on the meta device)."""
    from tracerl.sampling.graphs import graph_capturable

    skel = load_policy(cfg, weights=False)
    assert all(p.device.type == "meta" for p in skel.model.parameters())
    for key in ("family", "block_size", "shift", "mask_id", "vocab_size", "eos_id", "supports_cache"):
        assert getattr(skel, key) == getattr(policy, key), key
    limit = getattr(policy.model.config, "max_position_embeddings", None)
    assert getattr(skel.model.config, "max_position_embeddings", None) == limit
    assert graph_capturable(skel.model) == graph_capturable(policy.model)


def _ids() -> torch.Tensor:
    return torch.tensor([TOK("12+3=")["input_ids"] + [TOK.mask_token_id] * 3])


def test_llada_checkpoint_loads_into_llama_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=len(TOK), tie_word_embeddings=False, **SHAPE)).eval()
    state = {_inverse_llada(k): v.contiguous() for k, v in ref.state_dict().items()}
    assert set(LLADA_KEY_MAPPING)  # the loader's mapping is what turns these names back
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llada",
                "architectures": ["LLaDAModelLM"],
                "d_model": 32,
                "n_heads": 4,
                "n_kv_heads": 2,
                "n_layers": 2,
                "mlp_hidden_size": 64,
                "vocab_size": len(TOK),
                "embedding_size": len(TOK),
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-6,
                "max_sequence_length": 256,
                "include_bias": False,
                "weight_tying": False,
                "mask_token_id": TOK.mask_token_id,
                "eos_token_id": TOK.eos_token_id,
            }
        )
    )
    TOK.save_pretrained(tmp_path)
    policy = load_policy(ModelConfig(family="llada", path=str(tmp_path)))
    assert_skeleton_matches(ModelConfig(family="llada", path=str(tmp_path)), policy)
    assert (policy.family, policy.block_size, policy.shift, policy.mask_id) == ("llada", None, False, 2)
    ids = _ids()
    n = ids.shape[1]
    positions = torch.arange(n).unsqueeze(0)
    with torch.no_grad():
        got = policy.logits_at(ids, positions, torch.ones(1, n, n, dtype=torch.bool), positions)[0]
    assert torch.equal(got, _bidirectional_logits(ref, ids))  # max |diff| = 0


def test_dream_loads_into_qwen2_with_shifted_logits(tmp_path):
    torch.manual_seed(1)
    ref = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), tie_word_embeddings=False, **SHAPE)).eval()
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=TOK.mask_token_id)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    TOK.save_pretrained(tmp_path)
    policy = load_policy(ModelConfig(family="dream", path=str(tmp_path)))
    assert_skeleton_matches(ModelConfig(family="dream", path=str(tmp_path)), policy)
    assert policy.shift and policy.family == "dream"
    ids = _ids()
    n = ids.shape[1]
    pos = torch.arange(n).unsqueeze(0)
    with torch.no_grad():
        got = policy.logits_at(ids, pos, torch.ones(1, n, n, dtype=torch.bool), torch.tensor([[5, 6, 7]]))[0]
    full = _bidirectional_logits(ref, ids)
    torch.testing.assert_close(got, full[4:7], atol=1e-6, rtol=0)  # logits for position i come from i-1


def test_sdar_loads_into_qwen3_and_samples_with_its_block_size(tmp_path):
    torch.manual_seed(2)
    ref = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(TOK), head_dim=8, tie_word_embeddings=False, **SHAPE))
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=2)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    TOK.save_pretrained(tmp_path)  # the mask token comes from the tokenizer here
    policy = load_policy(ModelConfig(family="sdar", path=str(tmp_path)))
    assert_skeleton_matches(ModelConfig(family="sdar", path=str(tmp_path)), policy)
    assert policy.block_size == 2 and policy.mask_id == TOK.mask_token_id
    r = generate(policy, [TOK("1+1=")["input_ids"]], SamplingConfig(max_new_tokens=4, block_size=2))
    assert r.layout == "block" and (r.step_map[0] >= 0).any()


def test_masked_lm_family_generates(tmp_path):
    torch.manual_seed(3)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(TOK),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    policy = load_policy(ModelConfig(family="masked_lm", path=str(tmp_path)))
    assert_skeleton_matches(ModelConfig(family="masked_lm", path=str(tmp_path)), policy)
    assert not policy.supports_cache and policy.mask_id == TOK.mask_token_id
    r = generate(policy, [TOK("1+1=")["input_ids"], TOK("2=")["input_ids"]], SamplingConfig(max_new_tokens=4))
    assert r.layout == "full" and r.response_ids.shape == (2, 4)
    with pytest.raises(ConfigError, match="no key/value cache"):
        generate(policy, [[5]], SamplingConfig(cache="prefix"))


@pytest.mark.parametrize("attention", ["full", "block"])
def test_tiny_model_round_trips_through_save_pretrained(tmp_path, attention):
    model, tok = build_tiny(TinyModelConfig(attention=attention, hidden_size=32, intermediate_size=32))
    save_tiny(model, tok, tmp_path)
    policy = load_policy(ModelConfig(family="tiny", path=str(tmp_path)))
    assert_skeleton_matches(ModelConfig(family="tiny", path=str(tmp_path)), policy)
    assert policy.block_size == (4 if attention == "block" else None)
    assert policy.mask_id == tok.mask_token_id
    for a, b in zip(model.state_dict().values(), policy.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_logits_at_computes_only_requested_positions(full_policy):
    ids = torch.randint(5, 20, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    vis = torch.ones(2, 9, 9, dtype=torch.bool)
    calls = []
    handle = full_policy.model.lm_head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        with torch.no_grad():
            out = full_policy.logits_at(ids, pos, vis, torch.tensor([[1, 2], [3, 4]]))
            first = torch.zeros(2, 9, dtype=torch.bool)
            first[:, 0] = True
            sel = full_policy.logits_at(ids, pos, vis, first)
    finally:
        handle.remove()
    assert out.shape == (2, 2, full_policy.vocab_size) and sel.shape == (2, full_policy.vocab_size)
    assert calls[0][:-1] == (2, 2) and calls[1][:-1] == (2,)  # the LM head saw only the requested rows


def test_additive_mask_blocks_invisible_keys():
    vis = torch.tensor([[[True, False], [True, True]]])
    m = additive_mask(vis, torch.float32)
    assert m.shape == (1, 1, 2, 2) and m[0, 0, 0, 0] == 0 and m[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"model.path '.*nowhere' does not exist"):
        load_policy(ModelConfig(family="llada", path=str(tmp_path / "nowhere")))


def test_directory_without_config_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        load_policy(ModelConfig(family="dream", path=str(tmp_path)))


def test_model_without_mask_token_is_clear(tmp_path):
    torch.manual_seed(4)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), **SHAPE)).save_pretrained(tmp_path)
    tok = char_tokenizer("0123456789+=abc ")
    tok.mask_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has no usable mask token.*model.mask_token_id"):
        load_policy(ModelConfig(family="dream", path=str(tmp_path)))
    # the override fixes it
    policy = load_policy(ModelConfig(family="dream", path=str(tmp_path), mask_token_id=3))
    assert policy.mask_id == 3


def test_mask_token_outside_vocab_is_clear(tmp_path):
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), **SHAPE)).save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        load_policy(ModelConfig(family="dream", path=str(tmp_path), mask_token_id=10_000))
