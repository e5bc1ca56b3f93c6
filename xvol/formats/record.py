"""The eval record format: one JSON file per evaluated checkpoint (``RECORD_SCHEMA_VERSION``).

Written by xvol-eval (:func:`write_record`, under :func:`record_name`), read by xvol-leaderboard
(:func:`read_record`); both hold every record to :func:`validate_record`, so a record the writer
produced always reads back. The keys are documented in the README ("Eval record"). Keys added
after schema 1 was first written are optional (absent in older records) but type-checked when
present; a change to what an existing key means would bump the schema version.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xvol.checks import is_int, is_number
from xvol.formats.checkpoint import WEIGHTS
from xvol.formats.files import write_json_atomic

__all__ = [
    "RECORD_KIND",
    "RECORD_SCHEMA_VERSION",
    "RecordError",
    "eval_transform_tag",
    "predictions_sha256",
    "read_record",
    "recipe_fingerprint",
    "record_name",
    "validate_record",
    "write_record",
]

RECORD_KIND = "xvol.eval"
RECORD_SCHEMA_VERSION = 1


# A record is small (a few kB; per-image predictions go to their own CSV): anything much
# larger, or nested deeper than its own keys go, is not a record and is not parsed.
MAX_RECORD_BYTES = 1 << 20
MAX_RECORD_DEPTH = 16
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class RecordError(ValueError):
    """A malformed or duplicate eval record; the message names the file."""


def eval_transform_tag(img_size: int, crop_pct: float, interpolation: str) -> str:
    """``<size>px-crop<crop_pct>-<interpolation>``: the eval transform, as record names show it."""
    tag = f"{int(img_size)}px-crop{float(crop_pct):g}-{interpolation}"
    if not _NAME_PART.fullmatch(tag):
        raise RecordError(f"eval transform {tag!r} cannot be part of a record name")
    return tag


def record_name(
    model: str,
    form: str,
    weights: str,
    backend: str,
    sha256: str,
    val_fingerprint: str,
    transform: str,
) -> str:
    """The default record file name: what identifies an evaluation, so that records of one
    checkpoint with other weights, another backend, on another val set or through another eval
    transform (``transform``: :func:`eval_transform_tag`) sit side by side."""
    parts = (model, form, weights, backend, sha256[:12], transform)
    bad = [p for p in parts if not _NAME_PART.fullmatch(p)]
    if bad:
        raise RecordError(f"{bad[0]!r} cannot be part of a record file name")
    return (
        f"{model}_{form}_{weights}_{backend}_{sha256[:12]}_val-{val_fingerprint[:8]}_"
        f"{transform}.json"
    )


def predictions_sha256(top1: Sequence[int]) -> str:
    """Hash of the top-1 predictions in val order: equal hashes = identical predictions."""
    return hashlib.sha256(",".join(map(str, top1)).encode()).hexdigest()


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
    "debug",
    # stored by xvol before the trainer schema (xvol/engine/options.py): the debug hooks lived in
    # trainer, and mixup/ema were _target_ nodes repeating trainer.label_smoothing and
    # data.num_classes; left out so that older runs keep pairing with newer ones
    "trainer.debug_nan_at_step",
    "trainer.debug_signal_at_step",
    "trainer.mixup._target_",
    "trainer.mixup.label_smoothing",
    "trainer.mixup.num_classes",
    "trainer.ema._target_",
    "trainer.ema._partial_",
)


# Float-typed trainer options as the trainer schema (TrainerOptions) stores them. Configs written
# before the schema kept what was typed: ``trainer.clip_grad=5`` is 5 there and 5.0 now, which
# would make the same recipe fingerprint differently, so these read as floats. The set is frozen
# (part of the fingerprint's definition): options added since are stored as floats by the schema.
_PRE_SCHEMA_FLOATS = (
    "trainer.clip_grad",
    "trainer.label_smoothing",
    "trainer.ema.decay",
    "trainer.mixup.mixup_alpha",
    "trainer.mixup.cutmix_alpha",
    "trainer.mixup.cutmix_minmax",
    "trainer.mixup.prob",
    "trainer.mixup.switch_prob",
)


def _as_float(value: Any) -> Any:
    if is_int(value):
        return float(value)
    if isinstance(value, list):
        return [_as_float(v) for v in value]
    return value


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
    for dotted in _PRE_SCHEMA_FLOATS:
        *parents, leaf = dotted.split(".")
        node = recipe
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = _as_float(node[leaf])
    if set(recipe) <= {"data"}:
        return None
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    "data.crop_pct": (float, int),
    "data.interpolation": (str,),
    "top1_correct": (int,),
    "top5_correct": (int,),
    "gmuls": (float, int),
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
    if record["weights"] not in WEIGHTS:
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
        if value is not None and not is_number(value):
            raise RecordError(f"{source}: malformed record: {key!r} is {value!r}")
    _check_identity(record, source)
    _check_numbers(record, source)
    return record


BACKENDS = ("torchvision", "dali")


def _check_identity(record: dict[str, Any], source: str | Path) -> None:
    """The names a record is filed and ranked under are names, not text: model and arch as
    ModelSpec.identity writes them (xresnet50-s34-L12), a known backend and interpolation."""
    data = record["data"]
    names = {"model": record["model"], "arch": record["arch"]}
    if "interpolation" in data:
        names["data.interpolation"] = data["interpolation"]
    for key, value in names.items():
        if len(value) > 100 or not _NAME_PART.fullmatch(value):
            raise RecordError(f"{source}: malformed record: {key} {value[:80]!r} is not a name")
    backend = data.get("backend", "torchvision")
    if backend not in BACKENDS:
        raise RecordError(f"{source}: malformed record: data.backend={backend!r} not in {BACKENDS}")


def _check_numbers(record: dict[str, Any], source: str | Path) -> None:
    """The record's numbers against each other: a score over no image, a negative count or a
    NaN cost is not a result, and would be ranked like one."""

    def refuse(text: str) -> RecordError:
        return RecordError(f"{source}: impossible record: {text}")

    n = record["num_images"]
    if n < 1:
        raise refuse(f"num_images={n}: a top-1 of {record['top1']} over no image")
    if record["num_classes"] < 1:
        raise refuse(f"num_classes={record['num_classes']}")
    if record["params"] < 1:
        raise refuse(f"params={record['params']}")
    for key in ("gmacs", "gmuls"):
        value = record.get(key, 0.0)
        if not (is_number(value) and value >= 0):
            raise refuse(f"{key}={value}")
    if record["top5"] < record["top1"]:
        raise refuse(f"top5={record['top5']} below top1={record['top1']}")
    for key in ("top1_correct", "top5_correct"):
        if key in record and not 0 <= record[key] <= n:
            raise refuse(f"{key}={record[key]} of num_images={n}")
    data = record["data"]
    if not _HEX64.fullmatch(data["fingerprint"]):
        raise refuse(f"data.fingerprint {data['fingerprint'][:80]!r} is not a sha256")
    if data["img_size"] < 1:
        raise refuse(f"data.img_size={data['img_size']}")
    crop = data.get("crop_pct", 1.0)
    if not (is_number(crop) and crop > 0):
        raise refuse(f"data.crop_pct={crop}")
    if data.get("skipped_files", 0) < 0:
        raise refuse(f"data.skipped_files={data['skipped_files']}")
    img_s = record["throughput"]["img_s"]
    if img_s is not None and img_s <= 0:
        raise refuse(f"throughput.img_s={img_s}")


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit`` (strings skipped), checked
    before parsing: json.loads of a deep enough nesting ends in a RecursionError."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Validate ``record`` (the writer keeps the schema it promises), then write it atomically."""
    write_json_atomic(path, validate_record(record, path))


def read_record(path: str | Path) -> dict[str, Any]:
    """The validated record in ``path``; RecordError naming the file otherwise.

    A file is read only up to MAX_RECORD_BYTES and parsed only when it nests at most
    MAX_RECORD_DEPTH deep, so a hostile file ends in one RecordError, never in a RecursionError
    or a memory blow-up that would not say which file it was.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_RECORD_BYTES + 1)
    except OSError as err:
        raise RecordError(f"{path}: unreadable record: {err.strerror or err}") from None
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordError(f"{path}: malformed record: larger than {MAX_RECORD_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        if _json_depth_exceeds(text, MAX_RECORD_DEPTH):
            raise RecordError(f"{path}: malformed record: nested deeper than {MAX_RECORD_DEPTH}")
        record = json.loads(text)
    except RecordError:
        raise
    except (ValueError, RecursionError) as err:
        raise RecordError(f"{path}: malformed record: not valid JSON ({err})") from None
    return validate_record(record, path)
