"""The sandbox attack matrix (docs/rewards.md has the table of results).

Each attack is a program defining ``f()``, which returns True when the attack worked; its unit test is
``assert f()``. Contained, the code reward scores it 0.0. Where running it without isolation is harmless to
the host, the same program is also run with ``isolation="none"`` and must then succeed: that shows each
attack is real here and that the 0.0 comes from the containment, not from a broken program.
Bounded: every program runs under small CPU, wall-clock and memory limits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import site
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import rewards
from rewards import sandbox as sandbox_module
from rewards.code import code_reward
from rewards.isolation import installation_paths
from rewards.sandbox import Limits, Sandbox, SandboxError, check_isolation, configure, isolation, policy

FAST = {"cpu_s": 1.0, "wall_s": 3.0, "memory_mb": 256}
ISOLATION = isolation()
FULL = all(getattr(ISOLATION, layer) for layer in sandbox_module.LEVELS["full"])
needs_full = pytest.mark.skipif(not FULL, reason=f"full isolation is not available here ({ISOLATION.notes})")
REPO = Path(rewards.__file__).resolve().parent.parent
SECRET = "fake-wandb-key-9f3c"
HOST = socket.gethostname()
EDITABLE = any(  # an editable install of this checkout: its finder names the checkout's path
    name.startswith("__editable__") for folder in site.getsitepackages() if os.path.isdir(folder)
    for name in os.listdir(folder)
)  # fmt: skip


@dataclass(frozen=True)
class Bait:
    """Host things a program must not reach."""

    folder: Path  # on the reward process's sys.path (as PYTHONPATH folders and the driver's folder are)
    key: Path  # a fake SSH key in it
    unix_socket: Path  # a listening unix socket in it
    tmp_socket: Path  # a listening unix socket in the host's /tmp (where Ray keeps its sockets)
    abstract: str  # a listening abstract unix socket name
    tcp_port: int  # a TCP listener on 127.0.0.1
    udp_port: int  # a UDP socket on 127.0.0.1
    sleeper: int  # pid of a host process to signal
    connections: list  # what the listeners saw (must stay empty)
    keyring: str = ""  # description of a key in this process's session keyring (payload KEY_PAYLOAD)


@pytest.fixture(scope="module")
def bait(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bait]:
    folder = tmp_path_factory.mktemp("bait")
    key = folder / "id_rsa"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n")
    seen: list = []
    listeners = []
    unix_path, tmp_path = folder / "agent.sock", Path(f"/tmp/tracerl-attack-{uuid.uuid4().hex[:8]}.sock")
    abstract = f"tracerl-attack-{uuid.uuid4().hex[:8]}"
    for family, address in (
        (socket.AF_UNIX, str(unix_path)),
        (socket.AF_UNIX, str(tmp_path)),
        (socket.AF_UNIX, "\0" + abstract),
        (socket.AF_INET, ("127.0.0.1", 0)),
    ):
        server = socket.socket(family, socket.SOCK_STREAM)
        server.bind(address)
        server.listen()
        server.settimeout(0.1)
        listeners.append(server)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.1)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for server in listeners:
                with contextlib.suppress(TimeoutError, OSError):
                    seen.append(server.accept()[0].recv(64))
            with contextlib.suppress(TimeoutError, OSError):
                seen.append(udp.recv(64))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sleeper = subprocess.Popen(["sleep", "300"], env={**os.environ, "WANDB_API_KEY": SECRET})  # a host process
    sys.path.insert(0, str(folder))
    description = f"tracerl-bait-{uuid.uuid4().hex[:8]}"
    planted = _keyctl("add_key", b"user", description.encode(), KEY_PAYLOAD, len(KEY_PAYLOAD), KEY_SPEC_SESSION)
    try:
        yield Bait(
            folder,
            key,
            unix_path,
            tmp_path,
            abstract,
            listeners[3].getsockname()[1],
            udp.getsockname()[1],
            sleeper.pid,
            seen,
            description if planted > 0 else "",
        )
    finally:
        if planted > 0:
            _keyctl("keyctl", KEYCTL_INVALIDATE, planted)
        sys.path.remove(str(folder))
        stop.set()
        watcher.join()
        for server in [*listeners, udp]:
            server.close()
        tmp_path.unlink(missing_ok=True)
        sleeper.kill()
        sleeper.wait()


KEY_PAYLOAD = b"keyring-secret-5e1f"
KEY_SPEC_SESSION, KEY_SPEC_USER, KEYCTL_READ, KEYCTL_INVALIDATE = -3, -4, 11, 21
_KEY_CALLS = {"x86_64": {"add_key": 248, "request_key": 249, "keyctl": 250}}.get(os.uname().machine, {})
# a program's way to the kernel keyrings (it reads a key by description from the keyrings it can search)
KEY_READER = (
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nL = ctypes.c_long\n"
    "def read_key(description):\n"
    f"    serial = libc.syscall(L({_KEY_CALLS.get('request_key', -1)}), b'user', description.encode(), None, L(0))\n"
    "    buffer = ctypes.create_string_buffer(64)\n"
    f"    size = libc.syscall(L({_KEY_CALLS.get('keyctl', -1)}), L({KEYCTL_READ}), L(serial), buffer, L(64))\n"
    "    return buffer.raw[:max(size, 0)] if serial > 0 else b''\n"
)


def _keyctl(call: str, *args: object) -> int:
    """A keyring system call from this process (-1 where the machine is not known here)."""
    if call not in _KEY_CALLS:
        return -1
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(ctypes.c_long(_KEY_CALLS[call]), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])


def _home_entries() -> list[str]:
    """Entries of the home directory that are not on the way to the interpreter's installation."""
    home = Path.home().resolve()
    on_the_way = {
        Path(p).resolve().relative_to(home).parts[0]
        for p in installation_paths()
        if Path(p).resolve().is_relative_to(home) and Path(p).resolve() != home
    }
    return sorted(set(os.listdir(home)) - on_the_way) if home != Path("/") else []


def attacks(b: Bait) -> dict[str, tuple[str, bool]]:
    """name -> (program defining f(), whether running it uncontained is harmless to the host)."""
    home, entries = str(Path.home()), _home_entries()
    return {
        "read a key in a sys.path folder": (f"def f():\n    return 'PRIVATE KEY' in open({str(b.key)!r}).read()", True),
        "list a PYTHONPATH folder": (
            f"import os\ndef f():\n    return 'id_rsa' in os.listdir({str(b.folder)!r})",
            True,
        ),
        "list the driver's folder": (
            f"import os\ndef f():\n    return 'test_sandbox_attacks.py' in os.listdir({str(Path(__file__).parent)!r})",
            True,
        ),
        "read the repository": (
            f"def f():\n    return 'tracerl' in open({str(REPO / 'pyproject.toml')!r}).read()",
            True,
        ),
        "list the home directory": (
            f"import os\ndef f():\n    return bool(set(os.listdir({home!r})) & set({entries!r}))",
            True,
        ),
        "read /etc": ("def f():\n    return len(open('/etc/passwd').read()) > 0", True),
        "write into a sys.path folder": (
            f"def f():\n    open({str(b.folder / 'planted.py')!r}, 'w').write('x')\n    return True",
            False,
        ),
        "symlink to a host file": (
            f"import os\ndef f():\n    os.symlink({str(b.key)!r}, 'link')\n    return 'PRIVATE' in open('link').read()",
            True,
        ),
        "a host path through /proc/<pid>/root": (
            f"def f():\n    path = '/proc/{b.sleeper}/root' + {str(REPO / 'pyproject.toml')!r}\n"
            "    return 'tracerl' in open(path).read()",
            True,
        ),
        # the environment is scrubbed at every isolation level, so there is no uncontained control
        "read the environment": (
            f"import os\ndef f():\n    return os.environ.get('WANDB_API_KEY') == {SECRET!r}",
            False,
        ),
        "read a host process's /proc environ": (
            f"def f():\n    return {SECRET!r}.encode() in open('/proc/{b.sleeper}/environ', 'rb').read()",
            True,
        ),
        "scan every /proc/*/environ": (
            "import os\ndef f():\n    for pid in filter(str.isdigit, os.listdir('/proc')):\n        try:\n"
            f"            if {SECRET!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read():\n"
            "                return True\n        except OSError:\n            pass\n    return False",
            True,
        ),
        "signal a host process": (f"import os\ndef f():\n    os.kill({b.sleeper}, 9)\n    return True", False),
        "connect to a unix socket in a sys.path folder": (
            f"import socket\ndef f():\n    s = socket.socket(socket.AF_UNIX)\n    s.connect({str(b.unix_socket)!r})\n"
            "    s.sendall(b'unix')\n    return True",
            False,
        ),
        "connect to a unix socket in /tmp": (
            f"import socket\ndef f():\n    s = socket.socket(socket.AF_UNIX)\n    s.connect({str(b.tmp_socket)!r})\n"
            "    s.sendall(b'tmp')\n    return True",
            False,
        ),
        "connect to an abstract unix socket": (
            f"import socket\ndef f():\n    s = socket.socket(socket.AF_UNIX)\n    s.connect('\\0' + {b.abstract!r})\n"
            "    s.sendall(b'abstract')\n    return True",
            False,
        ),
        "connect to 127.0.0.1 over TCP": (
            f"import socket\ndef f():\n    socket.create_connection(('127.0.0.1', {b.tcp_port}), timeout=1)"
            ".sendall(b'tcp')\n    return True",
            False,
        ),
        "send UDP to 127.0.0.1": (
            "import socket\ndef f():\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"    s.sendto(b'udp', ('127.0.0.1', {b.udp_port}))\n    return True",
            False,
        ),
        "fork bomb": (
            "import os, time\ncount = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n"
            "            time.sleep(5)\n            os._exit(0)\n        count += 1\n    except OSError:\n"
            "        break\n"
            "def f():\n    return count > 1000",
            False,
        ),
        "read a key in the reward process's session keyring": (
            KEY_READER + f"def f():\n    return read_key({b.keyring!r}) == {KEY_PAYLOAD!r}",
            bool(b.keyring),
        ),
        "list the reward process's keys in /proc/keys": (
            f"def f():\n    return {b.keyring!r} in open('/proc/keys').read()",
            bool(b.keyring),
        ),
        "create a user namespace": (
            "import ctypes\ndef f():\n    return ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0",
            True,
        ),
        "clone a child into new namespaces": (
            "import ctypes, os\ndef f():\n    libc = ctypes.CDLL(None, use_errno=True)\n"
            f"    pid = libc.syscall(ctypes.c_long({56 if os.uname().machine == 'x86_64' else 220}), "
            "ctypes.c_long(0x10000000 | 0x20000000 | 17), None, None, None, None)\n"
            "    if pid == 0:\n        os._exit(0)\n    return pid > 0 and os.waitpid(pid, 0)[1] == 0",
            True,
        ),
        "open a unix socket of its own": (
            "import socket\ndef f():\n    return bool(socket.socket(socket.AF_UNIX))",
            True,
        ),
        "read the host's name": (f"import socket\ndef f():\n    return socket.gethostname() == {HOST!r}", True),
        # the finder maps package names to the checkout's source folders (the interpreter's own path stays visible)
        "read the editable install's map of the checkout": (
            "import os, site\ndef f():\n    for folder in site.getsitepackages():\n"
            "        for top, _, files in os.walk(folder):\n            for name in files:\n"
            "                if name.startswith('__editable__') or name == 'direct_url.json':\n"
            "                    text = open(os.path.join(top, name), errors='replace').read()\n"
            f"                    if {str(REPO / 'tracerl')!r} in text:\n                        return True\n"
            "    return False",
            EDITABLE,
        ),
        # all 8 must hold their 200 MB at the same time (the OOM killer may kill earlier ones to make room)
        "8 processes x 200 MB": (
            "import os\nheld = 0\ngo, hold = os.pipe()\nfor _ in range(8):\n    r, w = os.pipe()\n"
            "    if os.fork() == 0:\n        b = bytearray(200 * 2**20)\n        b[::4096] = b'x' * len(b[::4096])\n"
            "        os.write(w, b'1')\n        os.read(go, 1)\n        os._exit(0)\n"
            "    os.close(w)\n    held += len(os.read(r, 1))\n"
            "def f():\n    return held == 8 and os.waitpid(-1, os.WNOHANG) == (0, 0)",
            True,
        ),
    }


def _run(program: str, box: Sandbox) -> bytes:
    return box.run(program + "\nprint(f())").stdout


NAMES = list(attacks(Bait(*[Path("/")] * 4, "", 0, 0, 0, [], "x")))  # the attack names (no bait needed for them)


@needs_full
@pytest.mark.parametrize("name", NAMES)
def test_attack_is_contained(name: str, bait: Bait, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    program, harmless = attacks(bait)[name]
    limits = {**FAST, "wall_s": 4.0, "total_memory_mb": 512}
    assert code_reward(["p"], [program], tests=[["assert f()"]], **limits) == [0.0]
    if ISOLATION.memory_cgroup or name != "8 processes x 200 MB":
        with Sandbox(Limits(**limits)) as box:
            assert not _run(program, box).startswith(b"True")
    time.sleep(0.2)  # the listeners poll every 0.1 s
    assert bait.connections == []
    assert os.path.exists(f"/proc/{bait.sleeper}")  # still alive
    assert not (bait.folder / "planted.py").exists()
    if harmless:  # uncontained, the same program gets through: the attack is real on this machine
        loose = {**limits, "cpu_s": 10.0, "wall_s": 30.0, "memory_mb": 512}  # slack for a busy machine
        with Sandbox(Limits(**loose), isolation="none", min_isolation="none") as box:
            assert _run(program, box).startswith(b"True"), name


@needs_full
def test_ordinary_programs_still_pass() -> None:
    program = "import numpy, json, os\ndef f():\n    return int(numpy.arange(4).sum()) + len(os.listdir('.'))"
    assert code_reward(["p"], [program], tests=[["assert f() == 7"]], **FAST) == [1.0]


@needs_full
def test_a_stderr_flood_stops_at_the_output_cap() -> None:
    start = time.monotonic()
    with Sandbox(Limits(**FAST, max_output_bytes=1 << 20)) as box:
        result = box.run("import sys\nwhile True:\n    sys.stderr.write('x' * 2**20)")
    assert result.status == "output_limit" and time.monotonic() - start < FAST["wall_s"]
    # the wrapper was not left blocked on the full pipe until the 2 s grace ran out and it had to be SIGKILLed
    assert result.returncode != -signal.SIGKILL


@needs_full
def test_a_daemon_that_left_the_process_group_dies_with_the_program() -> None:
    program = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(30)\n"
        "    os._exit(0)\nprint('parent done')"
    )
    with Sandbox(Limits(**FAST)) as box:
        assert box.run(program).stdout == b"parent done\n"
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if 900_000 <= os.stat(f"/proc/{pid}").st_uid < 904_096:
                alive.append(pid)
        except FileNotFoundError:
            pass
    assert alive == []


@needs_full
def test_a_pythonpath_under_tmp_keeps_full_isolation(tmp_path: Path) -> None:
    probe = "from rewards.sandbox import check_isolation; print(check_isolation('full'))"
    env = {**os.environ, "PYTHONPATH": f"/tmp:{tmp_path}:{REPO}"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "separate_user=True, network=True, filesystem=True, pid_namespace=True, process_limit=True" in out.stdout


@needs_full
def test_below_the_minimum_level_no_program_runs(caplog: pytest.LogCaptureFixture) -> None:
    with Sandbox(Limits(**FAST), isolation="none") as box, pytest.raises(SandboxError) as err:
        box.run("print(1)")
    message = str(err.value)
    assert "minimum isolation level 'full'" in message and "reward.sandbox.min_isolation=none" in message
    with pytest.raises(SandboxError):
        check_isolation(mode="none")
    caplog.set_level(logging.WARNING, logger="rewards.sandbox")
    try:
        configure(min_isolation="none")  # explicit and logged
        assert "lowered to 'none'" in caplog.text
        with Sandbox(Limits(**FAST), isolation="none") as box:
            assert box.run("print(1)").stdout == b"1\n"
    finally:
        configure()


@needs_full
def test_listed_paths_are_readable_and_nothing_else(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.txt").write_text("42")
    (tmp_path / "other.txt").write_text("no")
    program = (
        f"import os\ndef f():\n    return open({str(shared / 'data.txt')!r}).read()\n"
        f"def g():\n    return os.path.exists({str(tmp_path / 'other.txt')!r})"
    )
    tests = [["assert f() == '42'", "assert not g()"]]
    try:
        configure(paths=[str(shared)])
        assert isolation().filesystem
        assert code_reward(["p"], [program], tests=tests, **FAST) == [1.0]
        with Sandbox(Limits(**FAST)) as box:
            assert box.run(f"open({str(shared / 'x')!r}, 'w')").status == "error"  # read-only
    finally:
        configure()
    assert code_reward(["p"], [program], tests=tests, **FAST) == [0.5]  # not listed: f() fails, g() holds


@needs_full
def test_signals_to_its_own_processes_still_work() -> None:
    program = (
        "import os, signal, time\npid = os.fork()\nif pid == 0:\n    time.sleep(10)\n    os._exit(0)\n"
        f"os.kill(pid, {int(signal.SIGTERM)})\nprint(os.waitpid(pid, 0)[1] & 0x7f)"
    )
    with Sandbox(Limits(**FAST)) as box:
        assert box.run(program).stdout == f"{int(signal.SIGTERM)}\n".encode()


# ---------------------------------------------------------------------------------------------- reward integrity
#
# Programs written to score without being right. Each is a wrong `add` (or one that cheats its tests) plus a
# trick. Contained: the code reward scores it 0.0, while the right `add` scores 1.0 on the same tests and mode
# (the honest control). Where the trick is not one the harness already stopped before, the same program run by
# a naive runner (exec the solution, then exec each test, as the harness did before its references were bound)
# passes every test: the trick is real.

WRONG = "def add(a, b):\n    return a - b\n"
RIGHT = "def add(a, b):\n    return a + b\n"
ADD = ("assert add(1, 2) == 3", "assert add(2, 2) == 4")
CLOSE = ("assert math.isclose(add(0.5, 0.25), 0.75)",)
# the old harness: looks up exec, compile and os.write after the solution ran, prints a token-tagged verdict
NAIVE = """\
import json, os, sys
payload = json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
try:
    exec(compile(payload["solution"], "solution.py", "exec"), namespace)
except SystemExit:
    pass
for index, test in enumerate(payload["tests"]):
    try:
        exec(compile(test, f"test_{index}.py", "exec"), namespace)
        passed = 1
    except BaseException:
        passed = 0
    os.write(1, f"\\nTOKEN {index} {passed}\\n".encode())
"""


@dataclass(frozen=True)
class Hack:
    program: str
    tests: tuple[str, ...] = ADD
    strict: bool = False
    real: bool = True  # the naive runner falls for it (False: a trick the old harness already stopped)


HACKS = {
    "builtins.exec replaced by a no-op": Hack(WRONG + "import builtins\nbuiltins.exec = lambda *a, **k: None\n"),
    "builtins.compile returns an empty program": Hack(
        WRONG + "import builtins\n_c = builtins.compile\nbuiltins.compile = lambda *a, **k: _c('pass', 't', 'exec')\n"
    ),
    "os.write turns a failing verdict into a pass": Hack(
        WRONG + "import os\n_w = os.write\nos.write = lambda fd, data: _w(fd, data.replace(b' 0\\n', b' 1\\n'))\n"
    ),
    "sys.stdout rewritten to print passes": Hack(
        WRONG + "import sys\nclass Out:\n    def write(self, text):\n"
        "        return sys.__stdout__.write('0 0 1\\n0 1 1\\n')\n"
        "    def flush(self):\n        sys.__stdout__.flush()\nsys.stdout = Out()\nprint('report')\n",
        real=False,
    ),
    "exit(0) before the tests": Hack(WRONG + "import sys\nsys.exit(0)\n", real=False),
    "os._exit(0) before the tests": Hack(WRONG + "import os\nos._exit(0)\n", real=False),
    "the report written early on every descriptor": Hack(
        WRONG + "import os\nfor fd in range(1, 12):\n    for i in range(2):\n        try:\n"
        "            os.write(fd, f'\\nTOKEN {i} 1\\n'.encode())\n        except OSError:\n            pass\n",
        real=False,
    ),
    "math.isclose patched": Hack(WRONG + "import math\nmath.isclose = lambda *a, **k: True\n", CLOSE),
    "a fake math bound to the name the test uses": Hack(
        WRONG + "import types\nmath = types.SimpleNamespace(isclose=lambda *a, **k: True)\n", CLOSE
    ),
    "sys.modules['math'] replaced before the test imports it": Hack(
        WRONG + "import sys, types\nsys.modules['math'] = types.SimpleNamespace(isclose=lambda *a, **k: True)\n",
        ("import math\nassert math.isclose(add(0.5, 0.25), 0.75)",),
    ),
    "a fake numpy planted on sys.path before the test imports it": Hack(
        WRONG + "import sys\nopen('numpy.py', 'w').write('isclose = lambda *a, **k: True\\n')\n"
        "sys.path.insert(0, '.')\nsys.modules.pop('numpy', None)\n",
        ("import numpy\nassert numpy.isclose(add(0.5, 0.25), 0.75)",),
    ),
    "unittest's assertEqual patched": Hack(
        WRONG + "import unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None\n",
        ("unittest.TestCase().assertEqual(add(1, 2), 3)",),
    ),
    "a builtin the test uses rebound": Hack(
        "def add(a, b):\n    return a\nlen = lambda x: 2\n", ("assert len(add([1], [2])) == 2",)
    ),
    "its own __builtins__ with a fake abs": Hack(
        WRONG + "import builtins\n__builtins__ = dict(vars(builtins), abs=lambda x: 3)\n",
        ("assert abs(add(1, 2)) == 3",),
    ),
    "a trace function jumps over the assert": Hack(
        "import sys\ndef add(a, b):\n    test = sys._getframe(1)\n    def skip(frame, event, arg):\n"
        "        if frame is test and event == 'line' and frame.f_lineno == 2:\n            frame.f_lineno = 3\n"
        "        return skip\n    test.f_trace = skip\n    sys.settrace(lambda *a: None)\n    return a - b\n",
        ("x = add(1, 2)\nassert x == 3\ndone = True",),
    ),
    "a thread patches the helper while the test waits": Hack(
        WRONG + "import math, threading, time\ndef flip():\n    time.sleep(0.3)\n"
        "    math.isclose = lambda *a, **k: True\nthreading.Thread(target=flip, daemon=True).start()\n",
        ("import time\ntime.sleep(0.6)\nassert math.isclose(add(0.5, 0.25), 0.75)",),
    ),
    "an audit hook that hides the failing call": Hack(
        WRONG + "import sys\nsys.addaudithook(lambda event, args: None)\n", real=False
    ),
    "an int subclass equal to everything (strict)": Hack(
        "class Num(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Num(a - b)\n",
        strict=True,
    ),
    "an object equal to everything (strict)": Hack(
        "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()\n", strict=True
    ),
    "the harness's token read through its frames (strict)": Hack(
        "import os, sys\ndef add(a, b):\n    frame = sys._getframe(1)\n"
        "    while frame is not None and 'token' not in frame.f_locals:\n        frame = frame.f_back\n"
        "    if frame is not None:\n        seen = frame.f_locals\n        for i in range(len(seen['tests'])):\n"
        "            os.write(seen['report'], f\"\\n{seen['token']} {i} 1\\n\".encode())\n        os._exit(0)\n"
        "    return a - b\n",
        strict=True,
        real=False,
    ),
}


@pytest.fixture
def any_isolation() -> Iterator[None]:
    """The integrity suite runs wherever the sandbox runs (these programs only cheat inside their own process)."""
    configure(min_isolation="full" if FULL else "none")
    try:
        yield
    finally:
        configure()


def _naive(program: str, tests: tuple[str, ...], workdir: Path) -> float:
    payload = json.dumps({"solution": program, "tests": list(tests)})
    command = [sys.executable, "-I", "-c", NAIVE]
    out = subprocess.run(command, input=payload, capture_output=True, text=True, timeout=60, cwd=workdir)
    verdicts = [line.split()[2] for line in out.stdout.splitlines() if line.startswith("TOKEN ")]
    return sum(v == "1" for v in verdicts[: len(tests)]) / len(tests)


def test_the_integrity_suite_has_at_least_ten_hacks() -> None:
    assert len(HACKS) >= 10 and sum(h.strict for h in HACKS.values()) >= 2


@pytest.mark.parametrize("name", list(HACKS))
def test_a_hack_scores_zero_and_the_honest_program_one(name: str, any_isolation: None, tmp_path: Path) -> None:
    hack = HACKS[name]
    limits = {**FAST, "wall_s": 5.0}
    scores = code_reward(["p"] * 2, [hack.program, RIGHT], tests=[list(hack.tests)] * 2, strict=hack.strict, **limits)
    assert scores == [0.0, 1.0], name
    if hack.real:
        assert _naive(hack.program, hack.tests, tmp_path) == 1.0, f"{name}: the trick does not fool a naive runner"


def test_what_plain_asserts_cannot_tell_and_strict_mode_can(any_isolation: None) -> None:
    """An object whose == always answers True passes plain assert tests (their inherent limit, documented); so
    does a program that walks the harness's frames to its report token. Strict mode stops both."""
    for name in ("an object equal to everything (strict)", "the harness's token read through its frames (strict)"):
        program = HACKS[name].program
        assert code_reward(["p"], [program], tests=[list(ADD)], **FAST) == [1.0], name
        assert code_reward(["p"], [program], tests=[list(ADD)], strict=True, **FAST) == [0.0], name


def test_strict_mode_compares_types_and_refuses_tests_it_cannot_judge(any_isolation: None) -> None:
    program = "def f(x):\n    return {'a': [x, (x, 2.5)], 'b': {1, 2}, 'c': None, 'd': b'z', 'e': x > 0}\n"
    value = "{'a': [1, (1, 2.5)], 'b': {2, 1}, 'c': None, 'd': b'z', 'e': True}"
    tests = [[f"assert f(1) == {value}", "assert f(1)['e']", "assert not f(0)['e']", f"assert {value} == f(1)"]]
    assert code_reward(["p"], [program], tests=tests, strict=True, **FAST) == [1.0]
    floats = "def f(x):\n    return float(x)\n"  # 1.0 == 1 in Python, not in strict mode; 1 is not True
    assert code_reward(["p"], [floats], tests=[["assert f(1) == 1", "assert f(1) == 1.0"]], **FAST) == [1.0]
    assert code_reward(["p"], [floats], tests=[["assert f(1) == 1", "assert f(1) == 1.0"]], strict=True) == [0.5]
    assert code_reward(["p"], ["def f():\n    return 1\n"], tests=[["assert f()"]], strict=True) == [0.0]
    with pytest.raises(ValueError, match=r"test 0 'assert f\(\) < 3'.*not other comparisons"):
        code_reward(["p"], [program], tests=[["assert f() < 3"]], strict=True)
    with pytest.raises(ValueError, match="needs a literal on one side"):
        code_reward(["p"], [program], tests=[["assert f(1) == f(2)"]], strict=True)


def test_ordinary_programs_are_not_mistaken_for_hacks(any_isolation: None) -> None:
    program = (
        "import collections, dataclasses, enum, functools, io, math, random, sys, tempfile, threading, typing\n"
        "import numpy\nsys.setrecursionlimit(5000)\nrandom.seed(1)\nPoint = collections.namedtuple('Point', 'x y')\n"
        "@dataclasses.dataclass\nclass Box:\n    size: int\nclass Color(enum.Enum):\n    RED = 1\n"
        "T = typing.TypeVar('T')\nsaved, sys.stdout = sys.stdout, io.StringIO()\nprint('quiet')\nsys.stdout = saved\n"
        "worker = threading.Thread(target=lambda: None)\nworker.start()\nworker.join()\n"
        "@functools.lru_cache\ndef add(a, b):\n    tempfile.gettempdir()\n    return int(numpy.add(a, b))\n"
    )
    tests = [list(ADD) + ["assert math.isclose(add(1, 2) / 2, 1.5)", "assert Point(1, 2).x == 1 and Box(3).size == 3"]]
    assert code_reward(["p"], [program], tests=tests, **FAST) == [1.0]


# ---------------------------------------------------------------------------------------------- across programs
#
# Attacks that need two programs, one after the other (the second reads what the first left), or that leave
# something on the host. Contained: nothing crosses and nothing is left.

IPC = (
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
    "KEY, CREATE = 0x7ACE0019, 0o1000 | 0o666\n"
    "class Message(ctypes.Structure):\n    _fields_ = [('kind', ctypes.c_long), ('text', ctypes.c_char * 16)]\n"
)
LEAVE = {
    "a System V shared-memory segment": IPC + "segment = libc.shmget(KEY, 1 << 20, CREATE)\n"
    "ctypes.memmove(libc.shmat(segment, None, 0), b'ipc-secret', 10)\n",
    "a System V message queue": IPC + "queue = libc.msgget(KEY, CREATE)\n"
    "libc.msgsnd(queue, ctypes.byref(Message(1, b'ipc-secret')), 16, 0)\n",
    "a key in its uid's user keyring": KEY_READER + "import os\n"
    f"libc.syscall(L({_KEY_CALLS.get('add_key', -1)}), b'user', b'tracerl-left', b'ipc-secret', L(10), L(-4))\n",
}
FIND = {
    "a System V shared-memory segment": IPC + "segment = libc.shmget(KEY, 0, 0)\n"
    "print(ctypes.string_at(libc.shmat(segment, None, 0), 10) if segment >= 0 else b'')\n",
    "a System V message queue": IPC + "queue, message = libc.msgget(KEY, 0), Message()\n"
    "print(message.text if queue >= 0 and libc.msgrcv(queue, ctypes.byref(message), 16, 0, 0o4000) > 0 else b'')\n",
    "a key in its uid's user keyring": KEY_READER + "print(read_key('tracerl-left'))\n",
}


def _host_ipc() -> set[str]:
    """Keys of the host's System V segments and queues."""
    keys = set()
    for table in ("/proc/sysvipc/shm", "/proc/sysvipc/msg"):
        with open(table) as f:
            keys |= {line.split()[0] for line in f.readlines()[1:]}
    return keys


def _remove_host_ipc() -> None:
    """Remove what an uncontained run left on the host (this test's key only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for get, ctl in ((libc.shmget, libc.shmctl), (libc.msgget, libc.msgctl)):
        ident = get(0x7ACE0019, 0, 0)
        if ident >= 0:
            ctl(ident, 0, None)  # IPC_RMID


@needs_full
@pytest.mark.parametrize("what", list(LEAVE))
def test_nothing_a_program_leaves_reaches_the_next(what: str) -> None:
    before = _host_ipc()
    with Sandbox(Limits(**FAST)) as box:
        left = box.run(LEAVE[what])
        found = box.run(FIND[what])
    assert left.ok and found.ok, (left.stderr[-500:], found.stderr[-500:])
    assert b"ipc-secret" not in found.stdout
    assert _host_ipc() == before  # no segment or queue outlives its program on the host
    if what.startswith("a System V"):  # uncontained, the second program reads what the first left
        try:
            with Sandbox(Limits(**FAST), isolation="none", min_isolation="none") as box:
                box.run(LEAVE[what])
                assert b"ipc-secret" in box.run(FIND[what]).stdout
        finally:
            _remove_host_ipc()


@needs_full
def test_shared_memory_held_by_no_process_is_gone_with_the_program() -> None:
    """Three programs each leave 64 MB of System V shared memory: none of it outlives them."""
    program = IPC + (
        "for _ in range(3):\n    segment = libc.shmget(0, 64 << 20, CREATE)\n"  # IPC_PRIVATE
        "    ctypes.memset(libc.shmat(segment, None, 0), 1, 64 << 20)\nprint('left')\n"
    )
    before = _host_ipc()
    with Sandbox(Limits(**FAST, total_memory_mb=512)) as box:
        results = [box.run(program) for _ in range(3)]
    assert [r.stdout for r in results] == [b"left\n"] * 3
    with open("/proc/sysvipc/shm") as f:
        assert all(int(line.split()[3]) < 64 << 20 for line in f.readlines()[1:])  # no 64 MB segment anywhere
    assert _host_ipc() == before


@needs_full
def test_listed_paths_with_sockets_fifos_or_the_whole_host_are_refused(tmp_path: Path) -> None:
    sockets, fifos = tmp_path / "sockets", tmp_path / "fifos"
    sockets.mkdir()
    fifos.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sockets / "agent.sock"))
    os.mkfifo(fifos / "pipe")
    (tmp_path / "root").symlink_to("/")
    try:
        for path, named in ((sockets, "socket"), (fifos, "FIFO"), (tmp_path / "root", "whole host"), ("/", "/")):
            with pytest.raises(ValueError, match=f"sandbox path '{path}'.*{named}"):
                configure(paths=[str(path)])
        assert policy().paths == ()  # nothing of the refused list was taken
    finally:
        server.close()
        configure()


@needs_full
def test_a_socket_created_in_a_listed_folder_later_is_out_of_reach(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    configure(paths=[str(shared)])
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(shared / "late.sock"))
    server.listen()
    server.settimeout(0.5)
    try:
        program = (
            f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(shared / 'late.sock')!r})\n"
            "s.sendall(b'late')\nprint('sent')"
        )
        with Sandbox(Limits(**FAST)) as box:
            result = box.run(program)
        assert b"sent" not in result.stdout and b"Operation not permitted" in result.stderr
        with pytest.raises(TimeoutError):
            server.accept()  # nothing connected
    finally:
        server.close()
        configure()


def _sandbox_processes() -> list[str]:
    """Processes of sandboxed programs still alive on the host (their uids are the sandbox's slots)."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(FileNotFoundError):
            if 900_000 <= os.stat(f"/proc/{pid}").st_uid < 904_096:
                alive.append(pid)
    return alive


@needs_full
def test_a_timed_out_batch_leaves_nothing_behind_for_the_next_call() -> None:
    """20 programs that sleep past the reward call's timeout, with the default 2 concurrent programs: when the
    call is abandoned, every one of them is stopped and none still queued starts, so the next call's one correct
    program scores at once instead of waiting its turn behind them."""
    from tracerl.reward_service import RewardService, RewardSpec

    service = RewardService([RewardSpec("code", kwargs={"wall_s": 6.0})], on_error="nan", timeout_s=2.0)
    sleepers = ["import time\ntime.sleep(30)\ndef add(a, b):\n    return a + b\n"] * 20
    start = time.monotonic()
    first = service.score(["p"] * 20, sleepers, columns={"tests": [list(ADD)] * 20})
    assert all(v != v for v in first.total) and first.metrics["reward/errors/code"] == 20.0  # NaN: timed out
    assert time.monotonic() - start < 4.0
    time.sleep(0.5)
    assert _sandbox_processes() == []
    start = time.monotonic()
    assert service.score(["p"], [RIGHT], columns={"tests": [list(ADD)]}).total == [1.0]
    assert time.monotonic() - start < 2.0  # not behind the 18 programs that had not started


@needs_full
def test_the_start_up_benchmark_runs_and_reports_its_ratios() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_sandbox.py"), "--runs", "2", "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["median_ms"]["sandbox"] > 0 and result["sandbox_over_bare"] > 0
    assert result["isolation"]["syscall_filter"] and result["isolation"]["ipc_namespace"]
