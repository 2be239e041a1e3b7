"""Start-up cost of one sandboxed program: the sandbox (``rewards.sandbox``, every layer this machine allows)
against the same sandbox with no isolation (a bare ``python -I main.py`` with the same temporary directory and
limits) and, where ``bwrap`` (bubblewrap) is installed, against bubblewrap given the same view (the same
read-only binds, private /tmp and /dev/shm, new user, pid, IPC, UTS and network namespaces, the same seccomp
program, the same temporary directory and memory cgroup) in the same run. The three run in turn, so machine
load hits all alike.

    python scripts/bench_sandbox.py            # a table
    python scripts/bench_sandbox.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from rewards.cgroup import MemoryCgroups
from rewards.sandbox import Limits, Sandbox, _plan, clean_env, isolation

PROGRAM = "print(1)"


def bwrap_command(workdir: str, filter_fd: int) -> list[str]:
    """bubblewrap with the sandbox's own view of the filesystem and its seccomp program."""
    plan = _plan("auto")[0]
    command = ["bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--disable-userns"]
    command += ["--uid", "900000", "--gid", "900000", "--hostname", "sandbox", "--cap-drop", "ALL"]
    # the private /tmp first: an installation inside /tmp (a checkout there) is bound on top of it, not hidden
    command += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    for source, target, _ in plan.binds:
        command += ["--ro-bind", source.decode(), target.decode()]
    for link, target in plan.links:
        command += ["--symlink", target.decode(), link.decode()]
    command += ["--bind", workdir, workdir, "--chdir", workdir, "--clearenv"]
    for key, value in clean_env(workdir).items():
        command += ["--setenv", key, value]
    return [*command, "--seccomp", str(filter_fd), sys.executable, "-I", "main.py"]


def bubblewrap() -> float:
    """One program under bubblewrap, with the bookkeeping the sandbox does too (directory, memory cgroup)."""
    start = time.perf_counter()
    groups = MemoryCgroups.find()
    cgroup = groups.create(1 << 30) if groups else None
    workdir = tempfile.mkdtemp(prefix="tracerl-bwrap-")
    with open(os.path.join(workdir, "main.py"), "w") as f:
        f.write(PROGRAM)
    os.chmod(workdir, 0o777)
    read, write = os.pipe()
    os.write(write, _plan("auto")[0].syscall_filter)
    os.close(write)

    def join() -> None:  # in the child, before bwrap starts: the program is in the cgroup from its first byte
        if cgroup is not None:
            with open(MemoryCgroups.procs_file(cgroup), "w") as f:
                f.write(str(os.getpid()))

    out = subprocess.run(bwrap_command(workdir, read), capture_output=True, pass_fds=(read,), preexec_fn=join)
    os.close(read)
    shutil.rmtree(workdir)
    if cgroup is not None:
        MemoryCgroups.remove(cgroup)
    assert out.stdout == b"1\n", out.stderr
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="programs per variant")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    limits = Limits(cpu_s=5, wall_s=30)
    box, loose = Sandbox(limits), Sandbox(limits, isolation="none", min_isolation="none")
    box.run(PROGRAM)  # probe the isolation once, outside the timing
    has_bwrap = shutil.which("bwrap") is not None and bool(_plan("auto")[0].syscall_filter)
    times: dict[str, list[float]] = {"bare": [], "sandbox": [], **({"bwrap": []} if has_bwrap else {})}
    for _ in range(args.runs):
        for name, sandbox in (("bare", loose), ("sandbox", box)):
            start = time.perf_counter()
            assert sandbox.run(PROGRAM).stdout == b"1\n"
            times[name].append(time.perf_counter() - start)
        if has_bwrap:
            times["bwrap"].append(bubblewrap())
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "runs": args.runs,
        "median_ms": {name: round(1e3 * m, 1) for name, m in median.items()},
        "sandbox_over_bare": round(median["sandbox"] / median["bare"], 2),
        "bwrap_over_bare": round(median["bwrap"] / median["bare"], 2) if has_bwrap else None,
        "sandbox_over_bwrap": round(median["sandbox"] / median["bwrap"], 2) if has_bwrap else None,
        "isolation": {k: v for k, v in vars(isolation()).items() if k != "notes"},
        "load_average": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"one program, median of {args.runs} (load average {result['load_average']:.1f}):")
    for name, m in result["median_ms"].items():
        print(f"  {name:8s} {m:7.1f} ms  ({m / result['median_ms']['bare']:.2f}x bare)")


if __name__ == "__main__":
    main()
