"""One run, as a straight line: resolve -> check -> build -> predict -> report.

    cfg --config.resolve_run--> RunSpec --checks--> adapter, sampling plan, metrics, trainer
    --Trainer.predict (sharded over ranks)--> SamplingModule --> callbacks.ReportResults

The composed config is read once, by :func:`ddim_gmm_exp.config.resolve_run`; nothing below
this module sees it. Every check on the user's input is in :mod:`ddim_gmm_exp.checks`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ddim_gmm_exp import checks
from ddim_gmm_exp.callbacks import FinishWandb, ImagesPerSecondBar, ReportResults, finish_wandb
from ddim_gmm_exp.config import MetricsSpec, ModelSpec, RunSpec, resolve_run, sweep_group, sweep_job
from ddim_gmm_exp.dashboard import logged_config, run_tags
from ddim_gmm_exp.data import SampleIndexDataset, read_prompts, resolve_labels
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.gmm import GMM, variant_name
from ddim_gmm_exp.images import png_path
from ddim_gmm_exp.metrics import (
    DINOv2Features,
    DiversitySettings,
    FeatureSpace,
    MetricSuite,
    cached_reference,
    check_reference,
    diversity_problem,
    feature_dim,
    holds_images,
    inception_extractor,
    kid_subset_size,
    load_reference,
    load_reference_features,
    reference_file_for,
)
from ddim_gmm_exp.models.base import ModelAdapter
from ddim_gmm_exp.module import SamplingModule, SamplingPlan
from ddim_gmm_exp.samplers import (
    DiffusionSchedule,
    FlowSchedule,
    Schedule,
    ddim_scheduler,
    has_own_time_grid,
    kernel_sigmas,
    warn_if_spacing_differs,
)
from ddim_gmm_exp.sampling import warn_if_gmm_is_inert
from ddim_gmm_exp.sweeper import planned_job

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
OVERRIDES_FILE = "run_overrides.json"
WANDB_ID_FILE = "wandb_run_id.txt"
DEFAULT_PROMPTS = Path(__file__).parent / "assets" / "prompts.txt"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample, score and report one composed config; returns the results (also in results.json)."""
    return run_spec(resolve_run(cfg, task_overrides(), sweep_group(), sweep_job()))


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """Sample, score and report one resolved run."""
    started = time.time()
    checks.check_run(spec, in_multirun=spec.output.sweep_group is not None)
    original = earlier_job(spec, "duplicate_of")
    if original is not None:
        return skip_as_duplicate(spec, original)
    todo, done = checks.indices_to_sample(spec)
    log.info("output dir: %s", spec.output.output_dir)

    adapter = build_adapter(spec.model)
    checks.check_model_fit(spec, adapter)
    prompts = prompts_for(spec, adapter)
    metrics, notes = build_metrics(spec.metrics, spec.model, adapter, spec.data.num_samples, spec.data.seed)
    checks.check_prompts_for_metrics(metrics.needs_prompts, prompts is not None, spec.model.name)
    todo, done, samples_from = reuse_samples(spec, todo, done)
    plan = build_plan(spec, adapter, prompts, done)
    write_run_files(spec)

    meta = run_metadata(spec, plan, notes, samples_from)
    reporter = ReportResults(spec.output.output_dir, meta, started)
    trainer = build_trainer(spec, reporter)
    config = logged_config(spec.output.loggable, meta["settings"], meta["variant"])
    module = SamplingModule(adapter, plan, metrics, config=config)
    log.info(
        "sampling %d of %d samples (%d already on disk) with %s, %d steps",
        len(todo),
        spec.data.num_samples,
        len(done),
        spec.sampler.name,
        plan.schedule.num_steps,
    )
    predict(spec, trainer, module, reporter, todo)
    if trainer.global_rank != 0:  # plain ddp runs this function on every rank; rank 0 reports
        return {}
    results_file = spec.output.output_dir / RESULTS_FILE
    if not results_file.is_file():
        raise RuntimeError(f"the run ended without writing {results_file}")
    results = json.loads(results_file.read_text())
    log.info("results: %s", json.dumps(results["metrics"]))
    log.info("%s", speed_line(results))
    log.info("output dir: %s", spec.output.output_dir)
    return results


def predict(spec: RunSpec, trainer: Any, module: SamplingModule, reporter: ReportResults, todo: list[int]) -> None:
    """Trainer.predict over the indices still to sample; the W&B run is finished whatever happens,
    and an interrupted run says how to resume it."""
    warnings.filterwarnings("ignore", message="predict returned None")  # predict_step returns nothing on purpose
    loader = DataLoader(SampleIndexDataset(todo), batch_size=spec.data.batch_size, shuffle=False)
    failed = True
    try:
        if todo:
            trainer.predict(module, dataloaders=loader, return_predictions=False)
        else:
            module.score_without_sampling()
            reporter.report(module, trainer.logger)
        failed = False
    except BaseException:
        if spec.output.save_images:
            log.error("interrupted: resume with: python run.py resume=true hydra.run.dir=%s", spec.output.output_dir)
        raise
    finally:
        finish_wandb(error=failed)


def speed_line(results: dict[str, Any]) -> str:
    """The console's line on time: wall seconds, and images per second where this run sampled."""
    speed = results.get("images_per_second")
    rate = f", {speed:.1f} images/s sampling" if speed else " (nothing sampled in this run)"
    return f"{results.get('sampled_this_run', 0)} samples in {results['seconds']:.1f} s wall{rate}"


# ----------------------------------------------------------------------------------- hydra context


def task_overrides() -> list[str]:
    """This job's command-line (or sweeper) overrides; [] outside a Hydra job (tests calling run())."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


# ----------------------------------------------------------------------------------- sweeps


def earlier_job(spec: RunSpec, key: str) -> Path | None:
    """The dir of the earlier job that this sweep job repeats (``duplicate_of``) or shares samples
    with (``samples_of``), from the sweep's plan (sweeper.py, decided before any job started)."""
    job = planned_job(spec.output.sweep_dir, spec.output.job_num)
    if job is None or job.get(key) is None:
        return None
    original = planned_job(spec.output.sweep_dir, job[key])
    return Path(original["dir"]) if original is not None else None


def skip_as_duplicate(spec: RunSpec, original: Path) -> dict[str, Any]:
    """Record why this job did not run, and return the original job's results (once it has them)."""
    reason = f"same samples and metric settings as job {original.name}"
    if spec.sampler.gmm_overrides:
        reason += f": gmm.* does not apply to sampler={spec.sampler.name}, which uses no GMM"
    if spec.sampler.unread_overrides:
        names = ", ".join(o.lstrip("+~").split("=", 1)[0] for o in spec.sampler.unread_overrides)
        reason += f": {names} does not apply to sampler={spec.sampler.name}, which takes no such option"
    output_dir = spec.output.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "skipped.json").write_text(json.dumps({"skipped": reason, "same_as": str(original)}, indent=2))
    log.warning("skipped: %s", reason)
    results = original / RESULTS_FILE
    return json.loads(results.read_text()) if results.is_file() else {}


def reuse_samples(spec: RunSpec, todo: list[int], done: list[int]) -> tuple[list[int], list[int], Path | None]:
    """(to sample, on disk, source): a fresh sweep job whose samples an earlier, finished job made
    (with other metric settings) links that job's samples/ (PNGs and their variance-account
    records) and only scores them."""
    source = earlier_job(spec, "samples_of")
    if source is None or done or not spec.output.save_images or not (source / RESULTS_FILE).is_file():
        return todo, done, None
    indices = list(range(spec.data.num_samples))
    if not all(png_path(source / "samples", i).is_file() for i in indices):
        return todo, done, None
    link_tree(source / "samples", spec.output.output_dir / "samples")
    log.info("same samples as job %s (other metric settings): scoring its %d PNGs", source.name, len(indices))
    return [], indices, source


def link_tree(source: Path, target: Path) -> None:
    """Hard links of every file under source at the same place under target (copies across file systems)."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, destination)
            except OSError:
                shutil.copy2(path, destination)


# ----------------------------------------------------------------------------------- builders


def instantiate(node: dict[str, Any], **kwargs: Any) -> Any:
    """hydra.utils.instantiate, passing our ConfigErrors through unwrapped (one clear line)."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except hydra.errors.InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_adapter(model: ModelSpec) -> ModelAdapter:
    return instantiate(model.adapter)


def prompts_for(spec: RunSpec, adapter: ModelAdapter) -> list[str] | None:
    """The run's prompts: data.prompts_file, else the shipped defaults for a text-to-image model."""
    prompts = read_prompts(spec.data.prompts_file)
    if adapter.takes_prompts and prompts is None:
        prompts = read_prompts(str(DEFAULT_PROMPTS))
        log.info("no data.prompts_file: using the %d prompts of %s", len(prompts), DEFAULT_PROMPTS)
    return prompts


def build_schedule(spec: RunSpec, adapter: ModelAdapter) -> Schedule:
    """The time grid: the adapter's flow sigmas, or diffusers' DDIM timesteps with the run's spacing
    (stepping to the next listed timestep, right for every spacing)."""
    steps = spec.sampler.steps
    if spec.sampler.family == "flow":
        total = int(adapter.scheduler_config.get("num_train_timesteps", 1000))
        return FlowSchedule(
            sigmas=adapter.flow_sigmas(steps),
            num_train_timesteps=total,
            scheduler_config=dict(adapter.scheduler_config),
        )
    # a sampler on its own sigma grid (EDM, spacing null) takes the alpha-bars from this one alone
    warn_if_spacing_differs(adapter.scheduler_config, spec.sampler.timestep_spacing)
    scheduler = ddim_scheduler(adapter.scheduler_config, spec.sampler.timestep_spacing or "leading", steps)
    rule = spec.sampler.previous_timestep or "listed"  # None: a sampler that takes no DDIM steps
    return DiffusionSchedule.from_scheduler(scheduler, spec.sampler.x0_handling, adapter.scheduler_config, rule)


def build_gmm(spec: RunSpec, adapter: ModelAdapter, num_steps: int) -> GMM | None:
    """The mixture kernel, for a sampler that takes one: GMM hyperparameters from cfg.gmm as they are."""
    if not spec.sampler.uses_gmm:
        return None
    gmm = GMM().initialize(dim=adapter.dim, n_steps=num_steps, **spec.sampler.gmm)
    log.info("GMM kernel: %s", gmm)
    warn_if_gmm_is_inert(gmm, spec.sampler.options.get("eta", 0.0), stacklevel=2)
    return gmm


def build_plan(spec: RunSpec, adapter: ModelAdapter, prompts: list[str] | None, done: list[int]) -> SamplingPlan:
    schedule = build_schedule(spec, adapter)
    guidance = float(spec.sampler.guidance_scale)
    labels = resolve_labels(spec.data.labels, adapter.num_classes)
    if guidance == 0:  # out_u + 0 (out_c - out_u): the unconditional model, run as such
        labels = None
    if labels is not None and spec.data.num_samples % len(labels):
        log.warning(
            "data.num_samples=%d is not a multiple of the %d labels: the first %d get one sample more",
            spec.data.num_samples,
            len(labels),
            spec.data.num_samples % len(labels),
        )
    return SamplingPlan(
        sampler=spec.sampler.function,
        schedule=schedule,
        options=dict(spec.sampler.options),
        gmm=build_gmm(spec, adapter, schedule.num_steps),
        guidance_scale=guidance,
        base_seed=spec.data.seed,
        labels=labels,
        prompts=prompts,
        sample_dir=spec.output.output_dir / "samples" if spec.output.save_images else None,
        resumed_indices=done,
        noise_device=spec.data.noise_device,
    )


def build_metrics(
    metrics: MetricsSpec, model: ModelSpec, adapter: ModelAdapter, num_samples: int, seed: int
) -> tuple[MetricSuite, dict[str, Any]]:
    """FID, PRDC and KID in one feature space against their references (skipped, with a note, below
    min_samples; PRDC and KID also where the reference holds no features) and the extra metrics;
    returns the suite and what results.json says about them."""
    notes: dict[str, Any] = {}
    extractor = reference = reference_file = reference_features = None
    if metrics.fid_enabled and num_samples < metrics.fid_min_samples:
        notes["fid_skipped"] = (
            f"data.num_samples={num_samples} is below metrics.fid.min_samples={metrics.fid_min_samples}: "
            "FID on fewer samples is not reported"
        )
        log.warning("FID skipped: %s", notes["fid_skipped"])
    elif metrics.fid_enabled:
        extractor, reference_file = fid_reference(metrics, model, adapter)
        reference = load_reference(reference_file)
        check_reference(*reference, feature_dim(extractor), f"in {str(reference_file)!r}")
        reference_features = load_reference_features(reference_file)
    diversity = DiversitySettings(
        prdc=metrics.prdc_enabled,
        prdc_k=metrics.prdc_k,
        prdc_max_samples=metrics.prdc_max_samples,
        kid=metrics.kid_enabled,
        kid_subsets=metrics.kid_subsets,
        kid_subset_size=metrics.kid_subset_size,
    )
    extra_spaces = []
    if extractor is not None:
        notes |= diversity_notes(diversity, reference_file, reference_features, num_samples)
        if metrics.dinov2_enabled:
            space = dinov2_space(metrics, model, adapter)
            notes |= diversity_notes(diversity, space.reference_file, space.reference_features, num_samples, "_dinov2")
            extra_spaces.append(space)
    extras = {}
    for name, metric in {**model.extra_metrics, **metrics.extra}.items():
        if metric.get("enabled", True):
            # the Inception Score resizes as FID's Inception does: passed here, not interpolated in its yaml,
            # so that the extras' settings (and scores fingerprints) of earlier runs stay as they were
            resize = {"antialias": metrics.fid_antialias} if checks.reads_inception_resize(metric["factory"]) else {}
            extras[name] = instantiate(metric["factory"], adapter=adapter, **resize)
    suite = MetricSuite(
        extractor,
        reference,
        fid_name=model.fid_name,
        extras=extras,
        seed=seed,
        reference_features=reference_features,
        diversity=diversity,
        weights_path=metrics.fid_weights_path,
        extra_spaces=extra_spaces,
    )
    return suite, notes


def dinov2_space(metrics: MetricsSpec, model: ModelSpec, adapter: ModelAdapter) -> FeatureSpace:
    """FD, PRDC and KID in DINOv2's features (metrics=dinov2): the reference is metrics.dinov2.reference
    (an image folder, an .npz made in these features, or an ADM reference batch), else
    metrics.fid.reference where it is images (a folder or an ADM batch), else the family's real images;
    images are featurised once and cached."""
    extractor = DINOv2Features(metrics.dinov2_path)
    given, setting = metrics.dinov2_reference, "metrics.dinov2.reference"
    if given is None and metrics.fid_reference is not None and holds_images(metrics.fid_reference):
        given, setting = metrics.fid_reference, "metrics.fid.reference"
    if given is not None:  # a folder, statistics in these features, or an ADM batch (metrics.reference_file_for)
        path = reference_file_for(given, extractor, metrics.cache_dir, setting=setting)
    else:
        key = json.dumps(model.fingerprint, sort_keys=True)
        path = cached_reference(adapter, extractor, key, metrics.cache_dir, metrics.fid_reference_samples)
    reference = load_reference(path)
    check_reference(*reference, feature_dim(extractor), f"in {str(path)!r} (DINOv2 features)")
    features = load_reference_features(path)
    return FeatureSpace(extractor, reference, "fd_dinov2", "_dinov2", features, reference_file=path)


def diversity_notes(
    diversity: DiversitySettings, reference_file: Path, reference_features: Any, num_samples: int, suffix: str = ""
) -> dict[str, Any]:
    """results.json's record of PRDC and KID in a feature space (suffix: "" the run's own,
    "_dinov2"): their settings and the reference's features file, or why they are skipped (a
    reference of mu and sigma only); a ConfigError, before sampling, for settings the sample counts
    cannot meet."""
    if not (diversity.prdc or diversity.kid):
        return {}
    if suffix:  # another space: its reference and whether it has features (the settings are shared)
        notes = diversity_notes(diversity, reference_file, reference_features, num_samples)
        renamed = {
            "diversity_skipped": f"diversity{suffix}_skipped",
            "reference_features_file": f"reference_features{suffix}_file",
        }
        return {renamed[key]: value for key, value in notes.items() if key in renamed}
    if reference_features is None:
        note = (
            f"the FID reference {str(reference_file)!r} holds mu and sigma only: precision/recall, density/coverage "
            "and KID need the real images' features (an image folder, the family's own reference, or an .npz "
            "with 'features': scripts/fid_stats.py --images makes one of a folder or an ADM batch's arr_0)"
        )
        log.warning("PRDC/KID skipped: %s", note)
        return {"diversity_skipped": note}
    problem = diversity_problem(diversity, len(reference_features), num_samples)
    if problem is not None:
        raise ConfigError(problem)
    notes: dict[str, Any] = {"reference_features_file": str(reference_file)}
    if diversity.prdc:
        notes["prdc_k"] = diversity.prdc_k
        # equal sets (metrics.prdc_samples): the first n generated, as many reference samples
        notes["prdc_samples"] = min(len(reference_features), num_samples, diversity.prdc_max_samples)
    if diversity.kid:
        notes["kid_subsets"] = diversity.kid_subsets
        notes["kid_subset_size"] = kid_subset_size(diversity.kid_subset_size, len(reference_features), num_samples)
    return notes


def fid_reference(metrics: MetricsSpec, model: ModelSpec, adapter: ModelAdapter) -> tuple[Any, Path]:
    """The feature extractor (a module, or 2048 for Inception with torchmetrics' resize; a module for
    TF 1.x's, metrics.fid.antialias=false: metrics.inception_extractor) and the reference .npz: a given
    reference (statistics, or an image folder's or ADM batch's: metrics.reference_file_for), the
    family's shipped one, or one of the family's real images, computed once and cached (images
    keep their features too)."""
    features = metrics.fid_features or ("model" if model.features is not None else "inception")
    if features == "model":
        extractor = instantiate(model.features)
    else:
        extractor = inception_extractor(2048, metrics.fid_weights_path, metrics.fid_antialias)
    shipped = adapter.reference_stats if features == "model" else None
    reference_path = metrics.fid_reference
    if reference_path is not None:  # a folder, EDM/ADM statistics or an ADM batch (metrics.reference_file_for)
        path = reference_file_for(reference_path, extractor, metrics.cache_dir, metrics.fid_weights_path)
    elif shipped is not None:
        path = Path(shipped)
    else:
        key = json.dumps(model.fingerprint, sort_keys=True)
        path = cached_reference(
            adapter, extractor, key, metrics.cache_dir, metrics.fid_reference_samples, metrics.fid_weights_path
        )
    return extractor, path


def build_logger(spec: RunSpec, meta: dict[str, Any]) -> Any:
    """The logger of conf/logger (a _target_); False for logger=none. A W&B run is named after the
    run's settings, tagged with its model, sampler and variant (``meta``: results.json's), and
    keeps its id in the run dir, so that a resumed run continues it."""
    logger = spec.output.logger
    if not logger.get("_target_"):
        return False
    extra: dict[str, Any] = {}
    if str(logger["_target_"]).endswith("WandbLogger"):
        extra = {"id": wandb_run_id(spec.output.output_dir), "resume": "allow"}
        extra["tags"] = run_tags(meta, logger.get("tags"))
        if logger.get("name") is None:
            extra["name"] = spec.run_name()
    # the run's config reaches it through the module's hyperparameters, which Lightning logs in the
    # process that samples: creating the W&B run here, before ddp_fork forks, would hang the ranks
    return instantiate(logger, **extra)


def wandb_run_id(output_dir: Path) -> str:
    """The run dir's W&B run id (WANDB_ID_FILE), made and kept on the first start."""
    path = output_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 lowercase alphanumerics
    path.write_text(run_id + "\n")
    return run_id


def build_trainer(spec: RunSpec, reporter: ReportResults) -> Any:
    """The Trainer of conf/trainer (a _target_), with the run's logger and callbacks."""
    return instantiate(
        spec.output.trainer,
        logger=build_logger(spec, reporter.meta),
        callbacks=[ImagesPerSecondBar(), reporter, FinishWandb()],
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def write_run_files(spec: RunSpec) -> None:
    """run_config.json (what decides the samples: for resume and duplicate sweep jobs) and
    run_overrides.json (what `resume=true` restores)."""
    output_dir = spec.output.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / checks.RUN_CONFIG_FILE).write_text(json.dumps(spec.fingerprint(), indent=2))
    if not spec.output.resume:
        (output_dir / OVERRIDES_FILE).write_text(json.dumps(spec.output.overrides, indent=2))
    if spec.output.save_images:
        (output_dir / "samples").mkdir(exist_ok=True)


# ----------------------------------------------------------------------------------- report


def run_metadata(
    spec: RunSpec, plan: SamplingPlan, notes: dict[str, str], samples_from: Path | None = None
) -> dict[str, Any]:
    """What results.json says about the run besides its metrics: the summary columns, and every
    setting that decides the samples and scores (``settings``)."""
    gmm, eta = plan.gmm, plan.options.get("eta")
    meta = {
        "overrides": spec.output.overrides,
        "model": spec.model.name,
        "sampler": spec.sampler.name,
        "variant": variant_name(gmm.hparams) if gmm is not None else spec.sampler.name.upper(),
        "steps": plan.schedule.num_steps,  # the steps that ran (checks refuse grids of another length)
        "nfe_budget": spec.sampler.nfe_budget,  # nfe=N: the steps were the most within N evaluations
        "eta": eta,
        "guidance_scale": spec.sampler.guidance_scale,
        # what the steps did to x0_hat ("model" resolved against the model's scheduler config)
        "x0_handling": None if has_own_time_grid(plan.sampler) else getattr(plan.schedule, "x0_handling", None),
        "previous_timestep": spec.sampler.previous_timestep,  # where DDIM steps land; None: no DDIM steps
        "conditional": plan.labels is not None or plan.prompts is not None,
        "n_components": None,
        "gmm_scale": spec.sampler.options.get("scale"),  # the control's offset size (gmm.scale)
        "gmm_clipped_fraction": None,
        "gmm_memory_bytes": None,
        "seed": spec.data.seed,
        "num_samples": spec.data.num_samples,
        "noise_device": spec.data.noise_device,
    }
    if gmm is not None:
        hp = gmm.hparams
        meta |= {
            "n_components": hp.n_components,
            "construction": hp.construction,
            "orthonormal": hp.orthonormal,
            "upper_bound_vars": hp.upper_bound_vars,
            "share_across_steps": hp.share_across_steps,
            "gmm_scale": hp.scale,
            "gmm_clipped_fraction": gmm.clipped_fraction(kernel_sigmas(plan.schedule, eta or 0.0), eta or 0.0),
            "gmm_offset_mean_norm": gmm.offset_mean_norm(),
            "gmm_memory_bytes": gmm.memory_bytes,
        }
    if samples_from is not None:
        meta["samples_from"] = str(samples_from)
    return meta | notes | paper_count_note(spec) | {"settings": spec.settings()}


def paper_count_note(spec: RunSpec) -> dict[str, Any]:
    """results.json's record of the paper's sample count (experiment=paper_*), and a note where the
    run has fewer: FID's bias grows as N shrinks, so only runs of equal N compare (not refused)."""
    paper = spec.output.paper_num_samples
    if paper is None:
        return {}
    note = {"paper_num_samples": paper}
    if spec.data.num_samples < paper:
        note["num_samples_note"] = (
            f"data.num_samples={spec.data.num_samples} is below the paper's {paper} for this setting: FID is "
            "biased upward at small N, so these numbers compare with runs of the same N, not with the paper's"
        )
        log.warning("%s", note["num_samples_note"])
    return note
