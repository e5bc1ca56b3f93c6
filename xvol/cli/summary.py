"""Params and GMACs of every model config, training and deploy form (the README's model table).

Usage:
    python scripts/model_summary.py                       # all of configs/model/, 224 px
    python scripts/model_summary.py --models xresnet50 resnet50 --img-size 224
    python scripts/model_summary.py --device cpu --out summary.json
    python scripts/model_summary.py --overrides model.stages=[3,4] model.xconv.shifts=[1,2]

Each option of configs/model/ (files starting with "_" are shared bases, not options) is
composed with Hydra's compose API, read as the validated xvol.models.ModelSpec and built from it
(as training and every tool build it), and measured with
torch.utils.flop_counter.FlopCounterMode on one image (see xvol/models/summary.py for what is
counted). The default device is "meta": shapes only, no compute, the same counts as on CPU.
Prints a markdown table; --out also writes the rows as JSON (refused if it exists, unless
--force). A bad option or override ends in one line naming it.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xvol.checks import POSITIVE_INT, check_value
from xvol.cli import config_dir
from xvol.cli.common import (
    OutputOptions,
    ToolError,
    add_options,
    refuse_existing,
    tool_args,
    tool_errors,
)
from xvol.formats.files import write_json_atomic
from xvol.models import ModelSpec, model_summary

CONFIG_DIR = config_dir()


def model_options(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Selectable options of the model group, baselines then X-volution, in natural order
    (resnet18 before resnet101)."""
    names = [p.stem for p in (config_dir / "model").glob("*.yaml") if not p.stem.startswith("_")]

    def natural(name: str) -> tuple[bool, list[tuple[str, int]]]:
        parts = re.findall(r"(\D*)(\d*)", name)
        return name.startswith("x"), [(text, int(num or -1)) for text, num in parts]

    return sorted(names, key=natural)


def summarize(
    name: str, img_size: int, num_classes: int, device: str, overrides: list[str]
) -> dict[str, object]:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(overrides=[f"+model={name}", f"+data.num_classes={num_classes}", *overrides])
    spec = ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True), f"model={name}")
    with torch.device(device):
        model = spec.build()
    return {"model": name, "img_size": img_size, **model_summary(model, img_size)}


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | params (M) train | params (M) deploy | GMACs train | GMACs deploy "
        "| elementwise muls (M) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_m_train']:.2f} | {r['params_m_deploy']:.2f} "
            f"| {r['gmacs_train']:.2f} | {r['gmacs_deploy']:.2f} | {1e3 * r['gmuls_deploy']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xvol-summary",
        description=__doc__.split("\n")[0],
        parents=[tool_args()],
    )
    add_options(parser, OutputOptions)
    parser.add_argument("--models", nargs="+", default=None, help="options of configs/model/")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000, help="sets data.num_classes")
    parser.add_argument("--device", default="meta", help="meta (fast, shapes only) or cpu/cuda")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for all")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tool_errors("xvol-summary", args.debug):
        options = model_options()
        unknown = [n for n in args.models or [] if n not in options]
        if unknown:
            raise ToolError(f"--models: no model config {unknown} (options: {', '.join(options)})")
        for flag, value in (("--img-size", args.img_size), ("--num-classes", args.num_classes)):
            check_value(flag, POSITIVE_INT, value)
        if args.out is not None:
            refuse_existing([args.out], args.force)
        names = args.models or options
        rows = [
            summarize(n, args.img_size, args.num_classes, args.device, args.overrides)
            for n in names
        ]
        print(markdown(rows))
        print(
            f"\n{args.img_size} px, 1 image, {args.num_classes} classes. GMACs: convolutions + "
            "matmuls from torch.utils.flop_counter.FlopCounterMode (FLOPs / 2); it does not "
            "count elementwise ops (BN, ReLU, adds, pooling), so the PSSA products x * S_d(x) "
            "are in the last column (aten.mul outputs, counted through the same mode; SE/ECA "
            "gates are muls too). Deploy: xvol.reparam.reparameterize_model (X-volution BNs "
            "folded; other BNs kept)."
        )
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
