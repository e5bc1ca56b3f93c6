"""Kernel algebra for re-parameterization, as pure tensor -> tensor functions.

Each identity is tested on its own (tests/test_fuse.py); the modules in xconv.py only compose
them. Conventions follow nn.Conv2d: weights are ``out x in/groups x kh x kw``, biases ``out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "fuse_bn",
    "embed_center",
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
    PyTorch's own ``fuse_conv_bn_weights`` (argument order of this signature kept for callers),
    returned as plain tensors.
    """
    w, b = fuse_conv_bn_weights(weight, bias, running_mean, running_var, eps, gamma, beta)
    return w.detach(), b.detach()


def embed_center(weight: Tensor, kernel_size: int) -> Tensor:
    """Place a 1x1 kernel on the centre tap of a ``kernel_size`` x ``kernel_size`` kernel."""
    kh, kw = weight.shape[-2:]
    if (kh, kw) != (1, 1):
        raise ValueError(f"embed_center expects a 1x1 kernel, got {kh}x{kw}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"embed_center needs an odd kernel size, got {kernel_size}")
    p = kernel_size // 2
    return F.pad(weight, (p, p, p, p))


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
    equals the deploy operator (tests/test_fuse.py checks it). This is the paper's "one
    operator" written out as math; ``XConv2dDeploy`` computes the same sum as
    ``Conv_kxk(x; W) + Conv1x1(T; W_A) + b`` (or one fused Triton kernel) without forming
    concat(x, T) or multiplying K's zero taps.
    """
    k = conv_weight.shape[-1]
    return torch.cat([conv_weight, embed_center(pssa_weight, k)], dim=1)
