"""Training engine: dist setup, train/eval loops, checkpoints, optimizer/schedule, metrics.

Takes plain objects and never imports Hydra; xvol.cli.train wires the config to it. The
trainer's options and what they accept are declared once, in xvol/engine/options.py.
"""

from xvol.engine.checkpointing import CheckpointManager
from xvol.engine.dist import DistEnv, cleanup_distributed, read_dist_env, setup_distributed
from xvol.engine.log import get_logger, setup_logging
from xvol.engine.loop import LoopSettings, NonFiniteLossError, TrainState, evaluate, train_one_epoch
from xvol.engine.metrics import JsonlMetrics, MetricsLogger, WandbSink
from xvol.engine.optim import build_optimizer, build_scheduler, updates_per_epoch
from xvol.engine.options import (
    CheckpointOptions,
    DebugOptions,
    EmaOptions,
    MixupOptions,
    TrainerOptions,
)
from xvol.engine.runlock import RunDirError, RunDirLock, lock_run_dir
from xvol.engine.signals import EXIT_NON_FINITE, EXIT_OK, EXIT_PREEMPTED, PreemptionGuard
from xvol.engine.trainer import Trainer, prepare_model
from xvol.formats.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from xvol.formats.load import load_state_dict_strict, strip_prefixes

__all__ = [
    "EXIT_NON_FINITE",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointOptions",
    "DebugOptions",
    "DistEnv",
    "EmaOptions",
    "JsonlMetrics",
    "MetricsLogger",
    "MixupOptions",
    "NonFiniteLossError",
    "PreemptionGuard",
    "RunDirError",
    "RunDirLock",
    "LoopSettings",
    "TrainState",
    "Trainer",
    "TrainerOptions",
    "WandbSink",
    "build_optimizer",
    "build_scheduler",
    "cleanup_distributed",
    "evaluate",
    "get_logger",
    "load_checkpoint",
    "load_state_dict_strict",
    "lock_run_dir",
    "prepare_model",
    "read_dist_env",
    "save_checkpoint",
    "setup_distributed",
    "setup_logging",
    "strip_prefixes",
    "train_one_epoch",
    "updates_per_epoch",
]
