"""The RL loop end to end on CPU: Ray rollout actors, reward workers, the DeepSpeed learner, weight sync, eval."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tracerl.checks import load_config
from tracerl.config import Config, RewardFnConfig
from tracerl.models import build_tiny
from tracerl.orchestrator import RunError, run
from tracerl.orchestrator.evaluation import eval_rows, greedy_per_prompt
from tracerl.stats import standard_error

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]  # every test runs the whole loop

# A reward with spread on the outputs of a random tiny model (so advantages, and updates, are non-zero).
REWARD = """
def score(prompts, completions, **kwargs):
    return [len(set(c)) / 8.0 for c in completions]
"""
NAMESPACES = ("reward/", "advantage/", "rollout/", "trace/", "train/", "time/", "perf/", "sync/")


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# The loop's test setting: the tiny block model (block 4) on synthetic parity, short responses, seconds per step.
BASE = [
    "model.tiny.attention=block",
    "model.tiny.hidden_size=128",
    "model.tiny.num_layers=4",
    "model.tiny.intermediate_size=256",
    "sampling.max_new_tokens=8",
    "sampling.temperature=1.0",
    "sampling.batch_size=8",  # two sampler batches per RL step: two rollout actors share the work
    "data.source=synthetic:parity",
    "data.num_synthetic=200",
    "objective.group_filter=drop_all_equal",
    "learner.lr=1e-3",
]


def rl_cfg(tmp_path: Path, *overrides: str) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    reward = tmp_path / "spread.py"
    reward.write_text(REWARD)
    run = [
        f"run_dir={tmp_path / 'run'}",
        "train.steps=3",
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=4",
        "rollout.num_workers=2",
        "reward.num_workers=2",
        "eval.num_prompts=8",
        "eval.samples=2",
        "eval.k=2",
        "train.eval_every=2",
        "train.log_samples_every=2",
        "wandb.mode=disabled",
    ]
    cfg = load_config(None, BASE + run + list(overrides))
    cfg.reward.functions[0].fn = f"{reward}:score"
    return cfg


def rows(cfg: Config) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(cfg: Config) -> dict[str, torch.Tensor]:
    last = sorted((Path(cfg.run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[-1]
    return load_file(last / "learner" / "hf" / "model.safetensors")


def changed(cfg: Config) -> bool:
    initial, _ = build_tiny(cfg.model.tiny)
    after = final_weights(cfg)
    return any(not torch.equal(after[k], v) for k, v in initial.state_dict().items() if k in after)


def test_three_rl_steps_end_to_end(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = rl_cfg(tmp_path, "wandb.mode=offline")

    def driver_builds_views(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the driver built training views; the learner ranks build them from their shards")

    from tracerl import trace

    for name in ("make_views", "build_views"):  # the learner actors are other processes: they keep theirs
        monkeypatch.setattr(trace, name, driver_builds_views)
    last = run(cfg)
    history = rows(cfg)
    assert [r["step"] for r in history] == [0, 1, 2, 3]  # step 0: the evaluation before training
    for r in history[1:]:
        for ns in NAMESPACES:
            assert any(k.startswith(ns) for k in r), f"no {ns}* metric at step {r['step']}"
        assert r["sync/weights_version"] == r["step"]  # one learner update per step reached the actors
        assert r["rollout/weights_version"] == r["step"] - 1  # and each step sampled with the previous one
        assert r["rollout/logp_mismatch"] < 1e-4  # exact KV cache, fp32, shrink 1: the replay invariant
        assert 0 < r["perf/rollout_share"] < 1 and r["sync/bytes"] > 0
        assert r["trace/rows_per_sample"] >= 1 and r["time/views"] > 0 and r["train/shard_bytes"] > 0
        assert r["perf/learner_flops"] > 0 and r["guard/warnings"] == 0.0 and r["train/log_ratio_abs_max"] >= 0
        assert all(math.isfinite(v) for v in r.values())
    assert [r["step"] for r in history if "eval/greedy_reward" in r] == [0, 2, 3]
    assert {"eval/pass@2", "eval/mean@2", "eval/exact_match", "eval/tokens_per_forward"} <= set(history[2])
    assert last["train/optimizer_steps"] >= 1 and changed(cfg)

    run_dir = Path(cfg.run_dir)
    samples = json.loads((run_dir / "samples_rollout-2.json").read_text())
    assert samples["columns"][:3] == ["prompt", "completion", "reward"] and len(samples["rows"]) == 8
    assert (run_dir / "pictures" / "decoding-order-2.png").stat().st_size > 1000
    summary = json.loads((run_dir / "eval" / "step-2.json").read_text())
    assert summary["sampling"]["greedy"]["temperature"] == 0.0 and summary["weights_version"] == 2
    lines = (run_dir / "eval" / "step-2.jsonl").read_text().splitlines()
    assert len(lines) == 8 + 8 * 2  # greedy + 2 samples per held-out prompt
    greedy = [row["reward"] for row in map(json.loads, lines) if row["mode"] == "greedy"]
    assert history[2]["eval/greedy_reward_sem"] == pytest.approx(standard_error(greedy))  # the guard's noise
    per_prompt = greedy_per_prompt(eval_rows(run_dir / "eval" / "step-2.jsonl"))
    assert per_prompt[""] == greedy  # what the guard pairs prompts by
    assert all(r["reward/sem"] > 0 for r in history[1:])  # 4 prompts whose rewards differ
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 3

    # The offline W&B run holds the same namespaces, read back with W&B's own reader.
    [wandb_run] = (run_dir / "wandb").glob("offline-run-*")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(wandb_run)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    text = out.stdout
    for key in ("reward/mean", "train/policy_loss", "rollout/logp_mismatch", "sync/weight_s", "eval/greedy_reward"):
        assert key in text, f"{key} missing from the W&B run ({out.stderr[-300:]})"
    assert "samples/rollout" in text and "samples/eval" in text and "rollout/decoding_order" in text


VARIANTS = {
    "trace-block": [],
    "trace-full": ["model.tiny.attention=full", "objective.aggregation=row_mean"],
    "d1": ["model.tiny.attention=full", "objective.views=d1"],
    "random_masking": ["objective.views=random_masking"],
    "coupled": ["model.tiny.attention=full", "objective.views=coupled"],
    "value": ["objective.value_model=true"],
    "reference": ["objective.kl_to_ref_coef=0.05"],
    "shrink2-collective": ["objective.shrink=2", "rollout.sync=collective"],
    # the rollout actors record log-probs at the sampling temperature, the learner's compare with them
    "tempered": ["sampling.temperature=0.7", "objective.logp_temperature=sampling"],
}


def test_d1_prompt_perturbation_on_a_block_model_is_refused_before_anything_is_written(local_ray, tmp_path):
    cfg = rl_cfg(tmp_path, "objective.views=d1", "objective.old_logp_source=learner")
    with pytest.raises(Exception, match=r"objective.d1_prompt_mask_prob=0\.15 masks prompt tokens"):
        run(cfg)
    assert not Path(cfg.run_dir).exists()


def test_the_divergence_guard_warns_when_nothing_trains(local_ray, tmp_path, capsys):
    """A reward that is the same for every sample: every group is filtered out, nothing trains, and after
    guard.window steps the console and alerts.jsonl say so, once."""
    cfg = rl_cfg(tmp_path, "guard.window=2", "train.steps=3", "eval.num_prompts=0")
    constant = tmp_path / "constant.py"
    constant.write_text("def score(prompts, completions, **kwargs):\n    return [0.5] * len(completions)\n")
    cfg.reward.functions[0].fn = f"{constant}:score"
    run(cfg)
    out = capsys.readouterr().out
    assert out.count("divergence at RL step 2: nothing trained for 2 steps") == 1
    alerts = [json.loads(x) for x in (Path(cfg.run_dir) / "alerts.jsonl").read_text().splitlines()]
    assert [(a["step"], a["title"]) for a in alerts] == [(2, "tracerl: divergence")]
    assert [r["guard/warnings"] for r in rows(cfg)] == [0.0, 1.0, 0.0]


def add_verifier(cfg: Config, tmp_path: Path, body: str) -> None:
    """A reward function ``verifier`` of weight 0 whose ``score`` runs ``body`` (``SEEN``: a file beside it that
    keeps state across calls, which may come from any reward worker process; the stand-in call before the run
    leaves it alone)."""
    verifier = tmp_path / "verifier.py"
    verifier.write_text(
        "from pathlib import Path\n\nfrom tracerl.reward_service import is_trial\n\n"
        "SEEN = Path(__file__).with_suffix('.seen')\n\n"
        "def score(prompts, completions, **kwargs):\n"
        "    if is_trial():\n        return [0.0] * len(completions)\n" + body
    )
    cfg.reward.functions.append(RewardFnConfig(fn=f"{verifier}:score", weight=0.0, name="verifier"))


def test_a_collapsing_reward_of_weight_0_is_reported_once(local_ray, tmp_path, capsys):
    """A verifier logged beside the trained reward (weight 0) scores every sample 1.0 at step 1 and 0.0 after it,
    while the trained reward is unchanged: the guard names it at step 2, once, as a possible sign that the policy
    games the reward it is trained on."""
    cfg = rl_cfg(tmp_path, "guard.window=1", "train.steps=3", "eval.num_prompts=0", "reward.num_workers=1")
    add_verifier(
        cfg,
        tmp_path,
        "    seen = int(SEEN.read_text()) if SEEN.exists() else 0\n"
        "    SEEN.write_text(str(seen + len(completions)))\n"
        "    return [1.0 if seen < 16 else 0.0] * len(completions)  # step 1 scores 16 completions\n",
    )
    run(cfg)
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("reward 'verifier' (weight 0, not trained on) collapsed") == 1, out
    assert (
        "divergence at RL step 2: reward 'verifier' (weight 0, not trained on) collapsed: 0.00 over the last 1 "
        "steps, below 0.5 × its best (1.00)" in out
    )
    logged = rows(cfg)
    assert [r["reward/verifier/mean"] for r in logged] == [1.0, 0.0, 0.0]
    assert [r["reward/sem/verifier"] for r in logged] == [0.0, 0.0, 0.0]  # every sample alike: no noise
    assert [r["guard/warnings"] for r in logged] == [0.0, 1.0, 0.0]


def test_a_held_out_reward_of_weight_0_that_collapses_is_reported_once(local_ray, tmp_path, capsys):
    """The same verifier judged on the held-out evaluation: it scores the step-0 evaluation (the first call it
    gets) 1.0 and everything after it 0.0; the evaluation at step 2 names it, once, and the last step's
    evaluation, still at 0.0, does not repeat it."""
    cfg = rl_cfg(tmp_path, "guard.window=1", "train.steps=4", "rollout.num_workers=1", "reward.num_workers=1")
    add_verifier(
        cfg,
        tmp_path,
        "    first = not SEEN.exists()\n    SEEN.touch()\n    return [1.0 if first else 0.0] * len(completions)\n",
    )
    run(cfg)
    out = " ".join(capsys.readouterr().out.split())
    named = "held-out greedy reward 'verifier' (weight 0, not trained on) collapsed"
    assert out.count(named) == 1, out
    assert f"divergence at RL step 2: {named}: 0.000, below 0.5 × its best (1.000)" in out
    logged = {r["step"]: r for r in rows(cfg) if "eval/greedy_reward/verifier" in r}
    assert {s: r["eval/greedy_reward/verifier"] for s, r in logged.items()} == {0: 1.0, 2: 0.0, 4: 0.0}
    assert logged[2]["guard/warnings"] == 1.0 and logged[4]["guard/warnings"] == 0.0


def test_an_idle_value_model_is_reported_once(local_ray, tmp_path, capsys):
    """A reward no state predicts (a fixed hash of the completion): the value model explains nothing, and after
    guard.value_window steps the console says so once, and guard/value_idle is logged."""
    cfg = rl_cfg(tmp_path, "objective.value_model=true", "guard.value_window=2", "train.steps=3", "eval.num_prompts=0")
    noise = tmp_path / "noise.py"
    noise.write_text(
        "import zlib\n\ndef score(prompts, completions, **kwargs):\n"
        "    return [zlib.crc32(c.encode()) % 7 / 6 for c in completions]\n"
    )
    cfg.reward.functions[0].fn = f"{noise}:score"
    run(cfg)
    out = capsys.readouterr().out
    assert out.count("value model idle at RL step") == 1 and "value model idle at RL step 2" in out, out
    logged = rows(cfg)
    assert [r["guard/value_idle"] for r in logged][:2] == [0.0, 1.0]
    assert all(abs(r["value/explained_var"]) < 0.05 for r in logged[:2])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_runs_in_the_loop(local_ray, tmp_path, name):
    small = ["train.steps=2", "rollout.num_workers=1", "reward.num_workers=1", "eval.num_prompts=0"]
    cfg = rl_cfg(tmp_path, *small, *VARIANTS[name])
    last = run(cfg)
    train = {k: v for k, v in last.items() if k.startswith("train/")}
    assert train and all(math.isfinite(v) for v in train.values())
    assert changed(cfg)
    assert ("train/value_loss" in last) == ("value/explained_var" in last) == (name == "value")
    assert ("train/kl_to_ref" in last) == (name == "reference")
    assert ("rollout/logp_mismatch" in last) == (name not in ("d1", "random_masking", "coupled"))
    if name == "shrink2-collective":  # merged steps are not the states tokens were sampled in: the metric shows it
        assert last["rollout/logp_mismatch"] > 1e-3
    elif "rollout/logp_mismatch" in last:
        assert last["rollout/logp_mismatch"] < 1e-4


def test_dream_style_shifted_policy_trains_in_the_loop(local_ray, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tracerl.models import char_tokenizer

    tok = char_tokenizer(Config().model.tiny.alphabet)
    torch.manual_seed(0)
    shape = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), tie_word_embeddings=False, **shape)).save_pretrained(
        tmp_path / "m"
    )
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=tok.mask_token_id)
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    tok.save_pretrained(tmp_path / "m")
    cfg = rl_cfg(tmp_path, "train.steps=2", "rollout.num_workers=1", "reward.num_workers=1", "eval.num_prompts=0",
                 "model.family=dream", f"model.path={tmp_path / 'm'}", "sampling.cache=none")  # fmt: skip
    last = run(cfg)
    assert last["rollout/logp_mismatch"] < 1e-4 and math.isfinite(last["train/policy_loss"])
    before = load_file(tmp_path / "m" / "model.safetensors")
    assert any(not torch.equal(v, before[k]) for k, v in final_weights(cfg).items() if k in before)


def test_resume_continues_where_the_checkpoint_left_off(local_ray, tmp_path):
    common = ["rollout.num_workers=1", "reward.num_workers=1", "eval.num_prompts=0", "checkpoint.save_every=1"]
    straight = rl_cfg(tmp_path / "a", *common)
    run(straight)
    first = rl_cfg(tmp_path / "b", *common, "train.steps=2")
    run(first)
    with (Path(first.run_dir) / "metrics.jsonl").open("a") as f:  # a step logged after the checkpoint, then a kill
        f.write(json.dumps({"step": 3, "reward/mean": -1.0}) + "\n")
    resumed = rl_cfg(tmp_path / "b", *common, "checkpoint.resume=auto")
    run(resumed)
    a, b = rows(straight), rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]  # every step exactly once
    assert b[-1]["sync/weights_version"] == 3
    for key in ("reward/mean", "train/policy_loss", "train/kl_to_old", "rollout/response_length"):
        assert b[-1][key] == pytest.approx(a[-1][key], abs=1e-6), key


def test_a_reward_that_raises_stops_the_run_and_keeps_the_last_step(local_ray, tmp_path):
    counter = tmp_path / "calls"
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "from pathlib import Path\n"
        f"COUNTER = Path({str(counter)!r})\n"
        "from tracerl.reward_service import is_trial\n"
        "def score(prompts, completions, **kw):\n"
        "    if is_trial():\n"  # the stand-in call before the run starts is no step's
        "        return [0.0] * len(completions)\n"
        "    n = int(COUNTER.read_text()) if COUNTER.exists() else 0\n"
        "    COUNTER.write_text(str(n + 1))\n"
        "    if n >= 2:\n"
        "        raise ValueError('the grader is down')\n"
        "    return [float(len(c) % 2) for c in completions]\n"
    )
    cfg = rl_cfg(tmp_path, "rollout.num_workers=1", "reward.num_workers=1", "eval.num_prompts=0", "train.steps=4",
                 "sampling.batch_size=64")  # one sampler batch, one reward call per step  # fmt: skip
    cfg.reward.functions[0].fn = f"{flaky}:score"
    with pytest.raises(RunError) as err:
        run(cfg)
    message = str(err.value)
    assert "RL step 3 failed" in message and "the grader is down" in message and "--resume auto" in message
    assert sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").glob("step-*")) == ["step-2"]
    assert [r["step"] for r in rows(cfg)] == [1, 2]


def test_tracerl_eval_scores_a_checkpoint_and_writes_samples_and_settings(local_ray, tmp_path, capsys):
    from tracerl.cli import main
    from tracerl.models import save_tiny

    cfg = load_config(None, BASE)
    model, tok = build_tiny(cfg.model.tiny)
    save_tiny(model, tok, tmp_path / "model")
    rc = main(["eval", *BASE, f"model.path={tmp_path / 'model'}", f"run_dir={tmp_path / 'run'}",
               "eval.num_prompts=6", "eval.samples=3", "eval.k=2", "reward.num_workers=1",
               "rollout.num_workers=1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "greedy reward" in out and "pass@2" in out
    summary = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert summary["model"]["path"] == str(tmp_path / "model") and summary["samples"] == 3
    assert summary["sampling"]["greedy"]["temperature"] == 0.0 and summary["sampling"]["sampled"]["temperature"] == 1.0
    assert {"eval/greedy_reward", "eval/mean@2", "eval/pass@2", "eval/exact_match"} <= set(summary["metrics"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "eval" / "eval.jsonl").read_text().splitlines()]
    assert len(lines) == 6 + 6 * 3 and {x["mode"] for x in lines} == {"greedy", "sampled"}
    greedy = [x for x in lines if x["mode"] == "greedy"]
    assert summary["metrics"]["eval/greedy_reward"] == pytest.approx(sum(x["reward"] for x in greedy) / 6)


def _actor_pids(kind: str) -> list[int]:
    """pids of this Ray instance's worker processes running actors of class ``kind``: children of its raylet,
    found by process title (other Ray instances on the machine are left alone)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes()
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == raylet and title.startswith(f"ray::{kind}".encode()):
                pids.append(int(proc.name))
    return pids


def test_a_killed_rollout_actor_is_replaced_and_its_work_redone(local_ray, tmp_path):
    import os
    import signal
    import threading
    import time

    cfg = rl_cfg(tmp_path, "train.steps=4", "reward.num_workers=1", "eval.num_prompts=0")
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    killed: list[int] = []

    def kill_after_first_step() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.05)
        pids = _actor_pids("RolloutWorker")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    thread = threading.Thread(target=kill_after_first_step, daemon=True)
    thread.start()
    last = run(cfg)
    thread.join(timeout=5)
    assert killed, "no rollout actor was found to kill"
    assert [r["step"] for r in rows(cfg)] == [1, 2, 3, 4]
    assert last["fault/rollout_restarts"] == 1 and last["sync/weights_version"] == 4
    assert last["rollout/samples"] == 16  # the lost shard was redone: the whole batch trained


def test_no_credential_from_the_environment_reaches_any_file_the_run_writes(local_ray, tmp_path, monkeypatch, capsys):
    secrets = {"WANDB_API_KEY": "wandb-secret-" + "7" * 28, "HF_TOKEN": "hf_secretsecretsecret1234"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = rl_cfg(tmp_path, "wandb.mode=offline", "train.steps=2", "rollout.num_workers=1", "reward.num_workers=1",
                 "eval.num_prompts=4", "checkpoint.save_every=1")  # fmt: skip
    run(cfg)
    printed = capsys.readouterr()
    files = [p for p in Path(cfg.run_dir).rglob("*") if p.is_file()]
    assert len(files) > 20  # config, metrics, eval, samples, pictures, checkpoints, the W&B run
    for value in secrets.values():
        assert value not in printed.out + printed.err
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{value[:6]}… found in {path}"


VARYING = ("time/", "perf/", "fault/", "sync/weight_s")  # the machine's speed; everything else must be equal


def numbers(cfg: Config) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k not in ("step", "time") and not k.startswith(VARYING)}
            for r in rows(cfg)}  # fmt: skip


def eval_samples(cfg: Config) -> dict[str, list]:
    out = {}
    for path in sorted((Path(cfg.run_dir) / "eval").glob("step-*.jsonl")):
        out[path.name] = [(r["mode"], r["completion"], r["reward"]) for r in map(json.loads, path.open())]
    return out


def test_the_numbers_do_not_depend_on_the_actor_counts_and_survive_a_resume(local_ray, tmp_path):
    # 4 prompts x 4 samples in sampler batches of one group (sampling.batch_size=4): 4 batches per RL step, shared
    # by 1, 2 or 3 rollout actors; 8 held-out prompts evaluated at steps 0, 2 and 4
    common = ["train.steps=4", "sampling.batch_size=4", "checkpoint.save_every=1", "eval.num_prompts=8"]
    runs = {}
    for actors, rewards in ((1, 1), (2, 2), (3, 1)):
        cfg = rl_cfg(tmp_path / f"k{actors}", *common, f"rollout.num_workers={actors}", f"reward.num_workers={rewards}")
        run(cfg)
        runs[actors] = cfg
    first = rl_cfg(tmp_path / "resumed", *common, "rollout.num_workers=3", "train.steps=2")
    run(first)  # two steps on 3 actors, then the rest on 2 actors and 2 reward workers, resumed
    resumed = rl_cfg(tmp_path / "resumed", *common, "rollout.num_workers=2", "reward.num_workers=2",
                     "checkpoint.resume=auto")  # fmt: skip
    run(resumed)
    want = numbers(runs[1])
    assert sorted(want) == [0, 1, 2, 3, 4] and len({want[s]["reward/mean"] for s in range(1, 5)}) > 1
    assert {"eval/greedy_reward", "eval/mean@2", "train/policy_loss"} <= set(want[2]) | set(want[1])
    for cfg in (runs[2], runs[3], resumed):
        assert numbers(cfg) == want, cfg.run_dir  # bitwise: every metric of every step, the evaluations too
        assert eval_samples(cfg) == eval_samples(runs[1])
    final = {k: v for k, v in final_weights(runs[1]).items()}
    for cfg in (runs[3], resumed):
        assert all(torch.equal(final[k], v) for k, v in final_weights(cfg).items())
