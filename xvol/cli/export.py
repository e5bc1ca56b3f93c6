"""Export the deploy model to ONNX, checked against PyTorch with onnxruntime before it is kept.

Usage:
    python tools/export.py outputs/demo/deploy --out outputs/demo/xresnet18.onnx
    xvol-export outputs/demo/best.pt --out model.onnx            # reparameterized on the fly
    xvol-export CKPT --out model.onnx --opset 17 --exporter torchscript --img-size 224

CKPT is a deploy checkpoint (directory, .safetensors or .json from tools/reparam.py) or a
training checkpoint, which is re-parameterized first (EMA weights by default when present). The
graph has a dynamic batch axis (input ``images`` N x 3 x S x S, output ``logits`` N x classes)
unless --static-batch. The file is written to a temp name, run with onnxruntime (CPU) on random
batches of 1 and --batch-size images, and renamed into place only if every output of both is
finite and the max |difference| from the PyTorch deploy model is <= --atol (default 1e-4);
existing files are refused unless --force. The model is rebuilt from the checkpoint's validated
model spec (xvol.models.ModelSpec), never from a ``_target_`` read from the file. Prints one JSON
record.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript, torch's default) is the
default; it implements opset 18 and newer, so opset 17 needs ``--exporter torchscript`` (the
legacy TorchScript tracer, which handles the deploy operator too: convolutions, pad, strided
slices and products). The deploy operator runs its plain PyTorch ("reference") path for export.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvol.checks import (
    BOOL,
    INT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Check,
    check_fields,
    is_int,
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
from xvol.data.val import eval_settings
from xvol.extras import require
from xvol.formats.files import atomic_path
from xvol.formats.load import load_model
from xvol.ops import XConv2d, XConv2dDeploy
from xvol.reparam import reparameterize_model

log = logging.getLogger("xvol.tools.export")

EXPORTERS = ("dynamo", "torchscript")
MIN_OPSET = 17


def prepare_for_export(model: nn.Module) -> nn.Module:
    """Deploy model on the CPU in fp32, eval mode, no grad, X-volution on its reference path.

    The reference path is plain convolutions, pad, strided slices and products, which both
    exporters translate; the lean/Triton paths are autograd Functions/kernels they cannot see.
    """
    model = model.float().cpu().eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, XConv2d | XConv2dDeploy):
            module.impl = "reference"
    return model


def _export(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    opset: int,
    exporter: str,
    dynamic_batch: bool,
) -> None:
    # The exporters report progress with print(); keep stdout for the one JSON record.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        if exporter == "dynamo":
            dynamic = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
            options: dict[str, Any] = {
                "dynamic_shapes": dynamic,
                "external_data": False,  # one self-contained file (deploy ResNets are < 2 GB)
                "verbose": False,
            }
        else:
            axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            options = {"dynamic_axes": axes, "do_constant_folding": True}
            # The tracer warns about Python ints taken from shapes (fixed per image size, and the
            # parity check below runs a second batch size) and about its own deprecation.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=exporter == "dynamo",
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            **options,
        )


def check_parity(model: nn.Module, onnx_path: Path, inputs: list[torch.Tensor]) -> dict[str, Any]:
    """Max |ONNX Runtime - PyTorch| over ``inputs``, plus the opset the file declares.

    A non-finite output on either side is counted (``nonfinite_pytorch``/``nonfinite_onnx``,
    output elements) and kept out of the maxima: ``max(0.0, nan)`` is 0.0, so NaN would pass.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    max_diff, max_logit = 0.0, 0.0
    nonfinite_pytorch, nonfinite_onnx = 0, 0
    with torch.no_grad():
        for x in inputs:
            expected = model(x).numpy()
            got = session.run(None, {input_name: x.numpy()})[0]
            if got.shape != expected.shape:
                raise ToolError(
                    f"ONNX output shape {got.shape} != PyTorch {expected.shape} for input "
                    f"{tuple(x.shape)}"
                )
            ok_expected, ok_got = np.isfinite(expected), np.isfinite(got)
            nonfinite_pytorch += int((~ok_expected).sum())
            nonfinite_onnx += int((~ok_got).sum())
            ok = ok_expected & ok_got
            if ok.any():
                max_diff = max(max_diff, float(np.abs(got[ok] - expected[ok]).max()))
                max_logit = max(max_logit, float(np.abs(expected[ok]).max()))
    return {
        "opset": opset,
        "batch_sizes": [int(x.shape[0]) for x in inputs],
        "max_abs_diff": max_diff,
        "max_abs_logit": max_logit,
        "nonfinite_pytorch": nonfinite_pytorch,
        "nonfinite_onnx": nonfinite_onnx,
    }


@dataclasses.dataclass
class ExportOptions(CheckpointToolOptions):
    """xvol-export's options, each declared once here: the command's flags are derived from
    these fields (xvol.cli.common.add_options), and making one checks every value, naming the
    flag. ``ema``, ``img_size`` and ``force`` come from CheckpointToolOptions, which the
    checkpoint tools share."""

    opset: int = option(
        18,
        Check(f"opset {MIN_OPSET} or newer", lambda v: is_int(v) and v >= MIN_OPSET),
        help=f"ONNX opset (>= {MIN_OPSET})",
    )
    exporter: str = option("dynamo", one_of(*EXPORTERS), help="torch.export or TorchScript")
    batch_size: int = option(2, POSITIVE_INT, help="example/check batch size")
    static_batch: bool = option(False, BOOL, help="fixed batch axis")
    atol: float = option(1e-4, POSITIVE_NUMBER, help="max |difference| allowed")
    seed: int = option(0, INT)  # of the random check batches (no flag)

    def __post_init__(self) -> None:
        check_fields(self, None)


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    opts: ExportOptions | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write ``out`` (.onnx) for the deploy form of ``checkpoint`` after the parity check.

    ``opts`` (or its fields as keywords: ``opset=17``, ``exporter="torchscript"``) say how."""
    opts = opts if opts is not None else ExportOptions(**options)
    ema, opset, exporter, img_size = opts.ema, opts.opset, opts.exporter, opts.img_size
    batch_size, atol, seed, force = opts.batch_size, opts.atol, opts.seed, opts.force
    dynamic_batch = not opts.static_batch
    out = Path(out)
    if exporter == "dynamo" and opset < 18:
        raise ToolError(
            f"--opset {opset}: torch's dynamo exporter implements opset 18 and newer (it would "
            "silently keep 18); use --exporter torchscript for opset 17"
        )
    refuse_existing([out], force, "ONNX file")
    for module in ("onnx", "onnxruntime", *(("onnxscript",) if exporter == "dynamo" else ())):
        require(module, "onnx", "xvol-export")
    loaded = load_model(checkpoint, ema)
    deploy = loaded.model if loaded.deploy else reparameterize_model(loaded.model)
    deploy = prepare_for_export(deploy)
    size = eval_settings(loaded.data_config, img_size, None, None)["img_size"]
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(batch_size, 3, size, size, generator=gen)
    checks = [example]
    if dynamic_batch and batch_size != 1:
        checks.insert(0, torch.randn(1, 3, size, size, generator=gen))

    start = time.perf_counter()
    with atomic_path(out) as tmp:
        try:
            _export(
                deploy, example, tmp, opset=opset, exporter=exporter, dynamic_batch=dynamic_batch
            )
        except Exception as err:
            raise ToolError(
                f"{loaded.path}: ONNX export ({exporter}, opset {opset}) failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        parity = check_parity(deploy, tmp, checks)
        if parity["opset"] != opset:
            raise ToolError(f"the exporter wrote opset {parity['opset']}, not {opset}")
        for side, name in (("pytorch", "the PyTorch deploy model"), ("onnx", "ONNX Runtime")):
            bad = parity.get(f"nonfinite_{side}", 0)
            if bad:
                raise ToolError(
                    f"{loaded.path}: parity check failed: {name} gives {bad} non-finite (NaN/Inf) "
                    "logits (NaN/Inf in the weights or BN statistics?); nothing written"
                )
        if not parity["max_abs_diff"] <= atol:
            raise ToolError(
                f"{loaded.path}: ONNX Runtime differs from PyTorch by {parity['max_abs_diff']:.3g} "
                f"> --atol {atol:g}; nothing written"
            )
        size_bytes = tmp.stat().st_size
    import onnx
    import onnxruntime

    return {
        "kind": "xvol.onnx",
        "onnx": str(out),
        "bytes": size_bytes,
        **loaded.identity,
        "checkpoint": {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            "deploy": loaded.deploy,
            "source_sha256": loaded.source.get("sha256", loaded.sha256),
        },
        "weights": loaded.weights,
        "exporter": exporter,
        "opset": opset,
        "input": {
            "name": "images",
            "shape": ["batch" if dynamic_batch else batch_size, 3, size, size],
        },
        "output": {"name": "logits", "num_classes": loaded.num_classes},
        "parity": {"atol": atol, **parity},
        "seconds": time.perf_counter() - start,
        "versions": {
            **versions(),
            "onnx": str(onnx.__version__),
            "onnxruntime": str(onnxruntime.__version__),
        },
        "date": now_iso(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol-export",
        description=(
            "Export the deploy (re-parameterized) model to ONNX and keep the file only if "
            "onnxruntime matches PyTorch within --atol."
        ),
        epilog=(
            "examples:\n"
            "  xvol-export outputs/demo/deploy --out outputs/demo/xresnet18.onnx\n"
            "  xvol-export outputs/demo/best.pt --out model.onnx --no-ema\n"
            "  xvol-export run/deploy --out model.onnx --opset 17 --exporter torchscript\n"
            "Exporter: dynamo (torch.export, default; opset >= 18) or torchscript (opset 17+)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[tool_args()],
    )
    parser.add_argument("checkpoint", help="deploy dir/.safetensors/.json, or a training .pt")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    add_options(parser, ExportOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    with tool_errors("xvol-export", args.debug):
        record = export_onnx(args.checkpoint, args.out, options_from_args(ExportOptions, args))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
