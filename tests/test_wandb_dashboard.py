"""W&B dashboards, read back from the offline run files (no network): a run's samples table, summary,
tags and config; a sweep's summary run (results table, PNGs, line plots, summary.csv artifact); and
compare.png, the same seeds of every job side by side."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.runs import SMALL, results_of, run_cli, run_records
from PIL import Image

from ddim_gmm_exp.dashboard import FIRST_SAMPLES_FILE, compare_labels
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.images import load_png, png_path
from ddim_gmm_exp.sweep import collect_results, write_summary


def logged(records: list, kind: str) -> dict[str, Any]:
    """The last value of every key of a run's history, summary or config records (W&B's names:
    nested keys joined by "/"), JSON-decoded."""
    values: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == kind:
            items = getattr(record, kind).item if kind == "history" else getattr(record, kind).update
            values |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
        if kind == "config" and record.WhichOneof("record_type") == "run":
            values |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return values


def run_info(records: list) -> Any:
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return info


def files_dir(run_dir: Path, run_id: str) -> Path:
    (found,) = Path(run_dir).glob(f"wandb/offline-run-*-{run_id}/files")
    return found


def logged_table(records: list, key: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """The W&B table logged under ``key`` (its columns and rows) and where its media files are.
    wandb logs a table as an artifact of the run: the run's own media/table file holds "Image" for
    each image; the table and its images are the artifact's files, staged until the run is synced."""
    for record in records:
        if record.WhichOneof("record_type") == "artifact":
            files = {entry.path: Path(entry.local_path) for entry in record.artifact.manifest.contents}
            if f"{key}.table.json" in files:
                return json.loads(files[f"{key}.table.json"].read_text()), files
    raise AssertionError(f"no table {key!r} in the run")


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as the W&B app shows it: keys joined by dots."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and not key.startswith("_"):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """-m with logger=wandb, offline: DDIM, DDIM-GMM and DDIM again (a repeat: skipped), data.seed=7."""
    sweep = tmp_path_factory.mktemp("wandb") / "sweep"
    proc = run_cli(["-m", *SMALL, "logger=wandb", "sampler=ddim,ddim_gmm,ddim", "data.seed=7",
                    f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (sweep / "2" / "skipped.json").is_file()
    return sweep


def test_a_job_logs_its_first_64_samples_its_summary_tags_and_config(sweep):
    """The samples table holds the same 64 rows (index, seed, label, image) in every run of these
    data settings; the run summary has every metric and the run statistics; the config names
    sampler.name, data.seed and the variant, and gmm.* only where the sampler reads it."""
    job = sweep / "0"
    results = results_of(job)
    (records,) = run_records(job)
    info = run_info(records)
    assert results["wandb"] == {"project": "ddim-gmm-exp", "entity": None, "group": "run-sweep", "id": info.run_id,
                                "mode": "offline"}  # fmt: skip
    assert list(info.tags) == ["toy", "ddim"]  # the variant DDIM is the sampler's tag already

    table, media = logged_table(records, "samples")
    assert table["columns"] == ["index", "seed", "label", "prompt", "image"]
    assert [row[:4] for row in table["data"]] == [[i, 7 + i, i % 10, None] for i in range(64)]
    for i, row in enumerate(table["data"]):  # the sample's PNG, enlarged 8x (nearest) for the table
        shown = np.asarray(Image.open(media[row[4]["path"]]))
        expected = load_png(png_path(job / "samples", i)).permute(1, 2, 0).numpy()
        assert np.array_equal(shown, expected.repeat(8, axis=0).repeat(8, axis=1)), i

    summary = logged(records, "summary")
    for name, value in results["metrics"].items():
        assert summary[name] == pytest.approx(value), name
    assert summary["images_per_second"] == pytest.approx(results["images_per_second"]) and summary["nfe"] == 5
    assert "gmm_clipped_fraction" not in summary  # DDIM has no mixture

    config = flat(logged(records, "config"))
    assert config["sampler.name"] == "ddim" and config["sampler.steps"] == 5 and config["data.seed"] == 7
    assert config["model.name"] == "toy" and config["variant"] == "DDIM"
    assert not [key for key in config if key.startswith("gmm")]

    (gmm_records,) = run_records(sweep / "1")
    assert list(run_info(gmm_records).tags) == ["toy", "ddim_gmm", "ORTHO-VUB"]
    gmm_config = flat(logged(gmm_records, "config"))
    assert gmm_config["gmm.scale"] == 1.0 and gmm_config["gmm.n_components"] == 8
    assert gmm_config["variant"] == "ORTHO-VUB"
    gmm_summary = logged(gmm_records, "summary")
    assert gmm_summary["gmm_clipped_fraction"] == pytest.approx(results_of(sweep / "1")["gmm_clipped_fraction"])

    first = np.load(job / FIRST_SAMPLES_FILE)  # what compare.png shows of the run
    assert first["indices"].tolist() == list(range(8)) and first["seeds"].tolist() == list(range(7, 15))
    assert first["labels"].tolist() == list(range(8))
    pngs = torch.stack([load_png(png_path(job / "samples", i)) for i in range(8)])
    assert np.array_equal(first["images"], pngs.numpy())


def test_the_sweep_logs_a_summary_run_in_its_group(sweep):
    """The summary run holds every job's row (the skipped repeat marked), summary.png, paper.png,
    compare.png, a line plot per metric with a series per sampler/variant, and summary.csv as an
    artifact."""
    assert (sweep / "compare.png").stat().st_size > 1000
    (records,) = run_records(sweep)
    info = run_info(records)
    assert info.job_type == "summary" and info.run_group == "run-sweep"
    files = files_dir(sweep, info.run_id)

    table, _ = logged_table(records, "results")
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert rows[2]["duplicate_of"] == "0" and "same samples and metric settings as job 0" in rows[2]["skipped"]
    assert " sampler=ddim " in rows[2]["overrides"] and rows[2]["fid"] is None
    with open(sweep / "summary.csv") as f:
        fids = {line["job"]: float(line["fid"]) for line in csv.DictReader(f)}
    assert {r["job"]: r["fid"] for r in rows[:2]} == pytest.approx(fids)

    history = logged(records, "history")
    for key in ("summary_png", "paper_png"):
        assert (files / history[f"{key}/path"]).stat().st_size > 1000
    assert history["compare/captions"] == ["compare.png"]
    assert (files / history["compare/filenames"][0]).stat().st_size > 1000

    visualize = "_wandb/visualize/"  # wandb.plot's charts: a table and the chart's spec in the config
    plots = {k.removeprefix(visualize): v for k, v in logged(records, "config").items() if k.startswith(visualize)}
    assert {"plot/fid", "plot/precision", "plot/kid"} <= set(plots)
    assert plots["plot/fid"]["panel_config"]["stringSettings"]["xname"] == "steps"
    fid_plot, _ = logged_table(records, "plot/fid_table")
    assert fid_plot["columns"] == ["step", "lineKey", "lineVal"]
    by_series = {key: (x, value) for x, key, value in fid_plot["data"]}
    assert by_series == {
        "ddim eta=0.0": (5, pytest.approx(rows[0]["fid"])),
        "ddim_gmm eta=0.0 ORTHO-VUB K=8 s=1.0": (5, pytest.approx(rows[1]["fid"])),
    }

    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (summary,) = [a for a in artifacts if a.type == "sweep-summary"]
    assert {entry.path for entry in summary.manifest.contents} == {"summary.csv", "summary.md", "paper.md"}


def test_summarize_logs_a_new_summary_run(sweep):
    """scripts/summarize.py's work (write_summary) on a finished W&B sweep: a second summary run
    beside the first."""
    write_summary(sweep)
    assert len(run_records(sweep)) == 2


def fake_job(root: Path, name: str, seed: int) -> None:
    """A job folder as a run leaves it: results.json (of a W&B run) and its first 8 images (8x8 grey)."""
    job = root / name
    job.mkdir(parents=True)
    metrics = {"fid": 1.0 + seed / 10}
    result = dict(model="toy", sampler="ddim", variant="DDIM", eta=0.0, steps=5, seed=seed, metrics=metrics)
    result["wandb"] = {"project": "p", "entity": None, "group": "g", "id": f"run{seed}", "mode": "offline"}
    (job / "results.json").write_text(json.dumps(result))
    images = np.random.default_rng(seed).integers(0, 256, (8, 1, 8, 8), dtype=np.uint8)
    np.savez(job / FIRST_SAMPLES_FILE, images=images, indices=np.arange(8), labels=np.arange(8))


def test_compare_png_goes_on_pages_of_40_jobs_and_summary_run_options_are_checked(tmp_path):
    for seed in range(41):
        fake_job(tmp_path, str(seed), seed)
    written = {p.name for p in write_summary(tmp_path, wandb_mode="disabled")}  # no summary run
    assert {"compare.png", "compare-2.png"} <= written and not (tmp_path / "wandb").exists()
    assert compare_labels(collect_results(tmp_path))[:2] == ["0: ddim eta=0.0, seed 0", "1: ddim eta=0.0, seed 1"]
    for seed in range(3, 41):  # fewer jobs: the second page goes
        for path in (tmp_path / str(seed)).iterdir():
            path.unlink()
        (tmp_path / str(seed)).rmdir()
    written = {p.name for p in write_summary(tmp_path, wandb_mode="disabled")}
    assert "compare.png" in written and not (tmp_path / "compare-2.png").exists()

    with pytest.raises(ConfigError, match="W&B mode 'cloud' is not allowed: choose one of offline, online, disabled"):
        write_summary(tmp_path, wandb_mode="cloud")
    for job in tmp_path.glob("*/results.json"):  # jobs of logger=csv or none record no W&B run
        job.write_text(json.dumps(json.loads(job.read_text()) | {"wandb": None}))
    with pytest.raises(ConfigError, match="W&B mode 'online' given, but no job under .* logged to W&B"):
        write_summary(tmp_path, wandb_mode="online")
