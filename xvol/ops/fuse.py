"""Kernel algebra for re-parameterization, as pure tensor -> tensor functions.

Each identity is tested on its own (tests/test_fuse.py); the modules in xconv.py only compose
them. Conventions follow nn.Conv2d: weights are ``out x in/groups x kh x kw``, biases ``out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "fuse_bn",
    "embed_center",
    "add_branches",
    "interleave_groups",
    "transformed_kernel",
]


def fuse_bn(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a convolution into the convolution.

    BN(conv(x) + b) = conv(x; W * s) + (b - mean) * s + beta,  s = gamma / sqrt(var + eps).
    """
    std = torch.sqrt(running_var + eps)
    scale = (gamma if gamma is not None else torch.ones_like(std)) / std
    shift = beta if beta is not None else torch.zeros_like(std)
    b = bias if bias is not None else torch.zeros_like(running_mean)
    fused_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    fused_b = (b - running_mean) * scale + shift
    return fused_w, fused_b


def embed_center(weight: Tensor, kernel_size: int) -> Tensor:
    """Place a 1x1 kernel on the centre tap of a ``kernel_size`` x ``kernel_size`` kernel."""
    kh, kw = weight.shape[-2:]
    if (kh, kw) != (1, 1):
        raise ValueError(f"embed_center expects a 1x1 kernel, got {kh}x{kw}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"embed_center needs an odd kernel size, got {kernel_size}")
    p = kernel_size // 2
    return F.pad(weight, (p, p, p, p))


def add_branches(*branches: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Sum parallel (weight, bias) branches of equal kernel shape into one."""
    if not branches:
        raise ValueError("add_branches needs at least one branch")
    shapes = {tuple(w.shape) for w, _ in branches}
    if len(shapes) != 1:
        raise ValueError(f"branches must share one kernel shape to be added, got {sorted(shapes)}")
    weight = torch.stack([w for w, _ in branches]).sum(0)
    bias = torch.stack([b for _, b in branches]).sum(0)
    return weight, bias


def interleave_groups(parts: list[Tensor], groups: int, dim: int = 1) -> Tensor:
    """Concatenate tensors along ``dim`` group by group.

    A grouped convolution reads contiguous channel chunks, so concatenating two grouped inputs
    (or kernels) must keep each group's channels together: [a_g0, b_g0, a_g1, b_g1, ...].
    """
    if not parts:
        raise ValueError("interleave_groups needs at least one tensor")
    sizes = [p.shape[dim] for p in parts]
    if groups < 1 or any(s % groups for s in sizes):
        raise ValueError(f"groups={groups} must divide every size along dim {dim}, got {sizes}")
    chunks = [p.chunk(groups, dim=dim) for p in parts]
    return torch.cat([c[g] for g in range(groups) for c in chunks], dim=dim)


def transformed_kernel(conv_weight: Tensor, pssa_weight: Tensor) -> Tensor:
    """The single kernel K of X-volution over the transformed input X~ = concat(x, T).

    K = [W_c (k x k) | W_A placed on the centre tap]. A kernel's input dim is already per group,
    so K is a plain concatenation; the input is the one interleaved per group:
    ``F.conv2d(interleave_groups([x, T_full], groups), K, b, stride, padding, dilation, groups)``
    equals the deploy operator. This is the "one operator" of the paper, written out; the deploy
    module computes the same sum without multiplying the zero taps.
    """
    k = conv_weight.shape[-1]
    return torch.cat([conv_weight, embed_center(pssa_weight, k)], dim=1)
