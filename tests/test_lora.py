"""LoRA through PEFT (DESIGN §20): adapters trained inside the engine, the reference as the base with adapters
disabled, adapters-only weight sync, checkpoints with adapters and optimizer, export, and bad input refused."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch

from tracerl.checkpoint import DriverState, export_hf, load_checkpoint, save_checkpoint
from tracerl.checks import load_config
from tracerl.config import Config, ConfigError, LoRAConfig, ModelConfig, TinyModelConfig
from tracerl.learner import Learner
from tracerl.manifest import CheckpointError, verify_checkpoint
from tracerl.models import load_policy
from tracerl.models.lora import (
    adapter_layers,
    adapters_disabled,
    apply_lora,
    check_lora_targets,
    load_trained,
    lora_targets,
    merged_state_dict,
)
from tracerl.scoring import PolicyScorer
from tracerl.weight_sync import bucket_layout, layout_bytes, pack, unpack

from .test_learner import ADV, batch

LORA = ["learner.lora.enabled=true", "learner.lora.rank=4", "learner.lora.alpha=8"]


def lora_cfg(*overrides: str, engine: str = "torch", stage: int = 0) -> Config:
    cfg = load_config(None, [*LORA, "learner.lr=1e-2", f"learner.engine={engine}", f"learner.zero_stage={stage}",
                             "learner.max_grad_norm=1e9", "seed=5", *overrides])  # fmt: skip
    return cfg


@pytest.fixture
def learners():  # noqa: ANN201
    made: list[Learner] = []

    def make(cfg: Config, policy, **kw) -> Learner:  # noqa: ANN001
        made.append(Learner(cfg, policy, **kw))
        return made[-1]

    yield make
    for learner in made:
        learner.destroy()


def adapter_weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.state_dict_for_rollout()[1].items()}


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learner.lora.rank=0", "learner.lora.rank must be ≥ 1"),
        ("learner.lora.rank=-4", "learner.lora.rank must be ≥ 1"),
        ("learner.lora.dropout=0.05", "learner.lora.dropout=0.05 is refused"),
        ("learner.lora.alpha=0", "learner.lora.alpha must be a finite number > 0"),
        ("learner.lora.alpha=.nan", "learner.lora.alpha must be a finite number > 0 .*got nan"),  # loss NaN, exit 0
        ("learner.lora.alpha=.inf", "learner.lora.alpha must be a finite number > 0 .*got inf"),
        ("learner.lora.target_modules=[]", "learner.lora.target_modules is an empty list"),
        ("learner.zero_stage=3", "learner.zero_stage=3 is not supported"),
    ],
)
def test_bad_lora_settings_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*LORA, override])


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"], ["down_proj"]])
def test_validate_counts_the_modules_lora_would_adapt_without_injecting(targets):
    lora = LoRAConfig(enabled=True, target_modules=targets)
    policy = load_policy(ModelConfig())
    counted = check_lora_targets(policy, lora)
    assert not adapter_layers(policy.model)  # nothing injected
    apply_lora(policy, lora)
    assert counted == len(adapter_layers(policy.model)) > 0  # PEFT adapts exactly those


def test_targets_that_match_no_module_are_named_by_validate_as_by_train():
    lora = LoRAConfig(enabled=True, target_modules=["nonexistent_proj"])
    with pytest.raises(ConfigError) as checked:
        check_lora_targets(load_policy(ModelConfig()), lora)
    with pytest.raises(ConfigError) as applied:
        apply_lora(load_policy(ModelConfig()), lora)
    assert str(checked.value) == str(applied.value) and "'q_proj'" in str(checked.value)


def test_a_misspelt_target_beside_good_ones_is_named_by_validate_as_by_train():
    """PEFT adapts the names that match and drops the rest without a word (v_prj would leave v_proj frozen)."""
    lora = LoRAConfig(enabled=True, target_modules=["q_proj", "v_prj"])
    with pytest.raises(ConfigError) as checked:
        check_lora_targets(load_policy(ModelConfig()), lora)
    policy = load_policy(ModelConfig())
    with pytest.raises(ConfigError) as applied:
        apply_lora(policy, lora)
    assert str(checked.value) == str(applied.value)
    assert "learner.lora.target_modules names ['v_prj'], which match no module of the tiny model" in str(checked.value)
    assert "'v_proj'" in str(checked.value) and not adapter_layers(policy.model)  # refused before any injection


def test_a_family_without_default_targets_needs_them_named():
    with pytest.raises(ConfigError, match="no default target modules for model.family=gemma_renoise"):
        lora_targets("gemma_renoise", LoRAConfig(enabled=True))
    assert lora_targets("gemma_renoise", LoRAConfig(enabled=True, target_modules=["q_proj"])) == ["q_proj"]
    assert lora_targets("masked_lm", LoRAConfig(enabled=True)) == "all-linear"
    with pytest.raises(ConfigError, match="learner.lora cannot apply to model.family=diffusion_gemma"):
        lora_targets("diffusion_gemma", LoRAConfig(enabled=True, target_modules=["q_proj"]))


def test_targets_matching_nothing_fail_before_sft_writes_anything(tmp_path):
    from tracerl.sft import run_sft

    run_dir = tmp_path / "sft"
    overrides = ["learner.lora.target_modules=[qkv_proj]", f"run_dir={run_dir}", "sft.steps=1", "learner.engine=torch"]
    cfg = load_config(None, [*LORA, *overrides, "data.source=synthetic:parity", "data.num_synthetic=200"])
    with pytest.raises(ConfigError, match=r"target_modules=\['qkv_proj'\] match no module of the tiny model.*q_proj"):
        run_sft(cfg, progress=False)
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------- the policy


def test_only_adapters_train_and_the_reference_equals_a_frozen_copy_bitwise(learners, full_policy):
    rollout, views = batch(full_policy)
    policy = copy.deepcopy(full_policy)
    frozen = PolicyScorer(copy.deepcopy(full_policy), 1024)
    base = {k: v.clone() for k, v in full_policy.model.state_dict().items()}
    cfg = lora_cfg()
    cfg.objective.kl_to_ref_coef = 0.1
    learner = learners(cfg, policy)
    first = learner.train_step(rollout, ADV)
    second = learner.train_step(rollout, ADV)
    assert first["train/kl_to_ref"] == 0.0  # the adapters start at B = 0: the policy is the base
    assert second["train/kl_to_ref"] > 1e-6  # and have moved it after one update
    # the base weights never change; only adapters are trained (and are what a sync sends)
    merged = learner.merged_state_dict()
    state = policy.model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(state[name.replace("proj.weight", "proj.base_layer.weight")], tensor), name
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    sent = learner.state_dict_for_rollout()[1]
    assert sent and all(".lora_A." in k or ".lora_B." in k for k in sent)
    # the reference: the same module with adapters disabled, equal to a frozen copy of the initial model
    table = views.targets()
    seqs = torch.arange(len(views))
    ref = learner.micro.infer(learner.ref, views, table, seqs)[0]
    want = learner.micro.infer(frozen, views, table, seqs)[0]
    now = learner.micro.infer(learner.engine, views, table, seqs)[0]
    assert torch.equal(ref, want)
    assert not torch.equal(now, want)
    assert learner.ref.model is policy.model  # no second copy of the weights


@pytest.mark.parametrize(("engine", "stage"), [("torch", 0), ("deepspeed", 0), ("deepspeed", 2)])
def test_lora_trains_under_every_engine(learners, block_policy, engine, stage):
    rollout, _ = batch(block_policy)
    learner = learners(lora_cfg(engine=engine, stage=stage), copy.deepcopy(block_policy))
    before = adapter_weights(learner)
    metrics = learner.train_step(rollout, ADV)
    after = adapter_weights(learner)
    assert metrics["train/grad_norm"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before if ".lora_B." in k)
    trainable = sum(p.numel() for p in learner.engine.module.parameters() if p.requires_grad)
    assert trainable == sum(v.numel() for v in after.values())


def test_a_rollout_copy_holds_the_learners_merged_weights_after_an_update(learners, block_policy):
    rollout, _ = batch(block_policy)
    learner = learners(lora_cfg(), copy.deepcopy(block_policy))
    learner.train_step(rollout, ADV)
    version, sent = learner.state_dict_for_rollout()
    copy_policy = copy.deepcopy(block_policy)
    apply_lora(copy_policy, lora_cfg().learner.lora, seed=0)  # another seed: the sync must overwrite the adapters
    layout = bucket_layout(sent, 2**20)
    load_trained(copy_policy.model, unpack(layout, pack(sent, layout)))
    mine, theirs = learner.merged_state_dict(), merged_state_dict(copy_policy.model)
    assert mine.keys() == theirs.keys() == block_policy.model.state_dict().keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    full = sum(t.numel() * t.element_size() for t in block_policy.model.state_dict().values())
    assert layout_bytes(layout) < full / 4
    with pytest.raises(ValueError, match="adapter weights do not fit this model"):
        load_trained(copy_policy.model, {k: v for k, v in sent.items() if "layers.0." not in k})


def test_adapters_disabled_is_the_base_layer_exactly(block_policy):
    policy = copy.deepcopy(block_policy)
    apply_lora(policy, LoRAConfig(enabled=True, rank=2), seed=1)
    for name, p in policy.model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_()
    ids = torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        on = policy.model(ids).logits
        with adapters_disabled(policy.model):
            off = policy.model(ids).logits
        want = block_policy.model(ids).logits
    assert torch.equal(off, want) and not torch.allclose(on, want)


def test_a_masked_lm_takes_adapters_on_every_linear_layer_but_its_head(learners, tmp_path):
    """``masked_lm``'s default (PEFT's all-linear) on a BERT with dropout 0.1: adapters on attention, MLP and the
    head's transform, none on the output projection; the first pass still sees ratio 1 (dropout off)."""
    from tracerl.config import SamplingConfig
    from tracerl.models import char_tokenizer
    from tracerl.sampling import generate

    from .test_learner import _dropout_bert

    tok = char_tokenizer("0123456789+=abc ")
    policy = _dropout_bert(tmp_path, tok)
    rollout = generate(policy, [tok(p)["input_ids"] for p in ["1+2=", "12+3=", "a"]], SamplingConfig(max_new_tokens=8))
    learner = learners(lora_cfg(), policy)
    adapted = {n.split(".lora_A.")[0] for n in learner.state_dict_for_rollout()[1] if ".lora_A." in n}
    assert "bert.encoder.layer.0.attention.self.query" in adapted
    assert "bert.encoder.layer.1.output.dense" in adapted
    assert not any(n.startswith("cls.predictions.decoder") for n in adapted)
    metrics = learner.train_step(rollout, torch.tensor([1.0, -1.0, 0.5]))
    assert metrics["train/clipfrac"] == 0.0 and metrics["train/kl_to_old"] == 0.0
    assert metrics["train/grad_norm"] > 0


def test_validate_counts_a_masked_lms_all_linear_adapters_as_peft_places_them(tmp_path):
    from tracerl.models import char_tokenizer

    from .test_learner import _dropout_bert

    policy = _dropout_bert(tmp_path, char_tokenizer("0123456789+=abc "))
    counted = check_lora_targets(policy, LoRAConfig(enabled=True))  # all-linear: the output head left out
    apply_lora(policy, LoRAConfig(enabled=True))
    assert counted == len(adapter_layers(policy.model)) > 0


# ---------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize(("engine", "stage"), [("torch", 0), ("deepspeed", 2)])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(learners, full_policy, tmp_path, engine, stage):
    rollout, _ = batch(full_policy)
    cfg = lora_cfg(engine=engine, stage=stage)
    cfg.objective.kl_to_ref_coef = 0.05
    a = learners(cfg, copy.deepcopy(full_policy))
    a.train_step(rollout, ADV)
    a.save(tmp_path / "ckpt")
    a.train_step(rollout, -ADV)
    b = learners(cfg, copy.deepcopy(full_policy))
    b.load(tmp_path / "ckpt")
    b.train_step(rollout, -ADV)
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.version == b.version == 2
    # the checkpoint holds adapters and optimizer state, not the frozen base
    if engine == "torch":
        saved = torch.load(tmp_path / "ckpt" / "policy" / "engine.pt", weights_only=False)
        assert set(saved["module"]) == {"model." + k for k in wa}
        assert len(saved["optimizer"]["state"]) == len(wa)
    assert json.loads((tmp_path / "ckpt" / "learner.json").read_text())["lora"] is True
    full_cfg = lora_cfg("learner.lora.enabled=false", engine=engine, stage=stage)
    c = learners(full_cfg, copy.deepcopy(full_policy))
    with pytest.raises(ValueError, match="holds LoRA adapters; this learner has learner.lora.enabled=False"):
        c.load(tmp_path / "ckpt")


def test_resuming_with_other_lora_settings_is_refused_before_anything_starts(tmp_path):
    from tracerl import runs

    from .test_run_dir import cfg_for, fake_run

    run_dir = tmp_path / "run"
    fake_run(run_dir, (1,), cfg=cfg_for(run_dir, *LORA))
    assert runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", *LORA), "train").resume
    with pytest.raises(ConfigError, match="written with learner.lora.enabled=True; this run has learner.lora.enabled"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto"), "train")
    with pytest.raises(ConfigError, match="written with learner.lora.rank=4; this run has learner.lora.rank=8"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", *LORA, "learner.lora.rank=8"), "train")
    with pytest.raises(ConfigError, match="written with learner.lora.alpha=8.0; this run has learner.lora.alpha=128.0"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", *LORA, "learner.lora.alpha=128"), "train")  # scaling
    with pytest.raises(ConfigError, match=r"learner.lora.target_modules=None; this run has .*\['q_proj'\]"):
        runs.claim(cfg_for(run_dir, "checkpoint.resume=auto", *LORA, "learner.lora.target_modules=[q_proj]"), "train")
    full = tmp_path / "full"
    fake_run(full, (1,))
    with pytest.raises(ConfigError, match="written with learner.lora.enabled=False; this run has learner.lora.enabled"):
        runs.claim(cfg_for(full, "checkpoint.resume=auto", *LORA), "train")


def test_export_writes_a_merged_model_and_the_adapter_directory_peft_loads(learners, full_policy, tmp_path):
    from peft import PeftModel

    rollout, _ = batch(full_policy)
    learner = learners(lora_cfg(), copy.deepcopy(full_policy))
    learner.train_step(rollout, ADV)
    ckpt = save_checkpoint(tmp_path / "run", 1, learner, DriverState(step=1))
    merged = learner.merged_state_dict()
    # the adapter directory is part of the checkpoint's manifest, and a LoRA checkpoint loads through verification
    assert any(name.startswith("learner/adapter/") for name in verify_checkpoint(ckpt)["files"])
    resumed = learners(lora_cfg(), copy.deepcopy(full_policy))
    assert load_checkpoint(ckpt, resumed).step == 1
    assert all(torch.equal(resumed.merged_state_dict()[k], merged[k]) for k in merged)

    out = export_hf(ckpt, tmp_path / "merged")
    reloaded = load_policy(ModelConfig(family="tiny", path=str(out)))
    state = reloaded.model.state_dict()
    assert state.keys() == merged.keys() and all(torch.equal(state[k], merged[k]) for k in merged)

    adapter = export_hf(ckpt, tmp_path / "adapter", adapter=True)
    assert (adapter / "adapter_config.json").is_file()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(full_policy.model), str(adapter))
    via_peft = peft_model.merge_and_unload().state_dict()
    assert all(torch.equal(via_peft[k], merged[k]) for k in merged)

    # an adapter file changed after the checkpoint was sealed is refused, naming it, and nothing is written
    weights = next((ckpt / "learner" / "adapter").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match=weights.name):
        export_hf(ckpt, tmp_path / "tampered", adapter=True)
    assert not (tmp_path / "tampered").exists()

    # --adapter on a merged model: the checkpoint's own learner/hf, or a model folder, names where the adapter is
    itself = f"its LoRA adapter is exported from the checkpoint itself: tracerl export {ckpt} OUT_DIR --adapter"
    with pytest.raises(FileNotFoundError, match=re.escape(itself)):
        export_hf(ckpt / "learner" / "hf", tmp_path / "a2", adapter=True)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint: a model folder .* holds the merged weights only"):
        export_hf(out, tmp_path / "a3", adapter=True)
    assert not (tmp_path / "a2").exists() and not (tmp_path / "a3").exists()
    full_run = tmp_path / "full_run"  # the final model of a run without LoRA: no adapter anywhere
    shutil.copytree(out, full_run / "final")
    (full_run / "config.json").write_text(json.dumps({"learner": {"lora": {"enabled": False}}}))
    with pytest.raises(FileNotFoundError, match="trained with learner.lora.enabled=false: it has no LoRA adapter"):
        export_hf(full_run / "final", tmp_path / "a4", adapter=True)

    full = learners(lora_cfg("learner.lora.enabled=false"), copy.deepcopy(full_policy))
    full_ckpt = save_checkpoint(tmp_path / "full", 1, full, DriverState(step=1))
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapters"):
        export_hf(full_ckpt, tmp_path / "nothing", adapter=True)


def test_sft_with_lora_through_the_same_option(tmp_path):
    from tracerl.sft import run_sft

    cfg = load_config(None, [*LORA, f"run_dir={tmp_path / 'sft'}", "sft.steps=3", "sft.batch_size=4",
                             "sft.eval_every=0", "sft.lr=1e-2", "data.source=synthetic:parity",
                             "data.num_synthetic=40", "learner.engine=torch", "wandb.mode=disabled"])  # fmt: skip
    run_sft(cfg, progress=False)
    final = tmp_path / "sft" / "final"
    reloaded = load_policy(ModelConfig(family="tiny", path=str(final))).model.state_dict()
    initial = load_policy(ModelConfig()).model.state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], reloaded[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted layers moved (merged in)


# ---------------------------------------------------------------------------------------------- Ray actors


@pytest.mark.ray
@pytest.mark.slow
def test_rollout_actors_hold_the_learners_merged_weights_after_each_sync_path():
    ray = pytest.importorskip("ray")
    from tracerl.workers import LearnerGroup, RolloutGroup, sync_collective, sync_object_store

    from .test_rollout_workers import CPU, update

    cfg = load_config(None, [*LORA, "model.tiny.attention=block", "sampling.max_new_tokens=8", "learner.lr=1e-2",
                             "seed=1", "learner.engine=torch"])  # fmt: skip
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    learner = LearnerGroup(cfg, options=[CPU])
    a, b = RolloutGroup(cfg, [CPU]), RolloutGroup(cfg, [CPU])
    try:
        initial = a.merged_state_dicts()[0]
        full_bytes = sum(t.numel() * t.element_size() for t in initial.values())
        for step in (1, 2):
            update(learner, a, seed=step)
            version, sent = sync_object_store(learner, a)
            assert version == step and 0 < sent < full_bytes / 4  # adapters only
            assert sync_collective(learner, b) == (step, sent)
            want = learner.merged_state_dict()
            for got in a.merged_state_dicts() + b.merged_state_dicts():
                assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert any(not torch.equal(initial[k], want[k]) for k in want)
    finally:
        learner.shutdown()
        a.shutdown()
        b.shutdown()
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_a_lora_run_sigkilled_after_a_checkpoint_resumes_to_the_uninterrupted_numbers(tmp_path):
    """``tracerl train`` with LoRA, the driver SIGKILLed once step 2's checkpoint is complete: ``--resume auto``
    gives every step's numbers of an uninterrupted run, and each weight sync moved adapters only."""
    import os
    import signal

    from .test_faults import Run, assert_same_run, numbers

    lora = ("learner.lora.enabled=true", "learner.lora.rank=8", "learner.lora.alpha=16", "learner.lr=1e-2")
    whole = Run(tmp_path / "whole", "run", *lora).start()
    assert whole.wait() == 0, whole.output
    reference = numbers(whole.rows())
    model = ModelConfig(tiny=TinyModelConfig(attention="block", hidden_size=128, num_layers=4, intermediate_size=256))
    full_bytes = sum(t.numel() * t.element_size() for t in load_policy(model).model.state_dict().values())
    syncs = [r["sync/bytes"] for r in whole.rows() if "sync/bytes" in r]
    assert syncs and all(0 < b < full_bytes / 4 for b in syncs)
    run = Run(tmp_path / "killed", "run", *lora).start()
    run.when(lambda: run.complete(2))
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert "(step 2)" in run.output
    assert_same_run(run, reference)
