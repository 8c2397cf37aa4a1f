"""Resume: a killed run finishes with the same samples; refusals that protect a run dir."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers.runs import ROOT, SMALL, compose_config, pngs, results_of, run_cli

from ddim_gmm_exp.runner import run


def test_resume_after_a_killed_run(tmp_path, cache_dir):
    """Killed (SIGKILL) as soon as 100 of its 1000 PNGs exist, i.e. inside the sampling loop with
    45 batches still to go (the window for the kill; a batch of 20 at 10 toy steps is a few ms of
    sampling, then 20 PNG writes): the resumed run ends with the uninterrupted run's samples."""
    args = [
        "model=toy",
        "data.num_samples=1000",
        "data.batch_size=20",
        "sampler.steps=10",
        "metrics.prdc.enabled=false",  # O(n^2) in the 1000 samples and not compared here (FID is)
        "metrics.kid.enabled=false",
        "logger=none",
        f"paths.cache_dir={cache_dir}",
    ]
    killed_dir, whole_dir = tmp_path / "killed", tmp_path / "whole"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={killed_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((killed_dir / "samples").glob("[0-9]*[0-9].png"))) < 100:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((killed_dir / "samples").glob("[0-9]*[0-9].png")))
    assert proc.returncode == -signal.SIGKILL and 100 <= partial < 1000, partial
    assert not (killed_dir / "results.json").exists()

    refused = run_cli([*args, f"hydra.run.dir={killed_dir}"])  # without resume=true: refused, nothing touched
    assert refused.returncode == 2 and "pass resume=true" in refused.stderr
    other = run_cli([*args, "sampler.eta=0.5", "resume=true", f"hydra.run.dir={killed_dir}"])
    assert other.returncode == 2 and "holds a run of another config" in other.stderr

    # the run's own overrides are restored from the run dir: resume=true and the dir are enough
    resumed = run_cli(["resume=true", f"hydra.run.dir={killed_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume: restored the run's overrides model=toy data.num_samples=1000" in resumed.stderr
    results = results_of(killed_dir)
    assert results["sampled_this_run"] == 1000 - partial
    assert len(list((killed_dir / "samples").glob("*.png"))) == 1000  # every index once, no leftovers

    run(compose_config(args, whole_dir, cache_dir))  # the uninterrupted run, in-process (no python start-up)
    assert pngs(killed_dir) == pngs(whole_dir)
    assert results["metrics"]["fid"] == pytest.approx(results_of(whole_dir)["metrics"]["fid"], rel=1e-6)
    # the variance account covers the samples of the killed run too (kept per sample on disk)
    account, whole_account = results["variance_account"], results_of(whole_dir)["variance_account"]
    assert account["num_samples"] == whole_account["num_samples"] == 1000
    assert account["injected_per_dim"] == pytest.approx(whole_account["injected_per_dim"], rel=1e-9)


def test_resume_with_fewer_samples_left_than_ranks(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = ["model=toy", "data.num_samples=4", "metrics.fid.enabled=false", "logger=none"]
    run(compose_config(args, run_dir, cache_dir))  # the run to resume, made in-process (no python start-up)
    (run_dir / "samples" / "000002.png").unlink()
    proc = run_cli([*args, "resume=true", "trainer=ddp_sim", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2 and "only 1 samples are left to resume, fewer than the 2 ranks" in proc.stderr
    resumed = run_cli([*args, "resume=true", f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0 and (run_dir / "samples" / "000002.png").is_file()


def test_a_resumed_run_scores_and_accounts_for_the_whole_run(tmp_path, cache_dir):
    """The Inception Score (seeded groups of features in index order) and the variance account
    (kept per sample on disk) of a resumed run are those of the uninterrupted run."""
    run_dir = tmp_path / "run"
    inception_score = "+metrics.extra.is.factory"  # scored in a stand-in classifier's logits (no Inception offline)
    args = [
        *SMALL,
        "logger=none",
        "sampler.eta=0.5",
        f"{inception_score}._target_=ddim_gmm_exp.metrics.inception_score_extra",
        f"{inception_score}.logits._target_=ddim_gmm_exp.metrics.PixelFeatures",
        f"{inception_score}.logits.num_features=192",
        f"paths.cache_dir={cache_dir}",
    ]
    run(compose_config(args, run_dir, cache_dir))  # the uninterrupted run, in-process; the resumes are CLI runs
    whole = results_of(run_dir)
    args.append(f"hydra.run.dir={run_dir}")
    for i in range(10, 30):  # lost in the middle: the resumed run scores 0-9, 30-99, then 10-29
        (run_dir / "samples" / f"{i:06d}.png").unlink()
    resumed = run_cli([*args, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = results_of(run_dir)
    assert results["sampled_this_run"] == 20
    assert results["metrics"]["is"] == pytest.approx(whole["metrics"]["is"], rel=1e-9)
    assert results["metrics"]["is_std"] == pytest.approx(whole["metrics"]["is_std"], rel=1e-9)
    account, whole_account = results["variance_account"], whole["variance_account"]
    assert account["num_samples"] == whole_account["num_samples"] == 100
    assert account["injected_per_dim"] == pytest.approx(whole_account["injected_per_dim"], rel=1e-9)
    assert [s["mean_sq_distance"] for s in account["steps"]] == pytest.approx(
        [s["mean_sq_distance"] for s in whole_account["steps"]], rel=1e-9
    )

    # a run made before per-sample records were kept: the account says how many samples it covers
    shutil.rmtree(run_dir / "samples" / "variance_account")
    for i in range(50, 60):
        (run_dir / "samples" / f"{i:06d}.png").unlink()
    old = run_cli([*args, "resume=true"])
    assert old.returncode == 0, old.stderr[-2000:]
    assert results_of(run_dir)["variance_account"]["num_samples"] == 10
    assert "variance account: it covers 10 of the run's 100 samples" in old.stdout + old.stderr
