"""diffusers ``DDIMScheduler`` with DDIM-GMM behind ``set_gmm_params``; no patching of diffusers.

    from ddim_gmm_exp.diffusers import DDIMScheduler, GMM
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    scheduler.set_gmm_params(gmm_params=gmm)      # GMM().initialize(dim, n_components, n_steps)
    scheduler.set_timesteps(50)
    x = scheduler.step(model_output, t, x, eta=1.0, generator=generator).prev_sample

The subclass keeps diffusers' config, ``step()`` signature and outputs; without a GMM its
``step`` is diffusers' own, bit for bit. With a GMM the step is the mixture's
(``x_s = m + delta_{i,k} + sqrt(max(sigma^2 - v_k, 0)) z`` for the paper's kernel, which acts
at eta = 0 too), where i is the position of ``timestep`` in ``self.timesteps``. Two config keys
are added, and both survive ``from_config`` and ``save_pretrained``/``from_pretrained``:

- ``gmm_*``: the GMM's hyperparameters, so a copy rebuilds the same kernel.
- ``previous_timestep``: where a step lands. ``"diffusers"`` (default) is diffusers' rule,
  s = t - T // S (``final_alpha_cumprod`` once s < 0). ``"listed"`` lands on the next entry
  of ``self.timesteps``, which differs where the gap is not T // S: always for "linspace"
  (where diffusers' rule is wrong), "trailing" with T % S != 0, "leading" with
  steps_offset >= T // S.

The step is :func:`ddim_gmm_exp.sampling.ddim_kernel_step` (draws, then ``ddim_step``).

``RFIMScheduler`` does the same for rectified-flow pipelines (SD3, Flux): a
``FlowMatchEulerDiscreteScheduler`` whose step is RFIM or RFIM-GMM (:func:`ddim_gmm_exp.flow.rfim_step`),
with config ``eta`` and the ``gmm_*`` keys; at eta = 0 without a GMM it is diffusers' Euler step
bit for bit:

    from ddim_gmm_exp.diffusers import RFIMScheduler
    pipe.scheduler = RFIMScheduler.from_config(pipe.scheduler.config, eta=0.2)
    pipe.scheduler.set_gmm_params(gmm_params=gmm)
    pipe.scheduler.set_generator(torch.Generator().manual_seed(0))   # pipelines pass none to step()
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from ddim_gmm_exp.flow import check_flow_eta, rfim_sigma, rfim_step
from ddim_gmm_exp.gmm import GMM, GMMHyperparameters
from ddim_gmm_exp.noise import Generators
from ddim_gmm_exp.sampling import (
    check_eta,
    check_prediction_type,
    check_previous_timestep,
    ddim_kernel_step,
    ddim_sigma,
    kernel_noise,
    previous_abar,
    warn_if_gmm_is_inert,
    x0_options,
)

__all__ = ["DDIMScheduler", "DDIMGMMScheduler", "RFIMScheduler", "GMM"]

_GMM_FIELDS = [f.name for f in dataclasses.fields(GMMHyperparameters)]
# Config key -> default; gmm_n_components = None means "no GMM".
GMM_CONFIG_DEFAULTS: dict[str, Any] = {f"gmm_{name}": None for name in _GMM_FIELDS}
# Every config key this subclass adds to diffusers' -> default.
EXTRA_CONFIG_DEFAULTS: dict[str, Any] = {"previous_timestep": "diffusers", **GMM_CONFIG_DEFAULTS}


def _merged_signature(parent_init: Any, extra: dict[str, Any]) -> inspect.Signature:
    """A diffusers scheduler's init parameters (whatever the installed version) + our config keys."""
    parent = inspect.signature(parent_init)
    params = [p for p in parent.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=value) for key, value in extra.items()]
    return parent.replace(parameters=params)


def _init(self: DDIMScheduler, *args: Any, **kwargs: Any) -> None:
    gmm_config = {key: kwargs.pop(key, None) for key in GMM_CONFIG_DEFAULTS}
    kwargs.pop("previous_timestep", None)  # registered by the decorator; read from self.config
    # The parent's undecorated init: our decorator already registered the whole config.
    diffusers.DDIMScheduler.__init__.__wrapped__(self, *args, **kwargs)
    check_previous_timestep(self.config.previous_timestep)
    self.gmm_params = None
    self._gmm_by_device: dict[torch.device, GMM] = {}
    self._step_index_of: dict[int, int] = {}
    self._warned_eta_zero = False
    self._step_sigmas: dict[int, float | None] = {}
    if gmm_config["gmm_n_components"] is not None:
        hyperparameters_from_config(gmm_config).validate()


_init.__signature__ = _merged_signature(diffusers.DDIMScheduler.__init__, EXTRA_CONFIG_DEFAULTS)


def index_of_entry(values: torch.Tensor, entry: Any) -> int | None:
    """i where ``entry`` is the element values[i] itself (a view of it, as ``for t in
    scheduler.timesteps`` yields), found from the storage offset, without reading the value
    back from the device; None for anything else (a number, another tensor)."""
    if not isinstance(entry, torch.Tensor) or entry.dim() != 0 or values.dim() != 1 or values.stride(0) == 0:
        return None
    if entry.untyped_storage().data_ptr() != values.untyped_storage().data_ptr():
        return None
    i, rest = divmod(entry.storage_offset() - values.storage_offset(), values.stride(0))
    return i if rest == 0 and 0 <= i < values.shape[0] else None


def hyperparameters_from_config(config: Any) -> GMMHyperparameters:
    """The GMM hyperparameters stored in a scheduler config's gmm_* keys."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    values = {name: get(f"gmm_{name}") for name in _GMM_FIELDS}
    return GMMHyperparameters(**{k: v for k, v in values.items() if v is not None})


class DDIMScheduler(diffusers.DDIMScheduler):
    """diffusers' DDIMScheduler with an optional moment-matched GMM kernel (DDIM-GMM)."""

    __init__ = register_to_config(_init)

    def _register_as_given(self, **values: Any) -> None:
        """register_to_config, and drop the keys from ``_use_default_values``: ``from_config``
        skips the keys listed there, so a GMM installed after construction would be lost."""
        defaults = [key for key in self.config.get("_use_default_values", []) if key not in values]
        self.register_to_config(**values, _use_default_values=defaults)

    def set_gmm_params(self, gmm_params: GMM | None = None) -> None:
        """Use ``gmm_params`` for the kernel from now on (None: the plain Gaussian step again).

        Its hyperparameters go into the config, so ``from_config`` and ``save_pretrained`` keep
        them. Every check runs first: a refused GMM leaves the scheduler as it was.
        """
        if gmm_params is None:
            self._register_as_given(**GMM_CONFIG_DEFAULTS)
            self.gmm_params = None
            self._gmm_by_device = {}
            return
        if not isinstance(gmm_params, GMM):
            raise ValueError(f"gmm_params={gmm_params!r} is not allowed: pass a ddim_gmm_exp GMM or None")
        if not gmm_params.initialized:
            raise ValueError("gmm_params has no parameters yet: call gmm_params.initialize(...) first")
        if self._num_steps() is not None:
            gmm_params.check_num_steps(self._num_steps())
        self._register_as_given(**{f"gmm_{k}": v for k, v in gmm_params.state_dict().items()})
        self.gmm_params = gmm_params
        self._gmm_by_device = {gmm_params.device: gmm_params}

    def _num_steps(self) -> int | None:
        """The number of sampling steps after set_timesteps, else None."""
        return None if getattr(self, "num_inference_steps", None) is None else len(self.timesteps)

    def _checked_num_inference_steps(self, num_inference_steps: Any) -> int:
        """``num_inference_steps`` as an int (numpy integers allowed, as diffusers allows them)."""
        total = self.config.num_train_timesteps
        is_integer = isinstance(num_inference_steps, numbers.Integral) and not isinstance(
            num_inference_steps, bool | np.bool_
        )
        if not is_integer or not 1 <= num_inference_steps <= total:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r} is not allowed: it must be an integer in [1, {total}]"
            )
        return int(num_inference_steps)

    def _gmm_for_timesteps(self) -> GMM | None:
        """The installed GMM, else one built from the config's gmm_* keys (not installed yet)."""
        if self.gmm_params is not None or self.config.get("gmm_n_components") is None:
            return self.gmm_params
        return GMM().initialize(**dataclasses.asdict(hyperparameters_from_config(self.config)))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' timesteps; builds the GMM from the config if it was loaded from one.

        A refused call (bad count, or a GMM without a step for each timestep) leaves the
        scheduler as it was.
        """
        steps = self._checked_num_inference_steps(num_inference_steps)
        previous = (self.timesteps, self.num_inference_steps)
        super().set_timesteps(steps, device=device)
        try:
            gmm = self._gmm_for_timesteps()
            if gmm is not None:  # the length, not steps: "trailing" can give S + 1 timesteps
                gmm.check_num_steps(len(self.timesteps))
        except Exception:  # undo diffusers' part: a refused call must change nothing
            self.timesteps, self.num_inference_steps = previous
            raise
        self._step_sigmas = {}
        # host copies, read once here: step() looks timesteps up without reading the device
        self._timesteps_host = [int(t) for t in self.timesteps.tolist()]
        self._step_index_of = {t: i for i, t in reversed(list(enumerate(self._timesteps_host)))}
        if gmm is not self.gmm_params:
            self.gmm_params = gmm
            self._gmm_by_device = {gmm.device: gmm}

    @property
    def clipped_fraction(self) -> float | None:
        """Of the mixture steps run since set_timesteps, the mean fraction of coordinates whose
        component variance was clipped at 0 (sigma^2 < v_k); None before any GMM step. Computed
        here, from each step's recorded sigma, not on the sampling path."""
        if not self._step_sigmas or self.gmm_params is None:
            return None
        mixing = {i: float(sigma) for i, sigma in self._step_sigmas.items() if sigma is not None}
        if not mixing:
            return 0.0
        return float(np.mean([self.gmm_params.step_clipped_fraction(i, s) for i, s in mixing.items()]))

    def step_index_of(self, timestep: int | torch.Tensor) -> int:
        """Position of ``timestep`` in ``self.timesteps``: the GMM step index i.

        An element of ``self.timesteps`` itself (what ``for t in scheduler.timesteps`` yields) is
        found without reading its value back from the device; a number, or another tensor (read
        once, a host synchronisation on a GPU), is looked up by value.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        i = index_of_entry(self.timesteps, timestep)
        if i is not None:
            return i
        t = int(timestep)
        if t not in self._step_index_of:
            raise ValueError(
                f"timestep={t} is not one of the scheduler's timesteps {self._timesteps_host}: "
                "pass the timesteps of scheduler.timesteps"
            )
        return self._step_index_of[t]

    def _previous_abar(self, i: int) -> torch.Tensor:
        """abar at the step's target: diffusers' s = t - T // S, or the next listed timestep
        (sampling.previous_abar, the one copy of both rules, with diffusers' T and S)."""
        return previous_abar(
            self.alphas_cumprod,
            self._timesteps_host,
            i,
            self.final_alpha_cumprod,
            rule=self.config.previous_timestep,
            num_train_timesteps=self.config.num_train_timesteps,
            num_inference_steps=self.num_inference_steps,
        )

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
        """One DDIM or DDIM-GMM step from ``timestep`` to the previous timestep (config
        ``previous_timestep``); the GMM's step index is the position of ``timestep`` in
        ``self.timesteps``."""
        i = self.step_index_of(timestep)
        check_eta(eta)
        check_prediction_type(self.config.prediction_type)
        t = self._timesteps_host[i]
        abar_t = self.alphas_cumprod[t]
        abar_prev = self._previous_abar(i)
        gmm = self._gmm_on(model_output.device)
        if not self._warned_eta_zero:
            self._warned_eta_zero = warn_if_gmm_is_inert(gmm, eta)
        if variance_noise is not None and generator is not None and eta > 0:
            raise ValueError(
                "Cannot pass both generator and variance_noise. Please make sure that either "
                "`generator` or `variance_noise` stays `None`."
            )
        prev_sample, x0 = ddim_kernel_step(
            model_output,
            sample,
            abar_t,
            abar_prev,
            eta,
            generator=generator,
            gmm=gmm,
            step_index=i,
            num_steps=len(self.timesteps),
            z=variance_noise,
            prediction_type=self.config.prediction_type,
            use_clipped_model_output=use_clipped_model_output,
            **x0_options(self.config),
        )
        if gmm is not None:  # for clipped_fraction: the sigma of a mixing step (None for the others), once it ran
            mixes = gmm.mixes_at(i, len(self.timesteps), eta)
            self._step_sigmas[i] = ddim_sigma(abar_t, abar_prev, eta) if mixes else None  # read in clipped_fraction
        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


DDIMGMMScheduler = DDIMScheduler


# ---------------------------------------------------------------------------------------- RFIM

# Every config key RFIMScheduler adds to diffusers' FlowMatchEulerDiscreteScheduler -> default.
RFIM_CONFIG_DEFAULTS: dict[str, Any] = {"eta": 0.0, **GMM_CONFIG_DEFAULTS}


def _rfim_init(self: RFIMScheduler, *args: Any, **kwargs: Any) -> None:
    gmm_config = {key: kwargs.pop(key, None) for key in GMM_CONFIG_DEFAULTS}
    kwargs.pop("eta", None)  # registered by the decorator; read from self.config
    # The parent's undecorated init: our decorator already registered the whole config.
    diffusers.FlowMatchEulerDiscreteScheduler.__init__.__wrapped__(self, *args, **kwargs)
    check_flow_eta(self.config.eta)
    self.gmm_params = None
    self._gmm_by_device: dict[torch.device, GMM] = {}
    self._generator: Generators = None
    self._step_sigmas: dict[int, float | None] = {}
    if gmm_config["gmm_n_components"] is not None:
        hyperparameters_from_config(gmm_config).validate()


_rfim_init.__signature__ = _merged_signature(diffusers.FlowMatchEulerDiscreteScheduler.__init__, RFIM_CONFIG_DEFAULTS)


@dataclasses.dataclass
class RFIMSchedulerOutput(FlowMatchEulerDiscreteSchedulerOutput):
    """diffusers' flow-match output, plus x0_hat (None where diffusers' own step ran)."""

    pred_original_sample: torch.Tensor | None = None


class RFIMScheduler(diffusers.FlowMatchEulerDiscreteScheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler stepping with RFIM or RFIM-GMM (Gabbur 2026 section 4).

        scheduler = RFIMScheduler.from_config(pipe.scheduler.config, eta=0.2)
        scheduler.set_gmm_params(gmm_params=gmm)   # GMM().initialize(dim, n_components, n_steps)
        scheduler.set_generator(torch.Generator().manual_seed(0))
        pipe.scheduler = scheduler

    Config ``eta`` (sigma = eta * sigma_next, in [0, 1]) and the GMM's ``gmm_*`` keys survive
    ``from_config`` and ``save_pretrained``/``from_pretrained``. The step runs between the
    scheduler's own ``self.sigmas`` (SD3's shift, Flux's dynamic shifting, shift_terminal, Karras...
    all respected) at diffusers' ``step_index``, which is also the GMM's step index. With eta = 0
    and no GMM it is diffusers' Euler step bit for bit. Pipelines call ``step`` without a
    generator: the one from :meth:`set_generator` is used then. The step math is
    :func:`ddim_gmm_exp.flow.rfim_step`.
    """

    __init__ = register_to_config(_rfim_init)

    # the same config bookkeeping, GMM installation and placement and clipping report as DDIMScheduler's
    _register_as_given = DDIMScheduler._register_as_given
    _gmm_on = DDIMScheduler._gmm_on
    _gmm_for_timesteps = DDIMScheduler._gmm_for_timesteps
    _num_steps = DDIMScheduler._num_steps
    set_gmm_params = DDIMScheduler.set_gmm_params
    clipped_fraction = DDIMScheduler.clipped_fraction

    def set_eta(self, eta: float) -> None:
        """Use ``eta`` (in [0, 1]) from now on; it goes into the config."""
        check_flow_eta(eta)
        self._register_as_given(eta=float(eta))

    def set_generator(self, generator: Generators) -> None:
        """The generator (one, or one per sample) that ``step`` draws from when it is given none."""
        is_list = isinstance(generator, list | tuple) and all(isinstance(g, torch.Generator) for g in generator)
        if generator is not None and not isinstance(generator, torch.Generator) and not is_list:
            raise ValueError(
                f"generator={generator!r} is not allowed: pass a torch.Generator, a list of them "
                "(one per sample) or None"
            )
        self._generator = generator

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """diffusers' timesteps and sigmas; builds the GMM from the config if it was loaded from one.

        A refused call (a GMM without a step for each timestep) leaves the scheduler as it was.
        """
        names = ("timesteps", "sigmas", "num_inference_steps", "_step_index", "_begin_index")
        previous = {name: getattr(self, name, None) for name in names}
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        try:
            gmm = self._gmm_for_timesteps()
            if gmm is not None:
                gmm.check_num_steps(len(self.timesteps))
        except Exception:  # undo diffusers' part: a refused call must change nothing
            for name, value in previous.items():
                setattr(self, name, value)
            raise
        self._step_sigmas = {}
        self._sigmas_host = self.sigmas.tolist()  # read once here: step() branches on s = 0 without a read
        if gmm is not self.gmm_params:
            self.gmm_params = gmm
            self._gmm_by_device = {gmm.device: gmm}

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        """diffusers' first-step lookup, except that an element of ``self.timesteps`` itself is
        found from its storage offset, without reading it back from the device."""
        i = index_of_entry(self.timesteps, timestep) if self.begin_index is None else None
        if i is None:
            super()._init_step_index(timestep)
        else:
            self._step_index = i

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Generators = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> RFIMSchedulerOutput | tuple:
        """One RFIM or RFIM-GMM step from ``self.sigmas[i]`` to ``self.sigmas[i + 1]``, i = step_index.

        Computed in float32 (the sample is upcast, as diffusers does) and returned in the model
        output's dtype. ``generator`` (else the scheduler's own) draws z and the components.
        s_churn, s_tmin, s_tmax and s_noise are accepted and unused, as in diffusers.
        """
        eta = float(self.config.eta)
        gmm = self._gmm_on(model_output.device)
        if per_token_timesteps is not None or self.config.stochastic_sampling:
            if eta == 0 and gmm is None:  # diffusers' own variants, untouched
                return super().step(
                    model_output,
                    timestep,
                    sample,
                    generator=generator if generator is not None else self._generator,
                    per_token_timesteps=per_token_timesteps,
                    return_dict=return_dict,
                )
            raise ValueError(
                "per_token_timesteps and stochastic_sampling are diffusers' own steps: they are not allowed "
                f"with eta={eta} or a GMM (stochastic_sampling is RFIM with eta=1.0: set eta=1.0 instead)"
            )
        if isinstance(timestep, int) or isinstance(timestep, torch.IntTensor | torch.LongTensor):
            raise ValueError(
                f"timestep={timestep!r} is not allowed: pass one of scheduler.timesteps (a float), "
                "not an integer index from enumerate(timesteps)"
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        i, num_steps = self.step_index, len(self.timesteps)
        sample = sample.to(torch.float32)  # as diffusers: avoid precision issues in the update
        t, s = self.sigmas[i], self.sigmas[i + 1]
        noise, components = kernel_noise(
            sample.shape,
            generator if generator is not None else self._generator,
            device=sample.device,
            dtype=sample.dtype,
            gmm=gmm,
            step_index=i,
            num_steps=num_steps,
            eta=eta,
        )
        final = self._sigmas_host[i + 1] == 0
        prev_sample, x0 = rfim_step(
            model_output, sample, t, s, eta, noise, gmm=gmm, step_index=i, components=components, final=final
        )
        if gmm is not None:  # for clipped_fraction: the sigma of a mixing step (None for the others), once it ran
            self._step_sigmas[i] = rfim_sigma(s, eta) if gmm.mixes_at(i, num_steps, eta) else None
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)  # as diffusers: back to the model's dtype
        if not return_dict:
            return (prev_sample,)
        return RFIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
