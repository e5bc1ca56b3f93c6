"""``model.stem=cifar``: a 3x3 stride-1 stem conv and no max-pool on timm's ResNets.

The CIFAR stem keeps timm's state-dict names (only ``conv1.weight`` is 3x3), gives 8x8 maps in
stage 3 at 32 px, is recorded in the model spec (a checkpoint rebuilds it; files without the
field still load as timm's stem), and re-parameterizes like timm's stem: the stem stays a conv
and its BN, the X-volution slots fold, and the deploy model gives the same logits.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from helpers import randomize_bn
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.models import model_entrypoint
from timm.utils import reparameterize_model as timm_reparameterize_model
from tools_helpers import make_checkpoint, model_config
from torch import nn

import xvol.config  # noqa: F401  (resolvers; xvol registers xresnet* with timm)
from xvol.formats.load import load_train_checkpoint
from xvol.models import ModelSpec, ModelSpecError, build_model
from xvol.models.resnet import CIFAR_STEM_ARCHS, STEMS
from xvol.ops import XConv2d, XConv2dDeploy
from xvol.reparam import reparameterize_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MODEL_OPTIONS = sorted(
    p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if not p.stem.startswith("_")
)


@pytest.fixture(autouse=True)
def _one_thread(single_thread_module: None) -> None:
    """Small tensors on a shared CPU (conftest.single_thread_module)."""


def compose_model(*overrides: str, num_classes: int = 10) -> dict:
    """The model group alone, resolved as scripts/train.py stores it in a checkpoint."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(overrides=[*overrides, f"+data.num_classes={num_classes}"])
    return OmegaConf.to_container(cfg.model, resolve=True)


def stage_shapes(model: nn.Module, size: int = 32) -> dict[str, tuple[int, int]]:
    """Spatial size of the stem's output and of each stage at ``size`` px."""
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[-2:]))
        )
        for name in ("maxpool", "layer1", "layer2", "layer3", "layer4")
    ]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return shapes


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "xresnet18"])
def test_state_dict_names_are_timms(name: str) -> None:
    """Same keys, same shapes, in the same order as timm's model of that name, except
    conv1.weight (3x3 instead of 7x7); the max-pool becomes nn.Identity."""
    torch.manual_seed(0)
    cifar = timm.create_model(name, stem="cifar", num_classes=10).state_dict()
    timm_stem = timm.create_model(name, num_classes=10).state_dict()
    assert list(cifar) == list(timm_stem)
    changed = {k: tuple(v.shape) for k, v in cifar.items() if v.shape != timm_stem[k].shape}
    stem_width = cifar["bn1.weight"].numel()
    assert stem_width == 64
    assert changed == {"conv1.weight": (64, 3, 3, 3)}
    model = timm.create_model(name, stem="cifar", num_classes=10)
    assert (model.conv1.stride, model.conv1.padding) == ((1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.act1, nn.ReLU)


def test_stage3_sees_8x8_at_32px() -> None:
    torch.manual_seed(0)
    cifar = stage_shapes(timm.create_model("xresnet18", stem="cifar", num_classes=10))
    assert cifar == {
        "maxpool": (32, 32),
        "layer1": (32, 32),
        "layer2": (16, 16),
        "layer3": (8, 8),
        "layer4": (4, 4),
    }
    # timm's stem, for contrast: 2x2 maps in stage 3 at 32 px
    assert stage_shapes(timm.create_model("resnet18", num_classes=10))["layer3"] == (2, 2)
    model = timm.create_model("resnet18", stem="cifar", num_classes=10)
    assert [i["reduction"] for i in model.feature_info] == [1, 1, 2, 4, 8]
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert not model.pretrained_cfg.get("url") and not model.pretrained_cfg.get("hf_hub_id")


def test_default_stem_is_timms_model_exactly() -> None:
    """xvol wraps timm's resnet entry points for ``stem=``; without it they are timm's own."""
    entry = model_entrypoint("resnet18")
    assert entry.__wrapped__.__module__ == "timm.models.resnet"
    torch.manual_seed(0)
    ours = timm.create_model("resnet18", num_classes=10)
    torch.manual_seed(0)
    theirs = entry.__wrapped__(pretrained=False, num_classes=10)
    assert isinstance(ours.maxpool, nn.MaxPool2d) and ours.conv1.kernel_size == (7, 7)
    assert ours.pretrained_cfg == theirs.pretrained_cfg
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    torch.manual_seed(0)
    built = build_model("resnet18", num_classes=10, stem="timm").state_dict()
    assert all(torch.equal(built[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("option", MODEL_OPTIONS)
def test_every_model_config_takes_stem_cifar(option: str) -> None:
    """Each ResNet with timm's single-conv stem takes the CIFAR stem; a deep-stem "d" variant or
    another CNN refuses it, naming model.stem, before anything is built."""
    cfg = compose_model(f"+model={option}", "model.stem=cifar")
    assert cfg["stem"] == "cifar"
    if cfg["arch"] not in CIFAR_STEM_ARCHS:
        with pytest.raises(ModelSpecError, match=r"^model config: model\.stem: 'cifar' replaces"):
            ModelSpec.from_config(cfg, where="model")
        return
    assert ModelSpec.from_config(cfg, where="model").stem == "cifar"
    with torch.device("meta"):
        model = instantiate(cfg)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert any(isinstance(m, XConv2d) for m in model.modules()) == option.startswith("x")
    assert compose_model(f"+model={option}")["stem"] == "timm"


# ---------------------------------------------------------------- the spec


def test_checkpoint_round_trip_through_the_spec(tmp_path: Path) -> None:
    """A training checkpoint of a stem=cifar model (config.model as scripts/train.py stores
    it) is rebuilt from its spec by the tools' loader: same weights, same logits."""
    cfg = compose_model("+model=xresnet18", "model.stem=cifar", num_classes=3)
    path = make_checkpoint(tmp_path / "last.pt", cfg, ema=False)
    loaded = load_train_checkpoint(path, ema=False)
    assert loaded.spec.stem == "cifar" and loaded.spec.stages == (3,)
    assert loaded.model.conv1.kernel_size == (3, 3)
    assert isinstance(loaded.model.maxpool, nn.Identity)
    stored = torch.load(path, weights_only=True)["model"]
    rebuilt = loaded.model.state_dict()
    assert list(rebuilt) == list(stored)
    assert all(torch.equal(rebuilt[k], v) for k, v in stored.items())
    # the sidecar's flat form, and the record's identity
    assert loaded.spec.to_dict()["stem"] == "cifar"
    assert ModelSpec.from_dict(loaded.spec.to_dict()) == loaded.spec
    assert loaded.identity == {
        "model": "xresnet18-cifar",
        "arch": "resnet18-cifar",
        "xvolution": True,
    }
    baseline = ModelSpec.from_config(compose_model("+model=resnet18", "model.stem=cifar"))
    assert baseline.identity()["arch"] == "resnet18-cifar"  # paired with xresnet18-cifar only


def test_files_without_stem_still_load() -> None:
    """Checkpoints and sidecars written before the field: timm's stem, and the same dict."""
    old_config = model_config()  # what scripts/train.py stored before model.stem existed
    assert "stem" not in old_config
    spec = ModelSpec.from_config(old_config)
    assert spec.stem == "timm"
    old_sidecar = spec.to_dict()
    assert "stem" not in old_sidecar  # a timm-stem description is the dict it always was
    assert ModelSpec.from_dict(old_sidecar) == spec
    assert ModelSpec.from_config({**old_config, "stem": "timm"}) == spec
    assert spec.identity() == {"model": "xresnet18", "arch": "resnet18", "xvolution": True}


def test_bad_stem_is_refused_in_one_line() -> None:
    cfg = {**compose_model("+model=xresnet18"), "stem": "foo"}
    with pytest.raises(ModelSpecError) as err:
        ModelSpec.from_config(cfg, "run/last.pt", where="config.model")
    expected = "run/last.pt: config.model.stem: expected one of timm, cifar, got 'foo'"
    assert str(err.value) == expected
    sidecar = {**ModelSpec.from_config(model_config()).to_dict(), "stem": 3}
    with pytest.raises(ModelSpecError) as err:
        ModelSpec.from_dict(sidecar, "deploy.json")
    assert str(err.value) == "deploy.json: model_spec.stem: expected one of timm, cifar, got 3"
    for build in (
        lambda: build_model("resnet18", stem="foo"),
        lambda: timm.create_model("resnet18", stem="foo"),
        lambda: timm.create_model("xresnet18", stem="foo"),
    ):
        with pytest.raises(ValueError) as err:
            build()
        assert str(err.value) == "stem must be one of timm, cifar, got 'foo'"
    assert STEMS == ("timm", "cifar")


def test_no_pretrained_weights_for_the_cifar_stem() -> None:
    with pytest.raises(ValueError, match="no pretrained weights exist for resnet18 with stem"):
        timm.create_model("resnet18", stem="cifar", pretrained=True)
    with pytest.raises(ValueError, match="deep stem_type is not supported"):
        build_model("resnet18", stem="cifar", stem_type="deep")


# ---------------------------------------------------------------- re-parameterization


@pytest.mark.parametrize("helper", ["xvol", "timm"])
def test_reparameterization_with_randomized_bn(helper: str) -> None:
    """Every BN random (stem, blocks, X-volution slots); the deploy model keeps the stem's
    conv and BN as timm's stem does, folds the slots, and gives the same logits."""
    torch.manual_seed(0)
    xconv = partial(XConv2d, shifts=(1,))
    model = build_model("resnet18", num_classes=10, xconv=xconv, stages=[3], stem="cifar")
    randomize_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    reparam = reparameterize_model if helper == "xvol" else timm_reparameterize_model
    deploy = reparam(model).eval()
    assert any(isinstance(m, XConv2d) for m in model.modules())  # the original is untouched
    assert sum(isinstance(m, XConv2dDeploy) for m in deploy.modules()) == 2
    assert not any(isinstance(m, XConv2d) for m in deploy.modules())
    assert deploy.conv1.kernel_size == (3, 3) and isinstance(deploy.maxpool, nn.Identity)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    assert torch.isfinite(ref).all()
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    # the deploy skeleton of the same spec takes the deploy weights strictly
    spec = ModelSpec(arch="resnet18", num_classes=10, stages=(3,), shifts=(1,), stem="cifar")
    skeleton = reparameterize_model(spec.build())
    skeleton.load_state_dict(deploy.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(skeleton(x), out)
