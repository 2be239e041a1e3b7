"""Reward specs and how they resolve to functions (DESIGN §9, §19), and the per-process setup of reward workers.

A reward function is named by a registered name (``math_verify``), an import path (``my_pkg.rewards:score``),
a file (``./my_reward.py:score``) or an HTTP endpoint (``http://host:port/score``); a factory (a function that
builds the reward function) takes ``factory_kwargs``. Learned rewards resolve to functions with the same
contract: a sequence-classification reward model (a model directory or hub id, TRL's spelling) and a generative
judge behind an OpenAI-compatible chat endpoint (``tracerl.reward_models``). ``prepare_process`` imports
``reward.imports`` and sets the code sandbox's policy; the driver and every reward worker call it before names
are resolved.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tracerl.config import JudgeConfig, RewardModelConfig

KINDS = ("function", "http", "model", "judge")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # organisation/name


@dataclass
class RewardSpec:
    """One reward function of a run and how it counts."""

    fn: str | Callable[..., Any]  # registered name, "pkg.module:fn", "file.py:fn", URL, model dir, hub id, callable
    weight: float = 1.0  # its weight in the total (total = sum of weight * reward; 0: logged, not optimised)
    name: str | None = None  # name in metrics (reward/<name>/mean); default derived from fn
    kwargs: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments for every call (win over columns)
    completion_format: Literal["as_given", "chat", "text"] = "as_given"  # chat: wrap strings as assistant messages
    factory_kwargs: dict[str, Any] | None = None  # fn is a factory: the reward is fn(**factory_kwargs)
    kind: Literal["auto", "function", "http", "model", "judge"] = "auto"  # auto: see reward_kind
    model: RewardModelConfig | None = None  # settings of a sequence-classification reward model
    judge: JudgeConfig | None = None  # settings of an OpenAI-compatible judge


def specs_from_config(reward: Any) -> list[RewardSpec]:
    """The ``RewardSpec`` of every entry of a ``RewardConfig`` (``reward.functions``)."""
    return [
        RewardSpec(
            f.fn, f.weight, f.name, dict(f.kwargs), f.completion_format, f.factory_kwargs, f.kind, f.model, f.judge
        )
        for f in reward.functions
    ]


class SampleErrors(Exception):
    """A reward function scored some samples and failed on others (a judge whose answer for one sample did not
    parse): ``values`` [N] with None where it failed, ``errors`` {sample index: why}. The service applies its error
    policy per sample: ``raise`` names the first failed sample, ``nan`` scores only the failed ones NaN."""

    fix = ""  # what to do where "fix the function" is not it (set when the samples failed as the server stopped)

    def __init__(self, values: list[float | None], errors: dict[int, str]) -> None:
        first = min(errors) if errors else None
        super().__init__(f"{len(errors)} of {len(values)} samples failed; sample {first}: {errors.get(first)}")
        self.values, self.errors = values, errors


class RewardError(RuntimeError):
    """A reward function failed, or could not be resolved; the message is one paragraph with the fix."""

    def __init__(
        self,
        detail: str,
        name: str | None = None,
        index: int | None = None,
        timed_out: bool = False,
        quote: str = "",
        returned: bool = False,
        fix: str = "",
    ):
        super().__init__(detail, name, index, timed_out, quote, returned, fix)
        self.detail, self.name, self.index, self.timed_out = detail, name, index, timed_out
        self.quote = quote  # the failing completion, quoted (shown with the index)
        self.returned = returned  # the function returned, but not one number per sample: wrong on any batch
        self.fix = fix  # what to do, where "fix the function" is not it (a server that stopped answering)

    def __str__(self) -> str:
        if self.name is None:
            return self.detail
        where = f" on sample {self.index}" if self.index is not None else ""
        quote = f" (completion {self.index}: {self.quote})" if self.quote and self.index is not None else ""
        fix = self.fix or "Fix the function"
        return (
            f"reward function '{self.name}' failed{where}: {self.detail}{quote} {fix}, or set "
            f"reward.on_error=nan to score such calls NaN and count them in reward/errors/{self.name}."
        )

    def shifted(self, offset: int) -> RewardError:
        """The same error with the sample index counted from ``offset`` (for a shard of a larger batch): every
        index in the message is the batch index."""
        index = None if self.index is None else self.index + offset
        return RewardError(self.detail, self.name, index, self.timed_out, self.quote, self.returned, self.fix)


# ---------------------------------------------------------------------------------------------- resolving


def reward_kind(spec: RewardSpec) -> str:
    """What a spec names: ``function`` (a callable, registered name, import path or file), ``http`` (a JSON
    endpoint), ``model`` (a sequence-classification reward model: a directory or an ``org/name`` hub id, TRL's
    spelling) or ``judge`` (an OpenAI-compatible chat endpoint). An explicit ``kind``, or a ``model`` / ``judge``
    block, decides; registered names come before directories of the same name.

    Example:
        >>> [reward_kind(RewardSpec(f)) for f in ("math_verify", "pkg.mod:fn", "http://h:1/score", "org/rm-7b")]
        ['function', 'function', 'http', 'model']
    """
    if spec.kind != "auto":
        return spec.kind
    if spec.judge is not None:
        return "judge"
    if spec.model is not None:
        return "model"
    if callable(spec.fn):
        return "function"
    text = str(spec.fn).strip()
    if text.startswith(("http://", "https://")):
        return "http"
    if ":" in text or text.endswith(".py"):
        return "function"
    import rewards

    if text in rewards.available_rewards():
        return "function"
    if os.path.isdir(os.path.expanduser(text)) or _HUB_ID.match(text) or _looks_local(text):
        return "model"
    return "function"  # resolves to an unknown-name error that lists every form


def _looks_local(text: str) -> bool:
    """A path that can only be local (absolute, ./, ~, or deeper than organisation/name)."""
    return text.startswith(("/", "./", "../", "~")) or text.count("/") >= 2


def default_name(spec: RewardSpec) -> str:
    """The metric name of a spec without resolving it (a model: its directory or hub name; a judge: ``judge``)."""
    kind = reward_kind(spec)
    if spec.name:
        return spec.name
    if kind == "model":
        return os.path.basename(os.path.normpath(os.path.expanduser(str(spec.fn))))
    if kind == "judge":
        return "judge"
    return resolve_reward(spec.fn)[0]


def resolve_spec(spec: RewardSpec, timeout_s: float = 30.0, http_retries: int = 2) -> tuple[str, Callable]:
    """``(default name, callable)`` for any kind of spec; a reward model reads its config and tokenizer here but
    loads its weights only when asked (``fn.load()``), so the driver and ``tracerl validate --offline`` stay light.

    Raises:
        RewardError: as ``resolve_reward``; or a reward model / judge whose settings cannot work, naming the fix.
    """
    kind = reward_kind(spec)
    if kind not in KINDS:
        raise RewardError(f"unknown reward kind '{kind}'; choose from {list(KINDS)} or auto.")
    if kind in ("function", "http"):
        if spec.model is not None or spec.judge is not None:
            raise RewardError(f"reward '{spec.fn}' is a {kind}: a model or judge block does not apply to it.")
        return resolve_reward(spec.fn, timeout_s, http_retries)
    name = default_name(spec)
    if kind == "model":
        from tracerl.reward_models.classifier import SequenceClassifierReward

        return name, SequenceClassifierReward(str(spec.fn), spec.model or RewardModelConfig(), name=name)
    from tracerl.reward_models.judge import JudgeReward

    return name, JudgeReward(str(spec.fn), spec.judge or JudgeConfig(), name=name, constants=spec.kwargs)


def resolve_reward(
    fn: str | Callable[..., Any], timeout_s: float = 30.0, http_retries: int = 2
) -> tuple[str, Callable]:
    """``(default name, callable)`` for a reward spec.

    Raises:
        RewardError: unknown name (lists the registered ones), missing file, module or attribute.
    """
    if callable(fn):
        return getattr(fn, "__name__", type(fn).__name__), fn
    spec = str(fn).strip()
    if spec.startswith(("http://", "https://")):
        _check_url(spec)
        reward = HttpReward(spec, timeout_s=timeout_s, retries=http_retries)
        return reward.__name__, reward
    if ":" in spec:
        location, attr = spec.rsplit(":", 1)
        if not location.strip() or not attr.strip():
            raise RewardError(
                f"reward '{spec}' names no {'module or file' if not location.strip() else 'function'}: write it as "
                "'pkg.module:function' or 'path/to/file.py:function'."
            )
        if location.endswith(".py") or "/" in location or os.sep in location:
            return attr, _attribute(_load_file(location, spec), attr, spec)
        try:
            module = importlib.import_module(location)
        except ImportError as err:
            raise RewardError(
                f"could not import module '{location}' for reward '{spec}': {err}. Is the package installed, "
                "or on PYTHONPATH? (A file is written 'path/to/file.py:function'.)"
            ) from err
        except (Exception, SystemExit) as err:  # SystemExit: a script's argparse or exit() at import time
            failure = _import_failure(err)
            raise RewardError(f"module '{location}' (reward '{spec}') failed to import: {failure}") from err
        return attr, _attribute(module, attr, spec)
    if spec.endswith(".py"):
        raise RewardError(f"reward '{spec}' names a file but no function: write it as '{spec}:function_name'.")
    import rewards

    try:
        return spec, rewards.get_reward(spec)
    except LookupError:
        raise RewardError(
            f"unknown reward '{spec}'; choose from {rewards.available_rewards()}, or give an import path "
            "'pkg.module:function', a file 'path/to/file.py:function', an endpoint 'http://host:port/score', or a "
            "reward model: an existing model directory or a hub id 'organisation/name' (kind: model)."
        ) from None


def _check_url(spec: str) -> None:
    """An endpoint URL that names a host (and a port, if any, that is a number)."""
    problem = None
    try:
        parsed = urllib.parse.urlsplit(spec)
        parsed.port  # noqa: B018 - raises on a port that is not a number
        if not parsed.hostname:
            problem = "it names no host"
    except ValueError as err:
        problem = str(err)
    if problem is not None:
        raise RewardError(
            f"reward endpoint '{spec}' is not a URL a request can go to ({problem}): write it as "
            "'http://host:port/score'."
        )


_FILE_MODULES: dict[str, Any] = {}
_FILE_LOCK = threading.Lock()


def _load_file(location: str, spec: str) -> Any:
    path = os.path.abspath(location)
    if not os.path.isfile(path):
        raise RewardError(
            f"reward file '{location}' (from '{spec}') does not exist: looked for {path}. Relative paths are "
            f"taken from the current directory ({os.getcwd()}); give the path of a .py file."
        )
    with _FILE_LOCK:
        if path not in _FILE_MODULES:
            name = f"tracerl_reward_file_{abs(hash(path)):x}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except (Exception, SystemExit) as err:  # SystemExit: a script's argparse or exit() at import time
                del sys.modules[name]
                raise RewardError(f"reward file {path} failed to import: {_import_failure(err)}") from err
            _FILE_MODULES[path] = module
        return _FILE_MODULES[path]


def _import_failure(err: BaseException) -> str:
    """What went wrong while a reward's module ran its top-level code, and for an exit the fix."""
    if isinstance(err, SystemExit):
        return (
            f"it exited while importing (SystemExit: {err.code}). Code that runs a script (argument parsing, "
            'exit()) belongs under `if __name__ == "__main__":`, so that importing the file only defines its '
            "functions."
        )
    return f"{type(err).__name__}: {err}"


def _attribute(module: Any, attr: str, spec: str) -> Callable:
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            functions = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and not isinstance(v, type)
            )
            raise RewardError(
                f"'{getattr(module, '__file__', None) or module.__name__}' has no function '{attr}' (from reward "
                f"'{spec}'); functions defined there: {functions}."
            )
    if not callable(target):
        raise RewardError(f"reward '{spec}' is a {type(target).__name__}, not a function.")
    return target


class EndpointDown(RuntimeError):
    """An HTTP reward endpoint that answered nothing (connection errors, timeouts, 5xx) through all its retries:
    the server, not the function, needs attention (``fix`` says what to do)."""

    fix = (
        "Restart the server (tracerl serve-reward --reward SPEC --port N) or fix the URL; a run stopped by this "
        "resumes from its last checkpoint with --resume auto"
    )


class HttpReward:
    """A reward function behind an HTTP endpoint: POST ``{"prompts", "completions", <columns>...}`` as JSON,
    receive ``{"rewards": [...]}`` (``null`` for None). Connection errors, timeouts and 5xx answers are retried
    ``retries`` times with exponential backoff; 4xx answers fail at once with the server's message."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.5) -> None:
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        parsed = urllib.parse.urlsplit(url)
        self.__name__ = parsed.netloc or url
        loopback = parsed.hostname in ("localhost", "::1") or (parsed.hostname or "").startswith("127.")
        handlers = [urllib.request.ProxyHandler({})] if loopback else []  # never send loopback through a proxy
        self._opener = urllib.request.build_opener(*handlers)
        self._loopback = loopback

    def _judge_hint(self) -> str:
        """A URL of an OpenAI-compatible chat endpoint given without a judge block is sent plain reward requests."""
        if urllib.parse.urlsplit(self.url).path.rstrip("/").endswith(("/v1", "/chat/completions")):
            return (
                " (a URL ending in /v1 is usually an OpenAI-compatible chat endpoint: to have a model judge the "
                "completions, give the reward entry a judge block, e.g. {fn: URL, judge: {}})"
            )
        return ""

    def preflight(self) -> None:
        """Something accepts connections at the endpoint's host and port (TCP connects for at most 5 s, so a server
        started just before may come up); called where a reward service starts, before any actor does. Left to the
        first request when a proxy carries it.

        Raises:
            RuntimeError: nothing answers there; the message says to start the server or fix the URL.
        """
        parsed = urllib.parse.urlsplit(self.url)
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        if not host or (
            not self._loopback
            and parsed.scheme in urllib.request.getproxies()
            and not urllib.request.proxy_bypass(host)
        ):
            return
        wait = min(5.0, self.timeout_s)
        deadline = time.monotonic() + wait
        while True:  # a server started just before the run may take a moment to listen
            try:
                socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())).close()
                return
            except ConnectionRefusedError:
                if time.monotonic() + 0.25 < deadline:
                    time.sleep(0.25)
                    continue
                why = f"connection refused for {wait:g} s"
            except OSError as err:
                why = f"{type(err).__name__}: {err}"
            raise RuntimeError(
                f"nothing answers at the reward endpoint {self.url} ({why}). Start the server (e.g. tracerl "
                "serve-reward --reward SPEC --port N) or fix the URL in reward.functions."
            )

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        body = json.dumps({"prompts": prompts, "completions": completions, **columns}, default=_json_default)
        request = urllib.request.Request(
            self.url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    answer = json.loads(raw)
                except ValueError:
                    text = raw.decode(errors="replace")[:200]
                    raise ValueError(f"endpoint {self.url} answered with something other than JSON: {text!r}") from None
                break
            except urllib.error.HTTPError as err:
                text = err.read().decode(errors="replace")[:500]
                if err.code < 500:
                    raise RuntimeError(
                        f"endpoint {self.url} answered HTTP {err.code}: {text}{self._judge_hint()}"
                    ) from None
                last = f"HTTP {err.code}: {text}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        else:
            raise EndpointDown(f"endpoint {self.url} failed after {self.retries + 1} attempts; last error: {last}")
        if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            raise ValueError(
                f'endpoint {self.url} must answer {{"rewards": [...]}}, got {str(answer)[:200]}{self._judge_hint()}'
            )
        return answer["rewards"]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"a value of type {type(obj).__name__} cannot be sent as JSON")


def prepare_process(imports: Sequence[str] = (), sandbox: dict[str, Any] | None = None) -> None:
    """Per-process setup, done in the driver and in every reward worker before names are resolved: import the
    modules of ``reward.imports`` (their ``@register_reward`` functions become names) and set the code
    sandbox's policy (``rewards.sandbox.configure``).

    Raises:
        RewardError: a module does not import, or the sandbox settings are invalid.
    """
    for module in imports:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any failure of the user's module is reported as is
            raise RewardError(
                f"could not import module '{module}' listed in reward.imports: {type(err).__name__}: {err}. The "
                "module must be importable in the driver and in every reward worker (installed, or on PYTHONPATH)."
            ) from err
    if sandbox is not None:
        from rewards.sandbox import configure

        try:
            configure(**sandbox)
        except ValueError as err:
            raise RewardError(f"reward.sandbox: {err}") from None


def build_reward(fn: Callable, spec: RewardSpec) -> Callable:
    """The reward function itself: ``fn`` or, for a factory, what ``fn(**spec.factory_kwargs)`` returns."""
    if spec.factory_kwargs is None:
        return fn
    try:
        built = fn(**spec.factory_kwargs)
    except Exception as err:  # noqa: BLE001 - the factory's own error, named
        raise RewardError(
            f"reward factory '{spec.fn}' failed with factory_kwargs={spec.factory_kwargs}: {type(err).__name__}: "
            f"{err}. Give the arguments it takes."
        ) from err
    if not callable(built):
        raise RewardError(
            f"reward '{spec.fn}' with factory_kwargs returned a {type(built).__name__}, not a reward function; "
            "drop factory_kwargs if it is a reward function itself."
        )
    return built


def run_preflight(fn: Callable, name: str) -> None:
    """Run a reward's own start-up check (``fn.preflight()``, e.g. the code sandbox's isolation level)."""
    check = getattr(fn, "preflight", None)
    if not callable(check):
        return
    try:
        check()
    except Exception as err:  # noqa: BLE001 - whatever the check raises, it is why the reward cannot run
        raise RewardError(f"reward '{name}' cannot run here: {err}") from err
