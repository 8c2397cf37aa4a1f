"""sampler.x0_handling: what the DDIM step does to x0_hat, pinned against diffusers' own step."""

from __future__ import annotations

import diffusers
import pytest
import torch
from helpers.runs import SMALL, compose_config

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.runner import run
from ddim_gmm_exp.samplers import DiffusionSchedule
from ddim_gmm_exp.sampling import X0_HANDLINGS, ddim_kernel_step

# handling -> (diffusers config, use_clipped_model_output): the diffusers step that is the reference
DIFFUSERS_STEP = {
    "none": ({"clip_sample": False}, False),
    "clip": ({"clip_sample": True}, False),
    "clip_consistent": ({"clip_sample": True}, True),
    "threshold": ({"clip_sample": False, "thresholding": True, "sample_max_value": 1.0}, True),
}


@pytest.mark.parametrize("handling", DIFFUSERS_STEP)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_each_handling_is_diffusers_step_bit_for_bit(handling, eta):
    """From a scheduler config that clips (the digits model's), each handling's step equals
    diffusers' DDIMScheduler.step with the settings that handling names; x0_hat is far outside
    [-1, 1], as under guidance, so clipping matters."""
    config, consistent = DIFFUSERS_STEP[handling]
    reference = diffusers.DDIMScheduler(num_train_timesteps=1000, **config)
    reference.set_timesteps(10)
    clipping = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    ours = DiffusionSchedule.from_scheduler(clipping, handling)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 5
    t = int(reference.timesteps[3])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = reference.step(eps, t, x, eta=eta, use_clipped_model_output=consistent, variance_noise=z).prev_sample
    abar_t, abar_s = reference.alphas_cumprod[t], reference.alphas_cumprod[int(reference.timesteps[4])]
    got, _ = ddim_kernel_step(eps, x, abar_t, abar_s, eta, z=z, **ours.step_options)
    assert torch.equal(got, expected)
    assert ours.x0_handling == handling


def test_model_follows_the_scheduler_config_and_keeps_eps():
    clipping = DiffusionSchedule.from_scheduler(diffusers.DDIMScheduler(clip_sample=True))
    assert clipping.x0_handling == "clip" and clipping.step_options["use_clipped_model_output"] is False
    assert DiffusionSchedule.from_scheduler(diffusers.DDIMScheduler(clip_sample=False)).x0_handling == "none"


@pytest.mark.parametrize("handling", X0_HANDLINGS)
def test_the_run_records_what_its_steps_did(handling, tmp_path, cache_dir):
    """results.json: the handling the steps used ("model" resolved: the toy's scheduler clips nothing)."""
    cfg = compose_config(
        [*SMALL, f"sampler.x0_handling={handling}", "data.num_samples=2", "metrics.fid.enabled=false", "logger=none"],
        tmp_path,
        cache_dir,
    )
    results = run(cfg)
    assert results["x0_handling"] == ("none" if handling == "model" else handling)
    assert results["settings"]["sampler.x0_handling"] == handling


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sampler.x0_handling=clamp"], "sampler.x0_handling='clamp' is not allowed: choose one of model, none, clip"),
        (
            ["model=digits_flow", "sampler=rfim", "+sampler.x0_handling=clip"],
            "sampler.x0_handling='clip' is not used by sampler=rfim: the flow step clips nothing",
        ),
    ],
)
def test_bad_x0_handling_is_refused(overrides, message, tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=message):
        run(compose_config([*SMALL, *overrides], tmp_path, cache_dir))
