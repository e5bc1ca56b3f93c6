"""The results library behind xvol-leaderboard (xvol/results): the typed row, pairing within one
data backend, the seed-paired note, and the PNG's top-1 axis.

Records are written by hand (every key the schema asks for, nothing evaluated), so these tests
need no model and no torch: xvol.formats.record validates them as it validates xvol-eval's.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from xvol.cli import leaderboard as leaderboard_tool
from xvol.formats.record import RecordError
from xvol.results import Row, inherit_seeds, rank, val_sets
from xvol.results.render import TOP1_AXIS, paired_note, top1_chart

VAL = "ab" * 32  # one val set (a sha256)


def _record(
    model: str = "xresnet18",
    *,
    seed: int | None = 0,
    top1: float = 70.0,
    backend: str = "torchvision",
    deploy: bool = False,
    recipe: str | None = "r1",
) -> dict[str, Any]:
    """A valid schema-1 record; the checkpoint sha256 follows model, seed and form, and a
    deploy record names its training checkpoint as its source."""
    xvolution = model.startswith("x")
    train_sha = f"{model}-{seed}-train".encode().hex().ljust(64, "0")[:64]
    sha = f"{model}-{seed}-deploy".encode().hex().ljust(64, "0")[:64] if deploy else train_sha
    return {
        "schema_version": 1,
        "kind": "xvol.eval",
        "model": model,
        "arch": model.removeprefix("x"),
        "xvolution": xvolution,
        "deploy": deploy,
        "weights": "ema",
        "checkpoint": {"path": f"/ckpt/{model}.pt", "sha256": sha, "source_sha256": train_sha},
        "model_spec": {"arch": model.removeprefix("x"), "stages": [3] if xvolution else []},
        "seed": seed,
        "recipe": recipe,
        "top1": top1,
        "top5": 99.0,
        "num_images": 1000,
        "num_classes": 10,
        "params": 11_000_000,
        "gmacs": 1.8,
        "predictions_sha256": "c" * 64,
        "data": {"val_dir": "/data/val", "backend": backend, "fingerprint": VAL, "img_size": 32},
        "throughput": {"img_s": None, "batch_size": 8},
        "eval": {"precision": "fp32"},
        "versions": {},
        "date": "2025-01-01T00:00:00+00:00",
    }


def _write(results: Path, records: list[dict[str, Any]]) -> None:
    results.mkdir(exist_ok=True)
    for r in records:
        form = "deploy" if r["deploy"] else "train"
        name = f"{r['model']}_{form}_{r['data']['backend']}_{r['seed']}.json"
        (results / name).write_text(json.dumps(r))


def _two_backends(xvol_top1: list[float], base_top1: list[float]) -> list[dict[str, Any]]:
    """xresnet18 (train and deploy) and resnet18 over the given seeds, through both backends."""
    records = []
    for backend in ("torchvision", "dali"):
        for seed, (x, b) in enumerate(zip(xvol_top1, base_top1)):
            records.append(_record("xresnet18", seed=seed, top1=x, backend=backend))
            records.append(_record("xresnet18", seed=seed, top1=x, backend=backend, deploy=True))
            records.append(_record("resnet18", seed=seed, top1=b, backend=backend))
    return records


def _table(md: str, title: str) -> list[list[str]]:
    """The cells of the markdown table under the heading starting with ``title``."""
    section = md.split(f"### {title}", 1)[1].split("###", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if "---" not in line]


# ----------------------------------------------------------------------------- typed row


def test_row_is_typed_from_a_valid_record() -> None:
    row = Row.from_record(_record(top1=71.25), "r.json")
    assert (row.model, row.form, row.backend, row.seed, row.top1) == (
        "xresnet18", "train", "torchvision", 0, 71.25,
    )  # fmt: skip
    assert row.param_count == 11.0 and row.top1_err == pytest.approx(28.75)
    assert row.record == "r.json" and row.eval_key[1] == "torchvision"
    old = _record()
    del old["data"]["backend"]  # a record from before data.backend
    assert Row.from_record(old, "old.json").backend == "torchvision"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r.pop("top1"), "missing 'top1'"),
        (lambda r: r["data"].pop("fingerprint"), "missing 'data.fingerprint'"),
        # not in the record schema, but a row groups by it: the row refuses it too
        (lambda r: r.pop("model_spec"), "missing 'model_spec'"),
        (lambda r: r["throughput"].update(batch_size="8"), "'throughput.batch_size' is str"),
        (lambda r: r["data"].update(val_dir=["/a"]), "'data.val_dir' is list"),
    ],
    ids=["top1", "fingerprint", "model_spec", "batch_size", "val_dir"],
)
def test_row_rejects_a_record_missing_or_mistyping_a_field(damage: Any, message: str) -> None:
    record = _record()
    damage(record)
    with pytest.raises(RecordError, match=re.escape(f"bad.json: malformed record: {message}")):
        Row.from_record(record, "bad.json")


def test_a_record_without_model_spec_is_skipped_with_skip_bad(tmp_path: Path) -> None:
    results = tmp_path / "results"
    broken = _record("resnet18")
    broken.pop("model_spec")
    _write(results, [_record(), broken])
    with pytest.raises(RecordError, match=r"resnet18_train_torchvision_0\.json: .*'model_spec'"):
        leaderboard_tool.build_leaderboard(results)
    assert leaderboard_tool.build_leaderboard(results, skip_bad=True)["records"] == 1


# ----------------------------------------------------------------------------- backends


def test_two_backends_give_one_paired_row_per_backend(tmp_path: Path) -> None:
    """One checkpoint through torchvision and DALI: each pair stays within its backend, and
    each paired table says which backend a row is, so no two rows read the same."""
    results = tmp_path / "results"
    _write(results, _two_backends([71.0, 71.5, 70.8], [70.0, 70.9, 70.1]))
    rows = rank(inherit_seeds([Row.from_record(json.loads(p.read_text()), p)
                               for p in sorted(results.glob("*.json"))]))  # fmt: skip
    (vs,) = val_sets(rows)
    assert vs.backends == ["dali", "torchvision"]
    for pair in vs.baseline_pairs:
        assert pair.x.backend == pair.base.backend and pair.x.seed == pair.base.seed
    for pair in vs.deploy_pairs:
        assert pair.train.backend == pair.deploy.backend
    for c in vs.comparisons:
        assert c.x.first.backend == c.base.first.backend == c.backend
    # 3 seeds x 2 forms per backend; 3 deploy pairs per backend; 2 forms per backend
    assert len(vs.baseline_pairs) == 12 and len(vs.deploy_pairs) == 6
    assert sorted((c.backend, c.x.first.form) for c in vs.comparisons) == [
        ("dali", "deploy"), ("dali", "train"), ("torchvision", "deploy"), ("torchvision", "train"),
    ]  # fmt: skip

    result = leaderboard_tool.build_leaderboard(results)
    assert sorted(c["backend"] for c in result["val_sets"][0]["paired"]) == [
        "dali", "dali", "torchvision", "torchvision",
    ]  # fmt: skip
    md = result["markdown"]
    for title in ("X-volution vs baseline, paired by seed", "X-volution vs baseline (",
                  "Deploy vs training form"):  # fmt: skip
        header, *body = _table(md, title)
        assert "backend" in header, title
        keyed = [
            tuple(c for h, c in zip(header, r) if not h.startswith(("Δ", "95%"))) for r in body
        ]
        assert len(set(keyed)) == len(keyed), (title, body)  # no duplicate rows
        backends = [r[header.index("backend")] for r in body]
        assert sorted(backends) == backends  # a backend's rows together
    header, *paired = _table(md, "X-volution vs baseline, paired by seed")
    by_backend = {(r[0], r[1]) for r in paired}
    assert by_backend == {(b, f"xresnet18 ({f})") for b in ("dali", "torchvision")
                          for f in ("train", "deploy")}  # fmt: skip


# ----------------------------------------------------------------------------- notes


def test_the_seed_caveat_appears_once_in_leaderboard_md(tmp_path: Path) -> None:
    """One seed per model through two backends and two forms: four comparisons without an
    interval, and the caveat about too few seeds said once, not four times."""
    results = tmp_path / "results"
    _write(results, _two_backends([71.0], [70.0]))
    leaderboard_tool.build_leaderboard(results)
    md = (results / "leaderboard.md").read_text()
    assert md.count("at least 2 are needed for an interval") == 1
    assert "4 of 4 comparison(s) pair fewer than 2 seeds" in md
    page = (results / "leaderboard.html").read_text()
    assert page.count("at least 2 are needed for an interval") == 1


def test_each_verdict_names_its_form_and_backend_once(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write(results, _two_backends([71.0, 71.2, 70.8], [70.0, 70.0, 70.0]))
    md = leaderboard_tool.build_leaderboard(results)["markdown"]
    (note,) = [line for line in md.splitlines() if "is better by" in line]
    for backend in ("torchvision", "dali"):
        for form in ("train", "deploy"):
            assert note.count(f"xresnet18 ({form}, {backend}) vs resnet18 (train):") == 1
    sentences = re.split(r"(?<=\.) (?=[a-z])", note.strip("_"))
    assert len(sentences) == len(set(sentences)) == 4


def test_paired_note_without_comparisons_says_why() -> None:
    assert "no X-volution record with a baseline record" in paired_note([])


# ----------------------------------------------------------------------------- PNG axis


def test_top1_axis_starts_at_a_stated_zero_with_error_bars() -> None:
    """Top-1 of 93-94 (a 0.65-point gap): the bars still start at 0, the axis label says so,
    and each bar carries the std over its seeds (none for a single seed)."""
    x = [94.1, 93.6, 94.3]
    records = [_record("xresnet18", seed=s, top1=v) for s, v in enumerate(x)]
    records += [_record("resnet18", seed=s, top1=v) for s, v in enumerate([93.5, 93.3, 93.6])]
    records.append(_record("resnet34", seed=0, top1=93.4))
    (vs,) = val_sets(rank(Row.from_record(r, f"{i}.json") for i, r in enumerate(records)))
    chart = top1_chart(vs.groups)
    assert chart.xlim == TOP1_AXIS == (0.0, 100.0)
    assert "from 0" in chart.xlabel and "std" in chart.xlabel
    assert chart.means[0] == pytest.approx(statistics.fmean(x))  # best first
    assert chart.stds[0] == pytest.approx(statistics.stdev(x))
    assert chart.ns == (3, 3, 1)
    assert chart.stds[2] == 0.0 and chart.values[2] == "93.40"
    assert chart.values[0] == f"{statistics.fmean(x):.2f} ± {statistics.stdev(x):.2f} (n=3)"
    gap = chart.means[0] - chart.means[1]
    assert gap / (chart.xlim[1] - chart.xlim[0]) < 0.01  # drawn as the small gap it is
    with pytest.raises(ValueError):
        top1_chart([])


def test_rows_keep_exact_numbers_and_the_csv_rounds(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write(results, [_record(top1=100 * 2 / 3)])
    leaderboard_tool.build_leaderboard(results)
    (row,) = [line for line in (results / "leaderboard.csv").read_text().splitlines()[1:]]
    assert row.split(",")[1:3] == ["66.667", "33.333"]
    assert Row.from_record(_record(top1=100 * 2 / 3), "r.json").top1 == 100 * 2 / 3


def test_a_record_is_never_changed_by_reading_it() -> None:
    record = _record()
    before = copy.deepcopy(record)
    Row.from_record(record, "r.json")
    assert record == before
