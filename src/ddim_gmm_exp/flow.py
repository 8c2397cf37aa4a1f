"""The RFIM and RFIM-GMM step and sampling loop for rectified-flow models (Gabbur 2026, section 4).

This is the only copy of the flow step math: the diffusers scheduler (diffusers.RFIMScheduler),
the embedded flow model and the experiment runner all call it. The mixture itself (its
parameters, draws and perturbation) is the DDIM family's: gmm.py and sampling.kernel_noise /
sampling.kernel_perturbation.

Convention (diffusers' FlowMatch): x_t = (1 - t) x_0 + t x_1, data at t = 0, noise x_1 ~ N(0, I)
at t = 1; the model predicts the velocity v = x_1 - x_0; diffusers calls t "sigma".

Notation (code -> paper, eqs. 15-21; ../shared/METHOD.md "Rectified flow"):
    t, s                the current and the next time, s < t (s = 0 on the last step)
    v                   the model's velocity at (x_t, t)
    x0_hat, x1_hat      predicted data and noise: x_t - t v and x_t + (1 - t) v
    sigma               eta * s, 0 <= eta <= 1
    mean                m = (1 - s) x0_hat + sqrt(s^2 - sigma^2) x1_hat
    noise, components   z ~ N(0, I_D) and, on a mixture step, k ~ Categorical(pi_i)
    x_s                 RFIM: m + sigma z;  RFIM-GMM (paper): m + delta_{i,k} + sqrt(max(sigma^2 - v_{i,k}, 0)) z
Step index i counts sampling steps in the order they run (0 = first, noisiest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.noise import Generators
from ddim_gmm_exp.sampling import kernel_perturbation, report_step, start_draws

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
Time = float | torch.Tensor

# diffusers' flow pipelines (SD3, Flux) feed the network t * num_train_timesteps
NUM_TRAIN_TIMESTEPS = 1000


def check_flow_eta(eta: float) -> None:
    """RFIM's sigma = eta * s must not exceed s: eta in [0, 1]."""
    if not 0 <= eta <= 1:
        raise ValueError(
            f"eta={eta!r} is not allowed: it must lie in [0, 1] (0 = Euler, 1 = a fresh draw from q(x_s | x0_hat))"
        )


def check_flow_sigmas(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    """The time grid as floats: at least two entries, strictly decreasing, in [0, 1], ending at 0."""
    values = [float(s) for s in sigmas]
    ordered = all(a > b for a, b in zip(values, values[1:], strict=False))
    if len(values) < 2 or not ordered or values[0] > 1 or values[-1] != 0:
        raise ValueError(
            f"sigmas={values!r} is not allowed: give times in [0, 1], noisiest first, strictly decreasing, "
            "ending at 0 (e.g. uniform_sigmas(steps))"
        )
    return values


def uniform_sigmas(steps: int) -> list[float]:
    """The uniform grid t_i = i / S, noisiest first: [1, (S-1)/S, ..., 1/S, 0]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not allowed: it must be an integer >= 1")
    return [(steps - i) / steps for i in range(steps)] + [0.0]


def x0_and_x1(v: torch.Tensor, x_t: torch.Tensor, t: Time) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, x1_hat) from a velocity: x0_hat = x_t - t v, x1_hat = (x_t - (1 - t) x0_hat) / t.

    x1_hat is computed as x_t + (1 - t) v, the same expression with t cancelled: defined at
    t = 0 and free of the 1/t that magnifies rounding at small t.
    """
    return x_t - t * v, x_t + (1 - t) * v


def rfim_sigma(s: Time, eta: float) -> Time:
    """sigma = eta * s: the std of the fresh noise in a step to s."""
    return eta * s


def rfim_sigmas(sigmas: Sequence[float] | torch.Tensor, eta: float) -> list[float]:
    """sigma of every step of a run on the grid ``sigmas``, in the order the steps run."""
    values = [float(s) for s in sigmas]
    return [float(rfim_sigma(s, eta)) for s in values[1:]]


def rfim_mean(x0: torch.Tensor, x1: torch.Tensor, s: Time, sigma: Time) -> torch.Tensor:
    """m = (1 - s) x0_hat + sqrt(s^2 - sigma^2) x1_hat (the step without its fresh noise)."""
    variance = s**2 - sigma**2
    # clamped: eta = 1 gives s^2 - (1 * s)^2 = 0, which must not round below it
    if isinstance(variance, torch.Tensor):
        direction_scale = variance.clamp_min(0) ** 0.5
    else:
        direction_scale = max(variance, 0.0) ** 0.5
    return (1 - s) * x0 + direction_scale * x1


def euler_step(v: torch.Tensor, x_t: torch.Tensor, t: Time, s: Time) -> torch.Tensor:
    """x_t + (s - t) v: diffusers' FlowMatchEulerDiscreteScheduler step, operation for operation."""
    return x_t + (s - t) * v


def rfim_step(
    v: torch.Tensor,
    x_t: torch.Tensor,
    t: Time,
    s: Time,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    *,
    gmm: GMM | None = None,
    step_index: int = 0,
    components: torch.Tensor | None = None,
    return_mean: bool = False,
    final: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """One RFIM or RFIM-GMM step x_t -> x_s (Gabbur 2026 eqs. 20-21); returns (x_s, x0_hat), and
    the deterministic mean m as a third item with ``return_mean``.

    ``noise`` is z and ``components`` the mixture indices k, both from
    :func:`ddim_gmm_exp.sampling.kernel_noise`. With ``components`` (a mixture step)
    x_s = m + gmm.perturbation(i, sigma, z, k); without, x_s = m + sigma z, or m when eta = 0.
    The last step (s = 0) without a mixture returns x0_hat. Computed in the inputs' dtype.
    ``final``: whether s = 0, from the caller's host copy of the grid (None: read from s), so that
    a step between device tensors reads nothing back.
    """
    check_flow_eta(eta)
    x0, x1 = x0_and_x1(v, x_t, t)
    if final is None:
        final = float(s) == 0
    if final and components is None:
        return (x0, x0, x0) if return_mean else (x0, x0)
    sigma = rfim_sigma(s, eta)
    if eta == 0:
        # m = (1 - s)(x_t - t v) + s (x_t + (1 - t) v) = x_t + (s - t) v: the eta = 0 mean IS the
        # Euler step. Written as diffusers writes it, it is diffusers' step bit for bit (tests/test_flow.py
        # checks that the general formula agrees to rounding).
        mean = euler_step(v, x_t, t, s)
    else:
        mean = rfim_mean(x0, x1, s, sigma)
    perturbation = kernel_perturbation(sigma, eta, noise, gmm, step_index, components, like=mean)
    x_s = mean if perturbation is None else mean + perturbation
    return (x_s, x0, mean) if return_mean else (x_s, x0)


def sample_rfim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    eta: float = 0.0,
    gmm: GMM | None = None,
    generator: Generators = None,
    callback: StepCallback | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """RFIM (eta = 0: Euler) or, with a GMM, RFIM-GMM (Gabbur 2026 section 4) from x_1 down to x_0.

    ``denoiser(x, t)`` returns the velocity for the batch x at model timestep t = time *
    num_train_timesteps (a (B,) float tensor, diffusers' SD3 convention); ``sigmas`` are the
    times, noisiest first, ending at 0; ``callback(i, t, x_s, x0_hat)`` sees every step. The
    random draws are the DDIM family's (kernel_noise), so is the last-step rule: the GMM does not
    mix on the last step unless it has ``last_step=True``.
    """
    check_flow_eta(eta)
    times = check_flow_sigmas(sigmas)
    num_steps = len(times) - 1
    if gmm is not None:
        gmm.check_num_steps(num_steps)
        gmm.check_shape(tuple(x.shape))
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for i in range(num_steps):
        t, s = times[i], times[i + 1]
        collect_draws = start_draws(
            x.shape, generator, device=x.device, dtype=x.dtype, gmm=gmm, step_index=i, num_steps=num_steps, eta=eta
        )
        t_batch = torch.full((x.shape[0],), t * num_train_timesteps, device=x.device, dtype=time_dtype)
        v = denoiser(x, t_batch)
        noise, components = collect_draws()
        x, x0, mean = rfim_step(v, x, t, s, eta, noise, gmm=gmm, step_index=i, components=components, return_mean=True)
        report_step(callback, i, t_batch, x, x0, mean, rfim_sigma(s, eta))
    return x
