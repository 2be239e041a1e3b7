"""scripts/rlhf_report.py: the RLHF table's start/end numbers and changes, and its picture, from run directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_run(root: Path, verifier: tuple[float, float], rm: tuple[float, float]) -> Path:
    """A run directory as scripts/rlhf.sh leaves it: rl/metrics.jsonl with two evaluations, the reward model's json."""
    (root / "reward_model").mkdir(parents=True)
    (root / "reward_model" / "reward_model.json").write_text(json.dumps({"accuracy": {"heldout": 0.8}}))
    rows = []
    for step, (v, r) in enumerate(zip(verifier, rm, strict=True)):
        rows.append({"step": step * 2, "eval/greedy_reward/sudoku_cells": v, "eval/greedy_reward/rm": r,
                     "eval/mean@4/sudoku_cells": v / 2, "eval/mean@4/rm": r / 2})  # fmt: skip
        rows.append({"step": step * 2 + 1, "reward/rm/mean": r, "reward/corr/rm/sudoku_cells": 0.5})
    (root / "rl").mkdir()
    (root / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "rl"


def test_table_and_curves(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "seed0", (0.4, 0.7), (-1.0, 2.0))
    b = fake_run(tmp_path / "seed1", (0.5, 0.6), (0.0, 1.0))
    png = tmp_path / "curves.png"
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rlhf_report.py"), f"recipe={a},{b}", "--png", str(png)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    assert lines[0] == "**recipe**"
    assert f"| {a} | 0.800 | -1.00 → +2.00 | 0.400 → 0.700 (+0.300) | 0.200 → 0.350 (+0.150) |" in lines
    assert f"| {b} | 0.800 | +0.00 → +1.00 | 0.500 → 0.600 (+0.100) | 0.250 → 0.300 (+0.050) |" in lines
    # changes +0.3 and +0.1: mean 0.2, sample std 0.141; mean@4 changes +0.15 and +0.05: 0.1 ± 0.071
    assert lines[-1] == "| mean ± std | | | +0.200 ± 0.141 | +0.100 ± 0.071 |"
    assert png.stat().st_size > 10_000


def test_a_run_without_the_reward_model_is_named_not_a_traceback(tmp_path: Path) -> None:
    run = tmp_path / "plain" / "rl"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/greedy_reward": 0.4}) + "\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rlhf_report.py"), f"x={run}"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{run} has 0 evaluation(s) that score both 'rm' and 'sudoku_cells'" in done.stderr
