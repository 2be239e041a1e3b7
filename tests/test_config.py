"""Config loading: YAML and overrides merge; bad keys, types and choices fail with helpful messages."""

from __future__ import annotations

import pytest

from tracerl.checks import load_config as load
from tracerl.config import ConfigError, SamplingConfig, check_reward_total, check_sampling


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sampling:\n  max_new_tokens: 16\n  temperature: 0.5\nmodel:\n  tiny:\n    attention: block\n")
    cfg = load(path, ["sampling.temperature=0.7", "seed=3"])
    assert cfg.sampling.max_new_tokens == 16  # from YAML
    assert cfg.sampling.temperature == 0.7  # the override wins
    assert cfg.model.tiny.attention == "block"
    assert cfg.seed == 3
    assert cfg.sampling.block_size == 4  # untouched default


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load(None, ["sampling.temprature=0.7"])
    msg = str(err.value)
    assert "sampling.temprature" in msg and "temperature" in msg and "Valid keys" in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modell:\n  family: tiny\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'modell'.*bad.yaml"):
        load(path)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load(None, ["sampling.max_new_tokens=many"])
    assert "sampling.max_new_tokens" in str(err.value) and "many" in str(err.value)


def test_unknown_remasking_lists_choices():
    with pytest.raises(ConfigError) as err:
        load(None, ["sampling.remasking=low_confidence_statc"])
    msg = str(err.value)
    assert "unknown sampling.remasking 'low_confidence_statc'" in msg
    for name in ["low_confidence_static", "low_confidence_dynamic", "entropy_bounded", "random", "sequential"]:
        assert name in msg


def test_a_misspelt_name_is_reported_before_the_combinations_it_takes_part_in():
    # old_logp_source=rollout refuses any views but trace: a misspelt trace must not be reported as that
    with pytest.raises(ConfigError, match=r"^unknown objective.views 'trce'; choose from \['coupled', 'd1', "):
        load(None, ["objective.old_logp_source=rollout", "objective.views=trce"])


def test_bad_literal_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"sampling.cache.*'disk'.*\['auto', 'none', 'prefix', 'dual', 'kv'\]"):
        load(None, ["sampling.cache=disk"])


def test_unknown_family_lists_families():
    with pytest.raises(ConfigError, match=r"unknown model.family 'gpt'.*dream.*llada.*masked_lm.*sdar.*tiny"):
        load(None, ["model.family=gpt"])


def test_real_family_needs_a_path():
    with pytest.raises(ConfigError, match="model.path is required"):
        load(None, ["model.family=llada"])


@pytest.mark.parametrize("value", [0, -5])
def test_max_new_tokens_must_be_positive(value):
    with pytest.raises(ConfigError, match="sampling.max_new_tokens must be a positive"):
        load(None, [f"sampling.max_new_tokens={value}"])


def test_block_size_must_divide_step_schedule():
    # 64 tokens in blocks of 4 = 16 blocks; 40 steps cannot be spread evenly over 16 blocks
    with pytest.raises(ConfigError, match=r"sampling.steps=40 is not divisible by the number of blocks.*16"):
        check_sampling(SamplingConfig(max_new_tokens=64, block_size=4, steps=40))
    with pytest.raises(ConfigError, match="must be a multiple of sampling.block_size"):
        check_sampling(SamplingConfig(max_new_tokens=30, block_size=4, steps=32))
    check_sampling(SamplingConfig(max_new_tokens=64, block_size=4, steps=32))  # 2 steps per block is fine


def test_steps_per_block_range():
    with pytest.raises(ConfigError, match="between 1 and sampling.block_size"):
        check_sampling(SamplingConfig(block_size=4, steps_per_block=5))


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "what"), [("just a string\n", "a string"), ("42\n", "a number"), ("- a\n", "a list")])
def test_a_yaml_file_of_one_value_is_not_a_mapping(tmp_path, text, what):
    path = tmp_path / "one.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config file '{path}' holds {what} at the top, not a mapping of settings"):
        load(path)


def test_an_empty_yaml_file_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load(tmp_path / "empty.yaml") == load(None)


def test_a_directory_as_config_file_says_it_is_a_directory(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=rf"^config file '{tmp_path}' is a directory \(it holds a.yaml\)"):
        load(tmp_path)


def test_override_without_equals_is_clear():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load(None, ["sampling.temperature"])


@pytest.mark.parametrize("key", ["learner.lr", "reward_model.lr", "sft.lr"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_learning_rate_that_is_not_positive_is_refused(key, value):
    # learner.lr=0 ran a whole run that changed nothing; -1 reached torch's own message after the model loaded
    with pytest.raises(ConfigError, match=rf"{key} must be a positive number, got {float(value)}"):
        load(None, [f"{key}={value}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # inf passed every "> 0" check: learner.lr=inf trained the model to NaN and exited 0; timeout_s=inf
        # failed in validate with OverflowError
        ("learner.lr=inf", "learner.lr must be a finite number, got inf"),
        ("learner.value_lr=inf", "learner.value_lr must be a finite number, got inf"),
        ("objective.kl_to_old_coef=inf", "objective.kl_to_old_coef must be a finite number, got inf"),
        ("reward.timeout_s=inf", "reward.timeout_s must be a finite number, got inf"),
        ("sft.mask_eps=.nan", "sft.mask_eps must be in (0, 1)"),
        # torch's own "Invalid beta parameter at index 0: 2.0" after the model loaded, naming no setting
        ("learner.beta1=2", "learner.beta1 must be in [0, 1)"),
        ("learner.beta2=1", "learner.beta2 must be in [0, 1)"),
        ("learner.weight_decay=-1", "learner.weight_decay must be ≥ 0"),
        ("learner.adam_eps=0", "learner.adam_eps must be positive"),
        # every group dropped at every step, and the run exited 0
        ("objective.group_filter=keep_acc_range objective.filter_low=0.9 objective.filter_high=0.1",
         "objective.filter_low=0.9 > filter_high=0.1 would drop every group"),
        ("sft.self_conditioning_prob=2", "sft.self_conditioning_prob is the probability"),
        # ZeroDivisionError, a negative tensor dimension, or torch's "selected index k out of range" after the
        # run directory was written
        ("model.tiny.hidden_size=0", "model.tiny.hidden_size=0: sizes must be ≥ 1"),
        ("model.tiny.num_heads=0", "model.tiny.num_heads=0: sizes must be ≥ 1"),
        ("model.tiny.hidden_size=-8", "model.tiny.hidden_size=-8: sizes must be ≥ 1"),
        ("model.tiny.num_heads=3", "model.tiny.hidden_size=64 and model.tiny.num_heads=3 give heads of width 21"),
        ("model.tiny.num_heads=64", "give heads of width 1 (hidden_size // num_heads), which must be even and at"),
        ("model.family=diffusion_gemma model.tiny.top_k_experts=9",
         "model.tiny.top_k_experts=9 routes each token to more experts than model.tiny.num_experts=4"),
        ("model.family=diffusion_gemma model.tiny.canvas_length=0", "model.tiny.canvas_length=0: sizes must be ≥ 1"),
        ("model.family=diffusion_gemma model.tiny.num_heads=5 model.tiny.hidden_size=80",
         "so num_heads must be even"),
        # silently ignored: the fresh tiny model has its own mask token and model.tiny.block_size
        ("model.mask_token_id=99999", "model.mask_token_id=99999 applies to a model loaded from model.path"),
        ("model.block_size=3", "model.block_size=3 applies to a model loaded from model.path"),
    ],
)  # fmt: skip
def test_settings_no_run_could_use_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as err:
        load(None, override.split())
    assert message in str(err.value)


def test_held_out_prompts_that_are_the_training_prompts_are_refused_for_training(tmp_path, monkeypatch):
    # validate said "200 held out" while those prompts were trained on
    from tracerl.config import check_training

    with pytest.raises(ConfigError, match=r"both 'synthetic:addition', split 'train': the held-out prompts would be"):
        check_training(load(None, ["eval.source=synthetic:addition", "eval.split=train"]))
    check_training(load(None, ["eval.source=synthetic:addition", "eval.split=test"]))  # another split
    # a local file has no splits: the same file, however written, is the same prompts
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    monkeypatch.chdir(tmp_path)
    cfg = load(None, ["data.source=d.jsonl", f"eval.source={tmp_path}/d.jsonl"])
    with pytest.raises(ConfigError, match=rf"both the file {tmp_path}/d.jsonl: .* another dataset \(eval.source"):
        check_training(cfg)
    check_training(load(None, ["data.source=d.jsonl", "eval.source=d.jsonl", "eval.num_prompts=0"]))  # no eval


def test_the_tiny_shape_is_not_checked_for_a_model_loaded_from_a_path():
    # a saved model keeps its own shape (model.tiny.* is then only compared, as a warning)
    cfg = load(None, ["model.path=some/dir", "model.tiny.top_k_experts=9", "model.family=diffusion_gemma"])
    assert cfg.model.tiny.top_k_experts == 9
    # hidden_size need not be a multiple of num_heads: the heads are hidden_size // num_heads wide (16 here)
    assert load(None, ["model.tiny.hidden_size=132", "model.tiny.num_heads=8"]).model.tiny.hidden_size == 132


@pytest.mark.parametrize("advantage", ["group_zscore", "group_mean", "rloo"])
def test_one_sample_per_prompt_is_refused_with_a_group_advantage(advantage):
    # every advantage of a group of one is 0: the run would learn nothing, silently
    with pytest.raises(ConfigError, match=rf"rollout.samples_per_prompt=1 with objective.advantage={advantage}.*≥ 2"):
        load(None, ["rollout.samples_per_prompt=1", f"objective.advantage={advantage}"])
    assert load(None, ["rollout.samples_per_prompt=2", f"objective.advantage={advantage}"]).rollout.samples_per_prompt


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learner=3", "'learner' is a section of settings (learner.engine, learner.num_ranks, ...), not a value"),
        ("learner.lora=1", "'learner.lora' is a section of settings"),
        ("reward.functions=sudoku_cells", "reward.functions takes a list, got 'sudoku_cells'; write it as "
                                          "reward.functions=[{fn: sudoku_cells}]"),
        ("reward.functions=[sudoku_cells]", "reward.functions[0] is 'sudoku_cells', but each entry of reward.functions "
                                            "is a mapping"),
        ("reward.functions=[{fn: sudoku_cells, weight: abc}]", "reward.functions[0].weight is 'abc', not a number"),
        ("run_dir=", "an empty value means null, which run_dir does not take: give it a value"),
        ("cluster.rollout_resources=[a]", "cluster.rollout_resources takes a mapping, got ['a']"),
        ("reward.functions.0.weight=2", "reward.functions is a list: set one entry as reward.functions[0].<setting>"),
        ("reward.functions[3].weight=2", "reward.functions has 1 entry, so there is no [3]"),
        ("sampling[0].top_k=1", "sampling is not a list setting, so it has no entry [0]"),
        ("reward.functions[0].wieght=2", "unknown config key 'reward.functions[0].wieght'"),
        ("reward.functions[0].weight=abc", "bad value for config key 'reward.functions[0].weight'"),
        ("rollout.num_cpus_per_worker=-1", "rollout.num_cpus_per_worker must be a number ≥ 0"),
        ("learner.num_cpus_per_rank=.nan", "learner.num_cpus_per_rank must be a number ≥ 0 (the Ray CPUs each actor "
                                           "reserves), got nan"),
        ("cluster.learner_resources={foo: -1}", "cluster.learner_resources.foo must be a number ≥ 0"),
        ("cluster.rollout_resources={CPU: 1}", "cluster.rollout_resources names 'CPU', which Ray counts through"),
    ],
)  # fmt: skip
def test_values_of_the_wrong_shape_name_the_setting_and_how_to_write_it(override, message):
    # OmegaConf said "bad value for config key '?'", "AnyNode is not a ListConfig", or named 'weight' without its path
    with pytest.raises(ConfigError) as err:
        load(None, [override])
    assert message in str(err.value) and "'?'" not in str(err.value)


def test_lower_case_cpu_or_gpu_is_a_custom_resource():
    assert load(None, ["cluster.learner_resources={gpu: 1}"]).cluster.learner_resources == {"gpu": 1.0}


def test_one_list_entry_is_set_by_its_index():
    two = "reward.functions=[{fn: sudoku_cells}, {fn: synthetic_exact, weight: 0.5}]"
    cfg = load(None, [two, "reward.functions[1].weight=0", "reward.functions[0].kwargs={strict: true}"])
    assert [(f.fn, f.weight, f.kwargs) for f in cfg.reward.functions] == [
        ("sudoku_cells", 1.0, {"strict": True}),
        ("synthetic_exact", 0.0, {}),
    ]
    judged = "reward.functions=[{fn: 'http://h:1/v1', name: j, judge: {}, kwargs: {rubric: strict}}]"
    cfg = load(None, [judged, "reward.functions[0]={fn: math_verify}"])  # a whole entry replaces the one there
    assert [(f.fn, f.name, f.kwargs, f.judge) for f in cfg.reward.functions] == [("math_verify", None, {}, None)]
    cfg = load(None, ["reward.functions[0].weight=0.5", two])  # in command-line order: the list then replaces it
    assert [f.weight for f in cfg.reward.functions] == [1.0, 0.5]
    cfg = load(None, [two, "reward.functions[1].weight=0.25", "seed=3"])
    assert cfg.reward.functions[1].weight == 0.25 and cfg.seed == 3
    with pytest.raises(ConfigError, match="every reward weight is 0"):  # the commands' checks see the result
        check_reward_total(load(None, [two, "reward.functions[0].weight=0", "reward.functions[1].weight=0"]))
    with pytest.raises(ConfigError, match=r"reward.functions\[0\] \(org/rm\): .* got 0, nan, 0.25"):  # load's checks
        load(None, ["reward.functions=[{fn: org/rm, model: {}}]", "reward.functions[0].model.num_cpus=.nan"])


def test_a_mapping_given_whole_on_the_command_line_replaces_the_yamls(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {synthetic_options: {teacher: confuse, noise: 0.6}}\n"
        "reward: {functions: [{fn: sudoku_cells, kwargs: {strict: true}}]}\n"
        "cluster: {rollout_resources: {node_a: 1}, learner_resources: {node_c: 3}}\n"
    )
    assert load(path, ["data.synthetic_options={}"]).data.synthetic_options == {}
    assert load(path, ["data.synthetic_options={noise: 0.1}"]).data.synthetic_options == {"noise": 0.1}
    kept = load(path, ["data.synthetic_options.noise=0.1"]).data.synthetic_options
    assert kept == {"teacher": "confuse", "noise": 0.1}
    cfg = load(path, ["data.synthetic_options={min_blanks: 2}", "data.synthetic_options.noise=0.2", "seed=4"])
    assert (cfg.data.synthetic_options, cfg.seed) == ({"min_blanks": 2, "noise": 0.2}, 4)  # in command-line order
    assert load(path, ["reward.functions[0].kwargs={lenient: 1}"]).reward.functions[0].kwargs == {"lenient": 1}
    assert load(path, ["cluster.rollout_resources={node_b: 2}"]).cluster.rollout_resources == {"node_b": 2.0}
    same = load(path, ["cluster.rollout_resources=${cluster.learner_resources}"])  # resolved after the merge
    assert same.cluster.rollout_resources == {"node_c": 3.0}
    with pytest.raises(ConfigError, match=r"data.synthetic_options is a mapping and cannot be null; write "):
        load(path, ["data.synthetic_options=null"])
    with pytest.raises(ConfigError, match=r"data.synthetic_options takes a mapping, got 3"):
        load(path, ["data.synthetic_options=3"])


def test_interpolations_pass_the_shape_check_and_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACERL_TEST_LR", "2e-5")
    cfg = load(
        None, ["sft.lr=${oc.env:TRACERL_TEST_LR}", "learner.lr=${sft.lr}", "eval.k=${rollout.samples_per_prompt}"]
    )
    assert (cfg.learner.lr, cfg.sft.lr, cfg.eval.k) == (2e-5, 2e-5, cfg.rollout.samples_per_prompt)
    path = tmp_path / "run.yaml"
    path.write_text("learner: {lr: 1.0e-6}\nsft: {lr: '${learner.lr}'}\n")
    assert load(path).sft.lr == 1e-6


def test_a_section_of_the_wrong_shape_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learner: 5\n")
    with pytest.raises(ConfigError, match=rf"'learner' is a section of settings .* \(from {path}\)"):
        load(path)


def test_unknown_objective_names_list_choices():
    with pytest.raises(ConfigError, match=r"unknown objective.advantage 'grpo'; choose from \['group_mean'"):
        load(None, ["objective.advantage=grpo"])
    with pytest.raises(ConfigError, match=r"unknown objective.views 'elbo'; choose from \['coupled', 'd1'"):
        load(None, ["objective.views=elbo"])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["objective.mask_ratio_low=0", "objective.mask_ratio_high=0"], "objective.mask_ratio_low and mask_ratio_high"),
        (["objective.mask_ratio_low=0.9", "objective.mask_ratio_high=0.1"], "0 < low ≤ high ≤ 1"),
        (["objective.mask_ratio_high=2"], "got 0.1 and 2"),
        (["objective.d1_prompt_mask_prob=-0.5"], "objective.d1_prompt_mask_prob must be in"),
        (["objective.d1_prompt_mask_prob=1.5"], "got 1.5"),
        (["objective.eps_low=-0.1"], "objective.eps_low must be in"),
        (["objective.eps_high=-0.1"], "eps_high ≥ 0"),
        (["objective.kl_to_ref_coef=-1"], "objective.kl_to_ref_coef must be ≥ 0"),
        (["objective.kl_to_old_coef=-0.01"], "objective.kl_to_old_coef must be ≥ 0"),
        (["objective.lam=1.5"], "objective.gamma and objective.lam"),
    ],
)
def test_objective_numbers_out_of_range_are_refused(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load(None, overrides)


def test_objective_numbers_at_their_limits_are_accepted():
    cfg = load(None, ["objective.mask_ratio_low=1", "objective.mask_ratio_high=1", "objective.d1_prompt_mask_prob=0",
                      "objective.eps_low=1", "objective.kl_to_old_coef=0", "objective.gamma=0"])  # fmt: skip
    assert cfg.objective.mask_ratio_low == 1 and cfg.objective.d1_prompt_mask_prob == 0


@pytest.mark.parametrize("views", ["coupled", "random_masking", "d1"])
def test_the_value_model_is_refused_off_trace_views(views):
    with pytest.raises(ConfigError, match=f"objective.value_model=true with objective.views={views}: .*only trace"):
        load(None, ["objective.value_model=true", f"objective.views={views}", "objective.old_logp_source=learner"])
    assert load(None, ["objective.value_model=true", "objective.shrink=4"]).objective.shrink == 4  # merged: fine


def test_reward_totals_and_sample_spread_are_checked_only_where_samples_are_scored_and_trained():
    from tracerl.config import check_reward_total, check_training

    weightless = load(None, ["reward.functions=[{fn: synthetic_exact, weight: 0}]"])  # sft and generate load it
    with pytest.raises(ConfigError, match="every reward weight is 0"):
        check_reward_total(weightless)
    with pytest.raises(ConfigError, match="sampling.temperature=0 with sampling.remasking=low_confidence_static"):
        check_training(load(None, ["sampling.temperature=0"]))
    for fine in (["sampling.temperature=0", "objective.value_model=true"],  # R - V is no group difference
                 ["sampling.temperature=0", "sampling.remasking=random"]):  # the commit order differs  # fmt: skip
        check_training(load(None, fine))
