"""The in-memory backend (xvol/data/memory.py): decoded once, CIFAR augmentation on the device,
the loader contract (shapes, exact resume, disjoint shards, every val image once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xvol.data import folder, memory
from xvol.data.folder import DataError

COUNTS = {"train": {"cat": 9, "ant": 8}, "val": {"cat": 3, "ant": 4}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 px JPEGs (one 40 px, resized at decode); PNG-exact pixels are not needed here."""
    root = tmp_path_factory.mktemp("memtree")
    rng = np.random.default_rng(0)
    for split, classes in COUNTS.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                size = 40 if (split, name, i) == ("train", "ant", 0) else 32
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.jpg", quality=95)
    return root


def _build(tree: Path, **kw) -> memory.DataBundle:
    cfg = dict(rank=0, world_size=1, device="cpu", seed=0, root=str(tree), num_classes=2,
               img_size=32, batch_size=4, workers=2, validate="full")  # fmt: skip
    cfg.update(kw)
    return memory.build(**cfg)


def _epoch(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_bundle_shapes_classes_and_normalization(tree: Path) -> None:
    bundle = _build(tree)
    assert bundle.class_names == ["ant", "cat"] and bundle.num_classes == 2
    assert (bundle.num_train, bundle.num_val, bundle.steps_per_epoch) == (17, 7, 4)
    batches = _epoch(bundle.train, 0)
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the eval view: the decoded image, normalized with CIFAR's mean/std
    x, y = next(iter(bundle.val))
    path = sorted((tree / "val" / "ant").iterdir())[0]
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    mean = torch.tensor(memory.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(memory.CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], (pixels / 255.0 - mean) / std)
    assert y[0] == 0


def test_augment_is_pad_crop_and_flip() -> None:
    """The batched gather equals the per-sample definition (torchvision's RandomCrop with
    padding=4, then a mirror) for every offset and flip."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4], [0, 8], [7, 1]])
    flips = torch.tensor([False, True, True, False, True, False])
    got = memory.augment(images, offsets, flips, pad=4, size=8)
    for i in range(6):
        padded = F.pad(images[i], (4, 4, 4, 4))
        r, c = offsets[i].tolist()
        crop = padded[:, r : r + 8, c : c + 8]
        expected = crop.flip(-1) if flips[i] else crop
        assert torch.equal(got[i], expected), i


def test_resume_mid_epoch_is_exact_and_epochs_differ(tree: Path) -> None:
    loader = _build(tree).train
    full = _epoch(loader, 1)
    resumed = _epoch(loader, 1, start=2)
    assert len(resumed) == 2
    for (a, la), (b, lb) in zip(full[2:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    other = _epoch(loader, 2)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(full, other, strict=True))
    again = _epoch(_build(tree).train, 1)  # a new process would draw the same
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full, again, strict=True))


def test_ranks_get_disjoint_shards_and_every_val_image_once(tree: Path) -> None:
    bundles = [_build(tree, rank=r, world_size=2, batch_size=2) for r in range(2)]
    assert {b.steps_per_epoch for b in bundles} == {4}
    # train: the two ranks' label streams come from disjoint index sets (epoch_order)
    seen = [torch.cat([y for _, y in _epoch(b.train, 0)]) for b in bundles]
    assert all(len(s) == 8 for s in seen)
    val = [torch.cat([x.flatten(1) for x, _ in b.val]) for b in bundles]
    assert sum(len(v) for v in val) == 7
    merged = torch.cat(val)
    assert len({tuple(row[:16].tolist()) for row in merged}) == 7  # no image twice
    assert sum(b.val.__len__() for b in bundles) == 4


def test_too_large_for_memory_is_refused_naming_the_other_backends(tree: Path) -> None:
    with pytest.raises(DataError, match="data.backend=torchvision or dali") as err:
        _build(tree, max_gib=1e-6)
    assert str(tree) in str(err.value)


def test_an_undecodable_file_is_named(tmp_path: Path, tree: Path) -> None:
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(tree, root)
    bad = root / "train" / "cat" / "000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the fast scan can miss it
    with pytest.raises(DataError, match="000.jpg.*data.validate=full"):
        _build(root, validate="off")


def _jpegs(tree: Path) -> list[str]:
    return sorted(str(p) for p in tree.rglob("*.jpg"))


@pytest.fixture
def in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """folder.map_chunks takes its worker-process path on these small trees (min_items=0,
    3-item chunks), for the decode and for the bad-file scan."""
    real = folder.map_chunks

    def forced(fn, items, workers):
        return real(fn, items, workers, chunk=3, min_items=0)

    monkeypatch.setattr(folder, "map_chunks", forced)
    monkeypatch.setattr(memory, "map_chunks", forced)


@pytest.mark.parametrize("workers", [1, 2])
def test_decoding_in_worker_processes_matches_decoding_here(tree: Path, request, workers):
    """The worker-process path yields every chunk in order: the pixels equal an in-process
    decode, image for image."""
    paths = _jpegs(tree)
    here = memory.decode_all(paths, 32, workers=1)
    request.getfixturevalue("in_workers")
    assert torch.equal(memory.decode_all(paths, 32, workers=workers), here)
    assert here.shape == (len(paths), 3, 32, 32) and here.float().std() > 50  # noise, not zeros


def test_an_undecodable_file_in_a_worker_is_one_line_naming_it(tmp_path, tree, in_workers):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(tree, root)
    bad = root / "val" / "cat" / "001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as err:
        memory.decode_all(_jpegs(root), 32, workers=2)
    message = str(err.value)
    assert "001.jpg" in message and "\n" not in message and "Traceback" not in message


def test_the_bad_file_scan_in_workers_finds_what_the_scan_here_finds(tmp_path, tree, request):
    import shutil

    root = tmp_path / "scan"
    shutil.copytree(tree, root)
    (root / "train" / "ant" / "002.jpg").write_bytes(b"not a jpeg")
    truncated = root / "val" / "ant" / "000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    paths = _jpegs(root)
    here = folder.find_bad_images(paths, "full", workers=1)
    assert [Path(p).relative_to(root).as_posix() for p, _ in here] == [
        "train/ant/002.jpg", "val/ant/000.jpg"]  # fmt: skip
    request.getfixturevalue("in_workers")
    assert folder.find_bad_images(paths, "full", workers=2) == here


# --- data=cifar10: one config, three backends ------------------------------------------------


def _cifar(tree: Path, backend: str, **kw) -> memory.DataBundle:
    from xvol.data import cifar10

    cfg = dict(name="cifar10", root=str(tree), num_classes=2, img_size=32, eval_img_size=None,
               batch_size=4, eval_batch_size=None, workers=0, pad=4, hflip=0.5,
               mean=list(memory.CIFAR10_MEAN), std=list(memory.CIFAR10_STD), crop_pct=1.0,
               interpolation="bilinear", on_bad_image="skip", validate="full",
               splits=["train", "val"], dali={"device": "cpu", "threads": 1})  # fmt: skip
    cfg.update(kw)
    return cifar10.build(rank=0, world_size=1, device="cpu", seed=0, backend=backend, **cfg)


def _padded_fraction(x: torch.Tensor) -> float:
    """Share of pixels that are the zero padding (0 before CIFAR's normalization)."""
    mean = torch.tensor(memory.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(memory.CIFAR10_STD).view(1, 3, 1, 1)
    return float(((x + mean / std).abs() < 1e-4).all(1).float().mean())


@pytest.mark.parametrize(
    "backend", ["memory", "torchvision", pytest.param("dali", marks=pytest.mark.dali)]
)
def test_cifar10_backends_share_the_augmentation_and_the_eval_view(tree: Path, backend) -> None:
    """Each backend pads and crops (some zero-padding pixels, never more than a 4-pixel band
    can hold) and scores the same normalized eval tensors as the in-memory backend."""
    bundle = _cifar(tree, backend)
    bundle.train.set_epoch(0)
    batches = [x for x, _ in bundle.train]
    assert all(x.shape == (4, 3, 32, 32) for x in batches)
    frac = _padded_fraction(torch.cat(batches))
    assert 0.02 < frac < 1 - (24 / 32) ** 2, frac
    reference = torch.cat([x for x, _ in _cifar(tree, "memory").val])
    got = torch.cat([x for x, _ in bundle.val])
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)


def test_cifar10_unknown_backend_names_the_key(tree: Path) -> None:
    from xvol.data.folder import DataConfigError

    with pytest.raises(DataConfigError, match="data.backend"):
        _cifar(tree, "pillow")


def test_cifar10_config_composes_into_the_memory_backend(tmp_path: Path, tree: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import xvol.config  # noqa: F401  (resolvers and schemas)

    repo = Path(__file__).resolve().parents[1]
    with initialize_config_dir(str(repo / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cifar10", f"data.root={tree}",
                                          "data.num_classes=2", "data.batch_size=4",
                                          "data.workers=0"])  # fmt: skip
    assert cfg.data.name == "cifar10" and cfg.data.backend == "memory" and cfg.model.stem == "cifar"
    assert list(cfg.data.mean) == pytest.approx(memory.CIFAR10_MEAN)
    bundle = instantiate(cfg.data)(rank=0, world_size=1, device="cpu", seed=0)
    assert isinstance(bundle.train, memory.MemoryTrainLoader) and bundle.num_val == 7
