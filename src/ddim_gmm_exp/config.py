"""The composed Hydra config, resolved once into the typed objects a run is made of.

    cfg (Hydra) --resolve_run--> RunSpec(model, sampler, data, metrics, output)

``resolve_run`` is the only function that reads ``cfg``; everything downstream (checks, builders,
the Lightning module, the report) takes these objects. Model, metric, logger and trainer
factories stay plain ``_target_`` dicts, instantiated where they are built.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddim_gmm_exp.samplers import RUN_KEYS, Sampler, option_names, resolve_function, steps_for_nfe


@dataclass(frozen=True)
class ModelSpec:
    """Which model family, from where, and what it brings (feature extractor, extra metrics)."""

    name: str
    family: str  # "diffusion" or "flow"
    adapter: dict[str, Any]  # _target_ dict of the adapter
    path: str | None = None
    features: dict[str, Any] | None = None  # _target_ dict of the family's FID feature extractor
    fid_name: str = "fid"
    extra_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the whole model node, for caches


@dataclass(frozen=True)
class SamplerSpec:
    """With which sampler: its function and options, the step grid, guidance, and the GMM."""

    name: str
    function_path: str
    family: str
    steps: Any
    timestep_spacing: str | None
    guidance_scale: Any
    x0_handling: str | None  # sampling.X0_HANDLINGS for a DDIM-family sampler; None for flow samplers
    # sampling.PREVIOUS_TIMESTEP_RULES for a DDIM-family sampler (its yaml says listed); None where absent
    previous_timestep: str | None
    options: dict[str, Any]  # keyword options of the function (eta, ...), gmm excluded
    gmm: dict[str, Any] | None  # GMMHyperparameters fields but dim and n_steps; None: no GMM
    gmm_overrides: list[str] = field(default_factory=list)  # gmm.* overrides this sampler does not read
    gmm_options: dict[str, str] = field(default_factory=dict)  # option -> the gmm key it reads (the control's)
    nfe_budget: Any = None  # the run's top-level nfe: steps are the most that fit it; None: sampler.steps
    # sampler.* overrides naming an option this sampler does not take (sampler.eta on DPM-Solver++): refused
    # in a single run; in a sweep, dropped, so the job repeats the one without it and is skipped
    unread_overrides: list[str] = field(default_factory=list)

    @property
    def function(self) -> Sampler:
        return resolve_function(self.function_path)

    @property
    def uses_gmm(self) -> bool:
        return self.gmm is not None


@dataclass(frozen=True)
class DataSpec:
    """What to sample: how many, in which batches, from which seeds, with which labels or prompts."""

    num_samples: Any
    batch_size: Any
    seed: Any
    labels: Any
    prompts_file: str | None
    noise_device: Any = "cpu"  # per-sample generators on the CPU (any device, same image) or the sampling device


@dataclass(frozen=True)
class MetricsSpec:
    """Which metrics: FID settings and the extra metrics' factories."""

    fid_enabled: bool
    fid_features: str | None
    fid_weights_path: str | None
    fid_reference: str | None
    fid_reference_samples: int
    fid_min_samples: int
    extra: dict[str, dict[str, Any]]
    cache_dir: str
    optimized_metric: str | None
    prdc_enabled: bool = True
    prdc_k: int = 5
    prdc_max_samples: int = 10_000
    kid_enabled: bool = True
    kid_subsets: int = 100
    kid_subset_size: int | None = None
    dinov2_enabled: bool = False  # metrics=dinov2: FD, PRDC and KID in DINOv2 features too
    dinov2_path: str | None = None
    dinov2_reference: str | None = None
    # Inception's resize to 299 x 299: True antialiased (torchmetrics' default), False TF 1.x's (ADM/EDM statistics)
    fid_antialias: bool = True


@dataclass(frozen=True)
class OutputSpec:
    """Where to write, how to log and on which trainer."""

    output_dir: Path
    save_images: bool
    resume: bool
    logger: dict[str, Any]  # _target_ dict; {} for no logger
    trainer: dict[str, Any]  # _target_ dict of the Lightning Trainer
    overrides: list[str]
    sweep_group: str | None  # the W&B group of a multirun's jobs; None for single runs
    loggable: dict[str, Any]  # the composed config, resolved, for the logger
    sweep_dir: Path | None = None  # a multirun's directory (holds sweep_plan.json); None for single runs
    job_num: int | None = None  # this job's number in its multirun
    named_variant: dict[str, Any] | None = None  # {name, sampler} of a conf/variant file, if one was chosen
    summary_x: Any = None  # summary.x: the sweep summaries' x axis (checked before sampling)
    summary_reference: Any = None  # summary.reference: the sampler differences are paired against
    summary_select_on: Any = None  # summary.select_on: the seeds that choose s (paper.md)
    # the sample count of the paper's FID for this setting (experiment=paper_*): results.json notes a
    # run with fewer (FID is biased at small N); None: no paper count to compare with
    paper_num_samples: Any = None


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    sampler: SamplerSpec
    data: DataSpec
    metrics: MetricsSpec
    output: OutputSpec

    def fingerprint(self) -> dict[str, Any]:
        """What decides the samples: a resumed run must match it, and sweep jobs with equal
        fingerprints sample the same images. The GMM only where the sampler uses it."""
        sampler = {
            "name": self.sampler.name,
            "function": self.sampler.function_path,
            "steps": self.sampler.steps,
            "timestep_spacing": self.sampler.timestep_spacing,
            "guidance_scale": self.sampler.guidance_scale,
            "x0_handling": self.sampler.x0_handling,
            **self.sampler.options,
        }
        if self.sampler.previous_timestep not in (None, "listed"):  # the default keeps earlier runs' fingerprints
            sampler["previous_timestep"] = self.sampler.previous_timestep
        data = {k: v for k, v in vars(self.data).items() if k != "batch_size"}
        if data["noise_device"] == "cpu":  # the default keeps the fingerprints of runs from before the key
            del data["noise_device"]
        keep = {"model": self.model.fingerprint, "sampler": sampler, "data": data}
        if self.sampler.uses_gmm:
            keep["gmm"] = self.sampler.gmm
        return keep

    def scores_fingerprint(self) -> dict[str, Any]:
        """What decides the samples and their scores: two sweep jobs with equal ones are duplicates."""
        metrics = dict(vars(self.metrics))
        if metrics["fid_antialias"] is True:  # the default keeps the fingerprints and settings of earlier runs
            del metrics["fid_antialias"]
        return self.fingerprint() | {"metrics": metrics}

    def run_name(self) -> str:
        """A name after the run's distinguishing settings, e.g. ``ortho_vub-K8-s1-eta0-10steps-cfg2.5-seed0``
        (the W&B run's name)."""
        sampler, options = self.sampler, self.sampler.options
        parts = [self.output.named_variant["name"] if self.output.named_variant else sampler.name]
        if sampler.uses_gmm:
            parts += [f"K{sampler.gmm.get('n_components')}", f"s{sampler.gmm.get('scale'):g}"]
        elif "scale" in options:
            parts.append(f"s{options['scale']:g}")
        if "eta" in options:
            parts.append(f"eta{options['eta']:g}")
        parts.append(f"{sampler.steps}steps")
        if sampler.guidance_scale != 1.0:
            parts.append(f"cfg{sampler.guidance_scale:g}")
        return "-".join([*parts, f"seed{self.data.seed}"])

    def settings(self) -> dict[str, Any]:
        """Every setting that decides the samples and their scores, as flat dotted keys with JSON
        scalars (lists and dicts as JSON text): what results.json records and sweep summaries
        tell series apart by."""
        flat: dict[str, Any] = {}
        for group, node in self.scores_fingerprint().items():
            flatten_into(flat, group, node)
        flat.pop("metrics.cache_dir", None)  # where statistics are cached, not what they are
        for option, key in self.sampler.gmm_options.items():  # the control's scale is gmm.scale, as a GMM's
            flat[f"gmm.{key}"] = flat.pop(f"sampler.{option}")
        return {re.sub(r"^metrics\.(fid|prdc|kid|dinov2)_", r"metrics.\1.", key): value for key, value in flat.items()}


def flatten_into(flat: dict[str, Any], prefix: str, node: Any) -> None:
    """node's leaves as flat[prefix.key...]; lists become their JSON text; _target_ dicts are kept
    whole as one JSON value (their keys are one thing: how to build it)."""
    if isinstance(node, dict) and "_target_" not in node:
        for key, value in node.items():
            flatten_into(flat, f"{prefix}.{key}", value)
    elif isinstance(node, dict | list | tuple):
        flat[prefix] = json.dumps(node, sort_keys=True)
    else:
        flat[prefix] = node


def sweep_group() -> str | None:
    """The W&B group of a multirun's jobs: the sweep directory's name (None for single runs and
    outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ValueError, ImportError):
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"{hydra_cfg.job.name}-{Path(hydra_cfg.sweep.dir).name}"


# conf/logger/wandb.yaml: group: ${sweep_group:}
OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)


def gmm_options(cfg: DictConfig) -> dict[str, str]:
    """The sampler options that are a gmm key by interpolation (the control's scale: ${gmm.scale})."""
    raw = OmegaConf.to_container(cfg.sampler, resolve=False)
    matches = {name: re.fullmatch(r"\$\{gmm\.(\w+)\}", str(value)) for name, value in raw.items()}
    return {name: m.group(1) for name, m in matches.items() if m is not None}


def unread_gmm_overrides(cfg: DictConfig, overrides: list[str], uses_gmm: bool) -> list[str]:
    """The gmm.* overrides that the sampler does not read: none for a GMM sampler; for another,
    all but the gmm keys its own options interpolate (the control reads ${gmm.scale})."""
    if uses_gmm:
        return []
    raw = OmegaConf.to_container(cfg.sampler, resolve=False)
    read = {m.group(1) for value in raw.values() for m in re.finditer(r"\$\{gmm\.(\w+)\}", str(value))}
    unread = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.startswith("gmm.") and key.removeprefix("gmm.") not in read:
            unread.append(override)
    return unread


def option_keys(overrides: list[str]) -> set[str]:
    """The dotted keys of overrides (``+sampler.eta=0.2`` -> ``sampler.eta``)."""
    return {override.lstrip("+~").split("=", 1)[0] for override in overrides}


def unread_sampler_overrides(overrides: list[str], takes: list[str]) -> list[str]:
    """The ``sampler.NAME=...`` overrides whose NAME is neither a run key nor an option the sampler
    function takes: a sweep of variant=ddim,dpmpp_2m with sampler.eta=0,1 gives DPM-Solver++ an
    eta it has no use for (the sweeper refuses a name that no job of the sweep takes: a typo)."""
    unread = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        name = key.removeprefix("sampler.")
        if key.startswith("sampler.") and "." not in name and name not in RUN_KEYS and name not in takes:
            unread.append(override)
    return unread


def plain(node: Any) -> Any:
    """A resolved plain container (dict, list, value) of a config node."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def sweep_job() -> tuple[Path, int] | None:
    """(the multirun's directory, this job's number); None for single runs and outside a Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ValueError, ImportError):
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN or hydra_cfg.job.get("num") is None:
        return None
    return Path(hydra_cfg.sweep.dir), int(hydra_cfg.job.num)


def calls_per_evaluation(guidance_scale: Any, conditional: Any) -> int:
    """Model calls per denoiser evaluation: 2 under classifier-free guidance (conditional and
    unconditional), 1 without (scale 1: the conditional model alone; scale 0: the unconditional one)."""
    return 2 if conditional and guidance_scale not in (0, 0.0, 1, 1.0) else 1


def resolve_run(
    cfg: DictConfig, overrides: list[str], sweep_group: str | None, job: tuple[Path, int] | None = None
) -> RunSpec:
    """The typed objects of one run, from its composed config (the only reader of cfg); ``job`` is
    (sweep dir, job number) for a multirun's job."""
    model = plain(cfg.model)
    sampler = plain(cfg.sampler)
    fid = plain(cfg.metrics.fid)
    prdc, kid = plain(cfg.metrics.get("prdc")) or {}, plain(cfg.metrics.get("kid")) or {}
    dinov2 = plain(cfg.metrics.get("dinov2")) or {}
    function_path = sampler["function"]
    takes = option_names(resolve_function(function_path))
    unread = unread_sampler_overrides(overrides, takes)
    options = {k: v for k, v in sampler.items() if k not in RUN_KEYS and f"sampler.{k}" not in option_keys(unread)}
    data = {
        k: plain(cfg.data[k]) for k in ("num_samples", "batch_size", "seed", "labels", "prompts_file", "noise_device")
    }
    budget = cfg.get("nfe")
    steps = sampler["steps"]
    if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1:  # else checks refuse it
        guided = calls_per_evaluation(sampler["guidance_scale"], data["labels"] is not None or data["prompts_file"])
        steps = steps_for_nfe(resolve_function(function_path), budget, options, sampler.get("timestep_spacing"), guided)
    return RunSpec(
        model=ModelSpec(
            name=model["name"],
            family=model.get("family", "diffusion"),
            adapter=model["adapter"],
            path=model.get("path"),
            features=model.get("features"),
            fid_name=model.get("fid_name", "fid"),
            extra_metrics={k: v for k, v in (model.get("extra_metrics") or {}).items() if v is not None},
            fingerprint=model,
        ),
        sampler=SamplerSpec(
            name=sampler["name"],
            function_path=function_path,
            family=sampler.get("family", "diffusion"),
            steps=steps,
            timestep_spacing=sampler.get("timestep_spacing"),
            guidance_scale=sampler["guidance_scale"],
            x0_handling=sampler.get("x0_handling"),
            previous_timestep=sampler.get("previous_timestep"),
            options=options,
            gmm=plain(cfg.gmm) if "gmm" in takes else None,
            gmm_overrides=unread_gmm_overrides(cfg, overrides, uses_gmm="gmm" in takes),
            gmm_options={} if "gmm" in takes else gmm_options(cfg),
            nfe_budget=budget,
            unread_overrides=unread,
        ),
        data=DataSpec(**data),
        metrics=MetricsSpec(
            fid_enabled=fid["enabled"],
            fid_features=fid["features"],
            fid_weights_path=fid["weights_path"],
            fid_reference=fid["reference"],
            fid_reference_samples=fid["reference_samples"],
            fid_min_samples=fid["min_samples"],
            fid_antialias=fid.get("antialias", True),
            prdc_enabled=prdc.get("enabled", True),
            prdc_k=prdc.get("k", 5),
            prdc_max_samples=prdc.get("max_samples", 10_000),
            kid_enabled=kid.get("enabled", True),
            kid_subsets=kid.get("subsets", 100),
            kid_subset_size=kid.get("subset_size"),
            dinov2_enabled=bool(dinov2.get("enabled", False)),
            dinov2_path=dinov2.get("path"),
            dinov2_reference=dinov2.get("reference"),
            extra={k: v for k, v in (plain(cfg.metrics.get("extra")) or {}).items() if v is not None},
            cache_dir=str(cfg.paths.cache_dir),
            optimized_metric=cfg.get("optimized_metric"),
        ),
        output=OutputSpec(
            output_dir=Path(cfg.paths.output_dir),
            save_images=bool(cfg.save_images),
            resume=bool(cfg.resume),
            logger=plain(cfg.logger) or {},
            trainer=plain(cfg.trainer),
            overrides=list(overrides),
            sweep_group=sweep_group,
            loggable={k: plain(v) for k, v in cfg.items() if k != "hydra"},
            sweep_dir=job[0] if job is not None else None,
            job_num=job[1] if job is not None else None,
            named_variant=plain(cfg.get("named_variant")),
            summary_x=OmegaConf.select(cfg, "summary.x", default=None),
            summary_reference=OmegaConf.select(cfg, "summary.reference", default=None),
            summary_select_on=plain(OmegaConf.select(cfg, "summary.select_on", default=None)),
            paper_num_samples=cfg.get("paper_num_samples"),
        ),
    )
