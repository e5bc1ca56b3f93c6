"""PSSA as one elementwise pass and ONE GEMM (``impl="gemm"``): the cuBLAS/cuDNN candidate.

The lean path runs PSSA tap by tap: 8m thin GEMMs (K = C each) that each re-read and re-write
the output, plus 8m product maps. Here the products of one shift distance L are formed by a
single broadcast multiply of the centre map with a strided 3x3 view of the padded input (the
window of L-spaced neighbours), written straight into a row-major T of shape
(N*Ho*Wo) x (C * 9m); PSSA is then one GEMM with K = 9mC against W_A scattered into those slots
(zero at the centre slot unless ``center``: 1/9 of the product columns are spent on the centre,
in exchange for one elementwise kernel instead of eight). T lives only inside forward and
backward: autograd saves x and W_A (``PSSALean``/``PSSABatchNormLean``), and backward rebuilds T
for dW_A = gy^T T, then forms dT = gy W and dx from the product rule with one multiply-reduce
(centre factor) and one ``F.fold`` (col2im: the shifted factor, summed where windows overlap).

T costs 9m x |x| at the output grid in the compute dtype (bf16 under autocast) for the length of
one slot's forward or backward: at ResNet-50 stage 3, batch 256, about 230 MB, transient.
Output is channels_last-strided (the GEMM's row-major result), which is what a channels_last
model wants; NCHW callers get the same values through the strides.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from xvol.ops.geometry import PSSAGeometry, padded_reader

__all__ = ["pssa_forward", "pssa_backward", "slot_index"]


def _shifts(geom: PSSAGeometry) -> list[int]:
    """The shift distances of geom's taps, in tap order (one 3x3 slot grid each)."""
    shifts: list[int] = []
    for di, dj in geom.taps:
        L = max(abs(di), abs(dj))
        if L and L not in shifts:
            shifts.append(L)
    return shifts or [0]  # centre-only: one grid, only its centre slot used


@functools.lru_cache(maxsize=256)
def slot_index(geom: PSSAGeometry) -> list[int]:
    """For each tap t of geom, its column slot in the 9m-slot layout of T (per channel)."""
    shifts = _shifts(geom)
    out = []
    for di, dj in geom.taps:
        L = max(abs(di), abs(dj))
        grid = shifts.index(L) if L else 0
        i, j = (di // L + 1, dj // L + 1) if L else (1, 1)
        out.append(grid * 9 + i * 3 + j)
    return out


def _grid_view(xp: Tensor, geom: PSSAGeometry, L: int, top: int, left: int) -> Tensor:
    """N x C x 3 x 3 x Ho x Wo view of xp: x(q + (iL, jL)) for the read positions q."""
    n, c = xp.shape[:2]
    ho, wo = geom.out_size
    s = geom.stride
    sn, sc, sh, sw = xp.stride()
    r0, c0 = top + geom.offset - L, left + geom.offset - L
    return xp.as_strided(
        (n, c, 3, 3, ho, wo),
        (sn, sc, L * sh, L * sw, s * sh, s * sw),
        xp.storage_offset() + r0 * sh + c0 * sw,
    )


def _pad_for_grids(x: Tensor, geom: PSSAGeometry):
    """x padded so that every 3x3 grid view (centre slot included) stays inside xp."""
    ring = PSSAGeometry(
        tuple((i * L, j * L) for L in _shifts(geom) for i in (-1, 0, 1) for j in (-1, 0, 1)),
        geom.stride,
        geom.offset,
        geom.out_size,
        geom.groups,
    )
    return padded_reader(x, ring)


def _products(x: Tensor, geom: PSSAGeometry):
    """(T, xp, read, grids, centre): T is (N, Ho, Wo, C, 9m) contiguous (row-major
    K = c * 9m + slot); xp/read: the padded input and its reader (backward reuses them)."""
    n, c = x.shape[:2]
    ho, wo = geom.out_size
    xp, read = _pad_for_grids(x, geom)
    top, left = read.crop
    centre = read(0, 0)
    shifts = _shifts(geom)
    t = torch.empty((n, ho, wo, c, 9 * len(shifts)), dtype=x.dtype, device=x.device)
    # T[n, h, w, c, g*9 + i*3 + j] viewed as N x C x 3 x 3 x Ho x Wo for each grid g.
    t_view = t.view(n, ho, wo, c, len(shifts), 3, 3).permute(4, 0, 3, 5, 6, 1, 2)
    grids = [_grid_view(xp, geom, L, top, left) for L in shifts]
    for g, grid in enumerate(grids):
        torch.mul(centre[:, :, None, None], grid, out=t_view[g])
    return t, xp, read, grids, centre


def _slot_weight(weight: Tensor, geom: PSSAGeometry, n_slots: int) -> Tensor:
    """W_A (C_out x C_g*n_taps x 1 x 1, channel-major) scattered to C_out x C_g x n_slots."""
    c_out = weight.shape[0]
    cg = weight.shape[1] // geom.n_taps
    w = weight.reshape(c_out, cg, geom.n_taps)
    out = w.new_zeros(c_out, cg, n_slots)
    out[:, :, slot_index(geom)] = w
    return out


def _gemm(t_rows: Tensor, w_slots: Tensor, groups: int) -> Tensor:
    """(M x C*S) @ (C_out x C*S)^T, per group (K = C_g * S contiguous per group)."""
    if groups == 1:
        return t_rows @ w_slots.reshape(w_slots.shape[0], -1).t()
    m = t_rows.shape[0]
    a = t_rows.view(m, groups, -1).transpose(0, 1)  # g x M x K_g
    b = w_slots.reshape(groups, w_slots.shape[0] // groups, -1).transpose(1, 2)  # g x K_g x O_g
    return torch.bmm(a, b).transpose(0, 1).reshape(m, -1)


def pssa_forward(x: Tensor, weight: Tensor, geom: PSSAGeometry) -> Tensor:
    """PSSA(x) = Conv1x1(T; W_A) as one elementwise pass and one GEMM (returns channels_last)."""
    if not geom.taps:
        raise ValueError("PSSA needs at least one tap")
    n = x.shape[0]
    ho, wo = geom.out_size
    t = _products(x, geom)[0]
    w_slots = _slot_weight(weight.to(x.dtype), geom, t.shape[-1])
    y = _gemm(t.view(n * ho * wo, -1), w_slots, geom.groups)
    return y.view(n, ho, wo, -1).permute(0, 3, 1, 2)


def pssa_backward(
    x: Tensor,
    weight: Tensor,
    grad_y: Tensor,
    geom: PSSAGeometry,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dW_A) of PSSA, rebuilding T from x (never saved)."""
    n, c, h, w = x.shape
    ho, wo = geom.out_size
    m = n * ho * wo
    t, xp, read, grids, centre = _products(x, geom)
    n_slots = t.shape[-1]
    gy_rows = grad_y.to(x.dtype).permute(0, 2, 3, 1).reshape(m, -1)
    grad_w = None
    if need_w:
        g_rows = gy_rows.view(m, geom.groups, -1)
        t_rows = t.view(m, geom.groups, -1)
        # per group: O_g x (C_g * S) = gy_g^T T_g
        gw = torch.bmm(g_rows.transpose(0, 1).transpose(1, 2), t_rows.transpose(0, 1))
        gw = gw.reshape(weight.shape[0], c // geom.groups, n_slots)[:, :, slot_index(geom)]
        grad_w = gw.reshape(weight.shape).to(weight.dtype)
    del t
    grad_x = None
    if need_x:
        w_slots = _slot_weight(weight.to(x.dtype), geom, n_slots)
        if geom.groups == 1:
            dt = gy_rows @ w_slots.reshape(w_slots.shape[0], -1)
        else:
            a = gy_rows.view(m, geom.groups, -1).transpose(0, 1)  # g x M x O_g
            b = w_slots.reshape(geom.groups, -1, c // geom.groups * n_slots)  # g x O_g x K_g
            dt = torch.bmm(a, b).transpose(0, 1).reshape(m, -1)
        shifts = _shifts(geom)
        dt_view = dt.view(n, ho, wo, c, len(shifts), 3, 3).permute(4, 0, 3, 5, 6, 1, 2)
        top, left = read.crop
        gxp = torch.zeros_like(xp)
        grad_centre = torch.zeros_like(centre)
        s = geom.stride
        for g, (grid, L) in enumerate(zip(grids, shifts, strict=True)):
            dtg = dt_view[g]  # N x C x 3 x 3 x Ho x Wo
            # centre factor: dx(q) += sum_d dT_d(p) x(q + d)
            grad_centre += (dtg * grid).sum(dim=(2, 3))
            # shifted factor: dx(q + d) += dT_d(p) x(q), summed over overlapping windows
            if L == 0:  # centre-only: every used slot reads q itself
                grad_centre += dtg[:, :, 1, 1] * centre
                continue
            cols = (dtg * centre[:, :, None, None]).reshape(n, c * 9, ho * wo)
            # The region this shift's windows cover, and no more: col2im needs exactly Ho x Wo
            # sliding blocks, and each shift L spans its own (Ho-1)s + 2L + 1 rows (a region
            # sized by the padding of the largest shift has more blocks for the smaller ones).
            r0, c0 = top + geom.offset - L, left + geom.offset - L
            extent = ((ho - 1) * s + 2 * L + 1, (wo - 1) * s + 2 * L + 1)
            region = gxp[:, :, r0 : r0 + extent[0], c0 : c0 + extent[1]]
            region += F.fold(cols, output_size=extent, kernel_size=3, dilation=L, stride=s)
        read(0, 0, gxp).add_(grad_centre)
        grad_x = gxp[:, :, top : top + h, left : left + w]
    return grad_x, grad_w
