"""The Hydra side of the training config: OmegaConf resolvers used by configs/ and the schema of
the trainer and debug nodes (both registered when this module is imported), the validator of
user-set values, the one-line form of a composition error, and the run directory's config
snapshot (written by :func:`write_run_snapshot`, read back by :func:`read_run_config`: input
like every file there, so one that does not parse as a mapping is named in one warning instead
of being taken as empty).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from xvol.checks import (
    INT,
    NON_NEGATIVE_INT,
    NON_NEGATIVE_NUMBER,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Check,
    ConfigError,
    check_value,
    is_int,
    one_of,
    option_checks,
    optional,
    unit_interval,
)
from xvol.data.dali import DALI_DEVICES
from xvol.data.folder import BAD_IMAGE_POLICIES, VALIDATE_MODES
from xvol.engine.log import get_logger
from xvol.engine.options import DebugOptions, TrainerOptions
from xvol.formats.files import write_text_atomic
from xvol.formats.load import DATA_CHECKS

if TYPE_CHECKING:
    from xvol.models.spec import ModelSpec


def run_id() -> str:
    """A run name every rank agrees on without talking to each other.

    Under torchrun all ranks (and every restart under --max-restarts) share TORCHELASTIC_RUN_ID
    (the --rdzv-id, or a uuid with --standalone). Outside torchrun a timestamp is safe: one
    process. ``${now:}`` in hydra.run.dir would be resolved by each rank at its own second.
    """
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return rid[:8] if len(rid) == 36 else rid  # a --standalone uuid: its first block suffices
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm:
        return f"slurm{slurm}"
    return time.strftime("%Y%m%d-%H%M%S")


def world_size() -> int:
    """Ranks of the job being configured, by the engine's own rule (torchrun, then a submitit
    Slurm task; a plain process inside an sbatch script stays one rank)."""
    from xvol.engine.dist import read_dist_env  # lazy: configs resolve before any dist setup

    return read_dist_env().world_size


def linear_lr(base_lr: float, base_batch: int, batch_per_rank: int) -> float:
    """The linear scaling rule (Goyal et al.): base_lr per base_batch images of global batch."""
    return float(base_lr) * int(batch_per_rank) * world_size() / int(base_batch)


def _is_run_name(v: Any) -> bool:
    if is_int(v):
        return True
    return (
        isinstance(v, str)
        and v.strip() != ""
        and v not in (".", "..")
        and not any(c in v for c in ("/", "\\", "\0"))
    )


RUN_NAME = Check("one folder name under paths.output_dir (no '/', no '..')", _is_run_name)


def run_name(name: Any) -> str:
    """``run_name``, checked before Hydra makes ``${paths.output_dir}/${run_name}``: a name with
    a separator or ``..`` (``run_name=../../escape``) would put the run directory, its train.log
    and checkpoints outside paths.output_dir. Raises ConfigError (main() prints its one line)."""
    check_value("run_name", RUN_NAME, name)
    return str(name)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("xvol_run_id"):
        OmegaConf.register_new_resolver("xvol_run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("xvol_run_name"):
        OmegaConf.register_new_resolver("xvol_run_name", run_name)
    if not OmegaConf.has_resolver("xvol_linear_lr"):
        OmegaConf.register_new_resolver("xvol_linear_lr", linear_lr)


register_resolvers()  # importing this module is what makes configs/ composable


# ----------------------------------------------------------------------------- schema

# The trainer and debug nodes are typed by the engine's options dataclasses: configs/trainer/
# default.yaml and configs/debug/default.yaml start from these (``/trainer_schema@_here_``), so
# Hydra rejects a wrong type or an unknown key while composing.
ConfigStore.instance().store(name="trainer_schema", node=TrainerOptions)
ConfigStore.instance().store(name="debug_schema", node=DebugOptions)


# ----------------------------------------------------------------------------- validation

RESUME = Check(
    "auto, null or a checkpoint path",
    lambda v: v is False or (isinstance(v, str) and v.strip() != ""),
    nullable=True,
)


# The keys users set on the command line, each with what it accepts: the trainer and debug ones
# as their options classes declare them, the others here. Keys absent from the composed config
# (a data backend without `workers`, say) are skipped.
def _range(lo_min: float, hi_max: float | None) -> Check:
    """A pair [lo, hi] with lo_min < lo <= hi (<= hi_max)."""
    bound = f" <= {hi_max:g}" if hi_max is not None else ""

    def ok(v: Any) -> bool:
        if isinstance(v, str) or not isinstance(v, Sequence) or len(v) != 2:
            return False
        lo, hi = v
        return (
            (POSITIVE_NUMBER.ok(lo) if lo_min == 0 else NON_NEGATIVE_NUMBER.ok(lo))
            and NON_NEGATIVE_NUMBER.ok(hi)
            and lo <= hi
            and (hi_max is None or hi <= hi_max)
        )

    return Check(f"a pair [lo, hi] with {lo_min:g} < lo <= hi{bound}", ok)


TRAIN_CHECKS: dict[str, Check] = {
    "run_name": RUN_NAME,
    "seed": INT,
    "resume": RESUME,
    # the keys a checkpoint carries for the tools: checked here as the tools check them
    **{f"data.{key}": check for key, check in DATA_CHECKS.items()},
    "data.batch_size": POSITIVE_INT,
    "data.eval_batch_size": optional(POSITIVE_INT),
    "data.workers": NON_NEGATIVE_INT,
    "data.length": POSITIVE_INT,
    "data.val_length": POSITIVE_INT,
    "data.jpeg_size": POSITIVE_INT,
    "data.scale": _range(0, 1),
    "data.ratio": _range(0, None),
    "data.hflip": unit_interval(),
    "data.color_jitter": optional(NON_NEGATIVE_NUMBER),
    "data.reprob": unit_interval(),
    "data.remode": one_of("const", "rand", "pixel"),
    "data.on_bad_image": one_of(*BAD_IMAGE_POLICIES),
    "data.validate": one_of(*VALIDATE_MODES),
    "data.dali.device": one_of(*DALI_DEVICES),
    "data.dali.threads": optional(POSITIVE_INT),
    "optim.lr": POSITIVE_NUMBER,
    "optim.weight_decay": NON_NEGATIVE_NUMBER,
    "sched.warmup_epochs": NON_NEGATIVE_NUMBER,
    **option_checks(TrainerOptions, "trainer"),
    **option_checks(DebugOptions, "debug"),
}

# Rules over several keys: (key the message names, broken(cfg), what is wrong: text, or a
# function of the config giving it).
TRAIN_RULES: list[tuple[str, Callable[[DictConfig], bool], str | Callable[[DictConfig], str]]] = [
    (
        "trainer.checkpoint.metric",
        lambda cfg: (
            str(cfg.trainer.checkpoint.metric).startswith("ema_") and cfg.trainer.get("ema") is None
        ),
        "ranks checkpoints by an EMA metric, but trainer.ema is null (no EMA is evaluated)",
    ),
    (
        "model.num_classes",
        lambda cfg: cfg.model.get("num_classes") != cfg.data.get("num_classes"),
        lambda cfg: (
            f"{cfg.model.get('num_classes')!r} but data.num_classes is "
            f"{cfg.data.get('num_classes')!r}: the classifier has one output per class of the "
            "data (0 would train the pooled features as logits); leave model.num_classes at its "
            "default ${data.num_classes} and set data.num_classes"
        ),
    ),
    (
        "trainer.init_from_ema",
        lambda cfg: bool(cfg.trainer.get("init_from_ema")) and not cfg.trainer.get("init_from"),
        "true needs trainer.init_from (the checkpoint to take EMA weights from)",
    ),
]

_ABSENT = object()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def model_spec(model: Any) -> ModelSpec:
    """The resolved model node as xvol.models.ModelSpec reads it (arch, stages, shifts, ...),
    the one description training and every tool build the network from; a node the spec
    refuses is a ConfigError naming the key
    (``model.xconv.shifts[0]: expected an integer in 1..64, got 80``)."""
    from xvol.models.spec import ModelSpec, ModelSpecError  # lazy: imports timm

    try:
        return ModelSpec.from_config(model, source="config", where="model")
    except ModelSpecError as err:
        raise ConfigError(str(err).removeprefix("config: ")) from None


def validate_train_config(cfg: DictConfig) -> ModelSpec:
    """Check the keys of TRAIN_CHECKS, the TRAIN_RULES, that everything resolves, then the model;
    return the model's validated spec, which training builds (``spec.build()``).

    Raises ConfigError with one line, ``<key>: expected <what>, got <value>``, before anything
    is built: a bad value would otherwise surface as a library traceback (or not at all). The
    model is checked here once, so a model xvol-train accepts is one every tool accepts.
    """
    for key, check in TRAIN_CHECKS.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key}: {_one_line(err)}") from None
        if value is not _ABSENT:
            check_value(key, check, value)
    for key, broken, message in TRAIN_RULES:
        if broken(cfg):
            raise ConfigError(f"{key}: {message if isinstance(message, str) else message(cfg)}")
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {_one_line(err)}") from None
    if not isinstance(resolved, dict) or not isinstance(resolved.get("model"), dict):
        raise ConfigError("model: missing (pick one: model=NAME)")
    return model_spec(resolved["model"])


def composition_error(err: HydraException) -> ConfigError:
    """Hydra's failure to compose the config (a bad override, a value of the wrong type for the
    schema, an unknown key or option) as one line naming the key, as validate_train_config's."""
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and key:
        check = TRAIN_CHECKS.get(key)
        if isinstance(cause, ValidationError) and check is not None:
            return ConfigError(f"{key}: expected {check.expected}, got {cause.value!r}")
        return ConfigError(f"{key}: {_one_line(err).rstrip('.')}: {_one_line(cause)}")
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group = err.missing_cfg_file.rpartition("/")[0] or err.missing_cfg_file
        options = f" (options: {', '.join(err.options)})" if err.options else ""
        return ConfigError(f"{group}: {_one_line(err)}{options}")
    if isinstance(err, OverrideParseException):
        return ConfigError(f"{err.override}: {_one_line(err)}")
    return ConfigError(_one_line(err))


# ----------------------------------------------------------------------------- run snapshot

log = get_logger(__name__)

MAX_CONFIG_BYTES = 4 << 20  # a resolved config is a few KiB


def read_run_config(path: str | Path) -> dict[str, Any] | None:
    """The mapping a run's ``config.yaml`` holds, or None with one warning naming the file when
    it cannot be read, does not parse (safe_load: no tags, no code) or is not a mapping."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB")
        value = yaml.safe_load(path.read_text())
        if not isinstance(value, dict):
            kind = f"a {type(value).__name__}" if value is not None else "nothing"
            raise ValueError(f"holds {kind}, not a mapping")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as err:
        if isinstance(err, RecursionError):
            why = "nested too deeply"
        elif isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
            why = f"does not parse at line {err.problem_mark.line + 1}: {err.problem}"
        else:
            why = getattr(err, "strerror", None) or (str(err).splitlines() or [repr(err)])[0]
        log.warning(
            "%s does not hold a readable config (%s): this launch is not compared with the "
            "values the run was started with; the file is left as it is (restore it, or delete "
            "it to have this launch's config written there)",
            path,
            why,
        )
        return None
    return value


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key (old -> new)`` for every leaf that differs between two plain config trees."""
    a, b = _flatten(old), _flatten(new)
    missing = "(absent)"
    return [
        f"{k} ({a.get(k, missing)!r} -> {b.get(k, missing)!r})"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def write_run_snapshot(
    run_dir: Path, cfg: DictConfig, overrides: list[str], resumed: bool
) -> list[str]:
    """Write ``config.yaml`` (resolved) and ``overrides.yaml`` of a run, rank 0 only.

    A run continued from its checkpoints keeps the snapshot it was started with, which is what
    those checkpoints were trained with; the keys where this launch differs are returned (each
    checkpoint's own ``config`` records the values in force when it was written).
    """
    config_file, overrides_file = run_dir / "config.yaml", run_dir / "overrides.yaml"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if resumed and config_file.is_file():
        original = read_run_config(config_file)  # None (named in a warning): nothing to compare
        return config_diff(original, resolved) if original is not None else []
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_file, OmegaConf.to_yaml(cfg, resolve=True))
    write_text_atomic(overrides_file, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    return []
