"""What resume=true checks before Hydra writes anything, and resuming one job of an experiment sweep."""

from __future__ import annotations

import pytest
from helpers.runs import results_of, run_cli

TINY = ["model=toy", "data.num_samples=6", "sampler.steps=3", "metrics.fid.enabled=false", "logger=none"]


def record(run_dir):
    """The bytes of what Hydra and the run keep about a run."""
    names = [".hydra/overrides.yaml", ".hydra/config.yaml", "run.log", "run_overrides.json", "run_config.json"]
    return {name: (run_dir / name).read_bytes() for name in names}


def test_a_refused_resume_leaves_the_run_dir_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli([*TINY, f"hydra.run.dir={run_dir}"]).returncode == 0
    before = record(run_dir)
    proc = run_cli(["resume=true", f"hydra.run.dir={run_dir}", "sampler.steps=50"])
    assert proc.returncode == 2 and "holds a run of another config" in proc.stderr
    assert record(run_dir) == before  # Hydra's overrides.yaml said sampler.steps=50 before


@pytest.mark.parametrize(
    "where,message",
    [
        ("missing", "does not exist: give the directory of the run to finish"),
        ("folder", "holds no run (run_config.json and run_overrides.json missing)"),
        ("sweep", "is a sweep's directory: resume the sweep with python run.py -m ... resume=true hydra.sweep.dir="),
    ],
)
def test_resume_refuses_a_directory_that_holds_no_run(where, message, tmp_path):
    target = tmp_path / where
    if where != "missing":
        target.mkdir()
    if where == "sweep":
        (target / "multirun.yaml").write_text("{}\n")
    proc = run_cli(["resume=true", f"hydra.run.dir={target}"], cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if where == "missing" else [where])
    if where != "missing":
        assert sorted(p.name for p in target.iterdir()) == ([] if where == "folder" else ["multirun.yaml"])


def test_resume_without_a_directory_says_which_to_give(tmp_path):
    proc = run_cli(["resume=true"], cwd=tmp_path)
    assert proc.returncode == 2 and "resume=true needs the directory to finish: hydra.run.dir=RUN_DIR" in proc.stderr
    proc = run_cli(["-m", "resume=true", f"hydra.sweep.dir={tmp_path / 'nothing'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "holds no sweep (no multirun.yaml)" in proc.stderr


def test_resuming_a_job_of_an_experiment_sweep_finishes_it_in_its_own_dir(tmp_path):
    """experiment=toy_steps sets hydra.mode=MULTIRUN; the resumed job must not start a new sweep."""
    sweep = tmp_path / "sweep"
    args = ["experiment=toy_steps", "sampler.steps=3", "data.num_samples=6", "metrics.fid.enabled=false"]
    assert run_cli([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path).returncode == 0
    job = sweep / "1"
    whole = results_of(job)
    (job / "results.json").unlink()
    for index in (4, 5):
        (job / "samples" / f"00000{index}.png").unlink()
    proc = run_cli(["resume=true", f"hydra.run.dir={job}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = results_of(job)
    assert resumed["sampled_this_run"] == 2 and resumed["sampler"] == whole["sampler"] == "ddim_gmm"
    assert resumed["metrics"] == whole["metrics"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no new multirun/ dir
