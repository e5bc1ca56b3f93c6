"""The plumbing the commands share (xvol-reparam, -eval, -leaderboard, -export, timm_script):
their common options (``tool_args``, ``OutputOptions``, ``CheckpointToolOptions``), the
one-line error wrapper (``tool_errors``), logging, refusing to overwrite, and the environment a
record names (``versions``, ``now_iso``).

Argument parsing and printing only: loading a model is :mod:`xvol.formats.load`, the val loader
:mod:`xvol.data.val`, the file formats :mod:`xvol.formats`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args, get_type_hints

from xvol.checks import BOOL, POSITIVE_INT, ConfigError, flag_name, option
from xvol.data.folder import DataError
from xvol.extras import MissingExtra
from xvol.formats.checkpoint import CheckpointError, checkpoint_versions
from xvol.formats.record import RecordError
from xvol.models.spec import ModelSpecError

__all__ = [
    "KNOWN_ERRORS",
    "CheckpointToolOptions",
    "OutputOptions",
    "ToolError",
    "add_options",
    "check_xvol_package",
    "now_iso",
    "options_from_args",
    "refuse_existing",
    "setup_tool_logging",
    "tool_args",
    "tool_errors",
    "versions",
]


class ToolError(RuntimeError):
    """A problem with the tool's inputs or outputs; the message is what the user sees."""


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass
class OutputOptions:
    """The option of a tool that writes files (xvol-summary and the checkpoint tools)."""

    force: bool = option(False, BOOL, help="overwrite existing outputs")


@dataclasses.dataclass
class CheckpointToolOptions(OutputOptions):
    """The options the checkpoint tools share (xvol-eval, -reparam, -export), declared once: each
    tool's options class derives from this one, and add_options makes the flags."""

    ema: bool | None = option(
        None,
        BOOL,
        help="training checkpoint: EMA weights (default when present); --no-ema: raw weights",
    )
    img_size: int | None = option(None, POSITIVE_INT, help="default: the checkpoint's eval size")


def tool_args() -> argparse.ArgumentParser:
    """``--debug``, which every tool has: an argparse parent (``parents=[...]``). The other
    shared options are fields of :class:`OutputOptions` and
    :class:`CheckpointToolOptions`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", help="show tracebacks (or XVOL_DEBUG=1)")
    return parent


def add_options(parser: argparse.ArgumentParser, cls: type, *, exclude: Sequence[str] = ()) -> None:
    """One flag per field of the options dataclass ``cls`` declared with a ``help``
    (xvol.checks.option): its default, type, choices (a one_of check) and help come from the
    field, so each option is declared once. A bool defaulting to False is a switch; one
    defaulting to None or True takes ``--x``/``--no-x``. Checks run when the options object is
    made (its ``__post_init__``), naming the flag."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kinds = [a for a in (get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None)]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata["help"]}
        if kinds[0] is bool:
            switch = default is False
            kwargs["action"] = "store_true" if switch else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kinds[0] if kinds[0] in (int, float) else str
            check = f.metadata.get("check")
            if check is not None and check.choices:
                kwargs["choices"] = check.choices
            if default is not None:
                kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag_name(f.name), **kwargs)


def options_from_args(cls: type, args: argparse.Namespace, **derived: Any) -> Any:
    """``cls`` from a parsed command line: every field the namespace holds, plus ``derived``."""
    names = {f.name for f in dataclasses.fields(cls)} - derived.keys()
    return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)}, **derived)


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


# each layer's error, whose message names the file, key or folder: shown alone
KNOWN_ERRORS = (
    ToolError,
    CheckpointError,  # LoadError (xvol.formats.load) is one
    RecordError,
    ModelSpecError,
    DataError,
    ConfigError,
    FileNotFoundError,
    MissingExtra,
)


@contextlib.contextmanager
def tool_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn any exception into ``prog: error: <one line>`` on stderr and exit status 1.

    Every tool starts with check_xvol_package (a namespace ``xvol`` fails here, in one line).

    ``debug`` (or XVOL_DEBUG=1) lets the traceback through instead. The layers' own errors
    (ToolError here; CheckpointError and LoadError of the formats and loading, RecordError,
    ModelSpecError, DataError, ConfigError of the option checks, MissingExtra) and
    FileNotFoundError show their message alone; others show their type too, since the message
    may not make sense without it.
    """
    debug = debug or os.environ.get("XVOL_DEBUG", "") not in ("", "0")
    try:
        check_xvol_package()
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if debug:
            raise
        known = isinstance(err, KNOWN_ERRORS)
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
