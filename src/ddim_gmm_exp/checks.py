"""Every check on the user's input, each raising one ConfigError that names the bad value and
what is allowed. ``check_run`` needs only the resolved config and the output dir, and runs before
any model is loaded; ``check_model_fit`` checks what depends on the model family (classes, null
class, prompts, training timesteps, sample size) right after the adapter is built, before any
metric, kernel or sample is made.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from ddim_gmm_exp.baselines import check_scheduler_options
from ddim_gmm_exp.config import RunSpec, calls_per_evaluation
from ddim_gmm_exp.controls import IsotropicOffsetKernel
from ddim_gmm_exp.data import read_prompts, resolve_labels
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.gmm import GMMHyperparameters
from ddim_gmm_exp.noise import NOISE_DEVICES
from ddim_gmm_exp.samplers import (
    FAMILIES,
    ddim_scheduler,
    has_own_time_grid,
    model_calls,
    option_names,
    timesteps_are_sound,
    uses_spacing,
)
from ddim_gmm_exp.sampling import PREDICTION_TYPES, PREVIOUS_TIMESTEP_RULES, X0_HANDLINGS
from ddim_gmm_exp.sweep import check_summary_options, check_x_axis

SPACINGS = ("leading", "trailing", "linspace")
FID_FEATURES = (None, "model", "inception")
WANDB_MODES = ("offline", "online", "disabled")
RUN_CONFIG_FILE = "run_config.json"


def check_number(name: str, value: Any, minimum: float, maximum: float | None = None, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool) and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name}={value!r} is not allowed: it must be {kind} {allowed}")


def world_size(trainer: dict[str, Any]) -> int:
    """Ranks the trainer config asks for (devices x nodes); -1/'auto' devices count what exists."""
    devices = trainer.get("devices", 1)
    if devices in (-1, "auto", "-1"):
        devices = torch.cuda.device_count() if trainer.get("accelerator") in ("gpu", "cuda") else 1
    if isinstance(devices, list | tuple):
        devices = len(devices)
    return max(1, int(devices)) * int(trainer.get("num_nodes", 1))


# ----------------------------------------------------------------------------------- before the model


def check_run(spec: RunSpec, in_multirun: bool) -> None:
    """Everything that needs no model: data, sampler and its options, GMM, metrics, paths, ranks."""
    check_data(spec)
    check_variant(spec)
    check_sampler(spec)
    check_sampler_options(spec)
    check_unread_sampler_overrides(spec, in_multirun)
    check_gmm(spec, in_multirun)
    check_paths_and_metrics(spec)
    check_logger(spec)
    check_summary_axis(spec)
    check_trainer(spec)
    ranks = world_size(spec.output.trainer)
    if spec.data.num_samples < ranks:
        raise ConfigError(
            f"data.num_samples={spec.data.num_samples} is fewer than the {ranks} ranks of the trainer: "
            f"sample at least {ranks}"
        )


def check_data(spec: RunSpec) -> None:
    data = spec.data
    check_paper_num_samples(spec)
    check_number("data.batch_size", data.batch_size, 1, integer=True)
    check_number("data.num_samples", data.num_samples, 1, integer=True)
    check_number("data.seed", data.seed, 0, integer=True)
    if isinstance(data.labels, str) and data.labels != "balanced":
        raise ConfigError(f"data.labels={data.labels!r} is not allowed: use 'balanced', a list of class ids, or null")
    read_prompts(data.prompts_file)  # readable and not empty
    if data.noise_device not in NOISE_DEVICES:
        raise ConfigError(
            f"data.noise_device={data.noise_device!r} is not allowed: choose one of {', '.join(NOISE_DEVICES)}"
        )


def check_nfe_budget(spec: RunSpec) -> None:
    """nfe (a budget of model evaluations per sample) chooses the steps: it must be a positive
    integer that one step fits in, and it is not given together with sampler.steps."""
    sampler = spec.sampler
    if sampler.nfe_budget is None:
        return
    check_number("nfe", sampler.nfe_budget, 1, integer=True)
    steps_given = [o for o in spec.output.overrides if o.lstrip("+~").split("=", 1)[0] == "sampler.steps"]
    if steps_given:
        raise ConfigError(
            f"nfe={sampler.nfe_budget} and {steps_given[0]} are both given: nfe chooses the steps (the most "
            "that fit in that many model evaluations per sample); give one of them"
        )
    if sampler.steps < 1:
        conditional = spec.data.labels is not None or spec.data.prompts_file
        per_call = calls_per_evaluation(sampler.guidance_scale, conditional)
        one_step = model_calls(sampler.function, 1, sampler.options, sampler.timestep_spacing) * per_call
        guided = f" under guidance {sampler.guidance_scale:g}" if per_call == 2 else ""
        raise ConfigError(
            f"nfe={sampler.nfe_budget} is fewer than one step of sampler={sampler.name} takes ({one_step} model "
            f"evaluations per sample{guided}): use nfe >= {one_step}"
        )


def check_sampler(spec: RunSpec) -> None:
    sampler, model = spec.sampler, spec.model
    check_nfe_budget(spec)
    check_number("sampler.steps", sampler.steps, 1, integer=True)
    check_number("sampler.guidance_scale", sampler.guidance_scale, 0)
    if sampler.family not in FAMILIES:
        raise ConfigError(f"sampler.family={sampler.family!r} is not allowed: choose one of {FAMILIES}")
    if sampler.family != model.family:
        hint = "sampler=rfim or rfim_gmm" if model.family == "flow" else "sampler=ddim or ddim_gmm"
        raise ConfigError(
            f"sampler={sampler.name} walks a {sampler.family} schedule but model={model.name} is a "
            f"{model.family} model: use {hint}"
        )
    sigma_grid = sampler.family == "diffusion" and not uses_spacing(sampler.function)
    if sigma_grid and sampler.timestep_spacing is not None:
        raise ConfigError(
            f"sampler.timestep_spacing={sampler.timestep_spacing!r} is not used by sampler={sampler.name}: "
            "it walks its own sigma grid; leave it null"
        )
    if sampler.family == "diffusion" and not sigma_grid and sampler.timestep_spacing not in SPACINGS:
        raise ConfigError(
            f"sampler.timestep_spacing={sampler.timestep_spacing!r} is not allowed: choose one of {SPACINGS}"
        )
    own_grid = has_own_time_grid(sampler.function)
    if own_grid and sampler.x0_handling is not None:
        raise ConfigError(
            f"sampler.x0_handling={sampler.x0_handling!r} is not used by sampler={sampler.name}: it steps "
            "with its scheduler's own rules (the model's scheduler config); leave it out"
        )
    if sampler.family == "diffusion" and not own_grid and sampler.x0_handling not in X0_HANDLINGS:
        raise ConfigError(
            f"sampler.x0_handling={sampler.x0_handling!r} is not allowed: choose one of {', '.join(X0_HANDLINGS)}"
        )
    if sampler.family == "flow" and sampler.x0_handling is not None:
        raise ConfigError(
            f"sampler.x0_handling={sampler.x0_handling!r} is not used by sampler={sampler.name}: "
            "the flow step clips nothing; leave it out"
        )
    # where a DDIM step lands: the DDIM family's yamls say listed; the others leave it out (None)
    walks_ddim_steps = sampler.family == "diffusion" and not own_grid
    if not walks_ddim_steps and sampler.previous_timestep is not None:
        raise ConfigError(
            f"sampler.previous_timestep={sampler.previous_timestep!r} is not used by sampler={sampler.name}: "
            "it steps on its own time grid, not DDIM's; leave it out"
        )
    if walks_ddim_steps and sampler.previous_timestep not in PREVIOUS_TIMESTEP_RULES:
        raise ConfigError(
            f"sampler.previous_timestep={sampler.previous_timestep!r} is not allowed: choose one of "
            f"{', '.join(PREVIOUS_TIMESTEP_RULES)}"
        )
    if sampler.family == "flow" and sampler.timestep_spacing is not None:
        raise ConfigError(
            f"sampler.timestep_spacing={sampler.timestep_spacing!r} is not used by sampler={sampler.name}: "
            "flow models walk their own time grid; leave it null"
        )
    allowed = [name for name in option_names(sampler.function) if name != "gmm"]
    for name, value in sampler.options.items():
        if name not in allowed:
            raise ConfigError(
                f"sampler.{name}={value!r} is not an option of sampler={sampler.name}: "
                f"its options are {', '.join(allowed) or 'none'}"
            )
    if "scheduler" in allowed:
        try:
            check_scheduler_options(
                sampler.options.get("scheduler", "DDPMScheduler"), sampler.options.get("scheduler_options")
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err


def option_key(spec: RunSpec, option: str) -> str:
    """The key a user sets for a sampler option: gmm.scale for the control's scale, else sampler.NAME."""
    key = spec.sampler.gmm_options.get(option)
    return f"gmm.{key}" if key is not None else f"sampler.{option}"


def check_sampler_options(spec: RunSpec) -> None:
    """The values of the sampler's options: eta, and the control's offset size and last-step rule
    (checked by building the control's kernel, the code that uses them)."""
    sampler, options = spec.sampler, spec.sampler.options
    if "eta" in options:
        # the flow samplers interpolate between the Euler step and the marginal: eta in [0, 1]
        maximum = 1.0 if sampler.family == "flow" else None
        check_number(option_key(spec, "eta"), options["eta"], 0, maximum)
    if "last_step" in options and not isinstance(options["last_step"], bool):
        raise ConfigError(
            f"{option_key(spec, 'last_step')}={options['last_step']!r} is not allowed: it must be true or false"
        )
    if "scale" in options:
        try:
            IsotropicOffsetKernel(options["scale"], bool(options.get("last_step", False)))
        except ValueError as err:
            raise ConfigError(f"{option_key(spec, 'scale')}: {err} (sampler={sampler.name}'s offset size)") from err


def check_unread_sampler_overrides(spec: RunSpec, in_multirun: bool) -> None:
    """A sampler.NAME override that the sampler does not take is an error in a single run; in a
    sweep the job repeats the one without it and is skipped (sweeper.check_batch refuses a NAME
    that no job of the sweep takes)."""
    sampler = spec.sampler
    if sampler.unread_overrides and not in_multirun:
        key, _, value = sampler.unread_overrides[0].lstrip("+~").partition("=")
        allowed = [name for name in option_names(sampler.function) if name != "gmm"]
        raise ConfigError(
            f"{key}={value} is not an option of sampler={sampler.name}: its options are {', '.join(allowed) or 'none'}"
        )


def check_paper_num_samples(spec: RunSpec) -> None:
    """paper_num_samples (set by experiment=paper_*): a positive integer, or null."""
    if spec.output.paper_num_samples is not None:
        check_number("paper_num_samples", spec.output.paper_num_samples, 1, integer=True)


def check_variant(spec: RunSpec) -> None:
    """A conf/variant file names its sampler: a sampler= override that contradicts it is refused
    (Hydra lets the command line's sampler= win silently)."""
    variant = spec.output.named_variant
    if variant and variant.get("sampler") != spec.sampler.name:
        raise ConfigError(
            f"variant={variant['name']} runs sampler={variant['sampler']} but sampler={spec.sampler.name} "
            "was also given: drop one of them"
        )


def check_summary_axis(spec: RunSpec) -> None:
    """summary.* is read only when the sweep ends: a bad value is refused before its jobs sample."""
    check_x_axis(spec.output.summary_x)
    check_summary_options(spec.output.summary_reference, spec.output.summary_select_on)


def check_trainer(spec: RunSpec) -> None:
    trainer = spec.output.trainer
    if str(trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={trainer.get('accelerator')!r} but no GPU was found: use trainer=cpu "
            "(or trainer=ddp_sim for 2 CPU ranks)"
        )


def check_gmm(spec: RunSpec, in_multirun: bool) -> None:
    """A GMM sampler's kernel settings; gmm.* set for a sampler without a GMM is an error in a
    single run (in a sweep such jobs repeat another job's samples and are skipped instead)."""
    sampler = spec.sampler
    if sampler.uses_gmm:
        known = [f.name for f in dataclasses.fields(GMMHyperparameters) if f.name not in ("dim", "n_steps")]
        unknown = [key for key in sampler.gmm if key not in known]
        if unknown:
            raise ConfigError(
                f"gmm.{unknown[0]}={sampler.gmm[unknown[0]]!r} is not a GMM setting: "
                f"the settings are {', '.join(known)}"
            )
        try:
            GMMHyperparameters(dim=1, n_steps=1, **sampler.gmm).validate(with_dim=False)
        except ValueError as err:
            raise ConfigError(f"gmm: {err}") from err
    elif sampler.gmm_overrides and not in_multirun:
        raise ConfigError(
            f"{sampler.gmm_overrides[0]} is set but sampler={sampler.name} uses no GMM: add sampler=ddim_gmm "
            "(or a GMM variant, e.g. variant=ortho_vub), or drop the gmm.* override"
        )


def check_paths_and_metrics(spec: RunSpec) -> None:
    model, metrics = spec.model, spec.metrics
    if model.path is not None and not Path(model.path).exists():
        raise ConfigError(f"model.path={model.path!r} does not exist: give a local model directory or a hub id")
    if metrics.fid_features not in FID_FEATURES:
        raise ConfigError(
            f"metrics.fid.features={metrics.fid_features!r} is not allowed: choose 'model' or 'inception'"
        )
    if metrics.fid_enabled and metrics.fid_features == "model" and model.features is None:
        raise ConfigError(
            f"metrics.fid.features='model' but model={model.name} brings no feature "
            "extractor: use metrics.fid.features=inception"
        )
    if metrics.fid_reference is not None and not Path(metrics.fid_reference).exists():
        raise ConfigError(
            f"metrics.fid.reference={metrics.fid_reference!r} does not exist: give an .npz with mu and sigma "
            "(EDM's, ADM's, scripts/fid_stats.py's), an ADM reference batch (.npz with arr_0) or a folder of images"
        )
    if metrics.fid_weights_path is not None and not Path(metrics.fid_weights_path).is_file():
        raise ConfigError(
            f"metrics.fid.weights_path={metrics.fid_weights_path!r} does not exist: give the local Inception "
            "weights file (weights-inception-2015-12-05-6726825d.pth)"
        )
    check_number("metrics.fid.min_samples", metrics.fid_min_samples, 2, integer=True)
    # a covariance needs two samples; fewer than the feature dimension make it singular (a warning
    # when the statistics are computed)
    check_number("metrics.fid.reference_samples", metrics.fid_reference_samples, 2, integer=True)
    check_diversity_settings(spec)
    check_dinov2(spec)
    check_inception_resize(spec)


# the factory of metrics=inception's Inception Score: it resizes like FID's Inception (metrics.fid.antialias)
INCEPTION_SCORE_FACTORY = "ddim_gmm_exp.metrics.inception_score_extra"


def reads_inception_resize(factory: dict[str, Any]) -> bool:
    """Whether a metrics.extra factory scores with Inception-v3 itself (the Inception Score without
    a classifier of its own), so that metrics.fid.antialias decides its resize too."""
    return factory.get("_target_") == INCEPTION_SCORE_FACTORY and factory.get("logits") is None


def check_inception_resize(spec: RunSpec) -> None:
    """metrics.fid.antialias: true or false, and false only where Inception resizes the images (FID
    in Inception features, or an Inception Score); the default true is never refused."""
    metrics, model = spec.metrics, spec.model
    if not isinstance(metrics.fid_antialias, bool):
        raise ConfigError(
            f"metrics.fid.antialias={metrics.fid_antialias!r} is not allowed: it must be true (antialiased "
            "resize, torchmetrics' default) or false (TF 1.x's resize, as ADM's and EDM's statistics)"
        )
    if metrics.fid_antialias:
        return
    features = metrics.fid_features or ("model" if model.features is not None else "inception")
    extras = [m for m in {**model.extra_metrics, **metrics.extra}.values() if m.get("enabled", True)]
    scores_inception = any(reads_inception_resize(m.get("factory") or {}) for m in extras)
    if (metrics.fid_enabled and features == "inception") or scores_inception:
        return
    if metrics.fid_enabled:
        raise ConfigError(
            f"metrics.fid.antialias=false is not used by model={model.name}'s own features "
            "(metrics.fid.features=model): it applies to Inception's resize; use metrics.fid.features=inception "
            "or drop it"
        )
    raise ConfigError(
        "metrics.fid.antialias=false is not used: metrics.fid.enabled=false and no Inception Score is computed "
        "(it applies to Inception's resize); enable FID in Inception features or drop it"
    )


def check_dinov2(spec: RunSpec) -> None:
    """metrics=dinov2: a local Dinov2Model directory, an existing reference, and FID on (the space
    is computed beside FID's); its settings without metrics=dinov2 are not used."""
    metrics = spec.metrics
    given = [o for o in spec.output.overrides if re.match(r"^\+*metrics\.dinov2\.(?!enabled=)", o)]
    if given and not metrics.dinov2_enabled:
        raise ConfigError(f"{given[0]} is set but DINOv2 features are not computed: add metrics=dinov2")
    if not metrics.dinov2_enabled:
        return
    if not metrics.fid_enabled:
        raise ConfigError(
            "metrics=dinov2 is computed beside FID but metrics.fid.enabled=false: enable FID or drop metrics=dinov2"
        )
    if metrics.dinov2_path is None:
        raise ConfigError(
            "metrics=dinov2 needs metrics.dinov2.path=DIR: a local transformers Dinov2Model directory "
            "(save_pretrained of e.g. facebook/dinov2-base; no download is made)"
        )
    if not Path(metrics.dinov2_path).is_dir():
        raise ConfigError(
            f"metrics.dinov2.path={metrics.dinov2_path!r} is not a directory: give a local transformers "
            "Dinov2Model directory (save_pretrained; no download is made)"
        )
    if metrics.dinov2_reference is not None and not Path(metrics.dinov2_reference).exists():
        raise ConfigError(
            f"metrics.dinov2.reference={metrics.dinov2_reference!r} does not exist: give a folder of real images "
            "or an .npz made in DINOv2 features, or null"
        )


def check_diversity_settings(spec: RunSpec) -> None:
    """metrics.prdc.* and metrics.kid.*: valid numbers, and set only where the run computes them
    (in FID's features, so not with FID disabled; not with their own metric disabled)."""
    metrics = spec.metrics
    check_number("metrics.prdc.k", metrics.prdc_k, 1, integer=True)
    check_number("metrics.prdc.max_samples", metrics.prdc_max_samples, 2, integer=True)
    check_number("metrics.kid.subsets", metrics.kid_subsets, 1, integer=True)
    if metrics.kid_subset_size is not None:
        check_number("metrics.kid.subset_size", metrics.kid_subset_size, 2, integer=True)
    for group, enabled in (("prdc", metrics.prdc_enabled), ("kid", metrics.kid_enabled)):
        given = [o for o in spec.output.overrides if re.match(rf"^\+*metrics\.{group}\.(?!enabled=)", o)]
        if given and not metrics.fid_enabled:
            raise ConfigError(
                f"{given[0]} is set but metrics.fid.enabled=false: {group} is computed in FID's features, "
                "alongside FID; enable FID or drop the override"
            )
        if given and not enabled:
            raise ConfigError(f"{given[0]} is set but metrics.{group}.enabled=false: enable it or drop the override")


def check_logger(spec: RunSpec) -> None:
    logger = spec.output.logger
    if str(logger.get("_target_", "")).endswith("WandbLogger") and logger.get("mode") not in WANDB_MODES:
        raise ConfigError(f"logger.mode={logger.get('mode')!r} is not allowed: choose one of {', '.join(WANDB_MODES)}")


def indices_to_sample(spec: RunSpec) -> tuple[list[int], list[int]]:
    """(to sample, already on disk). A fresh run refuses an output dir that holds samples; a
    resumed one must have the saved run's fingerprint and at least as many samples left as ranks."""
    output_dir, num_samples = spec.output.output_dir, spec.data.num_samples
    sample_dir = output_dir / "samples"
    existing = (
        {int(p.stem) for p in sample_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png")} if sample_dir.is_dir() else set()
    )
    fingerprint_file = output_dir / RUN_CONFIG_FILE
    if spec.output.resume:
        if fingerprint_file.is_file():
            saved, fingerprint = json.loads(fingerprint_file.read_text()), json.loads(json.dumps(spec.fingerprint()))
            if saved != fingerprint:
                changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
                raise ConfigError(
                    f"resume=true but {output_dir} holds a run of another config (differs in {changed}): "
                    "drop the overrides that differ (the run's own are restored) or pick a new output dir"
                )
        elif existing:
            raise ConfigError(
                f"resume=true but {output_dir} has samples and no {RUN_CONFIG_FILE}: cannot check its config"
            )
    elif existing:
        raise ConfigError(
            f"{sample_dir} already holds {len(existing)} samples: pass resume=true to finish that run, "
            "or choose another hydra.run.dir (nothing was overwritten)"
        )
    done = sorted(i for i in existing if i < num_samples)
    todo = [i for i in range(num_samples) if i not in existing]
    ranks = world_size(spec.output.trainer)
    if 0 < len(todo) < ranks:
        raise ConfigError(
            f"only {len(todo)} samples are left to resume, fewer than the {ranks} ranks of the "
            "trainer: resume with trainer=cpu (or fewer devices)"
        )
    return todo, done


# ----------------------------------------------------------------------------------- with the model


def check_model_fit(spec: RunSpec, adapter: Any) -> None:
    """What depends on the model family: labels, guidance's null class, prediction type, the number
    of training timesteps, and the GMM's size against the sample size."""
    sampler, model = spec.sampler, spec.model
    if adapter.family != model.family:
        raise ConfigError(
            f"model={model.name} says family={model.family!r} but its adapter {type(adapter).__name__} is a "
            f"{adapter.family} model: set family: {adapter.family} in conf/model/{model.name}.yaml"
        )
    labels = resolve_labels(spec.data.labels, adapter.num_classes)
    if labels is not None and sampler.guidance_scale not in (0, 1) and adapter.null_label is None:
        raise ConfigError(
            f"sampler.guidance_scale={sampler.guidance_scale} needs a null class, and "
            f"model={model.name} has none: use sampler.guidance_scale=1.0"
        )
    unconditional = labels is None or sampler.guidance_scale == 0  # the null class stands in for the label
    if adapter.num_classes and unconditional and adapter.null_label is None:
        why = "data.labels=null" if labels is None else "sampler.guidance_scale=0"
        raise ConfigError(
            f"{why} samples unconditionally, and model={model.name} is class-conditional with no null class: "
            "give data.labels (e.g. balanced) and a guidance scale other than 0, or name its null class "
            "(+model.adapter.null_class=N)"
        )
    prediction_type = adapter.scheduler_config.get("prediction_type", "epsilon")
    if sampler.family == "diffusion" and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"the model's prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    total = int(adapter.scheduler_config.get("num_train_timesteps", 1000))
    if sampler.family == "diffusion" and sampler.steps > total:
        raise ConfigError(
            f"sampler.steps={sampler.steps} is not allowed: the model was trained with {total} "
            f"timesteps, so steps must lie in [1, {total}]"
        )
    if sampler.family == "diffusion" and sampler.timestep_spacing is not None:
        check_timesteps(spec, adapter.scheduler_config, total)
    if sampler.uses_gmm:
        try:
            GMMHyperparameters(dim=adapter.dim, n_steps=sampler.steps, **sampler.gmm).validate()
        except ValueError as err:
            raise ConfigError(f"gmm: {err} (model={model.name} samples D={adapter.dim})") from err


def check_timesteps(spec: RunSpec, scheduler_config: dict[str, Any], total: int) -> None:
    """The spacing's timesteps for sampler.steps must be S distinct ones in [0, T - 1]; where they
    are not, the message names the nearest step counts that are."""
    steps, spacing = spec.sampler.steps, spec.sampler.timestep_spacing

    def sound(s: int) -> bool:
        return timesteps_are_sound(ddim_scheduler(scheduler_config, spacing, s).timesteps.tolist(), s, total)

    if sound(steps):
        return
    below = next((s for s in range(steps - 1, 0, -1) if sound(s)), None)
    above = next((s for s in range(steps + 1, total + 1) if sound(s)), None)
    nearest = " or ".join(str(s) for s in (below, above) if s is not None)
    raise ConfigError(
        f"sampler.steps={steps} is not allowed with sampler.timestep_spacing={spacing!r}: diffusers lists "
        f"timesteps outside [0, {total - 1}] or not {steps} of them for it; use sampler.steps={nearest}"
    )


def check_prompts_for_metrics(metrics_need_prompts: bool, has_prompts: bool, model_name: str) -> None:
    if metrics_need_prompts and not has_prompts:
        raise ConfigError(
            f"a metric needs prompts (CLIP score) but model={model_name} samples none: "
            "drop it (metrics=default) or use a text-to-image model with data.prompts_file"
        )
