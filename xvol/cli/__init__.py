"""The console commands, one module each with ``main()`` (entry points in setup.cfg).

==================  ======================  =================================
command             module                  launcher in the source tree
==================  ======================  =================================
``xvol-train``      :mod:`xvol.cli.train`   ``scripts/train.py`` (torchrun)
``xvol-reparam``    :mod:`xvol.cli.reparam` ``tools/reparam.py``
``xvol-eval``       :mod:`xvol.cli.eval`    ``tools/eval.py``
``xvol-export``     :mod:`xvol.cli.export`  ``tools/export.py``
``xvol-leaderboard`` :mod:`xvol.cli.leaderboard` ``tools/leaderboard.py``
``xvol-summary``    :mod:`xvol.cli.summary` ``scripts/model_summary.py``
==================  ======================  =================================

The code lives in the package so that a built wheel works on its own; the files in scripts/ and
tools/ are three-line launchers kept where users launch them (``torchrun scripts/train.py``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["config_dir"]

_PACKAGE = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The Hydra config tree: ``xvol/configs`` in an installed wheel (package data), else the
    top-level ``configs/`` of the source checkout this package was imported from."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"xvol: no configs/train.yaml next to {_PACKAGE} (a wheel ships it as xvol/configs; a "
        "source checkout has it at the top level)"
    )
