"""A memory cap on a whole sandboxed program (every process it starts, and the tmpfs pages it writes).

``setrlimit`` limits each process on its own: 8 processes of 512 MB each may hold 4 GB together. Where this
process may create a child of its own cgroup (root with cgroup v1's memory controller, or a cgroup v2 tree
with the memory controller delegated), each program gets a fresh child cgroup with a memory limit; the
kernel's OOM killer then stops the program when all its processes together pass it. Elsewhere the bound is
``max_processes × memory_mb`` plus its tmpfs sizes (see docs/rewards.md).

Example:
    >>> groups = MemoryCgroups.find()
    >>> groups is None or groups.root.startswith("/")
    True
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
import uuid


class MemoryCgroups:
    """Creates and removes per-program memory cgroups under ``root`` (a cgroup this process may write)."""

    def __init__(self, root: str, version: int) -> None:
        self.root, self.version = root, version
        self.limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"

    @classmethod
    def find(cls) -> MemoryCgroups | None:
        """This process's memory cgroup, if a child cgroup with a memory limit can be made there; else None."""
        for root, version in _memory_cgroup_dirs():
            groups = cls(root, version)
            try:
                path = groups.create(16 << 20)
            except OSError:
                continue
            groups.remove(path)
            return groups
        return None

    def create(self, limit_bytes: int) -> str:
        """A new child cgroup capped at ``limit_bytes`` (swap included where the kernel accounts it)."""
        path = os.path.join(self.root, f"tracerl-sbx-{uuid.uuid4().hex[:12]}")
        os.mkdir(path)
        try:
            _write(os.path.join(path, self.limit_file), str(limit_bytes))
            swap = "memory.memsw.limit_in_bytes" if self.version == 1 else "memory.swap.max"
            if os.path.exists(os.path.join(path, swap)):
                _write(os.path.join(path, swap), str(limit_bytes) if self.version == 1 else "0")
        except OSError:
            os.rmdir(path)
            raise
        return path

    @staticmethod
    def procs_file(path: str) -> bytes:
        """The file a process writes its pid to, to join the cgroup (done by the child before ``exec``)."""
        return os.fsencode(os.path.join(path, "cgroup.procs"))

    @staticmethod
    def kill(path: str) -> None:
        """SIGKILL every process in the cgroup (``cgroup.kill`` on cgroup v2, each pid of ``cgroup.procs`` on v1):
        a program's whole tree, even processes that left its process group."""
        kill_file = os.path.join(path, "cgroup.kill")
        if os.path.exists(kill_file):
            _write(kill_file, "1")
            return
        for _ in range(100):  # a process may fork while its siblings are being killed: repeat until empty
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                return
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    @staticmethod
    def remove(path: str, wait_s: float = 2.0) -> None:
        """Remove a cgroup once its processes are gone (killed processes may take a moment to leave it)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def _memory_cgroup_dirs() -> list[tuple[str, int]]:
    """(directory of this process's cgroup, version) for each hierarchy with a memory controller."""
    try:
        with open("/proc/self/cgroup") as f:
            membership = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mountinfo") as f:
            mountinfo = [line.split() for line in f]
    except OSError:
        return []
    found = []
    for fields in mountinfo:
        dash = fields.index("-")
        fstype, options, point, mount_root = fields[dash + 1], fields[dash + 3], fields[4], fields[3]
        if fstype == "cgroup" and "memory" in options.split(","):
            groups = [p for _, controllers, p in membership if "memory" in controllers.split(",")]
            version = 1
        elif fstype == "cgroup2":
            groups = [p for hierarchy, _, p in membership if hierarchy == "0"]
            version = 2
        else:
            continue
        for group in groups:
            relative = os.path.relpath(group, mount_root) if group.startswith(mount_root) else None
            if relative is None:
                continue
            path = os.path.normpath(os.path.join(point, relative))
            if version == 2 and not _has_memory_v2(path):
                continue
            found.append((path, version))
    return found


def _has_memory_v2(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.subtree_control")) as f:
            return "memory" in f.read().split()
    except OSError:
        return False


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
