"""Loading a network from a checkpoint file of either kind: the one way the tools read a model.

- A training checkpoint (``.pt``, read by :mod:`xvol.formats.checkpoint`; EMA weights by default
  when present), a run directory (its ``best.pt``) or a deploy checkpoint (read by
  :mod:`xvol.formats.deploy`; rebuilt as ``reparameterize_model(spec.build())``). Both are
  untrusted files: the network is rebuilt from a validated :class:`xvol.models.ModelSpec`,
  never by instantiating a ``_target_`` read from them.
- ``load_state_dict_strict``: weights into a module, wrapper prefixes stripped, any missing or
  unexpected key an error (the trainer's resume and fine-tuning use it too).
- The check of a val folder's classes against the class names a checkpoint was trained with.

timm keeps ``load_checkpoint``/``load_state_dict`` beside its model code (``_helpers.py``) for
the same reason: its scripts only call them. Errors are :class:`LoadError` (a
:class:`~xvol.formats.checkpoint.CheckpointError`), naming the file.
"""

from __future__ import annotations

import dataclasses
import logging
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from xvol.checks import (
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Check,
    is_int,
    is_number,
    one_of,
    optional,
)
from xvol.data.folder import INTERPOLATIONS
from xvol.formats.checkpoint import CheckpointError, load_checkpoint, stored_class_names
from xvol.formats.deploy import (
    DEPLOY_FORMAT_VERSION,
    DEPLOY_SIDECAR,
    DEPLOY_WEIGHTS,
    is_deploy_path,
    load_deploy_checkpoint,
)
from xvol.formats.files import sha256_file
from xvol.formats.record import recipe_fingerprint
from xvol.models.spec import ModelSpec
from xvol.reparam import is_reparameterizable, reparameterize_model

__all__ = [
    "RUN_DIR_CHECKPOINT",
    "LoadError",
    "LoadedModel",
    "build_from_spec",
    "check_class_names",
    "count_reparameterizable",
    "load_model",
    "load_state_dict_strict",
    "load_train_checkpoint",
    "model_identity",
    "resolve_checkpoint",
    "strip_prefixes",
]

log = logging.getLogger(__name__)


class LoadError(CheckpointError):
    """A checkpoint that cannot be loaded as asked (other weights than requested, class folders
    that are not its classes); the message names the file and what to pass instead."""


# ----------------------------------------------------------------------------- state_dicts


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, wrapped in either
    order: timm's ``clean_state_dict``."""
    from timm.models import clean_state_dict

    return clean_state_dict(dict(state_dict))


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint"
) -> None:
    """Load after stripping wrapper prefixes; any missing or unexpected key is an error.

    ``source`` (a file name) goes into the message, so a mismatch says where it came from.
    """
    state = strip_prefixes(state_dict)
    expected = set(module.state_dict().keys())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        raise CheckpointError(
            f"{source}: state_dict does not match {type(module).__name__}: "
            f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{source}: {err}") from err


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


def _triple(positive: bool) -> Check:
    """3 finite numbers (each > 0 when ``positive``): a normalization mean or std."""

    def ok(v: Any) -> bool:
        if isinstance(v, str | bytes) or not isinstance(v, Sequence) or len(v) != 3:
            return False
        return all(is_number(x) and (x > 0 or not positive) for x in v)

    return Check(f"3 finite numbers{' > 0' if positive else ''}", ok)


# The data keys of a run's config that the tools rebuild its eval transform and val folder from.
# xvol-train checks these keys with these same checks (xvol.config.TRAIN_CHECKS), so a run it
# accepts is one every tool loads. In a checkpoint a null key means "not said" (the default).
DATA_CHECKS: dict[str, Check] = {
    "name": Check("a non-empty name", lambda v: isinstance(v, str) and v.strip() != ""),
    "root": Check("a folder path", lambda v: isinstance(v, str) and v.strip() != ""),
    "num_classes": POSITIVE_INT,
    "img_size": POSITIVE_INT,
    "eval_img_size": optional(POSITIVE_INT),
    # timm reads crop_pct 0 (or null) as "unset" and crops at its default 0.875
    "crop_pct": POSITIVE_NUMBER,
    "interpolation": one_of(*INTERPOLATIONS),
    "mean": optional(_triple(positive=False)),
    "std": optional(_triple(positive=True)),
}


def _data_defaults(data_cfg: Any, source: str | Path) -> dict[str, Any]:
    """The eval-transform settings and data root a checkpoint was trained with (checked with
    DATA_CHECKS, the checks xvol-train ran on them)."""
    data_cfg = data_cfg if isinstance(data_cfg, Mapping) else {}
    for key, check in DATA_CHECKS.items():
        value = data_cfg.get(key)
        if value is not None and not check.ok(value):
            raise CheckpointError(
                f"{source}: data.{key}: expected {check.expected}, got {reprlib.repr(value)}"
            )
    out = {
        key: data_cfg.get(key)
        for key in ("name", "root", "num_classes", "crop_pct", "interpolation", "mean", "std")
    }
    out["img_size"] = data_cfg.get("eval_img_size") or data_cfg.get("img_size")
    for key in ("mean", "std"):
        if out[key] is not None:
            out[key] = [float(v) for v in out[key]]
    return out


def _seed(value: Any) -> int | None:
    return value if is_int(value) else None


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
            "recipe": recipe_fingerprint(config),
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
            raise LoadError(
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
    wrong, so a mismatch is a LoadError showing the first differing names, unless
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
        raise LoadError(
            f"{text}: every label after a renamed folder shifts; pass "
            "--allow-class-mismatch to evaluate anyway"
        )
    log.warning("%s; evaluating anyway (--allow-class-mismatch)", text)
    return False
