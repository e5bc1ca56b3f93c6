"""Run one of timm's scripts (validate.py, benchmark.py, ...) with xvol's models registered.

Usage:
    python -m xvol.cli.timm_script validate.py --model xresnet18 --num-classes 10 \
        --checkpoint outputs/demo/best.pt --use-ema --data-dir ~/.cache/xvol/demo --img-size 32
    python -m xvol.cli.timm_script benchmark.py --model xresnet50 --reparam --bench inference

timm's scripts build models by name (``timm.create_model``) and have no import hook: the
xresnet names exist only once ``import xvol`` has run. This imports it, checks that it is the
xvol package (not a folder named xvol that Python took for a namespace package, which
registers nothing), then runs SCRIPT as ``__main__`` with the remaining arguments, as
``python SCRIPT ARGS`` would. timm's scripts live in the pytorch-image-models repository, not in
the pip package. Training checkpoints hold the weights under timm's names too (``state_dict``,
``state_dict_ema``), so ``--use-ema`` reads the EMA, as xvol-eval does by default.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from xvol.cli.common import ToolError, tool_errors

PROG = "xvol-timm"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run a timm script (validate.py, benchmark.py, ...) with xvol's models registered "
            "with timm: python -m xvol.cli.timm_script SCRIPT [ARGS...]."
        ),
        epilog=(
            "example:\n"
            "  python -m xvol.cli.timm_script validate.py --model xresnet18 --num-classes 10 "
            "--checkpoint run/best.pt --use-ema --data-dir /imagenet"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("script", help="the timm script to run (its path)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, passed unchanged")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    script = Path(args.script)
    with tool_errors(PROG):  # checks that xvol is the package and its models are registered
        if not script.is_file():
            raise ToolError(
                f"no such script {script} (timm's validate.py and benchmark.py are in the "
                "pytorch-image-models repository, not in the timm package)"
            )
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.resolve().parent))  # what `python SCRIPT` puts first
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
