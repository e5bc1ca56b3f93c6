"""The CLI plumbing the post-training tools share (xvol-reparam, -eval, -leaderboard, -export).

- Their common options (``tool_args``), the one-line error wrapper (``tool_errors``) and logging.
- Loading a model from either checkpoint kind: a training checkpoint (``.pt``, read by
  xvol.formats.checkpoint; EMA weights by default when present), a run directory (its best.pt)
  or a deploy checkpoint (read by xvol.formats.deploy; rebuilt as
  ``reparameterize_model(spec.build())``). Both are untrusted files: the network is rebuilt from
  a validated ``xvol.models.ModelSpec``, never by instantiating a ``_target_`` read from them.
- A val loader over any ImageNet-layout val folder through the regular data builders, and the
  check of its class folders against the class names a checkpoint was trained with.

The file formats themselves (and the atomic writer) are xvol.formats.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
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

from xvol.engine.checkpoint import load_state_dict_strict
from xvol.engine.options import schema_numbers
from xvol.formats.checkpoint import (
    CheckpointError,
    checkpoint_versions,
    load_checkpoint,
    stored_class_names,
)
from xvol.formats.deploy import (
    DEPLOY_FORMAT_VERSION,
    DEPLOY_SIDECAR,
    DEPLOY_WEIGHTS,
    is_deploy_path,
    load_deploy_checkpoint,
)
from xvol.formats.files import sha256_file
from xvol.formats.record import RecordError, recipe_fingerprint
from xvol.models.spec import ModelSpec, ModelSpecError
from xvol.reparam import is_reparameterizable, reparameterize_model

__all__ = [
    "LoadedModel",
    "ToolError",
    "ValData",
    "build_from_spec",
    "build_val_loader",
    "check_class_names",
    "check_xvol_package",
    "count_reparameterizable",
    "eval_settings",
    "load_model",
    "load_train_checkpoint",
    "model_identity",
    "now_iso",
    "refuse_existing",
    "resolve_checkpoint",
    "resolve_val_dir",
    "setup_tool_logging",
    "tool_args",
    "tool_errors",
    "versions",
]

log = logging.getLogger(__name__)


class ToolError(RuntimeError):
    """A problem with the tool's inputs or outputs; the message is what the user sees."""


# ----------------------------------------------------------------------------- options, errors


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


def check_xvol_package() -> None:
    """ToolError unless ``import xvol`` is the xvol package and its models are in timm's registry.

    Run from a directory holding a folder named ``xvol`` that has no ``__init__.py`` (the parent
    folder of a clone named xvol), Python takes that folder for a namespace package: with an
    editable install ``xvol.cli``/``xvol.models`` still import, but ``xvol/__init__.py`` never
    runs, so no model is registered and timm says "Unknown model". That is refused here, naming
    the folder. (A plain ``import xvol`` cannot check itself: no xvol code runs in that case.)
    """
    import timm

    import xvol

    if getattr(xvol, "__file__", None) is None:
        where = ", ".join(str(p) for p in getattr(xvol, "__path__", [])) or "?"
        raise ToolError(
            f"'import xvol' found the folder {where}, not the xvol package (a folder named xvol "
            "without __init__.py in the working directory or on sys.path, e.g. the parent folder "
            "of a clone named xvol): no xvol model is registered with timm; run from another "
            "directory"
        )
    if not timm.is_model("xresnet18"):
        raise ToolError(
            f"xvol ({xvol.__file__}) is imported but timm does not know xresnet18: "
            "xvol.models did not register"
        )


@contextlib.contextmanager
def tool_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn any exception into ``prog: error: <one line>`` on stderr and exit status 1.

    Every tool starts with check_xvol_package (a namespace ``xvol`` fails here, in one line).

    ``debug`` (or XVOL_DEBUG=1) lets the traceback through instead. Known error types
    (ToolError, CheckpointError, RecordError, ModelSpecError, DataError, FileNotFoundError,
    MissingExtra) show
    their message alone; others show their type too, since the message may not make sense
    without it.
    """
    from xvol.data.folder import DataError
    from xvol.extras import MissingExtra

    debug = debug or os.environ.get("XVOL_DEBUG", "") not in ("", "0")
    try:
        check_xvol_package()
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
            | RecordError
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


def refuse_existing(paths: Sequence[Path], force: bool, what: str = "output") -> None:
    """Refuse to overwrite (the house rule) unless ``force``."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ToolError(f"{what} already exists: {', '.join(existing)} (pass --force to overwrite)")


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
        "mean": (list, tuple),
        "std": (list, tuple),
    }
    out = {
        "name": data_cfg.get("name"),
        "root": data_cfg.get("root"),
        "num_classes": data_cfg.get("num_classes"),
        "img_size": data_cfg.get("eval_img_size") or data_cfg.get("img_size"),
        "crop_pct": data_cfg.get("crop_pct"),
        "interpolation": data_cfg.get("interpolation"),
        "mean": data_cfg.get("mean"),
        "std": data_cfg.get("std"),
    }
    for key, value in out.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, types[key])):
            raise CheckpointError(
                f"{source}: data.{key} is {type(value).__name__}, expected "
                f"{' or '.join(t.__name__ for t in types[key])}"
            )
    for key in ("mean", "std"):  # the normalization: 3 finite numbers, std positive
        value = out[key]
        if value is None:
            continue
        ok = len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (key == "mean" or v > 0) for v in value
        )  # fmt: skip
        if not ok:
            raise CheckpointError(
                f"{source}: data.{key} must be 3 finite numbers"
                f"{' > 0' if key == 'std' else ''}, got {value!r}"
            )
        out[key] = [float(v) for v in value]
    return out


def _schema_typed(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored run config with the trainer's float options as floats (xvol.engine.options
    .schema_numbers), so runs from before and after the trainer schema share recipes."""
    trainer = config.get("trainer")
    if not isinstance(trainer, Mapping):
        return dict(config)
    return {**config, "trainer": schema_numbers(trainer)}


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
    class_names = stored_class_names(state.get("class_names"), spec.num_classes, path)
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
            "recipe": recipe_fingerprint(_schema_typed(config)),
        },
    )


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


def _load_deploy(path: Path) -> LoadedModel:
    """``reparameterize_model(spec.build())`` with the checked deploy weights loaded strictly."""
    ckpt = load_deploy_checkpoint(path)
    if ckpt.data is None and ckpt.sidecar.get("data") is not None:
        log.warning(
            "%s: deploy format %s: its data settings (img_size, crop_pct, interpolation, root) "
            "are not covered by its integrity hash and are not used: pass --img-size, "
            "--crop-pct, --interpolation and --data (defaults 224, 0.875, bilinear), or re-run "
            "xvol-reparam for a format %d sidecar",
            ckpt.sidecar_path,
            ckpt.sidecar.get("format_version"),
            DEPLOY_FORMAT_VERSION,
        )
    model = reparameterize_model(build_from_spec(ckpt.spec, str(ckpt.sidecar_path)))
    load_state_dict_strict(model, ckpt.state_dict, source=f"{ckpt.weights_path}")
    model.eval()
    source = ckpt.sidecar.get("source")
    return LoadedModel(
        model=model,
        path=ckpt.weights_path,
        sha256=ckpt.sha256,
        deploy=True,
        weights=ckpt.weights,
        spec=ckpt.spec,
        class_names=ckpt.class_names,
        data_config=_data_defaults(ckpt.data, ckpt.sidecar_path),
        source=dict(source) if isinstance(source, Mapping) else {},
    )


def load_model(path: str | Path, ema: bool | None = None) -> LoadedModel:
    """Any checkpoint kind: a deploy DIR/.safetensors/.json, a run directory (its best.pt), else
    a training checkpoint.

    ``ema`` picks the weights of a training checkpoint; for a deploy checkpoint the weights were
    fixed by tools/reparam.py, so an explicit choice that contradicts them is an error.
    """
    path = resolve_checkpoint(path)
    if is_deploy_path(path):
        loaded = _load_deploy(path)
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
    """Explicit values, else the checkpoint's training data config, else timm's defaults. The
    normalization (mean/std) is always the training one: ImageNet's unless the data config set
    its own (CIFAR-10's, say)."""
    from xvol.data.folder import IMAGENET_MEAN, IMAGENET_STD

    cfg = loaded.data_config
    return {
        "img_size": int(img_size or cfg.get("img_size") or 224),
        "crop_pct": float(crop_pct or cfg.get("crop_pct") or 0.875),
        "interpolation": str(interpolation or cfg.get("interpolation") or "bilinear"),
        "mean": list(cfg.get("mean") or IMAGENET_MEAN),
        "std": list(cfg.get("std") or IMAGENET_STD),
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
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
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
    if mean is not None:
        common["mean"] = mean
    if std is not None:
        common["std"] = std
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
