"""Core xvol works without its extras; a missing extra is one line naming it.

The optional modules are hidden from a fresh interpreter as if they were not installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ["wandb", "onnx", "onnxruntime", "onnxscript", "mlxtend", "matplotlib", "submitit",
          "hydra_plugins", "nvidia"]  # fmt: skip

# A None entry in sys.modules makes `import name` raise ModuleNotFoundError and
# importlib.util.find_spec(name) return None: exactly what an uninstalled package looks like.
_HIDE = textwrap.dedent(
    """
    import sys

    for name in {hidden!r}:
        sys.modules[name] = None
    """
)


def _run(code: str, hidden: list[str]) -> subprocess.CompletedProcess:
    script = _HIDE.format(hidden=hidden) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_import_xvol_ops_needs_no_extras_and_no_omegaconf() -> None:
    proc = _run(
        """
        import torch
        import xvol.ops
        from xvol.ops import XConv2d
        m = XConv2d(4, 4, 3, padding=1)
        y = m(torch.randn(1, 4, 6, 6))
        y.sum().backward()
        d = m.eval().fuse()
        torch.testing.assert_close(d(torch.ones(1, 4, 6, 6)), m(torch.ones(1, 4, 6, 6)))
        import timm
        timm.create_model("xresnet18", num_classes=3)  # the registry needs no extra either
        heavy = ("omegaconf", "hydra", "wandb", "onnx", "matplotlib")
        loaded = [m for m in heavy if sys.modules.get(m) is not None]
        assert not loaded, loaded
        print("ok")
        """,
        [*EXTRAS, "omegaconf", "hydra"],
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow
def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    proc = _run(
        f"""
        sys.argv = ["train.py", "model=resnet18", "data=synthetic", "data.num_classes=2",
                    "data.img_size=16", "data.batch_size=2", "data.length=4",
                    "trainer.epochs=1", "trainer.device=cpu", "logger=wandb",
                    "paths.output_dir={tmp_path}", "run_name=extras"]
        sys.path.insert(0, "scripts")
        import runpy
        runpy.run_path("scripts/train.py", run_name="__main__")
        """,
        ["wandb"],
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "xvol[wandb]" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"logger=wandb .*needs wandb: pip install 'xvol\[wandb\]'", errors[0])


def test_extras_in_setup_cfg_match_the_dockerfile_and_torch() -> None:
    """One DALI build everywhere: the extra, the Dockerfile and the supported torch's CUDA."""
    cfg = (ROOT / "setup.cfg").read_text()
    docker = (ROOT / "Dockerfile").read_text()
    extra = re.search(r"^dali =\n\s+(nvidia-dali-cuda\d+)", cfg, re.M)
    image = re.search(r"(nvidia-dali-cuda\d+)==", docker)
    assert extra and image and extra.group(1) == image.group(1)
    for name in ("wandb", "onnx", "slurm", "demo", "plot", "all", "dali"):
        assert re.search(rf"^{name} =", cfg, re.M), name
    core = cfg.split("install_requires =")[1].split("\n\n")[0]
    for heavy in ("wandb", "onnx", "mlxtend", "matplotlib", "submitit", "dali"):
        assert heavy not in core, f"{heavy} must be an extra, not a core dependency"


@pytest.mark.slow
def test_tools_name_their_missing_extra(tmp_path: Path) -> None:
    """xvol-export without onnx: one line naming the extra, nothing written (the leaderboard
    without matplotlib: tests/test_eval.py)."""
    export = _run(
        f"""
        sys.argv = ["xvol-export", "missing.pt", "--out", "{tmp_path / "m.onnx"}"]
        sys.path.insert(0, "tools")
        import runpy
        runpy.run_path("tools/export.py", run_name="__main__")
        """,
        ["onnx", "onnxruntime", "onnxscript"],
    )
    assert export.returncode == 1 and not (tmp_path / "m.onnx").exists()
    assert (
        export.stderr.strip()
        .splitlines()[-1]
        .startswith("xvol-export: error: xvol-export needs onnx: pip install 'xvol[onnx]'")
    ), export.stderr[-2000:]
