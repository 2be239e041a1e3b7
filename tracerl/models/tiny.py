"""The built-in tiny model and its char-level tokenizer, for CPU runs and tests.

The tiny model is a real transformers model (``LlamaForCausalLM`` for full attention, ``Qwen3ForCausalLM`` for
block diffusion), so it saves and loads with ``save_pretrained``/``from_pretrained`` like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from tracerl.config import TinyModelConfig

SPECIAL_TOKENS = ["<pad>", "<eos>", "<mask>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A char-level tokenizer with pad, EOS, mask and unk tokens and a chat template.

    Example:
        >>> tok = char_tokenizer("ab ")
        >>> tok("ab a")["input_ids"], tok.decode(tok("ab a")["input_ids"])
        ([6, 7, 5, 6], 'ab a')
    """
    chars = sorted(set(alphabet) | {"\n", " "})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        mask_token="<mask>",
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny(cfg: TinyModelConfig, seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A randomly initialised tiny diffusion LM and its tokenizer."""
    tok = char_tokenizer(cfg.alphabet)
    common = dict(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # tracerl metadata, kept in config.json by save_pretrained
        mask_token_id=tok.mask_token_id,
        tracerl_family="tiny",
        tracerl_block_size=cfg.block_size if cfg.attention == "block" else None,
    )
    torch.manual_seed(seed)
    if cfg.attention == "block":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=cfg.hidden_size // cfg.num_heads, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.eval(), tok


def save_tiny(model: torch.nn.Module, tok: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write a tiny model and tokenizer as a Hugging Face directory."""
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
