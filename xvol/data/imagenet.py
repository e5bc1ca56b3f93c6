"""torchvision backend: ImageFolder layout + timm transforms + a resumable sharded sampler.

Determinism contract (base.TrainLoader): the sampler yields (epoch, index) keys, so worker
processes (persistent or not) know the epoch without shared state, and the dataset seeds the
python/numpy/torch RNGs from (seed, epoch, index) right before the timm transform of that sample.
A batch therefore depends on neither the worker count nor what ran before it, which is what makes
``set_epoch(e, start_step=k)`` reproduce batch k.. of an uninterrupted epoch bitwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from xvol.data.base import DataBundle
from xvol.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    Split,
    epoch_order,
    eval_bounds,
    load_folder,
    open_rgb,
    sample_seed,
    seeded_rngs,
    train_steps,
)

logger = logging.getLogger(__name__)

_MAX_SUBSTITUTES = 16


def _on_device(
    batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    try:
        for images, labels in batches:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    except DataError as e:
        # from a worker process, DataLoader re-raises it with the worker's traceback in the
        # message; keep the one line that names the file
        text = str(e).rstrip()
        if "\nOriginal Traceback" not in text:
            raise
        raise DataError(text.splitlines()[-1].split("DataError: ", 1)[-1]) from None


class FolderDataset(Dataset):
    """(path, label) samples -> (tensor, label); keys are ``index`` or ``(epoch, index)``.

    A file that fails to decode at runtime (it slipped past a fast/off scan) is replaced, under
    on_bad_image=skip, by a deterministic other sample and counted, so an epoch never stops and
    every rank keeps its batch count; under ``error`` it raises DataError naming the file. An
    evaluation set (``substitute=False``) never replaces an image: the other image would be
    scored twice and the bad one not at all, so it raises DataError naming the file.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[Image.Image], Tensor],
        *,
        seed: int = 0,
        on_bad_image: str = "skip",
        substitute: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.substitute = substitute
        self.substituted = 0  # per process (each worker counts its own)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, label = self._load(index)
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            return self.transform(img), label

    def _load(self, index: int) -> tuple[Image.Image, int]:
        for attempt in range(_MAX_SUBSTITUTES):
            # attempt 0 is the sample itself; then a fixed pseudo-random walk over the dataset
            j = index if attempt == 0 else (index * 2654435761 + attempt * 40503) % len(self)
            path, label = self.samples[j]
            try:
                return open_rgb(path), label  # decodes now: a bad file fails here
            except Exception as e:  # whatever PIL raises for a broken file
                if self.on_bad_image == "error":
                    raise DataError(f"cannot decode {path} (data.on_bad_image=error): {e}") from e
                if not self.substitute:
                    raise DataError(
                        f"cannot decode val image {path} ({e}): a val image is never replaced by "
                        "another (that one would count twice); remove the file, or run with "
                        "data.validate=fast or full to drop bad files before training"
                    ) from None
                self.substituted += 1
                if self.substituted <= 3:
                    logger.warning(
                        "cannot decode %s (%s); substituting another sample (%d so far in "
                        "this process; run with data.validate=full to drop such files up front)",
                        path,
                        e,
                        self.substituted,
                    )
        raise DataError(f"{_MAX_SUBSTITUTES} consecutive undecodable files around {path}")


class ShardSampler(Sampler):
    """This rank's row of ``epoch_order`` from batch ``start_step`` on, as (epoch, index) keys."""

    def __init__(
        self, num_samples: int, rank: int, world_size: int, batch_size: int, seed: int
    ) -> None:
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.steps = train_steps(num_samples, world_size, batch_size)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps}]")
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(
            self.num_samples, self.world_size, self.batch_size, self.seed, self.epoch
        )
        mine = order[self.rank, self.start_step * self.batch_size :].tolist()
        return iter([(self.epoch, i) for i in mine])

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.batch_size


def _loader_kwargs(workers: int, device: torch.device) -> dict:
    return {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        # DataLoader draws a base seed per iter(); a private generator keeps that draw out of
        # the training process's global torch RNG (our samples seed themselves anyway)
        "generator": torch.Generator(),
    }


class TorchTrainLoader:
    """TrainLoader over a DataLoader; ``len`` is the full epoch, iteration starts at start_step."""

    def __init__(
        self,
        dataset: FolderDataset,
        sampler: ShardSampler,
        batch_size: int,
        workers: int,
        device: torch.device,
    ) -> None:
        self.sampler, self.device = sampler, device
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            **_loader_kwargs(workers, device),
        )

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return self.sampler.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return _on_device(self.loader, self.device)


class TorchEvalLoader:
    """EvalLoader over this rank's contiguous val slice: no padding, no dropped tail."""

    def __init__(
        self, dataset: FolderDataset, batch_size: int, workers: int, device: torch.device
    ) -> None:
        self.device = device
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            **_loader_kwargs(workers, device),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return _on_device(self.loader, self.device)


def eval_transform(
    img_size: int,
    crop_pct: float,
    interpolation: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """timm's eval transform: the reference the DALI eval graph reproduces (xvol.data.dali)."""
    return create_transform(
        img_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )


def pad_crop_transform(
    img_size: int, pad: int, hflip: float, mean: Sequence[float], std: Sequence[float]
) -> Callable:
    """CIFAR's training augmentation: zero padding of ``pad`` pixels, a random ``img_size``
    crop, a horizontal flip, then normalization (what the in-memory backend does on the
    device; torchvision's own transforms, seeded per sample like timm's)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize((img_size, img_size)),  # a no-op on images already img_size square
        T.RandomCrop(img_size, padding=pad),
        T.RandomHorizontalFlip(hflip),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])  # fmt: skip


def eval_loader(
    split: Split,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    batch_size: int,
    workers: int,
    img_size: int,
    crop_pct: float,
    interpolation: str,
    on_bad_image: str = "error",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> TorchEvalLoader:
    """This rank's contiguous slice of ``split`` through the eval transform (what ``build``
    uses for val; the eval tool calls it on a val folder it has already checked)."""
    lo, hi = eval_bounds(len(split.samples), rank, world_size)
    transform = eval_transform(img_size, crop_pct, interpolation, mean, std)
    dataset = FolderDataset(
        split.samples[lo:hi], transform, on_bad_image=on_bad_image, substitute=False
    )
    return TorchEvalLoader(dataset, batch_size, workers, torch.device(device))


def build(
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    seed: int,
    root: str,
    num_classes: int,
    img_size: int,
    batch_size: int,
    workers: int = 4,
    eval_img_size: int | None = None,
    eval_batch_size: int | None = None,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    auto_augment: str | None = None,
    reprob: float = 0.0,
    remode: str = "const",
    on_bad_image: str = "skip",
    validate: str = "auto",
    splits: Sequence[str] = ("train", "val"),
    name: str = "imagenet",
    dali: dict | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pad: int = 0,
) -> DataBundle:
    """ImageFolder + timm transforms. ``name`` and ``dali`` are accepted (and unused) so that one
    config serves both backends; every other key is used. ``mean``/``std``: the normalization
    (ImageNet's by default); ``pad`` > 0: CIFAR's pad-crop + flip (``pad_crop_transform``)
    replaces RandomResizedCrop, colour jitter, auto-augment and erasing."""
    del name, dali
    device = torch.device(device)
    train, val = load_folder(
        Path(root),
        num_classes=num_classes,
        on_bad_image=on_bad_image,
        validate=validate,
        workers=max(4, 2 * workers),  # scan processes: mostly I/O wait
        rank=rank,
        splits=(splits[0], splits[1]),
    )
    if pad:  # CIFAR-style: pad-crop + flip instead of RandomResizedCrop and its colour ops
        train_tf = pad_crop_transform(img_size, pad, hflip, mean, std)
    else:
        train_tf = create_transform(
            img_size,
            is_training=True,
            scale=tuple(scale),
            ratio=tuple(ratio),
            hflip=hflip,
            color_jitter=color_jitter or None,
            auto_augment=auto_augment,
            interpolation=interpolation,
            mean=tuple(mean),
            std=tuple(std),
            re_prob=reprob,
            re_mode=remode,
        )
    sampler = ShardSampler(len(train.samples), rank, world_size, batch_size, seed)
    train_ds = FolderDataset(train.samples, train_tf, seed=seed, on_bad_image=on_bad_image)
    val_loader = eval_loader(
        val,
        rank=rank,
        world_size=world_size,
        device=device,
        batch_size=eval_batch_size or batch_size,
        workers=workers,
        img_size=eval_img_size or img_size,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=mean,
        std=std,
        on_bad_image=on_bad_image,
    )
    return DataBundle(
        train=TorchTrainLoader(train_ds, sampler, batch_size, workers, device),
        val=val_loader,
        steps_per_epoch=sampler.steps,
        num_classes=num_classes,
        class_names=train.classes,
        num_train=len(train.samples),
        num_val=len(val.samples),
    )
