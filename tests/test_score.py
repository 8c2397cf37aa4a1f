"""scripts/score.py: a run rescored from its features reproduces its numbers, never samples, and
takes only metric settings; a sweep's jobs are rescored and its summary written again."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from helpers.runs import ROOT, SMALL, compose_config, results_of

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.metrics import load_features
from ddim_gmm_exp.runner import run
from ddim_gmm_exp.score import score_run


def score_main():
    spec = importlib.util.spec_from_file_location("score_script", ROOT / "scripts" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """Two toy runs (seeds 0 and 1) as the jobs of a sweep directory."""
    root = tmp_path_factory.mktemp("sweep")
    for seed in (0, 1):
        cfg = compose_config([*SMALL, f"data.seed={seed}", f"paths.cache_dir={cache_dir}"], root / str(seed), cache_dir)
        run(cfg)
    return root


def test_a_run_keeps_its_features_in_index_order(sweep):
    results = results_of(sweep / "0")
    indices, features, key = load_features(sweep / "0" / "features.npz", with_key=True)
    assert indices.tolist() == list(range(100)) and features.shape == (100, 192)
    assert results["features_file"] == str(sweep / "0" / "features.npz") and key.startswith("ddim_gmm_exp.")
    assert {"precision", "recall", "density", "coverage", "kid", "kid_std"} <= set(results["metrics"])
    assert results["prdc_k"] == 5 and results["prdc_samples"] == 100 and results["kid_subset_size"] == 100
    # the PNGs' pixel features are the saved ones (toy: PixelFeatures)
    from ddim_gmm_exp.images import load_png, png_path

    assert np.allclose(features[7], load_png(png_path(sweep / "0" / "samples", 7)).flatten().numpy() / 255)


def test_rescoring_reproduces_the_runs_numbers_without_sampling(sweep, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "0", run_dir)
    before = results_of(run_dir)
    shutil.rmtree(run_dir / "samples")  # FID, PRDC and KID need only the features (toy has no other metric)
    scored = score_run(run_dir, [f"paths.cache_dir={cache_dir}"])
    assert scored["source"] == "features.npz"
    # the same features in another batching: equal to float32 precision (FID's output dtype)
    assert scored["after"] == pytest.approx(before["metrics"], rel=1e-6)
    assert results_of(run_dir)["metrics"] == scored["after"]
    assert results_of(run_dir)["rescored"]["features"] == "features.npz"


def test_rescoring_from_pngs_alone_reproduces_them_too(sweep, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "1", run_dir)
    (run_dir / "features.npz").unlink()
    scored = score_run(run_dir, [f"paths.cache_dir={cache_dir}"])
    assert scored["source"] == "the PNGs"
    assert scored["after"] == pytest.approx(results_of(sweep / "1")["metrics"], rel=1e-6)
    assert (run_dir / "features.npz").is_file()


def test_a_metric_setting_rescored_changes_only_what_it_decides(sweep, tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "0", run_dir)
    before = results_of(run_dir)
    assert score_main()([str(run_dir), "metrics.prdc.k=2", f"paths.cache_dir={cache_dir}"]) == 0
    after = results_of(run_dir)
    assert after["prdc_k"] == 2 and after["settings"]["metrics.prdc.k"] == 2
    assert after["metrics"]["fid"] == before["metrics"]["fid"] and after["metrics"]["kid"] == before["metrics"]["kid"]
    assert after["metrics"]["density"] != before["metrics"]["density"]
    printed = capsys.readouterr().out
    assert "fid: " in printed and "(unchanged)" in printed
    assert f"density: {before['metrics']['density']:.6g} ->" in printed


@pytest.mark.parametrize(
    "args,message",
    [
        (["sampler.steps=3"], "'sampler.steps=3' cannot be given to a rescore"),
        (["metrics.prdc.k=0"], "metrics.prdc.k=0 is not allowed"),
        (["metrics.kid.subset_size=500"], "metrics.kid.subset_size=500 is more than the 100 generated"),
    ],
)
def test_bad_rescores_are_refused_and_change_nothing(sweep, tmp_path, cache_dir, capsys, args, message):
    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "0", run_dir)
    before = (run_dir / "results.json").read_bytes(), (run_dir / "features.npz").read_bytes()
    assert score_main()([str(run_dir), *args, f"paths.cache_dir={cache_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert ((run_dir / "results.json").read_bytes(), (run_dir / "features.npz").read_bytes()) == before


def test_a_folder_without_runs_is_refused(tmp_path, capsys):
    assert score_main()([str(tmp_path)]) == 2
    assert "holds no run of this project" in capsys.readouterr().err


def test_samples_of_another_config_are_refused(sweep, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "0", run_dir)
    (run_dir / "run_overrides.json").write_text(json.dumps([*SMALL[:-2], "sampler.steps=7", "logger=csv"]))
    with pytest.raises(ConfigError, match="holds a run of another config"):
        score_run(run_dir, [f"paths.cache_dir={cache_dir}"])


def test_a_sweep_is_rescored_job_by_job_and_summarised_again(sweep, tmp_path, cache_dir, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    assert score_main()([str(copy), f"paths.cache_dir={cache_dir}"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(features from features.npz)") == 2
    summary = (copy / "summary.md").read_text()
    assert "recall" in summary and "coverage" in summary and "kid" in summary


def test_a_resumed_run_keeps_every_index_once_in_its_features(sweep, tmp_path, cache_dir):
    """A run interrupted after half its PNGs and resumed: features.npz holds each of its samples
    once, and they are the uninterrupted run's features (the same samples)."""
    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "0", run_dir)
    indices_before, features_before = load_features(run_dir / "features.npz")
    for i in range(50, 100):
        (run_dir / "samples" / f"{i:06d}.png").unlink()
    (run_dir / "results.json").unlink()
    cfg = compose_config([*SMALL, "data.seed=0", f"paths.cache_dir={cache_dir}", "resume=true"], run_dir, cache_dir)
    results = run(cfg)
    assert results["sampled_this_run"] == 50
    indices, features = load_features(run_dir / "features.npz")
    assert indices.tolist() == list(range(100)) and np.array_equal(indices, indices_before)
    assert np.array_equal(features, features_before)
    assert results["metrics"]["fid"] == pytest.approx(results_of(sweep / "0")["metrics"]["fid"], rel=1e-6)


def test_a_reference_of_mu_and_sigma_only_gives_fid_and_says_why_not_prdc(sweep, tmp_path, cache_dir, caplog):
    """An EDM-style .npz without features: FID as before, PRDC and KID skipped with one warning
    line, and results.json says why."""
    import logging

    from ddim_gmm_exp.metrics import load_reference, save_reference

    # the toy's own reference (192 pixel features; the cache may hold other extractors' too)
    mu, sigma = next(r for r in map(load_reference, sorted(cache_dir.glob("fid_ref_*.npz"))) if r[0].shape == (192,))
    save_reference(tmp_path / "ref.npz", mu, sigma)
    overrides = [*SMALL, f"metrics.fid.reference={tmp_path / 'ref.npz'}", f"paths.cache_dir={cache_dir}"]
    with caplog.at_level(logging.WARNING):
        results = run(compose_config(overrides, tmp_path / "run", cache_dir))
    assert "fid" in results["metrics"] and "precision" not in results["metrics"] and "kid" not in results["metrics"]
    assert "holds mu and sigma only" in results["diversity_skipped"] and "prdc_k" not in results
    assert sum("PRDC/KID skipped" in r.getMessage() for r in caplog.records) == 1
    assert results["metrics"]["fid"] == pytest.approx(results_of(sweep / "0")["metrics"]["fid"], rel=1e-6)
