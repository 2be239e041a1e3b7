"""Operating-system isolation for sandboxed programs: what this machine allows, and the child-side setup.

Layers (each used only where the OS allows it; ``rewards.sandbox`` probes them once per process):
- separate user (root only): the program runs as an unprivileged uid of its own (one per concurrent slot),
  so ``RLIMIT_NPROC`` bites, files outside its directory are not writable, root-only files are not readable;
- network namespace: a fresh one has only a loopback interface that is down, so every connection fails;
- filesystem view (mount namespace): the host is mounted read-only, ``/tmp`` and ``/dev/shm`` are private
  size-limited tmpfs, the home directory is hidden (only the Python installation inside it stays visible),
  and the program's directory is a size-limited tmpfs with a copy of its files: nothing it writes reaches
  the host;
- pid namespace (``unshare --pid --fork``): every process the program starts dies with it, even ones that
  left its process group, and none is left as a zombie.
Without root, the same namespaces come from a user namespace where unprivileged user namespaces are enabled.

The child-side code runs between ``fork`` and ``exec`` (``preexec_fn``): it makes only system calls, with
every value computed beforehand in the parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import resource
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# mount options that must be kept when remounting a mount inherited into a user namespace (they are locked)
_KEPT_OPTIONS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
_SYSTEM_TREES = ("/proc", "/sys", "/dev")  # kernel filesystems: left as they are (root-only writable)


@dataclass(frozen=True)
class Isolation:
    """What the sandbox contains on this machine (each field: the layer is active)."""

    separate_user: bool  # runs as its own unprivileged uid: NPROC, file permissions, signals apply
    network: bool  # fresh network namespace: no connection to anything, loopback included
    filesystem: bool  # read-only host, private /tmp and /dev/shm, hidden home; only its directory is writable
    pid_namespace: bool  # all descendants are killed and reaped with the program
    process_limit: bool  # RLIMIT_NPROC is enforced (uid 0 is exempt from it)
    notes: str = ""  # why a layer is off, if any


@dataclass(frozen=True)
class Plan:
    """Everything the forked child needs, resolved in the parent."""

    name: str  # "root", "userns" or "none"
    separate_user: bool = False  # switch to a slot uid (root only)
    user_namespace: bool = False  # create a user namespace mapping our uid to itself (non-root)
    network: bool = False
    filesystem: bool = False
    pid_namespace: bool = False
    readonly: tuple[tuple[bytes, int], ...] = ()  # (mount point, flags to keep) remounted read-only
    private_tmpfs: tuple[bytes, ...] = ()  # mount points that get a fresh, writable, size-limited tmpfs
    hidden: tuple[bytes, ...] = ()  # directories covered by an empty read-only tmpfs (the home directory)
    kept: tuple[bytes, ...] = ()  # paths under those that stay visible (the Python installation)
    host_ids: tuple[int, int] = field(default_factory=lambda: (os.getuid(), os.getgid()))

    def command_prefix(self, uid: int | None) -> list[str]:
        """Wrapper command for the pid namespace (the program runs under a tiny ``sh`` as pid 1)."""
        if not self.pid_namespace:
            return []
        prefix = [shutil.which("unshare") or "unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
        if self.user_namespace:
            prefix += ["--user", "--map-current-user"]
        if uid is not None:
            prefix += ["--setuid", str(uid), "--setgid", str(uid)]
        # sh as pid 1 keeps ordinary signal semantics for the program (pid 1 ignores unhandled signals)
        return [*prefix, "/bin/sh", "-c", '"$@"; exit $?', "sandbox"]


def candidate_plans() -> list[Plan]:
    """Plans from most to least contained; the sandbox uses the first one that runs a program here."""
    if sys.platform != "linux":
        return [Plan("none")]
    has_unshare = shutil.which("unshare") is not None and os.path.exists("/bin/sh")
    view = _filesystem_view()
    if os.geteuid() == 0:
        full = Plan("root", separate_user=True, network=True, filesystem=True, pid_namespace=has_unshare, **view)
        return [full, Plan("root-network", network=True), Plan("none")]
    userns = Plan("userns", user_namespace=True, network=True, filesystem=True, pid_namespace=has_unshare, **view)
    return [userns, Plan("userns-network", user_namespace=True, network=True), Plan("none")]


def describe(plan: Plan, notes: str = "") -> Isolation:
    """The containment a plan gives."""
    return Isolation(
        separate_user=plan.separate_user,
        network=plan.network,
        filesystem=plan.filesystem,
        pid_namespace=plan.pid_namespace,
        process_limit=plan.separate_user or plan.user_namespace,
        notes=notes,
    )


def _filesystem_view() -> dict:
    """Mounts to make read-only, tmpfs mount points, the home directory to hide, and the Python installation
    paths inside those that must stay visible."""
    readonly = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4]).decode()
            if any(point == t or point.startswith(t + "/") for t in _SYSTEM_TREES):
                continue
            flags = sum(_KEPT_OPTIONS.get(o, 0) for o in fields[5].decode().split(","))
            readonly.append((point.encode(), flags))
    tmpfs = [p for p in ("/tmp", "/dev/shm") if os.path.isdir(p)]
    home = os.path.realpath(os.path.expanduser("~"))
    hidden = [home] if home != "/" and os.path.isdir(home) and not _under(home, tmpfs) else []
    needed = {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable)}
    needed |= {p for p in sys.path if p and os.path.isdir(p)}
    inside = sorted({os.path.realpath(p) for p in needed if _under(os.path.realpath(p), tmpfs + hidden)})
    kept = [p for p in inside if not _under(p, [q for q in inside if q != p])]
    return {
        "readonly": tuple(readonly),
        "private_tmpfs": tuple(p.encode() for p in tmpfs),
        "hidden": tuple(p.encode() for p in hidden),
        "kept": tuple(p.encode() for p in kept),
    }


def _under(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def _unescape(raw: bytes) -> bytes:
    """Undo mountinfo's octal escapes (``\\040`` for a space)."""
    return raw.decode("unicode_escape").encode("latin-1") if b"\\" in raw else raw


# ---------------------------------------------------------------------------------------------- child side


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if sys.platform == "linux" else None


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
    _call(_LIBC.mount(source, target, fstype, ctypes.c_ulong(flags), data), f"mount {target.decode()}")


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def child_setup(
    plan: Plan, workdir: bytes, rlimits: tuple, tmpfs_options: bytes, uid: int | None, error_fd: int
) -> None:
    """Runs in the forked child before ``exec``: namespaces, the filesystem view, limits, no new privileges.

    A failure is written to ``error_fd`` (for the parent's error message) and re-raised.
    """
    try:
        _setup(plan, workdir, rlimits, tmpfs_options, uid)
    except BaseException as err:
        os.write(error_fd, f"{type(err).__name__}: {err}".encode(errors="replace"))
        raise


def _setup(plan: Plan, workdir: bytes, rlimits: tuple, tmpfs_options: bytes, uid: int | None) -> None:
    flags = (CLONE_NEWUSER if plan.user_namespace else 0) | (CLONE_NEWNET if plan.network else 0)
    flags |= CLONE_NEWNS if plan.filesystem else 0
    if flags:
        _call(_LIBC.unshare(flags), "unshare")
    if plan.user_namespace:
        uid, gid = plan.host_ids
        _write("/proc/self/setgroups", b"deny")
        _write("/proc/self/uid_map", b"%d %d 1" % (uid, uid))
        _write("/proc/self/gid_map", b"%d %d 1" % (gid, gid))
    if plan.filesystem:
        _private_view(plan, workdir, tmpfs_options, uid)
    # after the user namespace exists: its RLIMIT_NPROC then counts only the processes inside it
    for which, soft, hard in rlimits:
        resource.setrlimit(which, (soft, hard))
    if uid is not None and not plan.pid_namespace:  # with a pid namespace, `unshare --setuid` switches later
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _call(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _call(_LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")


def _private_view(plan: Plan, workdir: bytes, tmpfs_options: bytes, uid: int | None) -> None:
    """Read-only host, fresh /tmp and /dev/shm, hidden home, and at ``workdir`` a size-limited tmpfs holding a
    copy of the program's files (so what it writes is bounded and never reaches the host's disk)."""
    _mount(None, b"/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    work_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    kept = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in plan.kept]
    for point, keep in plan.readonly:
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
    for point in plan.private_tmpfs:
        _mount(b"tmpfs", point, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs_options + b",mode=1777")
    for point in plan.hidden:
        _mount(b"tmpfs", point, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0555")
    for path, fd in kept:  # the Python installation under a covered directory, read-only as before
        os.makedirs(path, exist_ok=True)
        _mount(b"/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
        os.close(fd)
    os.makedirs(workdir, exist_ok=True)
    owner = b"" if uid is None else b",uid=%d,gid=%d" % (uid, uid)
    _mount(b"tmpfs", workdir, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs_options + b",mode=0700" + owner)
    for name in os.listdir(work_fd):  # the files the parent wrote into the host directory
        source = os.open(name, os.O_RDONLY, dir_fd=work_fd)
        target = os.open(os.path.join(workdir, os.fsencode(name)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        while chunk := os.read(source, 1 << 16):
            os.write(target, chunk)
        if uid is not None:
            os.fchown(target, uid, uid)
        os.close(source)
        os.close(target)
    os.close(work_fd)
    os.chdir(workdir)


# ---------------------------------------------------------------------------------------------- uid slots


class UidSlots:
    """Hands out unprivileged uids, one per running program, unique across processes on this machine.

    A uid is held through an exclusive ``flock`` on ``<lock_dir>/<uid>``, so concurrent sandboxes in other
    processes (other reward workers) never share one: ``RLIMIT_NPROC`` counts processes per uid, and a fork
    bomb in one sandbox must not starve another.
    """

    def __init__(self, first_uid: int = 900_000, count: int = 4096, lock_dir: str | None = None) -> None:
        self.first_uid, self.count = first_uid, count
        self.lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), "tracerl-sandbox-uids")
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)

    def acquire(self) -> tuple[int, int]:
        """(lowest free uid, lock fd); release with ``release(fd)``. A released uid has no process left (the pid
        namespace took them all), so reusing it at once is safe and keeps the lock files few.

        Raises:
            RuntimeError: every uid in the range is taken.
        """
        for uid in range(self.first_uid, self.first_uid + self.count):
            fd = os.open(os.path.join(self.lock_dir, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return uid, fd
        raise RuntimeError(f"all {self.count} sandbox uids from {self.first_uid} are in use.")

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing the descriptor drops the lock
