"""The checks of every multirun's jobs, before the first starts (the sweeper that calls them:
hydra_plugins/ddim_gmm_exp_sweeper, Hydra's basic sweeper with this check).

    python run.py -m sampler=ddim_gmm gmm.scale=0.3,-1,1.0   # refused before job 0 samples

Hydra's basic sweeper composes every job's config before it launches any (``validate_batch_is_legal``)
and the launcher then runs them one by one, so one bad value stopped a sweep half way. This one
also resolves each job and runs the checks that need no model (checks.check_run), refusing the
whole sweep with the job and the value, and writes ``sweep_plan.json``: each job's overrides and
which earlier job it repeats (same samples and scores: it is skipped) or shares samples with (same
samples, other metric settings: it scores that job's samples). The plan is decided from the job
list before any job starts, so it holds under a parallel launcher too (conf/hydra/launcher).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict

from ddim_gmm_exp import checks
from ddim_gmm_exp.config import RunSpec, option_keys, resolve_run, sweep_group
from ddim_gmm_exp.errors import ConfigError

log = logging.getLogger(__name__)

PLAN_FILE = "sweep_plan.json"


def digest(node: Any) -> str:
    """A short stable hash of a JSON-able config node."""
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_entry(spec: RunSpec, num: int, overrides: list[str]) -> dict[str, Any]:
    return {
        "num": num,
        "dir": str(spec.output.output_dir),
        "overrides": overrides,
        "samples": digest(spec.fingerprint()),
        "scores": digest(spec.scores_fingerprint()),
    }


def link_repeats(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each job's ``duplicate_of`` (the first earlier job with the same samples and scores) and
    ``samples_of`` (the first earlier job with the same samples only), or None."""
    first_scores: dict[str, int] = {}
    first_samples: dict[str, int] = {}
    for job in jobs:
        job["duplicate_of"] = first_scores.get(job["scores"])
        job["samples_of"] = None if job["duplicate_of"] is not None else first_samples.get(job["samples"])
        first_scores.setdefault(job["scores"], job["num"])
        first_samples.setdefault(job["samples"], job["num"])
    return jobs


def check_batch(config_loader: Any, master: DictConfig, batch: Sequence[Sequence[str]], planned: list) -> list:
    """Check a batch of sweep jobs (numbered after the ``planned`` ones) and return the whole plan,
    also written to the sweep dir's PLAN_FILE."""
    first = len(planned)
    log.info("composing and checking %d jobs (the checks that need no model)", len(batch))
    specs = [checked_spec(config_loader, master, list(overrides), first + i) for i, overrides in enumerate(batch)]
    refuse_options_no_job_takes(specs, Path(master.hydra.sweep.dir))
    numbered = zip(range(first, first + len(batch)), specs, batch, strict=True)
    jobs = [plan_entry(spec, num, list(overrides)) for num, spec, overrides in numbered]
    planned = link_repeats(planned + jobs)
    (Path(master.hydra.sweep.dir) / PLAN_FILE).write_text(json.dumps({"jobs": planned}, indent=2))
    repeats = sum(job["duplicate_of"] is not None for job in jobs)
    shared = sum(job["samples_of"] is not None for job in jobs)
    log.info("checked %d jobs: %d repeat an earlier job (skipped), %d score its samples", len(jobs), repeats, shared)
    return planned


def checked_spec(config_loader: Any, master: DictConfig, overrides: list[str], num: int) -> RunSpec:
    """Compose job ``num`` as the launcher will, resolve it and check it; a bad job refuses the sweep."""
    from ddim_gmm_exp.cli import fail

    try:
        spec = resolve_job(config_loader, master, overrides, num)
        checks.check_run(spec, in_multirun=True)
        checks.indices_to_sample(spec)
    except (ConfigError, HydraException) as err:
        remove_unused_sweep_dir(Path(master.hydra.sweep.dir))
        reason = str(err).strip().splitlines()[0]
        if isinstance(err, HydraException) and err.__cause__ is not None:  # Hydra's own says why in its cause
            reason += f": {str(err.__cause__).splitlines()[0]}"
        fail(f"job {num} ({' '.join(overrides)}): {reason}; no job of the sweep was run")
    return spec


def refuse_options_no_job_takes(specs: list[RunSpec], sweep_dir: Path) -> None:
    """A sampler.NAME that some jobs' samplers do not take is dropped there (they repeat another
    job); one that no job of the sweep takes is a typo, and refuses the sweep."""
    from ddim_gmm_exp.cli import fail

    taken = {f"sampler.{name}" for spec in specs for name in spec.sampler.options}
    for spec in specs:
        for override in spec.sampler.unread_overrides:
            if option_keys([override]) - taken:
                remove_unused_sweep_dir(sweep_dir)
                fail(
                    f"{override.lstrip('+~')} is an option of no sampler in this sweep "
                    f"({', '.join(sorted({s.sampler.name for s in specs}))}); no job of the sweep was run"
                )


def resolve_job(config_loader: Any, master: DictConfig, overrides: list[str], num: int) -> RunSpec:
    """Job ``num``'s RunSpec, composed and numbered as the launcher does (hydra.core.utils.run_job)."""
    cfg = config_loader.load_sweep_config(master_config=master, sweep_overrides=overrides)
    with open_dict(cfg):
        cfg.hydra.job.id = num
        cfg.hydra.job.num = num
        job_dir = os.path.join(cfg.hydra.sweep.dir, str(cfg.hydra.sweep.subdir))
        cfg.hydra.runtime.output_dir = os.path.abspath(job_dir)
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    hydra_config.set_config(cfg)  # ${hydra:...} in the job's config resolves against the job
    try:
        return resolve_run(cfg, overrides, sweep_group(), (Path(cfg.hydra.sweep.dir), num))
    finally:
        hydra_config.cfg = before


def remove_unused_sweep_dir(sweep_dir: Path) -> None:
    """A refused sweep leaves no folder behind: the sweep dir goes if the sweeper's multirun.yaml
    is all it holds."""
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir)


def planned_job(sweep_dir: Path | None, num: int | None) -> dict[str, Any] | None:
    """This job's entry of its sweep's plan; None outside a checked sweep."""
    if sweep_dir is None or num is None or not (sweep_dir / PLAN_FILE).is_file():
        return None
    jobs = json.loads((sweep_dir / PLAN_FILE).read_text())["jobs"]
    return next((job for job in jobs if job["num"] == num), None)
