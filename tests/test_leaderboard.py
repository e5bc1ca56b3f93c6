"""Eval records as hostile input to xvol-leaderboard, and the record's identity.

Every field of a record is text from outside. A crafted file name, val dir, device
name or model name must not become a live link, a heading, a formula or a row of its own; a
record nested 100,000 deep or one whose numbers contradict each other is refused naming the
file (and skipped by --skip-bad). One checkpoint evaluated through two eval
transforms (image size, crop, interpolation) gives two records, not a duplicate.

Records are edited copies of one real record (one tiny evaluation, tests/tools_helpers.py).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tools_helpers import make_checkpoint, make_val_folder

from xvol.cli import eval as eval_tool
from xvol.cli import leaderboard as leaderboard_tool
from xvol.formats.record import RecordError

EVAL_FAST = {"device": "cpu", "workers": 0, "batch_size": 6, "bench_iters": 0}


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """Tiny tensors on a shared CPU: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("board_trust")
    torch.set_num_threads(1)
    data = make_val_folder(base / "data")
    return {"base": base, "data": data, "ckpt": make_checkpoint(base / "x.pt")}


@pytest.fixture(scope="module")
def template(tiny: dict[str, Path]) -> dict[str, Any]:
    record = eval_tool.evaluate_checkpoint(
        tiny["ckpt"], eval_tool.EvalOptions(data=tiny["data"], results_dir=None, **EVAL_FAST)
    )
    return record


def _write(results: Path, name: str, record: dict[str, Any]) -> Path:
    results.mkdir(exist_ok=True)
    path = results / name
    path.write_text(json.dumps(record))
    return path


def _edited(template: dict[str, Any], edit: Callable[[dict], Any]) -> dict[str, Any]:
    record = copy.deepcopy(template)
    edit(record)
    return record


def _fails(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        leaderboard_tool.main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith("xvol-leaderboard: error: "), message
    return message


# ----------------------------------------------------------------------------- links


def test_a_record_file_name_becomes_an_inert_relative_link(
    template: dict[str, Any], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    record = _write(results, "javascript:alert(document.domain).json", template)
    leaderboard_tool.build_leaderboard(results)
    page = (results / "leaderboard.html").read_text()
    md = (results / "leaderboard.md").read_text()
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs == ["./javascript%3Aalert%28document.domain%29.json"]
    assert "javascript:" not in "".join(hrefs) and "](javascript" not in md
    assert f"]({hrefs[0]})" in md
    # the link leads to the file
    assert (results / urllib.parse.unquote(hrefs[0])).resolve() == record.resolve()


def test_links_from_another_output_folder_lead_back(
    template: dict[str, Any], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    record = _write(results, "r (1).json", template)
    out = tmp_path / "site" / "board"
    leaderboard_tool.build_leaderboard(results, out)
    (href,) = re.findall(r'href="([^"]*)"', (out / "leaderboard.html").read_text())
    assert href == "../../results/r%20%281%29.json"
    assert (out / urllib.parse.unquote(href)).resolve() == record.resolve()


# ----------------------------------------------------------------------------- text


HOSTILE = "x\n\n# heading\n| x | y |\r\n[t](javascript:alert(1)) <img src=x onerror=alert(1)>"


def test_record_text_stays_inside_its_cell(template: dict[str, Any], tmp_path: Path) -> None:
    """Text fields the record may hold freely (the val dir in a heading, the device name in a
    cell) cannot inject a heading, leave the table row, link or inject HTML."""

    def edit(r: dict) -> None:
        r["data"]["val_dir"] = "/data/" + HOSTILE
        r["throughput"]["device_name"] = HOSTILE

    results = tmp_path / "results"
    _write(results, "a.json", _edited(template, edit))
    md = leaderboard_tool.build_leaderboard(results)["markdown"]
    lines = md.splitlines()
    assert "# heading" not in lines and not any(line.startswith("# heading") for line in lines)
    assert [line for line in lines if line.startswith("# ")] == ["# xvol leaderboard"]
    assert "](javascript" not in md
    assert re.search(r"(?<!\\)<", md) is None  # every < escaped: no HTML, no autolink
    assert "\\[t\\](javascript" not in md and "[t]\\(javascript:alert(1))" in md
    table = [line for line in lines if line.startswith("|")]
    header = next(line for line in table if line.startswith("| # |"))
    row = next(line for line in table if line.startswith("| 1 |"))
    cells = re.split(r"(?<!\\)\|", row)  # unescaped pipes only
    assert len(cells) == len(re.split(r"(?<!\\)\|", header))  # the row kept its columns
    page = (results / "leaderboard.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<a ") == 1  # the record link only


@pytest.mark.parametrize(
    ("key", "value"),
    [("model", "a\n\n# heading\n| x | y |"), ("model", "=HYPERLINK(\"http://x\",\"y\")"),
     ("arch", "[t](javascript:alert(1))"), ("data.interpolation", "bilinear\n# h")],
    ids=["model_newlines", "model_formula", "arch_link", "interpolation"],
)  # fmt: skip
def test_names_that_are_not_names_are_refused(
    key: str, value: str, template: dict[str, Any], tmp_path: Path
) -> None:
    """Model, arch and interpolation name a record (and its file): they follow the names
    ModelSpec.identity writes, so such text is refused at the reader, naming file and key."""

    def edit(r: dict) -> None:
        *parents, last = key.split(".")
        node = r
        for part in parents:
            node = node[part]
        node[last] = value

    results = tmp_path / "results"
    _write(results, "good.json", template)
    bad = _write(results, "bad.json", _edited(template, edit))
    message = _fails(["--results-dir", str(results)])
    assert f"{bad}: malformed record: {key} " in message and "is not a name" in message
    assert not list(results.glob("leaderboard.*"))
    assert leaderboard_tool.build_leaderboard(results, skip_bad=True)["records"] == 1


def test_csv_cells_a_spreadsheet_would_evaluate_are_prefixed(
    template: dict[str, Any], tmp_path: Path
) -> None:
    def edit(r: dict) -> None:
        r["throughput"]["device_name"] = '=HYPERLINK("http://x","y")'
        r["throughput"]["precision"] = "-2+3"

    results = tmp_path / "results"
    _write(results, "@SUM(A1).json", _edited(template, edit))
    _write(results, "+cmd.json", _edited(template, lambda r: r["data"].update(crop_pct=0.9)))
    leaderboard_tool.build_leaderboard(results)
    with open(results / "leaderboard.csv", newline="") as fh:
        rows = {r["record"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"'@SUM(A1).json", "'+cmd.json"}
    row = rows["'@SUM(A1).json"]
    assert row["infer_device"] == '\'=HYPERLINK("http://x","y")'
    assert row["infer_precision"] == "'-2+3"
    assert float(row["top1"]) == pytest.approx(template["top1"], abs=1e-3)  # numbers stay numbers
    for r in rows.values():
        assert not any(v.startswith(("=", "+", "-", "@")) for k, v in r.items() if k != "seed")


# ----------------------------------------------------------------------------- parsing


def test_a_deeply_nested_record_is_one_line_naming_the_file(
    template: dict[str, Any], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    _write(results, "good.json", template)
    deep = results / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    message = _fails(["--results-dir", str(results)])
    assert f"{deep}: malformed record: nested deeper than 16" in message
    assert leaderboard_tool.main(["--results-dir", str(results), "--skip-bad"]) == 0
    assert leaderboard_tool.build_leaderboard(results, skip_bad=True)["records"] == 1


def test_an_oversized_record_is_refused_unparsed(template: dict[str, Any], tmp_path: Path) -> None:
    results = tmp_path / "results"
    big = _write(results, "big.json", {**template, "padding": "x" * (2 << 20)})
    with pytest.raises(RecordError, match="larger than 1048576 bytes") as err:
        leaderboard_tool.build_leaderboard(results)
    assert str(big) in str(err.value)


IMPOSSIBLE = {
    "no_images": (lambda r: r.update(num_images=0, top1=100.0, top5=100.0), "num_images=0"),
    "negative_params": (lambda r: r.update(params=-5), "params=-5"),
    "nan_gmacs": (lambda r: r.update(gmacs=math.nan), "gmacs=nan"),
    # an int past the float range (JSON allows it): refused, not an OverflowError
    "huge_gmacs": (lambda r: r.update(gmacs=10**400), "gmacs=1000"),
    "top5_below_top1": (lambda r: r.update(top1=90.0, top5=50.0), "top5=50.0 below top1"),
    "more_correct_than_images": (lambda r: r.update(top1_correct=99), "top1_correct=99"),
    "fingerprint": (lambda r: r["data"].update(fingerprint="../../x"), "data.fingerprint"),
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE))
def test_a_record_whose_numbers_contradict_is_refused(
    case: str, template: dict[str, Any], tmp_path: Path
) -> None:
    edit, pattern = IMPOSSIBLE[case]
    results = tmp_path / "results"
    _write(results, "good.json", template)
    bad = _write(results, "bad.json", _edited(template, edit))
    message = _fails(["--results-dir", str(results)])
    assert f"{bad}: impossible record: {pattern}" in message
    assert leaderboard_tool.build_leaderboard(results, skip_bad=True)["records"] == 1


# ----------------------------------------------------------------------------- identity


def test_one_checkpoint_through_two_eval_transforms_gives_two_records(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """48 px after 32 px is another evaluation, not `record already exists`."""
    results = tmp_path / "results"
    for size in (32, 48):
        eval_tool.evaluate_checkpoint(
            tiny["ckpt"],
            eval_tool.EvalOptions(
                data=tiny["data"], results_dir=results, img_size=size, **EVAL_FAST
            ),
        )
    names = sorted(p.name for p in results.glob("*.json"))
    assert [n.rsplit("_", 1)[1] for n in names] == [
        "32px-crop1-bilinear.json",
        "48px-crop1-bilinear.json",
    ]
    with pytest.raises(Exception, match="record already exists"):  # the same transform again
        eval_tool.evaluate_checkpoint(
            tiny["ckpt"],
            eval_tool.EvalOptions(data=tiny["data"], results_dir=results, img_size=48, **EVAL_FAST),
        )
    assert leaderboard_tool.build_leaderboard(results)["records"] == 2


@pytest.mark.parametrize(
    "edit",
    [lambda d: d.update(crop_pct=0.875), lambda d: d.update(interpolation="bicubic")],
    ids=["crop_pct", "interpolation"],
)
def test_duplicate_rule_includes_crop_and_interpolation(
    edit: Callable[[dict], Any], template: dict[str, Any], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    _write(results, "a.json", template)
    other = _edited(template, lambda r: edit(r["data"]))
    _write(results, "b.json", other)
    assert leaderboard_tool.build_leaderboard(results)["records"] == 2
    _write(results, "c.json", template)  # the same evaluation twice is still a duplicate
    with pytest.raises(RecordError, match="duplicate record.*crop_pct, interpolation"):
        leaderboard_tool.build_leaderboard(results)
