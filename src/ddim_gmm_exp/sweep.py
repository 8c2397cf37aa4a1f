"""Sweep summaries: every multirun ends in summary.csv, summary.md and summary.png.

    python scripts/summarize.py multirun/sample/2026-11-27_09-00-00   # rebuild after the fact

Each job's results.json becomes a row; the plot shows each metric against steps, one line per
(sampler, eta, variant, K, scale, guidance), averaged over seeds with min-max bars where seeds vary.
A sweep over GMM variants also gets the paper's reporting (Tables 7-8, Fig. 1): paper.md, one
table per (guidance, eta) with the best scale s per (variant, steps) cell next to its value, and
paper.png, the FID against steps, one panel per eta.
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
    "variant",
    "n_components",
    "gmm_scale",
    "conditional",
    "guidance_scale",
    "steps",
    "seed",
]


# per job: E||x_s - m||^2 / D over steps, its excess over DDIM's sigma^2, the clipped fraction
ACCOUNT_COLUMNS = ["injected_per_dim", "extra_per_dim", "gmm_clipped_fraction"]


def collect_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """One flat row per job's results.json under sweep_dir, in job order."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("**/results.json"), key=lambda p: _job_key(p, sweep_dir)):
        result = json.loads(path.read_text())
        row = {"job": str(path.parent.relative_to(sweep_dir))}
        row |= {k: result.get(k) for k in ["model", *KEY_COLUMNS]}
        row |= result.get("metrics", {})
        account = result.get("variance_account") or {}
        row |= {
            "injected_per_dim": account.get("injected_per_dim"),
            "extra_per_dim": account.get("extra_per_dim"),
            "gmm_clipped_fraction": result.get("gmm_clipped_fraction"),
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
    fixed = {"job", "model", "_only_model", "images_per_second", "overrides", *ACCOUNT_COLUMNS, *KEY_COLUMNS}
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in fixed and k not in names and isinstance(row[k], int | float)]
    return names


def series_label(row: dict[str, Any]) -> str:
    """Everything that tells jobs apart but the seed (jobs that differ only in seed are averaged)."""
    label = f"{row['sampler']} eta={row['eta']}"
    if row.get("n_components") is not None:
        label += f" {row.get('variant')} K={row['n_components']}"
    if row.get("gmm_scale") is not None:  # a GMM's or a control's offset size
        label += f" s={row['gmm_scale']}"
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
    columns = ["job", "model", *KEY_COLUMNS, *metrics, *ACCOUNT_COLUMNS, "images_per_second", "overrides"]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(summary_markdown(rows, metrics))
    plot_summary(rows, metrics, sweep_dir / "summary.png")
    written = [sweep_dir / name for name in ("summary.csv", "summary.md", "summary.png")]
    if any(row.get("gmm_scale") is not None for row in rows):  # a GMM or a control in the sweep
        metric = primary_metric(metrics)
        (sweep_dir / "paper.md").write_text(paper_markdown(rows, metric))
        plot_paper(rows, metric, sweep_dir / "paper.png")
        written += [sweep_dir / "paper.md", sweep_dir / "paper.png"]
    return written


def summary_markdown(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """One table per metric (series x steps, mean +- std over seeds), the variance account, then
    every metric in one table."""
    account = ""
    if any(isinstance(r.get("extra_per_dim"), int | float) for r in rows):
        account = (
            "Variance account: E||x_s - m||^2 / D - sigma^2, the second moment a sampler injects beyond "
            "DDIM's Gaussian, per coordinate, mean over steps (measured on the samples' own steps).\n\n"
            + pivot_markdown(rows, "extra_per_dim").replace("lower is better; ", "")
        )
    return "\n".join(pivot_markdown(rows, m) for m in metrics) + "\n" + account + "\n" + long_markdown(rows, metrics)


def pivot_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    """``metric``: one row per series, one column per step count, mean +- std over seeds."""
    series = aggregate(rows, metric)
    steps = sorted({p[0] for points in series.values() for p in points})
    seeds = max((p[4] for points in series.values() for p in points), default=1)
    spread = "mean ± std over seeds" if seeds > 1 else "one seed"
    lines = [
        f"**{metric}** ({better_direction(metric)}; {spread})",
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


HIGHER_IS_BETTER = ("accuracy", "modes_covered", "entropy", "confidence", "clip", "inception_score", "precision")


def better_direction(metric: str) -> str:
    """'higher is better' for accuracies, coverage, CLIP and IS; 'lower is better' for distances."""
    return "higher is better" if any(k in metric.lower() for k in HIGHER_IS_BETTER) else "lower is better"


def varying_metrics(rows: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """The metrics that differ between jobs (a constant panel says nothing)."""
    varying = []
    for metric in metrics:
        values = {round(float(r[metric]), 12) for r in rows if isinstance(r.get(metric), int | float)}
        if len(values) > 1:
            varying.append(metric)
    return varying


def plot_summary(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    """Each varying metric against steps, one line per series, each with its own colour, marker
    and dash pattern (dashed: unconditional); bars span min-max over seeds where seeds vary."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = varying_metrics(rows, metrics) or metrics[:1] or ["(no metric)"]
    cols = min(3, len(shown))
    rows_n = math.ceil(len(shown) / cols)
    labels = sorted({series_label(r) for r in rows})
    legend_rows = math.ceil(len(labels) / 2)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n + 0.17 * legend_rows + 0.8), squeeze=False)
    markers = "osD^v<>pPX*h"
    style = {
        label: dict(
            color=plt.cm.tab10(i % 10),
            marker=markers[(i // 10 + i) % len(markers)],
            linestyle="--" if label.endswith("uncond") else ("-", "-.", ":")[i // 10 % 3],
        )
        for i, label in enumerate(labels)
    }
    seeds = max((p[4] for m in shown for pts in aggregate(rows, m).values() for p in pts), default=1)
    for ax, metric in zip(axes.flat, shown, strict=False):
        values = []
        for label, points in aggregate(rows, metric).items():
            # clamped: the mean of equal values can round a hair past them
            errors = [[max(p[1] - p[2], 0.0) for p in points], [max(p[3] - p[1], 0.0) for p in points]]
            values += [p[3] for p in points] + [p[2] for p in points]
            ax.errorbar(
                [p[0] for p in points], [p[1] for p in points], yerr=errors, capsize=3, label=label, **style[label]
            )
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        steps = sorted({r["steps"] for r in rows if isinstance(r.get("steps"), int)})
        ax.set_xticks(steps, [str(st) for st in steps])
        ax.set_xlabel("steps")
        ax.set_ylabel(metric)
        spread = f"mean over {seeds} seeds, bars min-max" if seeds > 1 else "one seed"
        ax.set_title(f"{metric} ({better_direction(metric)})\n{spread}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    bottom = (0.17 * legend_rows + 0.3) / fig.get_figheight()  # room for the legend, right under the panels
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, bottom), ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- paper format

VARIANT_ORDER = ["DDIM", "DDIM_NOISE", "RFIM", "RFIM_NOISE", "RAND", "ORTHO", "ORTHO-VUB", "ORTHO-VUB*"]


def primary_metric(metrics: list[str]) -> str:
    """The metric the paper reports: the first FID-like one (lower is better), else the first."""
    return next((m for m in metrics if "fid" in m.lower()), metrics[0] if metrics else "fid")


def setting_label(row: dict[str, Any]) -> str:
    """Guidance setting of a row: conditional with its CFG scale, or unconditional."""
    if row.get("conditional") is False:
        return "unconditional"
    return f"conditional, CFG {row.get('guidance_scale')}"


def _variant_key(variant: str) -> tuple[int, str]:
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER), variant)


def best_scale_cells(rows: list[dict[str, Any]], metric: str) -> dict[tuple, tuple[float, float | None, Any, int]]:
    """(setting, eta, variant, K, steps) -> (mean, std, best s, n_seeds): over seeds, then the s with
    the lowest mean (the paper reports the best s per cell)."""
    by_scale: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if isinstance(row.get(metric), int | float):
            key = (setting_label(row), row["eta"], row.get("variant") or "DDIM", row.get("n_components"), row["steps"])
            by_scale[(*key, row.get("gmm_scale"))].append(float(row[metric]))
    cells: dict[tuple, tuple[float, float | None, Any, int]] = {}
    for (*key, scale), values in by_scale.items():
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        key = tuple(key)
        if key not in cells or mean < cells[key][0]:
            cells[key] = (mean, std, scale, len(values))
    return cells


def paper_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    """One table per (guidance setting, eta): variants x steps, "mean ± std (s=best)", best in bold."""
    cells = best_scale_cells(rows, metric)
    seeds = max((c[3] for c in cells.values()), default=1)
    spread = "mean ± std over seeds" if seeds > 1 else "one seed"
    lines = [f"# {metric}, {better_direction(metric)} ({spread}; best scale s per cell, as the paper reports)", ""]
    for setting in sorted({k[0] for k in cells}):
        for eta in sorted({k[1] for k in cells if k[0] == setting}):
            keys = [k for k in cells if k[0] == setting and k[1] == eta]
            steps = sorted({k[4] for k in keys})
            series = sorted({(k[2], k[3]) for k in keys}, key=lambda v: (_variant_key(v[0]), v[1] or 0))
            best = {st: min(cells[k][0] for k in keys if k[4] == st) for st in steps}
            lines += [
                f"**{setting}, eta = {eta}**",
                "",
                "| sampler | " + " | ".join(f"{st} steps" for st in steps) + " |",
            ]
            lines.append("|---|" + "---|" * len(steps))
            for variant, k in series:
                name = variant if k is None else f"{variant} (K={k})"
                row_cells = []
                for st in steps:
                    cell = cells.get((setting, eta, variant, k, st))
                    row_cells.append("" if cell is None else _paper_cell(cell, cell[0] == best[st]))
                lines.append(f"| {name} | " + " | ".join(row_cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _paper_cell(cell: tuple[float, float | None, Any, int], is_best: bool) -> str:
    mean, std, scale, _ = cell
    text = f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
    if is_best:
        text = f"**{text}**"
    return text if scale is None else f"{text} (s={scale:g})"


def plot_paper(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """The paper's Fig. 1 layout: metric against steps, one panel per eta (one row per guidance
    setting), one line per variant at its best s for each step count, std bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = best_scale_cells(rows, metric)
    settings = sorted({k[0] for k in cells})
    etas = sorted({k[1] for k in cells})
    fig, axes = plt.subplots(
        len(settings), len(etas), figsize=(4 * len(etas), 3.4 * len(settings) + 0.8), squeeze=False
    )
    series = sorted({(k[2], k[3]) for k in cells}, key=lambda v: (_variant_key(v[0]), v[1] or 0))
    markers = "osD^v<>pPX*h"
    for r, setting in enumerate(settings):
        for c, eta in enumerate(etas):
            ax = axes[r][c]
            for j, (variant, k) in enumerate(series):
                points = sorted((key[4], cell) for key, cell in cells.items() if key[:4] == (setting, eta, variant, k))
                if not points:
                    continue
                ax.errorbar(
                    [p[0] for p in points],
                    [p[1][0] for p in points],
                    yerr=[p[1][1] or 0.0 for p in points],
                    marker=markers[j % len(markers)],
                    capsize=3,
                    color=plt.cm.tab10(j % 10),
                    label=variant if k is None else f"{variant} (K={k})",
                )
            ax.set_xscale("log")
            steps = sorted({key[4] for key in cells})
            ax.set_xticks(steps, [str(st) for st in steps])
            ax.minorticks_off()
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            ax.set_title(f"{setting}, eta = {eta}", fontsize=9)
            ax.set_xlabel("steps")
            ax.set_ylabel(f"{metric} (lower is better)")
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


class SummaryCallback(Callback):
    """Hydra callback: at the end of every multirun, write the sweep's summary files."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        written = write_summary(config.hydra.sweep.dir)
        if written:
            log.info("sweep summary: %s", ", ".join(str(p) for p in written))
