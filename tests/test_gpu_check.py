"""scripts/gpu_check.py --smoke: every part runs on CPU and the one JSON it prints is complete and finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"

KEYS = {
    "sampler": [
        "batch", "block_size", "steps_per_block", "new_tokens", "generated_tokens", "all_tokens_generated",
        "seconds", "tokens_per_s", "model_calls", "peak_memory_gib", "reference_tokens_per_s", "ratio_to_reference",
        "fixed_shape", "cuda_graph",
    ],
    "learner": [
        "rows", "sequences", "row_tokens", "target_tokens", "engine_init_s", "step_s", "tokens_per_s",
        "target_tokens_per_s", "peak_memory_gib", "metrics",
    ],
    "replay": ["block", "full"],
    "packed": ["rows", "flex", "grouped", "dense", "learner"],
    "rl_steps": ["samples_per_step", "engine_init_s", "steps", "stage_share_last_step", "rollout_copy_matches_learner"],
    "reward_model": [
        "model", "parameters", "dtype", "samples", "tokens_per_sample", "batch_tokens", "forwards", "seconds",
        "samples_per_s", "tokens_per_s", "peak_memory_gib", "scores_finite", "batched_vs_single_max_abs",
    ],
    "diffusion_gemma": [
        "model", "canvas_length", "denoising_steps", "batch_1", "batch_4", "reference_tokens_per_s",
        "transformers_generate_batch_1_tokens_per_s", "ratio_batch_1_to_transformers_generate",
    ],
}  # fmt: skip
STAGES = ["rollout_s", "reward_s", "advantages_s", "views_s", "train_s", "weight_copy_s", "step_s"]


def numbers(tree: object, path: str = "") -> list[tuple[str, float]]:
    """Every int / float leaf (not bools) with its path."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in numbers(v, f"{path}.{k}")]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in numbers(v, f"{path}[{i}]")]
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        return [(path, float(tree))]
    return []


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_file = tmp_path_factory.mktemp("gpu_check") / "report.json"
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")  # set by learners of this process
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env |= {"OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out_file)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold exactly one JSON line, got {len(lines)}: {proc.stdout[:500]}"
    parsed = json.loads(lines[0])
    assert json.loads(out_file.read_text()) == parsed  # --out holds the same report
    return parsed


@pytest.mark.slow
def test_every_part_reports_every_key_with_finite_numbers(report: dict) -> None:
    assert report["smoke"] is True and report["device"] == "cpu"
    for part, keys in KEYS.items():
        assert "error" not in report[part], f"{part}: {report[part].get('traceback', report[part]['error'])}"
        missing = [k for k in keys if k not in report[part]]
        assert not missing, f"{part} lacks {missing}"
    values = numbers(report)
    assert len(values) > 50
    bad = [(p, v) for p, v in values if not math.isfinite(v)]
    assert not bad, bad


@pytest.mark.slow
def test_sampler_decodes_every_token_and_names_the_reference(report: dict) -> None:
    s = report["sampler"]
    assert s["all_tokens_generated"] is True
    assert s["generated_tokens"] == s["batch"] * s["new_tokens"]
    assert s["reference_tokens_per_s"] == 5000.0
    assert s["ratio_to_reference"] == pytest.approx(s["tokens_per_s"] / 5000.0)
    # one call per denoising step plus one cache write per finished block but the last, plus the prefill
    blocks = s["new_tokens"] // s["block_size"] + 1  # the 6-token prompt's tail shares the first block
    assert s["model_calls"] <= blocks * s["steps_per_block"] + blocks
    assert s["tokens_per_s"] > 0 and s["peak_memory_gib"] > 0


@pytest.mark.slow
def test_sampler_runs_the_cuda_graph_step_eagerly_and_skips_the_capture_on_cpu(report: dict) -> None:
    s = report["sampler"]
    assert s["cuda_graph"] == {"skipped": "no CUDA device: CUDA-graph capture runs only on a GPU"}
    fixed = s["fixed_shape"]
    agree = fixed["vs_static"]  # the full-width step computes the static cache's function (fp32 here)
    assert agree["tokens_match"] is True and agree["step_map_match"] is True and agree["token_agreement"] == 1.0
    assert 0 <= agree["logp_max_abs_diff"] < 1e-5
    assert fixed["ratio_to_static"] == pytest.approx(fixed["tokens_per_s"] / s["tokens_per_s"])


@pytest.mark.slow
def test_fp32_replay_reproduces_the_rollout_log_probs(report: dict) -> None:
    r = report["replay"]
    assert r["dtype"] == "torch.float32"
    for layout in ("block", "full"):
        dev = r[layout]
        assert dev["targets"] > 0 and dev["rows"] > 0
        assert 0 <= dev["mean_abs"] <= dev["max_abs"] < 1e-4, (layout, dev)
    assert r["block"]["cache"] == "kv" and r["full"]["cache"] == "none"


@pytest.mark.slow
def test_packed_views_match_the_rows_on_every_backend(report: dict) -> None:
    p = report["packed"]
    for backend in ("flex", "grouped", "dense"):
        assert p[backend]["tokens"] < p["rows"]["tokens"]
        assert p[backend]["max_abs_vs_rows"] < 1e-4, (backend, p[backend])  # fp32 in the smoke run
    lr = p["learner"]
    assert lr["packed"]["tokens_per_sample"] < lr["rows"]["tokens_per_sample"]
    assert lr["packed"]["policy_loss"] == pytest.approx(lr["rows"]["policy_loss"], rel=1e-4, abs=1e-6)
    assert lr["speedup"] == pytest.approx(lr["rows"]["step_s"] / lr["packed"]["step_s"])
    assert (lr["rows"]["attention"], lr["packed"]["attention"], lr["packed_flex"]["attention"]) == (
        "rows",
        "grouped",  # auto
        "grouped",  # FlexAttention has no backward on CPU
    )
    assert lr["packed_flex"]["policy_loss"] == pytest.approx(lr["rows"]["policy_loss"], rel=1e-4, abs=1e-6)
    assert all(lr[k]["first_step_s"] > 0 for k in ("rows", "packed", "packed_flex"))


@pytest.mark.slow
def test_learner_update_and_rl_steps(report: dict) -> None:
    lr = report["learner"]
    assert lr["precision"] == "bf16" and lr["zero_stage"] == 0 and lr["lora"] is False  # CPU: full parameters
    assert lr["metrics"]["train/optimizer_steps"] == 1.0
    assert lr["metrics"]["train/tokens"] == lr["target_tokens"]
    assert lr["tokens_per_s"] == pytest.approx(lr["sequences"] * lr["row_tokens"] / lr["step_s"])

    rl = report["rl_steps"]
    assert [s["weights_version"] for s in rl["steps"]] == [1, 2]
    for step in rl["steps"]:
        # the loop's stage code: keep_all keeps every sample, and the flat groups are counted as the loop counts them
        assert step["kept_samples"] == rl["samples_per_step"] and 0 <= step["flat_groups"] <= 1
        assert all(step[k] >= 0 for k in STAGES)
        assert step["step_s"] == pytest.approx(sum(step[k] for k in STAGES[:-1]))
        assert 0 < step["rollout_share"] < 1
    assert sum(rl["stage_share_last_step"].values()) == pytest.approx(1.0)
    assert rl["rollout_copy_matches_learner"] is True


@pytest.mark.slow
def test_no_ray_or_other_missing_package_is_imported(report: dict) -> None:
    assert report["imports"] == {"ray": False, "wandb": False, "datasets": False, "trl": False, "math_verify": False}


def test_bad_parts_are_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--parts", "sampler,nonsense"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown part(s) ['nonsense']" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_reward_model_scores_every_completion_in_budgeted_forwards(report: dict) -> None:
    rm = report["reward_model"]
    assert rm["scores_finite"] is True and rm["dtype"] == "torch.float32"  # CPU smoke: fp32
    per_forward = rm["batch_tokens"] // rm["tokens_per_sample"]  # 96 // 32 = 3 completions per forward
    assert rm["forwards"] == -(-rm["samples"] // per_forward) == 3
    assert rm["samples_per_s"] == pytest.approx(rm["samples"] / rm["seconds"])
    assert rm["batched_vs_single_max_abs"] < 1e-5  # packing and padding change no score (fp32)


def test_diffusion_gemma_part_decodes_whole_canvases_and_compares_with_generate(report: dict) -> None:
    d = report["diffusion_gemma"]
    c = d["canvas_length"]
    assert d["model"]["experts"] == 4 and d["denoising_steps"] == 4  # 16 on the GPU
    for batch in (1, 4):
        row = d[f"batch_{batch}"]
        assert row["generated_tokens"] == batch * c  # EOS off: one whole canvas each
        assert row["steps_run"] == batch * 4  # adaptive stopping off: every step ran
        assert row["tokens_per_s"] > 0
    assert d["reference_tokens_per_s"] == 1756.0 and "vLLM" in d["reference"]
    assert d["ratio_batch_1_to_transformers_generate"] > 0
