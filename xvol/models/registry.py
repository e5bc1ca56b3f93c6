"""timm registry entries, so ``import xvol; timm.create_model("xresnet50")`` works anywhere.

Each entry is timm's ResNet with X-volution in stage 3 (the paper's choice), shifts (1,);
``stages=``, ``shifts=`` and ``center=`` can be passed through ``timm.create_model`` like any
other model kwarg. No pretrained weights exist, so ``pretrained=True`` is refused.

``stem="cifar"`` (xvol.models.resnet.use_stem) works on these entries and on timm's own
resnet18/34/50/101/152: importing xvol wraps those timm entry points so that they take a
``stem`` keyword; without it (or with ``stem="timm"``) the wrapper calls timm's function with the
same arguments, so the baseline stays exactly timm's model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from timm.models import _registry as timm_registry
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from xvol.models.resnet import (
    SUPPORTED_ARCHS,
    build_model,
    check_stem,
    stem_pretrained_cfg,
    use_stem,
)
from xvol.ops import XConv2d

__all__: list[str] = []  # register_model appends the entry names


def _cfg() -> dict[str, Any]:
    """timm's ResNet data settings (224 px, ImageNet mean/std), without weights."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1",
        "classifier": "fc",
    }


default_cfgs = generate_default_cfgs(
    {f"xresnet{depth}": _cfg() for depth in (18, 34, 50, 101, 152)}
)


def _create_xresnet(
    variant: str,
    pretrained: bool = False,
    *,
    stages: int | Iterable[int] = (3,),
    shifts: Sequence[int] = (1,),
    center: bool = False,
    stem: str = "timm",
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: Any = None,
    **kwargs: Any,
) -> nn.Module:
    if pretrained:
        raise ValueError(
            f"no pretrained weights exist for {variant}: create it with pretrained=False and "
            "train it (or load a checkpoint of your own)"
        )
    xconv = partial(XConv2d, shifts=tuple(shifts), center=center)
    model = build_model(variant[1:], xconv=xconv, stages=stages, stem=stem, **kwargs)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = model.default_cfg = stem_pretrained_cfg(cfg, stem)
    return model


def _with_stem(entry: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """timm's entry point ``entry`` taking ``stem=`` too; ``stem="timm"`` is ``entry`` itself."""

    @functools.wraps(entry)
    def create(pretrained: bool = False, *, stem: str = "timm", **kwargs: Any) -> nn.Module:
        if check_stem(stem) == "timm":
            return entry(pretrained=pretrained, **kwargs)
        if pretrained:
            raise ValueError(
                f"no pretrained weights exist for {entry.__name__} with stem={stem!r} (timm's "
                "weights are for its 7x7 stem): create it with pretrained=False"
            )
        return use_stem(entry(pretrained=False, **kwargs), stem)

    create.xvol_stem = True  # type: ignore[attr-defined]  (wrapped once, even on reimport)
    return create


for _arch in SUPPORTED_ARCHS:
    # timm has no public way to extend an entry point; its registry dict is the one place
    # create_model looks names up, so the wrapper goes there (pretrained cfgs are untouched).
    _entry = timm_registry._model_entrypoints[_arch]
    if not getattr(_entry, "xvol_stem", False):
        timm_registry._model_entrypoints[_arch] = _with_stem(_entry)


@register_model
def xresnet18(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-18 with X-volution in stage 3 (2 slots)."""
    return _create_xresnet("xresnet18", pretrained, **kwargs)


@register_model
def xresnet34(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-34 with X-volution in stage 3 (6 slots); the paper reports +1.2 top-1."""
    return _create_xresnet("xresnet34", pretrained, **kwargs)


@register_model
def xresnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 with X-volution in stage 3 (6 slots); the paper reports +0.9 top-1."""
    return _create_xresnet("xresnet50", pretrained, **kwargs)


@register_model
def xresnet101(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-101 with X-volution in stage 3 (23 slots)."""
    return _create_xresnet("xresnet101", pretrained, **kwargs)


@register_model
def xresnet152(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-152 with X-volution in stage 3 (36 slots)."""
    return _create_xresnet("xresnet152", pretrained, **kwargs)
