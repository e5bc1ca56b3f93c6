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
- DALI cannot skip an undecodable file mid-epoch; the up-front scan (data.validate) is what keeps
  bad files out, so keep it on (auto/fast/full) with this backend.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xvol.data.base import DataBundle
from xvol.data.folder import Split, epoch_order, eval_bounds, load_folder, train_steps

logger = logging.getLogger(__name__)

DALI_DEVICES = ("auto", "gpu", "cpu")
_INSTALL_HINT = (
    "the DALI data backend needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
    "(or pip install -e .[dali])"
)


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
            raise ValueError(f"data.dali.device must be one of {DALI_DEVICES}, got {mode!r}")
        if mode == "auto":
            mode = "gpu" if device.type == "cuda" and torch.cuda.is_available() else "cpu"
        if mode == "gpu" and not torch.cuda.is_available():
            raise ValueError("data.dali.device=gpu but CUDA is not available; use cpu or auto")
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
        iterator = self._iterator(
            _pipelines().train_pipeline,
            "DROP",
            files=[self.files[i] for i in flat],
            labels=[self.labels[i] for i in flat],
            seed=_dali_seed(self.seed, self.epoch, self.rank),
            enable_conditionals=bool(self.graph.get("auto_augment")),
        )
        start = self.start_step
        try:
            for step, out in enumerate(iterator):
                if step >= start:  # resume: the first `start` batches are run and dropped
                    yield _to_device(out[0], self.device)
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
        if self._current is None or not self._clean:
            self._current = None  # free the old pipeline before building the next
            self._current = self._iterator(
                _pipelines().eval_pipeline, "PARTIAL", self.files, self.labels, seed=0
            )
        else:
            self._current.reset()
        self._clean = False
        for out in self._current:
            yield _to_device(out[0], self.device)
        self._clean = True


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
) -> DataBundle:
    """Same keys as xvol.data.imagenet.build plus ``dali: {device: auto|gpu|cpu, threads}``
    (threads null: ``workers``). Random erasing supports timm's ``remode=const`` only."""
    del name
    pipes = _pipelines()
    if remode != "const" and reprob > 0:
        raise ValueError(f"data.remode={remode!r}: the DALI backend erases with const fill only")
    if interpolation not in pipes.INTERPOLATIONS:
        raise ValueError(
            f"data.interpolation={interpolation!r} not in {list(pipes.INTERPOLATIONS)}"
        )
    dali = dict(dali or {})
    device = torch.device(device)
    threads = dali.get("threads") or workers
    opts = _DaliOptions(device, dali.get("device", "auto"), threads)
    train, val = load_folder(
        Path(root),
        num_classes=num_classes,
        on_bad_image=on_bad_image,
        validate=validate,
        threads=max(4, 2 * threads),
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
    }
    eval_graph = {
        "size": eval_img_size or img_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
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
    val_loader = DaliEvalLoader(
        val,
        rank=rank,
        world_size=world_size,
        batch_size=eval_batch_size or batch_size,
        device=device,
        opts=opts,
        graph=eval_graph,
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
