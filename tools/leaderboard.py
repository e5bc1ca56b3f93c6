"""Aggregate eval records (results/*.json from tools/eval.py) into a leaderboard.

Usage:
    python tools/leaderboard.py                          # results/ -> results/leaderboard.*
    xvol-leaderboard --results-dir results --out-dir site/
    xvol-leaderboard --skip-bad                          # skip malformed records, with a warning

Writes OUT/leaderboard.md, .csv, .html and .png (top-1 against GMACs, parameters and throughput)
and prints the markdown. The leaderboard holds nothing of its own: every number comes from a
record, so its files are regenerated (overwritten) on each run. Two pairings are shown:

- X-volution vs baseline: each X-volution record against the best baseline record of the same
  backbone (xresnet50 <-> resnet50, by the stored ``arch``) on the same val set (fingerprint) and
  image size, with the deltas;
- deploy vs training form: each deploy record against the record of the training checkpoint it
  was re-parameterized from (same source sha256 and weights), with whether the per-image
  predictions are identical (equal ``predictions_sha256``).

A malformed record (not JSON, wrong schema, missing or mistyped key) or a duplicate (the same
checkpoint, weights, val set, size and precision twice) is an error naming the file.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xvol.tools_common import (
    RecordError,
    ToolError,
    atomic_path,
    setup_tool_logging,
    tool_errors,
    validate_record,
)

log = logging.getLogger("xvol.tools.leaderboard")

OUTPUT_NAMES = ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "leaderboard.png")
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
    "num_images",
    "val_fingerprint",
    "checkpoint_sha256",
    "source_sha256",
    "predictions_sha256",
    "record",
)


def _duplicate_key(record: dict[str, Any]) -> tuple:
    return (
        record["checkpoint"]["sha256"],
        record["weights"],
        record["data"]["fingerprint"],
        record["data"]["img_size"],
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
            try:
                record = json.loads(path.read_text())
            except ValueError as err:
                raise RecordError(f"{path}: malformed record: not valid JSON ({err})") from None
            validate_record(record, path)
            key = _duplicate_key(record)
            if key in seen:
                raise RecordError(
                    f"{path}: duplicate record: same checkpoint {key[0][:12]}, weights, val set, "
                    f"image size and precision as {seen[key]}; remove one"
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
        "num_images": r["num_images"],
        "val_fingerprint": r["data"]["fingerprint"],
        "checkpoint_sha256": r["checkpoint"]["sha256"],
        "source_sha256": r["checkpoint"]["source_sha256"],
        "predictions_sha256": r["predictions_sha256"],
        "record": path.name,
        "record_path": str(path),
    }


def _same_eval(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["val_fingerprint"], a["img_size"]) == (b["val_fingerprint"], b["img_size"])


def baseline_pairs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each X-volution row with the best baseline row of its backbone on the same val set."""
    pairs = []
    for x in rows:
        if not x["xvolution"]:
            continue
        candidates = [
            b for b in rows if not b["xvolution"] and b["arch"] == x["arch"] and _same_eval(x, b)
        ]
        if not candidates:
            continue
        # prefer the same form and weights, then the best top-1
        base = max(
            candidates,
            key=lambda b: (b["form"] == x["form"], b["weights"] == x["weights"], b["top1"]),
        )
        pairs.append({"x": x, "base": base, **_deltas(x, base)})
    return pairs


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


# ----------------------------------------------------------------------------- rendering


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def _signed(value: float | None, spec: str = "+.2f") -> str:
    return "-" if value is None else format(value, spec)


def tables(rows: Sequence[dict[str, Any]], bpairs: list, dpairs: list) -> list[dict[str, Any]]:
    """The three tables as {title, header, rows (strings), note}; markdown and HTML render them."""
    main = {
        "title": f"Leaderboard ({len(rows)} records, by top-1)",
        "header": [
            "#",
            "model",
            "form",
            "weights",
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
                ("json", r.get("record_link", r["record"])),
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
                f"{p['x']['model']} ({p['x']['form']}, {p['x']['weights']})",
                f"{p['base']['model']} ({p['base']['form']}, {p['base']['weights']})",
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
    return [main, base, deploy]


def _md_cell(cell: str | tuple[str, str]) -> str:
    """A cell; a (text, href) pair becomes a link (the record file, relative to the output)."""
    if isinstance(cell, tuple):
        return f"[{cell[0]}]({cell[1]})"
    return cell.replace("|", "\\|")


def to_markdown(tabs: list[dict[str, Any]]) -> str:
    out = []
    for i, t in enumerate(tabs):
        out.append(f"{'##' if i == 0 else '###'} {t['title']}\n")
        if t["rows"]:
            out.append("| " + " | ".join(t["header"]) + " |")
            out.append("|" + "|".join("---" for _ in t["header"]) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t["rows"])
        if t["note"]:
            out.append(f"_{t['note']}_")
        out.append("")
    return "\n".join(out)


def to_html(tabs: list[dict[str, Any]], png_name: str) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>xvol leaderboard</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin-bottom:2em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:nth-child(2){text-align:left}</style></head><body>",
    ]
    for i, t in enumerate(tabs):
        tag = "h2" if i == 0 else "h3"
        parts.append(f"<{tag}>{html.escape(t['title'])}</{tag}>")
        if t["rows"]:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t["header"]))
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
    parts.append(f'<img src="{html.escape(png_name)}" alt="top-1 vs GMACs, params, img/s">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in CSV_COLUMNS})
    return buf.getvalue()


def plot(rows: Sequence[dict[str, Any]], bpairs: list, dpairs: list, path: Path) -> None:
    """Top-1 against GMACs, parameters and throughput; baseline pairs joined by dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = (
        ("gmacs", "GMACs (per image)"),
        ("param_count", "parameters (M)"),
        ("infer_samples_per_sec", "throughput (img/s)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=100)
    style = {
        (True, "train"): {"marker": "o", "color": "tab:red"},
        (True, "deploy"): {"marker": "D", "color": "tab:orange"},
        (False, "train"): {"marker": "s", "color": "tab:blue"},
        (False, "deploy"): {"marker": "P", "color": "tab:cyan"},
    }
    labels = {
        (True, "train"): "X-volution (training form)",
        (True, "deploy"): "X-volution (deploy)",
        (False, "train"): "baseline",
        (False, "deploy"): "baseline (deploy)",
    }
    for ax, (key, xlabel) in zip(axes, axes_spec):
        shown = [r for r in rows if r[key] is not None]
        for group, st in style.items():
            pts = [r for r in shown if (r["xvolution"], r["form"]) == group]
            if pts:
                ax.scatter(
                    [r[key] for r in pts],
                    [r["top1"] for r in pts],
                    s=48,
                    label=labels[group],
                    alpha=0.85,
                    **st,
                )
        for r in shown:
            ax.annotate(
                f"{r['model']}{' ema' if r['weights'] == 'ema' else ''}"
                f"{' (deploy)' if r['form'] == 'deploy' else ''}",
                (r[key], r["top1"]),
                textcoords="offset points",
                xytext=(4, -10 if r["form"] == "deploy" else 4),
                fontsize=7,
            )
        for p in bpairs:
            a, b = p["x"], p["base"]
            if a[key] is not None and b[key] is not None:
                ax.plot([b[key], a[key]], [b["top1"], a["top1"]], "--", color="gray", lw=0.8)
        ax.ticklabel_format(axis="both", useOffset=False, style="plain")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        if not shown:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def build_leaderboard(
    results_dir: str | Path = "results",
    out_dir: str | Path | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Validate the records, then write leaderboard.{md,csv,html,png}; returns paths + markdown."""
    records = load_records(results_dir, skip_bad)
    out = Path(out_dir) if out_dir is not None else Path(results_dir)
    rows = sorted(
        (_row(p, r) for p, r in records),
        key=lambda r: (-r["top1"], r["model"], r["form"] != "train"),
    )
    for r in rows:
        r["record_link"] = os.path.relpath(r["record_path"], out)
    bpairs, dpairs = baseline_pairs(rows), deploy_pairs(rows)
    tabs = tables(rows, bpairs, dpairs)
    markdown = to_markdown(tabs)
    paths = {name.rsplit(".", 1)[1]: out / name for name in OUTPUT_NAMES}
    plot(rows, bpairs, dpairs, paths["png"])
    for key, text in (
        ("md", markdown),
        ("csv", to_csv(rows)),
        ("html", to_html(tabs, paths["png"].name)),
    ):
        with atomic_path(paths[key]) as tmp:
            tmp.write_text(text)
    return {
        "records": len(rows),
        "baseline_pairs": len(bpairs),
        "deploy_pairs": len(dpairs),
        "files": {k: str(v) for k, v in paths.items()},
        "markdown": markdown,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol-leaderboard",
        description=(
            "Aggregate eval records (tools/eval.py) into leaderboard.md/.csv/.html and a PNG of "
            "top-1 vs GMACs, params and throughput; X-volution models are paired with their "
            "baselines and deploy checkpoints with their training form. Prints the markdown."
        ),
        epilog=(
            "examples:\n"
            "  xvol-leaderboard\n"
            "  xvol-leaderboard --results-dir results --out-dir site/\n"
            "  xvol-leaderboard --skip-bad"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results-dir", default="results", help="where the records are")
    parser.add_argument("--out-dir", help="where the leaderboard files go (default: results dir)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed/duplicate records (warn) instead of failing",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    with tool_errors("xvol-leaderboard", args.debug):
        result = build_leaderboard(args.results_dir, args.out_dir, args.skip_bad)
    print(result["markdown"])
    log.info("wrote %s", ", ".join(result["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
