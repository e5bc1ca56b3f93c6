"""PSSA geometry: the one home of the tap layout, read positions and padding.

Every backend (reference transform, lean, gemm, Triton) imports these facts from here:

* taps: for each shift L, the 8 directions (iL, jL) != (0, 0) in row-major order, then (0, 0)
  when ``center`` is set (``pssa_offsets``);
* T is channel-major: channel c, tap t -> T channel c * n_taps + t (so a grouped 1x1 conv sees
  each group's channels with all their taps contiguously);
* output pixel p reads q = p * stride + offset and q + d for each tap d, where offset is the kxk
  window's centre relative to p * stride: dilation * (k - 1) // 2 - padding; zero outside x;
* one zero pad of x covers every read (``PSSAGeometry.padding``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PSSAGeometry",
    "conv_out_size",
    "geometry_of",
    "padded_reader",
    "pssa_offset",
    "pssa_offsets",
    "tap_weights",
]


def pssa_offsets(shifts: Sequence[int], center: bool = False) -> list[tuple[int, int]]:
    """The PSSA taps in order: for each L, the 8 directions (iL, jL) != (0, 0); then (0, 0)."""
    taps = [
        (i * L, j * L) for L in shifts for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)
    ]
    if center:
        taps.append((0, 0))
    return taps


def conv_out_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def pssa_offset(kernel_size: int, padding: int, dilation: int) -> int:
    """Where the 1x1 PSSA read sits relative to p * stride: the kxk window's centre."""
    return dilation * (kernel_size - 1) // 2 - padding


@dataclass(frozen=True)
class PSSAGeometry:
    """Where PSSA reads x: output pixel p reads q = p * stride + offset and q + d for each tap d."""

    taps: tuple[tuple[int, int], ...]
    stride: int
    offset: int
    out_size: tuple[int, int]
    groups: int

    @property
    def n_taps(self) -> int:
        return len(self.taps)

    @property
    def reach(self) -> int:
        return max([max(abs(di), abs(dj)) for di, dj in self.taps], default=0)

    def padding(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom): one zero pad covering every read."""
        ho, wo = self.out_size
        reach = self.reach
        top = left = max(0, reach - self.offset)
        bottom = max(0, (ho - 1) * self.stride + self.offset + reach - (h - 1))
        right = max(0, (wo - 1) * self.stride + self.offset + reach - (w - 1))
        return left, right, top, bottom


def padded_reader(x: Tensor, geom: PSSAGeometry):
    """(xp, read): x zero-padded once for every read of ``geom``, and ``read(di, dj)`` giving the
    strided view of xp at the read positions shifted by (di, dj) (N x C x Ho x Wo).

    ``read`` works on any tensor shaped like xp (a gradient buffer, say): ``read(di, dj, buf)``.
    """
    left, right, top, bottom = geom.padding(*x.shape[-2:])
    xp = F.pad(x, (left, right, top, bottom))
    ho, wo = geom.out_size
    s, off = geom.stride, geom.offset

    def read(di: int, dj: int, buf: Tensor | None = None) -> Tensor:
        src = xp if buf is None else buf
        r0, c0 = top + off + di, left + off + dj
        return src[:, :, r0 : r0 + (ho - 1) * s + 1 : s, c0 : c0 + (wo - 1) * s + 1 : s]

    read.crop = (top, left)  # type: ignore[attr-defined]  # where x sits inside xp
    return xp, read


def tap_weights(weight: Tensor, n_taps: int) -> Tensor:
    """W_A (C_out x C_g*n x 1 x 1, channel-major) -> n x C_out x C_g x 1 x 1, one slice per tap."""
    c_out, cn = weight.shape[:2]
    return weight.reshape(c_out, cn // n_taps, n_taps, 1, 1).permute(2, 0, 1, 3, 4)


def geometry_of(module: nn.Module, x: Tensor) -> PSSAGeometry:
    """The PSSA geometry of an XConv2d / XConv2dDeploy slot for input x."""
    return PSSAGeometry(
        taps=module.taps,  # a tuple of int pairs, built once at construction
        stride=module.stride[0],
        offset=module.pssa_offset,
        out_size=module.out_size(*x.shape[-2:]),
        groups=module.groups,
    )
