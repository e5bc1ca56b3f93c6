"""train_one_epoch / evaluate: the inner loops, on plain objects (DeiT/ConvNeXt engine.py style).

One optimizer update = ``grad_accum`` batches (the last group of an epoch may be shorter). After
the backward passes of an update, one small all-reduce carries (loss, non-finite flag, stop flag)
so every rank sees the same mean loss, refuses the same bad step, and stops after the same step
when any rank got a preemption signal. Checkpoints happen only between updates, so the data
position saved is always the first batch of an update.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from xvol.engine import runtime
from xvol.engine.dist import all_reduce_sum
from xvol.engine.log import get_logger
from xvol.engine.metrics import topk_correct
from xvol.engine.options import DebugOptions, TrainerOptions
from xvol.engine.runtime import autocast

__all__ = [
    "EvalResult",
    "NonFiniteLossError",
    "LoopSettings",
    "TrainState",
    "evaluate",
    "train_one_epoch",
]

log = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or, with fp16, the gradients for too many steps in a row) stopped being finite."""


@dataclass
class LoopSettings:
    """What train_one_epoch reads: the loop's part of TrainerOptions resolved for one device
    (:meth:`resolve`, as Trainer does: ``amp`` becomes a dtype, ``channels_last`` a bool), or
    set directly by callers of the loop alone. Not options a user sets: those are
    TrainerOptions."""

    grad_accum: int = TrainerOptions.grad_accum
    clip_grad: float | None = TrainerOptions.clip_grad
    clip_mode: str = TrainerOptions.clip_mode
    max_skipped_steps: int = TrainerOptions.max_skipped_steps
    progress_bar: bool = TrainerOptions.progress_bar
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: full precision
    channels_last: bool = False
    debug: DebugOptions = field(default_factory=DebugOptions)
    epochs: int | None = None  # the run's length, for "epoch 3/90" in the progress bar

    @classmethod
    def resolve(
        cls, options: TrainerOptions, device: torch.device, debug: DebugOptions
    ) -> LoopSettings:
        """``options`` for a run on ``device``: ``amp`` and ``channels_last`` decided."""
        return cls(
            grad_accum=options.grad_accum,
            clip_grad=options.clip_grad,
            clip_mode=options.clip_mode,
            max_skipped_steps=options.max_skipped_steps,
            progress_bar=options.progress_bar,
            amp_dtype=runtime.amp_dtype(options.amp, device),
            channels_last=options.use_channels_last(device),
            debug=debug,
            epochs=options.epochs,
        )


@dataclass
class TrainState:
    """Where the run is; everything here goes into the checkpoint."""

    epoch: int = 0  # the epoch being (or next to be) trained
    step: int = 0  # the next batch of that epoch
    global_step: int = 0  # optimizer updates so far
    loss_sum: float = 0.0  # unfinished epoch: sum of per-update mean losses
    loss_count: int = 0
    images: int = 0  # unfinished epoch: images seen on all ranks
    elapsed: float = 0.0  # unfinished epoch: seconds spent training
    skipped_in_a_row: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def epoch_state(self) -> dict[str, float]:
        return {
            "loss_sum": self.loss_sum,
            "loss_count": float(self.loss_count),
            "images": float(self.images),
            "elapsed": self.elapsed,
        }

    def start_epoch(self) -> None:
        self.loss_sum, self.loss_count, self.images, self.elapsed = 0.0, 0, 0, 0.0


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        dynamic_ncols=True,
        leave=False,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    state: TrainState,
    *,
    steps_per_epoch: int,
    device: torch.device,
    opts: LoopSettings,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: Any = None,
    ema_source: nn.Module | None = None,
    mixup: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    on_update: Callable[[TrainState, dict[str, float]], None] | None = None,
    is_main: bool = True,
    world_size: int = 1,
) -> bool:
    """Train from batch ``state.step`` of ``state.epoch`` to the end of the epoch.

    ``loader`` must already be positioned (``set_epoch(epoch, start_step=state.step)``).
    ``ema_source`` is the unwrapped model the EMA follows. ``on_update(state, info)`` runs after
    every update (logging, step checkpoints). Returns True when the epoch finished, False when
    a stop was requested before its last update (the state then points at the next batch).
    """
    model.train()
    accum = max(1, opts.grad_accum)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    show = is_main and opts.progress_bar
    of = f"/{opts.epochs}" if opts.epochs else ""
    bar = _progress(steps_per_epoch, state.step, f"epoch {state.epoch + 1}{of}", show)
    loss_acc = torch.zeros((), device=device)
    tic = time.perf_counter()
    update_images = 0
    step = state.step
    # A DataLoader draws its worker base seed from the global torch RNG when its iterator is
    # made; keep that draw out of the training RNG stream so a resumed run continues it exactly.
    with torch.random.fork_rng(devices=[]):
        batches = iter(loader)
    try:
        for images, labels in batches:
            if step >= steps_per_epoch:
                break
            group_start = (step // accum) * accum
            group_size = min(accum, steps_per_epoch - group_start)
            last_micro = step == group_start + group_size - 1
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if opts.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            with autocast(device, opts.amp_dtype):
                output = model(images)
                loss = loss_fn(output, targets)
            if state.global_step + 1 == opts.debug.nan_at_step:
                loss = loss * float("nan")
            loss_acc += loss.detach().float()
            scaled = loss / group_size
            with contextlib.nullcontext() if last_micro else _no_sync(model):
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            step += 1
            update_images += images.shape[0] * world_size
            if not last_micro:
                continue

            # -- one optimizer update --------------------------------------------------------
            if is_main and state.global_step + 1 == opts.debug.signal_at_step:
                signal.raise_signal(signal.SIGTERM)
            mean_loss = loss_acc / group_size
            flags = torch.stack(
                [
                    mean_loss.nan_to_num(0.0, 0.0, 0.0),
                    (~torch.isfinite(mean_loss)).float(),
                    torch.tensor(float(stop_requested()), device=device),
                ]
            )
            all_reduce_sum(flags)
            loss_value, bad_ranks, stop = flags.tolist()
            loss_value /= world_size
            loss_acc.zero_()
            where = f"epoch {state.epoch + 1}{of}, batch {step}, update {state.global_step + 1}"
            if bad_ranks and scaler is None:
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"non-finite loss at {where} on {int(bad_ranks)} rank(s); the update was not "
                    "applied (lower the LR, enable clipping, or check the data)"
                )
            if opts.clip_grad is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                from timm.utils import dispatch_clip_grad

                dispatch_clip_grad(params, opts.clip_grad, mode=opts.clip_mode)
            skipped = False
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped = scaler.get_scale() < scale
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            state.global_step += 1
            state.step = step
            if skipped:
                state.skipped_in_a_row += 1
                if state.skipped_in_a_row > opts.max_skipped_steps:
                    raise NonFiniteLossError(
                        f"fp16: {state.skipped_in_a_row} consecutive steps skipped for inf/NaN "
                        f"gradients (last at {where}); stopping"
                    )
            else:
                state.skipped_in_a_row = 0
                if ema is not None:
                    ema.update(
                        ema_source if ema_source is not None else model, step=state.global_step
                    )
            if scheduler is not None:
                scheduler.step_update(num_updates=state.global_step)
            if math.isfinite(loss_value):
                state.loss_sum += loss_value
                state.loss_count += 1
            toc = time.perf_counter()
            update_time, tic = toc - tic, toc
            state.elapsed += update_time
            state.images += update_images
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{lr:.3g}",
                    img_s=f"{update_images / max(update_time, 1e-9):.0f}",
                    refresh=False,
                )
            if on_update is not None:
                on_update(
                    state,
                    {
                        "loss": loss_value,
                        "lr": lr,
                        "skipped": float(skipped),
                        "images": float(update_images),
                        "time": update_time,
                    },
                )
            update_images = 0
            if stop and step < steps_per_epoch:
                return False
            # a stop after the last update still ends the epoch (evaluation, epoch checkpoint,
            # epoch record); the caller stops after it, so the resumed run misses none of them
    finally:
        if bar is not None:
            bar.close()
    if state.step < steps_per_epoch:
        raise RuntimeError(
            f"the train loader of epoch {state.epoch + 1} ended after batch {step} but "
            f"steps_per_epoch is {steps_per_epoch} (every rank must yield the same full batches)"
        )
    return True


@dataclass
class EvalResult:
    """One pass over a val set (:func:`evaluate`): exact counts summed over ranks, and with
    ``predictions=True`` this rank's per-image top-k class indices and labels. Reads like the
    trainer's numbers too: ``result["top1"]`` is ``result.metrics()["top1"]``."""

    top1_correct: int
    top5_correct: int
    loss_sum: float  # summed cross-entropy
    count: int  # images
    nonfinite: int  # images whose logits are not all finite (their top-k means nothing)
    topk: torch.Tensor | None = None  # this rank: N x min(5, classes) int64, CPU, loader order
    labels: torch.Tensor | None = None  # this rank: N int64, CPU, loader order

    def metrics(self) -> dict[str, float]:
        """Top-1/top-5 (%), mean cross-entropy and the image count: what the trainer logs.

        Any image with non-finite logits makes all three NaN: its top-k is an artefact (all-NaN
        rows rank class 0 first, so "top-1" would be the share of class 0) and a NaN is never
        best (:func:`~xvol.engine.metrics.better`)."""
        n = max(self.count, 1)
        if self.nonfinite:
            top1 = top5 = loss = math.nan
        else:
            top1, top5 = 100.0 * self.top1_correct / n, 100.0 * self.top5_correct / n
            loss = self.loss_sum / n
        return {"top1": top1, "top5": top5, "loss": loss, "count": float(self.count)}

    def __getitem__(self, key: str) -> float:
        return self.metrics()[key]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    predictions: bool = False,
) -> EvalResult:
    """The one evaluation loop (the trainer's val numbers and xvol-eval's record).

    Counts are summed over ranks (every rank must call it); ``predictions`` also keeps this
    rank's top-k predictions for the caller to gather. ``model`` must not be DDP-wrapped: ranks
    may hold different numbers of val batches. Non-finite logits are counted, not raised: the
    trainer records NaN metrics (and warns), xvol-eval refuses to score them.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # top1, top5, loss, count, bad
    topk: list[torch.Tensor] = []
    kept_labels: list[torch.Tensor] = []
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).view(-1).long()
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        pred = logits.topk(min(5, logits.shape[1]), dim=1).indices  # one top-k for both uses
        correct = topk_correct(logits, labels, (1, 5), topk=pred)
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        count = torch.tensor(float(labels.numel()), device=device)
        nonfinite = (~torch.isfinite(logits).all(1)).sum()
        sums += torch.stack([correct[0], correct[1], loss, count, nonfinite]).double()
        if predictions:
            topk.append(pred.cpu())
            kept_labels.append(labels.cpu())
    all_reduce_sum(sums)
    top1, top5, loss_sum, count, nonfinite = sums.tolist()
    model.train(was_training)
    result = EvalResult(int(top1), int(top5), loss_sum, int(count), int(nonfinite))
    if predictions:
        empty = torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        result.topk = torch.cat(topk) if topk else empty[0]
        result.labels = torch.cat(kept_labels) if kept_labels else empty[1]
    return result
