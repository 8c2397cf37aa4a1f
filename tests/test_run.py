"""One run end to end: samples, metrics pinned, guidance, ranks, logging."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from helpers.runs import SMALL, compose_config, pngs, results_of, run_cli, wandb_records
from scipy import linalg

from ddim_gmm_exp.images import load_png
from ddim_gmm_exp.metrics import PixelFeatures, load_features, load_reference, statistics_of
from ddim_gmm_exp.models.toy import ToyAdapter
from ddim_gmm_exp.runner import run


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


def toy_reference_file(cache_dir):
    """The toy's cached reference in its 192 pixel features (the session's cache also holds other
    extractors' references, e.g. DINOv2's)."""
    (ref_file,) = [p for p in cache_dir.glob("fid_ref_*.npz") if load_reference(p)[0].shape == (192,)]
    return ref_file


def test_fid_is_pinned_against_an_independent_computation(default_run, cache_dir):
    """Frechet distance of the saved PNGs' pixel features to the reference, with scipy."""
    out, results = default_run
    images = torch.stack([load_png(p) for p in sorted((out / "samples").glob("*.png"))])
    features = images.flatten(1).double().numpy() / 255
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    ref_file = toy_reference_file(cache_dir)
    mu_ref, sigma_ref = load_reference(ref_file)
    covmean = linalg.sqrtm(sigma @ sigma_ref).real
    expected = ((mu - mu_ref) ** 2).sum() + np.trace(sigma + sigma_ref - 2 * covmean)
    assert results["metrics"]["fid"] == pytest.approx(expected, rel=1e-3)


def test_reference_statistics_are_the_real_images_statistics(cache_dir, default_run):
    adapter = ToyAdapter(shape=(3, 8, 8), n_modes=10, seed=0)
    ref_file = toy_reference_file(cache_dir)
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
    assert results_of(tmp_path / "null_class")["conditional"] is False
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


def test_ddp_sim_gives_the_same_pngs_and_fid(tmp_path, cache_dir):
    args = [*SMALL, "sampler=ddim_gmm", "gmm.n_components=4", f"paths.cache_dir={cache_dir}"]
    one = run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"])
    two = run_cli([*args, "trainer=ddp_sim", f"hydra.run.dir={tmp_path / 'two'}"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert results_of(tmp_path / "two")["devices"] == 2
    assert pngs(tmp_path / "one") == pngs(tmp_path / "two")
    metrics_one, metrics_two = (results_of(tmp_path / d)["metrics"] for d in ("one", "two"))
    assert metrics_one["fid"] == pytest.approx(metrics_two["fid"], rel=1e-6)
    # the feature bank gathers both ranks' rows in index order: the same PRDC, KID and features.npz
    for name in ("precision", "recall", "density", "coverage", "kid", "kid_std"):
        assert metrics_one[name] == pytest.approx(metrics_two[name], rel=1e-9), name
    (indices_one, features_one), (indices_two, features_two) = (
        load_features(tmp_path / d / "features.npz") for d in ("one", "two")
    )
    assert indices_two.tolist() == list(range(100)) and np.array_equal(indices_one, indices_two)
    assert np.allclose(features_one, features_two)


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
    assert "media/images/grid" in history["grid/filenames"]
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
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/grid_*.png"))


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


def test_optimized_metric_is_returned_to_the_sweeper(tmp_path, cache_dir, capsys):
    from ddim_gmm_exp.cli import run_task

    cfg = compose_config([*SMALL, "logger=none", "optimized_metric=fid"], tmp_path / "a", cache_dir)
    assert run_task(cfg) == results_of(tmp_path / "a")["metrics"]["fid"]
    cfg = compose_config([*SMALL, "logger=none", "optimized_metric=fid_digits"], tmp_path / "b", cache_dir)
    with pytest.raises(SystemExit) as exit_info:
        run_task(cfg)
    assert exit_info.value.code == 2
    assert "optimized_metric='fid_digits' is not among this run's metrics" in capsys.readouterr().err


def test_wandb_run_is_finished_on_error(tmp_path, cache_dir, monkeypatch, caplog):
    """...and an interrupted run says how to resume it, with its own directory."""
    import wandb

    from ddim_gmm_exp.module import SamplingModule

    def broken(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(SamplingModule, "predict_step", broken)
    cfg = compose_config([*SMALL, "logger=wandb"], tmp_path, cache_dir)
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg)
    assert wandb.run is None
    assert f"resume with: python run.py resume=true hydra.run.dir={tmp_path}" in caplog.text
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    for _ in range(300):
        exits = [r.exit.exit_code for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
        if exits:
            break
        time.sleep(0.1)
    assert exits == [1]
