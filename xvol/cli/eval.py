"""Evaluate a training or deploy checkpoint on an ImageNet-layout val folder; write one record.

Usage:
    python tools/eval.py outputs/demo --data ~/.cache/xvol/demo      # a run dir: its best.pt
    xvol-eval outputs/demo/deploy --data ~/.cache/xvol/demo --predictions preds.csv
    xvol-eval CKPT --data /imagenet --batch-size 256 --precision bf16 --device cuda --json --bench
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
with --bench, throughput is measured on rank 0 with a random batch of --bench-batch-size images at
--precision (off by default: it takes seconds to minutes on a CPU; the record's
throughput.img_s is then null). The record (schema
``RECORD_SCHEMA_VERSION``, see xvol/formats/record.py and the README) goes to
RESULTS_DIR/<model>_<train|deploy>_<weights>_<backend>_<sha12>_val-<val8>_<size>px-crop<crop>-
<interpolation>.json (val8: the val set's fingerprint): the data backend is part of its name,
since the two backends are two preprocessing implementations (equal up to rounding, see
xvol/data/dali.py) and their records coexist; so are the val set and the eval transform (one
checkpoint at 64 and at 224 px: two records). Existing files are refused unless --force, and
nothing is written when anything fails. stdout gets one line, ``top-1 / top-5 / images`` (the
whole record with --json); a progress bar goes to stderr (rank 0).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvol.checks import (
    BOOL,
    DEVICE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    check_fields,
    one_of,
    option,
)
from xvol.cli.common import (
    CheckpointToolOptions,
    ToolError,
    add_options,
    now_iso,
    options_from_args,
    refuse_existing,
    setup_tool_logging,
    tool_args,
    tool_errors,
    versions,
)
from xvol.data.folder import BAD_IMAGE_POLICIES, INTERPOLATIONS, VALIDATE_MODES
from xvol.data.val import EVAL_BACKENDS, ValData, build_val_loader, eval_settings, resolve_val_dir
from xvol.engine.dist import (
    all_gather_objects,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from xvol.engine.log import setup_logging
from xvol.engine.loop import evaluate
from xvol.engine.runtime import amp_dtype, autocast
from xvol.formats.files import atomic_path
from xvol.formats.load import check_class_names, load_model
from xvol.formats.provenance import git_revision
from xvol.formats.record import (
    RECORD_KIND,
    RECORD_SCHEMA_VERSION,
    eval_transform_tag,
    predictions_sha256,
    record_name,
    validate_record,
    write_record,
)
from xvol.models import count_ops, count_params

log = logging.getLogger("xvol.tools.eval")

PRECISIONS = ("fp32", "bf16", "fp16")


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

    with autocast(device, amp_dtype(precision, device)):
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


@dataclasses.dataclass
class EvalOptions(CheckpointToolOptions):
    """What to evaluate and how: xvol-eval's options, each declared once here; the command's
    flags are derived from these fields (xvol.cli.common.add_options: default, type, choices,
    help), and making an EvalOptions checks every value, naming the flag.

    ``ema``, ``img_size`` and ``force`` are the fields the checkpoint tools share
    (xvol.cli.common.CheckpointToolOptions); ``results_dir`` None writes no record
    (--no-record); ``progress`` shows a bar on stderr (rank 0 only; --no-progress turns off
    the command's).
    """

    data: str | Path | None = option(
        None, help="ROOT with val/, or the val folder (default: the checkpoint's data root)"
    )
    backend: str = option("torchvision", one_of(*EVAL_BACKENDS), help="data backend")
    batch_size: int = option(64, POSITIVE_INT, help="eval batch size per rank")
    workers: int = option(2, NON_NEGATIVE_INT, help="loader workers per rank")
    crop_pct: float | None = option(
        None, POSITIVE_NUMBER, help="center crop fraction (default: the checkpoint's crop_pct)"
    )
    interpolation: str | None = option(
        None, one_of(*INTERPOLATIONS), help="default: the checkpoint's interpolation"
    )
    precision: str = option("fp32", one_of(*PRECISIONS), help="autocast precision of the eval")
    device: str = option("auto", DEVICE, help="auto (GPU if present), cpu, cuda, cuda:N")
    channels_last: bool = option(False, BOOL, help="channels_last memory format")
    bench: bool = option(
        False,
        BOOL,
        help="also measure inference throughput on rank 0 (a random batch of --bench-batch-size "
        "images at --precision; seconds to minutes on a CPU); without it the record's "
        "throughput.img_s is null",
    )
    bench_batch_size: int | None = option(
        None, POSITIVE_INT, help="throughput batch with --bench (default: --batch-size)"
    )
    bench_iters: int = option(
        10, NON_NEGATIVE_INT, help="timed forward passes with --bench (0: none)"
    )
    bench_warmup: int = option(3, NON_NEGATIVE_INT, help="untimed passes before them")
    results_dir: str | Path | None = option("results", help="where the record goes")
    record_file: str | None = None
    predictions: str | Path | None = option(
        None, help="also write per-image predictions (CSV) here"
    )
    validate: str = option(
        "auto",
        one_of(*VALIDATE_MODES),
        help="up-front image check of the data builders (auto: full decode up to 50k files)",
    )
    allow_class_mismatch: bool = option(
        False,
        BOOL,
        help="evaluate even when the val class folders differ from the checkpoint's class names",
    )
    on_bad_image: str = option(
        "error",
        one_of(*BAD_IMAGE_POLICIES),
        help="a val file that is not a readable image: stop (error) or leave it out (skip; the "
        "record counts it)",
    )
    progress: bool = False

    def __post_init__(self) -> None:
        check_fields(self, None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalOptions:
        """The options of a parsed xvol-eval command line (:func:`build_parser`)."""
        return options_from_args(
            cls,
            args,
            results_dir=None if args.no_record else args.results_dir,
            record_file=args.record_name,
            progress=not args.no_progress,
        )


@dataclasses.dataclass
class _Scores:
    """Every val image's top-k predictions (val order) and the exact counts over them."""

    preds: torch.Tensor  # N x k
    top1_correct: int
    top5_correct: int
    seconds: float


def _score(
    model: nn.Module,
    val: ValData,
    opts: EvalOptions,
    *,
    device: torch.device,
    rank: int,
    source: Path,
) -> _Scores:
    """The engine's evaluation loop on this rank's slice, then every rank's predictions gathered
    (rank 0 writes them) and checked to follow the val list's order; non-finite logits on any
    rank are a ToolError on every rank."""
    loader = val.loader
    if opts.progress and rank == 0:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", unit="batch", file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    result = evaluate(
        model,
        loader,
        device=device,
        amp_dtype=amp_dtype(opts.precision, device),
        channels_last=opts.channels_last,
        predictions=True,
    )
    assert result.topk is not None and result.labels is not None
    if result.topk.shape[0] != val.hi - val.lo:
        raise ToolError(
            f"rank {rank}: the loader gave {result.topk.shape[0]} images, expected "
            f"{val.hi - val.lo}"
        )
    gathered = all_gather_objects((result.topk.tolist(), result.labels.tolist()))
    seconds = time.perf_counter() - start
    if result.nonfinite:  # summed over ranks: every rank raises alike, none waits for another
        raise ToolError(
            f"{source}: non-finite (NaN/Inf) logits for {result.nonfinite} of "
            f"{len(val.samples)} val images at --precision {opts.precision} (NaN/Inf weights, or "
            "overflow?): no score"
        )
    preds = torch.tensor([row for p, _ in gathered for row in p], dtype=torch.int64)
    if [y for _, ys in gathered for y in ys] != [y for _, y in val.samples]:
        raise ToolError(f"{val.val_dir}: gathered labels do not follow the val folder's order")
    return _Scores(preds, result.top1_correct, result.top5_correct, seconds)


def evaluate_checkpoint(checkpoint: str | Path, opts: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint``; write the record (rank 0) unless ``opts.results_dir`` is None.

    The val folder's classes must be the checkpoint's class names in order (ToolError otherwise,
    unless ``allow_class_mismatch``). ``on_bad_image``: ``error`` or ``skip`` for val files that
    are not readable images.

    Works in one process or under torchrun (the process group is set up here when the launcher's
    variables are present, gloo on CPU, and torn down again). Returns the record on every rank.
    """
    opts = opts if opts is not None else EvalOptions()
    already = torch.distributed.is_available() and torch.distributed.is_initialized()
    denv, dev = setup_distributed(opts.device)
    rank, world_size = denv.rank, denv.world_size
    if world_size > 1:
        setup_logging(rank)  # rank 0 speaks, the others only warn
    try:
        pred_path = Path(opts.predictions) if opts.predictions is not None else None
        if pred_path is not None:
            refuse_existing([pred_path], opts.force, "predictions file")
        loaded = load_model(checkpoint, opts.ema)
        identity = loaded.identity
        settings = eval_settings(
            loaded.data_config, opts.img_size, opts.crop_pct, opts.interpolation
        )
        form = "deploy" if loaded.deploy else "train"
        data = opts.data
        if data is None:
            data = loaded.data_config.get("root")
            if not data:
                raise ToolError(
                    f"{loaded.path}: no data root stored in the checkpoint; pass --data"
                )
        val_dir = resolve_val_dir(data)
        val = build_val_loader(
            val_dir,
            num_classes=loaded.num_classes,
            batch_size=opts.batch_size,
            workers=opts.workers,
            backend=opts.backend,
            rank=rank,
            world_size=world_size,
            device=dev,
            validate=opts.validate,
            on_bad_image=opts.on_bad_image,
            **settings,
        )
        name = opts.record_file or record_name(
            identity["model"],
            form,
            loaded.weights,
            opts.backend,
            loaded.sha256,
            val.fingerprint,
            eval_transform_tag(
                settings["img_size"], settings["crop_pct"], settings["interpolation"]
            ),
        )
        record_path = Path(opts.results_dir) / name if opts.results_dir is not None else None
        if record_path is not None:  # before the evaluation, and again before the write
            refuse_existing([record_path], opts.force, "record")
        names_match = check_class_names(
            loaded.class_names, val.classes, loaded.path, val_dir, opts.allow_class_mismatch
        )
        # Counted on the CPU before the move: on CUDA the X-volution forms may run Triton
        # kernels, which FlopCounterMode cannot see.
        ops = count_ops(loaded.model.cpu(), settings["img_size"])
        n_params = count_params(loaded.model)
        model = loaded.model.to(dev)
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        scores = _score(model, val, opts, device=dev, rank=rank, source=loaded.path)
        n = len(val.samples)
        bench_batch = opts.bench_batch_size or opts.batch_size
        throughput: dict[str, Any] = {"img_s": None, "batch_size": bench_batch}
        if opts.bench and opts.bench_iters > 0 and rank == 0:
            throughput = measure_throughput(
                model,
                batch_size=bench_batch,
                img_size=settings["img_size"],
                device=dev,
                precision=opts.precision,
                warmup=opts.bench_warmup,
                iters=opts.bench_iters,
                channels_last=opts.channels_last,
            )
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
            "top1": 100.0 * scores.top1_correct / n,
            "top5": 100.0 * scores.top5_correct / n,
            "top1_correct": scores.top1_correct,
            "top5_correct": scores.top5_correct,
            "num_images": n,
            "num_classes": loaded.num_classes,
            "params": n_params,
            "gmacs": ops["macs"] / 1e9,
            "gmuls": ops["muls"] / 1e9,
            "predictions_sha256": predictions_sha256(scores.preds[:, 0].tolist()),
            "predictions_file": str(pred_path.resolve()) if pred_path is not None else None,
            "data": {
                "val_dir": str(val_dir.resolve()),
                "backend": opts.backend,
                "fingerprint": val.fingerprint,
                "skipped_files": val.skipped,
                "class_names_match": names_match,  # None: the checkpoint stores no names
                **settings,
            },
            "throughput": throughput,
            "eval": {
                "batch_size": opts.batch_size,
                "precision": opts.precision,
                "device": str(dev),
                "world_size": world_size,
                "seconds": scores.seconds,
            },
            "versions": versions(),
            "git": git_revision(),
            "date": now_iso(),
        }
        validate_record(record, record_path or "record")  # on every rank: all fail alike
        if rank == 0:
            if pred_path is not None:
                _write_predictions(pred_path, val.samples, scores.preds)
            if record_path is not None:
                refuse_existing([record_path], opts.force, "record")
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
            "Top-1/top-5 over every image of an ImageNet-layout val folder (plus inference "
            "throughput with --bench), for a training checkpoint (.pt or its run directory) or "
            "a deploy checkpoint (from xvol-reparam). Writes one JSON record to --results-dir "
            "and prints a top-1 / top-5 / images line (the record with --json)."
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
        parents=[tool_args()],
    )
    parser.add_argument(
        "checkpoint", help="training .pt, run dir (its best.pt), deploy dir/.safetensors/.json"
    )
    add_options(parser, EvalOptions)
    parser.add_argument("--record-name", help="record file name (default: derived, see above)")
    parser.add_argument("--no-record", action="store_true", help="print only, write no record")
    parser.add_argument(
        "--json", action="store_true", help="print the whole record instead of the summary line"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    with tool_errors("xvol-eval", args.debug):
        record = evaluate_checkpoint(args.checkpoint, EvalOptions.from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(record, indent=2) if args.json else summary_line(record))
        if not args.json and record.get("record_file"):
            log.info("record: %s", record["record_file"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
