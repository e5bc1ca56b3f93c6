"""Data backends on generated JPEG trees: contract, backend agreement, exact resume, the demo
cache, bad data, configs. DALI runs on the CPU here (device_id=None)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torchvision.datasets import ImageFolder

from xvol.data import (
    DataBundle,
    DataError,
    EvalLoader,
    TrainLoader,
    dali,
    demo,
    imagenet,
    synthetic,
)
from xvol.data.fake import color_for_id, decode_color_ids, write_image_tree
from xvol.data.folder import IMAGENET_MEAN, IMAGENET_STD, epoch_order

REPO = Path(__file__).resolve().parents[1]
# class folders deliberately not in creation order: the index must follow sorted names
COUNTS = {"train": {"n10": 7, "n02": 8, "n01": 8}, "val": {"n10": 5, "n02": 4, "n01": 4}}
CPU_DALI = {"device": "cpu", "threads": 1}
AUGMENT = {"auto_augment": "rand-m9-mstd0.5", "reprob": 0.5, "color_jitter": 0.4, "hflip": 0.5}


@pytest.fixture(scope="module")
def color_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("color")
    write_image_tree(root, COUNTS, kind="color", size_range=(24, 60))
    return root


@pytest.fixture(scope="module")
def texture_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("texture")
    write_image_tree(root, COUNTS, kind="texture", size_range=(24, 60), seed=1)
    return root


def small_tree(root: Path) -> Path:
    """2 classes x (4 train, 2 val): a fresh tree a bad-data test may damage."""
    write_image_tree(
        root, {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}}, size_range=(20, 30)
    )
    return root


def build(backend: str, root: Path, **overrides) -> DataBundle:
    cfg = {
        "rank": 0,
        "world_size": 1,
        "device": "cpu",
        "seed": 0,
        "root": str(root),
        "num_classes": 3,
        "img_size": 16,
        "batch_size": 4,
        "workers": 0,
        "color_jitter": 0.0,
        "validate": "full",
        "dali": CPU_DALI,
    }
    cfg.update(overrides)
    return {"torchvision": imagenet.build, "dali": dali.build}[backend](**cfg)


def epoch_batches(loader: TrainLoader, epoch: int, start_step: int = 0) -> list:
    loader.set_epoch(epoch, start_step)
    return [(x.clone(), y.clone()) for x, y in loader]


# --- contract and backend agreement ---------------------------------------------------------


def test_class_mapping_is_imagefolder_and_bundle_is_complete(color_tree: Path) -> None:
    bundle = build("torchvision", color_tree)
    ref = ImageFolder(str(color_tree / "train"))
    assert bundle.class_names == ref.classes == ["n01", "n02", "n10"]
    assert bundle.train.loader.dataset.samples == ref.samples
    assert (bundle.num_train, bundle.num_val, bundle.num_classes) == (23, 13, 3)
    assert bundle.steps_per_epoch == len(bundle.train) == 23 // 4
    assert isinstance(bundle.train, TrainLoader) and isinstance(bundle.val, EvalLoader)


@pytest.mark.dali
def test_torchvision_and_dali_read_same_samples_in_same_order(color_tree: Path) -> None:
    pytest.importorskip("nvidia.dali")
    tv, dl = build("torchvision", color_tree), build("dali", color_tree)
    assert tv.class_names == dl.class_names
    assert (tv.num_train, tv.num_val, tv.steps_per_epoch) == (
        dl.num_train,
        dl.num_val,
        dl.steps_per_epoch,
    )
    for epoch in (0, 3):
        ids_tv = [(decode_color_ids(x), y.tolist()) for x, y in epoch_batches(tv.train, epoch)]
        ids_dl = [(decode_color_ids(x), y.tolist()) for x, y in epoch_batches(dl.train, epoch)]
        assert ids_tv == ids_dl
        assert [i for ids, _ in ids_tv for i in ids] == epoch_order(23, 1, 4, 0, epoch)[0].tolist()
    eval_tv = [i for x, _ in tv.val for i in decode_color_ids(x)]
    eval_dl = [i for x, _ in dl.val for i in decode_color_ids(x)]
    assert eval_tv == eval_dl == list(range(23, 36))
    # eval repeats exactly, also after an interrupted pass (DALI cannot reset mid-epoch)
    next(iter(dl.val))
    for _ in range(2):
        assert [i for x, _ in dl.val for i in decode_color_ids(x)] == eval_dl


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=pytest.mark.dali)])
def test_batches_have_contract_shape_dtype_and_normalization(
    backend: str, color_tree: Path
) -> None:
    bundle = build(backend, color_tree, eval_batch_size=5)
    x, y = next(iter(bundle.train))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (4,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 3
    images, labels = zip(*bundle.val)
    assert [len(lab) for lab in labels] == [5, 5, 3]  # the tail batch is kept
    val = torch.cat(images)
    # flat colours: every pixel must equal ((colour / 255) - mean) / std (JPEG error ~1/255)
    colours = torch.tensor([color_for_id(k) for k in range(23, 36)], dtype=torch.float32) / 255
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = ((colours - mean) / std)[:, :, None, None].expand_as(val)
    assert torch.allclose(val, expected, atol=0.05)


# The eval contract between backends (DALI's graph reproduces timm's eval transform; measured on
# real photos in the README): per image, the mean absolute difference of the normalized tensors
# (1 grey level = 1 / (255 * std) ~ 0.017) and the largest single difference, in grey levels.
# Inside the image only rounding differs (PIL resamples in fixed point); at crop_pct=1 the image
# border is kept, where PIL renormalizes its filter and DALI repeats the edge pixel.
PARITY_MEAN = 2e-3
PARITY_MAX_LEVELS = {0.875: 3, 1.0: 12}
# (w, h): landscape, portrait, square; odd and even crop margins, rounded both ways (Python's
# round: 8.5 -> 8, 9.5 -> 10); upscaled; the short side already at size / crop_pct (no resize
# on it); extreme aspect ratios
PARITY_SIZES = [
    (200, 120),
    (121, 300),
    (97, 160),
    (160, 97),
    (73, 73),
    (73, 140),
    (50, 30),
    (33, 61),
    (400, 90),
    (90, 380),
    (255, 256),
    (81, 83),
    (64, 64),
    (300, 299),
]


def _parity_tree(root: Path) -> Path:
    """Photo-like JPEGs (smooth colour, sharp-edged shapes, grain) of PARITY_SIZES, RGB 4:2:0,
    RGB 4:4:4 and greyscale, in one class folder."""
    rng = np.random.default_rng(3)
    folder = root / "val" / "a"
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(PARITY_SIZES):
        coarse = rng.uniform(0, 255, (5, 7, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        for _ in range(4):  # sharp edges: where resampling differences would show first
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            pixels[y0 : y0 + h // 3, x0 : x0 + w // 4] = rng.uniform(0, 255, 3)
        pixels += rng.normal(0, 6, pixels.shape)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if i % 5 == 4:
            img = img.convert("L")
        img.save(folder / f"img_{i:02d}.jpg", quality=90, subsampling=0 if i % 2 else 2)
    return root


@pytest.fixture(scope="module")
def parity_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _parity_tree(tmp_path_factory.mktemp("parity"))


def _torchvision_crop_offsets(size: int, crop_pct: float) -> set[float]:
    """The fractional parts of torchvision's centre-crop offsets over PARITY_SIZES."""
    scale = math.floor(size / crop_pct)
    out = set()
    for w, h in PARITY_SIZES:
        short, long = min(w, h), max(w, h)
        out.add(((int(scale * long / short) - size) / 2.0) % 1)
        out.add(((scale - size) / 2.0) % 1)
    return out


@pytest.mark.dali
@pytest.mark.parametrize(
    ("interpolation", "crop_pct", "size"),
    [("bicubic", 0.875, 64), ("bilinear", 0.875, 48), ("bicubic", 1.0, 56)],
)
def test_dali_eval_tensors_match_torchvision(
    parity_tree: Path, interpolation: str, crop_pct: float, size: int
) -> None:
    """timm's eval transform (shorter side to size / crop_pct, centre crop) on both backends:
    the same image gives the same tensor up to rounding, for every size and aspect ratio."""
    pytest.importorskip("nvidia.dali")
    settings = {"img_size": size, "crop_pct": crop_pct, "interpolation": interpolation}
    over = {"num_classes": 1, "eval_batch_size": 5, "splits": ("val", "val"), **settings}
    tv = torch.cat([x for x, _ in build("torchvision", parity_tree, **over).val])
    dl = torch.cat([x for x, _ in build("dali", parity_tree, **over).val])
    assert tv.shape == dl.shape == (len(PARITY_SIZES), 3, size, size)
    diff = (tv - dl).abs()
    levels = diff * 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    per_image = diff.mean(dim=(1, 2, 3))
    worst = int(per_image.argmax())
    assert per_image.max() < PARITY_MEAN, (PARITY_SIZES[worst], per_image.max())
    assert levels.max() <= PARITY_MAX_LEVELS[crop_pct] + 0.01, levels.amax(dim=(1, 2, 3))
    if crop_pct < 1:  # a crop shifted by a pixel would break these bounds; both roundings occur
        assert {0.0, 0.5} <= _torchvision_crop_offsets(size, crop_pct)


@pytest.mark.dali
def test_dali_refuses_crop_pct_above_one(color_tree: Path) -> None:
    pytest.importorskip("nvidia.dali")
    with pytest.raises(ValueError, match=r"crop_pct=1.2.*pads"):
        build("dali", color_tree, crop_pct=1.2)


@pytest.mark.dali
def test_eval_images_agree_between_backends(texture_tree: Path) -> None:
    """The tree the other tests use, 24-60 px images to 16 px: the crop keeps pixels next to the
    image border (1 of 18), where PIL and DALI treat the filter's reach past the edge apart."""
    pytest.importorskip("nvidia.dali")
    tv = torch.cat([x for x, _ in build("torchvision", texture_tree).val])
    dl = torch.cat([x for x, _ in build("dali", texture_tree).val])
    assert tv.shape == dl.shape == (13, 3, 16, 16)
    assert (tv - dl).abs().mean(dim=(1, 2, 3)).max() < 2.5 * PARITY_MEAN


def _exif_rotated(folder: Path) -> tuple[Path, Path]:
    """A 48 x 24 JPEG stored sideways with EXIF Orientation 6 (a camera turned clockwise: shown
    upright it is 24 wide, 48 tall, red above blue), and the same pixels stored upright."""
    folder.mkdir(parents=True)
    upright = Image.new("RGB", (24, 48), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 24, 24))
    upright.paste((0, 255, 0), (0, 0, 8, 8))  # a corner that tells a rotation from a flip
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # Orientation 6 undoes ROTATE_90
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated, plain = folder / "a_rotated.jpg", folder / "b_plain.jpg"
    stored.save(rotated, quality=95, exif=exif)
    upright.save(plain, quality=95)
    return rotated, plain


EXIF_EVAL = {"num_classes": 1, "splits": ("val", "val"), "crop_pct": 1.0, "batch_size": 2}


def test_torchvision_turns_exif_rotated_photos_upright(tmp_path: Path) -> None:
    """PIL ignores EXIF Orientation (DALI applies it). The PIL path now
    applies it too: the rotated file gives the tensor of the upright one."""
    _exif_rotated(tmp_path / "val" / "a")
    rotated, plain = torch.cat([x for x, _ in build("torchvision", tmp_path, **EXIF_EVAL).val])
    assert (rotated - plain).abs().max() < 0.2  # JPEG rounding; sideways differs by ~4
    assert rotated[0, :4].mean() > 1.0 > rotated[0, -4:].mean()  # red on top


@pytest.mark.dali
def test_exif_rotated_photos_agree_between_backends(tmp_path: Path) -> None:
    """The same EXIF-rotated JPEG through both backends: one orientation, the same tensor."""
    pytest.importorskip("nvidia.dali")
    _exif_rotated(tmp_path / "val" / "a")
    tv = torch.cat([x for x, _ in build("torchvision", tmp_path, **EXIF_EVAL).val])
    dl = torch.cat([x for x, _ in build("dali", tmp_path, **EXIF_EVAL).val])
    assert tv.shape == dl.shape == (2, 3, 16, 16)
    assert (tv - dl).abs().mean() < 2.5 * PARITY_MEAN
    assert (tv - dl).abs().max() < 0.5


@pytest.mark.dali
def test_both_backends_take_the_same_interpolation_names() -> None:
    """The config check (xvol.data.folder.INTERPOLATIONS) accepts what the DALI graph maps."""
    pytest.importorskip("nvidia.dali")
    from xvol.data import _dali_pipelines
    from xvol.data.folder import INTERPOLATIONS

    assert tuple(_dali_pipelines.INTERPOLATIONS) == INTERPOLATIONS


# --- determinism and exact resume ---------------------------------------------------------


def test_torchvision_resume_is_bitwise_and_worker_independent(texture_tree: Path) -> None:
    """Full epoch in-process (workers=0) vs resumed at step 2 in a worker process."""
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected_rng = torch.rand(1).item(), random.random(), np.random.rand()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    full = epoch_batches(build("torchvision", texture_tree, **AUGMENT).train, epoch=4)
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected_rng  # untouched
    resumed_loader = build("torchvision", texture_tree, workers=1, **AUGMENT).train
    resumed = epoch_batches(resumed_loader, epoch=4, start_step=2)
    assert len(full) == 5 and len(resumed) == 3 and len(resumed_loader) == 5
    for (xa, ya), (xb, yb) in zip(full[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = epoch_batches(resumed_loader, epoch=5)
    assert not torch.equal(other[0][0], full[0][0])


@pytest.mark.slow
@pytest.mark.dali
def test_dali_resume_is_bitwise(texture_tree: Path) -> None:
    pytest.importorskip("nvidia.dali")
    loader = build("dali", texture_tree, **AUGMENT).train
    full = epoch_batches(loader, epoch=2)
    again = epoch_batches(loader, epoch=2)
    resumed = epoch_batches(build("dali", texture_tree, **AUGMENT).train, epoch=2, start_step=3)
    assert len(full) == 5 and len(resumed) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_epoch_order_is_disjoint_equal_sized_and_seeded() -> None:
    table = epoch_order(103, 4, 5, seed=3, epoch=1)
    assert table.shape == (4, 25)  # 103 // (4 * 5) = 5 full batches per rank
    assert len(set(table.flatten().tolist())) == 100
    assert torch.equal(table, epoch_order(103, 4, 5, seed=3, epoch=1))
    assert not torch.equal(table, epoch_order(103, 4, 5, seed=3, epoch=2))
    with pytest.raises(DataError, match="fewer than world_size x batch_size"):
        epoch_order(7, 2, 4, seed=0, epoch=0)


def test_too_large_a_batch_says_which_key_to_lower() -> None:
    """The message names the fix, not only the arithmetic."""
    with pytest.raises(DataError, match=r"lower data\.batch_size \(per rank\) to at most 3$"):
        epoch_order(7, 2, 4, seed=0, epoch=0)


# --- demo dataset ---------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_materializes_offline_reuses_and_rebuilds(tmp_path: Path) -> None:
    root = tmp_path / "xvol" / "demo"
    start = time.perf_counter()
    demo.materialize(root)
    assert time.perf_counter() - start < 60
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 4000, "val": 1000} and manifest["num_files"] == 5000
    assert (
        sorted(os.listdir(root / "train")) == demo.CLASS_NAMES == sorted(os.listdir(root / "val"))
    )
    stamp = (root / "manifest.json").stat().st_mtime_ns
    start = time.perf_counter()
    demo.materialize(root)
    assert time.perf_counter() - start < 10
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name or ".stale-" in p.name]
    assert root.stat().st_mode & 0o777 == 0o755

    victim = next((root / "val" / "3_three").iterdir())
    victim.write_bytes(victim.read_bytes()[:100])  # truncated file: checksum mismatch
    assert not demo.cache_ok(root, 32)
    demo.materialize(root)
    assert demo.cache_ok(root, 32) and victim.stat().st_size > 100
    next((root / "train" / "0_zero").iterdir()).unlink()  # a file lost: detected (same rebuild)
    assert not demo.cache_ok(root, 32)
    demo.materialize(root)
    assert demo.cache_ok(root, 32)
    # without its manifest nothing says the folder is the demo set's (the write renames a
    # finished tree into place, so an interrupted one never lacks it): refused, kept
    (root / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"^data\.root: .* nothing was changed"):
        demo.materialize(root)
    assert len(list((root / "val").rglob("*.JPEG"))) == 1000


def _photos(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("manifest", [None, '{"source": "my own index"}', "not json"])
def test_demo_never_replaces_a_folder_it_did_not_write(
    tmp_path: Path, manifest: str | None
) -> None:
    """data=demo is the default group, so ``data.root=/my/photos`` without
    ``data=imagenet`` reached demo.materialize, which deleted the photos and wrote MNIST."""
    root = tmp_path / "photos"
    small_tree(root)
    if manifest is not None:
        (root / "manifest.json").write_text(manifest)
    before = _photos(root)
    with pytest.raises(DataError) as err:
        demo.build(rank=0, world_size=1, device="cpu", seed=0, root=str(root), num_classes=2,
                   img_size=16, batch_size=2)  # fmt: skip
    line = str(err.value)
    assert line.startswith(f"data.root: {root} holds files the demo set did not write")
    assert "pick data=imagenet" in line and "\n" not in line
    assert _photos(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temp or stale tree


def test_demo_backend_is_checked_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^data\.backend: expected one of torchvision, dali"):
        demo.build(rank=0, world_size=1, device="cpu", seed=0, root=str(tmp_path), backend="cv")


def test_demo_may_fill_an_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty folder holds nothing to lose: the demo set may be written there."""
    (tmp_path / "empty").mkdir()
    written = []
    monkeypatch.setattr(demo, "_write", lambda tmp, size: written.append(tmp) or {"splits": {}})
    demo.materialize(tmp_path / "empty")
    assert len(written) == 1 and (tmp_path / "empty").is_dir()


# --- configs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stands in for paths.data_dir ($XVOL_DATA); shared so the demo set is written once."""
    return tmp_path_factory.mktemp("xvol_data")


def compose_data(tmp_path: Path, data_dir: Path, name: str, *overrides: str):
    """Compose configs/data/<name>.yaml under a minimal primary config (paths.data_dir, seed)."""
    (tmp_path / "main.yaml").write_text(
        "defaults:\n  - data: demo\n  - _self_\n"
        f"hydra:\n  searchpath:\n    - file://{REPO / 'configs'}\n"
        f"paths:\n  data_dir: {data_dir}\nseed: 0\n"
    )
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        return compose("main", overrides=[f"data={name}", *overrides])


@pytest.mark.parametrize("name", ["imagenet", "imagenet_dali", "demo", "demo_dali", "synthetic"])
def test_every_data_config_has_the_shared_keys(tmp_path: Path, data_dir: Path, name: str) -> None:
    data = compose_data(tmp_path, data_dir, name).data
    assert data.name == name and data._partial_ is True
    for key in ("num_classes", "img_size", "batch_size", "workers"):
        assert isinstance(data[key], int), key
    if name.startswith("imagenet"):
        assert data.num_classes == 1000 and data.root == f"{data_dir}/imagenet"
    if name.startswith("demo"):
        assert data.num_classes == 10 and data.root == f"{data_dir}/demo"


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("demo", ["data.batch_size=50"]),
        pytest.param("demo_dali", ["data.batch_size=50"], marks=pytest.mark.dali),
        ("imagenet", ["data.batch_size=4", "data.num_classes=3", "data.img_size=16"]),
    ],
)
def test_configs_instantiate_into_working_bundles(
    tmp_path: Path, data_dir: Path, color_tree: Path, name: str, overrides: list[str]
) -> None:
    over = ["data.workers=0", *overrides]
    if name == "imagenet":
        over.append(f"data.root={color_tree}")
    cfg = compose_data(tmp_path, data_dir, name, *over)
    bundle = instantiate(cfg.data)(rank=0, world_size=1, device="cpu", seed=cfg.seed)
    x, y = next(iter(bundle.train))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    if name == "imagenet":
        assert x.shape == (4, 3, 16, 16) and bundle.class_names == ["n01", "n02", "n10"]
    else:
        assert (bundle.num_classes, bundle.num_train, bundle.num_val) == (10, 4000, 1000)
        assert bundle.class_names == demo.CLASS_NAMES
        assert bundle.steps_per_epoch == 80 and x.shape == (50, 3, 32, 32)
        assert sum(len(lab) for _, lab in bundle.val) == 1000


def test_synthetic_is_on_device_fixed_and_resumable() -> None:
    kw = {"rank": 0, "world_size": 2, "device": "cpu", "seed": 1, "num_classes": 7}
    a = synthetic.build(**kw, img_size=8, batch_size=3, length=4, val_length=2)
    b = synthetic.build(**kw, img_size=8, batch_size=3, length=4, val_length=2)
    x, y = next(iter(a.train))
    assert x.shape == (3, 3, 8, 8) and y.dtype == torch.int64 and int(y.max()) < 7
    assert torch.equal(x, next(iter(b.train))[0])
    assert len(list(a.train)) == 4 and len(list(a.val)) == 2 and a.num_train == 4 * 3 * 2
    a.train.set_epoch(1, start_step=3)
    assert len(list(a.train)) == 1


def test_dali_missing_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, color_tree: Path
) -> None:
    monkeypatch.delitem(sys.modules, "xvol.data._dali_pipelines", raising=False)
    monkeypatch.delattr("xvol.data._dali_pipelines", raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"pip install 'xvol\[dali\]'"):
        build("dali", color_tree)


# --- bad data -------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    """Keep the first half: the header parses, the end-of-image marker is gone."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("validate", ["full", "fast", "auto"])
def test_truncated_jpeg_is_skipped_with_one_warning(
    tmp_path: Path, validate: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = small_tree(tmp_path)
    bad = root / "train" / "a" / "img_00001.JPEG"
    truncate(bad)
    with caplog.at_level(logging.WARNING, logger="xvol.data"):
        bundle = build("torchvision", root, num_classes=2, validate=validate)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipping 1 bad file" in warnings[0].getMessage()
    assert str(bad) in warnings[0].getMessage()
    assert bundle.num_train == 7 and len(list(bundle.train)) == 1


def test_truncated_jpeg_under_error_policy_stops_before_training(tmp_path: Path) -> None:
    root = small_tree(tmp_path)
    truncate(root / "val" / "b" / "img_00011.JPEG")
    with pytest.raises(DataError, match=r"1 bad file.*img_00011\.JPEG"):
        build("torchvision", root, num_classes=2, on_bad_image="error")


def test_undetected_bad_file_is_substituted_at_runtime(tmp_path: Path) -> None:
    """validate=off: the decode failure happens mid-epoch and must not stop it."""
    root = small_tree(tmp_path)
    for f in (root / "train" / "a").iterdir():
        truncate(f)
        break
    bundle = build("torchvision", root, num_classes=2, validate="off", batch_size=2)
    batches = epoch_batches(bundle.train, 0)
    assert len(batches) == bundle.steps_per_epoch == 4
    assert bundle.train.loader.dataset.substituted == 1


def test_a_bad_val_image_is_never_replaced_by_another(tmp_path: Path) -> None:
    """Under data.validate=off a val image that fails to decode was
    replaced by another val image, which was then scored twice. The loader stops instead,
    naming the file (training images are still substituted: the test above)."""
    root = small_tree(tmp_path)
    bad = root / "val" / "b" / "img_00011.JPEG"
    bad.write_bytes(b"not a JPEG" * 20)
    bundle = build("torchvision", root, num_classes=2, validate="off", batch_size=2)
    with pytest.raises(DataError, match=rf"cannot decode val image {bad} .*never replaced"):
        list(bundle.val)
    assert bundle.val.loader.dataset.substituted == 0


@pytest.mark.dali
def test_dali_epoch_runs_over_a_tree_with_a_bad_file(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    root = small_tree(tmp_path)
    truncate(root / "train" / "b" / "img_00005.JPEG")
    (root / "val" / "a" / "notes.txt").write_text("not an image")
    bundle = build("dali", root, num_classes=2, batch_size=2)
    assert bundle.num_train == 7 and len(epoch_batches(bundle.train, 0)) == 3
    assert sum(len(y) for _, y in bundle.val) == 4


@pytest.mark.parametrize(
    "name,content", [("notes.txt", b"hello"), ("fake.JPEG", b"this is text, not a JPEG")]
)
def test_non_image_file_is_skipped_or_an_error(tmp_path: Path, name: str, content: bytes) -> None:
    root = small_tree(tmp_path)
    (root / "train" / "b" / name).write_bytes(content)
    assert build("torchvision", root, num_classes=2).num_train == 8
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        build("torchvision", root, num_classes=2, on_bad_image="error")


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = small_tree(tmp_path)
    (root / "train" / "c").mkdir()
    (root / "val" / "c").mkdir()
    with pytest.raises(DataError, match=f"empty class folder {root / 'train' / 'c'}"):
        build("torchvision", root, num_classes=3)


def test_class_with_only_bad_files_is_an_error(tmp_path: Path) -> None:
    root = small_tree(tmp_path)
    for f in (root / "val" / "b").iterdir():
        truncate(f)
    with pytest.raises(DataError, match=r"val/b.*no readable image"):
        build("torchvision", root, num_classes=2)


def test_missing_split_folder_is_an_error(tmp_path: Path) -> None:
    root = small_tree(tmp_path)
    (root / "val").rename(root / "validation")
    with pytest.raises(DataError, match=f"missing split folder {root / 'val'}"):
        build("torchvision", root, num_classes=2)


def test_train_and_val_with_different_classes_is_an_error(tmp_path: Path) -> None:
    root = small_tree(tmp_path)
    (root / "val" / "b").rename(root / "val" / "z")
    with pytest.raises(DataError, match=r"different class folders.*\['b'\].*\['z'\]"):
        build("torchvision", root, num_classes=2)


def test_num_classes_mismatch_names_both_numbers(tmp_path: Path) -> None:
    root = small_tree(tmp_path)
    with pytest.raises(DataError, match=r"num_classes=1000 but .* has 2 class folders"):
        build("torchvision", root, num_classes=1000)


# --- symlinks ------------------------------------------------------------


def test_symlink_loops_in_the_tree_are_refused_naming_the_link(tmp_path: Path) -> None:
    """torchvision's walk followed these: 16 train images became thousands, most relabelled."""
    root = small_tree(tmp_path / "data")
    (root / "train" / "a" / "loop").symlink_to(".")
    with pytest.raises(DataError, match=f"symlink {root / 'train' / 'a' / 'loop'} -> .*leads back"):
        build("torchvision", root, num_classes=2)
    (root / "train" / "a" / "loop").unlink()
    (root / "train" / "b" / "up").symlink_to("..")
    with pytest.raises(DataError, match=f"symlink {root / 'train' / 'b' / 'up'} -> "):
        build("torchvision", root, num_classes=2)
    (root / "train" / "b" / "up").unlink()
    (root / "val" / "b" / "top").symlink_to(root)  # above the split
    with pytest.raises(DataError, match="top -> .*leads back into"):
        build("torchvision", root, num_classes=2)
    (root / "val" / "b" / "top").unlink()
    (root / "train" / "b" / "other").symlink_to(root / "train" / "a")  # a second label
    with pytest.raises(DataError, match="other -> .*leads back into"):
        build("torchvision", root, num_classes=2)


def test_symlinks_to_folders_outside_the_tree_are_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Assembling a dataset from links: class folders and sub-folders elsewhere keep working."""
    pool = small_tree(tmp_path / "pool")
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "a").symlink_to(pool / split / "a")
        (root / split / "b").mkdir()
    extra = tmp_path / "extra"
    write_image_tree(extra, {"train": {"b": 3}, "val": {"b": 2}}, size_range=(20, 30))
    (root / "train" / "b" / "more").symlink_to(extra / "train" / "b")
    (root / "val" / "b" / "more").symlink_to(extra / "val" / "b")
    with caplog.at_level(logging.WARNING, logger="xvol.data"):
        bundle = build("torchvision", root, num_classes=2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (bundle.num_train, bundle.num_val) == (7, 4)
    samples = bundle.train.loader.dataset.samples
    assert samples == ImageFolder(str(root / "train")).samples  # no loop: same as torchvision
    assert [y for _, y in samples] == [0] * 4 + [1] * 3
    assert all(str(root / "train") in p for p, _ in samples)  # paths as seen in the tree
    assert len(list(bundle.train)) == 1

    loop = extra / "train" / "b" / "back"  # a loop outside the tree is refused too
    loop.symlink_to("..")
    with pytest.raises(DataError, match=f"symlink {root / 'train' / 'b' / 'more' / 'back'}.*loop"):
        build("torchvision", root, num_classes=2)
    loop.unlink()
    (root / "train" / "b" / "again").symlink_to(pool / "train" / "a")  # a second label
    with pytest.raises(DataError, match=r"same folder .* classes 'a' and 'b'"):
        build("torchvision", root, num_classes=2)


def test_a_file_reached_twice_counts_once_and_never_gets_two_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = small_tree(tmp_path / "data")
    outside = tmp_path / "outside.JPEG"
    outside.write_bytes((root / "train" / "a" / "img_00000.JPEG").read_bytes())
    (root / "train" / "a" / "copy.JPEG").symlink_to("img_00001.JPEG")
    (root / "train" / "a" / "ext1.JPEG").symlink_to(outside)
    (root / "train" / "a" / "ext2.JPEG").symlink_to(outside)
    (root / "train" / "a" / "gone.JPEG").symlink_to(tmp_path / "missing.JPEG")
    with caplog.at_level(logging.WARNING, logger="xvol.data"):
        bundle = build("torchvision", root, num_classes=2, validate="off")
    paths = [p for p, _ in bundle.train.loader.dataset.samples]
    assert bundle.num_train == 9 and str(root / "train" / "a" / "ext1.JPEG") in paths
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert "2 path(s)" in warnings[0] and "copy.JPEG (= " in warnings[0]
    assert "skipping 1 bad file" in warnings[1] and "gone.JPEG (broken symlink" in warnings[1]
    with pytest.raises(DataError, match=r"gone\.JPEG \(broken symlink"):
        build("torchvision", root, num_classes=2, on_bad_image="error")
    (root / "train" / "b" / "stolen.JPEG").symlink_to(root / "train" / "a" / "img_00002.JPEG")
    with pytest.raises(DataError, match=r"stolen\.JPEG and .*img_00002\.JPEG are the same file"):
        build("torchvision", root, num_classes=2)


@pytest.mark.dali
def test_dali_reads_through_links_outside_the_tree(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    pool = small_tree(tmp_path / "pool")
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for name in ("a", "b"):
            (root / split / name).symlink_to(pool / split / name)
    (root / "train" / "a" / "loop").symlink_to(".")  # lands in the pool: a loop out there
    with pytest.raises(DataError, match=r"a/loop -> .* is a loop"):
        build("dali", root, num_classes=2)
    (root / "train" / "a" / "loop").unlink()
    bundle = build("dali", root, num_classes=2, batch_size=2)
    assert bundle.num_train == 8 and len(epoch_batches(bundle.train, 0)) == 4
    assert sum(len(y) for _, y in bundle.val) == 4


# --- damaged JPEG data past a fast scan ---------------------------------


def damage_scan(path: Path) -> None:
    """Valid SOI, headers and EOI; the scan names Huffman tables that do not exist and its data
    is garbage. Headers parse (validate=fast passes it); every decoder fails on it. (Garbage
    data under a valid scan header alone is decoded, grey, by libjpeg and DALI's CPU decoder.)"""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    header = bytearray(data[sos : sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")])
    for i in range(header[4]):  # (component id, DC/AC table ids) pairs
        header[6 + 2 * i] = 0x33
    garbage = bytes(np.random.default_rng(0).integers(0, 0xFF, 600, dtype=np.uint8))
    path.write_bytes(data[:sos] + bytes(header) + garbage + b"\xff\xd9")


def strip_scan(path: Path) -> None:
    """Headers then EOI, no scan at all: opens in PIL, fails in every decoder."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda")] + b"\xff\xd9")


@pytest.mark.dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_decode_failure_is_one_line_naming_the_file(tmp_path: Path, split: str) -> None:
    """validate=fast (the default above 50k files) lets the file through; DALI stops on it."""
    pytest.importorskip("nvidia.dali")
    root = small_tree(tmp_path)
    bad = root / split / "b" / ("img_00006.JPEG" if split == "train" else "img_00011.JPEG")
    damage_scan(bad)
    bundle = build("dali", root, num_classes=2, batch_size=2, validate="fast")
    loader = bundle.train if split == "train" else bundle.val
    with pytest.raises(DataError) as raised:
        for _ in range(2):
            epoch_batches(loader, 0) if split == "train" else list(loader)
    message = str(raised.value)
    assert message.startswith(f"DALI cannot decode {bad} (") and "\n" not in message
    assert "data.validate=full" in message and raised.value.__cause__ is None
    if split == "val":  # the failed pass is rebuilt, not reset: it fails again the same way
        with pytest.raises(DataError, match=f"DALI cannot decode {bad}"):
            list(loader)


@pytest.mark.dali
def test_dali_decode_failure_without_a_name_from_dali_is_traced_to_the_file(
    tmp_path: Path,
) -> None:
    """A JPEG without scan data: DALI says only "nvImageCodec failure"; the loader decodes the
    in-flight batches again one by one to name it. validate=fast now catches it up front."""
    pytest.importorskip("nvidia.dali")
    root = small_tree(tmp_path)
    bad = root / "train" / "a" / "img_00002.JPEG"
    strip_scan(bad)
    bundle = build("dali", root, num_classes=2, batch_size=2, validate="off")
    with pytest.raises(DataError, match=f"^DALI cannot decode {bad} .*data.validate=full"):
        epoch_batches(bundle.train, 0)
    assert build("dali", root, num_classes=2, batch_size=2, validate="fast").num_train == 7


@pytest.mark.parametrize("workers", [0, 1])
def test_torchvision_damaged_jpeg_past_a_fast_scan(tmp_path: Path, workers: int) -> None:
    """skip: substituted, epoch complete, the file named once; error: one line naming it."""
    root = small_tree(tmp_path)
    bad = root / "train" / "a" / "img_00003.JPEG"
    damage_scan(bad)
    bundle = build("torchvision", root, num_classes=2, validate="fast", batch_size=2)
    assert bundle.num_train == 8 and len(epoch_batches(bundle.train, 0)) == 4
    bundle = build(
        "torchvision",
        root,
        num_classes=2,
        validate="fast",
        batch_size=2,
        on_bad_image="error",
        workers=workers,
    )
    with pytest.raises(DataError) as raised:
        epoch_batches(bundle.train, 0)
    message = str(raised.value)
    assert message.startswith(f"cannot decode {bad} (data.on_bad_image=error)")
    assert "\n" not in message
    with pytest.raises(DataError, match=f"1 bad file.*{bad.name}"):
        build("torchvision", root, num_classes=2, validate="full", on_bad_image="error")
