"""The diffusers interface: loading, config round trip, timestep spacings, pipelines, bad input."""

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch

from ddim_gmm_exp.diffusers import GMM, DDIMGMMScheduler, DDIMScheduler
from ddim_gmm_exp.noise import sample_generators


@pytest.fixture
def ddpm_dir(tmp_path):
    """A scheduler directory as google/ddpm-cat-256 ships it (a DDPMScheduler config)."""
    diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small", clip_sample=True
    ).save_pretrained(tmp_path / "scheduler")
    return tmp_path


def test_readme_snippet_runs_as_written(ddpm_dir):
    local_dir = ddpm_dir / "scheduler"
    gmm_params = GMM(device="cpu")
    gmm_params.initialize(
        dim=3 * 256 * 256,
        n_components=16,
        n_steps=50,
        scale=1.0,
        uniform_priors=True,
        orthonormal=True,
        upper_bound_vars=True,
    )
    scheduler = DDIMScheduler.from_pretrained(local_dir)
    scheduler.set_gmm_params(gmm_params=gmm_params)
    scheduler.set_timesteps(50)
    x = torch.randn(1, 3, 256, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the paper's kernel acts at eta = 0: no warning
        out = scheduler.step(
            0.1 * x, scheduler.timesteps[0], x, eta=0.0, generator=torch.Generator().manual_seed(0)
        )
    assert out.prev_sample.shape == x.shape
    # the seed's snippet at eta = 0 samples with the paper's kernel, not DDIM
    plain = diffusers.DDIMScheduler.from_pretrained(local_dir)
    plain.set_timesteps(50)
    ddim = plain.step(0.1 * x, plain.timesteps[0], x, eta=0.0).prev_sample
    assert (out.prev_sample - ddim).abs().max() > 1e-3
    assert scheduler.clipped_fraction == pytest.approx(16 / (3 * 256 * 256))
    assert DDIMGMMScheduler is DDIMScheduler
    assert isinstance(scheduler, diffusers.DDIMScheduler)


def test_loads_ddpm_configs_with_subfolder(ddpm_dir):
    scheduler = DDIMScheduler.from_pretrained(ddpm_dir, subfolder="scheduler")
    assert scheduler.config.clip_sample is True and scheduler.gmm_params is None
    from_config = DDIMScheduler.from_config(diffusers.DDPMScheduler().config)
    assert isinstance(from_config, DDIMScheduler)


def step_all(scheduler, x, seeds, eta=1.0):
    generators = sample_generators(seeds)
    for t in scheduler.timesteps:
        x = scheduler.step(0.3 * x, t, x, eta=eta, generator=generators).prev_sample
    return x


@pytest.mark.parametrize("construction", ["paper", "matched_diagonal", "matched_full"])
def test_config_round_trip_rebuilds_the_kernel(tmp_path, construction):
    gmm = GMM().initialize(
        dim=48,
        n_components=4,
        n_steps=8,
        scale=0.8,
        uniform_priors=False,
        orthonormal=False,
        upper_bound_vars=True,
        seed=7,
        construction=construction,
        last_step=True,
    )
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_gmm_params(gmm_params=gmm)
    scheduler.set_timesteps(8)
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["gmm_n_components"] == 4 and saved["gmm_seed"] == 7 and saved["gmm_construction"] == construction
    assert saved["gmm_last_step"] is True
    reloaded = DDIMScheduler.from_pretrained(tmp_path)
    reloaded.set_timesteps(8)
    assert reloaded.gmm_params.hparams == gmm.hparams
    for i in range(8):
        for name, tensor in gmm.step_parameters(i).items():
            assert torch.equal(reloaded.gmm_params.step_parameters(i)[name], tensor)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(step_all(scheduler, x, [0, 1]), step_all(reloaded, x, [0, 1]))
    # and a plain diffusers install reads the same file as its own DDIMScheduler
    plain = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    assert plain.config.timestep_spacing == "trailing"


def test_set_gmm_params_none_restores_ddim():
    scheduler = DDIMScheduler()
    scheduler.set_gmm_params(GMM().initialize(dim=48, n_components=4, n_steps=5))
    scheduler.set_gmm_params(None)
    scheduler.set_timesteps(5)
    assert scheduler.gmm_params is None and scheduler.config.gmm_n_components is None
    plain = diffusers.DDIMScheduler()
    plain.set_timesteps(5)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(step_all(scheduler, x, [3, 4]), step_all(plain, x, [3, 4]))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_previous_timestep_comes_from_the_timestep_list(spacing):
    """An independent float64 DDIM (eta = 0) over the actual list: right for every spacing."""
    scheduler = DDIMScheduler(timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(7)
    timesteps = scheduler.timesteps.tolist()
    abar = scheduler.alphas_cumprod.double().numpy()
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x.numpy().copy()
    for i, t in enumerate(timesteps):
        eps = 0.3 * x
        x = scheduler.step(eps, t, x).prev_sample
        a_t, a_s = abar[t], abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        e = 0.3 * expected
        x0 = (expected - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        expected = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * e
    assert np.abs(x.numpy() - expected).max() < 1e-5
    if spacing == "linspace":  # diffusers' own step lands elsewhere here
        theirs = diffusers.DDIMScheduler(timestep_spacing=spacing, clip_sample=False)
        theirs.set_timesteps(7)
        y = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in theirs.timesteps:
            y = theirs.step(0.3 * y, t, y).prev_sample
        assert np.abs(y.numpy() - expected).max() > 1e-3


def test_bad_scheduler_use():
    scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="you need to run 'set_timesteps'"):
        scheduler.step(torch.zeros(1, 3), 10, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="num_inference_steps=0 is not allowed"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep=5 is not one of the scheduler's timesteps"):
        scheduler.step(torch.zeros(1, 3), 5, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="eta=-1 is not allowed"):
        scheduler.step(torch.zeros(1, 3), 900, torch.zeros(1, 3), eta=-1)
    with pytest.raises(ValueError, match="n_steps=20 does not match the 10 sampling steps"):
        scheduler.set_gmm_params(GMM().initialize(dim=3, n_components=2, n_steps=20))
    with pytest.raises(ValueError, match="call gmm_params.initialize"):
        scheduler.set_gmm_params(GMM())
    with pytest.raises(ValueError, match="gmm_params=3 is not allowed"):
        scheduler.set_gmm_params(3)
    scheduler.set_gmm_params(GMM().initialize(dim=12, n_components=4, n_steps=10))
    with pytest.raises(ValueError, match=r"GMM dim=12 does not match the sample shape \(3,\)"):
        scheduler.step(torch.zeros(1, 3), 900, torch.zeros(1, 3), eta=1.0)
    with pytest.raises(ValueError, match="gmm_scale|scale=2.0 is not allowed"):
        DDIMScheduler(gmm_dim=3, gmm_n_components=2, gmm_n_steps=1, gmm_scale=2.0, gmm_construction="matched_full")


@pytest.mark.parametrize("construction", ["paper", "matched_diagonal"])
def test_warns_once_for_a_matched_gmm_with_eta_zero(construction):
    scheduler = DDIMScheduler()
    scheduler.set_gmm_params(GMM().initialize(dim=3, n_components=2, n_steps=4, construction=construction))
    scheduler.set_timesteps(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_all(scheduler, torch.zeros(1, 3), [0], eta=0.0)
        step_all(scheduler, torch.zeros(1, 3), [0], eta=0.0)
    expected = 0 if construction == "paper" else 1
    assert len(caught) == expected and all("with eta=0 is deterministic DDIM" in str(w.message) for w in caught)


def tiny_stable_diffusion(scheduler):
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_stable_diffusion_pipeline_keeps_our_scheduler():
    torch.manual_seed(0)
    pipe = tiny_stable_diffusion(diffusers.DDIMScheduler(steps_offset=1, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))

    def run(eta):
        return pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=torch.zeros_like(embeds),
            height=16,
            width=16,
            num_inference_steps=4,
            eta=eta,
            guidance_scale=2.0,
            output_type="np",
            generator=torch.Generator().manual_seed(1),
        ).images

    plain = run(1.0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_gmm_params(GMM().initialize(dim=4 * 8 * 8, n_components=1, n_steps=4))
    assert np.array_equal(run(1.0), plain)  # K = 1 is DDIM bit for bit, inside the pipeline
    pipe.scheduler.set_gmm_params(GMM().initialize(dim=4 * 8 * 8, n_components=8, n_steps=4))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert not np.array_equal(run(1.0), plain)


def test_ddim_pipeline_rebuilds_the_scheduler():
    """The documented trap: DDIMPipeline converts any scheduler to a plain diffusers DDIMScheduler."""
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )
    ours = DDIMScheduler()
    ours.set_gmm_params(GMM().initialize(dim=192, n_components=4, n_steps=5))
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=ours)
    assert type(pipe.scheduler) is diffusers.DDIMScheduler
