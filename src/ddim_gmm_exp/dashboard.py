"""What a run and a sweep show beyond their files: W&B dashboards and compare.png.

Per run (callbacks.ReportResults; W&B only where the run's logger is W&B): a ``samples`` table of
the first 64 samples (index, seed, label, prompt, image: the same rows in every run, so W&B's
table comparison lines up a seed across runs), the metrics and the run statistics in the run
summary, tags for model, sampler and variant, and the config as nested groups (W&B shows them as
``sampler.name``, ``gmm.scale``, ...; ``gmm`` only where the sampler reads it). Every run also
keeps its first COMPARE_SAMPLES images in FIRST_SAMPLES_FILE, whatever its logger and
``save_images``.

Per sweep (sweep.write_summary): compare.png, the same sample indices of every job side by side,
one row per job; and where the jobs logged to W&B, one more W&B run in their group
(``job_type=summary``): the results table, summary.png, paper.png, compare.png, a line plot per
metric against steps or NFE with one series per sampler/variant, and summary.csv as an artifact.
"""

from __future__ import annotations

import json
import logging
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ddim_gmm_exp.data import labels_of, prompts_of, sample_seeds
from ddim_gmm_exp.images import image_grid, load_png, png_path

if TYPE_CHECKING:
    from ddim_gmm_exp.module import SamplingPlan

log = logging.getLogger(__name__)

FIRST_SAMPLES_FILE = "first_samples.npz"
COMPARE_SAMPLES = 8  # sample indices 0..7 of every job in compare.png
COMPARE_JOBS_PER_PAGE = 40  # rows of one compare page; more jobs go on compare-2.png, ...
COMPARE_PAGE = re.compile(r"compare(-\d+)?\.png")
WANDB_RECORD = "wandb"  # results.json's record of the run's W&B run: the summary run joins its group
RUN_STATISTICS = ("images_per_second", "seconds_per_step", "nfe", "gmm_clipped_fraction")
WANDB_MODES = ("offline", "online", "disabled")
LABEL_CHARS = 60  # a compare.png label wraps after this many characters
CHAR_INCHES = 0.068  # the width of a character of an 8-point label, about (a little over, for the margin)
TABLE_MIN_TILE = 64  # pixels: W&B's table cells would blur an 8x8 digit; it is enlarged by an integer factor


# ----------------------------------------------------------------------------------- per run


def sample_descriptions(count: int, plan: SamplingPlan) -> list[dict[str, Any]]:
    """Index, seed, class label and prompt (None where the run has none) of samples 0..count-1."""
    indices = torch.arange(count)
    seeds = sample_seeds(indices, plan.base_seed)
    labels = labels_of(indices, plan.labels)
    prompts = prompts_of(indices, plan.prompts)
    return [
        {
            "index": i,
            "seed": seeds[i],
            "label": None if labels is None else int(labels[i]),
            "prompt": None if prompts is None else prompts[i],
        }
        for i in range(count)
    ]


def save_first_samples(images: list[torch.Tensor], plan: SamplingPlan, path: Path) -> None:
    """The run's first COMPARE_SAMPLES images (uint8, N x C x H x W) with their indices, seeds,
    labels and prompts: what compare.png shows of this run, kept even when save_images=false."""
    count = min(COMPARE_SAMPLES, len(images))
    if count == 0:
        return
    described = sample_descriptions(count, plan)
    arrays = {
        "images": torch.stack(images[:count]).numpy(),
        "indices": np.array([d["index"] for d in described]),
        "seeds": np.array([d["seed"] for d in described]),
    }
    if plan.labels is not None:
        arrays["labels"] = np.array([d["label"] for d in described])
    if plan.prompts is not None:
        arrays["prompts"] = np.array([d["prompt"] for d in described])
    tmp = path.with_name(path.stem + ".tmp.npz")  # written whole or not at all, as results.json
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_first_samples(run_dir: Path) -> dict[str, np.ndarray] | None:
    """A run's FIRST_SAMPLES_FILE, else (runs from before it) its first PNGs; None if neither."""
    path = Path(run_dir) / FIRST_SAMPLES_FILE
    if path.is_file():
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files}
    pngs = [png_path(Path(run_dir) / "samples", i) for i in range(COMPARE_SAMPLES)]
    present = [p for p in pngs if p.is_file()]
    if not present:
        return None
    return {"images": np.stack([load_png(p).numpy() for p in present]), "indices": np.arange(len(present))}


def wandb_image(image: torch.Tensor, caption: str | None = None) -> Any:
    """A uint8 (C, H, W) image as a wandb.Image, enlarged by an integer factor where it is small."""
    import wandb

    enlarged = image_grid(image[None], pad=0, min_tile=TABLE_MIN_TILE).permute(1, 2, 0).numpy()
    return wandb.Image(enlarged[:, :, 0] if enlarged.shape[2] == 1 else enlarged, caption=caption)


def samples_table(images: list[torch.Tensor], plan: SamplingPlan) -> Any:
    """The W&B table of the first 64 samples: index, seed, label, prompt, image; the same rows in
    every run of the same data settings."""
    import wandb

    rows = [
        [d["index"], d["seed"], d["label"], d["prompt"], wandb_image(image, f"#{d['index']} seed {d['seed']}")]
        for d, image in zip(sample_descriptions(len(images), plan), images, strict=True)
    ]
    return wandb.Table(columns=["index", "seed", "label", "prompt", "image"], data=rows)


def run_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The W&B run summary: every metric and the run statistics the run has (nfe, the clipped
    fraction: not every sampler has them)."""
    stats = {key: results.get(key) for key in RUN_STATISTICS if results.get(key) is not None}
    return dict(results["metrics"]) | stats


def run_tags(meta: dict[str, Any], given: list[str] | None = None) -> list[str]:
    """The W&B run's tags: the given ones (logger.tags), then model, sampler and variant, each once
    (case aside: sampler ddim and variant DDIM are one tag); W&B takes at most 64 characters."""
    tags: list[str] = []
    for tag in [*(given or []), meta.get("model"), meta.get("sampler"), meta.get("variant")]:
        if tag is not None and str(tag).lower() not in {t.lower() for t in tags}:
            tags.append(str(tag)[:64])
    return tags


def logged_config(config: dict[str, Any], settings: dict[str, Any], variant: str) -> dict[str, Any]:
    """The config a run's logger gets: the composed config with the paper's ``variant`` name, and
    ``gmm`` cut to the keys the sampler reads (results.json's settings), gone where it reads none,
    so that grouping by gmm.scale does not put DDIM runs under the default s."""
    read = {key.removeprefix("gmm.") for key in settings if key.startswith("gmm.")}
    logged = {k: v for k, v in config.items() if k != "gmm"} | {"variant": variant}
    gmm = {k: v for k, v in (config.get("gmm") or {}).items() if k in read}
    return logged | ({"gmm": gmm} if gmm else {})


def log_run(experiment: Any, results: dict[str, Any], images: list[torch.Tensor], plan: SamplingPlan) -> None:
    """A run's W&B dashboard beyond Lightning's scalars: the samples table and the run summary."""
    if images:
        experiment.log({"samples": samples_table(images, plan)})
    experiment.summary.update(run_summary(results))


def wandb_record(experiment: Any) -> dict[str, Any]:
    """results.json's record of the run's W&B run, from which a sweep's summary run takes its
    project, entity, group and mode."""
    mode = "disabled" if experiment.disabled else "offline" if experiment.offline else "online"
    return {
        "project": experiment.project,
        "entity": experiment.entity or None,
        "group": experiment.group or None,
        "id": experiment.id,
        "mode": mode,
    }


# ----------------------------------------------------------------------------------- compare.png


def compare_labels(rows: list[dict[str, Any]]) -> list[str]:
    """One label per job: its folder and series (the readable settings that tell series apart), and
    its steps or NFE and its seed where those differ between the jobs."""
    from ddim_gmm_exp.sweep import series_label, x_unit, x_value

    several_x = len({x_value(r) for r in rows}) > 1
    several_seeds = len({json.dumps(r.get("seed")) for r in rows}) > 1
    labels = []
    for row in rows:
        label = f"{row['job']}: {series_label(row)}"
        label += f", {x_value(row)} {x_unit(rows)}" if several_x else ""
        label += f", seed {row.get('seed')}" if several_seeds else ""
        label += f" (repeats job {row['duplicate_of']})" if row.get("duplicate_of") else ""
        labels.append(label)
    return labels


def column_titles(samples: list[dict[str, np.ndarray] | None]) -> list[str]:
    """ "sample i", and its class or prompt where every job that has them agrees."""
    titles = []
    for i in range(COMPARE_SAMPLES):
        title = f"sample {i}"
        for key, name in (("labels", "class"), ("prompts", "")):
            values = {str(s[key][i]) for s in samples if s is not None and key in s and len(s[key]) > i}
            if len(values) == 1:
                value = textwrap.shorten(values.pop(), 24, placeholder="...")
                title += f"\n{name} {value}".rstrip() if name else f"\n{value}"
        titles.append(title)
    return titles


def strip_gap(image_width: int) -> int:
    """Pixels of white between two images of a compare row."""
    return max(1, image_width // 8)


def sample_strip(images: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (H, N*W + gaps, C) row, white between the images."""
    gap = strip_gap(images.shape[-1])
    _, channels, height, _ = images.shape
    white = np.full((channels, height, gap), 255, dtype=np.uint8)
    parts = [part for image in images for part in (image, white)][:-1]
    return np.concatenate(parts, axis=2).transpose(1, 2, 0)


def compare_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs by seed, then steps (or NFE), then job order: the jobs that start from the same
    noise and run as long sit next to each other, one block each."""
    from ddim_gmm_exp.sweep import _seed_order, x_value

    return sorted(rows, key=lambda row: (_seed_order(row.get("seed")), _seed_order(x_value(row))))


def plot_compare(rows: list[dict[str, Any]], sweep_dir: Path) -> list[Path]:
    """compare.png (and compare-2.png, ... beyond COMPARE_JOBS_PER_PAGE jobs): samples 0..7 of every
    job, one row per job labelled by its settings, in blocks of one seed and step count (compare_order);
    [] where no job kept images."""
    from ddim_gmm_exp.sweep import x_value

    sweep_dir = Path(sweep_dir)
    for old in sweep_dir.iterdir():  # a sweep summarised again may have fewer pages
        if COMPARE_PAGE.fullmatch(old.name):
            old.unlink()
    ordered = compare_order(rows)
    samples = [load_first_samples(Path(row["_dir"])) for row in ordered]
    if not any(s is not None for s in samples):
        log.warning("no job of %s kept its first samples (%s): no compare.png", sweep_dir, FIRST_SAMPLES_FILE)
        return []
    labels, titles = compare_labels(ordered), column_titles(samples)
    blocks = [json.dumps([row.get("seed"), x_value(row)], default=str) for row in ordered]
    pages = range(0, len(ordered), COMPARE_JOBS_PER_PAGE)
    written = []
    for number, start in enumerate(pages, 1):
        end = start + COMPARE_JOBS_PER_PAGE
        path = sweep_dir / ("compare.png" if number == 1 else f"compare-{number}.png")
        page = f", page {number} of {len(pages)}" if len(pages) > 1 else ""
        title = f"The same samples of every job (sample i has seed data.seed + i){page}"
        compare_page(samples[start:end], labels[start:end], blocks[start:end], titles, title, path)
        written.append(path)
    return written


def compare_page(
    samples: list[dict[str, np.ndarray] | None],
    labels: list[str],
    blocks: list[str],
    titles: list[str],
    title: str,
    path: Path,
) -> None:
    """One compare page: a row of images per job, its label on the left, the sample columns on top,
    more space where the block (seed and step count) changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tile, top = 0.7, 0.8  # inches: an image's height, the room above the first row
    gaps = [0.1 if i == 0 or block == blocks[i - 1] else 0.35 for i, block in enumerate(blocks)]
    wrapped = [textwrap.fill(label, LABEL_CHARS, subsequent_indent="  ") for label in labels]
    longest = max(len(line) for text in wrapped for line in text.splitlines())
    left = 0.3 + CHAR_INCHES * longest  # where the images start
    heights = [max(tile, 0.16 * (text.count("\n") + 1)) for text in wrapped]
    width = left + COMPARE_SAMPLES * tile * (1 + 1 / 8) + 0.3
    height = top + sum(heights) + sum(gaps) + 0.2
    fig = plt.figure(figsize=(width, height))
    fig.text(0.5, 1 - 0.15 / height, title, ha="center", va="top", fontsize=11)
    strips = [None if s is None else sample_strip(s["images"][:COMPARE_SAMPLES]) for s in samples]
    first = next(s["images"][:COMPARE_SAMPLES] for s in samples if s is not None)  # a page has one
    _, _, image_height, image_width = first.shape
    for column, column_title in enumerate(titles[: len(first)]):
        centre = column * (image_width + strip_gap(image_width)) + image_width / 2  # pixels, as sample_strip lays them
        x = (left + centre * tile / image_height) / width
        fig.text(x, 1 - (top - 0.05) / height, column_title, ha="center", va="bottom", fontsize=8)
    y = height - top
    for strip, text, row_height, gap in zip(strips, wrapped, heights, gaps, strict=True):
        y -= row_height + gap
        middle = (y + row_height / 2) / height
        fig.text((left - 0.1) / width, middle, text, ha="right", va="center", fontsize=8)
        if strip is None:
            fig.text((left + 0.1) / width, middle, "(no images kept: no first_samples.npz or samples/)", va="center")
            continue
        strip_width = tile * strip.shape[1] / strip.shape[0]
        ax = fig.add_axes((left / width, y / height, strip_width / width, row_height / height))
        ax.imshow(strip[:, :, 0] if strip.shape[2] == 1 else strip, cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- summary run


def summary_target(rows: list[dict[str, Any]], mode: str | None = None) -> dict[str, Any] | None:
    """Where the sweep's W&B summary run goes: the project, entity and group of the first job that
    logged to W&B, in ``mode`` (None: that job's); None where no job did or the mode is disabled."""
    record = next((row["_wandb"] for row in rows if row.get("_wandb")), None)
    if record is None:
        return None
    target = record | ({"mode": mode} if mode is not None else {})
    return None if target.get("mode") == "disabled" else target


def results_table(rows: list[dict[str, Any]], metrics: list[str], sweep_dir: Path) -> Any:
    """summary.csv as a W&B table, and a row for every job skipped as a duplicate of another."""
    import wandb

    from ddim_gmm_exp.sweep import summary_records

    columns, records = summary_records(rows, metrics)
    records = [record | {"skipped": None} for record in records] + skipped_jobs(sweep_dir)
    columns = [*columns, "skipped"]
    data = [[record.get(column) for column in columns] for record in records]
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)


def skipped_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job folder with skipped.json (runner.skip_as_duplicate): its folder, the job
    it repeats (duplicate_of), why, and its overrides from the sweep's plan."""
    from ddim_gmm_exp.sweeper import planned_job

    records = []
    for path in sorted(Path(sweep_dir).glob("**/skipped.json")):
        skipped = json.loads(path.read_text())
        job = path.parent.relative_to(sweep_dir)
        same_as = Path(skipped.get("same_as", ""))
        planned = planned_job(Path(sweep_dir), int(job.name)) if job.name.isdigit() else None
        records.append(
            {
                "job": str(job),
                "duplicate_of": str(same_as.relative_to(sweep_dir))
                if same_as.is_relative_to(sweep_dir)
                else str(same_as),
                "skipped": skipped.get("skipped"),
                "overrides": " ".join(planned["overrides"]) if planned else None,
            }
        )
    return records


def metric_plots(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """Per metric, a W&B line plot against steps (or NFE), one series per series label: the mean
    over seeds, as summary.png draws it."""
    import wandb

    from ddim_gmm_exp.sweep import aggregate, better_direction, x_unit

    plots = {}
    for metric in metrics:
        series = aggregate(rows, metric)
        if series:
            labels = sorted(series)
            plots[f"plot/{metric}"] = wandb.plot.line_series(
                xs=[[point[0] for point in series[label]] for label in labels],
                ys=[[point[1] for point in series[label]] for label in labels],
                keys=labels,
                title=f"{metric} ({better_direction(metric)}), mean over seeds",
                xname=x_unit(rows),
            )
    return plots


def artifact_name(sweep_dir: Path) -> str:
    """W&B artifact names take letters, digits, -, _ and . only."""
    return "sweep-summary-" + re.sub(r"[^\w.-]", "_", Path(sweep_dir).resolve().name)


def start_summary_run(sweep_dir: Path, rows: list[dict[str, Any]], metrics: list[str], target: dict[str, Any]) -> Any:
    """wandb.init of the sweep's summary run: ``job_type=summary``, in the jobs' project and group."""
    import wandb

    from ddim_gmm_exp.sweep import x_unit

    return wandb.init(
        project=target.get("project"),
        entity=target.get("entity"),
        group=target.get("group"),
        mode=target["mode"],
        job_type="summary",
        name=f"summary-{sweep_dir.resolve().name}",
        tags=["summary"],
        dir=str(sweep_dir),
        config={"sweep_dir": str(sweep_dir.resolve()), "jobs": len(rows), "x": x_unit(rows), "metrics": metrics},
        reinit="create_new",  # its own run, whatever run this process holds
    )


def log_summary_run(
    sweep_dir: Path, rows: list[dict[str, Any]], metrics: list[str], written: list[Path], target: dict[str, Any]
) -> None:
    """The sweep's W&B summary run, in its jobs' group: the results table, the summary's PNGs, a line
    plot per metric and the summary's .csv and .md files as an artifact. A run W&B refuses to start
    (online without a login or a network) is one error line: the files are written all the same."""
    import wandb

    sweep_dir = Path(sweep_dir)
    try:
        run = start_summary_run(sweep_dir, rows, metrics, target)
    except wandb.errors.Error as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.error(
            "no W&B summary run (mode %s; the summary files are written, and python scripts/summarize.py %s "
            "--wandb offline logs the run offline): %s",
            target["mode"],
            sweep_dir,
            reason,
        )
        return
    try:
        pngs = {path.name: path for path in written if path.suffix == ".png"}
        logged: dict[str, Any] = {"results": results_table(rows, metrics, sweep_dir)}
        logged |= {
            f"{name}_png": wandb.Image(str(pngs[f"{name}.png"]))
            for name in ("summary", "paper")
            if f"{name}.png" in pngs
        }
        compare = [
            wandb.Image(str(path), caption=path.name) for name, path in pngs.items() if COMPARE_PAGE.fullmatch(name)
        ]
        if compare:
            logged["compare"] = compare
        run.log(logged | metric_plots(rows, metrics))
        artifact = wandb.Artifact(artifact_name(sweep_dir), type="sweep-summary")
        for path in written:
            if path.suffix in (".csv", ".md"):
                artifact.add_file(str(path))
        run.log_artifact(artifact)
        log.info("W&B summary run %s (%s, group %s)", run.id, target["mode"], target.get("group"))
    finally:
        run.finish()
