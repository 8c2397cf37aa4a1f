"""Baseline samplers: diffusers schedulers stepped as a plain diffusers loop steps them (bit for
bit), EDM's Algorithm 2 against diffusers' Karras Heun, batch-size independence of the stochastic
ones, NFE counted at the denoiser, and their bad options refused before sampling."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from helpers.runs import SMALL, compose_config
from omegaconf import OmegaConf

from ddim_gmm_exp.baselines import diffusers_scheduler, edm, karras_sigmas, sigma_to_t
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.noise import randn, sample_generators
from ddim_gmm_exp.runner import run
from ddim_gmm_exp.samplers import DiffusionSchedule, FlowSchedule, ddim_scheduler

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src/ddim_gmm_exp/assets"
DDPM_CONFIG = json.loads((ASSETS / "digits/scheduler/scheduler_config.json").read_text())
FLOW_CONFIG = json.loads((ASSETS / "digits_flow/scheduler/scheduler_config.json").read_text())
SHAPE = (1, 4, 4)
DIFFUSION = ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "euler", "euler_a", "heun", "ddpm", "deis"]
FLOW = ["flow_heun", "flow_euler", "flow_euler_sde"]


def sampler_yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sampler" / f"{name}.yaml"), resolve=False)


def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network, element-wise (so batch-independent by construction)."""
    return torch.tanh(0.8 * x + 0.0007 * t.to(x.dtype).view(-1, 1, 1, 1))


def diffusion_schedule(steps: int, spacing: str = "leading") -> DiffusionSchedule:
    return DiffusionSchedule.from_scheduler(ddim_scheduler(DDPM_CONFIG, spacing, steps), None, DDPM_CONFIG)


def flow_schedule(steps: int) -> FlowSchedule:
    return FlowSchedule(sigmas=[1 - i / steps for i in range(steps + 1)], scheduler_config=FLOW_CONFIG)


def plain_diffusers_loop(cls_name: str, config: dict, options: dict, steps: int, seeds: list[int]) -> torch.Tensor:
    """What a diffusers user writes: from_config, set_timesteps, init_noise_sigma, scale_model_input, step."""
    scheduler = getattr(diffusers, cls_name).from_config(config, **options)
    scheduler.set_timesteps(steps)
    generators = sample_generators(seeds)
    latents = randn_tensor((len(seeds), *SHAPE), generator=generators, device=torch.device("cpu"))
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        output = network(model_input, t.expand(len(seeds)))
        deterministic = cls_name in ("UniPCMultistepScheduler", "HeunDiscreteScheduler", "DEISMultistepScheduler")
        kwargs = {} if deterministic else {"generator": generators}
        latents = scheduler.step(output, t, latents, **kwargs).prev_sample
    return latents


def ours(name: str, schedule, seeds: list[int], **override) -> torch.Tensor:
    cfg = sampler_yaml(name)
    generators = sample_generators(seeds)
    x = randn((len(seeds), *SHAPE), generators)
    options = {"scheduler": cfg["scheduler"], "scheduler_options": cfg["scheduler_options"]} | override
    return diffusers_scheduler(network, x, schedule, generator=generators, **options)


@pytest.mark.parametrize("name", DIFFUSION)
def test_diffusion_baseline_is_a_plain_diffusers_loop_bit_for_bit(name):
    cfg = sampler_yaml(name)
    config = {k: v for k, v in DDPM_CONFIG.items() if not k.startswith("_")} | {"timestep_spacing": "leading"}
    theirs = plain_diffusers_loop(cfg["scheduler"], config, cfg["scheduler_options"], 6, [3, 4, 5])
    assert torch.equal(ours(name, diffusion_schedule(6), [3, 4, 5]), theirs)


@pytest.mark.parametrize("name", FLOW)
def test_flow_baseline_is_a_plain_diffusers_loop_bit_for_bit(name):
    cfg = sampler_yaml(name)
    config = {k: v for k, v in FLOW_CONFIG.items() if not k.startswith("_")}
    theirs = plain_diffusers_loop(cfg["scheduler"], config, cfg["scheduler_options"], 5, [1, 2])
    assert torch.equal(ours(name, flow_schedule(5), [1, 2]), theirs)


def test_flow_euler_is_rfim_at_eta_0_on_the_schedulers_grid():
    """diffusers' FlowMatch Euler is the Euler step that RFIM takes at eta 0, on its own grid
    (linspace from 1 to 1/T, then 0; the digits flow model's own grid is uniform down to 0)."""
    from ddim_gmm_exp.samplers import rfim

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLOW_CONFIG)
    scheduler.set_timesteps(5)
    grid = FlowSchedule(sigmas=scheduler.sigmas.tolist(), scheduler_config=FLOW_CONFIG)
    generators = sample_generators([7, 8])
    x = randn((2, *SHAPE), generators)
    theirs = rfim(network, x.clone(), grid, generator=sample_generators([7, 8]))
    torch.testing.assert_close(ours("flow_euler", flow_schedule(5), [7, 8]), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde", "ddpm", "flow_euler_sde", "edm"])
def test_stochastic_baselines_give_a_sample_the_same_image_in_any_batch(name):
    seeds = list(range(100, 132))
    if name == "edm":
        cfg = {k: v for k, v in sampler_yaml("edm").items() if k.startswith("S_") or k == "rho"}

        def draw(chosen):
            generators = sample_generators(chosen)
            x = randn((len(chosen), *SHAPE), generators)
            return edm(network, x, diffusion_schedule(6), generator=generators, **cfg)
    else:
        schedule = flow_schedule(6) if name.startswith("flow") else diffusion_schedule(6)

        def draw(chosen):
            return ours(name, schedule, chosen)

    big, small = draw(seeds), draw(seeds[:7])
    assert torch.equal(big[:7], small)
    assert not torch.equal(big[0], big[1])  # the noise differs between samples


def test_edm_without_churn_is_diffusers_karras_heun():
    """Algorithm 2 with S_churn = 0 is Heun on the rho = 7 grid: diffusers' HeunDiscreteScheduler
    with use_karras_sigmas (an independent implementation of the same VP -> VE conversion)."""
    steps, seeds = 8, [11, 12]
    generators = sample_generators(seeds)
    x = randn((2, *SHAPE), generators)
    mine = edm(network, x.clone(), diffusion_schedule(steps), generator=generators)
    config = {k: v for k, v in DDPM_CONFIG.items() if not k.startswith("_")}
    # linspace: its grid spans every trained timestep, so its Karras sigmas run from sigma(T-1) to
    # sigma(0) as EDM's do; EDM starts at sigma_max (diffusers at sqrt(sigma_max^2 + 1))
    config["timestep_spacing"] = "linspace"
    config["clip_sample"] = False  # the digits config clips x0_hat, which diffusers' Heun honours; EDM clips nothing
    scheduler = diffusers.HeunDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    latents = x.clone() * scheduler.sigmas[0]
    for t in scheduler.timesteps:
        output = network(scheduler.scale_model_input(latents, t), t.expand(2))
        latents = scheduler.step(output, t, latents).prev_sample
    torch.testing.assert_close(mine, latents, rtol=1e-4, atol=1e-4)


def test_karras_grid_and_sigma_to_t():
    sigmas = karras_sigmas(0.1, 80.0, 5)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.1) and sigmas[-1] == 0
    table = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    # halfway in log sigma between timesteps 1 and 2 is t = 1.5; beyond the table, its ends
    assert sigma_to_t(torch.tensor(2**0.5, dtype=torch.float64), table).item() == pytest.approx(1.5)
    assert sigma_to_t(torch.tensor(9.0, dtype=torch.float64), table).item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    "sampler,steps,guidance,nfe",
    [("ddim", 5, 1.0, 5), ("ddim", 5, 2.5, 10), ("heun", 5, 1.0, 9), ("edm", 5, 2.5, 18), ("dpmpp_2m", 4, 1.0, 4)],
)
def test_results_record_the_nfe_counted_at_the_denoiser(sampler, steps, guidance, nfe, tmp_path, cache_dir):
    cfg = compose_config(
        [*SMALL, f"sampler={sampler}", f"sampler.steps={steps}", f"sampler.guidance_scale={guidance}",
         "data.num_samples=4", "metrics.fid.enabled=false", "logger=none"],
        tmp_path,
        cache_dir,
    )  # fmt: skip
    results = run(cfg)
    assert results["nfe"] == nfe
    if sampler != "ddim":  # they step with their scheduler's own rules: no DDIM x0 handling to record
        assert results["x0_handling"] is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sampler=dpmpp_2m", "+sampler.scheduler_options.solver_ordr=3"],
         "sampler.scheduler_options.solver_ordr=3 is not an option of DPMSolverMultistepScheduler: its options are"),
        (["sampler=dpmpp_2m", "sampler.scheduler=NoSuchScheduler"],
         "sampler.scheduler='NoSuchScheduler' is not a diffusers scheduler class"),
        (["sampler=euler", "+sampler.scheduler_options.timestep_spacing=trailing"],
         "sampler.scheduler_options.timestep_spacing='trailing' is not allowed: the run sets it"),
        (["model=digits_flow", "sampler=flow_heun", "sampler.timestep_spacing=leading"],
         "sampler.timestep_spacing='leading' is not used by sampler=flow_heun"),
        (["sampler=heun", "+sampler.x0_handling=clip"], "sampler.x0_handling='clip' is not used by sampler=heun"),
        (["sampler=edm", "sampler.timestep_spacing=leading"],
         "sampler.timestep_spacing='leading' is not used by sampler=edm"),
        (["sampler=edm", "+sampler.S_chrun=1"], "sampler.S_chrun=1 is not an option of sampler=edm"),
    ],
)  # fmt: skip
def test_bad_baseline_options_are_refused_before_sampling(overrides, message, tmp_path, cache_dir):
    cfg = compose_config([*SMALL, *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "run_config.json").exists()
