"""Train a model: Hydra config -> plain objects -> xvol.engine.Trainer.

Usage:
    python scripts/train.py                                     # one process (CPU or one GPU)
    python scripts/train.py model=xresnet18 data=demo data.img_size=32 trainer.epochs=2
    torchrun --standalone --nproc_per_node=8 scripts/train.py experiment=NAME data.root=/imagenet
    python scripts/train.py run_name=NAME                      # resume=auto continues NAME
    python scripts/train.py data.root=/flowers data.num_classes=102 trainer.init_from=RUN/best.pt

The run directory is ${paths.output_dir}/${run_name} (one for all ranks); one launch at a time
holds it. Exit codes: 0 done, 3 non-finite loss, 143 preempted after checkpointing
(xvol/engine/signals.py), 1 other errors. A bad value, bad data, an unusable checkpoint, a
busy run directory or a failed write ends in one line, ``error: <key, file or cause>: ...``,
printed by rank 0 and appended to train.log.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import xvol.config  # noqa: F401  (registers the ${xvol_run_id:} resolver)
from xvol import engine
from xvol.cli import config_dir
from xvol.config import ConfigError, validate_train_config, write_run_snapshot
from xvol.data import DataError
from xvol.engine.checkpoint import git_revision
from xvol.engine.dist import report_to_launcher
from xvol.engine.log import log_to_files
from xvol.engine.runtime import amp_dtype, configure_determinism, seed_everything
from xvol.extras import MissingExtra
from xvol.models import count_params


def _auto(value: Any, default: bool) -> bool:
    return default if value == "auto" else bool(value)


# failures whose message names the key, file or cause: one line, no traceback
USER_ERRORS = (ConfigError, DataError, engine.CheckpointError, engine.RunDirError, MissingExtra)


def train(cfg: DictConfig, denv: engine.DistEnv, device: torch.device, run_dir: Path) -> int:
    tcfg = cfg.trainer
    log = engine.get_logger("xvol")
    config = OmegaConf.to_container(cfg, resolve=True)
    configure_determinism(tcfg.deterministic)
    seed_everything(cfg.seed)  # same initial weights on every rank

    data = instantiate(cfg.data)(
        rank=denv.rank, world_size=denv.world_size, device=device, seed=cfg.seed
    )
    cuda = device.type == "cuda"
    channels_last = _auto(tcfg.channels_last, cuda)
    sync_bn = _auto(tcfg.sync_bn, cuda and denv.distributed)
    model = engine.prepare_model(
        instantiate(cfg.model), device, sync_bn=sync_bn, channels_last=channels_last
    )
    optimizer = engine.build_optimizer(instantiate(cfg.optim), model)
    n_updates = engine.updates_per_epoch(data.steps_per_epoch, tcfg.grad_accum)
    scheduler = engine.build_scheduler(instantiate(cfg.sched), optimizer, n_updates)
    dtype = amp_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    mix = tcfg.mixup
    mixup = None
    if mix is not None and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0 or mix.cutmix_minmax):
        mixup = instantiate(mix)
        loss_fn: torch.nn.Module = SoftTargetCrossEntropy()
    elif tcfg.label_smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=tcfg.label_smoothing)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()
    seed_everything(cfg.seed + denv.rank)  # per-rank streams (Mixup, dropout); restored on resume

    opts = engine.TrainOptions(
        grad_accum=tcfg.grad_accum,
        clip_grad=tcfg.clip_grad,
        clip_mode=tcfg.clip_mode,
        amp_dtype=dtype,
        channels_last=channels_last,
        log_interval=tcfg.log_interval,
        max_skipped_steps=tcfg.max_skipped_steps,
        progress_bar=tcfg.progress_bar,
        debug_nan_at_step=tcfg.debug_nan_at_step,
        debug_signal_at_step=tcfg.debug_signal_at_step,
    )
    trainer = engine.Trainer(
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn.to(device),
        data=data,
        denv=denv,
        device=device,
        epochs=tcfg.epochs,
        run_dir=run_dir,
        opts=opts,
        ckpt=engine.CheckpointOptions(**tcfg.checkpoint),
        config=config,
        scheduler=scheduler,
        scaler=scaler,
        ema_factory=instantiate(tcfg.ema) if tcfg.ema is not None else None,
        mixup=mixup,
        compile_model=tcfg.compile,
        sync_bn=sync_bn,
        dist_bn=tcfg.dist_bn,
        guard=engine.PreemptionGuard(),  # SIGTERM/SIGUSR1, armed while Trainer.fit runs
        git=git_revision() if denv.is_main else None,
        allow_class_mismatch=tcfg.allow_class_mismatch,
    )
    resumed = trainer.resume(cfg.resume)
    if tcfg.init_from and resumed is not None:
        log.info(
            "trainer.init_from=%s not used: this run continues its own checkpoint %s (resume "
            "wins once a run has checkpoints)",
            tcfg.init_from,
            resumed,
        )
    elif tcfg.init_from:
        trainer.init_from(tcfg.init_from, ema=tcfg.init_from_ema)

    metrics = None
    if denv.is_main:
        overrides = list(HydraConfig.get().overrides.task)
        differ = write_run_snapshot(run_dir, cfg, overrides, resumed is not None)
        if differ:
            log.warning(
                "config.yaml and overrides.yaml keep the values this run was started with; "
                "this launch differs in %s (each checkpoint's config holds the values it was "
                "written with)",
                ", ".join(differ[:8]) + (f", ... ({len(differ)} keys)" if len(differ) > 8 else ""),
            )
        wandb = None
        if cfg.logger.wandb.enabled:
            wcfg = {
                k: v
                for k, v in OmegaConf.to_container(cfg.logger.wandb, resolve=True).items()
                if k != "enabled"
            }
            wandb = engine.WandbSink(
                run_dir=run_dir, name=cfg.run_name, config=config, run_id=trainer.wandb_id, **wcfg
            )
        metrics = engine.MetricsLogger(
            engine.JsonlMetrics(run_dir / cfg.logger.metrics_file), wandb
        )
    trainer.metrics = metrics
    n_params = count_params(model)
    log.info(
        "run %s in %s: %d rank(s) on %s, %s params, %d train / %d val images, "
        "%d batches x %d per rank per epoch, amp %s",
        cfg.run_name,
        run_dir,
        denv.world_size,
        device,
        f"{n_params:,}",
        data.num_train,
        data.num_val,
        data.steps_per_epoch,
        cfg.data.batch_size,
        dtype,
    )
    log.info("optimizer: %s", engine.optim.describe_param_groups(optimizer))
    code = 1  # what wandb records if fit() raises
    try:
        code = trainer.fit()
    finally:
        if metrics is not None:
            metrics.close(code)
    engine.dist.barrier()  # ranks leave together: torchrun signals the rest when one exits
    if code == engine.EXIT_OK and trainer.state.metrics:
        m = trainer.state.metrics
        best = ""
        if trainer.manager is not None:
            epoch, value = trainer.manager.best_epoch()
            if epoch is not None:
                shown = f" {value:.2f}" if value is not None else ""
                best = f"; best.pt: epoch {epoch} by {trainer.metric}{shown}"
        log.info(
            "final: val top-1 %.2f, top-5 %.2f%s%s; checkpoints in %s",
            m["val_top1"],
            m["val_top5"],
            f", EMA top-1 {m['ema_top1']:.2f}" if "ema_top1" in m else "",
            best,
            run_dir,
        )
    return code


def _fail(denv: engine.DistEnv, err: Exception) -> NoReturn:
    """One line on rank 0's stderr and in train.log; every rank tells torchrun its cause."""
    text = str(err)
    if isinstance(err, OSError):  # a write elsewhere than a checkpoint: names the file
        text = f"{err.filename}: {err.strerror or err}"
    line = "error: " + "; ".join(part.strip() for part in text.strip().splitlines())
    report_to_launcher(line)
    if denv.is_main:
        log_to_files(logging.ERROR, line)
        print(line, file=sys.stderr, flush=True)
    elif denv.distributed:
        # torchrun SIGTERMs the other ranks as soon as one exits: give rank 0, which usually
        # meets the same error at the same point, time to print it and write train.log
        time.sleep(3.0)
    sys.exit(1)


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    denv = engine.read_dist_env()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    engine.setup_logging(denv.rank, run_dir / cfg.logger.log_file)
    try:
        validate_train_config(cfg)  # every rank, before anything is built
        denv, device = engine.setup_distributed(cfg.trainer.device)
        try:
            lock = engine.lock_run_dir(run_dir, denv.is_main)  # rank 0's; None elsewhere
            try:
                code = train(cfg, denv, device, run_dir)
            finally:
                if lock is not None:
                    lock.release()
        finally:
            engine.cleanup_distributed()
    except USER_ERRORS as err:
        _fail(denv, err)
    except OSError as err:
        if err.filename is None:
            raise
        _fail(denv, err)
    if code != engine.EXIT_OK:
        sys.exit(code)


if __name__ == "__main__":
    main()
