"""The assert-test harness: the program the sandbox runs for the ``code`` reward's ``tests`` column.

``rewards.harness`` builds its input and reads its report; this file is run as the sandboxed program's
``main.py`` and is never imported by tracerl. Input: one JSON object on stdin: ``token``, ``solution``,
``strict`` and ``tests``, per test its ``source`` (in strict mode only its ``expression``: the expected value
never enters the sandbox), the stdlib modules it reads attributes of (``pins``) or imports (``imports``) and
the builtins it names (``builtins``). Output: one line per test, ``<token> <index> <verdict>``, on a copy of
stdout taken before the solution runs. The verdict is ``1`` or ``0``; in strict mode it is the tested
expression's value as tagged JSON (``!`` when it raised), and the reward process compares it with the
expected value, so nothing this process does can make a wrong value pass.

Before the solution runs, the harness binds every function it calls, compiles the tests, imports the modules
the tests use and takes a snapshot of the interpreter's machinery: builtins, every loaded module and its
classes, ``sys.modules``, import hooks, signal handlers. An audit hook refuses new audit hooks and the
introspection that reaches other threads' frames or every object (``sys._current_frames``, ``gc.get_objects``,
``gc.get_referrers``, ``gc.get_referents``) and notes trace or profile functions. After the solution and after
each test the snapshot is compared; if the solution changed anything in it, set a trace or profile function,
armed a timer or left a thread running, no further test is reported (docs/rewards.md says what remains
possible).
"""

import _thread
import builtins
import contextlib
import gc
import io
import json
import os
import signal
import sys
import traceback
from types import ModuleType

# attributes of sys that programs legitimately rebind (output redirection, hooks the harness never relies on)
_SYS_FREE = frozenset(
    {"stdin", "stdout", "stderr", "argv", "displayhook", "excepthook", "breakpointhook", "unraisablehook"}
    | {"tracebacklimit"}
)
_REFUSED = frozenset(
    {"sys.addaudithook", "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents"}
)
_NOTED = frozenset({"sys.settrace", "sys.setprofile"})
_TIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)


def main() -> None:
    # 1. Bind everything the harness calls, before any solution code exists in this process.
    write, read, exec_, eval_, compile_ = os.write, os.read, exec, eval, compile
    isinstance_, type_, repr_, sorted_ = isinstance, type, repr, sorted
    list_, dict_, tuple_, set_, frozenset_, bytes_, complex_ = list, dict, tuple, set, frozenset, bytes, complex
    base_exception, system_exit, dumps, format_exc = BaseException, SystemExit, json.dumps, traceback.format_exc
    getsignal, getitimer = signal.getsignal, signal.getitimer
    thread_count, modules, meta_path, path_hooks = _thread._count, sys.modules, sys.meta_path, sys.path_hooks
    signals = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]
    noted: list = []

    def audit(event: str, args: tuple) -> None:
        if event in _REFUSED:
            raise RuntimeError(f"{event} is not available to programs under test")
        if event in _NOTED:
            noted.append(event)

    sys.addaudithook(audit)

    # 2. The input, read straight from the descriptor (no buffer keeps it), then stdin is empty.
    chunks = []
    while chunk := read(0, 1 << 16):
        chunks.append(chunk)
    payload = json.loads(b"".join(chunks))
    del chunks
    sys.stdin = io.StringIO("")
    token, strict, tests = payload["token"], payload["strict"], payload["tests"]
    report = os.dup(1)

    def say(text: str) -> None:
        write(2, f"\ntracerl harness: {text}\n".encode(errors="replace"))

    codes = []
    for index, test in enumerate(tests):
        try:
            mode = "eval" if strict else "exec"
            codes.append(compile_(test["expression"] if strict else test["source"], f"test_{index}.py", mode))
        except base_exception:
            say(f"test {index} does not compile:\n{format_exc()}")
            codes.append(None)
    pinned = {}
    for name in sorted_({name for test in tests for name in test["pins"] + test["imports"]}):
        with contextlib.suppress(base_exception):
            pinned[name] = __import__(name)

    # 3. The snapshot of the machinery the tests rely on.
    saved = []  # (object, its live __dict__, a copy)
    for name, module in list_(modules.items()):
        space = getattr(module, "__dict__", None)
        if name == "__main__" or not isinstance_(module, ModuleType) or space is None:
            continue
        saved.append((name, space, dict_(space), name != "builtins"))
        for value in space.values():
            if isinstance_(value, type) and not value.__flags__ & (1 << 8) and value.__module__ == name:
                saved.append((f"{name}.{value.__qualname__}", value.__dict__, dict_(value.__dict__), False))
    loaded = {name: modules[name] for name, _, _, _ in saved if name in modules}
    hooks = (list_(meta_path), list_(path_hooks), list_(gc.callbacks))
    handlers = [getsignal(s) for s in signals]

    def changed() -> str | None:
        """What the program changed in the snapshot, or None."""
        if noted:
            return f"a {noted[0].split('.')[1]} function was set"
        if thread_count():
            return "threads were left running"
        for name, module in loaded.items():
            if modules.get(name) is not module:
                return f"sys.modules[{name!r}] was replaced"
        for name, live, copy, module in saved:
            for key, value in copy.items():
                now = live.get(key, live)
                if now is value or value is None or (name == "sys" and key in _SYS_FREE):
                    continue  # unchanged, set lazily by the module itself (None before), or free to set
                if module and key[:2] == "__" == key[-2:]:
                    continue  # a module's own metadata (importlib renames its bootstrap modules)
                if not (type_(value) is bool and type_(now) is bool):  # flags modules flip themselves
                    return f"{name}.{key} was changed"
        if (list_(meta_path), list_(path_hooks), list_(gc.callbacks)) != hooks:
            return "import hooks or garbage-collector callbacks were changed"
        if [getsignal(s) for s in signals] != handlers:
            return "a signal handler was changed"
        if any(getitimer(t) != (0.0, 0.0) for t in _TIMERS):
            return "a timer was armed"
        return None

    # 4. The solution.
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec_(compile_(payload["solution"], "solution.py", "exec"), namespace)
    except system_exit as stop:
        if stop.code not in (None, 0):
            raise
    except base_exception:
        say(f"the solution raised:\n{format_exc()}")
        return
    del payload

    def encode(value: object, depth: int = 0) -> list:
        """A plain value as tagged JSON; anything else (a subclass, an object with its own ``__eq__``) raises."""
        kind = type_(value)
        if depth > 100:
            raise ValueError("nested too deeply")
        if kind is bool or kind is str or value is None:
            return [kind.__name__, value]
        if kind is int or kind is float:
            return [kind.__name__, repr_(value)]
        if kind is complex_:
            return ["complex", repr_(value.real), repr_(value.imag)]
        if kind is bytes_:
            return ["bytes", value.hex()]
        if kind is list_ or kind is tuple_ or kind is set_ or kind is frozenset_:
            return [kind.__name__, [encode(item, depth + 1) for item in value]]
        if kind is dict_:
            return ["dict", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
        raise TypeError(f"a result of type {kind.__name__} is not plain data (strict mode compares plain values)")

    # 5. The tests, each in a copy of the namespace with the real builtins and the pinned modules.
    for index, (test, code) in enumerate(zip(tests, codes, strict=True)):
        problem = changed()
        if problem is not None:
            say(f"{problem} by the program; no further test is reported.")
            return
        shadowed = [name for name in test["builtins"] if name in namespace]
        if code is None or shadowed:
            if shadowed:
                say(f"the program rebinds the builtin {shadowed[0]!r} that test {index} uses; the test fails.")
            write(report, f"\n{token} {index} {'!' if strict else 0}\n".encode())
            continue
        scope = {**namespace, **{name: pinned[name] for name in test["pins"] if name in pinned}}
        scope["__builtins__"] = builtins
        try:
            if strict:
                verdict = dumps(encode(eval_(code, scope)), separators=(",", ":"))
            else:
                exec_(code, scope)
                verdict = "1"
        except base_exception:
            say(f"test {index} failed:\n{format_exc()}")
            verdict = "!" if strict else "0"
        for key, value in scope.items():  # what a test defines stays visible to the next ones
            if key != "__builtins__" and key not in test["pins"]:
                namespace[key] = value
        problem = changed()
        if problem is not None:
            say(f"{problem} by the program; no further test is reported.")
            return
        write(report, f"\n{token} {index} {verdict}\n".encode())


if __name__ == "__main__":
    main()
