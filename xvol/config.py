"""The training config outside Hydra: OmegaConf resolvers used by configs/ (registered when xvol
is imported), the validator of user-set values, and the run directory's config snapshot.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def run_id() -> str:
    """A run name every rank agrees on without talking to each other.

    Under torchrun all ranks (and every restart under --max-restarts) share TORCHELASTIC_RUN_ID
    (the --rdzv-id, or a uuid with --standalone). Outside torchrun a timestamp is safe: one
    process. ``${now:}`` in hydra.run.dir would be resolved by each rank at its own second.
    """
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return rid[:8] if len(rid) == 36 else rid  # a --standalone uuid: its first block suffices
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm:
        return f"slurm{slurm}"
    return time.strftime("%Y%m%d-%H%M%S")


def world_size() -> int:
    """Ranks of the job being configured, by the engine's own rule (torchrun, then a submitit
    Slurm task; a plain process inside an sbatch script stays one rank)."""
    from xvol.engine.dist import read_dist_env  # lazy: configs resolve before any dist setup

    return read_dist_env().world_size


def linear_lr(base_lr: float, base_batch: int, batch_per_rank: int) -> float:
    """The linear scaling rule (Goyal et al.): base_lr per base_batch images of global batch."""
    return float(base_lr) * int(batch_per_rank) * world_size() / int(base_batch)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("xvol_run_id"):
        OmegaConf.register_new_resolver("xvol_run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("xvol_linear_lr"):
        OmegaConf.register_new_resolver("xvol_linear_lr", linear_lr)


register_resolvers()  # importing this module is what makes configs/ composable


# ----------------------------------------------------------------------------- validation


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message starts with the key."""


@dataclass(frozen=True)
class Check:
    """What a key accepts: ``ok(value)`` and the words for it in the error message."""

    expected: str
    ok: Callable[[Any], bool]
    nullable: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def optional(check: Check) -> Check:
    return replace(check, expected=f"{check.expected} or null", nullable=True)


def one_of(*choices: str) -> Check:
    return Check("one of " + ", ".join(choices), lambda v: isinstance(v, str) and v in choices)


POSITIVE_INT = Check("a positive integer", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Check("an integer >= 0", lambda v: _is_int(v) and v >= 0)
INT = Check("an integer", _is_int)
POSITIVE_NUMBER = Check("a positive number", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Check("a number >= 0", lambda v: _is_number(v) and v >= 0)
BOOL = Check("true or false", lambda v: isinstance(v, bool))
AUTO_OR_BOOL = Check("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))
DEVICE = Check(
    "auto, cpu, cuda or cuda:N",
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
)
NAME = Check("a non-empty name", lambda v: (isinstance(v, str) and v.strip() != "") or _is_int(v))
RESUME = Check(
    "auto, null or a checkpoint path",
    lambda v: v is False or (isinstance(v, str) and v.strip() != ""),
    nullable=True,
)


def _amp(v: Any) -> bool:
    from xvol.engine.runtime import AMP_DTYPES  # lazy: xvol.config is imported by xvol itself

    return v is None or v is False or (isinstance(v, str) and v.lower() in {"auto", *AMP_DTYPES})


def _epoch_metric(v: Any) -> bool:
    from xvol.engine.trainer import AUTO_METRIC, EPOCH_METRICS

    return v == AUTO_METRIC or v in EPOCH_METRICS


# The keys users set on the command line, each with what it accepts. Keys absent from the
# composed config (a data backend without `workers`, say) are skipped.
TRAIN_CHECKS: dict[str, Check] = {
    "run_name": NAME,
    "seed": INT,
    "resume": RESUME,
    "data.num_classes": POSITIVE_INT,
    "data.img_size": POSITIVE_INT,
    "data.eval_img_size": optional(POSITIVE_INT),
    "data.batch_size": POSITIVE_INT,
    "data.eval_batch_size": optional(POSITIVE_INT),
    "data.workers": NON_NEGATIVE_INT,
    "data.length": POSITIVE_INT,
    "data.val_length": POSITIVE_INT,
    "optim.lr": POSITIVE_NUMBER,
    "optim.weight_decay": NON_NEGATIVE_NUMBER,
    "sched.warmup_epochs": NON_NEGATIVE_NUMBER,
    "trainer.epochs": POSITIVE_INT,
    "trainer.device": DEVICE,
    "trainer.amp": Check("auto, bf16, fp16 or none", _amp, nullable=True),
    "trainer.channels_last": AUTO_OR_BOOL,
    "trainer.compile": BOOL,
    "trainer.grad_accum": POSITIVE_INT,
    "trainer.clip_grad": optional(POSITIVE_NUMBER),
    "trainer.clip_mode": one_of("norm", "value", "agc"),
    "trainer.sync_bn": AUTO_OR_BOOL,
    "trainer.dist_bn": one_of("reduce", "broadcast"),
    "trainer.deterministic": BOOL,
    "trainer.label_smoothing": Check("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "trainer.checkpoint.every_steps": NON_NEGATIVE_INT,
    "trainer.checkpoint.keep_top_k": NON_NEGATIVE_INT,
    "trainer.checkpoint.metric": Check(
        "auto or a metric of the epoch record (val_top1, val_top5, val_loss, ema_top1, "
        "ema_top5, ema_loss, train_loss, lr, img_s, epoch_time, eval_time)",
        _epoch_metric,
    ),
    "trainer.checkpoint.mode": one_of("max", "min"),
    "trainer.log_interval": POSITIVE_INT,
    "trainer.progress_bar": BOOL,
    "trainer.max_skipped_steps": POSITIVE_INT,
    "trainer.allow_class_mismatch": BOOL,
    "trainer.init_from": optional(
        Check("a checkpoint path", lambda v: isinstance(v, str) and v.strip() != "")
    ),
    "trainer.init_from_ema": BOOL,
    "trainer.debug_nan_at_step": optional(POSITIVE_INT),
    "trainer.debug_signal_at_step": optional(POSITIVE_INT),
}

# Rules over several keys: (key the message names, broken(cfg), what is wrong).
TRAIN_RULES: list[tuple[str, Callable[[DictConfig], bool], str]] = [
    (
        "trainer.checkpoint.metric",
        lambda cfg: (
            str(cfg.trainer.checkpoint.metric).startswith("ema_") and cfg.trainer.get("ema") is None
        ),
        "ranks checkpoints by an EMA metric, but trainer.ema is null (no EMA is evaluated)",
    ),
    (
        "trainer.init_from_ema",
        lambda cfg: bool(cfg.trainer.get("init_from_ema")) and not cfg.trainer.get("init_from"),
        "true needs trainer.init_from (the checkpoint to take EMA weights from)",
    ),
]

_ABSENT = object()


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def validate_train_config(cfg: DictConfig) -> None:
    """Check the keys of TRAIN_CHECKS, the TRAIN_RULES, then that everything resolves.

    Raises ConfigError with one line, ``<key>: expected <what>, got <value>``, before anything
    is built: a bad value would otherwise surface as a library traceback (or not at all).
    """
    for key, check in TRAIN_CHECKS.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key}: {_one_line(err)}") from None
        if value is _ABSENT or (value is None and check.nullable):
            continue
        if value is None or not check.ok(value):
            raise ConfigError(f"{key}: expected {check.expected}, got {value!r}")
    for key, broken, message in TRAIN_RULES:
        if broken(cfg):
            raise ConfigError(f"{key}: {message}")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {_one_line(err)}") from None


# ----------------------------------------------------------------------------- run snapshot


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key (old -> new)`` for every leaf that differs between two plain config trees."""
    a, b = _flatten(old), _flatten(new)
    missing = "(absent)"
    return [
        f"{k} ({a.get(k, missing)!r} -> {b.get(k, missing)!r})"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def write_run_snapshot(
    run_dir: Path, cfg: DictConfig, overrides: list[str], resumed: bool
) -> list[str]:
    """Write ``config.yaml`` (resolved) and ``overrides.yaml`` of a run, rank 0 only.

    A run continued from its checkpoints keeps the snapshot it was started with, which is what
    those checkpoints were trained with; the keys where this launch differs are returned (each
    checkpoint's own ``config`` records the values in force when it was written).
    """
    config_file, overrides_file = run_dir / "config.yaml", run_dir / "overrides.yaml"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if resumed and config_file.is_file():
        try:
            original = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            original = {}
        return config_diff(original, resolved) if isinstance(original, dict) else ["config.yaml"]
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    overrides_file.write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    return []
