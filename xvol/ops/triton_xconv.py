"""Triton kernels for X-volution: implicit GEMMs that form the PSSA products in registers.

Why hand-written: no library has PSSA. Through cuDNN/cuBLAS the deploy operator is "write T (8m
times the input) to memory, read it back in a 1x1 GEMM, add a kxk conv" (the ``gemm`` backend);
these kernels read x once per tile and multiply the centre and shifted pixels in registers just
before the tensor-core dot:

* ``xconv_fwd``: y = b + Conv_kxk(x; W) + Conv1x1(T; W_A) as ONE implicit GEMM over the
  transformed input X~ = concat(x, T). With no static taps it is the PSSA forward of the
  training form (optionally added onto a given map).
* ``pssa_bwd_weight``: dW_A = gy^T T, products formed on the fly (split over pixels, reduced in
  fp32 without atomics, so it is deterministic).
* ``pssa_bwd_input``: dx by gathering, for every input pixel, the centre term G_d(p) x(q + d) and
  the shifted term G_d(p') x(q - d) (G = W_A^T gy from one cuBLAS GEMM). A gather has no write
  conflicts: no atomics, deterministic.

Shared memory. The forward's K loop is unrolled over the *positions* it reads (the kxk window
and the PSSA taps, as compile-time offsets), each position a loop over channel blocks with one
activation tile and one weight tile per operand; where a PSSA tap coincides with a conv tap (3x3
conv, dilation == shift) the shifted tile is loaded once and feeds both dots. The software
pipeliner multi-buffers only the loads of the loop it is in, and the loops run one after the
other, so shared memory is about ``stages x (2 BM + 2 BN) x BK x bytes`` whatever the number of
taps (``smem_estimate``; checked against ahead-of-time sm_80/sm_90 compiles in the tests).
Configs over the device's ``max_shared_mem`` are pruned before launch; if none fits, a clear
error is raised instead of launching one.

Precision: bf16/fp16 inputs use tensor-core dots with fp32 accumulation. fp32 inputs follow
torch's TF32 switch for convolutions (``torch.backends.cudnn.allow_tf32``, read at each launch):
TF32 dots when it is on (torch's default, as cuDNN's convolutions), exact fp32 dots when it is
off. The products are rounded to the input dtype, as the reference's elementwise product is.

Supported (``supports``): groups=1, odd square kernels, one shift distance (plus ``center``),
float16/bfloat16/float32, fewer than 2**31 elements in the input and in the output (int32
offsets), NCHW or channels_last (strides are passed, channels_last makes the channel loads
contiguous). Anything else is the PyTorch path's.

Autotuning (explicit ``impl="triton"``): keyed on the channel counts, the kernel size and a
power-of-two bucket of the pixel count, results cached across processes (Triton's
``cache_results``). ``impl="auto"`` launches one fixed config per kernel (``fixed_config``), so
preparing a model costs one compile per distinct specialization, not one per config.

Triton is imported lazily. ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors through
Triton's interpreter. ``triton.jit`` reads the variable when it decorates a function, and
triton.language's own helpers (``tl.zeros``, ...) are decorated when triton.language is imported;
so these kernels use builtins only (``tl.full``, not ``tl.zeros``) and are decorated on first use,
cached per mode: setting the variable any time before a call is enough.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from xvol.ops.geometry import PSSAGeometry

logger = logging.getLogger(__name__)

__all__ = [
    "UNSUPPORTED_MESSAGE",
    "SHARED_MEMORY_LIMITS",
    "NoConfigFitsError",
    "available",
    "fixed_config",
    "capture_launches",
    "interpreting",
    "supports",
    "smem_estimate",
    "xconv_fwd",
    "xconv_deploy",
    "pssa_forward",
    "pssa_backward",
    "pssa_backward_weight",
    "pssa_backward_input",
]

UNSUPPORTED_MESSAGE = (
    "the Triton X-volution kernels support groups=1, odd square kernels, one shift distance "
    "(plus center) and float16/bfloat16/float32 inputs with fewer than 2**31 elements; use "
    "impl='lean', 'gemm' or 'reference' for this slot"
)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1
# Opt-in shared memory per block (bytes): what a kernel may use on each target.
SHARED_MEMORY_LIMITS = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}


class NoConfigFitsError(RuntimeError):
    """No kernel config fits the device's shared memory (never launched over the limit)."""


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


def supports(
    groups: int,
    kernel_size: int = 1,
    dtype: torch.dtype | None = None,
    taps: Sequence[tuple[int, int]] | None = None,
) -> bool:
    """Whether the kernels cover this slot (else the caller uses a PyTorch path)."""
    ok = groups == 1 and kernel_size % 2 == 1 and (dtype is None or dtype in _DTYPES)
    return ok and (taps is None or _tap_params(tuple(taps)) is not None)


@functools.lru_cache(maxsize=64)  # asked on every forward under auto (dispatch.triton_supports)
def _tap_params(taps: tuple[tuple[int, int], ...]) -> tuple[int, bool] | None:
    """(shift L, center) when ``taps`` is the layout of one shift distance (plus the centre);
    the kernels take the offsets as compile-time constants in that layout. None otherwise."""
    center = bool(taps) and taps[-1] == (0, 0)
    ring = taps[:-1] if center else taps
    if not ring:
        return (0, center) if center else None
    shift = max(abs(ring[0][0]), abs(ring[0][1]))
    expected = [(i * shift, j * shift) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]
    return (shift, center) if list(ring) == expected else None


# Set by ``capture_launches``: launches are recorded, not run (ahead-of-time compiles).
_CAPTURE: list[tuple[str, tuple, dict]] | None = None


@contextlib.contextmanager
def capture_launches() -> Iterator[list[tuple[str, tuple, dict]]]:
    """Record (kernel name, args, constexprs) of every launch instead of running it, on any
    device: ``triton_aot`` compiles what the JIT would, with the same specialization."""
    global _CAPTURE
    previous, _CAPTURE = _CAPTURE, []
    try:
        yield _CAPTURE
    finally:
        _CAPTURE = previous


def _check(x: Tensor, groups: int, taps: tuple[tuple[int, int], ...] | None = None) -> None:
    if not supports(groups, 1, x.dtype, taps) or x.numel() > _INT32_MAX:
        raise ValueError(f"{UNSUPPORTED_MESSAGE} (groups={groups}, dtype={x.dtype}, taps={taps})")
    if _CAPTURE is None and not available(x):
        raise RuntimeError(
            "Triton kernels need Triton and a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
        )


# --------------------------------------------------------------------------------------------
# Configs and their shared memory


def _cfg(warps: int, stages: int, **blocks: int) -> dict:
    return {"blocks": blocks, "num_warps": warps, "num_stages": stages}


# The first config of each list is the fixed config ``impl="auto"`` launches (the first that
# fits the device; the first ones fit sm_80's 166,912 B for bf16/fp16 and fp32 alike). The last
# ones have BLOCK_K=64 tiles and 4 stages for Hopper's 232,448 B: by ``smem_estimate`` they fit
# sm_90 in bf16/fp16 only and are pruned elsewhere (tests/test_kernels.py compiles every config
# that the estimate admits for sm_80 and sm_90 and compares metadata.shared with the limits and
# the estimate). Few configs: each costs a compile per autotune key.
CONFIGS: dict[str, list[dict]] = {
    "xconv_fwd": [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
    ],
    "pssa_bwd_w": [
        _cfg(4, 3, BLOCK_C=64, BLOCK_O=64, BLOCK_M=64),
        _cfg(8, 3, BLOCK_C=128, BLOCK_O=64, BLOCK_M=32),
        _cfg(8, 4, BLOCK_C=128, BLOCK_O=128, BLOCK_M=64),
    ],
    "pssa_bwd_x": [
        _cfg(4, 2, BLOCK_Q=64, BLOCK_C=64),
        _cfg(4, 2, BLOCK_Q=128, BLOCK_C=32),
    ],
}


def smem_estimate(kernel: str, config: dict, elem_bytes: int) -> int:
    """Upper bound (bytes) of the shared memory ``kernel`` compiles to with ``config``.

    Pipelined loops: ``stages`` buffers of every tile a loop iteration loads for a dot; the
    epilogue may stage the fp32 accumulator through shared memory after the loops (reusing it).
    """
    b, stages = config["blocks"], config["num_stages"]
    if kernel == "xconv_fwd":
        # shifted + centre activation tiles, static + product weight tiles
        tiles = 2 * b["BLOCK_M"] * b["BLOCK_K"] + 2 * b["BLOCK_K"] * b["BLOCK_N"]
        return max(stages * tiles * elem_bytes, b["BLOCK_M"] * b["BLOCK_N"] * 4)
    if kernel == "pssa_bwd_w":
        tiles = 2 * b["BLOCK_C"] * b["BLOCK_M"] + b["BLOCK_M"] * b["BLOCK_O"]
        return max(stages * tiles * elem_bytes, b["BLOCK_C"] * b["BLOCK_O"] * 4)
    if kernel == "pssa_bwd_x":  # no dot: elementwise gathers, no pipelined operand tiles
        return 4 * b["BLOCK_Q"] * b["BLOCK_C"] * 4
    raise KeyError(kernel)


def _device_smem(device: torch.device) -> int:
    if device.type != "cuda" or _triton() is None:
        return 1 << 30  # the interpreter has no shared memory limit
    return _cuda_smem(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)  # a driver query: once per device, not once per launch
def _cuda_smem(index: int) -> int:
    props = _triton()[0].runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


def fitting_configs(kernel: str, elem_bytes: int, limit: int) -> list[dict]:
    """The configs of ``kernel`` whose shared memory fits ``limit`` bytes, in order."""
    return [c for c in CONFIGS[kernel] if smem_estimate(kernel, c, elem_bytes) <= limit]


def fixed_config(kernel: str, dtype: torch.dtype, device: torch.device) -> dict:
    """The one config ``impl="auto"`` launches: the first that fits the device."""
    fits = fitting_configs(kernel, dtype.itemsize, _device_smem(device))
    if not fits:
        raise NoConfigFitsError(_no_fit_message(kernel, dtype, device))
    return fits[0]


def _no_fit_message(kernel: str, dtype: torch.dtype, device: torch.device) -> str:
    return (
        f"no {kernel} config fits the shared memory of {device} ({_device_smem(device):,} B) "
        f"for {dtype}; use impl='lean' or 'gemm'"
    )


def _bucket(n: int) -> int:
    """Power-of-two bucket of a pixel count: the autotune key changes with batch size rarely."""
    return 1 << max(0, int(n) - 1).bit_length()


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
    # The pixel counts (M, its bucket, the dW split) are not specialized on (divisibility by 16,
    # == 1): a partial last batch must not compile a second variant of every kernel.
    def tuned(name: str, key: list[str]):
        # Autotuning compiles every config: worth it on a GPU, minutes in the interpreter.
        if interpret:
            return lambda fn: fn
        configs = [
            triton.Config(c["blocks"], num_warps=c["num_warps"], num_stages=c["num_stages"])
            for c in CONFIGS[name]
        ]

        def prune(configs, named_args, **kwargs):
            x = named_args["x_ptr"]
            limit = _device_smem(x.device)
            kept = [
                c
                for c in configs
                if smem_estimate(
                    name,
                    {"blocks": c.kwargs, "num_stages": c.num_stages},
                    x.element_size(),
                )
                <= limit
            ]
            if not kept:
                raise NoConfigFitsError(_no_fit_message(name, x.dtype, x.device))
            return kept

        return triton.autotune(
            configs=configs,
            key=key,
            prune_configs_by={"early_config_prune": prune},
            cache_results=True,
        )

    @tuned("xconv_fwd", key=["M_BUCKET", "C", "COUT", "KS", "NT", "STRIDE", "DIL", "F32"])
    @triton.jit(do_not_specialize=["M", "M_BUCKET"])
    def xconv_fwd_kernel(
        x_ptr, ws_ptr, wp_ptr, bias_ptr, init_ptr, out_ptr,
        M, M_BUCKET, C, COUT, H, W, HO, WO,
        sxn, sxc, sxh, sxw,
        son, soc, soh, sow,
        sin_, sic, sih, siw,
        STRIDE: tl.constexpr, OFF: tl.constexpr, DIL: tl.constexpr, KS: tl.constexpr,
        SHIFT: tl.constexpr, NT: tl.constexpr,
        FUSE_RING: tl.constexpr, SEP_RING: tl.constexpr,
        FUSE_CENTER: tl.constexpr, SEP_CENTER: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Rows: output pixels (n, oh, ow); columns: output channels; K: (position, channel).
        # q = p * STRIDE + OFF is the read centre; the kxk window sits at q + ((kh - R) * DIL,
        # (kw - R) * DIL), the PSSA ring at q + (i * SHIFT, j * SHIFT). Every offset is a
        # compile-time constant.
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
        # Positions, in order: the kxk window (row-major); then, unless the window covers them,
        # the 8 ring taps; then the centre tap, unless the window's centre covers it.
        R: tl.constexpr = (KS - 1) // 2
        CENTER_T: tl.constexpr = NT - 1
        N_RING: tl.constexpr = 8 if SEP_RING else 0
        N_POS: tl.constexpr = KS * KS + N_RING + (1 if SEP_CENTER else 0)
        c_rows = x_img + qh * sxh + qw * sxw
        for pos in tl.static_range(N_POS):
            if pos < KS * KS:
                DH = (pos // KS - R) * DIL
                DW = (pos % KS - R) * DIL
                HAS_STATIC = True
                if pos == R * KS + R:  # the window's centre: q itself
                    PT = CENTER_T if FUSE_CENTER else -1
                elif FUSE_RING:  # 3x3 window == the PSSA ring: one load feeds both dots
                    PT = pos - pos // 5
                else:
                    PT = -1
            elif pos < KS * KS + N_RING:
                J = pos - KS * KS
                DH = ((J + J // 4) // 3 - 1) * SHIFT
                DW = ((J + J // 4) % 3 - 1) * SHIFT
                HAS_STATIC = False
                PT = J
            else:
                DH = 0
                DW = 0
                HAS_STATIC = False
                PT = CENTER_T
            # One read position q + (DH, DW) over all channel blocks: the activation tile feeds
            # the static tap ``pos`` and, times the centre tile, the product tap PT (if >= 0).
            sh = qh + DH
            sw = qw + DW
            ok = m_ok & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
            a_rows = x_img + sh * sxh + sw * sxw
            for c0 in range(0, C, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < C
                a = tl.load(
                    a_rows[:, None] + (offs_k * sxc)[None, :],
                    mask=ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if HAS_STATIC:
                    b = tl.load(
                        ws_ptr + (pos * C + offs_k)[:, None] * COUT + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    if UPCAST:  # see pssa_bwd_w_kernel
                        acc = tl.dot(
                            a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee"
                        )
                    elif F32:
                        acc = tl.dot(a, b, acc, input_precision="tf32")
                    else:
                        acc = tl.dot(a, b, acc)
                if PT >= 0:
                    if DH * DH + DW * DW == 0:
                        xc = a  # the centre itself (its mask is q_ok)
                    else:
                        xc = tl.load(
                            c_rows[:, None] + (offs_k * sxc)[None, :],
                            mask=q_ok[:, None] & k_ok[None, :],
                            other=0.0,
                        )
                    # Rounded to the input dtype, as the reference's elementwise product is.
                    p = (xc.to(tl.float32) * a.to(tl.float32)).to(a.dtype)
                    bp = tl.load(
                        wp_ptr + (PT * C + offs_k)[:, None] * COUT + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    if UPCAST:
                        acc = tl.dot(
                            p.to(tl.float32), bp.to(tl.float32), acc, input_precision="ieee"
                        )
                    elif F32:
                        acc = tl.dot(p, bp, acc, input_precision="tf32")
                    else:
                        acc = tl.dot(p, bp, acc)
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

    @tuned("pssa_bwd_w", key=["M_BUCKET", "C", "COUT", "NT", "STRIDE", "F32"])
    @triton.jit(do_not_specialize=["M", "M_BUCKET", "M_PER_SPLIT"])
    def pssa_bwd_w_kernel(
        x_ptr, gy_ptr, taps_ptr, part_ptr,
        M, M_BUCKET, C, COUT, H, W, HO, WO, M_PER_SPLIT,
        sxn, sxc, sxh, sxw,
        sgn, sgc, sgh, sgw,
        STRIDE: tl.constexpr, OFF: tl.constexpr, NT: tl.constexpr, F32: tl.constexpr,
        UPCAST: tl.constexpr,
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
            # UPCAST: the interpreter's tl.dot multiplies bf16 bit patterns
            # (triton-lang/triton#11584); a bf16 product is exact in fp32, so this computes what
            # a bf16 tensor-core dot with fp32 accumulation does.
            if UPCAST:
                acc = tl.dot(p.to(tl.float32), g.to(tl.float32), acc, input_precision="ieee")
            elif F32:
                acc = tl.dot(p, g, acc, input_precision="tf32")
            else:
                acc = tl.dot(p, g, acc)
        part = part_ptr + ((split * NT + t) * C + offs_c)[:, None] * COUT + offs_o[None, :]
        tl.store(part, acc, mask=c_ok[:, None] & o_ok[None, :])

    @tuned("pssa_bwd_x", key=["M_BUCKET", "C", "NT", "STRIDE"])
    @triton.jit(do_not_specialize=["MX", "M_BUCKET"])
    def pssa_bwd_x_kernel(
        x_ptr, g_ptr, taps_ptr, dx_ptr,
        MX, M_BUCKET, C, H, W, HO, WO,
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
_INTERP_BLOCKS = {
    "xconv_fwd": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16},
    "pssa_bwd_w": {"BLOCK_C": 16, "BLOCK_O": 16, "BLOCK_M": 16},
    "pssa_bwd_x": {"BLOCK_Q": 32, "BLOCK_C": 16},
}


def tf32_allowed() -> bool:
    """Whether fp32 inputs may use TF32 dots: torch's switch for convolutions
    (``torch.backends.cudnn.allow_tf32``, on by default, as cuDNN's convolutions use TF32), since
    the kernels compute a convolution. Read at each launch, so turning it off takes effect."""
    return bool(torch.backends.cudnn.allow_tf32)


def _dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """F32: TF32 dots for fp32 inputs when ``tf32_allowed()``; UPCAST: exact fp32 ("ieee") dots,
    for fp32 inputs with TF32 off and for bf16 under the interpreter (numpy has no bf16)."""
    fp32 = dtype == torch.float32
    tf32 = fp32 and tf32_allowed()
    upcast = (fp32 and not tf32) or (dtype == torch.bfloat16 and interpreting())
    return {"F32": tf32, "UPCAST": upcast}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=64)
def _taps_tensor(taps: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """The taps as an int32 device tensor, made once per (taps, device): no host copy per call."""
    flat = [v for tap in taps for v in tap] or [0, 0]
    return torch.tensor(flat, dtype=torch.int32, device=device)


def _empty_like_layout(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def _is_channels_last(x: Tensor) -> bool:
    return x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def _launch(
    name: str,
    grid: Callable[[dict], tuple[int, ...]],
    args: tuple,
    meta: dict,
    x: Tensor,
    tune: bool,
) -> None:
    """Launch kernel ``name``: autotuned (``tune``), with the fixed config, or with the
    interpreter's blocks; ``grid`` maps a block config to the launch grid in every case."""
    if _CAPTURE is not None:
        _CAPTURE.append((name, args, meta))
        return
    k = _kernels()
    kernel = getattr(k, name)
    if k.interpret:
        blocks = _INTERP_BLOCKS[name]
        kernel[grid(blocks)](*args, **meta, **blocks)
    elif tune:
        kernel[grid](*args, **meta)
    else:
        cfg = fixed_config(name, x.dtype, x.device)
        kernel.fn[grid(cfg["blocks"])](
            *args, **meta, **cfg["blocks"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launchers


def pack_weights(
    weight: Tensor | None, pssa_weight: Tensor | None, n_taps: int, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None]:
    """K-major weights (K rows, C_out contiguous) in ``dtype``: static [k, k, C, C_out] and
    PSSA [t, C, C_out]. Callers that run the same weights often cache the result."""
    ws = weight.permute(2, 3, 1, 0).to(dtype).contiguous() if weight is not None else None
    wp = None
    if pssa_weight is not None:
        cout, cn = pssa_weight.shape[:2]
        wp = pssa_weight.reshape(cout, cn // n_taps, n_taps).permute(2, 1, 0).to(dtype)
        wp = wp.contiguous()
    return ws, wp


def _position_flags(ks: int, dilation: int, taps: tuple[tuple[int, int], ...]) -> dict:
    params = _tap_params(taps) if taps else (0, False)
    if params is None:
        raise ValueError(f"{UNSUPPORTED_MESSAGE} (taps={taps})")
    shift, center = params
    fuse_ring = ks == 3 and shift > 0 and dilation == shift
    return dict(
        SHIFT=shift,
        NT=len(taps),
        FUSE_RING=fuse_ring,
        SEP_RING=shift > 0 and not fuse_ring,
        FUSE_CENTER=center and ks > 0,
        SEP_CENTER=center and ks == 0,
    )


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
    packed: tuple[Tensor | None, Tensor | None] | None = None,
    tune: bool = False,
) -> Tensor:
    """b + Conv_kxk(x; weight) + Conv1x1(T; pssa_weight) [+ init] in one kernel (groups=1).

    ``weight`` None: PSSA only. Weights are cast to x's dtype (call under autocast's dtype);
    ``packed``: the ``pack_weights`` result for them, when the caller caches it. ``tune``:
    autotune over ``CONFIGS`` (else the fixed config).
    """
    taps = tuple(taps) if pssa_weight is not None else ()
    _check(x, 1, taps or None)
    n, c, h, w = x.shape
    ho, wo = out_size
    ks = 0 if weight is None else weight.shape[-1]
    cout = (weight if weight is not None else pssa_weight).shape[0]  # type: ignore[union-attr]
    dtype = x.dtype
    ws, wp = packed if packed is not None else pack_weights(weight, pssa_weight, len(taps), dtype)
    dummy = x.new_empty(1)
    if n * cout * ho * wo > _INT32_MAX:  # the kernels index the output with int32 offsets
        raise ValueError(f"{UNSUPPORTED_MESSAGE} (the output has {n * cout * ho * wo} elements)")
    out = _empty_like_layout(x, (n, cout, ho, wo), dtype)
    if init is not None and init.shape != out.shape:
        raise ValueError(f"init has shape {tuple(init.shape)}, expected {tuple(out.shape)}")
    init_t = init if init is not None else out
    m = n * ho * wo
    # The kxk window's centre q = p * stride + pssa_offset for any padding (see geometry).
    args = (
        x, ws if ws is not None else dummy, wp if wp is not None else dummy,
        bias if bias is not None else dummy, init_t, out,
        m, _bucket(m), c, cout, h, w, ho, wo,
        *x.stride(), *out.stride(), *init_t.stride(),
    )  # fmt: skip
    if ks and pssa_offset != dilation * (ks - 1) // 2 - padding:
        raise ValueError(f"pssa_offset {pssa_offset} is not the window centre of this conv")
    meta = dict(
        STRIDE=stride, OFF=pssa_offset, DIL=dilation, KS=ks,
        **_position_flags(ks, dilation, taps), HAS_BIAS=bias is not None,
        HAS_INIT=init is not None, **_dot_flags(dtype),
    )  # fmt: skip
    grid = lambda b: (_cdiv(m, b["BLOCK_M"]), _cdiv(cout, b["BLOCK_N"]))  # noqa: E731
    _launch("xconv_fwd", grid, args, meta, x, tune)
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
    packed: tuple[Tensor | None, Tensor | None] | None = None,
    tune: bool = False,
) -> Tensor:
    """The deploy X-volution operator as one implicit GEMM (``XConv2dDeploy.forward``)."""
    if weight.shape[1] != x.shape[1]:
        raise ValueError(UNSUPPORTED_MESSAGE + f" (groups={x.shape[1] // weight.shape[1]})")
    return xconv_fwd(
        x, pssa_weight, taps, pssa_offset, out_size, stride, weight, padding, dilation, bias,
        packed=packed, tune=tune,
    )  # fmt: skip


def pssa_forward(
    x: Tensor, weight: Tensor, geom: PSSAGeometry, init: Tensor | None = None, tune: bool = False
) -> Tensor:
    """PSSA(x) (training form's PSSA branch, before BN_A) without materializing T."""
    _check(x, geom.groups, geom.taps)
    return xconv_fwd(
        x, weight, geom.taps, geom.offset, geom.out_size, geom.stride, init=init, tune=tune
    )


def pssa_backward_weight(
    x: Tensor,
    grad_y: Tensor,
    geom: PSSAGeometry,
    m_per_split: int | None = None,
    tune: bool = False,
) -> Tensor:
    """dW_A (C_out x C*n_taps x 1 x 1, channel-major) with the products formed on the fly."""
    _check(x, geom.groups, geom.taps)
    n, c, h, w = x.shape
    ho, wo = geom.out_size
    cout = grad_y.shape[1]
    nt = geom.n_taps
    m = n * ho * wo
    if grad_y.numel() > _INT32_MAX:
        raise ValueError(f"{UNSUPPORTED_MESSAGE} (grad_y has {grad_y.numel()} elements)")
    if m_per_split is None:
        # ~8 pixel splits for parallelism; a multiple of 256 so every BLOCK_M divides it.
        m_per_split = max(256, _cdiv(_cdiv(m, 8), 256) * 256)
    if interpreting() and m_per_split % _INTERP_BLOCKS["pssa_bwd_w"]["BLOCK_M"]:
        raise ValueError(f"m_per_split must be a multiple of {_INTERP_BLOCKS['pssa_bwd_w']}")
    split = _cdiv(m, m_per_split)
    part = torch.empty((split, nt, c, cout), dtype=torch.float32, device=x.device)
    grad_y = grad_y.to(x.dtype)
    args = (
        x, grad_y, _taps_tensor(geom.taps, x.device), part,
        m, _bucket(m), c, cout, h, w, ho, wo, m_per_split,
        *x.stride(), *grad_y.stride(),
    )  # fmt: skip
    meta = dict(STRIDE=geom.stride, OFF=geom.offset, NT=nt, **_dot_flags(x.dtype))
    grid = lambda b: (_cdiv(c, b["BLOCK_C"]), _cdiv(cout, b["BLOCK_O"]), nt * split)  # noqa: E731
    _launch("pssa_bwd_w", grid, args, meta, x, tune)
    # [t, c, o] -> W_A[o, c * nt + t]
    return part.sum(0).permute(2, 1, 0).reshape(cout, c * nt, 1, 1)


def pssa_backward_input(
    x: Tensor, weight: Tensor, grad_y: Tensor, geom: PSSAGeometry, tune: bool = False
) -> Tensor:
    """dx of PSSA: G = W_A^T gy by one GEMM (tap-major), then a gather kernel forms dx."""
    _check(x, geom.groups, geom.taps)
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
    args = (
        x, g.contiguous(), _taps_tensor(geom.taps, x.device), dx,
        mx, _bucket(mx), c, h, w, ho, wo, *x.stride(), *dx.stride(),
    )  # fmt: skip
    meta = dict(STRIDE=geom.stride, OFF=geom.offset, NT=nt)
    grid = lambda b: (_cdiv(mx, b["BLOCK_Q"]), _cdiv(c, b["BLOCK_C"]))  # noqa: E731
    _launch("pssa_bwd_x", grid, args, meta, x, tune)
    return dx


def pssa_backward(
    x: Tensor,
    weight: Tensor,
    grad_y: Tensor,
    geom: PSSAGeometry,
    need_x: bool,
    need_w: bool,
    tune: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dW_A) of PSSA through the Triton kernels (the lean path's backward, fused)."""
    gx = pssa_backward_input(x, weight, grad_y, geom, tune) if need_x else None
    gw = pssa_backward_weight(x, grad_y, geom, tune=tune).to(weight.dtype) if need_w else None
    return gx, gw
