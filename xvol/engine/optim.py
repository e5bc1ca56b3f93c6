"""Optimizer and LR schedule from timm factories, stepped per optimizer update.

The configs give partials of ``timm.optim.create_optimizer_v2`` (parameter groups: with
``filter_bias_and_bn`` every 1-d parameter, i.e. BN/bias, gets no weight decay; ``sgd`` is SGD
with Nesterov momentum) and ``timm.scheduler.create_scheduler_v2``. Stepping per update instead
of per epoch makes warmup smooth and lets a mid-epoch resume land on the exact same LR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = ["build_optimizer", "build_scheduler", "updates_per_epoch", "describe_param_groups"]


def build_optimizer(factory: Callable[..., Optimizer], model: nn.Module) -> Optimizer:
    """``factory(model)``: a timm create_optimizer_v2 partial builds its own parameter groups."""
    return factory(model)


def updates_per_epoch(steps_per_epoch: int, grad_accum: int) -> int:
    """Optimizer updates in one epoch; a last partial accumulation still makes an update."""
    return math.ceil(steps_per_epoch / max(1, grad_accum))


def build_scheduler(
    factory: Callable[..., Any] | None, optimizer: Optimizer, n_updates: int
) -> Any:
    """A timm scheduler counting optimizer updates (``scheduler.step_update(global_step)``).

    ``factory`` is a create_scheduler_v2 partial (None: constant LR). It returns
    (scheduler, num_epochs); the epoch count is the trainer's, so it is dropped here.
    """
    if factory is None:
        return None
    out = factory(optimizer, step_on_epochs=False, updates_per_epoch=n_updates)
    return out[0] if isinstance(out, tuple) else out


def describe_param_groups(optimizer: Optimizer) -> str:
    """One line per group (tensors, elements, lr, weight decay), for the run log."""
    lines = []
    for i, group in enumerate(optimizer.param_groups):
        n = sum(p.numel() for p in group["params"])
        lines.append(
            f"group {i}: {len(group['params'])} tensors, {n:,} params, "
            f"lr {group['lr']:.4g}, weight_decay {group.get('weight_decay', 0.0):g}"
        )
    return "; ".join(lines)
