"""The epoch loop around train_one_epoch/evaluate: wrapping, resume, checkpoints, metrics.

``Trainer`` takes plain objects (model, optimizer, scheduler, DataBundle, TrainerOptions, ...)
and no config library; xvol.cli.train builds them from the Hydra config. Every rank runs the
same calls in the same order (saving and resuming contain collectives); only rank 0 touches
files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from xvol.checks import ConfigError
from xvol.data.base import DataBundle
from xvol.engine.checkpointing import (
    CheckpointManager,
    capture_rng_state,
    init_weights_from,
    restore_rng_state,
    spec_differences,
)
from xvol.engine.dist import DistEnv, all_gather_objects, all_reduce_sum
from xvol.engine.log import get_logger
from xvol.engine.loop import (
    EvalResult,
    LoopSettings,
    NonFiniteLossError,
    TrainState,
    evaluate,
    train_one_epoch,
)
from xvol.engine.metrics import MetricsLogger
from xvol.engine.options import AUTO_METRIC, DebugOptions, TrainerOptions
from xvol.engine.signals import EXIT_NON_FINITE, EXIT_OK, EXIT_PREEMPTED, PreemptionGuard
from xvol.formats.checkpoint import (
    FORMAT_VERSION,
    KIND,
    CheckpointError,
    checkpoint_versions,
    load_checkpoint,
)
from xvol.formats.load import load_state_dict_strict

__all__ = ["Trainer", "checkpoint_metric", "prepare_model"]

log = get_logger(__name__)


def checkpoint_metric(metric: str, ema: bool) -> str:
    """The metric that ranks epoch checkpoints and picks ``best.pt``.

    ``auto`` follows the weights the tools read: xvol-reparam and xvol-eval take a checkpoint's
    EMA weights when it has them, so with an EMA best.pt is the best EMA epoch (``ema_top1``),
    else the best raw one (``val_top1``).
    """
    if metric == AUTO_METRIC:
        return "ema_top1" if ema else "val_top1"
    return metric


def prepare_model(
    model: nn.Module, device: torch.device, *, sync_bn: bool = False, channels_last: bool = False
) -> nn.Module:
    """Move to the device, convert to SyncBatchNorm (CUDA only), set the memory format.

    Call before building the optimizer: SyncBatchNorm conversion swaps modules.
    """
    model = model.to(device)
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError(
                "trainer.sync_bn: true needs CUDA (SyncBatchNorm refuses CPU modules); use auto"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _is_bn_stat(key: str) -> bool:
    return key.endswith("running_mean") or key.endswith("running_var")


class Trainer:
    """Runs epochs ``state.epoch .. options.epochs-1`` with checkpoints, resume and preemption.

    Builds what follows from ``options`` alone: the loss (cross-entropy, label-smoothed, or soft
    targets with Mixup/CutMix), Mixup, the EMA, the fp16 GradScaler, DDP and torch.compile.
    ``metrics`` (rank 0) opens the run's metrics sink given the wandb run id to continue (the
    one :meth:`resume` restored, or None); :meth:`fit` opens it and closes it with its exit code.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        data: DataBundle,
        denv: DistEnv,
        device: torch.device,
        run_dir: str | Path,
        options: TrainerOptions,
        config: dict[str, Any],
        scheduler: Any = None,
        debug: DebugOptions | None = None,
        guard: PreemptionGuard | None = None,
        git: dict[str, Any] | None = None,
        metrics: Callable[[str | None], MetricsLogger] | None = None,
    ) -> None:
        self.raw = model
        self.optimizer, self.data, self.scheduler = optimizer, data, scheduler
        self.denv, self.device, self.epochs = denv, device, options.epochs
        self.run_dir = Path(run_dir)
        self.options, self.config = options, config
        self.loop = LoopSettings.resolve(options, device, debug or DebugOptions())
        self.loss_fn = options.loss_fn().to(device)
        self.mixup = (
            options.mixup.build(data.num_classes, options.label_smoothing)
            if options.mixup is not None and options.mixup.enabled
            else None
        )
        fp16 = self.loop.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        self.guard = guard or PreemptionGuard(signals=())
        self.git = git or {"revision": None, "dirty": None}
        self.train_model: nn.Module = model
        if denv.distributed:
            self.train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.eval_model: nn.Module = model  # never DDP: ranks may hold uneven val batches
        if options.compile:
            self.train_model = torch.compile(self.train_model)
            self.eval_model = torch.compile(model)
        # after DDP construction, which broadcast rank 0's weights: every EMA starts the same
        self.ema = options.ema.build(model) if options.ema is not None else None
        # BN statistics differ per rank unless synchronized: average them for eval and saving
        unsynced = denv.distributed and not options.use_sync_bn(device, denv.distributed)
        self.average_bn = unsynced and options.dist_bn == "reduce"
        self.broadcast_bn = unsynced and options.dist_bn == "broadcast"
        self.state = TrainState()
        ckpt = options.checkpoint
        self.metric = checkpoint_metric(ckpt.metric, self.ema is not None)
        self.manager = (
            CheckpointManager(run_dir, ckpt.keep_top_k, self.metric, ckpt.mode)
            if denv.is_main
            else None
        )
        if ckpt.metric == AUTO_METRIC:
            why = "auto: " + ("EMA on, the weights the tools read" if self.ema else "no EMA")
        elif self.ema is not None and not self.metric.startswith("ema_"):
            why = "trainer.checkpoint.metric; the tools read EMA weights unless given --no-ema"
        else:
            why = "trainer.checkpoint.metric"
        order = "highest" if ckpt.mode == "max" else "lowest"
        log.info("best.pt: the epoch with the %s %s (%s)", order, self.metric, why)
        self._open_metrics = metrics
        self.metrics: MetricsLogger | None = None  # open while fit() runs
        self.wandb_id: str | None = None
        self.last_checkpoint: Path | None = None
        self._saved_at: int | None = None
        self._window = [0.0, 0.0]  # images, seconds since the last train record

    # ------------------------------------------------------------------------------ resume
    def resume(self, resume: str | None) -> Path | None:
        """``auto``: this run's newest readable checkpoint (or start fresh); a path: that file;
        None: start fresh, which a run directory that already holds checkpoints refuses.

        Refused, on every rank and before anything in the run directory changes: checkpoints
        that exist but none loads (``auto``), an unreadable file (a path), and a checkpoint
        trained on other class names than the data's (unless ``allow_class_mismatch``).
        Rank 0 picks the file and tells the others, so all ranks load the same one.
        """
        fresh = resume in (None, "", "none", "null", False)
        choice: tuple[str | None, str | None] = (None, None)  # (path, error)
        loaded: dict[str, Any] | None = None
        if self.manager is not None:
            try:
                if fresh:
                    if self.manager.candidates():
                        raise CheckpointError(
                            f"{self.run_dir} already holds checkpoints and resume is null: "
                            "continue it with resume=auto, or pick another run_name"
                        )
                elif resume == "auto":
                    found = self.manager.load_latest()  # raises when none of several loads
                    if found is not None:
                        loaded, path = found
                        choice = (str(path), None)
                else:
                    loaded = load_checkpoint(resume)
                    self.manager.note_loaded(resume)
                    choice = (str(Path(resume)), None)
                if loaded is not None:
                    self._check_class_names(loaded.get("class_names"), choice[0])
                    self._check_same_network(loaded.get("config"), choice[0])
                # under the run-directory lock, so no live writer owns them
                self.manager.remove_stale_temp_files()
            except CheckpointError as err:
                choice = (None, str(err))
        path, error = all_gather_objects(choice)[0]  # type: ignore[misc]
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            if not fresh:
                log.info("resume=%s: no checkpoint in %s, starting fresh", resume, self.run_dir)
            return None
        self._restore(loaded if loaded is not None else load_checkpoint(path), path)
        return Path(path)

    def init_from(self, path: str | Path, *, ema: bool = False) -> str:
        """Start a fresh run from a checkpoint's weights (fine-tuning): see
        :func:`~xvol.engine.checkpointing.init_weights_from`. Every rank reads the file; when any
        rank cannot use it, all raise the same CheckpointError. The EMA restarts from them.
        Rank 0 names any difference between the checkpoint's model config and this run's."""
        note, error = "", None
        model_config = self.config.get("model") if self.denv.is_main else None
        try:
            note = init_weights_from(self.raw, path, ema=ema, model_config=model_config)
        except CheckpointError as err:
            error = str(err)
        errors = [e for e in all_gather_objects(error) if e]
        if errors:
            raise CheckpointError(str(errors[0]))
        if self.ema is not None:
            self.ema.set(self.raw)
        log.info("%s", note)
        return note

    def _check_same_network(self, config: Any, source: str | None) -> None:
        """A resumed run continues the network it trained. One whose model config now differs
        in a network-defining key (model.xconv.shifts=[2] on a run trained with [1]: the same
        tensor shapes, another operator) would load silently and train something else."""
        trained = config.get("model") if isinstance(config, Mapping) else None
        ours = self.config.get("model")
        if trained is None or ours is None:  # not an xvol-train run: the state_dict decides
            return
        differ = spec_differences(trained, ours, str(source))
        if differ:
            raise CheckpointError(
                f"{source}: trained as another network than this run's config describes: "
                f"{', '.join(differ)} (checkpoint -> this run); resume continues the same "
                "network: pick another run_name, or start from its weights with "
                "trainer.init_from",
                reason="model config differs",
            )

    def _check_class_names(self, saved: Any, source: str | None) -> None:
        """Labels are indices into class_names: other names (a renamed or added folder) would
        train every later class on a shifted label."""
        ours = list(self.data.class_names)
        if not saved or not ours:  # old checkpoints, or data without names
            return
        if not isinstance(saved, list | tuple):
            raise CheckpointError(f"{source}: class_names is not a list of names")
        saved = [str(n) for n in saved]
        if saved == ours:
            return
        pairs = list(zip(saved, ours))
        i = next((k for k, (a, b) in enumerate(pairs) if a != b), len(pairs))

        def at(names: list[str]) -> str:
            return repr(names[i]) if i < len(names) else "(none)"

        differ = sum(a != b for a, b in pairs) + abs(len(saved) - len(ours))
        message = (
            f"{source}: trained on other class names than the data: first difference at index "
            f"{i}: checkpoint {at(saved)}, data {at(ours)} ({differ} differ; {len(saved)} vs "
            f"{len(ours)} classes)"
        )
        if not self.options.allow_class_mismatch:
            raise CheckpointError(
                message + ". Labels would shift; pass trainer.allow_class_mismatch=true to "
                "continue anyway",
                reason="class names differ",
            )
        log.warning("%s; continuing (trainer.allow_class_mismatch=true)", message)

    def _restore(self, ckpt: dict[str, Any], source: str) -> None:
        load_state_dict_strict(self.raw, ckpt["model"], source)
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                load_state_dict_strict(self.ema.module, ckpt["ema"], f"{source} (ema)")
            else:
                log.warning("%s has no EMA weights; the EMA restarts from the model", source)
                self.ema.set(self.raw)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        s = self.state
        s.epoch, s.step, s.global_step = (
            int(ckpt["epoch"]),
            int(ckpt["step"]),
            int(ckpt["global_step"]),
        )
        es = ckpt.get("epoch_state") or {}
        s.loss_sum, s.loss_count = float(es.get("loss_sum", 0.0)), int(es.get("loss_count", 0))
        s.images, s.elapsed = int(es.get("images", 0)), float(es.get("elapsed", 0.0))
        s.metrics = dict(ckpt.get("metrics") or {})
        self.wandb_id = ckpt.get("wandb_id")
        rng = ckpt.get("rng") or []
        if len(rng) == self.denv.world_size and int(ckpt.get("world_size", len(rng))) == len(rng):
            restore_rng_state(rng[self.denv.rank])
            bn = ckpt.get("bn_buffers")
            if bn:  # this rank's own BN statistics (the saved model holds their average)
                self._load_bn_buffers(self.raw, bn[self.denv.rank]["model"])
                if self.ema is not None and bn[self.denv.rank].get("ema") is not None:
                    self._load_bn_buffers(self.ema.module, bn[self.denv.rank]["ema"])
        else:
            log.warning(
                "%s was written by %d rank(s), this run has %d: RNG streams and the mid-epoch "
                "data position are not exact",
                source,
                len(rng),
                self.denv.world_size,
            )
            torch.manual_seed(torch.initial_seed() + s.global_step + self.denv.rank)
        if s.step >= self.data.steps_per_epoch:  # e.g. fewer steps per epoch than before
            s.epoch, s.step = s.epoch + 1, 0
            s.start_epoch()
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=s.global_step)
        self.last_checkpoint = Path(source)
        log.info("resumed from %s: %s", source, self._position())

    @staticmethod
    @torch.no_grad()
    def _load_bn_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
        state = module.state_dict()
        for key, value in buffers.items():
            state[key].copy_(value)

    def _position(self) -> str:
        """Where the state is, in the 1-based numbers of the logs: the last batch done."""
        s = self.state
        if s.step == 0:
            return f"after epoch {s.epoch}/{self.epochs}, update {s.global_step}"
        return (
            f"in epoch {s.epoch + 1}/{self.epochs} after batch {s.step}/"
            f"{self.data.steps_per_epoch}, update {s.global_step}"
        )

    # ------------------------------------------------------------------------------ saving
    def _state_dict(self, module: nn.Module, average_bn: bool) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in module.state_dict().items():
            value = value.detach()
            if average_bn and _is_bn_stat(key):
                value = all_reduce_sum(value.clone()) / self.denv.world_size
            out[key] = value.cpu()
        return out

    def _local_bn_buffers(self) -> dict[str, dict[str, torch.Tensor] | None]:
        def stats(module: nn.Module) -> dict[str, torch.Tensor]:
            return {
                k: v.detach().cpu().clone()
                for k, v in module.state_dict().items()
                if _is_bn_stat(k)
            }

        return {
            "model": stats(self.raw),
            "ema": stats(self.ema.module) if self.ema is not None else None,
        }

    def _save(self, epoch_end: bool) -> Path | None:
        """The collective part and rank 0's write, see :meth:`save`."""
        s = self.state
        rng = all_gather_objects(capture_rng_state())
        average = self.average_bn and not epoch_end  # at an epoch end they are averaged already
        bn_buffers = None
        if self.denv.distributed and not epoch_end:
            bn_buffers = all_gather_objects(self._local_bn_buffers())
        model_sd = self._state_dict(self.raw, average)
        ema_sd = self._state_dict(self.ema.module, average) if self.ema is not None else None
        self._saved_at = s.global_step
        if self.manager is None:
            return None
        state = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "model": model_sd,
            "ema": ema_sd,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": s.epoch,
            "step": s.step,
            "global_step": s.global_step,
            "epoch_state": s.epoch_state(),
            "world_size": self.denv.world_size,
            "rng": rng,
            "bn_buffers": bn_buffers,
            "config": self.config,
            "class_names": list(self.data.class_names),
            "metrics": dict(s.metrics),
            "wandb_id": self.metrics.wandb_id if self.metrics is not None else self.wandb_id,
            "git": self.git,
            "versions": checkpoint_versions(),
            "time": time.time(),
        }
        self.last_checkpoint = self.manager.save(state, epoch_end=epoch_end)
        return self.last_checkpoint

    def save(self, epoch_end: bool) -> Path | None:
        """Checkpoint on every rank's behalf (collective: all ranks call it; rank 0 writes).

        Mid-epoch, BN statistics are averaged into the saved copy only, so saving never changes
        the training trajectory; each rank's own statistics go to ``bn_buffers`` for an exact
        resume (with DDP's buffer broadcast and per-rank EMA buffers they matter). Returns once
        the file is on disk on every rank, so no rank exits (and gets the others signalled by
        torchrun) while rank 0 is still writing.
        """
        error = None
        try:
            path = self._save(epoch_end)
        except CheckpointError as err:  # rank 0's write failed (disk full, ...)
            path, error = None, str(err)
        # every rank learns of a failed write and stops with the same message
        errors = [e for e in all_gather_objects(error) if e]
        if errors:
            raise CheckpointError(str(errors[0]))
        return path

    # ------------------------------------------------------------------------------ loop
    def _on_update(self, s: TrainState, info: dict[str, float]) -> None:
        self._window[0] += info["images"]
        self._window[1] += info["time"]
        if s.global_step % self.options.log_interval == 0:
            img_s = self._window[0] / max(self._window[1], 1e-9)
            self._window = [0.0, 0.0]
            if self.metrics is not None:
                self.metrics.write(
                    {
                        "kind": "train",
                        "epoch": s.epoch + 1,  # 1-based, the epoch this update belongs to
                        "step": s.step,
                        "global_step": s.global_step,
                        "loss": info["loss"],
                        "lr": info["lr"],
                        "img_s": img_s,
                    }
                )
            if not self.options.progress_bar:
                log.info(
                    "epoch %d/%d batch %d/%d update %d: loss %.4f lr %.4g %.0f img/s",
                    s.epoch + 1,
                    self.epochs,
                    s.step,
                    self.data.steps_per_epoch,
                    s.global_step,
                    info["loss"],
                    info["lr"],
                    img_s,
                )
        every = self.options.checkpoint.every_steps
        if every and s.global_step % every == 0 and s.step < self.data.steps_per_epoch:
            self.save(epoch_end=False)

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([float(self.guard.requested)], device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)

    def _end_epoch(self, epoch: int) -> dict[str, Any]:
        s = self.state
        from timm.utils import distribute_bn

        if self.average_bn or self.broadcast_bn:
            distribute_bn(self.raw, self.denv.world_size, reduce=self.average_bn)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.denv.world_size, reduce=self.average_bn)
        tic = time.perf_counter()
        kw = {
            "device": self.device,
            "amp_dtype": self.loop.amp_dtype,
            "channels_last": self.loop.channels_last,
        }
        val = evaluate(self.eval_model, self.data.val, **kw)
        self._warn_nonfinite(val, "model", epoch)
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch + 1,  # 1-based, as in the logs and epoch_NNNN.pt
            "global_step": s.global_step,
            "train_loss": s.loss_sum / max(s.loss_count, 1),
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_loss": val["loss"],
        }
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.data.val, **kw)
            self._warn_nonfinite(ema, "ema", epoch)
            record.update(ema_top1=ema["top1"], ema_top5=ema["top5"], ema_loss=ema["loss"])
        record.update(
            lr=self.optimizer.param_groups[0]["lr"],
            img_s=s.images / max(s.elapsed, 1e-9),
            epoch_time=s.elapsed,
            eval_time=time.perf_counter() - tic,
        )
        value = record.get(self.metric)
        s.metrics = {
            k: float(v) for k, v in record.items() if k not in ("kind", "epoch", "global_step")
        }
        record["best_by"] = self.metric  # the metric that picks best.pt
        s.epoch, s.step = epoch + 1, 0
        s.start_epoch()
        if self.metrics is not None:
            self.metrics.write(record)
        ema_note = f", EMA top-1 {record['ema_top1']:.2f}" if "ema_top1" in record else ""
        log.info(
            "epoch %d/%d: train loss %.4f, val top-1 %.2f top-5 %.2f%s (%.0f img/s, %.1fs)",
            epoch + 1,
            self.epochs,
            record["train_loss"],
            record["val_top1"],
            record["val_top5"],
            ema_note,
            record["img_s"],
            record["epoch_time"],
        )
        self.save(epoch_end=True)
        if self.manager is not None and self.manager.best_updated:
            log.info(
                "best.pt: epoch %d/%d (%s %s)",
                epoch + 1,
                self.epochs,
                self.metric,
                f"{value:.4g}" if value is not None else "not measured",
            )
        return record

    def _warn_nonfinite(self, result: EvalResult, weights: str, epoch: int) -> None:
        """One warning per evaluation whose outputs were not all finite (its metrics are NaN)."""
        if result.nonfinite and self.denv.is_main:
            prefix = "ema" if weights == "ema" else "val"
            log.warning(
                "epoch %d/%d: the %s weights give non-finite (NaN/Inf) outputs on %d of %d val "
                "images: %s_top1/%s_top5/%s_loss are recorded as NaN, and this epoch is never "
                "best by them",
                epoch + 1,
                self.epochs,
                weights,
                result.nonfinite,
                result.count,
                prefix,
                prefix,
                prefix,
            )

    def fit(self) -> int:
        """Train to ``options.epochs``; returns EXIT_OK, EXIT_PREEMPTED or EXIT_NON_FINITE.

        Call :meth:`resume` (or :meth:`init_from`) first. Rank 0's metrics sink is open while
        this runs and is closed with the exit code (1 when training raises)."""
        if self._open_metrics is not None:
            self.metrics = self._open_metrics(self.wandb_id)
        code = 1
        try:
            code = self._fit()
        finally:
            if self.metrics is not None:
                self.metrics.close(code)
        return code

    def _fit(self) -> int:
        s = self.state
        if self.metrics is not None:
            self.metrics.truncate_after(s.epoch, s.global_step)
        if s.epoch >= self.epochs:
            log.info("run already complete (%d/%d epochs); nothing to do", s.epoch, self.epochs)
            return EXIT_OK
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with self.guard, logging_redirect_tqdm():
                for epoch in range(s.epoch, self.epochs):
                    if s.step == 0:
                        s.start_epoch()
                    self.data.train.set_epoch(epoch, start_step=s.step)
                    finished = train_one_epoch(
                        self.train_model,
                        self.data.train,
                        self.optimizer,
                        self.loss_fn,
                        s,
                        steps_per_epoch=self.data.steps_per_epoch,
                        device=self.device,
                        opts=self.loop,
                        scheduler=self.scheduler,
                        scaler=self.scaler,
                        ema=self.ema,
                        ema_source=self.raw,
                        mixup=self.mixup,
                        stop_requested=lambda: self.guard.requested,
                        on_update=self._on_update,
                        is_main=self.denv.is_main,
                        world_size=self.denv.world_size,
                    )
                    if finished:
                        self._end_epoch(epoch)
                    if not finished or self._stop_agreed():
                        return self._preempted()
        except NonFiniteLossError as err:
            log.error(
                "%s. Stopping; the last good checkpoint is %s",
                err,
                self.last_checkpoint or "(none written yet)",
            )
            return EXIT_NON_FINITE
        return EXIT_OK

    def _preempted(self) -> int:
        s = self.state
        if self._saved_at != s.global_step:
            self.save(epoch_end=False)
        sig = self.guard.signum
        (log.warning if self.denv.is_main else log.info)(
            "stop requested (%s): checkpoint %s %s; exiting with %d. Relaunch with the same "
            "run_name to continue.",
            f"signal {sig}" if sig is not None else "signal on another rank",
            self.last_checkpoint,
            self._position(),
            EXIT_PREEMPTED,
        )
        self.guard.chain()
        return EXIT_PREEMPTED
