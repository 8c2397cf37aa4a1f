"""Sweeps: results, summaries, duplicate DDIM jobs, every experiment file, W&B groups."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.runs import CONF_DIR, ROOT, SMALL, run_cli, wandb_records


def test_multirun_writes_results_and_a_summary(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "model=toy",
            "sampler=ddim,ddim_gmm",
            "sampler.steps=2,4",
            "gmm.n_components=4,8",
            "data.num_samples=100",
            "logger=none",
            "save_images=false",
            f"paths.cache_dir={cache_dir}",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the DDIM jobs that differ only in gmm.n_components run once; the other is skipped with a note
    jobs = sorted(sweep.glob("*/results.json"))
    skipped = sorted(sweep.glob("*/skipped.json"))
    assert len(jobs) == 6 and len(skipped) == 2
    assert all("gmm.* does not apply" in json.loads(p.read_text())["skipped"] for p in skipped)
    runs = [json.loads(p.read_text()) for p in jobs]
    assert sorted((r["sampler"], r["steps"], r["n_components"]) for r in runs) == [
        ("ddim", 2, None),
        ("ddim", 4, None),
        ("ddim_gmm", 2, 4),
        ("ddim_gmm", 2, 8),
        ("ddim_gmm", 4, 4),
        ("ddim_gmm", 4, 8),
    ]
    csv_lines = (sweep / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and "fid" in csv_lines[0]
    assert "ddim_gmm eta=0.0 ORTHO-VUB K=8 s=1.0" in (sweep / "summary.md").read_text()
    paper = (sweep / "paper.md").read_text()
    assert "| DDIM |" in paper and "| ORTHO-VUB (K=4) |" in paper and "(s=1)" in paper
    assert (sweep / "paper.png").stat().st_size > 1000
    assert (sweep / "summary.png").stat().st_size > 1000
    # compare.png from the jobs' first_samples.npz (they saved no PNGs); no W&B run without logger=wandb
    assert (sweep / "compare.png").stat().st_size > 1000 and not (sweep / "wandb").exists()
    (sweep / "summary.md").unlink()
    rebuilt = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep)], capture_output=True, text=True
    )
    assert rebuilt.returncode == 0 and (sweep / "summary.md").is_file()


def experiment_sweep(experiment: str) -> dict[str, str]:
    """The sweep an experiment file declares, with the sweeps of the experiments it extends
    (its plain `defaults` entries) under its own, as Hydra composes them."""
    import yaml

    spec = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())
    params: dict[str, str] = {}
    for parent in spec.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            params.update(experiment_sweep(parent))
    params.update((spec.get("hydra") or {}).get("sweeper", {}).get("params", {}))
    return params


def shrunk_sweep(experiment: str) -> list[str]:
    """The experiment's own sweep cut to two jobs: the first two values of the first swept key and
    the first value of every other (command-line sweeps take precedence over the file's); an
    experiment that chooses s on some seeds (summary.select_on) keeps two seeds instead, one to
    choose on and one to report."""
    import yaml

    spec = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())
    doubled = "data.seed" if (spec.get("summary") or {}).get("select_on") is not None else None
    args = []
    for i, (key, values) in enumerate(experiment_sweep(experiment).items()):
        choices = str(values).split(",")
        two = key == doubled if doubled else i == 0
        args.append(f"{key}={','.join(choices[:2] if two else choices[:1])}")
    return args


def test_shrunk_sweep_covers_an_extended_experiments_keys():
    """samplers_digits_full overrides three of samplers_digits' keys; the two it inherits
    (variant, data.seed) are cut too, so the shrunk sweep is two jobs, not the parent's grid."""
    args = dict(a.split("=", 1) for a in shrunk_sweep("samplers_digits_full"))
    assert args["variant"] == "ddim,ddim_noise" and args["data.seed"] == "0"
    assert args["nfe"] == "4" and args["gmm.scale"] == "0.1"


# the experiments on the shipped models (those on real checkpoints: tests/test_paper_experiments.py)
CHECKPOINT_FREE = [
    "diversity_digits",
    "paper_digits",
    "paper_digits_full",
    "paper_rf",
    "paper_rf_full",
    "samplers_digits",
    "samplers_digits_full",
    "samplers_flow",
    "samplers_flow_full",
    "toy_steps",
    "x0_handling_digits",
]


@pytest.mark.parametrize("experiment", CHECKPOINT_FREE)
def test_every_experiment_file_runs(experiment, tmp_path, cache_dir):
    """Each experiment, shrunk to 100 samples and 2 jobs, runs as the multirun it declares."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            f"experiment={experiment}",
            *shrunk_sweep(experiment),
            "data.num_samples=100",
            "save_images=false",
            "logger=none",
            f"paths.cache_dir={cache_dir}",
            f"hydra.sweep.dir={sweep}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(sweep.glob("*/results.json"))) == 2 and (sweep / "summary.md").is_file()


def test_multirun_of_two_rank_jobs_shares_a_wandb_group(tmp_path, cache_dir):
    """-m with trainer=ddp_sim (ddp_fork): every job runs on 2 ranks; the jobs share one W&B group."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            *SMALL,
            "logger=wandb",
            "trainer=ddp_sim",
            "sampler.steps=2,3",
            "save_images=false",
            f"paths.cache_dir={cache_dir}",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert [j["devices"] for j in jobs] == [2, 2]
    groups = set()
    for run_file in sweep.glob("*/wandb/offline-run-*/run-*.wandb"):
        groups |= {r.run.run_group for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"}
    assert groups == {f"run-{sweep.name}"}


def test_control_sweep_compares_like_with_like(tmp_path, cache_dir):
    """-m sampler=ddim_gmm,ddim_noise gmm.scale=...: the control reads gmm.scale (no job skipped),
    and every job records its variance account; the control's excess is s^2 on the mixing steps."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            *SMALL,
            "logger=none",
            "save_images=false",
            "sampler=ddim_gmm,ddim_noise",
            "gmm.scale=0.5,1.0",
            f"paths.cache_dir={cache_dir}",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert not list(sweep.glob("*/skipped.json")) and len(runs) == 4
    for result in runs:
        account = result["variance_account"]
        assert len(account["steps"]) == 5
        if result["sampler"] == "ddim_noise":
            scale = float(next(o for o in result["overrides"] if o.startswith("gmm.scale")).split("=")[1])
            assert account["extra_per_dim"] == pytest.approx(scale**2 * 4 / 5 / 192, rel=1e-4)
    assert "Variance account" in (sweep / "summary.md").read_text()
