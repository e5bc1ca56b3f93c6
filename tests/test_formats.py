"""xvol.formats: the one atomic writer, the eval record's reader/writer, and the best-value rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from xvol.engine.metrics import better
from xvol.formats.files import (
    atomic_path,
    remove_stale_temp_files,
    write_json_atomic,
    write_text_atomic,
)
from xvol.formats.record import RecordError, read_record, write_record


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_path(path) as tmp:
        tmp.write_text('{"a": 2, "half')
        raise RuntimeError("mid-write")
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temp file left
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"


def test_stale_temp_files_are_the_atomic_writers_own(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "last.pt") as tmp:
        tmp.write_bytes(b"x")
        stale = tmp_path / tmp.name.replace("last", "prev")  # as a killed writer leaves it
        stale.write_bytes(b"half")
    keep = tmp_path / "notes.tmp"
    keep.write_text("not ours")
    remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_non_finite_value_never_becomes_best(mode: str) -> None:
    for bad in (None, math.nan, math.inf, -math.inf):
        assert not better(bad, None, mode) and not better(bad, 1.0, mode)
        assert better(1.0, bad, mode)  # anything finite beats a missing or non-finite best
    assert better(2.0, 1.0, "max") and better(1.0, 2.0, "min")
    assert not better(1.0, 1.0, mode)


def test_record_writer_refuses_what_its_reader_would(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    with pytest.raises(RecordError, match=f"{path}: malformed record: kind"):
        write_record(path, {"kind": "something else"})
    assert not path.exists()  # nothing written
    path.write_text("{not json")
    with pytest.raises(RecordError, match=f"{path}: malformed record: not valid JSON"):
        read_record(path)
