"""The trainer's options, declared once: each field with its default, what it accepts and what it
does. This is the place to read them.

``TrainerOptions`` is the ``trainer`` node of the training config (xvol.config registers it with
Hydra as the schema of configs/trainer/default.yaml, so ``trainer.epochs=3`` is type-checked
while composing) and what :class:`~xvol.engine.Trainer` takes; ``DebugOptions`` is the root
``debug`` node (testing hooks, off by default). Plain dataclasses: no Hydra here.

Each field's ``check`` (:func:`option`) says what it accepts; constructing an options object
checks every field of it, nested ones included, and a bad value raises :class:`ConfigError`
with one line, ``trainer.<key>: expected <what>, got <value>``. The training command runs the
same checks over the composed config before building anything (xvol.config).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, get_args, get_type_hints

import torch
from torch import nn

from xvol.engine.runtime import AMP_DTYPES

__all__ = [
    "AUTO_METRIC",
    "EPOCH_METRICS",
    "Check",
    "CheckpointOptions",
    "ConfigError",
    "DebugOptions",
    "EmaOptions",
    "MixupOptions",
    "TrainerOptions",
    "check_value",
    "float_options",
    "option",
    "option_checks",
    "schema_numbers",
]


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message starts with the key."""


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """What a key accepts: ``ok(value)`` and the words for it in the error message."""

    expected: str
    ok: Callable[[Any], bool]
    nullable: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def optional(check: Check) -> Check:
    """``check`` or null (a no-op on a check that already accepts null)."""
    if check.nullable:
        return check
    return replace(check, expected=f"{check.expected} or null", nullable=True)


def one_of(*choices: str) -> Check:
    return Check("one of " + ", ".join(choices), lambda v: isinstance(v, str) and v in choices)


def unit_interval(closed: bool = True) -> Check:
    """A number in [0, 1] (``closed``) or [0, 1)."""
    return Check(
        f"a number in [0, 1{']' if closed else ')'}",
        lambda v: _is_number(v) and 0 <= v and (v <= 1 if closed else v < 1),
    )


POSITIVE_INT = Check("a positive integer", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Check("an integer >= 0", lambda v: _is_int(v) and v >= 0)
INT = Check("an integer", _is_int)
POSITIVE_NUMBER = Check("a positive number", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Check("a number >= 0", lambda v: _is_number(v) and v >= 0)
BOOL = Check("true or false", lambda v: isinstance(v, bool))
AUTO_OR_BOOL = Check("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))
PATH = Check("a checkpoint path", lambda v: isinstance(v, str) and v.strip() != "")
DEVICE = Check(
    "auto, cpu, cuda or cuda:N",
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
)
AMP = Check(
    "auto, bf16, fp16 or none",
    lambda v: (
        v is None or v is False or (isinstance(v, str) and v.lower() in {"auto", *AMP_DTYPES})
    ),
    nullable=True,
)

# the numbers of an epoch record (Trainer._end_epoch), any of which can rank checkpoints;
# the ema_* ones exist only with an EMA
EPOCH_METRICS = (
    "val_top1",
    "val_top5",
    "val_loss",
    "ema_top1",
    "ema_top5",
    "ema_loss",
    "train_loss",
    "lr",
    "img_s",
    "epoch_time",
    "eval_time",
)
AUTO_METRIC = "auto"
METRIC = Check(
    f"{AUTO_METRIC} or a metric of the epoch record ({', '.join(EPOCH_METRICS)})",
    lambda v: v == AUTO_METRIC or v in EPOCH_METRICS,
)
MIN_MAX = Check(
    "a [min, max] pair of numbers in [0, 1]",
    lambda v: (
        isinstance(v, Sequence)
        and len(v) == 2
        and all(_is_number(x) and 0 <= x <= 1 for x in v)
        and v[0] <= v[1]
    ),
)


def option(default: Any = MISSING, check: Check | None = None, *, factory: Any = MISSING) -> Any:
    """A dataclass field with the check its values must pass (see :func:`option_checks`)."""
    metadata = {"check": check} if check is not None else {}
    return field(default=default, default_factory=factory, metadata=metadata)


def option_checks(cls: type, prefix: str) -> dict[str, Check]:
    """``{"<prefix>.<field>": check}`` for every checked field of the options class ``cls``,
    nested options classes included; a field typed ``X | None`` also accepts null."""
    hints = get_type_hints(cls)
    out: dict[str, Check] = {}
    for f in fields(cls):
        key, args = f"{prefix}.{f.name}", get_args(hints[f.name])
        nested = next((a for a in (*args, hints[f.name]) if is_dataclass(a)), None)
        if nested is not None:
            out.update(option_checks(nested, key))
        check = f.metadata.get("check")
        if check is not None:
            out[key] = optional(check) if type(None) in args else check
    return out


def float_options(cls: type) -> set[str]:
    """Dotted names of the float-typed fields of the options class ``cls`` (``float``,
    ``float | None``, ``list[float]``), nested options classes included."""
    hints = get_type_hints(cls)
    out: set[str] = set()
    for f in fields(cls):
        hint = hints[f.name]
        args = get_args(hint) or (hint,)
        nested = next((a for a in args if is_dataclass(a)), None)
        if nested is not None:
            out.update(f"{f.name}.{key}" for key in float_options(nested))
        elif float in args or any(get_args(a) == (float,) for a in args):
            out.add(f.name)
    return out


def schema_numbers(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a stored ``trainer`` config whose float options hold floats, as the schema
    stores them. Configs written before the schema kept what was typed: ``trainer.clip_grad=5``
    is 5 there and 5.0 now, which would make the same recipe fingerprint differently."""
    out = copy.deepcopy(dict(trainer))
    for dotted in float_options(TrainerOptions):
        *parents, leaf = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node[leaf]
        if _is_int(value):
            node[leaf] = float(value)
        elif isinstance(value, list):
            node[leaf] = [float(v) if _is_int(v) else v for v in value]
    return out


def check_value(key: str, check: Check, value: Any) -> None:
    """Raise ConfigError ``<key>: expected <what>, got <value>`` unless ``check`` accepts it."""
    if (value is None and check.nullable) or (value is not None and check.ok(value)):
        return
    raise ConfigError(f"{key}: expected {check.expected}, got {value!r}")


def _check_fields(options: Any, prefix: str) -> None:
    """Every check of ``options`` (a dataclass instance), nested options included."""
    for key, check in option_checks(type(options), prefix).items():
        *parents, leaf = key.split(".")[1:]
        node = options
        for part in parents:
            node = getattr(node, part)
            if node is None:
                break  # a null nested node (trainer.ema=null) has no fields to check
        else:
            check_value(key, check, getattr(node, leaf))


# ----------------------------------------------------------------------------- options


@dataclass
class CheckpointOptions:
    """``trainer.checkpoint``: when to save, how many epoch files to keep, what ranks them."""

    # also save last.pt every N updates (0: only at epoch ends and on preemption)
    every_steps: int = option(0, NON_NEGATIVE_INT)
    keep_top_k: int = option(3, NON_NEGATIVE_INT)  # epoch_NNNN.pt files kept, ranked by metric
    # What ranks the epoch files and picks best.pt. auto: ema_top1 when trainer.ema is on (the
    # tools read a checkpoint's EMA weights by default), else val_top1. Or a key of the epoch
    # record: val_top1/5, val_loss, ema_top1/5, ema_loss, ... The log and checkpoints.json name it.
    metric: str = option(AUTO_METRIC, METRIC)
    mode: str = option("max", one_of("max", "min"))  # max: higher metric is better


@dataclass
class MixupOptions:
    """``trainer.mixup``: Mixup/CutMix (timm.data.Mixup with SoftTargetCrossEntropy), on when an
    alpha is > 0 or cutmix_minmax is set; trainer.label_smoothing goes into its soft targets."""

    mixup_alpha: float = option(0.0, NON_NEGATIVE_NUMBER)
    cutmix_alpha: float = option(0.0, NON_NEGATIVE_NUMBER)
    cutmix_minmax: list[float] | None = option(None, MIN_MAX)  # box ratio range; overrides alpha
    prob: float = option(1.0, unit_interval())  # probability of mixing a batch at all
    switch_prob: float = option(0.5, unit_interval())  # CutMix instead of Mixup, both on
    mode: str = option("batch", one_of("batch", "pair", "elem"))  # one draw per batch/pair/image

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None

    def build(self, num_classes: int, label_smoothing: float) -> Any:
        """The ``timm.data.Mixup`` these options describe (the fields are its arguments)."""
        from timm.data import Mixup

        return Mixup(**asdict(self), label_smoothing=label_smoothing, num_classes=num_classes)


@dataclass
class EmaOptions:
    """``trainer.ema``: weight EMA (timm.utils.ModelEmaV3), evaluated each epoch as ema_top1."""

    decay: float = option(0.9998, unit_interval())
    use_warmup: bool = option(True, BOOL)  # decay ramps up from 0 (short runs get a useful EMA)

    def build(self, model: nn.Module) -> Any:
        """A ``timm.utils.ModelEmaV3`` of ``model``."""
        from timm.utils import ModelEmaV3

        return ModelEmaV3(model, decay=self.decay, use_warmup=self.use_warmup)


@dataclass
class TrainerOptions:
    """``trainer``: how to train. Override any field as ``trainer.<field>=value``."""

    epochs: int = option(90, POSITIVE_INT)
    device: str = option("auto", DEVICE)  # auto (this rank's GPU, else CPU), cpu, cuda, cuda:N
    # auto (bf16 on GPUs that have it, else fp32), bf16, fp16 (GradScaler), none
    amp: str | None = option("auto", AMP)
    channels_last: Any = option("auto", AUTO_OR_BOOL)  # auto: on CUDA only
    compile: bool = option(False, BOOL)  # torch.compile the model
    # batches per optimizer update (DDP syncs gradients on the last one only)
    grad_accum: int = option(1, POSITIVE_INT)
    # max gradient norm (or value, see clip_mode); null: no clipping
    clip_grad: float | None = option(None, POSITIVE_NUMBER)
    clip_mode: str = option("norm", one_of("norm", "value", "agc"))  # timm dispatch_clip_grad
    # SyncBatchNorm: auto = CUDA and more than one rank (never on CPU)
    sync_bn: Any = option("auto", AUTO_OR_BOOL)
    # without SyncBatchNorm: reduce (average) or broadcast BN stats before eval/save
    dist_bn: str = option("reduce", one_of("reduce", "broadcast"))
    # deterministic kernels (exact reruns and resumes, slower on GPU)
    deterministic: bool = option(False, BOOL)
    # LabelSmoothingCrossEntropy; with Mixup/CutMix it goes into the soft targets
    label_smoothing: float = option(0.1, unit_interval(closed=False))
    mixup: MixupOptions | None = option(factory=MixupOptions)  # null: no Mixup/CutMix either
    ema: EmaOptions | None = option(factory=EmaOptions)  # null disables the EMA
    checkpoint: CheckpointOptions = option(factory=CheckpointOptions)
    log_interval: int = option(50, POSITIVE_INT)  # a train record in metrics.jsonl every N updates
    progress_bar: bool = option(True, BOOL)  # rank-0 tqdm bar (else a log line per log_interval)
    # fp16: stop after this many consecutive steps skipped by GradScaler for inf/NaN gradients
    max_skipped_steps: int = option(100, POSITIVE_INT)
    # Fine-tuning (timm's --initial-checkpoint): start a fresh run from the weights of a training
    # checkpoint (no optimizer, scheduler or epoch). Strict, except the classifier head, which is
    # re-initialized when the class count differs; another architecture is refused. A run that
    # already has checkpoints resumes them instead (resume wins).
    init_from: str | None = option(None, PATH)
    init_from_ema: bool = option(False, BOOL)  # take init_from's EMA weights, not its model's
    # Resuming refuses a checkpoint whose class_names differ from the data's (labels would
    # shift); true continues anyway, with a warning naming the first difference.
    allow_class_mismatch: bool = option(False, BOOL)

    def __post_init__(self) -> None:
        _check_fields(self, "trainer")

    def use_channels_last(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.channels_last == "auto" else bool(self.channels_last)

    def use_sync_bn(self, device: torch.device, distributed: bool) -> bool:
        if self.sync_bn == "auto":
            return device.type == "cuda" and distributed
        return bool(self.sync_bn)

    def loss_fn(self) -> nn.Module:
        """SoftTargetCrossEntropy with Mixup/CutMix, else cross-entropy, label-smoothed when
        label_smoothing > 0."""
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self.mixup is not None and self.mixup.enabled:
            return SoftTargetCrossEntropy()
        if self.label_smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=self.label_smoothing)
        return nn.CrossEntropyLoss()


@dataclass
class DebugOptions:
    """``debug``: testing hooks (configs/debug), all off by default; 1-based update numbers."""

    nan_at_step: int | None = option(None, POSITIVE_INT)  # make the loss of this update NaN
    # rank 0 sends itself SIGTERM after this update (a preemption)
    signal_at_step: int | None = option(None, POSITIVE_INT)

    def __post_init__(self) -> None:
        _check_fields(self, "debug")
