"""Score a finished run again without sampling: every metric from its saved features (features.npz)
and, for the metrics that read images (classifier scores, IS, CLIP), from its PNGs.

    run dir --run_overrides.json + metrics.* overrides--> RunSpec --> the run's MetricSuite
    --features.npz (or the PNGs' features)--> metrics --> results.json rewritten, changes listed

A sweep directory: every job that ran is rescored, then the sweep's summary is written again. The
run's config is composed from its own overrides (run_overrides.json, as resume does) and must
describe the same samples (run_config.json); only ``metrics.*`` and ``summary.*`` may be given.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim_gmm_exp import checks
from ddim_gmm_exp.config import RunSpec, resolve_run
from ddim_gmm_exp.data import labels_of, prompts_of
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.images import load_png, png_path
from ddim_gmm_exp.metrics import FeatureSpace, load_features, save_features

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
OVERRIDES_FILE = "run_overrides.json"
# what results.json says about the metrics besides their values: replaced by the rescore's own
METRIC_NOTES = (
    "fid_skipped",
    "diversity_skipped",
    "reference_features_file",
    "prdc_k",
    "prdc_samples",
    "kid_subsets",
    "kid_subset_size",
    "features_file",
)
ALLOWED_PREFIXES = ("metrics.", "summary.", "paths.cache_dir")
CHUNK = 256


def check_overrides(overrides: list[str]) -> None:
    """Only settings that decide scores, not samples: metrics.*, summary.*, paths.cache_dir."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or not key.startswith(ALLOWED_PREFIXES):
            raise ConfigError(
                f"{override!r} cannot be given to a rescore: it scores the samples on disk, so only "
                "metrics.*, summary.* and paths.cache_dir=DIR overrides (key=value) are allowed"
            )


def is_run(path: Path) -> bool:
    return (path / RESULTS_FILE).is_file() and (path / OVERRIDES_FILE).is_file()


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The jobs of a sweep that ran (a skipped duplicate holds skipped.json and scores nothing)."""
    jobs = [p.parent for p in sweep_dir.rglob(RESULTS_FILE) if p.parent != sweep_dir]
    return sorted(j for j in jobs if is_run(j) and not (j / "skipped.json").is_file())


def compose_run(run_dir: Path, overrides: list[str], conf_dir: Path) -> RunSpec:
    """The run's RunSpec: its own overrides, then the given ones, composed with conf_dir; refused if
    it does not describe the samples on disk (conf/ changed since the run, or a bad override)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    saved = json.loads((run_dir / OVERRIDES_FILE).read_text())
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    merged = [o for o in saved if o.split("=", 1)[0].lstrip("+~") not in keys] + list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("config", overrides=merged)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.resume = True  # the fingerprint check of a resume: the same samples
    spec = resolve_run(cfg, merged, None, None)
    checks.check_paths_and_metrics(spec)
    checks.indices_to_sample(spec)  # refuses a config that describes other samples than the run's
    return spec


def saved_features(run_dir: Path, space: FeatureSpace, n: int) -> np.ndarray | None:
    """Rows 0..n-1 of the space's features file where it holds all of them, made by its extractor."""
    path = run_dir / space.features_file
    if not path.is_file():
        return None
    indices, features, key = load_features(path, with_key=True)
    if key != space.features_key() or not np.array_equal(indices[:n], np.arange(n)):
        return None
    return features[:n]


def score_run(run_dir: str | Path, overrides: list[str] = (), conf_dir: Path | None = None) -> dict[str, Any]:
    """Rescore one run directory in place; returns {"before": metrics, "after": metrics, "source": ...}."""
    from ddim_gmm_exp.runner import build_adapter, build_metrics, build_plan, prompts_for

    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise ConfigError(f"{run_dir} holds no run of this project ({RESULTS_FILE} and {OVERRIDES_FILE})")
    conf_dir = conf_dir or Path(__file__).resolve().parents[2] / "conf"
    spec = compose_run(run_dir, list(overrides), conf_dir)
    n = spec.data.num_samples
    missing = [i for i in range(n) if not png_path(run_dir / "samples", i).is_file()]
    adapter = build_adapter(spec.model)
    suite, notes = build_metrics(spec.metrics, spec.model, adapter, n, spec.data.seed)
    saved = {space.suffix: saved_features(run_dir, space, n) for space in suite.spaces}
    saved = {suffix: features for suffix, features in saved.items() if features is not None}
    needs_images = suite.needs_images or len(saved) < len(suite.spaces)
    if missing and needs_images:
        raise ConfigError(
            f"{run_dir} lacks {len(missing)} of its {n} samples' PNGs (first: {missing[0]:06d}.png) and its "
            "saved features cannot serve every metric: nothing is rescored"
        )
    plan = build_plan(spec, adapter, prompts_for(spec, adapter), list(range(n)))
    suite.reset_and_load_reference(0)
    for start in range(0, n, CHUNK):
        chunk = torch.arange(start, min(n, start + CHUNK))
        images = None
        if needs_images:
            images = torch.stack([load_png(png_path(run_dir / "samples", int(i))) for i in chunk])
        features = {suffix: torch.from_numpy(rows[start : start + len(chunk)]) for suffix, rows in saved.items()}
        suite.update(images, labels_of(chunk, plan.labels), prompts_of(chunk, plan.prompts), chunk, features)
    after = suite.compute()
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    before = dict(results.get("metrics", {}))
    for key in [k for k in results if is_metric_note(k)]:
        results.pop(key)
    results |= notes | {"metrics": after, "settings": spec.settings()}
    for space in suite.spaces:
        if space.generated is not None and len(space.generated[0]):
            save_features(run_dir / space.features_file, *space.generated, key=space.features_key())
            results[f"features{space.suffix}_file"] = str(run_dir / space.features_file)
    source = " and ".join(f"features{suffix}.npz" for suffix in saved) or "the PNGs"
    if saved and needs_images:
        source += " and the PNGs"
    results["rescored"] = {"overrides": list(overrides), "features": source}
    tmp = run_dir / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(run_dir / RESULTS_FILE)
    return {"before": before, "after": after, "source": source}


def is_metric_note(key: str) -> bool:
    """A results.json key that says how the metrics were computed (replaced by a rescore's own)."""
    return key in METRIC_NOTES or re.fullmatch(r"(reference_)?features_\w+_file|diversity_\w+_skipped", key) is not None


def changes(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """One line per metric: its old and new value, or that it is new or gone."""
    lines = []
    for name in list(after) + [m for m in before if m not in after]:
        old, new = before.get(name), after.get(name)
        if old is None:
            lines.append(f"  {name}: {new:.6g} (new)")
        elif new is None:
            lines.append(f"  {name}: {old:.6g} -> gone")
        elif old == new or (np.isnan(old) and np.isnan(new)):
            lines.append(f"  {name}: {new:.6g} (unchanged)")
        else:
            lines.append(f"  {name}: {old:.6g} -> {new:.6g}")
    return lines
