"""Engine units: parameter groups, per-update LR, dist env parsing, the loops, metrics, signals,
and the Trainer's stop/resume cycle in-process (tiny model, fake data, one process)."""

from __future__ import annotations

import errno
import json
import logging
import math
import signal
from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from train_fake_data import build as fake_data

import xvol.models  # noqa: F401  (registers xresnet18 with timm)
from xvol.checks import ConfigError
from xvol.engine import (
    EXIT_NON_FINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    CheckpointError,
    CheckpointOptions,
    DebugOptions,
    EmaOptions,
    JsonlMetrics,
    MetricsLogger,
    NonFiniteLossError,
    PreemptionGuard,
    Trainer,
    TrainerOptions,
    TrainState,
    build_optimizer,
    build_scheduler,
    evaluate,
    load_checkpoint,
    read_dist_env,
    train_one_epoch,
)
from xvol.engine.dist import DistEnv
from xvol.engine.loop import LoopSettings
from xvol.engine.metrics import topk_correct
from xvol.engine.trainer import checkpoint_metric

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _config(group: str, name: str, **extra: object) -> object:
    cfg = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    return OmegaConf.merge(cfg, extra) if extra else cfg


# ------------------------------------------------------------------------------ optimizer


@pytest.mark.parametrize("arch", ["resnet18", "xresnet18"])
def test_sgd_param_groups_no_decay_on_bn_and_bias(arch: str) -> None:
    model = timm.create_model(arch, num_classes=10)
    opt = build_optimizer(instantiate(_config("optim", "sgd")), model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {
        names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    assert decay and no_decay and not decay & no_decay
    assert decay | no_decay == set(names.values())
    for name, p in model.named_parameters():
        if p.ndim <= 1:  # every BN weight/bias and bias
            assert name in no_decay, name
        else:
            assert name in decay, name
    assert any("bn" in n for n in no_decay) and any(n.endswith("fc.bias") for n in no_decay)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_adamw_config_builds() -> None:
    opt = build_optimizer(instantiate(_config("optim", "adamw")), nn.Linear(3, 2))
    assert type(opt).__name__ == "AdamW"
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}


# ------------------------------------------------------------------------------ scheduler


def test_cosine_schedule_steps_per_update() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    sched_cfg = _config("sched", "cosine", num_epochs=4, warmup_epochs=1, warmup_lr=0.0)
    sched = build_scheduler(instantiate(sched_cfg), opt, n_updates=10)
    lrs = []
    for update in range(1, 41):
        sched.step_update(num_updates=update)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < lrs[1] < lrs[8]  # warmup moves within the first epoch
    assert lrs[8] == pytest.approx(0.45)  # linear warmup: 9 of 10 updates
    # then the cosine over all 40 updates (warmup_prefix=false: warmup overlays its start)
    assert lrs[9] == pytest.approx(0.25 * (1 + math.cos(math.pi * 10 / 40)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then cosine decay, update by update
    assert len(set(lrs[10:20])) == 10
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_step_schedule_decays_at_epoch_boundaries() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = build_scheduler(
        instantiate(_config("sched", "step", num_epochs=4, decay_epochs=2)), opt, n_updates=5
    )
    lrs = {}
    for update in range(1, 21):
        sched.step_update(num_updates=update)
        lrs[update] = opt.param_groups[0]["lr"]
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1)


# ------------------------------------------------------------------------------ dist env


def test_dist_env_parsing() -> None:
    assert read_dist_env({}) == DistEnv()
    tr = read_dist_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "29500",
        }
    )
    assert (tr.rank, tr.world_size, tr.local_rank, tr.launcher) == (3, 8, 1, "torchrun")
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "42",
    }
    assert read_dist_env(slurm) == DistEnv()  # an sbatch script's plain python: one process
    env = read_dist_env({**slurm, "SUBMITIT_EXECUTOR": "slurm"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu07" and 20000 <= env.master_port <= 60000
    again = read_dist_env({**slurm, "SUBMITIT_EXECUTOR": "slurm"})
    assert again.master_port == env.master_port  # every task derives the same port


# ------------------------------------------------------------------------------ loops


def _tiny(num_classes: int = 4, bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)]
    return nn.Sequential(*layers)


def _data(**kw: object):
    return fake_data(rank=0, world_size=1, device="cpu", seed=0, **kw)


def test_grad_accumulation_matches_big_batch() -> None:
    """2 x 4 images accumulated == one batch of 8 (loss scaled by the group size)."""
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        model = _tiny(bn=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = _data(batch_size=batch, num_train=32)
        data.train.set_epoch(0)
        state = TrainState()
        done = train_one_epoch(
            model,
            data.train,
            opt,
            nn.CrossEntropyLoss(),
            state,
            steps_per_epoch=data.steps_per_epoch,
            device=torch.device("cpu"),
            opts=LoopSettings(grad_accum=accum, progress_bar=False),
        )
        assert done and state.global_step == 4 and state.step == data.steps_per_epoch
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_before_the_update() -> None:
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _data()
    data.train.set_epoch(0)
    state = TrainState()
    seen: list[torch.Tensor] = []

    def snapshot(s: TrainState, info: dict) -> None:
        seen.append(model[0].weight.detach().clone())

    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1, batch 3, update 3"):
        train_one_epoch(
            model,
            data.train,
            opt,
            nn.CrossEntropyLoss(),
            state,
            steps_per_epoch=data.steps_per_epoch,
            device=torch.device("cpu"),
            opts=LoopSettings(debug=DebugOptions(nan_at_step=3), progress_bar=False),
            on_update=snapshot,
        )
    assert state.global_step == 2
    assert torch.equal(model[0].weight, seen[-1])  # the bad update was not applied
    assert torch.isfinite(model[0].weight).all()


def test_fp16_scaler_gives_up_after_consecutive_skips() -> None:
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _data(num_train=128)
    data.train.set_epoch(0)
    state = TrainState()

    def nan_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y) * float("nan")

    before = model[0].weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="4 consecutive steps skipped"):
        train_one_epoch(
            model,
            data.train,
            opt,
            nan_loss,
            state,
            steps_per_epoch=data.steps_per_epoch,
            device=torch.device("cpu"),
            opts=LoopSettings(max_skipped_steps=3, progress_bar=False),
            scaler=torch.amp.GradScaler("cpu"),
        )
    assert state.skipped_in_a_row == 4
    assert torch.equal(model[0].weight, before)


def test_evaluate_counts_every_image() -> None:
    class Oracle(nn.Module):  # fixed logits: top-1 on 2 rows, top-2 on 3, top-4 on all
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits

    model = Oracle()
    labels = torch.tensor([0, 1, 2, 3])
    model.logits = torch.tensor([[9.0, 0, 0, 0], [0, 5, 9, 0], [0, 0, 9, 0], [1, 2, 3, 0]])
    loader = [(torch.zeros(4, 3, 2, 2), labels)]
    out = evaluate(model, loader, device=torch.device("cpu"))
    assert out["count"] == 4
    assert out["top1"] == pytest.approx(50.0)
    assert out["top5"] == pytest.approx(100.0)
    assert topk_correct(model.logits, labels, (1, 2)).tolist() == [2.0, 3.0]


def test_evaluate_scores_non_finite_outputs_as_non_finite() -> None:
    """A NaN logit has no top-1: with any such image the metrics are NaN, not the share of
    class 0 that argmax over NaN gives (which would be ranked as a real number)."""

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 3)
            out[0] = float("nan")
            return out

    labels = torch.tensor([0, 0, 1])
    out = evaluate(Broken(), [(torch.zeros(3, 3, 2, 2), labels)], device=torch.device("cpu"))
    assert out.nonfinite == 1 and out["count"] == 3
    assert all(math.isnan(out[k]) for k in ("top1", "top5", "loss"))


# ------------------------------------------------------------------------------ metrics


def test_metrics_truncate_drops_records_past_checkpoint(tmp_path: Path) -> None:
    jsonl = JsonlMetrics(tmp_path / "m.jsonl")
    logger = MetricsLogger(jsonl)
    for g in range(1, 7):
        logger.write({"kind": "train", "epoch": (g - 1) // 3 + 1, "step": g, "global_step": g})
        if g % 3 == 0:  # 1-based: the epoch that just finished
            logger.write({"kind": "epoch", "epoch": g // 3, "global_step": g, "x": math.nan})
    logger.close()
    with open(jsonl.path, "a") as fh:
        fh.write('{"kind": "train", "glob')  # a write cut by kill -9
    logger.truncate_after(epochs_done=1, global_step=4)  # resumed in epoch 2 after update 4
    records = jsonl.read()
    assert [(r["kind"], r["global_step"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("epoch", 3),
        ("train", 4),
    ]
    assert records[3]["x"] == "nan"  # JSON has no NaN: kept readable
    assert all(json.loads(line) for line in jsonl.path.read_text().splitlines())


# ------------------------------------------------------------------------------ signals


def test_guard_records_signal_and_chains_previous() -> None:
    calls: list[int] = []
    original = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested
            signal.raise_signal(signal.SIGUSR1)
            assert guard.requested and guard.signum == signal.SIGUSR1 and calls == []
            guard.chain()
            assert calls == [signal.SIGUSR1]
        signal.raise_signal(signal.SIGUSR1)  # our handler is gone again
        assert calls == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, original)


# ------------------------------------------------------------------------------ Trainer


class _Wandb:
    """Stands in for a WandbSink: the run id the Trainer saves and continues."""

    def __init__(self, run_id: str | None) -> None:
        self.id = run_id or "wandb-run-1"

    def write(self, record: dict) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass


def _trainer(
    run_dir: Path,
    guard: PreemptionGuard | None = None,
    debug: DebugOptions | None = None,
    opened: list[str | None] | None = None,
    **options: object,
) -> Trainer:
    """A Trainer as the train command builds one; ``opened`` collects the wandb ids its metrics
    sink is opened with."""
    torch.manual_seed(0)
    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    data = _data(num_train=64, batch_size=8)
    sched_cfg = _config("sched", "cosine", num_epochs=2, warmup_epochs=1)

    def open_metrics(wandb_id: str | None) -> MetricsLogger:
        if opened is not None:
            opened.append(wandb_id)
        return MetricsLogger(JsonlMetrics(run_dir / "metrics.jsonl"), _Wandb(wandb_id))

    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        data=data,
        denv=DistEnv(),
        device=torch.device("cpu"),
        run_dir=run_dir,
        options=TrainerOptions(
            epochs=2,
            label_smoothing=0.0,
            ema=EmaOptions(decay=0.9, use_warmup=True),
            checkpoint=CheckpointOptions(every_steps=3, keep_top_k=1),
            progress_bar=False,
            log_interval=1,
            **options,
        ),
        config={"test": True},
        scheduler=build_scheduler(instantiate(sched_cfg), optimizer, data.steps_per_epoch),
        debug=debug,
        guard=guard,
        metrics=open_metrics,
    )
    torch.manual_seed(1)  # the training stream, as scripts/train.py reseeds after building
    return trainer


def _fit(run_dir: Path, resume: str | None = "auto", **kw: object) -> tuple[Trainer, int]:
    trainer = _trainer(run_dir, PreemptionGuard(), **kw)  # fit() installs it
    trainer.resume(resume)
    code = trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
    return trainer, code


def _stop_at(step: int) -> DebugOptions:
    return DebugOptions(signal_at_step=step)


def test_fit_opens_metrics_with_the_resumed_wandb_run(tmp_path: Path) -> None:
    """Rank 0's sink opens when fit() starts, after resume() restored the run's wandb id, and
    the id it reports goes into every checkpoint; a fresh run opens it with None."""
    opened: list[str | None] = []
    trainer, code = _fit(tmp_path, debug=_stop_at(5), opened=opened)
    assert code == EXIT_PREEMPTED and opened == [None]
    assert load_checkpoint(tmp_path / "last.pt")["wandb_id"] == "wandb-run-1"
    assert trainer.metrics is not None and trainer.metrics.jsonl.path.is_file()
    _, code = _fit(tmp_path, opened=opened)
    assert code == EXIT_OK and opened == [None, "wandb-run-1"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "trainer.epochs: expected a positive integer, got 0"),
        ({"amp": "fp8"}, "trainer.amp: expected auto, bf16, fp16 or none, got 'fp8'"),
        ({"clip_grad": -1.0}, "trainer.clip_grad: expected a positive number or null, got -1.0"),
        ({"ema": EmaOptions(decay=2.0)}, "trainer.ema.decay: expected a number in [0, 1], got 2.0"),
        (
            {"checkpoint": CheckpointOptions(keep_top_k=-1)},
            "trainer.checkpoint.keep_top_k: expected an integer >= 0, got -1",
        ),
    ],
)
def test_trainer_options_check_their_values(options: dict, message: str) -> None:
    """The schema validates without Hydra too: one line naming the key, as the command's."""
    with pytest.raises(ConfigError) as err:
        TrainerOptions(**options)
    assert str(err.value) == message
    assert TrainerOptions(ema=None, mixup=None).ema is None  # null nodes have nothing to check
    with pytest.raises(ConfigError, match=r"^debug.nan_at_step: expected a positive integer"):
        DebugOptions(nan_at_step=0)


def test_trainer_stop_and_resume_is_exact(tmp_path: Path) -> None:
    _, code_a = _fit(tmp_path / "a")
    assert code_a == EXIT_OK
    stopped, code = _fit(tmp_path / "b", debug=_stop_at(11))  # mid epoch 1 (8 per epoch)
    assert code == EXIT_PREEMPTED
    assert (stopped.state.epoch, stopped.state.step, stopped.state.global_step) == (1, 3, 11)
    resumed, code_b = _fit(tmp_path / "b")
    assert code_b == EXIT_OK and resumed.state.global_step == 16
    a, b = load_checkpoint(tmp_path / "a/last.pt"), load_checkpoint(tmp_path / "b/last.pt")
    for key in ("model", "ema", "optimizer"):
        flat_a = [v for v in _tensors(a[key])]
        flat_b = [v for v in _tensors(b[key])]
        assert len(flat_a) == len(flat_b) > 0
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), key
    rec_a = [r for r in JsonlMetrics(tmp_path / "a/metrics.jsonl").read()]
    rec_b = [r for r in JsonlMetrics(tmp_path / "b/metrics.jsonl").read()]
    steps_b = [(r["kind"], r["global_step"]) for r in rec_b]
    assert steps_b == [(r["kind"], r["global_step"]) for r in rec_a]
    assert len(set(steps_b)) == len(steps_b)
    for ra, rb in zip(rec_a, rec_b):
        for key in ("loss", "lr", "val_top1", "ema_top1", "train_loss"):
            assert ra.get(key) == rb.get(key), (key, ra, rb)
    again, code_c = _fit(tmp_path / "b")  # a finished run is left alone
    assert code_c == EXIT_OK and again.state.global_step == 16


def test_stop_after_the_last_update_of_an_epoch_still_ends_it(tmp_path: Path) -> None:
    """A signal at an epoch's last update: the epoch is evaluated and checkpointed before the
    run stops, so the resumed run has the same epoch records and files as an uninterrupted one."""
    _fit(tmp_path / "a")
    stopped, code = _fit(tmp_path / "b", debug=_stop_at(8))  # 8 updates per epoch
    assert code == EXIT_PREEMPTED
    assert (stopped.state.epoch, stopped.state.step, stopped.state.global_step) == (1, 0, 8)
    assert [r["epoch"] for r in JsonlMetrics(tmp_path / "b/metrics.jsonl").read()
            if r["kind"] == "epoch"] == [1]  # fmt: skip
    _, code = _fit(tmp_path / "b")
    assert code == EXIT_OK
    rec_a = JsonlMetrics(tmp_path / "a/metrics.jsonl").read()
    rec_b = JsonlMetrics(tmp_path / "b/metrics.jsonl").read()
    assert [(r["kind"], r["global_step"], r.get("val_top1")) for r in rec_b] == [
        (r["kind"], r["global_step"], r.get("val_top1")) for r in rec_a
    ]


def test_trainer_numbers_epochs_from_one_and_ranks_by_ema(tmp_path: Path) -> None:
    """What a user reads agrees: 1-based epochs in metrics.jsonl, file names and the index;
    with an EMA, metric auto ranks by ema_top1, and the records and checkpoints say so."""
    trainer, code = _fit(tmp_path)
    assert code == EXIT_OK and trainer.metric == "ema_top1"
    records = JsonlMetrics(tmp_path / "metrics.jsonl").read()
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert {r["epoch"] for r in records if r["kind"] == "train"} == {1, 2}
    assert {r["best_by"] for r in records if r["kind"] == "epoch"} == {"ema_top1"}
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    assert index["metric"] == "ema_top1" and [e["file"] for e in index["epochs"]] == [
        f"epoch_{index['best_epoch']:04d}.pt"  # keep_top_k=1: the best one
    ]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best_metric_name"] == "ema_top1"
    assert best["epoch"] == index["best_epoch"] and best["step"] == 0


def test_a_nan_ema_is_never_best_and_is_named(tmp_path: Path, caplog) -> None:
    """All-NaN EMA weights: ema_top1 is recorded as NaN, best.pt is never made from it, and each
    epoch's evaluation warns once naming the weights (ema), not the raw model."""
    trainer = _trainer(tmp_path)
    with torch.no_grad():
        for p in trainer.ema.module.parameters():
            p.fill_(float("nan"))
    trainer.resume("auto")
    with caplog.at_level(logging.WARNING, logger="xvol"):
        assert trainer.fit() == EXIT_OK
    epochs = [r for r in JsonlMetrics(tmp_path / "metrics.jsonl").read() if r["kind"] == "epoch"]
    assert [r["ema_top1"] for r in epochs] == ["nan", "nan"]
    assert all(isinstance(r["val_top1"], float) for r in epochs)
    assert not (tmp_path / "best.pt").exists()
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warned) == 2 and all("ema" in m and "\n" not in m for m in warned)


def test_checkpoint_metric_auto() -> None:
    assert checkpoint_metric("auto", ema=True) == "ema_top1"
    assert checkpoint_metric("auto", ema=False) == "val_top1"
    assert checkpoint_metric("val_loss", ema=True) == "val_loss"


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_trainer_nan_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    trainer, code = _fit(tmp_path, debug=DebugOptions(nan_at_step=5))
    assert code == EXIT_NON_FINITE
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["global_step"] == 3  # the every-3-updates checkpoint before the NaN
    assert trainer.last_checkpoint == tmp_path / "last.pt"
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    records = JsonlMetrics(tmp_path / "metrics.jsonl").read()
    assert max(r["global_step"] for r in records) == 4


def test_trainer_resume_choices(tmp_path: Path) -> None:
    _, code = _fit(tmp_path / "run", debug=_stop_at(5))
    assert code == EXIT_PREEMPTED
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        _fit(tmp_path / "run", resume=None)  # a fresh start would overwrite the run
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="bad.pt"):
        _fit(tmp_path / "other", resume=str(bad))
    # an explicit file from another run starts this run from its position
    trainer, code = _fit(tmp_path / "other", resume=str(tmp_path / "run" / "last.pt"))
    assert code == EXIT_OK and trainer.state.global_step == 16


def test_trainer_refuses_other_class_names(tmp_path: Path, caplog) -> None:
    """Labels are indices into class_names: a renamed class must not resume silently."""
    _, code = _fit(tmp_path, debug=_stop_at(5))
    assert code == EXIT_PREEMPTED
    for resume in ("auto", str(tmp_path / "last.pt")):
        trainer = _trainer(tmp_path)
        trainer.data.class_names = ["0", "one", "2", "3"]
        with pytest.raises(CheckpointError) as err:
            trainer.resume(resume)
        message = str(err.value)
        assert "first difference at index 1: checkpoint '1', data 'one'" in message
        assert "trainer.allow_class_mismatch=true" in message and "\n" not in message
        assert trainer.state.global_step == 0
    trainer = _trainer(tmp_path)
    trainer.data.class_names = ["0", "1", "2"]
    with pytest.raises(CheckpointError, match=r"index 3: checkpoint '3', data \(none\)"):
        trainer.resume("auto")
    trainer = _trainer(tmp_path, allow_class_mismatch=True)
    trainer.data.class_names = ["0", "one", "2", "3"]
    with caplog.at_level(logging.WARNING, logger="xvol"):
        trainer.resume("auto")
    assert trainer.state.global_step == 5 and "allow_class_mismatch=true" in caplog.text


def test_trainer_failed_save_raises_on_every_rank(tmp_path: Path, monkeypatch) -> None:
    trainer = _trainer(tmp_path)
    trainer.resume("auto")

    def full_disk(obj: object, fh) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="last.pt: cannot write checkpoint: no space left"):
        trainer.save(epoch_end=False)
    assert not (tmp_path / "last.pt").exists() and not list(tmp_path.glob(".*tmp*"))


def test_metrics_write_failure_names_the_file(tmp_path: Path) -> None:
    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None: ...

        def close(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    metrics = JsonlMetrics(tmp_path / "metrics.jsonl")
    metrics._fh = FullDisk()
    with pytest.raises(OSError) as err:
        metrics.write({"kind": "train", "global_step": 1})
    assert err.value.filename == str(tmp_path / "metrics.jsonl")
    assert err.value.strerror == "cannot append a metrics record: No space left on device"
    metrics.close()  # nothing left to fail


def test_sync_bn_without_cuda_is_one_line_naming_the_key() -> None:
    """trainer.sync_bn=true on a CPU run: a ConfigError naming the key (one line from
    xvol-train), not SyncBatchNorm's traceback; auto leaves BN alone off CUDA."""
    from xvol.engine import prepare_model

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"^trainer\.sync_bn: true needs CUDA"):
        prepare_model(model, torch.device("cpu"), sync_bn=True, channels_last=False)
    options = TrainerOptions(sync_bn="auto")
    assert not options.use_sync_bn(torch.device("cpu"), distributed=True)
