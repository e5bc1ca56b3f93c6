"""timm ResNets with X-volution swapped in: parity, swap arithmetic, reparam, configs, errors.

Kept cheap for CPU: counts on the meta device, forwards at 32-64 px with batch 1-2.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import timm
import torch
from helpers import randomize_bn
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

import xvol.config  # noqa: F401  (resolvers; xvol registers xresnet* with timm)
from xvol.models import (
    SUPPORTED_ARCHS,
    build_model,
    count_ops,
    count_params,
    model_summary,
    xconv_slots,
)
from xvol.models.resnet import XBasicBlock
from xvol.ops import XConv2d, XConv2dDeploy
from xvol.reparam import reparameterize_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MODEL_OPTIONS = sorted(
    p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if not p.stem.startswith("_")
)
XCONV = partial(XConv2d, shifts=(1,))
T = TypeVar("T")


def on_meta(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Build on the meta device: shapes and parameter counts without allocating weights."""
    with torch.device("meta"):
        return fn(*args, **kwargs)


def compose_model(*overrides: str, num_classes: int = 10) -> DictConfig:
    """The model group alone (the other groups belong to other issues) plus data.num_classes."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(overrides=[*overrides, f"+data.num_classes={num_classes}"])


def slot_growth(conv: nn.Conv2d, n_taps: int) -> tuple[int, int]:
    """Parameter change of one slot vs the baseline's conv2 + bn2 (design doc, "Costs").

    Training: + W_A (n_taps * C_in * C_out / g) + the PSSA branch's BN (2 C_out); the conv
    branch's BN (2 C_out) replaces bn2 (2 C_out). Deploy: + W_A + bias (C_out) - bn2 (2 C_out).
    """
    w_a = n_taps * conv.in_channels * conv.out_channels // conv.groups
    return w_a + 2 * conv.out_channels, w_a - conv.out_channels


# ---------------------------------------------------------------- baseline parity


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_baseline_matches_timm_params_and_keys(arch: str) -> None:
    ours = on_meta(build_model, arch)
    ref = on_meta(timm.create_model, arch, pretrained=False)
    assert count_params(ours) == count_params(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert not any(isinstance(m, XConv2d) for m in ours.modules())
    if arch == "resnet50":
        assert count_params(ours) == 25_557_032


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_baseline_matches_timm_logits(arch: str) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    torch.manual_seed(0)
    ours = build_model(arch, num_classes=10).eval()
    # Same seed, same init: the very same weights, not just the same shapes.
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    randomize_bn(ref, torch.Generator().manual_seed(1))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


# ---------------------------------------------------------------- swap


@pytest.mark.parametrize(
    ("arch", "stages", "shifts", "center", "n_slots"),
    [
        ("resnet18", [3], (1,), False, 2),
        ("resnet34", [3], (1,), False, 6),
        ("resnet50", [3], (1,), False, 6),
        ("resnet101", [3], (1,), False, 23),
        ("resnet18", [3, 4], (1, 2), True, 4),
        ("resnet50", [1, 2], (1,), False, 7),
    ],
)
def test_swap_arithmetic(
    arch: str, stages: list[int], shifts: tuple[int, ...], center: bool, n_slots: int
) -> None:
    base = on_meta(build_model, arch)
    xconv = partial(XConv2d, shifts=shifts, center=center)
    model = on_meta(build_model, arch, xconv=xconv, stages=stages)
    n_taps = 8 * len(shifts) + int(center)

    convs = [block.conv2 for _, block in xconv_slots(base, stages)]
    assert len(convs) == n_slots
    growth = [slot_growth(c, n_taps) for c in convs]
    assert count_params(model) - count_params(base) == sum(g[0] for g in growth)
    deploy = reparameterize_model(model)
    assert count_params(deploy) - count_params(base) == sum(g[1] for g in growth)
    assert sum(isinstance(m, XConv2d) for m in model.modules()) == n_slots


def test_swap_counts_match_paper_settings() -> None:
    """The design doc's +8 C_in C_out per slot, spelled out for the two reference models."""
    r18, x18 = on_meta(build_model, "resnet18"), on_meta(timm.create_model, "xresnet18")
    r50, x50 = on_meta(build_model, "resnet50"), on_meta(timm.create_model, "xresnet50")
    assert count_params(x18) - count_params(r18) == 2 * (8 * 256 * 256 + 2 * 256)
    assert count_params(x50) - count_params(r50) == 6 * (8 * 256 * 256 + 2 * 256)


def test_slot_geometry_and_untouched_stages() -> None:
    model = on_meta(build_model, "resnet50", xconv=XCONV, stages=[3])
    first = model.layer3[0]
    assert isinstance(first.conv2, XConv2d) and isinstance(first.bn2, nn.Identity)
    assert (first.conv2.in_channels, first.conv2.out_channels) == (256, 256)
    assert first.conv2.stride == (2, 2) and first.conv2.padding == (1, 1)
    assert all(isinstance(b.conv2, XConv2d) for b in model.layer3)
    for layer in (model.layer1, model.layer2, model.layer4):
        for b in layer:
            assert type(b.conv2) is nn.Conv2d and isinstance(b.bn2, nn.BatchNorm2d)


def test_zero_init_moves_into_the_slot() -> None:
    x18 = build_model("resnet18", xconv=XCONV, stages=[3])
    for block in x18.layer3:
        assert isinstance(block, XBasicBlock) and isinstance(block, BasicBlock)
        assert block.conv2.bn.weight.abs().sum() == 0
        assert block.conv2.pssa_bn.weight.abs().sum() == 0
    # timm's init_weights calls every block's zero_init_last(): it must reach the slot again.
    with torch.no_grad():
        for block in x18.layer3:
            block.conv2.bn.weight.fill_(1.0)
            block.conv2.pssa_bn.weight.fill_(1.0)
    x18.init_weights(zero_init_last=True)
    assert all(b.conv2.bn.weight.abs().sum() == 0 for b in x18.layer3)
    assert all(b.conv2.pssa_bn.weight.abs().sum() == 0 for b in x18.layer3)
    # The swapped block class survives a pickle round trip (torch.save of a whole model).
    assert all(isinstance(b, XBasicBlock) for b in pickle.loads(pickle.dumps(x18)).layer3)
    # Deploy slots have no BN: zero_init_last must then be a no-op, not a crash.
    reparameterize_model(x18).init_weights(zero_init_last=True)

    x50 = build_model("resnet50", xconv=XCONV, stages=[3])
    for block in x50.layer3:
        assert isinstance(block, Bottleneck) and block.bn3.weight.abs().sum() == 0
        assert torch.all(block.conv2.bn.weight == 1) and torch.all(block.conv2.pssa_bn.weight == 1)

    kept = build_model("resnet18", xconv=XCONV, stages=[3], zero_init_last=False)
    assert all(torch.all(b.conv2.bn.weight == 1) for b in kept.layer3)


def test_swap_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="xvol.models.resnet"):
        on_meta(build_model, "resnet50", xconv=XCONV, stages=[3])
    # named for the model it builds (xresnet50), not for the backbone it starts from
    assert "xresnet50: X-volution in 6 conv2 slots of stages [3]" in caplog.text


def test_compiles_without_graph_breaks() -> None:
    model = build_model("resnet18", num_classes=10, xconv=XCONV, stages=[3]).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


# ---------------------------------------------------------------- re-parameterization


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_whole_model_reparameterization(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, xconv=XCONV, stages=[3])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    randomize_and_calibrate(model, [3], calibration=torch.randn(4, 3, 64, 64))
    deploy = reparameterize_model(model)
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert isinstance(model.layer3[0].conv2, XConv2d), "reparameterize_model left model intact"

    slots = xconv_slots(deploy, [3])
    assert len(slots) == (2 if arch == "resnet18" else 6)
    for name, block in slots:
        assert isinstance(block.conv2, XConv2dDeploy), name
        assert not any(isinstance(m, nn.BatchNorm2d) for m in block.conv2.modules()), name
        assert isinstance(block.bn2, nn.Identity), name

    skeleton = reparameterize_model(build_model(arch, num_classes=10, xconv=XCONV, stages=[3]))
    skeleton.load_state_dict(deploy.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(skeleton(x), out)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_timm_reparameterize_model_converts_an_xresnet(mode: str) -> None:
    """timm's own helper (timm validate.py/benchmark.py --reparam) leaves no XConv2d and gives
    xvol's deploy form exactly; in train mode too, as validate.py calls it before eval()."""
    from timm.utils import reparameterize_model as timm_reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model("xresnet18", num_classes=10)
    randomize_and_calibrate(model, [3], calibration=torch.randn(4, 3, 64, 64))
    model.train(mode == "train")
    ours = reparameterize_model(model)
    theirs = timm_reparameterize_model(model)
    assert not any(isinstance(m, XConv2d) for m in theirs.modules())
    assert sum(isinstance(m, XConv2dDeploy) for m in theirs.modules()) == 2
    assert any(isinstance(m, XConv2d) for m in model.modules())  # inplace=False: a copy
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours(x), rtol=0, atol=0)


def randomize_and_calibrate(model: nn.Module, stages: list[int], calibration: torch.Tensor) -> None:
    """Random BN affine everywhere and random running stats in the X-volution slots (the BNs
    reparameterization folds); every other BN then takes the statistics of the activations
    this produces. Random stats everywhere would not do: with PSSA squaring activations, six
    uncalibrated slots overflow float32 (inf - inf = nan logits), and zero-init gammas (bn3 of
    Bottleneck) would hide the slots from the logits altogether.
    """
    randomize_bn(model, torch.Generator().manual_seed(1))
    slot_bns = {
        id(m)
        for _, block in xconv_slots(model, stages)
        for m in block.conv2.modules()
        if isinstance(m, nn.BatchNorm2d)
    }
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if id(m) in slot_bns:
                m.eval()
            else:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch gives its exact statistics
    with torch.no_grad():
        model(calibration)
    model.eval()


# ---------------------------------------------------------------- configs


# X-volution slots of each arch's default placement (stage 3): one per block of timm's layer3,
# and for regnety_008 (xvol.convert) one per block of s3.
STAGE3_SLOTS = {
    "resnet18": 2, "resnet34": 6, "resnet50": 6, "resnet101": 23, "resnet152": 36,
    "resnet26d": 2, "resnet50d": 6, "resnext50_32x4d": 6, "resnext101_32x8d": 23,
    "seresnet50": 6, "ecaresnet50d": 6, "wide_resnet50_2": 6, "regnety_008": 8,
}  # fmt: skip
# over 60M parameters: ~1 min each on a shared CPU, so in `make test` but not in test-fast
HEAVY = ("152", "resnext101_32x8d", "wide_resnet50_2")


@pytest.mark.parametrize(
    "option",
    [pytest.param(o, marks=pytest.mark.slow) if o.endswith(HEAVY) else o for o in MODEL_OPTIONS],
)
def test_config_option_instantiates_and_trains(option: str) -> None:
    cfg = compose_model(f"+model={option}")
    assert cfg.model._target_ == "xvol.models.build_model"
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    n_slots = sum(isinstance(m, XConv2d) for m in model.modules())
    expected = STAGE3_SLOTS[cfg.model.arch] if option.startswith("x") else 0
    assert n_slots == expected, option

    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 10)
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    if n_slots and cfg.model.arch in SUPPORTED_ARCHS:
        # The residual branch is live at init: its zero-initialized gamma gets a gradient (the
        # slot's PSSA BN in BasicBlock; bn3 in Bottleneck, which zeroes the slot's gradients).
        block = model.layer3[0]
        gamma = block.bn3.weight if isinstance(block, Bottleneck) else block.conv2.pssa_bn.weight
        assert gamma.grad.abs().sum() > 0


def test_config_overrides_reach_the_model() -> None:
    cfg = compose_model(
        "+model=xresnet18",
        "model.stages=[3,4]",
        "model.xconv.shifts=[1,2]",
        "model.xconv.center=true",
    )
    model = on_meta(instantiate, cfg.model)
    slots = [m for m in model.modules() if isinstance(m, XConv2d)]
    assert len(slots) == 4
    assert all(m.shifts == (1, 2) and m.center for m in slots)
    assert all(isinstance(b.conv2, XConv2d) for b in [*model.layer3, *model.layer4])


def test_config_typos_fail_with_hydra_messages() -> None:
    with pytest.raises(ConfigCompositionException, match="Could not override 'model.stagez'"):
        compose_model("+model=xresnet18", "model.stagez=[3]")
    with pytest.raises(ConfigCompositionException, match="model.xconv.shift"):
        compose_model("+model=xresnet18", "model.xconv.shift=[2]")
    with pytest.raises(MissingConfigException, match="xresnet19") as err:
        compose_model("+model=xresnet19")
    assert "xresnet18" in str(err.value)  # Hydra lists the available options


def test_train_config_composes_with_model_group() -> None:
    """The root config once every group exists (other issues fill data/, optim/, ...)."""
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose(config_name="train", overrides=["model=xresnet50"])
    except MissingConfigException as err:
        if "model/" in str(err):
            raise
        pytest.skip(f"another config group is not written yet: {str(err).splitlines()[0]}")
    assert cfg.model.arch == "resnet50" and list(cfg.model.stages) == [3]
    assert isinstance(cfg.model.num_classes, int)


# ---------------------------------------------------------------- errors and registry


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown arch 'resnet42': not in timm's ResNet") as err:
        build_model("resnet42")
    assert all(a in str(err.value) for a in SUPPORTED_ARCHS)
    for bad in ([5], [0], [3, 5]):
        with pytest.raises(ValueError, match="1..4"):
            build_model("resnet18", xconv=XCONV, stages=bad)
    for bad in (["3"], [True], "3", None):
        with pytest.raises(TypeError, match="stages"):
            build_model("resnet18", xconv=XCONV, stages=bad)
    with pytest.raises(ValueError, match="stages is empty"):
        build_model("resnet18", xconv=XCONV, stages=[])
    with pytest.raises(ValueError, match="nothing to swap"):
        on_meta(build_model, "resnet18", xconv=XCONV, stages=[3], layers=(2, 2, 0, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        build_model("resnet18", xconv=lambda *a, **k: 0, stages=[3])
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("xresnet18", pretrained=True)


def test_timm_registry() -> None:
    assert set(timm.list_models("xresnet*")) >= {f"xresnet{d}" for d in (18, 34, 50, 101, 152)}
    model = timm.create_model("xresnet18", num_classes=10)
    assert sum(isinstance(m, XConv2d) for m in model.modules()) == 2
    assert model.pretrained_cfg["architecture"] == "xresnet18"
    assert not model.pretrained_cfg.get("hf_hub_id") and not model.pretrained_cfg.get("url")
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    custom = on_meta(timm.create_model, "xresnet50", stages=[4], shifts=[1, 2])
    slots = [m for m in custom.modules() if isinstance(m, XConv2d)]
    assert len(slots) == 3 and all(m.shifts == (1, 2) for m in slots)


# ---------------------------------------------------------------- summary


def test_summary_counts_follow_the_swap() -> None:
    size = 32
    base = build_model("resnet18", num_classes=10)
    model = build_model("resnet18", num_classes=10, xconv=XCONV, stages=[3])
    s_base, s = model_summary(base, size), model_summary(model, size)
    assert s_base["gmuls_train"] == 0
    convs = [b.conv2 for _, b in xconv_slots(base, [3])]
    # layer3 runs at 1/16 of the input: PSSA adds a 1x1 conv over 8 C_in products per pixel.
    pixels = (size // 16) ** 2
    extra_macs = sum(8 * c.in_channels * c.out_channels * pixels for c in convs)
    extra_muls = sum(8 * c.in_channels * pixels for c in convs)
    assert round((s["gmacs_train"] - s_base["gmacs_train"]) * 1e9) == extra_macs
    assert round(s["gmuls_deploy"] * 1e9) == extra_muls
    assert s["gmacs_deploy"] == s["gmacs_train"]
    growth = [slot_growth(c, 8) for c in convs]
    assert round((s["params_m_train"] - s_base["params_m_train"]) * 1e6) == sum(
        g[0] for g in growth
    )
    assert round((s["params_m_deploy"] - s_base["params_m_train"]) * 1e6) == sum(
        g[1] for g in growth
    )
    # Meta (shapes only, as scripts/model_summary.py uses) counts what CPU counts.
    assert on_meta(count_ops, on_meta(timm.create_model, "xresnet18"), size) == count_ops(
        timm.create_model("xresnet18"), size
    )


def test_timm_fx_feature_extraction_traces_xresnet() -> None:
    """XConv2d is an FX leaf (timm's notrace registry), so timm's FX feature extractor works."""
    from timm.models import create_feature_extractor

    model = timm.create_model("xresnet18", num_classes=10).eval()
    extractor = create_feature_extractor(model, return_nodes={"layer3": "stage3", "fc": "logits"})
    x = torch.randn(1, 3, 64, 64)
    out = extractor(x)
    assert out["stage3"].shape == (1, 256, 4, 4)
    torch.testing.assert_close(out["logits"], model(x))


# ---------------------------------------------------------------- ImageNet A3 recipes


def _train_config(*overrides: str) -> dict[str, Any]:
    """The root train config composed and resolved as scripts/train.py sees it (no hydra node)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra")
    return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}."))
    return out


def test_a3_arms_differ_only_in_the_model() -> None:
    """experiment=imagenet_a3_{resnet50,xresnet50}: one recipe (timm's RSB A3 settings where xvol
    has the option), two models; the only leaves that differ are the model's X-volution ones."""
    base = _leaves(_train_config("experiment=imagenet_a3_resnet50", "run_name=a3"))
    xvol_arm = _leaves(_train_config("experiment=imagenet_a3_xresnet50", "run_name=a3"))
    differing = sorted(k for k in base.keys() | xvol_arm.keys() if base.get(k) != xvol_arm.get(k))
    assert differing, "the two arms compose to the same model"
    assert all(k.startswith("model.") for k in differing), differing
    assert base["model.arch"] == xvol_arm["model.arch"] == "resnet50"
    assert base["model.xconv"] is None and xvol_arm["model.stages"] == [3]

    a3 = {
        "data.name": "imagenet",
        "data.img_size": 160,
        "data.eval_img_size": 224,
        "data.crop_pct": 0.95,
        "data.interpolation": "bicubic",
        "data.auto_augment": "rand-m6-mstd0.5-inc1",
        "data.reprob": 0.0,
        "optim.opt": "lamb",
        "optim.weight_decay": 0.02,
        "optim.filter_bias_and_bn": True,
        "sched.sched": "cosine",
        "sched.warmup_epochs": 5,
        "sched.num_epochs": 100,
        "trainer.epochs": 100,
        "trainer.label_smoothing": 0.0,
        "trainer.mixup.mixup_alpha": 0.1,
        "trainer.mixup.cutmix_alpha": 1.0,
        "trainer.ema": None,
        "model.drop_path_rate": 0.0,
        "model.stem": "timm",
    }
    assert {k: base[k] for k in a3} == a3
    # lr 8e-3 per 2048 images of global batch: 256 per rank, one rank here
    assert base["data.batch_size"] == 256
    assert base["optim.lr"] == pytest.approx(8e-3 * 256 / 2048)
