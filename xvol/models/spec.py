"""A validated description of an xvol model: what a checkpoint or sidecar may say about its network.

A checkpoint and a deploy sidecar are files from outside. Hydra's ``instantiate`` on a model
config read from one would import and call whatever its ``_target_`` names (``torch.load`` of a
pickle, ``pathlib.Path.touch``, ...). So the tools never instantiate a stored config: they read it
into a ``ModelSpec`` (every field type-checked and bounded; ``_target_`` compared as a string
against xvol's own builders, never imported) and build the network with xvol's own function::

    spec = ModelSpec.from_config(state["config"]["model"], "run/best.pt", where="config.model")
    model = spec.build()          # xvol.models.build_model(...), nothing else

Shapes read:

- ``from_config``: a resolved ``configs/model/*.yaml`` (what scripts/train.py stores as
  ``config["model"]`` and deploy format 1 stored as ``model_config``): ``_target_:
  xvol.models.build_model``, ``arch``, ``num_classes``, ``stages``, ``xconv`` (null, or
  ``_target_: xvol.ops.XConv2d`` with ``_partial_: true``, ``shifts``, ``center`` and XConv2d's
  ``impl``/``bn_eps``/``bn_momentum``), ``stem`` (``timm`` or ``cifar``; absent in files written
  before it existed: timm's stem), the timm kwargs ``drop_path_rate``, ``drop_rate``,
  ``zero_init_last``, and for an arch outside timm's ResNet family an optional ``convert`` node
  (``include``/``exclude`` module-name patterns, ``require_bn``: xvol.models.convert).
- ``from_dict``: ``to_dict()``'s flat form (deploy format 2 sidecars): the fields below, no
  ``_target_`` at all; ``stem`` and the convert fields are there only when they are not the
  defaults, so a description of a timm-stem ResNet is the same dict it was before they existed.

``arch`` is one of timm's ResNet family (xvol.models.resnet.SUPPORTED_ARCHS) or any other timm
model name, compared against timm's registry as a string (``timm.is_model``): timm only ever
builds a model it registered.

Any other key, type or value is a ``ModelSpecError`` whose one-line message names the file and
the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import nn

from xvol.checks import BOOL, Check, int_in, is_int, number_in, one_of
from xvol.models.resnet import (
    CIFAR_STEM_ARCHS,
    CONVERT_KEYS,
    STEMS,
    SUPPORTED_ARCHS,
    build_model,
    check_convertible_arch,
)
from xvol.ops import XConv2d

__all__ = ["BUILDER_TARGETS", "XCONV_TARGETS", "ModelSpec", "ModelSpecError"]

# The only _target_ strings a stored model config may carry (compared as strings, never imported).
BUILDER_TARGETS: tuple[str, ...] = ("xvol.models.build_model", "xvol.models.resnet.build_model")
XCONV_TARGETS: tuple[str, ...] = ("xvol.ops.XConv2d", "xvol.ops.xconv.XConv2d")
MAX_CLASSES = 1_000_000
MAX_SHIFT = 64  # pixels; larger shifts read only padding in every supported stage
MAX_SHIFTS = 8  # distances per slot (8 PSSA taps each)
# XConv2d's PSSA path ("auto", "reference", "lean", ...): a name, which XConv2d itself checks
# against the paths xvol.ops offers when the model is built (one home for that list).

_TIMM_KEYS = ("drop_path_rate", "drop_rate", "zero_init_last")
_XCONV_KEYS = ("shifts", "center", "impl", "bn_eps", "bn_momentum")
# Fields a description may leave out (added after files without them were written).
_OPTIONAL_FIELDS = ("stem", *CONVERT_KEYS)
MAX_PATTERNS = 16
# fnmatch patterns over module names: dotted names, wildcards and character classes only
_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,200}")
_ARCH = re.compile(r"[a-z0-9_.]{1,100}")


class ModelSpecError(ValueError):
    """A stored model description xvol will not build; the message names the file and key."""


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters: a crafted file may hold anything."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(source: str, key: str, problem: str) -> ModelSpecError:
    return ModelSpecError(f"{source}: {key}: {problem}")


def _checked(value: Any, source: str, key: str, check: Check) -> Any:
    """``value`` if ``check`` (xvol.checks, the one vocabulary of checks) accepts it; else the
    spec's error, naming the file and key: ``<source>: <key>: expected <what>, got <value>``."""
    if not check.ok(value):
        raise _fail(source, key, f"expected {check.expected}, got {_short(value)}")
    return value


# The bounds of each scalar field, declared once: from_config checks a key where the config
# holds it (so the message names model.xconv.bn_eps), _normalized every field of a spec.
_FIELD_CHECKS: dict[str, Check] = {
    "num_classes": int_in(1, MAX_CLASSES),
    "center": BOOL,
    "bn_eps": number_in(0.0, 1.0, open_lo=True),
    "bn_momentum": number_in(0.0, 1.0),
    "drop_path_rate": number_in(0.0, 1.0),
    "drop_rate": number_in(0.0, 1.0),
    "zero_init_last": BOOL,
    "stem": one_of(*STEMS),
    "require_bn": BOOL,
}
_FLOAT_FIELDS = ("bn_eps", "bn_momentum", "drop_path_rate", "drop_rate")


def _field(name: str, value: Any, source: str, key: str) -> Any:
    """``value`` of the scalar field ``name`` once its check passes (floats as float)."""
    value = _checked(value, source, key, _FIELD_CHECKS[name])
    return float(value) if name in _FLOAT_FIELDS else value


def _impl(value: Any, source: str, key: str) -> str:
    """One of XConv2d's PSSA backends (the dispatcher's list): a file picks among them only."""
    from xvol.ops.dispatch import IMPLS

    return _checked(value, source, key, one_of(*IMPLS))


def _int_list(
    value: Any, source: str, key: str, lo: int, hi: int, max_len: int, *, allow_int: bool
) -> tuple[int, ...]:
    if allow_int and is_int(value):
        value = [value]  # model.stages=3 means one stage
    if not isinstance(value, list | tuple):
        raise _fail(source, key, f"expected a list of integers in {lo}..{hi}, got {_short(value)}")
    if len(value) > max_len:
        raise _fail(source, key, f"at most {max_len} entries, got {len(value)}")
    check = int_in(lo, hi)
    return tuple(_checked(v, source, f"{key}[{i}]", check) for i, v in enumerate(value))


def _stages(value: Any, source: str, key: str, *, allow_int: bool = False) -> tuple[int, ...]:
    """ResNet stages 1..4, at most four of them."""
    return _int_list(value, source, key, 1, 4, 4, allow_int=allow_int)


def _shifts(value: Any, source: str, key: str, *, allow_int: bool = False) -> tuple[int, ...]:
    """PSSA distances 1..MAX_SHIFT, at most MAX_SHIFTS of them."""
    return _int_list(value, source, key, 1, MAX_SHIFT, MAX_SHIFTS, allow_int=allow_int)


def _arch(value: Any, source: str, key: str) -> str:
    """timm's ResNet family, or a timm model name xvol may convert (string compare only)."""
    if isinstance(value, str) and value in SUPPORTED_ARCHS:
        return value
    if not isinstance(value, str) or not _ARCH.fullmatch(value):
        raise _fail(source, key, f"{_short(value)} is not a timm model name")
    try:
        return check_convertible_arch(value)
    except ValueError as e:
        raise _fail(source, key, str(e)) from None


def _patterns(value: Any, source: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _fail(source, key, f"expected a list of module-name patterns, got {_short(value)}")
    if len(value) > MAX_PATTERNS:
        raise _fail(source, key, f"at most {MAX_PATTERNS} patterns, got {len(value)}")
    for i, p in enumerate(value):
        if not isinstance(p, str) or not _PATTERN.fullmatch(p):
            raise _fail(
                source,
                f"{key}[{i}]",
                f"{_short(p)} is not a module-name pattern (letters, digits, _ . * ? [ ] ! -)",
            )
    return tuple(value)


def _check_target(
    mapping: Any, source: str, where: str, targets: tuple[str, ...], what: str
) -> None:
    """``_target_`` must be one of ``targets``, compared as a string: nothing is imported."""
    if not isinstance(mapping, Mapping):
        raise _fail(source, where, f"expected a mapping, got {type(mapping).__name__}")
    if "_target_" not in mapping:
        raise _fail(source, f"{where}._target_", f"missing (expected {targets[0]})")
    target = mapping["_target_"]
    if not isinstance(target, str) or target not in targets:
        raise _fail(
            source,
            f"{where}._target_",
            f"{_short(target)} is not {what} ({', '.join(targets)}); xvol never imports or calls "
            "a _target_ read from a file",
        )


def _check_keys(
    mapping: Any, source: str, where: str, allowed: tuple[str, ...], required: tuple[str, ...]
) -> None:
    if not isinstance(mapping, Mapping):
        raise _fail(source, where, f"expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if not isinstance(key, str) or key not in allowed:
            raise _fail(
                source, f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})"
            )
    for key in required:
        if key not in mapping:
            raise _fail(source, f"{where}.{key}", "missing")


def _normalized(fields: Mapping[str, Any], source: str, where: str) -> dict[str, Any]:
    """Every ModelSpec field type-checked, bounded and normalized (tuples, floats).

    Errors name ``source`` and ``where.<field>``; missing fields take the dataclass defaults.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    value = {name: fields.get(name, default) for name, default in defaults.items()}

    def key(name: str) -> str:
        return f"{where}.{name}"

    out: dict[str, Any] = {
        "arch": _arch(value["arch"], source, key("arch")),
        "num_classes": _field("num_classes", value["num_classes"], source, key("num_classes")),
    }
    stages = _stages(value["stages"], source, key("stages"))
    if list(stages) != sorted(set(stages)):
        raise _fail(source, key("stages"), f"must be sorted and unique, got {list(stages)}")
    shifts = _shifts(value["shifts"], source, key("shifts"))
    if bool(stages) != bool(shifts):
        raise _fail(
            source,
            key("shifts"),
            f"stages {list(stages)} with shifts {list(shifts)}: X-volution needs both "
            "(a baseline has neither)",
        )
    out["stages"], out["shifts"] = stages, shifts
    out["center"] = _field("center", value["center"], source, key("center"))
    out["impl"] = _impl(value["impl"], source, key("impl"))
    for name in ("bn_eps", "bn_momentum", "drop_path_rate", "drop_rate", "zero_init_last", "stem"):
        out[name] = _field(name, value[name], source, key(name))
    if out["stem"] != "timm" and out["arch"] not in CIFAR_STEM_ARCHS:
        raise _fail(
            source,
            key("stem"),
            f"{out['stem']!r} replaces a single conv1 and max-pool; {out['arch']} has another "
            f"stem (the {out['stem']} stem works on {', '.join(CIFAR_STEM_ARCHS)})",
        )
    out["include"] = _patterns(value["include"], source, key("include"))
    out["exclude"] = _patterns(value["exclude"], source, key("exclude"))
    out["require_bn"] = _field("require_bn", value["require_bn"], source, key("require_bn"))
    converted = out["include"] or out["exclude"] or not out["require_bn"]
    if converted and out["arch"] in SUPPORTED_ARCHS:
        raise _fail(
            source,
            key("include" if out["include"] else "exclude" if out["exclude"] else "require_bn"),
            f"convert options are for archs outside timm's ResNet family; {out['arch']} swaps "
            "conv2 of its stages",
        )
    return out


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """timm ResNet ``arch`` with X-volution in ``stages`` (empty: the plain timm baseline).

    ``shifts``/``center``/``impl``/``bn_eps``/``bn_momentum`` are XConv2d's arguments; a baseline
    holds their defaults and no shifts. ``drop_*``/``zero_init_last`` are timm ResNet kwargs;
    ``stem`` is timm's stem or the CIFAR one (xvol.models.resnet.use_stem).
    ``include``/``exclude``/``require_bn`` select the convolutions of an arch outside the
    ResNet family (xvol.models.convert.convert); the family swaps conv2 of ``stages``.
    """

    arch: str
    num_classes: int
    stages: tuple[int, ...] = ()
    shifts: tuple[int, ...] = ()
    center: bool = False
    impl: str = "auto"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    zero_init_last: bool = True
    stem: str = "timm"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    require_bn: bool = True

    def __post_init__(self) -> None:
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in _normalized(current, "ModelSpec", "spec").items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------------- readers
    @classmethod
    def from_config(
        cls, mapping: Any, source: str = "model config", where: str = "model"
    ) -> ModelSpec:
        """The spec of a resolved ``configs/model/*.yaml`` (``config["model"]`` of a checkpoint).

        ``source`` (a file name) and ``where`` (the mapping's key path in it) go into messages.
        """
        _check_target(mapping, source, where, BUILDER_TARGETS, "an xvol model builder")
        allowed = (
            "_target_",
            "arch",
            "num_classes",
            "stages",
            "xconv",
            "stem",
            "convert",
            *_TIMM_KEYS,
        )
        _check_keys(mapping, source, where, allowed, ("arch",))
        fields: dict[str, Any] = {
            "arch": mapping["arch"],
            "num_classes": mapping.get("num_classes", 1000),
        }
        for name in ("stem", *_TIMM_KEYS):
            if name in mapping:
                fields[name] = mapping[name]
        convert = mapping.get("convert")
        if convert is not None:
            node = f"{where}.convert"
            _check_keys(convert, source, node, CONVERT_KEYS, ())
            if mapping["arch"] in SUPPORTED_ARCHS:
                raise _fail(
                    source,
                    node,
                    f"convert options are for archs outside timm's ResNet family; "
                    f"{mapping['arch']} swaps conv2 of its stages (set convert: null)",
                )
            for name in ("include", "exclude"):
                if name in convert:
                    fields[name] = _patterns(convert[name], source, f"{node}.{name}")
            if "require_bn" in convert:
                fields["require_bn"] = _field(
                    "require_bn", convert["require_bn"], source, f"{node}.require_bn"
                )
        stages = _stages(mapping.get("stages", []), source, f"{where}.stages", allow_int=True)
        xconv = mapping.get("xconv")
        if xconv is None:  # the baseline: build_model ignores stages
            return cls(**_normalized(fields, source, where))
        node = f"{where}.xconv"
        _check_target(xconv, source, node, XCONV_TARGETS, "xvol's X-volution")
        _check_keys(xconv, source, node, ("_target_", "_partial_", *_XCONV_KEYS), ())
        if xconv.get("_partial_") is not True:
            raise _fail(source, f"{node}._partial_", "must be true (build_model fills in the slot)")
        if not stages:
            raise _fail(
                source,
                f"{where}.stages",
                "empty while xconv is set: nothing would be swapped (pick stages in 1..4)",
            )
        fields["stages"] = tuple(sorted(set(stages)))
        fields["shifts"] = _shifts(
            xconv.get("shifts", [1]), source, f"{node}.shifts", allow_int=True
        )
        if not fields["shifts"]:
            raise _fail(source, f"{node}.shifts", "empty: X-volution needs at least one shift")
        # Checked here so that a message names the key under xconv.
        for name in ("center", "bn_eps", "bn_momentum"):
            if name in xconv:
                fields[name] = _field(name, xconv[name], source, f"{node}.{name}")
        if "impl" in xconv:
            fields["impl"] = _impl(xconv["impl"], source, f"{node}.impl")
        return cls(**_normalized(fields, source, where))

    @classmethod
    def from_dict(
        cls, mapping: Any, source: str = "model spec", where: str = "model_spec"
    ) -> ModelSpec:
        """The spec from ``to_dict()``'s form; every field but ``stem`` is required, no other key
        is allowed."""
        names = tuple(f.name for f in dataclasses.fields(cls))
        required = tuple(name for name in names if name not in _OPTIONAL_FIELDS)
        _check_keys(mapping, source, where, names, required)
        return cls(**_normalized(mapping, source, where))

    # ------------------------------------------------------------------------- uses
    @property
    def xvolution(self) -> bool:
        return bool(self.stages)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, ``from_dict``'s input (what deploy sidecars store); ``stem`` only when
        it is not timm's, so older readers and older files agree on every timm-stem model."""
        out = dataclasses.asdict(self)
        out["stages"], out["shifts"] = list(self.stages), list(self.shifts)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        for name in _OPTIONAL_FIELDS:  # left out at their defaults, as files before them
            if out[name] == _DEFAULTS[name]:
                del out[name]
        return out

    def identity(self) -> dict[str, Any]:
        """Display name following the timm registry, backbone arch, X-volution or not.

        xresnet50 = resnet50 + X-volution in stage 3 with shifts (1,); other placements get a
        suffix (xresnet50-s34-L12 for stages [3, 4], shifts [1, 2]; -c with the center tap). A
        CIFAR stem is part of the backbone: arch resnet18-cifar, model xresnet18-cifar, so that an
        X-volution model is only ever paired with a baseline of the same stem.
        """
        arch = self.arch if self.stem == "timm" else f"{self.arch}-{self.stem}"
        if not self.xvolution:
            return {"model": arch, "arch": arch, "xvolution": False}
        name = f"x{arch}"
        if self.stages != (3,) or self.shifts != (1,) or self.center:
            name += f"-s{''.join(map(str, self.stages))}-L{''.join(map(str, self.shifts))}"
            name += "-c" if self.center else ""
        if self.include or self.exclude or not self.require_bn:
            selection = json.dumps([self.include, self.exclude, self.require_bn])
            name += f"-sel{hashlib.sha256(selection.encode()).hexdigest()[:6]}"
        return {"model": name, "arch": arch, "xvolution": True}

    def _convert_options(self) -> dict[str, Any] | None:
        if self.arch in SUPPORTED_ARCHS:
            return None
        return {
            "include": list(self.include),
            "exclude": list(self.exclude),
            "require_bn": self.require_bn,
        }

    def build(self) -> nn.Module:
        """``xvol.models.build_model`` with this spec's arguments (the only code a spec runs)."""
        xconv = None
        if self.xvolution:
            xconv = partial(
                XConv2d,
                shifts=self.shifts,
                center=self.center,
                impl=self.impl,
                bn_eps=self.bn_eps,
                bn_momentum=self.bn_momentum,
            )
        return build_model(
            self.arch,
            num_classes=self.num_classes,
            xconv=xconv,
            stages=self.stages,
            stem=self.stem,
            convert=self._convert_options(),
            drop_path_rate=self.drop_path_rate,
            drop_rate=self.drop_rate,
            zero_init_last=self.zero_init_last,
        )


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
_DEFAULTS.update(include=[], exclude=[])  # to_dict's list form
