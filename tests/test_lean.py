"""The PyTorch PSSA backends against the reference path of XConv2d: ``lean`` (tap by tap,
xvol/ops/pssa_lean.py) and ``gemm`` (one elementwise pass + one GEMM, xvol/ops/pssa_gemm.py),
both inside the lean autograd Functions; and the ``impl`` dispatch (xvol/ops/dispatch.py).

Tolerances: float32 comparisons use rtol=1e-5, atol=1e-5 (the backends sum the taps in a
different order); gradients are checked in float64 with torch.autograd.gradcheck.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_forward_backward, randomize_bn
from torch import nn

from xvol.ops import dispatch, pssa_lean
from xvol.ops.geometry import PSSAGeometry, geometry_of
from xvol.ops.pssa_lean import saved_tensors_report
from xvol.ops.xconv import XConv2d, XConv2dDeploy

BACKENDS = {"lean": pssa_lean.LEAN, "gemm": dispatch.GEMM}
backends = pytest.mark.parametrize("impl", list(BACKENDS))

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread_module: None) -> None:
    """Tiny tensors on a shared CPU: one intra-op thread (tests/conftest.py)."""


# (in, out, kernel, stride, padding, dilation, groups, shifts, center)
SLOTS = [
    pytest.param(8, 8, 3, 1, 1, 1, 1, (1,), False, id="resnet-3x3-s1"),
    pytest.param(8, 12, 3, 2, 1, 1, 1, (1,), False, id="resnet-3x3-s2"),
    pytest.param(8, 6, 3, 2, 0, 1, 2, (1, 2), True, id="groups-shifts-center-pad0"),
    pytest.param(6, 6, 5, 1, 1, 1, 3, (2,), False, id="k5-offset1"),
    pytest.param(4, 6, 3, 3, 3, 2, 1, (1,), False, id="s3-dilation2-pad3"),
    pytest.param(4, 4, 1, 1, 0, 1, 1, (1,), True, id="k1-center"),
]
# The same geometries with fewer channels: gradcheck perturbs every input element.
GRAD_SLOTS = [
    pytest.param(4, 4, 3, 1, 1, 1, 1, (1,), False, id="resnet-3x3-s1"),
    pytest.param(4, 6, 3, 2, 1, 1, 1, (1,), False, id="resnet-3x3-s2"),
    pytest.param(4, 2, 3, 2, 0, 1, 2, (1, 2), True, id="groups-shifts-center-pad0"),
    pytest.param(3, 3, 5, 1, 1, 1, 3, (2,), False, id="k5-offset1"),
    pytest.param(2, 3, 3, 3, 3, 2, 1, (1,), False, id="s3-dilation2-pad3"),
    pytest.param(2, 2, 1, 1, 0, 1, 1, (1,), True, id="k1-center"),
]


def _pair(cin, cout, k, s, p, d, g, shifts, center, dtype=torch.float32, impl="lean"):
    """A reference and an ``impl`` XConv2d with identical (randomized) parameters and BN stats."""
    torch.manual_seed(0)
    ref = XConv2d(cin, cout, k, s, p, d, g, shifts=shifts, center=center, impl="reference")
    randomize_bn(ref, torch.Generator().manual_seed(1))
    ref = ref.to(dtype)
    lean = copy.deepcopy(ref)
    lean.impl = impl
    return ref, lean


@backends
@pytest.mark.parametrize("cin,cout,k,s,p,d,g,shifts,center", SLOTS)
def test_pssa_backend_matches_reference_transform(cin, cout, k, s, p, d, g, shifts, center, impl):
    ref, _ = _pair(cin, cout, k, s, p, d, g, shifts, center)
    x = torch.randn(2, cin, 9, 8)
    geom = geometry_of(ref, x)
    expected = ref.pssa(ref.transform(x))
    got = BACKENDS[impl].forward(x, ref.pssa.weight, geom)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@backends
@pytest.mark.parametrize("cin,cout,k,s,p,d,g,shifts,center", GRAD_SLOTS)
def test_pssa_backend_gradcheck_float64(cin, cout, k, s, p, d, g, shifts, center, impl):
    ref, _ = _pair(cin, cout, k, s, p, d, g, shifts, center, dtype=torch.float64)
    x = torch.randn(2, cin, 6, 5, dtype=torch.float64, requires_grad=True)
    w = ref.pssa.weight.detach().clone().requires_grad_()
    geom = geometry_of(ref, x)
    backend = BACKENDS[impl]
    assert torch.autograd.gradcheck(lambda x, w: pssa_lean.pssa_lean(x, w, geom, backend), (x, w))


@backends
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cin,cout,k,s,p,d,g,shifts,center", GRAD_SLOTS[:3])
def test_pssa_bn_gradcheck_float64(cin, cout, k, s, p, d, g, shifts, center, training, impl):
    ref, _ = _pair(cin, cout, k, s, p, d, g, shifts, center, dtype=torch.float64)
    bn = ref.pssa_bn
    x = torch.randn(2, cin, 6, 5, dtype=torch.float64, requires_grad=True)
    w = ref.pssa.weight.detach().clone().requires_grad_()
    geom = geometry_of(ref, x)
    # Training: batch statistics, no running stats passed (gradcheck calls fn many times and
    # must not see them drift); eval: the (randomized) running statistics.
    running = (None, None) if training else (bn.running_mean, bn.running_var)

    def fn(x, w, gamma, beta):
        return pssa_lean.PSSABatchNormLean.apply(
            x, w, gamma, beta, *running, training, 0.1, bn.eps, geom, BACKENDS[impl]
        )

    gamma = bn.weight.detach().clone().requires_grad_()
    beta = bn.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w, gamma, beta))


@backends
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("cin,cout,k,s,p,d,g,shifts,center", SLOTS)
def test_xconv_training_step_matches_reference(
    cin, cout, k, s, p, d, g, shifts, center, channels_last, impl
):
    """Output, every gradient, BN running stats and num_batches_tracked agree after a step."""
    ref, lean = _pair(cin, cout, k, s, p, d, g, shifts, center, impl=impl)
    x = torch.randn(3, cin, 9, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        ref, lean = (m.to(memory_format=torch.channels_last) for m in (ref, lean))
    assert_same_forward_backward(ref, lean, x, RTOL, ATOL)
    assert int(lean.pssa_bn.num_batches_tracked) == 1


@backends
def test_bn_cumulative_momentum_and_eval_mode(impl):
    """momentum=None (cumulative average) and eval-mode BN follow nn.BatchNorm2d exactly."""
    ref, lean = _pair(8, 8, 3, 1, 1, 1, 1, (1,), False, impl=impl)
    for m in (ref, lean):
        m.pssa_bn.momentum = None
    for _ in range(3):
        x = torch.randn(2, 8, 6, 6)
        torch.testing.assert_close(lean(x), ref(x), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lean.pssa_bn.running_var, ref.pssa_bn.running_var)
    ref.eval()
    lean.eval()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    out_ref, out_lean = ref(x), lean(x)
    torch.testing.assert_close(out_lean, out_ref, rtol=RTOL, atol=ATOL)
    g_ref = torch.autograd.grad(out_ref.sum(), (x, ref.pssa_bn.weight, ref.pssa.weight))
    g_lean = torch.autograd.grad(out_lean.sum(), (x, lean.pssa_bn.weight, lean.pssa.weight))
    for a, b in zip(g_ref, g_lean):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_bn_subclass_keeps_its_own_forward():
    """A BN subclass (e.g. SyncBatchNorm) is called as a module, never bypassed by the fusion."""

    class CountingBN(nn.BatchNorm2d):
        calls = 0

        def forward(self, x):
            CountingBN.calls += 1
            return super().forward(x)

    ref, lean = _pair(8, 8, 3, 1, 1, 1, 1, (1,), False)
    for m in (ref, lean):
        bn = CountingBN(8)
        bn.load_state_dict(ref.pssa_bn.state_dict())
        m.pssa_bn = bn
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(lean(x), ref(x), rtol=RTOL, atol=ATOL)
    assert CountingBN.calls == 2


@backends
def test_bf16_autocast_matches_reference(impl):
    ref, lean = _pair(8, 8, 3, 1, 1, 1, 1, (1,), False, impl=impl)
    x = torch.randn(2, 8, 6, 6)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [m(xi) for m, xi in zip((ref, lean), xs)]
    assert outs[0].dtype == outs[1].dtype
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=5e-2)
    for out in outs:
        out.float().sum().backward()
    assert lean.pssa.weight.grad is not None and lean.pssa.weight.grad.dtype == torch.float32
    torch.testing.assert_close(
        lean.pssa.weight.grad, ref.pssa.weight.grad, rtol=5e-2, atol=5e-2 * 64
    )
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=5e-2, atol=5e-1)


@pytest.mark.parametrize("impl", ["reference", "lean", "gemm"])
def test_deploy_impls_match_and_lean_deploy_is_differentiable(impl):
    ref, _ = _pair(8, 8, 3, 2, 1, 1, 1, (1,), False)
    ref.eval()
    deploy = ref.reparameterize()
    assert isinstance(deploy, XConv2dDeploy) and deploy.impl == "reference"
    other = copy.deepcopy(deploy)
    other.impl = impl
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(other(x), ref(x), rtol=RTOL, atol=ATOL)
    out = other(x)  # grad enabled: must go through a differentiable path
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_ref,) = torch.autograd.grad(deploy(x).sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=RTOL, atol=ATOL)


def test_reparameterize_carries_impl():
    m = XConv2d(8, 8, 3, 1, 1, impl="lean").eval()
    assert m.reparameterize().impl == "lean"


def test_impl_is_validated():
    with pytest.raises(ValueError, match="impl must be one of"):
        XConv2d(8, 8, 3, 1, 1, impl="fast")
    with pytest.raises(ValueError, match="impl must be one of"):
        XConv2dDeploy(8, 8, 3, 1, 1, impl="cuda")


def test_auto_on_cpu_is_lean_when_recording_and_reference_otherwise():
    x = torch.randn(1, 4, 5, 5)
    m = XConv2d(4, 4, 3, 1, 1)
    assert dispatch.resolve_impl("auto", m, x, True) == "lean"
    assert dispatch.resolve_impl("auto", m, x, False) == "reference"
    assert dispatch.resolve_impl("reference", m, x, True) == "reference"
    assert dispatch.resolve_impl("gemm", m, x, False) == "gemm"
    assert dispatch.needs_grad(x, m.pssa.weight)
    with torch.no_grad():
        assert not dispatch.needs_grad(x, m.pssa.weight)


def test_explicit_triton_on_cpu_without_interpreter_falls_back_to_lean(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_WARNED", set())
    x = torch.randn(1, 4, 5, 5)
    ref, lean = _pair(4, 4, 3, 1, 1, 1, 1, (1,), False)
    lean.impl = "triton"
    assert dispatch.resolve_impl("triton", lean, x, True) == "lean"
    with caplog.at_level("WARNING", logger="xvol.ops.dispatch"):
        torch.testing.assert_close(lean(x), ref(x), rtol=RTOL, atol=ATOL)
        lean(x)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "using the lean PyTorch path" in caplog.records[0].message


@pytest.mark.parametrize(
    "kwargs",
    [dict(groups=2), dict(shifts=(1, 2))],
    ids=["groups", "two-shifts"],
)
def test_explicit_triton_on_unsupported_slot_raises(kwargs):
    x = torch.randn(1, 4, 5, 5)
    m = XConv2d(4, 4, 3, 1, 1, **kwargs)
    with pytest.raises(ValueError, match="groups=1, odd square kernels, one shift distance"):
        dispatch.resolve_impl("triton", m, x, False)


def test_set_impl_reaches_every_xconv():
    model = nn.Sequential(XConv2d(4, 4, 3, 1, 1), nn.ReLU(), XConv2d(4, 4, 3, 1, 1).eval())
    model[2] = model[2].reparameterize()
    assert dispatch.set_impl(model, "gemm") == 2
    assert {m.impl for m in model if hasattr(m, "impl")} == {"gemm"}
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.set_impl(model, "fast")


def test_geometry_padding_matches_reference_transform_reads():
    """The lean path pads exactly as pssa_transform does (reads beyond it would be garbage)."""
    geom = PSSAGeometry(((-2, 2), (1, -1)), stride=2, offset=-1, out_size=(4, 5), groups=1)
    left, right, top, bottom = geom.padding(7, 9)
    assert (left, top) == (3, 3)
    assert bottom == max(0, 3 * 2 - 1 + 2 - 6) and right == max(0, 4 * 2 - 1 + 2 - 8)


# --------------------------------------------------------------------------------------------
# Saved tensors per slot (the target: lean saves <= 2x an nn.Conv2d's activations)


def _owned(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *m.buffers()]


def _reports(stride: int, cin: int = 16, hw: int = 8):
    torch.manual_seed(0)
    x = torch.randn(2, cin, hw, hw, requires_grad=True)
    conv = nn.Conv2d(cin, cin, 3, stride, 1, bias=False)
    conv_bn = nn.Sequential(conv, nn.BatchNorm2d(cin))
    ref = XConv2d(cin, cin, 3, stride, 1, impl="reference")
    lean = XConv2d(cin, cin, 3, stride, 1, impl="lean")
    gemm = XConv2d(cin, cin, 3, stride, 1, impl="gemm")
    return {
        "conv": saved_tensors_report(lambda: conv(x), _owned(conv)),
        "conv_bn": saved_tensors_report(lambda: conv_bn(x), _owned(conv_bn)),
        "reference": saved_tensors_report(lambda: ref(x), _owned(ref)),
        "lean": saved_tensors_report(lambda: lean(x), _owned(lean)),
        "gemm": saved_tensors_report(lambda: gemm(x), _owned(gemm)),
        "x_bytes": x.numel() * x.element_size(),
        "cout": cin,
    }


@pytest.mark.parametrize("stride", [1, 2])
def test_lean_saved_activations_at_most_twice_conv(stride):
    """What is counted: unique storages saved by autograd in one training-mode forward of the
    slot; parameters/buffers apart. Feature maps (activation_bytes): nn.Conv2d saves x; lean
    XConv2d saves x (shared by both branches) + the conv branch's BN input; nothing of PSSA.
    Per-channel: the two BNs' batch mean/invstd (4 x C_out floats)."""
    r = _reports(stride)
    conv, conv_bn, ref, lean = r["conv"], r["conv_bn"], r["reference"], r["lean"]
    assert conv.activation_bytes == r["x_bytes"] and conv.per_channel_bytes == 0
    # The target: feature maps <= 2x nn.Conv2d's (exactly 2.0x at stride 1, 1.25x at stride 2).
    assert lean.activation_bytes <= 2 * conv.activation_bytes
    expected_ratio = 1 + 1 / stride**2
    assert lean.activation_bytes == pytest.approx(expected_ratio * conv.activation_bytes)
    assert lean.per_channel_bytes == 4 * r["cout"] * 4
    # No more than the conv + BN pair a ResNet slot already has, beyond BN_A's two vectors.
    assert lean.activation_bytes == conv_bn.activation_bytes
    assert lean.total_bytes <= conv_bn.total_bytes + 2 * r["cout"] * 4
    # The reference keeps T (8x), the padded x and BN_A's input: lean is far below it.
    assert ref.activation_bytes > 3 * lean.activation_bytes
    # gemm keeps BN_A's input instead of recomputing PSSA in backward: one output map more.
    out_bytes = r["x_bytes"] // stride**2
    assert r["gemm"].activation_bytes == lean.activation_bytes + out_bytes


def test_lean_saves_no_output_sized_pssa_tensor():
    """Only x and W_A (plus BN vectors) from the PSSA branch: no 8-channel-multiple map."""
    r = _reports(1)
    shapes = [shape for kind, shape, _, _ in r["lean"].entries if kind == "activation"]
    assert all(shape[1] == 16 for shape in shapes)
    ref_shapes = [shape for kind, shape, _, _ in r["reference"].entries if kind == "activation"]
    assert any(shape[1] == 16 * 8 for shape in ref_shapes)  # T, kept by the reference


def test_pssa_lean_saves_only_input_and_weight():
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(8, 64, 1, 1, requires_grad=True)
    geom = PSSAGeometry(tuple(XConv2d(8, 8, 3, 1, 1).taps), 1, 0, (6, 6), 1)
    for backend in BACKENDS.values():
        report = saved_tensors_report(lambda b=backend: pssa_lean.pssa_lean(x, w, geom, b), [w])
        assert report.activation_bytes == x.numel() * 4
        assert report.parameter_bytes == w.numel() * 4
        assert report.per_channel_bytes == 0


def test_lean_forward_equals_functional_definition():
    """Independent check of the tap-by-tap sum against a direct loop over the definition."""
    torch.manual_seed(3)
    x = torch.randn(1, 2, 5, 5)
    taps = ((0, 1), (1, 1))
    w = torch.randn(3, 4, 1, 1)
    geom = PSSAGeometry(taps, 1, 0, (5, 5), 1)
    xp = F.pad(x, (1, 1, 1, 1))
    expected = torch.zeros(1, 3, 5, 5)
    for o in range(3):
        for c in range(2):
            for t, (di, dj) in enumerate(taps):
                shifted = xp[:, c, 1 + di : 6 + di, 1 + dj : 6 + dj]
                expected[:, o] += w[o, c * 2 + t, 0, 0] * x[:, c] * shifted
    torch.testing.assert_close(
        pssa_lean.pssa_forward_taps(x, w, geom), expected, rtol=RTOL, atol=ATOL
    )
