"""The leaderboard's views: markdown, HTML, CSV and one PNG per val set.

Every field of a record is text from outside, and each renderer escapes it for its own syntax:
HTML text and attributes (html.escape); a markdown cell as one line with link, image, HTML and
emphasis syntax backslash-escaped; a CSV cell a spreadsheet would evaluate (= + - @, a leading
tab or CR) prefixed with '; matplotlib text with ``$`` escaped (no mathtext). A link goes only
to a record file found on disk, as a percent-encoded relative path (:func:`record_href`).

Markdown and HTML render the same :class:`Section` objects (:func:`sections`), so both pages
always hold the same tables and notes.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from xvol.formats.files import atomic_path
from xvol.results.table import Row, SeedComparison, SeedGroup, ValSet, group_by

__all__ = [
    "CSV_COLUMNS",
    "Link",
    "Section",
    "Table",
    "Top1Chart",
    "plot",
    "plot_name",
    "record_href",
    "sections",
    "to_csv",
    "to_html",
    "to_markdown",
    "top1_chart",
    "verdict",
]

log = logging.getLogger(__name__)

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
# Decimals of the CSV's numbers (timm's results keep 3).
_CSV_DECIMALS = {
    "top1": 3,
    "top1_err": 3,
    "top5": 3,
    "top5_err": 3,
    "param_count": 3,
    "gmacs": 4,
    "infer_samples_per_sec": 1,
}


class Link(NamedTuple):
    """A table cell that links: ``href`` is :func:`record_href`'s checked relative path."""

    text: str
    href: str


Cell = str | Link


@dataclass(frozen=True)
class Table:
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    note: str | None  # printed once, under the table


@dataclass(frozen=True)
class Section:
    """One val set as the pages show it."""

    id: str
    title: str
    records: int
    tables: tuple[Table, ...]
    plot_name: str


def plot_name(vs: ValSet) -> str:
    return f"leaderboard_{vs.id}.png"


PLOT_NAME = re.compile(r"leaderboard_[0-9a-f]{8}\.png")  # what plot_name writes


# ----------------------------------------------------------------------------- links


def record_href(record: Path, out: Path) -> str | None:
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


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def _signed(value: float | None, spec: str = "+.2f") -> str:
    return "-" if value is None else format(value, spec)


def _seed(row: Row) -> str:
    return "" if row.seed is None else f", seed {row.seed}"


def _span(c: SeedComparison) -> str:
    return f"[{c.diff.lo:+.2f}, {c.diff.hi:+.2f}]"


def verdict(c: SeedComparison) -> str | None:
    """A comparison with an interval in one plain sentence naming its form and backend (None
    below 2 paired seeds: :func:`paired_note` says that once for all of them)."""
    if c.diff.n < 2 or c.diff.mean is None:
        return None
    x, base = c.x.first, c.base.first
    pair = f"{x.model} ({x.form}, {c.backend}) vs {base.model} ({base.form})"
    if c.diff.contains_zero:
        return (
            f"{pair}: the 95% interval of the top-1 difference, {_span(c)} points over "
            f"{c.diff.n} seeds, contains zero: these seeds do not show a difference between them."
        )
    better = "better" if c.diff.mean > 0 else "worse"
    return (
        f"{pair}: {x.model} is {better} by {c.diff.mean:+.2f} points of top-1 "
        f"(95% interval {_span(c)}, {c.diff.n} seeds paired)."
    )


def paired_note(comparisons: Sequence[SeedComparison]) -> str:
    """The seed-paired table's note: one verdict per comparison with an interval, and the
    caveat about too few seeds once, however many comparisons it applies to."""
    if not comparisons:
        return (
            "no X-volution record with a baseline record of the same backbone, recipe, weights "
            "and eval settings (records without a recipe: checkpoints that store no training "
            "config)"
        )
    sentences = [s for s in map(verdict, comparisons) if s is not None]
    few = sum(c.diff.n < 2 for c in comparisons)
    if few:
        sentences.append(
            f"{few} of {len(comparisons)} comparison(s) pair fewer than 2 seeds (no interval): "
            "at least 2 are needed for an interval, and one seed can decide the sign by chance."
        )
    return " ".join(dict.fromkeys(sentences))  # each sentence once


def tables(vs: ValSet, links: Mapping[Path, str | None]) -> tuple[Table, ...]:
    """One val set's tables: ranked, seeds, seed-paired, baseline pairs, deploy pairs.
    ``links``: record path -> :func:`record_href` (None: not linked)."""
    rows = vs.rows
    ranked = Table(
        title=f"Leaderboard ({len(rows)} records, by top-1)",
        header=(
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
        ),
        rows=tuple(
            (
                str(i + 1),
                r.model,
                r.form,
                r.weights,
                r.backend,
                _fmt(r.seed),
                _fmt(r.top1, ".2f"),
                _fmt(r.top5, ".2f"),
                _fmt(r.param_count, ".2f"),
                _fmt(r.gmacs, ".3f"),
                _fmt(r.infer_samples_per_sec, ".1f"),
                _fmt(r.infer_batch_size),
                _fmt(r.infer_precision),
                _fmt(r.infer_device),
                str(r.num_images),
                r.checkpoint_sha256[:12],
                Link("json", href) if (href := links.get(r.record_path)) else "json",
            )
            for i, r in enumerate(rows)
        ),
        note=None,
    )
    bpairs = sorted(vs.baseline_pairs, key=lambda p: p.backend)  # a backend's rows together
    base = Table(
        title="X-volution vs baseline (same backbone, same val set and backend)",
        header=(
            "backend",
            "model",
            "baseline",
            "top-1",
            "baseline top-1",
            "Δ top-1",
            "Δ top-5",
            "Δ params (M)",
            "Δ GMACs",
            "img/s ratio",
        ),
        rows=tuple(
            (
                p.backend,
                f"{p.x.model} ({p.x.form}, {p.x.weights}{_seed(p.x)})",
                f"{p.base.model} ({p.base.form}, {p.base.weights}{_seed(p.base)})",
                _fmt(p.x.top1, ".2f"),
                _fmt(p.base.top1, ".2f"),
                _signed(p.delta.top1),
                _signed(p.delta.top5),
                _signed(p.delta.params_m),
                _signed(p.delta.gmacs, "+.3f"),
                _fmt(p.delta.speed_ratio, ".2f"),
            )
            for p in bpairs
        ),
        note=None if bpairs else "no baseline record of the same backbone on the same val set",
    )
    dpairs = sorted(vs.deploy_pairs, key=lambda p: p.backend)
    deploy = Table(
        title="Deploy vs training form (same checkpoint, weights and backend)",
        header=(
            "model",
            "weights",
            "backend",
            "seed",
            "top-1 train",
            "top-1 deploy",
            "Δ top-1",
            "identical predictions",
            "params (M) train → deploy",
            "img/s train",
            "img/s deploy",
            "speedup",
        ),
        rows=tuple(
            (
                p.deploy.model,
                p.deploy.weights,
                p.backend,
                _fmt(p.deploy.seed),
                _fmt(p.train.top1, ".2f"),
                _fmt(p.deploy.top1, ".2f"),
                _signed(p.delta.top1),
                "yes" if p.identical else "NO",
                f"{p.train.param_count:.3f} → {p.deploy.param_count:.3f}",
                _fmt(p.train.infer_samples_per_sec, ".1f"),
                _fmt(p.deploy.infer_samples_per_sec, ".1f"),
                _fmt(p.delta.speed_ratio, ".2f"),
            )
            for p in dpairs
        ),
        note=None if dpairs else "no deploy record with its training-form record",
    )
    groups = vs.groups
    seeds = Table(
        title="Seeds (same model, recipe, form, weights and eval: mean over seeds)",
        header=("model", "form", "weights", "backend", "n", "seeds", "top-1 mean", "std"),
        rows=tuple(
            (
                g.first.model,
                g.first.form,
                g.first.weights,
                g.first.backend,
                str(g.n),
                ", ".join(map(str, g.seeds)) + (" + ?" * bool(g.unseeded)),
                _fmt(g.mean, ".2f"),
                _fmt(g.std, ".2f"),
            )
            for g in groups
        ),
        note=(
            "one record per model and recipe: no spread to report; train more seeds "
            "(seed=0,1,2) to see how much of a difference is chance"
            if all(g.n < 2 for g in groups)
            else None
        ),
    )
    comparisons = sorted(vs.comparisons, key=lambda c: c.backend)
    paired = Table(
        title="X-volution vs baseline, paired by seed (same recipe and backend; 95% t-interval)",
        header=(
            "backend",
            "model",
            "baseline",
            "seeds",
            "mean top-1",
            "baseline mean",
            "Δ top-1 mean",
            "Δ std",
            "95% interval",
        ),
        rows=tuple(
            (
                c.backend,
                f"{c.x.first.model} ({c.x.first.form})",
                f"{c.base.first.model} ({c.base.first.form})",
                ", ".join(map(str, c.seeds)) or "-",
                _fmt(c.x.mean, ".2f"),
                _fmt(c.base.mean, ".2f"),
                _signed(c.diff.mean),
                _fmt(c.diff.std, ".2f"),
                _span(c) if c.diff.lo is not None else "-",
            )
            for c in comparisons
        ),
        note=paired_note(comparisons),
    )
    return (ranked, seeds, paired, base, deploy)


def _title(vs: ValSet) -> str:
    dirs = vs.val_dirs
    where = dirs[0] if len(dirs) == 1 else f"{len(dirs)} copies" if dirs else "?"
    first = vs.rows[0]
    return f"Val set {vs.id}: {where} ({first.num_images} images, {first.num_classes} classes)"


def sections(sets: Sequence[ValSet], links: Mapping[Path, str | None]) -> list[Section]:
    return [
        Section(vs.id, _title(vs), len(vs.rows), tables(vs, links), plot_name(vs)) for vs in sets
    ]


def _summary(secs: Sequence[Section]) -> str:
    n = sum(s.records for s in secs)
    return (
        f"{n} records on {len(secs)} val set(s). Records on different val sets (data "
        "fingerprint) are never ranked or compared together."
    )


# ----------------------------------------------------------------------------- markdown

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


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, Link):
        return f"[{_md_text(cell.text)}]({cell.href})"
    return _md_text(cell)


def to_markdown(secs: Sequence[Section]) -> str:
    out = [f"# xvol leaderboard\n\n{_md_text(_summary(secs))}\n"]
    for s in secs:
        out.append(f"## {_md_text(s.title)}\n")
        for t in s.tables:
            out.append(f"### {_md_text(t.title)}\n")
            if t.rows:
                out.append("| " + " | ".join(t.header) + " |")
                out.append("|" + "|".join("---" for _ in t.header) + "|")
                out.extend("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows)
            if t.note:
                out.append(f"_{_md_text(t.note)}_")
            out.append("")
        out.append(f"![top-1 on {s.id}]({s.plot_name})\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------- HTML


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, Link):
        return f'<a href="{html.escape(cell.href)}">{html.escape(cell.text)}</a>'
    return html.escape(cell)


def to_html(secs: Sequence[Section]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>xvol leaderboard</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin-bottom:2em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:nth-child(2){text-align:left}img{max-width:100%}</style>"
        "</head><body>",
        "<h1>xvol leaderboard</h1>",
        f"<p>{html.escape(_summary(secs))}</p>",
    ]
    for s in secs:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        for t in s.tables:
            parts.append(f"<h3>{html.escape(t.title)}</h3>")
            if t.rows:
                parts.append(
                    "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
                )
                for r in t.rows:
                    parts.append("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>")
                parts.append("</table>")
            if t.note:
                parts.append(f"<p><em>{html.escape(t.note)}</em></p>")
        parts.append(f'<img src="{html.escape(s.plot_name)}" alt="top-1 on {html.escape(s.id)}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- CSV

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


def _csv_value(row: Row, column: str) -> Any:
    value = getattr(row, column)
    if column in _CSV_DECIMALS and value is not None:
        value = round(value, _CSV_DECIMALS[column])
    return _csv_cell(value)


def to_csv(rows: Sequence[Row]) -> str:
    """One line per record, timm's results columns first."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_value(r, k) for k in CSV_COLUMNS})
    return buf.getvalue()


# ----------------------------------------------------------------------------- PNG

# The top-1 bars start at 0: a bar's length is its value, so a 0.65-point gap looks like one.
# The numbers are written on the bars, and the error bars (± std over seeds) show whether a gap
# is larger than the spread of seeds.
TOP1_AXIS = (0.0, 100.0)


@dataclass(frozen=True)
class Top1Chart:
    """What the PNG draws, as numbers: one bar per seed group (best first), mean top-1 with its
    std over seeds (0 for one seed), and the axis with its stated baseline."""

    labels: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    ns: tuple[int, ...]
    xvolution: tuple[bool, ...]
    forms: tuple[str, ...]
    xlim: tuple[float, float]
    xlabel: str
    values: tuple[str, ...]  # the text on each bar


def _plain(text: str) -> str:
    """Text for matplotlib as text: ``$...$`` would be parsed as mathtext (and may not parse)."""
    return " ".join(text.split()).replace("$", r"\$")


def _label(g: SeedGroup) -> str:
    r = g.first
    seeds = f" · seeds {','.join(map(str, g.seeds))}" if g.seeds else ""
    return _plain(f"{r.model} · {r.form} · {r.weights} · {r.backend}{seeds}")


def top1_chart(groups: Sequence[SeedGroup]) -> Top1Chart:
    if not groups:
        raise ValueError("no seed group to plot")
    stds = tuple(g.std or 0.0 for g in groups)
    return Top1Chart(
        labels=tuple(_label(g) for g in groups),
        means=tuple(g.mean for g in groups),
        stds=stds,
        ns=tuple(g.n for g in groups),
        xvolution=tuple(g.first.xvolution for g in groups),
        forms=tuple(g.first.form for g in groups),
        xlim=TOP1_AXIS,
        xlabel=(
            f"top-1 (%), bars from {TOP1_AXIS[0]:g}: mean over seeds, error bars ± std "
            "(n = 1: no error bar)"
        ),
        values=tuple(
            f"{g.mean:.2f} ± {s:.2f} (n={g.n})" if g.n >= 2 else f"{g.mean:.2f}"
            for g, s in zip(groups, stds)
        ),
    )


def plot(vs: ValSet, path: Path) -> None:
    """One val set: mean top-1 per seed group as horizontal bars from 0 with ± std error bars
    (labels on the y axis, one per line, so they cannot overlap), and top-1 against GMACs with
    one legend entry per model and form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    chart = top1_chart(vs.groups)
    n = len(chart.means)
    order = list(reversed(range(n)))  # best at the top
    height = max(3.2, 0.32 * n + 1.6)
    fig, (bars, scatter) = plt.subplots(
        1, 2, figsize=(14, height), dpi=100, gridspec_kw={"width_ratios": [3, 2]}
    )

    def colour(i: int) -> tuple:  # X-volution red, baseline blue; deploy paler
        return to_rgba(
            "tab:red" if chart.xvolution[i] else "tab:blue",
            1.0 if chart.forms[i] == "train" else 0.55,
        )

    y = range(n)
    bars.barh(
        y,
        [chart.means[i] for i in order],
        xerr=[chart.stds[i] for i in order],
        color=[colour(i) for i in order],
        error_kw={"capsize": 3, "elinewidth": 1},
    )
    bars.set_yticks(list(y), [chart.labels[i] for i in order], fontsize=8)
    bars.set_xlim(*chart.xlim)
    for pos, i in enumerate(order):  # the number inside the bar's end, where it always fits
        inside = chart.means[i] > 30.0
        bars.text(
            chart.means[i] - 1.0 if inside else chart.means[i] + chart.stds[i] + 1.0,
            pos,
            chart.values[i],
            va="center",
            ha="right" if inside else "left",
            fontsize=7,
            color="white" if inside else "black",
        )
    bars.set_xlabel(chart.xlabel, fontsize=8)
    bars.grid(axis="x", alpha=0.3)
    markers = {"train": "o", "deploy": "D"}
    cmap = plt.get_cmap("tab10")
    models = sorted({g.first.model for g in vs.groups})
    by_model = group_by(vs.groups, lambda g: (g.first.model, g.first.form))
    for (model, form), members in by_model.items():
        scatter.errorbar(
            [g.first.gmacs for g in members],
            [g.mean for g in members],
            yerr=[g.std or 0.0 for g in members],
            fmt=markers[form],
            color=cmap(models.index(model) % 10),
            markersize=6,
            capsize=3,
            alpha=0.85,
            label=_plain(f"{model} ({form})"),
        )
    scatter.set_xlabel("GMACs per image (mean ± std over seeds)")
    scatter.set_ylabel("top-1 (%), zoomed axis", fontsize=8)
    scatter.grid(alpha=0.3)
    scatter.ticklabel_format(axis="both", useOffset=False, style="plain")
    scatter.legend(fontsize=7, loc="best")
    fig.suptitle(_plain(_title(vs)), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
