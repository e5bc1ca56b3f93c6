"""The eval loader over any ImageNet-layout val folder, for the tools (xvol-eval, xvol-reparam).

Every image exactly once over ranks, through the data backends' eval loaders (torchvision or
DALI); the folder is scanned and its images checked once, and the loader comes with the whole
val list and its fingerprint (same images, same labels), which an eval record stores. Errors
are :class:`~xvol.data.folder.DataError`, naming the folder or file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from xvol.data.folder import (
    BAD_IMAGE_POLICIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    Split,
    eval_bounds,
    find_bad_images,
    scan_split,
)

__all__ = ["EVAL_BACKENDS", "ValData", "build_val_loader", "eval_settings", "resolve_val_dir"]

EVAL_BACKENDS = ("torchvision", "dali")

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ValData:
    """This rank's val loader plus the whole val list (file relative to val_dir, label)."""

    loader: Any
    val_dir: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    lo: int  # this rank's contiguous slice of ``samples``
    hi: int
    fingerprint: str  # sha256 over classes and (file, label): same images, same labels
    skipped: int = 0  # bad files left out (--on-bad-image skip)


def resolve_val_dir(path: str | Path) -> Path:
    """``ROOT`` holding ``val/``, or the val folder itself (``<val>/<class>/<image>``)."""
    path = Path(path).expanduser()
    if (path / "val").is_dir():
        return path / "val"
    if not path.is_dir():
        raise DataError(
            f"missing val folder {path}: expected ROOT/val/<class>/<image> or "
            "VAL/<class>/<image> (ImageNet layout)"
        )
    if (path / "train").is_dir():
        raise DataError(f"{path} has train/ but no val/ folder: pass the val folder itself")
    return path


def eval_settings(
    data_config: Mapping[str, Any],
    img_size: int | None,
    crop_pct: float | None,
    interpolation: str | None,
) -> dict[str, Any]:
    """Explicit values, else ``data_config`` (a checkpoint's training data settings), else timm's
    defaults. The normalization (mean/std) is always the training one: ImageNet's unless the
    data config set its own (CIFAR-10's, say)."""
    cfg = data_config
    return {
        "img_size": int(img_size or cfg.get("img_size") or 224),
        "crop_pct": float(crop_pct or cfg.get("crop_pct") or 0.875),
        "interpolation": str(interpolation or cfg.get("interpolation") or "bilinear"),
        "mean": list(cfg.get("mean") or IMAGENET_MEAN),
        "std": list(cfg.get("std") or IMAGENET_STD),
    }


def build_val_loader(
    val_dir: str | Path,
    *,
    num_classes: int,
    img_size: int,
    crop_pct: float,
    interpolation: str,
    batch_size: int,
    workers: int = 2,
    backend: str = "torchvision",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    validate: str = "auto",
    on_bad_image: str = "error",
) -> ValData:
    """The data backends' eval loader over one val folder (every image exactly once over ranks).

    The folder is scanned and its images checked once (``validate``: the data builders' modes).
    Files that are not readable images stop the evaluation (``on_bad_image="error"``: a score
    over a silently reduced set is not a top-1 over all images), or are left out
    (``"skip"``, with one warning; the record counts them in ``data.skipped_files``, and the
    fingerprint covers the images scored). Each bad file is named and counted once.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"--on-bad-image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    if backend not in EVAL_BACKENDS:
        raise DataError(f"unknown data backend {backend!r} (torchvision or dali)")
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise DataError(f"missing val folder {val_dir}")
    classes, samples, rejected = scan_split(val_dir, log=rank == 0)
    if len(classes) != num_classes:
        raise DataError(
            f"class count mismatch: the model predicts {num_classes} classes but {val_dir} has "
            f"{len(classes)} class folders"
        )
    paths = [p for p, _ in samples]
    bad = sorted(set(rejected + find_bad_images(paths, validate, max(4, 2 * workers))))
    if bad:
        shown = "; ".join(f"{os.path.relpath(p, val_dir)} ({why})" for p, why in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        text = f"{len(bad)} file(s) in {val_dir} are not readable images: {shown}{more}"
        if on_bad_image == "error":
            raise DataError(
                f"{text}. Remove them, or pass --on-bad-image skip to score the other images "
                "(the record counts the skipped files)"
            )
        if rank == 0:
            logger.warning("%s; skipped (--on-bad-image skip)", text)
    skip = {p for p, _ in bad}
    kept = [(p, y) for p, y in samples if p not in skip]
    missing = sorted(set(range(num_classes)) - {y for _, y in kept})
    if missing:
        raise DataError(
            f"{val_dir}: no readable image left in class folder(s) "
            f"{', '.join(classes[y] for y in missing[:5])}"
        )
    split = Split(val_dir, classes, kept)
    common = {
        "rank": rank,
        "world_size": world_size,
        "device": device,
        "batch_size": batch_size,
        "workers": workers,
        "img_size": img_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
    }
    if mean is not None:
        common["mean"] = mean
    if std is not None:
        common["std"] = std
    if backend == "torchvision":
        from xvol.data.imagenet import eval_loader

        loader = eval_loader(split, on_bad_image="error", **common)
    else:
        from xvol.data.dali import eval_loader

        loader = eval_loader(split, **common)
    rel = [(os.path.relpath(p, val_dir), y) for p, y in kept]
    digest = hashlib.sha256("\n".join(classes).encode() + b"\0")
    for file, label in rel:
        digest.update(f"{file}\t{label}\n".encode())
    lo, hi = eval_bounds(len(rel), rank, world_size)
    return ValData(loader, val_dir, classes, rel, lo, hi, digest.hexdigest(), len(bad))
