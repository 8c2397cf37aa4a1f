"""Precision/recall, density/coverage and KID, pinned against independent computations; the
feature bank and features.npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.metrics import (
    DiversitySettings,
    FeatureBank,
    MetricSuite,
    PixelFeatures,
    diversity_problem,
    kernel_inception_distance,
    kid_subset_size,
    load_features,
    prdc_samples,
    precision_recall_density_coverage,
    save_features,
)


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """METHOD.md's definitions, one point at a time: radii are the distance to the k-th nearest
    other point of the same set (the point itself excluded, a duplicate of it not)."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(((a - b) ** 2).sum()))

    def radii(points: np.ndarray) -> list[float]:
        out = []
        for i, p in enumerate(points):
            others = sorted(dist(p, q) for j, q in enumerate(points) if j != i)
            out.append(others[k - 1])
        return out

    r_real, r_fake = radii(real), radii(fake)
    precision = np.mean([any(dist(g, r) < rr for r, rr in zip(real, r_real, strict=True)) for g in fake])
    recall = np.mean([any(dist(r, g) < rg for g, rg in zip(fake, r_fake, strict=True)) for r in real])
    density = np.mean([sum(dist(g, r) < rr for r, rr in zip(real, r_real, strict=True)) for g in fake]) / k
    coverage = np.mean([min(dist(r, g) for g in fake) < rr for r, rr in zip(real, r_real, strict=True)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def clustered(n: int, centres: np.ndarray, sizes: list[int], seed: int) -> np.ndarray:
    """n points: clusters of the given sizes around centres, the rest spread wide."""
    rng = np.random.default_rng(seed)
    parts = [c + 0.1 * rng.standard_normal((s, centres.shape[1])) for c, s in zip(centres, sizes, strict=True)]
    rest = n - sum(sizes)
    parts.append(3 * rng.standard_normal((rest, centres.shape[1])))
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_equals_the_definitions_one_point_at_a_time(k):
    rng = np.random.default_rng(0)
    centres = 2 * rng.standard_normal((3, 4))
    # clusters of 2 and 3 points: k = 3 and 5 reach beyond them
    real = clustered(40, centres, [2, 3, 10], seed=1)
    fake = clustered(30, centres + 0.3, [3, 2, 4], seed=2)
    real[7] = real[8]  # ties: a duplicated real point, and a generated point on a real one
    fake[5] = real[20]
    fake[6] = fake[9]
    got = precision_recall_density_coverage(real, fake, k)
    expected = brute_force_prdc(real, fake, k)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1  # not a degenerate case


def test_prdc_of_a_set_against_itself_and_a_far_one():
    real = np.random.default_rng(3).standard_normal((50, 5)).astype(np.float32)
    same = precision_recall_density_coverage(real, real, 5)
    assert same["precision"] == 1 and same["recall"] == 1 and same["coverage"] == 1
    far = precision_recall_density_coverage(real, real + 100, 5)
    assert far == {"precision": 0, "recall": 0, "density": 0, "coverage": 0}


def numpy_kid(real: np.ndarray, fake: np.ndarray, subsets: int, size: int, seed: int) -> tuple[float, float]:
    """Unbiased MMD^2 with the kernel (x.y / F + 1)^3, averaged over subsets drawn as torchmetrics
    draws them (torch.randperm of the real, then the generated set, per subset, from the seed)."""
    torch.manual_seed(seed)
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    features = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real)).numpy()[:size]]
        y = fake[torch.randperm(len(fake)).numpy()[:size]]
        kxx, kyy, kxy = ((a @ b.T / features + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        m = size
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.sum() / m**2)
    return float(np.mean(values)), float(np.std(values))


def test_kid_equals_an_independent_unbiased_mmd_on_the_same_subsets():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((120, 6)).astype(np.float32)
    fake = (rng.standard_normal((90, 6)) * 1.3 + 0.4).astype(np.float32)
    before = torch.random.get_rng_state()
    kid, kid_std = kernel_inception_distance(real, fake, subsets=7, subset_size=50, seed=11)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left as it was
    expected, expected_std = numpy_kid(real, fake, 7, 50, seed=11)
    assert kid == pytest.approx(expected, rel=1e-9)
    assert kid_std == pytest.approx(expected_std, rel=1e-9)
    assert kid > 0
    # and torchmetrics' own class, on the same features and global seed
    from torchmetrics.image.kid import KernelInceptionDistance

    from ddim_gmm_exp.metrics import GivenFeatures

    direct = KernelInceptionDistance(feature=GivenFeatures(6), subsets=7, subset_size=50)
    direct.update(torch.from_numpy(real).double(), real=True)
    direct.update(torch.from_numpy(fake).double(), real=False)
    torch.manual_seed(11)
    assert kid == pytest.approx(float(direct.compute()[0]), rel=1e-12)
    # another seed: other subsets
    assert kernel_inception_distance(real, fake, 7, 50, seed=12)[0] != kid


def test_kid_subset_size_defaults_to_what_both_sides_have():
    assert kid_subset_size(None, 1797, 400) == 400
    assert kid_subset_size(None, 50_000, 50_000) == 1000
    assert kid_subset_size(64, 1797, 400) == 64


def test_diversity_problems_name_their_setting():
    assert diversity_problem(DiversitySettings(), 1797, 400) is None
    problem = diversity_problem(DiversitySettings(prdc_k=5), 1797, 5)
    assert problem.startswith("metrics.prdc.k=5") and "k <= 4" in problem
    problem = diversity_problem(DiversitySettings(kid_subset_size=500), 1797, 400)
    assert problem.startswith("metrics.kid.subset_size=500") and "at most 400" in problem
    assert diversity_problem(DiversitySettings(prdc=False, kid=False, prdc_k=50, kid_subset_size=9999), 10, 10) is None


def test_feature_bank_is_in_index_order_once_per_index():
    bank = FeatureBank()
    bank.update(torch.tensor([[3.0], [1.0]]), torch.tensor([3, 1]))
    bank.update(torch.tensor([[0.0], [2.0], [9.0]]), torch.tensor([0, 2, 3]))  # 3 again: its first row stays
    indices, features = bank.compute()
    assert indices.tolist() == [0, 1, 2, 3]
    assert features[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_suite_gives_prdc_and_kid_in_fids_features_and_keeps_them():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (200, 1, 2, 3), generator=g, dtype=torch.uint8)
    fake = torch.randint(40, 256, (150, 1, 2, 3), generator=g, dtype=torch.uint8)
    real_features = real.flatten(1).double().numpy() / 255
    reference = (real_features.mean(0), np.cov(real_features, rowvar=False))
    settings = DiversitySettings(prdc_k=4, kid_subsets=10)
    suite = MetricSuite(PixelFeatures(6), reference, reference_features=real_features, diversity=settings, seed=5)
    suite.reset_and_load_reference(global_rank=0)
    order = torch.randperm(150, generator=g)
    for chunk in order.split(40):  # batches in any order
        suite.update(fake[chunk], indices=chunk)
    out = suite.compute()
    fake_features = fake.flatten(1).double().numpy() / 255
    # equal sets: all 150 generated and 150 of the 200 reference samples, one fixed draw
    real_used, fake_used = prdc_samples(real_features, fake_features, 10_000)
    assert len(real_used) == len(fake_used) == 150
    assert np.array_equal(real_used, prdc_samples(real_features, fake_features[:150], 10_000)[0])
    expected = precision_recall_density_coverage(real_used, fake_used, 4)
    for name, value in expected.items():
        assert out[name] == pytest.approx(value, abs=1e-12)
    assert out["kid"] == pytest.approx(kernel_inception_distance(real_features, fake_features, 10, 150, 5)[0])
    indices, features = suite.spaces[0].generated
    assert indices.tolist() == list(range(150))
    assert np.allclose(features, fake_features.astype(np.float32))
    # a reference of mu and sigma only: FID alone
    fid_only = MetricSuite(PixelFeatures(6), reference)
    fid_only.reset_and_load_reference(global_rank=0)
    fid_only.update(fake)
    assert set(fid_only.compute()) == {"fid"}


def test_saved_features_round_trip_and_a_resume_appends_without_duplicates(tmp_path):
    path = tmp_path / "features.npz"
    save_features(path, np.array([2, 0]), np.array([[2.0, 2.0], [0.0, 0.0]]))
    indices, features = load_features(path)
    assert indices.tolist() == [0, 2] and features.dtype == np.float32
    assert features.tolist() == [[0.0, 0.0], [2.0, 2.0]]
    save_features(path, np.array([1, 2]), np.array([[1.0, 1.0], [5.0, 5.0]]))  # 2 rescored: the new row
    indices, features = load_features(path)
    assert indices.tolist() == [0, 1, 2]
    assert features[:, 0].tolist() == [0.0, 1.0, 5.0]
    assert (path.stat().st_mode & 0o044) == 0o044  # readable as any other results file
    assert not list(tmp_path.glob(".*tmp"))


def test_prdc_compares_equal_sets_capped_at_max_samples():
    real, fake = np.arange(40.0)[:, None], np.arange(30.0)[:, None] + 0.5
    real_used, fake_used = prdc_samples(real, fake, 10)
    assert fake_used[:, 0].tolist() == (np.arange(10) + 0.5).tolist()  # the first 10 generated, by index
    assert len(real_used) == 10 and len(set(real_used[:, 0])) == 10
    assert prdc_samples(real[:5], fake, 10)[0].shape == (5, 1)  # fewer reference samples: all of them


def test_kid_subset_size_beyond_the_samples_is_refused():
    with pytest.raises(ConfigError, match="metrics.kid.subset_size=2000"):
        from ddim_gmm_exp.runner import diversity_notes

        diversity_notes(DiversitySettings(kid_subset_size=2000), "ref.npz", np.zeros((1797, 3)), 1000)
