"""The code sandbox: hostile programs are contained and score 0.0 (never crash the reward).

Each hostile program comes with a test it would pass if it were not contained, so a 0.0 reward shows the
containment worked, and a positive control shows that ordinary programs still pass. Layers the OS does not
allow here are skipped with the reason (see ``rewards.isolation`` and docs/rewards.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import rewards
from rewards.code import code_reward
from rewards.sandbox import Limits, Sandbox, isolation

FAST = {"cpu_s": 1.0, "wall_s": 3.0, "memory_mb": 256}  # limits for hostile programs: keep the suite fast
ISOLATION = isolation()


def _score(program: str, *tests: str, **limits: float) -> float:
    return code_reward(["p"], [program], tests=[list(tests)], **{**FAST, **limits})[0]


def _slot_processes() -> list[str]:
    """Processes owned by sandbox uids (there should be none once a program is finished)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except FileNotFoundError:
            continue
        if 900_000 <= uid < 900_000 + 4096:
            found.append(pid)
    return found


def test_isolation_report_matches_what_this_machine_allows() -> None:
    unshare = shutil.which("unshare")
    netns_works = unshare is not None and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0
    if os.geteuid() == 0:
        # as root with namespace support every layer is on; without it the report must say why
        assert ISOLATION.network == netns_works
        if netns_works:
            assert ISOLATION.separate_user and ISOLATION.filesystem and ISOLATION.process_limit
            assert ISOLATION.pid_namespace and ISOLATION.notes == ""
    assert ISOLATION.network or ISOLATION.notes  # a missing layer is always explained


def test_ordinary_program_passes_and_its_directory_is_removed() -> None:
    with Sandbox(Limits(**FAST)) as box:
        program = "import os\nopen('out.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(open('out.txt').read())"
        result = box.run(program)
    assert result.status == "ok" and result.returncode == 0
    workdir, content = result.stdout.decode().split()
    assert content == "hi"  # its own directory is writable
    assert not os.path.exists(workdir)  # and gone afterwards
    assert _score("def f():\n    return 1", "assert f() == 1") == 1.0


def test_infinite_loop_is_stopped_by_the_cpu_limit() -> None:
    start = time.monotonic()
    with Sandbox(Limits(**FAST)) as box:
        result = box.run("while True:\n    pass")
    assert time.monotonic() - start < FAST["wall_s"] + 1.0
    assert result.status == "error"
    assert result.returncode in (128 + 24, -24, 128 + 9, -9)  # SIGXCPU at the soft limit, SIGKILL at the hard one
    assert _score("def f():\n    while True:\n        pass", "assert f() == 1") == 0.0


def test_memory_bomb_hits_the_address_space_limit() -> None:
    with Sandbox(Limits(**FAST)) as box:
        result = box.run("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))")
    assert result.status == "error" and b"MemoryError" in result.stderr
    assert _score("BIG = bytearray(2 * 2**30)\ndef f():\n    return 1", "assert f() == 1") == 0.0


def test_fork_bomb_is_capped_and_fully_killed() -> None:
    if not ISOLATION.process_limit:
        pytest.skip(f"RLIMIT_NPROC does not apply here ({ISOLATION.notes}); the wall clock still kills the group")
    bomb = (
        "import os\ncount = 0\nwhile True:\n    try:\n        os.fork()\n        count += 1\n"
        "    except OSError:\n        break\ndef f():\n    return count\n"
    )
    start = time.monotonic()
    # unbounded, each process would fork forever; with RLIMIT_NPROC = 32 the forks fail and f() stays small
    assert _score(bomb, "assert f() > 1000") == 0.0
    assert time.monotonic() - start < FAST["wall_s"] + 2.0
    if ISOLATION.pid_namespace:
        assert _slot_processes() == []  # every forked process died with the program, none left as a zombie


def test_writes_outside_its_directory_fail(tmp_path: Path) -> None:
    if not (ISOLATION.filesystem or ISOLATION.separate_user):
        pytest.skip(f"no filesystem isolation here ({ISOLATION.notes})")
    repo_file = Path(rewards.__file__).parent / f"escaped-{uuid.uuid4().hex}.py"
    targets = [tmp_path / "escaped.txt", Path.home() / "escaped", repo_file]
    try:
        for target in targets:
            program = f"def f():\n    open({str(target)!r}, 'w').write('pwned')\n    return 1\n"
            assert _score(program, "assert f() == 1") == 0.0, target
            assert not target.exists(), target
    finally:
        repo_file.unlink(missing_ok=True)
    if ISOLATION.filesystem:
        # /tmp is the program's own private tmpfs: the write succeeds there, the host never sees it
        host_tmp = Path("/tmp") / f"tracerl-escape-{uuid.uuid4().hex}"
        program = f"def f():\n    open({str(host_tmp)!r}, 'w').write('x')\n    return open({str(host_tmp)!r}).read()\n"
        assert _score(program, "assert f() == 'x'") == 1.0
        assert not host_tmp.exists()


def test_environment_secrets_are_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "fake-wandb-key-123")
    monkeypatch.setenv("HF_TOKEN", "fake-hf-token-456")
    with Sandbox(Limits(**FAST)) as box:
        result = box.run("import os\nprint(sorted(os.environ.items()))")
    assert b"fake-wandb-key" not in result.stdout and b"fake-hf-token" not in result.stdout
    assert b"WANDB_API_KEY" not in result.stdout
    assert _score("import os\nKEY = os.environ.get('WANDB_API_KEY')", "assert KEY == 'fake-wandb-key-123'") == 0.0
    if ISOLATION.pid_namespace or ISOLATION.separate_user:
        # nor through the parent's /proc entry (another pid namespace, or another uid)
        parent_environ = f"open('/proc/{os.getpid()}/environ', 'rb').read()"
        assert _score(f"def f():\n    return b'fake-wandb' in {parent_environ}", "assert f()") == 0.0


def test_network_connections_fail() -> None:
    if not ISOLATION.network:
        pytest.skip(f"no network namespace here ({ISOLATION.notes})")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        program = (
            "import socket\ndef f():\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hello')\n    return 1\n"
        )
        assert _score(program, "assert f() == 1") == 0.0
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected


def test_printing_gigabytes_is_cut_off() -> None:
    limits = Limits(**FAST, max_output_bytes=1 << 20)
    start = time.monotonic()
    with Sandbox(limits) as box:
        result = box.run("import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)")
    assert time.monotonic() - start < 2.0  # killed as soon as the cap is passed, not at the wall clock
    assert result.status == "output_limit"
    assert len(result.stdout) + len(result.stderr) <= limits.max_output_bytes
    assert _score("import sys\nsys.stdout.write('x' * 2**31)\ndef f():\n    return 1", "assert f() == 1") == 0.0


def test_concurrency_is_bounded_by_max_workers() -> None:
    sleeper = ("import time\ntime.sleep(0.4)", "")
    for workers, lo, hi in ((1, 1.2, 3.0), (3, 0.4, 1.0)):
        with Sandbox(Limits(**FAST), max_workers=workers) as box:
            start = time.monotonic()
            results = box.run_many([sleeper] * 3)
            elapsed = time.monotonic() - start
        assert [r.status for r in results] == ["ok"] * 3
        assert lo <= elapsed < hi, (workers, elapsed)  # 3 × 0.4 s one at a time vs all at once


def test_large_stdin_and_wall_clock_timeout() -> None:
    with Sandbox(Limits(**{**FAST, "wall_s": 1.0})) as box:
        echoed = box.run("import sys\nsys.stdout.write(sys.stdin.read())", stdin="ab" * 200_000)
        sleeping = box.run("import time\ntime.sleep(30)")  # no CPU used: only the wall clock stops it
    assert echoed.ok and echoed.stdout == b"ab" * 200_000
    assert sleeping.status == "timeout" and 1.0 <= sleeping.wall_s < 2.0


def test_mounts_below_a_listed_folder_land_below_where_it_is_shown() -> None:
    from rewards.isolation import _rebase

    assert _rebase("/usr", "/", "/data/root") == "/data/root/usr"  # a join by concatenation gave /data/rootusr
    assert _rebase("/real/venv/lib", "/real/venv", "/tmp/venv") == "/tmp/venv/lib"
    assert _rebase("/a/b", "/a/b", "/x") == "/x"
