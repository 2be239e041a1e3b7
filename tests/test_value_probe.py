"""scripts/value_probe.py: the reward-variance split and the Sudoku oracle by hand, and a smoke-size probe end to
end."""

from __future__ import annotations

import doctest
import re

import pytest
import torch

from .conftest import load_script

probe = load_script("value_probe")


def test_docstring_examples():
    result = doctest.testmod(probe)
    assert result.attempted >= 6 and result.failed == 0


def test_variance_split_by_hand():
    # rewards 1, 0 | 0.5, 0.5 | 1, 1: mean 2/3, total variance (1/9 + 4/9 + 1/36 · 2 + 1/9 · 2) / 6 = 0.1389;
    # within groups only the first group varies: (0.25 + 0.25) / 6 = 0.0833
    total, within = probe.variance_split(torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 1.0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert total == pytest.approx(5 / 36) and within == pytest.approx(1 / 12)


def test_oracle_values_by_hand():
    # one sample: blank, clue, blank, committed one per step; the first blank right, the clue changed (a spoiler);
    # the policy gets the blanks right at rates 0.5 and 0.25 and writes no spoiler 80% of the time
    blank = torch.tensor([[True, False, True, False]])
    right = torch.tensor([[True, False, False, False]])
    spoiler = torch.tensor([[False, True, False, False]])
    steps = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[True, True, True, False]])  # the last position gets no value
    rate, clean = torch.tensor([[0.5, 0.0, 0.25, 0.0]]), torch.tensor([0.8])
    values = probe.sudoku_oracle_values(blank, right, spoiler, steps, mask, rate, clean)
    # nothing committed: (0.5 + 0.25) / 2 · 0.8; the right first cell committed: (1 + 0.25) / 2 · 0.8; then the
    # spoiler is committed: 0
    assert values[0].tolist() == pytest.approx([0.3, 0.5, 0.0, 0.0])


def test_oracle_values_merged_steps_see_only_earlier_steps():
    # two blank cells committed in the same step: neither state has seen the other cell
    blank, right = torch.tensor([[True, True]]), torch.tensor([[True, True]])
    none = torch.zeros(1, 2, dtype=torch.bool)
    values = probe.sudoku_oracle_values(blank, right, none, torch.tensor([[0, 0]]), ~none,
                                        torch.tensor([[0.5, 0.5]]), torch.tensor([1.0]))  # fmt: skip
    assert values.tolist() == [[0.5, 0.5]]


def test_group_rates_by_hand():
    right = torch.tensor([[True, False], [True, True], [False, True], [False, False]])
    spoiler = torch.tensor([[False, False], [True, False], [False, False], [False, False]])
    rate, clean = probe.group_rates(right, spoiler, torch.tensor([0, 0, 1, 1]))
    assert rate.tolist() == [[1.0, 0.5], [0.0, 0.5]] and clean.tolist() == [0.5, 1.0]


def test_oracle_metrics_group_mean_is_the_baseline():
    """A value equal to the group's mean reward explains nothing of the centered returns and leaves the group
    baseline's advantages as they are; the rewards themselves explain everything."""
    rewards, group = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.75, 0.5]), torch.tensor([0, 0, 1, 1, 1, 1])
    mean = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]).unsqueeze(1).expand(6, 3)
    mask = torch.ones(6, 3, dtype=torch.bool)
    ev, ratio = probe.oracle_metrics(mean, rewards, group, mask, "centered")
    assert ev == pytest.approx(0.0, abs=1e-9) and ratio == pytest.approx(1.0)
    ev, ratio = probe.oracle_metrics(rewards.unsqueeze(1).expand(6, 3), rewards, group, mask, "reward")
    assert ev == pytest.approx(1.0) and ratio == pytest.approx(0.0, abs=1e-12)
    # halfway between: the advantages keep a quarter of the baseline's variance
    half = (mean + rewards.unsqueeze(1)) / 2
    assert probe.oracle_metrics(half, rewards, group, mask, "centered") == pytest.approx((0.75, 0.25))


def test_sudoku_token_cells_match_the_reward():
    """A sample without a spoiler scores the share of its blank cells that are right; one with a spoiler scores 0."""
    from rewards.synthetic import sudoku_cells

    puzzle, solution = "1.3. 34.2 2.4. 4.21", "1234 3412 2143 4321"
    completions = ["1234 3412 2143 4321", "1434 3412 2143 4321", "1234 3412 2143 4322", "1214 3412 2143 4321"]
    texts = [[*c, ""] for c in completions]
    mask = torch.ones(4, 20, dtype=torch.bool)
    blank, right, spoiler = probe.sudoku_token_cells(texts, [puzzle] * 4, [solution] * 4, mask)
    expected = sudoku_cells([puzzle + ":"] * 4, completions, answer=[solution] * 4)
    got = torch.where(spoiler.any(1), 0.0, right.sum(1) / blank.sum(1)).tolist()
    assert got == pytest.approx(expected) and expected[2] == 0.0 and expected[3] == 0.0


@pytest.mark.slow
def test_value_probe_smoke(tmp_path, capsys):
    """Five probe steps of both targets on the untrained tiny model: the before/after explained variances, the
    variance split (within-group variance no larger than the total), the oracle's and V^π's explained variances."""
    small = ["data.num_synthetic=300", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
             "wandb.mode=disabled", f"run_dir={tmp_path}"]  # fmt: skip
    args = ["--steps", "5", "--targets", "centered,reward", "--oracle-samples", "4", "--mc-samples", "2"]
    assert probe.main(["configs/quickstart.yaml", *small, *args]) == 0
    out = capsys.readouterr().out
    assert out.count("step   5  explained variance before update") == 2, out
    splits = re.findall(r"total ([\d.]+), within groups ([\d.]+)", out)
    assert len(splits) == 2 and all(float(w) <= float(t) + 1e-12 for t, w in splits), out
    oracle = re.findall(
        r"oracle \(knows the solution.*explained variance ([-+][\d.]+), advantage variance ([\d.]+)", out
    )
    assert len(oracle) == 2 and all(float(ev) <= 1.0 and float(ratio) >= 0.0 for ev, ratio in oracle), out
    mc = re.findall(r"V\^π at block starts \(2 continuations per state\): explained variance ([-+][\d.]+) on "
                    r"those tokens, ([-+][\d.]+) without the Monte Carlo noise", out)  # fmt: skip
    assert len(mc) == 2 and all(float(plain) <= 1.0 and float(exact) <= 1.0 for plain, exact in mc), out


def _tiny_rollout(overrides: list[str]):
    from tracerl.checks import load_config
    from tracerl.models import load_policy
    from tracerl.orchestrator.setup import load_prompts
    from tracerl.sampling import generate

    cfg = load_config("configs/quickstart.yaml", ["data.num_synthetic=300", "wandb.mode=disabled", *overrides])
    torch.manual_seed(0)
    policy = load_policy(cfg.model)  # untrained: its completions vary from block to block
    stream, _ = load_prompts(cfg)
    prompts = [list(p) for p in stream.next_batch(6).prompt_ids]
    return cfg, policy, prompts, generate(policy, prompts, cfg.sampling, seed=3)


def test_block_start_values_replay_the_sampler_state():
    """Greedy decoding continues every block start exactly as the rollout went on, so V^π there is the sample's own
    reward, and the continuations score the rollout's own completions: the prompt extended by the committed blocks
    is the state the sampler saw (the replay invariant, DESIGN §7)."""
    cfg, policy, prompts, rollout = _tiny_rollout(["sampling.temperature=0"])
    scored: list[tuple[int, str]] = []

    def score(ids: list[int], completions: list[str]) -> list[float]:
        scored.extend(zip(ids, completions, strict=True))
        return [float(len(c) + 100 * c.count("1")) for c in completions]

    values, noise = probe.block_start_values(policy, cfg.sampling, prompts, rollout, score, samples=2, seed=11)
    own = torch.tensor([float(len(t) + 100 * t.count("1")) for t in rollout.texts], dtype=torch.float32)
    assert all(text == rollout.texts[i] for i, text in scored), "a continuation left the rollout's path"
    starts = ~values.isnan()
    size = rollout.block_size
    decoded = (rollout.step_map.view(len(prompts), -1, size) >= 0).any(-1).sum(1)  # blocks each sample decoded
    assert (starts.sum(1) >= decoded).all() and starts.any(1).all()
    assert torch.equal(values[starts], own.unsqueeze(1).expand_as(values)[starts])
    assert torch.equal(noise.isnan(), values.isnan()) and (noise[starts] == 0).all()  # greedy: no Monte Carlo noise
    # each block's value sits on the token(s) of that block's first step
    for i, b in zip(*torch.nonzero(starts.view(len(prompts), -1, size).any(-1), as_tuple=True), strict=True):
        block = rollout.step_map[i, b * size : (b + 1) * size]
        assert torch.equal(starts[i, b * size : (b + 1) * size], block == block[block >= 0].min())


def test_debiased_explained_variance_recovers_the_exact_values():
    """Exact values explain 40% of the returns; Monte Carlo estimates of them (8 samples each) explain less, and
    taking their known noise out gives back the exact values' explained variance."""
    g = torch.Generator().manual_seed(0)
    exact = torch.rand(4000, 1, generator=g) * 2  # Var 1/3
    returns = exact + torch.randn(4000, 1, generator=g) * 0.5  # + Var 1/4 the state cannot tell
    mask = torch.ones(4000, 1, dtype=torch.bool)
    draws = exact + torch.randn(4000, 8, generator=g) * 0.5  # 8 continuations per state
    estimate, noise = draws.mean(1, keepdim=True), draws.var(1, keepdim=True) / 8
    from tracerl.advantages import explained_variance

    truth = explained_variance(exact, returns, mask)
    plain = explained_variance(estimate, returns, mask)
    assert truth == pytest.approx((1 / 3) / (1 / 3 + 1 / 4), abs=0.03)
    assert plain < truth - 0.03  # the noise (Var 1/32) is visible
    assert probe.debiased_explained_variance(estimate, noise, returns, mask) == pytest.approx(truth, abs=0.015)


def test_block_start_values_refuse_unaligned_prompts():
    cfg, policy, prompts, rollout = _tiny_rollout([])
    with pytest.raises(ValueError, match="fill whole blocks"):
        probe.block_start_values(policy, cfg.sampling, [p[:-1] for p in prompts], rollout, lambda i, c: [0.0] * len(c),
                                 samples=1, seed=0)  # fmt: skip


def test_copy_token_cells_match_the_reward():
    """For completions of the answer's length, the share of right cells is digit_accuracy's reward."""
    from rewards.synthetic import digit_accuracy

    completions = ["4071", "4081", "9999", "4070"]
    texts = [[*c, "", ""] for c in completions]
    blank, right, spoiler = probe.copy_token_cells(texts, ["4071"] * 4, torch.ones(4, 6, dtype=torch.bool))
    expected = digit_accuracy(["copy 4071:"] * 4, completions, answer=["4071"] * 4)
    assert (right.sum(1) / blank.sum(1)).tolist() == pytest.approx(expected) and expected == [1.0, 0.75, 0.0, 0.75]
    assert blank.sum().item() == 16 and not spoiler.any()


def test_oracle_cells_know_their_tasks_only():
    from tracerl.checks import load_config

    assert probe.oracle_cells(load_config("configs/quickstart.yaml", [])) is not None
    assert probe.oracle_cells(load_config("configs/copy.yaml", [])) is not None
    # a known task scored by another reward has no oracle: its cells would not be that reward's
    other = "reward.functions=[{fn: synthetic_exact}]"
    assert probe.oracle_cells(load_config("configs/copy.yaml", [other])) is None
    assert probe.oracle_cells(load_config("configs/quickstart.yaml", [other])) is None


def test_value_probe_refuses_an_oracle_it_does_not_have():
    """Asking for the oracle on a task it does not know stops before any model loads, naming the way out."""
    with pytest.raises(SystemExit, match=r"synthetic_exact.*pass --oracle-samples 0"):
        probe.main(["configs/copy.yaml", "reward.functions=[{fn: synthetic_exact}]", "--oracle-samples", "4"])


@pytest.mark.slow
def test_value_probe_scores_with_the_configs_reward(tmp_path, capsys):
    """The probe's rewards are the config's reward functions, called with the dataset's columns (it used to score
    every task as Sudoku): a reward file that records its calls, on the copy task, no oracle by default."""
    calls = tmp_path / "calls.txt"
    (tmp_path / "my_reward.py").write_text(
        "def score(prompts, completions, answer, **kwargs):\n"
        f"    open({str(calls)!r}, 'a').write(f'{{len(completions)}} {{answer[0]}}\\n')\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    reward = f"reward.functions=[{{fn: '{tmp_path}/my_reward.py:score'}}]"
    small = ["data.num_synthetic=300", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
             "wandb.mode=disabled", f"run_dir={tmp_path}", reward]  # fmt: skip
    assert probe.main(["configs/copy.yaml", *small, "--steps", "2", "--targets", "centered", "--print-every", "1"]) == 0
    out = capsys.readouterr().out
    lines = calls.read_text().split()
    scored = [(int(n), a) for n, a in zip(lines[::2], lines[1::2], strict=True)]
    assert [n for n, _ in scored][-2:] == [8, 8] and all(a.isdigit() for _, a in scored), scored  # 2 prompts x 4
    assert "oracle" not in out and out.count("explained variance before update") == 2, out


@pytest.mark.slow
def test_final_state_regression_reads_the_completion():
    """One prompt for every sample, so only the completions differ; the target is how often a completion uses its
    most common token. The zero head predicts 0 at first; trained on that batch the regression explains most of
    the target, which it can only do by reading the completions."""
    from tracerl.advantages import explained_variance
    from tracerl.checks import load_config
    from tracerl.models import load_policy
    from tracerl.orchestrator.setup import load_prompts
    from tracerl.sampling import generate

    cfg = load_config("configs/quickstart.yaml", ["data.num_synthetic=300", "wandb.mode=disabled"])
    torch.manual_seed(0)
    policy = load_policy(cfg.model)  # untrained: varied completions
    stream, _ = load_prompts(cfg)
    prompt = list(stream.next_batch(1).prompt_ids[0])
    rollout = generate(policy, [prompt] * 32, cfg.sampling, seed=5)
    made = rollout.step_map >= 0
    token = int(torch.mode(rollout.response_ids[made]).values)
    target = ((rollout.response_ids == token) & made).sum(1) / made.sum(1)
    assert target.var() > 0
    regression = probe.FinalStateRegression(policy, lr=3e-3)
    with torch.no_grad():
        assert torch.equal(regression.predict(rollout), torch.zeros(32))
    regression.update(rollout, target, minibatches=2, passes=40, seed=0)
    with torch.no_grad():
        fitted = regression.predict(rollout)
    assert explained_variance(fitted.unsqueeze(1), target.unsqueeze(1), torch.ones(32, 1, dtype=torch.bool)) > 0.5


def test_bad_arguments_get_one_line_not_a_traceback(capsys) -> None:
    for args, message in (
        (["--targets", "bogus"], "--targets bogus: ['bogus'] unknown"),
        (["--steps", "0"], "--steps (0) and --print-every (5) must be ≥ 1"),
        (["--mc-samples", "-1"], "--mc-samples (-1)"),
    ):
        with pytest.raises(SystemExit) as exit_:
            probe.main(["configs/quickstart.yaml", *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert probe.main(["configs/quickstart.yaml", "model.path=./runs/no-such-model", "--oracle-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("value_probe.py: error: model.path './runs/no-such-model' does not exist")
        and "Traceback" not in err
    )


def test_ctrl_c_prints_the_summary_of_the_steps_measured_whole(tmp_path, capsys, monkeypatch) -> None:
    """It used to end in a traceback with nothing of the steps already done; an untrained model and a batch whose
    rewards are all equal are said, not left to read as "the value explains nothing"."""
    import tracerl.sampling

    real, calls = tracerl.sampling.generate, []

    def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - Ctrl-C arrives while step 3 samples
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tracerl.sampling, "generate", generate)
    small = ["data.num_synthetic=100", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
             "wandb.mode=disabled", f"run_dir={tmp_path}", "reward.functions=[{fn: synthetic_exact}]"]  # fmt: skip
    argv = ["configs/quickstart.yaml", "--steps", "5", *small, "--targets", "centered,reward", "--oracle-samples", "0"]
    assert probe.main(argv) == 130
    out = capsys.readouterr().out
    assert out.startswith("note: model.path is unset, so this probes an untrained tiny model")
    assert "interrupted during step 3: the summary of the 2 step(s) measured" in out
    assert "explained variance over the last 2 step(s)" in out and "== target reward" not in out  # stopped there
    assert "note: every sample scored the same reward, so there was nothing to explain" in out  # untrained: all 0


def test_monte_carlo_values_on_a_full_attention_model_are_refused_before_any_step(tmp_path, capsys) -> None:
    small = ["data.num_synthetic=100", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
             "wandb.mode=disabled", f"run_dir={tmp_path}", "model.tiny.attention=full"]  # fmt: skip
    argv = ["configs/quickstart.yaml", *small, "--mc-samples", "2", "--oracle-samples", "0", "--targets", "centered"]
    assert probe.main(argv) == 2
    captured = capsys.readouterr()
    assert "--mc-samples continues the state at each block start" in captured.err and "step " not in captured.out
