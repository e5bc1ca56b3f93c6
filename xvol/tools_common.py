"""Shared pieces of the post-training tools (tools/reparam.py, eval.py, leaderboard.py, export.py).

- Loading a model from either checkpoint kind: a training checkpoint (``.pt``, the format of
  xvol/engine/checkpoint.py; EMA weights by default when present) or a deploy checkpoint
  (``deploy.safetensors`` + ``deploy.json`` sidecar written by tools/reparam.py; rebuilt as
  ``reparameterize_model(spec.build())``). Both are untrusted files: the network is rebuilt from
  a validated ``xvol.models.ModelSpec``, never by instantiating a ``_target_`` read from them.
- The deploy checkpoint format: reader, writer, version and integrity check.
- The eval record schema (one JSON per evaluated checkpoint) and its validation, shared by the
  writer (tools/eval.py) and the reader (tools/leaderboard.py).
- A val loader over any ImageNet-layout val folder through the regular data builders, and the
  check of its class folders against the class names a checkpoint was trained with.
- Atomic writes that refuse to overwrite, sha256, versions, and the one-line error wrapper.

Deploy checkpoint layout (``DEPLOY_FORMAT_VERSION`` 2)::

    DIR/deploy.safetensors   state_dict of reparameterize_model(spec.build()), fp32; metadata
                             holds the model spec and class names too
    DIR/deploy.json          sidecar: kind "xvol.deploy", format_version, model/arch/xvolution
                             (display), model_spec (ModelSpec.to_dict()), class_names (or null),
                             weights ("ema"|"model"), weights_sha256 (of the safetensors file),
                             integrity_sha256, source checkpoint path + sha256, verification,
                             summary, data (eval transform defaults), versions, git, date

``integrity_sha256`` is the sha256 of the canonical JSON of format_version, weights_sha256,
model_spec, class_names and weights: the sidecar is written last and a reader refuses a modified
or half-copied weights file, and an edited spec, class list or weights choice (same weight shapes,
another network). Format 1 sidecars (``model_config``, the raw Hydra model config) still load:
their config must read as a ModelSpec and equal the copy in the safetensors metadata, which the
weights sha256 covers.
"""

from __future__ import annotations

import argparse
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
from xvol.models.spec import ModelSpec, ModelSpecError
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
    "build_from_spec",
    "build_val_loader",
    "check_class_names",
    "count_reparameterizable",
    "deploy_integrity",
    "deploy_paths",
    "eval_settings",
    "is_deploy_path",
    "load_deploy_checkpoint",
    "load_model",
    "load_train_checkpoint",
    "model_identity",
    "now_iso",
    "recipe_fingerprint",
    "refuse_existing",
    "resolve_checkpoint",
    "resolve_val_dir",
    "setup_tool_logging",
    "sha256_file",
    "tool_args",
    "tool_errors",
    "validate_record",
    "versions",
    "write_deploy_checkpoint",
    "write_json_atomic",
]

log = logging.getLogger(__name__)

DEPLOY_KIND = "xvol.deploy"
DEPLOY_FORMAT_VERSION = 2
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


def tool_args(
    *, ema: bool = False, img_size: bool = False, atol: float | None = None, force: bool = False
) -> argparse.ArgumentParser:
    """The options the tools share, declared once: an argparse parent (``parents=[...]``).
    ``--debug`` always; the others when asked (``atol``: that tool's default)."""
    parent = argparse.ArgumentParser(add_help=False)
    if ema:
        parent.add_argument(
            "--ema",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="training checkpoint: EMA weights (default when present); --no-ema: raw weights",
        )
    if img_size:
        parent.add_argument("--img-size", type=int, help="default: the checkpoint's eval size")
    if atol is not None:
        parent.add_argument(
            "--atol", type=float, default=atol, help=f"max |difference| allowed (default {atol:g})"
        )
    if force:
        parent.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parent.add_argument("--debug", action="store_true", help="show tracebacks (or XVOL_DEBUG=1)")
    return parent


@contextlib.contextmanager
def tool_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn any exception into ``prog: error: <one line>`` on stderr and exit status 1.

    ``debug`` (or XVOL_DEBUG=1) lets the traceback through instead. Known error types
    (ToolError, CheckpointError, ModelSpecError, DataError, FileNotFoundError, MissingExtra) show
    their message alone; others show their type too, since the message may not make sense
    without it.
    """
    from xvol.data.folder import DataError
    from xvol.extras import MissingExtra

    debug = debug or os.environ.get("XVOL_DEBUG", "") not in ("", "0")
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if debug:
            raise
        known = isinstance(
            err,
            ToolError
            | CheckpointError
            | ModelSpecError
            | DataError
            | FileNotFoundError
            | MissingExtra,
        )
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


def build_from_spec(spec: ModelSpec, source: str) -> nn.Module:
    """``spec.build()``; a failure (a spec timm cannot build) names the file it came from."""
    try:
        return spec.build()
    except Exception as err:
        raise CheckpointError(
            f"{source}: cannot build {spec.identity()['model']}: {type(err).__name__}: {err}"
        ) from err


def model_identity(model: ModelSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Display name, backbone arch and whether X-volution is in it (``ModelSpec.identity``).

    Takes a spec or a stored model config (read as a spec, so an invalid one is an error).
    """
    spec = model if isinstance(model, ModelSpec) else ModelSpec.from_config(model)
    return spec.identity()


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
    spec: ModelSpec
    class_names: list[str] | None  # index = label; None when the file does not say
    data_config: dict[str, Any]
    source: dict[str, Any]  # training checkpoint: path, sha256, epoch, global_step, metrics

    @property
    def identity(self) -> dict[str, Any]:
        return self.spec.identity()

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes


def _class_names(value: Any, num_classes: int, source: str | Path, key: str) -> list[str] | None:
    """A stored class list: None, or one non-empty str per class (index = label)."""
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


def _data_defaults(data_cfg: Any, source: str | Path) -> dict[str, Any]:
    """The eval-transform settings and data root a checkpoint was trained with (type-checked)."""
    data_cfg = data_cfg if isinstance(data_cfg, Mapping) else {}
    types: dict[str, tuple[type, ...]] = {
        "name": (str,),
        "root": (str,),
        "num_classes": (int,),
        "img_size": (int,),
        "crop_pct": (float, int),
        "interpolation": (str,),
    }
    out = {
        "name": data_cfg.get("name"),
        "root": data_cfg.get("root"),
        "num_classes": data_cfg.get("num_classes"),
        "img_size": data_cfg.get("eval_img_size") or data_cfg.get("img_size"),
        "crop_pct": data_cfg.get("crop_pct"),
        "interpolation": data_cfg.get("interpolation"),
    }
    for key, value in out.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, types[key])):
            raise CheckpointError(
                f"{source}: data.{key} is {type(value).__name__}, expected "
                f"{' or '.join(t.__name__ for t in types[key])}"
            )
    return out


# Stored config keys that say where, how fast or under which name a run happened, not what it
# trained: runs that differ only here (and in the model and seed) follow the same recipe.
_NOT_RECIPE = (
    "seed",
    "run_name",
    "resume",
    "paths",
    "logger",
    "model",
    "data.root",
    "data.workers",
    "data.validate",
    "data.on_bad_image",
    "data.eval_batch_size",
    "data.backend",
    "data.dali",
    "trainer.device",
    "trainer.compile",
    "trainer.channels_last",
    "trainer.deterministic",
    "trainer.checkpoint",
    "trainer.log_interval",
    "trainer.progress_bar",
    "trainer.max_skipped_steps",
    "trainer.allow_class_mismatch",
    "trainer.debug_nan_at_step",
    "trainer.debug_signal_at_step",
)


def recipe_fingerprint(config: Mapping[str, Any]) -> str | None:
    """sha256 (16 hex) of the training recipe a stored config describes, model and seed aside.

    Records of one model with equal fingerprints are seeds of one recipe (the leaderboard
    averages them); an X-volution model and its baseline with equal fingerprints were trained
    alike (the leaderboard pairs them by seed). None when the config has nothing beyond the
    model and data root (as in hand-made checkpoints).
    """
    recipe = json.loads(json.dumps(dict(config), default=str))  # a deep, plain copy
    for dotted in _NOT_RECIPE:
        *parents, leaf = dotted.split(".")
        node: Any = recipe
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    if set(recipe) <= {"data"}:
        return None
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _seed(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load_train_checkpoint(path: str | Path, ema: bool | None = None) -> LoadedModel:
    """Rebuild from the stored model spec and load strictly; ``ema=None``: EMA when present."""
    path = Path(path)
    state = load_checkpoint(path)  # CheckpointError naming the file for any unreadable file
    config = state.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: no stored config; cannot rebuild the model")
    spec = ModelSpec.from_config(config.get("model"), str(path), where="config.model")
    class_names = _class_names(state.get("class_names"), spec.num_classes, path, "class_names")
    data_config = _data_defaults(config.get("data"), path)
    has_ema = isinstance(state.get("ema"), Mapping) and len(state["ema"]) > 0
    if ema and not has_ema:
        raise CheckpointError(
            f"{path}: has no EMA weights (trained with trainer.ema=null); use --no-ema"
        )
    use_ema = has_ema if ema is None else ema
    weights = "ema" if use_ema else "model"
    if not isinstance(state.get(weights), Mapping):
        raise CheckpointError(f"{path}: '{weights}' is not a state_dict")
    model = build_from_spec(spec, str(path))
    load_state_dict_strict(model, state[weights], source=f"{path} ({weights} weights)")
    model.eval()
    return LoadedModel(
        model=model,
        path=path,
        sha256=sha256_file(path),
        deploy=False,
        weights=weights,
        spec=spec,
        class_names=class_names,
        data_config=data_config,
        source={
            "epoch": state.get("epoch"),
            "global_step": state.get("global_step"),
            "metrics": dict(state.get("metrics") or {}),
            "seed": _seed(config.get("seed")),
            "recipe": recipe_fingerprint(config),
        },
    )


def is_deploy_path(path: str | Path) -> bool:
    path = Path(path)
    if path.is_dir():
        return (path / DEPLOY_SIDECAR).exists() or (path / DEPLOY_WEIGHTS).exists()
    return path.suffix in (".safetensors", ".json")


RUN_DIR_CHECKPOINT = "best.pt"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or deploy directory as given; a run directory as its ``best.pt``.

    A directory holding ``deploy.json``/``deploy.safetensors`` is a deploy checkpoint; one
    holding ``best.pt`` is a training run directory. Anything else is refused, naming the
    checkpoints that are there.
    """
    path = Path(path).expanduser()
    if not path.is_dir() or is_deploy_path(path):
        return path
    best = path / RUN_DIR_CHECKPOINT
    if best.is_file():
        log.info("%s is a run directory: evaluating %s", path, best)
        return best
    found = sorted(p.name for p in path.glob("*.pt"))
    if (path / "deploy").is_dir() and is_deploy_path(path / "deploy"):
        found.append("deploy/")
    hint = f"found {', '.join(found)}: pass one of them" if found else "it holds no checkpoint"
    raise CheckpointError(
        f"{path}: neither a run directory with {RUN_DIR_CHECKPOINT} nor a deploy directory "
        f"({DEPLOY_SIDECAR} + {DEPLOY_WEIGHTS}); {hint}"
    )


def deploy_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for a deploy DIR, its .safetensors file or its .json sidecar."""
    path = Path(path)
    if path.is_dir():
        return path / DEPLOY_WEIGHTS, path / DEPLOY_SIDECAR
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def deploy_integrity(sidecar: Mapping[str, Any]) -> str:
    """sha256 of what decides the deploy network and its labels (canonical JSON).

    Covers the weights file (through its sha256), the model spec, the class names and which
    weights were taken: an edit of any of them in the sidecar no longer matches.
    """
    covered = {key: sidecar.get(key) for key in _INTEGRITY_KEYS}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


_INTEGRITY_KEYS = ("format_version", "weights_sha256", "model_spec", "class_names", "weights")


def write_deploy_checkpoint(
    model: nn.Module,
    weights_path: Path,
    sidecar_path: Path,
    *,
    spec: ModelSpec,
    class_names: Sequence[str] | None,
    weights: str,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Weights first, then the sidecar naming their sha256 and the integrity hash; returns it.

    Each file goes to a temp name and is renamed into place, so a reader sees a matching pair
    or the previous one (or none).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = list(class_names) if class_names is not None else None
    metadata = {
        "format": "pt",
        "kind": DEPLOY_KIND,
        "model_spec": json.dumps(spec.to_dict()),
        "class_names": json.dumps(names),
    }
    sidecar: dict[str, Any] = {
        "kind": DEPLOY_KIND,
        "format_version": DEPLOY_FORMAT_VERSION,
        **spec.identity(),
        "model_spec": spec.to_dict(),
        "class_names": names,
        "weights": weights,
        "weights_file": weights_path.name,
        "weights_sha256": None,
        "integrity_sha256": None,
        **extra,
    }
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        sidecar["weights_sha256"] = sha256_file(tmp)
    sidecar["integrity_sha256"] = deploy_integrity(sidecar)
    write_json_atomic(sidecar_path, sidecar)
    return sidecar


def _read_sidecar(sidecar_path: Path) -> tuple[dict[str, Any], int]:
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{sidecar_path}: not a readable JSON sidecar: {err}") from err
    if not isinstance(sidecar, dict) or sidecar.get("kind") != DEPLOY_KIND:
        raise CheckpointError(f"{sidecar_path}: not an xvol deploy sidecar (kind != {DEPLOY_KIND})")
    version = sidecar.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{sidecar_path}: format_version {version!r} is not a valid version")
    if version > DEPLOY_FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar_path}: deploy format {version} is newer than this xvol "
            f"({DEPLOY_FORMAT_VERSION})"
        )
    if sidecar.get("weights", "model") not in WEIGHT_CHOICES:
        raise CheckpointError(f"{sidecar_path}: weights must be one of {WEIGHT_CHOICES}")
    return sidecar, version


def _weights_metadata(weights_path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights_path}: cannot read safetensors file: {err}") from err


def load_deploy_checkpoint(path: str | Path) -> LoadedModel:
    """``reparameterize_model(spec.build())`` with the safetensors weights loaded strictly.

    Refused (CheckpointError or ModelSpecError, naming the file and key): a sidecar whose model
    description is not a valid ModelSpec, a weights file whose sha256 differs from the sidecar's,
    a format 2 sidecar whose spec, class names or weights choice no longer match its
    integrity_sha256, a format 1 sidecar whose model_config differs from the weights file's copy.
    """
    from safetensors.torch import load_file

    weights_path, sidecar_path = deploy_paths(path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: no such deploy weights file")
    if not sidecar_path.is_file():
        raise CheckpointError(
            f"{sidecar_path}: missing sidecar of {weights_path} (tools/reparam.py writes both)"
        )
    sidecar, version = _read_sidecar(sidecar_path)
    if version >= 2:
        if "model_config" in sidecar:
            raise CheckpointError(
                f"{sidecar_path}: model_config is not part of deploy format {version} (the "
                "network is model_spec): remove it, or re-run xvol-reparam"
            )
        spec = ModelSpec.from_dict(sidecar.get("model_spec"), str(sidecar_path), "model_spec")
        class_names = _class_names(
            sidecar.get("class_names"), spec.num_classes, sidecar_path, "class_names"
        )
    else:
        spec = ModelSpec.from_config(sidecar.get("model_config"), str(sidecar_path), "model_config")
        class_names = None
    sha = sha256_file(weights_path)
    if sidecar.get("weights_sha256") != sha:
        raise CheckpointError(
            f"{weights_path}: sha256 {sha[:12]}... does not match its sidecar "
            f"({str(sidecar.get('weights_sha256'))[:12]}...): truncated or modified file"
        )
    if version >= 2:
        if sidecar.get("integrity_sha256") != deploy_integrity(sidecar):
            raise CheckpointError(
                f"{sidecar_path}: model_spec, class_names or weights were edited (they no longer "
                "match integrity_sha256): the network would not be the one verified; re-run "
                "xvol-reparam instead of editing the sidecar"
            )
    else:
        stored = _weights_metadata(weights_path).get("model_config")
        if stored is not None and _json_or_none(stored) != sidecar.get("model_config"):
            raise CheckpointError(
                f"{sidecar_path}: model_config differs from the copy in {weights_path.name} "
                "(edited sidecar?): the network would not be the one verified; re-run "
                "xvol-reparam"
            )
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights_path}: cannot read safetensors file: {err}") from err
    model = reparameterize_model(build_from_spec(spec, str(sidecar_path)))
    load_state_dict_strict(model, state, source=f"{weights_path}")
    model.eval()
    source = sidecar.get("source")
    return LoadedModel(
        model=model,
        path=weights_path,
        sha256=sha,
        deploy=True,
        weights=str(sidecar.get("weights", "model")),
        spec=spec,
        class_names=class_names,
        data_config=_data_defaults(sidecar.get("data"), sidecar_path),
        source=dict(source) if isinstance(source, Mapping) else {},
    )


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def load_model(path: str | Path, ema: bool | None = None) -> LoadedModel:
    """Any checkpoint kind: a deploy DIR/.safetensors/.json, a run directory (its best.pt), else
    a training checkpoint.

    ``ema`` picks the weights of a training checkpoint; for a deploy checkpoint the weights were
    fixed by tools/reparam.py, so an explicit choice that contradicts them is an error.
    """
    path = resolve_checkpoint(path)
    if is_deploy_path(path):
        loaded = load_deploy_checkpoint(path)
        if ema is not None and loaded.weights != ("ema" if ema else "model"):
            raise ToolError(
                f"{loaded.path}: this deploy checkpoint holds the {loaded.weights} weights; "
                f"drop --{'ema' if ema else 'no-ema'} or re-run tools/reparam.py"
            )
        return loaded
    return load_train_checkpoint(path, ema)


def check_class_names(
    expected: Sequence[str] | None,
    found: Sequence[str],
    checkpoint: str | Path,
    val_dir: str | Path,
    allow_mismatch: bool = False,
) -> bool | None:
    """Whether the val class folders are the classes the checkpoint was trained on, in order.

    A renamed, added or removed folder shifts every label after it: the score would be silently
    wrong, so a mismatch is a ToolError showing the first differing names, unless
    ``allow_mismatch`` (then a warning). Returns None when the checkpoint stores no names.
    """
    if expected is None:
        log.warning(
            "%s stores no class names: only the class count of %s is checked", checkpoint, val_dir
        )
        return None
    if list(expected) == list(found):
        return True
    differ = [
        i
        for i in range(max(len(expected), len(found)))
        if i >= len(expected) or i >= len(found) or expected[i] != found[i]
    ]

    def name(names: Sequence[str], i: int) -> str:
        return repr(names[i]) if i < len(names) else "(none)"

    shown = "; ".join(
        f"label {i}: {name(found, i)} here, {name(expected, i)} in the checkpoint"
        for i in differ[:3]
    )
    text = (
        f"{val_dir}: class folders differ from the class names stored in {checkpoint} "
        f"({len(differ)} of {len(expected)} labels differ; {shown}"
        f"{'; ...' if len(differ) > 3 else ''})"
    )
    if not allow_mismatch:
        raise ToolError(
            f"{text}: every label after a renamed folder shifts; pass "
            "--allow-class-mismatch to evaluate anyway"
        )
    log.warning("%s; evaluating anyway (--allow-class-mismatch)", text)
    return False


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
    skipped: int = 0  # bad files left out (--on-bad-image skip)


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


BAD_IMAGE_POLICIES = ("error", "skip")


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
    on_bad_image: str = "error",
) -> ValData:
    """The data backends' eval loader over one val folder (every image exactly once over ranks).

    The folder is scanned and its images checked once (``validate``: the data builders' modes).
    Files that are not readable images stop the evaluation (``on_bad_image="error"``: a score
    over a silently reduced set is not a top-1 over all images), or are left out
    (``"skip"``, with one warning; the record counts them in ``data.skipped_files``, and the
    fingerprint covers the images scored). Each bad file is named and counted once.
    """
    from xvol.data.folder import DataError, Split, eval_bounds, find_bad_images, scan_split

    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ToolError(f"--on-bad-image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    if backend not in ("torchvision", "dali"):
        raise ToolError(f"unknown data backend {backend!r} (torchvision or dali)")
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise DataError(f"missing val folder {val_dir}")
    classes, samples, rejected = scan_split(val_dir, log=rank == 0)
    if len(classes) != num_classes:
        raise ToolError(
            f"class count mismatch: the model predicts {num_classes} classes but {val_dir} has "
            f"{len(classes)} class folders"
        )
    paths = [p for p, _ in samples]
    bad = sorted(set(rejected + find_bad_images(paths, validate, max(4, 2 * workers))))
    if bad:
        shown = "; ".join(f"{os.path.relpath(p, val_dir)} ({why})" for p, why in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        text = f"{len(bad)} file(s) in {val_dir} are not readable images: {shown}{more}"
        if on_bad_image == "error":
            raise ToolError(
                f"{text}. Remove them, or pass --on-bad-image skip to score the other images "
                "(the record counts the skipped files)"
            )
        if rank == 0:
            log.warning("%s; skipped (--on-bad-image skip)", text)
    skip = {p for p, _ in bad}
    kept = [(p, y) for p, y in samples if p not in skip]
    missing = sorted(set(range(num_classes)) - {y for _, y in kept})
    if missing:
        raise ToolError(
            f"{val_dir}: no readable image left in class folder(s) "
            f"{', '.join(classes[y] for y in missing[:5])}"
        )
    split = Split(val_dir, classes, kept)
    common = {
        "rank": rank,
        "world_size": world_size,
        "device": device,
        "batch_size": batch_size,
        "workers": workers,
        "img_size": img_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
    }
    if backend == "torchvision":
        from xvol.data.imagenet import eval_loader

        loader = eval_loader(split, on_bad_image="error", **common)
    else:
        from xvol.data.dali import eval_loader

        loader = eval_loader(split, **common)
    rel = [(os.path.relpath(p, val_dir), y) for p, y in kept]
    digest = hashlib.sha256("\n".join(classes).encode() + b"\0")
    for file, label in rel:
        digest.update(f"{file}\t{label}\n".encode())
    lo, hi = eval_bounds(len(rel), rank, world_size)
    return ValData(loader, val_dir, classes, rel, lo, hi, digest.hexdigest(), len(bad))


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
# Keys added after schema 1 was first written: checked when present, absent in older records.
# seed and recipe (recipe_fingerprint) come from the training checkpoint's stored config (null
# when it has none); data.backend decides the preprocessing and so is part of the record's
# identity; data.skipped_files counts the bad files --on-bad-image skip left out.
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "seed": (int, type(None)),
    "recipe": (str, type(None)),
    "data.backend": (str,),
    "data.skipped_files": (int,),
}


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
    for key, types in _OPTIONAL_FIELDS.items():
        try:
            value = _get(record, key)
        except KeyError:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            raise RecordError(
                f"{source}: malformed record: {key!r} is {type(value).__name__}, "
                f"expected {' or '.join(t.__name__ for t in types)}"
            )
    for key in _NULLABLE:
        try:
            value = _get(record, key)
        except KeyError:
            raise RecordError(f"{source}: malformed record: missing {key!r}") from None
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise RecordError(f"{source}: malformed record: {key!r} is {value!r}")
    return record
