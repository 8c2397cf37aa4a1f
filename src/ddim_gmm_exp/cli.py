"""Command-line glue for run.py: one clear line and exit code 2 for bad input, never a traceback."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from omegaconf import DictConfig

from ddim_gmm_exp.errors import ConfigError

EXIT_BAD_INPUT = 2
_GROUP_OVERRIDE = re.compile(r"^[+~]?(?P<group>[A-Za-z_][\w/]*)=(?P<value>[^()\[\]{}]*)$")

log = logging.getLogger("ddim_gmm_exp")


def fail(message: str) -> None:
    """Print one line naming the bad value and exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def group_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_overrides(conf_dir: Path, args: list[str]) -> None:
    """Before Hydra composes: every ``group=option`` names an existing file of that config group.

    Hydra would report an unknown option with a multi-line message and exit 1; we list the
    choices on one line and exit 2. Groups under hydra/ (launchers, sweepers) are Hydra's own.
    """
    for arg in args:
        match = _GROUP_OVERRIDE.match(arg)
        if not match or match["group"].startswith("hydra") or not (conf_dir / match["group"]).is_dir():
            continue
        choices = group_options(conf_dir, match["group"])
        for value in match["value"].split(","):
            if value not in choices and value != "null":
                fail(f"{match['group']}={value} is not a config option: choose one of {', '.join(choices)}")


def run_task(cfg: DictConfig) -> float | None:
    """Run one job; returns the optimised metric for sweepers (Optuna) when one is named."""
    from ddim_gmm_exp.runner import run

    try:
        results = run(cfg)
    except ConfigError as err:
        fail(str(err))
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if metric not in results["metrics"]:
        fail(f"optimized_metric={metric!r} is not among this run's metrics: choose one of {sorted(results['metrics'])}")
    return results["metrics"][metric]
