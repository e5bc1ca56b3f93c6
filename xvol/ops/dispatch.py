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
    - on CUDA, for bf16/fp16 slots the Triton kernels support (``triton_xconv.supports``; never
      a grouped or multi-shift slot), "triton?": the fused kernels, each (kind, geometry, shape,
      dtype, layout, device) checked the first time it is seen:
        * inference: the fused kernel's output against ``gemm`` on the same input;
        * training: PSSA forward AND backward (dx, dW_A, for a fixed O(1) output gradient) of
          the Triton kernels against ``gemm`` on that input, both timed; the faster correct one
          is kept.
      One fixed kernel config per kernel (``triton_xconv.fixed_config``): preparing costs one
      compile per distinct specialization, never an autotune sweep inside a run. Any error,
      mismatch or slower result keeps that key on ``gemm``, with one warning naming the cause.
      ``XVOL_TRITON=0`` turns Triton off under ``auto``;
    - otherwise on CUDA: ``gemm`` (one K = 9mC GEMM instead of 8m thin ones; nothing T-sized
      saved);
    - on CPU: ``lean`` when autograd records (the CPU is compute-bound: the 1/9 of product
      columns ``gemm`` spends on the centre is not free there), ``reference`` otherwise.

  The dtype that decides is the one the slot computes in (``compute_dtype``): autocast's when
  autocast is on for the input's device, so fp32 activations under bf16 autocast are bf16 slots.

An explicit ``triton`` that cannot run here (no Triton, or a CPU tensor without
TRITON_INTERPRET=1) falls back to ``lean`` with a one-time warning; a slot the kernels do not
support raises one ValueError (``triton_xconv.UNSUPPORTED_MESSAGE``). ``lean``, ``gemm`` and
``reference`` cover every geometry ``XConv2d`` accepts (tests/test_backends_grid.py).
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
from torch import Tensor, nn

from xvol.ops import pssa_gemm, triton_xconv
from xvol.ops.agreement import agreement
from xvol.ops.geometry import PSSAGeometry, geometry_of
from xvol.ops.pssa_lean import LEAN, Backend, pssa_bn_lean, pssa_lean

__all__ = [
    "IMPLS",
    "CONCRETE_IMPLS",
    "GEMM",
    "autotune_allowed",
    "check_impl",
    "compute_dtype",
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


def autotune_allowed() -> bool:
    """Whether an explicit ``impl="triton"`` autotunes (default) or launches the fixed config
    (``XVOL_TRITON_AUTOTUNE=0``: one compile per kernel and shape, as ``auto`` always does)."""
    value = os.environ.get("XVOL_TRITON_AUTOTUNE", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


_BACKENDS = {
    "lean": lambda: LEAN,
    "gemm": lambda: GEMM,
    "triton": lambda: triton_backend(autotune_allowed()),
}


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


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a slot computes in: autocast's for x's device when autocast is on there."""
    device_type = x.device.type
    if x.dtype.is_floating_point and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def triton_supports(module: nn.Module, x: Tensor) -> bool:
    """Whether the Triton kernels cover this slot and input: decided here, once per call."""
    return triton_xconv.supports(
        module.groups, module.kernel_size[0], compute_dtype(x), module.taps
    )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _triton_allowed_by_env() -> bool:
    return os.environ.get("XVOL_TRITON", "1").strip().lower() not in ("0", "false", "no", "off")


def _accelerated(x: Tensor) -> bool:
    """Whether ``auto`` treats x's device as a GPU (tests stand a CPU in for it)."""
    return x.is_cuda


def resolve_impl(impl: str, module: nn.Module, x: Tensor, grad: bool) -> str:
    """The concrete backend for ``impl`` on this slot and input (see the module docstring).

    ``auto`` may return "triton?" on CUDA: Triton, pending the per-key check done by the caller
    (``_verified_triton`` for inference, ``_training_backend`` for training).
    """
    check_impl(impl)
    if impl == "auto":
        if not _accelerated(x):
            return "lean" if grad else "reference"
        if (
            compute_dtype(x) in (torch.float16, torch.bfloat16)
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


# (kind, geometry, shape, dtype, channels_last, device) -> whether the Triton kernel is used.
_TRITON_OK: dict[tuple, bool] = {}
# Agreement asked of the Triton kernels against gemm (both in the slot's low precision).
TRITON_REL_TOL, TRITON_MIN_COSINE = 2e-2, 0.999


def _cause(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _refuse(key: tuple, cause: str) -> None:
    _TRITON_OK[key] = False
    logger.warning(
        "Triton X-volution kernel not used for %s %s (%s); using the gemm path", key[0],
        tuple(key[2]), cause,
    )  # fmt: skip


def _verified_triton(key: tuple, run_triton, run_reference) -> Tensor:
    """Inference: run the Triton path for ``key`` if it is known good; on first sight, run both,
    compare, and remember. Any error or mismatch: one warning naming the cause; the reference's
    output is returned and the key stays on the reference from then on."""
    verdict = _TRITON_OK.get(key)
    if verdict is True:
        return run_triton()
    if verdict is False:
        return run_reference()
    expected = run_reference()
    try:
        got = run_triton()
        match = agreement(got, expected)
        ok = match.ok(TRITON_REL_TOL, TRITON_MIN_COSINE)
        cause = None if ok else f"output differs from the gemm path ({match})"
    except Exception as e:  # OutOfResources, NoConfigFitsError, compile errors, driver errors
        ok, cause = False, _cause(e)
    if not ok:
        _refuse(key, cause)
        return expected
    _TRITON_OK[key] = True
    return got


def _key(kind: str, geom: PSSAGeometry, x: Tensor) -> tuple:
    return (kind, geom, tuple(x.shape), compute_dtype(x), triton_xconv._is_channels_last(x),
            x.device)  # fmt: skip


def _timed(fn, x: Tensor, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of ``fn()`` (after one untimed call), synchronized on CUDA."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _training_trial(x: Tensor, weight: Tensor, geom: PSSAGeometry) -> tuple[bool, str | None]:
    """PSSA forward and backward of the fixed-config Triton kernels against gemm on this input:
    (use Triton, cause when not). Side-effect free: raw PSSA (no BN), no autograd."""
    dtype = compute_dtype(x)
    with torch.no_grad():
        xc, wc = x.detach().to(dtype), weight.detach().to(dtype)
        gen = torch.Generator(device=x.device).manual_seed(0)
        out_shape = (x.shape[0], weight.shape[0], *geom.out_size)
        gy = torch.randn(out_shape, generator=gen, device=x.device, dtype=dtype)
        tri = triton_backend(False)

        def step(backend: Backend):
            return backend.forward(xc, wc, geom), *backend.backward(xc, wc, gy, geom, True, True)

        expected = step(GEMM)
        try:
            got = step(tri)
            for what, a, b in zip(("output", "dx", "dW_A"), got, expected, strict=True):
                match = agreement(a, b)
                if not match.ok(TRITON_REL_TOL, TRITON_MIN_COSINE):
                    return False, f"{what} differs from the gemm path ({match})"
            t_tri, t_gemm = _timed(lambda: step(tri), x), _timed(lambda: step(GEMM), x)
        except Exception as e:  # compile errors, OutOfResources, driver errors
            return False, _cause(e)
    if t_tri >= t_gemm:
        return False, f"slower than gemm ({1e3 * t_tri:.3g} vs {1e3 * t_gemm:.3g} ms per step)"
    return True, None


def _training_backend(key: tuple, x: Tensor, weight: Tensor, geom: PSSAGeometry) -> Backend:
    """Training: the backend ``key`` was given at first sight (``_training_trial``)."""
    verdict = _TRITON_OK.get(key)
    if verdict is None:
        verdict, cause = _training_trial(x, weight, geom)
        if verdict:
            _TRITON_OK[key] = True
        else:
            _refuse(key, cause)
    return triton_backend(False) if verdict else GEMM


def train_pssa_bn(module: nn.Module, x: Tensor, impl: str) -> Tensor:
    """BN_A(PSSA(x)) of an XConv2d for a concrete non-reference ``impl`` (or "triton?")."""
    geom = geometry_of(module, x)
    weight, bn = module.pssa.weight, module.pssa_bn
    if impl == "triton?" and (bn.training or needs_grad(x, weight)):
        backend = _training_backend(_key("PSSA train", geom, x), x, weight, geom)
        return pssa_bn_lean(x, weight, bn, geom, backend)
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
    if impl == "triton?" and grad:  # fine-tuning a deploy module: checked like a training slot
        backend = _training_backend(_key("PSSA train", geom, x), x, module.pssa_weight, geom)
        return y_conv() + pssa_lean(x, module.pssa_weight, geom, backend)
    if impl in ("lean", "gemm") or (impl == "triton" and grad):  # the fused kernel has no backward
        return y_conv() + pssa_lean(x, module.pssa_weight, geom, _BACKENDS[impl]())

    def fused() -> Tensor:
        return _deploy_triton(module, x, geom, tune=impl == "triton" and autotune_allowed())

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
