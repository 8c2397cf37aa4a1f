"""The CompVis/LDM interface: the README snippet, CompVis's arguments, and an independent pin."""

import inspect
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


def compvis_make_ddim_timesteps(method, num_ddim_timesteps, num_ddpm_timesteps):
    """CompVis's make_ddim_timesteps (ldm/modules/diffusionmodules/util.py), written out."""
    if method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    else:
        ddim_timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    return ddim_timesteps + 1


def compvis_ddim_eta0(model, x_T, num_steps, n_run=None, cond=None, uncond=None, scales=None, gmm=None, g=None):
    """CompVis's DDIM loop (ldm/models/diffusion/ddim.py, eta = 0) in float64 numpy, written out.

    Runs the least noisy ``n_run`` timesteps (decode's t_start), with guidance scales[i] at the
    i-th step run; with a paper-construction ``gmm`` each step but the last adds delta_{step, k},
    step = the index in the full run, k drawn from one uniform (no z: at eta = 0 it would be
    multiplied by zero, so it is not drawn; docs/method.md).
    """
    T = model.num_timesteps
    abar = model.alphas_cumprod.numpy()
    ddim_timesteps = compvis_make_ddim_timesteps("uniform", num_steps, T)
    alphas = abar[ddim_timesteps]
    alphas_prev = np.asarray([abar[0]] + abar[ddim_timesteps[:-1]].tolist())
    n_total = len(ddim_timesteps)
    n_run = n_total if n_run is None else n_run
    x = x_T.double().numpy()
    for i, index in enumerate(reversed(range(n_run))):
        t = torch.full((x.shape[0],), int(ddim_timesteps[index]))
        e_t = model.eps(torch.from_numpy(x), t, cond).numpy()
        if uncond is not None:
            e_u = model.eps(torch.from_numpy(x), t, uncond).numpy()
            e_t = e_u + scales[i] * (e_t - e_u)
        pred_x0 = (x - np.sqrt(1 - alphas[index]) * e_t) / np.sqrt(alphas[index])
        x = np.sqrt(alphas_prev[index]) * pred_x0 + np.sqrt(1 - alphas_prev[index]) * e_t
        step = n_total - 1 - index
        if gmm is not None and step < n_total - 1:
            u = torch.rand(x.shape[0], generator=g, dtype=torch.float64).numpy()
            cum = np.cumsum(gmm.step_parameters(step)["priors"].double().numpy())
            k = np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)
            x = x + gmm.offsets(step).double().numpy()[k].reshape(x.shape)
    return x


@pytest.mark.parametrize("num_steps", [7, 10, 30, 50])
def test_matches_an_independent_compvis_loop(model, num_steps):
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples, _ = DDIMSampler(model).sample(S=num_steps, batch_size=3, shape=(3, 8, 8), x_T=x_T, eta=0.0)
    expected = compvis_ddim_eta0(model, x_T, num_steps)
    assert np.abs(samples.numpy() - expected).max() < 1e-9


@pytest.mark.parametrize("method", ["uniform", "quad"])
@pytest.mark.parametrize("steps", [3, 7, 30, 50, 400, 600])
def test_timesteps_are_compvis_exactly(steps, method):
    from ddim_gmm_exp.ldm import make_ddim_timesteps

    expected = compvis_make_ddim_timesteps(method, steps, 1000)
    if expected.max() >= 1000:  # CompVis indexes alphas_cumprod[1000] there and fails
        with pytest.raises(ValueError, match=f"steps={steps} is not allowed with ddim_discretize='{method}'"):
            make_ddim_timesteps(method, steps, 1000)
    else:
        assert np.array_equal(make_ddim_timesteps(method, steps, 1000), expected)


def test_uniform_sampling_starts_where_compvis_does(model):
    from ddim_gmm_exp.ldm import make_ddim_timesteps, num_ddim_steps

    # T % S != 0: CompVis keeps every T//S-th timestep, so more than S steps run, from near T
    assert make_ddim_timesteps("uniform", 7, 1000)[-1] == 995 and num_ddim_steps(7) == 8
    assert make_ddim_timesteps("uniform", 30, 1000)[-1] == 991 and num_ddim_steps(30) == 31
    assert num_ddim_steps(400) == 500 and num_ddim_steps(50) == 50
    called = []
    sampler = DDIMSampler(model)
    sampler.sample(S=7, batch_size=1, shape=(3, 8, 8), callback=called.append, verbose=False)
    assert called == list(range(8)) and sampler.ddim_timesteps[-1] == 995


@pytest.mark.parametrize("steps,nearest", [(3, "2 or 4"), (600, "500"), (1000, "500"), (37, "35 or 38")])
def test_steps_past_the_schedule_are_refused_with_the_nearest_that_work(model, steps, nearest):
    with pytest.raises(ValueError, match=f"steps={steps} is not allowed .*reach t=1000.*work: {nearest} "):
        DDIMSampler(model).make_schedule(steps)


def test_gmm_steps_must_be_the_steps_run(model):
    from ddim_gmm_exp.ldm import num_ddim_steps

    gmm = GMM().initialize(dim=192, n_components=4, n_steps=7)
    sampler = DDIMSampler(model, gmm=True, gmm_params=gmm)
    message = r"n_steps=7 does not match the 8 sampling steps.*len\(sampler.ddim_timesteps\) = 8 steps.*S=7"
    with pytest.raises(ValueError, match=message):
        sampler.sample(S=7, batch_size=1, shape=(3, 8, 8), eta=1.0)
    gmm = GMM().initialize(dim=192, n_components=4, n_steps=num_ddim_steps(7))
    samples, _ = DDIMSampler(model, gmm=True, gmm_params=gmm).sample(S=7, batch_size=1, shape=(3, 8, 8), eta=1.0)
    assert torch.isfinite(samples).all()


@pytest.mark.parametrize("steps", [1, 2, 7, 30, 400, 500])
def test_every_allowed_step_count_runs_compvis_timesteps(model, steps):
    from ddim_gmm_exp.ldm import make_ddim_timesteps

    for method in ("uniform", "quad"):
        timesteps = make_ddim_timesteps(method, steps, 1000)
        assert np.array_equal(timesteps, compvis_make_ddim_timesteps(method, steps, 1000))
        assert timesteps.min() >= 1 and timesteps.max() <= 999
    n_steps = len(make_ddim_timesteps("uniform", steps, 1000))
    gmm = GMM().initialize(dim=192, n_components=4, n_steps=n_steps, share_across_steps=n_steps > 50)
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


# ------------------------------------------------------------------ Stability's SD2 DDIMSampler

COMPVIS_SAMPLE_ORDER = [
    "S", "batch_size", "shape", "conditioning", "callback", "normals_sequence", "img_callback", "quantize_x0",
    "eta", "mask", "x0", "temperature", "noise_dropout", "score_corrector", "corrector_kwargs", "verbose", "x_T",
    "log_every_t", "unconditional_guidance_scale", "unconditional_conditioning", "dynamic_threshold", "ucg_schedule",
]  # fmt: skip


def test_sample_takes_stabilitys_positional_order(model):
    parameters = inspect.signature(DDIMSampler.sample).parameters
    assert list(parameters)[1:23] == COMPVIS_SAMPLE_ORDER
    assert all(parameters[name].kind == inspect.Parameter.KEYWORD_ONLY for name in ("steps", "generator"))
    labels, x_T = torch.tensor([0, 1]), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    called = []
    positional, _ = DDIMSampler(model).sample(
        10, 2, (3, 8, 8), labels, called.append, None, None, False, 0.0, None, None, 1.0, 0.0, None, None,
        False, x_T, 100, 1.0, None, None, None,
    )  # fmt: skip
    keyword, _ = DDIMSampler(model).sample(S=10, batch_size=2, shape=(3, 8, 8), conditioning=labels, x_T=x_T)
    assert torch.equal(positional, keyword) and called == list(range(10))


def test_dynamic_threshold_is_refused_as_stability_does(model):
    sampler = DDIMSampler(model)
    samples, _ = sampler.sample(S=5, batch_size=1, shape=(3, 8, 8), dynamic_threshold=None)  # no TypeError
    with pytest.raises(NotImplementedError, match="dynamic_threshold=0.9 is not supported"):
        sampler.sample(S=5, batch_size=1, shape=(3, 8, 8), dynamic_threshold=0.9)


def test_ucg_schedule_sets_the_guidance_of_each_step(model):
    labels, null = torch.tensor([0, 2]), torch.full((2,), model.n_modes)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scales = [1.0, 3.0, 2.0, 0.5, 5.0, 1.5, 2.5, 4.0]  # S=7 runs 8 steps
    samples, _ = DDIMSampler(model).sample(
        S=7,
        batch_size=2,
        shape=(3, 8, 8),
        conditioning=labels,
        x_T=x_T,
        unconditional_conditioning=null,
        ucg_schedule=scales,
    )
    expected = compvis_ddim_eta0(model, x_T, 7, cond=labels, uncond=null, scales=scales)
    assert np.abs(samples.numpy() - expected).max() < 1e-9
    with pytest.raises(ValueError, match="ucg_schedule has 7 entries but 8 steps run"):
        DDIMSampler(model).sample(S=7, batch_size=2, shape=(3, 8, 8), ucg_schedule=scales[:7])
    with pytest.raises(ValueError, match="ucg_schedule entry=-1.0 is not allowed"):
        DDIMSampler(model).sample(S=7, batch_size=2, shape=(3, 8, 8), ucg_schedule=[-1.0] * 8)


def test_make_schedule_sets_compvis_attributes(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=7, ddim_eta=0.5, verbose=False)
    abar = model.alphas_cumprod.numpy()
    timesteps = compvis_make_ddim_timesteps("uniform", 7, 1000)
    alphas, alphas_prev = abar[timesteps], np.asarray([abar[0]] + abar[timesteps[:-1]].tolist())
    sigmas = 0.5 * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    assert np.array_equal(sampler.ddim_timesteps, timesteps)
    for name, expected in [
        ("ddim_alphas", alphas),
        ("ddim_alphas_prev", alphas_prev),
        ("ddim_sigmas", sigmas),
        ("ddim_sqrt_one_minus_alphas", np.sqrt(1 - alphas)),
    ]:
        assert np.allclose(np.asarray(getattr(sampler, name)), expected, rtol=1e-12, atol=0), name


def test_img2img_stochastic_encode_then_decode_matches_an_independent_loop(model):
    labels, null = torch.tensor([1, 3]), torch.full((2,), model.n_modes)
    x0 = model.sample_data(2, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    t_enc = int(0.6 * 10)  # SD's img2img: strength * ddim_steps
    z = sampler.stochastic_encode(x0, torch.tensor([t_enc] * 2), noise=noise)
    abar = model.alphas_cumprod.numpy()[compvis_make_ddim_timesteps("uniform", 10, 1000)[t_enc]]
    expected_z = np.sqrt(abar) * x0.numpy() + np.sqrt(1 - abar) * noise.numpy()
    assert np.abs(z.numpy() - expected_z).max() < 1e-12
    called = []
    decoded = sampler.decode(z, labels, t_enc, 3.0, null, callback=called.append)
    expected = compvis_ddim_eta0(model, z, 10, n_run=t_enc, cond=labels, uncond=null, scales=[3.0] * t_enc)
    assert np.abs(decoded.numpy() - expected).max() < 1e-9 and called == list(range(t_enc))
    # use_original_steps: t indexes the model's timesteps
    original = sampler.stochastic_encode(x0, torch.tensor([10, 900]), use_original_steps=True, noise=noise)
    abar = model.alphas_cumprod.numpy()[[10, 900]].reshape(2, 1, 1, 1)
    assert np.abs(original.numpy() - (np.sqrt(abar) * x0.numpy() + np.sqrt(1 - abar) * noise.numpy())).max() < 1e-12


def compvis_encode(model, x0, num_steps, t_enc, use_original_steps=False):
    """Stability's DDIMSampler.encode in float64 numpy, with the model at the timestep it steps to."""
    abar = model.alphas_cumprod.numpy()
    if use_original_steps:
        timesteps, alphas_next, alphas = np.arange(1000), abar, np.append(1.0, abar[:-1])
    else:
        timesteps = compvis_make_ddim_timesteps("uniform", num_steps, 1000)
        alphas_next, alphas = abar[timesteps], np.asarray([abar[0]] + abar[timesteps[:-1]].tolist())
    x = x0.double().numpy()
    for i in range(t_enc):
        noise_pred = model.eps(torch.from_numpy(x), torch.full((x.shape[0],), int(timesteps[i]))).numpy()
        x_weighted = np.sqrt(alphas_next[i] / alphas[i]) * x
        x = (
            x_weighted
            + np.sqrt(alphas_next[i]) * (np.sqrt(1 / alphas_next[i] - 1) - np.sqrt(1 / alphas[i] - 1)) * noise_pred
        )
    return x


def test_encode_is_ddim_inversion_as_an_independent_loop(model):
    x0 = model.sample_data(2, generator=torch.Generator().manual_seed(7))
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=7, verbose=False)
    encoded, out = sampler.encode(x0, None, 8, return_intermediates=4)
    assert np.abs(encoded.numpy() - compvis_encode(model, x0, 7, 8)).max() < 1e-9
    assert out["intermediate_steps"] == [0, 2, 4, 6, 7] and torch.equal(out["x_encoded"], encoded)
    original, _ = sampler.encode(x0, None, 20, use_original_steps=True)
    assert np.abs(original.numpy() - compvis_encode(model, x0, 7, 20, use_original_steps=True)).max() < 1e-9
    # eta = 0 decoding from the encoding gives the image back, up to the discretisation (x0 is O(1))
    sampler.make_schedule(ddim_num_steps=200, verbose=False)
    encoded, _ = sampler.encode(x0, None, 100)
    assert (sampler.decode(encoded, None, 100) - x0).abs().max() < 5e-2


def test_decode_uses_the_gmm_steps_of_the_full_schedule(model, monkeypatch):
    gmm = GMM(dtype=torch.float64).initialize(dim=192, n_components=4, n_steps=8, scale=0.5)
    sampler = DDIMSampler(model, gmm=True, gmm_params=gmm)
    sampler.make_schedule(ddim_num_steps=7, ddim_eta=0.0, verbose=False)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    # the paper's kernel at eta = 0: m + delta_{i,k}, i = the step's index in the full run
    decoded = sampler.decode(z, None, 5, generator=torch.Generator().manual_seed(9))
    expected = compvis_ddim_eta0(model, z, 7, n_run=5, gmm=gmm, g=torch.Generator().manual_seed(9))
    assert np.abs(decoded.numpy() - expected).max() < 1e-9
    steps = []
    perturbation = gmm.perturbation
    monkeypatch.setattr(gmm, "perturbation", lambda i, *args, **kw: steps.append(i) or perturbation(i, *args, **kw))
    sampler.decode(z, None, 5)
    assert steps == [3, 4, 5, 6]  # the last step (7) is DDIM's Gaussian
    # decoding the whole schedule is sampling, draw for draw
    sampler.make_schedule(ddim_num_steps=7, ddim_eta=0.5, verbose=False)
    decoded = sampler.decode(z, None, 8, generator=sample_generators([1, 2]))
    sampled, _ = sampler.sample(S=7, batch_size=2, shape=(3, 8, 8), eta=0.5, x_T=z, generator=sample_generators([1, 2]))
    assert torch.equal(decoded, sampled)


def test_every_loop_is_the_shared_sample_ddim_loop(model):
    from ddim_gmm_exp.sampling import sample_ddim

    gmm = GMM().initialize(dim=192, n_components=4, n_steps=8, scale=0.3)
    sampler = DDIMSampler(model, gmm=True, gmm_params=gmm)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    sampled, _ = sampler.sample(
        S=7, batch_size=2, shape=(3, 8, 8), eta=0.7, x_T=x_T, generator=sample_generators([3, 4])
    )
    abar = sampler.alphas_cumprod
    shared = sample_ddim(
        lambda x, t: model.apply_model(x, t, None),
        x_T,
        np.flip(sampler.ddim_timesteps).tolist(),
        abar,
        abar[0],
        eta=0.7,
        gmm=gmm,
        generator=sample_generators([3, 4]),
    )
    assert torch.equal(sampled, shared)
    # a script's own loop over p_sample_ddim, as CompVis's ddim_sampling
    x, generators = x_T, sample_generators([3, 4])
    for index in reversed(range(len(sampler.ddim_timesteps))):
        t = torch.full((2,), int(sampler.ddim_timesteps[index]))
        x, _ = sampler.p_sample_ddim(x, None, t, index, generator=generators)
    assert torch.equal(x, sampled)


def test_ddim_sampling_with_timesteps_runs_compvis_subset(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    called = []
    subset, inter = sampler.ddim_sampling(None, (1, 3, 8, 8), x_T=x_T, timesteps=5, callback=called.append)
    assert called == list(range(4))  # CompVis's subset_end: one fewer than asked
    assert torch.equal(subset, sampler.decode(x_T, None, 4))
    assert torch.equal(inter["x_inter"][-1], subset)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda s, x: s.decode(x, None, 3, use_original_steps=True), "use_original_steps=True is not supported"),
        (lambda s, x: s.decode(x, None, 11), r"t_start=11 is not allowed: it must be an integer in \[0, 10\]"),
        (lambda s, x: s.p_sample_ddim(x, None, torch.full((1,), 1), 10), r"index=10 is not allowed"),
        (lambda s, x: s.stochastic_encode(x, 10), r"t=10 is not allowed.*\[0, 9\]"),
        (lambda s, x: s.encode(x, None, 11), r"t_enc=11 is not allowed"),
        (lambda s, x: s.ddim_sampling(None, x.shape, timesteps=0), "timesteps=0 is not allowed"),
        (lambda s, x: s.ddim_sampling(None, x.shape, mask=x), "mask=.* is not supported"),
    ],
)
def test_bad_stability_arguments(model, call, message):
    sampler = DDIMSampler(model)
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="call make_schedule"):
        sampler.decode(x, None, 3)
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    with pytest.raises(ValueError, match=message):
        call(sampler, x)


def test_gmm_params_alone_take_the_gmm_and_gmm_false_with_them_is_refused(model):
    """DDIMSampler(model, gmm_params=g) samples DDIM-GMM (it sampled plain DDIM before);
    gmm=False with gmm_params is a contradiction and refused."""
    gmm = GMM().initialize(dim=192, n_components=4, n_steps=10, scale=3.0)
    implied = DDIMSampler(model, gmm_params=gmm)
    explicit = DDIMSampler(model, gmm=True, gmm_params=gmm)
    plain = DDIMSampler(model)
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def draw(sampler):
        return sampler.sample(S=10, batch_size=2, shape=(3, 8, 8), eta=0.0, x_T=x_t, generator=torch.Generator())[0]

    assert implied.gmm is True and implied.gmm_params is gmm
    assert torch.equal(draw(implied), draw(explicit))
    assert not torch.allclose(draw(implied), draw(plain))
    with pytest.raises(ValueError, match="gmm=False contradicts the gmm_params given"):
        DDIMSampler(model, gmm=False, gmm_params=gmm)
