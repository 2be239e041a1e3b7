"""scripts/compare.py: the method comparison's arithmetic by hand, and a smoke-size run end to end."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
compare = load_script("compare")


def test_docstring_examples():
    result = doctest.testmod(compare)
    assert result.attempted >= 2 and result.failed == 0


def test_equal_compute_steps_by_hand():
    # trace spends 4 units per step for 20 steps = 80 units; a method spending 1 unit needs 80 steps, one spending
    # 3 needs 26.7 → 25 (nearest multiple of 5); a dearer one (8 units) 10 steps; never fewer than one evaluation.
    assert [compare.equal_compute_step(20, 4.0, f, 5) for f in (1.0, 3.0, 8.0, 1000.0)] == [80, 25, 10, 5]


def run(
    tmp_path, method: str, seed: int, evals: dict[int, float], flops: list[float], steps: int, eq: int, alerts: int = 0
):  # noqa: ANN201
    """A fake finished run directory: metrics rows with evaluations and counted FLOPs."""
    d = tmp_path / method / f"seed{seed}"
    d.mkdir(parents=True)
    rows = [{"step": 0, "eval/greedy_reward": evals[0]}]
    for s in range(1, steps + 1):
        row = {"step": s, "perf/learner_flops": flops[s - 1], "train/policy_loss": 0.0, "train/kl_to_old": 0.01 * s}
        rows.append(row | ({"eval/greedy_reward": evals[s]} if s in evals else {}))
    if alerts:  # a training reward that collapses: 0.6 at step 1, then 0.1
        rows = [r | ({"reward/mean": 0.6 if r["step"] < 2 else 0.1} if r["step"] else {}) for r in rows]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = compare.Run("block", method, seed, steps, eq, str(d))
    compare.read_run(r)
    return r


def test_summary_and_table_by_hand(tmp_path):
    # trace: 2 steps of 10 FLOPs; cheap: 4 steps of 5 FLOPs (equal compute at step 4); one refused method.
    runs = [
        run(tmp_path, "trace", 0, {0: 0.4, 2: 0.6}, [10.0, 10.0], 2, 2),
        run(tmp_path, "trace", 1, {0: 0.4, 2: 0.5}, [10.0, 10.0], 2, 2),
        run(tmp_path, "cheap", 0, {0: 0.4, 2: 0.45, 4: 0.7}, [5.0] * 4, 4, 4, alerts=1),
        run(tmp_path, "cheap", 1, {0: 0.4, 2: 0.35, 4: 0.3}, [5.0] * 4, 4, 4),
        compare.Run("block", "d1", 0, 2, 2, str(tmp_path / "none"), refused="d1 masks the prompt"),
    ]
    assert runs[2].flops == {0: 0.0, 1: 5.0, 2: 10.0, 3: 15.0, 4: 20.0}
    # windows of 3 steps: (0.6 + 0.1 + 0.1)/3 = 0.27 at step 3 (the best), 0.1 at step 4 < 0.5 × 0.27
    want = "step 4: training reward collapsed: 0.10 over the last 3 steps, below 0.5 × its best (0.27)"
    assert runs[2].warnings == [want]
    rows = {r["method"]: r for r in compare.summarise(runs, steps=2)}
    trace, cheap = rows["trace"], rows["cheap"]
    # trace at step 2: rewards 0.6, 0.5 → mean 0.55, sd 0.0707; Δ 0.2, 0.1 → +0.15; both seeds rose; 20 FLOPs
    assert trace["steps"]["reward"] == pytest.approx((0.55, 0.070711), abs=1e-6)
    assert trace["steps"]["delta"] == pytest.approx((0.15, 0.070711), abs=1e-6)
    assert trace["steps"]["rose"] == 2 and trace["compute"]["flops"] == 20.0
    # cheap at equal steps (2): 0.45, 0.35 → Δ +0.05, −0.05; at equal compute (4): 0.7, 0.3 → Δ +0.1; 1 of 2 rose
    assert cheap["steps"]["delta"] == pytest.approx((0.0, 0.070711), abs=1e-6)
    assert cheap["compute"]["step"] == 4 and cheap["compute"]["flops"] == 20.0
    assert cheap["compute"]["reward"][0] == pytest.approx(0.5) and cheap["compute"]["rose"] == 1
    assert cheap["warnings"] == 1
    assert cheap["kl_to_old_max"] == pytest.approx(0.02)  # the largest over the first 2 steps, not all 4
    assert rows["d1"]["refused"] == "d1 masks the prompt"
    table = compare.markdown(list(rows.values()), steps=2)
    assert "| block | trace | 0.400 ± 0.000 | 0.550 ± 0.071 | +0.150 ± 0.071 (2/2) | 2 |" in table
    assert "| max kl_to_old (steps ≤ 2) |" in table  # these runs logged the in-loss reading only
    assert "| block | d1 | refused: d1 masks the prompt |" in table
    compare.plot(runs, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_json_is_strict_json(tmp_path):
    """A run that logged no KL has no maximum (NaN in the summary) and a NaN metric stays NaN in its series; the
    JSON file says null for both, so strict parsers (jq, JavaScript, ``parse_constant`` here) read it."""
    r = run(tmp_path, "trace", 0, {0: 0.4, 2: 0.6}, [10.0, 10.0], 2, 2)
    r.series["train/kl_to_old"] = {}
    r.series["reward/mean"] = {1: float("nan"), 2: 0.5}
    rows = compare.summarise([r], steps=2)
    assert rows[0]["kl_to_old_max"] != rows[0]["kl_to_old_max"]  # NaN in memory: the table prints a dash
    assert "| 20 | — | 0/1 |" in compare.markdown(rows, steps=2)  # it printed "nan"

    def refuse(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    compare.write_json(tmp_path / "compare.json", rows, [r])
    data = json.loads((tmp_path / "compare.json").read_text(), parse_constant=refuse)
    assert data["rows"][0]["kl_to_old_max"] is None
    assert data["runs"][0]["series"]["reward/mean"] == {"1": None, "2": 0.5}
    assert data["rows"][0]["steps"]["reward"] == [0.6, 0.0]


def test_refusal_names_the_problem():
    d1 = ["objective.views=d1", "objective.old_logp_source=learner"]
    assert compare.refusal("configs/quickstart.yaml", d1, "block").startswith(
        "objective.views=d1 with objective.d1_prompt_mask_prob=0.15"
    )
    assert compare.refusal("configs/quickstart.yaml", d1, "full") is None
    assert "old_logp_source" in compare.refusal("configs/quickstart.yaml", ["objective.views=coupled"], "block")


def test_selection_is_deduplicated_and_every_problem_named():
    assert compare.check_selection("block,block", "trace,coupled,trace", "0, 0,1", 20, 5) == (
        ["block"],
        ["trace", "coupled"],
        [0, 1],
    )  # a repeated seed would have been counted twice in the table's mean ± sd
    with pytest.raises(SystemExit, match=r"--methods must include 'trace' \(got \['coupled'\]\)"):
        compare.check_selection("block", "coupled", "0", 20, 5)
    with pytest.raises(SystemExit) as err:
        compare.check_selection("blok", "trace,dpo", "a", 20, 0)
    message = str(err.value)
    for part in ("unknown layouts ['blok']", "unknown methods ['dpo']", "--seeds must be comma-separated integers",
                 "--eval-every (0) must be ≥ 1"):  # fmt: skip
        assert part in message, part
    with pytest.raises(SystemExit, match=r"--steps \(-5\)"):
        compare.check_selection("block", "trace", "0", -5, 5)


def test_a_bad_config_is_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "cmp")])
    assert exit_.value.code == 2 and "nope.yaml' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["configs/quickstart.yaml", "sampling.foo=1", "--out", str(tmp_path / "cmp")])
    assert "sampling.foo" in capsys.readouterr().err and not (tmp_path / "cmp").exists()


def test_overrides_may_follow_the_options(tmp_path):
    """As the docs write it: `--layouts block learner.lr=7e-4`; argparse alone refused the override there."""
    with pytest.raises(SystemExit) as err:
        compare.main(["configs/quickstart.yaml", "--out", str(tmp_path), "--report", "--layouts", "block",
                      "learner.lr=7e-4"])  # fmt: skip
    assert "nothing to report for the block layout" in str(err.value)


def test_overrides_of_what_the_comparison_decides_are_refused_before_anything_is_written(tmp_path):
    """objective.views=coupled made the row labelled trace run coupled; seed=3 and train.steps=5 were ignored."""
    out = tmp_path / "cmp"
    cases = (("objective.views=coupled", "from --methods"), ("seed=3", "from --seeds"),
             ("train.steps=5", "from --steps"), ("model.path=/x", "each layout's SFT model"))  # fmt: skip
    for override, owner in cases:
        key = override.split("=")[0]
        with pytest.raises(SystemExit, match=f"{override}: the comparison sets {key} itself \\({owner}"):
            compare.main(["configs/quickstart.yaml", override, "--out", str(out)])
    with pytest.raises(SystemExit, match="compare.py: trace on the block layout is refused with these overrides"):
        compare.main(["configs/quickstart.yaml", "objective.shrink=2", "--out", str(out), "--layouts", "block"])
    assert not out.exists()


def test_a_run_made_with_other_settings_is_refused_not_reported(tmp_path):
    """A rerun with learner.lr=7e-4 into the --out of a 3.5e-4 comparison reported the old runs as the new ones."""
    from tracerl.checks import load_config
    from tracerl.config import to_dict

    run_dir = tmp_path / "seed0"
    args = [*compare.COMMON, *compare.LAYOUTS["block"], "seed=0", f"run_dir={run_dir}", "train.steps=2"]
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(to_dict(load_config("configs/quickstart.yaml", args))))
    free = ("checkpoint.resume", "train.steps")
    assert compare.settings_differ("configs/quickstart.yaml", [*args, "train.steps=4"], run_dir, free) == []
    assert compare.settings_differ("configs/quickstart.yaml", args, tmp_path / "none", free) == []
    with pytest.raises(SystemExit) as err:
        compare.check_same_settings("configs/quickstart.yaml", [*args, "learner.lr=7e-4"], run_dir, free)
    assert f"compare.py: {run_dir} holds a run made with other settings (learner.lr: 0.00035 there, 0.0007 now)" in (
        str(err.value)
    )
    assert "Give another --out, or remove that run" in str(err.value)
    elsewhere = [a.replace(f"run_dir={run_dir}", f"run_dir={run_dir}/../{run_dir.name}") for a in args]
    assert compare.settings_differ("configs/quickstart.yaml", elsewhere, run_dir, free) == []  # --out written anew
    copy = compare.settings_differ("configs/copy.yaml", args, run_dir, free)  # another task entirely
    assert any(line.startswith("data.source:") for line in copy)


def test_a_second_comparison_in_the_same_out_is_refused_while_the_first_runs(tmp_path):
    running = f"another comparison is running in {tmp_path} \\(pid {os.getpid()}\\)"
    with compare.lock(tmp_path), pytest.raises(SystemExit, match=running), compare.lock(tmp_path):
        pass
    with compare.lock(tmp_path):  # released when the first one ends
        pass
    with compare.lock(tmp_path), pytest.raises(SystemExit, match="nothing to report for the block layout"):
        compare.main(["configs/quickstart.yaml", "--out", str(tmp_path), "--report", "--layouts", "block"])
    with pytest.raises(SystemExit, match="nothing to report"):  # --report writes nothing where nothing ran
        compare.main(["configs/quickstart.yaml", "--out", str(tmp_path / "typo"), "--report", "--layouts", "block"])
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_lets_the_running_command_finish_its_step_and_says_how_to_go_on(tmp_path, name):
    """The signal, sent to the comparison alone, is passed on to the command: the comparison waits for it to
    checkpoint its step, then stops with one line (it used to kill the command 0.25 s after a Ctrl-C, before its
    checkpoint, and print a traceback; a SIGINT to the comparison alone never reached the command)."""
    import signal
    import threading
    import time

    log = tmp_path / "run.log"

    def terminate_soon() -> None:  # once the command trains (a stop before that has no step to checkpoint)
        metrics, deadline = tmp_path / "sft" / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), getattr(signal, name))

    threading.Thread(target=terminate_soon, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(SystemExit, match="compare.py: interrupted. Rerun the same command to go on"):
        compare.tracerl(["sft", "sft.steps=100000", "sft.eval_every=0", "sft.batch_size=4",
                         "data.source=synthetic:parity", "data.num_synthetic=100", "wandb.mode=disabled",
                         f"run_dir={tmp_path / 'sft'}"], log)  # fmt: skip
    assert time.monotonic() - start < 120
    assert f"stopped by {name} after SFT step" in log.read_text()  # the command checkpointed its last step
    assert list((tmp_path / "sft" / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("user", [None, "3"])
def test_commands_run_on_one_thread_unless_told_and_this_process_keeps_its_environment(tmp_path, monkeypatch, user):
    """The comparison pinned OMP_NUM_THREADS=1 by writing it into its own environment: called from Python (the
    tests), every later subprocess of the caller ran on one thread while the caller ran on two, and their float
    results differed (an SFT resume test compared the two and failed)."""
    if user is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user)
    seen = {}

    class Done:
        def __init__(self, cmd, **kwargs):  # noqa: ANN001, ANN003
            seen.update(kwargs["env"])

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(compare.subprocess, "Popen", Done)
    before = dict(os.environ)
    compare.tracerl(["sft", f"run_dir={tmp_path / 'sft'}"], tmp_path / "run.log")
    assert seen["OMP_NUM_THREADS"] == (user or "1") and seen["PATH"] == os.environ["PATH"]
    assert dict(os.environ) == before


@pytest.mark.slow
@pytest.mark.ray
def test_compare_end_to_end_smoke(tmp_path):
    """Both layouts, two methods, one seed, two RL steps: the table, the PNG and the JSON come out, and random
    masking (one row per sample instead of trace's several) gets more steps at equal compute."""
    small = [
        "sft.steps=4", "sft.eval_every=0", "data.num_synthetic=300", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=4", "eval.num_prompts=8", "reward.num_workers=1",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "scripts/compare.py", "configs/quickstart.yaml", *small, "--out", str(tmp_path),
           "--layouts", "block,full", "--methods", "trace,random_masking", "--seeds", "0", "--steps", "2",
           "--eval-every", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "compare.json").read_text())
    rows = {(r["layout"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(lay, m) for lay in ("block", "full") for m in ("trace", "random_masking")}
    for layout in ("block", "full"):
        trace, rnd = rows[(layout, "trace")], rows[(layout, "random_masking")]
        assert trace["compute"]["step"] == 2 and rnd["compute"]["step"] > 2
        assert trace["finished"] == rnd["finished"] == 1
    # the full layout's runs carry a KL to the SFT model (the long cheap-estimator runs drift without it); two
    # steps from a 4-step SFT model may train nothing, so read the settings the runs resolved
    for layout, beta in (("block", 0.0), ("full", 0.05)):
        for method in ("trace", "random_masking"):
            resolved = json.loads((tmp_path / layout / method / "seed0" / "config.json").read_text())
            assert resolved["objective"]["kl_to_ref_coef"] == beta, (layout, method)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| block | trace |" in (tmp_path / "compare.md").read_text()
    # a second call finds every run finished and only rebuilds the table
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "RL steps (" not in again.stdout


def test_the_kl_column_reads_the_whole_steps_movement_when_the_runs_measured_it(tmp_path):
    r = run(tmp_path, "trace", 0, {0: 0.4, 2: 0.6}, [10.0, 10.0], 2, 2)
    rows = [json.loads(x) for x in (Path(r.run_dir) / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        row["train/kl_to_old_after_step"] = 0.3 * row["step"]  # learner.kl_after_step (compare's COMMON)
    (Path(r.run_dir) / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in rows))
    compare.read_run(r)
    (row,) = compare.summarise([r], steps=2)
    assert row["kl_to_old_max"] == pytest.approx(0.6) and row["kl_metric"] == "train/kl_to_old_after_step"
    assert "| max kl_to_old_after_step (steps ≤ 2) |" in compare.markdown([row], steps=2)
    assert "learner.kl_after_step=true" in compare.COMMON
