"""The one contract every data backend (torchvision, DALI, synthetic, demo) fulfils.

A backend is a builder ``build(*, rank, world_size, device, seed, **data_cfg) -> DataBundle``,
referenced from ``configs/data/*.yaml`` by ``_target_`` with ``_partial_: true``; the training
script calls it with the runtime arguments. The engine only sees ``DataBundle``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class TrainLoader(Protocol):
    """Yields (images float N x 3 x H x W on the training device, labels int64) per rank.

    Every rank yields the same number of full batches (``len``). The order and augmentation of
    epoch e depend only on (seed, e, sample index), so ``set_epoch(e, start_step=k)`` followed by
    iteration resumes mid-epoch at exactly batch k of an uninterrupted run.
    """

    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...


@runtime_checkable
class EvalLoader(Protocol):
    """Yields (images, labels) so that the union over ranks is every val image exactly once."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...


@dataclass
class DataBundle:
    train: TrainLoader
    val: EvalLoader
    steps_per_epoch: int
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    num_train: int = 0
    num_val: int = 0
