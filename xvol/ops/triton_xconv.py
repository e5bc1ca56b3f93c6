"""Triton kernels for X-volution: implicit GEMMs that form the PSSA products in registers.

Why hand-written: no library has PSSA. Through cuDNN/cuBLAS the deploy operator is "write T (8m
times the input) to memory, read it back in a 1x1 GEMM, add a kxk conv"; T's round trip through
HBM costs 2 x 8m x |x| bytes of memory traffic per call, on top of the extra launches, and
autograd keeps T for backward. These kernels read x once per tile and multiply the centre and
shifted pixels in registers just before the tensor-core dot:

* ``xconv_fwd``: y = b + Conv_kxk(x; W) + Conv1x1(T; W_A) as ONE implicit GEMM over the
  transformed input X~ = concat(x, T) (K = k*k*C static taps + n_taps*C product taps). With no
  static taps it is the PSSA forward of the training form (optionally added onto a given map).
* ``pssa_bwd_weight``: dW_A = gy^T T, products formed on the fly (split over pixels, reduced in
  fp32 without atomics, so it is deterministic).
* ``pssa_bwd_input``: dx by gathering, for every input pixel, the centre term G_d(p) x(q + d) and
  the shifted term G_d(p') x(q - d) (G = W_A^T gy from one cuBLAS GEMM). A gather has no write
  conflicts: no atomics, deterministic.

Supported: groups=1, odd square kernels, any stride/padding/dilation, any PSSA taps; bf16, fp16
and fp32 inputs (fp32 accumulation; fp32 dots in IEEE precision), NCHW or channels_last (strides
are passed, channels_last makes the channel loads contiguous). Anything else: ``supports`` is
False and the caller uses the PyTorch path.

Triton is imported lazily. ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors through
Triton's interpreter. ``triton.jit`` reads the variable when it decorates a function, and
triton.language's own helpers (``tl.zeros``, ``tl.sum``, ...) are decorated when triton.language
is imported; so these kernels use builtins only (``tl.full``, not ``tl.zeros``) and are decorated
on first use, cached per mode: setting the variable any time before a call is enough.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from xvol.ops.pssa_lean import PSSAGeometry

logger = logging.getLogger(__name__)

__all__ = [
    "UNSUPPORTED_MESSAGE",
    "available",
    "self_test",
    "interpreting",
    "supports",
    "xconv_fwd",
    "xconv_deploy",
    "pssa_forward",
    "pssa_backward",
    "pssa_backward_weight",
    "pssa_backward_input",
]

UNSUPPORTED_MESSAGE = (
    "the Triton X-volution kernels support groups=1, odd square kernels and float16/bfloat16/"
    "float32 inputs with fewer than 2**31 elements; use impl='lean' or 'reference' for this slot"
)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


@functools.cache
def _triton():
    """(triton, triton.language) or None when Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # ImportError, or a broken install (missing compiler pieces)
        return None
    return triton, tl


def interpreting() -> bool:
    mods = _triton()
    return bool(mods and mods[0].knobs.runtime.interpret)


def available(x: Tensor) -> bool:
    """Whether the kernels can run on x's device: CUDA, or CPU under TRITON_INTERPRET=1."""
    if _triton() is None:
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and interpreting()


@functools.cache
def self_test(device: torch.device) -> bool:
    """One small deploy and one PSSA-only launch on ``device``, checked against PyTorch.

    ``impl="auto"`` only picks the kernels (inference forwards) after this passes, so a
    Triton/driver combination that fails to compile or miscomputes degrades to the PyTorch path
    instead of breaking a run.
    """
    import torch.nn.functional as F

    from xvol.ops.pssa_lean import PSSAGeometry, pssa_forward_taps

    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2, 16, 7, 7, generator=gen).to(device)
        w = torch.randn(16, 16, 3, 3, generator=gen).to(device) / 12
        taps = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
        w_a = torch.randn(16, 16 * len(taps), 1, 1, generator=gen).to(device) / 12
        geom = PSSAGeometry(taps, 1, 0, (7, 7), 1)
        with torch.no_grad():
            pssa_ref = pssa_forward_taps(x, w_a, geom)
            ref = F.conv2d(x, w, None, 1, 1) + pssa_ref
            out = xconv_deploy(x, w, w_a, None, taps, 1, 1, 1, 0, (7, 7))
            pssa_out = pssa_forward(x, w_a, geom)
        # Loose: catches garbage and compile failures, not rounding (cuDNN may use TF32 here).
        ok = bool(torch.allclose(out, ref, rtol=1e-2, atol=1e-2)) and bool(
            torch.allclose(pssa_out, pssa_ref, rtol=1e-2, atol=1e-2)
        )
    except Exception as err:  # compile or launch failure: report once, use PyTorch
        logger.warning("Triton X-volution kernels unusable here: %s", err)
        return False
    if not ok:
        logger.warning("Triton X-volution self-test mismatch; not used")
    return ok


def supports(groups: int, kernel_size: int = 1, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels cover this slot (else the caller uses the PyTorch path)."""
    return groups == 1 and kernel_size % 2 == 1 and (dtype is None or dtype in _DTYPES)


def _check(x: Tensor, groups: int) -> None:
    if not supports(groups, 1, x.dtype) or x.numel() > _INT32_MAX:
        raise ValueError(f"{UNSUPPORTED_MESSAGE} (groups={groups}, dtype={x.dtype})")
    if not available(x):
        raise RuntimeError(
            "Triton kernels need Triton and a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
        )


# --------------------------------------------------------------------------------------------
# Kernels (built on first use; one set per interpreter mode)


_KERNELS: dict[bool, SimpleNamespace] = {}


def _kernels() -> SimpleNamespace:
    mods = _triton()
    if mods is None:
        raise RuntimeError("Triton is not importable")
    mode = interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = _define_kernels(*mods, interpret=mode)
    return _KERNELS[mode]


def _define_kernels(triton, tl, interpret: bool) -> SimpleNamespace:  # noqa: C901
    def tuned(configs, key):
        # Autotuning compiles every config: worth it on a GPU, minutes in the interpreter.
        if interpret:
            return lambda fn: fn
        return triton.autotune(configs=configs, key=key)

    def cfg(**kw):
        warps, stages = kw.pop("warps"), kw.pop("stages")
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    fwd_configs = [
        cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, warps=8, stages=3),
        cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, warps=8, stages=3),
        cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, warps=4, stages=4),
        cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, warps=4, stages=4),
        cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, warps=4, stages=3),
    ]

    @tuned(fwd_configs, key=["M", "C", "COUT", "KS", "NT"])
    @triton.jit
    def xconv_fwd_kernel(
        x_ptr, ws_ptr, wp_ptr, taps_ptr, bias_ptr, init_ptr, out_ptr,
        M, C, COUT, H, W, HO, WO,
        sxn, sxc, sxh, sxw,
        son, soc, soh, sow,
        sin_, sic, sih, siw,
        STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr, OFF: tl.constexpr,
        KS: tl.constexpr, NT: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Rows: output pixels (n, oh, ow); columns: output channels; K: (static tap, c) then
        # (product tap, c). The centre tile is loaded once per channel block and reused by
        # every product tap.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < COUT
        hw = HO * WO
        img = offs_m // hw
        rem = offs_m % hw
        oh = rem // WO
        ow = rem % WO
        x_img = x_ptr + img * sxn
        qh = oh * STRIDE + OFF
        qw = ow * STRIDE + OFF
        q_ok = m_ok & (qh >= 0) & (qh < H) & (qw >= 0) & (qw < W)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for c0 in range(0, C, BLOCK_K):
            offs_k = c0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C
            x_k = offs_k * sxc
            for kh in tl.static_range(KS):
                for kw in tl.static_range(KS):
                    ih = oh * STRIDE - PAD + kh * DIL
                    iw = ow * STRIDE - PAD + kw * DIL
                    ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    a = tl.load(
                        x_img[:, None] + (ih * sxh + iw * sxw)[:, None] + x_k[None, :],
                        mask=ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    b = tl.load(
                        ws_ptr + ((kh * KS + kw) * C + offs_k)[:, None] * COUT + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    if DOT_F32:
                        acc = tl.dot(
                            a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee"
                        )
                    else:
                        acc = tl.dot(a, b, acc)
            if NT > 0:
                xc = tl.load(
                    x_img[:, None] + (qh * sxh + qw * sxw)[:, None] + x_k[None, :],
                    mask=q_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                for t in tl.static_range(NT):
                    dh = tl.load(taps_ptr + 2 * t)
                    dw = tl.load(taps_ptr + 2 * t + 1)
                    sh = qh + dh
                    sw = qw + dw
                    ok = q_ok & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
                    xs = tl.load(
                        x_img[:, None] + (sh * sxh + sw * sxw)[:, None] + x_k[None, :],
                        mask=ok[:, None] & k_ok[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    # Rounded to the input dtype, as the reference's elementwise product is.
                    a = (xc * xs).to(x_ptr.dtype.element_ty)
                    b = tl.load(
                        wp_ptr + (t * C + offs_k)[:, None] * COUT + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    if DOT_F32:
                        acc = tl.dot(
                            a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee"
                        )
                    else:
                        acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc += bias[None, :]
        out_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_INIT:
            init = tl.load(
                init_ptr + (img * sin_ + oh * sih + ow * siw)[:, None] + (offs_n * sic)[None, :],
                mask=out_mask,
                other=0.0,
            )
            acc += init.to(tl.float32)
        tl.store(
            out_ptr + (img * son + oh * soh + ow * sow)[:, None] + (offs_n * soc)[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )

    bwd_w_configs = [
        cfg(BLOCK_C=64, BLOCK_O=64, BLOCK_M=64, warps=4, stages=3),
        cfg(BLOCK_C=128, BLOCK_O=64, BLOCK_M=64, warps=4, stages=3),
        cfg(BLOCK_C=64, BLOCK_O=128, BLOCK_M=64, warps=4, stages=3),
        cfg(BLOCK_C=128, BLOCK_O=128, BLOCK_M=32, warps=8, stages=3),
    ]

    @tuned(bwd_w_configs, key=["M", "C", "COUT", "NT", "M_PER_SPLIT"])
    @triton.jit
    def pssa_bwd_w_kernel(
        x_ptr, gy_ptr, taps_ptr, part_ptr,
        M, C, COUT, H, W, HO, WO, M_PER_SPLIT,
        sxn, sxc, sxh, sxw,
        sgn, sgc, sgh, sgw,
        STRIDE: tl.constexpr, OFF: tl.constexpr, NT: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        # part[split, t, c, o] = sum over this split's pixels of P_t[pixel, c] * gy[pixel, o].
        pid_c = tl.program_id(0)
        pid_o = tl.program_id(1)
        pid_z = tl.program_id(2)
        t = pid_z % NT
        split = pid_z // NT
        dh = tl.load(taps_ptr + 2 * t)
        dw = tl.load(taps_ptr + 2 * t + 1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        c_ok = offs_c < C
        o_ok = offs_o < COUT
        hw = HO * WO
        acc = tl.full((BLOCK_C, BLOCK_O), 0.0, tl.float32)
        m_start = split * M_PER_SPLIT
        for m0 in range(m_start, m_start + M_PER_SPLIT, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            img = offs_m // hw
            rem = offs_m % hw
            oh = rem // WO
            ow = rem % WO
            qh = oh * STRIDE + OFF
            qw = ow * STRIDE + OFF
            sh = qh + dh
            sw = qw + dw
            ok_c = m_ok & (qh >= 0) & (qh < H) & (qw >= 0) & (qw < W)
            ok_s = ok_c & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
            base = x_ptr + img * sxn
            xc = tl.load(
                base[None, :] + (qh * sxh + qw * sxw)[None, :] + (offs_c * sxc)[:, None],
                mask=c_ok[:, None] & ok_s[None, :],
                other=0.0,
            ).to(tl.float32)
            xs = tl.load(
                base[None, :] + (sh * sxh + sw * sxw)[None, :] + (offs_c * sxc)[:, None],
                mask=c_ok[:, None] & ok_s[None, :],
                other=0.0,
            ).to(tl.float32)
            p = (xc * xs).to(x_ptr.dtype.element_ty)
            g = tl.load(
                gy_ptr + (img * sgn + oh * sgh + ow * sgw)[:, None] + (offs_o * sgc)[None, :],
                mask=m_ok[:, None] & o_ok[None, :],
                other=0.0,
            )
            if DOT_F32:
                acc = tl.dot(p.to(tl.float32), g.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p, g, acc)
        part = part_ptr + ((split * NT + t) * C + offs_c)[:, None] * COUT + offs_o[None, :]
        tl.store(part, acc, mask=c_ok[:, None] & o_ok[None, :])

    bwd_x_configs = [
        cfg(BLOCK_Q=64, BLOCK_C=64, warps=4, stages=2),
        cfg(BLOCK_Q=128, BLOCK_C=32, warps=4, stages=2),
        cfg(BLOCK_Q=32, BLOCK_C=128, warps=4, stages=2),
    ]

    @tuned(bwd_x_configs, key=["MX", "C", "NT"])
    @triton.jit
    def pssa_bwd_x_kernel(
        x_ptr, g_ptr, taps_ptr, dx_ptr,
        MX, C, H, W, HO, WO,
        sxn, sxc, sxh, sxw,
        sdn, sdc, sdh, sdw,
        STRIDE: tl.constexpr, OFF: tl.constexpr, NT: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # dx(q) = sum_t [q read by p]      G_t(p)  x(q + d_t)     (centre factor)
        #       + sum_t [q - d_t read by p'] G_t(p') x(q - d_t)   (shifted factor)
        # G is (N*HO*WO) x NT x C, contiguous. Only in-image q are visited: gradient that would
        # land in the zero padding is dropped, as it must be.
        pid_q = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        q_ok = offs_q < MX
        c_ok = offs_c < C
        img = offs_q // (H * W)
        rem = offs_q % (H * W)
        ih = rem // W
        iw = rem % W
        base = x_ptr + img * sxn
        g_img = img * (HO * WO)
        ph = ih - OFF
        pw = iw - OFF
        on_grid = (
            q_ok & (ph >= 0) & (pw >= 0) & (ph % STRIDE == 0) & (pw % STRIDE == 0)
            & (ph // STRIDE < HO) & (pw // STRIDE < WO)
        )  # fmt: skip
        g_row = g_img + (ph // STRIDE) * WO + pw // STRIDE
        acc = tl.full((BLOCK_Q, BLOCK_C), 0.0, tl.float32)
        for t in tl.static_range(NT):
            dh = tl.load(taps_ptr + 2 * t)
            dw = tl.load(taps_ptr + 2 * t + 1)
            # Centre factor: q is a read position, its partner is q + d.
            sh = ih + dh
            sw = iw + dw
            ok = on_grid & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
            mask = ok[:, None] & c_ok[None, :]
            g = tl.load(
                g_ptr + (g_row * NT + t)[:, None] * C + offs_c[None, :], mask=mask, other=0.0
            )
            xs = tl.load(
                base[:, None] + (sh * sxh + sw * sxw)[:, None] + (offs_c * sxc)[None, :],
                mask=mask,
                other=0.0,
            )
            acc += g.to(tl.float32) * xs.to(tl.float32)
            # Shifted factor: q = q' + d for a read position q' (which must be in the image).
            rh = ih - dh
            rw = iw - dw
            ph2 = rh - OFF
            pw2 = rw - OFF
            ok2 = (
                q_ok & (rh >= 0) & (rh < H) & (rw >= 0) & (rw < W)
                & (ph2 >= 0) & (pw2 >= 0) & (ph2 % STRIDE == 0) & (pw2 % STRIDE == 0)
                & (ph2 // STRIDE < HO) & (pw2 // STRIDE < WO)
            )  # fmt: skip
            mask2 = ok2[:, None] & c_ok[None, :]
            g_row2 = g_img + (ph2 // STRIDE) * WO + pw2 // STRIDE
            g2 = tl.load(
                g_ptr + (g_row2 * NT + t)[:, None] * C + offs_c[None, :], mask=mask2, other=0.0
            )
            xc = tl.load(
                base[:, None] + (rh * sxh + rw * sxw)[:, None] + (offs_c * sxc)[None, :],
                mask=mask2,
                other=0.0,
            )
            acc += g2.to(tl.float32) * xc.to(tl.float32)
        tl.store(
            dx_ptr + (img * sdn + ih * sdh + iw * sdw)[:, None] + (offs_c * sdc)[None, :],
            acc.to(dx_ptr.dtype.element_ty),
            mask=q_ok[:, None] & c_ok[None, :],
        )

    return SimpleNamespace(
        xconv_fwd=xconv_fwd_kernel,
        pssa_bwd_w=pssa_bwd_w_kernel,
        pssa_bwd_x=pssa_bwd_x_kernel,
        interpret=interpret,
    )


# Fixed block sizes for the interpreter (no autotuning there); tl.dot needs dims >= 16.
_INTERP_FWD = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}
_INTERP_BWD_W = {"BLOCK_C": 16, "BLOCK_O": 16, "BLOCK_M": 16}
_INTERP_BWD_X = {"BLOCK_Q": 32, "BLOCK_C": 16}


def _dot_f32(dtype: torch.dtype) -> bool:
    """fp32 dots in IEEE precision (no silent TF32); bf16 dots upcast under the interpreter,
    whose tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584). A bf16 product is
    exact in fp32, so the upcast computes what a bf16 tensor-core dot with fp32 accumulation does.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _taps_tensor(taps: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    flat = [v for tap in taps for v in tap] or [0, 0]
    return torch.tensor(flat, dtype=torch.int32, device=device)


def _empty_like_layout(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def _is_channels_last(x: Tensor) -> bool:
    return x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def _launch(
    kernel,
    grid: Callable[[dict], tuple[int, ...]],
    args: tuple,
    meta: dict,
    interp_blocks: dict[str, int],
    interpret: bool,
) -> None:
    """Launch ``kernel``: with the fixed interpreter blocks, or with the autotuner's blocks
    (``grid`` maps a block config to the launch grid either way)."""
    if interpret:
        kernel[grid(interp_blocks)](*args, **meta, **interp_blocks)
    else:
        kernel[grid](*args, **meta)


# --------------------------------------------------------------------------------------------
# Launchers


def xconv_fwd(
    x: Tensor,
    pssa_weight: Tensor | None,
    taps: tuple[tuple[int, int], ...],
    pssa_offset: int,
    out_size: tuple[int, int],
    stride: int,
    weight: Tensor | None = None,
    padding: int = 0,
    dilation: int = 1,
    bias: Tensor | None = None,
    init: Tensor | None = None,
) -> Tensor:
    """b + Conv_kxk(x; weight) + Conv1x1(T; pssa_weight) [+ init] in one kernel (groups=1).

    ``weight`` None: PSSA only. Weights are cast to x's dtype (call under autocast's dtype).
    """
    _check(x, 1)
    n, c, h, w = x.shape
    ho, wo = out_size
    ks = 0 if weight is None else weight.shape[-1]
    nt = 0 if pssa_weight is None else len(taps)
    cout = (weight if weight is not None else pssa_weight).shape[0]  # type: ignore[union-attr]
    dtype = x.dtype
    dummy = torch.zeros(1, dtype=dtype, device=x.device)
    # Pack weights K-major (K rows, C_out contiguous): static [k, k, C, C_out], PSSA [t, C, C_out].
    ws = weight.permute(2, 3, 1, 0).to(dtype).contiguous() if weight is not None else dummy
    if pssa_weight is not None:
        wp = pssa_weight.reshape(cout, c, nt).permute(2, 1, 0).to(dtype).contiguous()
    else:
        wp = dummy
    out = _empty_like_layout(x, (n, cout, ho, wo), dtype)
    if init is not None and init.shape != out.shape:
        raise ValueError(f"init has shape {tuple(init.shape)}, expected {tuple(out.shape)}")
    init_t = init if init is not None else out
    m = n * ho * wo
    k = _kernels()
    args = (
        x, ws, wp, _taps_tensor(taps, x.device),
        bias if bias is not None else dummy, init_t, out,
        m, c, cout, h, w, ho, wo,
        *x.stride(), *out.stride(), *init_t.stride(),
    )  # fmt: skip
    meta = dict(
        STRIDE=stride, PAD=padding, DIL=dilation, OFF=pssa_offset, KS=ks, NT=nt,
        HAS_BIAS=bias is not None, HAS_INIT=init is not None, DOT_F32=_dot_f32(dtype),
    )  # fmt: skip
    _launch(
        k.xconv_fwd,
        lambda b: (_cdiv(m, b["BLOCK_M"]), _cdiv(cout, b["BLOCK_N"])),
        args, meta, _INTERP_FWD, k.interpret,
    )  # fmt: skip
    return out


def xconv_deploy(
    x: Tensor,
    weight: Tensor,
    pssa_weight: Tensor,
    bias: Tensor | None,
    taps: tuple[tuple[int, int], ...],
    stride: int,
    padding: int,
    dilation: int,
    pssa_offset: int,
    out_size: tuple[int, int],
) -> Tensor:
    """The deploy X-volution operator as one implicit GEMM (``XConv2dDeploy.forward``)."""
    if weight.shape[1] != x.shape[1]:
        raise ValueError(UNSUPPORTED_MESSAGE + f" (groups={x.shape[1] // weight.shape[1]})")
    return xconv_fwd(
        x, pssa_weight, taps, pssa_offset, out_size, stride, weight, padding, dilation, bias
    )


def pssa_forward(
    x: Tensor, weight: Tensor, geom: PSSAGeometry, init: Tensor | None = None
) -> Tensor:
    """PSSA(x) (training form's PSSA branch, before BN_A) without materializing T."""
    _check(x, geom.groups)
    return xconv_fwd(x, weight, geom.taps, geom.offset, geom.out_size, geom.stride, init=init)


def pssa_backward_weight(
    x: Tensor, grad_y: Tensor, geom: PSSAGeometry, m_per_split: int | None = None
) -> Tensor:
    """dW_A (C_out x C*n_taps x 1 x 1, channel-major) with the products formed on the fly."""
    _check(x, geom.groups)
    n, c, h, w = x.shape
    ho, wo = geom.out_size
    cout = grad_y.shape[1]
    nt = geom.n_taps
    m = n * ho * wo
    if m_per_split is None:
        # ~8 pixel splits for parallelism; a multiple of 256 so every BLOCK_M divides it.
        m_per_split = max(256, _cdiv(_cdiv(m, 8), 256) * 256)
    split = _cdiv(m, m_per_split)
    part = torch.empty((split, nt, c, cout), dtype=torch.float32, device=x.device)
    grad_y = grad_y.to(x.dtype)
    k = _kernels()
    args = (
        x, grad_y, _taps_tensor(geom.taps, x.device), part,
        m, c, cout, h, w, ho, wo, m_per_split,
        *x.stride(), *grad_y.stride(),
    )  # fmt: skip
    meta = dict(STRIDE=geom.stride, OFF=geom.offset, NT=nt, DOT_F32=_dot_f32(x.dtype))
    if k.interpret and m_per_split % _INTERP_BWD_W["BLOCK_M"]:
        raise ValueError(f"m_per_split must be a multiple of {_INTERP_BWD_W['BLOCK_M']}")
    _launch(
        k.pssa_bwd_w,
        lambda b: (_cdiv(c, b["BLOCK_C"]), _cdiv(cout, b["BLOCK_O"]), nt * split),
        args, meta, _INTERP_BWD_W, k.interpret,
    )  # fmt: skip
    # [t, c, o] -> W_A[o, c * nt + t]
    return part.sum(0).permute(2, 1, 0).reshape(cout, c * nt, 1, 1)


def pssa_backward_input(x: Tensor, weight: Tensor, grad_y: Tensor, geom: PSSAGeometry) -> Tensor:
    """dx of PSSA: G = W_A^T gy by one GEMM (tap-major), then a gather kernel forms dx."""
    _check(x, geom.groups)
    n, c, h, w = x.shape
    ho, wo = geom.out_size
    cout = grad_y.shape[1]
    nt = geom.n_taps
    dtype = x.dtype
    gy_rows = grad_y.to(dtype).permute(0, 2, 3, 1).reshape(n * ho * wo, cout)
    w_tap_major = weight.to(dtype).reshape(cout, c, nt).permute(0, 2, 1).reshape(cout, nt * c)
    if n * ho * wo * nt * c > _INT32_MAX:
        raise ValueError(f"{UNSUPPORTED_MESSAGE} (W_A^T gy would have {n * ho * wo * nt * c})")
    g = gy_rows @ w_tap_major  # (N*HO*WO) x (NT*C): transient, never saved
    dx = _empty_like_layout(x, tuple(x.shape), dtype)
    mx = n * h * w
    k = _kernels()
    args = (
        x, g.contiguous(), _taps_tensor(geom.taps, x.device), dx,
        mx, c, h, w, ho, wo, *x.stride(), *dx.stride(),
    )  # fmt: skip
    meta = dict(STRIDE=geom.stride, OFF=geom.offset, NT=nt)
    _launch(
        k.pssa_bwd_x,
        lambda b: (_cdiv(mx, b["BLOCK_Q"]), _cdiv(c, b["BLOCK_C"])),
        args, meta, _INTERP_BWD_X, k.interpret,
    )  # fmt: skip
    return dx


def pssa_backward(
    x: Tensor,
    weight: Tensor,
    grad_y: Tensor,
    geom: PSSAGeometry,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dW_A) of PSSA through the Triton kernels (the lean path's backward, fused)."""
    gx = pssa_backward_input(x, weight, grad_y, geom) if need_x else None
    gw = pssa_backward_weight(x, grad_y, geom).to(weight.dtype) if need_w else None
    return gx, gw
