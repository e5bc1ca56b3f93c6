"""Smoke test of scripts/bench_op.py as people launch it: a subprocess writing its JSON record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_op_runs_and_writes_record(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "bench_op.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_op.py"), "--device", "cpu"]
    cmd += ["--iters", "1", "--warmup", "0", "--batch", "2", "--slots", "stage3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "xconv-train" in proc.stdout and "ratios (x) are to conv2d" in proc.stdout

    record = json.loads(out.read_text())
    assert record["tool"] == "bench_op" and record["config"]["device"] == "cpu"
    assert record["config"]["batch"] == 2 and record["config"]["iters"] == 1
    assert record["memory_meaning"]
    rows = {row["op"]: row for row in record["rows"]}
    assert set(rows) == {"conv2d", "xconv-train", "xconv-eval", "deploy"}
    assert all(row["shape"] == [2, 256, 14, 14] for row in rows.values())
    assert rows["conv2d"]["fwd_ratio"] == 1.0 and rows["conv2d"]["fwd_bwd_ratio"] == 1.0
    for row in rows.values():
        assert row["fwd_ms"] > 0 and row["fwd_mem_bytes"] > 0
    for name in ("conv2d", "xconv-train", "deploy"):
        assert rows[name]["fwd_bwd_ms"] > 0 and rows[name]["saved_bytes"] > 0
    assert rows["xconv-eval"]["fwd_bwd_ms"] is None  # forward only, by design
    # PSSA is 8x the input in products: it must show up as more memory than the plain conv
    assert rows["xconv-eval"]["fwd_mem_ratio"] > 1.0
    # the bench checks the deploy operator against the form it came from
    assert rows["deploy"]["deploy_vs_eval_max_abs_diff"] < 1e-4
