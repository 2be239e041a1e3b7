"""Bad inputs on the command line: each exits with code 2, prints one paragraph and no traceback, names the setting
or file at fault, and writes nothing.

``{d}`` in an argument is the folder of prepared bad files (see ``files``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from transformers import BertConfig, BertForMaskedLM, Qwen2Config, Qwen2ForCausalLM

from tracerl import runs
from tracerl.checkpoint import seal
from tracerl.cli import main
from tracerl.config import TinyModelConfig, load
from tracerl.models import build_tiny, char_tokenizer, save_tiny

TOK = char_tokenizer("0123456789+=abc ")
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

CASES = [
    # config files and overrides
    ("missing yaml", ["validate", "{d}/nope.yaml"], "config file '{d}/nope.yaml' does not exist"),
    ("yaml that is a list", ["validate", "{d}/list.yaml"], "config file '{d}/list.yaml' holds a list"),
    ("yaml that is a string", ["validate", "{d}/string.yaml"], "config file '{d}/string.yaml' holds a string"),
    ("config file is a directory", ["validate", "{d}/empty"], "config file '{d}/empty' is a directory"),
    ("yaml syntax error", ["validate", "{d}/broken.yaml"], "config file '{d}/broken.yaml' is not valid YAML"),
    ("unknown key", ["validate", "sampling.foo=1"], "sampling.foo"),
    ("unknown section", ["validate", "foo.bar=1"], "'foo"),
    ("override without =", ["validate", "sampling.top_k=1", "topk"], "override 'topk'"),
    ("wrong type", ["validate", "sampling.max_new_tokens=abc"], "sampling.max_new_tokens"),
    ("literal choice", ["validate", "sampling.cache=fast"], "'sampling.cache'"),
    ("max_new_tokens=0", ["validate", "sampling.max_new_tokens=0"], "sampling.max_new_tokens"),
    ("block_size=0", ["validate", "sampling.block_size=0"], "sampling.block_size"),
    ("steps not divisible", ["validate", "sampling.steps=3"], "sampling.steps=3"),
    ("steps and steps_per_block", ["validate", "sampling.steps=32", "sampling.steps_per_block=2"], "sampling.steps"),
    ("negative temperature", ["validate", "sampling.temperature=-1"], "sampling.temperature"),
    ("top_p=0", ["validate", "sampling.top_p=0"], "sampling.top_p"),
    ("unknown remasking", ["validate", "sampling.remasking=nope"], "unknown sampling.remasking 'nope'"),
    ("sampling.batch_size=0", ["validate", "sampling.batch_size=0"], "sampling.batch_size"),
    ("unknown family", ["validate", "model.family=gpt"], "unknown model.family 'gpt'"),
    ("family without path", ["validate", "model.family=llada"], "model.path"),
    ("unknown views", ["validate", "objective.views=nope"], "objective.views"),
    ("unknown advantage", ["validate", "objective.advantage=nope"], "objective.advantage"),
    ("shrink=0", ["validate", "objective.shrink=0"], "objective.shrink"),
    ("zero_stage=5", ["validate", "learner.zero_stage=5"], "learner.zero_stage"),
    ("minibatches=0", ["validate", "learner.minibatches=0"], "minibatches"),
    ("reward weight nan", ["validate", "reward.functions=[{fn: synthetic_exact, weight: .nan}]"], "has weight nan"),
    ("every weight 0", ["validate", "reward.functions=[{fn: synthetic_exact, weight: 0}]"], "every reward weight is 0"),
    ("no reward function", ["validate", "reward.functions=[]"], "reward.functions is empty"),
    ("temperature nan", ["validate", "sampling.temperature=.nan"], "sampling.temperature must be a finite number"),
    ("threshold above 1", ["validate", "sampling.threshold=1.5"], "sampling.threshold (the confidence"),
    ("entropy budget negative", ["validate", "sampling.eb_threshold=-1"], "eb_threshold=-1.0"),
    ("sampling.steps=0", ["validate", "sampling.steps=0"], "sampling.steps=0: the total number of denoising steps"),
    ("greedy rollouts", ["validate", "sampling.temperature=0"], "sampling.temperature=0 with sampling.remasking="),
    ("greedy rollouts in train", ["train", "sampling.temperature=0", "run_dir={d}/greedy"], "each group of rollout"),
    ("eval temperature", ["validate", "eval.temperature=-1"], "eval.temperature must be a finite number ≥ 0"),
    ("log-prob chunk", ["validate", "learner.logprob_chunk_tokens=0"], "learner.logprob_chunk_tokens must be ≥ 1"),
    ("negative warmup", ["validate", "learner.warmup_steps=-5"], "learner.warmup_steps must be ≥ 0, got -5"),
    ("negative pad", ["validate", "sampling.trainable_pad_tokens=-1"], "sampling.trainable_pad_tokens must be ≥ 0"),
    ("negative clip", ["validate", "learner.max_grad_norm=-1"], "learner.max_grad_norm is the global gradient norm"),
    ("eval pass_threshold nan", ["validate", "eval.pass_threshold=.nan"], "eval.pass_threshold a finite reward"),
    ("eval max_new_tokens", ["validate", "eval.max_new_tokens=0"], "eval.max_new_tokens must be a positive"),
    ("eval steps_per_block", ["validate", "eval.steps_per_block=0"], "eval.steps_per_block must be between 1 and"),
    ("eval remasking", ["validate", "eval.remasking=foo"], "unknown eval.remasking 'foo'"),
    ("sft mask_eps", ["validate", "sft.mask_eps=2"], "sft.mask_eps must be in (0, 1)"),
    (
        "more minibatches than samples",
        ["validate", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "learner.minibatches=5"],
        "learner.minibatches=5 splits each RL step's 4 samples",
    ),
    ("samples_per_prompt=0", ["validate", "rollout.samples_per_prompt=0"], "rollout.samples_per_prompt"),
    ("samples_per_prompt=1", ["validate", "rollout.samples_per_prompt=1"], "rollout.samples_per_prompt=1 with"),
    ("learner.lr=0", ["validate", "learner.lr=0"], "learner.lr must be a positive number"),
    (
        "lora targets that match nothing",
        ["validate", "learner.lora.enabled=true", "learner.lora.target_modules=[nope_proj]"],
        "learner.lora.target_modules=['nope_proj'] match no module of the tiny model",
    ),
    ("sft.steps=0", ["validate", "sft.steps=0"], "sft.steps"),
    ("sft.batch_size=0", ["validate", "sft.batch_size=0"], "sft.batch_size"),
    ("reward.timeout_s=0", ["validate", "reward.timeout_s=0"], "reward.timeout_s"),
    ("reward.num_workers=0", ["validate", "reward.num_workers=0"], "reward.num_workers"),
    ("max_prompt_tokens=0", ["validate", "data.max_prompt_tokens=0"], "data.max_prompt_tokens"),
    ("keep_last=0", ["validate", "checkpoint.keep_last=0"], "checkpoint.keep_last"),
    ("on_error choice", ["validate", "reward.on_error=ignore"], "'reward.on_error'"),
    ("min_isolation choice", ["validate", "reward.sandbox.min_isolation=weak"], "'reward.sandbox.min_isolation'"),
    ("sandbox path missing", ["validate", "reward.sandbox.paths=[{d}/nowhere]"], "sandbox path '{d}/nowhere'"),
    # model directories
    ("model path missing", ["validate", "model.family=dream", "model.path={d}/nope"], "model.path '{d}/nope'"),
    ("no config.json", ["validate", "model.family=dream", "model.path={d}/empty"], "has no config.json"),
    ("model.path is a file", ["validate", "model.path={d}/data.txt"], "model.path '{d}/data.txt' is a file, not a"),
    ("model card only", ["train", "model.path={d}/card", "run_dir={d}/run4"], "model.path '{d}/card' is not a model"),
    ("config.json not json", ["validate", "model.family=dream", "model.path={d}/badjson"], "config.json (model.path)"),
    ("no weights", ["validate", "model.family=dream", "model.path={d}/noweights"], "model.path '{d}/noweights'"),
    ("truncated weights", ["validate", "model.family=dream", "model.path={d}/truncated"], "model.path '{d}/truncated'"),
    ("dream as sdar", ["validate", "model.family=sdar", "model.path={d}/dream"], "set model.family=dream"),
    ("dream as masked_lm", ["validate", "model.family=masked_lm", "model.path={d}/dream"], "set model.family=dream"),
    ("decoder as masked_lm", ["validate", "model.family=masked_lm", "model.path={d}/qwen2"], "model.family"),
    ("tokenizer/vocab", ["validate", "model.family=masked_lm", "model.path={d}/bert64"], "model.path '{d}/bert64'"),
    ("hub name offline", ["validate", "model.family=sdar", "model.path=no-org/no-model"], "HF_HUB_OFFLINE=1"),
    ("NaN weight", ["validate", "model.path={d}/tinynan"], "model.path '{d}/tinynan' holds weights that are not"),
    ("sft from a NaN weight", ["sft", "model.path={d}/tinynan", "run_dir={d}/run_nan"], "['model.norm.weight']"),
    (
        "block size differs",
        ["validate", "model.family=tiny", "model.path={d}/tinyblock", "sampling.block_size=8"],
        "sampling.block_size=8",
    ),
    # data
    ("data missing", ["validate", "data.source={d}/nope.jsonl"], "data.source '{d}/nope.jsonl'"),
    ("eval source missing", ["validate", "eval.source={d}/nope2.jsonl"], "eval.source '{d}/nope2.jsonl' does not"),
    ("empty data file", ["validate", "data.source={d}/void.jsonl"], "data.source '{d}/void.jsonl' is an empty file"),
    (
        "sft response null",
        ["sft", "data.source={d}/noresponse.jsonl", "sft.steps=1", "eval.num_prompts=0", "run_dir={d}/run5"],
        "row 1 (counting from 0) of data.source '{d}/noresponse.jsonl' has no response",
    ),
    ("malformed jsonl", ["validate", "data.source={d}/bad.jsonl"], "line 2 is not valid JSON"),
    (
        "jsonl that is not UTF-8",
        ["validate", "data.source={d}/latin1.jsonl", "eval.num_prompts=1"],
        "data.source '{d}/latin1.jsonl' line 11 is not UTF-8 text (byte 0xe9 at column 16); re-save it as UTF-8",
    ),
    (
        "json that is not UTF-8",
        ["validate", "data.source={d}/latin1.json", "eval.num_prompts=1"],
        "data.source '{d}/latin1.json' line 3 is not UTF-8 text (byte 0xff at column 14); re-save it as UTF-8",
    ),
    (
        "csv that is not UTF-8",
        ["validate", "data.source={d}/latin1.csv", "eval.num_prompts=1"],
        "data.source '{d}/latin1.csv' line 12 is not UTF-8 text (byte 0xff at column 1); re-save it as UTF-8",
    ),
    (
        "eval source that is not UTF-8",
        ["validate", "eval.source={d}/latin1.jsonl"],
        "eval.source '{d}/latin1.jsonl' line 11 is not UTF-8 text (byte 0xe9 at column 16)",
    ),
    (
        "sft data that is not UTF-8",
        ["sft", "data.source={d}/latin1.jsonl", "eval.num_prompts=1", "sft.eval_every=0", "run_dir={d}/run10"],
        "data.source '{d}/latin1.jsonl' line 11 is not UTF-8 text",
    ),
    (
        "answer column is the prompt column",
        ["validate", "data.answer_column=prompt"],
        "data.answer_column='prompt' names the column that data.prompt_column='prompt' takes as the prompt",
    ),
    ("unsupported data file", ["validate", "data.source={d}/data.txt"], "unsupported file type '.txt'"),
    ("missing column", ["validate", "data.source={d}/noprompt.jsonl"], "data.prompt_column"),
    ("unknown synthetic task", ["validate", "data.source=synthetic:nope"], "synthetic task 'nope'"),
    ("every prompt too long", ["validate", "data.max_prompt_tokens=1"], "data.max_prompt_tokens"),
    ("prompt + response > positions", ["validate", "model.tiny.max_position_embeddings=32"], "max_position_embeddings"),
    # rewards
    ("unknown reward", ["validate", "{d}/reward_unknown.yaml"], "unknown reward 'nope'"),
    (
        "unknown reward in a later entry",
        ["validate", "reward.functions=[{fn: synthetic_exact}, {fn: nope, weight: 0}]"],
        "reward.functions[1]: unknown reward 'nope'; choose from",
    ),
    ("reward file missing", ["validate", "{d}/reward_file.yaml"], "reward file '{d}/missing.py'"),
    ("reward module missing", ["validate", "{d}/reward_module.yaml"], "could not import module 'no_such_pkg.rewards'"),
    ("factory without arguments", ["validate", "{d}/reward_factory.yaml"], "factory_kwargs"),
    ("reward.imports missing", ["validate", "reward.imports=[no_such_mod]"], "reward.imports"),
    ("reward naming no module", ["validate", "reward.functions=[{fn: ':'}]"], "reward ':' names no module or file"),
    (
        "reward endpoint without a host",
        ["validate", "--offline", "reward.functions=[{fn: 'https://'}]"],
        "reward endpoint 'https://' is not a URL a request can go to (it names no host)",
    ),
    (
        "served reward endpoint that is no URL",
        ["serve-reward", "--reward", "http://[::1", "--port", "0"],
        "reward endpoint 'http://[::1' is not a URL a request can go to (Invalid IPv6 URL)",
    ),
    ("a prompt that names a command", ["generate", "model.family=gpt", "--prompt", "serve-reward"], "model.family"),
    ("empty --resume", ["train", "run_dir={d}/run_empty", "--resume", ""], "--resume is given an empty value"),
    ("empty --out", ["eval", "--out", " ", "model.path={d}/tinyblock"], "--out is given an empty value"),
    ("empty --sft", ["plot", "{d}/oldrun", "--sft="], "--sft is given an empty value (an unset shell variable?)"),
    # export
    ("export missing", ["export", "{d}/nope", "{d}/out1"], "checkpoint '{d}/nope' does not exist"),
    ("export incomplete", ["export", "{d}/ckpt_incomplete", "{d}/out2"], "no COMPLETE marker"),
    ("export bad config", ["export", "{d}/ckpt_badjson", "{d}/out3"], "{d}/ckpt_badjson/learner/hf/config.json"),
    ("export truncated", ["export", "{d}/ckpt_truncated", "{d}/out4"], "ckpt_truncated/learner/hf/model.safetensors"),
    ("export into non-empty", ["export", "{d}/ckpt_ok", "{d}/full"], "export target '{d}/full'"),
    ("export to a file", ["export", "{d}/ckpt_ok", "{d}/data.txt"], "export target '{d}/data.txt' is a file"),
    (
        "export below a file",
        ["export", "{d}/ckpt_ok", "{d}/data.txt/out"],
        "export target '{d}/data.txt/out' cannot be created: '{d}/data.txt' is a file",
    ),
    (
        "model.path is a run folder",
        ["validate", "model.path={d}/arun"],
        "model.path '{d}/arun' is not a model directory: it is a tracerl run folder; its latest complete checkpoint is "
        "'{d}/arun/checkpoints/step-1/learner/hf' (set model.path to that)",
    ),
    (
        "export of a run folder",
        ["export", "{d}/arun", "{d}/out6"],
        "'{d}/arun' is not a checkpoint: it is a tracerl run folder; its latest complete checkpoint is "
        "'{d}/arun/checkpoints/step-1'; export that.",
    ),
    (
        "resume from a run folder",
        ["train", "run_dir={d}/run_resume", "--resume", "{d}/arun"],
        "checkpoint.resume='{d}/arun' is not a complete checkpoint: it is a tracerl run folder; its latest complete "
        "checkpoint is '{d}/arun/checkpoints/step-1'. Give that, or 'auto'",
    ),
    ("export truncated says export", ["export", "{d}/ckpt_truncated", "{d}/out5"], "Export from another checkpoint"),
    (
        "export of an incomplete checkpoint's model folder",
        ["export", "{d}/arun/checkpoints/step-2/learner/hf", "{d}/out7"],
        "checkpoint '{d}/arun/checkpoints/step-2' is not complete (no COMPLETE marker)",
    ),
    # nothing is written inside a checkpoint: its manifest would refuse it, and keep_last would delete it
    (
        "export into a checkpoint",
        ["export", "{d}/ckpt_ok", "{d}/ckpt_ok/exported"],
        "export target '{d}/ckpt_ok/exported' lies inside the checkpoint '{d}/ckpt_ok'. A checkpoint holds only what "
        "its run wrote",
    ),
    (
        "plot into a checkpoint",
        ["plot", "{d}/oldrun", "--out", "{d}/arun/checkpoints/step-1/curves.png"],
        "--out's folder '{d}/arun/checkpoints/step-1' lies inside the checkpoint '{d}/arun/checkpoints/step-1'",
    ),
    (
        "reward model into a checkpoint",
        ["train-reward-model", "reward_model.base=tiny", "reward_model.out_dir={d}/arun/checkpoints/step-1/rm"],
        "reward_model.out_dir '{d}/arun/checkpoints/step-1/rm' lies inside the checkpoint",
    ),
    ("eval into a checkpoint", ["eval", "--out", "{d}/ckpt_ok/learner/ev"], "lies inside the checkpoint '{d}/ckpt_ok'"),
    ("train run_dir in a checkpoint", ["train", "run_dir={d}/ckpt_ok/run"], "run_dir '{d}/ckpt_ok/run' lies inside"),
    # sft writes nothing before its checks
    ("sft model missing", ["sft", "model.family=dream", "model.path={d}/nope", "run_dir={d}/run1"], "model.path"),
    ("sft data missing", ["sft", "data.source={d}/nope.jsonl", "run_dir={d}/run2"], "data.source"),
    ("sft unknown characters", ["sft", "data.source={d}/unknown.jsonl", "run_dir={d}/run4"], "model.tiny.alphabet"),
    ("sft empty responses", ["sft", "data.source={d}/noanswers.jsonl", "run_dir={d}/run6"], "is empty: SFT would"),
    (
        "sft holds out more than it trains on",
        ["sft", "data.source={d}/sums.jsonl", "sft.eval_prompts=60", "run_dir={d}/run7"],
        "sft.eval_prompts=60 holds out more of data.source '{d}/sums.jsonl' (100 examples) than it leaves to train on "
        "(40). Lower sft.eval_prompts (at most 50 here)",
    ),
    (
        "sft example beyond the positions",
        [
            "sft",
            "data.source={d}/long.jsonl",
            "model.tiny.max_position_embeddings=64",
            "sft.eval_every=0",
            "run_dir={d}/run8",
        ],
        "+ 91 response tokens) needs",
    ),
    (
        "sft padding beyond the positions",
        [
            "sft",
            "data.source={d}/sums.jsonl",
            "model.tiny.max_position_embeddings=64",
            "sampling.max_new_tokens=60",
            "sft.eval_every=0",
            "run_dir={d}/run9",
        ],
        "60 response tokens (sft.eos_padding pads to sampling.max_new_tokens=60)",
    ),
    ("generate bad family", ["generate", "model.family=gpt", "--prompt", "1+1="], "unknown model.family 'gpt'"),
    ("generate unknown characters", ["generate", "--prompt", "1+1=XY"], "does not know: 'X', 'Y'"),
    (
        "generate prompt beyond the positions",
        ["generate", "model.tiny.max_position_embeddings=80", "--prompt", "1+1=" * 10],
        "but the model has max_position_embeddings=80; shorten --prompt or sampling.max_new_tokens",
    ),
    ("generate empty prompt", ["generate", "data.chat_template=false", "--prompt", ""], "--prompt '' has no tokens"),
    ("generate negative delay", ["generate", "--prompt", "1+1=", "--delay", "-1"], "--delay -1.0 is not a pause"),
    (
        "reward model label_with",
        ["train-reward-model", "reward_model.label_with=nope", "reward_model.out_dir={d}/rm"],
        "reward_model.label_with='nope' (the reward that orders sampled completions): unknown reward 'nope'",
    ),
    (
        "reward model out_dir below a file",
        ["train-reward-model", "reward_model.base=tiny", "reward_model.out_dir={d}/data.txt/rm"],
        "reward_model.out_dir '{d}/data.txt/rm' cannot be created: '{d}/data.txt' is a file",
    ),
    (
        "reward model epochs 0",
        ["train-reward-model", "reward_model.epochs=0", "reward_model.out_dir={d}/rm"],
        "reward_model.epochs must be > 0 (passes over the pairs), got 0",
    ),
    (
        "reward model negative centering",
        ["train-reward-model", "reward_model.center_rewards_coefficient=-5", "reward_model.out_dir={d}/rm"],
        "reward_model.center_rewards_coefficient must be ≥ 0 (unset: none), got -5",
    ),
    (
        "reward model batch_size 0",
        ["train-reward-model", "reward_model.batch_size=0", "reward_model.out_dir={d}/rm"],
        "reward_model.batch_size must be ≥ 1",
    ),
    (
        "reward model pairs from no model",
        ["train-reward-model", "reward_model.out_dir={d}/rm"],
        "reward_model.pairs is unset, so the pairs would be sampled from model.path, which is unset too",
    ),
    (
        "reward model pairs empty",
        ["train-reward-model", "reward_model.pairs={d}/void.jsonl", "reward_model.out_dir={d}/rm"],
        "reward_model.pairs='{d}/void.jsonl' is empty",
    ),
    (
        "reward model pairs not json",
        ["train-reward-model", "reward_model.pairs={d}/bad.jsonl", "reward_model.out_dir={d}/rm"],
        "reward_model.pairs='{d}/bad.jsonl' cannot be read as json: line 2 is not valid JSON",
    ),
    (
        "reward model pairs not UTF-8",
        ["train-reward-model", "reward_model.pairs={d}/pairs_latin1.jsonl", "reward_model.out_dir={d}/rm"],
        "reward_model.pairs='{d}/pairs_latin1.jsonl' line 3 is not UTF-8 text (byte 0xff at column 13); re-save",
    ),
    (
        "reward model pair without rejected",
        ["train-reward-model", "reward_model.pairs={d}/pairs_null.jsonl", "reward_model.out_dir={d}/rm"],
        "reward_model.pairs='{d}/pairs_null.jsonl' row 2: rejected is None",
    ),
    (
        "reward model pair prefers itself",
        ["train-reward-model", "reward_model.pairs={d}/pairs_same.jsonl", "reward_model.out_dir={d}/rm"],
        "in every pair the chosen completion is the rejected one",
    ),
    (
        "reward model pairs longer than max_length",
        [
            "train-reward-model",
            "reward_model.pairs={d}/pairs_ok.jsonl",
            "reward_model.base=tiny",
            "reward_model.batch_size=1",
            "reward_model.max_length=3",
            "reward_model.out_dir={d}/rm",
        ],
        "every training pair is longer than reward_model.max_length=3 tokens",
    ),
    (
        "validate a resume path that does not exist",
        ["validate", "--offline", "checkpoint.resume={d}/nope"],
        "--resume / checkpoint.resume '{d}/nope' does not exist",
    ),
    # where runs write, and what they read
    ("sft run_dir is a file", ["sft", "run_dir={d}/data.txt"], "run_dir '{d}/data.txt' is a file"),
    ("train run_dir is a file", ["train", "run_dir={d}/data.txt"], "run_dir '{d}/data.txt' is a file"),
    ("train run_dir below a file", ["train", "run_dir={d}/data.txt/run"], "'{d}/data.txt' is a file"),
    ("eval --out is a file", ["eval", "--out", "{d}/data.txt"], "--out '{d}/data.txt' is a file"),
    ("eval over an evaluation", ["eval", "--out", "{d}/evaldone"], "{d}/evaldone already holds an evaluation (eval"),
    ("eval without a model", ["eval", "run_dir={d}/ev"], "tracerl eval scores the model at model.path, which is unset"),
    ("fresh train in another run", ["train", "run_dir={d}/oldrun"], "run_dir '{d}/oldrun' holds another run"),
    ("sft resuming a train run", ["sft", "run_dir={d}/oldrun", "checkpoint.resume=auto"], "holds a tracerl train run"),
    (
        "sft --resume auto in a train run",
        ["sft", "run_dir={d}/oldrun", "--resume", "auto"],
        "holds a tracerl train run",
    ),
    ("fresh sft in a train run", ["sft", "run_dir={d}/oldrun"], "holds a tracerl train run; tracerl sft needs its own"),
    (
        "resume a missing checkpoint",
        ["train", "run_dir={d}/run4", "--resume", "{d}/nope"],
        "--resume / checkpoint.resume '{d}/nope' does not exist",
    ),
    ("plot a missing run", ["plot", "{d}/nope"], "RUN_DIR '{d}/nope' does not exist"),
    ("plot a missing sft run", ["plot", "{d}/oldrun", "--sft", "{d}/nope"], "--sft '{d}/nope' does not exist"),
    ("model.path at a checkpoint", ["validate", "model.path={d}/ckpt_ok"], "'{d}/ckpt_ok' is a tracerl checkpoint"),
    ("train from a checkpoint", ["train", "model.path={d}/ckpt_ok", "run_dir={d}/run3"], "{d}/ckpt_ok/learner/hf"),
    (
        "empty prompts",
        ["validate", "data.source={d}/empty.jsonl", "data.chat_template=false", "eval.num_prompts=0"],
        "2 prompt(s) of data.source '{d}/empty.jsonl' are empty",
    ),
]


def _checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    hf = root / name / "learner" / "hf"
    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=32))
    save_tiny(model, tok, hf)
    if complete:
        seal(root / name, 1)  # the manifest a save writes last; the damage below comes after it
    return hf


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "list.yaml").write_text("- sampling\n- model\n")
    (d / "broken.yaml").write_text("sampling:\n  max_new_tokens: [1, 2\n")
    (d / "empty").mkdir()
    for name in ("badjson", "noweights", "truncated", "dream"):
        Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), **SHAPE)).save_pretrained(d / name)
        raw = json.loads((d / name / "config.json").read_text())
        raw.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=TOK.mask_token_id)
        (d / name / "config.json").write_text(json.dumps(raw))
        TOK.save_pretrained(d / name)
    (d / "badjson" / "config.json").write_text("{oops")
    (d / "noweights" / "model.safetensors").unlink()
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), **SHAPE)).save_pretrained(d / "qwen2")
    TOK.save_pretrained(d / "qwen2")
    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(bert).save_pretrained(d / "bert64")
    TOK.save_pretrained(d / "bert64")
    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=32, attention="block", block_size=4))
    save_tiny(model, tok, d / "tinyblock")
    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=32))
    model.model.norm.weight.data[3] = float("nan")  # one weight of one tensor
    save_tiny(model, tok, d / "tinynan")
    (d / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", answer: 4}\n')
    (d / "noprompt.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    sum_row = b'{"prompt": "1+1=", "answer": "2", "response": "2"}\n'
    (d / "latin1.jsonl").write_bytes(
        sum_row * 10 + '{"prompt": "caf\xe9", "answer": "2", "response": "2"}\n'.encode("latin-1")
    )
    (d / "latin1.json").write_bytes(b'[\n {"prompt": "1+1=", "answer": "2"},\n {"prompt": "\xff", "answer": "2"}\n]\n')
    (d / "latin1.csv").write_bytes(b"prompt,answer\n" + b"1+1=,2\n" * 10 + b"\xff,2\n")
    (d / "data.txt").write_text("1+1=2\n")
    (d / "unknown.jsonl").write_text('{"prompt": "ÄÖ=", "answer": "Ü", "response": "Ü"}\n' * 4)
    (d / "string.yaml").write_text("just a string\n")
    (d / "card").mkdir()
    (d / "card" / "README.md").write_text("a model card, no model\n")
    (d / "void.jsonl").write_text("")
    pairs = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(3)]
    (d / "pairs_ok.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    null = [pairs[0], pairs[1] | {"rejected": None}]
    (d / "pairs_null.jsonl").write_text("".join(json.dumps(p) + "\n" for p in null))
    same = [p | {"rejected": p["chosen"]} for p in pairs]
    (d / "pairs_same.jsonl").write_text("".join(json.dumps(p) + "\n" for p in same))
    (d / "pairs_latin1.jsonl").write_bytes(
        b"".join(json.dumps(p).encode() + b"\n" for p in pairs[:2])
        + b'{"prompt": "\xff", "chosen": "2", "rejected": "3"}\n'
    )
    rows = [{"prompt": "1+2=", "answer": "3", "response": "3"}, {"prompt": "12+3=", "answer": "15", "response": None}]
    (d / "noresponse.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "empty.jsonl").write_text('{"prompt": "", "answer": "1"}\n{"prompt": "", "answer": "2"}\n')
    sums = [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "response": str(2 * a)} for a in range(100)]
    (d / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sums))
    (d / "noanswers.jsonl").write_text("".join(json.dumps(r | {"response": " "}) + "\n" for r in sums))
    (d / "long.jsonl").write_text("".join(json.dumps(r | {"response": "1" * 90}) + "\n" for r in sums))
    old = runs.claim(load(None, [f"run_dir={d / 'oldrun'}"]), "train")
    runs.record(d / "oldrun", old)
    (d / "oldrun" / "metrics.jsonl").write_text('{"step": 1}\n')
    for name, fn in (
        ("unknown", "nope"),
        ("file", f"{d}/missing.py:score"),
        ("module", "no_such_pkg.rewards:score"),
        ("factory", "trl.rewards:get_soft_overlong_punishment"),
    ):
        (d / f"reward_{name}.yaml").write_text(json.dumps({"reward": {"functions": [{"fn": fn}]}}))
    _checkpoint(d, "ckpt_ok")
    _checkpoint(d, "ckpt_incomplete", complete=False)
    (_checkpoint(d, "ckpt_badjson") / "config.json").write_text("[1, 2")
    weights = _checkpoint(d, "ckpt_truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (d / "evaldone").mkdir()
    (d / "evaldone" / "eval.json").write_text("{}")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("mine")
    _checkpoint(d, "arun/checkpoints/step-1")  # a run folder, as train writes it: run.json, checkpoints, config.json
    _checkpoint(d, "arun/checkpoints/step-2", complete=False)  # a save that was killed
    (d / "arun" / "run.json").write_text(json.dumps({"run_id": "r", "command": "train"}))
    (d / "arun" / "config.json").write_text(json.dumps({"seed": 0}))
    return d


def test_the_table_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "argv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(name: str, argv: list[str], expected: str, files: Path, capsys: pytest.CaptureFixture) -> None:
    args = [a.replace("{d}", str(files)) for a in argv]
    before = sorted(p.name for p in files.iterdir())
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith(f"tracerl {args[0]}: error: "))
    paragraph = err[err.index(line) :].strip()
    assert "\n" not in paragraph, paragraph  # one paragraph, last in the output
    assert expected.replace("{d}", str(files)) in paragraph, paragraph
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written: no run_dir, no export
    assert (files / "full" / "keep.txt").read_text() == "mine"


def test_an_uncached_hub_dataset_offline_names_the_setting(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["validate", "data.source=no-org/no-such-dataset"]) == 2
    err = capsys.readouterr().err
    assert "data.source 'no-org/no-such-dataset' is a hub dataset that is not in the local cache" in err
    assert "HF_DATASETS_OFFLINE" in err and "not cached in None" not in err


def test_a_schedule_that_reaches_zero_before_the_run_ends_is_a_warning(capsys: pytest.CaptureFixture) -> None:
    argv = ["validate", "--offline", "learner.lr_schedule=cosine", "learner.total_steps=30", "train.steps=20",
            "learner.minibatches=2"]  # fmt: skip
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: learner.lr_schedule=cosine reaches 0 at learner.total_steps=30 optimizer steps, but the run" in out
    assert "takes 40" in out and "its last 10 train at learning rate 0" in out and "learner.total_steps=40" in out
    assert main(["validate", "--offline", "learner.lr_schedule=cosine", "learner.total_steps=40", *argv[4:]]) == 0
    assert "warning" not in capsys.readouterr().out


def test_tiny_settings_a_saved_tiny_model_does_not_have_are_a_warning(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from tracerl.config import TinyModelConfig

    save_tiny(*build_tiny(TinyModelConfig(hidden_size=32, num_heads=2)), tmp_path / "full")
    save_tiny(*build_tiny(TinyModelConfig(attention="block", block_size=4)), tmp_path / "block")
    full, block = f"model.path={tmp_path / 'full'}", f"model.path={tmp_path / 'block'}"
    assert main(["validate", "--offline", full, "model.tiny.hidden_size=32", "model.tiny.num_heads=2"]) == 0
    assert main(["validate", "--offline", block, "model.tiny.attention=block"]) == 0  # the quickstart's case
    assert main(["validate", "--offline", block]) == 0  # no model.tiny settings at all
    assert "warning" not in capsys.readouterr().out
    shape = ["model.tiny.attention=block", "model.tiny.hidden_size=48", "model.tiny.num_heads=2"]
    assert main(["validate", "--offline", full, *shape]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: model.tiny.attention=block (the model's: full), model.tiny.hidden_size=48 (the model's: 32)" in out
    assert f"ignored: model.path '{tmp_path / 'full'}' is a saved tiny model" in out and "num_heads" not in out
    assert main(["validate", "--offline", full, "model.tiny.attention=block", "model.block_size=4"]) == 0
    assert "warning" not in capsys.readouterr().out  # model.block_size makes the saved model a block model of 4
    assert main(["validate", "--offline", full, "model.tiny.alphabet=0123456789abc"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: model.tiny.alphabet='0123456789abc' (the model's tokenizer has other characters) ignored" in out
    assert main(["validate", "--offline", block, "model.tiny.block_size=8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: model.tiny.block_size=8 (the model's: 4) ignored" in out
    assert "model.block_size sets the block size of a saved block model" in out
    assert (
        main(["validate", "--offline", block, "model.tiny.block_size=8", "model.block_size=8", "sampling.block_size=8"])
        == 0
    )
    assert "warning" not in capsys.readouterr().out  # model.block_size applies; model.tiny.block_size is not read


@pytest.mark.parametrize(
    ("setting", "fix"),
    [
        ("learner.packed_attention=flex", "set it to auto or grouped"),
        ("learner.backend=nccl", "set it to auto or gloo"),
    ],
)
def test_cuda_only_learner_settings_on_a_cpu_learner_are_refused_before_anything_starts(
    tmp_path, capsys: pytest.CaptureFixture, setting: str, fix: str
) -> None:
    assert main(["validate", "--offline", setting]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{setting} needs CUDA, but the learner runs on the CPU (cluster.gpus_per_node=0)" in err and fix in err
    assert main(["train", setting, f"run_dir={tmp_path / 'run'}"]) == 2
    assert f"{setting} needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written
    assert main(["validate", "--offline", setting, "cluster.gpus_per_node=2", "rollout.placement=colocated"]) == 0
    if setting == "learner.backend=nccl":  # one rank of the torch engine makes no process group: nccl is unused
        assert main(["validate", "--offline", setting, "learner.engine=torch"]) == 0


def test_many_actors_on_few_cores_is_a_warning_that_says_what_it_costs(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", "--offline", "reward.num_workers=16", "rollout.num_workers=16"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    cores = os.cpu_count() or 1
    assert f"warning: rollout.num_workers=16 and reward.num_workers=16 on a machine with {cores} CPU cores" in out
    assert "MB per rollout actor" in out and f"Use at most {cores}" in out
    assert main(["validate", "--offline", f"reward.num_workers={cores}", f"rollout.num_workers={cores}"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_sampled_pairs_check_label_with_before_loading_any_model(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """An unknown ``reward_model.label_with`` is a config error, found before the classifier is built and the
    policy samples (which took ~40 s before the error)."""
    from tracerl.reward_models import train

    def unreachable(cfg):  # noqa: ANN001, ANN202
        raise AssertionError("the classifier was built before reward_model.label_with was checked")

    monkeypatch.setattr(train, "build_classifier", unreachable)
    assert main(["train-reward-model", "reward_model.label_with=nope", "reward_model.out_dir=/nonexistent/rm"]) == 2
    err = capsys.readouterr().err
    assert "reward_model.label_with='nope'" in err and "unknown reward 'nope'" in err and "Traceback" not in err


@pytest.mark.parametrize("prompt", ["", "1+2=XYZ"])
def test_generate_checks_the_prompt_before_the_weights_load(capsys, monkeypatch, prompt: str) -> None:
    import tracerl.models

    def unreachable(cfg):  # noqa: ANN001, ANN202
        raise AssertionError("the policy was loaded before --prompt was checked")

    monkeypatch.setattr(tracerl.models, "load_policy", unreachable)
    assert main(["generate", "data.chat_template=false", "--no-animate", "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and ("has no tokens" if not prompt else "'X', 'Y', 'Z'") in err, err


def test_serve_reward_names_the_flag_and_the_fix(capsys: pytest.CaptureFixture) -> None:
    """A port out of range, a busy port and a host that does not resolve: one line naming --port / --host."""
    with pytest.raises(SystemExit) as stop:
        main(["serve-reward", "--reward", "sudoku_cells", "--port", "99999"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --port: 99999 is not a port number; give 0-65535" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve-reward", "--reward", "sudoku_cells", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use (--port {port})" in err and "--port 0 picks a free one" in err
    assert main(["serve-reward", "--reward", "sudoku_cells", "--host", "no.such.host.invalid", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--host 'no.such.host.invalid' is not a name or address this machine can resolve" in err
    assert "Traceback" not in err and err.startswith("tracerl serve-reward: error: ")
    for flags in (["--debug"], ["--verbose"]):  # the global flags, after the command as the help says they may be
        assert main(["serve-reward", "--reward", "no_such_reward", *flags]) == 2
        err = capsys.readouterr().err
        assert "unknown reward 'no_such_reward'" in err and "unrecognized arguments" not in err
