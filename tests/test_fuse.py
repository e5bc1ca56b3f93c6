"""Each kernel identity of xvol.ops.fuse, checked alone against the modules it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from torch import nn

from xvol.ops import fuse
from xvol.ops.xconv import XConv2d, pssa_transform

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64  # the identities are exact; float64 leaves no room for tolerance games


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), f"max|diff| = {diff:.3e}"


# ---------------------------------------------------------------------------------------- fuse_bn


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_fuse_bn_matches_conv_then_eval_bn(
    conv_bias: bool, affine: bool, groups: int, generator: torch.Generator
) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=conv_bias).to(DTYPE)
    bn = nn.BatchNorm2d(6, eps=1e-3, affine=affine).to(DTYPE)
    randomize_bn(bn, generator)
    with torch.no_grad():
        bn.running_mean.add_(3.0)  # a large mean makes a dropped (b - mean) term obvious
    reference = nn.Sequential(conv, bn).eval()
    w, b = fuse.fuse_bn(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
    )
    x = torch.randn(2, 4, 5, 7, generator=generator, dtype=DTYPE)
    _assert_close(F.conv2d(x, w, b, padding=1, groups=groups), reference(x))
    assert w.shape == conv.weight.shape and b.shape == (6,)


def test_fuse_bn_uses_eps(generator: torch.Generator) -> None:
    """A tiny running variance makes eps matter: folding must add the BN's own eps."""
    w = torch.randn(3, 2, 1, 1, generator=generator, dtype=DTYPE)
    mean, var = torch.zeros(3, dtype=DTYPE), torch.full((3,), 1e-4, dtype=DTYPE)
    w_small, _ = fuse.fuse_bn(w, None, mean, var, None, None, 1e-5)
    w_big, _ = fuse.fuse_bn(w, None, mean, var, None, None, 1e-1)
    _assert_close(w_small, w / (1e-4 + 1e-5) ** 0.5)
    _assert_close(w_big, w / (1e-4 + 1e-1) ** 0.5)


# ----------------------------------------------------------------------------------- embed_center


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_embed_center_equals_1x1_conv(
    kernel_size: int, dilation: int, stride: int, generator: torch.Generator
) -> None:
    w1 = torch.randn(5, 3, 1, 1, generator=generator, dtype=DTYPE)
    x = torch.randn(2, 3, 9, 8, generator=generator, dtype=DTYPE)
    wk = fuse.embed_center(w1, kernel_size)
    assert wk.shape == (5, 3, kernel_size, kernel_size)
    assert wk.abs().sum() == w1.abs().sum()  # nothing but the centre tap is non-zero
    padding = dilation * (kernel_size - 1) // 2
    _assert_close(
        F.conv2d(x, wk, None, stride, padding, dilation),
        F.conv2d(x, w1, None, stride, 0, 1),
    )


def test_embed_center_errors() -> None:
    with pytest.raises(ValueError, match=r"1x1 kernel, got 3x3"):
        fuse.embed_center(torch.zeros(2, 2, 3, 3), 5)
    with pytest.raises(ValueError, match=r"odd kernel size, got 4"):
        fuse.embed_center(torch.zeros(2, 2, 1, 1), 4)
    with pytest.raises(ValueError, match=r"odd kernel size, got 0"):
        fuse.embed_center(torch.zeros(2, 2, 1, 1), 0)


# ------------------------------------------------------------------------------ interleave_groups


def test_interleave_groups_layout() -> None:
    a = torch.arange(4).reshape(1, 4)  # groups of 2: [0 1] [2 3]
    b = torch.arange(10, 16).reshape(1, 6)  # groups of 3: [10 11 12] [13 14 15]
    out = fuse.interleave_groups([a, b], 2)
    assert out.tolist() == [[0, 1, 10, 11, 12, 2, 3, 13, 14, 15]]
    assert torch.equal(fuse.interleave_groups([a, b], 1), torch.cat([a, b], dim=1))
    rows = fuse.interleave_groups([a.T, b.T], 2, dim=0)
    assert rows.flatten().tolist() == out.flatten().tolist()


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_interleave_groups_feeds_grouped_conv(groups: int, generator: torch.Generator) -> None:
    """conv_g(interleave(x1, x2), cat(w1, w2)) = conv_g(x1, w1) + conv_g(x2, w2)."""
    x1 = torch.randn(2, 4, 5, 5, generator=generator, dtype=DTYPE)
    x2 = torch.randn(2, 8, 5, 5, generator=generator, dtype=DTYPE)
    w1 = torch.randn(8, 4 // groups, 3, 3, generator=generator, dtype=DTYPE)
    w2 = torch.randn(8, 8 // groups, 3, 3, generator=generator, dtype=DTYPE)
    x = fuse.interleave_groups([x1, x2], groups)
    w = torch.cat([w1, w2], dim=1)
    expected = F.conv2d(x1, w1, groups=groups) + F.conv2d(x2, w2, groups=groups)
    _assert_close(F.conv2d(x, w, groups=groups), expected)


def test_interleave_groups_errors() -> None:
    with pytest.raises(
        ValueError, match=r"groups=2 must divide every size along dim 1, got \[5, 4\]"
    ):
        fuse.interleave_groups([torch.zeros(1, 5), torch.zeros(1, 4)], 2)
    with pytest.raises(ValueError, match=r"groups=3 must divide .* got \[4\]"):
        fuse.interleave_groups([torch.zeros(1, 4)], 3)
    with pytest.raises(ValueError, match="at least one tensor"):
        fuse.interleave_groups([], 1)


# ---------------------------------------------------------------------------- transformed_kernel


@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding", "dilation", "groups", "shifts", "center"),
    [
        (3, 1, 1, 1, 1, (1,), False),
        (3, 2, 1, 1, 2, (1, 2), True),
        (5, 1, 4, 2, 4, (1,), False),  # depthwise, dilated
        (5, 2, 1, 1, 1, (2,), True),  # padding below the default: the read shifts right
        (3, 1, 3, 1, 2, (1,), False),  # padding above the default: the read shifts left
        (1, 2, 0, 1, 4, (1, 3), False),
        (1, 1, 0, 1, 1, (), True),  # the x * x tap alone
    ],
)
def test_transformed_kernel_single_conv_equals_deploy(
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    shifts: tuple[int, ...],
    center: bool,
    generator: torch.Generator,
) -> None:
    """One F.conv2d over X~ = interleave_groups([x, T]) with K reproduces the deploy operator."""
    xconv = XConv2d(
        4, 8, kernel_size, stride, padding, dilation, groups, shifts=shifts, center=center
    )
    xconv = randomize_bn(xconv.to(DTYPE), generator).eval()
    deploy = xconv.reparameterize()
    x = torch.randn(3, 4, 7, 9, generator=generator, dtype=DTYPE)

    t_full = pssa_transform(x, xconv.taps)  # T on the whole input grid
    x_tilde = fuse.interleave_groups([x, t_full], groups)
    k = fuse.transformed_kernel(deploy.weight, deploy.pssa_weight)
    assert k.shape == (8, (4 // groups) * (1 + len(xconv.taps)), kernel_size, kernel_size)
    assert torch.equal(k, deploy.transformed_kernel())
    y = F.conv2d(x_tilde, k, deploy.bias, stride, padding, dilation, groups)
    _assert_close(y, deploy(x))
    _assert_close(y, xconv(x))


def test_transformed_kernel_errors() -> None:
    with pytest.raises(ValueError, match="1x1 kernel"):
        fuse.transformed_kernel(torch.zeros(4, 2, 3, 3), torch.zeros(4, 16, 3, 3))
    with pytest.raises(RuntimeError):  # output channels disagree
        fuse.transformed_kernel(torch.zeros(4, 2, 3, 3), torch.zeros(5, 16, 1, 1))
