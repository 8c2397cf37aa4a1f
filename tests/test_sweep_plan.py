"""Sweeps are checked whole before the first job starts, and their repeats are planned from the
job list: a repeat is skipped, a job with another job's samples scores them with its own metrics."""

from __future__ import annotations

import dataclasses
import json

from helpers.runs import SMALL, compose_config, results_of, run_cli

from ddim_gmm_exp.config import resolve_run
from ddim_gmm_exp.runner import run_spec
from ddim_gmm_exp.sweeper import PLAN_FILE, link_repeats


def test_repeats_are_linked_to_the_first_job_with_the_same_keys():
    jobs = [
        {"num": 0, "samples": "a", "scores": "a1"},
        {"num": 1, "samples": "a", "scores": "a2"},
        {"num": 2, "samples": "a", "scores": "a1"},
        {"num": 3, "samples": "b", "scores": "b1"},
        {"num": 4, "samples": "a", "scores": "a2"},
    ]
    linked = {job["num"]: (job["duplicate_of"], job["samples_of"]) for job in link_repeats(jobs)}
    assert linked == {0: (None, None), 1: (None, 0), 2: (0, None), 3: (None, None), 4: (1, None)}


def test_jobs_that_share_samples_but_not_metric_settings_score_their_own(tmp_path):
    """The review's command: 4 jobs with one set of samples (gmm.scale does not change DDIM). Job 1
    scores job 0's PNGs against its own 3000-sample reference; jobs 2 and 3 repeat 0 and 1."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", "model=toy", "sampler=ddim", "gmm.scale=0.3,1.0", "metrics.fid.reference_samples=500,3000",
         "data.num_samples=100", "sampler.steps=5", "logger=csv", f"hydra.sweep.dir={sweep}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.index("composing and checking 4 jobs") < proc.stdout.index("Launching 4 jobs")  # Hydra's log
    first, second = results_of(sweep / "0"), results_of(sweep / "1")
    assert first["settings"]["metrics.fid.reference_samples"] == 500
    assert second["settings"]["metrics.fid.reference_samples"] == 3000
    assert second["sampled_this_run"] == 0 and second["samples_from"] == str(sweep / "0")
    assert first["metrics"]["fid"] != second["metrics"]["fid"]  # each against its own reference
    png = "samples/000042.png"
    assert (sweep / "1" / png).read_bytes() == (sweep / "0" / png).read_bytes()
    assert second["variance_account"] == first["variance_account"]
    for job, original in (("2", "0"), ("3", "1")):
        skipped = json.loads((sweep / job / "skipped.json").read_text())
        assert skipped["same_as"] == str(sweep / original) and not (sweep / job / "results.json").exists()
    plan = json.loads((sweep / PLAN_FILE).read_text())["jobs"]
    assert [(j["duplicate_of"], j["samples_of"]) for j in plan] == [(None, None), (None, 0), (0, None), (1, None)]


def test_a_repeat_is_skipped_from_the_plan_even_before_its_original_finished(tmp_path, cache_dir):
    """Under a parallel launcher the original may still be sampling: the repeat is decided from the
    plan, not from the original's results.json, so it samples nothing (and returns no results yet)."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    plan = [
        {"num": 0, "dir": str(sweep / "0"), "samples": "x", "scores": "y", "duplicate_of": None, "samples_of": None},
        {"num": 1, "dir": str(sweep / "1"), "samples": "x", "scores": "y", "duplicate_of": 0, "samples_of": None},
    ]
    (sweep / PLAN_FILE).write_text(json.dumps({"jobs": plan}))
    spec = resolve_run(compose_config([*SMALL, "logger=none"], sweep / "1", cache_dir), [], None)
    spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, sweep_dir=sweep, job_num=1))
    assert run_spec(spec) == {}
    assert json.loads((sweep / "1" / "skipped.json").read_text())["same_as"] == str(sweep / "0")
    assert not (sweep / "1" / "samples").exists()


def test_one_bad_value_refuses_the_whole_sweep_before_any_job_runs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model=toy", "sampler=ddim_gmm", "gmm.scale=0.3,-1,1.0", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 2
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: job 1 (model=toy sampler=ddim_gmm gmm.scale=-1): gmm: scale=-1 is not allowed")
    assert "no job of the sweep was run" in last and "Traceback" not in proc.stderr
    assert not sweep.exists()  # not even job 0's folder
