"""Process-wide settings of a run: seeds, determinism, mixed precision."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

__all__ = ["AMP_DTYPES", "seed_everything", "configure_determinism", "amp_dtype", "autocast"]

# trainer.amp values besides "auto" (case-insensitive) and the autocast dtype each one means
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "none": None,
    "fp32": None,
    "false": None,
}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels (exact resume, bitwise reruns) or the fastest ones (cudnn autotune)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` in {auto, bf16, fp16, none/null}.

    ``auto`` is bf16 on a GPU that supports it and full precision otherwise (bf16 autocast on
    CPU is slower than fp32 for convolutions on most CPUs).
    """
    choice = (amp or "none").lower()
    if choice == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if choice not in AMP_DTYPES:
        raise ValueError(f"trainer.amp must be one of auto, bf16, fp16, none; got {amp!r}")
    return AMP_DTYPES[choice]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` (from :func:`amp_dtype`) on ``device``; nothing for full
    precision (None). The one autocast of training, evaluation and xvol-eval's throughput."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
