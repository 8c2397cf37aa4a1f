"""FID reference statistics and their caches: keyed by what decides them (the images' content and
the extractor's weights), validated before use, never holding non-finite statistics."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.metrics import (
    PixelFeatures,
    cached_reference,
    check_reference,
    extractor_key,
    folder_reference,
    load_reference,
    load_reference_features,
    statistics_of,
)


class LinearFeatures(torch.nn.Module):
    """A digit-classifier-like extractor: fixed random weights over the pixels (seeded)."""

    num_features = 4

    def __init__(self, seed: int, in_features: int = 3 * 4 * 4) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_features, self.num_features)
        generator = torch.Generator().manual_seed(seed)
        for parameter in self.linear.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1).float() / 255).double()


class NaNFeatures(PixelFeatures):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.full((len(images), self.num_features), float("nan"), dtype=torch.float64)


class Adapter:
    """The part of a model adapter the reference cache uses."""

    def reference_images(self, n: int) -> torch.Tensor:
        return random_images(n, seed=7)


def random_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def write_folder(folder, images) -> None:
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


def own_mu(extractor, images) -> np.ndarray:
    with torch.no_grad():
        return extractor(images).numpy().mean(0)


def test_extractors_with_other_weights_do_not_share_a_folder_cache(tmp_path):
    images = random_images(30, 0)
    write_folder(tmp_path / "imgs", images)
    first, second = LinearFeatures(seed=1), LinearFeatures(seed=2)
    path_1 = folder_reference(tmp_path / "imgs", first, tmp_path / "cache")
    path_2 = folder_reference(tmp_path / "imgs", second, tmp_path / "cache")
    assert path_1 != path_2
    assert np.allclose(load_reference(path_1)[0], own_mu(first, images))
    assert np.allclose(load_reference(path_2)[0], own_mu(second, images))
    # the same weights in another instance do share it
    assert folder_reference(tmp_path / "imgs", LinearFeatures(seed=1), tmp_path / "cache") == path_1


def test_extractors_with_other_weights_do_not_share_a_model_cache(tmp_path):
    first, second = LinearFeatures(seed=1), LinearFeatures(seed=2)
    path_1 = cached_reference(Adapter(), first, "toy", tmp_path, 20)
    path_2 = cached_reference(Adapter(), second, "toy", tmp_path, 20)
    assert path_1 != path_2
    assert np.allclose(load_reference(path_2)[0], own_mu(second, Adapter().reference_images(20)))


def test_images_replaced_with_older_mtimes_invalidate_the_folder_cache(tmp_path):
    folder = tmp_path / "imgs"
    write_folder(folder, random_images(30, 0))
    extractor = PixelFeatures(48)
    stale = folder_reference(folder, extractor, tmp_path / "cache")
    mtimes = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    replacement = random_images(30, 1)
    write_folder(folder, replacement)
    for path in folder.iterdir():  # as tar -x or rsync -a leave them: their own, older mtimes
        os.utime(path, ns=(mtimes[path.name], mtimes[path.name]))
    fresh = folder_reference(folder, extractor, tmp_path / "cache")
    assert fresh != stale
    assert np.allclose(load_reference(fresh)[0], own_mu(extractor, replacement))


def test_renamed_images_change_the_folder_key(tmp_path):
    folder = tmp_path / "imgs"
    write_folder(folder, random_images(4, 0))
    before = folder_reference(folder, PixelFeatures(48), tmp_path / "cache")
    (folder / "000.png").rename(folder / "zzz.png")
    assert folder_reference(folder, PixelFeatures(48), tmp_path / "cache") != before


def test_the_inception_key_follows_the_weights_file(tmp_path):
    """No Inception weights exist offline: the key function is tested on stand-in files."""
    (tmp_path / "a.pth").write_bytes(b"weights a")
    (tmp_path / "b.pth").write_bytes(b"weights b")
    (tmp_path / "copy_of_a.pth").write_bytes(b"weights a")
    key_a = extractor_key(2048, str(tmp_path / "a.pth"))
    assert key_a != extractor_key(2048, str(tmp_path / "b.pth"))
    assert key_a != extractor_key(768, str(tmp_path / "a.pth"))
    assert key_a == extractor_key(2048, str(tmp_path / "copy_of_a.pth"))  # the same bytes: the same features


def test_the_cache_stores_its_key_and_recomputes_a_file_made_under_another(tmp_path, caplog):
    path = cached_reference(Adapter(), PixelFeatures(48), "toy", tmp_path, 20)
    with np.load(path) as data:
        key = str(data["key"])
    assert "toy" in key and "n=20" in key and "PixelFeatures-48" in key
    mu, sigma = load_reference(path)
    np.savez(path, mu=mu + 1, sigma=sigma)  # an old cache without a key, wrong contents
    with caplog.at_level(logging.WARNING):
        assert cached_reference(Adapter(), PixelFeatures(48), "toy", tmp_path, 20) == path
    assert "has no key" in caplog.text and str(path) in caplog.text
    assert np.allclose(load_reference(path)[0], mu)


def test_a_cache_with_its_key_but_nan_statistics_is_recomputed(tmp_path, caplog):
    path = cached_reference(Adapter(), PixelFeatures(48), "toy", tmp_path, 20)
    with np.load(path) as data:
        key, mu, sigma = str(data["key"]), data["mu"], data["sigma"]
    np.savez(path, mu=np.full_like(mu, np.nan), sigma=sigma, key=np.array(key))
    with caplog.at_level(logging.WARNING):
        cached_reference(Adapter(), PixelFeatures(48), "toy", tmp_path, 20)
    assert "not finite" in caplog.text and "recomputing" in caplog.text
    assert np.array_equal(load_reference(path)[0], mu)


def test_a_cache_without_features_is_recomputed_with_them(tmp_path, caplog):
    """PRDC and KID need the real features: a file of mu and sigma alone (made before they were
    kept) is made again, and then holds the features whose statistics it holds."""
    path = cached_reference(Adapter(), PixelFeatures(48), "toy", tmp_path, 20)
    with np.load(path) as data:
        key, mu, sigma, features = str(data["key"]), data["mu"], data["sigma"], data["features"]
    assert features.shape == (20, 48) and features.dtype == np.float32
    assert np.allclose(features.mean(0), mu, atol=1e-6)
    np.savez(path, mu=mu, sigma=sigma, key=np.array(key))
    with caplog.at_level(logging.WARNING):
        cached_reference(Adapter(), PixelFeatures(48), "toy", tmp_path, 20)
    assert "holds no features" in caplog.text and "recomputing" in caplog.text
    assert np.array_equal(load_reference_features(path), features)


def test_non_finite_statistics_are_refused_and_never_cached(tmp_path):
    with pytest.raises(ConfigError, match="not finite"):
        cached_reference(Adapter(), NaNFeatures(48), "toy", tmp_path, 20)
    assert not list(tmp_path.iterdir())


def test_fewer_than_two_reference_images_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="reference_samples=1 is too few"):
        cached_reference(Adapter(), PixelFeatures(48), "toy", tmp_path, 1)
    with pytest.raises(ConfigError, match="at least 2 images"):
        statistics_of(PixelFeatures(48), [random_images(1, 0)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("mu", "sigma", "message"),
    [
        (np.zeros(2), np.eye(2), "have feature dimension 2 but the FID feature extractor gives 3"),
        (np.zeros(3), np.eye(3)[:2], "have a sigma of shape \\(2, 3\\), not \\(3, 3\\)"),
        (np.array([0.0, np.nan, 0.0]), np.eye(3), "are not finite"),
        (np.zeros(3), np.eye(3) + np.triu(np.ones((3, 3)), 1), "have a covariance \\(sigma\\) that is not symmetric"),
    ],
)
def test_bad_reference_statistics_are_refused_naming_their_file(mu, sigma, message):
    with pytest.raises(ConfigError, match=f"reference statistics in 'ref.npz' {message}"):
        check_reference(mu, sigma, 3, "in 'ref.npz'")


def test_a_singular_reference_covariance_is_warned_about(caplog):
    features = np.random.default_rng(0).normal(size=(5, 8))  # 5 images, 8 features: rank 4
    with caplog.at_level(logging.WARNING):
        check_reference(features.mean(0), np.cov(features, rowvar=False), 8, "of 5 images")
    (record,) = caplog.records
    assert "singular (rank 4 of 8 varying features)" in record.getMessage()
    assert "metrics.fid.reference_samples" in record.getMessage()
    caplog.clear()
    # constant features (a classifier's dead units) are no reason to warn: more images cannot help
    features = np.concatenate([np.random.default_rng(0).normal(size=(50, 8)), np.zeros((50, 3))], axis=1)
    with caplog.at_level(logging.WARNING):
        check_reference(features.mean(0), np.cov(features, rowvar=False), 11, "of 50 images")
    assert not caplog.records
