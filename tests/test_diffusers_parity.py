"""Where the runner and diffusers' own pipelines differ, and how each difference is settled
(docs/models.md, "Comparing with diffusers' pipelines"), on tiny random models saved by the tests."""

from __future__ import annotations

import json
import logging
import shutil

import diffusers
import pytest
import torch
from helpers.runs import adapter_of, compose_config, results_of
from helpers.tiny_checkpoints import save_ldm, save_pixel_ddpm
from helpers.tiny_sd3 import save_tiny_sd3

from ddim_gmm_exp.config import resolve_run
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.images import load_png, to_uint8
from ddim_gmm_exp.models.pretrained import LatentDDPMAdapter, StableDiffusion3Adapter
from ddim_gmm_exp.noise import randn
from ddim_gmm_exp.runner import build_adapter, build_gmm, build_schedule, run
from ddim_gmm_exp.samplers import ddim, kernel_sigmas

FAST = ["data.batch_size=2", "metrics.fid.enabled=false", "logger=none"]
# trailing with T % S != 0: diffusers' target t - T // S is not the next listed timestep
TRAILING_7 = ["sampler.timestep_spacing=trailing", "sampler.steps=7", "sampler.eta=0.0"]
SPACING_WARNING = "the model's scheduler config sets timestep_spacing"


@pytest.fixture(scope="module")
def pixel_dirs(tmp_path_factory):
    """google/ddpm-*-style checkpoints (a DDPMScheduler config that states leading spacing), plain
    and class-conditional (5 labels and a null class)."""
    return {
        "plain": save_pixel_ddpm(tmp_path_factory.mktemp("ddpm_plain")),
        "classes": save_pixel_ddpm(tmp_path_factory.mktemp("ddpm_classes"), classes=6),
    }


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    """A CompVis/ldm-celebahq-256-style checkpoint whose VQModel keeps diffusers' default
    scaling_factor 0.18215, with a codebook of latent-sized entries (diffusers initialises it within
    +-1/16): the nearest code, and so the image, then depends on the latents' scale, as it does for a
    trained VQ-VAE."""
    path = save_ldm(tmp_path_factory.mktemp("ldm"))
    vqvae = diffusers.VQModel.from_pretrained(path / "vqvae")
    torch.manual_seed(0)
    torch.nn.init.normal_(vqvae.quantize.embedding.weight)
    vqvae.save_pretrained(path / "vqvae")
    return path


def sample_images(run_dir) -> torch.Tensor:
    return torch.stack([load_png(p) for p in sorted((run_dir / "samples").glob("*.png"))])


def pixel_args(pixel_dirs, *extra):
    return [*FAST, "model=ddpm_cifar10", f"model.path={pixel_dirs['plain']}", *extra]


def spec_and_adapter(overrides, tmp_path, cache_dir):
    spec = resolve_run(compose_config(overrides, tmp_path, cache_dir), [], None)
    return spec, build_adapter(spec.model)


def unconditional(adapter):
    return lambda x, t: adapter.model_output(x, t, None)


def diffusers_ddim_loop(unet, scheduler_config, x, spacing, steps):
    """diffusers' DDIMScheduler as its pipelines step it, at eta = 0."""
    scheduler = diffusers.DDIMScheduler.from_config(scheduler_config, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


# ------------------------------------------------------------------ 2. where a DDIM step lands


def test_the_diffusers_rule_gives_diffusers_ddim_pipelines_images(pixel_dirs, tmp_path, cache_dir, caplog):
    args = pixel_args(
        pixel_dirs, "data.num_samples=2", "sampler=ddim", *TRAILING_7, "sampler.previous_timestep=diffusers"
    )
    with caplog.at_level(logging.WARNING):
        results = run(compose_config(args, tmp_path, cache_dir))
    assert results["previous_timestep"] == "diffusers"
    assert results["settings"]["sampler.previous_timestep"] == "diffusers"
    # the pixel checkpoint's config says leading: the run's trailing replaces it, with one warning
    assert [r.getMessage() for r in caplog.records].count(
        f"{SPACING_WARNING}='leading' but the run uses sampler.timestep_spacing='trailing' (the same for every "
        "model, so that grids match): pass sampler.timestep_spacing=leading to use the checkpoint's"
    ) == 1
    # diffusers' DDIMPipeline, from the runner's initial noise (sample i's generator is seeded data.seed + i)
    seed = int(results["seed"])
    unet = diffusers.UNet2DModel.from_pretrained(pixel_dirs["plain"])
    config = diffusers.DDIMScheduler.load_config(pixel_dirs["plain"])
    pipe = diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing"))
    generators = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    theirs = pipe(batch_size=2, generator=generators, eta=0.0, num_inference_steps=7, output_type="np").images
    assert torch.equal(sample_images(tmp_path), to_uint8(torch.from_numpy(theirs).permute(0, 3, 1, 2)))


def test_listed_is_the_default_and_differs_from_diffusers_where_the_gap_is_not_t_over_s(
    pixel_dirs,
    tmp_path,
    cache_dir,
):
    unet = diffusers.UNet2DModel.from_pretrained(pixel_dirs["plain"])
    x = randn((2, 3, 8, 8), [torch.Generator().manual_seed(i) for i in range(2)])
    outputs = {}
    for rule in ("listed", "diffusers"):
        spec, adapter = spec_and_adapter(
            pixel_args(pixel_dirs, "sampler=ddim", *TRAILING_7, f"sampler.previous_timestep={rule}"),
            tmp_path,
            cache_dir,
        )
        schedule = build_schedule(spec, adapter)
        assert schedule.previous_timestep == rule and schedule.timesteps[:2] == [999, 856]  # 1000 // 7 = 142
        with torch.no_grad():
            outputs[rule] = ddim(unconditional(adapter), x, schedule)
    with torch.no_grad():
        theirs = diffusers_ddim_loop(unet, adapter.scheduler_config, x, "trailing", 7)
    assert torch.equal(outputs["diffusers"], theirs)  # bit for bit
    assert (outputs["listed"] - theirs).abs().max() > 1e-3
    default, _ = spec_and_adapter(pixel_args(pixel_dirs, "sampler=ddim"), tmp_path, cache_dir)
    assert default.sampler.previous_timestep == "listed"
    assert "sampler.previous_timestep" not in default.settings()  # earlier runs' fingerprints are unchanged


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sampler=ddim", "sampler.previous_timestep=next"],
            "sampler.previous_timestep='next' is not allowed: choose one of listed, diffusers",
        ),
        (
            ["sampler=ddim_gmm", "sampler.previous_timestep=null"],
            "sampler.previous_timestep=None is not allowed: choose one of listed, diffusers",
        ),
        (
            ["sampler=euler", "+sampler.previous_timestep=diffusers"],
            "sampler.previous_timestep='diffusers' is not used by sampler=euler: it steps on its own time grid",
        ),
        (
            ["sampler=edm", "+sampler.previous_timestep=listed"],
            "sampler.previous_timestep='listed' is not used by sampler=edm: it steps on its own time grid",
        ),
        (
            ["model=digits_flow", "sampler=rfim", "+sampler.previous_timestep=listed"],
            "sampler.previous_timestep='listed' is not used by sampler=rfim: it steps on its own time grid",
        ),
    ],
)
def test_a_bad_previous_timestep_is_refused_before_any_model_loads(overrides, message, tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=f"^{message}"):
        run(compose_config([*FAST, "data.num_samples=2", *overrides], tmp_path, cache_dir))


def test_kernel_sigmas_and_the_clipped_fraction_follow_the_rule(pixel_dirs, tmp_path, cache_dir):
    # linspace, 7 steps: diffusers' targets are off the grid ([999, 832, ...] stepping by 142)
    grid = ["sampler.timestep_spacing=linspace", "sampler.steps=7", "sampler.eta=0.5"]
    gmm = ["sampler=ddim_gmm", "gmm.n_components=4", "gmm.scale=0.03"]
    sigmas = {}
    for rule in ("listed", "diffusers"):
        spec, adapter = spec_and_adapter(
            pixel_args(pixel_dirs, *gmm, *grid, f"sampler.previous_timestep={rule}"), tmp_path, cache_dir
        )
        sigmas[rule] = kernel_sigmas(build_schedule(spec, adapter), 0.5)
    scheduler = diffusers.DDIMScheduler.from_config(adapter.scheduler_config, timestep_spacing="linspace")
    scheduler.set_timesteps(7)
    # diffusers' own std_dev_t = eta * sqrt(variance(t, t - T // S))
    assert sigmas["diffusers"] == [float(0.5 * scheduler._get_variance(t, t - 142) ** 0.5) for t in scheduler.timesteps]
    assert sigmas["listed"] != sigmas["diffusers"]
    kernel = build_gmm(spec, adapter, 7)  # the run's kernel: conf/gmm's settings, K = 4, s = 0.03
    fractions = {rule: kernel.clipped_fraction(sigmas[rule], 0.5) for rule in sigmas}
    assert fractions["listed"] != fractions["diffusers"]
    run_args = pixel_args(pixel_dirs, "data.num_samples=2", *gmm, *grid, "sampler.previous_timestep=diffusers")
    results = run(compose_config(run_args, tmp_path / "run", cache_dir))
    assert results["gmm_clipped_fraction"] == fractions["diffusers"]


# ------------------------------------------------------------------ 3. the checkpoint's own spacing


@pytest.mark.parametrize(
    ("sampler", "spacing", "warns"),
    [("ddim", "leading", False), ("ddim", "linspace", True), ("euler", "trailing", True), ("edm", None, False)],
)
def test_a_spacing_other_than_the_checkpoints_is_warned_about_once(
    pixel_dirs,
    sampler,
    spacing,
    warns,
    tmp_path,
    cache_dir,
    caplog,
):
    spacing_arg = [] if spacing is None else [f"sampler.timestep_spacing={spacing}"]
    spec, adapter = spec_and_adapter(pixel_args(pixel_dirs, f"sampler={sampler}", *spacing_arg), tmp_path, cache_dir)
    assert adapter.scheduler_config["timestep_spacing"] == "leading"
    with caplog.at_level(logging.WARNING):
        build_schedule(spec, adapter)
    found = [r.getMessage() for r in caplog.records if SPACING_WARNING in r.getMessage()]
    assert len(found) == (1 if warns else 0)
    if warns:
        assert f"sampler.timestep_spacing={spacing!r}" in found[0] and "sampler.timestep_spacing=leading" in found[0]


# ------------------------------------------------------------------ 1. the VQ model's latents are not scaled


def test_vq_latents_are_decoded_without_the_vqvae_scaling_factor(ldm_dir, tmp_path, cache_dir):
    adapter = adapter_of(compose_config([*FAST, "model=ldm_celebahq256", f"model.path={ldm_dir}"], tmp_path, cache_dir))
    vqvae = diffusers.VQModel.from_pretrained(ldm_dir / "vqvae")
    scaling = vqvae.config.scaling_factor
    assert scaling == pytest.approx(0.18215) and adapter.latent_scale == 1.0
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = adapter.decode(z)
        unscaled = ((vqvae.decode(z).sample + 1) / 2).clamp(0, 1)
        divided = ((vqvae.decode(z / scaling).sample + 1) / 2).clamp(0, 1)  # what diffusers' LDMPipeline decodes
    assert torch.equal(ours, unscaled)
    assert (ours - divided).abs().max() > 1e-3


# ------------------------------------------------------------------ 4. guidance below 1


def test_a_guidance_scale_below_one_is_applied_literally(pixel_dirs, tmp_path, cache_dir):
    conditional = [
        *FAST,
        "data.num_samples=2",
        "sampler.steps=3",
        "model=ddpm_cifar10",
        f"model.path={pixel_dirs['classes']}",
        "+model.adapter.null_class=5",
        "data.labels=[3]",
    ]
    for scale in ("0.0", "0.5", "1.0"):
        run(compose_config([*conditional, f"sampler.guidance_scale={scale}"], tmp_path / scale, cache_dir))
    run(compose_config([*conditional, "data.labels=null"], tmp_path / "null", cache_dir))
    half, cond, uncond = (sample_images(tmp_path / s) for s in ("0.5", "1.0", "0.0"))
    # diffusers' pipelines would run 0.5 as the conditional model (guidance only when the scale is > 1)
    assert not torch.equal(half, cond) and not torch.equal(half, uncond)
    assert results_of(tmp_path / "0.5")["guidance_scale"] == 0.5
    # 0 is the unconditional model (the null class), run as such: the images of data.labels=null
    assert torch.equal(uncond, sample_images(tmp_path / "null"))


# ------------------------------------------------------------------ 5. a local SD3 directory without T5


@pytest.fixture(scope="module")
def sd3_without_t5(tmp_path_factory):
    """A local SD3 directory whose model_index.json lists the T5 encoder, without its folders (as
    `hf download` with text_encoder_3/ and tokenizer_3/ excluded writes it)."""
    path = save_tiny_sd3(tmp_path_factory.mktemp("sd3_no_t5"))
    index = json.loads((path / "model_index.json").read_text())
    index |= {"text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def test_a_local_sd3_without_t5_says_what_is_missing_and_loads_without_it(sd3_without_t5):
    with pytest.raises(ConfigError) as refused:
        StableDiffusion3Adapter(path=str(sd3_without_t5))
    message = str(refused.value)
    assert message == (
        f"model.path={str(sd3_without_t5)!r} has no text_encoder_3/ or tokenizer_3/ (the T5 text encoder its "
        "model_index.json lists): pass model.text_encoder_3=false to run without T5, or add the folders"
    )
    assert "hf download" not in message
    adapter = StableDiffusion3Adapter(path=str(sd3_without_t5), text_encoder_3=False, resolution=16)
    assert adapter.text_encoder_3 is None and adapter.sample_shape == (4, 8, 8)


def test_a_local_sd3_missing_another_part_names_its_folder(sd3_without_t5, tmp_path):
    broken = shutil.copytree(sd3_without_t5, tmp_path / "sd3")
    shutil.rmtree(broken / "vae")
    with pytest.raises(
        ConfigError, match=r"has no vae/, which its model_index.json lists: the checkpoint is incomplete"
    ):
        StableDiffusion3Adapter(path=str(broken), text_encoder_3=False)
    (broken / "model_index.json").unlink()
    with pytest.raises(ConfigError, match="has no model_index.json: not a diffusers pipeline directory"):
        StableDiffusion3Adapter(path=str(broken), text_encoder_3=False)


def test_a_local_directory_missing_a_subfolder_names_it(ldm_dir, tmp_path):
    broken = shutil.copytree(ldm_dir, tmp_path / "ldm")
    shutil.rmtree(broken / "vqvae")
    with pytest.raises(ConfigError) as refused:
        LatentDDPMAdapter(path=str(broken))
    assert str(refused.value) == f"cannot load the VQ-VAE from model.path '{broken}/vqvae': it has no vqvae/ folder"
