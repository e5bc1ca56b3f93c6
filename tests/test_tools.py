"""Post-training tools (tools/reparam.py, eval.py, leaderboard.py, export.py): fast unit tests.

Checkpoints are built without training (random weights, random BN statistics; see
tests/tools_helpers.py) on a tiny val folder of 3 classes x 4 noise images at 32 px.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_python
from PIL import Image
from safetensors.torch import load_file
from tools_helpers import ROOT, make_checkpoint, make_val_folder, model_config

from xvol.checks import ConfigError
from xvol.cli import eval as eval_tool
from xvol.cli import export as export_tool
from xvol.cli import leaderboard as leaderboard_tool
from xvol.cli import reparam as reparam_tool
from xvol.cli.common import CheckpointToolOptions, ToolError, options_from_args
from xvol.data import DataError
from xvol.engine.loop import evaluate
from xvol.formats.checkpoint import CheckpointError
from xvol.formats.deploy import deploy_integrity
from xvol.formats.files import sha256_file
from xvol.formats.load import load_model, load_state_dict_strict, model_identity
from xvol.formats.record import RecordError, validate_record
from xvol.models import ModelSpec, build_model
from xvol.ops import XConv2d
from xvol.reparam import reparameterize_model
from xvol.results.render import CSV_COLUMNS

EVAL_FAST = {"device": "cpu", "workers": 0, "batch_size": 5}
EVAL_BENCH = {**EVAL_FAST, "bench": True, "bench_iters": 1, "bench_warmup": 0}


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """Tiny tensors on a shared CPU: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Val folder, an X-volution checkpoint with EMA, a baseline without, and a deploy dir."""
    base = tmp_path_factory.mktemp("tiny")
    torch.set_num_threads(1)
    data = make_val_folder(base / "data")
    xckpt = make_checkpoint(base / "xresnet18.pt", data_root=str(data))
    bckpt = make_checkpoint(
        base / "resnet18.pt", model_config(xvolution=False), ema=False, seed=5, data_root=str(data)
    )
    reparam_tool.reparam_checkpoint(xckpt, base / "deploy")
    return {"base": base, "data": data, "xckpt": xckpt, "bckpt": bckpt, "deploy": base / "deploy"}


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------- common


def test_model_identity_names_follow_the_timm_registry() -> None:
    assert model_identity(model_config()) == {
        "model": "xresnet18",
        "arch": "resnet18",
        "xvolution": True,
    }
    assert model_identity(model_config("resnet50", xvolution=False))["model"] == "resnet50"
    variant = model_config()
    variant["stages"] = [3, 4]
    variant["xconv"]["shifts"] = [1, 2]
    assert model_identity(variant)["model"] == "xresnet18-s34-L12"


# ----------------------------------------------------------------------------- reparam


def test_reparam_writes_a_verified_deploy_checkpoint(tiny: dict[str, Path]) -> None:
    sidecar = json.loads((tiny["deploy"] / "deploy.json").read_text())
    assert sidecar["kind"] == "xvol.deploy" and sidecar["weights"] == "ema"
    assert sidecar["source"]["sha256"] == sha256_file(tiny["xckpt"])
    assert sidecar["format_version"] == 3 and "model_config" not in sidecar
    assert sidecar["model_spec"] == ModelSpec.from_config(model_config()).to_dict()
    assert sidecar["class_names"] == ["class_0", "class_1", "class_2"]
    assert sidecar["integrity_sha256"] == deploy_integrity(sidecar)
    assert sidecar["verification"]["passed"] is True
    assert sidecar["verification"]["random"]["agreement"] == 1.0
    assert 0 < sidecar["verification"]["max_abs_diff"] <= 1e-3
    assert sidecar["reparameterized_modules"] == 2  # xresnet18: 2 slots in stage 3
    summary = sidecar["summary"]
    assert summary["params_train"] > summary["params_deploy"] > 0  # BNs folded away
    assert summary["gmacs_train"] > 0 and summary["gmacs_deploy"] > 0
    assert {"xvol", "torch", "timm", "safetensors"} <= set(sidecar["versions"])

    # The acceptance check: strict load into reparameterize_model(build_model(...)).
    cfg = model_config()
    skeleton = reparameterize_model(
        build_model(
            cfg["arch"],
            num_classes=cfg["num_classes"],
            xconv=lambda *a, **k: XConv2d(*a, shifts=(1,), **k),
            stages=(3,),
        )
    )
    load_state_dict_strict(skeleton, load_file(tiny["deploy"] / "deploy.safetensors"))
    trained = load_model(tiny["xckpt"])  # EMA weights, training form
    torch.testing.assert_close(_logits(skeleton), _logits(trained.model), atol=1e-4, rtol=1e-4)


def test_reparam_no_ema_uses_the_raw_weights(tiny: dict[str, Path], tmp_path: Path) -> None:
    record = reparam_tool.reparam_checkpoint(tiny["xckpt"], tmp_path / "d", ema=False)
    assert record["weights"] == "model"
    deploy = load_model(tmp_path / "d").model
    raw = load_model(tiny["xckpt"], ema=False).model
    ema = load_model(tiny["xckpt"], ema=True).model
    torch.testing.assert_close(_logits(deploy), _logits(raw), atol=1e-4, rtol=1e-4)
    assert (_logits(deploy) - _logits(ema)).abs().max() > 1e-2


def test_reparam_with_ema_requested_but_absent_is_an_error(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="no EMA weights.*--no-ema"):
        reparam_tool.reparam_checkpoint(tiny["bckpt"], tmp_path / "d", ema=True)
    assert _files(tmp_path) == []


def test_reparam_refuses_existing_outputs_unless_forced(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "d"
    reparam_tool.reparam_checkpoint(tiny["xckpt"], out)
    before = (out / "deploy.json").read_text()
    with pytest.raises(ToolError, match="already exists.*--force"):
        reparam_tool.reparam_checkpoint(tiny["xckpt"], out, ema=False)
    assert (out / "deploy.json").read_text() == before
    reparam_tool.reparam_checkpoint(tiny["xckpt"], out, ema=False, force=True)
    assert json.loads((out / "deploy.json").read_text())["weights"] == "model"
    assert sorted(p.name for p in out.iterdir()) == ["deploy.json", "deploy.safetensors"]


def test_reparam_refuses_to_write_when_verification_fails(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folding bug (here: a shifted bias in the deploy model) must stop the write."""

    def broken(model: torch.nn.Module) -> torch.nn.Module:
        deploy = reparameterize_model(model)
        with torch.no_grad():
            deploy.layer3[0].conv2.bias.add_(0.5)
        return deploy

    monkeypatch.setattr(reparam_tool, "reparameterize_model", broken)
    with pytest.raises(ToolError, match="verification failed.*nothing written"):
        reparam_tool.reparam_checkpoint(tiny["xckpt"], tmp_path / "d")
    assert _files(tmp_path) == []


def test_reparam_atol_is_a_hard_limit(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="verification failed"):
        reparam_tool.reparam_checkpoint(tiny["xckpt"], tmp_path / "d", atol=1e-12)
    assert _files(tmp_path) == []


def test_reparam_verifies_on_real_images_with_data(tiny: dict[str, Path], tmp_path: Path) -> None:
    record = reparam_tool.reparam_checkpoint(tiny["xckpt"], tmp_path / "d", data=tiny["data"])
    data = record["verification"]["data"]
    assert data["num_images"] == 12 and data["agreement"] == 1.0
    assert data["max_abs_diff"] <= 1e-3


def test_reparam_of_a_baseline_is_the_same_network(tiny: dict[str, Path], tmp_path: Path) -> None:
    record = reparam_tool.reparam_checkpoint(tiny["bckpt"], tmp_path / "d")
    assert record["reparameterized_modules"] == 0 and record["weights"] == "model"
    assert record["verification"]["max_abs_diff"] == 0.0


# ----------------------------------------------------------------------------- bad inputs


def _bad_checkpoint(kind: str, tiny: dict[str, Path], tmp_path: Path) -> tuple[Path, str]:
    """(path, message pattern) of an unusable checkpoint of the given kind."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if kind == "not_a_checkpoint":
        path = tmp_path / "notes.pt"
        path.write_text("these are not the weights you are looking for\n")
        return path, "cannot read checkpoint"
    if kind == "truncated":
        path = tmp_path / "truncated.pt"
        data = tiny["xckpt"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated or corrupt"
    if kind == "other_arch":
        # resnet18 (baseline) weights in a checkpoint whose config says xresnet18
        path = make_checkpoint(
            tmp_path / "other.pt", model_config(), weights_cfg=model_config(xvolution=False)
        )
        return path, "missing keys.*layer3.0.conv2.conv.weight.*unexpected keys"
    if kind == "other_num_classes":
        path = make_checkpoint(
            tmp_path / "other.pt", model_config(), weights_cfg=model_config(num_classes=5)
        )
        return path, "size mismatch for fc.weight"
    if kind == "deploy_other_arch":
        path = tmp_path / "deploy"
        shutil.copytree(tiny["deploy"], path)
        sidecar = json.loads((path / "deploy.json").read_text())
        sidecar["model_spec"]["arch"] = "resnet34"
        (path / "deploy.json").write_text(json.dumps(sidecar))
        return path, "deploy.json: model_spec, class_names, weights or data were edited"
    if kind == "deploy_truncated":
        path = tmp_path / "deploy"
        shutil.copytree(tiny["deploy"], path)
        weights = path / "deploy.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return path, "does not match its sidecar.*truncated or modified"
    if kind == "deploy_without_sidecar":
        path = tmp_path / "lonely.safetensors"
        shutil.copy(tiny["deploy"] / "deploy.safetensors", path)
        return path, "missing sidecar"
    raise AssertionError(kind)


BAD_TRAIN = ["not_a_checkpoint", "truncated", "other_arch", "other_num_classes"]
BAD_DEPLOY = ["deploy_other_arch", "deploy_truncated", "deploy_without_sidecar"]


@pytest.mark.parametrize("kind", BAD_TRAIN)
def test_reparam_rejects_bad_checkpoints_and_writes_nothing(
    kind: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    path, pattern = _bad_checkpoint(kind, tiny, tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=pattern) as err:
        reparam_tool.reparam_checkpoint(path, out)
    assert str(path) in str(err.value)  # the message names the file
    assert _files(out) == []


@pytest.mark.parametrize("kind", BAD_TRAIN + BAD_DEPLOY)
def test_eval_rejects_bad_checkpoints_and_writes_nothing(
    kind: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    path, pattern = _bad_checkpoint(kind, tiny, tmp_path / "in")
    results, preds = tmp_path / "results", tmp_path / "preds.csv"
    with pytest.raises(CheckpointError, match=pattern) as err:
        eval_tool.evaluate_checkpoint(
            path,
            eval_tool.EvalOptions(
                data=tiny["data"], results_dir=results, predictions=preds, **EVAL_FAST
            ),
        )
    assert Path(str(path)).name in str(err.value)
    assert _files(results) == [] and not preds.exists()


def test_eval_missing_val_folder_is_an_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    results = tmp_path / "results"
    with pytest.raises(DataError, match="missing val folder"):
        eval_tool.evaluate_checkpoint(
            tiny["xckpt"],
            eval_tool.EvalOptions(data=tmp_path / "nowhere", results_dir=results, **EVAL_FAST),
        )
    assert _files(results) == []


def test_eval_class_count_mismatch_is_an_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = make_val_folder(tmp_path / "two", num_classes=2, per_class=2)
    results = tmp_path / "results"
    with pytest.raises(DataError, match="model predicts 3 classes but .* has 2 class folders"):
        eval_tool.evaluate_checkpoint(
            tiny["xckpt"], eval_tool.EvalOptions(data=data, results_dir=results, **EVAL_FAST)
        )
    assert _files(results) == []


def test_reparam_data_class_count_mismatch_writes_nothing(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    data = make_val_folder(tmp_path / "two", num_classes=2, per_class=2)
    with pytest.raises(DataError, match="class count mismatch"):
        reparam_tool.reparam_checkpoint(tiny["xckpt"], tmp_path / "d", data=data)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- eval


def _pred_column(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as fh:
        return [(r["file"], r["label"], r["pred"]) for r in csv.DictReader(fh)]


def test_eval_training_and_deploy_checkpoints_agree_on_every_image(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    train = eval_tool.evaluate_checkpoint(
        tiny["xckpt"],
        eval_tool.EvalOptions(
            data=tiny["data"], results_dir=results, predictions=tmp_path / "train.csv", **EVAL_BENCH
        ),
    )
    deploy = eval_tool.evaluate_checkpoint(
        tiny["deploy"],
        eval_tool.EvalOptions(
            data=tiny["data"] / "val",  # the val folder itself works too
            results_dir=results,
            predictions=tmp_path / "deploy.csv",
            **EVAL_BENCH,
        ),
    )
    assert (train["deploy"], deploy["deploy"]) == (False, True)
    assert train["weights"] == deploy["weights"] == "ema"
    assert train["num_images"] == deploy["num_images"] == 12
    assert train["top1"] == deploy["top1"] and train["top5"] == deploy["top5"]
    assert train["predictions_sha256"] == deploy["predictions_sha256"]
    rows = _pred_column(tmp_path / "train.csv")
    assert rows == _pred_column(tmp_path / "deploy.csv") and len(rows) == 12
    assert rows[0][0] == "class_0/img_000.JPEG"
    assert len({pred for _, _, pred in rows}) > 1  # not a degenerate constant classifier
    correct = sum(label == pred for _, label, pred in rows)
    assert train["top1_correct"] == correct
    assert deploy["checkpoint"]["source_sha256"] == train["checkpoint"]["sha256"]
    assert train["data"]["fingerprint"] == deploy["data"]["fingerprint"]

    files = sorted(p.name for p in results.iterdir())
    sha_train, sha_deploy = train["checkpoint"]["sha256"], deploy["checkpoint"]["sha256"]
    val = train["data"]["fingerprint"][:8]
    assert files == sorted(
        [
            f"xresnet18_train_ema_torchvision_{sha_train[:12]}_val-{val}_32px-crop1-bilinear.json",
            f"xresnet18_deploy_ema_torchvision_{sha_deploy[:12]}_val-{val}_32px-crop1-bilinear.json",
        ]
    )
    for name in files:
        record = validate_record(json.loads((results / name).read_text()), name)
        assert record["schema_version"] == 1 and record["throughput"]["img_s"] > 0
        assert record["throughput"]["batch_size"] == 5 and record["eval"]["precision"] == "fp32"
        assert record["params"] > 0 and record["gmacs"] > 0 and record["date"]
        assert {"torch", "timm", "xvol"} <= set(record["versions"])


def test_eval_refuses_to_overwrite_a_record(tiny: dict[str, Path], tmp_path: Path) -> None:
    results = tmp_path / "results"
    first = eval_tool.evaluate_checkpoint(
        tiny["bckpt"], eval_tool.EvalOptions(data=tiny["data"], results_dir=results, **EVAL_FAST)
    )
    with pytest.raises(ToolError, match="record already exists.*--force"):
        eval_tool.evaluate_checkpoint(
            tiny["bckpt"],
            eval_tool.EvalOptions(data=tiny["data"], results_dir=results, **EVAL_FAST),
        )
    again = eval_tool.evaluate_checkpoint(
        tiny["bckpt"],
        eval_tool.EvalOptions(data=tiny["data"], results_dir=results, force=True, **EVAL_FAST),
    )
    assert again["top1"] == first["top1"] and len(list(results.iterdir())) == 1


def test_eval_defaults_to_the_checkpoints_data_root(tiny: dict[str, Path]) -> None:
    record = eval_tool.evaluate_checkpoint(
        tiny["xckpt"], eval_tool.EvalOptions(results_dir=None, **EVAL_FAST)
    )
    assert record["data"]["val_dir"] == str((tiny["data"] / "val").resolve())
    assert record["data"]["img_size"] == 32 and record["data"]["crop_pct"] == 1.0


def test_eval_without_benchmark_records_no_throughput(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Throughput is opt-in (--bench): without it the record's img_s is null, and the
    leaderboard reads such records (its rows show no img/s)."""
    assert eval_tool.EvalOptions().bench is False
    assert eval_tool.build_parser().parse_args(["x.pt"]).bench is False
    assert eval_tool.build_parser().parse_args(["x.pt", "--bench"]).bench is True
    results = tmp_path / "results"
    record = eval_tool.evaluate_checkpoint(
        tiny["xckpt"], eval_tool.EvalOptions(data=tiny["data"], results_dir=results, **EVAL_FAST)
    )
    assert record["throughput"]["img_s"] is None
    validate_record(record, "in memory")
    board = leaderboard_tool.build_leaderboard(results, tmp_path / "board")
    assert board["records"] == 1
    (row,) = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    assert row["infer_samples_per_sec"] == ""


def test_eval_flags_come_from_the_options() -> None:
    """Each xvol-eval option is declared once, in EvalOptions: the flags' defaults are its
    defaults, a bad value is refused naming the flag, choices come from its checks."""
    parser = eval_tool.build_parser()
    args = parser.parse_args(["x.pt"])
    for f in dataclasses.fields(eval_tool.EvalOptions):
        if hasattr(args, f.name) and f.name != "results_dir":
            assert getattr(args, f.name) == f.default, f.name
    with pytest.raises(ConfigError, match=r"^--batch-size: expected a positive integer, got 0"):
        eval_tool.EvalOptions(batch_size=0)
    with pytest.raises(ConfigError, match=r"^--precision: expected one of fp32, bf16, fp16"):
        eval_tool.EvalOptions(precision="fp8")
    with pytest.raises(ConfigError, match=r"^--device: expected auto, cpu, cuda or cuda:N"):
        eval_tool.EvalOptions(device="bogus")
    with pytest.raises(SystemExit):
        parser.parse_args(["x.pt", "--on-bad-image", "maybe"])


@pytest.mark.dali
def test_eval_with_the_dali_backend(tiny: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    dali = eval_tool.evaluate_checkpoint(
        tiny["deploy"],
        eval_tool.EvalOptions(data=tiny["data"], results_dir=None, backend="dali", **EVAL_FAST),
    )
    torchvision = eval_tool.evaluate_checkpoint(
        tiny["deploy"], eval_tool.EvalOptions(data=tiny["data"], results_dir=None, **EVAL_FAST)
    )
    assert dali["num_images"] == 12 and dali["data"]["backend"] == "dali"
    assert dali["data"]["fingerprint"] == torchvision["data"]["fingerprint"]
    validate_record(dali, "dali record")


def test_eval_options_default_to_the_command_line_defaults() -> None:
    args = eval_tool.build_parser().parse_args(["run/best.pt", "--no-progress"])
    assert eval_tool.EvalOptions.from_args(args) == eval_tool.EvalOptions()
    args = eval_tool.build_parser().parse_args(["x.pt", "--no-record", "--record-name", "r.json"])
    opts = eval_tool.EvalOptions.from_args(args)
    assert (opts.results_dir, opts.record_file, opts.progress) == (None, "r.json", True)


def test_evaluate_keeps_per_image_predictions_and_counts_non_finite_logits() -> None:
    """The loop xvol-eval and the trainer share: exact counts, top-k rows, NaN rows counted."""

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits[: x.shape[0]]

    logits = torch.tensor([[9.0, 0, 0], [0, 1, 9], [float("nan"), 0, 0]])
    labels = torch.tensor([0, 1, 2])
    loader = [(torch.zeros(3, 3, 2, 2), labels)]
    out = evaluate(Fixed(), loader, device=torch.device("cpu"), predictions=True)
    assert (out.top1_correct, out.count, out.nonfinite) == (1, 3, 1)
    assert out.topk is not None and out.topk.shape == (3, 3)  # k capped at the class count
    assert out.topk[:2, 0].tolist() == [0, 2] and out.labels.tolist() == [0, 1, 2]
    # an image with non-finite logits makes the metrics NaN (never a best value)
    assert math.isnan(out.metrics()["top1"]) and math.isnan(out.metrics()["loss"])
    assert evaluate(Fixed(), [], device=torch.device("cpu"), predictions=True).topk.shape[0] == 0


# ----------------------------------------------------------------------------- leaderboard


@pytest.fixture(scope="module")
def records(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results/ with xresnet18 (training form, deploy) and its resnet18 baseline."""
    results = tmp_path_factory.mktemp("results")
    for ckpt in (tiny["xckpt"], tiny["deploy"], tiny["bckpt"]):
        eval_tool.evaluate_checkpoint(
            ckpt, eval_tool.EvalOptions(data=tiny["data"], results_dir=results, **EVAL_FAST)
        )
    return results


def test_leaderboard_pairs_models_with_baselines_and_deploy_forms(
    records: Path, tmp_path: Path
) -> None:
    out = tmp_path / "board"
    result = leaderboard_tool.build_leaderboard(records, out)
    assert result["records"] == 3
    assert result["baseline_pairs"] == 2  # both xresnet18 forms against resnet18
    assert result["deploy_pairs"] == 1
    md = (out / "leaderboard.md").read_text()
    assert md == result["markdown"]
    main_rows = [line for line in md.splitlines() if line.startswith("| ") and ".json" in line]
    assert len(main_rows) == 3
    assert "| xresnet18 (train, ema) | resnet18 (train, model) |" in md
    deploy_row = next(line for line in md.splitlines() if "| yes |" in line)
    assert deploy_row.startswith("| xresnet18 | ema |")
    with open(out / "leaderboard.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and set(rows[0]) == set(CSV_COLUMNS)
    assert {r["form"] for r in rows} == {"train", "deploy"}
    assert {r["model"] for r in rows} == {"xresnet18", "resnet18"}
    assert {r["backend"] for r in rows} == {"torchvision"}
    page = (out / "leaderboard.html").read_text()
    # ranked, seeds, baseline, deploy (the seed-paired table is empty: no recipe in these
    # hand-made checkpoints, so it says why instead)
    assert page.count("<table>") == 4
    assert "no X-volution record with a baseline record of the same backbone, recipe" in page
    assert (out / "leaderboard.md").read_text().count("](../") == 3  # links to the records
    (png,) = result["files"]["png"]
    assert f'src="{Path(png).name}"' in page and f"]({Path(png).name})" in md
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] == 1400


def _copy_records(records: Path, tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(records, results)
    return results


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda r: "{not json", "not valid JSON"),
        (lambda r: json.dumps({k: v for k, v in r.items() if k != "top1"}), "missing 'top1'"),
        (lambda r: json.dumps({**r, "top1": "91.2"}), "'top1' is str"),
        (lambda r: json.dumps({**r, "top1": 120.0}), r"outside \[0, 100\]"),
        (lambda r: json.dumps({**r, "schema_version": 99}), "unsupported schema_version"),
        (lambda r: json.dumps([r]), "not a JSON object"),
    ],
    ids=["json", "missing", "type", "range", "schema", "list"],
)
def test_leaderboard_rejects_malformed_records_naming_the_file(
    records: Path, tmp_path: Path, damage, pattern: str
) -> None:
    results = _copy_records(records, tmp_path)
    victim = sorted(results.glob("resnet18_*.json"))[0]
    record = json.loads(victim.read_text())
    bad = results / "zz_bad.json"
    bad.write_text(damage(record))
    with pytest.raises(RecordError, match=pattern) as err:
        leaderboard_tool.build_leaderboard(results)
    assert str(bad) in str(err.value)
    assert not list(results.glob("leaderboard.*"))  # nothing written
    # --skip-bad: warn and go on with the good ones
    assert leaderboard_tool.build_leaderboard(results, skip_bad=True)["records"] == 3


def test_leaderboard_rejects_duplicate_records(records: Path, tmp_path: Path) -> None:
    results = _copy_records(records, tmp_path)
    original = sorted(results.glob("resnet18_*.json"))[0]
    copy = results / "copy_of_baseline.json"
    shutil.copy(original, copy)
    with pytest.raises(RecordError, match="duplicate record") as err:
        leaderboard_tool.build_leaderboard(results)
    assert str(copy) in str(err.value) and str(original) in str(err.value)


def test_leaderboard_without_records_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="no eval records"):
        leaderboard_tool.build_leaderboard(tmp_path)
    with pytest.raises(ToolError, match="no results directory"):
        leaderboard_tool.build_leaderboard(tmp_path / "missing")


# ----------------------------------------------------------------------------- export


def test_export_onnx_matches_pytorch(tiny: dict[str, Path], tmp_path: Path) -> None:
    """TorchScript exporter here (fast); the dynamo default runs in test_tools_e2e.py."""
    out = tmp_path / "model.onnx"
    record = export_tool.export_onnx(tiny["deploy"], out, opset=17, exporter="torchscript")
    assert out.is_file() and record["opset"] == 17 and record["parity"]["opset"] == 17
    assert record["parity"]["max_abs_diff"] <= 1e-4 and record["parity"]["batch_sizes"] == [1, 2]
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    # a fresh input: float32 rounding grows with the logits (|logit| ~ 6 here), so relative too
    torch.testing.assert_close(got, _logits_of(tiny["deploy"], x), atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp files left


def _logits_of(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path).model(x)


def test_export_refuses_existing_file_and_old_opsets(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    with pytest.raises(ToolError, match="already exists"):
        export_tool.export_onnx(tiny["deploy"], out, exporter="torchscript", opset=17)
    assert out.read_text() == "keep me"
    with pytest.raises(ConfigError, match=r"^--opset: expected opset 17 or newer, got 16"):
        export_tool.export_onnx(tiny["deploy"], tmp_path / "a.onnx", opset=16)
    for flag, value in (("--img-size", 0), ("--batch-size", 0)):  # not a silent default
        expected = rf"^{flag}: expected a positive integer( or null)?, got 0"
        with pytest.raises(ConfigError, match=expected):
            export_tool.export_onnx(
                tiny["deploy"], tmp_path / "a.onnx", **{flag[2:].replace("-", "_"): value}
            )
    with pytest.raises(ToolError, match="exporter torchscript for opset 17"):
        export_tool.export_onnx(tiny["deploy"], tmp_path / "a.onnx", opset=17)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_refuses_on_parity_failure(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def off_by_one(model, onnx_path, inputs):  # what a wrong graph would report
        return {"opset": 17, "batch_sizes": [1], "max_abs_diff": 1.0, "max_abs_logit": 1.0}

    monkeypatch.setattr(export_tool, "check_parity", off_by_one)
    with pytest.raises(ToolError, match="differs from PyTorch.*nothing written"):
        export_tool.export_onnx(
            tiny["deploy"], tmp_path / "m.onnx", opset=17, exporter="torchscript"
        )
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("entry", "prog"),
    [
        (reparam_tool.main, "xvol-reparam"),
        (eval_tool.main, "xvol-eval"),
        (leaderboard_tool.main, "xvol-leaderboard"),
        (export_tool.main, "xvol-export"),
    ],
)
def test_console_entry_points_have_a_helpful_help(
    entry, prog: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "argv", [prog, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        entry()
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {prog}") and "examples:" in text and "--debug" in text


@pytest.mark.slow
def test_cli_errors_are_one_line_without_traceback(tiny: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    cmd = [str(ROOT / "tools" / "reparam.py"), str(bad), "--out", str(tmp_path / "o")]
    proc = run_python(cmd, fresh=True)  # the real interpreter once: no traceback from start-up
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("xvol-reparam: error: ") and str(bad) in lines[-1]
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    debug = run_python([*cmd, "--debug"])
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("tool", "options", "required"),
    [
        (eval_tool, eval_tool.EvalOptions, []),
        (reparam_tool, reparam_tool.ReparamOptions, ["--out", "d"]),
        (export_tool, export_tool.ExportOptions, ["--out", "m.onnx"]),
    ],
)
def test_checkpoint_tools_share_one_declaration_of_their_common_flags(
    tool: object, options: type, required: list[str]
) -> None:
    """--ema, --img-size and --force are CheckpointToolOptions' fields in every checkpoint tool: the
    same help, the same parsing, the same refusal naming the flag."""
    parser = tool.build_parser()
    shown = " ".join(parser.format_help().split())
    for f in dataclasses.fields(CheckpointToolOptions):
        assert " ".join(f.metadata["help"].split()) in shown, (tool.__name__, f.name)

    def parse(*flags: str) -> CheckpointToolOptions:
        return options_from_args(options, parser.parse_args(["x.pt", *required, *flags]))

    assert (parse().ema, parse().img_size, parse().force) == (None, None, False)
    assert (parse("--ema").ema, parse("--no-ema").ema) == (True, False)
    assert parse("--force").force is True
    assert parse("--img-size", "96").img_size == 96
    with pytest.raises(ConfigError, match=r"^--img-size: expected a positive integer.*, got 0$"):
        parse("--img-size", "0")


def test_reparam_flags_come_from_the_options() -> None:
    """xvol-reparam's options are declared once, in ReparamOptions (defaults, checks, help)."""
    parser = reparam_tool.build_parser()
    args = parser.parse_args(["x.pt", "--out", "d"])
    assert options_from_args(reparam_tool.ReparamOptions, args) == reparam_tool.ReparamOptions()
    args = parser.parse_args(["x.pt", "--out", "d", "--atol", "0.5", "--verify-batch", "3"])
    opts = options_from_args(reparam_tool.ReparamOptions, args)
    assert (opts.atol, opts.verify_batch) == (0.5, 3)
    shown = " ".join(parser.format_help().split())
    assert "max |logit difference| allowed (default: 0.001)" in shown
    with pytest.raises(ConfigError, match=r"^--atol: expected a positive number, got 0"):
        reparam_tool.ReparamOptions(atol=0)
    with pytest.raises(ConfigError, match=r"^--device: expected cpu, cuda or cuda:N, got 'auto'"):
        reparam_tool.ReparamOptions(device="auto")
    args = parser.parse_args(["x.pt", "--out", "d", "--verify-batch", "0"])
    with pytest.raises(ConfigError, match=r"^--verify-batch: expected a positive integer"):
        options_from_args(reparam_tool.ReparamOptions, args)
