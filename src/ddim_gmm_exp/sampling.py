"""The DDIM and DDIM-GMM step and sampling loop, as pure functions over a denoiser.

This is the only copy of the step math: the LDM sampler (ldm.py), the diffusers scheduler
(diffusers.py) and the experiment runner all call it.

Notation (code -> paper; Song et al. 2021 eq. 12 and 16, Gabbur 2026 eq. 7):
    abar_t, abar_prev   alpha-bar at t = tau_i and at s = tau_{i-1} (final_abar after tau_1)
    x0_hat, eps_hat     predicted clean sample and noise
    sigma               eta * sqrt((1 - abar_s)/(1 - abar_t)) * sqrt(1 - abar_t/abar_s)
    mean                m = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat
    noise, components   z ~ N(0, I_D) and, on a mixture step, k ~ Categorical(pi_i)
    x_prev              DDIM: x_s = m + sigma z
                        DDIM-GMM (paper): x_s = m + delta_{i,k} + sqrt(max(sigma^2 - v_{i,k}, 0)) z
Step index i counts sampling steps in the order they run (0 = first, noisiest).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.noise import Draw, Generators, ahead, draw

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not allowed: choose one of {PREDICTION_TYPES}")


def check_eta(eta: float) -> None:
    if not eta >= 0:
        raise ValueError(f"eta={eta!r} is not allowed: it must be >= 0 (0 = DDIM, 1 = DDPM-like)")


def x0_and_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from an epsilon, v or x0 prediction (diffusers' formulas)."""
    beta_t = 1 - abar_t
    if prediction_type == "epsilon":
        return (x_t - beta_t**0.5 * model_output) / abar_t**0.5, model_output
    if prediction_type == "sample":
        return model_output, (x_t - abar_t**0.5 * model_output) / beta_t**0.5
    if prediction_type == "v_prediction":
        x0 = abar_t**0.5 * x_t - beta_t**0.5 * model_output
        return x0, abar_t**0.5 * model_output + beta_t**0.5 * x_t
    check_prediction_type(prediction_type)
    raise AssertionError("unreachable")


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """eps_hat re-derived from a (clipped) x0_hat, as GLIDE and diffusers' use_clipped_model_output."""
    return (x_t - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5


def ddim_sigma(abar_t: torch.Tensor, abar_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) of DDIM eq. 16; 0 on the last step when abar_prev = 1."""
    variance = ((1 - abar_prev) / (1 - abar_t)) * (1 - abar_t / abar_prev)
    return eta * variance**0.5


def ddim_mean(x0: torch.Tensor, eps: torch.Tensor, abar_prev: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """m = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat (DDIM eq. 12 without noise)."""
    direction_scale = torch.as_tensor(1 - abar_prev - sigma**2).clamp_min(0) ** 0.5
    return abar_prev**0.5 * x0 + direction_scale * eps


def clip_x0(x0: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Clamp x0_hat to [-clip_range, clip_range] (diffusers clip_sample)."""
    return x0.clamp(-clip_range, clip_range)


def threshold_x0(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022) with diffusers' semantics.

    Per sample, s = the ratio-quantile of |x0_hat|, clamped to [1, max_value]; then
    x0_hat <- clamp(x0_hat, -s, s) / s.
    """
    dtype = x0.dtype
    batch, channels, *rest = x0.shape
    flat = x0 if dtype in (torch.float32, torch.float64) else x0.float()
    flat = flat.reshape(batch, channels * int(np.prod(rest)))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(batch, channels, *rest).to(dtype)


X0_OPTIONS = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")


def x0_options(config: Any) -> dict[str, Any]:
    """The x0 clipping / thresholding settings of a diffusers scheduler config, as ddim_step takes them."""
    return {k: config[k] for k in X0_OPTIONS}


# What the step does to x0_hat before the mean is formed (METHOD.md, "x0 handling"):
#   model            the scheduler config's clip_sample / thresholding, eps kept (diffusers' default step)
#   none             nothing (CompVis's DDIM)
#   clip             x0_hat clamped to [-r, r], eps_hat kept (diffusers' clip_sample=True): under
#                    guidance the pair no longer matches and long runs drift to the wrong class
#   clip_consistent  clamped, then eps_hat re-derived from it (ADM/GLIDE's DDIM; diffusers'
#                    use_clipped_model_output=True)
#   threshold        dynamic thresholding (Imagen), then eps_hat re-derived from it
X0_HANDLINGS = ("model", "none", "clip", "clip_consistent", "threshold")


def x0_handling_options(handling: str, config: Any) -> dict[str, Any]:
    """ddim_step's x0 options for a named handling; ranges and ratios from the scheduler config."""
    if handling not in X0_HANDLINGS:
        raise ValueError(f"x0_handling={handling!r} is not allowed: choose one of {', '.join(X0_HANDLINGS)}")
    options = x0_options(config) | {"use_clipped_model_output": False}
    if handling == "model":
        return options
    return options | {
        "clip_sample": handling in ("clip", "clip_consistent"),
        "thresholding": handling == "threshold",
        "use_clipped_model_output": handling in ("clip_consistent", "threshold"),
    }


def x0_handling_name(options: dict[str, Any]) -> str:
    """The handling that ddim_step's x0 options amount to (what a 'model' run really did)."""
    consistent = options.get("use_clipped_model_output", False)
    if options.get("thresholding"):
        return "threshold" if consistent else "threshold_eps_kept"
    if options.get("clip_sample"):
        return "clip_consistent" if consistent else "clip"
    return "none"


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    abar_t: torch.Tensor,
    abar_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    *,
    gmm: GMM | None = None,
    step_index: int = 0,
    components: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    return_mean: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One DDIM or DDIM-GMM step x_t -> x_s (Song et al. 2021 eq. 12, Gabbur 2026 eq. 7);
    returns (x_s, x0_hat), and the deterministic mean m as a third item with ``return_mean``.

    ``noise`` is z and ``components`` the mixture indices k, both from :func:`kernel_noise`.
    With ``components`` (a mixture step) x_s = m + gmm.perturbation(i, sigma, z, k); without,
    x_s = m + sigma z, or m when eta = 0. Clipping and thresholding of x0_hat follow diffusers'
    DDIMScheduler.step.
    """
    x0, eps = x0_and_eps(model_output, x_t, abar_t, prediction_type)
    if thresholding:
        x0 = threshold_x0(x0, dynamic_thresholding_ratio, sample_max_value)
    elif clip_sample:
        x0 = clip_x0(x0, clip_sample_range)
    sigma = ddim_sigma(abar_t, abar_prev, eta)
    if use_clipped_model_output:
        eps = eps_from_x0(x_t, x0, abar_t)
    x_prev = ddim_mean(x0, eps, abar_prev, sigma)
    perturbation = kernel_perturbation(sigma, eta, noise, gmm, step_index, components, like=x_prev)
    x_s = x_prev if perturbation is None else x_prev + perturbation
    return (x_s, x0, x_prev) if return_mean else (x_s, x0)


def kernel_perturbation(
    sigma: torch.Tensor | float,
    eta: float,
    noise: torch.Tensor | None,
    gmm: GMM | None,
    step_index: int,
    components: torch.Tensor | None,
    like: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """x_s - m: the mixture's delta_k + sqrt(max(sigma^2 - v_k, 0)) z on a mixture step, else
    DDIM's sigma z (None when eta = 0: nothing is added). One function for every sampler family.

    ``sigma`` stays as given (a number, or a tensor on any device): nothing is read back to the
    host. ``like`` (the mean m) gives the shape, dtype and device where no z was drawn (eta = 0).
    """
    if components is not None:
        if gmm is None or (noise is None and like is None):
            raise ValueError("a mixture step needs the gmm and its draws: draw them with kernel_noise()")
        return gmm.perturbation(step_index, sigma, noise, components, like=like)
    if eta > 0:
        if noise is None:
            raise ValueError("a step with eta > 0 needs noise: draw it with kernel_noise()")
        return sigma * noise
    return None


def step_draws(
    shape: Sequence[int],
    dtype: torch.dtype | None = None,
    *,
    gmm: GMM | None = None,
    step_index: int = 0,
    num_steps: int = 1,
    eta: float = 1.0,
    z_given: bool = False,
) -> list[Draw]:
    """What one step draws from each sample's stream, in order: z ~ N(0, I) shaped like the sample
    when eta > 0 (and no z is given), then the kernel's mixture draw on a mixture step.

    Nothing that would be multiplied by zero is drawn: at eta = 0 every kernel's z term is
    (sigma = 0, and the paper's clipped component std sqrt(max(0 - v_k, 0)) = 0), so a mixture step
    at eta = 0 draws its component alone. A step that does not mix (no GMM, a trivial one with
    K = 1 or scale = 0, the last step) draws no mixture draw, so its streams, and its output, are
    DDIM's bit for bit.
    """
    if gmm is not None:  # before any draw: a refused step leaves the caller's generator where it was
        gmm.check_shape(tuple(shape))
    draws = []
    if eta > 0 and not z_given:
        draws.append(Draw("randn", tuple(int(s) for s in shape[1:]), dtype))
    if gmm is not None and gmm.mixes_at(step_index, num_steps, eta):
        draws.append(gmm.mixture_draw(tuple(shape)))
    return draws


def noise_from_draws(
    drawn: list[torch.Tensor],
    *,
    gmm: GMM | None = None,
    step_index: int = 0,
    num_steps: int = 1,
    eta: float = 1.0,
    z: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(z, k) of a step from its draws (copied to ``device`` without blocking): z (None at
    eta = 0) and the mixture's components (None where the step does not mix), the components
    computed from their draw by the kernel."""
    drawn = [t.to(device, non_blocking=True) for t in drawn]
    if eta > 0 and z is None:
        z = drawn.pop(0)
    noise = z if eta > 0 else None
    if gmm is None or not gmm.mixes_at(step_index, num_steps, eta):
        return noise, None
    return noise, gmm.components_from_draw(step_index, drawn.pop(0), dtype)


def start_draws(
    shape: Sequence[int],
    generator: Generators = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    gmm: GMM | None = None,
    step_index: int = 0,
    num_steps: int = 1,
    eta: float = 1.0,
    z: torch.Tensor | None = None,
) -> Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Start a step's draws (:func:`step_draws`) now, on the streams' background thread where the
    generator is ``noise.SampleStreams`` (a loop starts them before its model call, so that they
    run while the model does); the function returned waits for them and gives (z, k) on
    ``device`` (:func:`noise_from_draws`). CPU draws for a GPU land in pinned memory and are
    copied by the thread that collects them: a copy enqueued from the background thread could
    race the caller's CUDA stream."""
    options = dict(gmm=gmm, step_index=step_index, num_steps=num_steps, eta=eta)
    draws = step_draws(shape, dtype, z_given=z is not None, **options)  # refuses a bad shape here
    pending = ahead(generator, partial(draw, draws, int(shape[0]), generator, device, move=False) if draws else list)
    return lambda: noise_from_draws(pending.result(), z=z, dtype=dtype, device=device, **options)


def kernel_noise(
    shape: Sequence[int],
    generator: Generators = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    gmm: GMM | None = None,
    step_index: int = 0,
    num_steps: int = 1,
    eta: float = 1.0,
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The step's random draws (z, k): z ~ N(0, I) when eta > 0, and the component indices k on a
    mixture step (:func:`step_draws` says which, and in what order), drawn now.

    z is drawn first, exactly as diffusers draws its variance noise (same shape, same generator
    or per-sample generators); k is drawn after it, one uniform per sample. At eta = 0 no z is
    drawn (it would be multiplied by zero). ``z`` given: used instead of a draw.
    """
    return start_draws(
        shape, generator, device=device, dtype=dtype, gmm=gmm, step_index=step_index, num_steps=num_steps, eta=eta, z=z
    )()


def ddim_kernel_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    abar_t: torch.Tensor,
    abar_prev: torch.Tensor,
    eta: float = 0.0,
    *,
    generator: Generators = None,
    gmm: GMM | None = None,
    step_index: int = 0,
    num_steps: int = 1,
    z: torch.Tensor | None = None,
    **step_options: Any,
) -> tuple[torch.Tensor, ...]:
    """One DDIM / DDIM-GMM step with its own draws: :func:`kernel_noise` (z shaped like the model
    output, as diffusers draws its variance noise; ``z`` given: used instead), then
    :func:`ddim_step`. The LDM sampler and the diffusers scheduler step through here; the loop
    draws ahead (sample_ddim) and then calls ddim_step itself."""
    noise, components = kernel_noise(
        model_output.shape,
        generator,
        device=model_output.device,
        dtype=model_output.dtype,
        gmm=gmm,
        step_index=step_index,
        num_steps=num_steps,
        eta=eta,
        z=z,
    )
    return ddim_step(
        model_output,
        x_t,
        abar_t,
        abar_prev,
        eta,
        noise,
        gmm=gmm,
        step_index=step_index,
        components=components,
        **step_options,
    )


def concat_conditioning(unconditional: Any, conditional: Any) -> Any:
    """[uc, c] batched together for one guided model call (tensors, lists or dicts of them)."""
    if isinstance(conditional, dict):
        return {k: concat_conditioning(unconditional[k], conditional[k]) for k in conditional}
    if isinstance(conditional, list | tuple):
        return [torch.cat([u, c]) for u, c in zip(unconditional, conditional, strict=True)]
    return torch.cat([unconditional, conditional])


def classifier_free_guidance(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    uncond: Any,
    scale: float,
) -> torch.Tensor:
    """out_u + scale * (out_c - out_u) in one batched call (Ho & Salimans 2022).

    scale = 1 (or no unconditional conditioning) is the conditional model alone, in one call.
    """
    if uncond is None or scale == 1.0:
        return model_fn(x, t, cond)
    both = model_fn(torch.cat([x, x]), torch.cat([t, t]), concat_conditioning(uncond, cond))
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)


# Where the step from timesteps[i] lands (sampler.previous_timestep; docs/models.md):
#   listed     the next listed timestep, final_abar after the last: DDIM's step tau_i -> tau_{i-1},
#              right for every spacing (the runner's default)
#   diffusers  diffusers' DDIMScheduler.step: s = t - T // S, final_abar once s < 0; off the grid for
#              "linspace", and for "trailing" with T % S != 0 (for numbers comparable with its pipelines)
PREVIOUS_TIMESTEP_RULES = ("listed", "diffusers")


def check_previous_timestep(rule: str) -> None:
    if rule not in PREVIOUS_TIMESTEP_RULES:
        raise ValueError(
            f"previous_timestep={rule!r} is not allowed: choose one of {', '.join(PREVIOUS_TIMESTEP_RULES)}"
        )


def previous_abar(
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    i: int,
    final_abar: torch.Tensor,
    rule: str = "listed",
    num_train_timesteps: int | None = None,
    num_inference_steps: int | None = None,
) -> torch.Tensor:
    """abar at the target of the step from timesteps[i], by ``rule`` (:data:`PREVIOUS_TIMESTEP_RULES`).

    The diffusers rule's T and S default to len(alphas_cumprod) and len(timesteps); diffusers' own
    step uses its config's num_train_timesteps and its num_inference_steps (which "trailing" can
    list one timestep more than)."""
    if rule == "listed":
        return alphas_cumprod[int(timesteps[i + 1])] if i + 1 < len(timesteps) else final_abar
    check_previous_timestep(rule)
    total = len(alphas_cumprod) if num_train_timesteps is None else num_train_timesteps
    steps = len(timesteps) if num_inference_steps is None else num_inference_steps
    # diffusers' own expression (DDIMScheduler.step), so that the step is its step bit for bit
    prev = int(timesteps[i]) - total // steps
    return alphas_cumprod[prev] if prev >= 0 else final_abar


def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    final_abar: torch.Tensor | float,
    *,
    eta: float = 0.0,
    gmm: GMM | None = None,
    generator: Generators = None,
    callback: StepCallback | None = None,
    prediction_type: str = "epsilon",
    previous_timestep: str = "listed",
    num_train_timesteps: int | None = None,
    **step_options: object,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) or, with a GMM, DDIM-GMM (Gabbur 2026) from x_T down to x_0.

    ``denoiser(x, t)`` returns the model output for the batch x at timestep t (a (B,) long
    tensor); ``timesteps`` run from the noisiest down; ``callback(i, t, x_s, x0_hat)`` sees
    every step. The GMM's step i is used on the i-th step run, except on the last step unless
    the GMM has ``last_step=True`` (METHOD.md). Each step lands where ``previous_timestep`` says
    (:func:`previous_abar`; T = ``num_train_timesteps``, default len(alphas_cumprod)).
    """
    check_eta(eta)
    check_prediction_type(prediction_type)
    check_previous_timestep(previous_timestep)
    target = partial(previous_abar, rule=previous_timestep, num_train_timesteps=num_train_timesteps)
    if gmm is not None:
        gmm.check_num_steps(len(timesteps))
        gmm.check_shape(tuple(x.shape))
    final_abar = torch.as_tensor(final_abar, dtype=alphas_cumprod.dtype)
    num_steps = len(timesteps)
    for i, t in enumerate(timesteps):
        collect_draws = start_draws(
            x.shape, generator, device=x.device, dtype=x.dtype, gmm=gmm, step_index=i, num_steps=num_steps, eta=eta
        )
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        model_output = denoiser(x, t_batch)
        abar_t = alphas_cumprod[int(t)]
        abar_prev = target(alphas_cumprod, timesteps, i, final_abar)
        noise, components = collect_draws()
        x, x0, mean = ddim_step(
            model_output,
            x,
            abar_t,
            abar_prev,
            eta,
            noise,
            gmm=gmm,
            step_index=i,
            components=components,
            prediction_type=prediction_type,
            return_mean=True,
            **step_options,
        )
        report_step(callback, i, t_batch, x, x0, mean, ddim_sigma(abar_t, abar_prev, eta))
    return x


def report_step(
    callback: StepCallback | None,
    i: int,
    t: torch.Tensor,
    x_s: torch.Tensor,
    x0: torch.Tensor,
    mean: torch.Tensor,
    sigma: torch.Tensor | float,
) -> None:
    """callback(i, t, x_s, x0_hat); a callback object that also has ``on_mean(i, x_s, m, sigma)``
    gets the step's deterministic mean m too (the variance account, controls.VarianceAccount)."""
    if callback is None:
        return
    callback(i, t, x_s, x0)
    on_mean = getattr(callback, "on_mean", None)
    if on_mean is not None:
        on_mean(i, x_s, mean, sigma)  # as it is: a tensor is read back by the account, after the run


def ddim_sigmas(
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    final_abar: torch.Tensor | float,
    eta: float,
    previous_timestep: str = "listed",
    num_train_timesteps: int | None = None,
) -> list[float]:
    """sigma of every step of a run, in the order the steps run, each to its target by
    ``previous_timestep`` (as :func:`sample_ddim` steps)."""
    final_abar = torch.as_tensor(final_abar, dtype=alphas_cumprod.dtype)
    target = partial(previous_abar, rule=previous_timestep, num_train_timesteps=num_train_timesteps)
    return [
        float(ddim_sigma(alphas_cumprod[int(t)], target(alphas_cumprod, timesteps, i, final_abar), eta))
        for i, t in enumerate(timesteps)
    ]


def warn_if_gmm_is_inert(gmm: GMM | None, eta: float, stacklevel: int = 3) -> bool:
    """Warn when a matched-construction GMM is used with eta = 0, where it is plain DDIM
    (its offsets are in units of sigma = 0). The paper's kernel acts at eta = 0: no warning.
    Returns whether it warned."""
    if gmm is None or gmm.is_trivial or gmm.acts_without_noise or eta != 0:
        return False
    warnings.warn(
        f"construction={gmm.hparams.construction!r} with eta=0 is deterministic DDIM: its offsets are "
        "in units of sigma = 0; use eta > 0, or construction='paper' (whose offsets act at eta = 0)",
        UserWarning,
        stacklevel=stacklevel,
    )
    return True
