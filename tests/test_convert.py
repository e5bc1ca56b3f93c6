"""X-volution in any CNN (xvol.models.convert, the ResNet family by name, the model spec).

- timm's ResNet family by name: baselines are timm's models (params, state-dict keys), the
  x-entries swap conv2 of stage 3, and each re-parameterizes exactly (float32 relative error
  <= 1e-5 with randomized BN) with xvol's helper and with timm's ``reparameterize_model``.
- ``xvol.convert`` on timm RegNet/ConvNeXt and torchvision ResNet/RegNet: what it swaps and
  keeps (the plan), the BN that follows a swapped conv, zero-init, one training step, exact
  re-parameterization.
- the spec: a converted model is described, round-tripped and refused like the family.

Kept cheap: counts on the meta device, forwards at 64 px with batch 4; the 60M+ parameter
models (resnext101_32x8d, wide_resnet50_2) are slow-marked (in ``make test``, not test-fast).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from helpers import randomize_bn
from timm.utils import reparameterize_model as timm_reparameterize_model
from torch import nn

import xvol
from xvol.models import ModelSpec, ModelSpecError, build_model, count_params
from xvol.models.convert import plan_convert
from xvol.ops import XConv2d, XConv2dDeploy
from xvol.reparam import reparameterize_model

FAMILY = {  # x-entry: X-volution slots in stage 3 (one per block of timm's layer3)
    "xresnet26d": 2,
    "xresnet50d": 6,
    "xresnext50_32x4d": 6,
    "xresnext101_32x8d": 23,
    "xseresnet50": 6,
    "xecaresnet50d": 6,
    "xwide_resnet50_2": 6,
}
HEAVY = ("xresnext101_32x8d", "xwide_resnet50_2")  # over 60M parameters


def family_params() -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in FAMILY]


def on_meta(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with torch.device("meta"):
        return fn(*args, **kwargs)


def slots(model: nn.Module) -> list[XConv2d]:
    return [m for m in model.modules() if isinstance(m, XConv2d)]


def randomize_for_reparam(model: nn.Module, x: torch.Tensor, seed: int = 1) -> None:
    """Random BN affine (and layer-scale gammas) everywhere, every BN's statistics taken from
    ``x``, then the X-volution BNs' running statistics (what reparameterization folds) pushed
    off by random amounts. Statistics taken from ``x`` keep deep stacks of quadratic PSSA
    slots finite on ``x``; fully random statistics overflow float32 after a few slots."""
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model, gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # ConvNeXt's layer scale starts at 1e-6
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative: one batch gives its exact statistics
    with torch.no_grad():
        model(x)
        for slot in slots(model):
            for bn in (slot.bn, slot.pssa_bn):
                c = bn.num_features
                bn.running_mean.add_(
                    0.5 * bn.running_var.sqrt() * (2 * torch.rand(c, generator=gen) - 1)
                )
                bn.running_var.mul_(0.5 + 1.5 * torch.rand(c, generator=gen))
    model.eval()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(ref).all()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def assert_reparameterizes_exactly(
    model: nn.Module,
    n_slots: int,
    float32_bound: float | None = 1e-5,
    *,
    float64: bool = False,
    img_size: int = 64,
) -> None:
    """xvol's and timm's helpers give a deploy form (no XConv2d left, ``n_slots`` deploy
    operators) whose logits equal the training form's in float32 within ``float32_bound``
    relative error; with ``float64``, also in float64 to 1e-10 (the algebra alone).
    ``float32_bound=None``: within the training form's own float32 rounding (its distance from
    float64), for a network deep enough that rounding alone is past 1e-5."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, img_size, img_size, generator=torch.Generator().manual_seed(2))
    randomize_for_reparam(model, x)
    float64 = float64 or float32_bound is None
    model64 = copy.deepcopy(model).double() if float64 else None
    with torch.no_grad():
        ref = model(x)
        ref64 = model64(x.double()) if model64 is not None else None
        if float32_bound is None:
            float32_bound = max(1e-5, relative_error(ref.double(), ref64))
        for helper in (reparameterize_model, timm_reparameterize_model):
            deploy = helper(model).eval()
            assert not slots(deploy)
            assert sum(isinstance(m, XConv2dDeploy) for m in deploy.modules()) == n_slots
            assert relative_error(deploy(x), ref) <= float32_bound, helper.__module__
            if model64 is not None:
                deploy64 = helper(model64).eval()
                assert relative_error(deploy64(x.double()), ref64) <= 1e-10, helper.__module__
    assert len(slots(model)) == n_slots  # both helpers left the model as it was


# ---------------------------------------------------------------- the ResNet family by name


@pytest.mark.parametrize("name", family_params())
def test_family_entries_are_timms_models_with_xvolution_in_stage3(name: str) -> None:
    arch = name[1:]
    ours, theirs = on_meta(build_model, arch), on_meta(timm.create_model, arch)
    assert count_params(ours) == count_params(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = on_meta(timm.create_model, name)
    assert len(slots(x)) == FAMILY[name]
    assert all(n.startswith("layer3.") and n.endswith(".conv2") for n, m in
               x.named_modules() if isinstance(m, XConv2d))  # fmt: skip
    if "resnext" in name:  # grouped 3x3: X-volution with the same groups
        assert all(m.groups == 32 for m in slots(x))
    assert x.pretrained_cfg["architecture"] == name and not x.pretrained_cfg.get("hf_hub_id")


def test_family_entries_take_stages_shifts_and_center() -> None:
    model = on_meta(
        timm.create_model, "xresnext50_32x4d", stages=[3, 4], shifts=[1, 2], center=True
    )
    assert len(slots(model)) == 6 + 3
    assert all(m.shifts == (1, 2) and m.center and len(m.taps) == 17 for m in slots(model))
    spec = ModelSpec.from_config({
        "_target_": "xvol.models.build_model", "arch": "resnet50d", "num_classes": 10,
        "stages": [2], "xconv": {"_target_": "xvol.ops.XConv2d", "_partial_": True, "shifts": [2]},
    })  # fmt: skip
    assert spec.identity()["model"] == "xresnet50d-s2-L2"
    assert len(slots(on_meta(spec.build))) == 4  # resnet50d's layer2 has 4 blocks


@pytest.mark.parametrize("name", family_params())
def test_family_entries_reparameterize_exactly(name: str) -> None:
    model = timm.create_model(name, num_classes=10)
    # resnext101_32x8d: 23 slots (and 100 random BNs) deep, its float32 logits are 1.5e-4 from
    # float64 on their own; deploy vs training stays within that (and is 1e-14 in float64)
    bound = None if name == "xresnext101_32x8d" else 1e-5
    assert_reparameterizes_exactly(model, FAMILY[name], bound)


def test_family_summary_rows_have_params_and_macs() -> None:
    from xvol.cli.summary import summarize

    rows = {n: summarize(n, 64, 10, "meta", []) for n in ("resnext50_32x4d", "xresnext50_32x4d")}
    base, x = rows["resnext50_32x4d"], rows["xresnext50_32x4d"]
    assert base["params_m_train"] == pytest.approx(count_params(
        on_meta(timm.create_model, "resnext50_32x4d", num_classes=10)) / 1e6)  # fmt: skip
    assert x["params_m_train"] > base["params_m_train"] and x["gmacs_train"] > base["gmacs_train"]
    assert x["gmuls_deploy"] > 0 == base["gmuls_deploy"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--models", "nope"], "xvol-summary: error: --models: no model config ['nope']"),
        (["--img-size", "0"], "xvol-summary: error: --img-size: expected a positive integer"),
        (["--overrides", "model.bogus=1"], "xvol-summary: error: ConfigCompositionException"),
        (["--out", "{out}"], "xvol-summary: error: output already exists: {out} (pass --force"),
    ],
)
def test_summary_refuses_bad_input_in_one_line(
    argv: list[str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xvol.cli.summary import main

    out = tmp_path / "rows.json"
    out.write_text("keep")
    with pytest.raises(SystemExit) as exit_:
        main(["--models", "resnet18", *[a.format(out=out) for a in argv]])
    message = exit_.value.code  # tool_errors exits with the line: Python prints it, status 1
    assert isinstance(message, str) and message.startswith(line.format(out=out))
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    assert out.read_text() == "keep"


# ---------------------------------------------------------------- xvol.convert


def test_convert_regnety_008_trains_one_step_and_reparameterizes_exactly() -> None:
    torch.manual_seed(0)
    # zero_init_last=False: with timm's zeroed conv3.bn the slots would get no gradient at init
    model = xvol.convert(timm.create_model("regnety_008", num_classes=10, zero_init_last=False))
    names = [n for n, m in model.named_modules() if isinstance(m, XConv2d)]
    assert names == [f"s3.b{i}.conv2.conv" for i in range(1, 9)]
    block = model.s3.b1.conv2
    assert isinstance(block.bn, nn.Sequential)  # BatchNormAct2d: its BN gone, drop + act stay
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.bn.modules())
    assert block.conv.groups == 20 and block.conv.stride == (2, 2)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model.train()(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if ".conv2.conv." in name and name.startswith("s3."):  # every slot parameter learns
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert not torch.equal(p, before[name]), name
    assert_reparameterizes_exactly(model, 8, float64=True)


def test_convert_torchvision_resnet_and_regnet() -> None:
    resnet = xvol.convert(torchvision.models.resnet18(num_classes=10))
    names = [n for n, m in resnet.named_modules() if isinstance(m, XConv2d)]
    assert names == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"]
    assert isinstance(resnet.layer3[0].bn2, nn.Identity)
    assert isinstance(resnet.layer2[0].bn2, nn.BatchNorm2d)  # stage 2 untouched
    assert_reparameterizes_exactly(resnet, 4)

    regnet = xvol.convert(torchvision.models.regnet_y_400mf(num_classes=10))
    # Conv2dNormActivation is an nn.Sequential(conv, BN, ReLU): the BN after the conv goes
    seq = regnet.trunk_output.block3[0].f.b
    assert isinstance(seq[0], XConv2d) and isinstance(seq[1], nn.Identity)
    assert_reparameterizes_exactly(regnet, len(slots(regnet)))


def test_convnext_depthwise_convs_need_require_bn_false() -> None:
    """ConvNeXt's 7x7 depthwise convs have a LayerNorm after them, no BN: refused by default
    with the reason, swapped with require_bn=False (the LayerNorm stays)."""
    with pytest.raises(ValueError, match="stages.2.blocks.0.conv_dw: no BatchNorm follows it"):
        xvol.convert(timm.create_model("convnext_atto", num_classes=10))
    model = xvol.convert(timm.create_model("convnext_atto", num_classes=10), require_bn=False)
    block = model.stages[2].blocks[0]
    assert isinstance(block.conv_dw, XConv2d) and block.conv_dw.groups == 160
    assert block.conv_dw.kernel_size == (7, 7)
    assert isinstance(block.norm, nn.LayerNorm)
    assert_reparameterizes_exactly(model, 6)


def test_zero_init_of_the_replaced_bn_moves_into_the_slot() -> None:
    """torchvision's zero_init_residual zeroes bn2 of BasicBlock: the slot's two BN gammas
    start at zero instead (the block starts as identity); a BN that was not zeroed is not."""
    model = xvol.convert(torchvision.models.resnet18(num_classes=10, zero_init_residual=True))
    last, first = model.layer3[0].conv2, model.layer3[0].conv1
    assert not last.bn.weight.any() and not last.pssa_bn.weight.any()
    assert first.bn.weight.all() and first.pssa_bn.weight.all()


def test_plan_lists_what_it_swaps_and_why_it_keeps_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = timm.create_model("resnet50d", num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_convert(model, stages=[0, 1])
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()  # untouched
    assert not slots(model)
    assert [s.name for s in plan.slots] == [
        "conv1.0",
        "conv1.3",
        *(f"layer1.{i}.conv2" for i in range(3)),
    ]
    # the deep stem's last conv is followed by the ResNet's bn1, outside its Sequential
    (kept,) = plan.skipped
    assert kept.name == "conv1.6" and "no BatchNorm follows it" in kept.reason
    text = str(plan)
    assert "swap  conv1.0" in text and "keep  conv1.6" in text and "require_bn=False" in text

    with caplog.at_level(logging.WARNING, logger="xvol.models.convert"):
        xvol.convert(model, stages=[0, 1])
    assert "conv1.6" in caplog.text  # what was selected but kept is reported

    narrowed = plan_convert(
        timm.create_model("regnety_008"), include=["s3.b[12].*"], exclude=["s3.b2.*"]
    )
    assert [s.name for s in narrowed.slots] == ["s3.b1.conv2.conv"]
    everything = plan_convert(timm.create_model("regnety_008"), stages=None)
    assert len(everything.slots) > 8 and any(s.stage == 0 for s in everything.slots)


def test_plan_reports_convs_xvolution_cannot_take() -> None:
    """timm's Conv2dSame (TF 'SAME' padding, its own forward) is not a plain conv."""
    plan = plan_convert(on_meta(timm.create_model, "tf_efficientnet_b0"), stages=[3])
    assert not plan.slots
    reasons = {s.reason for s in plan.skipped}
    assert any("Conv2dSame is not a plain nn.Conv2d" in r for r in reasons), reasons
    with pytest.raises(ValueError, match="nothing to swap"):
        xvol.convert(on_meta(timm.create_model, "tf_efficientnet_b0"))
    with pytest.raises(ValueError, match="stages must be ints in 0..5"):
        plan_convert(nn.Conv2d(3, 3, 3), stages=[9])


def test_dry_run_cli_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    from xvol.models.convert import main

    assert main(["regnety_008", "--stages", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 X-volution slot(s)") and "swap  s3.b1.conv2.conv" in out


# ---------------------------------------------------------------- the spec


def converted_config(**convert: Any) -> dict[str, Any]:
    return {
        "_target_": "xvol.models.build_model",
        "arch": "regnety_008",
        "num_classes": 10,
        "stages": [3],
        "xconv": {"_target_": "xvol.ops.XConv2d", "_partial_": True, "shifts": [1]},
        "convert": convert or None,
    }


def test_spec_describes_a_converted_model() -> None:
    spec = ModelSpec.from_config(converted_config(include=["s3.b1.*"], require_bn=True))
    assert spec.include == ("s3.b1.*",)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.identity() == {
        "model": spec.identity()["model"], "arch": "regnety_008", "xvolution": True,
    }  # fmt: skip
    assert spec.identity()["model"].startswith("xregnety_008-sel")
    plain = ModelSpec.from_config(converted_config())
    assert plain.identity()["model"] == "xregnety_008"
    assert "include" not in plain.to_dict()  # defaults left out: older readers agree
    assert len(slots(on_meta(spec.build))) == 1 and len(slots(on_meta(plain.build))) == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "os.system"}, "model.arch: unknown arch 'os.system'"),
        ({"arch": "xresnet50"}, "model.arch: arch 'xresnet50' is xvol's own"),
        ({"arch": "regnety_008", "stem": "cifar"}, "model.stem: 'cifar' replaces a single conv1"),
        ({"arch": "resnet50", "convert": {"include": ["a"]}}, "model.convert: convert options"),
        ({"convert": {"include": ["a b"]}}, r"model.convert.include\[0\]: 'a b' is not"),
        ({"convert": {"include": "s3.*"}}, "model.convert.include: expected a list"),
        ({"convert": {"depth": 3}}, "model.convert.depth: unknown key"),
        ({"convert": {"require_bn": "yes"}}, "model.convert.require_bn: expected true or false"),
    ],
)
def test_spec_refuses_bad_converted_models(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        ModelSpec.from_config({**converted_config(), **change})
