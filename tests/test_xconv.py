"""X-volution operator: training form vs deploy form, PSSA vs its formula, gradients, errors,
re-parameterization contract, and the deploy operator under jit.trace / export / compile."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import randomize_bn
from torch import nn

from xvol.ops.xconv import XConv2d, XConv2dDeploy, pssa_offsets, pssa_transform
from xvol.reparam import reparameterize_model

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|y - ref|, max(1, max|ref|)): a check passes when first <= TOL[dtype] * second."""
    return (y - ref).abs().max().item(), max(1.0, ref.abs().max().item())


def _randomized(module: nn.Module, generator: torch.Generator, dtype: torch.dtype) -> nn.Module:
    return randomize_bn(module.to(dtype), generator)


# ------------------------------------------------------------------------------ equivalence grid

GRID_SIZES = [(7, 9), (1, 1)]
GRID_BATCHES = [1, 3]


@pytest.mark.parametrize("center", [False, True], ids=["nocenter", "center"])
@pytest.mark.parametrize("shifts", [(1,), (1, 2), ()], ids=["s1", "s12", "s0"])
@pytest.mark.parametrize("groups", ["1", "2", "C"], ids=["g1", "g2", "gC"])
@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("stride", [1, 2], ids=["st1", "st2"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5], ids=["k1", "k3", "k5"])
def test_training_form_eval_equals_deploy(
    kernel_size: int,
    stride: int,
    dilation: int,
    groups: str,
    shifts: tuple[int, ...],
    center: bool,
    generator: torch.Generator,
) -> None:
    """The acceptance grid. Sizes, batches and dtypes loop inside to keep collection small."""
    c_in = 4
    g = c_in if groups == "C" else int(groups)
    c_out = 8 if groups == "C" else 6  # in != out; depthwise with multiplier 2
    padding = dilation * (kernel_size - 1) // 2
    base = XConv2d(
        c_in, c_out, kernel_size, stride, padding, dilation, g, shifts=shifts, center=center
    )
    randomize_bn(base.double(), generator)
    for dtype in (torch.float32, torch.float64):
        xconv = copy.deepcopy(base).to(dtype).eval()
        deploy = xconv.reparameterize()
        assert deploy.weight.dtype == dtype
        for (h, w), n in itertools.product(GRID_SIZES, GRID_BATCHES):
            x = torch.randn(n, c_in, h, w, generator=generator, dtype=torch.float64).to(dtype)
            with torch.no_grad():
                ref, out = xconv(x), deploy(x)
            assert out.shape == ref.shape == (n, c_out, *xconv.out_size(h, w))
            err, scale = _max_rel_err(out, ref)
            assert err <= TOL[dtype] * scale, f"{dtype} {n}x{h}x{w}: max|diff| {err:.3e}"


@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding", "dilation", "groups"),
    [(3, 1, 0, 1, 1), (3, 2, 2, 1, 2), (5, 2, 1, 2, 4), (1, 1, 1, 1, 1)],
)
def test_equivalence_with_bias_and_nondefault_padding(
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    generator: torch.Generator,
) -> None:
    """Conv bias, a non-default BN eps and padding that moves the PSSA read off p * s."""
    xconv = XConv2d(
        4,
        8,
        kernel_size,
        stride,
        padding,
        dilation,
        groups,
        bias=True,
        shifts=(1, 3),
        center=True,
        bn_eps=1e-3,
    )
    xconv = _randomized(xconv, generator, torch.float64)
    with torch.no_grad():
        xconv.conv.bias.normal_(generator=generator)
    xconv.eval()
    deploy = xconv.reparameterize()
    x = torch.randn(2, 4, 8, 7, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        err, scale = _max_rel_err(deploy(x), xconv(x))
    assert err <= 1e-10 * scale


@pytest.mark.parametrize("impl", ["reference", "lean"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_equivalence_on_each_impl_path(impl: str, grad: bool, generator: torch.Generator) -> None:
    """The training form and the deploy operator agree whichever PSSA path runs (with autograd
    recording, the default path recomputes products instead of storing them)."""
    xconv = XConv2d(4, 6, 3, 2, 1, groups=2, shifts=(1, 2), center=True, impl=impl)
    xconv = _randomized(xconv, generator, torch.float64).eval()
    deploy = xconv.reparameterize()
    x = torch.randn(3, 4, 7, 9, generator=generator, dtype=torch.float64, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        ref, out = xconv(x), deploy(x)
    err, scale = _max_rel_err(out.detach(), ref.detach())
    assert err <= 1e-10 * scale
    if grad:  # and their input gradients agree too
        g = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
        (gx_ref,) = torch.autograd.grad(ref, x, g)
        (gx_out,) = torch.autograd.grad(out, x, g)
        torch.testing.assert_close(gx_out, gx_ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- PSSA vs a loop over the formula


def _pssa_loop(
    x: torch.Tensor,
    weight: torch.Tensor,
    shifts: tuple[int, ...],
    center: bool,
    stride: int,
    read_offset: int,
    groups: int,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """PSSA(x)_o(p) = sum_{c in group(o), L, d in D_L} W_A[o, c, (L, d)] x_c(q) x_c(q + d),
    q = p * stride + read_offset, x zero outside the image; written pixel by pixel."""
    n_img, c_in, h, w = x.shape
    c_out = weight.shape[0]
    taps = [
        (i * s, j * s) for s in shifts for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)
    ]
    if center:
        taps.append((0, 0))
    xs, ws = x.tolist(), weight.flatten(1).tolist()

    def px(n: int, c: int, r: int, q: int) -> float:
        return xs[n][c][r][q] if 0 <= r < h and 0 <= q < w else 0.0

    cin_g, cout_g = c_in // groups, c_out // groups
    out = torch.zeros(n_img, c_out, *out_hw, dtype=x.dtype)
    for n, o, i, j in itertools.product(
        range(n_img), range(c_out), range(out_hw[0]), range(out_hw[1])
    ):
        r, q = i * stride + read_offset, j * stride + read_offset
        g = o // cout_g
        total = 0.0
        for c_local in range(cin_g):
            c = g * cin_g + c_local
            for t, (di, dj) in enumerate(taps):
                total += ws[o][c_local * len(taps) + t] * px(n, c, r, q) * px(n, c, r + di, q + dj)
        out[n, o, i, j] = total
    return out


@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding", "dilation", "groups", "shifts", "center"),
    [
        (3, 1, 1, 1, 1, (1,), False),
        (3, 2, 1, 1, 2, (1, 2), True),  # stride 2
        (3, 1, 0, 1, 1, (1,), False),  # padding 0: read at p + 1
        (3, 2, 3, 1, 2, (2,), False),  # padding 3: read at 2p - 2, partly outside the image
        (5, 2, 4, 2, 4, (1,), True),  # dilated, depthwise
        (1, 2, 0, 1, 1, (1, 7), False),  # shift 7 is larger than the 5x6 image
        (3, 1, 1, 1, 1, (), True),  # only the x * x tap
    ],
)
def test_pssa_branch_equals_formula_loop(
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    shifts: tuple[int, ...],
    center: bool,
    generator: torch.Generator,
) -> None:
    xconv = XConv2d(
        4, 4, kernel_size, stride, padding, dilation, groups, shifts=shifts, center=center
    )
    xconv = _randomized(xconv, generator, torch.float64).eval()
    x = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        conv_out = xconv.conv(x)
        branch = xconv.pssa(xconv.transform(x))
        y = xconv(x)
    read_offset = dilation * (kernel_size - 1) // 2 - padding  # the kxk window's centre
    expected = _pssa_loop(
        x, xconv.pssa.weight, shifts, center, stride, read_offset, groups, conv_out.shape[-2:]
    )
    assert branch.shape == expected.shape
    torch.testing.assert_close(branch, expected, rtol=1e-12, atol=1e-12)
    # and the training form is exactly BN_c(conv) + BN_A(PSSA) on top of it
    torch.testing.assert_close(
        y, xconv.bn(conv_out) + xconv.pssa_bn(expected), rtol=1e-12, atol=1e-12
    )


def test_shift_larger_than_image_gives_zero_products(generator: torch.Generator) -> None:
    x = torch.randn(1, 2, 3, 4, generator=generator)
    t = pssa_transform(x, pssa_offsets((4,)))
    assert t.shape == (1, 2 * 8, 3, 4)
    assert torch.count_nonzero(t) == 0
    # while a shift of 1 on the same image does see neighbours
    assert torch.count_nonzero(pssa_transform(x, pssa_offsets((1,)))) > 0


def test_pssa_offsets_order() -> None:
    assert pssa_offsets((1,)) == [
        (-1, -1),
        (-1, 0),
        (-1, 1),
        (0, -1),
        (0, 1),
        (1, -1),
        (1, 0),
        (1, 1),
    ]
    taps = pssa_offsets((1, 3), center=True)
    assert len(taps) == 17 and taps[8] == (-3, -3) and taps[-1] == (0, 0)
    assert pssa_offsets((), center=False) == []


# ------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("stride", "padding", "groups", "shifts", "center"),
    [(1, 1, 1, (1,), False), (2, 0, 2, (1, 2), True)],
)
def test_gradcheck_training_form(
    impl: str,
    train: bool,
    stride: int,
    padding: int,
    groups: int,
    shifts: tuple[int, ...],
    center: bool,
    generator: torch.Generator,
) -> None:
    """Gradients w.r.t. the input and every learnable parameter, float64: the reference path
    (the formula as written) and the default path (auto: what training runs)."""
    xconv = XConv2d(
        2, 4, 3, stride, padding, groups=groups, shifts=shifts, center=center, impl=impl
    )
    xconv = _randomized(xconv, generator, torch.float64).train(train)
    names = [name for name, _ in xconv.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in xconv.parameters())
    x = torch.randn(2, 2, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(xconv, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_training_form_backward_reaches_every_parameter(generator: torch.Generator) -> None:
    xconv = XConv2d(4, 6, 3, 1, 1, shifts=(1, 2), center=True)
    xconv(torch.randn(2, 4, 6, 6, generator=generator)).square().sum().backward()
    for name, p in xconv.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------- input checking


def test_wrong_channel_count_names_expected_and_actual() -> None:
    for module in (
        XConv2d(4, 6, 3, padding=1),
        XConv2d(4, 6, 3, padding=1).eval().reparameterize(),
    ):
        with pytest.raises(ValueError, match=r"expects 4 input channels, got 3"):
            module(torch.zeros(1, 3, 5, 5))


def test_non_4d_input_names_expected_and_actual() -> None:
    xconv = XConv2d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"4-D input N x 4 x H x W, got shape \(4, 5, 5\)"):
        xconv(torch.zeros(4, 5, 5))
    with pytest.raises(ValueError, match=r"4-D input .* got shape \(1, 1, 4, 5, 5\)"):
        xconv(torch.zeros(1, 1, 4, 5, 5))


@pytest.mark.parametrize("shifts", [(0,), (1, -2)])
def test_non_positive_shift_rejected(shifts: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"shifts must be positive.*got \(.*\) \(bad: \[-?\d\]\)"):
        XConv2d(4, 6, 3, padding=1, shifts=shifts)


@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(4, 6, 3), (6, 4, 4), (4, 4, 0)])
def test_groups_must_divide_channels(c_in: int, c_out: int, groups: int) -> None:
    with pytest.raises(
        ValueError,
        match=rf"groups={groups} must divide in_channels={c_in} and out_channels={c_out}",
    ):
        XConv2d(c_in, c_out, 3, padding=1, groups=groups)


@pytest.mark.parametrize("kernel_size", [2, 4, 0])
def test_even_kernel_rejected(kernel_size: int) -> None:
    with pytest.raises(ValueError, match=rf"odd kernel_size.*got {kernel_size}"):
        XConv2d(4, 6, kernel_size)


def test_unequal_pairs_rejected() -> None:
    with pytest.raises(ValueError, match=r"equal kernel_size on both axes, got \(3, 5\)"):
        XConv2d(4, 6, (3, 5))
    with pytest.raises(ValueError, match=r"equal stride on both axes, got \(1, 2\)"):
        XConv2d(4, 6, 3, stride=(1, 2))
    # equal pairs are accepted, as nn.Conv2d accepts them
    assert XConv2d(4, 6, (3, 3), (2, 2), (1, 1)).stride == (2, 2)


# ------------------------------------------------------------------------- reparameterize contract


def test_fuse_in_training_mode_folds_running_statistics(generator: torch.Generator) -> None:
    """timm's validate.py re-parameterizes before model.eval(): fuse() must fold the running
    statistics (what eval computes with) in training mode too, and leave the mode alone."""
    xconv = _randomized(XConv2d(4, 6, 3, padding=1), generator, torch.float32).train()
    deploy = xconv.fuse()
    assert xconv.training and not deploy.training
    x = torch.randn(2, 4, 7, 7, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), xconv.eval()(x), rtol=1e-5, atol=1e-5)


def test_reparameterize_leaves_self_untouched(generator: torch.Generator) -> None:
    xconv = _randomized(
        XConv2d(4, 6, 3, 1, 1, shifts=(1, 2), center=True), generator, torch.float32
    )
    xconv.eval()
    before = {k: v.clone() for k, v in xconv.state_dict().items()}
    deploy = xconv.reparameterize()
    after = xconv.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(xconv.bn, nn.BatchNorm2d) and isinstance(xconv.pssa_bn, nn.BatchNorm2d)
    assert not xconv.training  # mode not flipped either

    # the deploy module owns its storage: editing it must not reach self
    with torch.no_grad():
        deploy.weight.add_(1.0)
        deploy.pssa_weight.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in xconv.state_dict().items())

    # and self still trains: BN in batch mode, gradients on every parameter, stats update
    xconv.train()
    xconv(torch.randn(3, 4, 5, 5, generator=generator)).sum().backward()
    assert all(p.grad is not None for p in xconv.parameters())
    assert not torch.equal(xconv.bn.running_mean, before["bn.running_mean"])
    assert xconv.bn.num_batches_tracked.item() == before["bn.num_batches_tracked"].item() + 1


def test_deploy_module_is_one_operator_without_bn(generator: torch.Generator) -> None:
    deploy = _randomized(XConv2d(4, 6, 3, 1, 1), generator, torch.float32).eval().reparameterize()
    assert isinstance(deploy, XConv2dDeploy) and not deploy.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert list(deploy.children()) == []
    assert sorted(n for n, _ in deploy.named_parameters()) == ["bias", "pssa_weight", "weight"]
    again = deploy.reparameterize()  # idempotent, a copy
    assert again is not deploy and torch.equal(again.weight, deploy.weight)


def test_no_taps_deploys_to_plain_conv2d(generator: torch.Generator) -> None:
    xconv = XConv2d(4, 6, 3, 2, 1, shifts=(), center=False)
    assert xconv.pssa is None and xconv.pssa_bn is None
    xconv = _randomized(xconv, generator, torch.float64).eval()
    deploy = xconv.reparameterize()
    assert type(deploy) is nn.Conv2d
    assert (deploy.kernel_size, deploy.stride, deploy.padding) == ((3, 3), (2, 2), (1, 1))
    x = torch.randn(2, 4, 7, 7, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), xconv(x), rtol=1e-12, atol=1e-12)
    # the x * x tap alone is still PSSA, so not a plain conv
    center_only = XConv2d(4, 6, 3, padding=1, shifts=(), center=True).eval().reparameterize()
    assert isinstance(center_only, XConv2dDeploy)


def test_zero_init_bn_makes_output_zero(generator: torch.Generator) -> None:
    xconv = XConv2d(4, 6, 3, padding=1)
    xconv.zero_init_bn()
    y = xconv(torch.randn(2, 4, 5, 5, generator=generator))
    assert torch.count_nonzero(y) == 0


# ------------------------------------------------------------------------- reparameterize_model


def _nested_model() -> nn.Sequential:
    return nn.Sequential(
        XConv2d(3, 4, 3, 1, 1, shifts=(1,)),
        nn.ReLU(),
        nn.Sequential(
            XConv2d(4, 4, 3, 2, 1, groups=4, shifts=(1, 2), center=True),
            nn.BatchNorm2d(4),
            nn.Sequential(XConv2d(4, 6, 1, shifts=())),
        ),
    )


def test_reparameterize_model_swaps_all_and_leaves_original(generator: torch.Generator) -> None:
    model = _nested_model().double()
    randomize_bn(model, generator)
    model.train()  # reparameterize_model must eval a copy, not refuse and not flip this one
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = list(model.modules())

    deployed = reparameterize_model(model)

    assert deployed is not model
    assert not any(isinstance(m, XConv2d) for m in deployed.modules())
    assert isinstance(deployed[0], XConv2dDeploy)
    assert isinstance(deployed[2][0], XConv2dDeploy)
    assert type(deployed[2][2][0]) is nn.Conv2d
    assert isinstance(deployed[2][1], nn.BatchNorm2d)  # not re-parameterizable: kept as is
    assert not any(m.training for m in deployed.modules())
    # original untouched: same modules, still training, same state
    assert list(model.modules()) == modules_before
    assert all(m.training for m in model.modules())
    assert sum(isinstance(m, XConv2d) for m in model.modules()) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    x = torch.randn(2, 3, 9, 7, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
        torch.testing.assert_close(deployed(x), ref, rtol=1e-10, atol=1e-10)


def test_reparameterize_model_inplace_and_bare_module(generator: torch.Generator) -> None:
    model = randomize_bn(_nested_model(), generator)
    same = reparameterize_model(model, inplace=True)
    assert same is model and not any(isinstance(m, XConv2d) for m in model.modules())
    bare = XConv2d(3, 4, 3, padding=1)
    assert isinstance(reparameterize_model(bare), XConv2dDeploy)
    assert bare.training  # the copy was put in eval mode, not the caller's module


# ------------------------------------------------------------------- tracing, export, compilation


@pytest.fixture
def deploy_case(generator: torch.Generator) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    xconv = XConv2d(4, 8, 3, 2, 1, groups=2, shifts=(1, 2), center=True)
    deploy = _randomized(xconv, generator, torch.float32).eval().reparameterize()
    x = torch.randn(2, 4, 9, 7, generator=generator)
    x_other = torch.randn(2, 4, 9, 7, generator=generator)
    return deploy, x, x_other


# jit.trace is deprecated in this torch, and its TracerWarnings say what is known: a trace is
# specialized to the traced input shape (the zero-pad amounts depend on H and W).
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_deploy_under_jit_trace(deploy_case: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    deploy, x, x_other = deploy_case
    with torch.no_grad():
        traced = torch.jit.trace(deploy, (x,))
        torch.testing.assert_close(traced(x_other), deploy(x_other), rtol=1e-6, atol=1e-6)


def test_deploy_under_export(deploy_case: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    deploy, x, x_other = deploy_case
    exported = torch.export.export(deploy, (x,))
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(x_other), deploy(x_other), rtol=1e-6, atol=1e-6
        )


@pytest.mark.slow  # torch.compile on the CPU: make test, not test-fast
def test_deploy_under_compile(deploy_case: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    deploy, x, x_other = deploy_case
    torch._dynamo.reset()
    compiled = torch.compile(deploy)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x_other), deploy(x_other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shifts", [(1.5,), (True,), (1, 0)])
def test_non_integer_or_non_positive_shifts_are_refused(shifts: tuple) -> None:
    with pytest.raises(ValueError, match="positive integer pixel distances"):
        XConv2d(4, 4, 3, padding=1, shifts=shifts)


def test_string_padding_matches_nn_conv2d() -> None:
    same = XConv2d(4, 4, 5, padding="same", dilation=2)
    assert same.padding == (4, 4)
    assert XConv2d(4, 4, 3, padding="valid").padding == (0, 0)
    x = torch.randn(1, 4, 9, 7)
    reference = nn.Conv2d(4, 4, 5, padding="same", dilation=2)
    assert same(x).shape == reference(x).shape == x.shape
    with pytest.raises(ValueError, match="stride 1 only"):
        XConv2d(4, 4, 3, stride=2, padding="same")
