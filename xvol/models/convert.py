"""X-volution in any CNN: swap it into the eligible convolutions of a timm or torchvision model.

The ResNet family has its own swap (``xvol.models.resnet``: ``conv2`` of the chosen stages);
this module does the same for any other network, by looking at its convolutions::

    model = xvol.convert(timm.create_model("regnety_008"), stages=[3])
    print(xvol.models.plan_convert(timm.create_model("convnext_atto"), require_bn=False))

**Eligible** convolution: a plain ``nn.Conv2d`` (not a subclass with its own forward, such as
timm's ``Conv2dSame``) with zero padding, an odd square kernel of at least ``min_kernel``
(1x1 convolutions are pointwise and stay), equal strides, dilations and paddings on both axes,
followed by its ``BatchNorm2d``. Convolutions under ``min_kernel`` are counted in the plan,
not listed. "Followed by" is read from the module tree, the way timm and
torchvision build blocks:

- a ``conv`` whose parent also holds a ``bn`` (timm's ``ConvNormAct``);
- a ``conv<i>`` beside a ``bn<i>`` (timm's and torchvision's ResNet blocks);
- a convolution followed by a BN in an ``nn.Sequential`` (torchvision's
  ``Conv2dNormActivation``).

With ``require_bn=False`` a convolution with no BN after it (ConvNeXt's depthwise 7x7, followed
by a LayerNorm) is swapped too and what follows it stays.

**Stages** are numbered by output stride, as timm's ``feature_info`` reductions and ResNet's
``layer1..layer4``: stride 2 is the stem (stage 0), 4 is stage 1, 8 stage 2, 16 stage 3, 32
stage 4. A convolution inside a module timm's ``feature_info`` names takes that module's stage;
any other (a torchvision model, a stem) is placed by running the model once on a small input
(``img_size``, batch 1, eval mode, no grad; train/eval flags restored) and reading its output
stride. ``include``/``exclude``
are ``fnmatch`` patterns on module names (``s3.*.conv2.conv``) and narrow the selection further.

**The swap** keeps what the ResNet swap keeps: the X-volution module carries one BN per branch,
so the BN that followed the convolution goes (a timm ``BatchNormAct2d`` leaves its drop and
activation behind, a plain BN becomes ``nn.Identity``). A BN that the model zero-initialized (the
last BN of a residual branch: timm's ``zero_init_last``, torchvision's ``zero_init_residual``)
has its zeros moved into the slot's BNs (``XConv2d.zero_init_bn``), so the block still starts
as identity. The slot's convolutions get timm's ResNet init (kaiming normal, fan_out).

What was selected but cannot be swapped is part of the plan with its reason, and ``convert``
logs it (warning); nothing selected is skipped silently. ``python -m xvol.models.convert ARCH``
prints the plan for a timm model (a dry run: nothing is built beyond the model itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from xvol.ops import XConv2d

__all__ = ["ConvertPlan", "Slot", "convert", "plan_convert"]

logger = logging.getLogger(__name__)

# pretrained_cfg keys that point at downloadable weights; a converted model has no weights.
_WEIGHT_SOURCES = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "tag")


@dataclasses.dataclass(frozen=True)
class Slot:
    """One convolution the plan looked at: where it is, what it is, and why it stays (if so)."""

    name: str
    geometry: str
    stage: int | None  # None: the probe forward never ran it
    norm: str | None  # module name of the BN that follows it (None: none found)
    reason: str | None = None  # None: swapped (or would be)

    @property
    def swapped(self) -> bool:
        return self.reason is None


@dataclasses.dataclass(frozen=True)
class ConvertPlan:
    """What ``convert`` swaps (``slots``) and what it selected but cannot swap (``skipped``)."""

    slots: tuple[Slot, ...]
    skipped: tuple[Slot, ...]
    not_selected: int  # convolutions outside the stages/patterns asked for
    small: int = 0  # selected convolutions with a kernel under min_kernel (1x1), left as they are

    def __str__(self) -> str:
        lines = [f"{len(self.slots)} X-volution slot(s), {len(self.skipped)} selected but kept"]
        width = max((len(s.name) for s in (*self.slots, *self.skipped)), default=4)
        for s in self.slots:
            stage = "-" if s.stage is None else s.stage
            lines.append(f"  swap  {s.name:<{width}}  stage {stage}  {s.geometry}")
        for s in self.skipped:
            stage = "-" if s.stage is None else s.stage
            lines.append(f"  keep  {s.name:<{width}}  stage {stage}  {s.geometry}: {s.reason}")
        lines.append(
            f"({self.small} selected convolution(s) under min_kernel left as they are, "
            f"{self.not_selected} outside the selection)"
        )
        return "\n".join(lines)


def _geometry(conv: nn.Conv2d) -> str:
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    text = f"{conv.in_channels}->{conv.out_channels} {k[0]}x{k[1]} s{s[0]}"
    if d[0] != 1:
        text += f" d{d[0]}"
    if conv.groups != 1:
        text += f" g{conv.groups}"
    return text


def _why_not(conv: nn.Module, min_kernel: int) -> str | None:
    """Why X-volution cannot take this convolution's place (None: it can)."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d (its forward differs)"
    k, s, d, p = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if k[0] != k[1] or s[0] != s[1] or d[0] != d[1]:
        return "kernel, stride and dilation must be equal on both axes"
    if isinstance(p, str):
        if p != "valid" and not (p == "same" and s[0] == 1):
            return f"padding={p!r} (X-volution takes ints, 'valid', or 'same' at stride 1)"
    elif p[0] != p[1]:
        return f"padding {tuple(p)} differs between the axes"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (X-volution pads with zeros)"
    if k[0] % 2 == 0:
        return f"even kernel {k[0]}x{k[0]} (X-volution needs an odd one)"
    return None


def _following_bn(
    parent: nn.Module, child: str, conv: nn.Conv2d
) -> tuple[str | None, nn.Module | None]:
    """(attribute name in ``parent``, module) of the norm layer that follows ``conv``."""
    names = [n for n, _ in parent.named_children()]
    candidates = []
    if child == "conv":
        candidates += ["bn", "norm"]
    if child.startswith("conv"):
        suffix = child[len("conv") :]
        candidates += [f"bn{suffix}", f"norm{suffix}"]
    for name in candidates:
        if name in names:
            return name, getattr(parent, name)
    if isinstance(parent, nn.Sequential) and child in names:
        i = names.index(child)
        if i + 1 < len(names):
            return names[i + 1], getattr(parent, names[i + 1])
    return None, None


def _output_strides(model: nn.Module, img_size: int) -> dict[str, int]:
    """{conv name: output stride} from one forward of a zero image (eval, no grad)."""
    convs = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        return {}
    first = next(iter(convs))
    param = next(model.parameters())
    x = torch.zeros(
        1, first.in_channels, img_size, img_size, device=param.device, dtype=param.dtype
    )
    strides: dict[str, int] = {}

    def hook(module: nn.Module, _: Any, out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] > 0:
            strides.setdefault(convs[module], max(1, round(img_size / out.shape[-1])))

    handles = [m.register_forward_hook(hook) for m in convs]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return strides


def _stage(stride: int | None) -> int | None:
    """Output stride 2 -> stage 0 (the stem), 4 -> 1, 8 -> 2, 16 -> 3, 32 -> 4."""
    if stride is None:
        return None
    return max(0, round(math.log2(stride)) - 1)


def _feature_stages(model: nn.Module) -> dict[str, int]:
    """{module prefix: stage} from timm's ``feature_info`` (reduction 4 is stage 1, ...)."""
    out: dict[str, int] = {}
    for info in getattr(model, "feature_info", None) or []:
        if isinstance(info, dict) and isinstance(info.get("module"), str):
            reduction = info.get("reduction")
            if isinstance(reduction, int) and reduction > 0:
                out[info["module"]] = _stage(reduction)
    return out


def _stages(model: nn.Module, names: list[str], img_size: int) -> dict[str, int | None]:
    """{conv name: stage}: the timm stage module it lives in, else its probed output stride."""
    prefixes = _feature_stages(model)
    stages: dict[str, int | None] = {}
    for name in names:
        hits = [p for p in prefixes if name == p or name.startswith(p + ".")]
        stages[name] = prefixes[max(hits, key=len)] if hits else None
    if any(stage is None for stage in stages.values()):
        strides = _output_strides(model, img_size)
        for name, stage in stages.items():
            if stage is None:
                stages[name] = _stage(strides.get(name))
    return stages


def _check_patterns(patterns: Iterable[str] | None, what: str) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = (patterns,)
    out = tuple(patterns)
    bad = [p for p in out if not isinstance(p, str) or not p]
    if bad:
        raise TypeError(f"{what} must be non-empty module-name patterns, got {bad}")
    return out


def _check_stages(stages: int | Iterable[int] | None) -> tuple[int, ...] | None:
    if stages is None:
        return None
    if isinstance(stages, int) and not isinstance(stages, bool):
        stages = (stages,)
    out = tuple(stages)
    bad = [s for s in out if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= 5]
    if bad or not out:
        raise ValueError(
            f"stages must be ints in 0..5 (0: the stem, 1-4 as ResNet's layer1..layer4), "
            f"got {list(out)}"
        )
    return tuple(sorted(set(out)))



def make_slot(xconv: Callable[..., nn.Module], conv: nn.Conv2d) -> nn.Module:
    """``xconv`` built for ``conv``'s geometry (channels, kernel, stride, padding, dilation,
    groups, bias), on its device and dtype, its convolutions initialized as timm's ResNet
    initializes the conv it replaces (kaiming normal, fan_out). The ResNet swap and
    :func:`convert` both make their slots here."""
    slot = xconv(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    if not isinstance(slot, nn.Module):
        raise TypeError(
            f"xconv must build an nn.Module like xvol.ops.XConv2d, got {type(slot).__name__}"
        )
    slot = slot.to(device=conv.weight.device, dtype=conv.weight.dtype)
    for m in slot.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return slot


def plan_convert(
    model: nn.Module,
    *,
    stages: int | Iterable[int] | None = (3,),
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    require_bn: bool = True,
    min_kernel: int = 3,
    img_size: int = 64,
) -> ConvertPlan:
    """Which convolutions of ``model`` :func:`convert` would swap, and why it keeps the others.

    ``stages=None`` selects every stage; ``include`` (any pattern matches) and ``exclude`` (no
    pattern matches) select by module name. ``model`` is not changed.
    """
    wanted = _check_stages(stages)
    include, exclude = _check_patterns(include, "include"), _check_patterns(exclude, "exclude")
    modules = dict(model.named_modules())
    conv_names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    stage_of = _stages(model, conv_names, img_size)
    slots, skipped, not_selected, pointwise = [], [], 0, 0
    for name in conv_names:
        conv = modules[name]
        stage = stage_of.get(name)
        if wanted is not None and stage is not None and stage not in wanted:
            not_selected += 1
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            not_selected += 1
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            not_selected += 1
            continue
        if conv.kernel_size[0] < min_kernel and conv.kernel_size == conv.kernel_size[::-1]:
            pointwise += 1  # 1x1 convs are not candidates: counted, not listed
            continue
        parent_name, _, child = name.rpartition(".")
        norm_attr, norm = _following_bn(modules[parent_name], child, conv)
        norm_name = None if norm_attr is None else f"{parent_name}.{norm_attr}".lstrip(".")
        reason = _why_not(conv, min_kernel)
        if reason is None and wanted is not None and stage is None:
            reason = "the probe forward never ran it, so its stage is unknown"
        if reason is None:
            if isinstance(norm, nn.BatchNorm2d):
                if norm.num_features != conv.out_channels:
                    reason = (
                        f"{norm_name} has {norm.num_features} features, not {conv.out_channels}"
                    )
            elif require_bn:
                what = "" if norm is None else f" ({norm_name} is a {type(norm).__name__})"
                reason = f"no BatchNorm follows it{what}; require_bn=False swaps it anyway"
            else:
                norm_name = None  # kept as it is
        slot = Slot(name, _geometry(conv), stage, norm_name, reason)
        (slots if reason is None else skipped).append(slot)
    return ConvertPlan(tuple(slots), tuple(skipped), not_selected, pointwise)


def _without_bn(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of the BN a slot replaces: timm's BatchNormAct2d keeps its drop and act."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return nn.Sequential(drop, act)
    return nn.Identity()


def _is_zero(weight: torch.Tensor | None) -> bool:
    return weight is not None and not weight.is_meta and bool((weight == 0).all())


def convert(
    model: nn.Module,
    xconv: Callable[..., nn.Module] | None = None,
    *,
    shifts: Sequence[int] = (1,),
    center: bool = False,
    stages: int | Iterable[int] | None = (3,),
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    require_bn: bool = True,
    min_kernel: int = 3,
    img_size: int = 64,
) -> nn.Module:
    """``model`` with X-volution in place of the convolutions :func:`plan_convert` selects.

    Changed in place and returned. ``xconv`` builds a slot from nn.Conv2d's arguments (default:
    ``XConv2d`` with ``shifts`` and ``center``). Raises ValueError when nothing would be swapped,
    naming why the selected convolutions stay.
    """
    plan = plan_convert(
        model,
        stages=stages,
        include=include,
        exclude=exclude,
        require_bn=require_bn,
        min_kernel=min_kernel,
        img_size=img_size,
    )
    if not plan.slots:
        why = "; ".join(f"{s.name}: {s.reason}" for s in plan.skipped[:4]) or "no convolution"
        raise ValueError(
            f"{type(model).__name__}: nothing to swap for X-volution in stages {stages} "
            f"(include={list(include or [])}, exclude={list(exclude or [])}): {why}"
        )
    for s in plan.skipped:
        logger.warning("X-volution not swapped into %s (%s): %s", s.name, s.geometry, s.reason)
    if xconv is None:
        xconv = partial(XConv2d, shifts=tuple(shifts), center=center)
    modules = dict(model.named_modules())
    for s in plan.slots:
        slot = make_slot(xconv, modules[s.name])
        parent_name, _, child = s.name.rpartition(".")
        setattr(modules[parent_name], child, slot)
        if s.norm is not None:
            bn = modules[s.norm]
            if _is_zero(getattr(bn, "weight", None)) and callable(
                getattr(slot, "zero_init_bn", None)
            ):
                slot.zero_init_bn()
            norm_parent, _, norm_child = s.norm.rpartition(".")
            setattr(modules[norm_parent], norm_child, _without_bn(bn))
    cfg = getattr(model, "pretrained_cfg", None)
    label = cfg.get("architecture") if isinstance(cfg, dict) else None
    label = f"x{label}" if isinstance(label, str) else type(model).__name__
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if k not in _WEIGHT_SOURCES}
        model.pretrained_cfg = model.default_cfg = cfg
    logger.info(
        "%s: X-volution in %d slot(s) (%s), %d selected convolution(s) kept",
        label,
        len(plan.slots),
        ", ".join(s.name for s in plan.slots[:3]) + (", ..." if len(plan.slots) > 3 else ""),
        len(plan.skipped),
    )
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xvol.models.convert ARCH``: print what convert would swap in a timm model."""
    import timm

    parser = argparse.ArgumentParser(
        prog="python -m xvol.models.convert",
        description="Dry run: list the convolutions of a timm model that xvol.convert would "
        "swap for X-volution, and why it keeps the others it selected.",
    )
    parser.add_argument("arch", help="a timm model name, e.g. regnety_008")
    parser.add_argument(
        "--stages", type=int, nargs="*", default=[3], help="stages (0 stem, 1-4); none: all"
    )
    parser.add_argument("--include", nargs="*", default=None, help="fnmatch module-name patterns")
    parser.add_argument("--exclude", nargs="*", default=None, help="fnmatch module-name patterns")
    parser.add_argument(
        "--no-require-bn", action="store_true", help="also swap convs with no BatchNorm after"
    )
    args = parser.parse_args(argv)
    if not timm.is_model(args.arch):
        parser.error(f"{args.arch!r} is not a timm model name (see timm.list_models())")
    with torch.device("meta"):
        model = timm.create_model(args.arch, pretrained=False)
    plan = plan_convert(
        model,
        stages=args.stages or None,
        include=args.include,
        exclude=args.exclude,
        require_bn=not args.no_require_bn,
    )
    sys.stdout.write(f"{plan}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
