"""The runner's diffusers flow family (sd3_medium, sd35_medium) on a tiny SD3 pipeline saved offline."""

import numpy as np
import pytest
import torch
from helpers.runs import adapter_of, compose_config
from helpers.tiny_sd3 import latent_dim, load_tiny_sd3, save_tiny_sd3

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.images import load_png
from ddim_gmm_exp.runner import run

FAST = ["data.num_samples=2", "data.batch_size=2", "sampler.steps=3", "metrics.fid.enabled=false", "logger=none"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3"))


def base(sd3_dir, model="sd3_medium"):
    return [f"model={model}", f"model.path={sd3_dir}", "model.text_encoder_3=false", "model.resolution=16"]


def images(run_dir):
    return torch.stack([load_png(p) for p in sorted((run_dir / "samples").glob("*.png"))])


def test_sd3_family_samples_with_prompts_guidance_and_the_pipelines_sigmas(sd3_dir, tmp_path, cache_dir):
    prompts, other = tmp_path / "prompts.txt", tmp_path / "other.txt"
    prompts.write_text("a cat\na dog on a hill\n")
    other.write_text("the sea\nred apples\n")
    cfg = compose_config(
        [*FAST, *base(sd3_dir), "sampler=rfim", f"data.prompts_file={prompts}"], tmp_path / "a", cache_dir
    )
    assert cfg.sampler.guidance_scale == 7.0
    adapter = adapter_of(cfg)
    assert adapter.family == "flow" and adapter.dim == latent_dim(16, 16)
    # the pipeline's own shifted sigmas (shift 3.0), as its scheduler sets them
    pipe = load_tiny_sd3(sd3_dir)
    pipe.scheduler.set_timesteps(3)
    assert adapter.flow_sigmas(3) == [float(s) for s in pipe.scheduler.sigmas]
    results = run(cfg)
    assert results["sampled_this_run"] == 2 and results["sampler"] == "rfim"
    run(
        compose_config([*FAST, *base(sd3_dir), "sampler=rfim", f"data.prompts_file={other}"], tmp_path / "b", cache_dir)
    )
    unguided = [*FAST, *base(sd3_dir), "sampler=rfim", f"data.prompts_file={prompts}", "sampler.guidance_scale=1.0"]
    run(compose_config(unguided, tmp_path / "c", cache_dir))
    a, b, c = (images(tmp_path / d) for d in "abc")
    assert a.shape == (2, 3, 16, 16) and np.isfinite(a.float().numpy()).all()
    assert not torch.equal(a, b), "prompts must reach the text encoders"
    assert not torch.equal(a, c), "guidance must change the output"


def test_sd35_rfim_gmm_runs_in_latent_space(sd3_dir, tmp_path, cache_dir):
    args = [*FAST, *base(sd3_dir, "sd35_medium"), "sampler=rfim_gmm", "gmm.n_components=4", "sampler.eta=0.2"]
    results = run(compose_config(args, tmp_path, cache_dir))
    assert results["guidance_scale"] == 4.5 and results["n_components"] == 4
    assert results["gmm_memory_bytes"] > 0 and len(results["variance_account"]["steps"]) == 3


def test_clip_score_of_sd3_images(sd3_dir, tmp_path, cache_dir, tiny_clip_dir):
    args = [*FAST, *base(sd3_dir), "sampler=rfim", "metrics=clip", f"metrics.extra.clip.factory.model={tiny_clip_dir}"]
    results = run(compose_config(args, tmp_path, cache_dir))  # no prompts file: the shipped defaults
    assert 0 <= results["metrics"]["clip"] <= 100


def test_missing_sd3_checkpoint_names_the_download_command(tmp_path, cache_dir):
    cfg = compose_config([*FAST, "model=sd3_medium", "sampler=rfim"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match="hf download stabilityai/stable-diffusion-3-medium-diffusers"):
        run(cfg)


def test_a_diffusion_sampler_on_a_flow_model_is_refused(sd3_dir, tmp_path, cache_dir):
    cfg = compose_config([*FAST, *base(sd3_dir), "sampler=ddim_gmm"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match="sampler=ddim_gmm walks a diffusion schedule but model=sd3_medium"):
        run(cfg)
