"""scripts/value_probe.py: the reward-variance split by hand, and a smoke-size probe end to end."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("value_probe", ROOT / "scripts" / "value_probe.py")
probe = importlib.util.module_from_spec(SPEC)
sys.modules["value_probe"] = probe
SPEC.loader.exec_module(probe)


def test_variance_split_by_hand():
    # rewards 1, 0 | 0.5, 0.5 | 1, 1: mean 2/3, total variance (1/9 + 4/9 + 1/36 · 2 + 1/9 · 2) / 6 = 0.1389;
    # within groups only the first group varies: (0.25 + 0.25) / 6 = 0.0833
    total, within = probe.variance_split(torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 1.0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert total == pytest.approx(5 / 36) and within == pytest.approx(1 / 12)


@pytest.mark.slow
def test_value_probe_smoke(tmp_path, capsys):
    """Two probe steps of both targets on the untrained tiny model: the before/after explained variances and the
    variance split are printed, within-group variance no larger than the total."""
    small = ["data.num_synthetic=300", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
             "wandb.mode=disabled", f"run_dir={tmp_path}"]  # fmt: skip
    assert probe.main(["configs/quickstart.yaml", *small, "--steps", "5", "--targets", "centered,reward"]) == 0
    out = capsys.readouterr().out
    assert out.count("step   5  explained variance before update") == 2, out
    splits = re.findall(r"total ([\d.]+), within groups ([\d.]+)", out)
    assert len(splits) == 2 and all(float(w) <= float(t) + 1e-12 for t, w in splits), out
