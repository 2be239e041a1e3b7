"""A small reference HTTP reward server: serve any reward spec at ``POST /score`` (stdlib only).

Request: ``{"prompts": [...], "completions": [...], "completion_ids": [...]?, <column>: [...], ...}``.
Answer: ``200 {"rewards": [...]}`` (``null`` where the function returned None or NaN); ``400 {"error": ...}``
for a malformed request; ``422 {"error": ...}`` when the function fails (the message names it; a client
should not retry it, unlike a 5xx).
``GET /health`` answers ``{"ok": true, "reward": <name>}``. Binds 127.0.0.1 unless told otherwise.

Example (shell): ``python -m tracerl.reward_server --reward math_verify --port 8000``, then point a run at
``http://127.0.0.1:8000/score``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tracerl.reward_service import RESERVED, RewardError, RewardService, RewardSpec

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 256 << 20  # refuse requests larger than this


def make_server(reward: str, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 300.0) -> ThreadingHTTPServer:
    """A server (not yet serving) for the reward spec ``reward``; ``port=0`` picks a free port.

    Raises:
        RewardError: the spec cannot be resolved.
    """
    service = RewardService([RewardSpec(reward)], on_error="raise", timeout_s=timeout_s)
    handler = type("RewardHandler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
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


def main(argv: list[str] | None = None) -> int:
    """``tracerl serve-reward``: serve ``--reward SPEC`` until interrupted; returns the exit code."""
    parser = argparse.ArgumentParser(prog="tracerl serve-reward", description=__doc__.splitlines()[0])
    parser.add_argument("--reward", required=True, help="registered name, pkg.module:fn, path/file.py:fn or URL")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one scoring call may take")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.reward, args.host, args.port, args.timeout)
    except (RewardError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving reward '{args.reward}' at http://{host}:{port}/score (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
