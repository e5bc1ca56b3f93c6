"""Checkpoints, sidecars and val folders as hostile inputs to the post-training tools.

Through the commands (each tool's ``main(argv)``, and the scripts as subprocesses where the
one-line stderr matters):

- no code runs from a file: a weights_only-safe checkpoint (or a deploy sidecar) whose model
  config names a ``_target_`` that would create a file is refused in one line naming the file
  and key, by xvol-reparam, xvol-eval, xvol-export and scripts/train.py resume=PATH;
- an edited deploy sidecar (spec, class names, weights choice) is refused, old format 1
  sidecars still load and an edit of theirs is refused too;
- val class folders that differ from the checkpoint's class names are refused (unless
  --allow-class-mismatch);
- non-finite logits fail xvol-reparam's verification, xvol-export's parity check and xvol-eval;
- a format 3 sidecar rewritten as format 1 cannot name another network; an edited
  eval transform (data.img_size, crop_pct, interpolation) is refused, and that of a format 2
  sidecar (no hash covers it) is not used; training checkpoints hold the weights under timm's
  names, so timm's load_checkpoint(use_ema=True) reads the EMA; timm's scripts run through
  ``python -m xvol.cli.timm_script``, which refuses a namespace-package ``xvol``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from helpers import one_error_line, run_python
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tools_helpers import (
    CRAFTED,
    ROOT,
    crafted_model_config,
    make_checkpoint,
    make_v1_deploy,
    make_val_folder,
    model_config,
    poison_checkpoint,
)

import xvol.config  # noqa: F401  (registers the trainer/debug schemas the configs compose with)
from xvol.cli import eval as eval_tool
from xvol.cli import export as export_tool
from xvol.cli import reparam as reparam_tool
from xvol.formats.load import load_model
from xvol.models import ModelSpec, ModelSpecError
from xvol.reparam import reparameterize_model

EVAL_ARGS = ["--device", "cpu", "--workers", "0", "--batch-size", "5", "--bench-iters", "0"]
EXPORT_ARGS = ["--exporter", "torchscript", "--opset", "17"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """Tiny tensors on a shared CPU: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Val folder, an X-volution checkpoint, its deploy dir (format 3) and a format 1 copy."""
    base = tmp_path_factory.mktemp("trust")
    torch.set_num_threads(1)
    data = make_val_folder(base / "data")
    ckpt = make_checkpoint(base / "xresnet18.pt", data_root=str(data))
    reparam_tool.reparam_checkpoint(ckpt, base / "deploy")
    v1 = make_v1_deploy(base / "deploy", base / "deploy_v1", model_config())
    return {"base": base, "data": data, "ckpt": ckpt, "deploy": base / "deploy", "v1": v1}


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _fails(tool: ModuleType, argv: list[str]) -> str:
    """The tool's exit message: exit status 1 as ``prog: error: <one line>``."""
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    message = exit_info.value.code
    assert isinstance(message, str), message
    assert "\n" not in message and ": error: " in message, message
    return message


def _tool_argv(name: str, checkpoint: Path, out: Path, data: Path) -> list[str]:
    if name == "reparam":
        return [str(checkpoint), "--out", str(out)]
    if name == "eval":
        return [str(checkpoint), "--data", str(data), "--results-dir", str(out), *EVAL_ARGS]
    return [str(checkpoint), "--out", str(out / "model.onnx"), *EXPORT_ARGS]


TOOLS = {"reparam": reparam_tool, "eval": eval_tool, "export": export_tool}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}


# ----------------------------------------------------------------------------- the model spec


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "model").glob("[!_]*")))
def test_model_spec_reads_every_model_config(name: str) -> None:
    """Each configs/model option, composed and resolved as scripts/train.py stores it."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", "data.num_classes=7"])
    stored = OmegaConf.to_container(cfg.model, resolve=True)
    spec = ModelSpec.from_config(stored, "config.yaml")
    assert spec.arch == stored["arch"] and spec.num_classes == 7
    assert spec.xvolution == name.startswith("x") and spec.identity()["model"] == name
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    if name in ("resnet18", "xresnet18"):  # the spec builds what Hydra builds from the config
        built, reference = spec.build(), instantiate(cfg.model)
        assert built.state_dict().keys() == reference.state_dict().keys()
        assert [type(m) for m in built.modules()] == [type(m) for m in reference.modules()]


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ({"_target_": "timm.create_model"}, "model._target_"),
        ({"arch": "resnet17"}, "model.arch"),  # not a timm model
        ({"arch": "xresnet50"}, "model.arch"),  # xvol's own entry: never converted twice
        ({"arch": "../../etc/passwd"}, "model.arch"),
        ({"num_classes": 0}, "model.num_classes"),
        ({"num_classes": "3"}, "model.num_classes"),
        ({"stages": [0]}, "model.stages[0]"),
        ({"stages": []}, "model.stages"),
        ({"drop_path_rate": 1.5}, "model.drop_path_rate"),
        ({"zero_init_last": "yes"}, "model.zero_init_last"),
        ({"act_layer": "torch.nn.GELU"}, "model.act_layer"),
        ({"xconv": {"_target_": "xvol.ops.XConv2d", "_partial_": True, "shifts": [0]}}, "shifts"),
        ({"xconv": {"_target_": "xvol.ops.XConv2d", "shifts": [1]}}, "model.xconv._partial_"),
        (
            {"xconv": {"_target_": "xvol.ops.XConv2d", "_partial_": True, "impl": "cuda_fast"}},
            "model.xconv.impl",
        ),
    ],
)
def test_model_spec_refuses_other_configs_naming_the_key(edit: dict, key: str) -> None:
    with pytest.raises(ModelSpecError) as err:
        ModelSpec.from_config({**model_config(), **edit}, "run/best.pt")
    message = str(err.value)
    assert message.startswith("run/best.pt: ") and key in message and "\n" not in message


# ----------------------------------------------------------------------------- no code runs


@pytest.mark.parametrize("kind", CRAFTED)
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_crafted_checkpoint_runs_no_code(
    tool: str, kind: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    ckpt = make_checkpoint(
        tmp_path / "crafted.pt", crafted_model_config(kind, marker), weights_cfg=model_config()
    )
    out = tmp_path / "out"
    message = _fails(TOOLS[tool], _tool_argv(tool, ckpt, out, tiny["data"]))
    assert not marker.exists(), f"{tool} ran code from {kind}"
    assert str(ckpt) in message and "config.model" in message
    assert _files(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_crafted_checkpoint_is_one_line_from_the_command_line(
    tool: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The torch.load(weights_only=False) payload, through the script itself."""
    marker = tmp_path / "pwned"
    ckpt = make_checkpoint(
        tmp_path / "crafted.pt",
        crafted_model_config("torch_load", marker),
        weights_cfg=model_config(),
    )
    out = tmp_path / "out"
    proc = run_python(
        [str(ROOT / "tools" / f"{tool}.py"), *_tool_argv(tool, ckpt, out, tiny["data"])]
    )
    assert not marker.exists()
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr  # printed once
    assert errors[0].startswith(f"xvol-{tool}: error: {ckpt}: config.model._target_: 'torch.load'")
    assert "Traceback" not in proc.stderr and _files(out) == []


@pytest.mark.parametrize("form", ["v1_model_config", "v2_model_spec", "v2_xconv_in_spec"])
@pytest.mark.parametrize("tool", ["eval", "export"])
def test_crafted_deploy_sidecar_runs_no_code(
    tool: str, form: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    deploy = tmp_path / "deploy"
    shutil.copytree(tiny["v1" if form.startswith("v1") else "deploy"], deploy)
    sidecar = json.loads((deploy / "deploy.json").read_text())
    if form == "v1_model_config":
        sidecar["model_config"], key = crafted_model_config("xconv_touch", marker), "model_config"
    elif form == "v2_model_spec":
        sidecar["model_spec"], key = crafted_model_config("touch", marker), "model_spec"
    else:
        sidecar["model_spec"]["xconv"] = crafted_model_config("touch", marker)
        key = "model_spec.xconv"
    (deploy / "deploy.json").write_text(json.dumps(sidecar))
    out = tmp_path / "out"
    message = _fails(TOOLS[tool], _tool_argv(tool, deploy, out, tiny["data"]))
    assert not marker.exists()
    assert f"{deploy / 'deploy.json'}: {key}" in message
    assert _files(out) == []


@pytest.mark.slow
def test_resume_from_a_crafted_checkpoint_runs_no_code(tmp_path: Path) -> None:
    """scripts/train.py resume=PATH builds from the run's own config, never the checkpoint's.

    A real one-epoch run's last.pt with its stored model config replaced by the torch.load
    payload: resuming it is refused in one line (which network it trained cannot be read, so
    the run cannot be continued as the same one), nothing is written, the payload never runs.
    """
    marker = tmp_path / "pwned"
    common = [
        str(ROOT / "scripts" / "train.py"),
        "model=resnet18",
        "data=synthetic",
        "data.num_classes=3",
        "data.img_size=32",
        "data.batch_size=2",
        "data.length=1",
        "data.val_length=1",
        "trainer.progress_bar=false",
        f"paths.output_dir={tmp_path / 'outputs'}",
    ]

    def train(*args: str) -> subprocess.CompletedProcess:
        return run_python([*common, *args])

    first = train("run_name=first", "trainer.epochs=1", "resume=null")
    assert first.returncode == 0, first.stderr[-2000:]
    state = torch.load(tmp_path / "outputs" / "first" / "last.pt", weights_only=True)
    state["config"]["model"] = crafted_model_config("torch_load", marker)
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    second = train("run_name=second", "trainer.epochs=2", f"resume={crafted}")
    assert not marker.exists(), second.stdout + second.stderr
    line = one_error_line(second)
    assert line.startswith(f"error: {crafted}: trained as another network") and (
        "config.model._target_: 'torch.load' is not an xvol model builder" in line
    )
    assert not list((tmp_path / "outputs" / "second").glob("*.pt"))


# ----------------------------------------------------------------------------- sidecar edits


def _edited(tiny: dict[str, Path], tmp_path: Path, source: str, edit: Any) -> Path:
    deploy = tmp_path / "deploy"
    shutil.copytree(tiny[source], deploy)
    sidecar = json.loads((deploy / "deploy.json").read_text())
    edit(sidecar)
    (deploy / "deploy.json").write_text(json.dumps(sidecar, indent=2))
    return deploy


def _set(path: str, value: Any) -> Any:
    def edit(sidecar: dict) -> None:
        *parents, last = path.split(".")
        node = sidecar
        for part in parents:
            node = node[part]
        node[last] = value

    return edit


EDITS_V2 = {
    "shifts": _set("model_spec.shifts", [2]),
    "center": _set("model_spec.center", True),
    "bn_eps": _set("model_spec.bn_eps", 1e-3),
    "class_names": _set("class_names", ["class_1", "class_0", "class_2"]),
    "weights": _set("weights", "model"),
    "integrity_removed": lambda s: s.pop("integrity_sha256"),
    # the eval transform xvol-eval uses by default
    "img_size": _set("data.img_size", 64),
    "crop_pct": _set("data.crop_pct", 0.5),
    "interpolation": _set("data.interpolation", "bicubic"),
    "data_removed": lambda s: s.pop("data"),
}


@pytest.mark.parametrize("edit", sorted(EDITS_V2))
@pytest.mark.parametrize("tool", ["eval", "export"])
def test_edited_sidecar_is_refused(
    tool: str, edit: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    deploy = _edited(tiny, tmp_path, "deploy", EDITS_V2[edit])
    out = tmp_path / "out"
    message = _fails(TOOLS[tool], _tool_argv(tool, deploy, out, tiny["data"]))
    assert f"{deploy / 'deploy.json'}: model_spec, class_names, weights or data were edited" in (
        message
    )
    assert "re-run xvol-reparam" in message and _files(out) == []


def test_model_config_added_to_a_new_sidecar_is_refused(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    cfg = model_config()
    cfg["xconv"]["shifts"] = [2]
    deploy = _edited(tiny, tmp_path, "deploy", _set("model_config", cfg))
    message = _fails(eval_tool, _tool_argv("eval", deploy, tmp_path / "out", tiny["data"]))
    assert "deploy.json: model_config is not part of deploy format 3" in message


@pytest.mark.slow
def test_edited_sidecar_is_one_line_from_the_command_line(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The issue's reproduction: model_config.xconv.shifts -> [2] in an (old-format) deploy.json."""
    deploy = _edited(tiny, tmp_path, "v1", lambda s: s["model_config"]["xconv"].update(shifts=[2]))
    out = tmp_path / "out"
    argv = _tool_argv("eval", deploy, out, tiny["data"])
    proc = run_python([str(ROOT / "tools" / "eval.py"), *argv])
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert errors == [
        f"xvol-eval: error: {deploy / 'deploy.json'}: model_config differs from the copy in "
        "deploy.safetensors (edited sidecar?): the network would not be the one verified; "
        "re-run xvol-reparam"
    ]
    assert _files(out) == []


def test_format_1_sidecars_still_load(tiny: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    new, old = load_model(tiny["deploy"]), load_model(tiny["v1"])
    assert old.spec == new.spec and old.class_names is None
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(old.model(x), new.model(x), atol=0, rtol=0)
    records = {}
    for name in ("deploy", "v1"):
        argv = [str(tiny[name]), "--data", str(tiny["data"]), "--no-record", "--json", *EVAL_ARGS]
        argv += ["--img-size", "32", "--crop-pct", "1", "--interpolation", "bilinear"]
        assert eval_tool.main(argv) == 0
        records[name] = json.loads(capsys.readouterr().out)
    assert records["v1"]["predictions_sha256"] == records["deploy"]["predictions_sha256"]
    assert records["v1"]["data"]["class_names_match"] is None  # format 1 stores no names
    assert records["deploy"]["data"]["class_names_match"] is True


# ----------------------------------------------------------------------------- class names


def _renamed(data: Path, tmp_path: Path, old: str, new: str) -> Path:
    root = tmp_path / "renamed"
    shutil.copytree(data, root)
    (root / "val" / old).rename(root / "val" / new)
    return root


@pytest.mark.parametrize("form", ["ckpt", "deploy"])
def test_eval_refuses_a_renamed_class_folder(
    form: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    data = _renamed(tiny["data"], tmp_path, "class_1", "class_1_renamed")
    results = tmp_path / "results"
    message = _fails(eval_tool, _tool_argv("eval", tiny[form], results, data))
    assert f"{data / 'val'}: class folders differ from the class names stored in" in message
    assert (
        "1 of 3 labels differ; label 1: 'class_1_renamed' here, 'class_1' in the checkpoint"
        in message
    )
    assert "--allow-class-mismatch" in message and _files(results) == []


def test_eval_shows_the_first_shifted_labels(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A folder renamed to sort first shifts the labels before it: the first differences show."""
    data = _renamed(tiny["data"], tmp_path, "class_2", "aardvark")
    message = _fails(eval_tool, _tool_argv("eval", tiny["ckpt"], tmp_path / "r", data))
    assert (
        "3 of 3 labels differ; label 0: 'aardvark' here, 'class_0' in the checkpoint; "
        "label 1: 'class_0' here, 'class_1' in the checkpoint" in message
    )


def test_eval_allow_class_mismatch_evaluates_and_says_so(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = _renamed(tiny["data"], tmp_path, "class_1", "class_1_renamed")
    results = tmp_path / "results"
    argv = [*_tool_argv("eval", tiny["ckpt"], results, data), "--allow-class-mismatch", "--json"]
    assert eval_tool.main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["data"]["class_names_match"] is False and record["num_images"] == 12
    assert len(_files(results)) == 1


# ----------------------------------------------------------------------------- non-finite


@pytest.fixture(scope="module")
def poisoned(tiny: dict[str, Path]) -> Path:
    return poison_checkpoint(tiny["ckpt"], tiny["base"] / "nan.pt")


def test_reparam_refuses_nan_weights(poisoned: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    message = _fails(reparam_tool, [str(poisoned), "--out", str(out)])
    assert f"{poisoned}: verification failed: the training form gives non-finite" in message
    assert "for 8 of 8 random images" in message and "nothing written" in message
    assert not out.exists()


def test_reparam_refuses_nan_in_the_deploy_form_only(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folding bug that yields NaN (e.g. a zero BN variance divided out) must stop the write."""

    def nan_folding(model: torch.nn.Module) -> torch.nn.Module:
        deploy = reparameterize_model(model)
        with torch.no_grad():
            deploy.layer3[0].conv2.bias[0] = float("nan")
        return deploy

    monkeypatch.setattr(reparam_tool, "reparameterize_model", nan_folding)
    out = tmp_path / "d"
    message = _fails(reparam_tool, [str(tiny["ckpt"]), "--out", str(out)])
    assert "verification failed: the deploy form gives non-finite (NaN/Inf) logits" in message
    assert not out.exists()


def test_export_refuses_nan_weights(poisoned: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    message = _fails(export_tool, [str(poisoned), "--out", str(out), *EXPORT_ARGS])
    assert f"{poisoned}: parity check failed: the PyTorch deploy model gives" in message
    assert "non-finite (NaN/Inf) logits" in message and "nothing written" in message
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_nan_from_onnxruntime_only(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph that gives NaN where PyTorch does not (here: NaN put into the exported copy)."""
    real_export = export_tool._export

    def nan_export(model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        import copy

        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.fc.bias[0] = float("nan")
        real_export(broken, *args, **kwargs)

    monkeypatch.setattr(export_tool, "_export", nan_export)
    out = tmp_path / "m.onnx"
    message = _fails(export_tool, [str(tiny["deploy"]), "--out", str(out), *EXPORT_ARGS])
    assert "parity check failed: ONNX Runtime gives" in message and "non-finite" in message
    assert list(tmp_path.iterdir()) == []


def test_eval_refuses_nan_logits(poisoned: Path, tiny: dict[str, Path], tmp_path: Path) -> None:
    results = tmp_path / "results"
    message = _fails(eval_tool, _tool_argv("eval", poisoned, results, tiny["data"]))
    assert f"{poisoned}: non-finite (NaN/Inf) logits for 12 of 12 val images" in message
    assert _files(results) == []


# ------------------------------------------------------- sidecars, spec fields, eval transforms


def _downgrade(sidecar: dict, shifts: list[int]) -> None:
    """Format 3 -> 1, spec/integrity/class names dropped, another config."""
    for key in ("model_spec", "integrity_sha256", "class_names"):
        sidecar.pop(key)
    cfg = model_config()
    cfg["xconv"]["shifts"] = shifts
    sidecar.update(format_version=1, model_config=cfg)


@pytest.mark.parametrize("shifts", [[2], [1]], ids=["other_network", "same_network"])
def test_sidecar_downgraded_to_format_1_is_refused(
    shifts: list[int], tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Format 3 weights carry model_spec, not model_config; a format 1 sidecar of
    them must not skip the comparison (and the integrity check with it)."""
    deploy = _edited(tiny, tmp_path, "deploy", lambda s: _downgrade(s, shifts))
    out = tmp_path / "out"
    message = _fails(eval_tool, _tool_argv("eval", deploy, out, tiny["data"]))
    assert f"{deploy / 'deploy.json'}: a format 1 sidecar of format 2/3 weights" in message
    assert _files(out) == []


def test_format_1_weights_must_hold_their_model_config(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """A format 1 weights file without the metadata copy is not compared against nothing."""
    from safetensors.torch import load_file, save_file

    from xvol.formats.files import sha256_file

    deploy = tmp_path / "v1"
    shutil.copytree(tiny["v1"], deploy)
    weights = deploy / "deploy.safetensors"
    save_file(load_file(weights), weights, {"format": "pt"})
    sidecar = json.loads((deploy / "deploy.json").read_text())
    sidecar["model_config"]["xconv"]["shifts"] = [2]
    sidecar["weights_sha256"] = sha256_file(weights)
    (deploy / "deploy.json").write_text(json.dumps(sidecar))
    message = _fails(eval_tool, _tool_argv("eval", deploy, tmp_path / "out", tiny["data"]))
    assert "deploy.json: model_config differs from the copy in deploy.safetensors" in message


def _as_format_2(sidecar: dict) -> None:
    """A sidecar as xvol-reparam wrote it before format 3 (no hash over data)."""
    from xvol.formats.deploy import deploy_integrity

    sidecar["format_version"] = 2
    sidecar["integrity_sha256"] = deploy_integrity(sidecar)


def test_format_2_sidecar_loads_but_its_data_is_not_used(
    tiny: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Format 2 covers no data, so an edit there changes nothing."""

    def edit(sidecar: dict) -> None:
        _as_format_2(sidecar)
        sidecar["data"]["img_size"] = 64  # after hashing: format 2 does not cover it

    deploy = _edited(tiny, tmp_path, "deploy", edit)
    with caplog.at_level("WARNING"):
        loaded = load_model(deploy)
    assert loaded.spec == load_model(tiny["deploy"]).spec
    assert loaded.data_config["img_size"] is None and loaded.data_config["root"] is None
    assert "deploy format 2: its data settings" in caplog.text and "not used" in caplog.text
    assert load_model(tiny["deploy"]).data_config["img_size"] == 32  # format 3: vouched for


def _logits_for(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(x)


def test_training_checkpoint_holds_timm_names(tiny: dict[str, Path]) -> None:
    """timm's load_checkpoint(use_ema=True) (validate.py --use-ema) reads the EMA, and
    without use_ema the raw weights, the ones xvol-eval reads with --ema / --no-ema."""
    import timm
    from timm.models import load_checkpoint as timm_load_checkpoint

    state = torch.load(tiny["ckpt"], weights_only=True)
    assert state["state_dict"].keys() == state["model"].keys()
    assert all(state["state_dict_ema"][k] is state["ema"][k] for k in state["ema"])  # one copy
    for use_ema in (True, False):
        ours = load_model(tiny["ckpt"], ema=use_ema).model
        theirs = timm.create_model("xresnet18", num_classes=3)
        timm_load_checkpoint(theirs, str(tiny["ckpt"]), use_ema=use_ema)
        torch.testing.assert_close(_logits_for(theirs), _logits_for(ours), atol=0, rtol=0)


def test_checkpoint_without_timm_names_still_loads(tiny: dict[str, Path], tmp_path: Path) -> None:
    state = torch.load(tiny["ckpt"], weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        state.pop(key)
    old = tmp_path / "old.pt"
    torch.save(state, old)
    torch.testing.assert_close(
        _logits_for(load_model(old).model), _logits_for(load_model(tiny["ckpt"]).model)
    )


def test_timm_names_that_are_other_weights_are_refused(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """timm's tools and xvol's would score two networks: one line naming the file and key."""
    state = torch.load(tiny["ckpt"], weights_only=True)
    state["state_dict_ema"] = state["model"]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "out"
    message = _fails(eval_tool, _tool_argv("eval", bad, out, tiny["data"]))
    assert f"{bad}: 'state_dict_ema' (what timm's tools read) is not the 'ema' weights" in message
    assert _files(out) == []


STUB_VALIDATE = """
import argparse, sys

import timm
import torch
from timm.models import load_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--num-classes", type=int)
parser.add_argument("--checkpoint")
parser.add_argument("--use-ema", action="store_true")
parser.add_argument("--out")
args = parser.parse_args()
assert sys.argv[0].endswith("validate.py"), sys.argv
model = timm.create_model(args.model, num_classes=args.num_classes)
load_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    torch.save(model.eval()(x), args.out)
"""


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_timm_script_runs_timm_scripts_with_xvol_models(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The README's one-liner: a script of timm's validate.py shape (create_model by name, then
    load_checkpoint(use_ema)) sees xresnet18 and scores the EMA."""
    (tmp_path / "validate.py").write_text(STUB_VALIDATE)
    out = tmp_path / "logits.pt"
    argv = ["--model", "xresnet18", "--num-classes", "3", "--checkpoint", str(tiny["ckpt"])]
    proc = run_python(
        ["-m", "xvol.cli.timm_script", "validate.py", *argv, "--use-ema", "--out", str(out)],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    ema = load_model(tiny["ckpt"], ema=True).model
    torch.testing.assert_close(torch.load(out), _logits_for(ema), atol=0, rtol=0)


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_timm_script_refuses_a_namespace_xvol(tmp_path: Path) -> None:
    """Run from the parent folder of a clone named xvol, ``import xvol`` is that folder (a
    namespace package, nothing registered): one line naming it, the script never runs."""
    (tmp_path / "xvol").symlink_to(ROOT, target_is_directory=True)
    marker = tmp_path / "ran"
    (tmp_path / "validate.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.run(
        [sys.executable, "-m", "xvol.cli.timm_script", "validate.py"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"xvol-timm: error: 'import xvol' found the folder {tmp_path / 'xvol'}")
    assert "no xvol model is registered with timm; run from another directory" in line
    assert not marker.exists()
