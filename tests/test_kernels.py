"""Triton kernels (xvol/ops/triton_xconv.py) against the PyTorch reference.

On CPU the kernels run under Triton's interpreter: ``triton.jit`` reads TRITON_INTERPRET when a
kernel is decorated, and triton_xconv decorates its kernels on first use, per interpreter mode,
so the ``interpret`` fixture only has to set the variable (monkeypatch) before the call; nothing
leaks into other test modules. Shapes are tiny (the interpreter runs each program in numpy).

Tolerances (float32): rtol=1e-4, atol=1e-5 for outputs and gradients (the kernels sum taps and
channels in another order, and dW over pixel splits). bf16/fp16: a few units in the last place of
the output dtype, relative to the output's magnitude.
GPU tests (``-m gpu``) run on CUDA only and are skipped here.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn

pytest.importorskip("triton")

from xvol.ops import pssa_lean, triton_xconv  # noqa: E402
from xvol.ops.xconv import XConv2d, XConv2dDeploy  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared CPU OpenMP barriers
    stall on busy cores (runtimes here varied 7x with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_xconv.interpreting()


def _module(cin, cout, k, s, p, d=1, shifts=(1,), center=False, seed=0) -> XConv2d:
    torch.manual_seed(seed)
    m = XConv2d(cin, cout, k, s, p, d, shifts=shifts, center=center, impl="reference")
    return randomize_bn(m, torch.Generator().manual_seed(seed + 1))


def _input(n, c, h, w, channels_last=False, dtype=torch.float32, seed=0) -> torch.Tensor:
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# (in, out, kernel, stride, padding, dilation, shifts, center, channels_last)
SLOTS = [
    pytest.param(8, 8, 3, 1, 1, 1, (1,), False, False, id="s1"),
    pytest.param(8, 6, 3, 2, 1, 1, (1,), False, True, id="s2-cl-cout6"),
    pytest.param(20, 18, 3, 1, 1, 1, (1,), False, True, id="c20-two-k-blocks"),
    pytest.param(4, 4, 3, 2, 0, 1, (1, 2), True, False, id="pad0-offset-shifts-center"),
    pytest.param(4, 5, 3, 1, 2, 2, (1,), False, True, id="dilation2"),
]


def test_interpreter_mode_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 4, 3, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_xconv.interpreting() and not triton_xconv.available(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_xconv.interpreting() and triton_xconv.available(x)


@pytest.mark.parametrize("cin,cout,k,s,p,d,shifts,center,cl", SLOTS)
def test_pssa_forward_kernel_matches_reference(
    interpret, cin, cout, k, s, p, d, shifts, center, cl
):
    m = _module(cin, cout, k, s, p, d, shifts, center)
    x = _input(2, cin, 6, 6, cl)
    geom = pssa_lean.geometry_of(m, x)
    with torch.no_grad():
        expected = m.pssa(m.transform(x))
        got = triton_xconv.pssa_forward(x, m.pssa.weight, geom)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize("cin,cout,k,s,p,d,shifts,center,cl", SLOTS)
def test_deploy_kernel_matches_reference_module(
    interpret, cin, cout, k, s, p, d, shifts, center, cl
):
    deploy = _module(cin, cout, k, s, p, d, shifts, center).eval().reparameterize()
    assert isinstance(deploy, XConv2dDeploy)
    fused = copy.deepcopy(deploy)
    fused.impl = "triton"
    x = _input(2, cin, 6, 6, cl)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), deploy(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("cin,cout,k,s,p,d,shifts,center,cl", SLOTS[:4])
def test_pssa_backward_kernels_match_autograd(interpret, cin, cout, k, s, p, d, shifts, center, cl):
    m = _module(cin, cout, k, s, p, d, shifts, center)
    x = _input(2, cin, 6, 6, cl).requires_grad_()
    w = m.pssa.weight.detach().clone().requires_grad_()
    geom = pssa_lean.geometry_of(m, x)
    y = F.conv2d(m.transform(x), w)
    grad_y = torch.randn_like(y)
    gx_ref, gw_ref = torch.autograd.grad(y, (x, w), grad_y)
    gx, gw = triton_xconv.pssa_backward(x.detach(), w.detach(), grad_y, geom, True, True)
    torch.testing.assert_close(gx, gx_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gw, gw_ref, rtol=RTOL, atol=ATOL)
    # Several pixel splits (reduced in fp32 afterwards) give the same dW.
    gw_split = triton_xconv.pssa_backward_weight(x.detach(), grad_y, geom, m_per_split=16)
    torch.testing.assert_close(gw_split, gw_ref, rtol=RTOL, atol=ATOL)


def test_pssa_kernel_accumulates_onto_a_given_map(interpret):
    """``init``: PSSA added onto an existing output (e.g. a cuDNN conv's), still one pass."""
    m = _module(8, 6, 3, 2, 1)
    x = _input(2, 8, 6, 6, channels_last=True)
    geom = pssa_lean.geometry_of(m, x)
    with torch.no_grad():
        base = m.conv(x)
        got = triton_xconv.pssa_forward(x, m.pssa.weight, geom, init=base)
        expected = base + m.pssa(m.transform(x))
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("stride", [1, 2])
def test_xconv_training_step_triton_matches_reference(interpret, stride):
    ref = _module(8, 8, 3, stride, 1)
    tri = copy.deepcopy(ref)
    tri.impl = "triton"
    x = _input(2, 8, 6, 6, channels_last=True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [m(xi) for m, xi in zip((ref, tri), xs)]
    torch.testing.assert_close(outs[1], outs[0], rtol=RTOL, atol=ATOL)
    grad_out = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad_out)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=RTOL, atol=ATOL)
    for (name, a), (_, b) in zip(ref.named_parameters(), tri.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=RTOL, atol=ATOL, msg=name)
    for (name, a), (_, b) in zip(ref.named_buffers(), tri.named_buffers()):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=name)


def test_pssa_triton_function_saves_only_input_and_weight(interpret):
    m = _module(8, 8, 3, 1, 1)
    x = _input(2, 8, 6, 6).requires_grad_()
    w = m.pssa.weight
    geom = pssa_lean.geometry_of(m, x)
    report = pssa_lean.saved_tensors_report(
        lambda: pssa_lean.pssa_lean(x, w, geom, backend="triton"), [w]
    )
    assert report.activation_bytes == x.numel() * x.element_size()
    assert report.per_channel_bytes == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs_accumulate_in_fp32(interpret, dtype):
    deploy = _module(8, 8, 3, 1, 1).eval().reparameterize()
    x = _input(2, 8, 6, 6, channels_last=True, dtype=dtype)
    geom = pssa_lean.geometry_of(deploy, x)
    w, w_a = deploy.weight.to(dtype), deploy.pssa_weight.to(dtype)
    with torch.no_grad():
        got = triton_xconv.xconv_deploy(
            x, w, w_a, deploy.bias, geom.taps, 1, 1, 1, geom.offset, geom.out_size
        )
        # Reference in fp32 from the same rounded inputs and rounded products (as the kernel).
        expected = F.conv2d(x.float(), w.float(), deploy.bias, 1, 1)
        expected += pssa_lean.pssa_forward_taps(x, w_a, geom).float()  # products in dtype
    assert got.dtype == dtype
    scale = expected.abs().max()
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=4 * _eps(dtype) * scale)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def test_groups_are_rejected_clearly(interpret):
    m = XConv2d(8, 8, 3, 1, 1, groups=2, impl="triton")
    x = _input(1, 8, 5, 5)
    with pytest.raises(ValueError, match="groups=1"):
        m(x)
    m.impl = "auto"  # auto never picks an unsupported kernel
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (1, 8, 5, 5)


def test_auto_does_not_use_the_interpreter(interpret):
    x = _input(1, 4, 5, 5)
    assert pssa_lean.resolve_impl("auto", x, False, True) == "reference"
    assert pssa_lean.resolve_impl("triton", x, False, True) == "triton"


def test_self_test_passes_under_the_interpreter(interpret):
    triton_xconv.self_test.cache_clear()
    assert triton_xconv.self_test(torch.device("cpu"))
    triton_xconv.self_test.cache_clear()


_AOT_SCRIPT = textwrap.dedent(
    """
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from xvol.ops import triton_xconv as tx

    FLOAT = {"bias_ptr": "*fp32", "part_ptr": "*fp32", "taps_ptr": "*i32"}
    k = tx._kernels()
    assert not k.interpret
    cases = {
        "xconv_fwd": (k.xconv_fwd, dict(STRIDE=2, PAD=1, DIL=1, OFF=0, KS=3, NT=8, HAS_BIAS=True,
                      HAS_INIT=False, DOT_F32=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)),
        "pssa_bwd_w": (k.pssa_bwd_w, dict(STRIDE=1, OFF=0, NT=8, DOT_F32=False, BLOCK_C=64,
                       BLOCK_O=64, BLOCK_M=64)),
        "pssa_bwd_x": (k.pssa_bwd_x, dict(STRIDE=2, OFF=0, NT=8, BLOCK_Q=64, BLOCK_C=64)),
    }
    out = {}
    for name, (kernel, const) in cases.items():
        fn = kernel.fn
        sig = {a: "constexpr" if a in const else FLOAT.get(a, "*bf16" if a.endswith("_ptr")
               else "i32") for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(c),): v for c, v in const.items()})
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, num_stages=3))
        out[name] = {"cubin": len(ck.asm["cubin"]), "wgmma": ck.asm["ptx"].count("wgmma")}
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """Compiled mode (not the interpreter) lowers all three kernels to sm_90 cubins; the GEMM
    kernels use Hopper tensor cores (wgmma). Needs Triton's bundled ptxas, no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(v["cubin"] > 0 for v in result.values()), result
    assert result["xconv_fwd"]["wgmma"] > 0 and result["pssa_bwd_w"]["wgmma"] > 0, result


# --------------------------------------------------------------------------------------------
# GPU (compiled kernels, autotuned): run with `pytest -m gpu` on a CUDA machine.


@pytest.fixture
def no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 references in full precision (cuDNN/cuBLAS default to TF32 for convolutions)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("stride", [1, 2])
def test_gpu_deploy_bf16_channels_last_resnet_slot(stride):
    deploy = _module(256, 256, 3, stride, 1).eval().reparameterize().cuda()
    fused = copy.deepcopy(deploy)
    fused.impl = "triton"
    deploy.impl = "reference"
    x = _input(8, 256, 14 * stride, 14 * stride, channels_last=True).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got, expected = fused(x), deploy(x)
    assert got.dtype == torch.bfloat16
    scale = expected.float().abs().max()
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0.02 * scale)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_training_step_triton_matches_lean(no_tf32, dtype):
    lean = _module(64, 64, 3, 1, 1).cuda()
    lean.impl = "lean"
    tri = copy.deepcopy(lean)
    tri.impl = "triton"
    x = _input(4, 64, 14, 14, channels_last=True).cuda()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        outs = [m(xi) for m, xi in zip((lean, tri), xs)]
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(outs[1].float(), outs[0].float(), **tol)
    for out in outs:
        out.float().square().mean().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **tol)
    torch.testing.assert_close(tri.pssa.weight.grad, lean.pssa.weight.grad, **tol)
