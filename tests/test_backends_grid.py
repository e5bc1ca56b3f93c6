"""Every PSSA backend agrees with ``reference`` on the whole geometry grid ``XConv2d`` accepts.

The grid: kernel 1/3/5, stride 1/2/3, dilation 1/2, groups 1/2/4, shifts (1,)/(2,)/(1,2)/(1,2,3),
center on/off, the default padding and padding 0, odd and tiny images (7x9, 5x13, 3x3, 1x1),
batch 1, channels that are not multiples of 16 (12 in, 8 out). ``lean`` and ``gemm`` run in
float64 against the reference's autograd (forward, dx, dW_A: what the autograd Function computes
itself; the BN on top is torch's), ``triton`` through the interpreter on a spread of the slots
it supports. A geometry a backend does not support is never picked by ``auto``, and an explicit
``impl=`` raises one clear error.

Each combination is a loop iteration, not a pytest case (about 4,000 tiny float64 runs): the
failures are collected and reported together, naming each geometry.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from xvol.ops import dispatch, pssa_lean, triton_xconv
from xvol.ops.geometry import geometry_of
from xvol.ops.xconv import XConv2d

KERNELS, STRIDES, DILATIONS, GROUPS = (1, 3, 5), (1, 2, 3), (1, 2), (1, 2, 4)
SHIFTS = ((1,), (2,), (1, 2), (1, 2, 3))
SIZES = ((7, 9), (5, 13), (3, 3), (1, 1))
CIN, COUT = 12, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread_module: None) -> None:
    """Thousands of tiny tensors: one intra-op thread (tests/conftest.py)."""


def grid(sizes=SIZES):
    """(XConv2d kwargs, (h, w)) for every geometry of the grid with a non-empty output."""
    for k, s, d, g, shifts, center, pad0 in itertools.product(
        KERNELS, STRIDES, DILATIONS, GROUPS, SHIFTS, (False, True), (False, True)
    ):
        p = 0 if pad0 else d * (k - 1) // 2
        if pad0 and p == d * (k - 1) // 2:
            continue  # k=1: both paddings are 0
        kwargs = dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=g, shifts=shifts,
                      center=center)  # fmt: skip
        for h, w in sizes:
            if min(h, w) + 2 * p - d * (k - 1) >= 1:
                yield kwargs, (h, w)


def _name(kwargs: dict, hw: tuple[int, int]) -> str:
    k = kwargs
    return (f"k{k['kernel_size']} s{k['stride']} p{k['padding']} d{k['dilation']} "
            f"g{k['groups']} shifts{k['shifts']} center={k['center']} {hw[0]}x{hw[1]}")  # fmt: skip


def _reference_grads(m: XConv2d, x: torch.Tensor, w: torch.Tensor, gy_seed: int):
    """PSSA(x) = Conv1x1(T; W_A) with T from the reference transform, and autograd's dx, dW_A
    for the loss (y * g).sum() with a fixed random g (O(1) gradients)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = F.conv2d(m.transform(x), w, groups=m.groups)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=y.dtype)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    return y.detach(), gy, gx, gw


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return a.shape == b.shape and bool(((a - b).abs() <= rtol * (1 + b.abs())).all())


def _check_backend(backend, kwargs, hw, seed: int, dtype=torch.float64, rtol=1e-10) -> str | None:
    """None when ``backend`` agrees with the reference, else what differs."""
    torch.manual_seed(seed)
    m = XConv2d(CIN, COUT, **kwargs, impl="reference").to(dtype)
    x = torch.randn(1, CIN, *hw, dtype=dtype)
    w = m.pssa.weight.detach()
    y, gy, gx_ref, gw_ref = _reference_grads(m, x, w, seed + 1)
    geom = geometry_of(m, x)
    try:
        got = backend.forward(x, w, geom)
        gx, gw = backend.backward(x, w, gy, geom, True, True)
    except Exception as e:  # reported with the geometry, not raised: the grid is collected
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for what, a, b in (("forward", got, y), ("dx", gx, gx_ref), ("dW_A", gw, gw_ref)):
        if not _close(a, b, rtol):
            err = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(a.shape)}"
            return f"{what} differs (max abs error {err})"
    return None


@pytest.mark.parametrize("impl", ["lean", "gemm"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_backend_matches_reference_on_the_whole_grid_float64(impl, kernel):
    backend = {"lean": pssa_lean.LEAN, "gemm": dispatch.GEMM}[impl]
    failures, n = [], 0
    for i, (kwargs, hw) in enumerate(grid()):
        if kwargs["kernel_size"] != kernel:
            continue
        n += 1
        problem = _check_backend(backend, kwargs, hw, seed=i)
        if problem:
            failures.append(f"{_name(kwargs, hw)}: {problem}")
    assert n > 300, n  # the grid is really there
    assert not failures, f"{len(failures)} of {n} geometries:\n" + "\n".join(failures[:40])


def test_the_grid_check_fails_on_a_broken_backend():
    """The check above can fail: a backend whose dx is zeroed, or whose dW_A is perturbed by
    one part in a thousand, is caught on a multi-shift, grouped, strided slot."""
    kwargs = dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=2, shifts=(1, 2),
                  center=True)  # fmt: skip

    def zero_dx(x, w, gy, geom, need_x, need_w):
        gx, gw = dispatch.GEMM.backward(x, w, gy, geom, need_x, need_w)
        return torch.zeros_like(gx), gw

    def perturbed_dw(x, w, gy, geom, need_x, need_w):
        gx, gw = dispatch.GEMM.backward(x, w, gy, geom, need_x, need_w)
        return gx, gw * (1 + 1e-3)

    for backward, what in ((zero_dx, "dx differs"), (perturbed_dw, "dW_A differs")):
        broken = pssa_lean.Backend("broken", dispatch.GEMM.forward, backward, True)
        assert what in (_check_backend(broken, kwargs, (7, 9), seed=0) or "")
    assert _check_backend(dispatch.GEMM, kwargs, (7, 9), seed=0) is None


def test_gemm_multi_shift_backward_at_stride_1():
    """The case that crashed: several shifts at stride 1 (the fold region of each shift)."""
    for shifts in ((1, 2), (1, 2, 3)):
        kwargs = dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=1, shifts=shifts,
                      center=False)  # fmt: skip
        assert _check_backend(dispatch.GEMM, kwargs, (10, 12), seed=3) is None


# --------------------------------------------------------------------------------------------
# Triton through the interpreter, on the slots it supports


def _triton_supported(kwargs) -> bool:
    m = XConv2d(CIN, COUT, **kwargs)
    return triton_xconv.supports(m.groups, m.kernel_size[0], torch.float32, m.taps)


def test_triton_supports_exactly_what_its_docstring_says():
    """groups=1 and one shift distance (center allowed), any odd kernel, stride, dilation."""
    for kwargs, _ in grid(sizes=((7, 9),)):
        expected = kwargs["groups"] == 1 and len(kwargs["shifts"]) == 1
        assert _triton_supported(kwargs) == expected, kwargs


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_triton_interpreter_matches_reference_on_a_spread_of_supported_slots(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = dispatch.triton_backend(False)
    # Every kernel x stride x dilation once, the shift and center alternating; odd sizes.
    failures, n = [], 0
    for i, (k, s, d) in enumerate(itertools.product(KERNELS, STRIDES, DILATIONS)):
        kwargs = dict(kernel_size=k, stride=s, padding=d * (k - 1) // 2 if i % 3 else 0,
                      dilation=d, groups=1, shifts=((1,), (2,))[i % 2],
                      center=bool(i % 4 < 2))  # fmt: skip
        hw = (7, 9) if i % 2 else (5, 13)
        if min(hw) + 2 * kwargs["padding"] - d * (k - 1) < 1:
            continue
        n += 1
        problem = _check_backend(backend, kwargs, hw, seed=i, dtype=torch.float32, rtol=1e-4)
        if problem:
            failures.append(f"{_name(kwargs, hw)}: {problem}")
    assert n >= 16, n
    assert not failures, "\n".join(failures)


def test_auto_never_picks_triton_for_an_unsupported_slot_and_explicit_triton_raises(monkeypatch):
    """On a (stand-in) CUDA device in bf16, auto sends multi-shift and grouped slots to the
    PyTorch path; ``impl="triton"`` on them raises the one clear error."""
    monkeypatch.setattr(triton_xconv, "available", lambda x: True)
    x = _StandInCuda(torch.bfloat16)
    for kwargs in (dict(groups=2, shifts=(1,)), dict(groups=1, shifts=(1, 2))):
        m = XConv2d(CIN, COUT, 3, 1, 1, **kwargs)
        for grad in (False, True):
            assert dispatch.resolve_impl("auto", m, x, grad) in ("gemm", "lean")
        with pytest.raises(ValueError, match="Triton X-volution kernels support"):
            dispatch.resolve_impl("triton", m, x, False)
    m = XConv2d(CIN, COUT, 3, 1, 1)
    assert dispatch.resolve_impl("auto", m, x, False) == "triton?"


class _StandInCuda:
    """What dispatch reads of a CUDA input: its device, dtype and shape (no GPU here)."""

    is_cuda = True
    device = torch.device("cuda", 0)
    shape = (2, CIN, 8, 8)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def dim(self) -> int:
        return 4
