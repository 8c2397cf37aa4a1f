"""The paper's experiments on real checkpoints (experiment=paper_celebahq, ...), each run end to end
on a tiny stand-in of its model family, and scripts/plan.py's jobs against the sweep's own plan."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import yaml
from helpers.runs import CONF_DIR, ROOT, compose_config, results_of, run_cli
from helpers.tiny_checkpoints import save_dit, save_ldm, save_pixel_ddpm, save_sd
from helpers.tiny_sd3 import save_tiny_sd3
from PIL import Image

from ddim_gmm_exp.runner import run

# the experiments on real checkpoints: their model family, and what a stand-in run adds to the command
# the file's header gives (besides model.path and the reference): the tiny models' sizes, and no
# Inception Score (it needs Inception's weights, not available offline)
NO_IS = "metrics.extra.inception_score=null"
CHECKPOINT_EXPERIMENTS = {
    "paper_celebahq": ("ldm", []),
    "paper_celebahq_pixel": ("pixel", []),
    "paper_cat256": ("pixel", []),
    "paper_imagenet_cfg": ("dit", [NO_IS, "metrics.fid.antialias=true"]),  # it sets false: Inception only
    "paper_sd21": ("sd", ["model.resolution=8", NO_IS]),
    "paper_sd3_rf": ("sd3", ["model.resolution=16", "model.text_encoder_3=false", NO_IS]),
}
IMAGE_SIZE = {"ldm": 8, "pixel": 8, "dit": 8, "sd": 8, "sd3": 16}


def swept(experiment: str) -> dict[str, list[str]]:
    """The experiment's sweep (its own and the experiments it extends), values as strings."""
    spec = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())
    params: dict[str, list[str]] = {}
    for parent in spec.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            params |= swept(parent)
    for key, values in ((spec.get("hydra") or {}).get("sweeper") or {}).get("params", {}).items():
        params[key] = str(values).split(",")
    return params


def test_every_experiment_file_is_run_by_one_test():
    """test_sweeps runs the experiments on the shipped models; this file those on checkpoints."""
    from test_sweeps import CHECKPOINT_FREE

    files = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert files == set(CHECKPOINT_EXPERIMENTS) | set(CHECKPOINT_FREE)
    assert not set(CHECKPOINT_EXPERIMENTS) & set(CHECKPOINT_FREE)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_clip_dir):
    """A tiny checkpoint of every family, reference image folders and a caption file."""
    root = tmp_path_factory.mktemp("stand_ins")
    dirs = {
        "ldm": save_ldm(root / "ldm"),
        "pixel": save_pixel_ddpm(root / "pixel"),
        "dit": save_dit(root / "dit"),
        "sd": save_sd(root / "sd"),
        "sd3": save_tiny_sd3(root / "sd3"),
    }
    rng = np.random.default_rng(0)
    for size in set(IMAGE_SIZE.values()):
        (root / f"ref{size}").mkdir()
        for i in range(8):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / f"ref{size}" / f"{i}.png")
    (root / "captions.txt").write_text("a red apple\na dog on a hill\na cat\n")
    return {"dirs": dirs, "root": root, "clip": tiny_clip_dir}


def stand_in_args(experiment: str, stand_ins) -> list[str]:
    """The experiment's command on its family's stand-in: model.path, a folder reference scored in
    pixel features (no Inception weights offline), 4 samples, FID's minimum lowered to 4."""
    family, extra = CHECKPOINT_EXPERIMENTS[experiment]
    size = IMAGE_SIZE[family]
    args = [
        f"experiment={experiment}",
        f"model.path={stand_ins['dirs'][family]}",
        f"metrics.fid.reference={stand_ins['root'] / f'ref{size}'}",
        "metrics.fid.features=model",
        f"model.features={{_target_:ddim_gmm_exp.metrics.PixelFeatures,num_features:{3 * size * size}}}",
        "metrics.fid.min_samples=4",
        "metrics.prdc.enabled=false",
        "metrics.kid.enabled=false",
        "data.num_samples=4",
        "data.batch_size=4",
        "logger=none",
        *extra,
    ]
    if family in ("sd", "sd3"):
        args += [f"data.prompts_file={stand_ins['root'] / 'captions.txt'}"]
        args += [f"metrics.extra.clip.factory.model={stand_ins['clip']}"]
    return args


@pytest.mark.parametrize("experiment", sorted(CHECKPOINT_EXPERIMENTS))
def test_each_paper_experiment_runs_on_a_stand_in(experiment, stand_ins, tmp_path):
    """One job of the experiment's grid (its third variant: a mixture; its second eta; its fewest
    steps), composed from the file, run, scored against a folder; results.json says that 4 samples
    are below the paper's count."""
    params = swept(experiment)
    picks = zip(params.items(), (2, 1, 0, 0), strict=True)
    job = [f"{key}={values[min(i, len(values) - 1)]}" for (key, values), i in picks]
    # a cache of its own: the session's is the shipped models' (tests count its reference files)
    cfg = compose_config([*stand_in_args(experiment, stand_ins), *job], tmp_path, tmp_path / "cache")
    results = run(cfg)
    assert results["sampled_this_run"] == 4 and results["n_components"] == 8
    assert np.isfinite(results["metrics"][cfg.model.fid_name])
    paper = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()).get("paper_num_samples", 5000)
    assert results["paper_num_samples"] == paper
    assert f"data.num_samples=4 is below the paper's {paper}" in results["num_samples_note"]
    if CHECKPOINT_EXPERIMENTS[experiment][0] in ("sd", "sd3"):
        assert 0 <= results["metrics"]["clip"] <= 100


def test_a_paper_sweep_and_its_plan(stand_ins, tmp_path):
    """experiment=paper_imagenet_cfg as a multirun (DDIM, ORTHO-VUB and DPM-Solver++ at two eta):
    DPM-Solver++ takes no eta, so its second job repeats its first and is skipped; the paper table
    holds all three.
    scripts/plan.py, given the same command, finds the same jobs and repeats, and their NFE."""
    sweep = tmp_path / "sweep"
    args = [
        *stand_in_args("paper_imagenet_cfg", stand_ins),
        "variant=ddim,ortho_vub,dpmpp_2m",
        "++sampler.eta=0.0,1.0",
        "sampler.steps=2",
        "gmm.scale=0.01",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = json.loads((sweep / "sweep_plan.json").read_text())["jobs"]
    assert [job["duplicate_of"] for job in planned] == [None] * 5 + [4]
    skipped = json.loads((sweep / "5" / "skipped.json").read_text())["skipped"]
    assert "sampler.eta does not apply to sampler=dpmpp_2m" in skipped
    assert results_of(sweep / "0")["nfe"] == 4  # 2 steps, guided: 2 evaluations a step
    paper = (sweep / "paper.md").read_text()
    assert "| DDIM |" in paper and "| ORTHO-VUB (K=8) |" in paper and "| DPMPP_2M |" in paper

    jobs = load_plan_script().plan(args)
    assert [job.status for job in jobs] == ["samples"] * 5 + ["repeats job 4"]
    assert [job.nfe for job in jobs[:5]] == [results_of(sweep / str(i))["nfe"] for i in range(5)]


def load_plan_script():
    spec = importlib.util.spec_from_file_location("plan", ROOT / "scripts" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_plan_takes_bench_gpus_rates(tmp_path, capsys):
    """--bench: bench_gpu.py's runner row for google/ddpm-cat-256's UNet is the rate of the model
    configs on that network (10 images/s at 10 NFE: 100 evaluations/s); a --small table is refused."""
    plan = load_plan_script()
    row = {"model": "cat256", "variant": plan.BENCH_ROW, "noise": "cpu", "images_per_second": 10.0, "nfe": 10}
    bench = tmp_path / "bench.md.json"
    bench.write_text(json.dumps({"rows": [row | {"small": False}]}))
    one_job = ["experiment=paper_celebahq_pixel", "variant=ddim", "++sampler.eta=0.0", "sampler.steps=20",
               "gmm.scale=0.01"]  # fmt: skip
    assert plan.main([*one_job, "--bench", str(bench)]) == 0
    out = capsys.readouterr().out  # 5000 samples x 20 NFE / 100 per second = 1000 s
    assert "| ddpm_celebahq256 | ddim | 1 | 5,000 | 20 | 100,000 | 0.3 h |" in out
    bench.write_text(json.dumps({"rows": [row | {"small": True}]}))
    with pytest.raises(SystemExit):
        plan.main([*one_job, "--bench", str(bench)])
    assert "was measured with --small" in capsys.readouterr().err


def test_plan_counts_costs_and_refusals(capsys):
    """plan.py on the shipped digits model: jobs, NFE x samples and GPU time at a given rate; a
    sampler option that no job of the sweep takes is refused as a typo, before any job."""
    plan = load_plan_script()
    overrides = ["model=toy", "variant=ddim,ortho_vub,dpmpp_2m", "gmm.scale=0.1,1.0", "sampler.steps=5",
                 "data.num_samples=100"]  # fmt: skip
    assert plan.main([*overrides, "--images-per-second", "toy=50@5"]) == 0
    out = capsys.readouterr().out
    # DDIM and DPM-Solver++ read no gmm.scale: one job each samples; ORTHO-VUB samples at both s
    assert out.startswith("6 jobs: 4 sample, 0 score an earlier job's samples, 2 repeat an earlier job")
    assert "| **all** | | 4 | 400 | | 2,000 | 0.0 h |" in out and "toy: 250 model evaluations" in out
    with pytest.raises(SystemExit):
        plan.main([*overrides, "++sampler.etaa=0.0,1.0"])
    assert "sampler.etaa=0.0 is an option of no sampler in this sweep" in capsys.readouterr().err
    for bad in ("toy=50", "toy=-1@5", "=5@5"):
        with pytest.raises(SystemExit):
            plan.main([*overrides, "--images-per-second", bad])
        assert f"--images-per-second {bad!r} is not allowed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan.main([*overrides, "--images-per-second", "digits=50@5"])
    assert "digits=... names no model of this sweep" in capsys.readouterr().err
