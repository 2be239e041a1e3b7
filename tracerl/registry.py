"""Named variants of one kind (remasking rules, view builders, advantages, ...): register by name, look up
with an error that lists the valid names (STYLE rule 5).

Example:
    >>> SHAPES = Registry("shape")
    >>> @SHAPES.register("square")
    ... def square(x): return x * x
    >>> SHAPES.lookup("square")(3)
    9
    >>> SHAPES.lookup("circle")
    Traceback (most recent call last):
    ...
    tracerl.registry.UnknownName: unknown shape 'circle'; choose from ['square']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UnknownName(KeyError):
    """A lookup of a name no variant has: a ``KeyError`` (as a dict's), whose message is a whole sentence that
    the command line prints as it is (a bare ``KeyError`` from a dict lookup is named with its type)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(dict[str, F]):
    """A name → function mapping with a registering decorator and a lookup that explains failures."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        def wrap(fn: F) -> F:
            self[name] = fn
            return fn

        return wrap

    def lookup(self, name: str) -> F:
        if name not in self:
            raise UnknownName(f"unknown {self.kind} '{name}'; choose from {sorted(self)}")
        return self[name]
