"""Config composition of scripts/train.py: every option of the groups and every experiment
composes, validates and instantiates; a bad value, a value of the wrong type and an unknown key
each fail in one line naming the key (the trainer's from its schema, xvol/engine/options.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from helpers import TRAIN, one_error_line, run_python
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import xvol.config  # noqa: F401  (registers ${xvol_run_id:})
from xvol.config import (
    TRAIN_CHECKS,
    ConfigError,
    composition_error,
    config_diff,
    validate_train_config,
)
from xvol.engine import TrainerOptions, build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = ["optim", "sched", "trainer", "logger", "paths", "model", "data", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _job(cfg):
    """The job config (the hydra node has runtime-only fields), as scripts/train.py sees it:
    still typed by the schema."""
    job = copy.deepcopy(cfg)
    with open_dict(job):
        job.pop("hydra")
    return job


def _resolve(cfg) -> dict:
    """The job config fully resolved, after the validation scripts/train.py runs first."""
    job = _job(cfg)
    validate_train_config(job)
    return OmegaConf.to_container(job, resolve=True, throw_on_missing=True)


def _check_buildable(cfg) -> None:
    """Resolve everything and build what needs no data on disk: model, optimizer, schedule,
    EMA and Mixup (the data builder is a partial; calling it would read the data set)."""
    _resolve(cfg)
    assert cfg.run_name and str(cfg.hydra.run.dir).endswith(str(cfg.run_name))
    assert cfg.hydra.output_subdir is None and cfg.hydra.job.chdir is False
    model = instantiate(cfg.model)
    optimizer = build_optimizer(instantiate(cfg.optim), model)
    scheduler = build_scheduler(instantiate(cfg.sched), optimizer, 10)
    assert scheduler is not None
    options = OmegaConf.to_object(cfg.trainer)
    assert isinstance(options, TrainerOptions)
    if options.ema is not None:
        assert options.ema.build(model).module is not model
    mixup = options.mixup.build(cfg.data.num_classes, options.label_smoothing)
    assert mixup.num_classes == cfg.data.num_classes
    assert options.loss_fn() is not None
    assert callable(instantiate(cfg.data))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(override: str) -> None:
    resolved = _resolve(_compose([override]))
    assert resolved["trainer"]["epochs"] > 0 and resolved["seed"] == 0
    assert resolved["sched"]["num_epochs"] == resolved["trainer"]["epochs"]


def test_default_config_builds() -> None:
    _check_buildable(_compose(["model.num_classes=10"]))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_builds(experiment: str) -> None:
    _check_buildable(_compose([f"experiment={experiment}"]))


def _error(overrides: list[str]) -> str:
    """The one line a bad config ends in: Hydra's composition error, as the train command
    prints it, or the validator's."""
    try:
        cfg = _compose(overrides)
    except HydraException as err:
        return str(composition_error(err))
    with pytest.raises(ConfigError) as err:
        validate_train_config(_job(cfg))
    return str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=abc", "trainer.epochs: expected a positive integer, got 'abc'"),
        ("trainer.epochs=0", "trainer.epochs: expected a positive integer, got 0"),
        ("trainer.epochs=2.5", "trainer.epochs: expected a positive integer, got 2.5"),
        ("trainer.grad_accum=-1", "trainer.grad_accum: expected a positive integer, got -1"),
        ("trainer.clip_grad=0", "trainer.clip_grad: expected a positive number or null, got 0.0"),
        ("trainer.clip_mode=foo", "trainer.clip_mode: expected one of norm, value, agc, got 'foo'"),
        ("data.batch_size=0", "data.batch_size: expected a positive integer, got 0"),
        ("data.batch_size=-4", "data.batch_size: expected a positive integer, got -4"),
        ("data.img_size=0", "data.img_size: expected a positive integer, got 0"),
        ("data.workers=-1", "data.workers: expected an integer >= 0, got -1"),
        ("optim.lr=-0.1", "optim.lr: expected a positive number, got -0.1"),
        ("trainer.amp=fp8", "trainer.amp: expected auto, bf16, fp16 or none, got 'fp8'"),
        ("trainer.device=gpu", "trainer.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("trainer.compile=maybe", "trainer.compile: expected true or false, got 'maybe'"),
        ("trainer.channels_last=2", "trainer.channels_last: expected auto, true or false, got 2"),
        ("trainer.checkpoint.mode=maximum", "trainer.checkpoint.mode: expected one of max, min"),
        (
            "trainer.checkpoint.keep_top_k=-1",
            "trainer.checkpoint.keep_top_k: expected an integer >= 0, got -1",
        ),
        (
            "trainer.checkpoint.metric=val_acc",
            "trainer.checkpoint.metric: expected auto or a metric of the epoch record (",
        ),
        ("trainer.label_smoothing=1.0", "trainer.label_smoothing: expected a number in [0, 1)"),
        ("trainer.mixup.prob=2", "trainer.mixup.prob: expected a number in [0, 1], got 2.0"),
        ("trainer.ema.decay=abc", "trainer.ema.decay: expected a number in [0, 1], got 'abc'"),
        ("debug.nan_at_step=0", "debug.nan_at_step: expected a positive integer or null, got 0"),
        (
            "trainer.limit_train_batches=0",
            "trainer.limit_train_batches: expected a positive integer or null, got 0",
        ),
        (
            "trainer.epoch=3",
            "trainer.epoch: Could not override 'trainer.epoch': Key 'epoch' not in "
            "'TrainerOptions'",
        ),
        ("data.batch=3", "data.batch: Could not override 'data.batch': Key 'batch' is not in"),
        ("trainer=nope", "trainer: In 'train': Could not find 'trainer/nope' (options: default)"),
        ("model.arch=???", "model.arch: Missing mandatory value"),
        # each was a traceback (Hydra's InstantiationException, KeyError)
        ("model.arch=resnet17", "model.arch: unknown arch 'resnet17': not in timm's ResNet family"),
        ("model.stages=[7]", "model.stages[0]: expected an integer in 1..4, got 7"),
        ("model.xconv.shifts=[0]", "model.xconv.shifts[0]: expected an integer in 1..64, got 0"),
        (
            "data.interpolation=foo",
            "data.interpolation: expected one of bilinear, bicubic, nearest, lanczos, got 'foo'",
        ),
        ("data.on_bad_image=maybe", "data.on_bad_image: expected one of skip, error, got 'maybe'"),
        ("data.crop_pct=0", "data.crop_pct: expected a positive number, got 0"),  # timm: unset
        ("data.validate=maybe", "data.validate: expected one of auto, full, fast, off"),
        ("data.scale=[0.9,0.1]", "data.scale: expected a pair [lo, hi] with 0 < lo <= hi <= 1"),
        ("data.ratio=[1]", "data.ratio: expected a pair [lo, hi] with 0 < lo <= hi, got [1]"),
        ("data.hflip=2", "data.hflip: expected a number in [0, 1], got 2"),
        ("data.reprob=-1", "data.reprob: expected a number in [0, 1], got -1"),
        ("data.remode=blur", "data.remode: expected one of const, rand, pixel, got 'blur'"),
        ("data.dali.device=tpu", "data.dali.device: expected one of auto, gpu, cpu, got 'tpu'"),
        ("model.xconv.center=2", "model.xconv.center: expected true or false, got 2"),
        ("model.drop_rate=2", "model.drop_rate: expected a number in [0, 1], got 2"),
        ("model.stages=[]", "model.stages: empty while xconv is set"),
        # no classifier (0) or another class count than the data's
        ("model.num_classes=0", "model.num_classes: 0 but data.num_classes is 10: the classifier"),
        ("model.num_classes=5", "model.num_classes: 5 but data.num_classes is 10"),
        # the run directory is one folder under paths.output_dir
        ("run_name=../../escape", "run_name: expected one folder name under paths.output_dir"),
        ("run_name=..", "run_name: expected one folder name under paths.output_dir"),
        ("run_name=a/b", "run_name: expected one folder name under paths.output_dir"),
    ],
)
def test_bad_value_names_the_key(override: str, message: str) -> None:
    line = _error([override])
    assert line.startswith(message) and "\n" not in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.xconv.shifts=[80]", "model.xconv.shifts[0]: expected an integer in 1..64, got 80"),
        ("model.xconv.shifts=[1,2,3,4,5,6,7,8,9]", "model.xconv.shifts: at most 8 entries"),
        ("model.arch=nosuch", "model.arch: unknown arch 'nosuch'"),
        ("model.xconv.bn_eps=0", "model.xconv.bn_eps: expected a number in (0, 1], got 0"),
        ("model.xconv.bn_momentum=2", "model.xconv.bn_momentum: expected a number in [0, 1]"),
        ("model.xconv.impl=fast", "model.xconv.impl: expected one of auto, "),
    ],
)
def test_train_refuses_what_the_tools_refuse(override: str, message: str) -> None:
    """One builder: the model node xvol-train checks before anything is built
    (validate_train_config, which run() calls first on every rank) is the ModelSpec the tools
    rebuild from; a value the spec refuses is one line naming the key in both."""
    from xvol.models import ModelSpec, ModelSpecError

    line = _error(["model=xresnet18", override])
    assert line.startswith(message) and "\n" not in line
    job = _job(_compose(["model=xresnet18", override]))
    stored = OmegaConf.to_container(job.model, resolve=True)  # as a checkpoint stores it
    with pytest.raises(ModelSpecError, match=re.escape(message)):
        ModelSpec.from_config(stored, "best.pt", "config.model")


@pytest.mark.parametrize(
    ("override", "value", "message"),
    [
        ("data.name=123", 123, "data.name: expected a non-empty name, got 123"),
        ("data.root=' '", " ", "data.root: expected a folder path, got ' '"),
        ("+data.std=[0.2,0,0.2]", [0.2, 0, 0.2], "data.std: expected 3 finite numbers > 0"),
        ("+data.mean=[0.5,0.5]", [0.5, 0.5], "data.mean: expected 3 finite numbers or null"),
        ("data.crop_pct=-1", -1, "data.crop_pct: expected a positive number, got -1"),
        ("data.interpolation=box", "box", "data.interpolation: expected one of bilinear"),
    ],
)
def test_train_refuses_the_data_values_the_tools_refuse(
    override: str, value: object, message: str, tmp_path: Path
) -> None:
    """The data keys a checkpoint carries for the tools (its eval transform, its val folder) are
    checked by xvol-train as the tools check them: a value one refuses, the other refuses too, in
    one line naming the key (a run would otherwise train and then fail in every tool)."""
    from tools_helpers import make_checkpoint

    from xvol.formats.checkpoint import CheckpointError
    from xvol.formats.load import load_train_checkpoint

    line = _error(["model=xresnet18", override])
    assert line.startswith(message) and "\n" not in line
    key = message.split(":")[0].split(".", 1)[1]
    data = {"name": "tiny", "root": "/data", "num_classes": 3, "img_size": 32, key: value}
    ckpt = make_checkpoint(tmp_path / "best.pt", run_config={"data": data})
    with pytest.raises(CheckpointError) as err:
        load_train_checkpoint(ckpt)
    assert str(err.value).startswith(f"{ckpt}: {message}")


def test_the_data_keys_of_a_checkpoint_have_one_declaration() -> None:
    """xvol-train checks each key the tools read from a checkpoint's data node with the very
    check the loader uses (xvol.formats.load.DATA_CHECKS), not a copy of it."""
    from xvol.formats.load import DATA_CHECKS

    assert DATA_CHECKS and all(TRAIN_CHECKS[f"data.{k}"] is c for k, c in DATA_CHECKS.items())


def test_a_model_the_spec_cannot_tell_is_unbuildable_is_one_line() -> None:
    """An arch outside the ResNet family whose selection matches no convolution passes the spec
    (only building can tell); xvol-train's build says so in one line naming model.convert."""
    from xvol.cli.train import build_network

    job = _job(_compose(["model=xregnety_008", "model.convert.include=[nomatch]"]))
    spec = validate_train_config(job)
    with pytest.raises(ConfigError) as err:
        build_network(spec)
    line = str(err.value)
    assert line.startswith("model.convert: cannot build xregnety_008-sel") and "\n" not in line
    assert "nothing to swap" in line and "include=['nomatch']" in line


@pytest.mark.parametrize("stages", ["[3,3]", "[4,3]", "[3]"])
def test_train_builds_the_spec_the_tools_rebuild(stages: str) -> None:
    """What training builds (validate_train_config's spec, built by xvol.cli.train.train) is what
    a tool rebuilds from the stored config: stages given twice or unsorted read alike."""
    from xvol.models import ModelSpec

    job = _job(_compose(["model=xresnet18", f"model.stages={stages}"]))
    trained = validate_train_config(job)
    stored = OmegaConf.to_container(job.model, resolve=True)
    assert ModelSpec.from_config(stored, "best.pt", "config.model") == trained
    assert trained.stages == (3, 4) if "4" in stages else trained.stages == (3,)


def test_train_builds_through_the_spec() -> None:
    """xvol.cli.train builds the network with the validated spec, not instantiate(cfg.model)."""
    import inspect

    from xvol.cli import train as train_cli

    source = inspect.getsource(train_cli)
    assert "spec.build()" in source and "instantiate(cfg.model)" not in source


def test_every_trainer_key_is_checked() -> None:
    """Every key of the trainer and debug nodes has a check, so a value of the wrong type reads
    like one out of range (the schema declares both)."""
    cfg = _compose([])
    leaves = [
        f"{node}.{key}"
        for node in ("trainer", "debug")
        for key in _leaves(OmegaConf.to_container(cfg[node]))
    ]
    assert leaves and [key for key in leaves if key not in TRAIN_CHECKS] == []


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


@pytest.mark.slow  # one scripts/train.py per case: make test, not test-fast
@pytest.mark.parametrize(
    ("override", "line", "composes"),
    [
        ("trainer.epochs=abc", "error: trainer.epochs: expected a positive integer, got 'abc'", 0),
        ("trainer.epoks=1", "error: trainer.epoks: Could not override 'trainer.epoks': Key", 0),
        ("trainer.grad_accum=0", "error: trainer.grad_accum: expected a positive integer", 1),
        ("debug.signal_at_step=-2", "error: debug.signal_at_step: expected a positive integer", 1),
        # the model node is checked before Hydra instantiates it
        ("model.xconv.shifts=[0]", "error: model.xconv.shifts[0]: expected an integer in 1..64", 1),
        ("model.num_classes=0", "error: model.num_classes: 0 but data.num_classes is 10", 1),
        ("data.interpolation=foo", "error: data.interpolation: expected one of bilinear", 1),
        # OmegaConf's own error, not Hydra's: a key under a node set to null by the same command
        (
            "trainer.ema=null trainer.ema.decay=0.5",
            "error: overrides 'trainer.ema=null trainer.ema.decay=0.5 run_name=bad ",
            0,
        ),
    ],
)
def test_the_command_fails_in_one_line(
    override: str, line: str, composes: int, tmp_path: Path
) -> None:
    """The real command: a bad value, an unknown key or overrides that contradict each other,
    found while composing or validating, end in one error line on rank 0 (exit 1, no
    traceback) before anything is built."""
    proc = run_python([TRAIN, *override.split(), "run_name=bad", f"paths.output_dir={tmp_path}"])
    assert one_error_line(proc).startswith(line)
    # a config that composes has a run directory, where train.log keeps the line; else nothing
    assert [p.name for p in tmp_path.glob("bad/*")] == (["train.log"] if composes else [])


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_run_name_cannot_leave_the_output_dir(tmp_path: Path) -> None:
    """``run_name=../../escape`` made the run directory (train.log and all)
    two levels above paths.output_dir. It is refused before Hydra makes any directory."""
    proc = run_python(  # the real interpreter once: nothing printed or made at start-up
        [TRAIN, "run_name=../../escape", f"paths.output_dir={tmp_path / 'a' / 'b'}"], fresh=True
    )
    line = one_error_line(proc)
    assert line == (
        "error: run_name: expected one folder name under paths.output_dir (no '/', no '..'), "
        "got '../../escape'"
    )
    assert list(tmp_path.iterdir()) == []  # neither escape/ nor a/b/


def test_ema_metric_needs_ema() -> None:
    ok = _job(_compose(["trainer.checkpoint.metric=ema_top1"]))
    validate_train_config(ok)
    with pytest.raises(ConfigError, match="trainer.checkpoint.metric: .* trainer.ema is null"):
        validate_train_config(
            _job(_compose(["trainer.checkpoint.metric=ema_top1", "trainer.ema=null"]))
        )


def test_config_diff_lists_changed_leaves() -> None:
    old = {"optim": {"lr": 0.1, "wd": 0.0}, "trainer": {"epochs": 2}, "gone": 1}
    new = {"optim": {"lr": 5.0, "wd": 0.0}, "trainer": {"epochs": 2}, "added": [1]}
    assert config_diff(old, new) == [
        "added ('(absent)' -> [1])",
        "gone (1 -> '(absent)')",
        "optim.lr (0.1 -> 5.0)",
    ]


def test_checkpoint_metric_auto_follows_ema() -> None:
    """auto is the default and valid with or without EMA (the engine picks ema_top1 or
    val_top1); the EMA rule stays the one rule for explicit ema_* metrics."""
    cfg = _job(_compose([]))
    assert cfg.trainer.checkpoint.metric == "auto"
    validate_train_config(cfg)
    validate_train_config(_job(_compose(["trainer.ema=null"])))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.init_from=''"], "trainer.init_from: expected a checkpoint path or null"),
        (["trainer.init_from_ema=maybe"], "trainer.init_from_ema: expected true or false"),
        (["trainer.init_from_ema=true"], "trainer.init_from_ema: true needs trainer.init_from"),
    ],
)
def test_init_from_values(overrides: list[str], message: str) -> None:
    assert _error(overrides).startswith(message)
    ok = ["trainer.init_from=/runs/a/best.pt", "trainer.init_from_ema=true"]
    validate_train_config(_job(_compose(ok)))


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_help_lists_options_not_shared_bases() -> None:
    """``xvol-train --help`` lists model options, not the ``_``-prefixed bases they extend."""
    proc = run_python([TRAIN, "--help"])
    assert proc.returncode == 0, proc.stderr
    (models,) = [line for line in proc.stdout.splitlines() if line.startswith("model: ")]
    options = models.removeprefix("model: ").split(", ")
    assert "xresnet18" in options and "resnet50" in options
    assert [o for o in options if o.startswith("_")] == []
