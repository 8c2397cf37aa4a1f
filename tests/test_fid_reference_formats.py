"""FID references as the field ships them (metrics.reference_file_for): EDM's and ADM's statistics
(mu, sigma) used as they are, ADM's reference batch (arr_0, uint8 NHWC images) featurised once and
cached exactly like the same images in a folder, and every other file refused in one line."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers.runs import ROOT, compose_config
from PIL import Image
from scipy import linalg

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.metrics import (
    PixelFeatures,
    adm_batch_images,
    folder_reference,
    holds_images,
    load_features,
    load_reference,
    load_reference_features,
    reference_file_for,
)


class CountingPixels(PixelFeatures):
    """Pixel features that count the images they featurise (a cache hit featurises none)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        return super().forward(images)


def nhwc_images(n: int, size: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_folder(folder, images: np.ndarray) -> None:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")


def pixel_features(images: np.ndarray) -> np.ndarray:
    """PixelFeatures, independently: each image's C x H x W pixels over 255."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1) / 255


def test_edm_statistics_are_used_as_they_are(tmp_path):
    np.savez(tmp_path / "edm.npz", mu=np.zeros(48), sigma=np.eye(48))
    assert reference_file_for(tmp_path / "edm.npz", PixelFeatures(48), tmp_path / "cache") == tmp_path / "edm.npz"
    assert not (tmp_path / "cache").exists()  # nothing featurised, nothing cached
    # only images (a folder, an ADM batch) serve another feature space (DINOv2's)
    np.savez(tmp_path / "adm.npz", arr_0=nhwc_images(2))
    assert holds_images(tmp_path / "adm.npz") and holds_images(tmp_path)
    assert not holds_images(tmp_path / "edm.npz") and not holds_images(tmp_path / "missing.npz")


def test_an_adm_batch_gives_what_a_folder_of_the_same_images_gives_and_is_cached(tmp_path):
    images = nhwc_images(30)
    np.savez(tmp_path / "adm.npz", arr_0=images)
    write_folder(tmp_path / "pngs", images)
    extractor = CountingPixels(48)
    from_folder = folder_reference(tmp_path / "pngs", extractor, tmp_path / "cache")
    from_adm = reference_file_for(tmp_path / "adm.npz", extractor, tmp_path / "cache")
    assert from_adm != from_folder and from_adm.parent == tmp_path / "cache"
    expected = pixel_features(images)
    np.testing.assert_allclose(load_reference_features(from_adm), expected, rtol=1e-6)
    np.testing.assert_allclose(load_reference_features(from_adm), load_reference_features(from_folder), rtol=0)
    numpy_statistics = (expected.mean(0), np.cov(expected, rowvar=False))
    for adm, folder, numpy in zip(load_reference(from_adm), load_reference(from_folder), numpy_statistics, strict=True):
        np.testing.assert_allclose(adm, folder, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(adm, numpy, rtol=1e-10, atol=1e-14)
    assert extractor.images_seen == 60
    # the second call reads the cache (keyed by the file's sha256 and the extractor): nothing featurised
    assert reference_file_for(tmp_path / "adm.npz", extractor, tmp_path / "cache") == from_adm
    assert extractor.images_seen == 60


@pytest.mark.parametrize(
    "save", [np.savez, np.savez_compressed, lambda path, arr_0: np.savez(path, arr_0=np.asfortranarray(arr_0))]
)
def test_adm_images_are_streamed_in_file_order_however_the_npz_was_written(tmp_path, save):
    images = nhwc_images(10)
    save(tmp_path / "adm.npz", arr_0=images)
    batches = list(adm_batch_images(tmp_path / "adm.npz", batch=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_an_adm_batch_with_both_uses_its_statistics_only_in_their_own_dimension(tmp_path):
    """ADM's own files hold arr_0 and TF-Inception mu/sigma (2048): those where the run's features
    have their dimension, the images featurised where they have another (as DINOv2's)."""
    images = nhwc_images(30)
    mu, sigma = np.arange(48.0), np.eye(48)
    np.savez(tmp_path / "same.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    assert reference_file_for(tmp_path / "same.npz", PixelFeatures(48), tmp_path / "cache") == tmp_path / "same.npz"
    np.testing.assert_array_equal(load_reference(tmp_path / "same.npz")[0], mu)
    np.savez(tmp_path / "other.npz", arr_0=images, mu=np.zeros(7), sigma=np.eye(7))
    path = reference_file_for(tmp_path / "other.npz", PixelFeatures(48), tmp_path / "cache")
    assert path.parent == tmp_path / "cache"
    np.testing.assert_allclose(load_reference(path)[0], pixel_features(images).mean(0), rtol=1e-10)


@pytest.mark.parametrize(
    "arrays,message",
    [
        (
            {"images": nhwc_images(3)},
            "is neither EDM/ADM statistics (mu, sigma) nor an ADM reference batch (arr_0): keys found ['images']; "
            "the run's features have dimension 48",
        ),
        ({"mu": np.zeros(7), "sigma": np.eye(7)}, "have feature dimension 7 but the FID feature extractor gives 48"),
        ({"arr_0": nhwc_images(3).astype(np.float32)}, "arr_0 has dtype float32: reference images must be uint8"),
        ({"arr_0": np.array([b"x", None], dtype=object)}, "arr_0 has dtype object: reference images must be uint8"),
        ({"arr_0": nhwc_images(3).transpose(0, 3, 1, 2)}, "arr_0 has shape (3, 3, 4, 4): reference images must be N"),
        ({"arr_0": nhwc_images(3)[..., 0]}, "arr_0 has shape (3, 4, 4): reference images must be N x H x W x C"),
        ({"arr_0": nhwc_images(1)}, "arr_0 holds 1 image(s): reference statistics need at least 2"),
    ],
    ids=["no_known_keys", "other_dimension", "float_images", "object_array", "nchw", "no_channels", "one_image"],
)
def test_a_bad_reference_file_is_refused_in_one_line_before_anything_is_featurised(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    extractor = CountingPixels(48)
    with pytest.raises(ConfigError) as err:
        reference_file_for(tmp_path / "bad.npz", extractor, tmp_path / "cache")
    assert message in str(err.value) and "bad.npz" in str(err.value) and "\n" not in str(err.value)
    assert extractor.images_seen == 0 and not (tmp_path / "cache").exists()


def test_a_missing_or_non_npz_reference_is_refused_naming_the_setting(tmp_path):
    (tmp_path / "notes.txt").write_text("not an npz")
    with pytest.raises(ConfigError, match=r"metrics.dinov2.reference='.*notes.txt' is not an .npz"):
        reference_file_for(tmp_path / "notes.txt", PixelFeatures(48), tmp_path, setting="metrics.dinov2.reference")
    with pytest.raises(ConfigError, match=r"metrics.fid.reference='.*gone.npz' does not exist: give a folder"):
        reference_file_for(tmp_path / "gone.npz", PixelFeatures(48), tmp_path)


def test_a_run_against_an_adm_batch_scores_as_against_the_same_images_in_a_folder(tmp_path):
    """Through the runner: FID against the ADM batch equals, by scipy, the Frechet distance of the run's
    own features to the folder's statistics; PRDC and KID have the batch's features."""
    from ddim_gmm_exp.runner import run

    images = nhwc_images(40, size=8, seed=1)  # the toy's 3 x 8 x 8 images: 192 pixel features
    np.savez(tmp_path / "adm.npz", arr_0=images)
    write_folder(tmp_path / "pngs", images)
    overrides = [
        "model=toy",
        "data.num_samples=20",
        "data.batch_size=20",
        "sampler.steps=2",
        "logger=none",
        "save_images=false",
        "metrics.fid.min_samples=20",
        f"metrics.fid.reference={tmp_path / 'adm.npz'}",
    ]
    results = run(compose_config(overrides, tmp_path / "out", tmp_path / "cache"))
    mu_ref, sigma_ref = load_reference(folder_reference(tmp_path / "pngs", PixelFeatures(192), tmp_path / "cache2"))
    features = load_features(tmp_path / "out" / "features.npz")[1].astype(np.float64)
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    expected = ((mu - mu_ref) ** 2).sum() + np.trace(sigma + sigma_ref - 2 * linalg.sqrtm(sigma @ sigma_ref).real)
    assert np.isfinite(results["metrics"]["fid"])
    assert results["metrics"]["fid"] == pytest.approx(expected, rel=1e-4)
    assert "fid_ref_adm_" in results["reference_features_file"] and "diversity_skipped" not in results
    assert np.isfinite(results["metrics"]["kid"]) and 0 <= results["metrics"]["precision"] <= 1


def test_fid_stats_makes_statistics_of_an_adm_batch(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fid_stats", ROOT / "scripts" / "fid_stats.py")
    fid_stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid_stats)
    images = nhwc_images(12)
    np.savez(tmp_path / "adm.npz", arr_0=images)
    out = tmp_path / "ref.npz"
    assert fid_stats.main(["--images", str(tmp_path / "adm.npz"), "--features", "pixels", "--out", str(out)]) == 0
    expected = pixel_features(images)
    np.testing.assert_allclose(load_reference_features(out), expected, rtol=1e-6)
    np.testing.assert_allclose(load_reference(out)[1], np.cov(expected, rowvar=False), rtol=1e-10, atol=1e-14)
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.int16))
    args = ["--images", str(tmp_path / "bad.npz"), "--features", "pixels", "--out", str(tmp_path / "no.npz")]
    assert fid_stats.main(args) == 2
    assert "error: --images=" in capsys.readouterr().err and not (tmp_path / "no.npz").exists()
    # Inception weights that are not there: named by this script's option, not the runner's setting
    args = ["--images", str(tmp_path / "adm.npz"), "--weights-path", str(tmp_path / "none.pth"), "--out", str(out)]
    assert fid_stats.main([*args[:-1], str(tmp_path / "inception.npz")]) == 2
    assert f"error: --weights-path {str(tmp_path / 'none.pth')!r} does not exist" in capsys.readouterr().err
