"""ImageNet-layout folders: scan, bad-file policy and sample order, shared by the torchvision and
DALI backends so that both read the same samples, with the same labels, in the same order.

Layout: ``<root>/<split>/<class>/<image>``; class index = position in the sorted folder names,
exactly as torchvision's ``ImageFolder``, whose walk scan_split mirrors except at symlinks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]

BAD_IMAGE_POLICIES = ("skip", "error")
VALIDATE_MODES = ("auto", "full", "fast", "off")
# resampling filters both backends offer (timm's names; xvol.data._dali_pipelines maps them)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
# validate=auto decodes every file up to this many (the demo set, CI trees: seconds); beyond it
# (ImageNet: 1.33M files, a full decode is ~an hour of CPU) it only parses headers and checks the
# JPEG end marker, decoding just the files that lack it, which catches truncation at I/O cost.
AUTO_FULL_LIMIT = 50_000
_WARN_FIRST = 5


class DataError(RuntimeError):
    """A data problem found while building loaders, before any training step runs."""


class DataConfigError(DataError, ValueError):
    """A data setting a backend cannot honour; the message starts with the ``data.`` key."""


def open_rgb(path: str) -> Image.Image:
    """The decoded RGB image at ``path``, upright: EXIF orientation applied.

    DALI's decoders apply the EXIF Orientation tag (``adjust_orientation``, on by default) and
    PIL does not, so a photo taken with the camera turned (Orientation 6 or 8) reached the model
    turned by 90 degrees under torchvision and upright under DALI. Every PIL path of xvol reads
    through here, so both backends see the same pixels.
    """
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")  # convert() decodes now


@dataclass
class Split:
    """One split of an ImageNet-layout tree after the scan and the bad-file policy."""

    path: Path
    classes: list[str]
    samples: list[tuple[str, int]]


def scan_split(
    path: Path, *, log: bool = True
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Classes, image files (path, label) and rejected files (path, reason).

    Classes, labels and sample order are torchvision ImageFolder's. Its walk follows every
    symlink, so ``<class>/loop -> .`` multiplies a class and ``<class>/up -> ..`` files the whole
    split again under one label. This walk follows a link only where it cannot do that:

    - a folder link is followed when it leads outside the split (``train/n01 -> /pool/n01``, the
      usual way to assemble a dataset). One leading into the split, to a folder above it, or to a
      folder above itself (a loop) is refused with a DataError naming the link, and so is a
      folder reached from two classes (its images would get two labels);
    - a file is counted once by its real path: reached again in the same class (a file link, a
      second folder link) it is dropped, with one warning when ``log``; in another class it is a
      DataError;
    - a broken link is rejected like a non-image file.

    Structural problems (no split folder, no class folder, a class folder without any image
    file) raise DataError naming the path: they would change the label space or the class count.
    """
    if not path.is_dir():
        raise DataError(
            f"missing split folder {path}: expected <root>/train/<class>/*.JPEG and "
            "<root>/val/<class>/*.JPEG (ImageNet layout)"
        )
    walk = _SplitWalk(path)
    if log and walk.duplicates:
        logger.warning(
            "%d path(s) under %s reach files already counted (symlinks); each file is counted "
            "once: %s%s",
            len(walk.duplicates),
            path,
            "; ".join(f"{p} (= {first})" for p, first in walk.duplicates[:_WARN_FIRST]),
            "; ..." if len(walk.duplicates) > _WARN_FIRST else "",
        )
    _check_no_empty_class(path, walk.classes, walk.samples, "holds no image file")
    return walk.classes, walk.samples, walk.rejected


def _is_image_name(name: str) -> bool:
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _SplitWalk:
    """The walk of one split (see scan_split). Real paths are derived from the parent's, and
    resolved only at symlinks, so a plain 1.3M-file tree costs no extra system call per file."""

    def __init__(self, split: Path) -> None:
        self.split = str(split)
        self.split_real = os.path.realpath(split)
        self.rejected: list[tuple[str, str]] = []
        self.duplicates: list[tuple[str, str]] = []  # (path dropped, path counted)
        self.folders: dict[str, tuple[int, str]] = {}  # real path -> (label, path walked)
        # class folders exactly as torchvision's find_classes (links to folders included)
        self.classes = [e.name for e in self._entries(self.split) if e.is_dir()]
        if not self.classes:
            raise DataError(f"no class folders in {split}: expected {split}/<class>/<image>")
        listing: list[tuple[str, list[str], int]] = []
        file_links: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(self.split, name)
            real = (
                self._follow(folder, self.split_real)
                if os.path.islink(folder)
                else os.path.join(self.split_real, name)
            )
            self._walk(folder, real, label, listing, file_links)
        listing.sort(key=lambda item: item[0])  # torchvision: sorted(os.walk(...))
        dropped = self._dedupe_file_links(file_links)
        self.samples = [
            (os.path.join(folder, name), label)
            for folder, names, label in listing
            for name in names
            if not dropped or os.path.join(folder, name) not in dropped
        ]

    @staticmethod
    def _entries(folder: str) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list {folder}: {e}") from e

    def _follow(self, link: str, parent_real: str) -> str:
        """Real path of a folder link, or DataError if following it would loop or relabel."""
        target = os.path.realpath(link)
        if _inside(target, self.split_real) or _inside(self.split_real, target):
            raise DataError(
                f"symlink {link} -> {target} leads back into {self.split} (a loop, or the same "
                "images under a second label): folder links must lead outside the split; "
                "remove the link"
            )
        if _inside(parent_real, target):
            raise DataError(
                f"symlink {link} -> {target} is a loop (it points at a folder that holds it): "
                "remove the link"
            )
        return target

    def _walk(
        self,
        folder: str,
        real: str,
        label: int,
        listing: list[tuple[str, list[str], int]],
        file_links: list[tuple[str, int]],
    ) -> None:
        known = self.folders.get(real)
        if known is not None:
            first_label, first = known
            if first_label != label:
                raise DataError(
                    f"{folder} and {first} are the same folder ({real}) in classes "
                    f"{self.classes[first_label]!r} and {self.classes[label]!r}: its images "
                    "would get two labels; remove one of the symlinks"
                )
            self.duplicates.append((folder + os.sep, first + os.sep))
            return
        self.folders[real] = (label, folder)
        names = []
        for entry in self._entries(folder):
            path = os.path.join(folder, entry.name)
            if entry.is_dir():  # follows links
                sub_real = (
                    self._follow(path, real)
                    if entry.is_symlink()
                    else os.path.join(real, entry.name)
                )
                self._walk(path, sub_real, label, listing, file_links)
            elif not _is_image_name(entry.name):
                if not entry.name.startswith("."):  # hidden files (.DS_Store) are not data
                    self.rejected.append((path, "not an image file extension"))
            elif entry.is_symlink() and not os.path.exists(path):
                self.rejected.append((path, f"broken symlink -> {os.readlink(path)}"))
            else:
                if entry.is_symlink():
                    file_links.append((path, label))
                names.append(entry.name)
        listing.append((folder, names, label))

    def _dedupe_file_links(self, file_links: list[tuple[str, int]]) -> set[str]:
        """Links to files counted elsewhere: dropped if in the same class, else DataError."""
        dropped: set[str] = set()
        first_link: dict[str, tuple[str, int]] = {}
        for path, label in file_links:
            real = os.path.realpath(path)
            real_dir, name = os.path.split(real)
            if real_dir in self.folders and _is_image_name(name):
                first_label, first_dir = self.folders[real_dir]
                first = (os.path.join(first_dir, name), first_label)
            else:
                first = first_link.setdefault(real, (path, label))
                if first[0] == path:
                    continue
            if first[1] != label:
                raise DataError(
                    f"{path} and {first[0]} are the same file ({real}) in classes "
                    f"{self.classes[first[1]]!r} and {self.classes[label]!r}: one image cannot "
                    "have two labels; remove one of them"
                )
            dropped.add(path)
            self.duplicates.append((path, first[0]))
        return dropped


def _check_no_empty_class(
    path: Path, classes: list[str], samples: Sequence[tuple[str, int]], what: str
) -> None:
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(
            f"empty class folder {path / empty[0]}: {len(empty)} class folder(s) {what} "
            f"({', '.join(empty[:_WARN_FIRST])}{', ...' if len(empty) > _WARN_FIRST else ''})"
        )


def check_image(path: str, full: bool) -> str | None:
    """None if the file is a readable image, else the reason.

    ``full`` decodes every pixel. Otherwise only the header is parsed and, for JPEGs, the file
    must hold a scan and end with the end-of-image marker (truncated downloads lose it); files
    lacking the marker are decoded to decide, so JPEGs with trailing bytes are not rejected by
    mistake. Damage inside the compressed data passes ``fast`` (and libjpeg, hence ``full``,
    tolerates much of it); the DALI loaders name such a file when their decoder fails on it.
    """
    try:
        with Image.open(path) as im:
            if full:
                im.load()
                return None
            is_jpeg = im.format == "JPEG"
            if is_jpeg and not im.tile:  # headers then EOI: PIL opens it, decoders fail
                return "JPEG without image data (no start-of-scan marker)"
        if is_jpeg and not _ends_with_jpeg_eoi(path):
            with Image.open(path) as im:
                im.load()
    except Exception as e:  # any decoder failure is a bad file, whatever PIL raises
        return f"{type(e).__name__}: {e}"
    return None


def _ends_with_jpeg_eoi(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))
        return b"\xff\xd9" in f.read()


def _check_chunk(chunk: list[str], full: bool) -> list[tuple[str, str]]:
    return [(p, r) for p in chunk if (r := check_image(p, full)) is not None]


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, fn: Callable, items: Sequence, size: int) -> None:
        self.fn, self.items, self.size = fn, items, size

    def __len__(self) -> int:
        return -(-len(self.items) // self.size)

    def __getitem__(self, i: int):
        return self.fn(list(self.items[i * self.size : (i + 1) * self.size]))


def _as_is(chunk_result):
    return chunk_result


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def map_chunks(
    fn: Callable, items: Sequence, workers: int, chunk: int = 256, min_items: int = 4096
) -> Iterator:
    """``fn`` of each ``chunk``-long slice of ``items``, in order, in ``workers`` processes.

    Why processes (a DataLoader's workers) rather than threads: checking or decoding a small
    image is mostly Python and PIL bookkeeping that holds the GIL, so threads ran slower than one
    (measured: CIFAR-10's 60,000 32 px JPEGs). Fewer than ``min_items`` items, or ``workers`` <= 1,
    run in this process, where a worker start would cost more than it saves; more workers than
    this process's cores are not started. ``fn`` should return its failures rather than raise
    them, so the caller's error stays one line.
    """
    workers = min(workers, usable_cores(), -(-len(items) // chunk))
    if workers <= 1 or len(items) < min_items:
        for i in range(0, len(items), chunk):
            yield fn(list(items[i : i + chunk]))
        return
    loader = torch.utils.data.DataLoader(
        _Chunks(fn, items, chunk), batch_size=None, num_workers=workers, collate_fn=_as_is,
        prefetch_factor=4,
    )  # fmt: skip
    yield from loader


def find_bad_images(paths: Sequence[str], mode: str, workers: int) -> list[tuple[str, str]]:
    """(path, reason) of unreadable files, identical on every rank.

    Under an initialized process group each rank checks 1/world of the files and the lists are
    gathered over a gloo group (whatever the main backend), so the scan time shrinks with ranks.
    """
    if mode not in VALIDATE_MODES:
        raise DataConfigError(
            f"data.validate: expected one of {', '.join(VALIDATE_MODES)}, got {mode!r}"
        )
    if mode == "off" or not paths:
        return []
    full = mode == "full" or (mode == "auto" and len(paths) <= AUTO_FULL_LIMIT)
    dist = torch.distributed
    group = None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo")
        mine = list(paths[dist.get_rank() :: dist.get_world_size()])
    else:
        mine = list(paths)
    check = functools.partial(_check_chunk, full=full)
    bad = [item for part in map_chunks(check, mine, workers) for item in part]
    if group is not None:
        gathered: list[list[tuple[str, str]] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, bad, group=group)
        dist.destroy_process_group(group)
        bad = [item for part in gathered for item in (part or [])]
    return sorted(bad)


def load_folder(
    root: str | Path,
    *,
    num_classes: int,
    on_bad_image: str,
    validate: str,
    workers: int,
    rank: int,
    splits: tuple[str, str] = ("train", "val"),
) -> tuple[Split, Split]:
    """Scan train and val, check them against each other and ``num_classes``, apply the policy.

    Why an up-front scan rather than only try/except in the loader: DALI cannot skip a file it
    fails to decode (the pipeline dies mid-epoch), and a sample dropped at runtime would leave
    ranks with different batch counts. The torchvision loader still substitutes a deterministic
    other sample if a file slips past a ``fast``/``off`` scan, so it never stops mid-epoch.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataConfigError(
            f"data.on_bad_image: expected one of {', '.join(BAD_IMAGE_POLICIES)}, got "
            f"{on_bad_image!r}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (set data.root or $XVOL_DATA)")
    scanned = {s: scan_split(root / s, log=rank == 0) for s in splits}
    (train_classes, _, _), (val_classes, _, _) = scanned[splits[0]], scanned[splits[1]]
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"{root / splits[0]} and {root / splits[1]} have different class folders "
            f"({len(train_classes)} vs {len(val_classes)}); only in {splits[0]}: "
            f"{only_train[:_WARN_FIRST]}, only in {splits[1]}: {only_val[:_WARN_FIRST]}"
        )
    if len(train_classes) != num_classes:
        raise DataError(
            f"data.num_classes={num_classes} but {root / splits[0]} has {len(train_classes)} "
            "class folders; set data.num_classes to match the data"
        )
    all_images = [p for s in splits for p, _ in scanned[s][1]]
    rejected = [r for s in splits for r in scanned[s][2]]
    bad = rejected + find_bad_images(all_images, validate, workers)
    if bad:
        listing = "; ".join(f"{p} ({why})" for p, why in bad[:_WARN_FIRST])
        if on_bad_image == "error":
            raise DataError(
                f"{len(bad)} bad file(s) under {root} (data.on_bad_image=error): {listing}"
            )
        if rank == 0:
            logger.warning(
                "skipping %d bad file(s) under %s (data.on_bad_image=skip): %s%s",
                len(bad),
                root,
                listing,
                "; ..." if len(bad) > _WARN_FIRST else "",
            )
    skip = {p for p, _ in bad}
    out = []
    for s in splits:
        classes, samples, _ = scanned[s]
        kept = [(p, y) for p, y in samples if p not in skip]
        _check_no_empty_class(root / s, classes, kept, "hold no readable image")
        out.append(Split(root / s, classes, kept))
    return out[0], out[1]


def train_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches per rank per epoch (the tail of each permutation is dropped)."""
    steps = num_samples // (world_size * batch_size)
    if steps == 0:
        fits = num_samples // world_size
        fix = (
            f"lower data.batch_size (per rank) to at most {fits}"
            if fits
            else "use fewer ranks, or more training images"
        )
        raise DataError(
            f"{num_samples} training images are fewer than world_size x batch_size = "
            f"{world_size} x {batch_size}: no full batch per rank; {fix}"
        )
    return steps


def epoch_order(
    num_samples: int, world_size: int, batch_size: int, seed: int, epoch: int
) -> torch.Tensor:
    """Sample indices of epoch ``epoch`` as a (world_size, steps * batch_size) table, row = rank.

    A permutation from a generator seeded with seed + epoch (as DistributedSampler), truncated to
    whole batches on every rank and dealt out strided (rank r gets positions r, r + world, ...).
    """
    steps = train_steps(num_samples, world_size, batch_size)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(num_samples, generator=g)[: steps * world_size * batch_size]
    return perm.view(-1, world_size).t().contiguous()


def eval_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous val slice of a rank: DALI's own shard formula, so both backends agree."""
    if num_samples < world_size:
        raise DataError(
            f"{num_samples} val images cannot be split over {world_size} ranks: use at most "
            f"{num_samples} ranks, or more val images"
        )
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one sample of one epoch."""
    words = np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (CPU) RNGs for one sample.

    timm transforms draw from all three (RandomResizedCrop: random; RandAugment: numpy; random
    erasing: torch). In the main process (workers=0) the caller's streams are restored afterwards;
    worker processes own theirs, so they skip the save/restore (~0.1 ms a sample).
    """
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # torch.manual_seed would also seed CUDA: slower
    try:
        yield
    finally:
        if restore:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
