"""Aggregate eval records (results/*.json from tools/eval.py) into a leaderboard.

Usage:
    python tools/leaderboard.py                          # results/ -> results/leaderboard.*
    xvol-leaderboard --results-dir results --out-dir site/
    xvol-leaderboard --skip-bad                          # skip malformed records, with a warning

Writes OUT/leaderboard.md, .csv and .html, and one OUT/leaderboard_<val>.png per val set, and
prints the markdown. The leaderboard holds nothing of its own: every number comes from a record,
so its files are regenerated (overwritten) on each run. Records are grouped by val set (the data
fingerprint: same files, same labels); numbers from different val sets are never ranked or
paired together. Per val set:

- the ranked table (model, form, weights, data backend, seed, ...);
- seeds: records of the same model, recipe (``recipe``: the training config less the model,
  seed and run bookkeeping, see xvol.formats.record.recipe_fingerprint), form, weights, backend and
  eval settings are seeds of one experiment: mean, std and n of their top-1;
- X-volution vs baseline paired by seed: the same recipe with the baseline backbone, the
  difference per seed, its mean and a 95% t-interval, and a plain sentence when the interval
  contains zero (the seeds do not tell the two apart);
- X-volution vs baseline: each X-volution record against the best baseline record of the same
  backbone (xresnet50 <-> resnet50, by the stored ``arch``) and eval settings, with the deltas;
- deploy vs training form: each deploy record against the record of the training checkpoint it
  was re-parameterized from (same source sha256, weights and backend), with whether the per-image
  predictions are identical (equal ``predictions_sha256``).

A deploy record without a seed takes the seed and recipe of its training checkpoint's record.
A malformed record (not JSON, nested too deep, too large, wrong schema, missing or mistyped
key, numbers that contradict each other) or a duplicate (the same checkpoint, weights, val set,
backend, eval transform and precision twice) is an error naming the file; --skip-bad skips it.

Every field of a record is text from outside: each output escapes it for its own syntax (HTML
text and attributes; markdown cells with newlines, pipes and link/emphasis syntax neutralized;
CSV cells starting with = + - @ prefixed with ' so no spreadsheet reads a formula), and a link
goes only to a record file found here, as a percent-encoded relative path.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import math
import os
import re
import statistics
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xvol.extras import MissingExtra, require
from xvol.formats.files import atomic_path, write_text_atomic
from xvol.formats.record import RecordError, read_record
from xvol.tools_common import ToolError, setup_tool_logging, tool_args, tool_errors

log = logging.getLogger("xvol.tools.leaderboard")

OUTPUT_NAMES = ("leaderboard.md", "leaderboard.csv", "leaderboard.html")
# timm's results/*.csv column names, then the throughput (benchmark csv) and provenance columns.
CSV_COLUMNS = (
    "model",
    "top1",
    "top1_err",
    "top5",
    "top5_err",
    "param_count",
    "gmacs",
    "img_size",
    "crop_pct",
    "interpolation",
    "infer_samples_per_sec",
    "infer_batch_size",
    "infer_precision",
    "infer_device",
    "arch",
    "xvolution",
    "form",
    "weights",
    "backend",
    "seed",
    "recipe",
    "num_images",
    "val_fingerprint",
    "checkpoint_sha256",
    "source_sha256",
    "predictions_sha256",
    "record",
)


def _backend(record: dict[str, Any]) -> str:
    return record["data"].get("backend") or "torchvision"  # the only backend of early records


def _duplicate_key(record: dict[str, Any]) -> tuple:
    """What identifies an evaluation: two backends' (or eval transforms') records of one
    checkpoint coexist."""
    data = record["data"]
    return (
        record["checkpoint"]["sha256"],
        record["weights"],
        data["fingerprint"],
        _backend(record),
        data["img_size"],
        data.get("crop_pct"),
        data.get("interpolation"),
        record["eval"]["precision"],
    )


def load_records(results_dir: str | Path, skip_bad: bool = False) -> list[tuple[Path, dict]]:
    """Every ``*.json`` record under ``results_dir``, validated; duplicates are errors."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ToolError(f"no results directory {results_dir} (run tools/eval.py first)")
    out: list[tuple[Path, dict]] = []
    seen: dict[tuple, Path] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = read_record(path)
            key = _duplicate_key(record)
            if key in seen:
                raise RecordError(
                    f"{path}: duplicate record: same checkpoint {key[0][:12]}, weights, val set, "
                    f"backend, image size, crop_pct, interpolation and precision as {seen[key]}; "
                    "remove one"
                )
        except RecordError as err:
            if not skip_bad:
                raise
            log.warning("skipped: %s", err)
            continue
        seen[key] = path
        out.append((path, record))
    if not out:
        raise ToolError(f"no eval records (*.json) in {results_dir} (run tools/eval.py first)")
    return out


def _row(path: Path, r: dict[str, Any]) -> dict[str, Any]:
    tp = r["throughput"]
    return {
        "model": r["model"],
        "top1": round(float(r["top1"]), 3),
        "top1_err": round(100.0 - float(r["top1"]), 3),
        "top5": round(float(r["top5"]), 3),
        "top5_err": round(100.0 - float(r["top5"]), 3),
        "param_count": round(r["params"] / 1e6, 3),
        "gmacs": round(float(r["gmacs"]), 4),
        "img_size": r["data"]["img_size"],
        "crop_pct": r["data"].get("crop_pct"),
        "interpolation": r["data"].get("interpolation"),
        "infer_samples_per_sec": round(tp["img_s"], 1) if tp.get("img_s") is not None else None,
        "infer_batch_size": tp.get("batch_size"),
        "infer_precision": tp.get("precision", r["eval"]["precision"]),
        "infer_device": tp.get("device_name") or tp.get("device"),
        "arch": r["arch"],
        "xvolution": r["xvolution"],
        "form": "deploy" if r["deploy"] else "train",
        "weights": r["weights"],
        "backend": _backend(r),
        "seed": r.get("seed"),
        "recipe": r.get("recipe"),
        "model_spec": json.dumps(r["model_spec"], sort_keys=True),
        "precision": r["eval"]["precision"],
        "num_images": r["num_images"],
        "num_classes": r["num_classes"],
        "val_dir": r["data"].get("val_dir"),
        "val_fingerprint": r["data"]["fingerprint"],
        "checkpoint_sha256": r["checkpoint"]["sha256"],
        "source_sha256": r["checkpoint"]["source_sha256"],
        "predictions_sha256": r["predictions_sha256"],
        "record": path.name,
        "record_path": str(path),
        "date": r["date"],
    }


def _eval_key(r: dict[str, Any]) -> tuple:
    """Same images through the same preprocessing at the same precision."""
    return (
        r["val_fingerprint"],
        r["backend"],
        r["img_size"],
        r["crop_pct"],
        r["interpolation"],
        r["precision"],
    )


def _same_eval(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _eval_key(a) == _eval_key(b)


def inherit_seeds(rows: Sequence[dict[str, Any]]) -> None:
    """A deploy row without seed/recipe takes those of its training checkpoint's row."""
    by_sha = {r["checkpoint_sha256"]: r for r in rows if r["form"] == "train"}
    for r in rows:
        source = by_sha.get(r["source_sha256"])
        if r["form"] == "deploy" and source is not None:
            for key in ("seed", "recipe"):
                if r[key] is None:
                    r[key] = source[key]


def baseline_pairs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each X-volution row with a baseline row of its backbone on the same val set: the one of
    the same seed and recipe when there is one (a fair pair), else the best."""
    pairs = []
    for x in rows:
        if not x["xvolution"]:
            continue
        candidates = [
            b for b in rows if not b["xvolution"] and b["arch"] == x["arch"] and _same_eval(x, b)
        ]
        if not candidates:
            continue
        # prefer the same seed and recipe, then the same form and weights, then the best top-1
        base = max(
            candidates,
            key=lambda b: (
                x["seed"] is not None and (b["seed"], b["recipe"]) == (x["seed"], x["recipe"]),
                b["form"] == x["form"],
                b["weights"] == x["weights"],
                b["top1"],
            ),
        )
        pairs.append({"x": x, "base": base, **_deltas(x, base)})
    return pairs


def _seed(row: dict[str, Any]) -> str:
    return "" if row["seed"] is None else f", seed {row['seed']}"


def deploy_pairs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each deploy row with the training-form row of the checkpoint it came from."""
    pairs = []
    for d in rows:
        if d["form"] != "deploy":
            continue
        for t in rows:
            if (
                t["form"] == "train"
                and t["checkpoint_sha256"] == d["source_sha256"]
                and t["weights"] == d["weights"]
                and _same_eval(t, d)
                and t["infer_precision"] == d["infer_precision"]
            ):
                same = t["predictions_sha256"] == d["predictions_sha256"]
                pairs.append({"train": t, "deploy": d, "identical": same, **_deltas(d, t)})
                break
    return pairs


def _deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    speed = None
    if a["infer_samples_per_sec"] and b["infer_samples_per_sec"]:
        speed = a["infer_samples_per_sec"] / b["infer_samples_per_sec"]
    return {
        "d_top1": round(a["top1"] - b["top1"], 3),
        "d_top5": round(a["top5"] - b["top5"], 3),
        "d_params": round(a["param_count"] - b["param_count"], 3),
        "d_gmacs": round(a["gmacs"] - b["gmacs"], 4),
        "speed_ratio": round(speed, 3) if speed is not None else None,
    }


# ----------------------------------------------------------------------------- seeds

# Two-sided 95% quantiles of Student's t, t(0.975, df) for df = 1..30, to 3 decimals. scipy is not
# an xvol dependency (it is present here only through other packages), and this table is exact
# to the precision shown; past 30 the quantile moves by < 0.05 and 40/60/120/inf are interpolated.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_T975_TAIL = ((30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960))


def t_quantile_975(df: int) -> float:
    """t(0.975, df): scipy's when installed, else the table above."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy.stats import t
    except ImportError:
        if df <= len(_T975):
            return _T975[df - 1]
        for (d0, t0), (d1, t1) in zip(_T975_TAIL, _T975_TAIL[1:]):
            if df <= d1:  # linear in 1/df, as t is near its limit
                w = (1 / d0 - 1 / df) / (1 / d0 - (0 if math.isinf(d1) else 1 / d1))
                return t0 + w * (t1 - t0)
        return 1.960
    return float(t.ppf(0.975, df))


def paired_interval(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std, n and the 95% t-interval of paired differences (None below n = 2)."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else None
    std = statistics.stdev(diffs) if n >= 2 else None
    lo = hi = None
    if n >= 2:
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        lo, hi = mean - half, mean + half
    return {"n": n, "mean": mean, "std": std, "lo": lo, "hi": hi}


def _group_key(r: dict[str, Any]) -> tuple:
    """Records differing only in the seed: one model, recipe, form and weights, one eval."""
    return (r["model_spec"], r["recipe"], r["form"], r["weights"], *_eval_key(r))


def seed_groups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by _group_key: mean, std, n of top-1, and top-1 by seed.

    A seed evaluated twice in one group (two checkpoints of one run) counts once: its most
    recent record (by date), with a note.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    out = []
    for members in groups.values():
        by_seed: dict[Any, dict[str, Any]] = {}
        unseeded, repeated = [], 0
        for r in sorted(members, key=lambda r: r["date"]):
            if r["seed"] is None:
                unseeded.append(r)
                continue
            repeated += r["seed"] in by_seed
            by_seed[r["seed"]] = r
        top1 = [r["top1"] for r in by_seed.values()] + [r["top1"] for r in unseeded]
        first = members[0]
        out.append(
            {
                "rows": members,
                "first": first,
                "by_seed": {seed: r["top1"] for seed, r in by_seed.items()},
                "n": len(top1),
                "mean": statistics.fmean(top1),
                "std": statistics.stdev(top1) if len(top1) >= 2 else None,
                "seeds": sorted(by_seed),
                "unseeded": len(unseeded),
                "repeated": repeated,
            }
        )
    return sorted(out, key=lambda g: (-g["mean"], g["first"]["model"]))


def seed_comparisons(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each X-volution group against the baseline group of its backbone and recipe, paired by
    seed (the baseline's training form stands for its deploy form: the same network)."""
    out = []
    for x in groups:
        fx = x["first"]
        if not fx["xvolution"] or fx["recipe"] is None:
            continue
        candidates = [
            b
            for b in groups
            if not b["first"]["xvolution"]
            and b["first"]["arch"] == fx["arch"]
            and b["first"]["recipe"] == fx["recipe"]
            and b["first"]["weights"] == fx["weights"]
            and _same_eval(b["first"], fx)
        ]
        if not candidates:
            continue
        base = max(candidates, key=lambda b: (b["first"]["form"] == fx["form"], b["n"]))
        seeds = sorted(set(x["by_seed"]) & set(base["by_seed"]))
        diffs = [x["by_seed"][s] - base["by_seed"][s] for s in seeds]
        out.append({"x": x, "base": base, "seeds": seeds, **paired_interval(diffs)})
    return out


def verdict(c: dict[str, Any]) -> str:
    """The comparison in one plain sentence."""
    name, base = c["x"]["first"]["model"], c["base"]["first"]["model"]
    if c["n"] < 2:
        return (
            f"{name} vs {base}: {c['n']} paired seed(s); at least 2 are needed for an "
            "interval, and one seed can decide the sign by chance."
        )
    span = f"[{c['lo']:+.2f}, {c['hi']:+.2f}]"
    if c["lo"] <= 0.0 <= c["hi"]:
        return (
            f"{name} vs {base}: the 95% interval of the top-1 difference, {span} points over "
            f"{c['n']} seeds, contains zero: these seeds do not show a difference between them."
        )
    better = "better" if c["mean"] > 0 else "worse"
    return (
        f"{name} vs {base}: {name} is {better} by {c['mean']:+.2f} points of top-1 "
        f"(95% interval {span}, {c['n']} seeds paired)."
    )


# ----------------------------------------------------------------------------- rendering


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def _signed(value: float | None, spec: str = "+.2f") -> str:
    return "-" if value is None else format(value, spec)


def tables(vs: dict[str, Any]) -> list[dict[str, Any]]:
    """One val set's tables as {title, header, rows (strings), note}; markdown and HTML render
    them. ``vs``: rows, bpairs, dpairs, groups, comparisons (build_leaderboard)."""
    rows, bpairs, dpairs = vs["rows"], vs["bpairs"], vs["dpairs"]
    main = {
        "title": f"Leaderboard ({len(rows)} records, by top-1)",
        "header": [
            "#",
            "model",
            "form",
            "weights",
            "backend",
            "seed",
            "top-1",
            "top-5",
            "params (M)",
            "GMACs",
            "img/s",
            "batch",
            "precision",
            "device",
            "images",
            "checkpoint",
            "record",
        ],
        "rows": [
            [
                str(i + 1),
                r["model"],
                r["form"],
                r["weights"],
                r["backend"],
                _fmt(r["seed"]),
                _fmt(r["top1"], ".2f"),
                _fmt(r["top5"], ".2f"),
                _fmt(r["param_count"], ".2f"),
                _fmt(r["gmacs"], ".3f"),
                _fmt(r["infer_samples_per_sec"], ".1f"),
                _fmt(r["infer_batch_size"]),
                _fmt(r["infer_precision"]),
                _fmt(r["infer_device"]),
                str(r["num_images"]),
                r["checkpoint_sha256"][:12],
                ("json", r["record_link"]) if r.get("record_link") else "json",
            ]
            for i, r in enumerate(rows)
        ],
        "note": None,
    }
    base = {
        "title": "X-volution vs baseline (same backbone, same val set)",
        "header": [
            "model",
            "baseline",
            "top-1",
            "baseline top-1",
            "Δ top-1",
            "Δ top-5",
            "Δ params (M)",
            "Δ GMACs",
            "img/s ratio",
        ],
        "rows": [
            [
                f"{p['x']['model']} ({p['x']['form']}, {p['x']['weights']}{_seed(p['x'])})",
                f"{p['base']['model']} ({p['base']['form']}, {p['base']['weights']}"
                f"{_seed(p['base'])})",
                _fmt(p["x"]["top1"], ".2f"),
                _fmt(p["base"]["top1"], ".2f"),
                _signed(p["d_top1"]),
                _signed(p["d_top5"]),
                _signed(p["d_params"]),
                _signed(p["d_gmacs"], "+.3f"),
                _fmt(p["speed_ratio"], ".2f"),
            ]
            for p in bpairs
        ],
        "note": None if bpairs else "no baseline record of the same backbone on the same val set",
    }
    deploy = {
        "title": "Deploy vs training form (same checkpoint, same weights)",
        "header": [
            "model",
            "weights",
            "top-1 train",
            "top-1 deploy",
            "Δ top-1",
            "identical predictions",
            "params (M) train → deploy",
            "img/s train",
            "img/s deploy",
            "speedup",
        ],
        "rows": [
            [
                p["deploy"]["model"],
                p["deploy"]["weights"],
                _fmt(p["train"]["top1"], ".2f"),
                _fmt(p["deploy"]["top1"], ".2f"),
                _signed(p["d_top1"]),
                "yes" if p["identical"] else "NO",
                f"{p['train']['param_count']:.3f} → {p['deploy']['param_count']:.3f}",
                _fmt(p["train"]["infer_samples_per_sec"], ".1f"),
                _fmt(p["deploy"]["infer_samples_per_sec"], ".1f"),
                _fmt(p["speed_ratio"], ".2f"),
            ]
            for p in dpairs
        ],
        "note": None if dpairs else "no deploy record with its training-form record",
    }
    groups, comparisons = vs["groups"], vs["comparisons"]
    seeds = {
        "title": "Seeds (same model, recipe, form, weights and eval: mean over seeds)",
        "header": ["model", "form", "weights", "backend", "n", "seeds", "top-1 mean", "std"],
        "rows": [
            [
                g["first"]["model"],
                g["first"]["form"],
                g["first"]["weights"],
                g["first"]["backend"],
                str(g["n"]),
                ", ".join(map(str, g["seeds"])) + (" + ?" * bool(g["unseeded"])),
                _fmt(g["mean"], ".2f"),
                _fmt(g["std"], ".2f"),
            ]
            for g in groups
        ],
        "note": (
            "one record per model and recipe: no spread to report; train more seeds "
            "(seed=0,1,2) to see how much of a difference is chance"
            if all(g["n"] < 2 for g in groups)
            else None
        ),
    }
    paired = {
        "title": "X-volution vs baseline, paired by seed (same recipe; 95% t-interval)",
        "header": [
            "model",
            "baseline",
            "seeds",
            "mean top-1",
            "baseline mean",
            "Δ top-1 mean",
            "Δ std",
            "95% interval",
        ],
        "rows": [
            [
                f"{c['x']['first']['model']} ({c['x']['first']['form']})",
                f"{c['base']['first']['model']} ({c['base']['first']['form']})",
                ", ".join(map(str, c["seeds"])) or "-",
                _fmt(c["x"]["mean"], ".2f"),
                _fmt(c["base"]["mean"], ".2f"),
                _signed(c["mean"]),
                _fmt(c["std"], ".2f"),
                f"[{c['lo']:+.2f}, {c['hi']:+.2f}]" if c["lo"] is not None else "-",
            ]
            for c in comparisons
        ],
        "note": " ".join(verdict(c) for c in comparisons)
        or "no X-volution record with a baseline record of the same backbone, recipe, weights "
        "and eval settings (records without a recipe: checkpoints that store no training config)",
    }
    return [main, seeds, paired, base, deploy]


# Markdown that would make text something else: emphasis, code, raw HTML and autolinks (<),
# table cells (|), entities (&), images (![) and inline links (](). Escaped with a backslash,
# each renders as itself; brackets alone stay (an interval reads [-0.24, +2.24]).
_MD_ESCAPE = re.compile(r"([\\`*_~<>|&])")


def _md_text(text: object) -> str:
    """Text from a record as one line of literal markdown: every line break (\\n, \\r, U+2028,
    ...) becomes a space, so nothing can start a heading or leave the table row, and link,
    image, HTML and emphasis syntax is escaped."""
    line = " ".join(str(text).split())
    line = _MD_ESCAPE.sub(r"\\\1", line)
    return line.replace("![", "\\![").replace("](", "]\\(")


def _md_cell(cell: str | tuple[str, str]) -> str:
    """A cell; a (text, href) pair becomes a link (href: _record_href's checked relative path)."""
    if isinstance(cell, tuple):
        return f"[{_md_text(cell[0])}]({cell[1]})"
    return _md_text(cell)


def to_markdown(sets: list[dict[str, Any]]) -> str:
    out = [f"# xvol leaderboard\n\n{_md_text(_summary(sets))}\n"]
    for vs in sets:
        out.append(f"## {_md_text(vs['title'])}\n")
        for t in vs["tables"]:
            out.append(f"### {_md_text(t['title'])}\n")
            if t["rows"]:
                out.append("| " + " | ".join(t["header"]) + " |")
                out.append("|" + "|".join("---" for _ in t["header"]) + "|")
                out.extend("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t["rows"])
            if t["note"]:
                out.append(f"_{_md_text(t['note'])}_")
            out.append("")
        out.append(f"![top-1 on {vs['id']}]({vs['png_name']})\n")
    return "\n".join(out)


def _summary(sets: list[dict[str, Any]]) -> str:
    n = sum(len(vs["rows"]) for vs in sets)
    return (
        f"{n} records on {len(sets)} val set(s). Records on different val sets (data "
        "fingerprint) are never ranked or compared together."
    )


def to_html(sets: list[dict[str, Any]]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>xvol leaderboard</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin-bottom:2em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:nth-child(2){text-align:left}img{max-width:100%}</style>"
        "</head><body>",
        "<h1>xvol leaderboard</h1>",
        f"<p>{html.escape(_summary(sets))}</p>",
    ]
    for vs in sets:
        parts.append(f"<h2>{html.escape(vs['title'])}</h2>")
        for t in vs["tables"]:
            parts.append(f"<h3>{html.escape(t['title'])}</h3>")
            if t["rows"]:
                parts.append(
                    "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t["header"])
                )
                for r in t["rows"]:
                    cells = []
                    for c in r:
                        if isinstance(c, tuple):
                            text = f'<a href="{html.escape(c[1])}">{html.escape(c[0])}</a>'
                        else:
                            text = html.escape(c)
                        cells.append(f"<td>{text}</td>")
                    parts.append("<tr>" + "".join(cells) + "</tr>")
                parts.append("</table>")
            if t["note"]:
                parts.append(f"<p><em>{html.escape(t['note'])}</em></p>")
        parts.append(
            f'<img src="{html.escape(vs["png_name"])}" alt="top-1 on {html.escape(vs["id"])}">'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# A cell a spreadsheet would read as a formula (=HYPERLINK(...), +cmd, -2+3, @SUM) or whose
# leading tab/CR it would strip first (OWASP's CSV injection list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """Numbers as they are; text that a spreadsheet would evaluate prefixed with ' (kept text)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_cell(r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def _plain(text: str) -> str:
    """Text for matplotlib as text: ``$...$`` would be parsed as mathtext (and may not parse)."""
    return " ".join(text.split()).replace("$", r"\$")


def _label(r: dict[str, Any]) -> str:
    seed = f" s{r['seed']}" if r["seed"] is not None else ""
    return _plain(f"{r['model']} · {r['form']} · {r['weights']} · {r['backend']}{seed}")


def plot(vs: dict[str, Any], path: Path) -> None:
    """One val set: top-1 per record as horizontal bars (labels on the y axis, one per line, so
    they cannot overlap), and top-1 against GMACs with one legend entry per model and form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(vs["rows"]))  # best at the top
    height = max(3.2, 0.32 * len(rows) + 1.6)
    fig, (bars, scatter) = plt.subplots(
        1, 2, figsize=(14, height), dpi=100, gridspec_kw={"width_ratios": [3, 2]}
    )
    from matplotlib.colors import to_rgba

    def colour(r: dict[str, Any]) -> tuple:  # X-volution red, baseline blue; deploy paler
        return to_rgba(
            "tab:red" if r["xvolution"] else "tab:blue", 1.0 if r["form"] == "train" else 0.55
        )

    y = range(len(rows))
    bars.barh(y, [r["top1"] for r in rows], color=[colour(r) for r in rows])
    bars.set_yticks(list(y), [_label(r) for r in rows], fontsize=8)
    lo = min(r["top1"] for r in rows)
    bars.set_xlim(max(0.0, lo - max(2.0, 0.1 * (100 - lo))), 100.0)
    for i, r in enumerate(rows):
        bars.text(r["top1"], i, f" {r['top1']:.2f}", va="center", fontsize=7)
    bars.set_xlabel("top-1 (%)")
    bars.grid(axis="x", alpha=0.3)
    markers = {"train": "o", "deploy": "D"}
    cmap = plt.get_cmap("tab10")
    models = sorted({r["model"] for r in rows})
    for (model, form), pts in _by(rows, lambda r: (r["model"], r["form"])).items():
        scatter.scatter(
            [r["gmacs"] for r in pts],
            [r["top1"] for r in pts],
            marker=markers[form],
            color=cmap(models.index(model) % 10),
            s=40,
            alpha=0.85,
            label=_plain(f"{model} ({form})"),
        )
    scatter.set_xlabel("GMACs per image")
    scatter.set_ylabel("top-1 (%)")
    scatter.grid(alpha=0.3)
    scatter.ticklabel_format(axis="both", useOffset=False, style="plain")
    scatter.legend(fontsize=7, loc="best")
    fig.suptitle(_plain(vs["title"]), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _by(rows: Sequence[dict[str, Any]], key: Any) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def val_sets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows split by val fingerprint, each with its pairings; the largest val set first."""
    sets = []
    for fingerprint, members in _by(rows, lambda r: r["val_fingerprint"]).items():
        dirs = sorted({r["val_dir"] for r in members if r["val_dir"]})
        short = fingerprint[:8]
        where = dirs[0] if len(dirs) == 1 else f"{len(dirs)} copies" if dirs else "?"
        groups = seed_groups(members)
        sets.append(
            {
                "id": short,
                "title": (
                    f"Val set {short}: {where} ({members[0]['num_images']} images, "
                    f"{members[0]['num_classes']} classes)"
                ),
                "rows": members,
                "bpairs": baseline_pairs(members),
                "dpairs": deploy_pairs(members),
                "groups": groups,
                "comparisons": seed_comparisons(groups),
                "png_name": f"leaderboard_{short}.png",
            }
        )
    return sorted(sets, key=lambda vs: (-len(vs["rows"]), vs["id"]))


def _record_href(record: Path, out: Path) -> str | None:
    """The record file as a link from ``out``: a relative path, each part percent-encoded (a file
    named ``javascript:alert(1).json`` is ``./javascript%3Aalert%281%29.json``, a file, not a
    scheme), checked to lead back to the file; None (no link) when it does not."""
    rel = Path(os.path.relpath(record, out))
    if (out / rel).resolve() != record.resolve() or not record.is_file():
        log.warning(
            "%s: not linked (its relative path from %s does not lead back to it)", record, out
        )
        return None
    parts = [urllib.parse.quote(part, safe="") for part in rel.parts]
    return "/".join(parts if parts[0] == ".." else [".", *parts])


def build_leaderboard(
    results_dir: str | Path = "results",
    out_dir: str | Path | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Validate the records, then write leaderboard.{md,csv,html} and leaderboard_<val>.png per
    val set; returns paths, counts per val set and the markdown."""
    records = load_records(results_dir, skip_bad)
    out = Path(out_dir) if out_dir is not None else Path(results_dir)
    rows = sorted(
        (_row(p, r) for p, r in records),
        key=lambda r: (-r["top1"], r["model"], r["form"] != "train"),
    )
    for r in rows:
        r["record_link"] = _record_href(Path(r["record_path"]), out)
    inherit_seeds(rows)
    sets = val_sets(rows)
    for vs in sets:
        vs["tables"] = tables(vs)
    markdown = to_markdown(sets)
    paths = {name.rsplit(".", 1)[1]: out / name for name in OUTPUT_NAMES}
    pngs = [out / vs["png_name"] for vs in sets]
    try:
        require("matplotlib", "plot", "the leaderboard's PNG plots")
    except MissingExtra as err:  # the tables are the result; the plots are a view of them
        log.warning("%s; writing the tables without plots", err)
        pngs = []
    for vs, png in zip(sets, pngs):
        plot(vs, png)
    for stale in out.glob("leaderboard_*.png"):  # val sets no longer in the results
        if stale not in pngs and re.fullmatch(r"leaderboard_[0-9a-f]{8}\.png", stale.name):
            stale.unlink()
    for key, text in (("md", markdown), ("csv", to_csv(rows)), ("html", to_html(sets))):
        write_text_atomic(paths[key], text)
    return {
        "records": len(rows),
        "val_sets": [
            {
                "id": vs["id"],
                "records": len(vs["rows"]),
                "baseline_pairs": len(vs["bpairs"]),
                "deploy_pairs": len(vs["dpairs"]),
                "seed_groups": len(vs["groups"]),
                "paired": [
                    {k: c[k] for k in ("n", "mean", "std", "lo", "hi", "seeds")}
                    for c in vs["comparisons"]
                ],
            }
            for vs in sets
        ],
        "baseline_pairs": sum(len(vs["bpairs"]) for vs in sets),
        "deploy_pairs": sum(len(vs["dpairs"]) for vs in sets),
        "files": {**{k: str(v) for k, v in paths.items()}, "png": [str(p) for p in pngs]},
        "markdown": markdown,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol-leaderboard",
        description=(
            "Aggregate eval records (tools/eval.py) into leaderboard.md/.csv/.html and one PNG "
            "per val set; seeds of one recipe are averaged, X-volution models are paired with "
            "their baselines (by seed, with a 95% interval) and deploy checkpoints with their "
            "training form. Prints the markdown."
        ),
        epilog=(
            "examples:\n"
            "  xvol-leaderboard\n"
            "  xvol-leaderboard --results-dir results --out-dir site/\n"
            "  xvol-leaderboard --skip-bad"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[tool_args()],
    )
    parser.add_argument("--results-dir", default="results", help="where the records are")
    parser.add_argument("--out-dir", help="where the leaderboard files go (default: results dir)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed/duplicate records (warn) instead of failing",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    with tool_errors("xvol-leaderboard", args.debug):
        result = build_leaderboard(args.results_dir, args.out_dir, args.skip_bad)
    print(result["markdown"])
    files = result["files"]
    log.info("wrote %s", ", ".join([files["md"], files["csv"], files["html"], *files["png"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
