"""diffusers ``DDIMScheduler`` with DDIM-GMM behind ``set_gmm_params``; no patching of diffusers.

    from ddim_gmm_exp.diffusers import DDIMScheduler, GMM
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    scheduler.set_gmm_params(gmm_params=gmm)      # GMM().initialize(dim, n_components, n_steps)
    scheduler.set_timesteps(50)
    x = scheduler.step(model_output, t, x, eta=1.0, generator=generator).prev_sample

The subclass keeps diffusers' config, ``step()`` signature and outputs. It differs in two ways:
the previous timestep is the next entry of ``self.timesteps`` (so every ``timestep_spacing``
is right; diffusers' own ``step`` assumes a fixed stride, which is wrong for "linspace"), and
with a GMM the step is the mixture's (``x_s = m + delta_{i,k} + sqrt(max(sigma^2 - v_k, 0)) z`` for
the paper's kernel, which acts at eta = 0 too). The GMM's
hyperparameters are saved in the scheduler config (``gmm_*`` keys), so a saved scheduler
rebuilds the same kernel. The step math is :func:`ddim_gmm_exp.sampling.ddim_step`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import diffusers
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from ddim_gmm_exp.gmm import GMM, GMMHyperparameters
from ddim_gmm_exp.noise import Generators
from ddim_gmm_exp.sampling import (
    check_eta,
    check_prediction_type,
    ddim_sigma,
    ddim_step,
    kernel_noise,
    previous_abar,
    warn_if_gmm_is_inert,
    x0_options,
)

__all__ = ["DDIMScheduler", "DDIMGMMScheduler", "GMM"]

_GMM_FIELDS = [f.name for f in dataclasses.fields(GMMHyperparameters)]
# Config key -> default; gmm_n_components = None means "no GMM".
GMM_CONFIG_DEFAULTS: dict[str, Any] = {f"gmm_{name}": None for name in _GMM_FIELDS}


def _merged_signature() -> inspect.Signature:
    """diffusers.DDIMScheduler's init parameters (whatever the installed version) + gmm_* ones."""
    parent = inspect.signature(diffusers.DDIMScheduler.__init__)
    params = [p for p in parent.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default)
        for key, default in GMM_CONFIG_DEFAULTS.items()
    ]
    return parent.replace(parameters=params)


def _init(self: DDIMScheduler, *args: Any, **kwargs: Any) -> None:
    gmm_config = {key: kwargs.pop(key, None) for key in GMM_CONFIG_DEFAULTS}
    # The parent's undecorated init: our decorator already registered the whole config.
    diffusers.DDIMScheduler.__init__.__wrapped__(self, *args, **kwargs)
    self.gmm_params = None
    self._gmm_by_device: dict[torch.device, GMM] = {}
    self._step_index_of: dict[int, int] = {}
    self._warned_eta_zero = False
    self._step_clipped: dict[int, float | None] = {}
    if gmm_config["gmm_n_components"] is not None:
        hyperparameters_from_config(gmm_config).validate()


_init.__signature__ = _merged_signature()


def hyperparameters_from_config(config: Any) -> GMMHyperparameters:
    """The GMM hyperparameters stored in a scheduler config's gmm_* keys."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    values = {name: get(f"gmm_{name}") for name in _GMM_FIELDS}
    return GMMHyperparameters(**{k: v for k, v in values.items() if v is not None})


class DDIMScheduler(diffusers.DDIMScheduler):
    """diffusers' DDIMScheduler with an optional moment-matched GMM kernel (DDIM-GMM)."""

    __init__ = register_to_config(_init)

    def set_gmm_params(self, gmm_params: GMM | None = None) -> None:
        """Use ``gmm_params`` for the variance noise from now on (None: plain DDIM again).

        Its hyperparameters go into the config, so ``save_pretrained`` keeps them.
        """
        if gmm_params is None:
            self.register_to_config(**GMM_CONFIG_DEFAULTS)
            self.gmm_params = None
            self._gmm_by_device = {}
            return
        if not isinstance(gmm_params, GMM):
            raise ValueError(f"gmm_params={gmm_params!r} is not allowed: pass a ddim_gmm_exp GMM or None")
        if not gmm_params.initialized:
            raise ValueError("gmm_params has no parameters yet: call gmm_params.initialize(...) first")
        self.register_to_config(**{f"gmm_{k}": v for k, v in gmm_params.state_dict().items()})
        self.gmm_params = gmm_params
        self._gmm_by_device = {gmm_params.device: gmm_params}
        if self.num_inference_steps is not None:
            gmm_params.check_num_steps(len(self.timesteps))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' timesteps; rebuilds the GMM from the config if it was loaded from one."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r} is not allowed: it must be an integer in "
                f"[1, {self.config.num_train_timesteps}]"
            )
        super().set_timesteps(num_inference_steps, device=device)
        self._step_clipped = {}
        self._step_index_of = {int(t): i for i, t in reversed(list(enumerate(self.timesteps.tolist())))}
        if self.gmm_params is None and self.config.get("gmm_n_components") is not None:
            hp = hyperparameters_from_config(self.config)
            self.gmm_params = GMM().initialize(**dataclasses.asdict(hp))
            self._gmm_by_device = {self.gmm_params.device: self.gmm_params}
        if self.gmm_params is not None:
            self.gmm_params.check_num_steps(len(self.timesteps))

    @property
    def clipped_fraction(self) -> float | None:
        """Of the mixture steps run since set_timesteps, the mean fraction of coordinates whose
        component variance was clipped at 0 (sigma^2 < v_k); None before any GMM step."""
        fractions = [f for f in self._step_clipped.values() if f is not None]
        if not self._step_clipped:
            return None
        return sum(fractions) / len(fractions) if fractions else 0.0

    def step_index_of(self, timestep: int | torch.Tensor) -> int:
        """Position of ``timestep`` in ``self.timesteps``: the GMM step index i."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        t = int(timestep)
        if t not in self._step_index_of:
            raise ValueError(
                f"timestep={t} is not one of the scheduler's timesteps {self.timesteps.tolist()}: "
                "pass the timesteps of scheduler.timesteps"
            )
        return self._step_index_of[t]

    def _gmm_on(self, device: torch.device) -> GMM | None:
        if self.gmm_params is None:
            return None
        if device not in self._gmm_by_device:
            self._gmm_by_device[device] = self.gmm_params.to(device)
        return self._gmm_by_device[device]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generators = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM or DDIM-GMM step from ``timestep`` to the next entry of ``self.timesteps``."""
        i = self.step_index_of(timestep)
        check_eta(eta)
        check_prediction_type(self.config.prediction_type)
        abar_t = self.alphas_cumprod[int(timestep)]
        abar_prev = previous_abar(self.alphas_cumprod, self.timesteps, i, self.final_alpha_cumprod)
        gmm = self._gmm_on(model_output.device)
        if not self._warned_eta_zero:
            self._warned_eta_zero = warn_if_gmm_is_inert(gmm, eta)
        if variance_noise is not None and generator is not None and eta > 0:
            raise ValueError(
                "Cannot pass both generator and variance_noise. Please make sure that either "
                "`generator` or `variance_noise` stays `None`."
            )
        noise, components = kernel_noise(
            model_output.shape,
            generator,
            device=model_output.device,
            dtype=model_output.dtype,
            gmm=gmm,
            step_index=i,
            num_steps=len(self.timesteps),
            eta=eta,
            z=variance_noise,
        )
        if gmm is not None:
            sigma = ddim_sigma(abar_t, abar_prev, eta)
            self._step_clipped[i] = gmm.step_clipped_fraction(i, sigma) if gmm.mixes_at(i, len(self.timesteps), eta) else None
        prev_sample, x0 = ddim_step(
            model_output,
            sample,
            abar_t,
            abar_prev,
            eta,
            noise,
            gmm=gmm,
            step_index=i,
            components=components,
            prediction_type=self.config.prediction_type,
            use_clipped_model_output=use_clipped_model_output,
            **x0_options(self.config),
        )
        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


DDIMGMMScheduler = DDIMScheduler
