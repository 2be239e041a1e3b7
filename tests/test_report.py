"""tracerl plot: the before/after table and the curves PNG of a run; docs/configuration.md against the schema."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tracerl.cli import main
from tracerl.config import Config
from tracerl.config_docs import PAGE, render, sections
from tracerl.report import before_after, curves_figure, plot_curves, read_metrics, table_rows


def fake_run(run_dir: Path, steps: int = 4) -> None:
    """A train run's files as the loop writes them: a metrics row per step, evaluations at 0, 2 and 4."""
    (run_dir / "eval").mkdir(parents=True)
    rows = []
    for step in range(steps + 1):
        row = {"step": step, "time": 0.0}
        if step:
            row |= {"reward/mean": 0.3 + 0.1 * step, "reward/std": 0.2}
        if step % 2 == 0:
            metrics = {"eval/greedy_reward": 0.4 + 0.05 * step, "eval/exact_match": 0.1 * step,
                       "eval/mean@4": 0.3 + 0.05 * step, "eval/pass@4": 0.5, "eval/prompts": 200.0}  # fmt: skip
            row |= metrics
            summary = {"step": step, "k": 4, "metrics": metrics}
            (run_dir / "eval" / f"step-{step}.json").write_text(json.dumps(summary))
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_before_after_takes_step_zero_and_the_last_evaluation(tmp_path):
    fake_run(tmp_path)
    before, after = before_after(tmp_path)
    assert (before["step"], after["step"]) == (0, 4)
    got = {label: (b, a, d) for label, b, a, d in table_rows(before, after)}
    assert got["greedy reward"] == pytest.approx((0.4, 0.6, 0.2))
    assert got["exact match (greedy)"] == pytest.approx((0.0, 0.4, 0.4))
    assert got["pass@4"] == pytest.approx((0.5, 0.5, 0.0))


def test_plot_writes_a_png_and_the_cli_prints_the_table(tmp_path, capsys, monkeypatch):
    fake_run(tmp_path / "rl")
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2)))
    path = plot_curves(tmp_path / "rl", sft_dir=sft)
    assert path == tmp_path / "rl" / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "rl"), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "greedy reward" in out and "0.400" in out and "0.600" in out and "+0.200" in out and "200 prompts" in out
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert "before RL (step 0)" in out  # a start that is not an SFT run's model
    (sft / "final").mkdir()
    (sft / "run.json").write_text(json.dumps({"run_id": "s", "command": "sft"}))
    (tmp_path / "rl" / "config.json").write_text(json.dumps({"model": {"path": str(sft / "final")}}))
    assert main(["plot", str(tmp_path / "rl"), "--out", str(tmp_path / "c.png")]) == 0
    assert "SFT start (step 0)" in capsys.readouterr().out
    # the quickstart writes model.path relative to where it was launched (runs/q/sft/final): read from anywhere
    (tmp_path / "rl" / "config.json").write_text(json.dumps({"model": {"path": "sft/final"}}))
    monkeypatch.chdir("/")
    assert main(["plot", str(tmp_path / "rl"), "--out", str(tmp_path / "c.png")]) == 0
    assert "SFT start (step 0)" in capsys.readouterr().out


def test_a_killed_runs_half_written_last_row_is_left_out_and_damage_elsewhere_is_named(tmp_path, capsys):
    fake_run(tmp_path / "rl")
    metrics = tmp_path / "rl" / "metrics.jsonl"
    rows = len(read_metrics(tmp_path / "rl"))
    with metrics.open("a") as f:
        f.write('{"step": 5, "reward/mean": ')  # killed while writing
    assert len(read_metrics(tmp_path / "rl")) == rows and main(["plot", str(tmp_path / "rl")]) == 0
    metrics.write_text(metrics.read_text().replace('{"step": 3,', '{"step": 3', 1))  # a damaged row mid-file
    with pytest.raises(ValueError, match=r"metrics.jsonl line 4 is not valid JSON .*the file is damaged"):
        read_metrics(tmp_path / "rl")
    fake_run(tmp_path / "rl2")
    (tmp_path / "rl2" / "eval" / "step-2.json").write_text('{"step": 2, "metr')
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "rl2")]) == 2
    assert "step-2.json is not an evaluation summary" in capsys.readouterr().err


def test_plot_checks_out_and_which_run_is_which_before_drawing(tmp_path, capsys):
    fake_run(tmp_path / "rl")
    (tmp_path / "rl" / "run.json").write_text(json.dumps({"run_id": "a", "command": "train"}))
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "run.json").write_text(json.dumps({"run_id": "b", "command": "sft"}))
    for argv, message in (
        (["--out", str(tmp_path / "c.txt")], "--out '{t}/c.txt' is not a picture file matplotlib writes"),
        (["--out", str(tmp_path / "file" / "c.png")], "--out's folder '{t}/file' is a file"),
        (["--sft", str(tmp_path / "rl")], "--sft '{t}/rl' is a tracerl train run, not the sft run it takes"),
    ):
        (tmp_path / "file").write_text("x")
        assert main(["plot", str(tmp_path / "rl"), *argv]) == 2
        assert message.format(t=tmp_path) in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "sft")]) == 2
    assert f"RUN_DIR '{tmp_path}/sft' is a tracerl sft run" in capsys.readouterr().err
    assert not (tmp_path / "rl" / "curves.png").exists()


def test_the_curves_show_a_reward_models_scores_and_the_runs_temperature(tmp_path):
    import matplotlib.pyplot as plt

    fake_run(tmp_path / "rl")
    fig = curves_figure(tmp_path / "rl")
    assert fig.axes[1].get_ylim() == pytest.approx((-0.02, 1.02))  # scores in [0, 1]: the whole scale
    assert fig.axes[0].get_title().endswith("training reward (rollouts)")  # no config.json: no temperature
    plt.close(fig)
    metrics = tmp_path / "rl" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row in rows:  # a reward model scores 1.6-1.8: the curve was drawn above the top of the panel
        row.update({k: 1.6 + 0.05 * row["step"] for k in ("eval/greedy_reward", "eval/mean@4") if k in row})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rl" / "config.json").write_text(json.dumps({"sampling": {"temperature": 0.7}}))
    fig = curves_figure(tmp_path / "rl")
    low, high = fig.axes[1].get_ylim()
    assert low <= 0.0 and high >= 1.8  # exact match 0-0.4 and the scores up to 1.8, all in view
    assert fig.axes[0].get_title().endswith("training reward (rollouts, temperature 0.7)")
    plt.close(fig)


def test_plot_reads_both_runs_before_printing_and_names_a_checkpoint_given_as_the_run(tmp_path, capsys):
    fake_run(tmp_path / "rl")
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "rl"), "--sft", str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{tmp_path}/empty/metrics.jsonl does not exist" in captured.err
    step = tmp_path / "rl" / "checkpoints" / "step-4"
    (step / "learner").mkdir(parents=True)
    assert main(["plot", str(step)]) == 2
    err = capsys.readouterr().err
    assert (
        f"RUN_DIR '{step}' is in the checkpoint '{step}', not a run_dir: give the run's folder, '{tmp_path}/rl'" in err
    )
    assert not (tmp_path / "rl" / "curves.png").exists()


def test_plot_of_a_run_without_evaluations_says_why(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds 0 evaluation(s)" in capsys.readouterr().err


def test_configuration_page_matches_the_schema():
    assert PAGE.read_text() == render(), "docs/configuration.md is stale: run python -m tracerl.config_docs"
    documented = {key for _, _, rows in sections() for key, *_ in rows}

    def keys(cls: type, prefix: str = "") -> set[str]:
        out = set()
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            out |= keys(type(value), f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
        return out

    assert keys(Config) == documented
    assert "| `data.synthetic_options` | `dict[str, Any]` | `{}` | the synthetic task's options" in PAGE.read_text()


def test_every_setting_on_the_configuration_page_says_what_it_means():
    """Each row's meaning is the field's whole comment: none empty, none cut at a line end, no source text
    leaking in from a '#' inside a default string."""
    from tracerl.config import JudgeConfig, RewardFnConfig, RewardModelConfig

    rows = [row for _, _, rs in sections() for row in rs]
    rows += [row for cls in (RewardFnConfig, RewardModelConfig, JudgeConfig) for row in sections(cls, "x.")[0][2]]
    for key, _, _, meaning in rows:
        assert meaning, f"{key} has no comment in tracerl/config.py"
        assert not meaning.rstrip().endswith((":", ";", ",")), f"{key}: cut short: {meaning!r}"
        assert "#" not in meaning.replace("####", ""), f"{key}: source text in its meaning: {meaning!r}"
    for title, _, _ in sections():  # each section's note is its class's whole first paragraph, not its first line
        assert render().split(f"## `{title}`\n\n")[1].split("\n\n")[0].endswith((".", ")")), title
