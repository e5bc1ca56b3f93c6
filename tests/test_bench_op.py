"""Smoke test of scripts/bench_op.py as people launch it: a subprocess writing its JSON record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_python
from torch import nn

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_op_runs_and_writes_record(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "bench_op.json"
    cmd = [str(REPO / "scripts" / "bench_op.py"), "--device", "cpu"]
    cmd += ["--iters", "1", "--warmup", "0", "--batch", "2", "--slots", "stage3", "--out", str(out)]
    proc = run_python(cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "xconv-train" in proc.stdout and "ratios (x) are to conv2d" in proc.stdout

    record = json.loads(out.read_text())
    assert record["tool"] == "bench_op" and record["config"]["device"] == "cpu"
    assert record["config"]["batch"] == 2 and record["config"]["iters"] == 1
    assert record["memory_meaning"]
    rows = {row["op"]: row for row in record["rows"]}
    assert set(rows) == {"conv2d", "xconv-train", "xconv-eval", "deploy"}
    assert all(row["status"] == "ok" for row in rows.values())
    assert rows["conv2d"]["impl"] is None and rows["deploy"]["impl"] == "auto"
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


def _load_bench_op():
    """The module scripts/bench.py imports (``from bench_op import ...``): one object, so a test
    that patches it patches what bench.py calls."""
    import importlib

    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module("bench_op")


def test_failing_path_is_reported_not_fatal() -> None:
    bench_op = _load_bench_op()

    def broken() -> None:
        raise RuntimeError("out of resource: shared memory, Required: 761856\nmore")

    failed: dict[str, str] = {}
    times = bench_op.time_ms({"ok": lambda: None, "broken": broken}, 2, 1, torch.device("cpu"),
                             failed)  # fmt: skip
    assert set(times) == {"ok"}
    assert failed == {"broken": "RuntimeError: out of resource: shared memory, Required: 761856"}


def test_several_impls_share_weights_and_get_their_own_rows() -> None:
    bench_op = _load_bench_op()
    rows = bench_op.bench_slot("stage3", 1, 1, 0, torch.device("cpu"), torch.float32,
                               ["reference", "lean"])  # fmt: skip
    keys = [(r["op"], r["impl"]) for r in rows]
    assert keys == [("conv2d", None)] + [
        (op, impl)
        for impl in ("reference", "lean")
        for op in ("xconv-train", "xconv-eval", "deploy")
    ]
    assert all(r["status"] == "ok" for r in rows)
    deploys = [r for r in rows if r["op"] == "deploy"]
    assert all(r["deploy_vs_eval_max_abs_diff"] < 1e-4 for r in deploys)
    saved = {(r["op"], r["impl"]): r["saved_bytes"] for r in rows}
    assert saved["xconv-train", "lean"] < saved["xconv-train", "reference"]  # T is not kept


def test_time_ms_averages_number_calls_per_sample() -> None:
    bench_op = _load_bench_op()
    calls = []
    ticks = iter(range(100))
    times = bench_op.time_ms({"f": lambda: calls.append(1)}, 3, 1, torch.device("cpu"),
                             clock=lambda: float(next(ticks)), number=4)  # fmt: skip
    assert len(calls) == 1 + 3 * 4  # one warm-up call, then 3 samples of 4 calls
    assert times == {"f": (250.0, 250.0)}  # each sample spans one clock tick: 1 s / 4 calls


def test_measure_slot_reports_a_failing_module_per_measurement() -> None:
    bench_op = _load_bench_op()

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("triton: not on this device")

    x, grad_out = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    modules = {"conv": nn.Conv2d(2, 2, 3, padding=1), "broken": Broken()}
    m = bench_op.measure_slot(modules, x, grad_out, torch.device("cpu"), fwd=modules,
                              fwd_bwd=modules, saved=modules, iters=1, warmup=0)  # fmt: skip
    assert set(m.fwd_ms) == set(m.fwd_bwd_ms) == set(m.saved) == {"conv"}
    reason = "RuntimeError: triton: not on this device"
    assert m.fwd_failed == m.fwd_bwd_failed == {"broken": reason}
    assert m.saved_failed == {}  # not retried after its forward + backward failed
    assert m.saved["conv"].activation_bytes == x.numel() * 4 and m.saved["conv"].parameter_bytes
