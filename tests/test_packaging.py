"""The built wheel works on its own: console commands, configs as package data.

The wheel is built from this checkout and installed with ``pip --target`` into an empty folder;
the commands run from another empty folder with only that folder on PYTHONPATH, so neither the
source tree nor the editable install can stand in for what the wheel lacks.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tools_helpers import ROOT, make_checkpoint, make_val_folder, model_config


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_setup_cfg_lists_every_package_of_the_source_tree() -> None:
    """setup.cfg names its packages (find: cannot map configs/ into xvol): none may be missing."""
    listed = set(_setup_cfg()["options"]["packages"].split())
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "xvol").rglob("__init__.py")
    }
    assert on_disk | {"xvol.configs"} == listed


def test_console_scripts_point_at_package_mains() -> None:
    import importlib

    scripts = _setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
    assert len(scripts) == 6
    for line in scripts:
        name, target = (s.strip() for s in line.split("="))
        module, func = target.split(":")
        assert module.startswith("xvol.cli.") and func == "main", line
        assert callable(getattr(importlib.import_module(module), func)), line


def test_launchers_in_scripts_and_tools_are_thin() -> None:
    """scripts/train.py and tools/*.py only import and call their xvol.cli module's main."""
    for path in [ROOT / "scripts" / "train.py", ROOT / "scripts" / "model_summary.py",
                 *sorted((ROOT / "tools").glob("*.py"))]:  # fmt: skip
        code = [ln for ln in path.read_text().split('"""')[2].splitlines() if ln.strip()]
        assert len(code) <= 4 and any("from xvol.cli." in ln for ln in code), path


# On PYTHONPATH beside the installed wheel: drops the finder of an editable install of this
# checkout (setuptools appends it to sys.meta_path), which would otherwise supply any module the
# wheel lacks. site runs sitecustomize after the .pth files that install that finder.
_NO_EDITABLE = """
import sys

sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wheel")
    dist, target, shim = base / "dist", base / "site", base / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_NO_EDITABLE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("xvol-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    cwd = base / "elsewhere"
    cwd.mkdir()
    return {"target": target, "cwd": cwd, "base": base, "shim": shim}


def _run(installed: dict[str, Path], *argv: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(installed["target"]), str(installed["shim"])])
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled"}
    return subprocess.run(
        list(argv), cwd=installed["cwd"], env=env, capture_output=True, text=True, timeout=300
    )


_IMPORT_ALL = """
import importlib, pkgutil, xvol, xvol.cli

print(xvol.cli.config_dir())
for info in pkgutil.walk_packages(xvol.__path__, "xvol."):
    print(importlib.import_module(info.name).__file__)
"""


@pytest.mark.slow
def test_wheel_holds_every_module_and_the_configs(installed) -> None:
    """Every module of the source tree imports from the installed wheel, and nothing else."""
    proc = _run(installed, sys.executable, "-c", _IMPORT_ALL)
    assert proc.returncode == 0, proc.stderr
    config_dir, *module_files = proc.stdout.split()
    target = str(installed["target"])
    assert config_dir.startswith(target), config_dir
    assert (Path(config_dir) / "model" / "xresnet50.yaml").is_file()
    assert all(f.startswith(target) for f in module_files), module_files
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "xvol").rglob("*.py")}
    installed_files = {Path(f).relative_to(target).as_posix() for f in module_files}
    assert in_tree - {"xvol/__init__.py"} <= installed_files


@pytest.mark.slow
def test_wheel_xvol_train_composes_its_config_from_anywhere(installed) -> None:
    bin_dir = installed["target"] / "bin"
    proc = _run(installed, str(bin_dir / "xvol-train"), "--cfg", "job", "model=xresnet50",
                "optim.lr=0.2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "arch: resnet50" in proc.stdout and "lr: 0.2" in proc.stdout
    assert "_target_: xvol.ops.XConv2d" in proc.stdout


@pytest.mark.slow
def test_wheel_xvol_reparam_help(installed) -> None:
    proc = _run(installed, str(installed["target"] / "bin" / "xvol-reparam"), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: xvol-reparam") and "examples:" in proc.stdout


@pytest.mark.slow
def test_wheel_xvol_eval_scores_a_tiny_checkpoint(installed) -> None:
    base = installed["base"]
    data = make_val_folder(base / "data", num_classes=3, per_class=2, size=32)
    ckpt = make_checkpoint(base / "tiny.pt", model_config("resnet18", xvolution=True))
    proc = _run(installed, str(installed["target"] / "bin" / "xvol-eval"), str(ckpt),
                "--data", str(data), "--device", "cpu", "--workers", "0", "--batch-size", "3",
                "--bench-iters", "0", "--results-dir", "results", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("top-1 ") and "images 6" in proc.stdout
    (record,) = (installed["cwd"] / "results").glob("*.json")  # relative to the working dir
    assert record.name.startswith("xresnet18_train_ema_")
