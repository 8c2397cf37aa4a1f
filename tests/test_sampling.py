"""The shared step and loop: parity with diffusers, exact reductions to DDIM, the toy law's moments."""

import itertools

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from ddim_gmm_exp.diffusers import DDIMScheduler
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.models.toy import ToyGMMModel
from ddim_gmm_exp.noise import randn, sample_generators
from ddim_gmm_exp.sampling import ddim_step, kernel_noise, sample_ddim

SHAPE = (2, 3, 4, 4)


@pytest.mark.parametrize(
    "make_generator,shape",
    [
        (lambda: torch.Generator().manual_seed(5), SHAPE),
        (lambda: sample_generators([1, 2]), SHAPE),
        (lambda: sample_generators([9]), (1, 3, 4, 4)),
    ],
)
def test_randn_matches_diffusers_randn_tensor(make_generator, shape):
    ours = randn(shape, make_generator())
    theirs = randn_tensor(shape, generator=make_generator(), device=torch.device("cpu"))
    assert torch.equal(ours, theirs)


def model_output_for(x, t):
    """A deterministic stand-in for a network: depends on x and t, not on anything random."""
    return torch.tanh(x * 0.7 + 0.001 * t.float().view(-1, 1, 1, 1))


@pytest.mark.parametrize(
    "prediction_type,eta,spacing,clip",
    list(
        itertools.product(
            ["epsilon", "v_prediction", "sample"], [0.0, 0.5, 1.0], ["leading", "trailing"], [True, False]
        )
    ),
)
def test_parity_with_diffusers_step(prediction_type, eta, spacing, clip):
    config = dict(
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        clip_sample=clip,
        set_alpha_to_one=False,
        steps_offset=1 if spacing == "leading" else 0,
    )
    ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_ours, x_theirs = x0.clone(), x0.clone()
    g_ours, g_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        t_batch = t.expand(SHAPE[0])
        out_ours = ours.step(model_output_for(x_ours, t_batch), t, x_ours, eta=eta, generator=g_ours)
        out_theirs = theirs.step(model_output_for(x_theirs, t_batch), t, x_theirs, eta=eta, generator=g_theirs)
        assert (out_ours.pred_original_sample - out_theirs.pred_original_sample).abs().max() < 1e-6
        assert (out_ours.prev_sample - out_theirs.prev_sample).abs().max() < 1e-6
        x_ours, x_theirs = out_ours.prev_sample, out_theirs.prev_sample


def test_parity_with_diffusers_thresholding_and_clipped_output():
    config = dict(thresholding=True, sample_max_value=2.0, prediction_type="sample")
    ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = 3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for t in ours.timesteps[:2]:
        a = ours.step(out, t, x, eta=0.3, use_clipped_model_output=True, generator=torch.Generator().manual_seed(3))
        b = theirs.step(out, t, x, eta=0.3, use_clipped_model_output=True, generator=torch.Generator().manual_seed(3))
        assert (a.prev_sample - b.prev_sample).abs().max() < 1e-6


def run_toy(model, gmm=None, eta=1.0, steps=10, seeds=range(6), shape=(3, 4, 4)):
    generators = sample_generators(seeds)
    x = randn((len(seeds), *shape), generators)
    timesteps = list(range(999, -1, -1000 // steps))
    return sample_ddim(
        lambda x, t: model.apply_model(x, t, None),
        x,
        timesteps,
        model.alphas_cumprod.float(),
        1.0,
        eta=eta,
        gmm=gmm,
        generator=generators,
    )


@pytest.fixture(scope="module")
def toy():
    return ToyGMMModel.random(shape=(3, 4, 4), n_modes=3, seed=0)


CONSTRUCTIONS = ["paper", "matched_diagonal", "matched_full"]


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_trivial_kernels_are_ddim_bit_for_bit(toy, construction, eta):
    ddim = run_toy(toy, eta=eta)
    one_component = GMM().initialize(dim=48, n_components=1, n_steps=10, construction=construction)
    zero_scale = GMM().initialize(dim=48, n_components=16, n_steps=10, scale=0.0, construction=construction)
    assert torch.equal(run_toy(toy, one_component, eta=eta), ddim)
    assert torch.equal(run_toy(toy, zero_scale, eta=eta), ddim)
    # and the mixture does act when it is not trivial (the matched ones only with eta > 0)
    mixture = GMM().initialize(dim=48, n_components=16, n_steps=10, construction=construction)
    assert torch.equal(run_toy(toy, mixture, eta=eta), ddim) == (eta == 0 and construction != "paper")


@pytest.mark.parametrize("construction", ["matched_diagonal", "matched_full"])
def test_eta_zero_is_deterministic_ddim_for_matched_constructions(toy, construction):
    ddim = run_toy(toy, eta=0.0)
    for k in (2, 4, 16):
        gmm = GMM().initialize(dim=48, n_components=k, n_steps=10, construction=construction)
        assert torch.equal(run_toy(toy, gmm, eta=0.0), ddim)


@pytest.mark.parametrize("orthonormal,upper", [(False, False), (True, False), (True, True)])
def test_paper_eta_zero_step_is_ddim_plus_one_of_k_offsets(orthonormal, upper):
    """At eta = 0 a non-last step's output minus DDIM's takes at most K distinct values, the offsets."""
    k, batch = 8, 64
    gmm = GMM().initialize(
        dim=48, n_components=k, n_steps=2, scale=0.3, orthonormal=orthonormal, upper_bound_vars=upper
    )
    x = torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(0)).expand(batch, *SHAPE[1:])
    out = model_output_for(x, torch.full((batch,), 500))
    abar_t, abar_s = torch.tensor(0.3), torch.tensor(0.6)
    generators = sample_generators(range(batch))
    noise, components = kernel_noise(x.shape, generators, gmm=gmm, step_index=0, num_steps=2, eta=0.0)
    mixed, _ = ddim_step(out, x, abar_t, abar_s, 0.0, noise, gmm=gmm, step_index=0, components=components)
    ddim, _ = ddim_step(out, x, abar_t, abar_s, 0.0)
    differences = torch.unique((mixed - ddim).reshape(batch, -1), dim=0)
    assert 1 < differences.shape[0] <= k
    assert len(torch.unique(components)) == differences.shape[0]
    for row, component in zip((mixed - ddim).reshape(batch, -1), components, strict=True):
        assert torch.allclose(row, gmm.offsets(0)[component], atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_last_step_is_ddim_unless_last_step(toy, eta):
    """One step is also the last: DDIM's Gaussian there unless last_step=True."""
    ddim = run_toy(toy, eta=eta, steps=1)
    default = GMM().initialize(dim=48, n_components=8, n_steps=1)
    on_last = GMM().initialize(dim=48, n_components=8, n_steps=1, last_step=True)
    assert torch.equal(run_toy(toy, default, eta=eta, steps=1), ddim)
    assert not torch.equal(run_toy(toy, on_last, eta=eta, steps=1), ddim)


def test_trivial_gmm_scheduler_is_diffusers_bit_for_bit():
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_gmm_params(GMM().initialize(dim=48, n_components=1, n_steps=10))
    for s in (ours, theirs):
        s.set_timesteps(10)
    x = randn(SHAPE, sample_generators([0, 1]))
    xa, xb, ga, gb = x, x.clone(), sample_generators([5, 6]), sample_generators([5, 6])
    for t in ours.timesteps:
        xa = ours.step(model_output_for(xa, t.expand(2)), t, xa, eta=1.0, generator=ga).prev_sample
        xb = theirs.step(model_output_for(xb, t.expand(2)), t, xb, eta=1.0, generator=gb).prev_sample
    assert torch.equal(xa, xb)


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_sample_does_not_depend_on_its_batch(toy, construction, eta):
    gmm = GMM().initialize(dim=48, n_components=8, n_steps=10, construction=construction, uniform_priors=False)
    batch = run_toy(toy, gmm, seeds=range(7), eta=eta)
    for seed in (0, 3, 6):
        alone = run_toy(toy, gmm, seeds=[seed], eta=eta)
        assert torch.allclose(alone[0], batch[seed], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "sampler,eta,construction",
    [
        ("ddim", 0.0, None),
        ("ddim", 1.0, None),
        ("ddim_gmm", 0.0, "matched_diagonal"),
        ("ddim_gmm", 1.0, "matched_diagonal"),
        ("ddim_gmm", 1.0, "matched_full"),
    ],
)
def test_toy_loop_reproduces_the_data_law(sampler, eta, construction):
    """200 steps with the exact eps: the samples' mean and covariance are the data law's."""
    model = ToyGMMModel.random(shape=(1, 2, 2), n_modes=3, seed=1)
    n = 4000
    gmm = None
    if sampler == "ddim_gmm":
        gmm = GMM().initialize(dim=4, n_components=8, n_steps=200, construction=construction)
    x = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    timesteps = list(range(995, -1, -5))
    samples = (
        sample_ddim(
            lambda x, t: model.eps(x, t),
            x,
            timesteps,
            model.alphas_cumprod.float(),
            model.alphas_cumprod[0].float(),
            eta=eta,
            gmm=gmm,
            generator=torch.Generator().manual_seed(1),
        )
        .reshape(n, 4)
        .double()
    )
    mean, cov = model.mean(), model.covariance()
    std_err_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((samples.mean(0) - mean).abs() < 5 * std_err_mean).all(), (samples.mean(0), mean)
    d = torch.diagonal(cov)
    std_err_cov = ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    assert ((torch.cov(samples.T) - cov).abs() < 6 * std_err_cov).all(), (torch.cov(samples.T), cov)


def test_ddim_step_needs_noise_when_eta_positive():
    x = torch.zeros(1, 4)
    a = torch.tensor(0.5)
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(x, x, a, torch.tensor(0.9), eta=1.0)
    with pytest.raises(ValueError, match="eta=-0.5 is not allowed"):
        sample_ddim(lambda x, t: x, x, [10], torch.linspace(0.9, 0.1, 20), 1.0, eta=-0.5)
    with pytest.raises(ValueError, match="prediction_type='score' is not allowed"):
        sample_ddim(lambda x, t: x, x, [10], torch.linspace(0.9, 0.1, 20), 1.0, prediction_type="score")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_kernel_noise_draws_z_first_then_components(eta):
    """eta > 0: the generator's first draw is z, exactly diffusers' variance noise; then one uniform
    per sample. eta = 0: z would be multiplied by zero, so the uniform is the only draw."""
    gmm = GMM().initialize(dim=48, n_components=4, n_steps=2)
    z, components = kernel_noise(SHAPE, torch.Generator().manual_seed(3), gmm=gmm, num_steps=2, eta=eta)
    g = torch.Generator().manual_seed(3)
    if eta > 0:
        assert torch.equal(z, randn_tensor(SHAPE, generator=g))
    else:
        assert z is None
    assert torch.equal(components, gmm.draw_components(0, SHAPE[0], g))
    assert torch.rand(1, generator=g).item() != torch.rand(1, generator=torch.Generator().manual_seed(3)).item()
    # the last step does not mix: z only when eta > 0, and no component
    z, components = kernel_noise(SHAPE, torch.Generator(), gmm=gmm, step_index=1, num_steps=2, eta=eta)
    assert components is None and (z is None) == (eta == 0)


def test_an_eta_zero_mixture_step_is_the_offset_alone():
    """At eta = 0 the paper's step is m + delta_k: the same as drawing a z and multiplying it by the
    clipped std sqrt(max(0 - v_k, 0)) = 0, which is why no z is drawn."""
    gmm = GMM().initialize(dim=48, n_components=4, n_steps=2)
    out, x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), torch.randn(SHAPE)
    abar_t, abar_s = torch.tensor(0.5), torch.tensor(0.8)
    k = torch.tensor([0, 3])
    without_z = ddim_step(out, x, abar_t, abar_s, 0.0, None, gmm=gmm, components=k)[0]
    with_z = ddim_step(out, x, abar_t, abar_s, 0.0, torch.randn(SHAPE), gmm=gmm, components=k)[0]
    mean = ddim_step(out, x, abar_t, abar_s, 0.0)[0]
    assert torch.equal(without_z, with_z)
    assert torch.equal(without_z - mean, (gmm.offsets(0)[k].reshape(SHAPE) + mean) - mean)


@pytest.mark.parametrize("construction", ["matched_diagonal", "matched_full"])
def test_the_last_step_with_abar_one_has_no_noise(construction):
    """abar_s = 1 gives sigma = 0: a last step that mixes (last_step=True) with a matched kernel,
    whose offsets are in units of sigma, is still x0_hat, whatever the generator."""
    gmm = GMM().initialize(dim=48, n_components=8, n_steps=1, construction=construction, last_step=True)
    assert gmm.mixes_at(0, 1, eta=1.0)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    abar_t, final = torch.tensor(0.9), torch.tensor(1.0)

    def last_step(seed):
        noise, k = kernel_noise(SHAPE, torch.Generator().manual_seed(seed), gmm=gmm, num_steps=1, eta=1.0)
        return ddim_step(out, x, abar_t, final, 1.0, noise, gmm=gmm, components=k)[0]

    steps = [last_step(s) for s in range(3)]
    assert torch.equal(steps[0], steps[1]) and torch.equal(steps[0], steps[2])
    assert torch.equal(steps[0], ddim_step(out, x, abar_t, final, 0.0)[0])
