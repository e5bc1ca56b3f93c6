"""Config composition of scripts/train.py: every option of the groups and every experiment
composes, validates and instantiates; an override typo fails with Hydra's own message; a bad
value fails validation with one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import xvol.config  # noqa: F401  (registers ${xvol_run_id:})
from xvol.config import ConfigError, config_diff, validate_train_config
from xvol.engine import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = ["optim", "sched", "trainer", "logger", "paths", "model", "data"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _job(cfg):
    """The job config (the hydra node has runtime-only fields), as scripts/train.py sees it."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra")
    return OmegaConf.create(plain)


def _resolve(cfg) -> dict:
    """The job config fully resolved, after the validation scripts/train.py runs first."""
    job = _job(cfg)
    validate_train_config(job)
    return OmegaConf.to_container(job, resolve=True, throw_on_missing=True)


def _check_buildable(cfg) -> None:
    """Resolve everything and build what needs no data on disk: model, optimizer, schedule,
    EMA and Mixup (the data builder is a partial; calling it would read the data set)."""
    _resolve(cfg)
    assert cfg.run_name and str(cfg.hydra.run.dir).endswith(str(cfg.run_name))
    assert cfg.hydra.output_subdir is None and cfg.hydra.job.chdir is False
    model = instantiate(cfg.model)
    optimizer = build_optimizer(instantiate(cfg.optim), model)
    scheduler = build_scheduler(instantiate(cfg.sched), optimizer, 10)
    assert scheduler is not None
    if cfg.trainer.ema is not None:
        assert instantiate(cfg.trainer.ema)(model).module is not model
    mixup = instantiate(cfg.trainer.mixup, mixup_alpha=0.2)
    assert mixup.num_classes == cfg.data.num_classes
    assert callable(instantiate(cfg.data))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(override: str) -> None:
    resolved = _resolve(_compose([override]))
    assert resolved["trainer"]["epochs"] > 0 and resolved["seed"] == 0
    assert resolved["sched"]["num_epochs"] == resolved["trainer"]["epochs"]


def test_default_config_builds() -> None:
    _check_buildable(_compose(["model.num_classes=10"]))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_builds(experiment: str) -> None:
    _check_buildable(_compose([f"experiment={experiment}"]))


def test_override_typo_fails_with_hydra_message(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "trainer.epoks=1",
            f"paths.output_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Could not override 'trainer.epoks'" in proc.stderr
    assert "Key 'epoks' is not in struct" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was created


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=abc", "trainer.epochs: expected a positive integer, got 'abc'"),
        ("trainer.epochs=0", "trainer.epochs: expected a positive integer, got 0"),
        ("trainer.epochs=2.5", "trainer.epochs: expected a positive integer, got 2.5"),
        ("data.batch_size=0", "data.batch_size: expected a positive integer, got 0"),
        ("data.batch_size=-4", "data.batch_size: expected a positive integer, got -4"),
        ("data.img_size=0", "data.img_size: expected a positive integer, got 0"),
        ("data.workers=-1", "data.workers: expected an integer >= 0, got -1"),
        ("optim.lr=-0.1", "optim.lr: expected a positive number, got -0.1"),
        ("trainer.amp=fp8", "trainer.amp: expected auto, bf16, fp16 or none, got 'fp8'"),
        ("trainer.device=gpu", "trainer.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("trainer.compile=yes", "trainer.compile: expected true or false, got 'yes'"),
        ("trainer.checkpoint.mode=maximum", "trainer.checkpoint.mode: expected one of max, min"),
        (
            "trainer.checkpoint.metric=val_acc",
            "trainer.checkpoint.metric: expected auto or a metric of the epoch record (",
        ),
        ("trainer.label_smoothing=1.0", "trainer.label_smoothing: expected a number in [0, 1)"),
        ("model.arch=???", "model.arch: Missing mandatory value"),
    ],
)
def test_bad_value_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_train_config(_job(_compose([override])))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_ema_metric_needs_ema() -> None:
    ok = _job(_compose(["trainer.checkpoint.metric=ema_top1"]))
    validate_train_config(ok)
    with pytest.raises(ConfigError, match="trainer.checkpoint.metric: .* trainer.ema is null"):
        validate_train_config(
            _job(_compose(["trainer.checkpoint.metric=ema_top1", "trainer.ema=null"]))
        )


def test_config_diff_lists_changed_leaves() -> None:
    old = {"optim": {"lr": 0.1, "wd": 0.0}, "trainer": {"epochs": 2}, "gone": 1}
    new = {"optim": {"lr": 5.0, "wd": 0.0}, "trainer": {"epochs": 2}, "added": [1]}
    assert config_diff(old, new) == [
        "added ('(absent)' -> [1])",
        "gone (1 -> '(absent)')",
        "optim.lr (0.1 -> 5.0)",
    ]


def test_checkpoint_metric_auto_follows_ema() -> None:
    """auto is the default and valid with or without EMA (the engine picks ema_top1 or
    val_top1); the EMA rule stays the one rule for explicit ema_* metrics."""
    cfg = _job(_compose([]))
    assert cfg.trainer.checkpoint.metric == "auto"
    validate_train_config(cfg)
    validate_train_config(_job(_compose(["trainer.ema=null"])))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.init_from=''"], "trainer.init_from: expected a checkpoint path or null"),
        (["trainer.init_from_ema=yes"], "trainer.init_from_ema: expected true or false"),
        (["trainer.init_from_ema=true"], "trainer.init_from_ema: true needs trainer.init_from"),
    ],
)
def test_init_from_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_train_config(_job(_compose(overrides)))
    assert str(err.value).startswith(message)
    ok = ["trainer.init_from=/runs/a/best.pt", "trainer.init_from_ema=true"]
    validate_train_config(_job(_compose(ok)))
