"""Pluggable samplers: one signature, one function per sampler, one YAML per sampler.

    x0 = sampler(denoiser, x, schedule, *, generator=None, callback=None, **options)

as k-diffusion's ``sample_*`` functions share one signature. ``denoiser(x, t)`` returns the model
output at the batch's time t (a (B,) tensor, in the model's own time units); ``schedule`` is the
time grid to walk (a :class:`DiffusionSchedule` or a :class:`FlowSchedule`); ``generator`` is one
generator or one per sample; ``callback(i, t, x_s, x0_hat)`` sees every step. A sampler that
takes a ``gmm`` keyword gets the mixture kernel built from the run's ``gmm`` config: the sampler
decides whether a GMM is used. ``conf/sampler/NAME.yaml`` names the function
(``function: ddim_gmm_exp.samplers.ddim_gmm``); its other keys but the reserved ones
(:data:`RUN_KEYS`) are the function's options. Adding a sampler is one function and one YAML
(docs/extending.md).

The step math is not here: it lives once in :mod:`ddim_gmm_exp.sampling`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ddim_gmm_exp.controls import IsotropicOffsetKernel
from ddim_gmm_exp.flow import rfim_sigmas, sample_rfim
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.noise import Generators
from ddim_gmm_exp.sampling import (
    Denoiser,
    StepCallback,
    check_previous_timestep,
    ddim_sigmas,
    sample_ddim,
    x0_handling_name,
    x0_handling_options,
)

# Keys of a sampler config that the runner reads itself; every other key is a sampler option.
RUN_KEYS = (
    "name",
    "function",
    "family",
    "steps",
    "timestep_spacing",
    "guidance_scale",
    "x0_handling",
    "previous_timestep",
)
FAMILIES = ("diffusion", "flow")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionSchedule:
    """The timesteps of a DDPM-trained model and its alpha-bars (noisiest first).

    The step from timesteps[i] goes to timesteps[i + 1], and after the last to final_abar
    (previous_timestep "listed"); with "diffusers", to t - T // S as diffusers' DDIMScheduler steps
    (sampling.previous_abar).
    """

    timesteps: list[int]
    alphas_cumprod: torch.Tensor
    final_abar: torch.Tensor
    prediction_type: str = "epsilon"
    step_options: dict[str, Any] = field(default_factory=dict)
    family: str = "diffusion"
    # the model's own scheduler config and the run's spacing: what baselines.diffusers_scheduler
    # builds its scheduler from (the DDIM samplers walk `timesteps`)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    spacing: str | None = None
    previous_timestep: str = "listed"  # sampling.PREVIOUS_TIMESTEP_RULES: where each DDIM step lands
    num_train_timesteps: int | None = None  # T of the "diffusers" rule; None: len(alphas_cumprod)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_scheduler(
        cls,
        scheduler: Any,
        x0_handling: str | None = "model",
        scheduler_config: dict[str, Any] | None = None,
        previous_timestep: str = "listed",
    ) -> DiffusionSchedule:
        """The schedule of a diffusers DDIMScheduler after set_timesteps: its timesteps, alpha-bars,
        prediction type, the x0 handling (sampling.X0_HANDLINGS; "model": the scheduler
        config's clipping / thresholding, eps kept, as diffusers' step does by default) and where
        the steps land (sampling.PREVIOUS_TIMESTEP_RULES)."""
        check_previous_timestep(previous_timestep)
        return cls(
            timesteps=scheduler.timesteps.tolist(),
            alphas_cumprod=scheduler.alphas_cumprod,
            final_abar=scheduler.final_alpha_cumprod,
            prediction_type=scheduler.config.prediction_type,
            step_options={} if x0_handling is None else x0_handling_options(x0_handling, scheduler.config),
            scheduler_config=dict(scheduler_config if scheduler_config is not None else scheduler.config),
            spacing=scheduler.config.timestep_spacing,
            previous_timestep=previous_timestep,
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
        )

    @property
    def x0_handling(self) -> str:
        """What the steps do to x0_hat: none, clip, clip_consistent, threshold (or threshold_eps_kept)."""
        return x0_handling_name(self.step_options)


@dataclass(frozen=True)
class FlowSchedule:
    """The time grid of a flow-matching model: sigmas (flow times t, 1 = noise) from the noisiest
    down to 0, one more than the steps; the model is called at t * num_train_timesteps."""

    sigmas: list[float]
    num_train_timesteps: int = 1000
    family: str = "flow"
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # for baselines.diffusers_scheduler
    spacing: str | None = None

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def timesteps(self) -> list[float]:
        return [s * self.num_train_timesteps for s in self.sigmas[:-1]]


Schedule = DiffusionSchedule | FlowSchedule
Sampler = Callable[..., torch.Tensor]


def ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: DiffusionSchedule,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta = 0 deterministic, eta = 1 DDPM-like."""
    return ddim_gmm(denoiser, x, schedule, generator=generator, callback=callback, eta=eta, gmm=None)


def ddim_gmm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: DiffusionSchedule,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    gmm: GMM | None = None,
) -> torch.Tensor:
    """DDIM-GMM (Gabbur 2026, eq. 7): DDIM's mean plus a Gaussian-mixture kernel."""
    return sample_ddim(
        denoiser,
        x,
        schedule.timesteps,
        schedule.alphas_cumprod,
        schedule.final_abar,
        eta=eta,
        gmm=gmm,
        generator=generator,
        callback=callback,
        prediction_type=schedule.prediction_type,
        previous_timestep=schedule.previous_timestep,
        num_train_timesteps=schedule.num_train_timesteps,
        **schedule.step_options,
    )


def ddim_noise(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: DiffusionSchedule,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    scale: float = 1.0,
    last_step: bool = False,
) -> torch.Tensor:
    """The control of DDIM-GMM (controls.py): the DDIM step plus a fresh isotropic offset of norm
    exactly ``scale`` per sample and step, on the steps where the GMM would mix."""
    kernel = IsotropicOffsetKernel(scale, last_step)
    return ddim_gmm(denoiser, x, schedule, generator=generator, callback=callback, eta=eta, gmm=kernel)


def rfim(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: FlowSchedule,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """RFIM (Gabbur 2026, section 4): the rectified-flow DDIM analogue; eta = 0 is the Euler sampler."""
    return rfim_gmm(denoiser, x, schedule, generator=generator, callback=callback, eta=eta, gmm=None)


def rfim_gmm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: FlowSchedule,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    gmm: GMM | None = None,
) -> torch.Tensor:
    """RFIM-GMM (Gabbur 2026, section 4): RFIM's mean plus the paper's Gaussian-mixture kernel."""
    return sample_rfim(
        denoiser,
        x,
        schedule.sigmas,
        eta=eta,
        gmm=gmm,
        generator=generator,
        callback=callback,
        num_train_timesteps=schedule.num_train_timesteps,
    )


def rfim_noise(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: FlowSchedule,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    scale: float = 1.0,
    last_step: bool = False,
) -> torch.Tensor:
    """The control of RFIM-GMM: the RFIM step plus a fresh isotropic offset of norm ``scale``."""
    kernel = IsotropicOffsetKernel(scale, last_step)
    return rfim_gmm(denoiser, x, schedule, generator=generator, callback=callback, eta=eta, gmm=kernel)


def ddim_scheduler(scheduler_config: dict[str, Any], spacing: str, steps: int) -> Any:
    """diffusers' DDIMScheduler for the model's config with this spacing, after set_timesteps(steps)."""
    from ddim_gmm_exp.diffusers import DDIMScheduler

    # without the private keys: from_config skips every key an in-memory config lists in
    # _use_default_values, the spacing given here included
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(config | {"timestep_spacing": spacing})
    scheduler.set_timesteps(steps)
    return scheduler


def warn_if_spacing_differs(scheduler_config: dict[str, Any], spacing: str | None) -> bool:
    """Log one warning where the model's scheduler config states a timestep_spacing other than the
    run's: sampler.timestep_spacing replaces it ("leading" for every model unless set, so that
    step grids match across models and samplers). None (EDM's own sigma grid) uses no spacing.
    Returns whether it warned."""
    own = scheduler_config.get("timestep_spacing")
    if spacing is None or own is None or own == spacing:
        return False
    log.warning(
        "the model's scheduler config sets timestep_spacing=%r but the run uses sampler.timestep_spacing=%r "
        "(the same for every model, so that grids match): pass sampler.timestep_spacing=%s to use the checkpoint's",
        own,
        spacing,
        own,
    )
    return True


def timesteps_are_sound(timesteps: list[int], steps: int, num_train_timesteps: int) -> bool:
    """S distinct timesteps inside [0, T - 1], noisiest first: what a DDIM walk of S steps needs
    (diffusers' trailing spacing lists S + 1 ending at -1 for some S, e.g. 61 at T = 1000)."""
    inside = all(0 <= t < num_train_timesteps for t in timesteps)
    return len(timesteps) == steps and inside and all(a > b for a, b in zip(timesteps, timesteps[1:], strict=False))


def kernel_sigmas(schedule: Schedule, eta: float) -> list[float]:
    """sigma of every step, as the kernels use it: DDIM's eq. 16, or eta * s for the flow step t -> s."""
    if isinstance(schedule, FlowSchedule):
        return rfim_sigmas(schedule.sigmas, eta)
    return ddim_sigmas(
        schedule.alphas_cumprod,
        schedule.timesteps,
        schedule.final_abar,
        eta,
        schedule.previous_timestep,
        schedule.num_train_timesteps,
    )


def resolve_function(path: str) -> Sampler:
    """The sampler function named by a dotted path (``module.function``)."""
    module_name, _, name = str(path).rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"sampler.function={path!r} is not an importable function: {err}") from err
    if not callable(function):
        raise ValueError(f"sampler.function={path!r} is not callable")
    return function


def option_names(function: Sampler) -> list[str]:
    """The keyword options a sampler function takes beyond the shared signature (gmm included)."""
    shared = {"denoiser", "x", "schedule", "generator", "callback"}
    return [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in shared
    ]


def has_own_time_grid(function: Sampler) -> bool:
    """Whether the sampler builds its own time grid from the model's scheduler config (the baselines:
    diffusers' schedulers, EDM), so that the DDIM family's x0_handling and previous_timestep mean nothing to it."""
    return bool(getattr(function, "own_time_grid", False))


def uses_spacing(function: Sampler) -> bool:
    """Whether the sampler walks timesteps chosen by sampler.timestep_spacing (EDM's sigma grid does not)."""
    return bool(getattr(function, "uses_spacing", True))


def model_calls(function: Sampler, steps: int, options: dict[str, Any], spacing: str | None) -> int:
    """The model evaluations per sample of ``steps`` steps, without guidance: the function's own
    ``model_calls`` (Heun-type samplers: 2S - 1), else one a step. Pinned against the count the run
    makes at the denoiser (tests/test_nfe_budget.py)."""
    count = getattr(function, "model_calls", None)
    return int(count(steps, options, spacing)) if count is not None else int(steps)


def steps_for_nfe(
    function: Sampler, nfe: int, options: dict[str, Any], spacing: str | None, calls_per_evaluation: int
) -> int:
    """The most steps whose model evaluations per sample (``calls_per_evaluation`` a call: 2 under
    classifier-free guidance) stay within ``nfe``; 0 when one step is already over it."""
    steps = 0
    while (steps + 1) <= nfe and model_calls(function, steps + 1, options, spacing) * calls_per_evaluation <= nfe:
        steps += 1
    return steps


def takes_gmm(function: Sampler) -> bool:
    """Whether the sampler uses a mixture kernel: it has a ``gmm`` keyword."""
    return "gmm" in option_names(function)
