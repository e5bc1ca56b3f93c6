"""DALI backend over the same ImageNet layout, the same scan and the same sample order as the
torchvision backend (xvol.data.folder), so switching backends changes speed, not the data.

- Decode on the GPU (``device="mixed"``) when the training device is CUDA, on the CPU
  (``device_id=None``) otherwise: ``data.dali.device=auto|gpu|cpu``.
- Train: each epoch gets a fresh pipeline whose reader is fed the epoch's file list (all ranks'
  rows of ``epoch_order`` laid end to end) and sharded by ``shard_id``/``num_shards``, so rank r
  reads exactly the samples the torchvision backend would give it. Augmentation comes from DALI's
  RNG seeded by (seed, epoch, rank): deterministic, independent of the thread count, but a
  function of the position in the epoch, so mid-epoch resume (``start_step=k``) runs and drops
  the first k batches; the cost is k batches of decoding once per resume.
- Eval: the sorted val list, contiguous shards, ``pad_last_batch`` + ``reader_name`` and
  ``LastBatchPolicy.PARTIAL`` so the padded samples are trimmed and every image counts once.
  The eval transform is timm's (torchvision Resize + CenterCrop on PIL) reproduced step for step
  (_dali_pipelines._eval_resize_crop): the same images give the same tensors up to rounding, so
  a checkpoint scores the same under either backend (bound measured in the README).
- DALI cannot skip an undecodable file mid-epoch; the up-front scan (data.validate) is what keeps
  bad files out, so keep it on (auto/fast/full) with this backend. What slips past it (damage in
  the compressed data: ``fast`` reads headers only, and nvJPEG rejects data libjpeg tolerates)
  stops the epoch with one DataError naming the file: DALI's own message often names none, so
  the loader decodes the failed batches' files again one by one with the same decoder.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xvol.data.base import DataBundle
from xvol.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfigError,
    DataError,
    Split,
    check_image,
    epoch_order,
    eval_bounds,
    load_folder,
    train_steps,
)

logger = logging.getLogger(__name__)

DALI_DEVICES = ("auto", "gpu", "cpu")
# batches a DALI iterator may have in flight past the last one it returned (prefetch depth 2,
# plus one being scheduled), searched for the file behind a decode failure
_INFLIGHT_BATCHES = 4
_INSTALL_HINT = "the DALI data backend needs NVIDIA DALI: pip install 'xvol[dali]'"


def _pipelines() -> Any:
    """Import DALI lazily, with the install command in the error."""
    try:
        from xvol.data import _dali_pipelines
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return _dali_pipelines


def _relative(split: Split) -> tuple[list[str], list[int]]:
    """Paths relative to the split folder keep the reader's file list small (ImageNet: 1.28M)."""
    base = str(split.path)
    return [os.path.relpath(p, base) for p, _ in split.samples], [y for _, y in split.samples]


def _dali_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31 - 1)


class _DaliOptions:
    """Where DALI runs and how many threads it uses."""

    def __init__(self, device: torch.device, mode: str, threads: int) -> None:
        if mode not in DALI_DEVICES:
            raise DataConfigError(
                f"data.dali.device: expected one of {', '.join(DALI_DEVICES)}, got {mode!r}"
            )
        if mode == "auto":
            mode = "gpu" if device.type == "cuda" and torch.cuda.is_available() else "cpu"
        if mode == "gpu" and not torch.cuda.is_available():
            raise DataConfigError(
                "data.dali.device: gpu but CUDA is not available; use cpu or auto"
            )
        self.on_gpu = mode == "gpu"
        self.decoder = "mixed" if self.on_gpu else "cpu"
        self.device_id: int | None = None
        if self.on_gpu:
            cuda_index = device.index if device.type == "cuda" else None
            self.device_id = torch.cuda.current_device() if cuda_index is None else cuda_index
        self.threads = max(1, threads)


def _to_device(out: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    images = out["images"].to(device, non_blocking=True)
    labels = out["labels"].reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
    return images, labels


def _failure_reason(error: RuntimeError) -> tuple[str, str] | None:
    """(operator, first line of DALI's reason) if ``error`` is a reader or decoder failure."""
    text = str(error)
    op = re.search(r"Error in \w+ operator `([^`]+)`", text)
    if op is None or not any(k in op.group(1) for k in ("decoders", "readers")):
        return None
    after = text.split("encountered:", 1)[-1].splitlines()
    reason = next((line.strip() for line in after if line.strip()), "unknown error")
    return op.group(1), reason


def _undecodable(files: list[str], root: str, opts: _DaliOptions) -> tuple[str, str] | None:
    """The first of ``files`` (relative to ``root``) that DALI's decoder rejects, and why."""
    if not files:
        return None
    pipe = _pipelines().probe_pipeline(
        files=files,
        file_root=root,
        decoder=opts.decoder,
        batch_size=1,
        num_threads=1,
        device_id=opts.device_id,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    pipe.build()
    for name in files:
        try:
            pipe.run()
        except RuntimeError as e:
            found = _failure_reason(e)
            return name, found[1] if found else str(e).strip().splitlines()[-1]
    return None


class _DaliLoader:
    """What both loaders share: the split's file list and one reader shard per rank."""

    def __init__(
        self,
        split: Split,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        device: torch.device,
        opts: _DaliOptions,
        graph: dict[str, Any],
    ) -> None:
        self.files, self.labels = _relative(split)
        self.root = str(split.path)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.device, self.opts, self.graph = device, opts, graph

    def _iterator(
        self, make: Any, policy: str, files: list[str], labels: list[int], **extra: Any
    ) -> Any:
        """Define and build a pipeline over ``files``, wrapped in a DALI iterator. (With
        auto_augment, DALI's own auto_aug code calls deprecated aliases and forces their
        DeprecationWarning through any filter: harmless.)"""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = make(
            files=files,
            labels=labels,
            file_root=self.root,
            shard_id=self.rank,
            num_shards=self.world_size,
            decoder=self.opts.decoder,
            batch_size=self.batch_size,
            num_threads=self.opts.threads,
            device_id=self.opts.device_id,
            **extra,
            **self.graph,
        )
        pipe.build()
        return DALIGenericIterator(
            [pipe],
            ["images", "labels"],
            reader_name=_pipelines().READER,
            last_batch_policy=getattr(LastBatchPolicy, policy),
            auto_reset=False,
        )

    def _named_failures(self, batches: Iterator[Any], shard: list[str]) -> Iterator[Any]:
        """``batches`` (this rank's reads of ``shard``) with a reader or decoder failure turned
        into one DataError naming the file, instead of DALI's many lines naming none."""
        done = 0
        try:
            for out in batches:
                yield out
                done += 1
        except RuntimeError as e:
            failure = _failure_reason(e)
            if failure is None:
                raise
            window = shard[done * self.batch_size : (done + _INFLIGHT_BATCHES) * self.batch_size]
            raise self._decode_error(failure, window) from None

    def _decode_error(self, failure: tuple[str, str], window: list[str]) -> DataError:
        op, reason = failure
        named = re.search(r"(?:Failed to decode sample #\d+ : |File mapping failed: )(.+)", reason)
        found = (
            (named.group(1).strip(), f"{op} failed")
            if named
            else _undecodable(window, self.root, self.opts)
        )
        if found is None:
            return DataError(
                f"DALI {op} failed ({reason}) on rank {self.rank}, and no single file of the "
                f"{len(window)} it was reading reproduces it under {self.root}"
            )
        path = os.path.join(self.root, found[0])
        if check_image(path, full=True) is None:
            advice = (
                "PIL decodes it, so data.validate=full would keep it: remove or re-encode the "
                "file (or train with the torchvision backend, data=imagenet)"
            )
        else:
            advice = (
                "remove the file, or run with data.validate=full (decodes every file before "
                "training and skips the unreadable ones)"
            )
        return DataError(f"DALI cannot decode {path} ({found[1]}): {advice}")


class DaliTrainLoader(_DaliLoader):
    """TrainLoader: one DALI pipeline per epoch over that epoch's order."""

    def __init__(self, split: Split, *, seed: int, **common: Any) -> None:
        super().__init__(split, **common)
        self.seed = seed
        self.steps = train_steps(len(self.files), self.world_size, self.batch_size)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps}]")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(
            len(self.files), self.world_size, self.batch_size, self.seed, self.epoch
        )
        flat = order.reshape(-1).tolist()  # rank r's row is shard r of this list
        files = [self.files[i] for i in flat]
        shard_size = self.steps * self.batch_size
        shard = files[self.rank * shard_size : (self.rank + 1) * shard_size]
        start = self.start_step
        for step, out in enumerate(self._named_failures(self._epoch(files, flat), shard)):
            if step >= start:  # resume: the first `start` batches are run and dropped
                yield _to_device(out[0], self.device)

    def _epoch(self, files: list[str], flat: list[int]) -> Iterator[Any]:
        iterator = self._iterator(
            _pipelines().train_pipeline,
            "DROP",
            files=files,
            labels=[self.labels[i] for i in flat],
            seed=_dali_seed(self.seed, self.epoch, self.rank),
            enable_conditionals=bool(self.graph.get("auto_augment")),
        )
        try:
            yield from iterator
        finally:
            del iterator  # frees the pipeline it holds


class DaliEvalLoader(_DaliLoader):
    """EvalLoader: contiguous shard of the sorted val list, padded batch trimmed (PARTIAL)."""

    def __init__(self, split: Split, **common: Any) -> None:
        super().__init__(split, **common)
        lo, hi = eval_bounds(len(self.files), self.rank, self.world_size)
        self.num_local = hi - lo
        self._current: Any = None
        self._clean = False  # DALI iterators cannot reset mid-epoch: rebuild after a break

    def __len__(self) -> int:
        return math.ceil(self.num_local / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        lo = eval_bounds(len(self.files), self.rank, self.world_size)[0]
        shard = self.files[lo : lo + self.num_local]
        for out in self._named_failures(self._pass(), shard):
            yield _to_device(out[0], self.device)
        self._clean = True

    def _pass(self) -> Iterator[Any]:
        if self._current is None or not self._clean:
            self._current = None  # free the old pipeline before building the next
            self._current = self._iterator(
                _pipelines().eval_pipeline, "PARTIAL", self.files, self.labels, seed=0
            )
        else:
            self._current.reset()
        self._clean = False
        yield from self._current


def _check_eval_settings(crop_pct: float, interpolation: str) -> None:
    if interpolation not in _pipelines().INTERPOLATIONS:
        raise DataConfigError(
            f"data.interpolation: expected one of {', '.join(_pipelines().INTERPOLATIONS)}, got "
            f"{interpolation!r}"
        )
    if not 0 < crop_pct <= 1:
        raise DataConfigError(
            f"data.crop_pct={crop_pct}: the DALI backend takes 0 < crop_pct <= 1 (above 1, "
            "torchvision's CenterCrop pads with black, which its eval graph does not reproduce)"
        )


def _eval_loader(
    split: Split,
    *,
    img_size: int,
    crop_pct: float,
    interpolation: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    **common: Any,
) -> DaliEvalLoader:
    _check_eval_settings(crop_pct, interpolation)
    graph = {"size": img_size, "crop_pct": crop_pct, "interpolation": interpolation,
             "mean": list(mean), "std": list(std)}  # fmt: skip
    return DaliEvalLoader(split, graph=graph, **common)


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
    dali: dict | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> DaliEvalLoader:
    """This rank's shard of ``split`` through the eval graph (what ``build`` uses for val; the
    eval tool calls it on a val folder it has already checked). ``dali`` as in ``build``."""
    dali = dict(dali or {})
    device = torch.device(device)
    opts = _DaliOptions(device, dali.get("device", "auto"), dali.get("threads") or workers)
    return _eval_loader(
        split,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        device=device,
        opts=opts,
        img_size=img_size,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=mean,
        std=std,
    )


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
    name: str = "imagenet_dali",
    dali: dict | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pad: int = 0,
) -> DataBundle:
    """Same keys as xvol.data.imagenet.build plus ``dali: {device: auto|gpu|cpu, threads}``
    (threads null: ``workers``). Random erasing supports timm's ``remode=const`` only."""
    del name
    if remode != "const" and reprob > 0:
        raise DataConfigError(
            f"data.remode={remode!r}: the DALI backend erases with const fill only"
        )
    _check_eval_settings(crop_pct, interpolation)
    dali = dict(dali or {})
    device = torch.device(device)
    threads = dali.get("threads") or workers
    opts = _DaliOptions(device, dali.get("device", "auto"), threads)
    train, val = load_folder(
        Path(root),
        num_classes=num_classes,
        on_bad_image=on_bad_image,
        validate=validate,
        workers=max(4, 2 * threads),
        rank=rank,
        splits=(splits[0], splits[1]),
    )
    train_graph = {
        "size": img_size,
        "interpolation": interpolation,
        "scale": list(scale),
        "ratio": list(ratio),
        "hflip": hflip,
        "color_jitter": color_jitter,
        "auto_augment": auto_augment,
        "reprob": reprob,
        "mean": list(mean),
        "std": list(std),
        "pad": pad,
    }
    train_loader = DaliTrainLoader(
        train,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        seed=seed,
        device=device,
        opts=opts,
        graph=train_graph,
    )
    val_loader = _eval_loader(
        val,
        rank=rank,
        world_size=world_size,
        batch_size=eval_batch_size or batch_size,
        device=device,
        opts=opts,
        img_size=eval_img_size or img_size,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=mean,
        std=std,
    )
    if rank == 0:
        logger.info(
            "DALI %s decode, %d threads: %d train / %d val images, %d steps per epoch",
            opts.decoder,
            opts.threads,
            len(train.samples),
            len(val.samples),
            train_loader.steps,
        )
    return DataBundle(
        train=train_loader,
        val=val_loader,
        steps_per_epoch=train_loader.steps,
        num_classes=num_classes,
        class_names=train.classes,
        num_train=len(train.samples),
        num_val=len(val.samples),
    )
