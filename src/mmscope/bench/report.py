"""The leaderboard written out: ``leaderboard.csv``, ``leaderboard.json`` and an HTML page
with a plot of every metric (methods ranked, 95% intervals, the baselines marked)."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmscope.metrics.base import MetricResult
from mmscope.report.html import write_page

#: A method whose maps keep this rank correlation after full randomisation fails the check.
SANITY_THRESHOLD = 0.5


def table(results: Sequence[MetricResult]) -> list[dict[str, Any]]:
    """One row per (method, metric): ``method, metric, mean, ci, n, category,
    higher_is_better``."""
    return [r.to_dict() for r in results]


def failing_sanity(results: Sequence[MetricResult]) -> list[str]:
    """Methods whose maps barely change when the model is randomised (Adebayo et al.)."""
    return sorted(
        r.method for r in results if r.metric == "randomisation" and r.mean > SANITY_THRESHOLD
    )


def _figure(rows: list[dict[str, Any]]) -> str:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    cols = min(3, len(metrics)) or 1
    lines = -(-len(metrics) // cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * lines))
    axes = fig.subplots(lines, cols, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        mine = [r for r in rows if r["metric"] == metric and r["mean"] is not None]
        mine.sort(key=lambda r: r["mean"], reverse=not mine[0]["higher_is_better"])
        y = range(len(mine))
        means = [r["mean"] for r in mine]
        lo = [r["mean"] - (r["ci"][0] if r["ci"][0] is not None else r["mean"]) for r in mine]
        hi = [(r["ci"][1] if r["ci"][1] is not None else r["mean"]) - r["mean"] for r in mine]
        colours = ["#999999" if r["method"] in ("random", "oracle") else "#4c72b0" for r in mine]
        ax.barh(list(y), means, xerr=[lo, hi], color=colours)
        ax.set_yticks(list(y), [r["method"] for r in mine], fontsize=7)
        arrow = "higher is better" if mine[0]["higher_is_better"] else "lower is better"
        ax.set_title(f"{metric} ({arrow})", fontsize=9)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_leaderboard(
    results: Sequence[MetricResult], out_dir: str | Path, info: dict[str, Any]
) -> Path:
    """Write the CSV, JSON and HTML leaderboard into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table(results)
    with (out / "leaderboard.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["method", "metric", "mean", "ci_low", "ci_high", "n", "category", "higher_is_better"]
        )
        for r in rows:
            writer.writerow(
                [
                    r["method"],
                    r["metric"],
                    r["mean"],
                    *r["ci"],
                    r["n"],
                    r["category"],
                    r["higher_is_better"],
                ]
            )
    failing = failing_sanity(results)
    (out / "leaderboard.json").write_text(
        json.dumps({**info, "rows": rows, "fails_sanity": failing}, indent=1) + "\n"
    )
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = {(r["method"], r["metric"]): r for r in rows}
    return write_page(
        out / "leaderboard.html",
        "leaderboard.html",
        info=info,
        metrics=metrics,
        methods=methods,
        cells=cells,
        failing=failing,
        figure=_figure(rows) if rows else "",
    )
