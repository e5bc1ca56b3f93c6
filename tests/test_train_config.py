"""Config composition of scripts/train.py: every option of the groups and every experiment
composes and instantiates; an override typo fails with Hydra's own message."""

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

import xvol  # noqa: F401  (registers ${xvol_run_id:})
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


def _resolve(cfg) -> dict:
    """The job config fully resolved (the hydra node has runtime-only fields; it is not)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra")
    return OmegaConf.to_container(OmegaConf.create(plain), resolve=True, throw_on_missing=True)


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
