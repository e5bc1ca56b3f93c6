"""Re-parameterize a training checkpoint into its deploy form, verified before anything is written.

Usage:
    python tools/reparam.py outputs/demo/best.pt --out outputs/demo/deploy
    xvol-reparam outputs/demo/best.pt --out outputs/demo/deploy --data ~/.cache/xvol/demo
    xvol-reparam CKPT --out DIR --no-ema --atol 1e-4 --force

Steps: read the model config stored in CKPT as a validated ``xvol.models.ModelSpec`` (nothing
named by a ``_target_`` in the file is imported or called), build it, load the EMA weights (the
default when the checkpoint has them; --no-ema for the raw weights) strictly,
``reparameterize_model()``, then run both forms in eval mode on a random batch (and, with --data,
on real val images): every logit must be finite and the max |logit difference| <= --atol; top-1
agreement is reported. Only then are DIR/deploy.safetensors and its sidecar DIR/deploy.json
written (temp file + os.replace each, the sidecar last, with the model spec, the class names and
an integrity hash over them and the weights); existing outputs are refused unless --force.
Prints one JSON record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvol.checks import (
    INT,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    TORCH_DEVICE,
    check_fields,
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
from xvol.data.val import build_val_loader, eval_settings, resolve_val_dir
from xvol.formats.deploy import DEPLOY_SIDECAR, DEPLOY_WEIGHTS, write_deploy_checkpoint
from xvol.formats.load import count_reparameterizable, load_train_checkpoint
from xvol.formats.provenance import git_revision
from xvol.models import count_params, model_summary
from xvol.reparam import reparameterize_model

log = logging.getLogger("xvol.tools.reparam")


@torch.no_grad()
def compare_forms(
    train_model: nn.Module, deploy_model: nn.Module, batches: Iterable[torch.Tensor]
) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement of the two forms, both in eval mode.

    Images whose logits are not all finite in either form are counted apart (``nonfinite_*``)
    and left out of the maxima: ``max(0.0, nan)`` is 0.0, so a NaN must never reach them.
    """
    train_model.eval()
    deploy_model.eval()
    max_diff, max_logit, agree, count = 0.0, 0.0, 0, 0
    nonfinite_train, nonfinite_deploy = 0, 0
    device = next(train_model.parameters()).device
    for images in batches:
        images = images.to(device)
        a, b = train_model(images).float(), deploy_model(images).float()
        bad_a, bad_b = ~torch.isfinite(a).all(1), ~torch.isfinite(b).all(1)
        nonfinite_train += int(bad_a.sum())
        nonfinite_deploy += int(bad_b.sum())
        ok = ~(bad_a | bad_b)
        if ok.any():
            max_diff = max(max_diff, (a[ok] - b[ok]).abs().max().item())
            max_logit = max(max_logit, a[ok].abs().max().item())
        agree += int((a.argmax(1) == b.argmax(1))[ok].sum())
        count += images.shape[0]
    return {
        "num_images": count,
        "max_abs_diff": max_diff,
        "max_abs_logit": max_logit,
        "agreement": agree / max(count, 1),
        "nonfinite_train": nonfinite_train,
        "nonfinite_deploy": nonfinite_deploy,
    }


def _check_finite(path: Path, checks: dict[str, dict[str, Any] | None]) -> None:
    """A non-finite logit in either form fails verification (NaN/Inf weights or statistics)."""
    for name, check in checks.items():
        if check is None:
            continue
        for form in ("train", "deploy"):
            bad = check[f"nonfinite_{form}"]
            if bad:
                what = "training" if form == "train" else "deploy"
                raise ToolError(
                    f"{path}: verification failed: the {what} form gives non-finite (NaN/Inf) "
                    f"logits for {bad} of {check['num_images']} {name} images (NaN/Inf in the "
                    "weights or BN statistics?); nothing written"
                )


def _val_images(loader: Iterable, limit: int) -> Iterator[torch.Tensor]:
    seen = 0
    for images, _ in loader:
        yield images[: limit - seen]
        seen += images.shape[0]
        if seen >= limit:
            return


@dataclasses.dataclass
class ReparamOptions(CheckpointToolOptions):
    """xvol-reparam's options, each declared once here: the command's flags are derived from
    these fields (xvol.cli.common.add_options), and making one checks every value, naming the
    flag. ``ema``, ``img_size`` and ``force`` come from CheckpointToolOptions, which the
    checkpoint tools share."""

    data: str | Path | None = option(
        None, help="also verify on real val images: ROOT with val/, or the val folder itself"
    )
    atol: float = option(1e-3, POSITIVE_NUMBER, help="max |logit difference| allowed")
    verify_batch: int = option(8, POSITIVE_INT, help="random verification batch")
    verify_images: int = option(256, POSITIVE_INT, help="val images for --data")
    workers: int = option(0, NON_NEGATIVE_INT)  # loader workers for --data (no flag)
    seed: int = option(0, INT)  # of the random verification batch (no flag)
    device: str = option("cpu", TORCH_DEVICE, help="where to verify: cpu, cuda, cuda:N")

    def __post_init__(self) -> None:
        check_fields(self, None)


def reparam_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    opts: ReparamOptions | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Deploy weights + sidecar for ``checkpoint`` in ``out``; returns the sidecar record.

    ``opts`` (or its fields as keywords: ``ema=False``, ``data=...``) say how.

    ``device``: where both forms run for verification ("cpu", "cuda", "cuda:1", ...), in fp32
    with TF32 off (a TF32 convolution alone differs by more than the default ``atol``).

    Raises (and writes nothing) when the checkpoint is unusable, the outputs exist (without
    ``force``), or the two forms differ by more than ``atol`` on any verification input.
    """
    opts = opts if opts is not None else ReparamOptions(**options)
    ema, data, force, atol = opts.ema, opts.data, opts.force, opts.atol
    verify_batch, verify_images, img_size = opts.verify_batch, opts.verify_images, opts.img_size
    workers, seed, device = opts.workers, opts.seed, opts.device
    out = Path(out)
    weights_path, sidecar_path = out / DEPLOY_WEIGHTS, out / DEPLOY_SIDECAR
    if out.exists() and not out.is_dir():
        raise ToolError(f"--out {out} exists and is not a directory")
    refuse_existing([weights_path, sidecar_path], force, "deploy checkpoint")

    loaded = load_train_checkpoint(checkpoint, ema)
    model = loaded.model.float().cpu().eval()
    settings = eval_settings(loaded.data_config, img_size, None, None)
    size = settings["img_size"]
    n_swapped = count_reparameterizable(model)
    if n_swapped == 0:
        log.warning(
            "%s: no re-parameterizable module (a baseline?): deploy = same network", loaded.path
        )
    deploy = reparameterize_model(model)
    log.info("%s: %s weights, %d modules re-parameterized", loaded.path, loaded.weights, n_swapped)
    run_on = _device(device)
    model, deploy = model.to(run_on), deploy.to(run_on)

    gen = torch.Generator().manual_seed(seed)
    random_batch = torch.randn(verify_batch, 3, size, size, generator=gen)
    verification: dict[str, Any] = {
        "atol": atol,
        "device": str(run_on),
        "random": compare_forms(model, deploy, [random_batch]),
        "data": None,
    }
    if data is not None:
        val_dir = resolve_val_dir(data)
        val = build_val_loader(
            val_dir,
            num_classes=loaded.num_classes,
            batch_size=min(64, verify_images),
            workers=workers,
            **settings,
        )
        verification["data"] = {
            "val_dir": str(val_dir),
            **compare_forms(model, deploy, _val_images(val.loader, verify_images)),
        }
    _check_finite(loaded.path, {"random": verification["random"], "val": verification["data"]})
    worst = max(
        v["max_abs_diff"] for v in (verification["random"], verification["data"]) if v is not None
    )
    verification["max_abs_diff"] = worst
    verification["passed"] = math.isfinite(worst) and worst <= atol
    if not verification["passed"]:
        raise ToolError(
            f"{loaded.path}: verification failed: the deploy form differs from the training form "
            f"by {worst:.3g} > --atol {atol:g} (random: {verification['random']}, data: "
            f"{verification['data']}); nothing written"
        )

    model, deploy = model.cpu(), deploy.cpu()
    summary = model_summary(model, size, deploy=deploy)
    extra: dict[str, Any] = {
        "reparameterized_modules": n_swapped,
        "source": {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            **loaded.source,
        },
        "verification": verification,
        "summary": {
            "img_size": size,
            "params_train": count_params(model),
            "params_deploy": count_params(deploy),
            **summary,
        },
        "data": {**loaded.data_config, **settings},
        "versions": {**versions(), "safetensors": _safetensors_version()},
        "git": git_revision(),
        "date": now_iso(),
    }
    sidecar = write_deploy_checkpoint(
        deploy,
        weights_path,
        sidecar_path,
        spec=loaded.spec,
        class_names=loaded.class_names,
        weights=loaded.weights,
        extra=extra,
    )
    return {**sidecar, "out": {"weights": str(weights_path), "sidecar": str(sidecar_path)}}


def _device(name: str) -> torch.device:
    """The verification device; fp32 math in full precision there (no TF32)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ToolError(f"--device {name!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ToolError(f"--device {name}: CUDA is not available on this machine")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def _safetensors_version() -> str:
    import safetensors

    return str(safetensors.__version__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol-reparam",
        description=(
            "Turn a training checkpoint into a verified deploy checkpoint (X-volution branches "
            "and their BNs folded into one operator): DIR/deploy.safetensors + DIR/deploy.json."
        ),
        epilog=(
            "examples:\n"
            "  xvol-reparam outputs/demo/best.pt --out outputs/demo/deploy\n"
            "  xvol-reparam outputs/demo/best.pt --out outputs/demo/deploy "
            "--data ~/.cache/xvol/demo\n"
            "  xvol-reparam run/last.pt --out run/deploy --no-ema --atol 1e-4 --force\n"
            "Prints one JSON record (the sidecar); exit status 1 with a one-line error otherwise."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[tool_args()],
    )
    parser.add_argument("checkpoint", help="training checkpoint (.pt) written by scripts/train.py")
    parser.add_argument("--out", required=True, help="output directory for the deploy checkpoint")
    add_options(parser, ReparamOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    with tool_errors("xvol-reparam", args.debug):
        opts = options_from_args(ReparamOptions, args)
        record = reparam_checkpoint(args.checkpoint, args.out, opts)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
