"""DDIMSampler with the CompVis/LDM interface, and DDIM-GMM behind ``gmm=True``.

Drop-in for ``ldm.models.diffusion.ddim.DDIMSampler`` of CompVis latent-diffusion and
Stability's stable-diffusion: ``model`` is anything with ``apply_model(x, t, c)``,
``alphas_cumprod`` and ``num_timesteps`` (a LatentDiffusion object, or a small stand-in).
Timesteps follow CompVis (``uniform``: every T//S-th timestep, shifted by one; ``quad``), and the
last step lands on abar_0 as there. The step itself is :func:`ddim_gmm_exp.sampling.sample_ddim`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.noise import Generators, randn
from ddim_gmm_exp.sampling import (
    check_eta,
    classifier_free_guidance,
    ddim_sigma,
    ddim_sigmas,
    sample_ddim,
    warn_if_gmm_is_inert,
)

log = logging.getLogger(__name__)

DISCRETIZATIONS = ("uniform", "quad")
# CompVis's parameterization names -> diffusers' prediction types
PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# CompVis arguments that this sampler does not implement; accepted only at their no-op value
_UNSUPPORTED = {
    "mask": None,
    "x0": None,
    "quantize_x0": False,
    "normals_sequence": None,
    "score_corrector": None,
    "corrector_kwargs": None,
    "temperature": 1.0,
    "noise_dropout": 0.0,
}


def make_ddim_timesteps(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """CompVis's DDIM timesteps, ascending, exactly S of them.

    'uniform': 0, c, 2c, ... (c = T // S), shifted by one as CompVis does; 'quad': CompVis's
    quadratic spacing. Where CompVis's rule breaks we keep S steps inside [0, T-1]: when T % S != 0
    it would give S+1 steps (we keep the first S), and when the shift would reach T (e.g. S = T)
    the timesteps are not shifted.
    """
    if method not in DISCRETIZATIONS:
        raise ValueError(f"ddim_discretize={method!r} is not allowed: choose one of {DISCRETIZATIONS}")
    if (
        isinstance(num_ddim_timesteps, bool)
        or not isinstance(num_ddim_timesteps, int | np.integer)
        or not (1 <= num_ddim_timesteps <= num_ddpm_timesteps)
    ):
        raise ValueError(
            f"steps={num_ddim_timesteps!r} is not allowed: it must be an integer in "
            f"[1, {num_ddpm_timesteps}] (the model's training timesteps)"
        )
    if method == "uniform":
        stride = num_ddpm_timesteps // num_ddim_timesteps
        timesteps = np.arange(num_ddim_timesteps) * stride
    else:
        timesteps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    return timesteps + 1 if timesteps[-1] + 1 < num_ddpm_timesteps else timesteps


class DDIMSampler:
    """DDIM / DDIM-GMM sampler for CompVis-style latent diffusion models.

    >>> sampler = DDIMSampler(model, gmm=True, gmm_params=gmm)   # doctest: +SKIP
    >>> samples, intermediates = sampler.sample(S=50, batch_size=4, shape=(4, 32, 32), eta=1.0)
    """

    def __init__(
        self,
        model: Any,
        schedule: str = "linear",
        gmm: bool = False,
        gmm_params: GMM | None = None,
        **kwargs: Any,
    ) -> None:
        for attribute in ("apply_model", "alphas_cumprod", "num_timesteps"):
            if not hasattr(model, attribute):
                raise ValueError(
                    f"model {type(model).__name__} has no {attribute!r}: DDIMSampler needs "
                    "apply_model(x, t, c), alphas_cumprod and num_timesteps (as CompVis LatentDiffusion)"
                )
        if gmm and gmm_params is None:
            raise ValueError("gmm=True needs gmm_params: pass an initialized GMM")
        if gmm and not gmm_params.initialized:
            raise ValueError("gmm_params has no parameters yet: call gmm_params.initialize(...) first")
        self.model = model
        self.schedule = schedule
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.gmm = gmm
        self.gmm_params = gmm_params if gmm else None
        self._warned_eta_zero = False
        # of the last sample() call: the fraction of (step, coordinate) variances clipped at 0
        self.clipped_fraction: float | None = None
        parameterization = getattr(model, "parameterization", "eps")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"model.parameterization={parameterization!r} is not supported: "
                f"choose one of {tuple(PARAMETERIZATIONS)}"
            )
        self.prediction_type = PARAMETERIZATIONS[parameterization]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.as_tensor(self.model.alphas_cumprod).detach().to("cpu", torch.float64)

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str = "uniform",
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """DDIM timesteps and their alpha-bars and sigmas (CompVis attribute names)."""
        check_eta(ddim_eta)
        alphas_cumprod = self.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(
                f"model.alphas_cumprod has {alphas_cumprod.shape[0]} entries but "
                f"num_timesteps={self.ddpm_num_timesteps}: they must agree"
            )
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps)
        self.ddim_alphas = alphas_cumprod[self.ddim_timesteps]
        self.ddim_alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])
        self.ddim_sigmas = ddim_sigma(self.ddim_alphas, self.ddim_alphas_prev, ddim_eta)
        self.ddim_eta = ddim_eta
        if verbose:
            log.info("DDIM schedule: %d steps, eta %s", len(self.ddim_timesteps), ddim_eta)

    @torch.no_grad()
    def sample(
        self,
        S: int | None = None,
        batch_size: int = 1,
        shape: tuple[int, ...] = (),
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        eta: float = 0.0,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        steps: int | None = None,
        generator: Generators = None,
        ddim_discretize: str = "uniform",
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape``; returns (samples, intermediates).

        ``S`` (CompVis) or ``steps`` is the number of DDIM steps. ``intermediates`` holds
        'x_inter' and 'pred_x0' every ``log_every_t`` steps and at the end, as CompVis does.
        ``generator`` (one, or one per sample) makes the draw reproducible; without it the
        global torch RNG is used, as CompVis does.
        """
        num_steps = _resolve_steps(S, steps)
        _reject_unsupported(kwargs)
        if unconditional_guidance_scale < 0:
            raise ValueError(
                f"unconditional_guidance_scale={unconditional_guidance_scale!r} is not allowed: it must be >= 0"
            )
        self.make_schedule(ddim_num_steps=num_steps, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        full_shape = (batch_size, *shape)
        # the GMM's shape and step count are checked by sample_ddim
        if not self._warned_eta_zero:  # past sample() and torch's no_grad wrapper
            self._warned_eta_zero = warn_if_gmm_is_inert(self.gmm_params, eta, stacklevel=4)
        device = _model_device(self.model)
        x = x_T if x_T is not None else randn(full_shape, generator, device=device)
        timesteps = np.flip(self.ddim_timesteps).tolist()
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.guided_model_output(
                x, t, conditioning, unconditional_guidance_scale, unconditional_conditioning
            )

        def on_step(i: int, t: torch.Tensor, x_prev: torch.Tensor, x0: torch.Tensor) -> None:
            index = len(timesteps) - i - 1
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(x0, i)
            if index % log_every_t == 0 or index == len(timesteps) - 1:
                intermediates["x_inter"].append(x_prev)
                intermediates["pred_x0"].append(x0)

        alphas_cumprod = self.alphas_cumprod
        samples = sample_ddim(
            denoise,
            x,
            timesteps,
            alphas_cumprod,
            alphas_cumprod[0],
            eta=eta,
            gmm=self.gmm_params,
            generator=generator,
            callback=on_step,
            prediction_type=self.prediction_type,
        )
        if self.gmm_params is not None:
            sigmas = ddim_sigmas(alphas_cumprod, timesteps, alphas_cumprod[0], eta)
            self.clipped_fraction = self.gmm_params.clipped_fraction(sigmas, eta)
        return samples, intermediates

    def guided_model_output(self, x: torch.Tensor, t: torch.Tensor, c: Any, scale: float, uc: Any) -> torch.Tensor:
        """Model output with classifier-free guidance: out_u + scale * (out_c - out_u)."""
        return classifier_free_guidance(self.model.apply_model, x, t, c, uc, scale)


def _resolve_steps(S: int | None, steps: int | None) -> int:
    if S is not None and steps is not None and S != steps:
        raise ValueError(f"S={S} and steps={steps} disagree: pass one of them")
    num_steps = S if S is not None else steps
    if num_steps is None:
        raise ValueError("the number of DDIM steps is missing: pass S= (CompVis) or steps=")
    return num_steps


def _reject_unsupported(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if name not in _UNSUPPORTED:
            raise TypeError(f"DDIMSampler.sample() got an unexpected argument {name!r}")
        default = _UNSUPPORTED[name]
        if (value is not None) if default is None else (value != default):
            raise ValueError(
                f"{name}={value!r} is not supported by this DDIMSampler: leave it at {default!r} (CompVis's default)"
            )


def _model_device(model: Any) -> torch.device:
    if hasattr(model, "device"):
        return torch.device(model.device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.as_tensor(model.alphas_cumprod).device
