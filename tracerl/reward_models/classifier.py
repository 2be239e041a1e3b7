"""A sequence-classification reward model as a reward function (DESIGN §19): the kind TRL's ``RewardTrainer``
trains and autoregressive RLHF scores with, here scoring a diffusion policy's final outputs.

The text of a sample is built with the model's **own** tokenizer: its chat template with the prompt as the user
turn and the completion as the assistant turn, or, for a tokenizer without one, ``prompt + separator +
completion + EOS`` (TRL's plain-text rule with ``separator=""``). The score is the logit at ``label_index``.
Inputs longer than ``max_length`` are cut (and counted: ``reward/truncated/<name>``), sorted by length and packed
into forwards of at most ``batch_tokens`` padded tokens; the model runs in eval mode under ``inference_mode``, in
bfloat16 on a GPU and float32 on CPU.

Constructing one reads only the config and the tokenizer, and checks them (a classification head, a pad token,
the label index); ``load()`` reads the weights, where the scoring runs (a reward-model actor).

dims: N samples · B inputs in one forward · T padded length · C labels
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from tracerl import hub
from tracerl.config import RewardModelConfig
from tracerl.reward_resolve import RewardError


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of the inputs in forwards of at most ``budget`` padded tokens (count × longest), longest first.

    Example:
        >>> token_budget_batches([3, 9, 4, 8, 2], budget=18)
        [[1, 3], [2, 0, 4]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def truncate(ids: list[list[int]], max_length: int, side: str) -> tuple[list[list[int]], int]:
    """Every input cut to ``max_length`` tokens (``left``: keep the end, ``right``: keep the start), and how many
    were cut.

    Example:
        >>> truncate([[1, 2, 3, 4], [5, 6]], 3, "left"), truncate([[1, 2, 3, 4]], 3, "right")
        (([[2, 3, 4], [5, 6]], 1), ([[1, 2, 3]], 1))
    """
    cut = sum(len(x) > max_length for x in ids)
    if side == "left":
        return [x[-max_length:] for x in ids], cut
    return [x[:max_length] for x in ids], cut


def _text(x: Any) -> str:
    if isinstance(x, list):  # chat messages: their contents in order
        return "".join(str(m.get("content", "")) for m in x)
    return str(x)


def _messages(x: Any, role: str) -> list[dict[str, Any]]:
    return list(x) if isinstance(x, list) else [{"role": role, "content": str(x)}]


class SequenceClassifierReward:
    """Scores ``(prompt, completion)`` pairs with a sequence-classification model; a reward function (TRL contract).

    Args:
        source: a model directory or hub id.
        options: ``RewardModelConfig`` (label index, max length, template, batch budget, dtype, pad token).
        name: the reward's name in metrics and errors.
    Raises:
        RewardError: the config or tokenizer cannot be read, the model has no classification head, the label index
            is out of range, the tokenizer has no pad token: each naming the entry and the fix.
    """

    def __init__(
        self,
        source: str,
        options: RewardModelConfig,
        name: str = "reward_model",
        *,
        model: torch.nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.source, self.options, self.__name__ = source, options, name
        self.model = model  # None until load()
        self.device = next(model.parameters()).device if model is not None else None
        if model is not None:  # what it is, not what the checkpoint it came from was
            model.config.architectures = [type(model).__name__]
        config = model.config if model is not None else self._read(AutoConfig, "config")
        self._config = config
        self._check_head(config)
        self.label_index = self._label_index(config)
        self.tokenizer = tokenizer if tokenizer is not None else self._read(AutoTokenizer, "tokenizer")
        self._check_pad()
        self.template = self._template()
        if model is not None:
            model.config.pad_token_id = self.tokenizer.pad_token_id

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, options: RewardModelConfig, name: str
    ) -> SequenceClassifierReward:
        """A reward over a model already in memory (the GPU check builds one of random weights)."""
        return cls(getattr(model.config, "_name_or_path", "") or name, options, name, model=model, tokenizer=tokenizer)

    # -- checks (no weights) ---------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"reward model '{self.__name__}' ({self.source})"

    def _read(self, auto: Any, what: str) -> Any:
        local = os.path.expanduser(self.source)
        if (local.startswith(("/", ".")) or local.count("/") >= 2) and not os.path.isdir(local):
            raise RewardError(
                f"{self._where()}: the directory {os.path.abspath(local)} does not exist. Train one with tracerl "
                "train-reward-model (or TRL's RewardTrainer), or give an existing directory or a hub id 'org/name'."
            )
        problem = None if os.path.isdir(local) else hub.hub_problem(self.source)
        if problem is not None:
            raise RewardError(
                f"{self._where()}: it is no local directory and cannot be fetched from the hub: {problem}. Give a "
                "reward model directory (tracerl train-reward-model writes one) or a hub id 'org/name'."
            )
        try:
            return auto.from_pretrained(self.source, trust_remote_code=self.options.trust_remote_code)
        except (OSError, ValueError) as err:
            offline = " HF_HUB_OFFLINE is set, so a hub id must be in the local cache." if hub.offline() else ""
            raise RewardError(
                f"{self._where()}: cannot read its {what}: {' '.join(str(err).split())[:300]}. Give a model "
                f"directory (config.json, tokenizer and weights, as save_pretrained writes) or a hub id 'org/name'."
                f"{offline}"
            ) from None

    def _check_head(self, config: Any) -> None:
        heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
        if getattr(config, "architectures", None) and not heads:
            raise RewardError(
                f"{self._where()} is a {config.architectures[0]}, which has no sequence-classification head: "
                "AutoModelForSequenceClassification would add an untrained one and score noise. Give a reward model "
                "(one trained with tracerl train-reward-model or TRL's RewardTrainer), or serve a generative model "
                "behind an OpenAI-compatible endpoint and use it as a judge (kind: judge)."
            )
        known = config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        if not known and not self.options.trust_remote_code:
            raise RewardError(
                f"{self._where()}: transformers has no sequence-classification class for model type "
                f"'{config.model_type}'. Set model.trust_remote_code=true if the checkpoint ships its own code."
            )

    def _label_index(self, config: Any) -> int:
        labels = int(getattr(config, "num_labels", 1))
        index = self.options.label_index
        if index is None:
            if labels != 1:
                raise RewardError(
                    f"{self._where()} has {labels} labels ({getattr(config, 'id2label', {})}): say which logit is the "
                    f"score with model.label_index (0..{labels - 1}) in the reward entry."
                )
            return 0
        if not 0 <= index < labels:
            raise RewardError(
                f"{self._where()}: model.label_index={index} is out of range; the model has {labels} label(s), so "
                f"choose from 0..{labels - 1}."
            )
        return index

    def _check_pad(self) -> None:
        tok, pad = self.tokenizer, self.options.pad_token
        if tok.pad_token is not None and pad is None:
            return
        if pad is None:
            eos = f" (its EOS token is {tok.eos_token!r})" if tok.eos_token else ""
            raise RewardError(
                f"{self._where()}: its tokenizer has no pad token, so inputs of different lengths cannot be batched "
                f"and the score position cannot be found. Set model.pad_token in the reward entry{eos}, the "
                "token it was trained with (TRL's RewardTrainer pads with the EOS token when there is no pad token)."
            )
        if pad not in tok.get_vocab():
            raise RewardError(f"{self._where()}: model.pad_token={pad!r} is not in its tokenizer's vocabulary.")
        tok.pad_token = pad

    def _template(self) -> str:
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if self.options.template == "chat" and not has:
            raise RewardError(
                f"{self._where()}: model.template=chat, but its tokenizer has no chat template; use template=plain "
                "(prompt + separator + completion + EOS) or auto."
            )
        return "chat" if self.options.template == "chat" or self.options.template == "auto" and has else "plain"

    def describe(self) -> str:
        """What was checked, for ``tracerl validate``."""
        labels = int(getattr(self.model.config if self.model is not None else self._config, "num_labels", 1))
        weights = "weights loaded" if self.model is not None else "weights not loaded"
        return (
            f"sequence classifier {self.source}, logit {self.label_index} of {labels}, {self.template} template, "
            f"max_length {self.options.max_length}, {weights}"
        )

    # -- scoring ----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the weights (once): bfloat16 on a GPU, float32 on CPU (``model.dtype``), eval mode, no gradients.

        Raises:
            RewardError: weights of the model (its head above all) are missing from the checkpoint.
        """
        if self.model is not None:
            return
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.options.dtype if self.options.dtype != "auto" else (
            "bfloat16" if self.device.type == "cuda" else "float32"
        )  # fmt: skip
        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.source,
            dtype=getattr(torch, dtype),
            trust_remote_code=self.options.trust_remote_code,
            output_loading_info=True,
        )
        if info.get("missing_keys"):
            raise RewardError(
                f"{self._where()}: its checkpoint lacks the weights {sorted(info['missing_keys'])[:6]}, so they would "
                "be random (a model saved without its classification head). Give a trained reward model directory."
            )
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval().requires_grad_(False)

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """Token ids of one sample, as the model was trained to read it (chat template, or plain text + EOS)."""
        tok = self.tokenizer
        if self.template == "chat":
            messages = _messages(prompt, "user") + _messages(completion, "assistant")
            return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        text = _text(prompt) + self.options.separator + _text(completion) + (tok.eos_token or "")
        return list(tok(text)["input_ids"])

    def score_ids(self, ids: list[list[int]]) -> list[float]:
        """The score of every input [N], computed in forwards of at most ``batch_tokens`` padded tokens."""
        self.load()
        pad = self.tokenizer.pad_token_id
        out = [0.0] * len(ids)
        for batch in token_budget_batches([len(x) for x in ids], self.options.batch_tokens):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T), right-padded
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores = logits[:, self.label_index].float().cpu().tolist()  # (B, C) → (B,)
            for row, i in enumerate(batch):
                out[i] = scores[row]
        return out

    def __call__(self, prompts: list, completions: list, log_metric: Any = None, **kwargs: Any) -> list[float]:
        """One score per sample; inputs cut to ``max_length`` are counted with ``log_metric("truncated", n)``."""
        del kwargs  # dataset columns: a reward model reads only the prompt and the completion
        ids = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        ids, cut = truncate(ids, self.options.max_length, self.options.truncation_side)
        if log_metric is not None:
            log_metric("truncated", cut)
        return self.score_ids(ids)
