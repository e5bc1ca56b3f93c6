"""The vocabulary of option checks, declared once for every layer: what a value must be, and
the one-line :class:`ConfigError` (``<key>: expected <what>, got <value>``) when it is not.

A check is a :class:`Check` (words for the message plus a predicate). An options dataclass
declares each field with :func:`option` (default, check, help), and its ``__post_init__`` calls
:func:`check_fields`; :func:`option_checks` lists the checks by dotted key for validators of
composed configs (xvol.config) and :func:`float_options` the float-typed fields. The trainer's
options (xvol.engine.options) and the tools' (xvol.cli.eval, xvol.cli.reparam) use it; it
imports nothing from xvol, so any layer can: the model spec (xvol.models.spec) checks its fields
with it too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any, get_args, get_type_hints

__all__ = [
    "BOOL",
    "INT",
    "NON_NEGATIVE_INT",
    "NON_NEGATIVE_NUMBER",
    "POSITIVE_INT",
    "POSITIVE_NUMBER",
    "AUTO_OR_BOOL",
    "DEVICE",
    "TORCH_DEVICE",
    "Check",
    "ConfigError",
    "check_fields",
    "check_value",
    "flag_name",
    "float_options",
    "int_in",
    "is_int",
    "is_number",
    "number_in",
    "one_of",
    "option",
    "option_checks",
    "optional",
    "unit_interval",
]


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message starts with the key."""


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """What a key accepts: ``ok(value)`` and the words for it in the error message."""

    expected: str
    ok: Callable[[Any], bool]
    nullable: bool = False
    choices: tuple[str, ...] | None = None  # the values, when it is a fixed set (one_of)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool); an int beyond the float range is not one."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # int too large to convert to float
        return False


def optional(check: Check) -> Check:
    """``check`` or null (a no-op on a check that already accepts null)."""
    if check.nullable:
        return check
    return replace(check, expected=f"{check.expected} or null", nullable=True)


def one_of(*choices: str) -> Check:
    """One of ``choices`` (a command's flag offers them as its argparse choices)."""
    return Check(
        "one of " + ", ".join(choices),
        lambda v: isinstance(v, str) and v in choices,
        choices=tuple(choices),
    )


def int_in(lo: int, hi: int) -> Check:
    """An integer in ``lo..hi`` (both included)."""
    return Check(f"an integer in {lo}..{hi}", lambda v: is_int(v) and lo <= v <= hi)


def number_in(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    """A finite number in the interval from ``lo`` to ``hi``, each end closed unless opened."""
    left, right = "(" if open_lo else "[", ")" if open_hi else "]"

    def ok(v: Any) -> bool:
        if not is_number(v):
            return False
        return (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)

    return Check(f"a number in {left}{lo:g}, {hi:g}{right}", ok)


def unit_interval(closed: bool = True) -> Check:
    """A number in [0, 1] (``closed``) or [0, 1)."""
    return number_in(0, 1, open_hi=not closed)


POSITIVE_INT = Check("a positive integer", lambda v: is_int(v) and v > 0)
NON_NEGATIVE_INT = Check("an integer >= 0", lambda v: is_int(v) and v >= 0)
INT = Check("an integer", is_int)
POSITIVE_NUMBER = Check("a positive number", lambda v: is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Check("a number >= 0", lambda v: is_number(v) and v >= 0)
BOOL = Check("true or false", lambda v: isinstance(v, bool))
AUTO_OR_BOOL = Check("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))
# where a command runs: the trainer and xvol-eval take auto (this rank's GPU, else the CPU)
DEVICE = Check(
    "auto, cpu, cuda or cuda:N",
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
)
TORCH_DEVICE = Check(
    "cpu, cuda or cuda:N",
    lambda v: isinstance(v, str) and re.fullmatch(r"cpu|cuda(:\d+)?", v) is not None,
)


def option(
    default: Any = MISSING,
    check: Check | None = None,
    *,
    factory: Any = MISSING,
    help: str | None = None,  # noqa: A002  (argparse's word for it)
) -> Any:
    """A dataclass field with the check its values must pass (see :func:`option_checks`) and,
    for a command's options, the help text its flag shows (xvol.cli.common.add_options)."""
    metadata: dict[str, Any] = {"check": check} if check is not None else {}
    if help is not None:
        metadata["help"] = help
    return field(default=default, default_factory=factory, metadata=metadata)


def option_checks(cls: type, prefix: str) -> dict[str, Check]:
    """``{"<prefix>.<field>": check}`` for every checked field of the options class ``cls``,
    nested options classes included; a field typed ``X | None`` also accepts null."""
    hints = get_type_hints(cls)
    out: dict[str, Check] = {}
    for f in fields(cls):
        key, args = f"{prefix}.{f.name}", get_args(hints[f.name])
        nested = next((a for a in (*args, hints[f.name]) if is_dataclass(a)), None)
        if nested is not None:
            out.update(option_checks(nested, key))
        check = f.metadata.get("check")
        if check is not None:
            out[key] = optional(check) if type(None) in args else check
    return out


def float_options(cls: type) -> set[str]:
    """Dotted names of the float-typed fields of the options class ``cls`` (``float``,
    ``float | None``, ``list[float]``), nested options classes included."""
    hints = get_type_hints(cls)
    out: set[str] = set()
    for f in fields(cls):
        hint = hints[f.name]
        args = get_args(hint) or (hint,)
        nested = next((a for a in args if is_dataclass(a)), None)
        if nested is not None:
            out.update(f"{f.name}.{key}" for key in float_options(nested))
        elif float in args or any(get_args(a) == (float,) for a in args):
            out.add(f.name)
    return out


def check_value(key: str, check: Check, value: Any) -> None:
    """Raise ConfigError ``<key>: expected <what>, got <value>`` unless ``check`` accepts it."""
    if (value is None and check.nullable) or (value is not None and check.ok(value)):
        return
    raise ConfigError(f"{key}: expected {check.expected}, got {value!r}")


def flag_name(name: str) -> str:
    """A command's flag for the options field ``name``: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_fields(options: Any, prefix: str | None) -> None:
    """Every check of ``options`` (a dataclass instance), nested options included: what an
    options class's ``__post_init__`` calls. ``prefix`` None: a command's options, whose
    messages name the flag (``--batch-size: expected a positive integer, got 0``)."""
    for key, check in option_checks(type(options), prefix or "_").items():
        *parents, leaf = key.split(".")[1:]
        node = options
        for part in parents:
            node = getattr(node, part)
            if node is None:
                break  # a null nested node (trainer.ema=null) has no fields to check
        else:
            shown = key if prefix is not None else flag_name(key.split(".", 1)[1])
            check_value(shown, check, getattr(node, leaf))
