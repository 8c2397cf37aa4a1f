"""The experiment runner end to end: configs, runs, ranks, resume, sweeps, logging, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, ROOT, SMALL, compose_config, run_cli
from scipy import linalg

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.images import load_png
from ddim_gmm_exp.metrics import PixelFeatures, load_reference, statistics_of
from ddim_gmm_exp.models.toy import ToyAdapter
from ddim_gmm_exp.runner import run


def pngs(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "samples").glob("*.png"))}


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


results_of_run = results_of


# ------------------------------------------------------------------------------------ configs


def group_options() -> list[tuple[str, str]]:
    groups = [p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"]
    return [(g.name, o.stem) for g in sorted(groups) for o in sorted(g.glob("*.yaml"))]


@pytest.mark.parametrize("group,option", group_options())
def test_every_config_option_composes(group, option, tmp_path, cache_dir):
    cfg = compose_config([f"{group}={option}"], tmp_path, cache_dir)
    assert cfg.hydra.runtime.choices[group] == option
    assert cfg.model.adapter._target_.startswith("ddim_gmm_exp.models.")


def test_optuna_search_and_slurm_launcher_compose(tmp_path, cache_dir):
    search = compose_config(["hparams_search=gmm_optuna"], tmp_path, cache_dir)
    assert search.optimized_metric == "fid_digits" and search.sampler.function.endswith(".ddim_gmm")
    assert "gmm.n_components" in search.hydra.sweeper.params
    slurm = compose_config(["hydra/launcher=slurm"], tmp_path, cache_dir)
    assert slurm.hydra.launcher.gpus_per_node == 8


def test_every_config_file_starts_with_its_command():
    for path in CONF_DIR.rglob("*.yaml"):
        head = "\n".join(path.read_text().splitlines()[:3])
        assert "python run.py" in head or "https://" in head, path


# ------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache_dir):
    """The default config, shrunk, run in-process."""
    out = tmp_path_factory.mktemp("default")
    cfg = compose_config([*SMALL, "sampler=ddim_gmm", "gmm.n_components=4"], out, cache_dir)
    return out, run(cfg)


def test_default_run_end_to_end(default_run):
    out, results = default_run
    assert results == results_of(out)
    assert results["sampler"] == "ddim_gmm" and results["n_components"] == 4 and results["steps"] == 5
    assert results["num_samples"] == 100 == results["sampled_this_run"]
    assert np.isfinite(results["metrics"]["fid"]) and results["metrics"]["fid"] > 0
    assert results["images_per_second"] > 0 and results["devices"] == 1
    assert len(pngs(out)) == 100 and (out / "samples" / "000099.png").is_file()
    assert (out / "grid.png").is_file()
    assert "fid" in (out / "csv" / "metrics.csv").read_text()
    # the paper's ORTHO-VUB at eta = 0: on the 4 mixing steps every v_k > 0 clips, the first K = 4 of D = 192
    assert results["conditional"] is True and results["gmm_clipped_fraction"] == pytest.approx(4 / 192)
    assert results["variant"] == "ORTHO-VUB" and results["construction"] == "paper" and results["eta"] == 0.0
    # 5 steps of: priors K (float32), cumulative priors K (float64), offsets K*D, variance base D, factors K
    assert results["gmm_memory_bytes"] == 5 * (4 * 4 + 8 * 4 + 4 * 4 * 192 + 4 * 192 + 4 * 4)


def test_fid_is_pinned_against_an_independent_computation(default_run, cache_dir):
    """Frechet distance of the saved PNGs' pixel features to the reference, with scipy."""
    out, results = default_run
    images = torch.stack([load_png(p) for p in sorted((out / "samples").glob("*.png"))])
    features = images.flatten(1).double().numpy() / 255
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    (ref_file,) = cache_dir.glob("fid_ref_*.npz")
    mu_ref, sigma_ref = load_reference(ref_file)
    covmean = linalg.sqrtm(sigma @ sigma_ref).real
    expected = ((mu - mu_ref) ** 2).sum() + np.trace(sigma + sigma_ref - 2 * covmean)
    assert results["metrics"]["fid"] == pytest.approx(expected, rel=1e-3)


def test_reference_statistics_are_the_real_images_statistics(cache_dir, default_run):
    adapter = ToyAdapter(shape=(3, 8, 8), n_modes=10, seed=0)
    (ref_file,) = cache_dir.glob("fid_ref_*.npz")
    mu, sigma = load_reference(ref_file)
    features = adapter.reference_images(10000).flatten(1).double().numpy() / 255
    assert np.allclose(mu, features.mean(0), atol=1e-10)
    assert np.allclose(sigma, np.cov(features, rowvar=False), atol=1e-10)
    again = statistics_of(PixelFeatures(192), [adapter.reference_images(10000)])
    assert np.allclose(again[0], mu) and np.allclose(again[1], sigma)


def test_a_sample_does_not_depend_on_the_batch_size(default_run, tmp_path, cache_dir):
    out, _ = default_run
    cfg = compose_config(
        [*SMALL, "sampler=ddim_gmm", "gmm.n_components=4", "data.batch_size=7", "logger=none"], tmp_path, cache_dir
    )
    other = run(cfg)
    assert pngs(tmp_path) == pngs(out)
    assert other["metrics"]["fid"] == pytest.approx(results_of(out)["metrics"]["fid"], rel=1e-6)


def test_guidance_and_unconditional_sampling(tmp_path, cache_dir):
    base = [*SMALL, "logger=none", "save_images=false"]
    fids = {}
    for name, extra in {
        "cond": [],
        "guided": ["sampler.guidance_scale=3.0"],
        "uncond": ["data.labels=null"],
        "null_class": ["sampler.guidance_scale=0.0"],
    }.items():
        fids[name] = run(compose_config(base + extra, tmp_path / name, cache_dir))["metrics"]["fid"]
    # guidance 0 is the unconditional model (run as such); the others differ
    assert fids["null_class"] == fids["uncond"]
    assert results_of_run(tmp_path / "null_class")["conditional"] is False
    assert len({fids["cond"], fids["guided"], fids["uncond"]}) == 3
    assert not (tmp_path / "cond" / "samples").exists()


def test_a_small_run_skips_fid_with_a_note(tmp_path, cache_dir):
    cfg = compose_config([*SMALL, "data.num_samples=50", "logger=none"], tmp_path, cache_dir)
    results = run(cfg)
    assert "fid" not in results["metrics"] and len(pngs(tmp_path)) == 50
    assert results["fid_skipped"].startswith("data.num_samples=50 is below metrics.fid.min_samples=100")


def test_matched_gmm_with_eta_zero_warns(tmp_path, cache_dir):
    cfg = compose_config(
        [*SMALL, "variant=matched_diagonal", "sampler.eta=0.0", "gmm.scale=0.5", "logger=none"], tmp_path, cache_dir
    )
    with pytest.warns(UserWarning, match="construction='matched_diagonal' with eta=0 is deterministic DDIM"):
        results = run(cfg)
    assert results["gmm_clipped_fraction"] == 0.0 and results["variant"] == "matched_diagonal"


# ------------------------------------------------------------------------------------ ranks


def test_ddp_sim_gives_the_same_pngs_and_fid(tmp_path, cache_dir):
    args = [*SMALL, "sampler=ddim_gmm", "gmm.n_components=4", f"paths.cache_dir={cache_dir}"]
    one = run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"])
    two = run_cli([*args, "trainer=ddp_sim", f"hydra.run.dir={tmp_path / 'two'}"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert results_of(tmp_path / "two")["devices"] == 2
    assert pngs(tmp_path / "one") == pngs(tmp_path / "two")
    fid_one, fid_two = (results_of(tmp_path / d)["metrics"]["fid"] for d in ("one", "two"))
    assert fid_one == pytest.approx(fid_two, rel=1e-6)


# ------------------------------------------------------------------------------------ resume


def test_resume_after_a_killed_run(tmp_path, cache_dir):
    args = [
        "model=toy",
        "data.num_samples=3000",
        "data.batch_size=20",
        "sampler.steps=200",
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
    while time.time() < deadline and len(list((killed_dir / "samples").glob("[0-9]*[0-9].png"))) < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((killed_dir / "samples").glob("[0-9]*[0-9].png")))
    assert proc.returncode == -signal.SIGKILL and 300 <= partial < 3000, partial
    assert not (killed_dir / "results.json").exists()

    refused = run_cli([*args, f"hydra.run.dir={killed_dir}"])  # without resume=true: refused, nothing touched
    assert refused.returncode == 2 and "pass resume=true" in refused.stderr
    other = run_cli([*args, "sampler.eta=0.5", "resume=true", f"hydra.run.dir={killed_dir}"])
    assert other.returncode == 2 and "holds a run of another config" in other.stderr

    # the run's own overrides are restored from the run dir: resume=true and the dir are enough
    resumed = run_cli(["resume=true", f"hydra.run.dir={killed_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume: restored the run's overrides model=toy data.num_samples=3000" in resumed.stderr
    results = results_of(killed_dir)
    assert results["sampled_this_run"] == 3000 - partial
    assert len(list((killed_dir / "samples").glob("*.png"))) == 3000  # every index once, no leftovers

    whole = run_cli([*args, f"hydra.run.dir={whole_dir}"])
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert pngs(killed_dir) == pngs(whole_dir)
    assert results["metrics"]["fid"] == pytest.approx(results_of(whole_dir)["metrics"]["fid"], rel=1e-6)


# ------------------------------------------------------------------------------------ sweeps


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
    (sweep / "summary.md").unlink()
    rebuilt = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep)], capture_output=True, text=True
    )
    assert rebuilt.returncode == 0 and (sweep / "summary.md").is_file()


# ------------------------------------------------------------------------------------ W&B


def wandb_records(run_file: Path):
    """The protobuf records of an offline .wandb file (LevelDB log format, W&B header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = run_file.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_config_fid_and_grid(tmp_path, cache_dir):
    cfg = compose_config([*SMALL, "logger=wandb", "sampler=ddim_gmm"], tmp_path, cache_dir)
    results = run(cfg)
    run_file = None
    for _ in range(300):  # the .wandb file is completed asynchronously after finish()
        files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
        if files and any(r.WhichOneof("record_type") == "exit" for r in wandb_records(files[0])):
            run_file = files[0]
            break
        time.sleep(0.1)
    assert run_file is not None
    records = list(wandb_records(run_file))
    history = {
        item.key or "/".join(item.nested_key): item.value_json
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    assert float(history["fid"]) == pytest.approx(results["metrics"]["fid"])
    assert "media/images/samples" in history["samples/filenames"]
    config = {
        item.key: item.value_json
        for r in records
        for item in (
            r.run.config.update
            if r.WhichOneof("record_type") == "run"
            else r.config.update
            if r.WhichOneof("record_type") == "config"
            else []
        )
    }
    assert json.loads(config["sampler"])["name"] == "ddim_gmm" and "gmm" in config
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/samples_*.png"))


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.batch_size=0"], "data.batch_size=0 is not allowed"),
        (["sampler.steps=0"], "sampler.steps=0 is not allowed"),
        (["sampler.steps=1001"], r"sampler.steps=1001 is not allowed: the model was trained with 1000 timesteps"),
        (["sampler.eta=-0.5"], "sampler.eta=-0.5 is not allowed"),
        (["sampler.guidance_scale=-1"], "sampler.guidance_scale=-1 is not allowed"),
        (["sampler.timestep_spacing=cubic"], "sampler.timestep_spacing='cubic' is not allowed"),
        (["sampler=ddim_gmm", "gmm.n_components=0"], "gmm: n_components=0 is not allowed"),
        (["sampler=ddim_gmm", "gmm.scale=-1"], "gmm: scale=-1 is not allowed: it must be a finite number >= 0"),
        (
            ["variant=matched_full", "gmm.scale=1.5"],
            r"gmm: scale=1.5 is not allowed with construction='matched_full': it must be a number in \[0, 1\]",
        ),
        (["sampler=ddim_gmm", "gmm.construction=exact"], "gmm: construction='exact' is not allowed: choose one of"),
        (["sampler=ddim_gmm", "gmm.n_components=200"], r"gmm: n_components=200 is not allowed for dim=192"),
        (
            ["data.num_samples=1", "trainer=ddp_sim", "metrics.fid.enabled=false"],
            "data.num_samples=1 is fewer than the 2 ranks",
        ),
        (["data.prompts_file=/nonexistent/prompts.txt"], "data.prompts_file='/nonexistent/prompts.txt' cannot be read"),
        (["data.labels=[3,12]"], r"class ids must lie in \[0, 9\]"),
        (["model.path=/nonexistent/model"], "model.path='/nonexistent/model' does not exist"),
        (["metrics.fid.reference=/nonexistent/ref.npz"], "metrics.fid.reference='/nonexistent/ref.npz' does not exist"),
        (
            ["metrics.fid.features=inception", "metrics.fid.weights_path=/nonexistent/w.pth"],
            "metrics.fid.weights_path='/nonexistent/w.pth' does not exist",
        ),
        (["logger.mode=sometimes"], "logger.mode='sometimes' is not allowed"),
        (["+sampler.temperature=0.9"], "sampler.temperature=0.9 is not an option of sampler=ddim: its options are eta"),
        (["sampler=ddim_gmm", "+sampler.gmm=1"], "sampler.gmm=1 is not an option of sampler=ddim_gmm"),
        (["model=digits_flow"], "sampler=ddim walks a diffusion schedule but model=digits_flow is a flow model"),
    ],
)
def test_bad_input_is_refused_before_sampling(overrides, message, tmp_path, cache_dir):
    cfg = compose_config([*SMALL, "logger=wandb", *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())


def test_reference_with_the_wrong_feature_dimension(tmp_path, cache_dir):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(10), sigma=np.eye(10))
    cfg = compose_config([*SMALL, f"metrics.fid.reference={tmp_path / 'ref.npz'}"], tmp_path / "out", cache_dir)
    with pytest.raises(ConfigError, match="have feature dimension 10 but the FID feature extractor gives 192"):
        run(cfg)


def test_inception_without_local_weights_says_which_file(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = compose_config([*SMALL, "metrics.fid.features=inception"], tmp_path / "out", cache_dir)
    with pytest.raises(ConfigError, match="weights-inception-2015-12-05-6726825d.pth and no download is made"):
        run(cfg)


@pytest.mark.parametrize(
    "args,message",
    [
        (["sampler=fancy"], "sampler=fancy is not a config option: choose one of ddim, ddim_gmm"),
        (["gmm.scale=2"], "gmm.scale=2 is set but sampler=ddim uses no GMM: add sampler=ddim_gmm"),
        (["gmm.n_components=0"], "gmm.n_components=0 is set but sampler=ddim uses no GMM"),
        (["-m", "model=toy,nope"], "model=nope is not a config option"),
        (["sampler.eta=-1"], "sampler.eta=-1 is not allowed"),
        (["data.batch_size=0"], "data.batch_size=0 is not allowed"),
    ],
)
def test_command_line_errors_are_one_line_and_exit_2(args, message, tmp_path):
    proc = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "samples").exists()


def shrunk_sweep(experiment: str) -> list[str]:
    """The experiment's own sweep cut to its first two values of the first swept key and the
    first value of every other (command-line sweeps take precedence over the file's)."""
    import yaml

    params = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())["hydra"]["sweeper"]["params"]
    args = []
    for i, (key, values) in enumerate(params.items()):
        choices = str(values).split(",")
        args.append(f"{key}={','.join(choices[:2] if i == 0 else choices[:1])}")
    return args


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
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


def test_resume_with_fewer_samples_left_than_ranks(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = ["model=toy", "data.num_samples=4", "metrics.fid.enabled=false", "logger=none", f"hydra.run.dir={run_dir}"]
    assert run_cli(args).returncode == 0
    (run_dir / "samples" / "000002.png").unlink()
    proc = run_cli([*args, "resume=true", "trainer=ddp_sim"])
    assert proc.returncode == 2 and "only 1 samples are left to resume, fewer than the 2 ranks" in proc.stderr
    assert run_cli([*args, "resume=true"]).returncode == 0 and (run_dir / "samples" / "000002.png").is_file()


def test_reference_statistics_from_an_image_folder(default_run, tmp_path, cache_dir):
    """metrics.fid.reference=DIR: the folder's statistics, computed once and cached; FID of a run
    against its own images is 0 up to the finite-sample estimate of sqrtm."""
    out, _ = default_run
    cfg = compose_config(
        [
            *SMALL,
            "sampler=ddim_gmm",
            "gmm.n_components=4",
            f"metrics.fid.reference={out / 'samples'}",
            "logger=none",
            "save_images=false",
        ],
        tmp_path,
        cache_dir,
    )
    assert run(cfg)["metrics"]["fid"] < 1e-3
    assert len(list(cache_dir.glob("fid_ref_folder_*.npz"))) == 1


def test_clip_score_without_prompts_is_refused_before_sampling(tmp_path, cache_dir, tiny_clip_dir):
    cfg = compose_config(
        [*SMALL, "metrics=clip", f"metrics.extra.clip.factory.model={tiny_clip_dir}"], tmp_path, cache_dir
    )
    with pytest.raises(ConfigError, match="a metric needs prompts"):
        run(cfg)
    assert not (tmp_path / "samples").exists()


def test_optimized_metric_is_returned_to_the_sweeper(tmp_path, cache_dir):
    from ddim_gmm_exp.cli import run_task

    cfg = compose_config([*SMALL, "logger=none", "optimized_metric=fid"], tmp_path / "a", cache_dir)
    assert run_task(cfg) == results_of(tmp_path / "a")["metrics"]["fid"]
    cfg = compose_config([*SMALL, "logger=none", "optimized_metric=fid_digits"], tmp_path / "b", cache_dir)
    with pytest.raises(SystemExit) as exit_info:
        run_task(cfg)
    assert exit_info.value.code == 2


def test_wandb_run_is_finished_on_error(tmp_path, cache_dir, monkeypatch):
    import wandb

    from ddim_gmm_exp.module import SamplingModule

    def broken(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(SamplingModule, "predict_step", broken)
    cfg = compose_config([*SMALL, "logger=wandb"], tmp_path, cache_dir)
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg)
    assert wandb.run is None
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    for _ in range(300):
        exits = [r.exit.exit_code for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
        if exits:
            break
        time.sleep(0.1)
    assert exits == [1]
