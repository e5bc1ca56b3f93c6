"""Synthetic backend: one random batch generated on the device and yielded every step.

For benchmarks that must not measure the input pipeline. The batch is fixed by (seed, rank), so
the stream is trivially deterministic and resumable. Consumers must not modify it in place.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from xvol.data.base import DataBundle


def _batch(
    batch_size: int, img_size: int, num_classes: int, seed: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=g, device=device)
    labels = torch.randint(num_classes, (batch_size,), generator=g, device=device)
    return images, labels


class SyntheticLoader:
    """Train and eval loader alike: ``length`` identical batches per epoch."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int) -> None:
        if length < 1:
            raise ValueError(f"synthetic data needs length >= 1, got {length}")
        self.batch, self.length, self.start_step = batch, length, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.length:
            raise ValueError(f"start_step={start_step} outside [0, {self.length}]")
        self.start_step = start_step

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.start_step, self.length):
            yield self.batch


def build(
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    seed: int,
    num_classes: int = 1000,
    img_size: int = 224,
    batch_size: int = 128,
    workers: int = 0,
    length: int = 500,
    val_length: int = 10,
    name: str = "synthetic",
) -> DataBundle:
    """``length`` train steps and ``val_length`` eval batches per rank; ``workers`` is unused."""
    del workers, name
    device = torch.device(device)
    train = _batch(batch_size, img_size, num_classes, seed * 1_000 + 2 * rank, device)
    val = _batch(batch_size, img_size, num_classes, seed * 1_000 + 2 * rank + 1, device)
    return DataBundle(
        train=SyntheticLoader(train, length),
        val=SyntheticLoader(val, val_length),
        steps_per_epoch=length,
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        num_train=length * batch_size * world_size,
        num_val=val_length * batch_size * world_size,
    )
