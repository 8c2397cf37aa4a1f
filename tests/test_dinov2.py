"""metrics=dinov2: FD, PRDC and KID in DINOv2 features, from a local Dinov2Model directory (a tiny
random one that the tests save themselves), beside the run's own FID space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.runs import SMALL, compose_config
from scipy import linalg

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.images import load_png, png_path
from ddim_gmm_exp.metrics import DINOv2Features, load_features, load_reference, load_reference_features
from ddim_gmm_exp.runner import run
from ddim_gmm_exp.score import score_run


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dinov2_run(tmp_path_factory, cache_dir, tiny_dinov2_dir):
    out = tmp_path_factory.mktemp("dinov2_run")
    overrides = [*SMALL, "metrics=dinov2", f"metrics.dinov2.path={tiny_dinov2_dir}", f"paths.cache_dir={cache_dir}"]
    return out, run(compose_config(overrides, out, cache_dir))


def test_features_are_the_cls_token_of_resized_normalised_images(tiny_dinov2_dir):
    from transformers import Dinov2Model

    extractor = DINOv2Features(str(tiny_dinov2_dir))
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    features = extractor(images)
    assert features.shape == (3, 16) and extractor.num_features == 16
    assert torch.equal(features, extractor(images.expand(-1, 3, -1, -1)))  # grayscale = its RGB repeat
    x = torch.nn.functional.interpolate(
        images.float().expand(-1, 3, -1, -1) / 255, size=(28, 28), mode="bicubic", antialias=True
    ).clamp(0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        direct = Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()(pixel_values=x)
    assert torch.allclose(features, direct.pooler_output, atol=1e-6)


def test_a_run_scores_in_both_spaces_and_keeps_both_features(dinov2_run, tiny_dinov2_dir):
    out, results = dinov2_run
    metrics = results["metrics"]
    names = ["fd_dinov2", "precision_dinov2", "recall_dinov2", "density_dinov2", "coverage_dinov2", "kid_dinov2"]
    assert {"fid", "precision", "kid", "kid_std", *names, "kid_dinov2_std"} <= set(metrics)
    indices, features = load_features(out / "features_dinov2.npz")
    assert indices.tolist() == list(range(100)) and features.shape == (100, 16)
    assert results["features_dinov2_file"] == str(out / "features_dinov2.npz")
    # the saved features are the PNGs' DINOv2 features, and FD is the Frechet distance of them to
    # the reference (the toy's real images in DINOv2 features, cached), computed with scipy
    extractor = DINOv2Features(str(tiny_dinov2_dir))
    images = torch.stack([load_png(png_path(out / "samples", i)) for i in range(100)])
    assert np.allclose(features, extractor(images).numpy(), atol=1e-5)
    reference_file = results["reference_features_dinov2_file"]
    mu_ref, sigma_ref = load_reference(reference_file)
    assert load_reference_features(reference_file).shape == (10000, 16)
    f = features.astype(np.float64)
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    expected = ((mu - mu_ref) ** 2).sum() + np.trace(sigma + sigma_ref - 2 * linalg.sqrtm(sigma @ sigma_ref).real)
    assert metrics["fd_dinov2"] == pytest.approx(expected, rel=1e-4)


def test_a_rescore_from_both_feature_files_reproduces_the_run(dinov2_run, tmp_path, cache_dir):
    import shutil

    out, results = dinov2_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "samples")
    scored = score_run(copy, [f"paths.cache_dir={cache_dir}"])
    assert scored["source"] == "features.npz and features_dinov2.npz"
    # FD comes out of torchmetrics in the features' float32: another batching of the same features
    # (two batches of 50 then, one of 100 now) may flip its last bit
    assert scored["after"] == pytest.approx(results["metrics"], rel=1e-6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["metrics=dinov2"], "metrics=dinov2 needs metrics.dinov2.path=DIR"),
        (["metrics=dinov2", "metrics.dinov2.path=/nonexistent/dinov2"], "metrics.dinov2.path='/nonexistent/dinov2'"),
        (["metrics=dinov2", "metrics.fid.enabled=false", "metrics.dinov2.path=."], "metrics.fid.enabled=false"),
    ],
)
def test_bad_dinov2_settings_are_refused_before_sampling(overrides, message, tmp_path, cache_dir):
    cfg = compose_config([*SMALL, *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "samples").exists()


def test_a_directory_without_a_dinov2_model_is_named(tmp_path):
    with pytest.raises(ConfigError, match="holds no Dinov2Model"):
        DINOv2Features(str(tmp_path))
