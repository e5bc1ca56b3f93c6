"""Shared memory of every Triton kernel config, compiled ahead of time for sm_80 and sm_90.

No GPU needed: each config is compiled exactly as the JIT would compile it on an A100/H100
(``xvol.ops.triton_aot``), and its ``metadata.shared`` is compared with the target's limit and
with the estimate the runtime prune uses. Prints a table, writes JSON, exits 1 if any row fails.

Usage:
    python scripts/triton_smem.py                          # bf16 + fp32, sm_80 + sm_90
    python scripts/triton_smem.py --json bench_results/triton_smem.json --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # compiled mode: the interpreter has no smem limit

from xvol.ops.triton_aot import compile_all  # noqa: E402


def row_ok(r: dict) -> bool:
    return "error" not in r and r["shared"] <= r["limit"] and r["shared"] <= r["estimate"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="bench_results/triton_smem.json", help="JSON output path")
    p.add_argument("--workers", type=int, default=None, help="parallel compiles (default: CPUs)")
    args = p.parse_args(argv)
    rows = compile_all(workers=args.workers)
    head = f"{'case':<16} {'config':<28} {'dtype':<5} {'target':<6} {'shared B':>9} {'estimate':>9}"
    print(head + f" {'limit':>8} {'compile s':>9}  ok")
    for r in rows:
        cfg = ",".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in r["config"].items())
        print(
            f"{r['case']:<16} {cfg:<28} {r['dtype']:<5} {r['target']:<6} "
            f"{r.get('shared', '-'):>9} {r['estimate']:>9} {r['limit']:>8} "
            f"{r.get('compile_s', '-'):>9}  {'yes' if row_ok(r) else 'NO ' + r.get('error', '')}"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    bad = sum(not row_ok(r) for r in rows)
    print(f"{len(rows) - bad}/{len(rows)} rows fit; wrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
