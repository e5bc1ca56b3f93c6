"""Evaluate a training or deploy checkpoint on an ImageNet-layout val folder; write one record.

Usage:
    python tools/eval.py outputs/demo --data ~/.cache/xvol/demo      # a run dir: its best.pt
    xvol-eval outputs/demo/deploy --data ~/.cache/xvol/demo --predictions preds.csv
    xvol-eval CKPT --data /imagenet --batch-size 256 --precision bf16 --device cuda --json
    xvol-eval CKPT --data photos/ --on-bad-image skip        # leave unreadable files out
    torchrun --standalone --nproc_per_node=2 tools/eval.py CKPT --data /imagenet --device cpu

CKPT is a training checkpoint (.pt: EMA weights by default when present, --no-ema for the raw
ones), a run directory (its best.pt) or a deploy checkpoint (the directory, .safetensors or .json
written by tools/reparam.py). --data is ROOT with val/ or the val folder itself (default: the
training data root stored in the checkpoint). Its class folders must be the class names stored
in the checkpoint, in order (a renamed folder shifts every label after it);
--allow-class-mismatch evaluates anyway. A file in it that is not a readable image stops the
evaluation (--on-bad-image error, the default: a top-1 over fewer images is another number);
--on-bad-image skip leaves such files out and the record counts them. The model
is rebuilt from the checkpoint's validated model spec (xvol.models.ModelSpec), never from a
``_target_`` read from the file; non-finite logits are an error. Top-1/top-5 are exact counts
over every val image (each rank evaluates a contiguous slice, rank 0 gathers all predictions);
throughput is measured on rank 0 with a random batch of --bench-batch-size images at --precision
(--bench-iters 0 skips it). The record (schema
``RECORD_SCHEMA_VERSION``, see xvol/formats/record.py and the README) goes to
RESULTS_DIR/<model>_<train|deploy>_<weights>_<backend>_<sha12>_val-<val8>.json (val8: the val
set's fingerprint): the data backend is part of its name, since the two backends are two
preprocessing implementations (equal up to rounding, see xvol/data/dali.py) and their records
coexist; so is the val set. Existing files are refused unless --force, and
nothing is written when anything fails. stdout gets one line, ``top-1 / top-5 / images`` (the
whole record with --json); a progress bar goes to stderr (rank 0).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvol.engine.checkpoint import git_revision
from xvol.engine.dist import (
    all_gather_objects,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from xvol.engine.log import setup_logging
from xvol.engine.runtime import amp_dtype
from xvol.formats.files import atomic_path
from xvol.formats.record import (
    RECORD_KIND,
    RECORD_SCHEMA_VERSION,
    predictions_sha256,
    record_name,
    validate_record,
    write_record,
)
from xvol.models import count_ops, count_params
from xvol.tools_common import (
    ToolError,
    build_val_loader,
    check_class_names,
    eval_settings,
    load_model,
    now_iso,
    refuse_existing,
    resolve_val_dir,
    setup_tool_logging,
    tool_args,
    tool_errors,
    versions,
)

log = logging.getLogger("xvol.tools.eval")

PRECISIONS = ("fp32", "bf16", "fp16")


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = amp_dtype("none" if precision == "fp32" else precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    precision: str = "fp32",
    topk: int = 5,
    channels_last: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(top-k class indices N x k, labels N) on the CPU in loader order, and the number of
    images whose logits are not all finite (their top-k would be meaningless). ``progress``:
    a tqdm bar on stderr, in batches."""
    model.eval()
    preds, labels, nonfinite = [], [], 0
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="eval", unit="batch", file=sys.stderr, dynamic_ncols=True)
    for images, target in batches:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        nonfinite += int((~torch.isfinite(logits).all(1)).sum())
        k = min(topk, logits.shape[1])
        preds.append(logits.topk(k, dim=1).indices.cpu())
        labels.append(target.cpu().to(torch.int64).view(-1))
    if not preds:
        empty = torch.zeros(0, topk, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return (*empty, 0)
    return torch.cat(preds), torch.cat(labels), nonfinite


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    *,
    batch_size: int,
    img_size: int,
    device: torch.device,
    precision: str = "fp32",
    warmup: int = 3,
    iters: int = 10,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Images per second of forward passes on a random batch (after ``warmup`` passes)."""
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model.eval()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with _autocast(device, precision):
        for _ in range(warmup):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
        elapsed = time.perf_counter() - start
    return {
        "img_s": batch_size * iters / elapsed,
        "batch_size": batch_size,
        "img_size": img_size,
        "precision": precision,
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "channels_last": channels_last,
        "warmup": warmup,
        "iters": iters,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux: the CPU model, which says more than the architecture
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def summary_line(record: dict[str, Any]) -> str:
    """``top-1 / top-5 / images``, plus what was evaluated: the line xvol-eval prints."""
    form = "deploy" if record["deploy"] else "train"
    skipped = record["data"].get("skipped_files") or 0
    return (
        f"top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  images {record['num_images']}"
        f"{f' ({skipped} skipped)' if skipped else ''}  |  {record['model']} {form} "
        f"{record['weights']} weights, {record['data']['backend']}, "
        f"{record['data']['img_size']} px"
    )


def _write_predictions(path: Path, samples: list[tuple[str, int]], preds: torch.Tensor) -> None:
    """One CSV row per val image, in val order: index, file, label, pred, correct, top5."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", "file", "label", "pred", "correct", "top5"])
            for i, ((file, label), row) in enumerate(zip(samples, preds.tolist())):
                writer.writerow(
                    [i, file, label, row[0], int(row[0] == label), " ".join(map(str, row))]
                )


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    ema: bool | None = None,
    backend: str = "torchvision",
    batch_size: int = 64,
    workers: int = 2,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    precision: str = "fp32",
    device: str = "auto",
    channels_last: bool = False,
    bench_batch_size: int | None = None,
    bench_iters: int = 10,
    bench_warmup: int = 3,
    results_dir: str | Path | None = "results",
    record_file: str | None = None,
    predictions: str | Path | None = None,
    force: bool = False,
    validate: str = "auto",
    allow_class_mismatch: bool = False,
    on_bad_image: str = "error",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint``; write the record (rank 0) unless ``results_dir`` is None.

    The val folder's classes must be the checkpoint's class names in order (ToolError otherwise,
    unless ``allow_class_mismatch``). ``on_bad_image``: ``error`` or ``skip`` for val files that
    are not readable images. ``progress``: a progress bar on stderr (rank 0 only).

    Works in one process or under torchrun (the process group is set up here when the launcher's
    variables are present, gloo on CPU, and torn down again). Returns the record on every rank.
    """
    if precision not in PRECISIONS:
        raise ToolError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    already = torch.distributed.is_available() and torch.distributed.is_initialized()
    denv, dev = setup_distributed(device)
    rank, world_size = denv.rank, denv.world_size
    if world_size > 1:
        setup_logging(rank)  # rank 0 speaks, the others only warn
    try:
        pred_path = Path(predictions) if predictions is not None else None
        if pred_path is not None:
            refuse_existing([pred_path], force, "predictions file")
        loaded = load_model(checkpoint, ema)
        identity = loaded.identity
        settings = eval_settings(loaded, img_size, crop_pct, interpolation)
        form = "deploy" if loaded.deploy else "train"
        if data is None:
            root = loaded.data_config.get("root")
            if not root:
                raise ToolError(
                    f"{loaded.path}: no data root stored in the checkpoint; pass --data"
                )
            data = root
        val_dir = resolve_val_dir(data)
        val = build_val_loader(
            val_dir,
            num_classes=loaded.num_classes,
            batch_size=batch_size,
            workers=workers,
            backend=backend,
            rank=rank,
            world_size=world_size,
            device=dev,
            validate=validate,
            on_bad_image=on_bad_image,
            **settings,
        )
        name = record_file or record_name(
            identity["model"], form, loaded.weights, backend, loaded.sha256, val.fingerprint
        )
        record_path = Path(results_dir) / name if results_dir is not None else None
        if record_path is not None:  # before the evaluation, and again before the write
            refuse_existing([record_path], force, "record")
        names_match = check_class_names(
            loaded.class_names, val.classes, loaded.path, val_dir, allow_class_mismatch
        )
        # Counted on the CPU before the move: on CUDA the X-volution forms may run Triton
        # kernels, which FlopCounterMode cannot see.
        ops = count_ops(loaded.model.cpu(), settings["img_size"])
        n_params = count_params(loaded.model)
        model = loaded.model.to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        start = time.perf_counter()
        preds, labels, nonfinite = predict(
            model,
            val.loader,
            device=dev,
            precision=precision,
            channels_last=channels_last,
            progress=progress and rank == 0,
        )
        if preds.shape[0] != val.hi - val.lo:
            raise ToolError(
                f"rank {rank}: the loader gave {preds.shape[0]} images, expected {val.hi - val.lo}"
            )
        gathered = all_gather_objects((preds.tolist(), labels.tolist(), nonfinite))
        seconds = time.perf_counter() - start
        bad = sum(n for _, _, n in gathered)  # every rank raises alike, none waits for another
        if bad:
            raise ToolError(
                f"{loaded.path}: non-finite (NaN/Inf) logits for {bad} of {len(val.samples)} val "
                f"images at --precision {precision} (NaN/Inf weights, or overflow?): no score"
            )
        all_preds = torch.tensor([row for p, _, _ in gathered for row in p], dtype=torch.int64)
        all_labels = [y for _, ys, _ in gathered for y in ys]
        expected = [y for _, y in val.samples]
        if all_labels != expected:  # the gathered order must be the val list's order
            raise ToolError(f"{val_dir}: gathered labels do not follow the val folder's order")
        n = len(expected)
        target = torch.tensor(expected, dtype=torch.int64)
        top1_correct = int((all_preds[:, 0] == target).sum())
        top5_correct = int((all_preds == target[:, None]).any(dim=1).sum())

        throughput: dict[str, Any] = {"img_s": None, "batch_size": bench_batch_size or batch_size}
        if bench_iters > 0 and rank == 0:
            throughput = measure_throughput(
                model,
                batch_size=bench_batch_size or batch_size,
                img_size=settings["img_size"],
                device=dev,
                precision=precision,
                warmup=bench_warmup,
                iters=bench_iters,
                channels_last=channels_last,
            )
        top1_list = all_preds[:, 0].tolist()
        record: dict[str, Any] = {
            "schema_version": RECORD_SCHEMA_VERSION,
            "kind": RECORD_KIND,
            **identity,
            "deploy": loaded.deploy,
            "weights": loaded.weights,
            "checkpoint": {
                "path": str(Path(loaded.path).resolve()),
                "sha256": loaded.sha256,
                "source_sha256": loaded.source.get("sha256", loaded.sha256),
                "epoch": loaded.source.get("epoch"),
                "global_step": loaded.source.get("global_step"),
            },
            "model_spec": loaded.spec.to_dict(),
            "seed": loaded.source.get("seed"),
            "recipe": loaded.source.get("recipe"),
            "top1": 100.0 * top1_correct / n,
            "top5": 100.0 * top5_correct / n,
            "top1_correct": top1_correct,
            "top5_correct": top5_correct,
            "num_images": n,
            "num_classes": loaded.num_classes,
            "params": n_params,
            "gmacs": ops["macs"] / 1e9,
            "gmuls": ops["muls"] / 1e9,
            "predictions_sha256": predictions_sha256(top1_list),
            "predictions_file": str(pred_path.resolve()) if pred_path is not None else None,
            "data": {
                "val_dir": str(val_dir.resolve()),
                "backend": backend,
                "fingerprint": val.fingerprint,
                "skipped_files": val.skipped,
                "class_names_match": names_match,  # None: the checkpoint stores no names
                **settings,
            },
            "throughput": throughput,
            "eval": {
                "batch_size": batch_size,
                "precision": precision,
                "device": str(dev),
                "world_size": world_size,
                "seconds": seconds,
            },
            "versions": versions(),
            "git": git_revision(),
            "date": now_iso(),
        }
        validate_record(record, record_path or "record")  # the writer keeps the schema it promises
        if rank == 0:
            if pred_path is not None:
                _write_predictions(pred_path, val.samples, all_preds)
            if record_path is not None:
                refuse_existing([record_path], force, "record")
                write_record(record_path, record)
                record["record_file"] = str(record_path)
        barrier()
        return record
    finally:
        if not already:
            cleanup_distributed()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol-eval",
        description=(
            "Top-1/top-5 over every image of an ImageNet-layout val folder plus inference "
            "throughput, for a training checkpoint (.pt or its run directory) or a deploy "
            "checkpoint (from xvol-reparam). Writes one JSON record to --results-dir and prints "
            "a top-1 / top-5 / images line (the record with --json)."
        ),
        epilog=(
            "examples:\n"
            "  xvol-eval outputs/demo --data ~/.cache/xvol/demo\n"
            "  xvol-eval outputs/demo/deploy --data ~/.cache/xvol/demo --predictions p.csv\n"
            "  xvol-eval run/best.pt --data /imagenet --batch-size 256 --precision bf16 "
            "--device cuda\n"
            "  torchrun --standalone --nproc_per_node=2 tools/eval.py run/best.pt --data "
            "/imagenet --device cpu"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[tool_args(ema=True, img_size=True, force=True)],
    )
    parser.add_argument(
        "checkpoint", help="training .pt, run dir (its best.pt), deploy dir/.safetensors/.json"
    )
    parser.add_argument(
        "--data", help="ROOT with val/, or the val folder (default: the checkpoint's data root)"
    )
    parser.add_argument("--backend", choices=("torchvision", "dali"), default="torchvision")
    parser.add_argument("--batch-size", type=int, default=64, help="eval batch size per rank")
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--crop-pct", type=float, help="default: the checkpoint's crop_pct")
    parser.add_argument("--interpolation", help="default: the checkpoint's interpolation")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bench-batch-size", type=int, help="throughput batch (default: eval's)")
    parser.add_argument("--bench-iters", type=int, default=10, help="0 skips throughput")
    parser.add_argument("--bench-warmup", type=int, default=3)
    parser.add_argument("--results-dir", default="results", help="where the record goes")
    parser.add_argument("--record-name", help="record file name (default: derived, see above)")
    parser.add_argument("--no-record", action="store_true", help="print only, write no record")
    parser.add_argument("--predictions", help="also write per-image predictions (CSV) here")
    parser.add_argument(
        "--validate",
        choices=("auto", "full", "fast", "off"),
        default="auto",
        help="up-front image check of the data builders (auto: full decode up to 50k files)",
    )
    parser.add_argument(
        "--on-bad-image",
        choices=("error", "skip"),
        default="error",
        help="a val file that is not a readable image: stop (error) or leave it out (skip; the "
        "record counts it)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the whole record instead of the summary line"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--allow-class-mismatch",
        action="store_true",
        help="evaluate even when the val class folders differ from the checkpoint's class names",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    with tool_errors("xvol-eval", args.debug):
        record = evaluate_checkpoint(
            args.checkpoint,
            data=args.data,
            ema=args.ema,
            backend=args.backend,
            batch_size=args.batch_size,
            workers=args.workers,
            img_size=args.img_size,
            crop_pct=args.crop_pct,
            interpolation=args.interpolation,
            precision=args.precision,
            device=args.device,
            channels_last=args.channels_last,
            bench_batch_size=args.bench_batch_size,
            bench_iters=args.bench_iters,
            bench_warmup=args.bench_warmup,
            results_dir=None if args.no_record else args.results_dir,
            record_file=args.record_name,
            predictions=args.predictions,
            force=args.force,
            validate=args.validate,
            allow_class_mismatch=args.allow_class_mismatch,
            on_bad_image=args.on_bad_image,
            progress=not args.no_progress,
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(record, indent=2) if args.json else summary_line(record))
        if not args.json and record.get("record_file"):
            log.info("record: %s", record["record_file"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
