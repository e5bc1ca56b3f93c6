"""Images per second of the training input pipeline: torchvision vs DALI-CPU (and DALI-GPU when
CUDA is present) vs the in-memory backend, per worker / thread count, for training batches
(RandomResizedCrop for the folder backends, CIFAR's pad-crop + flip in memory).

Usage:
    python scripts/bench_data.py                          # ~300 generated 500x375 JPEGs
    python scripts/bench_data.py --root /data/imagenet --num-images 5000 --workers 4 8 16
    python scripts/bench_data.py --backends torchvision --workers 1 2 4 --epochs 3
    python scripts/bench_data.py --root ~/.cache/xvol/cifar10 --img-size 32 --batch-size 512 \
        --num-images 50000 --backends memory torchvision --model resnet18 --cifar-stem
            # a CIFAR-10 epoch: loader img/s against a training step's img/s on the device

``--model NAME``: also time training steps of timm model NAME (random batches already on the
device, autocast bf16 on CUDA, SGD) at the same batch and size, and print each loader's img/s
over the model's: above 1 the epoch is model-bound, below 1 loader-bound. The in-memory backend
decodes once (its build time is reported apart) and then only cuts batches on the device.

Without --root it writes ImageNet-sized JPEGs (500x375, photo-like grain, ~ImageNet file sizes)
to a temporary folder. With --root, the first --num-images train files (by class order) are used
through a symlinked subset, so the numbers are about decoding real files. Prints a table and
writes bench_results/bench_data.json (one record: environment, settings, rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from xvol.data import dali, imagenet, memory
from xvol.data.fake import write_image_tree
from xvol.data.folder import scan_split


def make_tree(dest: Path, root: str | None, num_images: int, classes: int) -> Path:
    """A train/val tree of about num_images train JPEGs (val: one per class; unused here)."""
    if root is None:
        per_class = max(1, num_images // classes)
        names = [f"n{c:08d}" for c in range(classes)]
        counts = {"train": dict.fromkeys(names, per_class), "val": dict.fromkeys(names, 1)}
        write_image_tree(dest, counts, kind="photo", size=(500, 375), quality=90)
        return dest
    classes_found, samples, _ = scan_split(Path(root) / "train")
    first_of_class: dict[str, str] = {}
    for path, label in samples[:num_images]:
        name = classes_found[label]
        link = dest / "train" / name / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
        first_of_class.setdefault(name, path)
    for name, first in first_of_class.items():  # one val image per class keeps the layout valid
        (dest / "val" / name).mkdir(parents=True, exist_ok=True)
        (dest / "val" / name / Path(first).name).symlink_to(first)
    return dest


def time_train(bundle, epochs: int) -> tuple[float, int]:
    """Seconds and images after the first batch (worker start / pipeline warm-up excluded)."""
    images, start = 0, None
    for epoch in range(epochs):
        bundle.train.set_epoch(epoch)
        for x, _ in bundle.train:
            if start is None:
                if x.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                continue
            images += x.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - (start or time.perf_counter()), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="ImageNet-layout tree to read (default: generate JPEGs)")
    parser.add_argument("--num-images", type=int, default=288)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["torchvision", "dali-cpu", "dali-gpu"],
        choices=["torchvision", "dali-cpu", "dali-gpu", "memory"],
        help="dali-gpu is skipped without CUDA",
    )
    parser.add_argument("--model", help="timm model whose training img/s the loaders face")
    parser.add_argument("--cifar-stem", action="store_true", help="--model with stem='cifar'")
    parser.add_argument("--out", default="bench_results/bench_data.json")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="xvol-bench-data-") as tmp:
        start = time.perf_counter()
        tree = make_tree(Path(tmp), args.root, args.num_images, args.classes)
        print(
            f"data: {tree} ({'generated' if args.root is None else args.root}), "
            f"{time.perf_counter() - start:.1f}s to prepare"
        )
        for backend in args.backends:
            if backend == "dali-gpu" and not cuda:
                continue
            for workers in args.workers:
                cfg = {
                    "rank": 0,
                    "world_size": 1,
                    "device": device,
                    "seed": 0,
                    "root": str(tree),
                    "num_classes": len(os.listdir(tree / "train")),
                    "img_size": args.img_size,
                    "batch_size": args.batch_size,
                    "workers": workers,
                    "validate": "off",
                }
                built = time.perf_counter()
                if backend == "torchvision":
                    bundle = imagenet.build(**cfg)
                elif backend == "memory":
                    bundle = memory.build(**cfg)
                else:
                    dali_device = backend.removeprefix("dali-")
                    bundle = dali.build(**cfg, dali={"device": dali_device, "threads": workers})
                build_s = time.perf_counter() - built
                seconds, images = time_train(bundle, args.epochs)
                del bundle
                row = {
                    "backend": backend,
                    "workers_or_threads": workers,
                    "batch_size": args.batch_size,
                    "img_size": args.img_size,
                    "images": images,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
                    "build_s": round(build_s, 2),
                }
                rows.append(row)
                print(f"  {backend:<12} x{workers:<3} {row['images_per_s']} img/s")
        model_img_s = None
        if args.model:  # while the tree exists: its class count sizes the head
            model_img_s = model_images_per_s(args, device, len(os.listdir(tree / "train")))
            print(f"  model {args.model}{' (cifar stem)' if args.cifar_stem else ''}: "
                  f"{model_img_s:.1f} img/s (training step)")  # fmt: skip
    header = (f"| {'backend':<12} | workers/threads | {'img/s':>8} | {'ms/batch':>8} | build s |"
              f" loader/model |")  # fmt: skip
    print("\n" + header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        ms = 1000 * r["seconds"] / max(1, r["images"] // r["batch_size"])
        vs = r["images_per_s"] / model_img_s if model_img_s and r["images_per_s"] else None
        r["loader_over_model"] = round(vs, 2) if vs else None
        print(
            f"| {r['backend']:<12} | {r['workers_or_threads']:>15} | "
            f"{r['images_per_s']:>8} | {ms:>8.1f} | {r['build_s']:>7} | "
            f"{'-' if vs is None else f'{vs:.2f}':>12} |"
        )
    record = {
        "bench": "bench_data",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "dali": _dali_version(),
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "gpu": torch.cuda.get_device_name() if cuda else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"data": "generated 500x375 JPEG" if args.root is None else args.root},
        "rows": rows,
        "model_images_per_s": model_img_s,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")


def model_images_per_s(args: argparse.Namespace, device: str, num_classes: int) -> float:
    """Training steps per second x batch of timm model ``args.model`` on random device batches
    (best of 3 rounds of 5 steps after 3 warm-up steps)."""
    import timm
    import torch.nn.functional as F

    import xvol.models  # noqa: F401  (registers xresnet*, the stem option)

    kwargs = {"stem": "cifar"} if args.cifar_stem else {}
    model = timm.create_model(args.model, num_classes=num_classes, **kwargs).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(num_classes, (args.batch_size,), device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            with amp:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    steps(3)
    return 5 * args.batch_size / min(steps(5) for _ in range(3))


def _dali_version() -> str | None:
    try:
        import nvidia.dali
    except ImportError:
        return None
    return nvidia.dali.__version__


if __name__ == "__main__":
    main()
