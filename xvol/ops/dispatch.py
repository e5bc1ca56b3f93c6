"""Which backend computes an X-volution slot: the one place that decides.

Backends (``impl=`` of ``XConv2d`` / ``XConv2dDeploy``):

* ``reference``: ``xconv.pssa_transform`` + a 1x1 conv; autograd keeps T (the ground truth).
* ``lean``: PSSA tap by tap, BN_A fused, only x and W_A saved; products recomputed in backward
  (``pssa_lean``).
* ``gemm``: T built by one elementwise pass, then ONE K = 9mC GEMM (cuBLAS); nothing T-sized is
  saved, T is rebuilt in backward (``pssa_gemm``).
* ``triton``: fused implicit-GEMM kernels, products formed in registers (``triton_xconv``),
  autotuned (results cached across processes).
* ``auto``:
    - training (autograd records): ``gemm`` on CUDA (one big GEMM instead of 8m thin ones;
      nothing T-sized saved), ``lean`` elsewhere (the CPU is compute-bound: the 1/9 of
      product columns that ``gemm`` spends on the centre is not free there);
    - inference on CUDA: the fused Triton kernel (one fixed config, no autotuning) for
      bf16/fp16 slots it supports, once that kernel ran on that (shape, dtype, layout) and
      matched ``gemm`` on the same input; any Triton error or mismatch disables it for that
      key with one warning naming the cause, and the slot uses ``gemm``. ``XVOL_TRITON=0``
      turns Triton off under ``auto``;
    - inference on CPU: ``reference``.

An explicit ``triton`` that cannot run here (no Triton, or a CPU tensor without
TRITON_INTERPRET=1) falls back to ``lean`` with a one-time warning; an unsupported slot raises.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor, nn

from xvol.ops import pssa_gemm, triton_xconv
from xvol.ops.geometry import PSSAGeometry, geometry_of
from xvol.ops.pssa_lean import LEAN, Backend, pssa_bn_lean, pssa_lean

__all__ = [
    "IMPLS",
    "CONCRETE_IMPLS",
    "GEMM",
    "check_impl",
    "deploy_pssa",
    "resolve_impl",
    "set_impl",
    "train_pssa_bn",
    "triton_backend",
    "triton_supports",
]

logger = logging.getLogger(__name__)

IMPLS: tuple[str, ...] = ("auto", "reference", "lean", "gemm", "triton")
CONCRETE_IMPLS: tuple[str, ...] = IMPLS[1:]

GEMM = Backend("gemm", pssa_gemm.pssa_forward, pssa_gemm.pssa_backward, save_bn_input=True)


@functools.cache
def triton_backend(tune: bool) -> Backend:
    """The Triton kernels as a ``Backend``: autotuned (explicit ``triton``) or fixed config."""
    return Backend(
        "triton",
        functools.partial(triton_xconv.pssa_forward, tune=tune),
        functools.partial(triton_xconv.pssa_backward, tune=tune),
        save_bn_input=True,
    )


_BACKENDS = {"lean": lambda: LEAN, "gemm": lambda: GEMM, "triton": lambda: triton_backend(True)}


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def set_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` on every X-volution module of ``model``; returns how many were set."""
    check_impl(impl)
    n = 0
    for module in model.modules():
        if hasattr(module, "impl") and hasattr(module, "taps"):
            module.impl = impl
            n += 1
    return n


def needs_grad(x: Tensor, *params: Tensor) -> bool:
    """Whether autograd records this call (then nothing T-sized may be saved)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def triton_supports(module: nn.Module, x: Tensor) -> bool:
    """Whether the Triton kernels cover this slot and input: decided here, once per call."""
    return triton_xconv.supports(module.groups, module.kernel_size[0], x.dtype, module.taps)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _triton_allowed_by_env() -> bool:
    return os.environ.get("XVOL_TRITON", "1").strip().lower() not in ("0", "false", "no", "off")


def resolve_impl(impl: str, module: nn.Module, x: Tensor, grad: bool) -> str:
    """The concrete backend for ``impl`` on this slot and input (see the module docstring).

    ``auto`` may return "triton?" for inference on CUDA: Triton, pending the per-key check done
    by the caller through ``_verified_triton``.
    """
    check_impl(impl)
    if impl == "auto":
        if grad:
            return "gemm" if x.is_cuda else "lean"
        if not x.is_cuda:
            return "reference"
        if (
            x.dtype in (torch.float16, torch.bfloat16)
            and _triton_allowed_by_env()
            and triton_xconv.available(x)
            and triton_supports(module, x)
        ):
            return "triton?"
        return "gemm"
    if impl == "triton":
        if not triton_supports(module, x):
            raise ValueError(triton_xconv.UNSUPPORTED_MESSAGE)
        if not triton_xconv.available(x):
            _warn_once(
                "impl='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                "using the lean PyTorch path"
            )
            return "lean"
    return impl


# (kind, geometry, shape, dtype, channels_last) -> whether the Triton kernel matched.
_TRITON_OK: dict[tuple, bool] = {}


def _verified_triton(key: tuple, run_triton, run_reference) -> Tensor:
    """Run the Triton path for ``key`` if it is known good; on first sight, run both, compare,
    and remember. Any error or mismatch: one warning naming the cause; the reference's output
    is returned and the key stays on the reference from then on."""
    verdict = _TRITON_OK.get(key)
    if verdict is True:
        return run_triton()
    if verdict is False:
        return run_reference()
    expected = run_reference()
    try:
        got = run_triton()
        scale = expected.float().abs().max().clamp_min(1e-6)
        err = (got.float() - expected.float()).abs().max() / scale
        ok = bool(torch.isfinite(got).all()) and float(err) <= 2e-2
        cause = None if ok else f"output differs from the gemm path (max rel. error {err:.3g})"
    except Exception as e:  # OutOfResources, NoConfigFitsError, compile errors, driver errors
        ok, cause = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _TRITON_OK[key] = ok
    if not ok:
        logger.warning(
            "Triton X-volution kernel not used for %s %s (%s); using the gemm path", key[0],
            tuple(key[2]), cause,
        )  # fmt: skip
        return expected
    return got


def _key(kind: str, geom: PSSAGeometry, x: Tensor) -> tuple:
    return (kind, geom, tuple(x.shape), x.dtype, triton_xconv._is_channels_last(x), x.device)


def train_pssa_bn(module: nn.Module, x: Tensor, impl: str) -> Tensor:
    """BN_A(PSSA(x)) of an XConv2d for a concrete non-reference ``impl`` (or "triton?")."""
    geom = geometry_of(module, x)
    weight, bn = module.pssa.weight, module.pssa_bn
    if impl == "triton?" and bn.training:  # BN would update its running stats twice
        impl = "gemm"
    if impl != "triton?":
        return pssa_bn_lean(x, weight, bn, geom, _BACKENDS[impl]())
    # Inference: no running-stat update happens in eval, so both runs are side-effect free.
    return _verified_triton(
        _key("PSSA", geom, x),
        lambda: pssa_bn_lean(x, weight, bn, geom, triton_backend(False)),
        lambda: pssa_bn_lean(x, weight, bn, geom, GEMM),
    )


def deploy_pssa(module: nn.Module, x: Tensor, impl: str, y_conv) -> Tensor:
    """XConv2dDeploy's output for a concrete non-reference ``impl`` (or "triton?").

    ``y_conv``: a callable giving Conv_kxk(x; W) + b (the cuDNN part) for the PyTorch backends.
    """
    geom = geometry_of(module, x)
    grad = needs_grad(x, module.weight, module.pssa_weight, module.bias)
    if impl in ("lean", "gemm") or (impl == "triton" and grad):  # the fused kernel has no backward
        return y_conv() + pssa_lean(x, module.pssa_weight, geom, _BACKENDS[impl]())

    def fused() -> Tensor:
        return _deploy_triton(module, x, geom, tune=impl == "triton")

    if impl == "triton":
        return fused()
    return _verified_triton(
        _key("deploy", geom, x),
        fused,
        lambda: y_conv() + pssa_lean(x, module.pssa_weight, geom, GEMM),
    )


def _deploy_triton(module: nn.Module, x: Tensor, geom: PSSAGeometry, tune: bool) -> Tensor:
    """One fused implicit GEMM (inference); the K-major packed weights are cached per module
    and rebuilt only when a weight, its dtype or its device changes."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    w, wa = module.weight, module.pssa_weight
    key = (x.dtype, w.data_ptr(), w._version, wa.data_ptr(), wa._version)
    cache = module.__dict__.get("_packed")
    if cache is None or cache[0] != key:
        packed = triton_xconv.pack_weights(w, wa, geom.n_taps, x.dtype)
        module.__dict__["_packed"] = cache = (key, packed)
    return triton_xconv.xconv_deploy(
        x, w, wa, module.bias, geom.taps, geom.stride, module.padding[0], module.dilation[0],
        geom.offset, geom.out_size, packed=cache[1], tune=tune,
    )  # fmt: skip
