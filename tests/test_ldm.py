"""The CompVis/LDM interface: the README snippet, CompVis's arguments, and an independent pin."""

import warnings

import numpy as np
import pytest
import torch

from ddim_gmm_exp import GMM, DDIMSampler
from ddim_gmm_exp.models.toy import ToyGMMModel
from ddim_gmm_exp.noise import sample_generators


@pytest.fixture(scope="module")
def model():
    return ToyGMMModel.random(shape=(3, 8, 8), n_modes=4, seed=2)


def test_readme_snippet_runs_as_written():
    diffusion_model = ToyGMMModel.random(shape=(3, 64, 64))
    gmm_params = GMM()  # GMM(gpu=0) on a GPU machine
    gmm_params.initialize(
        dim=3 * 64 * 64,
        n_components=16,
        n_steps=50,
        scale=1.0,
        uniform_priors=True,
        orthonormal=True,
        upper_bound_vars=True,
    )
    sampler = DDIMSampler(model=diffusion_model, gmm=True, gmm_params=gmm_params)
    sampler.make_schedule(ddim_num_steps=50, ddim_eta=0.0)
    x_T = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the paper's kernel acts at eta = 0: no warning
        samples, _ = sampler.sample(steps=50, batch_size=4, shape=(3, 64, 64), eta=0.0, x_T=x_T)
    assert samples.shape == (4, 3, 64, 64)
    assert torch.isfinite(samples).all()
    # the seed's snippet samples with the paper's kernel, not DDIM: eta = 0 is m + delta_k
    ddim, _ = DDIMSampler(model=diffusion_model).sample(steps=50, batch_size=4, shape=(3, 64, 64), eta=0.0, x_T=x_T)
    assert (samples - ddim).abs().max() > 1e-3
    assert sampler.clipped_fraction == pytest.approx(16 / (3 * 64 * 64))  # VUB at sigma = 0: the first K


def compvis_ddim_eta0(model, x_T, num_steps):
    """CompVis's DDIM loop (ldm/models/diffusion/ddim.py, eta = 0) in float64 numpy, written out."""
    T = model.num_timesteps
    abar = model.alphas_cumprod.numpy()
    ddim_timesteps = np.asarray(list(range(0, T, T // num_steps)))[:num_steps] + 1  # S steps (docs/method.md)
    alphas = abar[ddim_timesteps]
    alphas_prev = np.asarray([abar[0]] + abar[ddim_timesteps[:-1]].tolist())
    x = x_T.double().numpy()
    for index in reversed(range(len(ddim_timesteps))):
        t = ddim_timesteps[index]
        e_t = model.eps(torch.from_numpy(x), torch.full((x.shape[0],), int(t))).numpy()
        pred_x0 = (x - np.sqrt(1 - alphas[index]) * e_t) / np.sqrt(alphas[index])
        x = np.sqrt(alphas_prev[index]) * pred_x0 + np.sqrt(1 - alphas_prev[index]) * e_t
    return x


@pytest.mark.parametrize("num_steps", [10, 30, 50])
def test_matches_an_independent_compvis_loop(model, num_steps):
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples, _ = DDIMSampler(model).sample(S=num_steps, batch_size=3, shape=(3, 8, 8), x_T=x_T, eta=0.0)
    expected = compvis_ddim_eta0(model, x_T, num_steps)
    assert np.abs(samples.numpy() - expected).max() < 1e-9


@pytest.mark.parametrize("steps", [1, 3, 9, 30, 37, 999, 1000])
def test_every_step_count_gives_exactly_that_many_timesteps(model, steps):
    from ddim_gmm_exp.ldm import make_ddim_timesteps

    for method in ("uniform", "quad"):
        timesteps = make_ddim_timesteps(method, steps, 1000)
        assert len(timesteps) == steps and timesteps.min() >= 0 and timesteps.max() <= 999
    gmm = GMM().initialize(dim=192, n_components=4, n_steps=steps, share_across_steps=steps > 50)
    samples, _ = DDIMSampler(model, gmm=True, gmm_params=gmm).sample(S=steps, batch_size=1, shape=(3, 8, 8), eta=1.0)
    assert torch.isfinite(samples).all()


def test_compvis_arguments(model):
    steps, log_every_t = 20, 5
    called, images = [], []
    labels = torch.tensor([0, 1])
    null = torch.full((2,), model.n_modes)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = DDIMSampler(model)
    samples, inter = sampler.sample(
        S=steps,
        batch_size=2,
        shape=(3, 8, 8),
        conditioning=labels,
        callback=called.append,
        img_callback=lambda x0, i: images.append(i),
        eta=0.0,
        x_T=x_T,
        log_every_t=log_every_t,
        unconditional_guidance_scale=1.0,
        unconditional_conditioning=null,
        verbose=False,
    )
    assert called == list(range(steps)) and images == list(range(steps))
    # x_T, then every log_every_t-th index counting down, and the last step
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 1 + steps // log_every_t + 1
    assert inter["x_inter"][0] is x_T
    assert torch.equal(inter["x_inter"][-1], samples)
    # guidance scale 1 is the conditional model; guidance changes the output
    cond, _ = sampler.sample(S=steps, batch_size=2, shape=(3, 8, 8), conditioning=labels, x_T=x_T)
    assert torch.equal(cond, samples)
    guided, _ = sampler.sample(
        S=steps,
        batch_size=2,
        shape=(3, 8, 8),
        conditioning=labels,
        x_T=x_T,
        unconditional_guidance_scale=3.0,
        unconditional_conditioning=null,
    )
    assert not torch.allclose(guided, samples)
    # the guided output is out_u + s (out_c - out_u), computed in one batched call
    x, t = x_T, torch.full((2,), 500)
    expected = model.eps(x, t, null) + 3.0 * (model.eps(x, t, labels) - model.eps(x, t, null))
    assert torch.allclose(sampler.guided_model_output(x, t, labels, 3.0, null), expected, atol=1e-6)


def test_v_parameterised_model_gives_the_same_samples(model):
    class VModel:
        parameterization = "v"
        alphas_cumprod, num_timesteps = model.alphas_cumprod, model.num_timesteps

        def apply_model(self, x, t, c):
            a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = model.eps(x, t, c)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            return a.sqrt() * eps - (1 - a).sqrt() * x0

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, _ = DDIMSampler(model).sample(S=10, batch_size=2, shape=(3, 8, 8), x_T=x_T)
    b, _ = DDIMSampler(VModel()).sample(S=10, batch_size=2, shape=(3, 8, 8), x_T=x_T)
    assert torch.allclose(a, b, atol=1e-9)


def test_gmm_sampler_is_reproducible_per_sample(model):
    gmm = GMM().initialize(dim=192, n_components=8, n_steps=10, construction="matched_full")
    sampler = DDIMSampler(model, gmm=True, gmm_params=gmm)
    a, _ = sampler.sample(S=10, batch_size=3, shape=(3, 8, 8), eta=1.0, generator=sample_generators([4, 5, 6]))
    b, _ = sampler.sample(S=10, batch_size=1, shape=(3, 8, 8), eta=1.0, generator=sample_generators([5]))
    plain, _ = DDIMSampler(model).sample(S=10, batch_size=1, shape=(3, 8, 8), eta=1.0, generator=sample_generators([5]))
    assert torch.allclose(a[1], b[0], atol=1e-6)
    assert not torch.allclose(plain, b)


@pytest.mark.parametrize("construction", ["paper", "matched_diagonal", "matched_full"])
def test_warns_once_for_a_matched_gmm_with_eta_zero(model, construction):
    gmm = GMM().initialize(dim=192, n_components=4, n_steps=5, construction=construction)
    sampler = DDIMSampler(model, gmm=True, gmm_params=gmm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler.sample(S=5, batch_size=1, shape=(3, 8, 8), eta=0.0)
        sampler.sample(S=5, batch_size=1, shape=(3, 8, 8), eta=0.0)
        sampler.sample(S=5, batch_size=1, shape=(3, 8, 8), eta=1.0)
    expected = [] if construction == "paper" else [True]
    assert [f"construction={construction!r} with eta=0" in str(w.message) for w in caught] == expected


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"S": 0}, ValueError, r"steps=0 is not allowed: it must be an integer in \[1, 1000\]"),
        ({"S": 1001}, ValueError, "steps=1001 is not allowed"),
        ({"S": 5, "eta": -1.0}, ValueError, "eta=-1.0 is not allowed"),
        ({}, ValueError, "the number of DDIM steps is missing"),
        ({"S": 5, "steps": 6}, ValueError, "S=5 and steps=6 disagree"),
        ({"S": 5, "mask": torch.ones(1)}, ValueError, "mask=.* is not supported"),
        ({"S": 5, "temperature": 0.5}, ValueError, "temperature=0.5 is not supported"),
        ({"S": 5, "unconditional_guidance_scale": -2.0}, ValueError, "unconditional_guidance_scale=-2.0"),
        ({"S": 5, "ddim_discretize": "cubic"}, ValueError, "ddim_discretize='cubic' is not allowed"),
        ({"S": 5, "bogus": 1}, TypeError, "unexpected argument 'bogus'"),
    ],
)
def test_bad_sample_arguments(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        DDIMSampler(model).sample(batch_size=1, shape=(3, 8, 8), **kwargs)


def test_bad_gmm_setups(model):
    with pytest.raises(ValueError, match="gmm=True needs gmm_params"):
        DDIMSampler(model, gmm=True)
    with pytest.raises(ValueError, match="call gmm_params.initialize"):
        DDIMSampler(model, gmm=True, gmm_params=GMM())
    with pytest.raises(ValueError, match="has no 'apply_model'"):
        DDIMSampler(object())
    sampler = DDIMSampler(model, gmm=True, gmm_params=GMM().initialize(dim=192, n_components=4, n_steps=10))
    with pytest.raises(ValueError, match="n_steps=10 does not match the 20 sampling steps"):
        sampler.sample(S=20, batch_size=1, shape=(3, 8, 8), eta=1.0)
    with pytest.raises(ValueError, match=r"GMM dim=192 does not match the sample shape \(3, 4, 4\)"):
        sampler.sample(S=10, batch_size=1, shape=(3, 4, 4), eta=1.0)
