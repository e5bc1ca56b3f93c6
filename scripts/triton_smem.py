"""Shared memory of every Triton kernel config, compiled ahead of time for sm_80 and sm_90.

No GPU needed: each config is compiled exactly as the JIT would compile it on an A100/H100
(``xvol.ops.triton_aot``), and its ``metadata.shared`` is compared with the target's limit and
with the estimate the runtime prune uses. Prints a table, writes JSON, exits 1 on any problem
(``triton_aot.check_rows``). The whole grid is ``make test-aot``, which CI runs after the suite
(4-5 minutes on 2 cores with an empty Triton cache); the suite compiles the configs ``auto``
launches (``--configs fixed``).

Usage:
    python scripts/triton_smem.py                          # bf16 + fp32, sm_80 + sm_90
    python scripts/triton_smem.py --json bench_results/triton_smem.json --workers 2
    python scripts/triton_smem.py --configs fixed       # only what impl="auto" launches
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # compiled mode: the interpreter has no smem limit

from xvol.ops.triton_aot import check_rows, compile_all  # noqa: E402


def _status(r: dict) -> str:
    if "error" in r:
        return "NO " + r["error"]
    if r.get("pruned"):
        return "pruned (over the limit: never launched there)"
    return "yes" if r["shared"] <= r["limit"] and r["shared"] <= r["estimate"] else "NO"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="bench_results/triton_smem.json", help="JSON output path")
    p.add_argument("--workers", type=int, default=None, help="parallel compiles (default: CPUs)")
    p.add_argument("--configs", choices=("all", "fixed"), default="all",
                   help="every autotune config (default), or those impl='auto' launches")
    args = p.parse_args(argv)
    rows = compile_all(workers=args.workers, configs=args.configs)
    head = f"{'case':<16} {'config':<28} {'dtype':<5} {'target':<6} {'shared B':>9} {'estimate':>9}"
    print(head + f" {'limit':>8} {'compile s':>9}  ok")
    for r in rows:
        cfg = ",".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in r["config"].items())
        print(
            f"{r['case']:<16} {cfg:<28} {r['dtype']:<5} {r['target']:<6} "
            f"{r.get('shared', '-'):>9} {r['estimate']:>9} {r['limit']:>8} "
            f"{r.get('compile_s', '-'):>9}  {_status(r)}"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    problems = check_rows(rows, full=args.configs == "all")
    for line in problems:
        print(f"problem: {line}")
    print(f"{len(rows)} rows, {len(problems)} problem(s); wrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
