"""DDIMSampler with the CompVis/LDM interface, and DDIM-GMM behind ``gmm=True``.

Drop-in for ``ldm.models.diffusion.ddim.DDIMSampler`` of CompVis latent-diffusion and
Stability's stable-diffusion (SD2): ``model`` is anything with ``apply_model(x, t, c)``,
``alphas_cumprod`` and ``num_timesteps`` (a LatentDiffusion object, or a small stand-in).

- Timesteps are exactly CompVis's ``make_ddim_timesteps`` (``uniform``: every T//S-th timestep
  shifted by one, ceil(T / (T//S)) of them, so S=7 runs 8 steps from t=995; ``quad``); a GMM
  must have ``n_steps = len(sampler.ddim_timesteps)`` (:func:`num_ddim_steps`). Where CompVis's
  list would reach t = T (S=3 or S=600 at T=1000; CompVis's own code fails with an IndexError)
  we refuse S with a ValueError naming the nearest S that work.
- ``sample`` / ``ddim_sampling`` / ``p_sample_ddim`` / ``decode`` / ``encode`` /
  ``stochastic_encode`` and the schedule attributes ``ddim_timesteps``, ``ddim_alphas``,
  ``ddim_alphas_prev``, ``ddim_sigmas``, ``ddim_sqrt_one_minus_alphas`` are Stability's.
- GMM step index: CompVis's ``index`` is the position in ``ddim_timesteps`` (0 = least noisy), so
  the GMM's step i (0 = noisiest, METHOD.md) is ``len(ddim_timesteps) - 1 - index``. A partial run
  (``decode(t_start)``, img2img) runs the last t_start steps of the schedule with the same
  kernels a full run uses there.

Every step is :func:`ddim_gmm_exp.sampling.ddim_kernel_step` (the draws of ``kernel_noise``, then
``ddim_step``), as in the loop and the diffusers scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.noise import Generators, randn
from ddim_gmm_exp.sampling import (
    check_eta,
    classifier_free_guidance,
    ddim_kernel_step,
    ddim_mean,
    ddim_sigma,
    warn_if_gmm_is_inert,
    x0_and_eps,
)

log = logging.getLogger(__name__)

DISCRETIZATIONS = ("uniform", "quad")
# CompVis's parameterization names -> diffusers' prediction types
PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# CompVis arguments that this sampler does not implement; accepted only at CompVis's default
_UNSUPPORTED = {
    "mask": None,
    "x0": None,
    "quantize_x0": False,
    "quantize_denoised": False,
    "normals_sequence": None,
    "score_corrector": None,
    "corrector_kwargs": None,
    "temperature": 1.0,
    "noise_dropout": 0.0,
    "repeat_noise": False,
    # CompVis's p_sample_ddim reads model.ddim_sigmas_for_original_num_steps, which no model has
    "use_original_steps": False,
    "ddim_use_original_steps": False,
}


# ------------------------------------------------------------------------------------ timesteps


def _compvis_timesteps(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """CompVis's rule as it is: 'uniform' range(0, T, T // S), 'quad' quadratic, then + 1."""
    if method == "uniform":
        timesteps = np.arange(0, num_ddpm_timesteps, num_ddpm_timesteps // num_ddim_timesteps)
    else:
        timesteps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    return timesteps + 1  # CompVis: "add one to get the final alpha values right"


def _fits(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> bool:
    return int(_compvis_timesteps(method, num_ddim_timesteps, num_ddpm_timesteps)[-1]) < num_ddpm_timesteps


def _nearest_fitting(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> list[int]:
    """The nearest step counts below and above S whose timesteps stay inside [0, T-1]."""
    below = (s for s in range(num_ddim_timesteps - 1, 0, -1) if _fits(method, s, num_ddpm_timesteps))
    above = (s for s in range(num_ddim_timesteps + 1, num_ddpm_timesteps + 1) if _fits(method, s, num_ddpm_timesteps))
    return [s for s in (next(below, None), next(above, None)) if s is not None]


def _check_step_count(method: str, num_ddim_timesteps: Any, num_ddpm_timesteps: int) -> None:
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
    if not _fits(method, num_ddim_timesteps, num_ddpm_timesteps):
        nearest = " or ".join(map(str, _nearest_fitting(method, num_ddim_timesteps, num_ddpm_timesteps))) or "none"
        rule = f"T//S = {num_ddpm_timesteps // num_ddim_timesteps} apart from 0" if method == "uniform" else method
        raise ValueError(
            f"steps={num_ddim_timesteps} is not allowed with ddim_discretize={method!r} and T={num_ddpm_timesteps}: "
            f"CompVis's timesteps ({rule}, shifted by one) reach t={num_ddpm_timesteps}, past the model's last "
            f"timestep {num_ddpm_timesteps - 1} (CompVis's own sampler fails there with an IndexError). "
            f"Nearest step counts that work: {nearest}"
            + (
                f" ('uniform' works when T//S does not divide T-1 = {num_ddpm_timesteps - 1})"
                if method == "uniform"
                else ""
            )
        )


def make_ddim_timesteps(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """CompVis's DDIM timesteps, ascending, exactly as ``ldm.modules.diffusionmodules.util`` makes them.

    'uniform': 0, c, 2c, ... below T (c = T // S), shifted by one: ceil(T / c) timesteps, which is
    more than S when T % S != 0 (S=7 of T=1000: 8 timesteps, 1 ... 995). 'quad': S timesteps
    (repeats included, as CompVis). S whose list would reach t = T is refused (ValueError).
    """
    _check_step_count(method, num_ddim_timesteps, num_ddpm_timesteps)
    return _compvis_timesteps(method, int(num_ddim_timesteps), num_ddpm_timesteps)


def num_ddim_steps(num_ddim_timesteps: int, num_ddpm_timesteps: int = 1000, ddim_discretize: str = "uniform") -> int:
    """How many steps ``sample(S=num_ddim_timesteps)`` runs: the GMM's ``n_steps``."""
    return len(make_ddim_timesteps(ddim_discretize, num_ddim_timesteps, num_ddpm_timesteps))


# ------------------------------------------------------------------------------------ sampler


class DDIMSampler:
    """DDIM / DDIM-GMM sampler for CompVis-style latent diffusion models.

    >>> sampler = DDIMSampler(model, gmm=True, gmm_params=gmm)   # doctest: +SKIP
    >>> samples, intermediates = sampler.sample(S=50, batch_size=4, shape=(4, 32, 32), eta=1.0)

    ``gmm`` left out: the GMM is used when ``gmm_params`` is given; ``gmm=False`` with
    ``gmm_params`` is refused (it would silently sample plain DDIM).
    """

    def __init__(
        self,
        model: Any,
        schedule: str = "linear",
        gmm: bool | None = None,
        gmm_params: GMM | None = None,
        **kwargs: Any,
    ) -> None:
        for attribute in ("apply_model", "alphas_cumprod", "num_timesteps"):
            if not hasattr(model, attribute):
                raise ValueError(
                    f"model {type(model).__name__} has no {attribute!r}: DDIMSampler needs "
                    "apply_model(x, t, c), alphas_cumprod and num_timesteps (as CompVis LatentDiffusion)"
                )
        if gmm is None:  # a given gmm_params implies the GMM
            gmm = gmm_params is not None
        if gmm and gmm_params is None:
            raise ValueError("gmm=True needs gmm_params: pass an initialized GMM")
        if not gmm and gmm_params is not None:
            raise ValueError("gmm=False contradicts the gmm_params given: pass gmm=True or no gmm_params")
        if gmm and not gmm_params.initialized:
            raise ValueError("gmm_params has no parameters yet: call gmm_params.initialize(...) first")
        self.model = model
        self.schedule = schedule
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.gmm = gmm
        self.gmm_params = gmm_params if gmm else None
        self._warned_eta_zero = False
        # the last run's GMM steps, sigmas and eta: what clipped_fraction is computed from, on demand
        self._last_run: tuple[range, torch.Tensor, float] | None = None
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

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """abar_{t-1}, 1 before t = 0 (CompVis's DDPM buffer, rebuilt: a stand-in model may lack it)."""
        alphas_cumprod = self.alphas_cumprod
        return torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str = "uniform",
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """DDIM timesteps and their alpha-bars and sigmas, with CompVis's attribute names."""
        check_eta(ddim_eta)
        alphas_cumprod = self.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(
                f"model.alphas_cumprod has {alphas_cumprod.shape[0]} entries but "
                f"num_timesteps={self.ddpm_num_timesteps}: they must agree"
            )
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps)
        self.ddim_num_steps = int(ddim_num_steps)
        self.ddim_discretize = ddim_discretize
        self.ddim_alphas = alphas_cumprod[self.ddim_timesteps]
        # the step from ddim_timesteps[0] lands on abar_0, as in CompVis
        self.ddim_alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])
        self.ddim_sigmas = ddim_sigma(self.ddim_alphas, self.ddim_alphas_prev, ddim_eta)
        self.ddim_sqrt_one_minus_alphas = (1 - self.ddim_alphas).sqrt()
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
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict[str, Any] | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: float | None = None,
        ucg_schedule: Sequence[float] | None = None,
        *,
        steps: int | None = None,
        generator: Generators = None,
        ddim_discretize: str = "uniform",
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape``; returns (samples, intermediates).

        Stability's positional order. ``S`` (CompVis) or ``steps`` is the number of DDIM steps
        asked for; ``len(self.ddim_timesteps)`` steps run. ``intermediates`` holds 'x_inter' and
        'pred_x0' every ``log_every_t`` steps and at the end, as CompVis does. ``ucg_schedule``:
        one guidance scale per step run. ``generator`` (one, or one per sample) makes the draw
        reproducible; without it the global torch RNG is used, as CompVis does.
        """
        if kwargs:
            raise TypeError(f"DDIMSampler.sample() got an unexpected argument {next(iter(kwargs))!r}")
        _reject_unsupported(
            normals_sequence=normals_sequence,
            quantize_x0=quantize_x0,
            mask=mask,
            x0=x0,
            temperature=temperature,
            noise_dropout=noise_dropout,
            score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs,
        )
        _reject_dynamic_threshold(dynamic_threshold)
        num_steps = _resolve_steps(S, steps)
        self.make_schedule(ddim_num_steps=num_steps, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        self._warn_once_if_gmm_is_inert(eta)
        return self.ddim_sampling(
            conditioning,
            (batch_size, *shape),
            x_T=x_T,
            callback=callback,
            img_callback=img_callback,
            log_every_t=log_every_t,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning,
            ucg_schedule=ucg_schedule,
            generator=generator,
        )

    @torch.no_grad()
    def ddim_sampling(
        self,
        cond: Any,
        shape: tuple[int, ...],
        x_T: torch.Tensor | None = None,
        ddim_use_original_steps: bool = False,
        callback: Callable[[int], None] | None = None,
        timesteps: int | None = None,
        quantize_denoised: bool = False,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        log_every_t: int = 100,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict[str, Any] | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: float | None = None,
        ucg_schedule: Sequence[float] | None = None,
        *,
        generator: Generators = None,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """CompVis's loop over the schedule of :meth:`make_schedule`, from x_T (drawn if None).

        ``timesteps`` (an int) runs the least noisy ``int(min(timesteps / N, 1) * N) - 1`` steps,
        CompVis's rule (one fewer than asked), from x_T.
        """
        _reject_unsupported(
            ddim_use_original_steps=ddim_use_original_steps,
            quantize_denoised=quantize_denoised,
            mask=mask,
            x0=x0,
            temperature=temperature,
            noise_dropout=noise_dropout,
            score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs,
        )
        _reject_dynamic_threshold(dynamic_threshold)
        num_run = self._steps_to_run(timesteps)
        scales = _guidance_scales(unconditional_guidance_scale, ucg_schedule, num_run)
        x = x_T if x_T is not None else randn(shape, generator, device=_model_device(self.model))
        return self._run_schedule(
            x,
            cond,
            num_run,
            scales,
            unconditional_conditioning,
            callback=callback,
            img_callback=img_callback,
            log_every_t=log_every_t,
            generator=generator,
        )

    @torch.no_grad()
    def p_sample_ddim(
        self,
        x: torch.Tensor,
        c: Any,
        t: torch.Tensor,
        index: int,
        repeat_noise: bool = False,
        use_original_steps: bool = False,
        quantize_denoised: bool = False,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict[str, Any] | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: float | None = None,
        *,
        generator: Generators = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from ``ddim_timesteps[index]`` (t) to the entry below it; returns (x_prev, pred_x0).

        With a GMM this is the kernel's step ``len(ddim_timesteps) - 1 - index``, whatever loop calls it.
        """
        _reject_unsupported(
            repeat_noise=repeat_noise,
            use_original_steps=use_original_steps,
            quantize_denoised=quantize_denoised,
            temperature=temperature,
            noise_dropout=noise_dropout,
            score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs,
        )
        _reject_dynamic_threshold(dynamic_threshold)
        num_steps = self._require_schedule()
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < num_steps:
            raise ValueError(f"index={index!r} is not allowed: it must be an integer in [0, {num_steps - 1}]")
        self._check_gmm(tuple(x.shape))
        step_index = num_steps - 1 - int(index)  # the GMM counts steps in the order they run
        output = self.guided_model_output(x, t, c, unconditional_guidance_scale, unconditional_conditioning)
        return ddim_kernel_step(
            output,
            x,
            self.ddim_alphas[index],
            self.ddim_alphas_prev[index],
            self.ddim_eta,
            generator=generator,
            gmm=self.gmm_params,
            step_index=step_index,
            num_steps=num_steps,
            prediction_type=self.prediction_type,
        )

    @torch.no_grad()
    def stochastic_encode(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | int,
        use_original_steps: bool = False,
        noise: torch.Tensor | None = None,
        *,
        generator: Generators = None,
    ) -> torch.Tensor:
        """q(x_t | x0): sqrt(abar) x0 + sqrt(1 - abar) noise, abar = ``ddim_alphas[t]`` (t an index
        into the schedule, one per sample or one for all) or ``alphas_cumprod[t]`` with
        ``use_original_steps``. SD's img2img: ``stochastic_encode(z, t_enc)`` then ``decode(.., t_enc)``."""
        if use_original_steps:
            abars = self.alphas_cumprod
        else:
            self._require_schedule()
            abars = self.ddim_alphas
        index = torch.as_tensor(t, dtype=torch.long).cpu().reshape(-1)
        if index.numel() not in (1, x0.shape[0]) or not ((index >= 0) & (index < len(abars))).all():
            raise ValueError(
                f"t={t!r} is not allowed: it must be one index, or one per sample, in [0, {len(abars) - 1}] "
                + ("(model timesteps)" if use_original_steps else "(positions in sampler.ddim_timesteps)")
            )
        if noise is None:
            noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        abar = abars[index].reshape(-1, *([1] * (x0.dim() - 1))).to(x0.device)
        return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)

    @torch.no_grad()
    def decode(
        self,
        x_latent: torch.Tensor,
        cond: Any,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        use_original_steps: bool = False,
        callback: Callable[[int], None] | None = None,
        *,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Denoise ``x_latent`` from ``ddim_timesteps[t_start - 1]`` down: the last ``t_start`` steps
        of the schedule (with a GMM, the kernels of those steps in a full run)."""
        _reject_unsupported(use_original_steps=use_original_steps)
        num_steps = self._require_schedule()
        if isinstance(t_start, bool) or not isinstance(t_start, int | np.integer) or not 0 <= t_start <= num_steps:
            raise ValueError(
                f"t_start={t_start!r} is not allowed: it must be an integer in [0, {num_steps}] "
                "(len(sampler.ddim_timesteps))"
            )
        self._warn_once_if_gmm_is_inert(self.ddim_eta)
        scales = _guidance_scales(unconditional_guidance_scale, None, int(t_start))
        x, _ = self._run_schedule(
            x_latent, cond, int(t_start), scales, unconditional_conditioning, callback=callback, generator=generator
        )
        return x

    @torch.no_grad()
    def encode(
        self,
        x0: torch.Tensor,
        c: Any,
        t_enc: int,
        use_original_steps: bool = False,
        return_intermediates: int | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """DDIM inversion (eta = 0, run upwards) over the first ``t_enc`` steps of the schedule.

        Stability's encode, except that the model sees the timestep of the level it steps to
        (``ddim_timesteps[i]``), not the loop index i (Stability-AI/stablediffusion PR #226); the
        two agree with ``use_original_steps``. v and x0 models are handled as in sampling.
        """
        timesteps, abar_from, abar_to = self._inversion_schedule(t_enc, use_original_steps)
        x = x0
        intermediates: list[torch.Tensor] = []
        inter_steps: list[int] = []
        for i, timestep in enumerate(timesteps.tolist()):
            t = torch.full((x.shape[0],), int(timestep), device=x.device, dtype=torch.long)
            output = self.guided_model_output(x, t, c, unconditional_guidance_scale, unconditional_conditioning)
            x = _inversion_step(output, x, abar_from[i], abar_to[i], self.prediction_type)
            if return_intermediates and _keeps_intermediate(i, len(timesteps), return_intermediates):
                intermediates.append(x)
                inter_steps.append(i)
            if callback is not None:
                callback(i)
        out: dict[str, Any] = {"x_encoded": x, "intermediate_steps": inter_steps}
        if return_intermediates:
            out["intermediates"] = intermediates
        return x, out

    def guided_model_output(self, x: torch.Tensor, t: torch.Tensor, c: Any, scale: float, uc: Any) -> torch.Tensor:
        """Model output with classifier-free guidance: out_u + scale * (out_c - out_u)."""
        return classifier_free_guidance(self.model.apply_model, x, t, c, uc, scale)

    # ------------------------------------------------------------------------------ helpers

    def _run_schedule(
        self,
        x: torch.Tensor,
        cond: Any,
        num_run: int,
        scales: Sequence[float],
        uc: Any,
        *,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        log_every_t: int = 100,
        generator: Generators = None,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """CompVis's loop over the least noisy ``num_run`` timesteps, noisiest first; every loop
        (sample, ddim_sampling, decode) runs here, so each uses the same GMM step indices."""
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
        for i, index in enumerate(reversed(range(num_run))):
            t = torch.full((x.shape[0],), int(self.ddim_timesteps[index]), device=x.device, dtype=torch.long)
            x, pred_x0 = self.p_sample_ddim(
                x,
                cond,
                t,
                index,
                unconditional_guidance_scale=scales[i],
                unconditional_conditioning=uc,
                generator=generator,
            )
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == num_run - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        num_steps = len(self.ddim_timesteps)
        self._last_run = (range(num_steps - num_run, num_steps), self.ddim_sigmas, self.ddim_eta)
        return x, intermediates

    def _require_schedule(self) -> int:
        """The number of steps of the schedule; refuses before make_schedule (CompVis: AttributeError)."""
        if not hasattr(self, "ddim_timesteps"):
            raise ValueError("this sampler has no schedule yet: call make_schedule(ddim_num_steps=...) first")
        return len(self.ddim_timesteps)

    def _steps_to_run(self, timesteps: int | None) -> int:
        num_steps = self._require_schedule()
        if timesteps is None:
            return num_steps
        if isinstance(timesteps, bool) or not isinstance(timesteps, int | np.integer) or timesteps < 1:
            raise ValueError(f"timesteps={timesteps!r} is not allowed: it must be an integer >= 1 (or None)")
        return int(min(timesteps / num_steps, 1) * num_steps) - 1  # CompVis's subset_end, as it is

    def _check_gmm(self, shape: tuple[int, ...]) -> None:
        """The GMM's own checks, with what the step count is on this sampler."""
        if self.gmm_params is None:
            return
        num_steps = len(self.ddim_timesteps)
        try:
            self.gmm_params.check_num_steps(num_steps)
        except ValueError as err:
            why = (
                f": CompVis's {self.ddim_discretize!r} timesteps for S={self.ddim_num_steps} are {num_steps} "
                f"(every T//S-th, ceil(T / (T//S)) of them)"
                if num_steps != self.ddim_num_steps
                else ""
            )
            raise ValueError(
                f"{err} (this DDIMSampler runs len(sampler.ddim_timesteps) = {num_steps} steps{why}; "
                f"ddim_gmm_exp.ldm.num_ddim_steps(S, T) gives it before sampling)"
            ) from err
        self.gmm_params.check_shape(shape)

    @property
    def clipped_fraction(self) -> float | None:
        """Of the last run, the fraction of (step, coordinate) variances clipped at 0; None without
        a GMM or a run. Computed when asked, not on the sampling path."""
        if self.gmm_params is None or self._last_run is None:
            return None
        steps, ddim_sigmas, eta = self._last_run
        sigmas = ddim_sigmas.flip(0).tolist()  # in the order the steps run
        return self.gmm_params.clipped_fraction(sigmas, eta, steps=steps)

    def _warn_once_if_gmm_is_inert(self, eta: float) -> None:
        if not self._warned_eta_zero:  # stacklevel: past this helper, the caller and torch's no_grad wrapper
            self._warned_eta_zero = warn_if_gmm_is_inert(self.gmm_params, eta, stacklevel=5)

    def _inversion_schedule(
        self, t_enc: int, use_original_steps: bool
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(timesteps, abar from, abar to) of encode's first t_enc steps, least noisy first."""
        if use_original_steps:
            timesteps, abar_to, abar_from = (
                np.arange(self.ddpm_num_timesteps),
                self.alphas_cumprod,
                self.alphas_cumprod_prev,
            )
        else:
            self._require_schedule()
            timesteps, abar_to, abar_from = self.ddim_timesteps, self.ddim_alphas, self.ddim_alphas_prev
        if isinstance(t_enc, bool) or not isinstance(t_enc, int | np.integer) or not 0 <= t_enc <= len(timesteps):
            raise ValueError(f"t_enc={t_enc!r} is not allowed: it must be an integer in [0, {len(timesteps)}]")
        return timesteps[:t_enc], abar_from[:t_enc], abar_to[:t_enc]


def _inversion_step(
    output: torch.Tensor, x: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """DDIM eq. 12 at eta = 0 from abar_from up to abar_to, from sampling's pieces (ddim_step
    itself computes sigma, which is NaN when abar rises)."""
    x0, eps = x0_and_eps(output, x, abar_from, prediction_type)
    return ddim_mean(x0, eps, abar_to, torch.zeros((), dtype=torch.float64))


def _keeps_intermediate(i: int, num_steps: int, every: int) -> bool:
    """Stability's encode keeps every (num_steps // every)-th step and the last two."""
    return (i % max(num_steps // every, 1) == 0 and i < num_steps - 1) or i >= num_steps - 2


def _guidance_scales(scale: float, ucg_schedule: Sequence[float] | None, num_run: int) -> list[float]:
    """One guidance scale per step run: ``ucg_schedule`` (Stability) or ``scale`` throughout."""
    if ucg_schedule is None:
        _check_guidance_scale(scale)
        return [scale] * num_run
    scales = [float(s) for s in ucg_schedule]
    if len(scales) != num_run:
        raise ValueError(
            f"ucg_schedule has {len(scales)} entries but {num_run} steps run: pass one guidance scale per step "
            "(len(sampler.ddim_timesteps) for a full run)"
        )
    for s in scales:
        _check_guidance_scale(s, "ucg_schedule entry")
    return scales


def _check_guidance_scale(scale: float, name: str = "unconditional_guidance_scale") -> None:
    if not scale >= 0:
        raise ValueError(f"{name}={scale!r} is not allowed: it must be >= 0")


def _resolve_steps(S: int | None, steps: int | None) -> int:
    if S is not None and steps is not None and S != steps:
        raise ValueError(f"S={S} and steps={steps} disagree: pass one of them")
    num_steps = S if S is not None else steps
    if num_steps is None:
        raise ValueError("the number of DDIM steps is missing: pass S= (CompVis) or steps=")
    return num_steps


def _reject_unsupported(**values: Any) -> None:
    for name, value in values.items():
        default = _UNSUPPORTED[name]
        if (value is not None) if default is None else (value != default):
            shown = f"<tensor of shape {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)
            raise ValueError(
                f"{name}={shown} is not supported by this DDIMSampler: leave it at {default!r} (CompVis's default)"
            )


def _reject_dynamic_threshold(dynamic_threshold: float | None) -> None:
    """Stability's DDIMSampler raises NotImplementedError for any dynamic_threshold; so do we."""
    if dynamic_threshold is not None:
        raise NotImplementedError(
            f"dynamic_threshold={dynamic_threshold!r} is not supported: Stability's DDIMSampler does not implement "
            "it either (only its PLMSSampler does, as norm thresholding); leave it at None"
        )


def _model_device(model: Any) -> torch.device:
    if hasattr(model, "device"):
        return torch.device(model.device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.as_tensor(model.alphas_cumprod).device
