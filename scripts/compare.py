"""A paired multi-seed comparison: baseline vs X-volution trained alike, evaluated, aggregated.

Usage:
    python scripts/compare.py                                  # demo set, seeds 0,1,2
    python scripts/compare.py --data cifar10 --root ~/.cache/xvol/cifar10 --epochs 20
    python scripts/compare.py --data cifar10 --root DIR --models resnet18,xresnet18 \\
        --seeds 0,1,2 --epochs 8 -- model.stages=[2,3] model.xconv.shifts=[1,2]
    make compare DATA=cifar10                                  # the same through the Makefile

Three stages, each through the project's own commands:
    1. one torchrun launch of ``scripts/train.py --multirun experiment=<data> model=<models>
       seed=<seeds>``: one run directory per job, ``<out>/runs/<model>_seed<seed>`` (a job whose
       directory already holds checkpoints continues them, a finished one is skipped, so an
       interrupted comparison picks up where it stopped; --fresh starts over);
    2. xvol-eval (``xvol.cli.eval.main``, in this process) on each ``best.pt`` (the weights
       best.pt was picked by: the EMA's) into ``<out>/results``;
    3. the leaderboard over those records: per model mean/std/n, and the X-volution minus
       baseline top-1 difference paired by seed with its 95% t-interval.

The experiment (``configs/experiment/<data>.yaml``) is the one recipe of both arms; overrides
after ``--`` apply to every job. Prints a table (per-seed top-1 of both arms, the paired
difference) and writes ``<out>/compare.json``. Exit status 0 when every stage ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("demo", "cifar10")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="compare.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", choices=DATASETS, default="demo", help="the experiment (recipe)")
    p.add_argument("--root", type=Path, help="data root (default: the config's, $XVOL_DATA/...)")
    p.add_argument("--models", default="resnet18,xresnet18", help="baseline,X-volution")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, help="default: the experiment's")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: 2, or the GPUs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=Path("outputs/compare"))
    p.add_argument("--fresh", action="store_true", help="delete <out>/runs first")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every job (after --)")
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if len(args.model_list) != 2:
        p.error(f"--models {args.models!r}: expected two models, baseline,X-volution")
    return args


def _python() -> str:
    return os.environ.get("PYTHON") or sys.executable


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"compare.py: error: {what} failed (exit {proc.returncode})")


def train(args: argparse.Namespace, cuda: bool) -> None:
    nproc = args.nproc or (max(1, min(2, _gpu_count())) if cuda else 2)
    argv = [
        _python(), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "scripts/train.py", "--multirun", f"experiment={args.data}",
        f"model={','.join(args.model_list)}", f"seed={','.join(map(str, args.seed_list))}",
        f"trainer.device={'cuda' if cuda else 'cpu'}", f"trainer.deterministic={not cuda}",
        "trainer.progress_bar=false", "trainer.log_interval=10", "run_name=compare",
        f"paths.output_dir={args.out}", f"hydra.sweep.dir={args.out / 'runs'}",
        "hydra.sweep.subdir=${hydra.runtime.choices.model}_seed${seed}",
    ]  # fmt: skip
    if args.root is not None:
        argv.append(f"data.root={args.root}")
    if args.epochs is not None:
        argv.append(f"trainer.epochs={args.epochs}")
    _run([*argv, *args.overrides], "training")


def evaluate(args: argparse.Namespace, cuda: bool, data_root: Path) -> Path:
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    for stale in results.glob("*.json"):  # the records of this comparison only
        stale.unlink()
    # xvol-eval's own entry point, called once per checkpoint in this process: the command
    # line is the same as `xvol-eval ...`, without a fresh interpreter (and CUDA context) each
    from xvol.cli import eval as eval_tool

    device = ["--device", "cuda", "--precision", "bf16"] if cuda else ["--device", "cpu"]
    # loader processes: up to 8, as many as this process may use (with 2, each CIFAR-10
    # evaluation took ~5 s on a 16-core H200 machine)
    from xvol.data.folder import usable_cores

    workers = str(min(8, usable_cores()))
    for model in args.model_list:
        for seed in args.seed_list:
            best = args.out / "runs" / f"{model}_seed{seed}" / "best.pt"
            argv = [str(best), "--data", str(data_root), "--results-dir", str(results),
                    "--no-progress", "--workers", workers, *device]  # fmt: skip
            try:
                eval_tool.main(argv)
            except SystemExit as err:  # xvol-eval's one-line error (already says which file)
                raise SystemExit(f"compare.py: error: evaluating {best} failed: {err}") from None
    return results


def summarize(args: argparse.Namespace, results: Path) -> dict[str, Any]:
    """Per-seed top-1 of both arms (from the records) and the leaderboard's paired interval."""
    from xvol.cli.leaderboard import build_leaderboard

    board = build_leaderboard(results)
    top1: dict[int, dict[str, float]] = {}
    names = {}
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        arm = "xvol" if record["xvolution"] else "base"
        names[arm] = record["model"]  # the records' names (xresnet18-cifar with the CIFAR stem)
        top1.setdefault(record["seed"], {})[arm] = record["top1"]
    base, xvol = names.get("base", args.model_list[0]), names.get("xvol", args.model_list[1])
    per_seed = [
        {"seed": s, base: t["base"], xvol: t["xvol"], "diff": t["xvol"] - t["base"]}
        for s, t in sorted(top1.items())
        if "base" in t and "xvol" in t
    ]
    paired = [c for vs in board["val_sets"] for c in vs["paired"]]
    return {"models": [base, xvol], "per_seed": per_seed, "paired": paired,
            "leaderboard": board["files"]}  # fmt: skip


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _data_root(args: argparse.Namespace) -> Path:
    if args.root is not None:
        return args.root
    base = Path(os.environ.get("XVOL_DATA") or Path.home() / ".cache" / "xvol")
    return base / args.data


def table(summary: dict[str, Any]) -> str:
    base, xvol = summary["models"]
    lines = [f"| seed | {base} top-1 | {xvol} top-1 | difference |", "|---|---:|---:|---:|"]
    for row in summary["per_seed"]:
        lines.append(f"| {row['seed']} | {row[base]:.2f} | {row[xvol]:.2f} | {row['diff']:+.2f} |")
    for c in summary["paired"]:
        lo = "-" if c["lo"] is None else f"{c['lo']:+.2f}"
        hi = "-" if c["hi"] is None else f"{c['hi']:+.2f}"
        lines.append(f"paired ({c['backend']}, n={c['n']}): mean {c['mean']:+.2f}, 95% interval "
                     f"[{lo}, {hi}]")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from xvol.formats.files import write_json_atomic

    args = parse_args(argv)
    os.chdir(ROOT)
    cuda = args.device == "cuda" or (args.device == "auto" and _gpu_count() > 0)
    if args.fresh:
        import shutil

        shutil.rmtree(args.out / "runs", ignore_errors=True)
    start = time.monotonic()
    print(f"== 1/3 train {args.models} x seeds {args.seeds} ({args.data}) into {args.out}/runs",
          flush=True)  # fmt: skip
    train(args, cuda)
    trained = time.monotonic()
    print("== 2/3 evaluate each best.pt", flush=True)
    results = evaluate(args, cuda, _data_root(args))
    print("== 3/3 leaderboard", flush=True)
    summary = summarize(args, results)
    summary.update(
        data=args.data, seeds=args.seed_list, epochs=args.epochs, overrides=args.overrides,
        device="cuda" if cuda else "cpu",
        seconds={"train": round(trained - start, 1), "total": round(time.monotonic() - start, 1)},
    )  # fmt: skip
    out = args.out / "compare.json"
    write_json_atomic(out, summary)
    print(table(summary))
    print(f"{summary['seconds']['total']:.0f} s; wrote {out} and {summary['leaderboard']['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
