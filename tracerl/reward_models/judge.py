"""A generative judge as a reward function (DESIGN §19): an OpenAI-compatible chat endpoint (what vLLM and SGLang
serve at ``/v1``) reads a prompt built from a template and answers with a score.

Per sample: the template (Jinja, over ``prompt``, ``completion`` and any dataset column) becomes the user message;
``POST <url>/chat/completions``; the answer's score is read with a regex (the last match) or from a JSON field.
At most ``concurrency`` requests are in flight; a request that times out, cannot connect or gets 429 / 5xx is
retried ``retries`` times with exponential backoff; a 4xx answer fails its sample at once. Samples whose request
or parse failed are reported together (``SampleErrors``), so the service's error policy applies per sample:
``raise`` names the first, ``nan`` scores just those NaN and counts them in ``reward/errors/<name>``. When the
endpoint cannot be reached at all, the samples not yet sent fail at once with the same reason.

Standard library and Jinja only: reward workers that run a judge never import torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tracerl.config import JudgeConfig
from tracerl.reward_resolve import EndpointDown, RewardError, SampleErrors

RETRIED_HTTP = (408, 429, 500, 502, 503, 504)


def parse_regex(text: str, pattern: re.Pattern[str]) -> float:
    """The score in a judge's answer: the last match of ``pattern`` (its first group, or the whole match).

    Example:
        >>> parse_regex("Score: 3. On reflection, Score: 7/10", re.compile(r"(?i)score\\W*?(-?\\d+(?:\\.\\d+)?)"))
        7.0
    """
    matches = list(pattern.finditer(text))
    if not matches:
        raise ValueError(f"no match of {pattern.pattern!r} in the judge's answer {text[:200]!r}")
    last = matches[-1]
    return _finite(last.group(1) if pattern.groups else last.group(0), text)


def parse_json(text: str, field: str) -> float:
    """The score in a judge's answer that holds a JSON object (alone, in a code fence, or inside prose):
    ``field`` is a key, or ``a.b`` for a nested one.

    Example:
        >>> parse_json('Here: ```json\\n{"verdict": {"score": 4}}\\n```', "verdict.score")
        4.0
    """
    start, end = text.find("{"), text.rfind("}")
    try:
        value: Any = json.loads(text[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"no JSON object in the judge's answer {text[:200]!r}")
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"the judge's JSON answer has no field '{field}': {text[:200]!r}")
        value = value[key]
    return _finite(value, text)


def _finite(value: Any, text: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the judge's score {value!r} is not a number (answer {text[:200]!r})") from None
    if not math.isfinite(number):
        raise ValueError(f"the judge's score {number} is not finite (answer {text[:200]!r})")
    return number


class _Unreachable(EndpointDown):
    """The endpoint could not be reached after every retry: the samples not yet sent fail with the same reason."""

    fix = (
        "Restart the judge's server or fix its URL (a run stopped by this resumes from its last checkpoint with "
        "--resume auto), raise judge.retries / judge.request_timeout_s for a slow one"
    )


class JudgeReward:
    """A reward function that asks an OpenAI-compatible chat endpoint to score each completion.

    Args:
        url: the endpoint's base URL (``http://host:8000/v1``; a trailing ``/chat/completions`` is accepted).
        options: ``JudgeConfig`` (model, template, parser, concurrency, timeouts, retries, API-key variable).
        name: the reward's name in metrics and errors.
        constants: names of the reward entry's ``kwargs``, passed to the template as they are (not per sample).
    Raises:
        RewardError: a template that does not parse, a pattern that does not compile, an API-key variable that
            is not set.
    """

    remote = True  # its failures are not re-run sample by sample to find the culprit (the server would pay)

    def __init__(
        self, url: str, options: JudgeConfig, name: str = "judge", constants: dict[str, Any] | None = None
    ) -> None:
        self.options, self.__name__ = options, name
        self.constants = frozenset(constants or ())  # the reward entry's kwargs: the same for every sample
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RewardError(
                f"judge '{name}': with a judge block, fn is the http(s) base URL of an OpenAI-compatible chat "
                f"endpoint (e.g. http://localhost:8000/v1, as vllm serve prints it), got {str(url)!r}. Give the "
                "endpoint's URL, or drop the judge block for a reward function."
            )
        self.base = url.rstrip("/").removesuffix("/chat/completions").rstrip("/")
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        try:
            self.template = env.from_string(options.template)
            variables = meta.find_undeclared_variables(env.parse(options.template))
        except TemplateError as err:
            raise RewardError(f"judge '{name}': judge.template does not parse: {err}.") from None
        if "completion" not in variables:
            raise RewardError(
                f"judge '{name}': judge.template never names {{{{ completion }}}}, so every completion of a prompt "
                "would be sent as the same request and get the same score. Put {{ completion }} where the judge "
                "should read the answer."
            )
        self.required_columns = frozenset(variables - {"prompt", "completion"})  # checked against the dataset
        if options.parser == "regex":
            try:
                self.pattern = re.compile(options.pattern)
            except re.error as err:
                detail = f"judge.pattern {options.pattern!r} does not compile: {err}"
                raise RewardError(f"judge '{name}': {detail}.") from None
        self.headers = {"Content-Type": "application/json"}
        if options.api_key_env:
            key = os.environ.get(options.api_key_env)
            if not key:
                raise RewardError(
                    f"judge '{name}': judge.api_key_env names the environment variable {options.api_key_env}, which "
                    "is not set (in the driver and every reward worker); export it, or drop api_key_env."
                )
            self.headers["Authorization"] = f"Bearer {key}"
        host = urllib.parse.urlsplit(self.base).hostname or ""
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))
        self._model: str | None = None  # judge.model once checked against the endpoint
        self._lock = threading.Lock()

    # -- the endpoint -----------------------------------------------------------------------------------------

    def preflight(self) -> None:
        """The endpoint answers ``GET <url>/models`` and serves ``judge.model`` (or exactly one model when it is
        not set); called where a reward service starts, before any actor does.

        Raises:
            RuntimeError: nothing answers, or the model is not served; the message says what to start or set.
        """
        self.model_name()

    def describe(self) -> str:
        """What was checked, for ``tracerl validate``."""
        columns = f", columns {sorted(self.required_columns)}" if self.required_columns else ""
        return f"judge {self.base}, model {self.model_name()}, {self.options.parser} parser{columns}"

    def model_name(self) -> str:
        """``judge.model``, checked against what the endpoint lists; or the only model it serves."""
        with self._lock:
            if self._model is not None:
                return self._model
            wanted, served = self.options.model, self._served()
            if wanted is None:
                if served is None or len(served) != 1:
                    listed = "does not list its models" if served is None else f"serves {served}"
                    raise RuntimeError(f"the endpoint {self.base} {listed}: set judge.model to the one to ask.")
                wanted = served[0]
            elif served is not None and wanted not in served:
                raise RuntimeError(
                    f"the endpoint {self.base} does not serve judge.model='{wanted}'; it serves {served}."
                )
            self._model = wanted
            return wanted

    def _served(self) -> list[str] | None:
        """Model ids from ``GET /models``; None when the server has no such route."""
        request = urllib.request.Request(f"{self.base}/models", headers=self.headers, method="GET")
        try:
            with self._opener.open(request, timeout=min(self.options.request_timeout_s, 10.0)) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise RuntimeError(f"the judge endpoint {self.base} answered HTTP {err.code} to GET /models.") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
            raise _Unreachable(
                f"nothing answers at the judge endpoint {self.base} ({type(err).__name__}: "
                f"{getattr(err, 'reason', err)}). Start the OpenAI-compatible server (e.g. 'vllm serve MODEL "
                "--port 8000') and give its base URL, e.g. http://127.0.0.1:8000/v1."
            ) from None
        return [str(m.get("id")) for m in answer.get("data", [])] if isinstance(answer, dict) else None

    def ask(self, content: str) -> str:
        """One chat completion (with retries); the text of the first choice."""
        o = self.options
        messages = ([{"role": "system", "content": o.system}] if o.system else []) + [
            {"role": "user", "content": content}
        ]
        body = {"model": self.model_name(), "messages": messages, "max_tokens": o.max_tokens}
        body["temperature"] = o.temperature
        request = urllib.request.Request(
            f"{self.base}/chat/completions", data=json.dumps(body).encode(), headers=self.headers, method="POST"
        )
        last = ""
        for attempt in range(o.retries + 1):
            if attempt:
                time.sleep(o.backoff_s * 2 ** (attempt - 1))
            try:
                with self._opener.open(request, timeout=o.request_timeout_s) as response:
                    answer = json.loads(response.read())
                return str(answer["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as err:
                text = err.read().decode(errors="replace")[:300]
                if err.code not in RETRIED_HTTP:
                    raise RuntimeError(f"the judge endpoint answered HTTP {err.code}: {text}") from None
                last = f"HTTP {err.code}: {text}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
                raise RuntimeError(f"the judge endpoint's answer is not a chat completion ({err!r})") from None
        tries = f"{o.retries + 1} attempt{'s' if o.retries else ''}"
        raise _Unreachable(f"{self.base} gave no answer in {tries} (judge.retries={o.retries}); last: {last}")

    # -- scoring ----------------------------------------------------------------------------------------------

    def parse(self, text: str) -> float:
        """The score in one answer (``judge.parser``)."""
        if self.options.parser == "json":
            return parse_json(text, self.options.json_field)
        return parse_regex(text, self.pattern)

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        """One score per sample; failed samples are reported together as ``SampleErrors``."""
        n = len(completions)
        contents = []
        for i in range(n):
            # dataset columns hold one value per sample; the reward entry's kwargs are the same for every sample
            values = {
                k: v if k in self.constants else v[i]
                for k, v in columns.items()
                if k in self.constants or isinstance(v, list | tuple) and len(v) == n
            }
            values |= {"prompt": _text(prompts[i]), "completion": _text(completions[i])}
            try:
                contents.append(self.template.render(values))
            except TemplateError as err:
                raise RewardError(f"judge.template cannot be filled for sample {i}: {err}.") from None
        scores: list[float | None] = [None] * n
        errors: dict[int, str] = {}
        dead: list[str] = []  # set once the endpoint is unreachable: later samples are not sent

        def one(i: int) -> None:
            if dead:
                errors[i] = dead[0]
                return
            try:
                scores[i] = self.parse(self.ask(contents[i]))
            except _Unreachable as err:
                dead.append(str(err))
                errors[i] = str(err)
            except (RuntimeError, ValueError) as err:
                errors[i] = str(err)

        with ThreadPoolExecutor(max_workers=min(self.options.concurrency, max(1, n))) as pool:
            list(pool.map(one, range(n)))
        if errors:
            failed = SampleErrors(scores, errors)
            if dead:
                failed.fix = _Unreachable.fix
            raise failed
        return [float(s) for s in scores]


def _text(x: Any) -> str:
    if isinstance(x, list):  # chat messages: their contents in order
        return "\n".join(str(m.get("content", "")) for m in x)
    return str(x)
