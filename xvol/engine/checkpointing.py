"""Checkpointing a run: which files a run directory keeps, resume, RNG state, fine-tuning.

The file format itself (keys, version, atomic write, refusing reader) is
:mod:`xvol.formats.checkpoint`, and loading weights into a module strictly is
:mod:`xvol.formats.load`; this module decides which files a run keeps and when they are read.

Files in a run directory (``CheckpointManager``): ``last.pt`` (every save), ``prev.pt`` (the
``last.pt`` before it, when that one was known good), ``epoch_NNNN.pt`` (the end of epoch NNNN,
1-based; the top-k by the tracked metric are kept), ``best.pt`` (the best epoch end by that
metric), ``checkpoints.json`` (index of the epoch files, the metric's name and the best epoch).
Files are hard links where the filesystem allows, so the extra names cost no space. They are
names of one file, not copies: ``best.pt``, ``prev.pt`` or ``last.pt`` and the epoch file they
equal share their bytes, so an edit in place or a bad disk block changes every such name at
once (training never edits a file in place: each save writes a new one). Copy a file out
(``cp``, ``rsync`` without ``-H``) when a second copy on disk matters.

``checkpoints.json`` is input like any file in the run directory: only names the manager writes
(``epoch_NNNN.pt``, no directory part) are read, linked or deleted, anything else in it is
refused with one warning naming the entry, and an index that is not the manager's format is
rebuilt from the epoch files themselves (warned once), so a bad index never stops a run whose
checkpoints are fine.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xvol.checks import is_int
from xvol.engine.log import get_logger
from xvol.engine.metrics import better
from xvol.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xvol.formats.files import (
    atomic_path,
    remove_stale_temp_files,
    write_error_reason,
    write_json_atomic,
)
from xvol.formats.load import load_state_dict_strict, strip_prefixes

__all__ = [
    "CheckpointManager",
    "capture_rng_state",
    "classifier_keys",
    "init_weights_from",
    "restore_rng_state",
]

log = get_logger(__name__)


# ----------------------------------------------------------------------------- fine-tuning


def classifier_keys(module: nn.Module) -> set[str]:
    """The state_dict keys of the classifier head (timm's ``get_classifier()``), or none."""
    get = getattr(module, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set()
    for name, child in module.named_modules():
        if child is head and name:
            return {k for k in module.state_dict() if k.startswith(name + ".")}
    return set()


def _num_classes(state: Mapping[str, Any], head: set[str]) -> int | None:
    weights = [state[k] for k in sorted(head) if k.endswith("weight") and k in state]
    return int(weights[0].shape[0]) if weights and weights[0].dim() >= 1 else None


# the fields of a model spec that change what the weights compute (num_classes: the head note;
# impl, bn_momentum, drop rates and zero_init_last are how the same network is run or trained)
_SPEC_KEYS = {
    "arch": "model.arch",
    "stages": "model.stages",
    "shifts": "model.xconv.shifts",
    "center": "model.xconv.center",
    "bn_eps": "model.xconv.bn_eps",
    "stem": "model.stem",
    "include": "model.convert.include",
    "exclude": "model.convert.exclude",
    "require_bn": "model.convert.require_bn",
}


def spec_differences(trained: Any, ours: Any, source: str) -> list[str]:
    """``key (theirs -> ours)`` for each network-defining field where two model configs
    differ, read as ModelSpecs (a config that is not a valid spec says so)."""
    from xvol.models.spec import ModelSpec, ModelSpecError

    try:
        mine = ModelSpec.from_config(ours, "this run's config")
    except ModelSpecError:  # not a spec run (a caller's own model): nothing to compare with
        return []
    try:
        theirs = ModelSpec.from_config(trained, source, "config.model")
    except ModelSpecError as err:
        return [f"its model config ({err})"]

    # the spec's fields (to_dict leaves out defaults such as timm's stem)
    def shown(value: Any) -> Any:  # as a config writes it: [1, 2], not (1, 2)
        return list(value) if isinstance(value, tuple) else value

    pairs = [(key, shown(getattr(theirs, name)), shown(getattr(mine, name)))
             for name, key in _SPEC_KEYS.items()]  # fmt: skip
    return [f"{key} ({a!r} -> {b!r})" for key, a, b in pairs if a != b]


def _trained_as(state: Mapping[str, Any]) -> str:
    """`` (trained as resnet18 with X-volution in stages [3])``, from the stored config."""
    config = state.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(model, Mapping):
        return ""
    xconv = f" with X-volution in stages {model.get('stages')}" if model.get("xconv") else ""
    return f" (trained as {model.get('arch')}{xconv})"


def init_weights_from(
    module: nn.Module,
    path: str | Path,
    *,
    ema: bool = False,
    model_config: Mapping[str, Any] | None = None,
) -> str:
    """Start ``module`` from the weights of a training checkpoint (fine-tuning; timm's
    ``--initial-checkpoint``): weights only, read by :func:`load_checkpoint` (weights_only,
    nothing in the file is instantiated).

    Strict except the classifier head: when its shape differs (another class count) the
    module keeps its own freshly initialized head. Missing or unexpected keys, or any other
    shape difference, mean another architecture: CheckpointError. ``ema`` takes the
    checkpoint's EMA weights. Returns one line saying what was loaded.

    ``model_config`` (this run's ``config["model"]``): another network of the same tensor
    shapes (X-volution shifts, center tap, stages of equal width) loads without a shape error,
    so each difference from the checkpoint's stored model config is named in one warning.
    """
    state = load_checkpoint(path)
    which = "ema" if ema else "model"
    weights = state.get(which)
    if ema and not (isinstance(weights, Mapping) and weights):
        raise CheckpointError(
            f"{path}: has no EMA weights (trained with trainer.ema=null); "
            "set trainer.init_from_ema=false to start from its model weights"
        )
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: '{which}' is not a state_dict")
    weights = strip_prefixes(weights)
    ours = module.state_dict()

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")

    missing = sorted(ours.keys() - weights.keys())
    unexpected = sorted(weights.keys() - ours.keys())
    trained = _trained_as(state)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: another architecture{trained} than this run's model: "
            f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]"
        )
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: '{which}' holds non-tensor values ({show(bad)})")
    head = classifier_keys(module)
    differ = sorted(k for k in ours if tuple(weights[k].shape) != tuple(ours[k].shape))
    body = [k for k in differ if k not in head]
    if body:
        k = body[0]
        raise CheckpointError(
            f"{path}: another architecture{trained} than this run's model: "
            f"{k} is {tuple(weights[k].shape)} there, {tuple(ours[k].shape)} here"
            + (f" ({len(body)} tensors differ)" if len(body) > 1 else "")
        )
    note = f"{which} weights"
    if differ:  # the head only: another class count
        theirs_n, ours_n = _num_classes(weights, head), _num_classes(ours, head)
        for k in head:
            weights[k] = ours[k]
        note += (
            f"; classifier head ({', '.join(sorted(head))}) re-initialized: the checkpoint has "
            f"{theirs_n} classes, this run {ours_n}"
        )
    load_state_dict_strict(module, weights, f"{path} ({which} weights)")
    config = state.get("config")
    trained_model = config.get("model") if isinstance(config, Mapping) else None
    if model_config is not None and trained_model is not None:
        differ = spec_differences(trained_model, model_config, str(path))
        if differ:
            log.warning(
                "trainer.init_from=%s was trained as another network of the same tensor shapes, "
                "so its weights load into this run's model; it differs in %s (checkpoint -> "
                "this run)",
                path,
                ", ".join(differ),
            )
    return f"initialized from {path}: {note}"


# ----------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's torch/CUDA/numpy/python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this rank's device only: get_rng_state_all() would open a context on every GPU
        cuda = [torch.cuda.get_rng_state(torch.cuda.current_device())]
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0].cpu(), torch.cuda.current_device())
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["algorithm"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))


# ----------------------------------------------------------------------------- run directory


EPOCH_FILE = re.compile(r"epoch_([0-9]{4,})\.pt")  # the only names an index may hold
MAX_INDEX_BYTES = 16 << 20  # an index of a few thousand epochs is well under 1 MiB


def _is_epoch_file(name: Any) -> bool:
    return isinstance(name, str) and EPOCH_FILE.fullmatch(name) is not None


def _is_number(value: Any) -> bool:
    """Any JSON number, NaN included: unlike xvol.checks.is_number, since the index stores a
    diverged epoch's metric as it was measured, and that index is still the manager's."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _index_problems(index: Any) -> list[str]:
    """What makes ``index`` other than the manager's checkpoints.json (empty: it is one)."""
    if not isinstance(index, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        return [f"holds {kinds.get(type(index), 'a number')}, not a JSON object"]
    problems = []
    if not isinstance(index.get("metric"), str | None):
        problems.append("'metric' is not a name")
    if index.get("mode", "max") not in ("max", "min"):
        problems.append("'mode' is not max or min")
    if not (index.get("best_metric") is None or _is_number(index["best_metric"])):
        problems.append("'best_metric' is not a number")
    if not (index.get("best_epoch") is None or is_int(index["best_epoch"])):
        problems.append("'best_epoch' is not an integer")
    epochs = index.get("epochs", [])
    if not isinstance(epochs, list):
        return [*problems, "'epochs' is not a list"]
    for i, e in enumerate(epochs):
        where = f"entry {i} of 'epochs'"
        if not isinstance(e, dict):
            problems.append(f"{where} is not an object")
        elif "file" not in e:
            problems.append(f"{where} has no 'file'")
        elif not _is_epoch_file(e["file"]):
            problems.append(
                f"{where} names {e['file']!r}, not an epoch_NNNN.pt file of this run: refused"
            )
        elif not (is_int(e.get("epoch")) and is_int(e.get("global_step"))):
            problems.append(f"{where} ({e['file']}): 'epoch' and 'global_step' must be integers")
        elif not (e.get("metric") is None or _is_number(e["metric"])):
            problems.append(f"{where} ({e['file']}): 'metric' is not a number")
        elif not (
            isinstance(e.get("metrics", {}), dict)
            and all(_is_number(v) for v in e.get("metrics", {}).values())
        ):
            problems.append(f"{where} ({e['file']}): 'metrics' is not a table of numbers")
    return problems


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same bytes as ``src`` atomically (hard link, else a copy)."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


class CheckpointManager:
    """The checkpoint files of one run directory: last/prev, top-k epoch files, best.

    ``metric`` (a key of the checkpoint's ``metrics``) ranks epoch files; ``mode`` is max or min.
    Only rank 0 creates one.

    Rotation keeps one good fallback: ``last.pt`` becomes ``prev.pt`` only while it is known
    good, i.e. this manager wrote it or loaded it. After a resume from ``prev.pt`` (``last.pt``
    unreadable) the next save replaces ``last.pt`` and leaves ``prev.pt`` alone, so a crash
    during that save still leaves a loadable checkpoint.
    """

    INDEX = "checkpoints.json"

    def __init__(
        self, run_dir: str | Path, keep_top_k: int = 3, metric: str = "val_top1", mode: str = "max"
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.run_dir = Path(run_dir)
        self.keep_top_k = keep_top_k
        self.metric = metric
        self.mode = mode
        self.last = self.run_dir / "last.pt"
        self.prev = self.run_dir / "prev.pt"
        self.best = self.run_dir / "best.pt"
        self.last_known_good = False  # last.pt was written or loaded by this manager
        self.best_updated = False  # the last save replaced best.pt
        self._rebuilt: dict[str, Any] | None = None  # the index as rebuilt, until rewritten

    # checkpoints.json: {"metric": name, "mode", "best_metric", "best_epoch", "epochs": [{"file",
    # "epoch" (1-based), "global_step", "metric" (value), "metrics" (the epoch's numbers)}]}
    def _read_index(self) -> dict[str, Any]:
        if self._rebuilt is None:
            index, problem = self._load_index()
            if problem is not None:
                index = self._rebuild_index(problem)
        else:  # the file is as bad as when it was rebuilt: only this manager writes it
            index = copy.deepcopy(self._rebuilt)
        entries = [e for e in index.get("epochs", []) if self._epoch_path(e["file"]).is_file()]
        out = {
            "metric": index.get("metric"),
            "mode": index.get("mode", self.mode),
            "best_metric": index.get("best_metric"),
            "best_epoch": index.get("best_epoch"),
            "epochs": entries,
        }
        if entries and out["metric"] is None:
            out["metric"] = "val_top1"  # indexes written before the name was kept: the default
        return out

    def _load_index(self) -> tuple[dict[str, Any], str | None]:
        """The index as the file holds it, or what is wrong with it (then it is not used)."""
        path = self.run_dir / self.INDEX
        try:
            if path.stat().st_size > MAX_INDEX_BYTES:
                return {}, f"is larger than {MAX_INDEX_BYTES >> 20} MiB"
            text = path.read_text()
        except FileNotFoundError:
            has_epochs = any(_is_epoch_file(p.name) for p in self.run_dir.glob("epoch_*.pt"))
            return {}, "is missing although epoch files exist" if has_epochs else None
        except (OSError, UnicodeDecodeError) as err:
            return {}, f"cannot be read ({getattr(err, 'strerror', None) or err})"
        try:
            index = json.loads(text)
        except RecursionError:
            return {}, "is nested too deeply to be an index"
        except ValueError as err:
            return {}, f"is not valid JSON ({err})"
        problems = _index_problems(index)
        if problems:
            shown = "; ".join(problems[:4])
            return {}, shown + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
        return index, None

    def _rebuild_index(self, problem: str) -> dict[str, Any]:
        """The index from the epoch files themselves (and best.pt's value), named in one
        warning; nothing the bad index names is used. Kept until the next write replaces it."""
        entries, unreadable = [], []
        best: dict[str, Any] | None = None
        for path in sorted(self.run_dir.glob("epoch_*.pt")):
            match = EPOCH_FILE.fullmatch(path.name)
            if match is None or path.is_symlink() or not path.is_file():
                continue
            try:
                state = load_checkpoint(path)
                metrics = {
                    str(k): float(v)
                    for k, v in (state.get("metrics") or {}).items()
                    if _is_number(v)
                }
                entry = {
                    "file": path.name,
                    "epoch": int(match.group(1)),
                    "global_step": int(state.get("global_step", 0)),
                    "metric": metrics.get(self.metric),
                    "metrics": metrics,
                }
            except (CheckpointError, TypeError, ValueError, AttributeError):
                unreadable.append(path.name)
                continue
            entries.append(entry)
            if better(entry["metric"], best["metric"] if best else None, self.mode):
                best = entry
        try:  # best.pt holds the best value even when its epoch file was pruned (keep_top_k)
            state = load_checkpoint(self.best) if self.best.is_file() else None
            value = (state or {}).get("metrics", {}).get(self.metric)
            if state is not None and _is_number(value):
                if better(float(value), best["metric"] if best else None, self.mode):
                    best = {"metric": float(value), "epoch": int(state["epoch"])}
        except (CheckpointError, TypeError, ValueError, AttributeError, KeyError):
            pass
        index = {
            "metric": self.metric,
            "mode": self.mode,
            "best_metric": best["metric"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "epochs": entries,
        }
        skipped = f"; unreadable, left out: {', '.join(unreadable)}" if unreadable else ""
        log.warning(
            "%s %s; rebuilt it from the %d epoch file(s) in %s%s (nothing else it names is read, "
            "linked or deleted; it is rewritten at the next epoch end)",
            self.run_dir / self.INDEX,
            problem,
            len(entries),
            self.run_dir,
            skipped,
        )
        self._rebuilt = index
        return copy.deepcopy(index)

    def _epoch_path(self, name: str) -> Path:
        """The one way from an index entry to a file (``_read_index`` admits no other name)."""
        if not _is_epoch_file(name):
            raise CheckpointError(
                f"{self.run_dir / self.INDEX}: refusing {name!r}: not an epoch_NNNN.pt name"
            )
        return self.run_dir / name

    def _rerank(self, index: dict[str, Any]) -> None:
        """The index ranked epochs by another metric (a relaunch changed
        trainer.checkpoint.metric or EMA): rank the kept epochs by this one, from the numbers
        each entry keeps, and point best.pt at the best of them."""
        old = f"{index['metric']} ({index['mode']})"
        for e in index["epochs"]:
            value = (e.get("metrics") or {}).get(self.metric)
            e["metric"] = float(value) if value is not None else None
        best = None
        for e in index["epochs"]:
            if better(e["metric"], best["metric"] if best else None, self.mode):
                best = e
        if best is not None:
            _link_or_copy(self._epoch_path(best["file"]), self.best)
            index["best_metric"], index["best_epoch"] = best["metric"], best["epoch"]
            note = f"best.pt is now {best['file']}"
        else:
            index["best_metric"], index["best_epoch"] = None, None
            note = "the kept epochs lack it: the next epoch end with a value replaces best.pt"
        log.warning(
            "%s ranked checkpoints by %s; this run ranks them by %s (%s): %s",
            self.INDEX,
            old,
            self.metric,
            self.mode,
            note,
        )
        index["metric"], index["mode"] = self.metric, self.mode

    def _write_index(self, index: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / self.INDEX, index, indent=1)
        self._rebuilt = None

    def remove_stale_temp_files(self) -> None:
        """Temp files of writes that were killed (kill -9, node loss) are garbage."""
        remove_stale_temp_files(self.run_dir)

    def save(self, state: Mapping[str, Any], epoch_end: bool = False) -> Path:
        """Write ``last.pt`` (keeping the one before as ``prev.pt``); at an epoch end also
        ``epoch_NNNN.pt``, pruned to the top-k, and ``best.pt`` when it is the best so far.

        The manager owns the best value: it sets ``best_metric`` (the best ``metric`` so far, by
        checkpoints.json) and ``best_metric_name`` of the written checkpoint."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._save(state, epoch_end)
        except OSError as err:  # links, copies and the index (checkpoint writes raise their own)
            file = err.filename or self.run_dir
            reason = write_error_reason(err)
            raise CheckpointError(f"{file}: cannot write: {reason}", reason=reason) from err

    def note_loaded(self, path: str | Path) -> None:
        """``path`` was just read successfully: if it is this run's last.pt, it may rotate."""
        try:
            if Path(path).resolve() == self.last.resolve() or self.last.samefile(path):
                self.last_known_good = True
        except OSError:
            pass

    def _save(self, state: Mapping[str, Any], epoch_end: bool) -> Path:
        if self.last.is_file() and self.last_known_good:
            _link_or_copy(self.last, self.prev)
        elif self.last.is_file():
            log.warning(
                "%s was not loaded by this run (unreadable or not chosen): it is replaced, and "
                "%s is kept as the fallback",
                self.last,
                self.prev.name,
            )
        # The index is the one record of the best value: the checkpoint carries its value as of
        # this save (best_metric), so the file and checkpoints.json never disagree.
        index = self._read_index()
        ranked_by_this = (index["metric"], index["mode"]) == (self.metric, self.mode)
        self.best_updated = False
        metrics = dict(state.get("metrics") or {})
        value = metrics.get(self.metric)
        value = float(value) if value is not None else None
        if epoch_end:
            if index["metric"] is not None and not ranked_by_this:
                self._rerank(index)
            index["metric"], index["mode"] = self.metric, self.mode
            ranked_by_this = True
            self.best_updated = better(value, index["best_metric"], self.mode)
        finished_epoch = int(state["epoch"])  # epochs done = the 1-based number of this one
        if self.best_updated:
            index["best_epoch"], index["best_metric"] = finished_epoch, value
        best = index["best_metric"] if ranked_by_this else None
        save_checkpoint({**state, "best_metric": best, "best_metric_name": self.metric}, self.last)
        self.last_known_good = True
        if not epoch_end:
            return self.last
        name = f"epoch_{finished_epoch:04d}.pt"
        _link_or_copy(self.last, self.run_dir / name)
        entries = [e for e in index["epochs"] if e["file"] != name]
        entries.append(
            {
                "file": name,
                "epoch": finished_epoch,
                "global_step": state["global_step"],
                "metric": value,
                "metrics": {k: float(v) for k, v in metrics.items()},
            }
        )
        if self.best_updated:
            _link_or_copy(self.last, self.best)
        # keep the top-k by metric (ties: best.pt's epoch, then the newest; missing values last)
        sign = -1.0 if self.mode == "max" else 1.0

        def rank(e: dict[str, Any]) -> tuple[float, bool, int]:
            m = e["metric"]
            m = sign * m if m is not None and math.isfinite(m) else math.inf
            return (m, e["epoch"] != index["best_epoch"], -e["global_step"])

        entries.sort(key=rank)
        keep, drop = entries[: max(self.keep_top_k, 0)], entries[max(self.keep_top_k, 0) :]
        for e in drop:
            self._epoch_path(e["file"]).unlink(missing_ok=True)
        index["epochs"] = keep
        self._write_index(index)
        return self.last

    def best_epoch(self) -> tuple[int | None, float | None]:
        """(1-based epoch, value of ``metric``) that best.pt holds, per checkpoints.json."""
        index = self._read_index()
        if index["metric"] != self.metric:
            return None, None
        return index["best_epoch"], index["best_metric"]

    def candidates(self) -> list[Path]:
        """Files to resume from, newest first: last, prev, then the kept epoch files."""
        files = [p for p in (self.last, self.prev) if p.is_file()]
        epochs = sorted(self._read_index()["epochs"], key=lambda e: -e["global_step"])
        files += [self._epoch_path(e["file"]) for e in epochs]
        unindexed = (p for p in self.run_dir.glob("epoch_*.pt") if _is_epoch_file(p.name))
        files += sorted((p for p in unindexed if p not in files), reverse=True)
        return files

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
        """The newest readable checkpoint (None when there is none at all).

        Unreadable ones are skipped with a warning naming them. When the directory holds
        checkpoints and none loads, CheckpointError names each with its reason: starting over
        would overwrite them (and their metrics), so that is the user's call, not ours.
        """
        failed: list[CheckpointError] = []
        names: list[str] = []
        for path in self.candidates():
            try:
                state = load_checkpoint(path, map_location)
            except CheckpointError as err:
                failed.append(err)
                names.append(path.name)
                continue
            for err in failed:
                log.warning("%s; falling back to %s", err, path.name)
            self.note_loaded(path)
            return state, path
        if not failed:
            return None
        listing = "; ".join(f"{n}: {e.reason}" for n, e in zip(names, failed))
        raise CheckpointError(
            f"{self.run_dir} holds checkpoints but none loads ({listing}); nothing was changed. "
            "Restore a readable checkpoint, pass resume=PATH, or pick another run_name",
            reason="no readable checkpoint",
        )
