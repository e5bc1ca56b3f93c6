"""X-volution: convolution + pixel-shift self-attention (PSSA), and its single deploy operator.

Training form (a drop-in for ``nn.Conv2d``)::

    y = BN_c(Conv_kxk(x; W_c)) + BN_A(PSSA(x; W_A))
    PSSA(x) = Conv1x1(T; W_A),   T = concat_{L in shifts, d in D_L} x * S_d(x)

S_d shifts the map by d = (iL, jL), i, j in {-1, 0, 1} minus (0, 0), zero outside the image. The
1x1 convolution shares the slot's stride and groups and reads T at the centre of each kxk window
(position p*s + dilation*(k-1)/2 - padding). ``center=True`` adds the x * x tap.

Deploy form (``XConv2d.fuse()``, timm's protocol; ``reparameterize()`` is the same): each BN
folded into its branch, one module holding (W_c', W_A', b) and computing
``Conv_kxk(x; W_c') + Conv1x1(T; W_A') + b``: a convolution whose kernel at each pixel is a
static part plus a content-dependent part, or equivalently one convolution over concat(x, T)
(``fuse.transformed_kernel``). With no PSSA taps it is nn.Conv2d.

This file is the readable ground truth (``impl="reference"``). The tap layout, read positions
and padding live in ``geometry``; which backend computes a call is decided in ``dispatch``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn

from xvol.ops import dispatch, fuse
from xvol.ops.geometry import PSSAGeometry, conv_out_size, padded_reader, pssa_offset, pssa_offsets

__all__ = ["XConv2d", "XConv2dDeploy", "pssa_offsets", "pssa_transform", "conv_out_size"]

_Pair = int | tuple[int, int]


def _single(value: _Pair, name: str) -> int:
    """X-volution is defined for square kernels/strides; accept nn.Conv2d's int-or-pair style."""
    if isinstance(value, int):
        return value
    a, b = value
    if a != b:
        raise ValueError(f"XConv2d supports equal {name} on both axes, got {tuple(value)}")
    return int(a)


def pssa_transform(
    x: Tensor,
    taps: Sequence[tuple[int, int]],
    stride: int = 1,
    offset: int = 0,
    out_size: tuple[int, int] | None = None,
) -> Tensor:
    """T = x * S_d(x) for every tap d, read at positions p * stride + offset (zero outside).

    Returns N x (C * n_taps) x Ho x Wo, channel-major. Only the read positions are multiplied,
    so a strided slot costs stride^2 less than forming T on the full grid.
    """
    n, c, h, w = x.shape
    ho, wo = out_size if out_size is not None else (h, w)
    _, read = padded_reader(x, PSSAGeometry(tuple(taps), stride, offset, (ho, wo), 1))
    centre = read(0, 0)
    products = torch.stack([centre * read(di, dj) for di, dj in taps], dim=2)
    return products.reshape(n, c * len(taps), ho, wo)


class _XConvBase(nn.Module):
    """Geometry and input checks shared by the training and deploy forms."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Pair,
        stride: _Pair = 1,
        padding: _Pair = 0,
        dilation: _Pair = 1,
        groups: int = 1,
        shifts: Sequence[int] = (1,),
        center: bool = False,
    ) -> None:
        super().__init__()
        k = _single(kernel_size, "kernel_size")
        if k < 1 or k % 2 == 0:
            raise ValueError(f"XConv2d needs an odd kernel_size (1, 3, 5, 7, ...), got {k}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        shifts = tuple(shifts)
        bad = [s for s in shifts if isinstance(s, bool) or int(s) != s or s <= 0]
        if bad:
            raise ValueError(
                f"shifts must be positive integer pixel distances, got {shifts} (bad: {bad})"
            )
        shifts = tuple(int(s) for s in shifts)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (k, k)
        self.stride = (_single(stride, "stride"),) * 2
        self.dilation = (_single(dilation, "dilation"),) * 2
        if isinstance(padding, str):  # nn.Conv2d's "valid" / "same" (odd kernels: symmetric)
            if padding == "valid":
                padding = 0
            elif padding == "same" and self.stride[0] == 1:
                padding = self.dilation[0] * (k - 1) // 2
            else:
                raise ValueError(
                    f"padding={padding!r}: use an int, 'valid', or 'same' (stride 1 only, as in "
                    f"nn.Conv2d); got stride {self.stride[0]}"
                )
        self.padding = (_single(padding, "padding"),) * 2
        self.groups = groups
        self.shifts = shifts
        self.center = bool(center)
        self.taps: tuple[tuple[int, int], ...] = tuple(pssa_offsets(shifts, center))

    @property
    def pssa_offset(self) -> int:
        """Where the 1x1 PSSA read sits relative to p * stride: the kxk window's centre."""
        return pssa_offset(self.kernel_size[0], self.padding[0], self.dilation[0])

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} expects a 4-D input N x {self.in_channels} x H x W, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, "
                f"got {x.shape[1]} (input shape {tuple(x.shape)})"
            )

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        k, s, p, d = self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]
        return conv_out_size(h, k, s, p, d), conv_out_size(w, k, s, p, d)

    def transform(self, x: Tensor) -> Tensor:
        """T read on the output grid of this slot."""
        return pssa_transform(
            x, self.taps, self.stride[0], self.pssa_offset, self.out_size(*x.shape[-2:])
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, shifts={self.shifts}, center={self.center}"
        )


# Leaf modules for FX (timm's feature extraction): input checks and impl dispatch are Python.
@register_notrace_module
class XConv2d(_XConvBase):
    """Training form of X-volution: conv + BN and PSSA + BN, summed. Drop-in for nn.Conv2d.

    ``bias`` is accepted for signature compatibility; BN makes it redundant but it is kept and
    folded exactly. Call ``reparameterize()`` in eval mode to get the single deploy operator.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Pair,
        stride: _Pair = 1,
        padding: _Pair = 0,
        dilation: _Pair = 1,
        groups: int = 1,
        bias: bool = False,
        shifts: Sequence[int] = (1,),
        center: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        impl: str = "auto",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            shifts,
            center,
        )
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            groups,
            bias=bias,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        # PSSA path: "reference" (below, the ground truth) or another backend (dispatch.py).
        self.impl = dispatch.check_impl(impl)
        if self.taps:
            n_taps = len(self.taps)
            self.pssa = nn.Conv2d(in_channels * n_taps, out_channels, 1, groups=groups, bias=False)
            self.pssa_bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        else:
            self.pssa = None
            self.pssa_bn = None

    def zero_init_bn(self) -> None:
        """Zero both BN gammas so a residual block starts as identity (timm's zero_init_last)."""
        nn.init.zeros_(self.bn.weight)
        if self.pssa_bn is not None:
            nn.init.zeros_(self.pssa_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        y = self.bn(self.conv(x))
        if self.pssa is not None:
            grad = dispatch.needs_grad(x, self.pssa.weight)
            impl = dispatch.resolve_impl(self.impl, self, x, grad)
            if impl == "reference":
                y = y + self.pssa_bn(self.pssa(self.transform(x)))
            else:
                y = y + dispatch.train_pssa_bn(self, x, impl)
        return y

    @torch.no_grad()
    def fused_weights(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """(W_c', W_A' or None, b) with both BNs folded (running statistics)."""
        w_c, b = fuse.fuse_bn(
            self.conv.weight,
            self.conv.bias,
            self.bn.running_mean,
            self.bn.running_var,
            self.bn.weight,
            self.bn.bias,
            self.bn.eps,
        )
        w_a = None
        if self.pssa is not None:
            w_a, b_a = fuse.fuse_bn(
                self.pssa.weight,
                None,
                self.pssa_bn.running_mean,
                self.pssa_bn.running_var,
                self.pssa_bn.weight,
                self.pssa_bn.bias,
                self.pssa_bn.eps,
            )
            b = b + b_a
        return w_c, w_a, b

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The deploy operator (BN folded, one module, in eval mode); ``self`` is left untouched.

        timm's re-parameterization protocol: ``timm.utils.reparameterize_model`` (what timm's
        validate.py / benchmark.py ``--reparam`` call) replaces every child that has ``fuse()``
        with its result. BN is folded with its running statistics, what eval mode computes
        with, in either mode (timm's validate.py re-parameterizes before ``model.eval()``).
        """
        w_c, w_a, b = self.fused_weights()
        if w_a is None:
            conv = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                bias=True,
            )
        else:
            conv = XConv2dDeploy(
                self.in_channels,
                self.out_channels,
                self.kernel_size[0],
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.shifts,
                self.center,
                impl=self.impl,
            )
        conv = conv.to(device=w_c.device, dtype=w_c.dtype)
        if w_a is not None:
            conv.pssa_weight.copy_(w_a)
        conv.weight.copy_(w_c)
        conv.bias.copy_(b)
        return conv.eval()

    def reparameterize(self) -> nn.Module:
        """xvol's name for ``fuse()`` (returns the deploy module; ``self`` is untouched)."""
        return self.fuse()


@register_notrace_module
class XConv2dDeploy(_XConvBase):
    """Deploy form of X-volution: one operator, y = Conv_kxk(x; W) + Conv1x1(T; W_A) + b.

    Per output channel o: y_o(p) = sum_{c,t} [W(o,c,t) + W_A(o,c,t) x_c(p)] x_c(p + t) + b_o,
    a convolution with a static and a content-dependent kernel. No BN, no branches.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Pair,
        stride: _Pair = 1,
        padding: _Pair = 0,
        dilation: _Pair = 1,
        groups: int = 1,
        shifts: Sequence[int] = (1,),
        center: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            shifts,
            center,
        )
        if not self.taps:
            raise ValueError(
                "XConv2dDeploy needs PSSA taps; with none the deploy form is nn.Conv2d"
            )
        k = self.kernel_size[0]
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, k, k))
        self.pssa_weight = nn.Parameter(
            torch.zeros(out_channels, in_channels // groups * len(self.taps), 1, 1)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.impl = dispatch.check_impl(impl)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        grad = dispatch.needs_grad(x, self.weight, self.pssa_weight, self.bias)
        impl = dispatch.resolve_impl(self.impl, self, x, grad)

        def conv() -> Tensor:
            return F.conv2d(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )

        if impl == "reference":
            pssa = F.conv2d(self.transform(x), self.pssa_weight, None, 1, 0, 1, self.groups)
            return conv() + pssa
        return dispatch.deploy_pssa(self, x, impl, conv)

    @torch.no_grad()
    def transformed_kernel(self) -> Tensor:
        """K over X~ = concat(x, T) per group (see ``fuse.transformed_kernel``)."""
        return fuse.transformed_kernel(self.weight, self.pssa_weight)

    def fuse(self) -> nn.Module:
        """Already in deploy form: a copy, so fusing is idempotent (timm's protocol)."""
        return copy.deepcopy(self).eval()

    def reparameterize(self) -> nn.Module:
        """xvol's name for ``fuse()``."""
        return self.fuse()
