"""The paper's kernel (construction="paper", METHOD.md eqs. 7, 9-12, 34): each equation pinned."""

import pytest
import torch

from ddim_gmm_exp.gmm import GMM

PRIORS = [True, False]  # uniform_priors


def paper(dim=64, k=8, scale=1.0, orthonormal=True, upper=False, uniform=True, n_steps=2, **kw):
    return GMM(dtype=torch.float64).initialize(
        dim=dim,
        n_components=k,
        n_steps=n_steps,
        scale=scale,
        orthonormal=orthonormal,
        upper_bound_vars=upper,
        uniform_priors=uniform,
        **kw,
    )


def component_variances(gmm, i, sigma):
    """max(sigma^2 - v_k, 0) (K, D), measured through the kernel's own perturbation:
    perturbation(z = 1) - perturbation(z = 0) is the component std of every coordinate."""
    k, d = gmm.hparams.n_components, gmm.hparams.dim
    components = torch.arange(k)
    ones = torch.ones(k, d, dtype=torch.float64)
    std = gmm.perturbation(i, sigma, ones, components) - gmm.perturbation(i, sigma, 0 * ones, components)
    return std**2


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 10.0])
@pytest.mark.parametrize("uniform", PRIORS)
def test_rand_offsets_have_norm_exactly_s(scale, uniform):
    gmm = paper(scale=scale, orthonormal=False, uniform=uniform)
    for i in range(2):
        norms = gmm.offsets(i).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, scale), rtol=1e-12)
        # eq. 9 centres O before normalising: the weighted mean is small but not zero (reported, not altered)
        pi = gmm.step_parameters(i)["priors"]
        assert 0 < (pi @ gmm.offsets(i)).norm() < scale


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("uniform", PRIORS)
def test_ortho_offsets_have_zero_mean_and_the_eq10_norms(scale, uniform):
    gmm = paper(scale=scale, orthonormal=True, uniform=uniform)
    for i in range(2):
        delta, pi = gmm.offsets(i), gmm.step_parameters(i)["priors"]
        assert (pi @ delta).abs().max() < 1e-12 * scale
        expected = scale * (1 - 2 * pi + (pi**2).sum()).sqrt()
        assert torch.allclose(delta.norm(dim=1), expected, rtol=1e-10)
        # the offsets are s (U e_k - U pi) for an orthonormal U, so their Gram matrix is
        # s^2 (I - 1 pi^T - pi 1^T + (pi.pi) 1 1^T)
        gram = (delta / scale) @ (delta / scale).T
        ones = torch.ones_like(pi)
        expected_gram = torch.eye(len(pi), dtype=pi.dtype) - torch.outer(ones, pi) - torch.outer(pi, ones)
        expected_gram += (pi @ pi) * torch.outer(ones, ones)
        assert torch.allclose(gram, expected_gram, atol=1e-12)


@pytest.mark.parametrize("orthonormal", [True, False])
@pytest.mark.parametrize("uniform", PRIORS)
def test_eq11_mixture_variance_is_sigma_squared_where_nothing_clips(orthonormal, uniform):
    gmm = paper(scale=0.5, orthonormal=orthonormal, uniform=uniform)
    delta, pi = gmm.offsets(0), gmm.step_parameters(0)["priors"]
    weighted_square = pi @ delta**2  # sum_l pi_l delta_l^2
    sigma = 1.5 * float((weighted_square / (len(pi) * pi.min())).max().sqrt())  # above every v_k
    variances = component_variances(gmm, 0, sigma)
    # eq. 11: v_k = (1 / (K pi_k)) sum_l pi_l delta_l^2
    assert torch.allclose(sigma**2 - variances, weighted_square / (len(pi) * pi[:, None]), rtol=1e-9)
    second_moment = pi @ (variances + delta**2)  # per coordinate, around m
    assert torch.allclose(second_moment, torch.full_like(second_moment, sigma**2), rtol=1e-9)
    assert gmm.step_clipped_fraction(0, sigma) == 0.0
    if orthonormal:  # zero mean, so the per-coordinate variance is sigma^2 too
        mean = pi @ delta
        assert torch.allclose(second_moment - mean**2, torch.full_like(second_moment, sigma**2), rtol=1e-9)


@pytest.mark.parametrize("uniform", PRIORS)
@pytest.mark.parametrize("scale", [0.1, 2.0])
def test_vub_touches_exactly_the_first_k_coordinates_with_the_eq34_bounds(uniform, scale):
    k, dim = 8, 64
    gmm = paper(dim=dim, k=k, scale=scale, upper=True, uniform=uniform)
    pi = gmm.step_parameters(0)["priors"]
    sigma = 10.0 * scale
    v = sigma**2 - component_variances(gmm, 0, sigma)
    assert torch.count_nonzero(v[:, k:].abs() > 1e-9) == 0
    expected = scale**2 / (k * pi[:, None]) * torch.sort(pi).values[None, :]
    assert torch.allclose(v[:, :k], expected, rtol=1e-9)
    if uniform:
        assert torch.allclose(v[:, :k], torch.full((k, k), scale**2 / k, dtype=torch.float64), rtol=1e-9)


def test_vub_star_gives_the_same_parameters_at_every_step():
    shared = paper(upper=True, n_steps=5, share_across_steps=True)
    per_step = paper(upper=True, n_steps=5)
    for i in range(5):
        for name, value in shared.step_parameters(i).items():
            assert torch.equal(value, shared.step_parameters(0)[name])
    assert torch.equal(shared.offsets(0), per_step.offsets(0))
    assert not torch.equal(per_step.offsets(1), per_step.offsets(0))


@pytest.mark.parametrize("upper", [True, False])
def test_draws_have_the_kernels_moments(upper):
    """10^5 draws of x_s - m = delta_k + sqrt(max(sigma^2 - v_k, 0)) z: mean 0 and, where nothing
    clips, per-coordinate variance sigma^2 (within standard errors)."""
    dim, n, sigma = 12, 100_000, 0.8
    gmm = paper(dim=dim, k=4, scale=0.5, upper=upper, uniform=False)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    k = gmm.draw_components(0, n, g)
    draws = gmm.perturbation(0, sigma, z, k)
    pi = gmm.step_parameters(0)["priors"]
    counts = torch.bincount(k, minlength=4).double() / n
    assert (counts - pi).abs().max() < 5 * (0.25 / n) ** 0.5
    assert draws.mean(0).abs().max() < 5 * sigma / n**0.5
    variance = draws.var(0)
    expected = pi @ (component_variances(gmm, 0, sigma) + gmm.offsets(0) ** 2)
    assert (variance - expected).abs().max() < 6 * sigma**2 * (2 / n) ** 0.5
    if not upper:
        assert torch.allclose(expected, torch.full_like(expected, sigma**2))


def test_clipped_fraction_pinned_against_an_independent_count():
    k, dim = 8, 64
    eq11 = paper(dim=dim, k=k, scale=1.0, uniform=False, n_steps=3)
    vub = paper(dim=dim, k=k, scale=1.0, upper=True, n_steps=3)
    zeros = [0.0, 0.0, 0.0]
    # eta = 0: every v_k > 0 is clipped; the last step does not mix
    assert eq11.clipped_fraction(zeros, eta=0.0) == pytest.approx(1.0, rel=1e-12)
    assert vub.clipped_fraction(zeros, eta=0.0) == pytest.approx(k / dim)
    sigmas = [0.2, 0.05, 0.0]
    independent = []
    for i in range(2):
        delta, pi = eq11.offsets(i), eq11.step_parameters(i)["priors"]
        v = (pi @ delta**2)[None, :] / (k * pi[:, None])
        independent.append(float(pi @ (v > sigmas[i] ** 2).double().mean(1)))
    assert eq11.clipped_fraction(sigmas, eta=1.0) == pytest.approx(sum(independent) / 2, rel=1e-12)
    # with last_step=True the last step mixes too, and at sigma = 0 it clips every coordinate
    last = paper(dim=dim, k=k, scale=1.0, uniform=False, n_steps=3, last_step=True)
    assert last.clipped_fraction(sigmas, eta=1.0) == pytest.approx((sum(independent) + 1.0) / 3, rel=1e-12)


def test_paper_kernel_acts_at_eta_zero_and_matched_ones_do_not():
    assert paper().mixes_at(0, 2, eta=0.0)
    assert not paper().mixes_at(1, 2, eta=0.0)  # the last step
    assert paper(last_step=True).mixes_at(1, 2, eta=0.0)
    matched = GMM().initialize(dim=64, n_components=8, n_steps=2, construction="matched_diagonal")
    assert not matched.mixes_at(0, 2, eta=0.0) and matched.mixes_at(0, 2, eta=0.5)


@pytest.mark.parametrize("uniform", PRIORS)
def test_offset_mean_norm_is_rands_weighted_mean_and_zero_for_ortho(uniform):
    """gmm_offset_mean_norm = mean over steps of |sum_k pi_k delta_k|, computed here from the stored
    priors and offsets step by step: RAND's (eq. 9) is not 0, ORTHO's (eq. 10) is 0 up to rounding."""
    rand = paper(orthonormal=False, uniform=uniform, n_steps=3)
    by_hand = []
    for i in range(3):
        priors, offsets = rand.step_parameters(i)["priors"], rand.offsets(i)
        by_hand.append(float(sum(p * offsets[k] for k, p in enumerate(priors)).norm()))
    assert rand.offset_mean_norm() == pytest.approx(sum(by_hand) / 3, rel=1e-12)
    assert rand.offset_mean_norm() > 1e-3
    assert paper(orthonormal=True, uniform=uniform, n_steps=3).offset_mean_norm() < 1e-12
    assert paper(k=1, orthonormal=False, uniform=uniform).offset_mean_norm() == 0.0  # K = 1: delta = 0
