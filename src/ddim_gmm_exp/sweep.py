"""Sweep summaries: every multirun ends in summary.csv, summary.md and summary.png.

    python scripts/summarize.py multirun/sample/2026-11-27_09-00-00   # rebuild after the fact

Each job's results.json becomes a row. A series is every job that shares all the settings that
differ between the jobs (results.json's ``settings``) but the seed and the step count: its label
is the readable "sampler eta variant K s cfg" plus ``key=value`` for every other differing setting.
Each seed counts once per (series, x). The x axis (``summary.x``, x_axis) is the step count, or
the NFE (model evaluations per sample) where the jobs had an NFE budget (``nfe=N``) or samplers
that differ in evaluations per step. The plot shows each metric against x, one line per series,
averaged over seeds with min-max bars where seeds vary. A sweep over GMM variants also gets the
paper's reporting (Tables 7-8, Fig. 1): paper.md, one table per (guidance, eta) with the best scale
s per (variant, x) cell, chosen on the seeds every s of the cell has, next to its value, and
paper.png, the primary metric (``summary.metric``) against x, one panel per eta, ± std bars. A
sampler without eta (a baseline) is in every eta table of its guidance; a cell whose budget's
steps made fewer evaluations than the column says shows them ("[19 NFE]").

Jobs of one data.seed start from the same noise, so both .md files also give each series' (each
paper cell's) difference from a reference sampler (``summary.reference``; DDIM, or RFIM for flows)
paired by seed: mean ± std of the per-seed differences and a percentile-bootstrap interval over
seeds, * where it excludes 0 (pandas groupby/pivot/to_markdown, scipy.stats.bootstrap); a cell of
one seed whose two runs saved their features, a paired bootstrap over their samples instead.
``summary.select_on`` chooses paper.md's s on some seeds, reports the others and states the
selection effect. docs/runner.md defines each.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from ddim_gmm_exp.config import calls_per_evaluation
from ddim_gmm_exp.errors import ConfigError

if TYPE_CHECKING:  # pandas and scipy load where a summary is written, not where a run starts
    import pandas as pd

log = logging.getLogger(__name__)

# results.json's top-level description of a job: the only one older runs (without "settings") have
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
# the dotted setting each of them stands for, so that older runs are told apart the same way
LEGACY_SETTINGS = {
    "model": "model.name",
    "sampler": "sampler.name",
    "eta": "sampler.eta",
    "variant": "variant",
    "n_components": "gmm.n_components",
    "gmm_scale": "gmm.scale",
    "conditional": "conditional",
    "guidance_scale": "sampler.guidance_scale",
    "steps": "sampler.steps",
    "seed": "data.seed",
}
SEED_KEY, STEPS_KEY, SCALE_KEY = "data.seed", "sampler.steps", "gmm.scale"
NFE_KEY = "nfe"  # an NFE budget places a job on x like its steps do: neither tells series apart
# settings the readable labels already say (the variant name is made of the GMM's construction
# flags), in the order they are named where the readable part hides a difference (_unique_labels)
SAID_BY_LABEL = (
    "model.name",
    "sampler.name",
    "sampler.guidance_scale",
    "sampler.eta",
    "gmm.n_components",
    "gmm.scale",
    "gmm.construction",
    "gmm.orthonormal",
    "gmm.upper_bound_vars",
    "gmm.share_across_steps",
    "sampler.function",
    "variant",
    "conditional",
)

# per job: E||x_s - m||^2 / D over steps, its excess over DDIM's sigma^2, the clipped fraction
ACCOUNT_COLUMNS = ["injected_per_dim", "extra_per_dim", "gmm_clipped_fraction"]
MISSING_MARK = "†"  # a cell with fewer seeds than its table


# ----------------------------------------------------------------------------------- rows


X_AXES = ("steps", "nfe")
X_UNITS = {"steps": "steps", "nfe": "NFE"}


def collect_results(sweep_dir: Path, x: str | None = None) -> list[dict[str, Any]]:
    """One flat row per job's results.json under sweep_dir, in job order, each with its summary
    series ("series"), its paper series, its x value ("x": steps or NFE, x_axis) and, for a repeated
    seed, the job it repeats ("duplicate_of")."""
    sweep_dir = Path(sweep_dir)
    paths = sorted(sweep_dir.glob("**/results.json"), key=lambda p: _job_key(p, sweep_dir))
    rows = [_result_row(path, sweep_dir) for path in paths]
    axis = x_axis(rows, x)
    for row in rows:
        row["_x_unit"] = X_UNITS[axis]
        # at equal NFE a job is placed at its budget (nfe=N); the tables say where fewer ran
        row["x"] = row["steps"] if axis == "steps" else (row.get("nfe_budget") or row.get("nfe"))
    models = {row["model"] for row in rows}
    for row in rows:  # name the model in a series only when the sweep has several
        row["_only_model"] = next(iter(models)) if len(models) == 1 else None
    summary = series_labels(rows, {SEED_KEY, STEPS_KEY, NFE_KEY}, _readable_label)
    paper = series_labels(rows, {SEED_KEY, STEPS_KEY, NFE_KEY, SCALE_KEY}, _paper_name, _paper_context)
    for row, label, paper_label in zip(rows, summary, paper, strict=True):
        row["series"], row["_paper_series"] = label, paper_label
    mark_duplicates(rows)
    return rows


def check_x_axis(x: Any) -> None:
    """summary.x is steps, nfe or null (runs check it before sampling, the summaries again)."""
    if x is not None and x not in X_AXES:
        raise ConfigError(f"summary.x={x!r} is not allowed: choose one of {', '.join(X_AXES)} or null")


def x_axis(rows: list[dict[str, Any]], requested: str | None = None) -> str:
    """What the summaries put on x (summary.x): "steps" or "nfe"; None: NFE when the jobs had an
    NFE budget (nfe=N) or their samplers differ in model evaluations per step, else steps."""
    if requested is not None:
        check_x_axis(requested)
        if requested == "nfe" and any(row.get("nfe") is None for row in rows):
            raise ConfigError("summary.x='nfe' needs nfe in every results.json (older runs lack it): use steps")
        return requested
    if any(row.get("nfe") is None for row in rows):
        return "steps"
    if any(row.get("nfe_budget") is not None for row in rows):
        return "nfe"
    per_step = {row["nfe"] / row["steps"] / _calls_per_evaluation(row) for row in rows if row.get("steps")}
    return "nfe" if len(per_step) > 1 else "steps"


def _calls_per_evaluation(row: dict[str, Any]) -> int:
    # older rows may lack "conditional": a guided scale on them counts as guided, as the run did
    return calls_per_evaluation(row.get("guidance_scale") or 1.0, row.get("conditional") is not False)


def x_value(row: dict[str, Any]) -> Any:
    """The row's x (collect_results sets it); its steps for a row built by hand."""
    return row.get("x", row.get("steps"))


def x_unit(rows: list[dict[str, Any]]) -> str:
    """ "steps" or "NFE", as collect_results chose for these rows."""
    return rows[0].get("_x_unit", "steps") if rows else "steps"


def _result_row(path: Path, sweep_dir: Path) -> dict[str, Any]:
    result = json.loads(path.read_text())
    settings = result.get("settings")
    row: dict[str, Any] = {"job": str(path.parent.relative_to(sweep_dir))}
    row |= {k: result.get(k) for k in ["model", *KEY_COLUMNS]}
    if isinstance(settings, dict):  # the top-level seed and steps are copies of these
        row["seed"] = row["seed"] if row["seed"] is not None else settings.get(SEED_KEY)
        row["steps"] = row["steps"] if row["steps"] is not None else settings.get(STEPS_KEY)
    row |= result.get("metrics", {})
    account = result.get("variance_account") or {}
    row |= {
        "injected_per_dim": account.get("injected_per_dim"),
        "extra_per_dim": account.get("extra_per_dim"),
        "gmm_clipped_fraction": result.get("gmm_clipped_fraction"),
        "images_per_second": result.get("images_per_second"),
        "nfe": result.get("nfe"),  # model evaluations per sample (older runs: absent)
        "nfe_budget": result.get("nfe_budget"),  # nfe=N of the run, if it had one
        "overrides": " ".join(result.get("overrides", [])),
        "duplicate_of": None,
        # older results.json files lack "settings": their top-level keys are all they say
        "_recorded": isinstance(settings, dict),
        "_settings": settings if isinstance(settings, dict) else {v: row[k] for k, v in LEGACY_SETTINGS.items()},
        # where the run's saved features are, for the interval over samples of a one-seed cell
        "_dir": str(path.parent),
        "_features": {k: v for k, v in result.items() if k in SAMPLE_KEYS or _FEATURES_FILE.fullmatch(k)},
        "_wandb": result.get("wandb"),  # the job's W&B run (dashboard.wandb_record): the summary run joins its group
    }
    return row


def _job_key(path: Path, sweep_dir: Path) -> tuple:
    # numbered folders in number order; (0, n) / (1, name) so that "0" next to "controls" compares
    parts = path.parent.relative_to(sweep_dir).parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    fixed = {"job", "model", "series", "images_per_second", "nfe", "nfe_budget", "x", "overrides", "duplicate_of"}
    fixed |= {*ACCOUNT_COLUMNS, *KEY_COLUMNS}
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in fixed and not k.startswith("_") and k not in names and _is_number(row[k])]
    return names


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------- series

_MISSING = object()  # a setting a job does not have (the GMM's keys for a sampler without one)


@dataclass(frozen=True)
class _Series:
    """What one series is: its readable name, where it is shown (a paper table) and the value of
    every setting that differs between the jobs; rows with equal _Series differ only in the
    excluded settings (seed, steps)."""

    context: tuple
    name: str
    recorded: bool
    settings: tuple[tuple[str, Any], ...]


def differing_settings(rows: list[dict[str, Any]], exclude: Iterable[str] = ()) -> list[str]:
    """The setting keys whose values are not the same in every row (absent counts as a value)."""
    keys = sorted({k for row in rows for k in row["_settings"]} - set(exclude))
    return [k for k in keys if len({_hashable(row["_settings"].get(k, _MISSING)) for row in rows}) > 1]


def _hashable(value: Any) -> Any:
    # the contract is JSON scalars; a list or dict that slipped through compares as its JSON text
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def series_labels(
    rows: list[dict[str, Any]],
    exclude: set[str],
    name: Callable[[dict[str, Any]], str],
    context: Callable[[dict[str, Any]], tuple] = lambda row: (),
) -> list[str]:
    """One label per row: two rows (in one context) share it exactly when they share ``name`` and
    every setting that differs between the jobs but the excluded ones. Jobs with and without
    recorded settings are compared among their own kind (their keys are not the same)."""
    differing = {
        flag: differing_settings([r for r in rows if r["_recorded"] is flag], exclude) for flag in (True, False)
    }
    series = [
        _Series(
            context(row),
            name(row),
            row["_recorded"],
            tuple((k, _hashable(row["_settings"].get(k, _MISSING))) for k in differing[row["_recorded"]]),
        )
        for row in rows
    ]
    labels = _unique_labels(set(series))
    return [labels[s] for s in series]


def _unique_labels(series: set[_Series]) -> dict[_Series, str]:
    """name + key=value for each setting the name does not say that takes two values; where two
    series would still read the same (a difference the name hides, or a setting one of them lacks),
    the settings they differ in are added."""
    present: dict[tuple[str, str], set] = defaultdict(set)
    for s in series:
        for k, value in s.settings:
            present[(s.name, k)] |= set() if value is _MISSING else {value}
    # a key only some jobs have (the GMM's, absent for DDIM) is said by the sampler's name, and so
    # is one that is constant under each name (a baseline's scheduler options, its spacing)
    shown = sorted({k for (_, k), values in present.items() if len(values) > 1 and k not in SAID_BY_LABEL})
    labels = {s: _label(s, shown) for s in series}
    for group in _collisions(labels):
        labels |= _reveal(group, shown)
    for group in _collisions(labels):  # left: a job without recorded settings next to one with
        for s in group:
            labels[s] += "" if s.recorded else " (settings not recorded)"
    return labels


def _reveal(group: set[_Series], shown: list[str]) -> dict[_Series, str]:
    """Labels for series that read the same: the settings they differ in are added one by one
    (names first) until the labels differ."""
    keys = {k for s in group for k, _ in s.settings} - set(shown)
    order = {k: i for i, k in enumerate(SAID_BY_LABEL)}
    revealed: list[str] = []
    for key in sorted(keys, key=lambda k: (order.get(k, len(order)), k)):
        if len({dict(s.settings).get(key, _MISSING) for s in group}) > 1:
            revealed.append(key)
            labels = {s: _label(s, shown, revealed) for s in group}
            if len(set(labels.values())) == len(group):
                break
    return {s: _label(s, shown, revealed) for s in group}


def _collisions(labels: dict[_Series, str]) -> list[set[_Series]]:
    by_label: dict[tuple, set[_Series]] = defaultdict(set)
    for s, label in labels.items():
        by_label[(s.context, label)].add(s)
    return [group for group in by_label.values() if len(group) > 1]


def _label(series: _Series, shown: list[str], revealed: Iterable[str] = ()) -> str:
    """series.name + " key=value" for the shown keys it has and every revealed key (unset if absent)."""
    values = dict(series.settings)
    pairs = [(k, values[k]) for k in shown if values.get(k, _MISSING) is not _MISSING]
    pairs += [(k, values.get(k, _MISSING)) for k in revealed]
    return series.name + "".join(f" {k}={'unset' if v is _MISSING else _text(v)}" for k, v in sorted(pairs))


def _text(value: Any) -> str:
    """A setting as a command-line override writes it (true, null, 0.5, trailing)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def series_label(row: dict[str, Any]) -> str:
    """The row's series (set by collect_results); the readable label for a row built by hand."""
    return row.get("series") or _readable_label(row)


def _readable_label(row: dict[str, Any]) -> str:
    label = str(row["sampler"]) if row.get("eta") is None else f"{row['sampler']} eta={row['eta']}"
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


# ----------------------------------------------------------------------------------- seeds


def mark_duplicates(rows: list[dict[str, Any]]) -> None:
    """A seed present twice in one (series, steps) (a repeated job) counts once: the first job in
    job order; the others get duplicate_of = that job and are left out of every table and plot."""
    first: dict[tuple, str] = {}
    for row in rows:
        key = (series_label(row), x_value(row), _hashable(row.get("seed")))
        if key in first:
            row["duplicate_of"] = first[key]
        else:
            first[key] = row["job"]


def counted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that count: one per (series, steps, seed)."""
    return [row for row in rows if not row.get("duplicate_of")]


def duplicate_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per seed that several jobs hold, naming the job that counts."""
    repeats: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("duplicate_of"):
            repeats[row["duplicate_of"]].append(row)
    by_job = {row["job"]: row for row in rows}
    return [
        f"seed {by_job[job]['seed']} of {series_label(by_job[job])} at {x_value(by_job[job])} {x_unit(rows)} is in "
        f"jobs {', '.join([job, *(r['job'] for r in dups)])}: counted once (job {job})"
        for job, dups in repeats.items()
    ]


def seed_values(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, Any], dict[Any, float]]:
    """(series, x) -> {seed: value} over the counted jobs that have the metric."""
    values: dict[tuple[str, Any], dict[Any, float]] = defaultdict(dict)
    for row in counted(rows):
        if _is_number(row.get(metric)):
            values[(series_label(row), x_value(row))][_hashable(row.get("seed"))] = float(row[metric])
    return dict(values)


def _seed_order(seed: Any) -> tuple:
    return (0, seed, "") if _is_number(seed) else (1, 0, str(seed))


def _seed_list(seeds: Iterable[Any]) -> str:
    return ", ".join(str(s) for s in sorted(seeds, key=_seed_order))


def _seeds_text(seeds: Iterable[Any]) -> str:
    """ "seed 0" or "seeds 1, 2"."""
    seeds = list(seeds)
    return f"seed{'s' if len(seeds) > 1 else ''} {_seed_list(seeds)}"


def missing_seeds(cells: dict[Any, set]) -> dict[Any, set]:
    """cell -> the seeds it lacks that another cell of its table has (for the cells that lack any):
    such a cell has fewer seeds than the table's most complete one, or other seeds than it."""
    every = set().union(*cells.values()) if cells else set()
    return {key: every - seeds for key, seeds in cells.items() if every - seeds}


def _footnote(lines: list[str]) -> list[str]:
    return [f"{MISSING_MARK} {'; '.join(lines)}", ""] if lines else []


# ----------------------------------------------------------------------------------- summary


def aggregate(rows: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[Any, float, float, float, int]]]:
    """label -> [(steps, mean, min, max, n_seeds)], over the jobs that differ only in seed."""
    series: dict[str, list] = defaultdict(list)
    for (label, steps), by_seed in sorted(seed_values(rows, metric).items(), key=lambda kv: kv[0]):
        values = list(by_seed.values())
        series[label].append((steps, _mean(values), min(values), max(values), len(values)))
    return dict(series)


def write_summary(
    sweep_dir: str | Path,
    metric: str | None = None,
    x: str | None = None,
    reference: str | None = None,
    select_on: Any = None,
    wandb_mode: str | None = None,
) -> list[Path]:
    """summary.csv, summary.md, summary.png and compare.png in sweep_dir, and for a sweep with GMM
    (or control) jobs paper.md and paper.png on ``metric`` (None: the first FID-like one); returns
    their paths. ``x`` is the x axis (summary.x: steps, nfe; None: x_axis decides). The tables give
    each series' paired difference from ``reference`` (summary.reference; None: DDIM or RFIM);
    ``select_on`` (summary.select_on: seeds) chooses paper.md's s on those seeds and reports the
    others. Where the jobs logged to W&B, all of it also goes to one more W&B run in their group
    (dashboard.log_summary_run), in ``wandb_mode`` (offline, online, disabled; None: the jobs' mode).
    An unknown metric, axis, reference, selection seed or mode raises ConfigError before anything
    is written."""
    from ddim_gmm_exp import dashboard

    check_summary_options(reference, select_on)
    check_wandb_mode(wandb_mode)
    sweep_dir = Path(sweep_dir)
    rows = collect_results(sweep_dir, x)
    if not rows:
        log.warning("no results.json under %s: no summary written", sweep_dir)
        return []
    metrics = metric_names(rows)
    primary = primary_metric(metrics, metric)
    selection = check_summary_options(reference, select_on, sweep_seeds(rows))
    if wandb_mode in ("offline", "online") and not any(row["_wandb"] for row in rows):
        raise ConfigError(
            f"W&B mode {wandb_mode!r} given, but no job under {sweep_dir} logged to W&B (their logger was csv or "
            "none, or they ran before results.json recorded it): there is no group for a summary run"
        )
    paired = find_reference(rows, reference)
    notes = duplicate_notes(rows)
    for note in notes:
        log.warning("duplicate jobs: %s", note)
    write_csv(rows, metrics, sweep_dir / "summary.csv")
    (sweep_dir / "summary.md").write_text(summary_markdown(rows, metrics, paired))
    plot_summary(rows, metrics, sweep_dir / "summary.png")
    written = [sweep_dir / name for name in ("summary.csv", "summary.md", "summary.png")]
    if any(row.get("gmm_scale") is not None for row in rows):  # a GMM or a control in the sweep
        fallback = metric_fallback(metrics, metric)
        if fallback:
            log.warning("%s", fallback)
        (sweep_dir / "paper.md").write_text(paper_markdown(rows, primary, fallback, paired, selection))
        plot_paper(rows, primary, sweep_dir / "paper.png", selection)
        written += [sweep_dir / "paper.md", sweep_dir / "paper.png"]
    elif selection is not None:
        log.warning("summary.select_on chooses paper.md's scale s: this sweep has no GMM or control job, no paper.md")
    written += dashboard.plot_compare(rows, sweep_dir)
    target = dashboard.summary_target(rows, wandb_mode)
    if target is not None:
        dashboard.log_summary_run(sweep_dir, rows, metrics, written, target)
    return written


def check_wandb_mode(mode: Any) -> None:
    """The summary run's W&B mode (summarize.py --wandb): offline, online, disabled or None."""
    from ddim_gmm_exp.dashboard import WANDB_MODES

    if mode is not None and mode not in WANDB_MODES:
        raise ConfigError(f"W&B mode {mode!r} is not allowed: choose one of {', '.join(WANDB_MODES)}")


def summary_records(rows: list[dict[str, Any]], metrics: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """summary.csv's columns and one record per job (repeated seeds too, with duplicate_of), the
    differing settings as columns; the W&B summary run's results table is the same."""
    settings = differing_settings([r for r in rows if r["_recorded"]], {SEED_KEY, STEPS_KEY, NFE_KEY})
    columns = [
        "job",
        "series",
        "model",
        *KEY_COLUMNS,
        *settings,
        *metrics,
        *ACCOUNT_COLUMNS,
        "nfe",
        "nfe_budget",
        "images_per_second",
        "duplicate_of",
        "overrides",
    ]
    records = []
    for row in rows:
        recorded = row["_settings"] if row["_recorded"] else {}
        record = row | {k: recorded.get(k) for k in settings}
        records.append({k: record.get(k) for k in columns})
    return columns, records


def write_csv(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    """summary.csv: summary_records, one line per job."""
    columns, records = summary_records(rows, metrics)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def summary_markdown(rows: list[dict[str, Any]], metrics: list[str], reference: Reference | None = None) -> str:
    """One table per metric (series x steps, mean +- std over seeds, n seeds), each followed by the
    series' paired differences from the ``reference`` (difference_markdown), the variance account,
    then every metric in one table; repeated seeds are named at the end."""
    account = ""
    if any(_is_number(r.get("extra_per_dim")) for r in rows):
        account = (
            "Variance account: E||x_s - m||^2 / D - sigma^2, the second moment a sampler injects beyond "
            "DDIM's Gaussian, per coordinate, mean over steps (measured on the samples' own steps).\n\n"
            + pivot_markdown(rows, "extra_per_dim").replace("lower is better; ", "")
        )
    tables = [pivot_markdown(rows, m) + (difference_markdown(rows, m, reference) if reference else "") for m in metrics]
    text = "\n".join(tables) + "\n" + account + "\n" + long_markdown(rows, metrics)
    return text + _duplicates_markdown(rows)


def _duplicates_markdown(rows: list[dict[str, Any]]) -> str:
    notes = duplicate_notes(rows)
    return "\nRepeated seeds (each counted once):\n\n" + "".join(f"- {n}\n" for n in notes) if notes else ""


def pivot_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    """``metric``: one row per series, per step count the mean +- std over seeds and n, the seed
    count; a cell that lacks a seed another cell has is marked and its missing seeds listed."""
    by_cell = seed_values(rows, metric)
    steps = sorted({st for _, st in by_cell})
    seeds = max((len(v) for v in by_cell.values()), default=1)
    spread = "mean ± std over seeds, n seeds" if seeds > 1 else "one seed"
    unit = x_unit(rows)
    lines = [
        f"**{metric}** ({better_direction(metric)}; {spread})",
        "",
        f"| series | {' | '.join(f'{s} {unit} | n' for s in steps)} |",
        "|---|" + "---|---|" * len(steps),
    ]
    missing = missing_seeds({k: set(v) for k, v in by_cell.items()})
    for label in sorted({lbl for lbl, _ in by_cell}):
        cells = [_summary_cell(by_cell.get((label, st)), (label, st) in missing) for st in steps]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    notes = [f"{k[0]} at {k[1]} {unit}: seeds missing: {_seed_list(v)}" for k, v in sorted(missing.items())]
    return "\n".join([*lines, "", *_footnote(notes)]).rstrip("\n") + "\n"


def _summary_cell(by_seed: dict[Any, float] | None, flagged: bool) -> str:
    if not by_seed:
        return " | "
    return f"{_mean_std(list(by_seed.values()))} | {len(by_seed)}{MISSING_MARK if flagged else ''}"


def long_markdown(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """Mean +- std over seeds for every (series, steps), one table."""
    unit = x_unit(rows)
    lines = [f"| series | {unit} | {' | '.join(metrics)} | seeds |", "|---|---|" + "---|" * (len(metrics) + 1)]
    by_key: dict[tuple[str, Any], list[dict]] = defaultdict(list)
    for row in counted(rows):
        by_key[(series_label(row), x_value(row))].append(row)
    for (label, steps), group in sorted(by_key.items()):
        cells = []
        for m in metrics:
            values = [float(r[m]) for r in group if _is_number(r.get(m))]
            cells.append(_mean_std(values))
        lines.append(f"| {label} | {steps} | {' | '.join(cells)} | {len(group)} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{_mean(values):.4g} ± {_std(values):.2g}"


def _mean(values: list[float]) -> float:
    return statistics.mean(values)  # exact: equal values average to themselves (std 0, not 1e-16)


def _std(values: list[float]) -> float | None:
    """The sample standard deviation (n - 1); None for one value."""
    return statistics.stdev(values) if len(values) > 1 else None


# a metric whose name holds one of these is higher-is-better; every other (FID, KID and kid_std,
# distances) lower-is-better
HIGHER_IS_BETTER = (
    "accuracy",
    "modes_covered",
    "entropy",
    "confidence",
    "clip",
    "inception_score",
    "precision",
    "recall",
    "density",
    "coverage",
)


def better_direction(metric: str) -> str:
    """'higher is better' for accuracies, precision, recall, density, coverage, CLIP and IS;
    'lower is better' for distances (FID, KID)."""
    return "higher is better" if any(k in metric.lower() for k in HIGHER_IS_BETTER) else "lower is better"


def best_value(values: Iterable[float], metric: str) -> float:
    """The best of values in the metric's direction (better_direction)."""
    return max(values) if better_direction(metric) == "higher is better" else min(values)


def varying_metrics(rows: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """The metrics that differ between jobs (a constant panel says nothing)."""
    varying = []
    for metric in metrics:
        values = {round(float(r[metric]), 12) for r in counted(rows) if _is_number(r.get(metric))}
        if len(values) > 1:
            varying.append(metric)
    return varying


def _figure_legend(fig: Any, axes: Iterable[Any], order: list[str], **kwargs: Any) -> None:
    """One legend entry per series drawn in any panel (not only the first), in ``order``."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    names = [label for label in order if label in handles]
    fig.legend([handles[n] for n in names], names, frameon=False, **kwargs)


def overlap_style(index: int, count: int) -> dict[str, float]:
    """Marker size and drawing order of series ``index`` of ``count``: each later series is drawn on
    top with a smaller marker, so series with equal values (DDIM and a GMM whose accuracy is 1.0 at
    every step) show as concentric markers instead of one hiding the other."""
    share = index / max(count - 1, 1)
    return {"markersize": 8.0 - 4.0 * share, "zorder": 2.0 + share}


def plot_summary(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    """Each varying metric against steps, one line per series, each with its own colour, marker
    and dash pattern (dashed: unconditional); bars span min-max over seeds where seeds vary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = varying_metrics(rows, metrics) or metrics[:1] or ["(no metric)"]
    cols = min(3, len(shown))
    rows_n = math.ceil(len(shown) / cols)
    labels = sorted({series_label(r) for r in counted(rows)})
    uncond = {series_label(r) for r in rows if r.get("conditional") is False}
    legend_rows = math.ceil(len(labels) / 2)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n + 0.17 * legend_rows + 0.8), squeeze=False)
    markers = "osD^v<>pPX*h"
    style = {
        label: dict(
            color=plt.cm.tab10(i % 10),
            marker=markers[(i // 10 + i) % len(markers)],
            linestyle="--" if label in uncond else ("-", "-.", ":")[i // 10 % 3],
            **overlap_style(i, len(labels)),
        )
        for i, label in enumerate(labels)
    }
    seeds = max((p[4] for m in shown for pts in aggregate(rows, m).values() for p in pts), default=1)
    for ax, metric in zip(axes.flat, shown, strict=False):
        _summary_panel(ax, rows, metric, style, seeds)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    bottom = (0.17 * legend_rows + 0.3) / fig.get_figheight()  # room for the legend, right under the panels
    fig.tight_layout(rect=(0, bottom, 1, 1))
    _figure_legend(fig, axes.flat, labels, loc="upper center", bbox_to_anchor=(0.5, bottom), ncol=2, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _summary_panel(ax: Any, rows: list[dict[str, Any]], metric: str, style: dict[str, dict], seeds: int) -> None:
    steps = sorted({x_value(r) for r in rows if isinstance(x_value(r), int)})
    if len(steps) == 1:  # against steps it would be one column of dots: one row per series instead
        _single_step_panel(ax, rows, metric, style, seeds, steps[0])
        return
    values = []
    for label, points in aggregate(rows, metric).items():
        # clamped: the mean of equal values can round a hair past them
        errors = [[max(p[1] - p[2], 0.0) for p in points], [max(p[3] - p[1], 0.0) for p in points]]
        values += [p[3] for p in points] + [p[2] for p in points]
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, capsize=3, label=label, **style[label])
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xticks(steps, [str(st) for st in steps])
    ax.set_xlabel(x_unit(rows))
    ax.set_ylabel(metric)
    spread = f"mean over {seeds} seeds, bars min-max over seeds" if seeds > 1 else "one seed"
    ax.set_title(f"{metric} ({better_direction(metric)})\n{spread}", fontsize=9)
    ax.grid(alpha=0.3)


def _single_step_panel(
    ax: Any, rows: list[dict[str, Any]], metric: str, style: dict[str, dict], seeds: int, steps: int
) -> None:
    """A sweep of one step count: the metric along x, one row per series (in the legend's style)."""
    for y, (label, points) in enumerate(sorted(aggregate(rows, metric).items())):
        _, mean, low, high, _ = points[0]
        errors = [[max(mean - low, 0.0)], [max(high - mean, 0.0)]]
        ax.errorbar([mean], [y], xerr=errors, capsize=3, label=label, **(style[label] | {"linestyle": "none"}))
    ax.set_yticks([])
    ax.margins(y=0.25)
    ax.invert_yaxis()  # the first series on top, as in the legend
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_xlabel(metric)
    spread = f"mean over {seeds} seeds, bars min-max over seeds" if seeds > 1 else "one seed"
    ax.set_title(f"{metric} ({better_direction(metric)}) at {steps} {x_unit(rows)}\n{spread}", fontsize=9)
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------------- paper format

VARIANT_ORDER = ["DDIM", "DDIM_NOISE", "RFIM", "RFIM_NOISE", "RAND", "ORTHO", "ORTHO-VUB", "ORTHO-VUB*"]


def primary_metric(metrics: list[str], requested: str | None = None) -> str:
    """The metric the paper format reports: ``requested`` (summary.metric, --metric), else the
    first FID-like one, else the first. An unknown requested name is refused, naming the metrics."""
    if requested is not None:
        if requested not in metrics:
            available = ", ".join(metrics) or "none"
            raise ConfigError(
                f"metric {requested!r} (summary.metric, --metric) is not among this sweep's metrics: {available}"
            )
        return requested
    return next((m for m in metrics if is_fid_like(m)), metrics[0] if metrics else "fid")


def is_fid_like(metric: str) -> bool:
    """fid, fid_digits, sd_fid: "fid" as a word of the name (classifier_confidence holds the letters)."""
    return re.search(r"(^|_)fid(_|$)", metric.lower()) is not None


def metric_fallback(metrics: list[str], requested: str | None = None) -> str:
    """The one line that says the primary metric fell back from FID, and why; "" otherwise."""
    if requested is not None or not metrics or any(is_fid_like(m) for m in metrics):
        return ""
    return (
        f"Primary metric: {metrics[0]}, the first metric, as these results have no FID-like metric "
        "(FID skipped or disabled); summary.metric or --metric chooses another."
    )


def setting_label(row: dict[str, Any]) -> str:
    """Guidance setting of a row: conditional with its CFG scale, or unconditional."""
    if row.get("conditional") is False:
        return "unconditional"
    return f"conditional, CFG {row.get('guidance_scale')}"


def _variant_key(variant: str) -> tuple[int, str]:
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER), variant)


def _paper_name(row: dict[str, Any]) -> str:
    name = row.get("variant") or "DDIM"
    return f"{row['model']}: {name}" if row.get("model") not in (None, row.get("_only_model")) else name


def _paper_context(row: dict[str, Any]) -> tuple:
    return (setting_label(row), row.get("eta"), row.get("n_components"))


def paper_series(row: dict[str, Any]) -> str:
    """The row's paper series (set by collect_results): its variant and every differing setting
    but the seed, the steps and the scale s, which each cell chooses."""
    return row.get("_paper_series") or _paper_name(row)


class PaperKey(NamedTuple):
    setting: str
    eta: Any
    series: str
    n_components: int | None
    steps: Any


class Cell(NamedTuple):
    """One paper cell: the best s's mean and std over ``seeds``, the seeds every s of it has."""

    mean: float
    std: float | None
    scale: Any
    n: int
    seeds: tuple
    note: str = ""  # how the seeds were chosen, when not the usual way
    ran: Any = None  # at equal NFE: the evaluations the jobs made, where fewer than the column's budget
    values: tuple = ()  # the value at each of ``seeds``, in that order (for paired differences)


def paper_key(row: dict[str, Any]) -> PaperKey:
    """The paper cell a row belongs to: (setting, eta, series, K, x)."""
    return PaperKey(setting_label(row), row["eta"], paper_series(row), row.get("n_components"), x_value(row))


def scale_candidates(rows: list[dict[str, Any]], metric: str) -> dict[PaperKey, dict[Any, dict[Any, float]]]:
    """paper cell -> s -> {seed: value} over the counted jobs that have the metric."""
    by_scale: dict[PaperKey, dict[Any, dict[Any, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in counted(rows):
        if _is_number(row.get(metric)):
            by_scale[paper_key(row)][row.get("gmm_scale")][_hashable(row.get("seed"))] = float(row[metric])
    return by_scale


def best_scale_cells(
    rows: list[dict[str, Any]], metric: str, select_on: Iterable[Any] | None = None
) -> dict[PaperKey, Cell]:
    """(setting, eta, series, K, steps) -> Cell: the best s per cell in the metric's direction,
    every s compared on the seeds they all have (the paper reports the best s per cell). With
    ``select_on`` (summary.select_on) s is chosen on those seeds and the cell reports the other
    seeds only; a cell that cannot be chosen so (unreported_cells says why) is left out."""
    ran: dict[PaperKey, set] = defaultdict(set)
    for row in counted(rows):
        if _is_number(row.get(metric)) and row.get("nfe_budget") is not None and row.get("nfe") != x_value(row):
            ran[paper_key(row)].add(row.get("nfe"))
    cells: dict[PaperKey, Cell] = {}
    for key, candidates in scale_candidates(rows, metric).items():
        cell = _best_scale(candidates, metric) if select_on is None else _held_out_cell(candidates, metric, select_on)
        if cell is not None:
            cells[key] = cell._replace(ran=_seed_list(ran[key]) if ran[key] else None)
    return cells


def _etas(keys: Iterable[PaperKey], setting: str) -> list[Any]:
    """The eta tables of a setting: its etas; a sampler without eta (a baseline) is in each of
    them, and in one table of its own where no job of the setting has an eta."""
    etas = {k.eta for k in keys if k.setting == setting and k.eta is not None}
    return sorted(etas) or [None]


def _in_table(key: PaperKey, setting: str, eta: Any) -> bool:
    return key.setting == setting and (key.eta == eta or key.eta is None)


def _table_title(setting: str, eta: Any) -> str:
    return setting if eta is None else f"{setting}, eta = {eta}"


def _best_scale(candidates: dict[Any, dict[Any, float]], metric: str) -> Cell:
    shared = set.intersection(*(set(by_seed) for by_seed in candidates.values()))
    # with no seed common to every s there is no fair comparison: each s is taken on its own seeds
    note = "" if shared else "no seed is common to every s: each s compared on its own seeds"
    cells = []
    for scale in sorted(candidates, key=_seed_order):
        seeds = sorted(shared or candidates[scale], key=_seed_order)
        values = [candidates[scale][s] for s in seeds]
        cells.append(Cell(_mean(values), _std(values), scale, len(values), tuple(seeds), note, values=tuple(values)))
    best = best_value((c.mean for c in cells), metric)
    return next(c for c in cells if c.mean == best)  # the smallest s among equals


def _held_out_cell(candidates: dict[Any, dict[Any, float]], metric: str, select_on: Iterable[Any]) -> Cell | None:
    """summary.select_on: s chosen on the selection seeds (as _best_scale does on all of them), its
    values on the other (held-out) seeds; None where no s ran a selection seed or the chosen s ran
    no held-out seed. A cell of one s (DDIM, a baseline) has nothing to choose: its held-out seeds."""
    selection = set(select_on)
    scale, note = next(iter(candidates)), ""
    if len(candidates) > 1:
        on_selection = {s: {k: v for k, v in by_seed.items() if k in selection} for s, by_seed in candidates.items()}
        on_selection = {s: by_seed for s, by_seed in on_selection.items() if by_seed}
        if not on_selection:
            return None
        chosen = _best_scale(on_selection, metric)
        scale = chosen.scale
        unchosen = [f"s={s:g}" for s in sorted(candidates, key=_seed_order) if s not in on_selection]
        notes = [f"choosing s: {chosen.note}"] if chosen.note else []
        notes += [f"{', '.join(unchosen)} ran no selection seed: not a candidate"] if unchosen else []
        note = "; ".join(notes)
    held = {k: v for k, v in candidates[scale].items() if k not in selection}
    if not held:
        return None
    seeds = sorted(held, key=_seed_order)
    values = [held[k] for k in seeds]
    return Cell(_mean(values), _std(values), scale, len(values), tuple(seeds), note, values=tuple(values))


def unreported_cells(rows: list[dict[str, Any]], metric: str, select_on: Iterable[Any]) -> dict[PaperKey, str]:
    """The cells best_scale_cells leaves out under summary.select_on, each with why."""
    selection = set(select_on)
    reasons = {}
    for key, candidates in scale_candidates(rows, metric).items():
        if _held_out_cell(candidates, metric, selection) is not None:
            continue
        if len(candidates) == 1:
            reasons[key] = "it ran no held-out seed"
        elif not any(selection & set(by_seed) for by_seed in candidates.values()):
            reasons[key] = f"no s of it ran a selection seed ({_seed_list(selection)})"
        else:
            reasons[key] = "the s chosen on the selection seeds ran no held-out seed"
    return reasons


def selection_effects(
    rows: list[dict[str, Any]], metric: str, select_on: Iterable[Any], cells: dict[PaperKey, Cell]
) -> dict[PaperKey, float]:
    """Per cell of more than one s, on the held-out seeds that every s of it has: how much better
    (in the metric's direction, so >= 0) the grid's best s scores there than the s chosen on the
    selection seeds (``cells``, best_scale_cells with select_on) does. It is what choosing s on the
    reported seeds themselves would flatter the cell by."""
    selection = set(select_on)
    effects = {}
    for key, candidates in scale_candidates(rows, metric).items():
        held = {s: {k: v for k, v in by_seed.items() if k not in selection} for s, by_seed in candidates.items()}
        held = {s: by_seed for s, by_seed in held.items() if by_seed}
        if key not in cells or len(held) < 2 or cells[key].scale not in held:
            continue
        shared = sorted(set.intersection(*(set(by_seed) for by_seed in held.values())), key=_seed_order)
        if shared:
            means = {s: _mean([by_seed[k] for k in shared]) for s, by_seed in held.items()}
            effects[key] = abs(best_value(means.values(), metric) - means[cells[key].scale])
    return effects


def paper_markdown(
    rows: list[dict[str, Any]],
    metric: str,
    fallback: str = "",
    reference: Reference | None = None,
    select_on: Iterable[Any] | None = None,
) -> str:
    """One table per (guidance setting, eta): variants x steps, "mean ± std (s=best)" and n seeds,
    the best of each column in bold; cells that lack a seed another cell has are marked. With a
    ``reference``, each table is followed by every variant's paired difference from it; with
    ``select_on`` (summary.select_on) s is chosen on those seeds, everything is reported on the
    others, and the selection effect (selection_effects) closes the page."""
    cells = best_scale_cells(rows, metric, select_on)
    seeds = max((c.n for c in cells.values()), default=1)
    spread = "mean ± std over seeds" if seeds > 1 else "one seed"
    chosen = "chosen on the seeds every s of the cell has" if select_on is None else "chosen on the selection seeds"
    lines = [
        f"# {metric}, {better_direction(metric)} ({spread}; best scale s per cell, as the paper reports, "
        f"{chosen}; n: seeds)",
        "",
    ]
    if select_on is not None:
        held_out = sweep_seeds(rows) - set(select_on)
        lines += [
            f"Scale s chosen on {_seeds_text(select_on)} (summary.select_on); every value, n and difference "
            f"below is over the held-out {_seeds_text(held_out)} only.",
            "",
        ]
    if fallback:
        lines += [fallback, ""]
    order = {paper_series(r): (r.get("model") or "", _variant_key(r.get("variant") or "DDIM")) for r in rows}
    differences = _paper_difference_stats(rows, metric, cells, reference, select_on)
    for setting in sorted({k.setting for k in cells}):
        for eta in _etas(cells, setting):
            table = {k: c for k, c in cells.items() if _in_table(k, setting, eta)}
            lines += _paper_table(table, metric, order, (setting, eta), x_unit(rows))
            lines += _paper_difference_block(differences, table, metric, order, (setting, eta), x_unit(rows))
    if select_on is not None:
        lines += _selection_markdown(rows, metric, select_on, cells, order)
    notes = duplicate_notes(rows)
    lines += ["Repeated seeds (each counted once): " + "; ".join(notes), ""] if notes else []
    return "\n".join(lines)


def _paper_difference_stats(
    rows: list[dict[str, Any]],
    metric: str,
    cells: dict[PaperKey, Cell],
    reference: Reference | None,
    select_on: Iterable[Any] | None,
) -> pd.DataFrame | None:
    if reference is None:
        return None
    reference_cells = best_scale_cells([r for r in rows if r["job"] in reference.jobs], metric, select_on)
    frame = paper_differences(rows, cells, reference_cells, metric)
    return None if frame.empty else difference_stats(frame, rows, metric)


def _paper_order(table: dict[PaperKey, Cell], order: dict[str, tuple]) -> dict[str, tuple]:
    """A row name of the paper's tables (variant and K) -> its place (as _paper_table sorts them)."""
    return {
        _series_name(k.series, k.n_components): (order.get(k.series, ()), k.series, k.n_components or 0) for k in table
    }


def _paper_difference_block(
    stats: pd.DataFrame | None,
    table: dict[PaperKey, Cell],
    metric: str,
    order: dict[str, tuple],
    where: tuple,
    unit: str,
) -> list[str]:
    """The paired differences of one paper table's variants from their reference, as a table."""
    title = _table_title(*where)
    if stats is None or not (stats["table"] == title).any():
        return []
    rank = _paper_order(table, order)
    stats = stats[stats["table"] == title]
    markdown = difference_table(
        stats,
        unit,
        "{:+.3f}",
        "{:.3f}",
        order=lambda k: (rank.get(k[0], ()), k[0], k[1]),
        name="sampler",
    )
    return [
        f"**{title}: {metric} minus the reference, paired by seed** "
        f"({difference_header(metric, 'variant', has_sample_intervals(stats))})",
        "",
        markdown,
        "",
    ]


def _selection_markdown(
    rows: list[dict[str, Any]],
    metric: str,
    select_on: Iterable[Any],
    cells: dict[PaperKey, Cell],
    order: dict[str, tuple],
) -> list[str]:
    """summary.select_on: the cells it leaves out, and the selection effect per cell and its mean."""
    import pandas as pd

    unit = x_unit(rows)
    lines = []
    left_out = unreported_cells(rows, metric, select_on)
    if left_out:
        notes = [
            f"{_series_name(k.series, k.n_components)} at {k.steps} {unit} ({k.setting}): {why}"
            for k, why in sorted(
                left_out.items(), key=lambda kv: (kv[0].setting, order.get(kv[0].series, ()), kv[0].series)
            )
        ]
        lines += ["Not reported (summary.select_on): " + "; ".join(notes), ""]
    effects = selection_effects(rows, metric, select_on, cells)
    title = (
        f"**Selection effect** ({metric}): per cell of more than one s, on the held-out seeds every s of it ran, "
        f"how much better the best s of the grid scores than the s chosen on {_seeds_text(select_on)} "
        f"({better_direction(metric)}, so >= 0; 0: the selection seeds chose the held-out best). Choosing s on "
        "the reported seeds themselves (the tables without summary.select_on) flatters a cell by this much."
    )
    if not effects:
        return [*lines, title, "", "No cell has more than one s with held-out seeds.", ""]
    frame = pd.DataFrame.from_records(
        [
            dict(
                table=_table_title(k.setting, k.eta), series=_series_name(k.series, k.n_components), x=k.steps, effect=e
            )
            for k, e in effects.items()
        ]
    )
    largest = frame.loc[frame["effect"].idxmax()]
    summary = (
        f"Mean over {len(frame)} cell{'s' if len(frame) > 1 else ''}: {frame['effect'].mean():.3f}; "
        f"largest {largest['effect']:.3f} "
        f"({largest['series']} at {largest['x']} {unit}, {largest['table']})."
    )
    wide = frame.assign(effect=frame["effect"].map("{:.3f}".format)).pivot(
        index=["table", "series"], columns="x", values="effect"
    )
    rank = _paper_order(cells, order)
    wide = wide.loc[sorted(wide.index, key=lambda k: (k[0], rank.get(k[1], ()), k[1]))]
    wide = wide.rename(columns=lambda x: f"{x} {unit}").fillna("").reset_index().rename(columns={"series": "sampler"})
    return [*lines, title, "", summary, "", wide.to_markdown(index=False, disable_numparse=True), ""]


def _paper_table(
    table: dict[PaperKey, Cell], metric: str, order: dict[str, tuple], where: tuple, unit: str = "steps"
) -> list[str]:
    steps = sorted({k.steps for k in table})
    series = sorted({(k.series, k.n_components) for k in table}, key=lambda v: (order.get(v[0], ()), v[0], v[1] or 0))
    best = {st: best_value((c.mean for k, c in table.items() if k.steps == st), metric) for st in steps}
    missing = missing_seeds({k: set(c.seeds) for k, c in table.items()})
    flagged = set(missing) | {k for k, c in table.items() if c.note}
    in_order = sorted(flagged, key=lambda k: (order.get(k.series, ()), k.series, k.n_components or 0, k.steps))
    notes = [_cell_note(k, table[k], missing.get(k, set()), unit) for k in in_order]
    lines = [
        f"**{_table_title(*where)}**",
        "",
        "| sampler | " + " | ".join(f"{st} {unit} | n" for st in steps) + " |",
        "|---|" + "---|---|" * len(steps),
    ]
    etas = {(key.series, key.n_components): key.eta for key in table}
    for name, k in series:
        row_cells = []
        for st in steps:
            key = PaperKey(where[0], etas[(name, k)], name, k, st)
            cell = table.get(key)
            row_cells.append(" | " if cell is None else _paper_cell(cell, cell.mean == best[st], key in flagged))
        lines.append(f"| {_series_name(name, k)} | " + " | ".join(row_cells) + " |")
    return [*lines, "", *_footnote(notes)]


def _cell_note(key: PaperKey, cell: Cell, missing: set, unit: str = "steps") -> str:
    why = ([f"seeds missing: {_seed_list(missing)}"] if missing else []) + ([cell.note] if cell.note else [])
    return f"{_cell_name(key, cell, unit)}: {'; '.join(why)}"


def _series_name(name: str, k: int | None) -> str:
    return name if k is None else f"{name} (K={k})"


def _cell_name(key: PaperKey, cell: Cell, unit: str = "steps") -> str:
    scale = "" if cell.scale is None else f" (s={cell.scale:g})"
    return f"{_series_name(key.series, key.n_components)} at {key.steps} {unit}{scale}"


def _paper_cell(cell: Cell, is_best: bool, flagged: bool = False) -> str:
    text = f"{cell.mean:.3f}" if cell.std is None else f"{cell.mean:.3f} ± {cell.std:.3f}"
    if is_best:
        text = f"**{text}**"
    text = text if cell.scale is None else f"{text} (s={cell.scale:g})"
    text = text if cell.ran is None else f"{text} [{cell.ran} NFE]"  # the budget's steps made fewer calls
    return f"{text} | {cell.n}{MISSING_MARK if flagged else ''}"


def legend_columns(names: list[str], width_inches: float) -> int:
    """How many legend columns of these names fit across a figure this wide (8 pt text: about
    0.075 inch a character, plus the marker and the gap)."""
    longest = max((len(n) for n in names), default=1)
    return max(1, min(len(names), 4, int(width_inches / (0.075 * longest + 0.6))))


def plot_paper(rows: list[dict[str, Any]], metric: str, path: Path, select_on: Iterable[Any] | None = None) -> None:
    """The paper's Fig. 1 layout: metric against steps, one panel per eta (one row per guidance
    setting), one line per variant at its best s for each step count, bars ± std over seeds (with
    ``select_on``: s chosen on those seeds, the other seeds shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = best_scale_cells(rows, metric, select_on)
    settings = sorted({k.setting for k in cells})
    etas = sorted({eta for setting in settings for eta in _etas(cells, setting)}, key=_seed_order)
    order = {paper_series(r): (r.get("model") or "", _variant_key(r.get("variant") or "DDIM")) for r in rows}
    series = sorted({(k.series, k.n_components) for k in cells}, key=lambda v: (order.get(v[0], ()), v[0], v[1] or 0))
    steps = sorted({key.steps for key in cells})
    names = [_series_name(*s) for s in series]
    width = 4 * len(etas)
    ncol = legend_columns(names, width)
    legend_height = 0.2 * math.ceil(len(names) / ncol) + 0.3
    fig, axes = plt.subplots(
        len(settings), len(etas), figsize=(width, 3.4 * len(settings) + 0.8 + legend_height), squeeze=False
    )
    for r, setting in enumerate(settings):
        for c, eta in enumerate(etas):
            _paper_panel(axes[r][c], cells, (setting, eta), series, steps, metric, x_unit(rows))
    seeds = max((cell.n for cell in cells.values()), default=1)
    spread = "mean ± std over seeds (bars)" if seeds > 1 else "one seed"
    if select_on is not None:
        held_out = sweep_seeds(rows) - set(select_on)
        spread += f"; s chosen on {_seeds_text(select_on)}, shown on {_seeds_text(held_out)}"
    fig.suptitle(f"{metric}, best s per {'step count' if x_unit(rows) == 'steps' else 'NFE'}; {spread}", fontsize=10)
    bottom = legend_height / fig.get_figheight()  # room for the legend, right under the panels
    fig.tight_layout(rect=(0, bottom, 1, 1))
    _figure_legend(fig, axes.flat, names, loc="upper center", bbox_to_anchor=(0.5, bottom), ncol=ncol, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long names: grow the canvas rather than cut them
    plt.close(fig)


def _paper_panel(
    ax: Any, cells: dict[PaperKey, Cell], table: tuple, series: list[tuple], steps: list, metric: str, unit: str
) -> None:
    import matplotlib.pyplot as plt

    markers = "osD^v<>pPX*h"
    for j, (name, k) in enumerate(series):
        points = sorted(
            (key.steps, cell)
            for key, cell in cells.items()
            if _in_table(key, *table) and (key.series, key.n_components) == (name, k)
        )
        if not points:
            continue
        ax.errorbar(
            [p[0] for p in points],
            [p[1].mean for p in points],
            yerr=[p[1].std or 0.0 for p in points],
            marker=markers[j % len(markers)],
            capsize=3,
            # tab10 while it lasts, tab20 beyond ten series (13 samplers), so no two lines share a colour
            color=plt.cm.tab10(j % 10) if len(series) <= 10 else plt.cm.tab20(j % 20),
            label=_series_name(name, k),
            **overlap_style(j, len(series)),
        )
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(st) for st in steps])
    means = [c.mean for key, c in cells.items() if _in_table(key, *table)]
    if means and min(means) > 0 and max(means) > 20 * min(means):  # a failing sampler would flatten the rest
        ax.set_yscale("log")
    ax.minorticks_off()
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_title(_table_title(*table), fontsize=9)
    ax.set_xlabel(unit)
    ax.set_ylabel(f"{metric} ({better_direction(metric)})")
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------------- paired differences

# summary.reference null: DDIM in a diffusion sweep, RFIM in a flow sweep (each job is paired with
# a reference of its own model, so a directory holding both gets both)
DEFAULT_REFERENCES = ("DDIM", "RFIM")
# the percentile bootstrap: BCa needs the jackknife's spread, which 2-3 equal differences lack
# (scipy returns nan there); with n <= 3 seeds the percentile interval is the differences' range
BOOTSTRAP_METHOD = "percentile"
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # a fresh generator per interval: the same results always give the same summary
CONFIDENCE_LEVEL = 0.95
EXCLUDES_ZERO_MARK = "*"


class Reference(NamedTuple):
    """What each series is compared with: its name (summary.reference, or the default's variants)
    and the jobs that are the reference."""

    name: str
    jobs: frozenset


def check_summary_options(reference: Any, select_on: Any, seeds: Iterable[Any] | None = None) -> tuple | None:
    """summary.reference is a variant or series name, or null; summary.select_on is null, a seed,
    or a non-empty list of seeds. Given ``seeds`` (the sweep's data.seed values), every selection
    seed must be one of them and one seed at least must be left to report. Returns the selection
    seeds as a tuple (None for null); a bad value raises ConfigError, one line naming it."""
    if reference is not None and (not isinstance(reference, str) or not reference.strip()):
        raise ConfigError(
            f"summary.reference={reference!r} is not allowed: a variant or series name (DDIM, RFIM, ORTHO, ...) or null"
        )
    if select_on is None:
        return None
    selection = tuple(select_on) if isinstance(select_on, list | tuple | ListConfig) else (select_on,)
    if not selection or not all(isinstance(s, int) and not isinstance(s, bool) for s in selection):
        raise ConfigError(
            f"summary.select_on={_option_text(select_on)} is not allowed: a list of data.seed values "
            "(e.g. [0]) that choose s, or null"
        )
    if seeds is not None:
        every = set(seeds)
        unknown = [s for s in selection if s not in every]
        if unknown:
            raise ConfigError(
                f"summary.select_on: seed {_seed_list(unknown)} is not a seed of this sweep (its seeds: "
                f"{_seed_list(every)})"
            )
        if every <= set(selection):
            raise ConfigError(
                f"summary.select_on={_option_text(select_on)} holds every seed of this sweep ({_seed_list(every)}): "
                "no seed would be left to report; leave one out at least"
            )
    return tuple(sorted(set(selection), key=_seed_order))


def _option_text(value: Any) -> str:
    return json.dumps(list(value)) if isinstance(value, list | tuple | ListConfig) else repr(value)


def sweep_seeds(rows: list[dict[str, Any]]) -> set:
    """Every data.seed the sweep's counted jobs ran."""
    return {_hashable(row.get("seed")) for row in counted(rows)}


def _variant(row: dict[str, Any]) -> str:
    return str(row.get("variant") or "DDIM")  # as the paper names it (_paper_name)


def find_reference(rows: list[dict[str, Any]], reference: str | None = None) -> Reference | None:
    """The reference jobs: those whose variant (any case), summary series or paper.md row name is
    ``reference`` (summary.reference, --reference); None: DDIM and RFIM jobs. A named reference
    the sweep lacks is refused (ConfigError naming the variants and series there are); a sweep
    without the default one gets None and one log line."""
    if reference is None:
        names = [name for name in DEFAULT_REFERENCES if any(_variant(r) == name for r in rows)]
        if not names:
            log.warning(
                "no paired differences: this sweep has no %s job (summary.reference or --reference names another "
                "reference)",
                " or ".join(DEFAULT_REFERENCES),
            )
            return None
        return Reference(" / ".join(names), frozenset(r["job"] for r in rows if _variant(r) in names))
    jobs = frozenset(
        r["job"]
        for r in rows
        if _variant(r).casefold() == reference.casefold()
        or reference in (series_label(r), paper_series(r), _series_name(paper_series(r), r.get("n_components")))
    )
    if not jobs:
        variants = sorted({_variant(r) for r in rows}, key=_variant_key)
        series = sorted({series_label(r) for r in rows})
        raise ConfigError(
            f"summary.reference={reference!r} (--reference) is not a variant or series of this sweep: variants "
            f"{', '.join(variants)}; series {'; '.join(series)}"
        )
    return Reference(reference, jobs)


def _is_sampler_setting(key: str) -> bool:
    """A setting that says which sampler ran (its name, function, scheduler, GMM), not where."""
    return key in ("variant", "sampler.name", "sampler.function") or key.startswith(("gmm.", "sampler.scheduler"))


def same_context(row: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two jobs ran in the same place, so that one can be the other's reference: the same
    model and guidance setting, and the same value of every setting both record but the seed, x
    and the sampler's own (_is_sampler_setting); a setting only one of them has (eta for a
    baseline, the GMM's) does not part them."""
    if row.get("model") != other.get("model") or setting_label(row) != setting_label(other):
        return False
    mine, theirs = row["_settings"], other["_settings"]
    shared = (mine.keys() & theirs.keys()) - {SEED_KEY, STEPS_KEY, NFE_KEY}
    return all(_hashable(mine[k]) == _hashable(theirs[k]) for k in shared if not _is_sampler_setting(k))


def seed_interval(differences: Iterable[float]) -> tuple[float, float] | None:
    """The 95% bootstrap interval over seeds of the mean difference (scipy.stats.bootstrap,
    BOOTSTRAP_METHOD, BOOTSTRAP_RESAMPLES resamples, a generator seeded BOOTSTRAP_SEED; the
    differences in seed order); None for fewer than two seeds, where there is no spread to resample."""
    return seed_intervals([list(differences)])[0]


def seed_intervals(samples: list[list[float]]) -> list[tuple[float, float] | None]:
    """seed_interval of each sample, computed in one bootstrap call per sample size: scipy draws
    the same resample indices for every row of a batch, so each interval is the one seed_interval
    gives for that sample alone (to the last bit or two of the mean's rounding)."""
    import numpy as np
    from scipy import stats

    intervals: list[tuple[float, float] | None] = [None] * len(samples)
    for size in {len(sample) for sample in samples if len(sample) > 1}:
        where = [i for i, sample in enumerate(samples) if len(sample) == size]
        result = stats.bootstrap(
            (np.asarray([samples[i] for i in where], dtype=float),),
            np.mean,
            n_resamples=BOOTSTRAP_RESAMPLES,
            confidence_level=CONFIDENCE_LEVEL,
            method=BOOTSTRAP_METHOD,
            axis=-1,
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        )
        low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
        for i, lo, hi in zip(where, low, high, strict=True):
            intervals[i] = (float(lo), float(hi))
    return intervals


# A cell of one seed: the interval over the run's samples instead (docs/runner.md). Two runs of one
# seed made sample i from the same initial noise, so each resample draws sample positions once, with
# replacement, and takes the same positions in both runs' saved features (features.npz). Only the
# metrics that are functions of those features alone, and that the naive bootstrap serves: the
# Frechet distance, precision and density (means over the generated samples of a term of each
# sample against the fixed reference). Recall and coverage are left out: they rest on the generated
# set's own k-NN radii or on its distinct members, which duplicates shrink (on 1000 digits, k=5, the
# resamples' recall averages 0.81 against the run's 0.91, coverage 0.94 against 0.98); KID too: its
# unbiased MMD^2 pairs every two generated samples, a duplicate pairs one with itself, and one
# resample costs torchmetrics' 100 subsets (~10 s for 1000 x 128 features). A numpy loop, not
# scipy.stats.bootstrap: each run's resampled values are computed once and serve every series it is
# paired with, in summary.md and paper.md alike (cached on the files).
SAMPLE_BOOTSTRAP_RESAMPLES = 200
SAMPLE_BOOTSTRAP_SEED = 0  # a fresh generator per run and metric: the same positions in every run of n samples
# the Frechet distance's resamples cost about B (n F min(n, F) + min(n, F)^3) multiply-adds: a run
# above this (1000 Inception features, 2048 each: 6e11, ~30 s on one core) gets no interval over samples
SAMPLE_BOOTSTRAP_MAX_WORK = 1e12
SAMPLE_KEYS = ("prdc_k", "prdc_samples")  # results.json's PRDC settings, kept on the row with the files
_FEATURES_FILE = re.compile(r"(reference_)?features(_\w+)?_file")
# a value recomputed on all samples this far from results.json's (relative, absolute): the features
# are not the run's, and it gets no interval (the Frechet distance's eigensolver agrees to ~1e-5)
SAMPLE_CHECK_TOLERANCE = (1e-4, 1e-3)


class SampleMetric(NamedTuple):
    """A metric the bootstrap over samples recomputes: its kind ("fd", "precision", "density") and
    its feature space (suffix: "" the run's own, "_dinov2")."""

    kind: str
    suffix: str


def sample_metric(row: dict[str, Any], metric: str) -> SampleMetric | None:
    """What ``metric`` is in a run that saved features (None if it is not one of them): its Frechet
    distance (model.fid_name in the run's own space, fd{suffix} in another), precision{suffix} or
    density{suffix}."""
    for key in row.get("_features") or {}:
        match = _FEATURES_FILE.fullmatch(key)
        if match is None or match.group(1):
            continue
        suffix = match.group(2) or ""
        fd_name = (row["_settings"].get("model.fid_name") or "fid") if not suffix else f"fd{suffix}"
        names = {fd_name: "fd", f"precision{suffix}": "precision", f"density{suffix}": "density"}
        if metric in names:
            return SampleMetric(names[metric], suffix)
    return None


def _stamp(path: Path) -> tuple:
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_size)


def _space_files(row: dict[str, Any], suffix: str) -> tuple[Path, str] | None:
    """The run's features file of a space (in its own folder, where the sweep moved) and its
    reference's path as results.json records it; None where either is missing."""
    files = row.get("_features") or {}
    features, reference = files.get(f"features{suffix}_file"), files.get(f"reference_features{suffix}_file")
    if not features or not reference or not Path(reference).is_file():
        return None
    local = Path(row.get("_dir", "")) / Path(features).name
    path = local if local.is_file() else Path(features)
    return (path, reference) if path.is_file() else None


def sample_positions(size: int, resamples: int, seed: int) -> Any:
    """The resamples' positions: resamples x size, drawn at once, with replacement, from a
    generator seeded ``seed`` (the same for every run of ``size`` samples)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, size, size=(resamples, size))


def frechet_resamples(features: Any, mu: Any, sigma: Any, positions: Any) -> tuple[float, Any]:
    """The Frechet distance of features (n x F) to (mu, sigma), float64: on all of them and on each
    row of positions (a resample: rows of features, repeats allowed). tr sqrt(C sigma) is the sum of
    the square roots of the eigenvalues of sigma^1/2 C sigma^1/2, a symmetric F x F matrix (or the
    Gram matrix of the distinct rows, where fewer): scipy.linalg.sqrtm's trace, for an eigensolver's
    cost. A resample is its rows' counts (np.bincount): each distinct row once, weighted."""
    import numpy as np

    x = np.asarray(features, dtype=np.float64)
    n, dim = x.shape
    values, vectors = np.linalg.eigh(np.asarray(sigma, dtype=np.float64))
    y = x @ ((vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T)  # each row times sigma^1/2
    squares, offset = (x * x).sum(axis=1), float(np.trace(sigma))

    def distance(rows: Any) -> float:
        counts = np.bincount(rows, minlength=n)
        distinct = np.flatnonzero(counts)
        weights = counts[distinct].astype(np.float64)
        mean = weights @ x[distinct] / len(rows)
        trace = (weights @ squares[distinct] - len(rows) * mean @ mean) / (len(rows) - 1)
        ys = y[distinct]
        z = np.sqrt(weights / (len(rows) - 1))[:, None] * (ys - weights @ ys / len(rows))
        gram = z.T @ z if len(distinct) >= dim else z @ z.T  # C's weighted sum of squares, sigma^1/2 each side
        roots = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()
        return float(((mean - mu) ** 2).sum() + trace + offset - 2 * roots)

    return distance(np.arange(n)), np.array([distance(rows) for rows in positions])


@functools.lru_cache(maxsize=8)
def _real_radii(reference: str, stamp: tuple, size: int, k: int) -> tuple[Any, Any]:
    """PRDC's reference set against ``size`` generated samples (metrics.prdc_samples) and each of its
    samples' distance to its k-th neighbour, as prdc computes them (float64)."""
    import numpy as np
    from prdc.prdc import compute_nearest_neighbour_distances

    from ddim_gmm_exp.metrics import load_reference_features, prdc_samples

    real, _ = prdc_samples(load_reference_features(reference), np.zeros((size, 1)), size)
    real = np.asarray(real, dtype=np.float64)
    return real, compute_nearest_neighbour_distances(real, k)


def prdc_terms(real: Any, radii: Any, fake: Any, k: int) -> dict[str, Any]:
    """Each generated sample's share of precision and density against the reference (real, its
    k-NN radii): whether it lies in any reference sample's ball, and how many balls it lies in / k;
    the mean over a set of them is that set's precision and density, as prdc computes them."""
    import numpy as np
    from prdc.prdc import compute_pairwise_distance

    inside = compute_pairwise_distance(real, np.asarray(fake, dtype=np.float64)) < radii[:, None]
    return {"precision": inside.any(axis=0).astype(np.float64), "density": inside.sum(axis=0) / float(k)}


@functools.lru_cache(maxsize=64)
def _resampled(
    features: str, stamp: tuple, reference: str, ref_stamp: tuple, kind: str, options: tuple, resamples: int, seed: int
) -> tuple:
    """(the run's sample indices, {metric: (value on all samples, value on each resample)} or None,
    why none); cached on the files' mtime and size (summary.md and paper.md share it)."""
    from threadpoolctl import threadpool_limits

    from ddim_gmm_exp.metrics import load_features, load_reference

    indices, x = load_features(features)
    indices.setflags(write=False)
    n, dim = x.shape
    # one BLAS thread: many small products, where threads cost more than they give (20x slower on a busy 2-core box)
    with threadpool_limits(1):
        if kind == "fd":
            side = min(n, dim)
            work = resamples * (n * dim * side + side**3)
            if work > SAMPLE_BOOTSTRAP_MAX_WORK:
                return indices, None, f"{n} x {dim} features: above SAMPLE_BOOTSTRAP_MAX_WORK"
            full, values = frechet_resamples(x, *load_reference(reference), sample_positions(n, resamples, seed))
            return indices, {"fd": (full, values)}, ""
        k, most = options
        size = min(n, most)  # the first samples, as the run took them (metrics.prdc_samples)
        real, radii = _real_radii(reference, ref_stamp, size, k)
        terms = prdc_terms(real, radii, x[:size], k)
        positions = sample_positions(size, resamples, seed)
        return indices, {name: (float(t.mean()), t[positions].mean(axis=1)) for name, t in terms.items()}, ""


class SampleResamples(NamedTuple):
    """One run's metric on each resample of its samples, and what must match in its reference run."""

    indices: Any  # the global sample index of each saved row
    values: Any  # SAMPLE_BOOTSTRAP_RESAMPLES values
    pairing: tuple  # the reference file, the metric, the PRDC settings
    full: float  # the value on all samples (results.json's, recomputed from the features)


def _prdc_options(row: dict[str, Any]) -> tuple[int, int] | None:
    """(k, the most generated samples PRDC takes) of a run: metrics.prdc.max_samples, or where the
    settings lack it results.json's prdc_samples; None where results.json has no PRDC settings."""
    k, size = (row["_features"].get(key) for key in SAMPLE_KEYS)
    most = row["_settings"].get("metrics.prdc.max_samples", size)
    return (int(k), int(most)) if _is_number(k) and _is_number(most) else None


def sample_resamples(row: dict[str, Any], metric: str) -> SampleResamples | None:
    """``metric`` of a run on each resample of its saved features (None where it has none, the
    metric is not one the bootstrap over samples serves, or the features do not give results.json's
    value on all samples, which is logged)."""
    which = sample_metric(row, metric)
    files = None if which is None else _space_files(row, which.suffix)
    if which is None or files is None or not _is_number(row.get(metric)):
        return None
    features, reference = files
    options = () if which.kind == "fd" else _prdc_options(row)
    if options is None:
        return None
    kind = "fd" if which.kind == "fd" else "prdc"  # precision and density: one computation
    stamps = _stamp(features), _stamp(Path(reference))
    indices, values, reason = _resampled(
        str(features), stamps[0], reference, stamps[1], kind, options, SAMPLE_BOOTSTRAP_RESAMPLES, SAMPLE_BOOTSTRAP_SEED
    )
    if values is None:
        _warn_once(f"no interval over samples for {metric} of job {row['job']}: {reason}")
        return None
    full, resampled = values[which.kind]
    relative, absolute = SAMPLE_CHECK_TOLERANCE
    if not math.isclose(full, float(row[metric]), rel_tol=relative, abs_tol=absolute):
        _warn_once(
            f"no interval over samples for {metric} of job {row['job']}: its features ({features}) give {full:.6g} "
            f"on all samples, results.json {float(row[metric]):.6g}"
        )
        return None
    return SampleResamples(indices, resampled, (reference, which, options), float(full))


@functools.lru_cache(maxsize=256)
def _warn_once(message: str) -> None:
    """A warning said once, however many cells and tables meet it."""
    log.warning("%s", message)


def sample_interval(row: dict[str, Any], base: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """The 95% interval of ``metric``(row) - ``metric``(base) over SAMPLE_BOOTSTRAP_RESAMPLES paired
    resamples of their samples (the same positions in both: the same sample indices), centred on
    the difference on all samples: the resampled differences' 2.5 and 97.5 percentiles, moved by
    the difference minus their mean. Why centred: a resample's duplicates raise its Frechet distance
    (100 toy samples: by 0.90 in one run and 0.94 in the other), so the resampled differences sit
    0.04 off the difference itself, and their plain percentile interval [+0.012, +0.059] excluded
    the difference -0.006 and starred the wrong sign. The resamples give the spread; the location
    is the observed difference. None where either lacks it, or they differ in reference, PRDC
    settings or sample indices."""
    import numpy as np

    mine, theirs = sample_resamples(row, metric), sample_resamples(base, metric)
    if mine is None or theirs is None or mine.pairing != theirs.pairing:
        return None
    if not np.array_equal(mine.indices, theirs.indices):
        return None
    tail = (1 - CONFIDENCE_LEVEL) / 2 * 100
    differences = mine.values - theirs.values
    shift = (mine.full - theirs.full) - differences.mean()
    low, high = np.percentile(differences, [tail, 100 - tail]) + shift
    return float(low), float(high)


def _paired(
    cell: dict[Any, float],
    base: dict[Any, float],
    cell_jobs: dict[Any, str] | None = None,
    base_jobs: dict[Any, str] | None = None,
    **where: Any,
) -> list[dict[str, Any]]:
    """One record per seed both ran, in seed order: the cell's value minus its reference's (base),
    and the two jobs (where given)."""
    seeds = sorted(cell.keys() & base.keys(), key=_seed_order)
    jobs, base_jobs = cell_jobs or {}, base_jobs or {}
    return [
        where | {"seed": s, "difference": cell[s] - base[s], "job": jobs.get(s), "reference_job": base_jobs.get(s)}
        for s in seeds
    ]


DIFFERENCE_COLUMNS = ["table", "series", "reference", "x", "seed", "difference", "job", "reference_job"]


def summary_differences(rows: list[dict[str, Any]], metric: str, reference: Reference) -> pd.DataFrame:
    """One record per (series, reference series, x, seed): the series' value minus its reference's
    at that seed and x, for every series that is not the reference, against each reference series
    in its context (same_context)."""
    import pandas as pd

    values = seed_values(rows, metric)
    jobs: dict[tuple, dict[Any, str]] = defaultdict(dict)  # as seed_values: (series, x) -> {seed: job}
    first: dict[str, dict[str, Any]] = {}
    for row in counted(rows):
        first.setdefault(series_label(row), row)
        if _is_number(row.get(metric)):
            jobs[(series_label(row), x_value(row))][_hashable(row.get("seed"))] = row["job"]
    refs = sorted(label for label, row in first.items() if row["job"] in reference.jobs)
    matches = {label: [r for r in refs if same_context(row, first[r])] for label, row in first.items()}
    records = []
    for (label, x), by_seed in sorted(values.items(), key=lambda kv: (kv[0][0], _seed_order(kv[0][1]))):
        for ref in [] if label in refs else matches[label]:
            base, where = values.get((ref, x), {}), dict(table="", series=label, reference=ref, x=x)
            records += _paired(by_seed, base, jobs[(label, x)], jobs.get((ref, x)), **where)
    return pd.DataFrame.from_records(records, columns=DIFFERENCE_COLUMNS)


def paper_differences(
    rows: list[dict[str, Any]],
    cells: dict[PaperKey, Cell],
    reference_cells: dict[PaperKey, Cell],
    metric: str | None = None,
) -> pd.DataFrame:
    """One record per (paper table, variant, reference, x, seed): the cell's value (at its chosen s)
    minus the value of the reference's cell of the same table and x (same_context), at each seed
    both report, and the two jobs (those of ``metric``'s values, as scale_candidates takes them)."""
    import pandas as pd

    first: dict[PaperKey, dict[str, Any]] = {}
    jobs: dict[tuple, dict[Any, str]] = defaultdict(dict)  # (cell, s) -> {seed: job}
    for row in counted(rows):
        first.setdefault(paper_key(row)._replace(steps=None), row)
        if metric is not None and _is_number(row.get(metric)):
            jobs[(paper_key(row), row.get("gmm_scale"))][_hashable(row.get("seed"))] = row["job"]
    reference_series = {key._replace(steps=None) for key in reference_cells}
    tables = [(setting, eta) for setting in sorted({k.setting for k in cells}) for eta in _etas(cells, setting)]
    records = []
    for (setting, eta), (key, cell), (ref_key, ref_cell) in product(tables, cells.items(), reference_cells.items()):
        series, ref_series = key._replace(steps=None), ref_key._replace(steps=None)
        if key.steps != ref_key.steps or series in reference_series:
            continue
        in_table = _in_table(key, setting, eta) and _in_table(ref_key, setting, eta)
        if in_table and same_context(first[series], first[ref_series]):
            where = dict(
                table=_table_title(setting, eta),
                series=_series_name(key.series, key.n_components),
                reference=_cell_reference(ref_key, ref_cell),
                x=key.steps,
            )
            cell_jobs, base_jobs = jobs.get((key, cell.scale)), jobs.get((ref_key, ref_cell.scale))
            records += _paired(_by_seed(cell), _by_seed(ref_cell), cell_jobs, base_jobs, **where)
    return pd.DataFrame.from_records(records, columns=DIFFERENCE_COLUMNS)


def _by_seed(cell: Cell) -> dict[Any, float]:
    return dict(zip(cell.seeds, cell.values, strict=True))


def _cell_reference(key: PaperKey, cell: Cell) -> str:
    return _series_name(key.series, key.n_components) + ("" if cell.scale is None else " (its best s)")


def difference_stats(
    frame: pd.DataFrame, rows: list[dict[str, Any]] | None = None, metric: str | None = None
) -> pd.DataFrame:
    """Per (table, series, reference, x): mean and std (n - 1) of the per-seed differences, their
    count n and the bootstrap interval of the mean (seed_interval), and what it is over ("seeds").
    Given the ``rows`` and ``metric``, a cell of one seed whose two jobs saved features gets the
    interval over their samples instead (sample_interval, "samples"); else none (None)."""
    keys = ["table", "series", "reference", "x"]
    grouped = frame.groupby(keys, sort=False)["difference"]
    stats = grouped.agg(mean=lambda d: _mean(list(d)), std=lambda d: _std(list(d)), n="count")
    stats["interval"] = seed_intervals(grouped.agg(list).tolist())
    stats["over"] = ["seeds" if i is not None else None for i in stats["interval"]]
    if rows is not None and metric is not None:
        by_job = {row["job"]: row for row in rows}
        jobs = frame.groupby(keys, sort=False)[["job", "reference_job"]].first()
        for place, (n, job, base) in enumerate(zip(stats["n"], jobs["job"], jobs["reference_job"], strict=True)):
            if n == 1 and job in by_job and base in by_job:
                found = sample_interval(by_job[job], by_job[base], metric)
                if found is not None:
                    stats.iat[place, stats.columns.get_loc("interval")] = found
                    stats.iat[place, stats.columns.get_loc("over")] = "samples"
    return stats.reset_index()


def excludes_zero(interval: tuple[float, float] | None) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


SAMPLES_MARK = "samples: "  # the interval of a one-seed cell, over its samples: "+0.5 [samples: +0.2, +0.8]*"


def difference_text(
    mean: float, std: float | None, interval: tuple | None, number: str, spread: str, over: str | None = "seeds"
) -> str:
    """ "mean ± std [low, high]" with * where the interval excludes 0; one seed: "mean [samples: low,
    high]" with its interval over samples, else "mean (n=1, no interval)"."""
    if interval is None:
        return f"{number.format(mean)} (n=1, no interval)"
    low, high = interval
    if over == "samples":
        text = f"{number.format(mean)} [{SAMPLES_MARK}{number.format(low)}, {number.format(high)}]"
        return text + (EXCLUDES_ZERO_MARK if excludes_zero(interval) else "")
    text = f"{number.format(mean)} ± {spread.format(std)} [{number.format(low)}, {number.format(high)}]"
    return text + (EXCLUDES_ZERO_MARK if excludes_zero(interval) else "")


def difference_header(metric: str, what: str, samples: bool = False) -> str:
    """What a difference table's cell is, and which sign favours the series; ``samples``: some cell
    has an interval over samples, which it says too."""
    sign = "positive" if better_direction(metric) == "higher is better" else "negative"
    over_samples = (
        f"; one seed: [{SAMPLES_MARK}...], the {CONFIDENCE_LEVEL:.0%} {BOOTSTRAP_METHOD} interval of the difference "
        f"over {SAMPLE_BOOTSTRAP_RESAMPLES} resamples of the two runs' samples paired by sample index, centred on "
        "the difference (the metric's sampling noise given the initial noise, not the spread over seeds)"
        if samples
        else ""
    )
    return (
        f"{what} minus its reference on the same seed: mean ± std over seeds "
        f"[{CONFIDENCE_LEVEL:.0%} {BOOTSTRAP_METHOD} bootstrap interval of the mean over seeds; with 3 seeds or "
        f"fewer it is the range of the differences{over_samples}]; {EXCLUDES_ZERO_MARK}: the interval excludes 0; "
        f"n: seeds both ran. For {metric} {better_direction(metric)}: a {sign} difference favours the {what}."
    )


def has_sample_intervals(stats: pd.DataFrame | None) -> bool:
    return stats is not None and bool((stats["over"] == "samples").any())


def difference_table(
    stats: pd.DataFrame, unit: str, number: str, spread: str, order: Callable | None = None, name: str = "series"
) -> str:
    """Series x (x, n) as a markdown table (pandas pivot, to_markdown), rows in ``order``, the
    first column headed ``name``."""
    import pandas as pd

    cells = stats.assign(
        text=[difference_text(r.mean, r.std, r.interval, number, spread, r.over) for r in stats.itertuples()],
        n=stats["n"].astype(str),
    )
    wide = cells.pivot(index=["series", "reference"], columns="x", values=["text", "n"])
    xs = sorted(set(cells["x"].tolist()), key=_seed_order)  # tolist: Python numbers, which _seed_order sorts
    if order is not None:
        wide = wide.loc[sorted(wide.index, key=order)]
    columns = [wide[(key, x)].rename(f"{x} {unit}" if key == "text" else "n") for x in xs for key in ("text", "n")]
    table = pd.concat(columns, axis=1).fillna("").reset_index().rename(columns={"series": name})
    return table.to_markdown(index=False, disable_numparse=True)


def difference_markdown(rows: list[dict[str, Any]], metric: str, reference: Reference) -> str:
    """summary.md: per series and x, the paired difference from its reference ("" if none pairs)."""
    frame = summary_differences(rows, metric, reference)
    if frame.empty:
        return ""
    stats = difference_stats(frame, rows, metric)
    header = difference_header(metric, "series", has_sample_intervals(stats))
    lines = [
        "",
        f"**{metric} minus the reference ({reference.name}), paired by seed** ({header})",
        "",
        difference_table(stats, x_unit(rows), "{:+.4g}", "{:.2g}"),
        "",
    ]
    return "\n".join(lines)


class SummaryCallback(Callback):
    """Hydra callback: at the end of every multirun, write the sweep's summary files on the
    primary metric ``summary.metric`` (null: the first FID-like one), with the paired differences
    from ``summary.reference`` and paper.md's s chosen on ``summary.select_on``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        metric = OmegaConf.select(config, "summary.metric", default=None)  # older configs have no summary node
        x = OmegaConf.select(config, "summary.x", default=None)
        reference = OmegaConf.select(config, "summary.reference", default=None)
        select_on = OmegaConf.select(config, "summary.select_on", default=None)
        try:
            written = write_summary(sweep_dir, metric=metric, x=x, reference=reference, select_on=select_on)
        except ConfigError as err:  # the jobs' results are kept: say how to summarise them
            log.error(
                "no sweep summary: %s (python scripts/summarize.py %s [--metric NAME] [--reference NAME] "
                "[--select-on SEED ...])",
                err,
                sweep_dir,
            )
            return
        if written:
            log.info("sweep summary: %s", ", ".join(str(p) for p in written))
