"""``docs/configuration.md``, generated from the schema: every knob of ``tracerl.config.Config`` with its type,
default and the comment beside its field. ``python -m tracerl.config_docs`` rewrites the page; a test fails when
the page and the schema disagree.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

from tracerl.config import Config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
INTRO = """# Configuration

Every setting of a run, generated from the schema (`tracerl/config.py`) by `python -m tracerl.config_docs`;
a test fails when this page and the schema disagree. YAML files (`configs/*.yaml`) only override these defaults,
and `key=value` arguments on the command line override last, e.g.

```bash
tracerl train configs/quickstart.yaml learner.lr=3e-4 rollout.samples_per_prompt=16 data.synthetic_options.noise=0.1
```

A list setting is given whole (`reward.functions=[{fn: sudoku_cells}, {fn: synthetic_exact, weight: 0}]`), or one
entry of the list the config already has is changed by its index, in command-line order:
`reward.functions[1].weight=0.5` (or replaced whole: `reward.functions[1]={fn: math_verify}`). A mapping setting
(`data.synthetic_options`, a reward's `kwargs`, `cluster.*_resources`) given whole on the command line replaces the
one the YAML set (`data.synthetic_options={noise: 0.1}`; `{}` clears it); one of its keys is set on its own with a
dot (`data.synthetic_options.noise=0.1`), keeping the others.

Unknown keys, wrong types, values outside a field's choices or range, and numbers that are not finite (`inf`,
`nan`) stop the command before anything starts, naming the setting; `tracerl validate CONFIG` checks a config
(and, without `--offline`, the model, data, rewards and cluster) without training. The resolved config of every
run is saved as `<run_dir>/config.json` and in W&B.
"""
_FIELD = re.compile(r"^(\s+)(\w+)\s*:")


def field_comments(cls: type) -> dict[str, str]:
    """What the source says about each field of a dataclass: the comment after it, then the comment lines just
    above it (a longer note). Read with ``tokenize``, so a ``#`` inside a default string is not a comment.

    Example:
        >>> from tracerl.config import CheckpointConfig, SandboxConfig
        >>> field_comments(CheckpointConfig)["keep_last"]
        'complete checkpoints kept'
        >>> field_comments(SandboxConfig)["min_isolation"][:46]
        'below this level generated code is never run: '
    """
    lines = inspect.getsource(cls).splitlines()
    trailing: dict[int, str] = {}  # line index → the comment after code on it
    alone: dict[int, str] = {}  # line index → a line that is only a comment
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start[0] - 1, tok.start[1]
            text = tok.string.lstrip("#").strip()
            (alone if not lines[row][:col].strip() else trailing)[row] = text
    body = next((m.group(1) for line in lines[1:] if (m := _FIELD.match(line))), None)
    out = {}
    for i, line in enumerate(lines):
        match = _FIELD.match(line)
        if not match or match.group(1) != body:
            continue
        above, j = [], i - 1
        while j in alone:
            above.insert(0, alone[j])
            j -= 1
        first = trailing.get(i, "").rstrip(".")
        out[match.group(2)] = ". ".join(p for p in (first, " ".join(above)) if p)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _type_name(hint: Any) -> str:
    text = str(hint).replace("typing.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def _summary(cls: type) -> str:
    """The first paragraph of a class's docstring, on one line."""
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def sections(cls: type = Config, prefix: str = "") -> list[tuple[str, type, list[tuple[str, str, str, str]]]]:
    """(dotted section, dataclass, rows of (key, type, default, meaning)) for a config and every nested section."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            nested.append((f.name, type(default)))
            continue
        meaning = comments.get(f.name, "")
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            shown, meaning = "1 entry", meaning or f"a list of entries: see `{prefix}{f.name}[]` below"
        else:
            shown = repr(default)
        rows.append((f"{prefix}{f.name}", _type_name(hints[f.name]), shown, meaning))
    out = [(prefix.rstrip(".") or "(top level)", cls, rows)]
    for name, sub in nested:
        out.extend(sections(sub, f"{prefix}{name}."))
    return out


def render() -> str:
    """The whole page as markdown."""
    parts = [INTRO]
    for title, cls, rows in sections():
        doc = _summary(cls) if cls is not Config else "The whole run."
        parts.append(f"\n## `{title}`\n\n{doc}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        parts.extend(f"| `{k}` | `{_cell(t)}` | `{_cell(d)}` | {_cell(m)} |" for k, t, d, m in rows)
    from tracerl.config import JudgeConfig, RewardFnConfig, RewardModelConfig

    entry = ", ".join(f.name for f in dataclasses.fields(RewardFnConfig))
    parts.append(
        f"\n`reward.functions` is a list of `{{{entry}}}` "
        "entries (the `reward.functions[]` fields below); by default one entry, `synthetic_exact` with weight 1. "
        "A reward model's settings go in its `model` block and a judge's in its `judge` block (both unset by "
        "default; see `docs/rewards.md`).\n"
    )

    for cls, prefix in (
        (RewardFnConfig, "reward.functions[]."),
        (RewardModelConfig, "reward.functions[].model."),
        (JudgeConfig, "reward.functions[].judge."),
    ):
        _, _, rows = sections(cls, prefix)[0]
        if cls is not RewardFnConfig:
            parts.append(f"\n### `{prefix.rstrip('.')}`\n\n{_summary(cls)}\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        parts.extend(f"| `{k}` | `{_cell(t)}` | `{_cell(d)}` | {_cell(m)} |" for k, t, d, m in rows)
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}", file=sys.stderr)
