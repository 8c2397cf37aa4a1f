"""Baseline samplers: any diffusers scheduler, and EDM's stochastic Heun sampler (Karras et al.
2022, Algorithm 2), with the runner's one sampler signature (samplers.py).

    diffusers_scheduler(denoiser, x, schedule, scheduler="DPMSolverMultistepScheduler",
                        scheduler_options={"algorithm_type": "dpmsolver++"})

builds ``Scheduler.from_config(model's scheduler config, **scheduler_options)`` and steps exactly
as a plain diffusers loop does (``init_noise_sigma``, ``scale_model_input``, ``step``). Stochastic
schedulers draw from the per-sample generators (diffusers' ``randn_tensor`` takes one generator per
sample), so a sample is the same image in any batch and on any number of ranks.

Notation (EDM): sigma is the VE noise level, x_hat = x_vp / sqrt(abar) = x0 + sigma eps with
abar = 1 / (1 + sigma^2); D(x_hat; sigma) is the denoiser (x0_hat); the DDPM model is evaluated at
t(sigma), interpolated in log sigma between its trained timesteps (k-diffusion's sigma_to_t).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ddim_gmm_exp.noise import Generators, randn
from ddim_gmm_exp.sampling import Denoiser, StepCallback, x0_and_eps

# the schedulers' own arguments that the runner sets itself (the grid's length and spacing)
RESERVED_SCHEDULER_OPTIONS = ("num_train_timesteps", "timestep_spacing")


def scheduler_class(name: str) -> type:
    """diffusers' scheduler class of this name (a class of ``diffusers``, e.g. EulerDiscreteScheduler)."""
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and hasattr(cls, "from_config") and hasattr(cls, "step")):
        raise ValueError(
            f"sampler.scheduler={name!r} is not a diffusers scheduler class: use the name of one, "
            "e.g. DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler"
        )
    return cls


def scheduler_option_names(cls: type) -> list[str]:
    """The options ``from_config`` takes for this scheduler: its __init__ arguments."""
    return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")]


def check_scheduler_options(name: str, options: dict[str, Any]) -> None:
    """Refuse an option that the scheduler does not take (from_config would silently drop it)."""
    cls = scheduler_class(name)
    allowed = [n for n in scheduler_option_names(cls) if n not in RESERVED_SCHEDULER_OPTIONS]
    for key, value in (options or {}).items():
        if key in RESERVED_SCHEDULER_OPTIONS:
            raise ValueError(
                f"sampler.scheduler_options.{key}={value!r} is not allowed: the run sets it "
                f"({'sampler.timestep_spacing' if key == 'timestep_spacing' else 'the model config'})"
            )
        if key not in allowed:
            raise ValueError(
                f"sampler.scheduler_options.{key}={value!r} is not an option of {name}: "
                f"its options are {', '.join(allowed)}"
            )


def build_scheduler(
    scheduler: str, scheduler_config: dict[str, Any], options: dict[str, Any], spacing: str | None
) -> Any:
    """Scheduler.from_config(model's scheduler config, **options), the run's spacing included."""
    cls = scheduler_class(scheduler)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    known = set(scheduler_option_names(cls))
    config = {k: v for k, v in config.items() if k in known}  # another class's keys: not this one's
    if spacing is not None and "timestep_spacing" in known:
        config["timestep_spacing"] = spacing
    return cls.from_config(config, **dict(options or {}))


def diffusers_scheduler(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Any,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    scheduler: str = "DDPMScheduler",
    scheduler_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """A diffusers scheduler's sampling loop, as diffusers' own pipelines step it."""
    sched = build_scheduler(scheduler, schedule.scheduler_config, scheduler_options or {}, schedule.spacing)
    sched.set_timesteps(schedule.num_steps, device=x.device)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    step_kwargs = {"generator": generator} if takes_generator else {}
    # flow-matching schedulers have neither (their pipelines skip both)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    scale_input = getattr(sched, "scale_model_input", lambda sample, timestep: sample)
    for i, t in enumerate(sched.timesteps):
        model_input = scale_input(x, t)
        output = denoiser(model_input, t.expand(len(x)).to(x.device))
        result = sched.step(output, t, x, **step_kwargs)
        x = result.prev_sample
        if callback is not None:
            x0_hat = getattr(result, "pred_original_sample", None)
            callback(i, t, x, x if x0_hat is None else x0_hat)
    return x


def scheduler_model_calls(steps: int, options: dict[str, Any], spacing: str | None) -> int:
    """How many model calls the scheduler's loop makes for ``steps`` steps: the length of its
    timesteps after set_timesteps (Heun's: 2S - 1), on the scheduler's default config."""
    sched = build_scheduler(options.get("scheduler", "DDPMScheduler"), {}, options.get("scheduler_options"), spacing)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def ddpm_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of every trained timestep (the VE view of a VP model)."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """EDM's time steps (Karras et al. 2022, eq. 5), noisiest first, with sigma_N = 0 appended."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigma_to_t(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The (fractional) trained timestep of a noise level: linear in log sigma between the two
    neighbouring timesteps of ``table`` (increasing), clamped to [0, T - 1]."""
    log_table = table.log()
    log_sigma = sigma.double().clamp(table[0], table[-1]).log()
    high = torch.searchsorted(log_table, log_sigma.reshape(-1)).clamp(1, len(table) - 1).reshape(log_sigma.shape)
    low = high - 1
    w = (log_sigma - log_table[low]) / (log_table[high] - log_table[low])
    return low + w.clamp(0, 1)


def edm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Any,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    S_churn: float = 0.0,  # noqa: N803 (EDM's names)
    S_tmin: float = 0.0,  # noqa: N803
    S_tmax: float | None = None,  # noqa: N803 (None: no upper bound)
    S_noise: float = 1.0,  # noqa: N803
    rho: float = 7.0,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2: Heun with churn) on a DDPM,
    through the VP -> VE conversion; 2N - 1 model calls for N steps."""
    table = ddpm_sigmas(schedule.alphas_cumprod).to(x.device)
    sigmas = karras_sigmas(float(table[0]), float(table[-1]), schedule.num_steps, rho).to(x.device)
    n = len(sigmas) - 1
    gamma_max = min(S_churn / n, 2**0.5 - 1)
    t_max = float("inf") if S_tmax is None else S_tmax
    dtype = x.dtype

    def denoise(x_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # D(x_hat; sigma)
        abar = 1 / (1 + sigma**2)
        x_vp = x_hat * abar.sqrt()
        t = sigma_to_t(sigma, table).to(dtype).expand(len(x_hat))
        output = denoiser(x_vp.to(dtype), t)
        return x0_and_eps(output.double(), x_vp, abar, schedule.prediction_type)[0]

    x = x.double() * sigmas[0]
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = gamma_max if S_tmin <= float(sigma) <= t_max else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:  # churn: raise the noise level to sigma_hat with fresh noise
            eps = randn(x.shape, generator, device=x.device, dtype=x.dtype)
            x = x + (sigma_hat**2 - sigma**2).sqrt() * S_noise * eps
        x0_hat = denoise(x, sigma_hat)
        d = (x - x0_hat) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:  # Heun's second-order correction
            d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(i, sigma, x, x0_hat)
    return x.to(dtype)


# these build their own time grid from the model's scheduler config: the DDIM-family settings
# (x0_handling, previous_timestep) mean nothing to them
diffusers_scheduler.own_time_grid = True  # type: ignore[attr-defined]
edm.own_time_grid = True  # type: ignore[attr-defined]
diffusers_scheduler.model_calls = scheduler_model_calls  # type: ignore[attr-defined]
edm.model_calls = lambda steps, options, spacing: 2 * steps - 1  # type: ignore[attr-defined]  (last step: Euler)
edm.uses_spacing = False  # type: ignore[attr-defined]  (its rho grid in sigma: timestep_spacing null)
