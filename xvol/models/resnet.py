"""timm's ResNet family with X-volution in the 3x3 convolution of chosen stages; any other timm
CNN through :func:`xvol.models.convert.convert`.

The backbones are timm's own models, so a baseline here is bit-for-bit the model everyone
compares against. In the ResNet family (:data:`SUPPORTED_ARCHS`: the plain ResNets, ResNeXt,
the ``d`` variants with a deep stem and average-pool downsample, SE/ECA ResNets and the wide
ResNet) X-volution replaces ``conv2`` (the 3x3 conv of BasicBlock and Bottleneck, grouped in
ResNeXt) in the chosen stages, and the block's ``bn2`` becomes ``nn.Identity`` because each
X-volution branch carries its own BN (docs/operator.md, "Where it goes in a ResNet"). Any other
timm model name is built by timm and converted by pattern and stage (:mod:`xvol.models.convert`).

``stem="cifar"`` swaps timm's ImageNet stem (7x7 stride-2 conv, then a stride-2 max-pool) for the
usual small-image one: a 3x3 stride-1 conv and no pool, so at 32 px stage 3 sees 8x8 maps. The
state-dict names stay timm's (``conv1``, ``bn1``; only ``conv1.weight``'s shape changes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import timm
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from xvol.models.convert import make_slot

__all__ = [
    "CONVERT_KEYS",
    "SUPPORTED_ARCHS",
    "STAGE_NAMES",
    "STEMS",
    "XBasicBlock",
    "build_model",
    "check_convertible_arch",
    "check_stages",
    "check_stem",
    "stem_pretrained_cfg",
    "use_stem",
    "xconv_slots",
]

logger = logging.getLogger(__name__)

# timm's ResNet family: X-volution in conv2 of the chosen stages (stage s is layer{s}).
PLAIN_RESNETS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SUPPORTED_ARCHS: tuple[str, ...] = (
    *PLAIN_RESNETS,
    "resnet26d",
    "resnet50d",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "seresnet50",
    "ecaresnet50d",
    "wide_resnet50_2",
)
# Archs whose stem is one conv1 and a max-pool (what stem="cifar" replaces); the "d" variants
# (resnet26d, resnet50d, ecaresnet50d) have timm's deep stem.
CIFAR_STEM_ARCHS: tuple[str, ...] = (
    *PLAIN_RESNETS,
    "resnext50_32x4d",
    "resnext101_32x8d",
    "seresnet50",
    "wide_resnet50_2",
)
# What a `convert` node may say for an arch outside the family (xvol.models.convert.convert).
CONVERT_KEYS: tuple[str, ...] = ("include", "exclude", "require_bn")
# Stage s (1-4) is timm's ResNet.layer{s}.
STAGE_NAMES: dict[int, str] = {1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"}
# "timm": timm's own stem (the default); "cifar": 3x3 stride-1 conv1, no max-pool (32 px images).
STEMS: tuple[str, ...] = ("timm", "cifar")
# pretrained_cfg keys that point at downloadable weights; a swapped model has no weights.
_WEIGHT_SOURCES = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "tag")


class XBasicBlock(BasicBlock):
    """timm BasicBlock whose ``conv2`` is an X-volution slot.

    timm's BasicBlock.zero_init_last zeroes ``bn2``, which the swap removes; ResNet.init_weights
    calls ``zero_init_last()`` on every block, so this override keeps that call meaningful by
    zeroing the slot's BN gammas instead (the block still starts as identity). A class rather
    than a patched instance attribute: it pickles, deep-copies and survives reparameterization
    (a deploy slot has no ``zero_init_bn`` and is left alone).
    """

    def zero_init_last(self) -> None:
        zero_init_bn = getattr(self.conv2, "zero_init_bn", None)
        if zero_init_bn is not None:
            zero_init_bn()


def check_stages(stages: int | Iterable[int]) -> tuple[int, ...]:
    """Sorted unique stage indices (1-4); a bare int means one stage (``model.stages=3``)."""
    if isinstance(stages, bool) or isinstance(stages, str | bytes):
        raise TypeError(f"stages must be ints in 1..4 (e.g. [3] or [3, 4]), got {stages!r}")
    if isinstance(stages, int):
        stages = (stages,)
    try:
        items = list(stages)
    except TypeError:
        raise TypeError(
            f"stages must be ints in 1..4 (e.g. [3] or [3, 4]), got {stages!r}"
        ) from None
    not_int = [s for s in items if isinstance(s, bool) or not isinstance(s, int)]
    if not_int:
        raise TypeError(f"stages must be ints in 1..4, got {items} (not ints: {not_int})")
    bad = [s for s in items if not 1 <= s <= 4]
    if bad:
        raise ValueError(
            f"stages must be ints in 1..4 (timm's layer1..layer4), got {items} (bad: {bad})"
        )
    return tuple(sorted(set(items)))


def check_stem(stem: str) -> str:
    """``stem`` if it is one of :data:`STEMS`, else a one-line ValueError naming the choices."""
    if not isinstance(stem, str) or stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    return stem


def stem_pretrained_cfg(cfg: dict[str, Any], stem: str) -> dict[str, Any]:
    """timm's data settings for a model with ``stem``: the CIFAR stem has no weights anywhere
    (timm's 7x7 conv1 does not fit it) and is made for 32 px, pooled 4x4 before the head."""
    cfg = dict(cfg)
    if check_stem(stem) == "cifar":
        for key in (*_WEIGHT_SOURCES, "test_input_size", "test_crop_pct"):
            cfg.pop(key, None)
        cfg.update(input_size=(3, 32, 32), pool_size=(4, 4))
    return cfg


def use_stem(model: nn.Module, stem: str) -> nn.Module:
    """``model`` (a timm ResNet) with the given stem, changed in place and returned.

    ``"timm"`` leaves it as it is. ``"cifar"`` replaces ``conv1`` by a 3x3 stride-1 conv with
    the same channels (``bn1`` and ``act1`` stay) and ``maxpool`` by ``nn.Identity``: the overall
    stride drops from 32 to 8. The new conv gets timm's ResNet init (kaiming normal, fan_out).
    """
    if check_stem(stem) == "timm":
        return model
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(pool, nn.Module):
        raise ValueError(
            f"stem={stem!r} replaces a timm ResNet's single conv1 and its maxpool; this model has "
            f"conv1={type(conv).__name__} (a deep stem_type is not supported)"
        )
    model.conv1 = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=3,
        stride=1,
        padding=1,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if model.conv1.bias is not None:
        nn.init.zeros_(model.conv1.bias)
    model.maxpool = nn.Identity()
    # timm's feature_info: act1 was at stride 2, every stage 4x further than now
    for info in getattr(model, "feature_info", None) or []:
        info["reduction"] = 1 if info.get("module") == "act1" else max(1, info["reduction"] // 4)
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is not None:
        model.pretrained_cfg = model.default_cfg = stem_pretrained_cfg(cfg, stem)
    return model


def xconv_slots(model: nn.Module, stages: Iterable[int]) -> list[tuple[str, nn.Module]]:
    """(name, block) for every BasicBlock/Bottleneck of the given stages, in model order."""
    slots = []
    for stage in check_stages(stages):
        layer = getattr(model, STAGE_NAMES[stage], None)
        if layer is None:
            continue
        for name, block in layer.named_children():
            if isinstance(block, BasicBlock | Bottleneck):
                slots.append((f"{STAGE_NAMES[stage]}.{name}", block))
    return slots


def _swap_slot(block: nn.Module, xconv: Callable[..., nn.Module], zero_init_last: bool) -> None:
    slot = make_slot(xconv, block.conv2)
    block.conv2 = slot
    block.bn2 = nn.Identity()
    if type(block) is BasicBlock:
        if zero_init_last and not callable(getattr(slot, "zero_init_bn", None)):
            raise TypeError(
                f"{type(slot).__name__} has no zero_init_bn(): BasicBlock zero-initializes the "
                "bn2 the swap removes, so the slot must zero its own BN (or pass "
                "zero_init_last=False)"
            )
        block.__class__ = XBasicBlock
    # Bottleneck zero-inits bn3, which stays; BasicBlock's zero init moves into the slot.
    if zero_init_last:
        block.zero_init_last()


def build_model(
    arch: str,
    num_classes: int = 1000,
    xconv: Callable[..., nn.Module] | None = None,
    stages: int | Iterable[int] = (3,),
    stem: str = "timm",
    convert: Mapping[str, Any] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """timm model ``arch`` with the given stem, X-volution built by ``xconv`` in ``stages``.

    ``xconv`` takes nn.Conv2d's leading arguments (in, out, kernel, stride=, padding=,
    dilation=, groups=, bias=), e.g. ``functools.partial(XConv2d, shifts=(1,))`` or a Hydra node
    with ``_partial_: true``. With ``xconv=None`` and ``stem="timm"`` the result is exactly
    ``timm.create_model(arch, num_classes=num_classes, **timm_kwargs)`` and ``stages`` is unused;
    ``stem="cifar"`` then changes only the stem (:func:`use_stem`).

    In the ResNet family (:data:`SUPPORTED_ARCHS`) ``conv2`` of every block in ``stages`` is
    swapped. Any other timm model goes through :func:`xvol.models.convert.convert` with
    ``stages`` and the ``convert`` options (``include``/``exclude`` module-name patterns,
    ``require_bn``); its timm kwargs are passed only where they differ from the defaults here,
    since not every timm model takes ``zero_init_last``.
    """
    if arch not in SUPPORTED_ARCHS:
        return _build_converted(arch, num_classes, xconv, stages, stem, convert, timm_kwargs)
    if convert is not None:
        raise ValueError(
            f"convert options are for archs outside timm's ResNet family; {arch} swaps conv2 of "
            "its stages (drop the convert node)"
        )
    stages = check_stages(stages)
    check_stem(stem)
    if stem != "timm" and arch not in CIFAR_STEM_ARCHS:
        raise ValueError(
            f"stem={stem!r} replaces a single conv1 and its max-pool; {arch} has timm's deep "
            f"stem (use one of {', '.join(CIFAR_STEM_ARCHS)})"
        )
    if xconv is not None and not stages:
        raise ValueError(
            "xconv was given but stages is empty: nothing would be swapped; pick stages in 1..4 "
            "(e.g. stages=[3]) or use the baseline (xconv=None)"
        )
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs)
    use_stem(model, stem)
    if xconv is None:
        return model

    slots = xconv_slots(model, stages)
    if not slots:
        raise ValueError(f"{arch} has no residual blocks in stages {list(stages)}: nothing to swap")
    zero_init_last = bool(timm_kwargs.get("zero_init_last", True))
    for _, block in slots:
        _swap_slot(block, xconv, zero_init_last)
    # No weights exist for a swapped model: keep the data settings, drop the download sources.
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    for key in _WEIGHT_SOURCES:
        cfg.pop(key, None)
    model.pretrained_cfg = model.default_cfg = cfg
    logger.info(
        "x%s%s: X-volution in %d conv2 slots of stages %s (%s)",
        arch,
        "" if stem == "timm" else f" ({stem} stem)",
        len(slots),
        list(stages),
        type(block.conv2).__name__,
    )
    return model


# timm_kwargs defaults of the family; other timm models get a kwarg only when it differs.
_TIMM_DEFAULTS = {"drop_path_rate": 0.0, "drop_rate": 0.0, "zero_init_last": True}


def check_convertible_arch(arch: Any) -> str:
    """``arch`` if timm builds it and xvol may convert it, else a one-line ValueError."""
    from xvol.models import registry  # registers xvol's names (it imports this module)

    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ValueError(
            f"unknown arch {arch!r}: not in timm's ResNet family ({', '.join(SUPPORTED_ARCHS)}) "
            "nor a timm model name (timm.list_models())"
        )
    if arch in registry.__all__:
        raise ValueError(
            f"arch {arch!r} is xvol's own X-volution entry; name its timm backbone "
            f"({arch[1:]}) and set xconv"
        )
    return arch


def _build_converted(
    arch: str,
    num_classes: int,
    xconv: Callable[..., nn.Module] | None,
    stages: int | Iterable[int],
    stem: str,
    convert: Mapping[str, Any] | None,
    timm_kwargs: dict[str, Any],
) -> nn.Module:
    from xvol.models.convert import convert as convert_model

    check_convertible_arch(arch)
    if check_stem(stem) != "timm":
        raise ValueError(f"stem={stem!r} is for timm's ResNets; {arch} keeps its own stem")
    options = dict(convert or {})
    unknown = sorted(set(options) - set(CONVERT_KEYS))
    if unknown:
        raise ValueError(
            f"convert: unknown option(s) {unknown} (allowed: {', '.join(CONVERT_KEYS)})"
        )
    kwargs = {k: v for k, v in timm_kwargs.items() if _TIMM_DEFAULTS.get(k, object()) != v}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm's {arch} does not take {sorted(kwargs)}: {e}") from None
    if xconv is None:
        return model
    stages = check_stages(stages)
    if not stages:
        raise ValueError("xconv was given but stages is empty: pick stages in 1..4 (e.g. [3])")
    return convert_model(
        model,
        xconv,
        stages=stages,
        include=options.get("include") or None,
        exclude=options.get("exclude") or None,
        require_bn=bool(options.get("require_bn", True)),
    )
