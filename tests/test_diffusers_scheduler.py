"""The diffusers interface: loading, config round trip, timestep spacings, pipelines, bad input."""

import functools
import itertools
import json
import re
import warnings
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from ddim_gmm_exp import gmm as gmm_module
from ddim_gmm_exp.diffusers import GMM, DDIMGMMScheduler, DDIMScheduler
from ddim_gmm_exp.noise import sample_generators


@pytest.fixture
def ddpm_dir(tmp_path):
    """A scheduler directory as google/ddpm-cat-256 ships it (a DDPMScheduler config)."""
    diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small", clip_sample=True
    ).save_pretrained(tmp_path / "scheduler")
    return tmp_path


def readme_snippet() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use it with diffusers", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_snippet_runs_as_written(monkeypatch):
    """The README's diffusers snippet, executed as written (offline, on the shipped digits model):
    at eta = 0 the paper's kernel acts, with no warning; the memory figure quoted beside it holds."""
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the paper's kernel acts at eta = 0: no warning
        exec(compile(readme_snippet(), "README.md", "exec"), scope)
    x, scheduler = scope["x"], scope["scheduler"]
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert isinstance(scheduler, diffusers.DDIMScheduler) and DDIMGMMScheduler is DDIMScheduler
    assert 0 < scheduler.clipped_fraction < 1
    # the same loop with diffusers' own scheduler (DDIM) gives other samples
    unet, generator = scope["unet"], torch.Generator().manual_seed(0)
    plain = diffusers.DDIMScheduler.from_pretrained(scope["model_dir"] / "scheduler")
    plain.set_timesteps(50)
    y = torch.randn(4, 1, 8, 8, generator=generator)
    with torch.no_grad():
        for t in plain.timesteps:
            y = plain.step(unet(y, t, class_labels=scope["digits"]).sample, t, y, eta=0.0).prev_sample
    assert (x - y).abs().max() > 1e-3
    # memory_bytes is the size of the storage initialize() allocates for all S steps before it
    # builds any; the values stored do not enter it. So the cat kernel's 50 steps are filled with
    # its step 0, built once for real (50 QRs of a 196608 x 16 matrix took half a minute on 2 cores).
    step_zero = functools.cache(gmm_module.build_paper_step)  # its hyperparameters are a frozen dataclass
    with monkeypatch.context() as patch:
        patch.setattr(gmm_module, "build_paper_step", lambda hp, step_index: step_zero(hp, 0))
        cat = GMM().initialize(dim=3 * 256 * 256, n_components=16, n_steps=50, scale=1.0)
    assert round(cat.memory_bytes / 1e6) == 668  # the README's numbers
    cat_vub_star = GMM().initialize(dim=3 * 256 * 256, n_components=16, n_steps=50, share_across_steps=True)
    assert round(cat_vub_star.memory_bytes / 1e6) == 13


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
    scheduler = DDIMScheduler(
        timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=True, previous_timestep="listed"
    )
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
    with pytest.raises(ValueError, match="previous_timestep='next' is not allowed: choose one of"):
        DDIMScheduler(previous_timestep="next")
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
    with pytest.raises(ValueError, match="scale=2.0 is not allowed with construction='matched_full'"):
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


def model_output_for(x, t):
    """A deterministic stand-in for a network: depends on x and t, not on anything random."""
    return torch.tanh(x * 0.7 + 0.001 * float(t))


# (spacing, S, steps_offset): the brief's grid, plus "leading" with steps_offset >= T // S and
# "trailing" with S = 61, where diffusers' timesteps are S + 1 long and end at -1.
PARITY_CASES = list(itertools.product(["leading", "trailing", "linspace"], [7, 30, 50], [0, 1])) + [
    ("leading", 7, 143),
    ("trailing", 61, 0),
]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,num_steps,steps_offset", PARITY_CASES)
def test_default_step_is_diffusers_step_bit_for_bit(spacing, num_steps, steps_offset, eta):
    """Default previous_timestep="diffusers": t - T // S, exactly as diffusers' step computes it."""
    config = dict(timestep_spacing=spacing, steps_offset=steps_offset)
    ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(num_steps)
    theirs.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x_ours = x_theirs = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    g_ours, g_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        a = ours.step(model_output_for(x_ours, t), t, x_ours, eta=eta, generator=g_ours)
        b = theirs.step(model_output_for(x_theirs, t), t, x_theirs, eta=eta, generator=g_theirs)
        assert torch.equal(a.pred_original_sample, b.pred_original_sample)
        assert torch.equal(a.prev_sample, b.prev_sample), f"t={int(t)}"
        x_ours, x_theirs = a.prev_sample, b.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_default_step_is_diffusers_step_for_every_option(prediction_type):
    """The other step options (no x0 clipping, thresholding, clipped model output, set_alpha_to_one)."""
    for options in [
        dict(clip_sample=False, set_alpha_to_one=False),
        dict(thresholding=True, sample_max_value=2.0),
    ]:
        config = dict(timestep_spacing="trailing", prediction_type=prediction_type, **options)
        ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
        ours.set_timesteps(30)
        theirs.set_timesteps(30)
        x_ours = x_theirs = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        g_ours, g_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for t in ours.timesteps:
            kwargs = dict(eta=0.5, use_clipped_model_output=True)
            a = ours.step(3 * model_output_for(x_ours, t), t, x_ours, generator=g_ours, **kwargs)
            b = theirs.step(3 * model_output_for(x_theirs, t), t, x_theirs, generator=g_theirs, **kwargs)
            assert torch.equal(a.prev_sample, b.prev_sample), f"{options} t={int(t)}"
            x_ours, x_theirs = a.prev_sample, b.prev_sample


def test_listed_rule_steps_to_the_next_listed_timestep():
    """previous_timestep="listed" differs from diffusers exactly where T // S is not the gap."""
    ours = DDIMScheduler(timestep_spacing="trailing", previous_timestep="listed")
    theirs = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ours.set_timesteps(30)
    theirs.set_timesteps(30)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[1]  # 966 -> 932 (listed) vs 966 -> 933 (diffusers)
    a = ours.step(model_output_for(x, t), t, x).prev_sample
    b = theirs.step(model_output_for(x, t), t, x).prev_sample
    assert not torch.equal(a, b)


@pytest.mark.parametrize("rule", ["diffusers", "listed"])
def test_previous_timestep_rule_round_trips(tmp_path, rule):
    scheduler = DDIMScheduler(previous_timestep=rule) if rule == "listed" else DDIMScheduler()
    assert DDIMScheduler.from_config(scheduler.config).config.previous_timestep == rule
    scheduler.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["previous_timestep"] == rule
    assert DDIMScheduler.from_pretrained(tmp_path).config.previous_timestep == rule
    # a diffusers config without the key gets diffusers' rule
    assert DDIMScheduler.from_config(diffusers.DDIMScheduler().config).config.previous_timestep == "diffusers"


def gmm_after_construction():
    """A scheduler built without gmm_* keys, its GMM installed afterwards (the usual order)."""
    scheduler = DDIMScheduler(timestep_spacing="trailing", steps_offset=1)
    scheduler.set_gmm_params(GMM().initialize(dim=48, n_components=4, n_steps=6, scale=0.5, seed=3))
    return scheduler


def step_n(scheduler, x, seeds, eta, n=4):
    generators = sample_generators(seeds)
    for t in scheduler.timesteps[:n]:
        x = scheduler.step(model_output_for(x, t), t, x, eta=eta, generator=generators).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("how", ["from_config", "save_pretrained"])
def test_a_copy_samples_exactly_like_the_original(tmp_path, eta, how):
    original = gmm_after_construction()
    if how == "from_config":
        copy = DDIMScheduler.from_config(original.config)
    else:
        original.save_pretrained(tmp_path)
        copy = DDIMScheduler.from_pretrained(tmp_path)
    original.set_timesteps(6)
    copy.set_timesteps(6)
    assert copy.gmm_params is not None and copy.gmm_params.hparams == original.gmm_params.hparams
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sample = step_n(original, x, [5, 6], eta)
    assert torch.equal(step_n(copy, x, [5, 6], eta), sample)
    plain = DDIMScheduler.from_config(original.config, gmm_n_components=None)
    plain.set_timesteps(6)
    assert not torch.equal(step_n(plain, x, [5, 6], eta), sample)  # the GMM is what is copied


def scheduler_state(scheduler):
    return (
        scheduler.gmm_params,
        dict(scheduler.config),
        scheduler.timesteps.clone(),
        scheduler.num_inference_steps,
        dict(scheduler._step_sigmas),
        scheduler.clipped_fraction,
    )


def assert_same_state(before, after):
    gmm, config, timesteps, num_steps, clipped, fraction = before
    assert after[0] is gmm
    assert after[1] == config
    assert torch.equal(after[2], timesteps)
    assert after[3:] == (num_steps, clipped, fraction)


def with_gmm_and_one_step():
    scheduler = DDIMScheduler()
    scheduler.set_gmm_params(GMM().initialize(dim=3, n_components=2, n_steps=10))
    scheduler.set_timesteps(10)
    scheduler.step(torch.zeros(1, 3), scheduler.timesteps[0], torch.zeros(1, 3), eta=1.0)
    return scheduler


def timesteps_only():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    return scheduler


def gmm_in_config_only():
    return DDIMScheduler(gmm_dim=3, gmm_n_components=2, gmm_n_steps=10)


def install_a_20_step_gmm(scheduler):
    scheduler.set_gmm_params(GMM().initialize(dim=3, n_components=2, n_steps=20))


REFUSED_CALLS = {
    "gmm for other steps, none installed": (timesteps_only, install_a_20_step_gmm, "n_steps=20 does not match"),
    "gmm for other steps, one installed": (with_gmm_and_one_step, install_a_20_step_gmm, "n_steps=20 does not match"),
    "uninitialized gmm": (with_gmm_and_one_step, lambda s: s.set_gmm_params(GMM()), "call gmm_params.initialize"),
    "steps the gmm lacks": (with_gmm_and_one_step, lambda s: s.set_timesteps(20), "n_steps=10 does not match the 20"),
    "steps the config's gmm lacks": (gmm_in_config_only, lambda s: s.set_timesteps(20), "n_steps=10 does not match"),
    "too many steps": (with_gmm_and_one_step, lambda s: s.set_timesteps(1001), "num_inference_steps=1001 is not"),
}


@pytest.mark.parametrize("make,call,message", REFUSED_CALLS.values(), ids=REFUSED_CALLS.keys())
def test_a_refused_call_leaves_the_scheduler_as_it_was(make, call, message):
    scheduler = make()
    before = scheduler_state(scheduler)
    with pytest.raises(ValueError, match=message):
        call(scheduler)
    assert_same_state(before, scheduler_state(scheduler))


@pytest.mark.parametrize("count", [np.int64(7), np.int32(7), np.uint16(7)])
def test_numpy_integer_step_counts_are_accepted(count):
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(count)
    theirs.set_timesteps(count)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.num_inference_steps == 7
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[0]
    assert torch.equal(ours.step(0.3 * x, t, x).prev_sample, theirs.step(0.3 * x, t, x).prev_sample)


@pytest.mark.parametrize("count", [0, -3, 1001, True, np.bool_(True), 2.5, np.float64(7.0), "7", None])
def test_bad_step_counts_are_refused_by_name(count):
    scheduler = DDIMScheduler()
    allowed = r"is not allowed: it must be an integer in \[1, 1000\]"
    with pytest.raises(ValueError, match=rf"num_inference_steps={re.escape(repr(count))} {allowed}"):
        scheduler.set_timesteps(count)
    assert scheduler.num_inference_steps is None


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_step_refused_for_the_gmms_dimension_draws_and_records_nothing(eta):
    """A GMM of the wrong dimension is refused before z is drawn (the caller's generator is where
    it was) and before the step's sigma is recorded (clipped_fraction counts no step that never ran)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    scheduler.set_gmm_params(GMM().initialize(dim=5, n_components=2, n_steps=10))
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match=r"GMM dim=5 does not match the sample shape \(3,\)"):
        scheduler.step(torch.zeros(1, 3), t, torch.zeros(1, 3), eta=eta, generator=generator)
    assert torch.equal(generator.get_state(), state)
    assert scheduler.clipped_fraction is None  # no step ran (it said 0.0 before)
