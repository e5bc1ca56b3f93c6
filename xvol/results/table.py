"""Typed leaderboard rows from validated eval records, and what the leaderboard computes from
them: seeds grouped into experiments, X-volution paired with its baseline, deploy paired with
its training form, and the seed-paired difference with its 95% interval.

Nothing here reads a directory, writes a file or formats text: a :class:`Row` is built from one
record (xvol.formats.record validates it; the row checks the few keys it reads that the schema
leaves open), and the rest are functions of rows.

Numbers are only ever compared within one evaluation (:attr:`Row.eval_key`): the same val set
(data fingerprint), data backend, image size, crop, interpolation and precision. So records of
one checkpoint through the torchvision and the DALI backend are two rows, each paired within its
own backend, never with the other's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from xvol.formats.record import RecordError, read_record, validate_record
from xvol.results.stats import Interval, Spread, paired_interval, spread

__all__ = [
    "BaselinePair",
    "Deltas",
    "DeployPair",
    "Row",
    "SeedComparison",
    "SeedGroup",
    "ValSet",
    "baseline_pairs",
    "deploy_pairs",
    "inherit_seeds",
    "rank",
    "read_rows",
    "seed_comparisons",
    "seed_groups",
    "val_sets",
]

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "torchvision"  # the only backend of records written before data.backend

# Keys a row reads that the record schema leaves open (the throughput block is free-form, the
# val dir is informative): their types, checked here so a row's fields are what they say.
_ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "model_spec": (dict,),
    "data.val_dir": (str, type(None)),
    "throughput.batch_size": (int, type(None)),
    "throughput.precision": (str,),
    "throughput.device_name": (str, type(None)),
    "throughput.device": (str, type(None)),
}
_REQUIRED_ROW_FIELDS = ("model_spec",)


def _lookup(record: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


@dataclass(frozen=True)
class Row:
    """One evaluated checkpoint: the record's fields the leaderboard ranks, pairs and shows.

    Text fields (model, device, val dir, ...) are text from a file: renderers escape them.
    """

    record_path: Path
    model: str
    arch: str
    xvolution: bool
    form: str  # "train" or "deploy"
    weights: str
    backend: str
    seed: int | None
    recipe: str | None
    model_spec: str  # canonical JSON of the record's model spec: what grouping compares
    top1: float
    top5: float
    params: int
    gmacs: float
    img_size: int
    crop_pct: float | None
    interpolation: str | None
    precision: str
    infer_samples_per_sec: float | None
    infer_batch_size: int | None
    infer_precision: str
    infer_device: str | None
    num_images: int
    num_classes: int
    val_dir: str | None
    val_fingerprint: str
    checkpoint_sha256: str
    source_sha256: str
    predictions_sha256: str
    date: str

    @classmethod
    def from_record(cls, record: Any, path: str | Path) -> Row:
        """The row of ``record`` (read from ``path``); RecordError naming the file and the key
        when the record does not follow the schema or a key the row reads is missing or
        mistyped."""
        record = validate_record(record, path)
        for key, types in _ROW_FIELDS.items():
            present, value = _lookup(record, key)
            if not present:
                if key in _REQUIRED_ROW_FIELDS:
                    raise RecordError(f"{path}: malformed record: missing {key!r}")
                continue
            if not isinstance(value, types) or isinstance(value, bool):
                raise RecordError(
                    f"{path}: malformed record: {key!r} is {type(value).__name__}, "
                    f"expected {' or '.join(t.__name__ for t in types)}"
                )
        data, tp = record["data"], record["throughput"]
        return cls(
            record_path=Path(path),
            model=record["model"],
            arch=record["arch"],
            xvolution=record["xvolution"],
            form="deploy" if record["deploy"] else "train",
            weights=record["weights"],
            backend=data.get("backend", DEFAULT_BACKEND),
            seed=record.get("seed"),
            recipe=record.get("recipe"),
            model_spec=json.dumps(record["model_spec"], sort_keys=True),
            top1=float(record["top1"]),
            top5=float(record["top5"]),
            params=record["params"],
            gmacs=float(record["gmacs"]),
            img_size=data["img_size"],
            crop_pct=float(data["crop_pct"]) if "crop_pct" in data else None,
            interpolation=data.get("interpolation"),
            precision=record["eval"]["precision"],
            infer_samples_per_sec=None if tp["img_s"] is None else float(tp["img_s"]),
            infer_batch_size=tp.get("batch_size"),
            infer_precision=tp.get("precision", record["eval"]["precision"]),
            infer_device=tp.get("device_name") or tp.get("device"),
            num_images=record["num_images"],
            num_classes=record["num_classes"],
            val_dir=data.get("val_dir"),
            val_fingerprint=data["fingerprint"],
            checkpoint_sha256=record["checkpoint"]["sha256"],
            source_sha256=record["checkpoint"]["source_sha256"],
            predictions_sha256=record["predictions_sha256"],
            date=record["date"],
        )

    @property
    def record(self) -> str:
        """The record's file name."""
        return self.record_path.name

    @property
    def top1_err(self) -> float:
        return 100.0 - self.top1

    @property
    def top5_err(self) -> float:
        return 100.0 - self.top5

    @property
    def param_count(self) -> float:
        """Parameters in millions (timm's results column)."""
        return self.params / 1e6

    @property
    def eval_key(self) -> tuple:
        """One evaluation: the same images through the same preprocessing at one precision."""
        return (
            self.val_fingerprint,
            self.backend,
            self.img_size,
            self.crop_pct,
            self.interpolation,
            self.precision,
        )

    @property
    def duplicate_key(self) -> tuple:
        """What identifies a record: one checkpoint with one weights through one evaluation
        (two backends' or two eval transforms' records of a checkpoint coexist)."""
        return (self.checkpoint_sha256, self.weights, *self.eval_key)


def read_rows(paths: Iterable[str | Path], skip_bad: bool = False) -> list[Row]:
    """The rows of the record files ``paths``, in order. A malformed record or a duplicate (see
    :attr:`Row.duplicate_key`) is a RecordError naming the file; with ``skip_bad`` it is logged
    as a warning and left out."""
    rows: list[Row] = []
    seen: dict[tuple, Path] = {}
    for path in map(Path, paths):
        try:
            row = Row.from_record(read_record(path), path)
            if row.duplicate_key in seen:
                raise RecordError(
                    f"{path}: duplicate record: same checkpoint {row.checkpoint_sha256[:12]}, "
                    "weights, val set, backend, image size, crop_pct, interpolation and "
                    f"precision as {seen[row.duplicate_key]}; remove one"
                )
        except RecordError as err:
            if not skip_bad:
                raise
            log.warning("skipped: %s", err)
            continue
        seen[row.duplicate_key] = path
        rows.append(row)
    return rows


def rank(rows: Iterable[Row]) -> list[Row]:
    """Best top-1 first; the training form before its deploy form on a tie."""
    return sorted(rows, key=lambda r: (-r.top1, r.model, r.form != "train"))


def inherit_seeds(rows: Sequence[Row]) -> list[Row]:
    """The rows, where a deploy row without seed/recipe takes those of its training checkpoint's
    row (a deploy file stores no training config)."""
    by_sha = {r.checkpoint_sha256: r for r in rows if r.form == "train"}
    out = []
    for r in rows:
        source = by_sha.get(r.source_sha256)
        if r.form == "deploy" and source is not None:
            r = dataclasses.replace(
                r,
                seed=source.seed if r.seed is None else r.seed,
                recipe=source.recipe if r.recipe is None else r.recipe,
            )
        out.append(r)
    return out


K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def group_by(items: Iterable[T], key: Callable[[T], K]) -> dict[K, list[T]]:
    """Items by key, each list in the items' order, keys in order of first appearance."""
    out: dict[K, list[T]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


# ----------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Deltas:
    """``a - b`` of two rows' numbers; ``speed_ratio`` a's img/s over b's (None without both)."""

    top1: float
    top5: float
    params_m: float
    gmacs: float
    speed_ratio: float | None

    @classmethod
    def between(cls, a: Row, b: Row) -> Deltas:
        speed = None
        if a.infer_samples_per_sec and b.infer_samples_per_sec:
            speed = a.infer_samples_per_sec / b.infer_samples_per_sec
        return cls(
            top1=a.top1 - b.top1,
            top5=a.top5 - b.top5,
            params_m=a.param_count - b.param_count,
            gmacs=a.gmacs - b.gmacs,
            speed_ratio=speed,
        )


@dataclass(frozen=True)
class BaselinePair:
    """An X-volution row and a baseline row of its backbone, through one evaluation."""

    x: Row
    base: Row
    delta: Deltas

    @property
    def backend(self) -> str:
        return self.x.backend


@dataclass(frozen=True)
class DeployPair:
    """A deploy row and the training-form row of the checkpoint it came from."""

    train: Row
    deploy: Row
    identical: bool  # the same per-image predictions
    delta: Deltas  # deploy - train

    @property
    def backend(self) -> str:
        return self.deploy.backend


def baseline_pairs(rows: Sequence[Row]) -> list[BaselinePair]:
    """Each X-volution row with a baseline row of its backbone (the stored ``arch``) through the
    same evaluation (so the same backend): the one of the same seed and recipe when there is
    one (a fair pair), else the same form and weights, else the best top-1."""
    pairs = []
    for x in rows:
        if not x.xvolution:
            continue
        candidates = [
            b for b in rows if not b.xvolution and b.arch == x.arch and b.eval_key == x.eval_key
        ]
        if not candidates:
            continue
        base = max(
            candidates,
            key=lambda b: (
                x.seed is not None and (b.seed, b.recipe) == (x.seed, x.recipe),
                b.form == x.form,
                b.weights == x.weights,
                b.top1,
            ),
        )
        pairs.append(BaselinePair(x, base, Deltas.between(x, base)))
    return pairs


def deploy_pairs(rows: Sequence[Row]) -> list[DeployPair]:
    """Each deploy row with the training-form row it was re-parameterized from: the same source
    checkpoint, weights, evaluation (backend included) and throughput precision."""
    pairs = []
    for d in rows:
        if d.form != "deploy":
            continue
        for t in rows:
            if (
                t.form == "train"
                and t.checkpoint_sha256 == d.source_sha256
                and t.weights == d.weights
                and t.eval_key == d.eval_key
                and t.infer_precision == d.infer_precision
            ):
                same = t.predictions_sha256 == d.predictions_sha256
                pairs.append(DeployPair(t, d, same, Deltas.between(d, t)))
                break
    return pairs


# ----------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class SeedGroup:
    """Rows that differ only in the seed: one model, recipe, form and weights, one evaluation.

    A seed evaluated twice (two checkpoints of one run) counts once, by its latest record
    (``repeated`` counts the others); records without a seed count once each (``unseeded``).
    """

    rows: tuple[Row, ...]
    by_seed: Mapping[int, float]  # top-1 per seed
    unseeded: int
    repeated: int
    top1: Spread

    @property
    def first(self) -> Row:
        return self.rows[0]

    @property
    def seeds(self) -> list[int]:
        return sorted(self.by_seed)

    @property
    def n(self) -> int:
        return self.top1.n

    @property
    def mean(self) -> float:
        return self.top1.mean

    @property
    def std(self) -> float | None:
        return self.top1.std


def _group_key(r: Row) -> tuple:
    return (r.model_spec, r.recipe, r.form, r.weights, *r.eval_key)


def seed_groups(rows: Sequence[Row]) -> list[SeedGroup]:
    """Rows grouped into experiments (see SeedGroup), best mean top-1 first."""
    out = []
    for members in group_by(rows, _group_key).values():
        by_seed: dict[int, Row] = {}
        unseeded: list[Row] = []
        repeated = 0
        for r in sorted(members, key=lambda r: r.date):
            if r.seed is None:
                unseeded.append(r)
                continue
            repeated += r.seed in by_seed
            by_seed[r.seed] = r
        top1 = [r.top1 for r in by_seed.values()] + [r.top1 for r in unseeded]
        out.append(
            SeedGroup(
                rows=tuple(members),
                by_seed={seed: r.top1 for seed, r in by_seed.items()},
                unseeded=len(unseeded),
                repeated=repeated,
                top1=spread(top1),
            )
        )
    return sorted(out, key=lambda g: (-g.mean, g.first.model))


@dataclass(frozen=True)
class SeedComparison:
    """An X-volution group against its baseline group, paired by seed: the top-1 differences
    of the seeds both have, and their interval."""

    x: SeedGroup
    base: SeedGroup
    seeds: tuple[int, ...]
    diff: Interval

    @property
    def backend(self) -> str:
        return self.x.first.backend


def seed_comparisons(groups: Sequence[SeedGroup]) -> list[SeedComparison]:
    """Each X-volution group with a recipe against the baseline group of its backbone, recipe,
    weights and evaluation (backend included), paired by seed. The baseline's training form
    stands for its deploy form (the same network); with both, the same form is taken."""
    out = []
    for x in groups:
        fx = x.first
        if not fx.xvolution or fx.recipe is None:
            continue
        candidates = [
            b
            for b in groups
            if not b.first.xvolution
            and b.first.arch == fx.arch
            and b.first.recipe == fx.recipe
            and b.first.weights == fx.weights
            and b.first.eval_key == fx.eval_key
        ]
        if not candidates:
            continue
        base = max(candidates, key=lambda b: (b.first.form == fx.form, b.n))
        seeds = tuple(sorted(set(x.by_seed) & set(base.by_seed)))
        diffs = [x.by_seed[s] - base.by_seed[s] for s in seeds]
        out.append(SeedComparison(x, base, seeds, paired_interval(diffs)))
    return out


# ----------------------------------------------------------------------------- val sets


@dataclass(frozen=True)
class ValSet:
    """The rows of one val set (one data fingerprint) and everything paired within it."""

    fingerprint: str
    rows: tuple[Row, ...]
    baseline_pairs: tuple[BaselinePair, ...]
    deploy_pairs: tuple[DeployPair, ...]
    groups: tuple[SeedGroup, ...]
    comparisons: tuple[SeedComparison, ...]

    @property
    def id(self) -> str:
        return self.fingerprint[:8]

    @property
    def val_dirs(self) -> list[str]:
        """Where its records found it (one folder, or copies of it)."""
        return sorted({r.val_dir for r in self.rows if r.val_dir})

    @property
    def backends(self) -> list[str]:
        return sorted({r.backend for r in self.rows})


def val_sets(rows: Sequence[Row]) -> list[ValSet]:
    """Rows split by val set, each with its pairings; the largest val set first. Rows of
    different val sets are never ranked or paired together."""
    sets = []
    for fingerprint, members in group_by(rows, lambda r: r.val_fingerprint).items():
        groups = seed_groups(members)
        sets.append(
            ValSet(
                fingerprint=fingerprint,
                rows=tuple(members),
                baseline_pairs=tuple(baseline_pairs(members)),
                deploy_pairs=tuple(deploy_pairs(members)),
                groups=tuple(groups),
                comparisons=tuple(seed_comparisons(groups)),
            )
        )
    return sorted(sets, key=lambda vs: (-len(vs.rows), vs.id))
