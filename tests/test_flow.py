"""The RFIM / RFIM-GMM step and loop: Euler and diffusers parity, exact reductions, marginals, the toy velocity."""

import math

import diffusers
import pytest
import torch

from ddim_gmm_exp.flow import (
    check_flow_sigmas,
    euler_step,
    rfim_mean,
    rfim_sigmas,
    rfim_step,
    sample_rfim,
    uniform_sigmas,
    x0_and_x1,
)
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.models.toy import ToyGMMModel
from ddim_gmm_exp.noise import randn, sample_generators
from ddim_gmm_exp.sampling import kernel_noise

SHAPE = (2, 3, 4, 4)
ETAS = [0.0, 0.2, 0.5]


def velocity_for(x, t):
    """A deterministic stand-in for a velocity network: depends on x and t, nothing random."""
    return torch.tanh(x * 0.7 + 0.001 * t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))))


@pytest.fixture(scope="module")
def toy():
    return ToyGMMModel.random(shape=(3, 4, 4), n_modes=3, seed=0)


def toy_denoiser(model, labels=None):
    return lambda x, t: model.velocity(x, t.double() / 1000, labels).to(x.dtype)


def run_toy(model, gmm=None, eta=0.0, steps=10, seeds=range(6), shape=(3, 4, 4), dtype=torch.float32):
    generators = sample_generators(seeds)
    x = randn((len(seeds), *shape), generators, dtype=dtype)
    return sample_rfim(toy_denoiser(model), x, uniform_sigmas(steps), eta=eta, gmm=gmm, generator=generators)


# ------------------------------------------------------------------------------ the step


def test_x0_and_x1_invert_the_interpolation():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for t in (0.0, 0.013, 0.5, 0.999, 1.0):
        x_t = (1 - t) * x0 + t * x1
        x0_hat, x1_hat = x0_and_x1(x1 - x0, x_t, t)
        assert torch.allclose(x0_hat, x0, atol=1e-14, rtol=0) and torch.allclose(x1_hat, x1, atol=1e-14, rtol=0)
        if t > 0:  # the paper's form (x_t - (1 - t) x0_hat) / t, where it is defined
            assert torch.allclose(x1_hat, (x_t - (1 - t) * x0_hat) / t, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-14), (torch.float32, 2e-6)])
@pytest.mark.parametrize("t,s", [(1.0, 0.9), (0.7, 0.3), (0.05, 0.02), (0.5, 0.0)])
def test_eta_zero_rfim_is_the_euler_step(dtype, tolerance, t, s):
    """m = (1 - s) x0_hat + s x1_hat is x_t + (s - t) v: to rounding for the general formula,
    bit for bit for rfim_step (which computes the eta = 0 mean as the Euler step)."""
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE, generator=g, dtype=dtype)
    euler = x_t + (s - t) * v
    general = rfim_mean(*x0_and_x1(v, x_t, t), s, 0.0)
    assert (general - euler).abs().max() <= tolerance * (1 + euler.abs().max())
    x_s, x0_hat = rfim_step(v, x_t, t, s, eta=0.0)
    assert torch.equal(x_s, euler) and torch.equal(euler_step(v, x_t, t, s), euler)
    assert torch.equal(x0_hat, x_t - t * v)


def test_the_last_step_returns_x0_hat():
    g = torch.Generator().manual_seed(2)
    x_t, v, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    for eta in (0.0, 0.5, 1.0):
        x_s, x0_hat = rfim_step(v, x_t, 0.3, 0.0, eta, z)
        assert torch.equal(x_s, x_t - 0.3 * v) and torch.equal(x0_hat, x_s)


def diffusers_loop(scheduler, x, generator_steps=None):
    """diffusers' own sampling loop with FlowMatchEulerDiscreteScheduler.step."""
    for t in scheduler.timesteps:
        x = scheduler.step(velocity_for(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


# (scheduler config, set_timesteps arguments, steps); shift_terminal needs 2 steps or more in diffusers itself
PARITY_CASES = [
    *[
        (config, kwargs, steps)
        for steps in (1, 7, 28)
        for config, kwargs in [
            ({}, {}),
            ({"shift": 3.0}, {}),
            ({"use_dynamic_shifting": True}, {"mu": 0.8}),
        ]
    ],
    ({"shift_terminal": 0.1}, {}, 7),
]


@pytest.mark.parametrize("config,timesteps_kwargs,steps", PARITY_CASES)
def test_eta_zero_rfim_is_diffusers_flow_match_euler_bit_for_bit(config, timesteps_kwargs, steps):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(steps, **timesteps_kwargs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    theirs = diffusers_loop(scheduler, x.clone())
    seen = []
    ours = sample_rfim(velocity_for, x.clone(), scheduler.sigmas, callback=lambda i, t, *_: seen.append(t))
    assert torch.equal(ours, theirs)
    # the network saw diffusers' timesteps t * 1000, in float32
    assert all(torch.equal(t, ref.expand(SHAPE[0])) for t, ref in zip(seen, scheduler.timesteps, strict=True))


def test_eta_zero_step_is_diffusers_step_with_tensor_times_and_half_outputs():
    """As the scheduler calls it: 0-dim float32 sigmas, a float32 sample and a float16 model output."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        v = velocity_for(x, t.expand(SHAPE[0])).half()
        theirs = scheduler.step(v, t, x).prev_sample
        ours, _ = rfim_step(v, x, scheduler.sigmas[i], scheduler.sigmas[i + 1])
        assert torch.equal(ours.to(v.dtype), theirs)
        x = theirs.float()


# ------------------------------------------------------------------------------ the mixture


@pytest.mark.parametrize("eta", ETAS)
def test_trivial_kernels_are_rfim_bit_for_bit(toy, eta):
    rfim = run_toy(toy, eta=eta)
    one_component = GMM().initialize(dim=48, n_components=1, n_steps=10)
    zero_scale = GMM().initialize(dim=48, n_components=8, n_steps=10, scale=0.0)
    assert torch.equal(run_toy(toy, one_component, eta=eta), rfim)
    assert torch.equal(run_toy(toy, zero_scale, eta=eta), rfim)
    mixture = GMM().initialize(dim=48, n_components=8, n_steps=10, scale=0.3)
    assert not torch.equal(run_toy(toy, mixture, eta=eta), rfim)


@pytest.mark.parametrize("orthonormal,upper", [(False, False), (True, False), (True, True)])
def test_eta_zero_gmm_step_is_euler_plus_one_of_k_offsets(orthonormal, upper):
    """Same x_t for the whole batch: a non-last step minus Euler takes at most K values, the offsets."""
    k, batch = 8, 64
    gmm = GMM().initialize(
        dim=48, n_components=k, n_steps=2, scale=0.3, orthonormal=orthonormal, upper_bound_vars=upper
    )
    x = torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(0)).expand(batch, *SHAPE[1:])
    v = velocity_for(x, torch.full((batch,), 800.0))
    generators = sample_generators(range(batch))
    noise, components = kernel_noise(x.shape, generators, gmm=gmm, step_index=0, num_steps=2, eta=0.0)
    mixed, _ = rfim_step(v, x, 0.8, 0.4, 0.0, noise, gmm=gmm, step_index=0, components=components)
    differences = (mixed - euler_step(v, x, 0.8, 0.4)).reshape(batch, -1)
    assert 1 < torch.unique(differences, dim=0).shape[0] <= k
    assert torch.unique(differences, dim=0).shape[0] == len(torch.unique(components))
    for row, component in zip(differences, components, strict=True):
        assert torch.allclose(row, gmm.offsets(0)[component], atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_the_last_step_does_not_mix_unless_last_step(toy, eta):
    rfim = run_toy(toy, eta=eta, steps=1)
    default = GMM().initialize(dim=48, n_components=8, n_steps=1)
    on_last = GMM().initialize(dim=48, n_components=8, n_steps=1, last_step=True)
    assert torch.equal(run_toy(toy, default, eta=eta, steps=1), rfim)
    assert not torch.equal(run_toy(toy, on_last, eta=eta, steps=1), rfim)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_a_sample_does_not_depend_on_its_batch(toy, eta):
    gmm = GMM().initialize(dim=48, n_components=8, n_steps=10, uniform_priors=False)
    batch = run_toy(toy, gmm, seeds=range(7), eta=eta)
    for seed in (0, 3, 6):
        assert torch.allclose(run_toy(toy, gmm, seeds=[seed], eta=eta)[0], batch[seed], atol=1e-6, rtol=0)


def test_rfim_sigmas_are_eta_times_the_next_time():
    assert rfim_sigmas([1.0, 0.5, 0.25, 0.0], 0.2) == pytest.approx([0.1, 0.05, 0.0])
    gmm = GMM().initialize(dim=48, n_components=8, n_steps=3, scale=1.0, upper_bound_vars=True)
    assert gmm.clipped_fraction(rfim_sigmas([1.0, 0.5, 0.25, 0.0], 0.0), 0.0) > 0  # eta = 0 clips all v_k > 0


# ------------------------------------------------------------------------------ marginals


def assert_normal(samples, mean, std, n_std_err=5.0):
    """Per coordinate: sample mean and variance within n standard errors of N(mean, std^2)."""
    n = samples.shape[0]
    mean_err = (samples.mean(0) - mean).abs() / (std / math.sqrt(n))
    var_err = (samples.var(0) - std**2).abs() / (std**2 * math.sqrt(2 / (n - 1)))
    assert mean_err.max() < n_std_err, mean_err.max()
    assert var_err.max() < n_std_err, var_err.max()


@pytest.mark.parametrize("eta", [0.0, 0.2, 0.5, 1.0])
def test_one_step_from_the_true_x0_keeps_the_marginal(eta):
    """With the true x0 (so v = x1 - x0), one step from x_t ~ q(x_t | x0) lands on q(x_s | x0) = N((1-s) x0, s^2 I)."""
    n, t, s = 20000, 0.8, 0.45
    model = ToyGMMModel.random(shape=(1, 2, 4), n_modes=3, seed=1)
    g = torch.Generator().manual_seed(3)
    x0 = model.sample_data(1, g).expand(n, 1, 2, 4)
    x1 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * x1
    x_s, x0_hat = rfim_step(x1 - x0, x_t, t, s, eta, z)
    assert torch.allclose(x0_hat, x0, atol=1e-12)
    assert_normal(x_s.reshape(n, -1), (1 - s) * x0[0].reshape(-1), s)


@pytest.mark.parametrize("eta", [0.2, 0.5, 1.0])
def test_one_gmm_step_from_the_true_x0_keeps_the_marginal(eta):
    """ORTHO offsets (pi-weighted mean exactly 0) with eq. 11 variances, nothing clipped: the
    mixture has the Gaussian step's mean and per-coordinate variance."""
    n, t, s, dim = 20000, 0.8, 0.45, 16
    gmm = GMM(dtype=torch.float64).initialize(
        dim=dim, n_components=8, n_steps=2, scale=0.1, orthonormal=True, upper_bound_vars=False
    )
    assert gmm.step_clipped_fraction(0, eta * s) == 0
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(1, dim, generator=g, dtype=torch.float64).expand(n, dim)
    x1 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * x1
    noise, components = kernel_noise(x0.shape, g, dtype=torch.float64, gmm=gmm, num_steps=2, eta=eta)
    x_s, _ = rfim_step(x1 - x0, x_t, t, s, eta, noise, gmm=gmm, components=components)
    assert_normal(x_s, (1 - s) * x0[0], s)


def toy_loop_moment_errors(eta, n=4000, steps=200):
    """Sample the toy law with its exact velocity on a uniform grid: (mean error, covariance error)
    in standard errors, the largest over the coordinates."""
    model = ToyGMMModel.random(shape=(1, 2, 2), n_modes=3, seed=1)
    x = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    samples = sample_rfim(
        toy_denoiser(model), x, uniform_sigmas(steps), eta=eta, generator=torch.Generator().manual_seed(1)
    )
    samples = samples.reshape(n, 4).double()
    mean, cov = model.mean(), model.covariance()
    d = torch.diagonal(cov)
    mean_err = (samples.mean(0) - mean).abs() / (d / n).sqrt()
    cov_err = (torch.cov(samples.T) - cov).abs() / ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    return float(mean_err.max()), float(cov_err.max())


def test_toy_euler_loop_reproduces_the_data_law():
    """200 uniform Euler steps with the exact velocity: the samples' mean and covariance are the data law's."""
    mean_err, cov_err = toy_loop_moment_errors(eta=0.0)
    assert mean_err < 5 and cov_err < 6


def test_eta_one_is_not_a_consistent_sampler():
    """sigma = eta s does not shrink with the step size: at eta = 1 every step is a fresh draw from
    q(x_s | x0_hat), and 200 steps do not recover the law (the paper's reason to keep eta <= 0.5)."""
    mean_err, _ = toy_loop_moment_errors(eta=1.0)
    assert mean_err > 5


# ------------------------------------------------------------------------------ the toy velocity


def test_toy_velocity_is_the_score_relation():
    """v = (E[x1 | x_t] - x_t) / (1 - t) with E[x1 | x_t] = -t grad log p_t(x_t) (Tweedie), by autograd."""
    model = ToyGMMModel.random(shape=(1, 2, 3), n_modes=3, seed=2)
    x = 1.5 * torch.randn(5, 1, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        a, b = 1 - t, t
        flat = x.reshape(5, -1).clone().requires_grad_(True)
        var = a**2 * model.stds**2 + b**2  # (J,)
        centred = flat[:, None, :] - a * model.means
        log_p = torch.logsumexp(
            model.weights.log() - (centred**2).sum(-1) / (2 * var) - 0.5 * flat.shape[1] * torch.log(2 * math.pi * var),
            dim=1,
        )
        (score,) = torch.autograd.grad(log_p.sum(), flat)
        expected = ((-t * score) - flat.detach()) / (1 - t)
        assert torch.allclose(model.velocity(x, t).reshape(5, -1), expected, atol=1e-10)


def test_toy_velocity_agrees_with_its_eps():
    """At the flow time where the interpolation is DDPM step k rescaled, v = (eps*(x_t / c, k) - x_t) / (1 - t)."""
    model = ToyGMMModel.random(shape=(1, 2, 3), n_modes=3, seed=2)
    x = torch.randn(6, 1, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 3, 1])  # 3 is the null class
    for k in (10, 300, 900):
        abar = model.alphas_cumprod[k]
        t = float((1 - abar).sqrt() / (abar.sqrt() + (1 - abar).sqrt()))
        c = math.sqrt((1 - t) ** 2 + t**2)  # x_t / c = sqrt(abar) x0 + sqrt(1 - abar) x1
        eps = model.eps(x / c, torch.full((6,), k), labels)
        expected = (eps - x) / (1 - t)
        assert torch.allclose(model.velocity(x, torch.full((6,), t), labels), expected, atol=1e-9)


def test_toy_velocity_is_the_conditional_mean_by_monte_carlo():
    """E[v(x_t)] = E[x1 - x0] and the residual x1 - x0 - v(x_t) is uncorrelated with x_t (20000 draws)."""
    model = ToyGMMModel.random(shape=(1, 1, 3), n_modes=3, seed=3)
    n, t = 20000, 0.6
    g = torch.Generator().manual_seed(5)
    x0 = model.sample_data(n, g).reshape(n, 3)
    x1 = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * x1
    residual = (x1 - x0) - model.velocity(x_t.reshape(n, 1, 1, 3), t).reshape(n, 3)
    std_err = residual.std(0) / math.sqrt(n)
    assert (residual.mean(0).abs() < 5 * std_err).all()
    products = residual[:, :, None] * (x_t - x_t.mean(0))[:, None, :]  # (n, D, D)
    assert (products.mean(0).abs() < 5 * products.std(0) / math.sqrt(n)).all()


# ------------------------------------------------------------------------------ refused input


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_eta_outside_zero_one_is_refused(eta):
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"eta=.* is not allowed: it must lie in \[0, 1\]"):
        rfim_step(x, x, 0.5, 0.25, eta, x)
    with pytest.raises(ValueError, match=r"eta=.* is not allowed"):
        sample_rfim(lambda x, t: x, x, [1.0, 0.0], eta=eta)


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 0.5], [0.5, 0.7, 0.0], [1.5, 0.0], [1.0, 1.0, 0.0]])
def test_bad_time_grids_are_refused(sigmas):
    with pytest.raises(ValueError, match="sigmas=.* is not allowed"):
        check_flow_sigmas(sigmas)


def test_uniform_sigmas():
    assert uniform_sigmas(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="steps=0 is not allowed"):
        uniform_sigmas(0)


def test_a_step_with_eta_needs_noise():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="needs noise"):
        rfim_step(x, x, 0.5, 0.25, 0.5)
