"""OmegaConf resolvers used by configs/ (registered when xvol is imported)."""

from __future__ import annotations

import os
import time

from omegaconf import OmegaConf


def run_id() -> str:
    """A run name every rank agrees on without talking to each other.

    Under torchrun all ranks (and every restart under --max-restarts) share TORCHELASTIC_RUN_ID
    (the --rdzv-id, or a uuid with --standalone). Outside torchrun a timestamp is safe: one
    process. ``${now:}`` in hydra.run.dir would be resolved by each rank at its own second.
    """
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return rid[:8] if len(rid) == 36 else rid  # a --standalone uuid: its first block suffices
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm:
        return f"slurm{slurm}"
    return time.strftime("%Y%m%d-%H%M%S")


def world_size() -> int:
    """Ranks of the job being configured, by the engine's own rule (torchrun, then a submitit
    Slurm task; a plain process inside an sbatch script stays one rank)."""
    from xvol.engine.dist import read_dist_env  # lazy: configs resolve before any dist setup

    return read_dist_env().world_size


def linear_lr(base_lr: float, base_batch: int, batch_per_rank: int) -> float:
    """The linear scaling rule (Goyal et al.): base_lr per base_batch images of global batch."""
    return float(base_lr) * int(batch_per_rank) * world_size() / int(base_batch)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("xvol_run_id"):
        OmegaConf.register_new_resolver("xvol_run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("xvol_linear_lr"):
        OmegaConf.register_new_resolver("xvol_linear_lr", linear_lr)
