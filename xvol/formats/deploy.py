"""The deploy checkpoint format: ``deploy.safetensors`` + the ``deploy.json`` sidecar.

Layout (``DEPLOY_FORMAT_VERSION`` 3)::

    DIR/deploy.safetensors   state_dict of reparameterize_model(spec.build()), fp32; metadata
                             holds the model spec and class names too
    DIR/deploy.json          sidecar: kind "xvol.deploy", format_version, model/arch/xvolution
                             (display), model_spec (ModelSpec.to_dict()), class_names (or null),
                             weights ("ema"|"model"), weights_sha256 (of the safetensors file),
                             integrity_sha256, source checkpoint path + sha256, verification,
                             summary, data (eval transform defaults), versions, git, date

``integrity_sha256`` is the sha256 of the canonical JSON of format_version, weights_sha256,
model_spec, class_names, weights and data: the sidecar is written last and a reader refuses a
modified or half-copied weights file, and an edited spec, class list or weights choice (same
weight shapes, another network) or eval transform (data.img_size, crop_pct, interpolation: how
xvol-eval scores the model by default). The hash is unkeyed: it catches accidents and hand
edits, not someone who edits and re-hashes.

Older sidecars still load, each held to what its format can vouch for:

- format 2 (integrity over the same keys but data): spec, class names and weights as above;
  its ``data`` is not covered, so it is not returned (``DeployCheckpoint.data`` None: the
  caller uses explicit settings or defaults, not a value anyone may have edited);
- format 1 (``model_config``, the raw Hydra model config, no integrity hash): the config must
  read as a ModelSpec and equal the copy in the safetensors metadata, which the weights sha256
  covers. The weights file must be a format 1 one (its metadata holds ``model_config``); a
  format 2/3 weights file (metadata ``model_spec``) is never read through a format 1 sidecar,
  so a sidecar rewritten as format 1 cannot drop the integrity check and name another network.

Written by xvol-reparam (after verifying the two forms agree); read by xvol-eval and xvol-export
through ``xvol.formats.load.load_model``, which builds the network from the validated spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvol.formats.checkpoint import WEIGHTS, CheckpointError, stored_class_names
from xvol.formats.files import atomic_path, sha256_file, write_json_atomic
from xvol.models.spec import ModelSpec

__all__ = [
    "DEPLOY_FORMAT_VERSION",
    "DEPLOY_KIND",
    "DEPLOY_SIDECAR",
    "DEPLOY_WEIGHTS",
    "DeployCheckpoint",
    "deploy_integrity",
    "deploy_paths",
    "is_deploy_path",
    "load_deploy_checkpoint",
    "write_deploy_checkpoint",
]

DEPLOY_KIND = "xvol.deploy"
DEPLOY_FORMAT_VERSION = 3
DEPLOY_WEIGHTS = "deploy.safetensors"
DEPLOY_SIDECAR = "deploy.json"
_INTEGRITY_KEYS = {
    2: ("format_version", "weights_sha256", "model_spec", "class_names", "weights"),
    3: ("format_version", "weights_sha256", "model_spec", "class_names", "weights", "data"),
}


@dataclasses.dataclass(frozen=True)
class DeployCheckpoint:
    """A deploy checkpoint whose files passed every check; the network is for the caller to
    build (``reparameterize_model(spec.build())``) and load ``state_dict`` into."""

    weights_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    spec: ModelSpec
    class_names: list[str] | None  # index = label; None when the sidecar does not say
    weights: str  # "ema" or "model": which weights of the training checkpoint
    sha256: str  # of the weights file
    state_dict: dict[str, torch.Tensor]
    # the eval transform and data root the sidecar vouches for (covered by integrity_sha256);
    # None for formats 1 and 2, whose ``data`` no hash covers
    data: dict[str, Any] | None = None


def is_deploy_path(path: str | Path) -> bool:
    """A deploy directory (holding either file) or a .safetensors/.json file."""
    path = Path(path)
    if path.is_dir():
        return (path / DEPLOY_SIDECAR).exists() or (path / DEPLOY_WEIGHTS).exists()
    return path.suffix in (".safetensors", ".json")


def deploy_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for a deploy DIR, its .safetensors file or its .json sidecar."""
    path = Path(path)
    if path.is_dir():
        return path / DEPLOY_WEIGHTS, path / DEPLOY_SIDECAR
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def deploy_integrity(sidecar: Mapping[str, Any]) -> str:
    """sha256 of what decides the deploy network, its labels and its default eval transform
    (canonical JSON), for the sidecar's format_version (2 or 3; 3 when absent).

    Covers the weights file (through its sha256), the model spec, the class names, which
    weights were taken and (format 3) ``data``: an edit of any of them no longer matches.
    """
    version = sidecar.get("format_version")
    keys = _INTEGRITY_KEYS.get(version if isinstance(version, int) else 0)
    keys = keys or _INTEGRITY_KEYS[DEPLOY_FORMAT_VERSION]
    covered = {key: sidecar.get(key) for key in keys}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


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

    Each file is written atomically, so a reader sees a matching pair or the previous one (or
    none).
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
    if sidecar.get("weights", "model") not in WEIGHTS:
        raise CheckpointError(f"{sidecar_path}: weights must be one of {WEIGHTS}")
    return sidecar, version


def _weights_metadata(weights_path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights_path}: cannot read safetensors file: {err}") from err


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def load_deploy_checkpoint(path: str | Path) -> DeployCheckpoint:
    """The sidecar and weights of a deploy DIR/.safetensors/.json, every check passed.

    Refused (CheckpointError or ModelSpecError, naming the file and key): a sidecar whose model
    description is not a valid ModelSpec, a weights file whose sha256 differs from the sidecar's,
    a format 2/3 sidecar whose spec, class names, weights choice or (3) data no longer match its
    integrity_sha256 or whose spec differs from the weights file's copy, a format 1 sidecar
    whose model_config differs from the weights file's copy or is missing there (a format 2/3
    weights file: a downgraded sidecar).
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
        class_names = stored_class_names(sidecar.get("class_names"), spec.num_classes, sidecar_path)
    else:
        spec = ModelSpec.from_config(sidecar.get("model_config"), str(sidecar_path), "model_config")
        class_names = None
    sha = sha256_file(weights_path)
    if sidecar.get("weights_sha256") != sha:
        raise CheckpointError(
            f"{weights_path}: sha256 {sha[:12]}... does not match its sidecar "
            f"({str(sidecar.get('weights_sha256'))[:12]}...): truncated or modified file"
        )
    metadata = _weights_metadata(weights_path)
    if version >= 2:
        if sidecar.get("integrity_sha256") != deploy_integrity(sidecar):
            edited = "model_spec, class_names, weights or data"
            if version == 2:  # format 2 does not cover data
                edited = "model_spec, class_names or weights"
            raise CheckpointError(
                f"{sidecar_path}: {edited} were edited (they no longer match integrity_sha256): "
                "the network would not be the one verified; re-run xvol-reparam instead of "
                "editing the sidecar"
            )
        stored = metadata.get("model_spec")
        if stored is None or _json_or_none(stored) != sidecar.get("model_spec"):
            raise CheckpointError(
                f"{sidecar_path}: model_spec differs from the copy in {weights_path.name} (or "
                "that file holds none: not a format 2/3 deploy weights file); re-run xvol-reparam"
            )
    else:
        if "model_spec" in metadata:
            raise CheckpointError(
                f"{sidecar_path}: a format 1 sidecar of format 2/3 weights ({weights_path.name} "
                "holds a model_spec): a downgraded sidecar would skip the integrity check; use "
                "the deploy.json xvol-reparam wrote, or re-run xvol-reparam"
            )
        stored = metadata.get("model_config")
        if stored is None or _json_or_none(stored) != sidecar.get("model_config"):
            raise CheckpointError(
                f"{sidecar_path}: model_config differs from the copy in {weights_path.name} "
                "(edited sidecar?): the network would not be the one verified; re-run "
                "xvol-reparam"
            )
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights_path}: cannot read safetensors file: {err}") from err
    return DeployCheckpoint(
        weights_path=weights_path,
        sidecar_path=sidecar_path,
        sidecar=sidecar,
        spec=spec,
        class_names=class_names,
        weights=str(sidecar.get("weights", "model")),
        sha256=sha,
        state_dict=state,
        data=_covered_data(sidecar, version),
    )


def _covered_data(sidecar: Mapping[str, Any], version: int) -> dict[str, Any] | None:
    """The sidecar's ``data`` when integrity_sha256 covers it (format 3), else None."""
    data = sidecar.get("data")
    return dict(data) if version >= 3 and isinstance(data, Mapping) else None
