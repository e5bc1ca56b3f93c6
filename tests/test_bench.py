"""Smoke test of scripts/bench.py: it runs on CPU with tiny settings and writes its record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench.py"),
        "--device", "cpu", "--batch", "2", "--img-size", "32", "--iters", "1",
        "--warmup", "0", "--rounds", "1", "--num-classes", "10", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(out.read_text())
    cases = {
        "train timm resnet50",
        "train resnet50 (xvol loop)",
        "train xresnet50",
        "infer timm resnet50",
        "infer xresnet50 deploy",
        "infer xresnet50 train-form eval",
    }
    assert set(record["img_per_s"]) == cases
    assert all(v > 0 for v in record["img_per_s"].values())
    assert set(record["ratios"]) == set(record["targets"])
    assert all(v > 0 for v in record["ratios"].values())
    # The saved-activation ratio is exact (byte counts, not timings): x + conv BN input.
    assert record["ratios"]["lean saved activations / nn.Conv2d (stage-3 slot)"] == 2.0
    saved = record["ops"]["saved"]
    assert (
        saved["XConv2d lean"]["activation_bytes"] < saved["XConv2d reference"]["activation_bytes"]
    )
    assert record["settings"]["device"] == "cpu" and record["settings"]["threads"] == 1
    for name in cases:  # the table lists every case
        assert name in proc.stdout
