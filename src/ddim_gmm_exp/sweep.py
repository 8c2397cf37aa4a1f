"""Sweep summaries: every multirun ends in summary.csv, summary.md and summary.png.

    python scripts/summarize.py multirun/sample/2026-11-27_09-00-00   # rebuild after the fact

Each job's results.json becomes a row; the plot shows each metric against steps, one line per
(sampler, eta, n_components, moments), averaged over seeds with min-max bars where seeds vary.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

KEY_COLUMNS = [
    "sampler",
    "eta",
    "n_components",
    "moments",
    "gmm_scale",
    "conditional",
    "guidance_scale",
    "steps",
    "seed",
]


def collect_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """One flat row per job's results.json under sweep_dir, in job order."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("**/results.json"), key=lambda p: _job_key(p, sweep_dir)):
        result = json.loads(path.read_text())
        row = {"job": str(path.parent.relative_to(sweep_dir))}
        row |= {k: result.get(k) for k in ["model", *KEY_COLUMNS]}
        row |= result.get("metrics", {})
        row |= {
            "images_per_second": result.get("images_per_second"),
            "overrides": " ".join(result.get("overrides", [])),
        }
        rows.append(row)
    models = {row["model"] for row in rows}
    for row in rows:  # name the model in a series only when the sweep has several
        row["_only_model"] = next(iter(models)) if len(models) == 1 else None
    return rows


def _job_key(path: Path, sweep_dir: Path) -> tuple:
    parts = path.parent.relative_to(sweep_dir).parts
    return tuple(int(p) if p.isdigit() else p for p in parts)


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    fixed = {"job", "model", "_only_model", "images_per_second", "overrides", *KEY_COLUMNS}
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in fixed and k not in names and isinstance(row[k], int | float)]
    return names


def series_label(row: dict[str, Any]) -> str:
    """Everything that tells jobs apart but the seed (jobs that differ only in seed are averaged)."""
    label = f"{row['sampler']} eta={row['eta']}"
    if row.get("n_components") is not None:
        label += f" K={row['n_components']} {row['moments']}"
        if row.get("gmm_scale") not in (None, 1.0):
            label += f" scale={row['gmm_scale']}"
    if row.get("guidance_scale") not in (None, 1.0, 0.0) and row.get("conditional") is not False:
        label += f" cfg={row['guidance_scale']}"
    if row.get("model") is not None and row.get("model") != row.get("_only_model"):
        label = f"{row['model']}: {label}"
    if row.get("conditional") is False:
        label += " uncond"
    return label


def aggregate(rows: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float, float, float, int]]]:
    """label -> [(steps, mean, min, max, n_seeds)], over the jobs that differ only in seed."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        if isinstance(row.get(metric), int | float):
            groups[(series_label(row), row["steps"])].append(float(row[metric]))
    series: dict[str, list] = defaultdict(list)
    for (label, steps), values in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean = sum(values) / len(values)
        series[label].append((steps, mean, min(values), max(values), len(values)))
    return dict(series)


def write_summary(sweep_dir: str | Path) -> list[Path]:
    """summary.csv, summary.md and summary.png in sweep_dir; returns their paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect_results(sweep_dir)
    if not rows:
        log.warning("no results.json under %s: no summary written", sweep_dir)
        return []
    metrics = metric_names(rows)
    columns = ["job", "model", *KEY_COLUMNS, *metrics, "images_per_second", "overrides"]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(summary_markdown(rows, metrics))
    plot_summary(rows, metrics, sweep_dir / "summary.png")
    return [sweep_dir / name for name in ("summary.csv", "summary.md", "summary.png")]


def summary_markdown(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """One table per metric (series x steps, mean +- std over seeds), then every metric in one table."""
    return "\n".join(pivot_markdown(rows, m) for m in metrics) + "\n" + long_markdown(rows, metrics)


def pivot_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    """``metric``: one row per series, one column per step count, mean +- std over seeds."""
    series = aggregate(rows, metric)
    steps = sorted({p[0] for points in series.values() for p in points})
    lines = [
        f"**{metric}** (mean ± std over seeds)",
        "",
        f"| series | {' | '.join(f'{s} steps' for s in steps)} |",
        "|---|" + "---|" * len(steps),
    ]
    for label in sorted(series):
        cells = {}
        for step in steps:
            values = [
                float(r[metric])
                for r in rows
                if series_label(r) == label and r["steps"] == step and isinstance(r.get(metric), int | float)
            ]
            cells[step] = _mean_std(values)
        lines.append(f"| {label} | {' | '.join(cells[s] for s in steps)} |")
    return "\n".join(lines) + "\n"


def long_markdown(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """Mean +- std over seeds for every (series, steps), one table."""
    lines = [f"| series | steps | {' | '.join(metrics)} | seeds |", "|---|---|" + "---|" * (len(metrics) + 1)]
    by_key: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        by_key[(series_label(row), row["steps"])].append(row)
    for (label, steps), group in sorted(by_key.items()):
        cells = []
        for m in metrics:
            values = [float(r[m]) for r in group if isinstance(r.get(m), int | float)]
            cells.append(_mean_std(values))
        lines.append(f"| {label} | {steps} | {' | '.join(cells)} | {len(group)} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.4g} ± {std:.2g}"


def plot_summary(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    """Each metric against steps, one line per series (dashed: unconditional), min-max bars over seeds."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics or ["(no metric)"]
    cols = min(3, len(metrics))
    rows_n = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n + 1.5), squeeze=False)
    labels = sorted({series_label(r) for r in rows})
    colors = {label: plt.cm.tab20(i % 20) for i, label in enumerate(labels)}
    for ax, metric in zip(axes.flat, metrics, strict=False):
        values = []
        for label, points in aggregate(rows, metric).items():
            steps = [p[0] for p in points]
            means = [p[1] for p in points]
            errors = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
            values += [p[3] for p in points] + [p[2] for p in points]
            ax.errorbar(
                steps,
                means,
                yerr=errors,
                marker="o",
                capsize=3,
                label=label,
                color=colors[label],
                linestyle="--" if label.endswith("uncond") else "-",
            )
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("steps")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, max(1, len(names))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(names) / 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


class SummaryCallback(Callback):
    """Hydra callback: at the end of every multirun, write the sweep's summary files."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        written = write_summary(config.hydra.sweep.dir)
        if written:
            log.info("sweep summary: %s", ", ".join(str(p) for p in written))
