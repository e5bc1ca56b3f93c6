"""Shared pieces of the post-training tools (tools/reparam.py, eval.py, leaderboard.py, export.py).

- Loading a model from either checkpoint kind: a training checkpoint (``.pt``, the format of
  xvol/engine/checkpoint.py; rebuilt from its stored config, loaded strictly, EMA weights by
  default when present) or a deploy checkpoint (``deploy.safetensors`` + ``deploy.json`` sidecar
  written by tools/reparam.py; rebuilt as ``reparameterize_model(build_model(cfg))``).
- The eval record schema (one JSON per evaluated checkpoint) and its validation, shared by the
  writer (tools/eval.py) and the reader (tools/leaderboard.py).
- A val loader over any ImageNet-layout val folder through the regular data builders.
- Atomic writes that refuse to overwrite, sha256, versions, and the one-line error wrapper.

Deploy checkpoint layout (``DEPLOY_FORMAT_VERSION`` 1)::

    DIR/deploy.safetensors   state_dict of reparameterize_model(build_model(cfg)), fp32
    DIR/deploy.json          sidecar: kind "xvol.deploy", format_version, model_config,
                             weights ("ema"|"model"), source checkpoint path + sha256,
                             weights_sha256 (of the safetensors file), verification, summary,
                             data (eval transform defaults), versions, git, date

The sidecar is written last and names the sha256 of the weights file, so a half-copied or
modified weights file is refused on load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvol.engine.checkpoint import (
    CheckpointError,
    checkpoint_versions,
    load_checkpoint,
    load_state_dict_strict,
)
from xvol.reparam import is_reparameterizable, reparameterize_model

__all__ = [
    "DEPLOY_FORMAT_VERSION",
    "DEPLOY_KIND",
    "DEPLOY_SIDECAR",
    "DEPLOY_WEIGHTS",
    "RECORD_KIND",
    "RECORD_SCHEMA_VERSION",
    "LoadedModel",
    "RecordError",
    "ToolError",
    "ValData",
    "atomic_path",
    "build_val_loader",
    "count_reparameterizable",
    "deploy_paths",
    "eval_settings",
    "instantiate_model",
    "is_deploy_path",
    "load_deploy_checkpoint",
    "load_model",
    "load_train_checkpoint",
    "model_identity",
    "now_iso",
    "refuse_existing",
    "resolve_val_dir",
    "setup_tool_logging",
    "sha256_file",
    "tool_errors",
    "validate_record",
    "versions",
    "write_json_atomic",
]

log = logging.getLogger(__name__)

DEPLOY_KIND = "xvol.deploy"
DEPLOY_FORMAT_VERSION = 1
DEPLOY_WEIGHTS = "deploy.safetensors"
DEPLOY_SIDECAR = "deploy.json"
RECORD_KIND = "xvol.eval"
RECORD_SCHEMA_VERSION = 1
WEIGHT_CHOICES = ("ema", "model")


class ToolError(RuntimeError):
    """A problem with the tool's inputs or outputs; the message is what the user sees."""


class RecordError(ToolError):
    """A malformed or duplicate eval record; the message names the file."""


# ----------------------------------------------------------------------------- errors, files


@contextlib.contextmanager
def tool_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn any exception into ``prog: error: <one line>`` on stderr and exit status 1.

    ``debug`` (or XVOL_DEBUG=1) lets the traceback through instead. Known error types
    (ToolError, CheckpointError, DataError, FileNotFoundError) show their message alone; others
    show their type too, since the message may not make sense without it.
    """
    from xvol.data.folder import DataError

    debug = debug or os.environ.get("XVOL_DEBUG", "") not in ("", "0")
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if debug:
            raise
        known = isinstance(err, ToolError | CheckpointError | DataError | FileNotFoundError)
        text = str(err) if known else f"{type(err).__name__}: {err}"
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
        hint = "" if known else " (run with --debug or XVOL_DEBUG=1 for the traceback)"
        raise SystemExit(f"{prog}: error: {text}{hint}") from None


def setup_tool_logging(level: int = logging.INFO) -> None:
    """xvol's own messages to stderr at ``level``; other libraries' only from WARNING up.

    stdout is kept for the tool's one JSON record (or the leaderboard's table).
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("xvol").setLevel(level)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(paths: Sequence[Path], force: bool, what: str = "output") -> None:
    """Refuse to overwrite (the house rule) unless ``force``."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ToolError(f"{what} already exists: {', '.join(existing)} (pass --force to overwrite)")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path next to ``path``; renamed onto it on success, removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """The training checkpoint's ``versions`` (xvol, torch, timm) plus the Python version."""
    return {**checkpoint_versions(), "python": platform.python_version()}


# ----------------------------------------------------------------------------- models


def instantiate_model(model_cfg: Mapping[str, Any], source: str) -> nn.Module:
    """``hydra.utils.instantiate(config["model"])``; a broken config names its source file."""
    from hydra.utils import instantiate

    if not isinstance(model_cfg, Mapping) or "_target_" not in model_cfg:
        raise CheckpointError(f"{source}: no model config (config['model'] with a _target_)")
    try:
        return instantiate(dict(model_cfg))
    except Exception as err:  # Hydra wraps every failure in its own error types
        raise CheckpointError(f"{source}: cannot build the model from its config: {err}") from err


def model_identity(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Display name, backbone arch and whether X-volution is in it, from a stored model config.

    The name follows the timm registry (xresnet50 = resnet50 + X-volution in stage 3, shifts
    (1,)); other placements get a suffix (xresnet50-s34-L12 for stages [3,4], shifts [1,2]).
    """
    arch = str(model_cfg.get("arch", "unknown"))
    xconv = model_cfg.get("xconv")
    if not xconv:
        return {"model": arch, "arch": arch, "xvolution": False}
    stages = model_cfg.get("stages", [3])
    stages = [stages] if isinstance(stages, int) else list(stages)
    shifts = list(xconv.get("shifts", [1])) if isinstance(xconv, Mapping) else [1]
    center = bool(xconv.get("center", False)) if isinstance(xconv, Mapping) else False
    name = f"x{arch}"
    if sorted(stages) != [3] or shifts != [1] or center:
        name += f"-s{''.join(map(str, sorted(stages)))}-L{''.join(map(str, shifts))}"
        name += "-c" if center else ""
    return {"model": name, "arch": arch, "xvolution": True}


def count_reparameterizable(model: nn.Module) -> int:
    """Modules reparameterize_model will swap (top-level ones: it does not recurse into them)."""

    def walk(module: nn.Module) -> int:
        if is_reparameterizable(module):
            return 1
        return sum(walk(child) for child in module.children())

    return walk(model)


@dataclasses.dataclass
class LoadedModel:
    """A model in eval mode plus what a record needs to say where it came from."""

    model: nn.Module
    path: Path
    sha256: str
    deploy: bool
    weights: str  # "ema" or "model": which state_dict of the training checkpoint
    model_config: dict[str, Any]
    data_config: dict[str, Any]
    source: dict[str, Any]  # training checkpoint: path, sha256, epoch, global_step, metrics

    @property
    def identity(self) -> dict[str, Any]:
        return model_identity(self.model_config)

    @property
    def num_classes(self) -> int:
        n = getattr(self.model, "num_classes", None)
        if n is None:
            n = self.model_config.get("num_classes")
        return int(n)


def _data_defaults(data_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The eval-transform settings and data root a checkpoint was trained with."""
    data_cfg = dict(data_cfg or {})
    return {
        "name": data_cfg.get("name"),
        "root": data_cfg.get("root"),
        "num_classes": data_cfg.get("num_classes"),
        "img_size": data_cfg.get("eval_img_size") or data_cfg.get("img_size"),
        "crop_pct": data_cfg.get("crop_pct"),
        "interpolation": data_cfg.get("interpolation"),
    }


def load_train_checkpoint(path: str | Path, ema: bool | None = None) -> LoadedModel:
    """Rebuild from the stored config and load strictly; ``ema=None``: EMA weights when present."""
    path = Path(path)
    state = load_checkpoint(path)  # CheckpointError naming the file for any unreadable file
    config = state.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: no stored config; cannot rebuild the model")
    has_ema = isinstance(state.get("ema"), Mapping) and len(state["ema"]) > 0
    if ema and not has_ema:
        raise CheckpointError(
            f"{path}: has no EMA weights (trained with trainer.ema=null); use --no-ema"
        )
    use_ema = has_ema if ema is None else ema
    weights = "ema" if use_ema else "model"
    model = instantiate_model(config.get("model"), str(path))
    load_state_dict_strict(model, state[weights], source=f"{path} ({weights} weights)")
    model.eval()
    return LoadedModel(
        model=model,
        path=path,
        sha256=sha256_file(path),
        deploy=False,
        weights=weights,
        model_config=dict(config["model"]),
        data_config=_data_defaults(config.get("data")),
        source={
            "epoch": state.get("epoch"),
            "global_step": state.get("global_step"),
            "metrics": dict(state.get("metrics") or {}),
        },
    )


def is_deploy_path(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix in (".safetensors", ".json")


def deploy_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for a deploy DIR, its .safetensors file or its .json sidecar."""
    path = Path(path)
    if path.is_dir():
        return path / DEPLOY_WEIGHTS, path / DEPLOY_SIDECAR
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def load_deploy_checkpoint(path: str | Path) -> LoadedModel:
    """``reparameterize_model(build_model(cfg))`` with the safetensors weights loaded strictly."""
    from safetensors.torch import load_file

    weights_path, sidecar_path = deploy_paths(path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: no such deploy weights file")
    if not sidecar_path.is_file():
        raise CheckpointError(
            f"{sidecar_path}: missing sidecar of {weights_path} (tools/reparam.py writes both)"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{sidecar_path}: not a readable JSON sidecar: {err}") from err
    if not isinstance(sidecar, dict) or sidecar.get("kind") != DEPLOY_KIND:
        raise CheckpointError(f"{sidecar_path}: not an xvol deploy sidecar (kind != {DEPLOY_KIND})")
    if int(sidecar.get("format_version", 0)) > DEPLOY_FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar_path}: deploy format {sidecar['format_version']} is newer than this xvol"
        )
    sha = sha256_file(weights_path)
    if sidecar.get("weights_sha256") != sha:
        raise CheckpointError(
            f"{weights_path}: sha256 {sha[:12]}... does not match its sidecar "
            f"({str(sidecar.get('weights_sha256'))[:12]}...): truncated or modified file"
        )
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights_path}: cannot read safetensors file: {err}") from err
    model = reparameterize_model(instantiate_model(sidecar.get("model_config"), str(sidecar_path)))
    load_state_dict_strict(model, state, source=f"{weights_path}")
    model.eval()
    return LoadedModel(
        model=model,
        path=weights_path,
        sha256=sha,
        deploy=True,
        weights=str(sidecar.get("weights", "model")),
        model_config=dict(sidecar["model_config"]),
        data_config=dict(sidecar.get("data") or {}),
        source=dict(sidecar.get("source") or {}),
    )


def load_model(path: str | Path, ema: bool | None = None) -> LoadedModel:
    """Any checkpoint kind: a deploy DIR/.safetensors/.json, else a training checkpoint.

    ``ema`` picks the weights of a training checkpoint; for a deploy checkpoint the weights were
    fixed by tools/reparam.py, so an explicit choice that contradicts them is an error.
    """
    if is_deploy_path(path):
        loaded = load_deploy_checkpoint(path)
        if ema is not None and loaded.weights != ("ema" if ema else "model"):
            raise ToolError(
                f"{loaded.path}: this deploy checkpoint holds the {loaded.weights} weights; "
                f"drop --{'ema' if ema else 'no-ema'} or re-run tools/reparam.py"
            )
        return loaded
    return load_train_checkpoint(path, ema)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class ValData:
    """This rank's val loader plus the whole val list (file relative to val_dir, label)."""

    loader: Any
    val_dir: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    lo: int  # this rank's contiguous slice of ``samples``
    hi: int
    fingerprint: str  # sha256 over classes and (file, label): same images, same labels


def resolve_val_dir(path: str | Path) -> Path:
    """``ROOT`` holding ``val/``, or the val folder itself (``<val>/<class>/<image>``)."""
    from xvol.data.folder import DataError

    path = Path(path).expanduser()
    if (path / "val").is_dir():
        return path / "val"
    if not path.is_dir():
        raise DataError(
            f"missing val folder {path}: expected ROOT/val/<class>/<image> or "
            "VAL/<class>/<image> (ImageNet layout)"
        )
    if (path / "train").is_dir():
        raise DataError(f"{path} has train/ but no val/ folder: pass the val folder itself")
    return path


def eval_settings(
    loaded: LoadedModel,
    img_size: int | None,
    crop_pct: float | None,
    interpolation: str | None,
) -> dict[str, Any]:
    """Explicit values, else the checkpoint's training data config, else timm's defaults."""
    cfg = loaded.data_config
    return {
        "img_size": int(img_size or cfg.get("img_size") or 224),
        "crop_pct": float(crop_pct or cfg.get("crop_pct") or 0.875),
        "interpolation": str(interpolation or cfg.get("interpolation") or "bilinear"),
    }


def build_val_loader(
    val_dir: str | Path,
    *,
    num_classes: int,
    img_size: int,
    crop_pct: float,
    interpolation: str,
    batch_size: int,
    workers: int = 2,
    backend: str = "torchvision",
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    validate: str = "auto",
) -> ValData:
    """The data builders' eval loader over one val folder (every image exactly once over ranks).

    The builders take ``<root>/<train split>`` and ``<root>/<val split>``; passing the val folder
    as both splits gives a val-only bundle (the train loader is never iterated; its batch size of
    1 only has to fit). Unreadable images are an error here (``on_bad_image=error``): a score over
    a silently reduced set is not a top-1 over all images.
    """
    from xvol.data.folder import DataError, eval_bounds, scan_split

    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise DataError(f"missing val folder {val_dir}")
    classes, samples, _ = scan_split(val_dir)
    if len(classes) != num_classes:
        raise ToolError(
            f"class count mismatch: the model predicts {num_classes} classes but {val_dir} has "
            f"{len(classes)} class folders"
        )
    if backend == "torchvision":
        from xvol.data.imagenet import build
    elif backend == "dali":
        from xvol.data.dali import build
    else:
        raise ToolError(f"unknown data backend {backend!r} (torchvision or dali)")
    bundle = build(
        rank=rank,
        world_size=world_size,
        device=device,
        seed=0,
        root=str(val_dir.parent),
        num_classes=num_classes,
        img_size=img_size,
        batch_size=1,
        eval_batch_size=batch_size,
        workers=workers,
        crop_pct=crop_pct,
        interpolation=interpolation,
        on_bad_image="error",
        validate=validate,
        splits=(val_dir.name, val_dir.name),
    )
    if bundle.num_val != len(samples):
        raise ToolError(f"{val_dir}: loader holds {bundle.num_val} images, scan {len(samples)}")
    rel = [(os.path.relpath(p, val_dir), y) for p, y in samples]
    digest = hashlib.sha256("\n".join(classes).encode() + b"\0")
    for file, label in rel:
        digest.update(f"{file}\t{label}\n".encode())
    lo, hi = eval_bounds(len(rel), rank, world_size)
    return ValData(bundle.val, val_dir, classes, rel, lo, hi, digest.hexdigest())


# ----------------------------------------------------------------------------- records

# Required record keys and their types (nested keys as "a.b"); None allowed where listed.
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "kind": (str,),
    "model": (str,),
    "arch": (str,),
    "xvolution": (bool,),
    "deploy": (bool,),
    "weights": (str,),
    "checkpoint": (dict,),
    "checkpoint.path": (str,),
    "checkpoint.sha256": (str,),
    "checkpoint.source_sha256": (str,),
    "top1": (float, int),
    "top5": (float, int),
    "num_images": (int,),
    "num_classes": (int,),
    "params": (int,),
    "gmacs": (float, int),
    "predictions_sha256": (str,),
    "data": (dict,),
    "data.fingerprint": (str,),
    "data.img_size": (int,),
    "throughput": (dict,),
    "eval": (dict,),
    "eval.precision": (str,),
    "versions": (dict,),
    "date": (str,),
}
_NULLABLE = {"throughput.img_s"}


def _get(record: Mapping[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def validate_record(record: Any, source: str | Path) -> dict[str, Any]:
    """The record if it follows schema v1; otherwise RecordError naming ``source`` and the key."""
    if not isinstance(record, dict):
        raise RecordError(f"{source}: malformed record: not a JSON object")
    if record.get("kind") != RECORD_KIND:
        raise RecordError(
            f"{source}: malformed record: kind is {record.get('kind')!r}, expected {RECORD_KIND!r}"
        )
    if record.get("schema_version") != RECORD_SCHEMA_VERSION:
        raise RecordError(
            f"{source}: unsupported schema_version {record.get('schema_version')!r} "
            f"(this xvol reads {RECORD_SCHEMA_VERSION})"
        )
    for key, types in _RECORD_FIELDS.items():
        try:
            value = _get(record, key)
        except KeyError:
            raise RecordError(f"{source}: malformed record: missing {key!r}") from None
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise RecordError(
                f"{source}: malformed record: {key!r} is {type(value).__name__}, "
                f"expected {' or '.join(t.__name__ for t in types)}"
            )
    for key in ("top1", "top5"):
        if not 0.0 <= float(record[key]) <= 100.0:
            raise RecordError(f"{source}: malformed record: {key}={record[key]} outside [0, 100]")
    if record["weights"] not in WEIGHT_CHOICES:
        raise RecordError(f"{source}: malformed record: weights={record['weights']!r}")
    for key in _NULLABLE:
        try:
            value = _get(record, key)
        except KeyError:
            raise RecordError(f"{source}: malformed record: missing {key!r}") from None
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise RecordError(f"{source}: malformed record: {key!r} is {value!r}")
    return record
