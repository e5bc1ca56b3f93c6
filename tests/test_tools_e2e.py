"""Post-training tools end to end on a real (tiny) run, every tool launched as its CLI.

The run: xresnet18 trained by scripts/train.py under torchrun (2 CPU ranks) for 2 epochs on the
demo digits at 32 px (run A of tests/test_train_e2e.py, made once per test run); then reparam (with
verification on real val images), eval of the training and of the deploy checkpoint (single
process, and the deploy one again under torchrun with 2 gloo ranks), leaderboard and ONNX export
(the default dynamo exporter). The acceptance checks of the post-training tools issue, on CPU.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_python
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file
from tools_helpers import ROOT, make_val_folder

import xvol.config  # noqa: F401  (registers the trainer/debug schema compose() needs)
from xvol.formats.checkpoint import load_checkpoint
from xvol.formats.load import load_model, load_state_dict_strict
from xvol.reparam import reparameterize_model

pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_python(args, timeout=timeout)


def _tool(name: str, *args: str) -> dict[str, Any]:
    """Run tools/<name>.py; it must succeed and print one JSON record on stdout."""
    proc = _run(str(ROOT / "tools" / f"{name}.py"), *args)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def run(demo_ddp_run: Path, out_dir: Path) -> dict[str, Path]:
    """Run A (conftest.py): xresnet18 trained for 2 epochs on the demo set by 2 torchrun ranks;
    its run directory, best.pt and data root, and a scratch directory for the tools' outputs."""
    ckpt = demo_ddp_run / "best.pt"
    assert ckpt.is_file()
    data_root = Path(load_checkpoint(ckpt)["config"]["data"]["root"])
    return {"base": out_dir, "run_dir": demo_ddp_run, "ckpt": ckpt, "data": data_root}


@pytest.fixture(scope="module")
def deployed(run: dict[str, Path]) -> dict[str, Any]:
    out = run["base"] / "deploy"
    record = _tool("reparam", str(run["ckpt"]), "--out", str(out), "--data", str(run["data"]))
    return {"dir": out, "record": record}


@pytest.fixture(scope="module")
def evaluated(run: dict[str, Path], deployed: dict[str, Any]) -> dict[str, Any]:
    results = run["base"] / "results"
    common = ["--results-dir", str(results), "--workers", "0", "--device", "cpu"]
    common += ["--bench", "--bench-iters", "3", "--batch-size", "50", "--json"]
    train = _tool("eval", str(run["ckpt"]), *common, "--predictions", str(run["base"] / "t.csv"))
    deploy = _tool(
        "eval", str(deployed["dir"]), *common, "--predictions", str(run["base"] / "d.csv")
    )
    return {"results": results, "train": train, "deploy": deploy}


def _predictions(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as fh:
        return [(r["file"], r["pred"], r["top5"]) for r in csv.DictReader(fh)]


def test_reparam_verified_on_real_images(deployed: dict[str, Any]) -> None:
    v = deployed["record"]["verification"]
    assert v["passed"] and v["data"]["num_images"] == 256 and v["data"]["agreement"] == 1.0
    assert v["max_abs_diff"] <= 1e-3
    assert deployed["record"]["weights"] == "ema"  # the trainer keeps an EMA by default
    assert (deployed["dir"] / "deploy.safetensors").is_file()


def test_training_and_deploy_checkpoints_give_identical_predictions(
    run: dict[str, Path], evaluated: dict[str, Any]
) -> None:
    train, deploy = evaluated["train"], evaluated["deploy"]
    assert train["num_images"] == deploy["num_images"] == 1000  # the demo val split
    assert train["top1"] == deploy["top1"] and train["top5"] == deploy["top5"]
    assert train["predictions_sha256"] == deploy["predictions_sha256"]
    rows_train, rows_deploy = (
        _predictions(run["base"] / "t.csv"),
        _predictions(run["base"] / "d.csv"),
    )
    assert len(rows_train) == 1000 and rows_train == rows_deploy  # top-1 and top-5, every image
    # the trainer's own evaluation of the same weights agrees with the tool
    metrics = load_checkpoint(run["ckpt"])["metrics"]
    assert train["top1"] == pytest.approx(metrics["ema_top1"], abs=1e-6)
    assert train["top5"] == pytest.approx(metrics["ema_top5"], abs=1e-6)
    assert len(list(evaluated["results"].glob("*.json"))) == 2


def test_torchrun_eval_matches_single_process(
    run: dict[str, Path], deployed: dict[str, Any], evaluated: dict[str, Any]
) -> None:
    preds = run["base"] / "dist.csv"
    proc = _run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tools" / "eval.py"),
        str(deployed["dir"]),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-record",
        "--predictions",
        str(preds),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)  # rank 0 only prints
    assert record["eval"]["world_size"] == 2
    assert record["top1"] == evaluated["deploy"]["top1"]
    assert _predictions(preds) == _predictions(run["base"] / "d.csv")


def test_leaderboard_holds_both_rows_and_a_png(evaluated: dict[str, Any]) -> None:
    results = evaluated["results"]
    proc = _run(str(ROOT / "tools" / "leaderboard.py"), "--results-dir", str(results))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and ".json" in line]
    assert len(rows) == 2
    assert {r.split(" | ")[2] for r in rows} == {"train", "deploy"}
    pair = [line for line in proc.stdout.splitlines() if line.startswith("| xresnet18 | ema |")]
    assert len(pair) == 1 and "| yes |" in pair[0]  # identical predictions
    for suffix in ("md", "csv", "html"):
        assert (results / f"leaderboard.{suffix}").stat().st_size > 0
    (png,) = results.glob("leaderboard_*.png")  # one val set
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] == 1400


def test_deploy_checkpoint_loads_strictly_into_the_deploy_skeleton(
    deployed: dict[str, Any],
) -> None:
    """reparameterize_model(build_model(cfg)) with cfg composed from configs/ as training does."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=["model=xresnet18", "data=demo"])
    skeleton = reparameterize_model(instantiate(cfg.model))
    load_state_dict_strict(skeleton, load_file(deployed["dir"] / "deploy.safetensors"))
    loaded = load_model(deployed["dir"]).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(skeleton.eval()(x), loaded(x), atol=0, rtol=0)


def test_onnx_export_matches_pytorch(run: dict[str, Path], deployed: dict[str, Any]) -> None:
    out = run["base"] / "xresnet18.onnx"
    record = _tool("export", str(deployed["dir"]), "--out", str(out))
    assert record["exporter"] == "dynamo" and record["opset"] >= 17
    assert record["parity"]["max_abs_diff"] <= 1e-4
    # and on real images, through onnxruntime directly
    import onnxruntime as ort
    from timm.data import create_transform

    files = sorted((run["data"] / "val").glob("*/*.JPEG"))[::100]
    transform = create_transform(32, crop_pct=1.0, interpolation="bilinear")
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        expected = load_model(deployed["dir"]).model(x)
    assert (got - expected).abs().max().item() <= 1e-4


def test_bad_inputs_fail_cleanly_from_the_command_line(
    run: dict[str, Path], tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.pt"
    data = run["ckpt"].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    proc = _run(str(ROOT / "tools" / "reparam.py"), str(truncated), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"xvol-reparam: error: {truncated}")
    wrong = make_val_folder(tmp_path / "three", num_classes=3, per_class=1)
    results = tmp_path / "results"
    proc = _run(
        str(ROOT / "tools" / "eval.py"),
        str(run["ckpt"]),
        "--data",
        str(wrong),
        "--results-dir",
        str(results),
        "--device",
        "cpu",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "model predicts 10 classes" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists() and not results.exists()
