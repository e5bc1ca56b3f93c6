"""In-memory backend for small data sets (CIFAR-10 and the like): decoded once, augmented on the
training device.

Why not the DataLoader: a CIFAR-10 epoch is 50,000 JPEG decodes and per-sample transforms in
worker processes for a few seconds of GPU time, so the GPU waits on the loader. Here the folder
(ImageNet layout, scanned and checked by ``folder.load_folder`` like the other backends) is
decoded once, by PIL as the torchvision backend does (EXIF orientation applied, RGB), into one
uint8 N x 3 x H x W tensor kept on the training device (CIFAR-10's 60,000 images: 184 MB), and
every batch is cut from it there: CIFAR's augmentation (zero padding of ``pad`` pixels, a random
``img_size`` crop, a horizontal flip with probability ``hflip``), then the mean/std
normalization, all as a few tensor ops on the device.

Determinism contract (base.TrainLoader): epoch e's order is ``folder.epoch_order`` (the
torchvision backend's permutation, dealt out to ranks), and the crop offsets and flips of rank
r's epoch are one table drawn from a generator seeded by (seed, epoch, rank); batch k of epoch e
is therefore the same whatever ran before, and ``set_epoch(e, start_step=k)`` resumes there.
Eval: each rank decodes and scores its contiguous slice (``folder.eval_bounds``): every val image
exactly once, no augmentation.

Images of another size than ``img_size`` are resized once at decode (bilinear); the data set
must fit the device: more than ``max_gib`` GiB of pixels is refused with one line that names the
folder backends.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from xvol.data.base import DataBundle
from xvol.data.folder import (
    DataError,
    epoch_order,
    eval_bounds,
    load_folder,
    map_chunks,
    sample_seed,
)
from xvol.data.imagenet import ShardSampler

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "MemoryTrainLoader", "MemoryEvalLoader", "build"]

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _decode(path: str, size: int) -> np.ndarray | str:
    """The image's uint8 H x W x 3 pixels, or why it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds; name the file once)
        return (f"cannot decode {path}: {type(e).__name__}: {e} (data.validate=full skips such "
                "files up front)")  # fmt: skip


def _decode_chunk(paths: list[str], size: int) -> Tensor | str:
    """uint8 n x size x size x 3 of ``paths``, or the first failure's message."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        pixels = _decode(p, size)
        if isinstance(pixels, str):
            return pixels
        out[i] = pixels
    return torch.from_numpy(out)


def decode_all(paths: Sequence[str], size: int, workers: int) -> Tensor:
    """uint8 N x 3 x size x size of the images at ``paths``, decoded in ``workers`` processes
    (``folder.map_chunks``); an undecodable file is one DataError naming it."""
    out = torch.empty((len(paths), size, size, 3), dtype=torch.uint8)
    start = 0
    for part in map_chunks(functools.partial(_decode_chunk, size=size), paths, workers):
        if isinstance(part, str):
            raise DataError(part)
        out[start : start + len(part)] = part
        start += len(part)
    return out.permute(0, 3, 1, 2).contiguous()


def _normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (images.float().div_(255.0) - mean).div_(std)


def augment(images: Tensor, offsets: Tensor, flips: Tensor, pad: int, size: int) -> Tensor:
    """CIFAR's augmentation of a uint8 batch B x 3 x H x W on its device: zero padding of
    ``pad`` pixels, the size x size crop at ``offsets`` (B x 2, row and column in the padded
    image), mirrored where ``flips``. One gather, no per-sample Python."""
    b = images.shape[0]
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
    steps = torch.arange(size, device=images.device)
    rows = offsets[:, :1] + steps  # B x size
    cols = offsets[:, 1:] + torch.where(flips[:, None], steps.flip(0), steps)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


class MemoryTrainLoader:
    """Batches of augmented, normalized images from a uint8 tensor on the device."""

    def __init__(
        self, images: Tensor, labels: Tensor, *, rank: int, world_size: int, batch_size: int,
        seed: int, img_size: int, pad: int, hflip: float, mean: Tensor, std: Tensor,
    ) -> None:  # fmt: skip
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.img_size, self.pad, self.hflip = img_size, pad, hflip
        self.mean, self.std = mean, std
        # the torchvision backend's sampler: the same epoch order, shards and resume checks
        self.sampler = ShardSampler(len(labels), rank, world_size, batch_size, seed)
        self.steps = self.sampler.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return self.steps

    def _epoch_table(self) -> tuple[Tensor, Tensor, Tensor]:
        """(indices, crop offsets, flips) of this rank's whole epoch, on the device."""
        sm = self.sampler
        order = epoch_order(sm.num_samples, sm.world_size, sm.batch_size, sm.seed, sm.epoch)
        order = order[sm.rank]
        g = torch.Generator().manual_seed(sample_seed(sm.seed, sm.epoch, sm.rank))
        offsets = torch.randint(0, 2 * self.pad + 1, (len(order), 2), generator=g)
        flips = torch.rand(len(order), generator=g) < self.hflip
        device = self.images.device
        return order.to(device), offsets.to(device), flips.to(device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order, offsets, flips = self._epoch_table()
        bs = self.batch_size
        for step in range(self.sampler.start_step, self.steps):
            sl = slice(step * bs, (step + 1) * bs)
            idx = order[sl]
            crops = augment(self.images[idx], offsets[sl], flips[sl], self.pad, self.img_size)
            yield _normalize(crops, self.mean, self.std), self.labels[idx]


class MemoryEvalLoader:
    """This rank's contiguous val slice, in order, normalized (no augmentation)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean: Tensor,
                 std: Tensor) -> None:  # fmt: skip
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            sl = slice(start, start + self.batch_size)
            yield _normalize(self.images[sl], self.mean, self.std), self.labels[sl]


def build(
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    seed: int,
    root: str,
    num_classes: int,
    img_size: int = 32,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    workers: int = 8,
    pad: int = 4,
    hflip: float = 0.5,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    on_bad_image: str = "skip",
    validate: str = "auto",
    splits: Sequence[str] = ("train", "val"),
    max_gib: float = 8.0,
    name: str = "memory",
) -> DataBundle:
    """Scan the folder, decode train (all of it: every rank samples from the whole set) and this
    rank's val slice onto ``device``; ``workers`` is the number of decode processes."""
    del name
    device = torch.device(device)
    if pad < 0 or not 0.0 <= hflip <= 1.0:
        raise ValueError(f"data.pad must be >= 0 and data.hflip in [0, 1], got {pad}, {hflip}")
    train, val = load_folder(
        Path(root), num_classes=num_classes, on_bad_image=on_bad_image, validate=validate,
        workers=max(4, workers), rank=rank, splits=(splits[0], splits[1]),
    )  # fmt: skip
    lo, hi = eval_bounds(len(val.samples), rank, world_size)
    gib = (len(train.samples) + hi - lo) * 3 * img_size**2 / 2**30
    if gib > max_gib:
        raise DataError(
            f"{root}: {gib:.1f} GiB of {img_size} px pixels exceed data.max_gib={max_gib:g} for "
            "the in-memory backend; use data.backend=torchvision or dali"
        )
    train_images = decode_all([p for p, _ in train.samples], img_size, workers).to(device)
    val_images = decode_all([p for p, _ in val.samples[lo:hi]], img_size, workers).to(device)
    train_labels = torch.tensor([y for _, y in train.samples], dtype=torch.int64, device=device)
    val_labels = torch.tensor([y for _, y in val.samples[lo:hi]], dtype=torch.int64,
                              device=device)  # fmt: skip
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    if rank == 0:
        logger.info(
            "data: %d train / %d val images decoded into %s memory (%.0f MB, uint8)",
            len(train_labels), len(val.samples), device.type,
            (train_images.numel() + val_images.numel()) / 1e6,
        )  # fmt: skip
    loader = MemoryTrainLoader(
        train_images, train_labels, rank=rank, world_size=world_size, batch_size=batch_size,
        seed=seed, img_size=img_size, pad=pad, hflip=hflip, mean=mean_t, std=std_t,
    )  # fmt: skip
    return DataBundle(
        train=loader,
        val=MemoryEvalLoader(val_images, val_labels, eval_batch_size or batch_size, mean_t, std_t),
        steps_per_epoch=len(loader),
        num_classes=num_classes,
        class_names=list(train.classes),
        num_train=len(train.samples),
        num_val=len(val.samples),
    )
