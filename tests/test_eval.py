"""Evaluation users can compare: the record's identity (backend, seed, recipe), the
leaderboard per val set, seed aggregation with a paired 95% interval, and xvol-eval's UX (bad
files, summary line, progress, run directories).

Checkpoints are built without training (tests/tools_helpers.py); seed-aggregation records are
edited copies of one real record, with top-1 values whose statistics are known in closed form.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tools_helpers import make_checkpoint, make_val_folder, model_config

from xvol.cli import eval as eval_tool
from xvol.cli import leaderboard as leaderboard_tool
from xvol.cli import reparam as reparam_tool
from xvol.data import DataError
from xvol.formats.checkpoint import CheckpointError
from xvol.formats.load import load_model
from xvol.formats.record import RecordError, recipe_fingerprint, validate_record
from xvol.results import t_quantile_975

EVAL_FAST = {"device": "cpu", "workers": 0, "batch_size": 5, "bench_iters": 0}
RECIPE = {"seed": 3, "optim": {"lr": 0.1}, "trainer": {"epochs": 4, "progress_bar": True}}


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """Tiny tensors on a shared CPU: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two val sets (other images), a seeded X-volution checkpoint with a recipe, its deploy
    form, and a baseline checkpoint."""
    base = tmp_path_factory.mktemp("compare")
    torch.set_num_threads(1)
    data = make_val_folder(base / "data")
    other = make_val_folder(base / "other", per_class=3, seed=1)  # other files: other fingerprint
    xckpt = make_checkpoint(base / "xresnet18.pt", data_root=str(data), run_config=RECIPE)
    bckpt = make_checkpoint(
        base / "resnet18.pt", model_config(xvolution=False), ema=False, seed=5, run_config=RECIPE
    )
    reparam_tool.reparam_checkpoint(xckpt, base / "deploy")
    return {"base": base, "data": data, "other": other, "xckpt": xckpt, "bckpt": bckpt}


# ----------------------------------------------------------------------------- record identity


def test_records_carry_seed_and_recipe_deploy_form_too(tiny: dict[str, Path]) -> None:
    train = eval_tool.evaluate_checkpoint(
        tiny["xckpt"], eval_tool.EvalOptions(data=tiny["data"], **_no_record())
    )
    deploy = eval_tool.evaluate_checkpoint(
        tiny["base"] / "deploy", eval_tool.EvalOptions(data=tiny["data"], **_no_record())
    )
    base = eval_tool.evaluate_checkpoint(
        tiny["bckpt"], eval_tool.EvalOptions(data=tiny["data"], **_no_record())
    )
    assert train["seed"] == deploy["seed"] == base["seed"] == 3
    # same recipe whatever the model: the pairing key of X-volution vs baseline
    assert train["recipe"] == deploy["recipe"] == base["recipe"] is not None
    validate_record(train, "train record")


def test_recipe_ignores_seed_model_and_run_bookkeeping() -> None:
    cfg = {"model": model_config(), "data": {"root": "/a", "img_size": 32}, **RECIPE}
    same = copy.deepcopy(cfg)
    same.update(seed=7, model=model_config(xvolution=False), run_name="other", paths={"x": 1})
    same["data"]["root"] = "/b"
    same["trainer"]["progress_bar"] = False
    assert recipe_fingerprint(cfg) == recipe_fingerprint(same)
    other = copy.deepcopy(cfg)
    other["optim"]["lr"] = 0.2
    assert recipe_fingerprint(other) != recipe_fingerprint(cfg)
    assert recipe_fingerprint({"model": model_config(), "data": {"root": "/a"}}) is None


def test_recipe_of_a_config_from_before_the_trainer_schema_is_the_same() -> None:
    """Old runs stored mixup/ema as _target_ nodes and the debug hooks in trainer: they still
    pair with new runs of the same recipe; the debug group is never part of a recipe."""
    new = {"model": model_config(), "data": {"root": "/a", "num_classes": 3}, **RECIPE}
    new["trainer"] = {**new["trainer"], "label_smoothing": 0.1,
                      "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 0.0},
                      "ema": {"decay": 0.9998, "use_warmup": True}}  # fmt: skip
    old = copy.deepcopy(new)
    old["trainer"].update(debug_nan_at_step=None, debug_signal_at_step=None)
    old["trainer"]["mixup"].update(_target_="timm.data.Mixup", label_smoothing=0.1, num_classes=3)
    old["trainer"]["ema"].update(_target_="timm.utils.ModelEmaV3", _partial_=True)
    debugged = {**copy.deepcopy(new), "debug": {"nan_at_step": 3, "signal_at_step": None}}
    assert recipe_fingerprint(old) == recipe_fingerprint(new) == recipe_fingerprint(debugged)
    other = copy.deepcopy(new)
    other["trainer"]["mixup"]["mixup_alpha"] = 0.8
    assert recipe_fingerprint(other) != recipe_fingerprint(new)


def test_whole_numbers_of_float_options_share_a_recipe(tmp_path: Path) -> None:
    """trainer.clip_grad=5 was stored as 5 before the trainer schema and is 5.0 with it: the
    checkpoints of both runs give one recipe (the tools read the stored config by the schema)."""
    typed = {"clip_grad": 5, "label_smoothing": 0, "mixup": {"cutmix_alpha": 1, "prob": 1}}
    floats = {"clip_grad": 5.0, "label_smoothing": 0.0, "mixup": {"cutmix_alpha": 1.0, "prob": 1.0}}
    recipes = []
    for name, trainer in (("typed", typed), ("floats", floats)):
        run = {"seed": 3, "optim": {"lr": 0.1}, "trainer": {"epochs": 4, **trainer}}
        ckpt = make_checkpoint(tmp_path / f"{name}.pt", run_config=run)
        recipes.append(load_model(ckpt).source["recipe"])
    assert recipes[0] == recipes[1] is not None
    other = make_checkpoint(
        tmp_path / "other.pt",
        run_config={"seed": 3, "optim": {"lr": 0.1}, "trainer": {"epochs": 4, "clip_grad": 6}},
    )
    assert load_model(other).source["recipe"] != recipes[0]


@pytest.mark.dali
def test_two_backends_records_coexist(tiny: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    results = tmp_path / "results"
    for backend in ("torchvision", "dali"):
        eval_tool.evaluate_checkpoint(
            tiny["xckpt"],
            eval_tool.EvalOptions(
                data=tiny["data"], results_dir=results, backend=backend, **EVAL_FAST
            ),
        )
    names = sorted(p.name for p in results.glob("*.json"))
    assert [n.split("_")[3] for n in names] == ["dali", "torchvision"]
    result = leaderboard_tool.build_leaderboard(results)  # no duplicate error
    assert result["records"] == 2
    assert "| dali |" in result["markdown"] and "| torchvision |" in result["markdown"]


def test_duplicate_rule_includes_the_backend(tiny: dict[str, Path], tmp_path: Path) -> None:
    results = tmp_path / "results"
    record = eval_tool.evaluate_checkpoint(
        tiny["xckpt"], eval_tool.EvalOptions(data=tiny["data"], results_dir=results, **EVAL_FAST)
    )
    twin = copy.deepcopy(record)
    twin.pop("record_file")
    twin["data"]["backend"] = "dali"
    (results / "dali_twin.json").write_text(json.dumps(twin))
    assert leaderboard_tool.build_leaderboard(results)["records"] == 2
    twin["data"]["backend"] = "torchvision"
    (results / "dali_twin.json").write_text(json.dumps(twin))
    with pytest.raises(RecordError, match="duplicate record.*backend"):
        leaderboard_tool.build_leaderboard(results)


# ----------------------------------------------------------------------------- val sets


def test_leaderboard_over_two_val_sets_has_two_tables(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    for data in (tiny["data"], tiny["other"]):
        for ckpt in (tiny["xckpt"], tiny["bckpt"]):
            eval_tool.evaluate_checkpoint(
                ckpt, eval_tool.EvalOptions(data=data, results_dir=results, **EVAL_FAST)
            )
    out = tmp_path / "board"
    result = leaderboard_tool.build_leaderboard(results, out)
    assert [vs["records"] for vs in result["val_sets"]] == [2, 2]
    md = result["markdown"]
    sections = re.split(r"^## ", md, flags=re.M)[1:]
    assert len(sections) == 2
    for section, data in zip(sorted(sections, key=lambda t: "other" in t), ("data", "other")):
        assert f"{data}/val" in section.splitlines()[0]
        assert section.count("### Leaderboard (2 records, by top-1)") == 1
        ranked = section.split("### Seeds")[0]
        assert len([line for line in ranked.splitlines() if ".json" in line]) == 2
        # each X-volution record is paired with the baseline on its own val set only
        assert (
            section.count("| xresnet18 (train, ema, seed 3) | resnet18 (train, model, seed 3) |")
            == 1
        )
    pngs = [Path(p) for p in result["files"]["png"]]
    assert len(pngs) == 2 and all(p.is_file() for p in pngs)
    assert len(set(pngs)) == 2 and all(f"]({p.name})" in md for p in pngs)
    # a val set whose records are gone takes its plot with it
    for record in results.glob("*.json"):
        if json.loads(record.read_text())["data"]["val_dir"].startswith(str(tiny["other"])):
            record.unlink()
    again = leaderboard_tool.build_leaderboard(results, out)
    assert len(again["val_sets"]) == 1 and sorted(out.glob("leaderboard_*.png")) == [
        Path(again["files"]["png"][0])
    ]


# ----------------------------------------------------------------------------- seeds


@pytest.fixture(scope="module")
def template(tiny: dict[str, Path]) -> dict[str, Any]:
    return eval_tool.evaluate_checkpoint(
        tiny["xckpt"], eval_tool.EvalOptions(data=tiny["data"], **_no_record())
    )


def _seed_records(
    template: dict[str, Any], results: Path, top1: dict[str, list[float]], recipe: str = "r1"
) -> None:
    """One record per (model, seed): seeds 0, 1, ... with the given top-1 values."""
    for model, values in top1.items():
        xvolution = model.startswith("x")
        for seed, value in enumerate(values):
            r = copy.deepcopy(template)
            r.pop("record_file", None)
            r.update(model=model, xvolution=xvolution, seed=seed, recipe=recipe, top1=value)
            r["model_spec"] = {**r["model_spec"], "stages": [3] if xvolution else []}
            sha = f"{model}{seed:02d}".ljust(64, "0")
            r["checkpoint"] = {**r["checkpoint"], "sha256": sha, "source_sha256": sha}
            (results / f"{model}_{seed}.json").write_text(json.dumps(r))


def test_seed_aggregation_gives_the_paired_mean_and_interval(
    template: dict[str, Any], tmp_path: Path
) -> None:
    """Differences 1.0, 0.5, 1.5: mean 1, std 0.5, n 3, t(0.975, 2) = 4.303, so the interval is
    1 -+ 4.303 * 0.5 / sqrt(3) = [-0.242, 2.242]: it contains zero, and the page says so."""
    results = tmp_path / "results"
    results.mkdir()
    _seed_records(
        template, results, {"xresnet18": [70.0, 71.0, 72.5], "resnet18": [69.0, 70.5, 71.0]}
    )
    result = leaderboard_tool.build_leaderboard(results)
    (vs,) = result["val_sets"]
    assert vs["seed_groups"] == 2
    (paired,) = vs["paired"]
    assert paired["n"] == 3 and paired["seeds"] == [0, 1, 2]
    assert paired["mean"] == pytest.approx(1.0) and paired["std"] == pytest.approx(0.5)
    half = 4.302652729911275 * 0.5 / math.sqrt(3)
    assert (paired["lo"], paired["hi"]) == pytest.approx((1.0 - half, 1.0 + half), abs=1e-6)
    md = result["markdown"]
    assert "| xresnet18 | train | ema | torchvision | 3 | 0, 1, 2 | 71.17 | 1.26 |" in md
    assert "[-0.24, +2.24]" in md and "contains zero" in md


def test_leaderboard_without_matplotlib_writes_tables_and_names_the_extra(
    template: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    _seed_records(template, results, {"xresnet18": [70.0, 71.0], "resnet18": [69.0, 70.5]})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with caplog.at_level("WARNING"):
        result = leaderboard_tool.build_leaderboard(results)
    assert Path(result["files"]["md"]).is_file() and result["files"]["png"] == []
    assert not list(results.glob("*.png"))
    (warning,) = [r.getMessage() for r in caplog.records if "xvol[plot]" in r.getMessage()]
    assert "writing the tables without plots" in warning


def test_baseline_table_pairs_each_seed_with_the_same_seed(
    template: dict[str, Any], tmp_path: Path
) -> None:
    """Not every xresnet18 seed against the single best resnet18: seed with seed."""
    results = tmp_path / "results"
    results.mkdir()
    _seed_records(
        template, results, {"xresnet18": [70.0, 71.0, 72.5], "resnet18": [69.0, 70.5, 71.0]}
    )
    md = leaderboard_tool.build_leaderboard(results)["markdown"]
    for seed, (x, b) in enumerate([(70.0, 69.0), (71.0, 70.5), (72.5, 71.0)]):
        row = (
            f"| xresnet18 (train, ema, seed {seed}) | resnet18 (train, ema, seed {seed}) | "
            f"{x:.2f} | {b:.2f} | {x - b:+.2f} |"
        )
        assert row in md, (row, md)


def test_a_clear_paired_difference_is_stated(template: dict[str, Any], tmp_path: Path) -> None:
    """Differences 1.0, 1.2, 0.8 (std 0.2): [0.503, 1.497], all above zero."""
    results = tmp_path / "results"
    results.mkdir()
    _seed_records(template, results, {"xresnet18": [71.0, 71.2, 70.8], "resnet18": [70.0] * 3})
    (paired,) = leaderboard_tool.build_leaderboard(results)["val_sets"][0]["paired"]
    assert paired["lo"] == pytest.approx(0.503, abs=1e-3) and paired["hi"] > 1.49
    md = leaderboard_tool.build_leaderboard(results)["markdown"]
    assert "xresnet18 is better by +1.00 points" in md and "contains zero" not in md


def test_other_recipes_and_unpaired_seeds_are_not_paired(
    template: dict[str, Any], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    _seed_records(template, results, {"xresnet18": [71.0, 71.2]}, recipe="long")
    _seed_records(template, results, {"resnet18": [70.0, 70.1]}, recipe="short")
    assert leaderboard_tool.build_leaderboard(results)["val_sets"][0]["paired"] == []
    shutil.rmtree(results)
    results.mkdir()
    _seed_records(template, results, {"xresnet18": [71.0], "resnet18": [70.0]})
    (paired,) = leaderboard_tool.build_leaderboard(results)["val_sets"][0]["paired"]
    assert paired["n"] == 1 and paired["lo"] is None
    assert "at least 2 are needed" in leaderboard_tool.build_leaderboard(results)["markdown"]


def test_t_table_matches_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback table (no scipy) against scipy itself, where scipy is installed."""
    stats = pytest.importorskip("scipy.stats")
    expected = {df: float(stats.t.ppf(0.975, df)) for df in [*range(1, 31), 35, 45, 80, 500]}
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    for df, value in expected.items():
        assert t_quantile_975(df) == pytest.approx(value, abs=2e-3), df


# ----------------------------------------------------------------------------- xvol-eval UX


@pytest.fixture()
def dirty_val(tiny: dict[str, Path], tmp_path: Path) -> Path:
    """The val folder plus a text file and a broken JPEG."""
    root = tmp_path / "dirty"
    shutil.copytree(tiny["data"], root)
    (root / "val" / "class_0" / "notes.txt").write_text("not an image")
    (root / "val" / "class_1" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_bad_files_stop_eval_each_named_once(tiny: dict[str, Path], dirty_val: Path) -> None:
    with pytest.raises(DataError) as err:
        eval_tool.evaluate_checkpoint(
            tiny["xckpt"], eval_tool.EvalOptions(data=dirty_val, **_no_record())
        )
    text = str(err.value)
    assert text.startswith("2 file(s) in ") and "--on-bad-image skip" in text
    assert text.count("broken.JPEG") == 1 and text.count("notes.txt") == 1
    assert "data.on_bad_image" not in text  # a key xvol-eval cannot set


def test_bad_files_skipped_and_counted(
    tiny: dict[str, Path], dirty_val: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = eval_tool.evaluate_checkpoint(
        tiny["xckpt"], eval_tool.EvalOptions(data=dirty_val, on_bad_image="skip", **_no_record())
    )
    clean = eval_tool.evaluate_checkpoint(
        tiny["xckpt"], eval_tool.EvalOptions(data=tiny["data"], **_no_record())
    )
    assert record["num_images"] == 12 and record["data"]["skipped_files"] == 2
    assert record["top1"] == clean["top1"]
    assert record["data"]["fingerprint"] == clean["data"]["fingerprint"]  # the same images
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].count("broken.JPEG") == 1


def test_cli_prints_one_summary_line_or_the_record(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [str(tiny["xckpt"]), "--data", str(tiny["data"]), "--device", "cpu", "--workers", "0"]
    argv += ["--bench-iters", "0", "--results-dir", str(tmp_path / "r")]
    assert eval_tool.main(argv) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    assert re.fullmatch(r"top-1 \d+\.\d\d%  top-5 \d+\.\d\d%  images 12  \|  xresnet18 .*", line)
    assert "eval" in captured.err  # the progress bar (stderr)
    assert eval_tool.main([*argv, "--json", "--force", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_images"] == 12 and "eval:" not in captured.err


def test_a_run_directory_means_its_best_checkpoint(tiny: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="neither a run directory.*holds no checkpoint"):
        eval_tool.evaluate_checkpoint(run, eval_tool.EvalOptions(data=tiny["data"], **_no_record()))
    shutil.copy(tiny["xckpt"], run / "last.pt")
    with pytest.raises(CheckpointError, match=r"found last\.pt: pass one of them"):
        eval_tool.evaluate_checkpoint(run, eval_tool.EvalOptions(data=tiny["data"], **_no_record()))
    shutil.copy(tiny["xckpt"], run / "best.pt")
    record = eval_tool.evaluate_checkpoint(
        run, eval_tool.EvalOptions(data=tiny["data"], **_no_record())
    )
    assert record["checkpoint"]["path"] == str((run / "best.pt").resolve())
    deploy = eval_tool.evaluate_checkpoint(
        tiny["base"] / "deploy", eval_tool.EvalOptions(data=tiny["data"], **_no_record())
    )
    assert deploy["deploy"] is True


def _no_record() -> dict[str, Any]:
    return {"results_dir": None, **EVAL_FAST}
