"""scripts/gpu_check.sh / gpu_check.py, the one GPU check, kept honest without a GPU.

The slow test runs its CPU rehearsal end to end (the same steps at tiny sizes; the kernel step
runs CPU proofs that a GPU test's check fails on broken kernels), with wandb / mlxtend /
submitit / DALI blocked as on a bare GPU machine. The other rehearsals must FAIL: a step that
fails, one that times out, and one skipped because its input is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xvol.engine import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args: str, timeout: float = 900):
    """(the finished process, gpu_check.json or None) of scripts/gpu_check.sh ARGS."""
    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        XVOL_GPU_CHECK_WORK=str(tmp_path / "work"),
        XVOL_PYTHON=sys.executable,
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    path = tmp_path / "out" / "gpu_check.json"
    return proc, json.loads(path.read_text()) if path.exists() else None


def test_gpu_check_is_valid_bash_and_documents_its_device_invocation() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    assert 'run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)' in header
    assert "make gpu-wheels" in header
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^gpu-check:", makefile, re.M) and re.search(r"^gpu-wheels:", makefile, re.M)
    assert re.search(r"^\.PHONY:.*\bgpu-check\b.*\bgpu-wheels\b", makefile, re.M)
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_gpu_plan_fits_its_minutes_with_its_margin_in_deciding_order() -> None:
    """Up to bench within 6 minutes, the science run last, all within 9 (one device call)."""
    gc = _driver()
    assert gc.check_plan(gc.STEPS, gc.GPU_BUDGET_S, gc.MARGIN_S, gc.FIRST_STEPS_BUDGET_S) is None
    assert gc.FIRST_STEPS_BUDGET_S <= 360 and gc.GPU_BUDGET_S <= 540 and gc.MARGIN_S >= 20
    assert sum(s.cap_s for s in gc.STEPS) + gc.MARGIN_S <= gc.GPU_BUDGET_S
    first = sum(s.cap_s for s in gc.STEPS if s.name != "science")
    assert first + gc.MARGIN_S <= gc.FIRST_STEPS_BUDGET_S
    names = [s.name for s in gc.STEPS]
    assert names[0] == "kernels" and names[1:3] == ["train_xresnet50", "train_resnet50"]
    assert names.index("reparam") < names.index("bench") < names.index("science") == len(names) - 1
    assert "> budget 100 s" in (gc.check_plan(gc.STEPS, 100, 30) or "")
    assert "before the science run" in (gc.check_plan(gc.STEPS, 600, 30, 200) or "")


def test_a_plan_over_its_budget_refuses_to_start(tmp_path: Path) -> None:
    proc, record = _run(tmp_path, "--budget", "4", timeout=60)
    assert proc.returncode == 2 and record is None
    assert "step caps add up to" in proc.stderr and "nothing was run" in proc.stderr


def test_gpu_check_rejects_unknown_arguments_and_steps(tmp_path: Path) -> None:
    proc, _ = _run(tmp_path, "--bogus", timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
    proc, _ = _run(tmp_path, "--steps", "kernel", timeout=60)
    assert proc.returncode == 2 and "unknown step 'kernel'" in proc.stderr


def test_verdicts_count_skipped_and_unselected_steps_as_not_passed() -> None:
    gc = _driver()
    ok = {"status": "ok"}
    assert gc.verdict({"a": ok, "b": ok}) == "PASSED"
    assert gc.verdict({"a": ok, "b": {"status": "not selected"}}) == "INCOMPLETE"
    assert gc.verdict({"a": ok, "b": {"status": "skipped"}}) == "FAILED"
    assert gc.verdict({"a": ok, "b": {"status": "timed out"}}) == "FAILED"
    assert gc.verdict({"a": {"status": "failed (3 of 10 tests skipped)"}}) == "FAILED"


def test_a_failed_step_and_the_steps_it_starves_fail_the_check(tmp_path: Path) -> None:
    """train_xresnet50 fails: reparam, which needs its checkpoint, is skipped, not passed; the
    record is written and names which steps ran."""
    proc, record = _run(
        tmp_path, "--dry-run", "--steps", "train_xresnet50,reparam", "--break", "train_xresnet50",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout and "PASSED" not in proc.stdout
    steps = record["steps"]
    assert steps["train_xresnet50"]["status"] == "failed (exit 1)"
    assert "broken on purpose" in "\n".join(steps["train_xresnet50"]["log_tail"])
    assert steps["reparam"]["status"] == "skipped" and "needs" in steps["reparam"]["why"]
    assert steps["kernels"]["status"] == "not selected"
    assert record["verdict"] == "FAILED" and record["ok"] is False
    assert record["ran"] == ["train_xresnet50"] and record["complete"] is True


def test_a_step_that_times_out_fails_the_check(tmp_path: Path) -> None:
    proc, record = _run(tmp_path, "--dry-run", "--steps", "kernels", "--cap", "kernels=1",
                        timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert record["steps"]["kernels"]["status"] == "timed out"
    assert record["verdict"] == "FAILED"


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_a_kernel_step_whose_tests_all_skip_is_not_a_pass(tmp_path: Path) -> None:
    """On a machine without CUDA, `pytest -m gpu` skips every test with exit 0: not a pass."""
    gc = _driver()
    ctx = gc.Context(False, sys.executable, tmp_path, tmp_path)
    (tmp_path / "logs").mkdir()
    step = next(s for s in gc.STEPS if s.name == "kernels")
    row = gc.run_step(step, ctx, 300, broken=False)
    assert row["exit"] == 0, row  # pytest itself is content
    assert row["status"].startswith("failed (") and "skipped" in row["status"], row


@pytest.mark.slow
def test_gpu_check_cpu_rehearsal_end_to_end(tmp_path: Path) -> None:
    proc, record = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PASSED" in proc.stdout and "| step" in proc.stdout
    assert record["mode"] == "cpu rehearsal" and record["ok"] is True
    steps = {name: s["status"] for name, s in record["steps"].items()}
    names = [s.name for s in _driver().STEPS]
    assert steps == {name: "ok" for name in names} and len(names) == 8
    results = record["results"]
    assert results["kernels"]["tests"] == 3 and results["kernels"]["skipped"] == 0
    for model in ("xresnet50", "resnet50"):
        assert results[f"train_{model}"]["global_step"] == 3
    assert results["reparam"]["verification"]["passed"] is True
    assert results["eval_train"]["deploy"] is False and results["eval_deploy"]["deploy"] is True
    assert results["eval_train"]["num_images"] == results["eval_deploy"]["num_images"] == 40
    bench = results["bench"]
    assert bench["ratio_info"]["headline"] == "xresnet50 train (auto) / resnet50 train"
    assert all(c["status"] == "ok" for c in bench["cases"].values())
    science = results["science"]  # the pipeline and the statistics, not accuracy
    assert [r["seed"] for r in science["per_seed"]] == [0, 1]
    (paired,) = science["paired"]
    assert paired["n"] == 2 and paired["lo"] <= paired["mean"] <= paired["hi"]
    assert paired["mean"] == pytest.approx(sum(r["diff"] for r in science["per_seed"]) / 2)
    _check_sweep(tmp_path / "work" / "science")
    assert "paired (torchvision, n=2)" in (tmp_path / "work" / "logs" / "science.out").read_text()
    assert (tmp_path / "out" / "bench.json").exists()
    assert (tmp_path / "out" / "gpu_check.log").exists()


def _check_sweep(out: Path) -> None:
    """The rehearsal's science step is scripts/compare.py as `make compare DATA=cifar10` runs
    it on a CPU: one torchrun launch (2 gloo ranks) runs the Hydra sweep experiment=cifar10
    model=resnet18,xresnet18 x seed=0,1 for one epoch on a generated CIFAR-like folder (the
    in-memory backend, the CIFAR stem), with one process group, run directory and train.log per
    job; each best.pt is evaluated into one results directory (records carry the seed), and
    compare.json pairs the two arms by seed with the leaderboard's 95% interval."""
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs == ["resnet18_seed0", "resnet18_seed1", "xresnet18_seed0", "xresnet18_seed1"]
    for name in runs:
        run_dir = out / "runs" / name
        best = load_checkpoint(run_dir / "best.pt")
        model, seed = name.split("_seed")
        assert best["config"]["seed"] == int(seed) and best["world_size"] == 2
        assert best["config"]["model"]["stages"] == ([3] if model == "xresnet18" else [])
        assert best["config"]["model"]["stem"] == "cifar"
        assert best["config"]["data"]["name"] == "cifar10"
        assert best["best_metric_name"] == "ema_top1" and best["epoch"] == 1
        assert (run_dir / "epoch_0001.pt").is_file()
        log = (run_dir / "train.log").read_text()
        assert log.count("] - run compare in ") == 1 and str(run_dir) in log  # its own job only
    records = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
    assert sorted((r["model"], r["seed"]) for r in records) == [
        ("resnet18-cifar", 0),
        ("resnet18-cifar", 1),
        ("xresnet18-cifar", 0),
        ("xresnet18-cifar", 1),
    ]
    assert all(r["weights"] == "ema" and r["num_images"] == 30 for r in records)
    assert (out / "results" / "leaderboard.md").is_file()
    # the pairing and the interval: per-seed differences of the records, their mean and a
    # t-interval with n - 1 = 1 degree of freedom around it
    summary = json.loads((out / "compare.json").read_text())
    top1 = {(r["model"], r["seed"]): r["top1"] for r in records}
    assert [row["seed"] for row in summary["per_seed"]] == [0, 1]
    diffs = []
    for row in summary["per_seed"]:
        expected = top1[("xresnet18-cifar", row["seed"])] - top1[("resnet18-cifar", row["seed"])]
        assert row["diff"] == pytest.approx(expected)
        diffs.append(expected)
    (paired,) = summary["paired"]
    assert paired["n"] == 2 and paired["seeds"] == [0, 1]
    assert paired["mean"] == pytest.approx(sum(diffs) / 2)
    half = 12.706 * abs(diffs[0] - diffs[1]) / 2**0.5 / 2**0.5  # t(0.975, 1) * std / sqrt(n)
    assert paired["lo"] == pytest.approx(paired["mean"] - half, abs=1e-6)
    assert paired["hi"] == pytest.approx(paired["mean"] + half, abs=1e-6)
