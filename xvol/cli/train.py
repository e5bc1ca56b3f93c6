"""Train a model: Hydra config -> plain objects -> xvol.engine.Trainer.

Usage:
    python scripts/train.py                                     # one process (CPU or one GPU)
    python scripts/train.py model=xresnet18 data=demo data.img_size=32 trainer.epochs=2
    torchrun --standalone --nproc_per_node=8 scripts/train.py experiment=NAME data.root=/imagenet
    python scripts/train.py run_name=NAME                      # resume=auto continues NAME
    python scripts/train.py data.root=/flowers data.num_classes=102 trainer.init_from=RUN/best.pt

The run directory is ${paths.output_dir}/${run_name} (one for all ranks); one launch at a time
holds it. Exit codes: 0 done, 3 non-finite loss, 143 preempted after checkpointing
(xvol/engine/signals.py), 1 other errors. A bad value (of the wrong type, out of range, or an
unknown key), bad data, an unusable checkpoint, a busy run directory or a failed write ends in
one line, ``error: <key, file or cause>: ...``, printed by rank 0 and appended to train.log
(once the run directory is known: not for a config that does not compose).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

import xvol.config  # noqa: F401  (registers the resolvers and the trainer/debug schema)
from xvol import engine
from xvol.cli import config_dir
from xvol.config import (
    ConfigError,
    composition_error,
    validate_train_config,
    write_run_snapshot,
)
from xvol.data import DataError
from xvol.engine.dist import report_to_launcher
from xvol.engine.log import log_to_files
from xvol.engine.runtime import configure_determinism, seed_everything
from xvol.extras import MissingExtra
from xvol.formats.provenance import git_revision
from xvol.models import SUPPORTED_ARCHS, ModelSpec, count_params

# failures whose message names the key, file or cause: one line, no traceback
USER_ERRORS = (ConfigError, DataError, engine.CheckpointError, engine.RunDirError, MissingExtra)


def build_network(spec: ModelSpec) -> nn.Module:
    """``spec.build()``, before the first step; what the spec cannot tell without building (an
    arch outside the ResNet family whose model.convert selection matches no convolution) is one
    line naming the key, as the tools say it (xvol.formats.load.build_from_spec)."""
    try:
        return spec.build()
    except (ValueError, TypeError) as err:
        key = "model" if spec.arch in SUPPORTED_ARCHS else "model.convert"
        raise ConfigError(f"{key}: cannot build {spec.identity()['model']}: {err}") from None


def _metrics_opener(
    cfg: DictConfig, run_dir: Path, config: dict[str, Any]
) -> Callable[[str | None], engine.MetricsLogger]:
    """Rank 0's metrics sink (metrics.jsonl, and wandb when enabled), given the wandb run id to
    continue (Trainer.fit opens it once resume() has found that id)."""

    def open_metrics(wandb_id: str | None) -> engine.MetricsLogger:
        wandb = None
        if cfg.logger.wandb.enabled:
            wcfg = {
                k: v
                for k, v in OmegaConf.to_container(cfg.logger.wandb, resolve=True).items()
                if k != "enabled"
            }
            wandb = engine.WandbSink(
                run_dir=run_dir, name=cfg.run_name, config=config, run_id=wandb_id, **wcfg
            )
        return engine.MetricsLogger(engine.JsonlMetrics(run_dir / cfg.logger.metrics_file), wandb)

    return open_metrics


def train(
    cfg: DictConfig, spec: ModelSpec, denv: engine.DistEnv, device: torch.device, run_dir: Path
) -> int:
    """One run: ``spec`` (the validated model node, validate_train_config's) is built as every
    tool rebuilds it (``spec.build()``); the other groups are instantiated from the config."""
    options: engine.TrainerOptions = OmegaConf.to_object(cfg.trainer)
    log = engine.get_logger("xvol")
    config = OmegaConf.to_container(cfg, resolve=True)
    configure_determinism(options.deterministic)
    seed_everything(cfg.seed)  # same initial weights on every rank

    data = instantiate(cfg.data)(
        rank=denv.rank, world_size=denv.world_size, device=device, seed=cfg.seed
    )
    if options.limit_train_batches is not None:  # the loop stops each epoch there
        steps = min(data.steps_per_epoch, options.limit_train_batches)
        data = dataclasses.replace(data, steps_per_epoch=steps)
    model = engine.prepare_model(
        build_network(spec),
        device,
        sync_bn=options.use_sync_bn(device, denv.distributed),
        channels_last=options.use_channels_last(device),
    )
    optimizer = engine.build_optimizer(instantiate(cfg.optim), model)
    n_updates = engine.updates_per_epoch(data.steps_per_epoch, options.grad_accum)
    scheduler = engine.build_scheduler(instantiate(cfg.sched), optimizer, n_updates)
    seed_everything(cfg.seed + denv.rank)  # per-rank streams (Mixup, dropout); restored on resume

    trainer = engine.Trainer(
        model=model,
        optimizer=optimizer,
        data=data,
        denv=denv,
        device=device,
        run_dir=run_dir,
        options=options,
        config=config,
        scheduler=scheduler,
        debug=OmegaConf.to_object(cfg.debug),
        guard=engine.PreemptionGuard(),  # SIGTERM/SIGUSR1, armed while Trainer.fit runs
        git=git_revision() if denv.is_main else None,
        metrics=_metrics_opener(cfg, run_dir, config) if denv.is_main else None,
    )
    resumed = trainer.resume(cfg.resume)
    if options.init_from and resumed is not None:
        log.info(
            "trainer.init_from=%s not used: this run continues its own checkpoint %s (resume "
            "wins once a run has checkpoints)",
            options.init_from,
            resumed,
        )
    elif options.init_from:
        trainer.init_from(options.init_from, ema=options.init_from_ema)

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
        trainer.loop.amp_dtype,
    )
    log.info("optimizer: %s", engine.optim.describe_param_groups(optimizer))
    code = trainer.fit()
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


def _error_line(err: Exception) -> str:
    text = str(err)
    if isinstance(err, OSError):  # a write elsewhere than a checkpoint: names the file
        text = f"{err.filename}: {err.strerror or err}"
    return "error: " + "; ".join(part.strip() for part in text.strip().splitlines())


def _append_to_log(log_file: Path, line: str) -> None:
    """``line`` as one ERROR record of ``log_file`` (train.log), from a rank other than 0, whose
    logger writes no file."""
    handler = logging.FileHandler(log_file, mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    try:
        handler.handle(
            logging.makeLogRecord(
                {"name": "xvol", "levelno": logging.ERROR, "levelname": "ERROR", "msg": line}
            )
        )
    finally:
        handler.close()


def _fail(
    denv: engine.DistEnv,
    err: Exception,
    store: Any = None,
    log_file: Path | None = None,
) -> NoReturn:
    """One line, printed once, by the rank that met the error, and appended to train.log.

    Under torchrun the ranks' failures meet in the process group's ``store``: the first rank
    to post one reports it (rank 1's undecodable file reaches the user, not rank 0's "Connection
    closed by peer"); the others stay quiet. Before the group exists (a bad config, which every
    rank meets alike) rank 0 reports. torchrun's failure summary then points at that line
    rather than repeating it once per rank.
    """
    line = _error_line(err)
    first = engine.dist.claim_error_report(store, denv.rank, line) if store is not None else None
    if first is None:
        first = 0  # no store: rank 0 reports (every rank meets a config error alike)
    if first == denv.rank:
        if denv.distributed and not denv.is_main:
            line += f" (rank {denv.rank} of {denv.world_size})"
            if log_file is not None:
                _append_to_log(log_file, line)
        else:
            log_to_files(logging.ERROR, line)
        print(line, file=sys.stderr, flush=True)
        if denv.distributed:
            report_to_launcher(f"xvol: rank {denv.rank} stopped on the error: line printed above")
    else:
        report_to_launcher(f"xvol: stopped after rank {first}'s error: line printed above")
        # torchrun SIGTERMs the other ranks as soon as one exits: give the reporting rank time
        # to print its line and write train.log
        time.sleep(3.0)
    sys.exit(1)


def _after_peer_failure(denv: engine.DistEnv, store: Any) -> None:
    """Exit quietly when this rank's failure follows another rank's reported one (its
    collective broke because that rank left); return otherwise."""
    found = engine.dist.reported_error(store)
    if found is None or found[0] == denv.rank:
        return
    engine.get_logger("xvol").debug("stopping: rank %d failed (%s)", *found)
    report_to_launcher(f"xvol: stopped after rank {found[0]}'s error: line printed above")
    sys.exit(1)


_jobs_started = 0  # jobs of run(): an error before the first one is a failure to compose


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def run(cfg: DictConfig) -> None:
    """One training job of the composed config (each job of a --multirun sweep)."""
    global _jobs_started
    _jobs_started += 1
    denv = engine.read_dist_env()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log_file = run_dir / cfg.logger.log_file
    engine.setup_logging(denv.rank, log_file)
    store = None  # the process group's, kept past its teardown to read other ranks' failures
    try:
        spec = validate_train_config(cfg)  # every rank, before anything is built
        denv, device = engine.setup_distributed(cfg.trainer.device)
        store = engine.dist.default_store()
        try:
            lock = engine.lock_run_dir(run_dir, denv.is_main)  # rank 0's; None elsewhere
            try:
                code = train(cfg, spec, denv, device, run_dir)
            finally:
                if lock is not None:
                    lock.release()
        finally:
            engine.cleanup_distributed()
    except USER_ERRORS as err:
        _fail(denv, err, store, log_file)
    except OSError as err:
        if err.filename is None:
            _after_peer_failure(denv, store)
            raise
        _fail(denv, err, store, log_file)
    except Exception:
        _after_peer_failure(denv, store)
        raise
    if code != engine.EXIT_OK:
        sys.exit(code)


def _help_without_shared_bases() -> None:
    """``--help`` lists each group's options; files whose names start with ``_`` (model/_base,
    model/_xresnet) are shared bases the options list in ``defaults``, not options: leave them
    out of the list (Hydra's own formatter, filtered; used for --help only)."""
    from hydra._internal.hydra import Hydra

    def format_config_groups(
        self: Any, predicate: Callable[[str], bool], compact: bool = True
    ) -> str:
        lines = []
        for group in sorted(g for g in self.list_all_config_groups() if predicate(g)):
            options = sorted(
                o for o in self.config_loader.get_group_options(group) if not o.startswith("_")
            )
            if compact:
                lines.append(f"{group}: {', '.join(options)}")
            else:
                lines.append(f"{group}:\n" + "\n".join(f"  {o}" for o in options))
        return "".join(f"{line}\n" for line in lines)

    Hydra.format_config_groups = format_config_groups  # type: ignore[method-assign]


def main() -> None:
    """``xvol-train``: Hydra composes the config from the command line, then :func:`run`.

    A failure to compose it (a value of the wrong type, an unknown key or option, a bad
    override) ends like a bad value: one ``error: <key>: ...`` line, exit code 1. Hydra raises it
    to us instead of printing its own message (HYDRA_FULL_ERROR=1, unless set otherwise).
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        _help_without_shared_bases()
    try:
        run()
    except (ConfigCompositionException, OverrideParseException) as err:
        _fail(engine.read_dist_env(), composition_error(err))
    except Exception as err:
        if _jobs_started:
            raise
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # raised by a resolver of the hydra node (${xvol_run_name:})
            _fail(engine.read_dist_env(), cause)
        # OmegaConf raises plain errors for some contradictory overrides, e.g. a key under a
        # node the same command sets to null (trainer.ema=null trainer.ema.decay=0.5)
        overrides = " ".join(a for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
        reason = str(err).strip().splitlines()
        reason_line = f"{type(err).__name__}: {reason[0]}" if reason else type(err).__name__
        _fail(
            engine.read_dist_env(),
            ConfigError(f"overrides {overrides!r}: cannot be composed: {reason_line}"),
        )


if __name__ == "__main__":
    main()
