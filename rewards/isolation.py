"""Operating-system isolation for sandboxed programs: what this machine allows, and the child-side setup.

Layers (each used only where the OS allows it; ``rewards.sandbox`` probes them once per process):
- separate user (root only): the program runs as an unprivileged uid of its own (one per concurrent slot),
  so ``RLIMIT_NPROC`` bites, files outside its directory are not writable, root-only files are not readable;
- network namespace: a fresh one has only a loopback interface that is down, so every connection fails;
- filesystem view (mount namespace + ``pivot_root``): the program's root is a fresh tmpfs holding, read-only,
  only the operating system's program trees (``/usr``, ``/bin``, ``/lib*``), the interpreter's own
  installation (its prefixes and site-packages) and the paths the user lists; a few device nodes; private
  size-limited ``/tmp`` and ``/dev/shm``; and its directory, a size-limited tmpfs with a copy of its files.
  Nothing else of the host exists there (not the working directory, not ``sys.path`` or ``PYTHONPATH``
  folders, not home, not ``/etc``), and nothing it writes reaches the host;
- pid namespace (``unshare --pid --fork``): every process the program starts dies with it, even ones that
  left its process group, and none is left as a zombie;
- IPC and UTS namespaces: System V shared memory, semaphores and message queues (and POSIX message queues) are
  its own and vanish with it; its host name is ``sandbox``;
- a system-call filter (``rewards.seccomp``), installed by the interpreter itself just before the program's first
  line, after it has joined a fresh, empty session keyring: no kernel keyrings, no new namespaces, no ``AF_UNIX``
  socket of its own, none of the kernel interfaces unprivileged sandboxes usually lose.
Without root, the same namespaces come from a user namespace where unprivileged user namespaces are enabled.

The child-side code runs between ``fork`` and ``exec`` (``preexec_fn``): it makes only system calls, with
every value computed beforehand in the parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import platform
import resource
import shutil
import signal
import site
import stat
import sys
import tempfile
from dataclasses import dataclass, field, replace

from rewards.seccomp import BOOTSTRAP, keyctl_number, syscall_filter

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
CLONE_NEWUTS, CLONE_NEWIPC = 0x04000000, 0x08000000
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
MNT_DETACH = 2
_SYSTEM_TREES = ("/proc", "/sys", "/dev")  # kernel filesystems: never bound into the program's root
_OS_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # programs and shared libraries
_OS_FILES = ("/etc/ld.so.cache",)  # the dynamic linker's cache (it also works without, only slower)
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}  # syscall numbers (glibc has no wrapper)
_HIDDEN = ("__editable__",)  # site-packages entries that name the host's checkout (editable installs)


@dataclass(frozen=True)
class Isolation:
    """What the sandbox contains on this machine (each field: the layer is active)."""

    separate_user: bool  # runs as its own unprivileged uid: NPROC, file permissions, signals apply
    network: bool  # fresh network namespace: no connection to anything, loopback included
    filesystem: bool  # its own root: only the OS, the interpreter and listed paths (read-only), private /tmp
    pid_namespace: bool  # all descendants are killed and reaped with the program
    process_limit: bool  # RLIMIT_NPROC is enforced (uid 0 is exempt from it)
    memory_cgroup: bool = False  # the whole program's memory is capped by a cgroup (else per process only)
    ipc_namespace: bool = False  # its own System V IPC objects and host name, gone with it
    syscall_filter: bool = False  # seccomp: no keyrings, no new namespaces, no AF_UNIX sockets of its own
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
    binds: tuple[tuple[bytes, bytes, int], ...] = ()  # (host path, path in its root, flags to keep), read-only
    links: tuple[tuple[bytes, bytes], ...] = ()  # (path in its root, target): top-level symlinks such as /bin
    private_tmpfs: tuple[bytes, ...] = ()  # mount points that get a fresh, writable, size-limited tmpfs
    host_proc: bool = False  # bind the host's /proc first (a user namespace may mount a new one only then)
    pivot_syscall: int | None = None  # pivot_root's number here (None: chroot into the new root instead)
    hidden: tuple[bytes, ...] = ()  # files in its root shown empty (they would name host paths)
    ipc: bool = False  # its own IPC and UTS namespaces (System V objects, host name)
    syscall_filter: bytes = b""  # the seccomp program BOOTSTRAP installs (empty: none, python runs main.py)
    keyctl: int = 0  # keyctl's system-call number (BOOTSTRAP joins a fresh session keyring with it)
    host_ids: tuple[int, int] = field(default_factory=lambda: (os.getuid(), os.getgid()))

    def interpreter(self) -> list[str]:
        """How the program's interpreter starts: through BOOTSTRAP when there is a filter to install."""
        if not self.syscall_filter:
            return [sys.executable, "-I", "main.py"]
        return [sys.executable, "-I", "-c", BOOTSTRAP, self.syscall_filter.hex(), str(self.keyctl)]

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


def candidate_plans(paths: tuple[str, ...] = ()) -> list[Plan]:
    """Plans from most to least contained; the sandbox uses the first one that runs a program here.

    ``paths``: host paths the user wants visible (read-only) to programs, beside the interpreter's installation.
    """
    if sys.platform != "linux":
        return [Plan("none")]
    has_unshare = shutil.which("unshare") is not None and os.path.exists("/bin/sh")
    root = os.geteuid() == 0
    view = _filesystem_view(paths, host_proc=not root and has_unshare)
    machine = platform.machine()
    kernel: dict = {"ipc": True}
    if syscall_filter(machine):
        kernel.update(syscall_filter=syscall_filter(machine), keyctl=keyctl_number(machine))
    if root:
        full = Plan("root", separate_user=True, network=True, filesystem=True, pid_namespace=has_unshare, **view)
        return [replace(full, **kernel), Plan("root-network", network=True), Plan("none")]
    userns = Plan("userns", user_namespace=True, network=True, filesystem=True, pid_namespace=has_unshare, **view)
    return [replace(userns, **kernel), Plan("userns-network", user_namespace=True, network=True), Plan("none")]


def describe(plan: Plan, notes: str = "", memory_cgroup: bool = False) -> Isolation:
    """The containment a plan gives."""
    return Isolation(
        separate_user=plan.separate_user,
        network=plan.network,
        filesystem=plan.filesystem,
        pid_namespace=plan.pid_namespace,
        process_limit=plan.separate_user or plan.user_namespace,
        memory_cgroup=memory_cgroup,
        ipc_namespace=plan.ipc,
        syscall_filter=bool(plan.syscall_filter),
        notes=notes,
    )


def installation_paths() -> list[str]:
    """The interpreter's own installation: its prefixes, its executable's folder and its site-packages."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    paths |= set(site.getsitepackages())
    return sorted(p for p in paths if p and os.path.isdir(p))


def _filesystem_view(paths: tuple[str, ...] = (), host_proc: bool = False) -> dict:
    """What the program's root holds: read-only binds of the OS trees, the interpreter's installation and
    ``paths`` (each mount below them too, so none stays writable), top-level symlinks, and the tmpfs points."""
    mounts = {}  # mount point -> flags that must be kept when remounting it
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            mounts[_unescape(fields[4]).decode()] = sum(_KEPT_OPTIONS.get(o, 0) for o in fields[5].decode().split(","))
    wanted: list[tuple[str, str]] = []  # (host source, path in the new root)
    links = []
    for tree in _OS_TREES:
        if os.path.islink(tree):
            links.append((tree.encode(), os.readlink(tree).encode()))
        elif os.path.isdir(tree):
            wanted.append((tree, tree))
    wanted += [(f, f) for f in (*_OS_FILES, *_DEVICES) if os.path.exists(f)]
    for path in (*installation_paths(), *(os.path.abspath(os.path.expanduser(p)) for p in paths)):
        real = os.path.realpath(path)
        wanted += [(real, real), (real, path)] if real != path else [(real, real)]
    binds: list[tuple[bytes, bytes, int]] = []
    covered: list[tuple[str, str]] = []
    for source, target in sorted(set(wanted), key=lambda st: (len(st[1]), st[1])):
        if any(_under(target, [t]) and source == _rebase(target, t, s) for s, t in covered):
            continue  # already visible through a bind of a folder above it
        covered.append((source, target))
        for point in sorted(m for m in mounts if _under(m, [source]) and not _under(m, list(_SYSTEM_TREES))):
            inner = _rebase(point, source, target)  # the bind itself, then every mount below it
            binds.append((point.encode(), inner.encode(), _mount_flags(point, mounts)))
        if not any(m == source for m in mounts):
            binds.append((source.encode(), target.encode(), _mount_flags(source, mounts)))
    binds.sort(key=lambda b: len(b[1]))  # a folder before the mounts below it
    tmpfs = [p for p in ("/tmp", "/dev/shm") if os.path.isdir(p)]
    hidden = []
    for site_dir in site.getsitepackages():
        for folder in (site_dir, os.path.join(site_dir, "__pycache__")):
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if name.startswith(_HIDDEN) and os.path.isfile(os.path.join(folder, name)):
                    hidden.append(os.path.join(folder, name))
                elif name.endswith(".dist-info") and _local_install(os.path.join(folder, name, "direct_url.json")):
                    hidden.append(os.path.join(folder, name, "direct_url.json"))
    return {
        "binds": tuple(binds),
        "links": tuple(links),
        "private_tmpfs": tuple(p.encode() for p in tmpfs),
        "host_proc": host_proc,
        "pivot_syscall": _PIVOT_ROOT.get(platform.machine()),
        "hidden": tuple(os.fsencode(p) for p in hidden),
    }


def listed_path_problem(path: str) -> str | None:
    """Why a path may not be listed for programs to read (``reward.sandbox.paths``), or None.

    A listed path is bound read-only into the program's root, but a read-only mount does not stop a program from
    connecting to a socket or writing into a FIFO there, nor from opening a device node; and binding ``/`` or a
    kernel filesystem would show the whole host. So those are refused, naming the entry.
    """
    real = os.path.realpath(os.path.expanduser(path))
    if real == "/" or _under(real, list(_SYSTEM_TREES)):
        return f"it is {real}, which would show the whole host or its kernel filesystems; list specific folders"
    for top, folders, files in os.walk(real) if os.path.isdir(real) else [(os.path.dirname(real), [], [real])]:
        for name in (*folders, *files):
            entry = os.path.join(top, name)
            mode = os.lstat(entry).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                kind = "socket" if stat.S_ISSOCK(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device node"
                return (
                    f"it holds a {kind}, {entry}, which a read-only mount does not protect (programs could send "
                    "through it); list a folder of plain files"
                )
    return None


def _rebase(path: str, source: str, target: str) -> str:
    """``path`` (``source`` or below it) as seen where ``source`` is bound at ``target``."""
    rest = os.path.relpath(path, source)
    return target if rest == "." else os.path.join(target, rest)


def _local_install(direct_url: str) -> bool:
    """Whether a package's ``direct_url.json`` names a folder of this machine (an install from a checkout)."""
    try:
        with open(direct_url, "rb") as f:
            return b'"file:' in f.read(4096)
    except OSError:
        return False


def _mount_flags(path: str, mounts: dict[str, int]) -> int:
    """Flags of the mount ``path`` lives on (its longest mount-point prefix)."""
    best = max((m for m in mounts if _under(path, [m])), key=len, default="/")
    return mounts.get(best, 0)


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
    plan: Plan,
    workdir: bytes,
    rlimits: tuple,
    tmpfs_options: bytes,
    uid: int | None,
    error_fd: int,
    cgroup_procs: bytes | None = None,
) -> None:
    """Runs in the forked child before ``exec``: its memory cgroup, namespaces, the filesystem view, limits, no
    new privileges. A failure is written to ``error_fd`` (for the parent's error message) and re-raised.
    """
    try:
        if cgroup_procs is not None:  # first, while the host's cgroup filesystem is still visible
            _write(cgroup_procs, b"%d" % os.getpid())
        _setup(plan, workdir, rlimits, tmpfs_options, uid)
    except BaseException as err:
        os.write(error_fd, f"{type(err).__name__}: {err}".encode(errors="replace"))
        raise


def _setup(plan: Plan, workdir: bytes, rlimits: tuple, tmpfs_options: bytes, uid: int | None) -> None:
    flags = (CLONE_NEWUSER if plan.user_namespace else 0) | (CLONE_NEWNET if plan.network else 0)
    flags |= (CLONE_NEWNS if plan.filesystem else 0) | (CLONE_NEWIPC | CLONE_NEWUTS if plan.ipc else 0)
    if flags:
        _call(_LIBC.unshare(flags), "unshare")
    if plan.user_namespace:
        uid, gid = plan.host_ids
        _write("/proc/self/setgroups", b"deny")
        _write("/proc/self/uid_map", b"%d %d 1" % (uid, uid))
        _write("/proc/self/gid_map", b"%d %d 1" % (gid, gid))
    if plan.ipc:
        _call(_LIBC.sethostname(b"sandbox", 7), "sethostname")
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
    """A new root (a tmpfs built at ``workdir``, the host folder the parent made) holding only the plan's
    read-only binds, device nodes, private /tmp and /dev/shm and, at ``workdir``, a size-limited tmpfs with a
    copy of the program's files; then ``pivot_root`` into it and detach the host's root."""
    _mount(None, b"/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    work_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)  # the files the parent wrote, read below
    root = workdir
    _mount(b"tmpfs", root, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755")
    for point in plan.private_tmpfs:  # first, so binds below /tmp (a venv there, a listed path) stay visible
        os.makedirs(root + point, exist_ok=True)
        _mount(b"tmpfs", root + point, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs_options + b",mode=1777")
    for source, target, keep in plan.binds:
        inside = root + target
        if os.path.isdir(source):
            os.makedirs(inside, exist_ok=True)
        else:  # a file or a device node is bound onto an empty file
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            os.close(os.open(inside, os.O_WRONLY | os.O_CREAT, 0o644))
        _mount(source, inside, None, MS_BIND)
        _mount(None, inside, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
    for path in plan.hidden:  # an empty file in its place: nothing of the host's layout shows through
        _mount(b"/dev/null", root + path, None, MS_BIND)
    for link, target in plan.links:
        os.symlink(target, root + link)
    os.makedirs(root + b"/proc", exist_ok=True)  # `unshare --mount-proc` mounts its pid namespace's /proc here
    if plan.host_proc:  # a user namespace may mount proc only where one is already fully visible
        _mount(b"/proc", root + b"/proc", None, MS_BIND | MS_REC)
    os.symlink(b"/proc/self/fd", root + b"/dev/fd")
    inside = root + workdir
    os.makedirs(inside, exist_ok=True)
    owner = b"" if uid is None else b",uid=%d,gid=%d" % (uid, uid)
    _mount(b"tmpfs", inside, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs_options + b",mode=0700" + owner)
    for name in os.listdir(work_fd):
        source = os.open(name, os.O_RDONLY, dir_fd=work_fd)
        target = os.open(os.path.join(inside, os.fsencode(name)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        while chunk := os.read(source, 1 << 16):
            os.write(target, chunk)
        if uid is not None:
            os.fchown(target, uid, uid)
        os.close(source)
        os.close(target)
    os.close(work_fd)
    os.chdir(root)
    if plan.pivot_syscall is not None:  # pivot_root(".", "."): the old root ends up on top, then detach it
        _call(_LIBC.syscall(plan.pivot_syscall, b".", b"."), "pivot_root")
        _call(_LIBC.umount2(b".", MNT_DETACH), "umount old root")
    else:
        os.chroot(".")
    _mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
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
