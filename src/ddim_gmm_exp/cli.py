"""Command-line glue for run.py: one clear line and exit code 2 for bad input, never a traceback."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
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


def restore_resume_overrides(args: list[str]) -> list[str]:
    """``resume=true hydra.run.dir=DIR``: the run's own overrides (DIR/run_overrides.json), then the
    ones given now, so that the resumed run composes the same config without repeating them."""
    given = dict(arg.split("=", 1) for arg in args if "=" in arg and not arg.startswith("-"))
    if given.get("resume", "").lower() != "true" or "hydra.run.dir" not in given:
        return args
    saved = Path(given["hydra.run.dir"]) / "run_overrides.json"
    if not saved.is_file():
        return args
    keys = {key.lstrip("+~") for key in given}
    restored = [o for o in json.loads(saved.read_text()) if o.split("=", 1)[0].lstrip("+~") not in keys]
    if restored:
        print(f"resume: restored the run's overrides {' '.join(restored)}", file=sys.stderr, flush=True)
    return restored + args


class _DropLine(logging.Filter):
    """Drops log records whose message contains one of ``fragments`` (advice, not information)."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_console() -> None:
    """Silence what is noise on every run, keep real warnings: Lightning's own console handler
    (its lines also reach Hydra's, so every line came twice), its litlogger advert, W&B's banner,
    and a deprecation warning from Lightning's internals."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler):
                logger.removeHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLine("litlogger", "LitLogger"))
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def run_task(cfg: DictConfig) -> float | None:
    """Run one job; returns the optimised metric for sweepers (Optuna) when one is named."""
    import lightning  # noqa: F401  (its loggers exist before quiet_console edits them)

    from ddim_gmm_exp.runner import run

    quiet_console()
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
