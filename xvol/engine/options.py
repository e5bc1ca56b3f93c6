"""The trainer's options, declared once: each field with its default, what it accepts and what it
does. This is the place to read them.

``TrainerOptions`` is the ``trainer`` node of the training config (xvol.config registers it with
Hydra as the schema of configs/trainer/default.yaml, so ``trainer.epochs=3`` is type-checked
while composing) and what :class:`~xvol.engine.Trainer` takes; ``DebugOptions`` is the root
``debug`` node (testing hooks, off by default). Plain dataclasses: no Hydra here.

Each field's ``check`` (:func:`xvol.checks.option`) says what it accepts; constructing an
options object checks every field of it, nested ones included, and a bad value raises
:class:`xvol.checks.ConfigError` with one line, ``trainer.<key>: expected <what>, got <value>``.
The training command runs the same checks over the composed config before building anything
(xvol.config). The check vocabulary itself is :mod:`xvol.checks`, shared by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from xvol.checks import (
    AUTO_OR_BOOL,
    BOOL,
    DEVICE,
    NON_NEGATIVE_INT,
    NON_NEGATIVE_NUMBER,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Check,
    check_fields,
    is_number,
    one_of,
    option,
    unit_interval,
)
from xvol.engine.runtime import AMP_DTYPES

__all__ = [
    "AUTO_METRIC",
    "EPOCH_METRICS",
    "CheckpointOptions",
    "DebugOptions",
    "EmaOptions",
    "MixupOptions",
    "TrainerOptions",
]


# ----------------------------------------------------------------------------- checks
# the vocabulary (Check, option, POSITIVE_INT, ...) is xvol.checks; these are the trainer's own

PATH = Check("a checkpoint path", lambda v: isinstance(v, str) and v.strip() != "")
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
        and all(is_number(x) and 0 <= x <= 1 for x in v)
        and v[0] <= v[1]
    ),
)


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
    # end every epoch after this many batches per rank (each epoch a new random subset, as
    # Lightning's limit_train_batches: quick runs on a big set); the schedule counts these.
    # xvol-train applies it where it builds the data. null: whole epochs
    limit_train_batches: int | None = option(None, POSITIVE_INT)
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
        check_fields(self, "trainer")

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
        check_fields(self, "debug")
