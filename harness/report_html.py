"""A run's report: heatmap.png (architectures x tiers, coloured by status) and index.html
(run, summary, changes since the previous run with regressions first, heatmap, per-model
results, and the supported-models table). Both are drawn from the matrix only."""
from __future__ import annotations

import html
import sys
from collections import Counter
from pathlib import Path

from harness.docs import STYLE, build_document, render_html_fragment
from harness.matrix import CHANGE_KINDS, STATUSES, Matrix, MatrixDiff, ModelResult
from harness.results import TIERS

HEATMAP_FILE = "heatmap.png"
INDEX_FILE = "index.html"
STATUS_COLORS = {"pass": "#2e7d32", "fail": "#c62828", "error": "#6a1b9a", "skip": "#f9a825",
                 "untested": "#e0e0e0"}
_REPORT_STYLE = """
tr.regression { background: #ffcdd2; font-weight: bold; }
tr.newly-failing { background: #ffebee; } tr.newly-passing { background: #e8f5e9; }
table.plain { border-collapse: collapse; } table.plain td, table.plain th { border: 1px solid #ccc; padding: 2px 6px; }
small.reason { color: #555; display: block; max-width: 40em; }
img.heatmap { max-width: 100%; }
"""


def write_heatmap(matrix: Matrix, path: Path) -> bool:
    """Draws the heatmap; False (and a warning) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import to_rgb
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        print("litmus matrix: matplotlib is not installed, so there is no heatmap", file=sys.stderr)
        return False
    rows = matrix.rows
    cells = [[to_rgb(STATUS_COLORS[row.tiers[tier].status]) for tier in TIERS] for row in rows]
    # A figure of its own on the Agg canvas: no pyplot state, no display needed.
    figure = Figure(figsize=(8, 1.5 + 0.15 * len(rows)), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.imshow(cells, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(TIERS)), [tier.capitalize() for tier in TIERS])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)), [row.label for row in rows], fontsize=6)
    # White lines between cells, so neighbouring cells of one colour stay countable.
    ax.set_xticks([x + 0.5 for x in range(len(TIERS) - 1)], minor=True)
    ax.set_yticks([y + 0.5 for y in range(len(rows) - 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_title(f"Litmus matrix, run {matrix.run.id}", fontsize=9)
    ax.legend(handles=[Patch(color=color, label=status) for status, color in STATUS_COLORS.items()],
              loc="upper center", bbox_to_anchor=(0.5, 0), ncol=len(STATUS_COLORS), frameon=False, fontsize=7)
    figure.savefig(path, bbox_inches="tight")
    return True


def render_index(matrix: Matrix, diff: MatrixDiff | None, heatmap: bool, files: list[str]) -> str:
    """index.html; `files` are the run directory's other files, linked from the top."""
    body = [
        f"<h1>Litmus matrix: run {html.escape(matrix.run.id)}</h1>",
        _run_section(matrix, files),
        _summary_section(matrix),
        _diff_section(diff),
        "<h2>Heatmap</h2>",
        f"<img class=\"heatmap\" src=\"{HEATMAP_FILE}\" alt=\"architectures x tiers, coloured by status\">"
        if heatmap else "<p>Not drawn: matplotlib is not installed.</p>",
        _models_section(matrix),
        "<h2>Supported models table</h2>",
        render_html_fragment(build_document(matrix)),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Litmus matrix {html.escape(matrix.run.id)}</title>\n<style>{STYLE}{_REPORT_STYLE}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _run_section(matrix: Matrix, files: list[str]) -> str:
    rows = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>"
                   for key, value in vars(matrix.run).items())
    links = " · ".join(f"<a href=\"{html.escape(f)}\">{html.escape(f)}</a>" for f in files)
    return f"<table class=\"plain\">{rows}</table>\n<p>Files: {links}</p>"


def _summary_section(matrix: Matrix) -> str:
    head = "".join(f"<th>{s}</th>" for s in STATUSES)
    lines = []
    for tier in TIERS:
        counts = Counter(row.tiers[tier].status for row in matrix.rows)
        lines.append(f"<tr><th>{tier}</th>" + "".join(f"<td>{counts[s]}</td>" for s in STATUSES) + "</tr>")
    levels = Counter(row.level or "none" for row in matrix.rows)
    level_text = ", ".join(f"{level} {levels[level]}" for level in ("none", *TIERS) if levels[level])
    return (f"<h2>Summary ({len(matrix.rows)} rows)</h2>\n<table class=\"plain\"><tr><th>tier</th>{head}</tr>"
            + "".join(lines) + f"</table>\n<p>Level (highest tier passed with all lower tiers passed): "
            f"{level_text}.</p>")


def _diff_section(diff: MatrixDiff | None) -> str:
    if diff is None:
        return "<h2>Changes</h2>\n<p>No previous published run to compare with.</p>"
    counts = ", ".join(f"{len(diff.of_kind(kind))} {kind}" for kind in CHANGE_KINDS)
    title = f"<h2>Changes since run {html.escape(diff.old_id)}</h2>\n<p>{counts}.</p>"
    if not diff.changes:
        return title
    ordered = [c for kind in CHANGE_KINDS for c in diff.of_kind(kind)]
    rows = "".join(
        f"<tr class=\"{c.kind.replace(' ', '-')}\"><td>{c.kind}</td><td>{html.escape(c.row)}</td>"
        f"<td>{html.escape(c.model or '(all models)')}</td><td>{c.tier}</td><td>{c.old}</td><td>{c.new}</td></tr>"
        for c in ordered)
    return (f"{title}\n<table class=\"plain\"><tr><th>kind</th><th>row</th><th>model</th><th>tier</th><th>old</th>"
            f"<th>new</th></tr>{rows}</table>")


def _models_section(matrix: Matrix) -> str:
    lines = []
    for row in matrix.rows:
        for model in row.models:
            cells = "".join(_model_cell(row.tiers[tier].models.get(model)) for tier in TIERS)
            lines.append((model, row.label, f"<tr><td>{html.escape(model)}</td><td>{html.escape(row.label)}</td>"
                                            f"{cells}</tr>"))
    if not lines:
        return "<h2>Models</h2>\n<p>No result records.</p>"
    head = "".join(f"<th>{tier}</th>" for tier in TIERS)
    return (f"<h2>Models</h2>\n<table class=\"plain\"><tr><th>model</th><th>row</th>{head}</tr>"
            + "".join(line for _, _, line in sorted(lines)) + "</table>")


def _model_cell(result: ModelResult | None) -> str:
    if result is None:
        return "<td class=\"status status-untested\">untested</td>"
    reason = f"<small class=\"reason\">{html.escape(result.reason)}</small>" if result.reason else ""
    return f"<td class=\"status status-{result.status}\">{result.status}{reason}</td>"
