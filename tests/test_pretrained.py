"""Every pretrained model family, on a tiny randomly initialised model of the same diffusers classes,
saved by the test and run through the runner by model.path: offline, 2-3 steps."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers.runs import adapter_of, compose_config
from helpers.tiny_checkpoints import save_dit, save_ldm, save_pixel_ddpm, save_sd

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.images import load_png
from ddim_gmm_exp.runner import run

FAST = ["data.num_samples=4", "data.batch_size=4", "sampler.steps=3", "metrics.fid.enabled=false", "logger=none"]


@pytest.fixture(scope="module")
def pixel_dirs(tmp_path_factory):
    """A google/ddpm-*-style checkpoint (UNet and scheduler config at the root), plain and class-conditional."""
    return {
        "plain": save_pixel_ddpm(tmp_path_factory.mktemp("ddpm_plain")),
        "classes": save_pixel_ddpm(tmp_path_factory.mktemp("ddpm_classes"), classes=6),  # 5 labels and a null class
    }


def run_model(tmp_path, cache_dir, overrides):
    return run(compose_config([*FAST, *overrides], tmp_path, cache_dir))


def sample_images(run_dir) -> torch.Tensor:
    return torch.stack([load_png(p) for p in sorted((run_dir / "samples").glob("*.png"))])


def test_pixel_ddpm(pixel_dirs, tmp_path, cache_dir):
    args = ["model=ddpm_cifar10", f"model.path={pixel_dirs['plain']}", "sampler=ddim_gmm", "gmm.n_components=4"]
    cfg = compose_config([*FAST, *args], tmp_path, cache_dir)
    adapter = adapter_of(cfg)
    assert adapter.sample_shape == (3, 8, 8) and adapter.dim == 192 and adapter.num_classes == 0
    results = run(cfg)
    assert results["sampled_this_run"] == 4 and results["n_components"] == 4
    images = sample_images(tmp_path)
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8


def test_class_labels_reach_the_class_embedding(pixel_dirs, tmp_path, cache_dir):
    base = ["model=ddpm_cifar10", f"model.path={pixel_dirs['classes']}", "+model.adapter.null_class=5"]
    run_model(tmp_path / "a", cache_dir, [*base, "data.labels=[0]"])
    run_model(tmp_path / "b", cache_dir, [*base, "data.labels=[3]"])
    run_model(tmp_path / "c", cache_dir, [*base, "data.labels=[3]", "sampler.guidance_scale=3.0"])
    a, b, c = (sample_images(tmp_path / d) for d in "abc")
    assert not torch.equal(a, b) and not torch.equal(b, c)
    for unconditional in ("data.labels=null", "sampler.guidance_scale=0"):  # refused before sampling
        with pytest.raises(ConfigError, match=f"{unconditional} samples unconditionally, and model=ddpm_cifar10 is"):
            run_model(tmp_path / "u", cache_dir, [*base[:2], "data.labels=[3]", unconditional])
        assert not (tmp_path / "u" / "samples").exists()
    with pytest.raises(ConfigError, match="sampler.guidance_scale=3.0 needs a null class"):
        run_model(
            tmp_path / "d",
            cache_dir,
            [
                "model=ddpm_cifar10",
                f"model.path={pixel_dirs['classes']}",
                "data.labels=[3]",
                "sampler.guidance_scale=3.0",
            ],
        )


def test_precision_and_memory_format_options(pixel_dirs, tmp_path, cache_dir):
    base = ["model=ddpm_cifar10", f"model.path={pixel_dirs['plain']}"]
    run_model(tmp_path / "fp32", cache_dir, base)
    run_model(tmp_path / "bf16", cache_dir, [*base, "model.precision=bf16", "model.channels_last=true"])
    fp32, bf16 = sample_images(tmp_path / "fp32").float(), sample_images(tmp_path / "bf16").float()
    assert not torch.equal(fp32, bf16)  # bf16 autocast did act
    assert (fp32 - bf16).abs().mean() < 20  # the same samples up to bf16 rounding
    compiled = adapter_of(compose_config([*FAST, *base, "model.compile=true"], tmp_path / "c", cache_dir))
    assert isinstance(compiled.denoiser, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ConfigError, match="model.precision='fp8' is not allowed"):
        run_model(tmp_path / "bad", cache_dir, [*base, "model.precision=fp8"])


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    """A CompVis/ldm-celebahq-256-style checkpoint: unet/, vqvae/, scheduler/."""
    return save_ldm(tmp_path_factory.mktemp("ldm"))


def test_latent_ddpm_decodes_through_the_vqvae(ldm_dir, tmp_path, cache_dir):
    cfg = compose_config(
        [*FAST, "model=ldm_celebahq256", f"model.path={ldm_dir}", "sampler=ddim_gmm"], tmp_path, cache_dir
    )
    assert adapter_of(cfg).dim == 3 * 4 * 4  # the GMM lives in latent space
    run(cfg)
    assert sample_images(tmp_path).shape == (4, 3, 8, 8)


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """stable-diffusion-2-1-style checkpoints (tokenizer, text_encoder, unet, vae, scheduler), eps and v."""
    return {p: save_sd(tmp_path_factory.mktemp(f"sd_{p}"), p) for p in ("epsilon", "v_prediction")}


def test_stable_diffusion_prompts_guidance_and_v_prediction(sd_dirs, tmp_path, cache_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog on a hill\n")
    other = tmp_path / "other.txt"
    other.write_text("the sea\nred apples\n")
    base = ["model=sd21", f"model.path={sd_dirs['epsilon']}", "data.num_samples=2", "sampler=ddim_gmm"]
    cfg = compose_config([*FAST, *base, f"data.prompts_file={prompts}"], tmp_path / "a", cache_dir)
    assert cfg.sampler.guidance_scale == 7.5  # the family's usual guidance
    adapter = adapter_of(cfg)
    assert adapter.sample_shape == (4, 4, 4)  # latent 4 x (8 / 2) x (8 / 2)
    run(cfg)
    run_model(tmp_path / "b", cache_dir, [*base, f"data.prompts_file={other}"])
    run_model(tmp_path / "c", cache_dir, [*base, f"data.prompts_file={prompts}", "sampler.guidance_scale=1.0"])
    a, b, c = (sample_images(tmp_path / d) for d in "abc")
    assert a.shape == (2, 3, 8, 8)
    assert not torch.equal(a, b), "prompts must reach the text encoder"
    assert not torch.equal(a, c), "guidance must change the output"
    v_cfg = compose_config(
        [*FAST, "model=sd21_768", f"model.path={sd_dirs['v_prediction']}", "data.num_samples=2"],
        tmp_path / "v",
        cache_dir,
    )
    assert adapter_of(v_cfg).scheduler_config["prediction_type"] == "v_prediction"
    results = run(v_cfg)  # no prompts file: the shipped default prompts
    assert results["sampled_this_run"] == 2 and np.isfinite(sample_images(tmp_path / "v").float()).all()
    # the same weights read as an epsilon model sample differently: the prediction type is used
    as_eps = tmp_path / "as_eps"
    shutil.copytree(sd_dirs["v_prediction"], as_eps)
    config = json.loads((as_eps / "scheduler" / "scheduler_config.json").read_text()) | {"prediction_type": "epsilon"}
    (as_eps / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    run(
        compose_config(
            [*FAST, "model=sd21_768", f"model.path={as_eps}", "data.num_samples=2"], tmp_path / "e", cache_dir
        )
    )
    assert not torch.equal(sample_images(tmp_path / "v"), sample_images(tmp_path / "e"))


def test_clip_score_of_prompted_images(sd_dirs, tmp_path, cache_dir, tiny_clip_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    results = run_model(
        tmp_path / "run",
        cache_dir,
        [
            "model=sd21",
            f"model.path={sd_dirs['epsilon']}",
            "data.num_samples=2",
            f"data.prompts_file={prompts}",
            "metrics=clip",
            f"metrics.extra.clip.factory.model={tiny_clip_dir}",
        ],
    )
    assert 0 <= results["metrics"]["clip"] <= 100


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """A facebook/DiT-XL-2-256-style checkpoint: transformer/, vae/, scheduler/ (10 classes here)."""
    return save_dit(tmp_path_factory.mktemp("dit"))


def test_dit_labels_null_class_and_guidance(dit_dir, tmp_path, cache_dir):
    base = ["model=dit_xl2_256", f"model.path={dit_dir}", "data.num_samples=2"]
    cfg = compose_config([*FAST, *base], tmp_path / "a", cache_dir)
    adapter = adapter_of(cfg)
    assert adapter.num_classes == 10 and adapter.null_label == 10 and adapter.sample_shape == (4, 4, 4)
    run(cfg)  # balanced labels 0, 1 with guidance 4.0
    run_model(tmp_path / "b", cache_dir, [*base, "data.labels=[5]"])
    run_model(tmp_path / "c", cache_dir, [*base, "data.labels=null"])
    a, b, c = (sample_images(tmp_path / d) for d in "abc")
    assert a.shape == (2, 3, 8, 8) and not torch.equal(a, b) and not torch.equal(b, c)


def test_missing_checkpoints_are_clear_errors(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="model.path='/nonexistent' does not exist"):
        run_model(tmp_path / "a", cache_dir, ["model=ddpm_cifar10", "model.path=/nonexistent"])
    with pytest.raises(ConfigError, match="cannot load the UNet from 'google/ddpm-cifar10-32' offline"):
        run_model(tmp_path / "b", cache_dir, ["model=ddpm_cifar10"])
