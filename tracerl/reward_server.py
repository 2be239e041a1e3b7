"""A small reference HTTP reward server: serve any reward spec at ``POST /score`` (stdlib only).

Request: ``{"prompts": [...], "completions": [...], "completion_ids": [...]?, <column>: [...], ...}``.
Answer: ``200 {"rewards": [...]}`` (``null`` where the function returned None or NaN); ``400 {"error": ...}``
for a malformed request; ``422 {"error": ...}`` when the function fails (the message names it; a client
should not retry it, unlike a 5xx).
``GET /health`` answers ``{"ok": true, "reward": <name>}``. Binds 127.0.0.1 unless told otherwise; ``--verbose``
logs every request on stderr.

Example (shell): ``python -m tracerl.reward_server --reward math_verify --port 8000``, then point a run at
``http://127.0.0.1:8000/score``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tracerl.reward_service import RESERVED, RewardError, RewardService, RewardSpec

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 256 << 20  # refuse requests larger than this


def make_server(reward: str, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 300.0) -> ThreadingHTTPServer:
    """A server (not yet serving) for the reward spec ``reward``; ``port=0`` picks a free port.

    Raises:
        RewardError: the spec cannot be resolved, or a reward model's weights do not load.
        BindError: nothing can listen at ``host:port`` (the message names ``--host`` or ``--port``).
    """
    service = RewardService([RewardSpec(reward)], on_error="raise", timeout_s=timeout_s)
    service.load()  # a reward model's weights: a damaged one is refused here, not at every request
    handler = type("RewardHandler", (_Handler,), {"service": service})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise BindError(bind_error(err, host, port)) from err
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    service: RewardService

    def do_GET(self) -> None:  # http.server calls do_<METHOD>
        if self.path.rstrip("/") == "/health":
            self._send(200, {"ok": True, "reward": self.service.names[0]})
        else:
            self._send(404, {"error": f"unknown path {self.path}; POST /score or GET /health"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"unknown path {self.path}; POST to /score"})
            return
        try:
            request = self._read_json()
            columns = {k: v for k, v in request.items() if k not in RESERVED}
            result = self.service.score(
                request["prompts"], request["completions"], request.get("completion_ids"), columns
            )
        except _BadRequest as err:
            self._send(400, {"error": str(err)})
            return
        except RewardError as err:
            self._send(422, {"error": str(err)})
            return
        rewards = [None if math.isnan(v) else v for v in result.total]
        self._send(200, {"rewards": rewards})

    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            raise _BadRequest(f"send a JSON body of 1 to {MAX_BODY_BYTES} bytes with a Content-Length header")
        try:
            request = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _BadRequest(f"the body is not JSON: {err}") from None
        if not isinstance(request, dict) or not isinstance(request.get("completions"), list):
            raise _BadRequest('the body must be an object with a "completions" list (and "prompts")')
        request.setdefault("prompts", [""] * len(request["completions"]))
        return request

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the base class names it format
        log.debug("%s - %s", self.address_string(), format % args)


class _BadRequest(ValueError):
    pass


def _port(text: str) -> int:
    """``--port``: an integer in 0-65535 (argparse's type)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number; give 0-65535 (0: any free port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number; give 0-65535 (0: any free port)")
    return port


def _seconds(text: str) -> float:
    """``--timeout``: a positive number of seconds (argparse's type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number of seconds (e.g. 300)")
    return value


class BindError(OSError):
    """The server cannot listen at ``--host``/``--port``; the message names the flag and the fix."""


def bind_error(err: OSError, host: str, port: int) -> str:
    """The paragraph for a server that cannot bind ``host:port``, naming the flag at fault and the fix.

    Example:
        >>> import errno
        >>> bind_error(OSError(errno.EADDRINUSE, "Address already in use"), "127.0.0.1", 8000)[:52]
        'port 8000 on 127.0.0.1 is in use (--port 8000): stop'
    """
    if isinstance(err, socket.gaierror):
        return (
            f"--host '{host}' is not a name or address this machine can resolve ({err.strerror}); give an address "
            "of this machine: 127.0.0.1 (the default, loopback only), 0.0.0.0 (every interface) or one of its IP "
            "addresses."
        )
    if err.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (--port {port}): stop what holds it (perhaps another serve-reward), or "
            "give another port; --port 0 picks a free one and prints it."
        )
    if err.errno == errno.EADDRNOTAVAIL:
        return (
            f"--host '{host}' is not an address of this machine ({err.strerror}); give one of its own addresses: "
            "127.0.0.1 (the default, loopback only), 0.0.0.0 (every interface) or the IP of one of its interfaces."
        )
    if err.errno == errno.EACCES:
        return (
            f"--port {port} on {host} may not be bound by this user ({err.strerror}; ports below 1024 need "
            "privileges): give a port of 1024 or more, or --port 0 for any free one."
        )
    return f"cannot serve at --host {host} --port {port}: {err.strerror or err}. Check both flags."


def main(argv: list[str] | None = None) -> int:
    """``tracerl serve-reward``: serve ``--reward SPEC`` until interrupted; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="tracerl serve-reward",
        description=__doc__.splitlines()[0],
        epilog="--debug and --verbose go before or after the command, as for every tracerl command.",
    )
    parser.add_argument("--reward", required=True, help="registered name, pkg.module:fn, path/file.py:fn or URL")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=_port, default=8000, help="port to bind, 0-65535 (0: any free port)")
    parser.add_argument("--timeout", type=_seconds, default=300.0, help="seconds one scoring call may take")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr (status, bytes)")
    args = parser.parse_args(argv)
    if args.verbose:  # one line per request: '127.0.0.1 - "POST /score HTTP/1.1" 200 31'
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    try:
        server = make_server(args.reward, args.host, args.port, args.timeout)
    except RewardError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except BindError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving reward '{args.reward}' at http://{host}:{port}/score (Ctrl-C to stop)", flush=True)
    if not (host in ("localhost", "::1") or str(host).startswith("127.")):
        print(
            f"note: --host {args.host} is open beyond this machine: whoever reaches port {port} can have the reward "
            "score what they send (no authentication). Bind 127.0.0.1 and tunnel (ssh -L) where that matters.",
            flush=True,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
