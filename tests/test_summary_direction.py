"""Sweep summaries follow the primary metric's direction; the primary metric is a setting
(summary.metric, --metric), and its fallback from FID is said once."""

import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.sweep import SummaryCallback, write_summary

ROOT = Path(__file__).resolve().parents[1]
CONFIDENCE = {  # (variant, s) -> classifier_confidence per seed: higher is better
    ("DDIM", None): [0.97, 0.98],
    ("ORTHO", 0.3): [0.99999, 0.99998],
    ("ORTHO", 3.0): [0.996, 0.995],
}


def write_job(root: Path, name: str, variant: str, scale: float | None, seed: int, metrics: dict) -> None:
    job = root / name
    job.mkdir(parents=True)
    result = dict(
        model="digits",
        sampler="ddim" if scale is None else "ddim_gmm",
        variant=variant,
        eta=1.0,
        n_components=None if scale is None else 8,
        gmm_scale=scale,
        conditional=True,
        guidance_scale=2.5,
        steps=5,
        seed=seed,
        metrics=metrics,
    )
    (job / "results.json").write_text(json.dumps(result))


def confidence_sweep(root: Path, with_fid: bool = False) -> Path:
    """`-m variant=ddim,ortho gmm.scale=0.3,3.0` with FID skipped (too few samples): only the confidence."""
    num = 0
    for (variant, scale), values in CONFIDENCE.items():
        for seed, value in enumerate(values):
            metrics = {"classifier_confidence": value}
            if with_fid:  # FID that prefers the other s, so that the chosen metric is visible
                metrics = {"fid_digits": 10.0 + value, **metrics}
            write_job(root, str(num), variant, scale, seed, metrics)
            num += 1
    return root


def expected_cell(values: list[float], scale: float | None, bold: bool) -> str:
    text = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    text = f"**{text}**" if bold else text
    return text if scale is None else f"{text} (s={scale:g})"


def test_a_higher_is_better_metric_picks_the_largest_s_and_bolds_the_largest(tmp_path, caplog):
    sweep = confidence_sweep(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ddim_gmm_exp.sweep"):
        write_summary(sweep)
    paper = (sweep / "paper.md").read_text()
    means = {key: statistics.mean(v) for key, v in CONFIDENCE.items()}
    best_s = max((s for v, s in CONFIDENCE if v == "ORTHO"), key=lambda s: means[("ORTHO", s)])
    assert best_s == 0.3
    best_mean = max(means.values())
    ortho = expected_cell(CONFIDENCE[("ORTHO", best_s)], best_s, means[("ORTHO", best_s)] == best_mean)
    ddim = expected_cell(CONFIDENCE[("DDIM", None)], None, means[("DDIM", None)] == best_mean)
    assert f"| ORTHO (K=8) | {ortho} | 2 |" in paper
    assert f"| DDIM | {ddim} | 2 |" in paper
    assert "classifier_confidence, higher is better" in paper
    # the fallback from FID is said in exactly one line of paper.md and one log line
    fallback = [line for line in paper.splitlines() if "no FID-like metric" in line]
    assert len(fallback) == 1 and "classifier_confidence" in fallback[0]
    assert len([r for r in caplog.records if "no FID-like metric" in r.getMessage()]) == 1


def test_summarize_metric_option_chooses_the_primary_metric(tmp_path):
    sweep = confidence_sweep(tmp_path, with_fid=True)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep), "--metric", "classifier_confidence"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    paper = (sweep / "paper.md").read_text()
    assert paper.startswith("# classifier_confidence, higher is better")
    # FID (10 + confidence) would pick s=3 and bold DDIM; the confidence picks s=0.3 and bolds it
    assert f"| ORTHO (K=8) | {expected_cell(CONFIDENCE[('ORTHO', 0.3)], 0.3, True)} | 2 |" in paper
    # an unknown name: one error line naming it and the metrics there are, exit 2, nothing rewritten
    (sweep / "paper.md").unlink()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep), "--metric", "fid_inception"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "'fid_inception'" in errors[0] and "fid_digits" in errors[0] and "classifier_confidence" in errors[0]
    assert not (sweep / "paper.md").exists()


def test_unknown_metric_is_refused_before_anything_is_written(tmp_path):
    sweep = confidence_sweep(tmp_path)
    with pytest.raises(ConfigError, match="'fid' .*classifier_confidence"):
        write_summary(sweep, metric="fid")
    assert not list(sweep.glob("summary.*")) and not list(sweep.glob("paper.*"))


def test_the_callback_reads_summary_metric_and_old_configs_still_work(tmp_path, caplog):
    sweep = confidence_sweep(tmp_path, with_fid=True)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "summary": {"metric": "classifier_confidence"}})
    SummaryCallback().on_multirun_end(config)
    assert (sweep / "paper.md").read_text().startswith("# classifier_confidence, higher is better")
    old = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})  # a config from before summary.metric
    OmegaConf.set_struct(old, True)
    SummaryCallback().on_multirun_end(old)
    paper = (sweep / "paper.md").read_text()
    assert paper.startswith("# fid_digits, lower is better") and "no FID-like metric" not in paper  # no fallback
    # a wrong name ends the multirun with one error line, not a traceback
    bad = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "summary": {"metric": "nope"}})
    with caplog.at_level(logging.ERROR, logger="ddim_gmm_exp.sweep"):
        SummaryCallback().on_multirun_end(bad)
    assert [r.levelno for r in caplog.records if "'nope'" in r.getMessage()] == [logging.ERROR]


def test_config_has_summary_settings_defaulting_to_null():
    config = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    assert config["summary"] == {"metric": None, "x": None, "reference": None, "select_on": None}
