"""Generative judges against a small OpenAI-compatible stub server on 127.0.0.1 started by the test: good answers,
unparseable answers, timeouts, retries, a dead endpoint, the concurrency limit and bad settings."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tracerl.cli import main
from tracerl.config import JudgeConfig
from tracerl.reward_resolve import RewardError, RewardSpec, reward_kind
from tracerl.reward_service import RewardService

ROOT = Path(__file__).resolve().parents[1]


class Stub:
    """What the stub answers, by the completion inside the user message: ``good N`` → ``Score: N``; ``json N`` →
    ``{"verdict": {"score": N}}``; ``babble`` → no score; ``slow`` → sleeps past the client's timeout; ``busy`` →
    503 the first time, then ``Score: 5``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.busy_seen = False
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": "stub-judge", "object": "model"}]})
                else:
                    self.reply(404, {"error": "no such route"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body | {"authorization": self.headers.get("Authorization")})
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self.answer(body)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def answer(self, body: dict) -> None:
                if body.get("model") != "stub-judge":
                    self.reply(404, {"error": f"model {body.get('model')} not found"})
                    return
                text = body["messages"][-1]["content"].split("ANSWER:")[-1].strip()
                time.sleep(0.05)  # a request takes a moment: the concurrency limit shows
                if text == "slow":
                    time.sleep(1.5)
                if text == "busy":
                    with stub.lock:
                        first, stub.busy_seen = not stub.busy_seen, True
                    if first:
                        self.reply(503, {"error": "overloaded"})
                        return
                    text = "good 5"
                kind, _, value = text.partition(" ")
                content = {
                    "good": f"Reasoning... Score: {value}",
                    "json": json.dumps({"verdict": {"score": float(value or 0)}}),
                }.get(kind, "I would rather not say.")
                self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():  # noqa: ANN201
    server = Stub()
    yield server
    server.close()


TEMPLATE = "Task: {{ prompt }} (reference {{ answer }})\nANSWER: {{ completion }}"


def judge(url: str, **options: object) -> RewardSpec:
    settings = {"template": TEMPLATE, "request_timeout_s": 0.5, "retries": 1, "backoff_s": 0.05} | options
    return RewardSpec(url, name="judge", judge=JudgeConfig(**settings))


def test_good_answers_are_scored_with_the_template_over_prompt_completion_and_columns(stub: Stub) -> None:
    service = RewardService([judge(stub.url, concurrency=2)])
    completions = ["good 7", "good 3.5", "good -1", "good 10", "good 0", "good 2"]
    result = service.score(["q"] * 6, completions, columns={"answer": [str(i) for i in range(6)]})
    assert result.parts["judge"] == [7.0, 3.5, -1.0, 10.0, 0.0, 2.0] and result.total == result.parts["judge"]
    sent = sorted(r["messages"][-1]["content"] for r in stub.requests)
    assert sent[0] == "Task: q (reference 0)\nANSWER: good 7"  # the template, filled per sample
    assert {r["model"] for r in stub.requests} == {"stub-judge"}  # judge.model unset: the only one served
    assert all(r["temperature"] == 0.0 and r["max_tokens"] == 256 for r in stub.requests)
    assert stub.max_in_flight == 2  # judge.concurrency=2: never more in flight, and the limit is used


def test_a_json_field_parser(stub: Stub) -> None:
    service = RewardService([judge(stub.url, parser="json", json_field="verdict.score")])
    assert service.score(["q"] * 2, ["json 4", "json 0.5"], columns={"answer": ["a", "b"]}).total == [4.0, 0.5]


def test_unparseable_answers_raise_naming_the_sample_or_score_nan_and_are_counted(stub: Stub) -> None:
    completions, columns = ["good 1", "babble", "good 3"], {"answer": ["a"] * 3}
    with pytest.raises(RewardError) as err:
        RewardService([judge(stub.url)]).score(["q"] * 3, completions, columns=columns)
    text = str(err.value)
    assert text.startswith("reward function 'judge' failed on sample 1: 1 of 3 samples failed; sample 1: no match")
    assert "'I would rather not say.'" in text and "reward.on_error=nan" in text
    result = RewardService([judge(stub.url)], on_error="nan").score(["q"] * 3, completions, columns=columns)
    assert result.parts["judge"][0] == 1.0 and math.isnan(result.parts["judge"][1]) and result.parts["judge"][2] == 3
    assert result.metrics["reward/errors/judge"] == 1.0 and result.metrics["reward/nan_count"] == 1.0


def test_a_request_that_times_out_is_retried_then_fails_its_sample(stub: Stub) -> None:
    service = RewardService([judge(stub.url, request_timeout_s=0.3, retries=1)], on_error="nan")
    t0 = time.monotonic()
    result = service.score(["q"] * 2, ["slow", "good 4"], columns={"answer": ["a", "b"]})
    assert math.isnan(result.parts["judge"][0]) and result.parts["judge"][1] == 4.0
    assert result.metrics["reward/errors/judge"] == 1.0
    assert sum("slow" in r["messages"][-1]["content"] for r in stub.requests) == 2  # tried, then retried once
    assert time.monotonic() - t0 < 1.5  # never waited for the slow answer


def test_a_503_is_retried_with_backoff(stub: Stub) -> None:
    result = RewardService([judge(stub.url, retries=2)]).score(["q"], ["busy"], columns={"answer": ["a"]})
    assert result.total == [5.0] and len(stub.requests) == 2


def test_a_dead_endpoint_is_refused_at_start_and_fails_fast_later(stub: Stub) -> None:
    url = stub.url
    service = RewardService([judge(url, retries=1)], on_error="nan")  # it answers now
    stub.close()  # ... and dies
    t0 = time.monotonic()
    result = service.score(["q"] * 20, ["good 1"] * 20, columns={"answer": ["a"] * 20})
    assert all(math.isnan(v) for v in result.total) and result.metrics["reward/errors/judge"] == 20.0
    assert time.monotonic() - t0 < 3.0  # samples not yet sent fail at once with the same reason
    with pytest.raises(RewardError, match=r"reward 'judge' cannot run here: nothing answers at the judge endpoint"):
        RewardService([judge(url)])


def test_a_judge_that_stops_answering_says_to_restart_its_server(stub: Stub) -> None:
    service = RewardService([judge(stub.url, retries=0)])  # on_error=raise
    stub.close()
    with pytest.raises(RewardError) as err:
        service.score(["q"] * 2, ["good 1"] * 2, columns={"answer": ["a"] * 2})
    message = str(err.value)
    assert "2 of 2 samples failed" in message and "gave no answer in 1 attempt (judge.retries=0)" in message
    assert "Restart the judge's server or fix its URL" in message and "--resume auto" in message
    assert "Fix the function" not in message


def test_bad_judge_settings_are_named(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RewardError, match=r"does not serve judge.model='gpt-9'; it serves \['stub-judge'\]"):
        RewardService([judge(stub.url, model="gpt-9")])
    with pytest.raises(RewardError, match="judge.template does not parse"):
        RewardService([judge(stub.url, template="{{ prompt ")])
    with pytest.raises(RewardError, match="judge.pattern .* does not compile"):
        RewardService([judge(stub.url, pattern="score: (")])
    monkeypatch.delenv("JUDGE_KEY_FOR_TEST", raising=False)
    with pytest.raises(RewardError, match="JUDGE_KEY_FOR_TEST, which is not set"):
        RewardService([judge(stub.url, api_key_env="JUDGE_KEY_FOR_TEST")])
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-test")
    RewardService([judge(stub.url, api_key_env="JUDGE_KEY_FOR_TEST")]).score(
        ["q"], ["good 1"], columns={"answer": ["a"]}
    )
    assert stub.requests[-1]["authorization"] == "Bearer sk-test"


def test_a_template_without_the_completion_or_a_judge_without_a_url_is_refused(stub: Stub) -> None:
    with pytest.raises(RewardError, match=r"judge.template never names \{\{ completion \}\}, so every completion"):
        RewardService([judge(stub.url, template="Rate this answer to {{ prompt }}. Score: N")])
    for fn in ("sudoku_cells", "ftp://127.0.0.1:9/v1", "runs/rm"):
        with pytest.raises(RewardError, match=rf"fn is the http\(s\) base URL .* got '{fn}'"):
            RewardService([judge(fn)])
    assert not stub.requests  # refused before any request


def test_a_reward_entrys_kwargs_fill_the_template_for_every_sample(stub: Stub) -> None:
    spec = judge(stub.url, template="{{ rubric }} {{ marks|join('/') }} ({{ answer }}) ANSWER: {{ completion }}")
    spec.kwargs = {"rubric": "be strict", "marks": ["x", "y"]}  # a list as long as the batch is still one value
    result = RewardService([spec]).score(["q", "q"], ["good 1", "good 2"], columns={"answer": ["a", "b"]})
    assert result.parts["judge"] == [1.0, 2.0]
    assert sorted(r["messages"][-1]["content"] for r in stub.requests) == [
        "be strict x/y (a) ANSWER: good 1",
        "be strict x/y (b) ANSWER: good 2",
    ]


def test_a_chat_endpoint_without_a_judge_block_is_named(stub: Stub) -> None:
    """Without a judge block a /v1 URL is a plain reward endpoint: its answer names the block that was forgotten."""
    with pytest.raises(RewardError, match=r"answered HTTP 404.*give the reward entry a judge block"):
        RewardService([stub.url]).score(["q"], ["good 1"])


def test_a_judge_block_makes_a_url_a_judge() -> None:
    assert reward_kind(RewardSpec("http://127.0.0.1:9/v1", judge=JudgeConfig())) == "judge"
    assert reward_kind(RewardSpec("http://127.0.0.1:9/score")) == "http"
    assert reward_kind(RewardSpec("http://127.0.0.1:9/v1", kind="judge")) == "judge"


def test_validate_refuses_a_template_column_the_dataset_lacks_and_a_dead_url(capsys, stub: Stub) -> None:
    quick = str(ROOT / "configs" / "quickstart.yaml")
    entry = "reward.functions=[{fn: %s, name: judge, judge: {template: '%s'}}]"
    assert main(["validate", "--offline", quick, entry % (stub.url, "{{ completion }} vs {{ rubric }}")]) == 2
    err = capsys.readouterr().err
    assert "'judge' needs the dataset column(s) ['rubric']" in err and "judge.template" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["validate", "--offline", quick, entry % (stub.url, "{{ completion }} vs {{ answer }}")]) == 0
    assert "reward 'judge': ok (judge " in capsys.readouterr().out
    dead = "http://127.0.0.1:9/v1"
    assert main(["validate", "--offline", quick, entry % (dead, "{{ completion }}")]) == 2
    err = capsys.readouterr().err
    assert "reward 'judge' cannot run here: nothing answers at the judge endpoint http://127.0.0.1:9/v1" in err
    assert "vllm serve" in err
