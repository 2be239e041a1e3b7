"""Config checks against the registries (family, remasking, views, advantages, ...).

``config.py`` sits below every registry in the import order, so the names a config may use are checked here,
where the registries are importable. Entry points load configs with ``load_config``.
"""

from __future__ import annotations

from pathlib import Path

from tracerl import advantages, objectives, trace
from tracerl.config import Config, ConfigError, load
from tracerl.models import FAMILIES
from tracerl.models.lora import lora_targets
from tracerl.sampling import REMASKING


def check_names(cfg: Config) -> Config:
    """Every registry name in the config exists (the error lists the valid names), LoRA has target modules for
    the family, and a model that needs a path has one."""
    registry_names(cfg)
    if cfg.learner.lora.enabled:
        lora_targets(cfg.model.family, cfg.learner.lora)  # a family without a default needs target_modules
    if cfg.model.path is None and cfg.model.family not in ("tiny", "diffusion_gemma"):
        raise ConfigError(
            f"model.path is required for model.family={cfg.model.family}: give a local directory or a hub name."
        )
    return cfg


def registry_names(cfg: Config) -> None:
    """Every registry name in the config exists; the error lists the valid names."""
    o = cfg.objective
    for key, value, valid in (
        ("model.family", cfg.model.family, FAMILIES),
        ("sampling.remasking", cfg.sampling.remasking, REMASKING),
        ("eval.remasking", cfg.eval.remasking or cfg.sampling.remasking, REMASKING),
        ("objective.views", o.views, trace.VIEWS),
        ("objective.advantage", o.advantage, advantages.ADVANTAGES),
        ("objective.group_filter", o.group_filter, advantages.GROUP_FILTERS),
        ("objective.aggregation", o.aggregation, objectives.AGGREGATIONS),
        ("objective.kl_aggregation", o.kl_aggregation, [*objectives.AGGREGATIONS, "auto"]),
        ("objective.kl_to_old_kind", o.kl_to_old_kind, objectives.KL_ESTIMATORS),
        ("objective.kl_to_ref_kind", o.kl_to_ref_kind, objectives.KL_ESTIMATORS),
    ):
        if value not in valid:
            raise ConfigError(f"unknown {key} '{value}'; choose from {sorted(valid)}.")


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """``config.load`` plus the registry-name checks: what every command uses."""
    cfg = load(yaml_path, overrides, names=registry_names)  # a misspelt name first, before what it combines with
    return check_names(cfg)
