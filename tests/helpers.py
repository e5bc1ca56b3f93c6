"""Shared test helpers (import as ``from helpers import randomize_bn``; tests/ is on sys.path)."""

from __future__ import annotations

import subprocess

import torch
from torch import nn

__all__ = ["randomize_bn", "one_error_line"]


def one_error_line(proc: subprocess.CompletedProcess, last: bool = True) -> str:
    """The one ``error:`` line of a failed ``scripts/train.py`` run (exit 1, no traceback
    anywhere; ``last``: it is also the last line on stderr). ``proc.output``: stdout + stderr."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    if last:
        assert proc.stderr.rstrip().splitlines()[-1] == errors[0], output[-3000:]
    return errors[0]


@torch.no_grad()
def randomize_bn(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm of ``module`` random running stats and affine parameters.

    Default BN init (mean 0, var 1, gamma 1, beta 0) makes folding an identity and hides bugs
    such as a swapped mean/var or a missing eps; every equivalence test calls this first.
    Returns ``module`` for chaining.
    """
    for m in module.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        c = m.num_features
        kw = {"generator": generator, "dtype": torch.float64}

        def draw(lo: float, hi: float, kw: dict = kw, c: int = c) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(c, **kw)

        if m.running_mean is not None:
            m.running_mean.copy_(draw(-1.0, 1.0))
            m.running_var.copy_(draw(0.5, 2.0))
        if m.weight is not None:
            m.weight.copy_(draw(0.5, 1.5) * torch.where(draw(0, 1) < 0.2, -1.0, 1.0))
            m.bias.copy_(draw(-1.0, 1.0))
    return module
