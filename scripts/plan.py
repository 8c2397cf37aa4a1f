"""What a sweep would run and cost, before launching it: its jobs after duplicate skipping, their
model evaluations (NFE x samples), and the GPU time they take at a throughput you give.

    python scripts/plan.py experiment=paper_celebahq
    python scripts/plan.py experiment=paper_imagenet_cfg sampler.steps=10 --images-per-second dit_xl2_256=180@20
    python scripts/plan.py experiment=paper_sd21 --bench bench_gpu.md.json --jobs

The overrides are run.py's (a sweep's, without -m). The jobs are composed, resolved and checked
exactly as the sweep's own sweeper does before its first job starts (ddim_gmm_exp.sweeper), so a
sweep that would be refused is refused here with the same line, and the jobs counted are the ones
it would run: a job that repeats an earlier one (same samples and metric settings) is skipped, and
one that shares an earlier job's samples only scores them when the sweep keeps its PNGs
(save_images=true), else samples them again.

Throughput: ``--images-per-second MODEL=R@N`` is R images per second measured for MODEL at N model
evaluations per image (guidance counts 2 an evaluation, as results.json's ``nfe``), e.g. a 10-step
guided run of 90 images/s is 90@20. The estimate scales it to each job's NFE (time proportional to
model evaluations: decoding, feature extraction and start-up are left out). ``--bench FILE`` takes
the rates of scripts/bench_gpu.py's rows (FILE: its ``--out`` file's .json) for the models whose
architecture it measured. The time is GPU time summed over jobs: divide by the GPUs that share the
sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddim_gmm_exp.cli import fail

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# bench_gpu.py's architectures -> the model configs built on them (same network and input size);
# sd21 is measured at 512x512: a sweep at another resolution (paper_sd21: 256) needs its own rate
BENCH_MODELS = {
    "cifar10": ("ddpm_cifar10",),
    "cat256": ("ddpm_cat256", "ddpm_celebahq256"),
    "sd21-base": ("sd21",),
}
BENCH_ROW = "(b) runner, ddim eta=0"  # bench_gpu's runner row (the GMM's rows are within 2 % of it)


@dataclass(frozen=True)
class Job:
    """One job of the sweep: its overrides, what it costs, and whether it runs its own sampler."""

    num: int
    overrides: list[str]
    model: str
    variant: str
    samples: int
    nfe: int
    status: str  # "samples", "scores job N's samples" or "repeats job N"

    @property
    def samples_here(self) -> bool:
        return self.status == "samples"


def parse_rate(text: str) -> tuple[str, float]:
    """MODEL=R@N -> (MODEL, model evaluations of one image per second: R * N)."""
    model, _, rate = text.partition("=")
    ips, _, nfe = rate.partition("@")
    try:
        value, evaluations = float(ips), int(nfe)
    except ValueError:
        value = evaluations = 0
    if not model or value <= 0 or evaluations < 1:
        fail(
            f"--images-per-second {text!r} is not allowed: give MODEL=R@N, R images per second "
            "measured at N model evaluations per image (e.g. dit_xl2_256=180@20)"
        )
    return model, value * evaluations


def bench_rates(path: str) -> dict[str, float]:
    """Model evaluations of one image per second, by model config, from bench_gpu.py's rows."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        fail(f"--bench {path!r} is not a bench_gpu.py rows file (its --out FILE.json): {err}")
    rates = {}
    for row in rows:
        if row.get("variant") == BENCH_ROW and row.get("noise") == "cpu" and row.get("images_per_second"):
            if row.get("nfe") is None:
                fail(f"--bench {path!r} has rows without 'nfe' (an older bench_gpu.py): rerun it")
            if row.get("small"):
                fail(f"--bench {path!r} was measured with --small (narrow stand-ins): rerun bench_gpu.py without it")
            for model in BENCH_MODELS.get(row["model"], ()):
                rates[model] = row["images_per_second"] * row["nfe"]
    return rates


def compose_master(overrides: list[str], sweep_dir: str) -> tuple[Any, Any]:
    """(the config loader, the multirun's master config), as Hydra composes them for run.py -m."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from hydra.errors import HydraException
    from hydra.types import RunMode

    setup_globals()  # the ${hydra:...} and ${now:...} resolvers, as run.py's Hydra registers them
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    try:
        master = loader.load_configuration("config", [*overrides, f"hydra.sweep.dir={sweep_dir}"], RunMode.MULTIRUN)
    except HydraException as err:
        fail(str(err).splitlines()[0])
    HydraConfig.instance().set_config(master)
    return loader, master


def sweep_jobs(loader: Any, master: Any, overrides: list[str]) -> list[list[str]]:
    """Each job's overrides: the experiment's sweeper params, then the command line's, as Hydra's
    basic sweeper expands them (one batch)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (master.hydra.sweeper.params or {}).items()]
    task = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides([*params, *task])
    return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


def plan(overrides: list[str]) -> list[Job]:
    """The sweep's jobs, checked and linked to the jobs they repeat, as its sweeper plans them."""
    from ddim_gmm_exp.config import calls_per_evaluation
    from ddim_gmm_exp.samplers import model_calls
    from ddim_gmm_exp.sweeper import checked_spec, link_repeats, plan_entry, refuse_options_no_job_takes

    with tempfile.TemporaryDirectory() as sweep_dir:
        loader, master = compose_master(overrides, sweep_dir)
        batch = sweep_jobs(loader, master, overrides)
        specs = [checked_spec(loader, master, job, num) for num, job in enumerate(batch)]
        refuse_options_no_job_takes(specs, Path(sweep_dir))
    numbered = zip(range(len(batch)), specs, batch, strict=True)
    entries = link_repeats([plan_entry(spec, num, job) for num, spec, job in numbered])
    jobs = []
    for spec, entry in zip(specs, entries, strict=True):
        sampler, data = spec.sampler, spec.data
        per_call = calls_per_evaluation(sampler.guidance_scale, data.labels is not None or data.prompts_file)
        nfe = model_calls(sampler.function, sampler.steps, sampler.options, sampler.timestep_spacing) * per_call
        if entry["duplicate_of"] is not None:
            status = f"repeats job {entry['duplicate_of']}"
        elif entry["samples_of"] is not None and spec.output.save_images:
            status = f"scores job {entry['samples_of']}'s samples"
        else:
            status = "samples"
        variant = spec.output.named_variant["name"] if spec.output.named_variant else sampler.name
        jobs.append(Job(entry["num"], entry["overrides"], spec.model.name, variant, data.num_samples, nfe, status))
    return jobs


def hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:,.1f} h"


def report(jobs: list[Job], rates: dict[str, float], show_jobs: bool) -> str:
    """The plan as markdown: totals, then one row per (model, variant)."""
    sampled = [job for job in jobs if job.samples_here]
    lines = [
        f"{len(jobs)} jobs: {len(sampled)} sample, "
        f"{sum(j.status.startswith('scores') for j in jobs)} score an earlier job's samples, "
        f"{sum(j.status.startswith('repeats') for j in jobs)} repeat an earlier job (skipped)",
        "",
        "| model | variant | jobs sampling | samples | NFE per sample | NFE x samples | GPU time |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
    for job in sampled:
        groups[job.model, job.variant].append(job)
    for (model, variant), group in groups.items():
        evaluations = sum(j.samples * j.nfe for j in group)
        nfes = sorted({j.nfe for j in group})
        seconds = evaluations / rates[model] if model in rates else None
        lines.append(
            f"| {model} | {variant} | {len(group)} | {sum(j.samples for j in group):,} | "
            f"{', '.join(map(str, nfes))} | {evaluations:,} | {hours(seconds)} |"
        )
    total = sum(j.samples * j.nfe for j in sampled)
    models = sorted({j.model for j in sampled})
    known = all(m in rates for m in models)
    seconds = sum(j.samples * j.nfe / rates[j.model] for j in sampled) if known else None
    lines.append(
        f"| **all** | | {len(sampled)} | {sum(j.samples for j in sampled):,} | | {total:,} | {hours(seconds)} |"
    )
    for model in models:
        rate = rates.get(model)
        lines.append(
            f"\n{model}: {rate:,.0f} model evaluations of one image per second"
            if rate
            else f"\n{model}: no throughput given (--images-per-second {model}=R@N, or --bench)"
        )
    if show_jobs:
        lines += ["", "| job | status | NFE | samples | overrides |", "|---|---|---|---|---|"]
        lines += [f"| {j.num} | {j.status} | {j.nfe} | {j.samples} | {' '.join(j.overrides)} |" for j in jobs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="run.py's overrides, e.g. experiment=paper_celebahq")
    parser.add_argument("--images-per-second", action="append", default=[], metavar="MODEL=R@N")
    parser.add_argument("--bench", help="bench_gpu.py's rows (.json) for the rates of the architectures it measured")
    parser.add_argument("--jobs", action="store_true", help="also list every job and its status")
    args = parser.parse_args(argv)
    given = dict(parse_rate(text) for text in args.images_per_second)
    rates = (bench_rates(args.bench) if args.bench else {}) | given
    jobs = plan(args.overrides)
    unused = sorted(set(given) - {job.model for job in jobs})  # bench_gpu's rows cover other models too
    if unused:
        fail(
            f"--images-per-second {unused[0]}=... names no model of this sweep: its models are "
            f"{', '.join(sorted({job.model for job in jobs}))}"
        )
    print(report(jobs, rates, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
