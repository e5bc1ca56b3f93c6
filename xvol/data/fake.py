"""Generated ImageNet-layout JPEG trees, for tests and scripts/bench_data.py when no data is given.

``kind="color"`` makes every image one flat colour that encodes a unique id. Crops, flips and
resizes keep a flat image flat, so ``decode_color_ids`` recovers which file a (train-augmented)
sample came from: tests use it to check sample order and sharding for any backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from xvol.data.folder import IMAGENET_MEAN, IMAGENET_STD

_BASE, _STEP, _PER_ROW = 24, 16, 13  # colour grid: 13 x 13 = 169 ids, 16 levels apart
MAX_COLOR_IDS = _PER_ROW * _PER_ROW


def color_for_id(k: int) -> tuple[int, int, int]:
    if not 0 <= k < MAX_COLOR_IDS:
        raise ValueError(f"colour ids run from 0 to {MAX_COLOR_IDS - 1}, got {k}")
    return _BASE + _STEP * (k // _PER_ROW), _BASE + _STEP * (k % _PER_ROW), 200


def decode_color_ids(images: Tensor) -> list[int]:
    """Ids of normalized N x 3 x H x W batches of ``kind="color"`` images."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((images * std + mean) * 255).mean(dim=(2, 3)).cpu()
    row = ((rgb[:, 0] - _BASE) / _STEP).round().long()
    col = ((rgb[:, 1] - _BASE) / _STEP).round().long()
    return (row * _PER_ROW + col).tolist()


def _pixels(kind: str, k: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "color":
        return np.full((h, w, 3), color_for_id(k), np.uint8)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), np.float32)
    if kind == "photo":  # fine grain, so JPEG sizes and decode times resemble real photos
        smooth = smooth + rng.normal(0.0, 12.0, smooth.shape)
    return np.clip(smooth, 0, 255).astype(np.uint8)


def write_image_tree(
    root: str | Path,
    counts: Mapping[str, Mapping[str, int]],
    *,
    kind: str = "texture",
    size: tuple[int, int] | None = None,
    size_range: tuple[int, int] = (40, 90),
    seed: int = 0,
    quality: int = 90,
) -> list[Path]:
    """Write ``counts[split][class]`` JPEGs under ``root/split/class/``; returns the files.

    kind: color (flat, id-encoding; ids run over splits then sorted classes), texture (smooth),
    photo (smooth + grain). size (w, h) fixes the size, else each side is drawn from size_range.
    """
    if kind not in ("color", "texture", "photo"):
        raise ValueError(f"kind must be color, texture or photo, got {kind!r}")
    rng = np.random.default_rng(seed)
    files, k = [], 0
    for split, per_class in counts.items():
        for cls in sorted(per_class):
            folder = Path(root) / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(per_class[cls]):
                w, h = size or tuple(
                    int(v) for v in rng.integers(*size_range, size=2, endpoint=True)
                )
                path = folder / f"img_{k:05d}.JPEG"
                Image.fromarray(_pixels(kind, k, w, h, rng)).save(path, quality=quality)
                files.append(path)
                k += 1
    return files
