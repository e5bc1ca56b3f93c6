"""Parameter and MAC counts of a model's training and deploy forms, from torch's FLOP counter.

What is counted (``torch.utils.flop_counter.FlopCounterMode``, one image, eval mode):

- ``gmacs``: convolutions and matmuls (the classifier) only, FLOPs / 2. FlopCounterMode has no
  formula for elementwise ops, so BN, ReLU, residual adds, pooling and the PSSA products
  x * S_d(x) are *not* in it; the PSSA 1x1 convolution over T is.
- ``gmuls``: elementwise multiplications (``aten.mul``), counted through the same mode with a
  custom formula (one per output element). In plain ResNets the only ones are the PSSA products,
  so baselines show 0; SE and ECA gates (seresnet, ecaresnet, regnety) are multiplications too.

The deploy form is ``xvol.reparam.reparameterize_model(model)``: X-volution slots become one
operator (BN folded); the ResNet's other BNs are not folded, as in the deploy skeleton.
Runs on any device, including ``meta`` (shapes only, no compute), which gives the same counts.
"""

from __future__ import annotations

import copy
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from xvol.reparam import reparameterize_model

__all__ = ["count_params", "count_ops", "model_summary"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mul_count(*args: Any, out_shape: tuple[int, ...], **kwargs: Any) -> int:
    """One multiplication per output element (FlopCounterMode passes shapes, not tensors)."""
    return prod(out_shape)


@torch.no_grad()
def count_ops(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> dict[str, int]:
    """{"macs": conv + matmul MACs, "muls": elementwise products} for one image, eval mode."""
    model = copy.deepcopy(model).eval()
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.mul: _mul_count})
    with counter:
        model(x)
    counts = counter.get_flop_counts()["Global"]
    muls = sum(n for op, n in counts.items() if op is torch.ops.aten.mul)
    flops = sum(n for op, n in counts.items() if op is not torch.ops.aten.mul)
    return {"macs": flops // 2, "muls": muls}


def model_summary(
    model: nn.Module, img_size: int = 224, deploy: nn.Module | None = None
) -> dict[str, float]:
    """Params (M), GMACs and G elementwise muls for the training and the deploy form.

    ``deploy``: the deploy model when the caller already has it (default: re-parameterize).
    """
    if deploy is None:
        deploy = reparameterize_model(model)
    out: dict[str, float] = {}
    for form, m in (("train", model), ("deploy", deploy)):
        ops = count_ops(m, img_size)
        out[f"params_m_{form}"] = count_params(m) / 1e6
        out[f"gmacs_{form}"] = ops["macs"] / 1e9
        out[f"gmuls_{form}"] = ops["muls"] / 1e9
    return out
