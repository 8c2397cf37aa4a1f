"""Build a run from its composed config, check it, sample with Lightning, report.

    config -> model adapter + timesteps + GMM -> dataset of global indices -> Trainer.predict
    (sharded over ranks) -> per-sample generators -> sample loop -> decode -> images -> metrics
    -> rank 0: results.json, grid.png, logger (W&B scalars, image grid, table)

Every check on the user's input runs here, before any sampling, and raises ConfigError.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ddim_gmm_exp.data import SampleIndexDataset, read_prompts, resolve_labels
from ddim_gmm_exp.diffusers import DDIMScheduler
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.gmm import GMM, GMMHyperparameters, variant_name
from ddim_gmm_exp.images import image_grid, save_png
from ddim_gmm_exp.metrics import (
    MetricSuite,
    cached_reference,
    check_reference,
    feature_dim,
    folder_reference,
    load_reference,
    make_fid,
)
from ddim_gmm_exp.models.base import ModelAdapter
from ddim_gmm_exp.module import ImagesPerSecondBar, SamplingModule, SamplingPlan
from ddim_gmm_exp.sampling import PREDICTION_TYPES, ddim_sigmas, warn_if_gmm_is_inert

log = logging.getLogger(__name__)

SPACINGS = ("leading", "trailing", "linspace")
RUN_CONFIG_FILE = "run_config.json"
RESULTS_FILE = "results.json"
DEFAULT_PROMPTS = Path(__file__).parent / "assets" / "prompts.txt"


# ----------------------------------------------------------------------------------- checks


def check_number(name: str, value: Any, minimum: float, maximum: float | None = None, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool) and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name}={value!r} is not allowed: it must be {kind} {allowed}")


def world_size(trainer_cfg: DictConfig) -> int:
    """Ranks the trainer config asks for (devices x nodes); -1/'auto' devices count what exists."""
    devices = trainer_cfg.get("devices", 1)
    if devices in (-1, "auto", "-1"):
        devices = torch.cuda.device_count() if trainer_cfg.get("accelerator") in ("gpu", "cuda") else 1
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        devices = len(devices)
    return max(1, int(devices)) * int(trainer_cfg.get("num_nodes", 1))


def check_config(cfg: DictConfig) -> None:
    """Checks that need nothing but the config."""
    sampler, data = cfg.sampler, cfg.data
    check_number("data.batch_size", data.batch_size, 1, integer=True)
    check_number("data.num_samples", data.num_samples, 1, integer=True)
    check_number("data.seed", data.seed, 0, integer=True)
    check_number("sampler.steps", sampler.steps, 1, integer=True)
    check_number("sampler.eta", sampler.eta, 0)
    check_number("sampler.guidance_scale", sampler.guidance_scale, 0)
    if sampler.timestep_spacing not in SPACINGS:
        raise ConfigError(
            f"sampler.timestep_spacing={sampler.timestep_spacing!r} is not allowed: choose one of {SPACINGS}"
        )
    ranks = world_size(cfg.trainer)
    if data.num_samples < ranks:
        raise ConfigError(
            f"data.num_samples={data.num_samples} is fewer than the {ranks} ranks of the trainer: "
            f"sample at least {ranks}"
        )
    fid = cfg.metrics.fid
    if fid.enabled and data.num_samples < fid.min_samples:
        raise ConfigError(
            f"data.num_samples={data.num_samples} is below metrics.fid.min_samples={fid.min_samples}: "
            "FID on fewer samples is not reported; raise num_samples or set metrics.fid.enabled=false"
        )
    if sampler.use_gmm:
        try:
            gmm_hyperparameters(cfg, dim=1).validate(with_dim=False)
        except ValueError as err:
            raise ConfigError(f"gmm: {err}") from err


def gmm_hyperparameters(cfg: DictConfig, dim: int) -> GMMHyperparameters:
    return GMMHyperparameters(dim=dim, n_steps=cfg.sampler.steps, **OmegaConf.to_container(cfg.gmm, resolve=True))


# ----------------------------------------------------------------------------------- builders


def build_adapter(cfg: DictConfig) -> ModelAdapter:
    path = cfg.model.get("path")
    if path is not None and not Path(path).exists():
        raise ConfigError(f"model.path={path!r} does not exist: give a local model directory or a hub id")
    return instantiate(cfg.model.adapter)


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
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


def build_scheduler(adapter: ModelAdapter, sampler_cfg: DictConfig) -> DDIMScheduler:
    """Timesteps and schedule from the model's scheduler config, with the run's spacing."""
    config = dict(adapter.scheduler_config) | {"timestep_spacing": sampler_cfg.timestep_spacing}
    scheduler = DDIMScheduler.from_config(config)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"the model's prediction_type={scheduler.config.prediction_type!r} is not one of {PREDICTION_TYPES}"
        )
    total = scheduler.config.num_train_timesteps
    if sampler_cfg.steps > total:
        raise ConfigError(
            f"sampler.steps={sampler_cfg.steps} is not allowed: the model was trained with {total} "
            f"timesteps, so steps must lie in [1, {total}]"
        )
    scheduler.set_timesteps(sampler_cfg.steps)
    return scheduler


def build_gmm(cfg: DictConfig, adapter: ModelAdapter) -> GMM | None:
    if not cfg.sampler.use_gmm:
        return None
    hp = gmm_hyperparameters(cfg, adapter.dim)
    try:
        hp.validate()
    except ValueError as err:
        raise ConfigError(f"gmm: {err} (model={cfg.model.name} samples D={adapter.dim})") from err
    gmm = GMM().initialize(**vars(hp))
    log.info("GMM kernel: %s", gmm)
    warn_if_gmm_is_inert(gmm, cfg.sampler.eta, stacklevel=2)
    return gmm


def build_metrics(cfg: DictConfig, adapter: ModelAdapter) -> MetricSuite:
    fid_cfg = cfg.metrics.fid
    extras = {}
    fid = reference = None
    if fid_cfg.enabled:
        features = fid_cfg.features or ("model" if cfg.model.get("features") is not None else "inception")
        if features == "model":
            if cfg.model.get("features") is None:
                raise ConfigError(
                    f"metrics.fid.features='model' but model={cfg.model.name} brings no feature "
                    "extractor: use metrics.fid.features=inception"
                )
            extractor = instantiate(cfg.model.features)
        elif features == "inception":
            extractor = 2048
        else:
            raise ConfigError(
                f"metrics.fid.features={fid_cfg.features!r} is not allowed: choose 'model' or 'inception'"
            )
        fid = make_fid(extractor, fid_cfg.weights_path)
        shipped = adapter.reference_stats if features == "model" else None
        if fid_cfg.reference is not None and Path(fid_cfg.reference).is_dir():
            path = folder_reference(fid_cfg.reference, extractor, cfg.paths.cache_dir, fid_cfg.weights_path)
            source, reference = f"of the images in {fid_cfg.reference!r}", load_reference(path)
        elif fid_cfg.reference is not None:
            source = f"in {fid_cfg.reference!r}"
            reference = load_reference(fid_cfg.reference)
        elif shipped is not None:
            source, reference = f"in {str(shipped)!r}", load_reference(shipped)
        else:
            path = cached_reference(
                adapter,
                extractor,
                OmegaConf.to_yaml(cfg.model),
                cfg.paths.cache_dir,
                fid_cfg.reference_samples,
                fid_cfg.weights_path,
            )
            source, reference = f"in {str(path)!r}", load_reference(path)
        check_reference(*reference, feature_dim(extractor), source)
    extra_cfgs = {**(cfg.model.get("extra_metrics") or {}), **(cfg.metrics.get("extra") or {})}
    for name, metric_cfg in extra_cfgs.items():
        if metric_cfg is not None and metric_cfg.get("enabled", True):
            extras[name] = instantiate(metric_cfg.factory, adapter=adapter)
    return MetricSuite(fid, reference, fid_name=cfg.model.get("fid_name", "fid"), extras=extras, seed=cfg.data.seed)


def run_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What decides the samples: a resumed run must match it. gmm.* only where the sampler uses it."""
    keep = {k: cfg[k] for k in ("model", "sampler") if k in cfg}
    if cfg.sampler.use_gmm:
        keep["gmm"] = cfg.gmm
    keep["data"] = {k: v for k, v in cfg.data.items() if k != "batch_size"}
    return OmegaConf.to_container(OmegaConf.create(keep), resolve=True)


def indices_to_sample(cfg: DictConfig, output_dir: Path, sample_dir: Path) -> tuple[list[int], list[int]]:
    """(to sample, already sampled). A fresh run refuses an output dir that holds samples."""
    every = list(range(cfg.data.num_samples))
    fingerprint_file = output_dir / RUN_CONFIG_FILE
    fingerprint = run_fingerprint(cfg)
    existing = (
        {int(p.stem) for p in sample_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png")} if sample_dir.is_dir() else set()
    )
    if cfg.resume:
        if fingerprint_file.is_file():
            saved = json.loads(fingerprint_file.read_text())
            if saved != fingerprint:
                changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
                raise ConfigError(
                    f"resume=true but {output_dir} holds a run of another config (differs in {changed}): "
                    "resume with the same overrides or pick a new output dir"
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
    done = sorted(i for i in existing if i < cfg.data.num_samples)
    todo = [i for i in every if i not in existing]
    return todo, done


def loggable_config(cfg: DictConfig) -> dict[str, Any]:
    """The full composed config, resolved, without Hydra's own node."""
    return {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }


def build_logger(cfg: DictConfig, output_dir: Path, group: str | None) -> Any:
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(output_dir), name="csv", version="")
    if name == "wandb":
        if cfg.logger.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.mode={cfg.logger.mode!r} is not allowed: choose offline, online or disabled")
        os.environ.setdefault("WANDB_SILENT", "true")
        return L.pytorch.loggers.WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=group,
            name=cfg.logger.get("run_name"),
            save_dir=str(output_dir),
            offline=cfg.logger.mode == "offline",
            mode=cfg.logger.mode,
            config=loggable_config(cfg),
        )
    raise ConfigError(f"logger.name={name!r} is not allowed: choose wandb, csv or none")


# ----------------------------------------------------------------------------------- report


def make_report(cfg: DictConfig, output_dir: Path, meta: dict[str, Any], started: float):
    """Rank 0's report: results.json, grid.png and the logger's scalars, grid and table."""

    def report(metrics: dict[str, float], stats: dict[str, Any], grid: list[torch.Tensor], logger: Any) -> None:
        results = meta | {"metrics": metrics, "num_samples": cfg.data.num_samples, "seconds": time.time() - started}
        results |= stats
        if grid:
            save_png(image_grid(torch.stack(grid)), output_dir / "grid.png")
        if logger:
            logger.log_metrics(
                results["metrics"]
                | {
                    "images_per_second": results["images_per_second"] or 0.0,
                    "seconds_per_step": results["seconds_per_step"],
                }
            )
            if isinstance(logger, L.pytorch.loggers.WandbLogger):
                if grid:
                    logger.log_image("samples", [str(output_dir / "grid.png")], caption=["first 64 samples"])
                row = [
                    meta["sampler"],
                    meta["steps"],
                    meta["eta"],
                    meta.get("n_components"),
                    *results["metrics"].values(),
                ]
                logger.log_table(
                    "results", columns=["sampler", "steps", "eta", "n_components", *results["metrics"]], data=[row]
                )
            logger.save()
        tmp = output_dir / (RESULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(output_dir / RESULTS_FILE)
        log.info("results: %s", json.dumps(results["metrics"]))

    return report


def sweep_group() -> str | None:
    """The W&B group of a multirun's jobs: the sweep directory's name (None for single runs)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ValueError, ImportError):
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"{hydra_cfg.job.name}-{Path(hydra_cfg.sweep.dir).name}"


def gmm_clipping(gmm: GMM | None, plan: SamplingPlan) -> float | None:
    """The fraction of (step, coordinate) component variances clipped at 0 in this run (paper A.5)."""
    if gmm is None:
        return None
    sigmas = ddim_sigmas(plan.alphas_cumprod, plan.timesteps, plan.final_abar, plan.eta)
    return gmm.clipped_fraction(sigmas, plan.eta)


def task_overrides() -> list[str]:
    """This job's command-line (or sweeper) overrides; [] outside a Hydra job (tests calling run())."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def in_multirun() -> bool:
    return sweep_group() is not None


def unused_gmm_overrides(cfg: DictConfig) -> list[str]:
    """gmm.* overrides of a job whose sampler uses no GMM (they would change nothing)."""
    if cfg.sampler.use_gmm:
        return []
    return [o for o in task_overrides() if o.lstrip("+~").startswith("gmm.")]


def check_gmm_overrides_apply(cfg: DictConfig) -> None:
    """A gmm.* setting that the sampler does not use is an error in a single run. In a sweep
    (``-m sampler=ddim,ddim_gmm gmm.n_components=4,8``) such DDIM jobs run once (see duplicate_job)."""
    unused = unused_gmm_overrides(cfg)
    if unused and not in_multirun():
        raise ConfigError(
            f"{unused[0]} is set but sampler={cfg.sampler.name} uses no GMM: add sampler=ddim_gmm "
            "(or a GMM variant, e.g. variant=ortho_vub), or drop the gmm.* override"
        )


def duplicate_job(cfg: DictConfig, output_dir: Path) -> Path | None:
    """In a sweep, an earlier job of the same sweep whose samples this job would repeat exactly:
    a sampler without a GMM whose jobs differ only in gmm.* overrides. None if there is none."""
    if not unused_gmm_overrides(cfg) or not in_multirun():
        return None
    fingerprint = run_fingerprint(cfg)
    for sibling in sorted(output_dir.parent.iterdir()):
        if sibling == output_dir or not (sibling / RESULTS_FILE).is_file():
            continue
        saved = sibling / RUN_CONFIG_FILE
        if saved.is_file() and json.loads(saved.read_text()) == fingerprint:
            return sibling
    return None


def skip_as_duplicate(output_dir: Path, original: Path) -> dict[str, Any]:
    """Record why this job did not sample, and return the original job's results."""
    reason = f"same samples as job {original.name}: gmm.* does not apply to a sampler without a GMM"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "skipped.json").write_text(json.dumps({"skipped": reason, "same_as": str(original)}, indent=2))
    log.warning("skipped: %s", reason)
    return json.loads((original / RESULTS_FILE).read_text())


def run_metadata(cfg: DictConfig, conditional: bool, gmm: GMM | None, plan: SamplingPlan) -> dict[str, Any]:
    return {
        "overrides": task_overrides(),
        "variant": variant_name(gmm.hparams) if gmm is not None else "DDIM",
        "model": cfg.model.name,
        "sampler": cfg.sampler.name,
        "steps": cfg.sampler.steps,
        "eta": cfg.sampler.eta,
        "guidance_scale": cfg.sampler.guidance_scale,
        "conditional": conditional,
        "n_components": cfg.gmm.n_components if cfg.sampler.use_gmm else None,
        "construction": cfg.gmm.construction if cfg.sampler.use_gmm else None,
        "orthonormal": cfg.gmm.orthonormal if cfg.sampler.use_gmm else None,
        "upper_bound_vars": cfg.gmm.upper_bound_vars if cfg.sampler.use_gmm else None,
        "share_across_steps": cfg.gmm.share_across_steps if cfg.sampler.use_gmm else None,
        "gmm_scale": cfg.gmm.scale if cfg.sampler.use_gmm else None,
        "gmm_clipped_fraction": gmm_clipping(gmm, plan),
        "gmm_memory_bytes": gmm.memory_bytes if gmm is not None else None,
        "seed": cfg.data.seed,
    }


# ----------------------------------------------------------------------------------- run


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample, score and report one configuration; returns the results (also in results.json)."""
    started = time.time()
    check_config(cfg)
    check_gmm_overrides_apply(cfg)
    output_dir = Path(cfg.paths.output_dir)
    sample_dir = output_dir / "samples"
    original = duplicate_job(cfg, output_dir)
    if original is not None:
        return skip_as_duplicate(output_dir, original)
    adapter = build_adapter(cfg)
    scheduler = build_scheduler(adapter, cfg.sampler)
    labels = resolve_labels(cfg.data.labels, adapter.num_classes)
    if cfg.sampler.guidance_scale == 0:  # out_u + 0 (out_c - out_u): the unconditional model, run as such
        labels = None
    if labels is not None and cfg.sampler.guidance_scale != 1.0 and adapter.null_label is None:
        raise ConfigError(
            f"sampler.guidance_scale={cfg.sampler.guidance_scale} needs a null class, and "
            f"model={cfg.model.name} has none: use sampler.guidance_scale=1.0"
        )
    prompts = read_prompts(cfg.data.prompts_file)
    if adapter.takes_prompts and prompts is None:
        prompts = read_prompts(str(DEFAULT_PROMPTS))
        log.info("no data.prompts_file: using the %d prompts of %s", len(prompts), DEFAULT_PROMPTS)
    todo, done = indices_to_sample(cfg, output_dir, sample_dir)
    ranks = world_size(cfg.trainer)
    if 0 < len(todo) < ranks:
        raise ConfigError(
            f"only {len(todo)} samples are left to resume, fewer than the {ranks} ranks of the "
            "trainer: resume with trainer=cpu (or fewer devices)"
        )
    metrics = build_metrics(cfg, adapter)
    if metrics.needs_prompts and prompts is None:
        raise ConfigError(
            f"a metric needs prompts (CLIP score) but model={cfg.model.name} samples none: "
            "drop it (metrics=default) or use a text-to-image model with data.prompts_file"
        )
    gmm = build_gmm(cfg, adapter)
    logger = build_logger(cfg, output_dir, cfg.logger.get("group") or sweep_group())

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(run_fingerprint(cfg), indent=2))
    if cfg.save_images:
        sample_dir.mkdir(exist_ok=True)
    plan = SamplingPlan.from_scheduler(
        scheduler,
        eta=cfg.sampler.eta,
        guidance_scale=float(cfg.sampler.guidance_scale),
        gmm=gmm,
        base_seed=cfg.data.seed,
        labels=labels,
        prompts=prompts,
        sample_dir=sample_dir if cfg.save_images else None,
        resumed_indices=done,
    )
    log.info(
        "sampling %d of %d samples (%d already on disk) with %s, %d steps",
        len(todo),
        cfg.data.num_samples,
        len(done),
        cfg.sampler.name,
        cfg.sampler.steps,
    )
    meta = run_metadata(cfg, conditional=labels is not None or prompts is not None, gmm=gmm, plan=plan)
    module = SamplingModule(adapter, plan, metrics, report=make_report(cfg, output_dir, meta, started))
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=logger,
        callbacks=[ImagesPerSecondBar(), FinishWandb()],
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    warnings.filterwarnings("ignore", message="predict returned None")  # predict_step returns nothing on purpose
    loader = DataLoader(SampleIndexDataset(todo), batch_size=cfg.data.batch_size, shuffle=False)
    failed = True
    try:
        if todo:
            trainer.predict(module, dataloaders=loader, return_predictions=False)
        else:
            module.score_without_sampling(logger)
        failed = False
    finally:
        finish_wandb(error=failed)
    if trainer.global_rank != 0:  # plain ddp runs this function on every rank; rank 0 reports
        return {}
    results_file = output_dir / RESULTS_FILE
    if not results_file.is_file():
        raise RuntimeError(f"the run ended without writing {results_file}")
    return json.loads(results_file.read_text())


class FinishWandb(L.Callback):
    """Finish the W&B run in the process that made it (with ddp_fork, a worker, not the launcher)."""

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        finish_wandb(error=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        finish_wandb(error=True)


def finish_wandb(error: bool) -> None:
    """Lightning never calls wandb.finish(): do it, also after an error."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if error else 0)
