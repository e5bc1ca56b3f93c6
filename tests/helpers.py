"""Shared test helpers (import as ``from helpers import randomize_bn``; tests/ is on sys.path)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ROOT",
    "TRAIN",
    "assert_same_forward_backward",
    "one_error_line",
    "randomize_bn",
    "run_command",
    "subprocess_env",
]

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a command a test runs: one thread per process (2 shared cores),
    wandb offline and quiet, unbuffered output."""
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        **extra,
    )


def run_command(argv: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``argv`` from the repository root with :func:`subprocess_env`; ``proc.output`` is
    stdout + stderr."""
    proc = subprocess.run(
        list(argv), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


def assert_same_forward_backward(
    ref: nn.Module, other: nn.Module, x: torch.Tensor, rtol: float, atol: float
) -> None:
    """``other`` computes what ``ref`` does on ``x``: output, input gradient, parameter
    gradients and buffers after the step (BN running statistics) agree within the tolerances."""
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [m(xi) for m, xi in zip((ref, other), xs)]
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    grad_out = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad_out)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=rtol, atol=atol)
    for (name, a), (_, b) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol, msg=name)
    for (name, a), (_, b) in zip(ref.named_buffers(), other.named_buffers()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)


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
