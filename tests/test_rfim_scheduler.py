"""RFIMScheduler: diffusers' flow-match Euler bit for bit at eta = 0, config round trips, SD3 pipelines."""

import diffusers
import numpy as np
import pytest
import torch
from helpers.tiny_sd3 import latent_dim, load_tiny_sd3, save_tiny_sd3

from ddim_gmm_exp.diffusers import GMM, RFIMScheduler
from ddim_gmm_exp.flow import sample_rfim
from ddim_gmm_exp.noise import sample_generators

SHAPE = (2, 4, 4, 4)
DIM = 64


def velocity_for(x, t):
    """A deterministic stand-in for a velocity network."""
    return torch.tanh(x * 0.7 + 0.001 * float(t))


def step_all(scheduler, x, generator=None, dtype=torch.float32):
    """diffusers' sampling loop: the model output in ``dtype``, the sample as the scheduler returns it."""
    for t in scheduler.timesteps:
        x = scheduler.step(velocity_for(x, t).to(dtype), t, x, generator=generator).prev_sample
    return x


PARENT_CASES = [
    ({}, {}),
    ({"shift": 3.0}, {}),
    ({"use_dynamic_shifting": True}, {"mu": 0.8}),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.5}),
    ({"shift": 3.0, "use_karras_sigmas": True}, {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("steps", [1, 5, 28])
@pytest.mark.parametrize("config,timesteps_kwargs", PARENT_CASES)
def test_eta_zero_without_gmm_is_the_parent_bit_for_bit(config, timesteps_kwargs, steps, dtype):
    ours, theirs = RFIMScheduler(**config), diffusers.FlowMatchEulerDiscreteScheduler(**config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(steps, **timesteps_kwargs)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(step_all(ours, x.clone(), dtype=dtype), step_all(theirs, x.clone(), dtype=dtype))


def test_eta_one_is_diffusers_stochastic_sampling_bit_for_bit():
    """sigma = s: x_s = (1 - s) x0_hat + s z, which is diffusers' stochastic_sampling step."""
    ours = RFIMScheduler(shift=3.0, eta=1.0)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = step_all(ours, x.clone(), torch.Generator().manual_seed(1))
    b = step_all(theirs, x.clone(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("eta", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("with_gmm", [False, True])
def test_the_scheduler_samples_as_the_loop(eta, with_gmm):
    """Scheduler steps (float32 tensor sigmas) and sample_rfim (float times) on the same grid, GMM and
    generators: equal bit for bit at eta = 0 (Euler), to float32 rounding otherwise."""
    steps = 6
    gmm = GMM().initialize(dim=DIM, n_components=8, n_steps=steps, scale=0.5) if with_gmm else None
    scheduler = RFIMScheduler(shift=3.0, eta=eta)
    scheduler.set_gmm_params(gmm)
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours = step_all(scheduler, x.clone(), sample_generators([3, 4]))
    loop = sample_rfim(
        lambda x, t: velocity_for(x, t[0]),
        x.clone(),
        scheduler.sigmas,
        eta=eta,
        gmm=gmm,
        generator=sample_generators([3, 4]),
    )
    if eta == 0:
        assert torch.equal(ours, loop)
    else:
        assert torch.allclose(ours, loop, atol=1e-5, rtol=0)


def test_trivial_gmm_is_rfim_bit_for_bit():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    outs = []
    for gmm in (None, GMM().initialize(dim=DIM, n_components=1, n_steps=5)):
        scheduler = RFIMScheduler(eta=0.2)
        scheduler.set_gmm_params(gmm)
        scheduler.set_timesteps(5)
        outs.append(step_all(scheduler, x.clone(), sample_generators([1, 2])))
    assert torch.equal(*outs)


def copies_of(scheduler, tmp_path):
    """The scheduler rebuilt three ways: from_config, save/from_pretrained, and from a subfolder."""
    scheduler.save_pretrained(tmp_path / "scheduler")
    return {
        "from_config": RFIMScheduler.from_config(scheduler.config),
        "from_pretrained": RFIMScheduler.from_pretrained(tmp_path / "scheduler"),
        "subfolder": RFIMScheduler.from_pretrained(tmp_path, subfolder="scheduler"),
    }


@pytest.mark.parametrize("eta", [0.0, 0.2])
def test_config_round_trips_keep_eta_and_the_gmm(tmp_path, eta):
    gmm = GMM().initialize(dim=DIM, n_components=4, n_steps=7, scale=0.8, uniform_priors=False, seed=5)
    original = RFIMScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config, eta=eta)
    original.set_gmm_params(gmm)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    original.set_timesteps(7)
    expected = step_all(original, x.clone(), sample_generators([5, 6]))
    for how, copy in copies_of(original, tmp_path).items():
        assert isinstance(copy, RFIMScheduler), how
        assert copy.config.eta == eta and copy.config.shift == 3.0, how
        assert copy.config.gmm_n_components == 4 and copy.config.gmm_seed == 5, how
        copy.set_timesteps(7)
        assert copy.gmm_params is not None and copy.gmm_params.hparams == gmm.hparams, how
        assert torch.equal(step_all(copy, x.clone(), sample_generators([5, 6])), expected), how


def test_from_config_of_a_pipeline_scheduler_takes_eta():
    config = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    scheduler = RFIMScheduler.from_config(config, eta=0.2)
    assert scheduler.config.eta == 0.2 and scheduler.config.shift == 3.0 and scheduler.gmm_params is None
    assert RFIMScheduler.from_config(config).config.eta == 0.0
    # and back: diffusers' own class reads our config (it ignores the extra keys)
    plain = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    assert plain.config.shift == 3.0


def test_set_gmm_params_none_and_set_eta_survive_from_config():
    scheduler = RFIMScheduler()
    scheduler.set_gmm_params(GMM().initialize(dim=DIM, n_components=4, n_steps=3))
    scheduler.set_eta(0.5)
    copy = RFIMScheduler.from_config(scheduler.config)
    assert copy.config.eta == 0.5 and copy.config.gmm_n_components == 4
    scheduler.set_gmm_params(None)
    assert RFIMScheduler.from_config(scheduler.config).config.gmm_n_components is None


def test_the_gmm_step_index_is_diffusers_step_index():
    """The step after set_begin_index(k) (img2img) uses the GMM's step k."""
    steps = 6
    gmm = GMM().initialize(dim=DIM, n_components=8, n_steps=steps, scale=0.5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    full = RFIMScheduler()
    full.set_gmm_params(gmm)
    full.set_timesteps(steps)
    partial = RFIMScheduler.from_config(full.config)
    partial.set_timesteps(steps)
    partial.set_begin_index(2)
    xa, xb = x.clone(), x.clone()
    for i, t in enumerate(full.timesteps):
        xa = full.step(velocity_for(xa, t), t, xa, generator=torch.Generator().manual_seed(i)).prev_sample
        if i >= 2:
            xb = partial.step(velocity_for(xb, t), t, xb, generator=torch.Generator().manual_seed(i)).prev_sample
        else:
            xb = xa.clone()
    assert torch.equal(xa, xb)


def test_the_scheduler_reports_clipping():
    scheduler = RFIMScheduler(eta=0.0)
    scheduler.set_gmm_params(GMM().initialize(dim=DIM, n_components=8, n_steps=3, scale=1.0))
    scheduler.set_timesteps(3)
    assert scheduler.clipped_fraction is None
    step_all(scheduler, torch.randn(SHAPE), torch.Generator().manual_seed(0))
    assert scheduler.clipped_fraction == pytest.approx(8 / DIM)  # VUB: K coordinates, sigma = 0 clips them


# ------------------------------------------------------------------------------ refused use


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_eta_outside_zero_one_is_refused(eta):
    with pytest.raises(ValueError, match=r"eta=.* is not allowed: it must lie in \[0, 1\]"):
        RFIMScheduler(eta=eta)
    scheduler = RFIMScheduler()
    with pytest.raises(ValueError, match=r"eta=.* is not allowed"):
        scheduler.set_eta(eta)
    assert scheduler.config.eta == 0.0


def test_bad_use_is_refused_and_changes_nothing():
    scheduler = RFIMScheduler()
    with pytest.raises(ValueError, match="generator='seed' is not allowed"):
        scheduler.set_generator("seed")
    with pytest.raises(ValueError, match="gmm_params=3 is not allowed"):
        scheduler.set_gmm_params(3)
    with pytest.raises(ValueError, match="no parameters yet"):
        scheduler.set_gmm_params(GMM())
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="n_steps=4 does not match the 5 sampling steps"):
        scheduler.set_gmm_params(GMM().initialize(dim=DIM, n_components=4, n_steps=4))
    assert scheduler.gmm_params is None and scheduler.config.gmm_n_components is None
    scheduler.set_gmm_params(GMM().initialize(dim=DIM, n_components=4, n_steps=5))
    sigmas = scheduler.sigmas.clone()
    with pytest.raises(ValueError, match="n_steps=5 does not match the 7 sampling steps"):
        scheduler.set_timesteps(7)
    assert torch.equal(scheduler.sigmas, sigmas) and scheduler.num_inference_steps == 5
    with pytest.raises(ValueError, match="timestep=3 is not allowed"):
        scheduler.step(torch.zeros(SHAPE), 3, torch.zeros(SHAPE))
    stochastic = RFIMScheduler(stochastic_sampling=True, eta=0.5)
    stochastic.set_timesteps(3)
    with pytest.raises(ValueError, match="stochastic_sampling is RFIM with eta=1.0"):
        stochastic.step(torch.zeros(SHAPE), stochastic.timesteps[0], torch.zeros(SHAPE))


# ------------------------------------------------------------------------------ in an SD3 pipeline


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny SD3 pipeline, saved and read back offline."""
    return load_tiny_sd3(save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe"))


def generate(pipe, output_type="np"):
    return pipe(
        prompt=["a red circle", "two blue squares"],
        height=16,
        width=16,
        num_inference_steps=4,
        guidance_scale=2.0,
        output_type=output_type,
        generator=sample_generators([10, 11]),
    ).images


def test_sd3_pipeline_with_rfim(sd3):
    parent_scheduler = sd3.scheduler
    assert type(parent_scheduler) is diffusers.FlowMatchEulerDiscreteScheduler
    plain_images, plain_latents = generate(sd3), generate(sd3, "latent")
    try:
        sd3.scheduler = RFIMScheduler.from_config(parent_scheduler.config)
        assert isinstance(sd3.scheduler, RFIMScheduler) and sd3.scheduler.config.shift == 3.0
        assert np.array_equal(generate(sd3), plain_images)  # eta = 0, no GMM: the parent bit for bit
        assert torch.equal(generate(sd3, "latent"), plain_latents)

        def with_generator(seed):
            sd3.scheduler.set_generator(sample_generators([seed, seed + 1]))
            return generate(sd3, "latent")

        sd3.scheduler = RFIMScheduler.from_config(parent_scheduler.config, eta=0.2)
        stochastic = with_generator(0)
        assert not torch.equal(stochastic, plain_latents)
        assert torch.equal(with_generator(0), stochastic)  # reproducible with the scheduler's generator
        assert not torch.equal(with_generator(2), stochastic)

        sd3.scheduler = RFIMScheduler.from_config(parent_scheduler.config)  # eta = 0, with the paper's kernel
        sd3.scheduler.set_gmm_params(GMM().initialize(dim=latent_dim(), n_components=8, n_steps=4, scale=1.0))
        mixed = with_generator(0)
        assert not torch.equal(mixed, plain_latents) and torch.equal(with_generator(0), mixed)
        assert sd3.scheduler.clipped_fraction is not None
    finally:
        sd3.scheduler = parent_scheduler


def test_readme_snippet_runs_as_written():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddim_gmm_exp.diffusers import GMM, RFIMScheduler

    flow_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # or pipe.scheduler of an SD3 pipeline
    scheduler = RFIMScheduler.from_config(flow_scheduler.config, eta=0.2)
    scheduler.set_gmm_params(gmm_params=GMM().initialize(dim=16 * 32 * 32, n_components=8, n_steps=28, scale=1.0))
    scheduler.set_generator(torch.Generator().manual_seed(0))  # pipelines call step() without one
    scheduler.set_timesteps(28)
    x = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:
        x = scheduler.step(0.1 * x, t, x).prev_sample
    assert x.shape == (1, 16, 32, 32) and torch.isfinite(x).all()
    assert scheduler.config.eta == 0.2 and scheduler.config.shift == 3.0
