"""The one way xvol writes a file: atomically, plus the file helpers the formats share.

Every file format (training checkpoint, deploy weights and sidecar, eval record) and every other
file written in place (checkpoints.json, the rewritten metrics.jsonl, a run's config.yaml and
overrides.yaml, predictions, leaderboard tables and plots, ONNX models, the JSON of the
benchmarks and of xvol-summary) goes through :func:`atomic_path`: the bytes go to a temp file in
the same directory, are fsynced and ``os.replace``d onto the name, and the directory is fsynced.
A reader (or a crash at any point) sees the old file or the new one, never a mix; that is
timm's CheckpointSaver recipe, which timm does not offer for arbitrary files, hence this helper.
Temp files are named ``.<name>.tmp-<pid><suffix>`` (the suffix kept for writers that pick a
format by extension); those of a killed writer are removed by :func:`remove_stale_temp_files`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "first_line",
    "remove_stale_temp_files",
    "sha256_file",
    "write_error_reason",
    "write_json_atomic",
    "write_text_atomic",
]

_TEMP_GLOB = ".*.tmp-*"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def _fsync(path: Path) -> None:
    """Flush a file to disk; a directory's entries best effort (not every filesystem can)."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path next to ``path`` for the caller to write; on success it is fsynced and
    renamed onto ``path`` (and the directory fsynced), on any failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.unlink(missing_ok=True)  # left by an earlier process that had this pid
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """``obj`` as indented JSON plus a final newline, written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def remove_stale_temp_files(directory: str | Path) -> None:
    """Temp files of writes that were killed (kill -9, node loss) are garbage."""
    for tmp in Path(directory).glob(_TEMP_GLOB):
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def first_line(text: object, limit: int = 200) -> str:
    """One line of an exception message (torch's unpickler errors span many)."""
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _no_space(err: BaseException) -> bool:
    """Did ``err`` (or what it was raised from) come from a full disk or quota?

    torch.save turns the file's OSError(ENOSPC) into ``RuntimeError: ... unexpected pos``,
    keeping the OSError only as ``__context__``.
    """
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def write_error_reason(err: BaseException) -> str:
    """A one-line cause of a failed write: "no space left on device" or the first error line."""
    if _no_space(err):
        return "no space left on device"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return first_line(f"{type(err).__name__}: {err}")
