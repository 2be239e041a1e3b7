"""Prompt data: synthetic tasks, local files, column checks, long prompts, resumable streams."""

from __future__ import annotations

import json
import re

import pytest

from tracerl.config import ConfigError, DataConfig
from tracerl.data import PromptStream, encode_prompt, load_examples, sft_pairs, synthetic
from tracerl.models import char_tokenizer

TOK = char_tokenizer("0123456789+-*=?:#., abcdefghijklmnopqrstuvwxyz")


def test_synthetic_addition_is_correct_and_seeded():
    ds = synthetic("addition", 50, seed=1)
    for row in ds:
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(a) + int(b) == int(row["answer"]) and row["response"] == row["answer"]
    assert synthetic("addition", 50, seed=1)["prompt"] == ds["prompt"]
    assert synthetic("addition", 50, seed=2)["prompt"] != ds["prompt"]


def test_unknown_synthetic_task_lists_tasks():
    with pytest.raises(ConfigError, match=r"unknown synthetic task 'mult'; choose from \['addition'"):
        load_examples(DataConfig(source="synthetic:mult"), 0)


def test_local_jsonl_with_renamed_columns(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"{i}+1=", "solution": str(i + 1)}) for i in range(5)))
    cfg = DataConfig(source=str(path), prompt_column="question", answer_column="solution")
    ds = load_examples(cfg, 0, require=("prompt", "answer"))
    assert ds["prompt"][0] == "0+1=" and ds["answer"][4] == "5"


def test_missing_column_names_columns_and_key(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "solution": "2"}))
    with pytest.raises(ConfigError, match=r"no column 'prompt'.*\['question', 'solution'\].*data.prompt_column"):
        load_examples(DataConfig(source=str(path)), 0)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_examples(DataConfig(source=str(tmp_path / "none.jsonl")), 0)


def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, as a user is (conftest sets the offline variables), with any hub or builder call a failure."""
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def asked(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the hub (or a dataset builder) was asked for {args}")

    monkeypatch.setattr(datasets, "load_dataset", asked)
    monkeypatch.setattr(datasets, "load_from_disk", asked)


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("w/nope.jsonl", "a local file, by its extension"),
        ("nope.parquet", "a local file, by its extension"),
        ("data/w/nope", "a local path: a hub name has one '/'"),
        ("./nope", "a local path, by its start"),
        ("~/no-such-tracerl-data", "a local path, by its start"),
    ],
)
def test_a_mistyped_local_path_is_refused_without_the_hub(tmp_path, monkeypatch, source, why):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    _no_hub(monkeypatch)
    for key in ("data.source", "eval.source"):
        with pytest.raises(ConfigError, match=rf"^{key} '{source}' does not exist \({why}"):
            load_examples(DataConfig(source=source), 0, key=key)


def test_a_hub_name_still_goes_to_the_hub(monkeypatch):
    import datasets

    asked = []
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, split: asked.append(name) or datasets.Dataset.from_list([{"prompt": "1+1="}]),
    )
    assert load_examples(DataConfig(source="org/name"), 0)["prompt"] == ["1+1="] and asked == ["org/name"]


def test_a_bad_eval_source_is_named_as_eval_source(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match=r"^eval.source '.*q.jsonl' has no column 'prompt'.*data.prompt_column"):
        load_examples(DataConfig(source=str(path)), 0, key="eval.source")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_file_says_it_is_empty(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"^data.source '.*empty.jsonl' is an empty file: it holds no examples"):
        load_examples(DataConfig(source=str(path)), 0)


def test_an_empty_json_document_says_it_holds_no_rows(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(ConfigError, match=r"data.source '.*empty.json'.*holds no rows"):
        load_examples(DataConfig(source=str(path)), 0)


@pytest.mark.parametrize(
    ("first", "second", "row", "what"), [('"2"', "null", 1, "null"), ("2", "15", 0, "2 of type int, not text")]
)
def test_a_response_that_is_not_text_names_the_row_and_the_column_setting(tmp_path, first, second, row, what):
    path = tmp_path / "sft.jsonl"
    rows = [
        f'{{"prompt": "1+1=", "answer": "2", "target": {first}}}',
        f'{{"prompt": "3=", "answer": "3", "target": {second}}}',
    ]
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(source=str(path), response_column="target")
    with pytest.raises(ConfigError) as err:
        load_examples(cfg, 0, require=("prompt", "answer", "response"))
    message = str(err.value)
    assert message.startswith(f"row {row} (counting from 0) of data.source '{path}' has no response")
    assert f"its column 'target' is {what}" in message and "set data.response_column" in message
    assert len(load_examples(cfg, 0, require=("prompt",))) == 2  # RL does not need the responses


def test_a_null_prompt_names_the_row(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "1+1="}\n{"prompt": null}\n')
    with pytest.raises(ConfigError, match=r"^row 1 .* has no prompt: its column 'prompt' is null.*data.prompt_column"):
        load_examples(DataConfig(source=str(path)), 0)


def test_chat_template_and_plain_prompts():
    with_template = encode_prompt(TOK, "1+1=", DataConfig(chat_template=True))
    plain = encode_prompt(TOK, "1+1=", DataConfig(chat_template=False))
    assert TOK.decode(with_template) == "user: 1+1=\nassistant: "
    assert TOK.decode(plain) == "1+1="


def test_long_prompts_are_dropped_and_columns_stay_aligned():
    ds = synthetic("addition", 40, seed=0)
    cfg = DataConfig(chat_template=False, max_prompt_tokens=5)  # "12+7=" is 5 chars, "12+34=" is 6
    stream = PromptStream(ds, TOK, cfg, seed=0)
    assert stream.dropped == sum(len(p) > 5 for p in ds["prompt"]) > 0
    batch = stream.next_batch(10)
    for ids, prompt, answer in zip(batch.prompt_ids, batch.prompts, batch.columns["answer"], strict=True):
        assert TOK.decode(ids) == prompt and len(ids) <= 5
        a, b = prompt.rstrip("=").split("+")
        assert int(a) + int(b) == int(answer)


def test_stream_resumes_where_it_stopped():
    ds = synthetic("addition", 12, seed=0)
    cfg = DataConfig(chat_template=False)
    a = PromptStream(ds, TOK, cfg, seed=3)
    a.next_batch(5)
    state = a.state_dict()
    expected = [a.next_batch(5).prompts for _ in range(3)]  # crosses an epoch boundary
    b = PromptStream(ds, TOK, cfg, seed=3)
    b.load_state_dict(state)
    assert [b.next_batch(5).prompts for _ in range(3)] == expected


def test_a_stream_resumed_over_fewer_prompts_begins_a_new_epoch_instead_of_failing():
    cfg = DataConfig(chat_template=False)
    big = PromptStream(synthetic("addition", 12, seed=0), TOK, cfg, seed=3)
    big.next_batch(8)
    small = PromptStream(synthetic("addition", 3, seed=1), TOK, cfg, seed=3)  # data.source changed on resume
    note = small.load_state_dict(big.state_dict())
    assert note is not None and "data.source, eval.num_prompts" in note and "epoch 1" in note, note
    batch = small.next_batch(4)  # past the old cursor of 8: an IndexError before
    assert len(batch.prompts) == 4 and set(batch.prompts) <= set(small.ds["prompt"])
    assert (small.epoch, small.cursor) == (2, 1)  # epoch 1 over the 3 prompts, then one of epoch 2


@pytest.mark.parametrize("old", [{"epoch": 0, "cursor": 8}, {"epoch": 0, "cursor": 2, "size": 12}])
def test_a_saved_position_from_other_data_is_never_used_as_a_place_in_this_data(old):
    # a checkpoint written before the stream recorded its size: only a cursor past the end shows other data
    small = PromptStream(synthetic("addition", 3, seed=1), TOK, DataConfig(chat_template=False), seed=3)
    assert small.load_state_dict(old) is not None
    assert (small.epoch, small.cursor) == (1, 0)
    same = PromptStream(synthetic("addition", 3, seed=1), TOK, DataConfig(chat_template=False), seed=3)
    assert same.load_state_dict({"epoch": 4, "cursor": 2}) is None and (same.epoch, same.cursor) == (4, 2)


def test_sft_pairs_end_with_eos():
    pairs = sft_pairs(synthetic("copy", 5, seed=0), TOK, DataConfig())
    assert len(pairs) == 5 and all(r[-1] == TOK.eos_token_id for _, r in pairs)


def _jsonl(path, rows):  # noqa: ANN001, ANN202
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("key", ["data.source", "eval.source"])
@pytest.mark.parametrize(
    ("setting", "logical"),
    [("prompt_column", "prompt"), ("answer_column", "answer"), ("response_column", "response")],
)
def test_a_chosen_column_replaces_the_files_own_column_of_that_name(tmp_path, key, setting, logical):
    rows = [
        {"prompt": "ignore", "question": f"{i}+1=", "answer": "x", "solution": str(i + 1), "response": "y",
         "target": str(i + 1)}
        for i in range(3)
    ]  # fmt: skip
    chosen = {"prompt_column": "question", "answer_column": "solution", "response_column": "target"}[setting]
    cfg = DataConfig(source=_jsonl(tmp_path / "q.jsonl", rows), **{setting: chosen})
    ds = load_examples(cfg, 0, require=("prompt", "answer", "response"), key=key)  # pyarrow: "exists 2 times"
    assert ds[logical] == [r[chosen] for r in rows]
    assert chosen not in ds.column_names and ds.column_names.count(logical) == 1


def test_two_columns_can_swap_names(tmp_path):
    rows = [{"prompt": f"{i}", "answer": f"{i}+1="} for i in range(3)]
    cfg = DataConfig(source=_jsonl(tmp_path / "q.jsonl", rows), prompt_column="answer", answer_column="prompt")
    ds = load_examples(cfg, 0, require=("prompt", "answer"))
    assert ds["prompt"] == ["0+1=", "1+1=", "2+1="] and ds["answer"] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("settings", "require", "expected"),
    [
        ({"answer_column": "prompt"}, ("prompt",), "data.answer_column='prompt' names the column that "
         "data.prompt_column='prompt' takes as the prompt"),
        ({"answer_column": "response"}, ("prompt", "answer", "response"), "data.answer_column='response' names the "
         "column that data.response_column='response' takes as the response"),
        ({"answer_column": "sol", "response_column": "sol"}, ("prompt", "answer", "response"),
         "data.response_column='sol' names the column that data.answer_column='sol' takes as the answer"),
    ],
)  # fmt: skip
def test_a_column_setting_that_takes_another_settings_column_is_refused_naming_both(
    tmp_path, settings, require, expected
):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "response": str(i + 1), "sol": str(i + 1)} for i in range(3)]
    cfg = DataConfig(source=_jsonl(tmp_path / "q.jsonl", rows), **settings)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_examples(cfg, 0, require=require)


def test_a_column_may_serve_as_the_answer_where_nothing_needs_it_as_the_response(tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(3)]
    cfg = DataConfig(source=_jsonl(tmp_path / "q.jsonl", rows), answer_column="response")
    assert load_examples(cfg, 0, require=("prompt",))["answer"] == ["1", "2", "3"]


@pytest.mark.parametrize("key", ["data.source", "eval.source"])
def test_bytes_that_are_not_utf8_in_any_column_name_the_setting_and_the_line(tmp_path, key):
    path = tmp_path / "q.jsonl"  # the answer column, which no check reads row by row
    path.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n' * 2 + b'{"prompt": "2+2=", "answer": "\xa34"}\n')
    cfg = DataConfig(source=str(path))
    with pytest.raises(
        ConfigError, match=re.escape(f"{key} '{path}' line 3 is not UTF-8 text (byte 0xa3 at column 31)")
    ):
        load_examples(cfg, 0, key=key)


@pytest.mark.parametrize(
    ("message", "bad"),
    [({"role": "user", "text": "5+1="}, "'content'"), ({"content": "5+1="}, "'role'"),
     ({"role": "user", "content": 6}, "'content'")],
)  # fmt: skip
def test_a_chat_message_without_a_role_or_text_content_is_refused(tmp_path, message, bad):
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}, {"prompt": [message], "answer": "6"}]
    source = _jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ConfigError) as err:  # it was rendered as an empty prompt
        load_examples(DataConfig(source=source, chat_template=True), 0)
    message_text = str(err.value)
    assert message_text.startswith(f"row 1 (counting from 0) of data.source '{source}' has a conversational prompt")
    assert f"message 0 has no text {bad}" in message_text and "column 'prompt'" in message_text
    assert "a dict with a string 'role' and a 'content' (text, or a list of parts)" in message_text


def test_chat_messages_whose_content_is_a_list_of_parts_load(tmp_path):
    parts = [{"role": "user", "content": [{"type": "text", "text": "1+1="}]}]  # the format chat templates also take
    source = _jsonl(tmp_path / "parts.jsonl", [{"prompt": parts, "answer": "2"}] * 2)
    assert load_examples(DataConfig(source=source, chat_template=True), 0)["prompt"][0] == parts


@pytest.mark.parametrize("prompt", [[0, 1], ["5+1="], []])
def test_a_list_that_is_not_a_conversation_is_not_called_one(tmp_path, prompt):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": prompt, "answer": "x"}]
    if prompt == [0, 1]:
        rows = rows[1:] * 2  # a column of number lists (pyarrow will not mix them with text)
    source = _jsonl(tmp_path / "list.jsonl", rows)
    with pytest.raises(ConfigError) as err:  # was: "need a chat template", then a TypeError with one
        load_examples(DataConfig(source=source, chat_template=True), 0)
    row = 0 if prompt == [0, 1] else 1
    assert str(err.value).startswith(f"row {row} (counting from 0) of data.source '{source}' has a prompt that is "
                                     "neither text nor a conversation")  # fmt: skip
    assert 'A prompt must be a string or a list of messages like {"role": "user", "content": "..."}' in str(err.value)


MAYBE = """
def maybe(prompts, completions, answer=None, **kwargs):  # TRL's multi-task pattern: None where it does not apply
    return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]
"""


@pytest.mark.parametrize("key", ["data.source", "eval.source"])
@pytest.mark.parametrize("missing", [None, "", "absent"])
def test_prompts_without_an_answer_are_named_where_a_reward_reads_it(tmp_path, capsys, key, missing):
    from tracerl.cli import main

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
    for i in (1, 3, 4):
        rows[i] = {"prompt": rows[i]["prompt"]} if missing == "absent" else {**rows[i], "answer": missing}
    source = _jsonl(tmp_path / "half.jsonl", rows)
    full = _jsonl(tmp_path / "full.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 4)
    where = [f"data.source={source}"] if key == "data.source" else [f"data.source={full}", f"eval.source={source}"]
    base = ["validate", *where, "data.chat_template=false", "eval.num_prompts=6" if key == "eval.source" else
            "eval.num_prompts=0", "rollout.prompts_per_step=2", "wandb.mode=disabled"]  # fmt: skip
    capsys.readouterr()
    assert main([*base, "reward.functions=[{fn: synthetic_exact}]"]) == 0  # they were scored 0, silently
    out = " ".join(capsys.readouterr().out.split())
    want = f"warning: 3 of the 6 prompts of {key} '{source}' have no answer in column 'answer' (the first: '1+1=')"
    assert want in out
    assert "(synthetic_exact) score those prompts' completions without one" in out
    # a function that reads the answer only where there is one (a parameter with a default, as math_verify's)
    (tmp_path / "maybe.py").write_text(MAYBE)
    assert main([*base, f"reward.functions=[{{fn: '{tmp_path}/maybe.py:maybe'}}]"]) == 0  # None there: not refused
    assert "(maybe) score those prompts' completions" in " ".join(capsys.readouterr().out.split())
    # a reward that does not read the answer (a length reward here; a reward model) is not told about it
    assert main([*base, "reward.functions=[{fn: length}]"]) == 0
    assert "have no answer" not in capsys.readouterr().out


def test_data_without_answers_or_with_answers_that_are_numbers_still_loads(tmp_path):
    prompts_only = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])  # for a reward model
    assert load_examples(DataConfig(source=prompts_only), 0)["prompt"] == ["1+1=", "2+2="]
    numbers = _jsonl(tmp_path / "n.jsonl", [{"prompt": "1+1=", "answer": 2}, {"prompt": "2+2=", "answer": 0}])
    assert load_examples(DataConfig(source=numbers), 0)["answer"] == [2, 0]
    sft = _jsonl(tmp_path / "s.jsonl", [{"prompt": "1+1=", "response": "2"}])  # no answer column at all
    assert load_examples(DataConfig(source=str(sft)), 0, require=("prompt", "response"))["response"] == ["2"]


def test_csv_text_columns_are_read_as_text(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("prompt,answer,score\n1+1=,2,0.5\n2+2=,4,1\n")
    ds = load_examples(DataConfig(source=str(path)), 0)
    assert ds["answer"] == ["2", "4"] and ds["score"] == [0.5, 1.0]  # not 2.0 and 4.0; other columns as pandas reads
    path.write_text("prompt,answer\n1+1=,2\n2+2=,\n3+3=,6\n")
    assert load_examples(DataConfig(source=str(path)), 0)["answer"] == ["2", None, "6"]  # a blank is missing


def test_csv_answers_that_are_pandas_na_words_stay_text(tmp_path):
    """An answer None, NA or n/a is the text written there, not a missing answer; other columns as pandas reads."""
    path = tmp_path / "a.csv"
    path.write_text("prompt,answer,score\nf() returns,None,NA\nsymbol of sodium?,NA,3\nq,n/a,\nNULL,,4\n")
    ds = load_examples(DataConfig(source=str(path)), 0)
    assert ds["answer"] == ["None", "NA", "n/a", None] and ds["prompt"][-1] == "NULL"
    assert ds["score"][1:] == [3.0, None, 4.0] and ds["score"][0] is None  # NA in a column of numbers is missing
    path.write_text("question,solution,prompt\nnull?,NA,NA\n")  # the named columns are the text ones
    renamed = load_examples(DataConfig(source=str(path), answer_column="solution", prompt_column="question"), 0)
    assert renamed["prompt"] == ["null?"] and renamed["answer"] == ["NA"]


@pytest.mark.parametrize(
    ("name", "text", "what"),
    [("s.json", "42", "the single JSON value 42, not rows"), ("s.jsonl", '"abc"\n', "the single JSON value 'abc'"),
     ("m.jsonl", '{"prompt": "1+1="}\n7\n', "line 2 holds 7, not a JSON object")],
)  # fmt: skip
def test_a_json_file_that_holds_no_rows_says_so(tmp_path, name, text, what):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:  # was: "DataFrame constructor not properly called!"
        load_examples(DataConfig(source=str(path)), 0)
    assert str(err.value).startswith(f"could not load data.source '{path}'")
    assert what in str(err.value) and "it must hold rows: a JSON list of objects" in str(err.value)
