"""The system-call filter of sandboxed programs (seccomp, classic BPF) and the bootstrap that installs it.

``syscall_filter(machine)`` builds the filter: no kernel keyring calls (``keyctl``, ``add_key``, ``request_key``),
no new namespaces (``unshare``, ``setns``, ``clone`` with namespace flags; ``clone3`` answers ENOSYS so the C
library falls back to ``clone``), no ``AF_UNIX`` socket of its own (so no socket file anywhere is reachable;
connected ``socketpair``s, which asyncio and multiprocessing use, still work), none of the kernel interfaces
unprivileged sandboxes usually lose (``bpf``, ``userfaultfd``, ``perf_event_open``, ``io_uring``), and no system
call of another architecture (a 32-bit entry). ``BOOTSTRAP`` is the sandboxed interpreter's first code: it joins a
fresh, empty session keyring, installs the filter (which then holds for every process the program starts, and
cannot be removed), and runs ``main.py`` as ``__main__``.

Example:
    >>> program = syscall_filter("x86_64")
    >>> len(program) % 8, len(program) // 8 > 20   # struct sock_filter records
    (0, True)
    >>> syscall_filter("sparc")
    b''
"""

from __future__ import annotations

import struct

_NAMESPACE_FLAGS = 0x00000080 | 0x7E020000  # CLONE_NEWTIME and CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET}

# The system-call filter, per architecture: the audit architecture, then system-call numbers.
_ARCH = {
    "x86_64": (0xC000003E, 0x40000000),  # (AUDIT_ARCH_X86_64, the x32 bit: numbers at or above it are refused)
    "aarch64": (0xC00000B7, None),
}
_SYSCALLS = {
    "x86_64": {
        "keyctl": 250, "add_key": 248, "request_key": 249, "unshare": 272, "setns": 308, "clone": 56,
        "clone3": 435, "socket": 41, "socketpair": 53, "bpf": 321, "userfaultfd": 323, "perf_event_open": 298,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    },
    "aarch64": {
        "keyctl": 219, "add_key": 217, "request_key": 218, "unshare": 97, "setns": 268, "clone": 220,
        "clone3": 435, "socket": 198, "socketpair": 199, "bpf": 280, "userfaultfd": 282, "perf_event_open": 241,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    },
}  # fmt: skip
_DENIED = (
    "keyctl", "add_key", "request_key", "unshare", "setns", "bpf", "userfaultfd", "perf_event_open",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)  # fmt: skip

# Runs as the sandboxed interpreter's first code (``python -I -c BOOTSTRAP <filter hex> <keyctl number>``): a
# fresh session keyring, the filter (the no-new-privileges bit is already set), then main.py as ``__main__``,
# as ``python main.py`` would run it. Nothing here is secret; it only narrows what the program can ask the kernel.
BOOTSTRAP = """\
def _tracerl_start():
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    program, keyctl, long = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), ctypes.c_long
    class Filter(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    fprog = Filter(len(program) // 8, program)
    joined = libc.syscall(long(keyctl), long(1), long(0)) >= 0  # KEYCTL_JOIN_SESSION_KEYRING, no name: a new one
    if not joined or libc.prctl(22, long(2), ctypes.byref(fprog), long(0), long(0)):  # PR_SET_SECCOMP, FILTER
        sys.stderr.write("tracerl sandbox: no fresh keyring or system-call filter: errno %d\\n" % ctypes.get_errno())
        sys.exit(125)
    import __main__
    space = __main__.__dict__
    del space["_tracerl_start"]
    space.update(__file__="main.py", __cached__=None)
    sys.argv[:] = ["main.py"]
    exec(compile(open("main.py", "rb").read(), "main.py", "exec"), space)
_tracerl_start()
"""


def keyctl_number(machine: str) -> int:
    """``keyctl``'s system-call number on ``machine`` (0 where unknown)."""
    return _SYSCALLS.get(machine, {}).get("keyctl", 0)


def syscall_filter(machine: str) -> bytes:
    """The seccomp program (classic BPF, ``struct sock_filter`` records) for ``machine``; empty if unknown.

    Foreign-architecture calls → ENOSYS; the keyring, namespace and kernel-surface calls of ``_DENIED`` → EPERM;
    ``clone`` with a namespace flag → EPERM; ``clone3`` → ENOSYS (its flags live in memory a filter cannot read;
    the C library then uses ``clone``); ``socket(AF_UNIX, ...)`` → EPERM; ``socketpair`` of a type other than
    stream or seqpacket → EPERM; everything else is allowed.
    """
    if machine not in _ARCH:
        return b""
    arch, x32 = _ARCH[machine]
    nr = _SYSCALLS[machine]
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    ld, jeq, jset, jge, ret, alu_and = 0x20, 0x15, 0x45, 0x35, 0x06, 0x54
    code: list[tuple[int, int, int, int]] = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, enosys), (ld, 0, 0, 0)]
    if x32 is not None:
        code += [(jge, 0, 1, x32), (ret, 0, 0, enosys)]
    for name in _DENIED:
        code += [(jeq, 0, 1, nr[name]), (ret, 0, 0, eperm)]
    code += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, enosys)]
    # clone: flags are the first argument (its low 32 bits at offset 16 of struct seccomp_data)
    code += [(jeq, 0, 4, nr["clone"]), (ld, 0, 0, 16), (jset, 0, 1, _NAMESPACE_FLAGS), (ret, 0, 0, eperm)]
    code += [(ret, 0, 0, allow)]
    code += [(jeq, 0, 4, nr["socket"]), (ld, 0, 0, 16), (jeq, 0, 1, 1), (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    # socketpair(domain, type, ...): the type without SOCK_NONBLOCK / SOCK_CLOEXEC, stream (1) or seqpacket (5)
    code += [(jeq, 0, 6, nr["socketpair"]), (ld, 0, 0, 24), (alu_and, 0, 0, 0xF), (jeq, 2, 0, 1), (jeq, 1, 0, 5)]
    code += [(ret, 0, 0, eperm), (ret, 0, 0, allow)]
    code += [(ret, 0, 0, allow)]
    return b"".join(struct.pack("<HBBI", op, jt, jf, k) for op, jt, jf, k in code)
