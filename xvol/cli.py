"""Console entry points (xvol-train, xvol-reparam, ...): thin shims over scripts/ and tools/.

The entry scripts stay where people read and launch them (scripts/train.py under torchrun,
tools/*.py); these shims run them from the source checkout that ``pip install -e .`` points at,
which is how the Makefile and the Dockerfile install xvol.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(relative: str) -> None:
    path = ROOT / relative
    if not path.is_file():
        sys.exit(
            f"xvol: {path} not found. The console entry points run the scripts of a source "
            "checkout: install xvol with `pip install -e .` from a clone of the repository."
        )
    sys.argv[0] = str(path)
    sys.path.insert(0, str(path.parent))
    runpy.run_path(str(path), run_name="__main__")


def train() -> None:
    _run("scripts/train.py")


def reparam() -> None:
    _run("tools/reparam.py")


def evaluate() -> None:
    _run("tools/eval.py")


def leaderboard() -> None:
    _run("tools/leaderboard.py")


def export() -> None:
    _run("tools/export.py")


def summary() -> None:
    _run("scripts/model_summary.py")
