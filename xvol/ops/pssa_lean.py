"""Memory-lean PSSA: the products x * S_d(x) are never stored for backward.

The reference training path (``XConv2d`` with ``impl="reference"``) materializes
T = concat_d x * S_d(x), 8m times the size of x, and autograd keeps T (the 1x1 conv's input), the
padded x (the products' inputs) and the PSSA output (BN_A's input) until backward. Here:

* ``PSSALean`` computes ``PSSA(x) = Conv1x1(T; W_A)`` tap by tap (one product map alive at a time)
  and saves only x and W_A; backward recomputes each product map from x.
* ``PSSABatchNormLean`` fuses BN_A (training statistics, running-stat update exactly as
  ``nn.BatchNorm2d``) on top and recomputes PSSA(x) in backward instead of saving it, so the whole
  PSSA branch saves x (already saved by the conv branch, the same storage), W_A and two vectors of
  C_out statistics.

Gradient of one tap d (q = p * s + offset is the read position of output pixel p):
    P_d(p) = x(q) * x(q + d)                       (zero where q or q + d is outside the image)
    G_d    = W_d^T gy                               (grouped 1x1 transposed conv)
    dx(q)     += G_d(p) * x(q + d)                  (centre factor)
    dx(q + d) += G_d(p) * x(q)                      (shifted factor)
    dW_d      += gy P_d^T                           (grouped 1x1 weight gradient)
Both scatters go through the same zero-padded buffer as the forward reads; gradient landing in the
padding is dropped (the padding is a constant). A centre tap d = (0, 0) gets both terms: 2 G x.

The autograd Functions take a ``Backend`` (the PSSA forward and backward to run: this file's
tap-by-tap PyTorch code, ``pssa_gemm`` or the Triton kernels); which one runs is decided in
``dispatch``. The geometry (taps, read positions, padding) comes from ``geometry``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from xvol.ops.geometry import PSSAGeometry, padded_reader, tap_weights

__all__ = [
    "Backend",
    "LEAN",
    "PSSALean",
    "PSSABatchNormLean",
    "pssa_lean",
    "pssa_bn_lean",
    "pssa_forward_taps",
    "pssa_backward_taps",
    "saved_tensors_report",
    "SavedTensorsReport",
]


def pssa_forward_taps(x: Tensor, weight: Tensor, geom: PSSAGeometry) -> Tensor:
    """PSSA(x) accumulated tap by tap: one product map (the size of the output grid) at a time."""
    if not geom.taps:
        raise ValueError("PSSA needs at least one tap")
    _, read = padded_reader(x, geom)
    centre = read(0, 0)
    w_taps = tap_weights(weight, geom.n_taps)
    y = F.conv2d(centre * read(*geom.taps[0]), w_taps[0], groups=geom.groups)
    for t in range(1, geom.n_taps):
        y.add_(F.conv2d(centre * read(*geom.taps[t]), w_taps[t], groups=geom.groups))
    return y


def pssa_backward_taps(
    x: Tensor,
    weight: Tensor,
    grad_y: Tensor,
    geom: PSSAGeometry,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dW_A) of PSSA at x for output gradient grad_y, recomputing each product map."""
    h, w = x.shape[-2:]
    xp, read = padded_reader(x, geom)
    top, left = read.crop
    centre = read(0, 0)
    w_taps = tap_weights(weight, geom.n_taps)
    grad_y = grad_y.contiguous(memory_format=_memory_format(x))
    gxp = torch.zeros_like(xp) if need_x else None

    def read_grad(di: int, dj: int) -> Tensor:
        return read(di, dj, gxp)

    grad_centre = torch.zeros_like(centre) if need_x else None
    grad_w_taps = []
    for t, (di, dj) in enumerate(geom.taps):
        shifted = read(di, dj)
        product = centre * shifted if need_w else centre  # input only matters for dW
        g_in, g_w, _ = torch.ops.aten.convolution_backward(
            grad_y,
            product,
            w_taps[t],
            None,
            [1, 1],
            [0, 0],
            [1, 1],
            False,
            [0, 0],
            geom.groups,
            [need_x, need_w, False],
        )
        if need_w:
            grad_w_taps.append(g_w)
        if need_x:
            assert grad_centre is not None
            grad_centre.addcmul_(g_in, shifted)
            read_grad(di, dj).addcmul_(g_in, centre)
    grad_x = None
    if need_x:
        assert gxp is not None and grad_centre is not None
        read_grad(0, 0).add_(grad_centre)
        grad_x = gxp[:, :, top : top + h, left : left + w]
    grad_w = None
    if need_w:
        # n x C_out x C_g x 1 x 1 -> C_out x C_g*n x 1 x 1 (channel-major, as W_A).
        stacked = torch.stack(grad_w_taps, dim=0)
        grad_w = stacked.permute(1, 2, 0, 3, 4).reshape(weight.shape)
    return grad_x, grad_w


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
        return torch.channels_last
    return torch.contiguous_format


def _bn_call_args(
    bn: nn.modules.batchnorm._BatchNorm,
) -> tuple[Tensor | None, Tensor | None, bool, float]:
    """(running_mean, running_var, use_batch_stats, momentum) exactly as _BatchNorm.forward.

    Bumps ``num_batches_tracked`` like the module does, so the fused path is a drop-in.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if track else None
    running_var = bn.running_var if track else None
    return running_mean, running_var, use_batch_stats, momentum


@dataclass(frozen=True)
class Backend:
    """What computes PSSA inside the lean autograd Functions.

    forward(x, W_A, geom) -> PSSA(x); backward(x, W_A, grad_y, geom, need_x, need_w) ->
    (dx, dW_A). ``save_bn_input``: ``PSSABatchNormLean`` keeps BN_A's input (one output-sized
    map) instead of recomputing PSSA(x) in backward: worth it where PSSA's forward is a full
    GEMM (``gemm``, ``triton``), not where memory is the point (``lean``).
    """

    name: str
    forward: Callable[[Tensor, Tensor, PSSAGeometry], Tensor]
    backward: Callable[..., tuple[Tensor | None, Tensor | None]]
    save_bn_input: bool = False


class PSSALean(torch.autograd.Function):
    """PSSA(x) = Conv1x1(T(x); W_A) saving only x and W_A; T is recomputed in backward.

    ``backend``: what computes PSSA (``Backend``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, geom: PSSAGeometry, backend: Backend
    ) -> Tensor:
        ctx.geom, ctx.backend = geom, backend
        ctx.save_for_backward(x, weight)
        return backend.forward(x, weight, geom)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        gx, gw = ctx.backend.backward(x, weight, grad_y, ctx.geom, need_x, need_w)
        return gx, gw, None, None


class PSSABatchNormLean(torch.autograd.Function):
    """BN_A(PSSA(x)) saving x, W_A, gamma and the batch statistics; PSSA(x) is recomputed.

    BN's backward needs its input; storing it costs one output-sized map per slot, so unless the
    backend says ``save_bn_input`` the PSSA output is recomputed from x in backward (one more
    PSSA forward, no extra storage).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        gamma: Tensor | None,
        beta: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        use_batch_stats: bool,
        momentum: float,
        eps: float,
        geom: PSSAGeometry,
        backend: Backend,
    ) -> Tensor:
        y = backend.forward(x, weight, geom)
        out, save_mean, save_invstd = torch.native_batch_norm(
            y, gamma, beta, running_mean, running_var, use_batch_stats, momentum, eps
        )
        ctx.geom, ctx.backend, ctx.eps, ctx.use_batch_stats = geom, backend, eps, use_batch_stats
        # Batch statistics drive backward in training; running stats only in eval, and they are
        # saved only then (training forwards update them in place).
        keep_running = not use_batch_stats
        ctx.save_for_backward(
            y if backend.save_bn_input else None,
            x,
            weight,
            gamma,
            running_mean if keep_running else None,
            running_var if keep_running else None,
            save_mean,
            save_invstd,
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        y, x, weight, gamma, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        need_x, need_w, need_gamma, need_beta = ctx.needs_input_grad[:4]
        if y is None:
            y = ctx.backend.forward(x, weight, ctx.geom)
        grad_y, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(memory_format=_memory_format(y)),
            y,
            gamma,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            ctx.use_batch_stats,
            ctx.eps,
            [need_x or need_w, need_gamma and gamma is not None, need_beta and gamma is not None],
        )
        del y
        gx, gw = None, None
        if need_x or need_w:
            gx, gw = ctx.backend.backward(x, weight, grad_y, ctx.geom, need_x, need_w)
        return (
            gx,
            gw,
            grad_gamma if need_gamma else None,
            grad_beta if need_beta else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _autocast_inputs(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Cast as autocast would for a conv; the casts stay outside the Function (autograd-tracked)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), weight.to(dtype)
    if weight.dtype != x.dtype:
        raise TypeError(f"PSSA input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    return x, weight


def pssa_lean(
    x: Tensor, weight: Tensor, geom: PSSAGeometry, backend: Backend | None = None
) -> Tensor:
    """PSSA(x) with only x and W_A saved for backward (``backend``: default ``LEAN``)."""
    backend = backend or LEAN
    x, weight = _autocast_inputs(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        return PSSALean.apply(x, weight, geom, backend)


def pssa_bn_lean(
    x: Tensor,
    weight: Tensor,
    bn: nn.Module,
    geom: PSSAGeometry,
    backend: Backend | None = None,
) -> Tensor:
    """BN_A(PSSA(x)) with nothing output-sized saved (unless ``backend.save_bn_input``).

    Falls back to ``bn(pssa_lean(x))`` for BN subclasses with their own forward (SyncBatchNorm
    must all-reduce its statistics)."""
    backend = backend or LEAN
    if type(bn) is not nn.BatchNorm2d:
        return bn(pssa_lean(x, weight, geom, backend))
    x, weight = _autocast_inputs(x, weight)
    with torch.no_grad():
        running_mean, running_var, use_batch_stats, momentum = _bn_call_args(bn)
    with torch.autocast(x.device.type, enabled=False):
        return PSSABatchNormLean.apply(
            x,
            weight,
            bn.weight,
            bn.bias,
            running_mean,
            running_var,
            use_batch_stats,
            momentum,
            bn.eps,
            geom,
            backend,
        )


LEAN = Backend("lean", pssa_forward_taps, pssa_backward_taps)


@dataclass
class SavedTensorsReport:
    """What autograd keeps for backward, by unique storage (a view costs its whole storage).

    activation_bytes: feature maps (>= 2-D tensors that are not parameters/buffers: what grows
    with batch and resolution); per_channel_bytes: 1-D non-parameter tensors (BN batch
    statistics); parameter_bytes: parameters and buffers (held by the model anyway).
    """

    activation_bytes: int = 0
    per_channel_bytes: int = 0
    parameter_bytes: int = 0
    entries: list[tuple[str, tuple[int, ...], str, int]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.per_channel_bytes


def saved_tensors_report(
    fn: Callable[[], Tensor], owned: Iterable[Tensor] = ()
) -> SavedTensorsReport:
    """Run ``fn`` under ``saved_tensors_hooks`` and account every tensor saved for backward.

    ``owned``: parameters and buffers (e.g. ``[*m.parameters(), *m.buffers()]``), counted apart.
    """
    owned_ptrs = {t.untyped_storage().data_ptr() for t in owned}
    report = SavedTensorsReport()
    seen: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or storage.nbytes() == 0:
            return t
        seen.add(ptr)
        nbytes = storage.nbytes()
        if ptr in owned_ptrs:
            kind = "parameter"
            report.parameter_bytes += nbytes
        elif t.dim() <= 1:
            kind = "per_channel"
            report.per_channel_bytes += nbytes
        else:
            kind = "activation"
            report.activation_bytes += nbytes
        report.entries.append((kind, tuple(t.shape), str(t.dtype), nbytes))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return report
