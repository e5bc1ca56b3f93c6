"""timm registry entries, so ``import xvol; timm.create_model("xresnet50")`` works anywhere.

One entry per model of timm's ResNet family (``x`` + timm's name: xresnet18..152, xresnet26d,
xresnet50d, xresnext50_32x4d, xresnext101_32x8d, xseresnet50, xecaresnet50d, xwide_resnet50_2).
Each is timm's model with X-volution in stage 3 (the paper's choice), shifts (1,);
``stages=``, ``shifts=`` and ``center=`` can be passed through ``timm.create_model`` like any
other model kwarg. No pretrained weights exist, so ``pretrained=True`` is refused.

Each entry's data settings (input size, crop, interpolation, mean/std) are timm's for its
backbone, without the weight sources.

``stem="cifar"`` (xvol.models.resnet.use_stem) works on the entries with a single-conv stem
and on timm's own models of those names: importing xvol wraps those timm entry points so that
they take a ``stem`` keyword; without it (or with ``stem="timm"``) the wrapper calls timm's
function with the same arguments, so the baseline stays exactly timm's model.
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
    _WEIGHT_SOURCES,
    CIFAR_STEM_ARCHS,
    SUPPORTED_ARCHS,
    build_model,
    check_stem,
    stem_pretrained_cfg,
    use_stem,
)
from xvol.ops import XConv2d

__all__: list[str] = []  # register_model appends the entry names


def _cfg(arch: str) -> dict[str, Any]:
    """timm's data settings for ``arch`` (its default pretrained cfg), without weights."""
    cfg = resolve_pretrained_cfg(arch).to_dict()
    for key in (*_WEIGHT_SOURCES, "architecture", "license", "origin_url", "paper_ids"):
        cfg.pop(key, None)
    return {**cfg, "url": ""}


default_cfgs = generate_default_cfgs({f"x{arch}": _cfg(arch) for arch in SUPPORTED_ARCHS})


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


for _arch in CIFAR_STEM_ARCHS:
    # timm has no public way to extend an entry point; its registry dict is the one place
    # create_model looks names up, so the wrapper goes there (pretrained cfgs are untouched).
    _entry = timm_registry._model_entrypoints[_arch]
    if not getattr(_entry, "xvol_stem", False):
        timm_registry._model_entrypoints[_arch] = _with_stem(_entry)


_DOCS = {
    "xresnet18": "ResNet-18 with X-volution in stage 3 (2 slots).",
    "xresnet34": "ResNet-34 with X-volution in stage 3 (6 slots); the paper reports +1.2 top-1.",
    "xresnet50": "ResNet-50 with X-volution in stage 3 (6 slots); the paper reports +0.9 top-1.",
    "xresnet101": "ResNet-101 with X-volution in stage 3 (23 slots).",
    "xresnet152": "ResNet-152 with X-volution in stage 3 (36 slots).",
    "xresnet26d": "ResNet-26-D (deep stem, avg-pool downsample), X-volution in stage 3 (2 slots).",
    "xresnet50d": "ResNet-50-D (deep stem, avg-pool downsample), X-volution in stage 3 (6 slots).",
    "xresnext50_32x4d": "ResNeXt-50 32x4d, grouped X-volution (32 groups) in stage 3 (6 slots).",
    "xresnext101_32x8d": "ResNeXt-101 32x8d, grouped X-volution (32 groups) in stage 3 (23 slots).",
    "xseresnet50": "SE-ResNet-50 with X-volution in stage 3 (6 slots).",
    "xecaresnet50d": "ECA-ResNet-50-D with X-volution in stage 3 (6 slots).",
    "xwide_resnet50_2": "Wide ResNet-50-2 with X-volution in stage 3 (6 slots).",
}


def _entry(variant: str) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create_xresnet(variant, pretrained, **kwargs)

    # timm's registry reads the function's name and module (its model name and family)
    create.__name__ = create.__qualname__ = variant
    create.__doc__ = _DOCS[variant]
    return create


for _arch in SUPPORTED_ARCHS:
    globals()[f"x{_arch}"] = register_model(_entry(f"x{_arch}"))
