"""The training checkpoint format: one versioned dict of plain types, written atomically.

Format (``format_version`` 1), loadable with ``torch.load(path, weights_only=True)``:

====================  =====================================================================
key                   value
====================  =====================================================================
format_version        int, 1; bumped when a key changes meaning
kind                  "xvol.train"
model                 state_dict of the unwrapped model (no ``module.``/``_orig_mod.``);
                      BN running stats averaged over ranks when BN is not synchronized
ema                   state_dict of the EMA model (timm ModelEmaV3 ``.module``) or None
state_dict            the same tensors as ``model``, under timm's name (written by
                      save_checkpoint; one copy in the file: torch.save stores a shared tensor
                      once)
state_dict_ema        the same tensors as ``ema``, under timm's name; absent without EMA, so
                      timm's ``load_checkpoint(model, path, use_ema=True)`` (validate.py
                      ``--use-ema``) reads the EMA and without ``use_ema`` the raw weights
optimizer             optimizer.state_dict()
scheduler             timm scheduler.state_dict() or None
scaler                torch.amp.GradScaler.state_dict() (fp16) or None
epoch                 int, epochs finished (0-based index of the epoch training continues in):
                      an epoch-end checkpoint of epoch N (1-based, as logs, metrics.jsonl and
                      ``epoch_NNNN.pt`` number it) holds ``epoch == N`` and ``step == 0``
step                  int, the next batch of that epoch (data position for
                      ``train.set_epoch(epoch, start_step=step)``); 0 after an epoch end
global_step           int, optimizer updates done so far (what the scheduler and EMA count)
epoch_state           dict of floats: loss_sum, loss_count, images, elapsed (s) of the
                      unfinished epoch, so its summary is exact after a mid-epoch resume
world_size            int, ranks that trained it
rng                   list, one dict per rank: torch (ByteTensor), cuda ([ByteTensor] of the
                      rank's current GPU, or []),
                      numpy ({algorithm, keys int64 tensor, pos, has_gauss, cached_gaussian}),
                      python ({version, state int64 tensor, gauss_next})
bn_buffers            None, or (mid-epoch saves of multi-rank runs without SyncBatchNorm) a
                      list, one dict per rank: {"model": {BN running_mean/var key: tensor},
                      "ema": {...} or None}, each rank's own statistics for an exact resume
config                the resolved run config as plain dicts/lists (OmegaConf.to_container);
                      the tools read ``config["model"]`` as a validated
                      ``xvol.models.ModelSpec``; nothing in it is ever instantiated
class_names           list of str, the data set's class names (index = label)
metrics               dict of floats from the last evaluation: val_top1, val_top5, val_loss,
                      ema_top1, ema_top5, ema_loss (with EMA), train_loss, lr, img_s,
                      epoch_time, eval_time (empty before the first evaluation)
best_metric           float or None, the best value of the tracked metric so far, as the run
                      directory's checkpoints.json held it (set by CheckpointManager.save)
best_metric_name      str, that metric (the one that ranks epoch files and picks best.pt);
                      absent in checkpoints written before it was recorded
wandb_id              str or None, the wandb run a resumed run continues
git                   {"revision": str or None, "dirty": bool or None}
versions              {"torch": str, "timm": str, "xvol": str}
time                  float, UNIX time of writing (time.time())
====================  =====================================================================

Written by the trainer through ``xvol.engine.checkpointing.CheckpointManager`` (which names the
files of a run directory); read by resume, fine-tuning (``init_weights_from``) and the tools.
A reader refuses a file with a newer ``format_version`` than :data:`FORMAT_VERSION`, and one
whose timm-named copies are not the very weights under xvol's names (timm's tools would score
other weights than xvol's); it returns the state without them. Files written before the timm
names (``model``/``ema`` only) read as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from xvol.formats.files import atomic_path, first_line, write_error_reason

__all__ = [
    "FORMAT_VERSION",
    "KIND",
    "TIMM_KEYS",
    "WEIGHTS",
    "CheckpointError",
    "checkpoint_versions",
    "load_checkpoint",
    "save_checkpoint",
    "stored_class_names",
]

FORMAT_VERSION = 1
KIND = "xvol.train"
WEIGHTS = ("ema", "model")  # the state_dicts a checkpoint holds; what a deploy/record names
# The same weights under the keys timm's load_checkpoint/load_state_dict look for.
TIMM_KEYS = {"model": "state_dict", "ema": "state_dict_ema"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (or written); the message names the file.

    ``reason`` is the short cause without the file name, for summaries over several files.
    Deploy checkpoints (xvol.formats.deploy) raise it too.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (xvol.formats.files.atomic_path: temp file, fsync, rename).

    A crash at any point leaves either the old file or the new one at ``path``, never a mix.
    A failed write removes its temp file and raises CheckpointError naming ``path`` and the
    cause (a full disk says "no space left on device").
    """
    path = Path(path)
    state = _with_timm_keys(state)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save(state, fh)
    except Exception as err:
        reason = write_error_reason(err)
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing written"
        raise CheckpointError(
            f"{path}: cannot write checkpoint: {reason} ({kept})", reason=reason
        ) from err
    return path


def _with_timm_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` plus ``state_dict``/``state_dict_ema``: the same dicts (no tensor copied)."""
    out = dict(state)
    for ours, theirs in TIMM_KEYS.items():
        weights = out.get(ours)
        if isinstance(weights, Mapping) and weights:
            out[theirs] = weights
        else:
            out.pop(theirs, None)
    return out


def _drop_timm_keys(state: dict[str, Any], refuse: Any) -> dict[str, Any]:
    """Check that each timm-named entry is the weights under xvol's name, then drop it."""
    for ours, theirs in TIMM_KEYS.items():
        if theirs not in state:
            continue
        copy, weights = state.pop(theirs), state.get(ours)
        same = (
            isinstance(copy, Mapping)
            and isinstance(weights, Mapping)
            and copy.keys() == weights.keys()
            and all(
                copy[k] is weights[k]
                or (
                    isinstance(copy[k], torch.Tensor)
                    and isinstance(weights[k], torch.Tensor)
                    and copy[k].shape == weights[k].shape
                    and copy[k].dtype == weights[k].dtype
                    and torch.equal(copy[k], weights[k])
                )
                for k in weights
            )
        )
        if not same:
            raise refuse(
                f"'{theirs}' (what timm's tools read) is not the '{ours}' weights xvol reads"
            )
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)``; a truncated, corrupt or foreign file: CheckpointError."""
    path = Path(path)

    def refuse(reason: str, detail: str = "") -> CheckpointError:
        return CheckpointError(f"{path}: {reason}{detail}", reason=reason)

    if not path.is_file():
        raise refuse("no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip/pickle errors differ by failure; all mean "unusable"
        detail = first_line(f"{type(err).__name__}: {err}")
        raise refuse("cannot read checkpoint (truncated or corrupt?)", f": {detail}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise refuse("not an xvol checkpoint (no 'model' entry)")
    version = state.get("format_version")
    if version is not None and not isinstance(version, int):
        raise refuse(f"format_version {version!r} is not an integer")
    if version is not None and version > FORMAT_VERSION:
        raise refuse(f"checkpoint format {version} is newer than this xvol ({FORMAT_VERSION})")
    return _drop_timm_keys(state, refuse)


def stored_class_names(
    value: Any, num_classes: int, source: str | Path, key: str = "class_names"
) -> list[str] | None:
    """A stored class list (training checkpoint or deploy sidecar): None, or one non-empty str
    per class (index = label); anything else is a CheckpointError naming ``source`` and ``key``."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(
        isinstance(n, str) and 0 < len(n) <= 1024 for n in value
    ):
        raise CheckpointError(f"{source}: {key} must be a list of class names (strings)")
    if len(value) != num_classes:
        raise CheckpointError(
            f"{source}: {key} holds {len(value)} names but the model predicts {num_classes} classes"
        )
    return list(value)


def checkpoint_versions() -> dict[str, str]:
    """The ``versions`` entry: torch, timm and xvol of the writer."""
    import timm

    import xvol

    return {
        "torch": str(torch.__version__),
        "timm": str(timm.__version__),
        "xvol": str(xvol.__version__),
    }
