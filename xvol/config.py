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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("xvol_run_id"):
        OmegaConf.register_new_resolver("xvol_run_id", run_id, use_cache=True)
