"""``data=cifar10``: one config, three backends, the same CIFAR augmentation.

``backend``: ``memory`` (default; xvol/data/memory.py: decoded once into uint8 on the training
device, augmented there), ``torchvision`` or ``dali`` (the folder read every epoch, with
``pad`` > 0 selecting their pad-crop + flip graph). Every backend normalizes with the config's
mean/std, and the eval view is the stored image (crop_pct 1.0 at img_size).
"""

from __future__ import annotations

from typing import Any

import torch

from xvol.data import dali, imagenet, memory
from xvol.data.base import DataBundle
from xvol.data.folder import DataConfigError

__all__ = ["BACKENDS", "build"]

BACKENDS = ("memory", "torchvision", "dali")
# keys only the folder backends read, and only the in-memory backend's
_FOLDER_ONLY = ("eval_img_size", "crop_pct", "interpolation", "dali")


def build(
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    seed: int,
    backend: str = "memory",
    **data_cfg: Any,
) -> DataBundle:
    """Hand the config to the chosen backend's builder (see the module docstring)."""
    if backend not in BACKENDS:
        raise DataConfigError(
            f"data.backend: expected one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    common = dict(rank=rank, world_size=world_size, device=device, seed=seed)
    if backend == "memory":
        cfg = {k: v for k, v in data_cfg.items() if k not in _FOLDER_ONLY}
        return memory.build(**common, **cfg)
    cfg = dict(data_cfg)
    cfg.setdefault("color_jitter", 0.0)  # pad-crop replaces the colour ops anyway
    builder = imagenet.build if backend == "torchvision" else dali.build
    return builder(**common, **cfg)
