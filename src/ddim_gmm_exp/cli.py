"""Command-line glue for run.py: one clear line and exit code 2 for bad input, never a traceback."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
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


def given_overrides(args: list[str]) -> dict[str, str]:
    """key -> value of the command line's ``key=value`` arguments (flags left out)."""
    return dict(arg.split("=", 1) for arg in args if "=" in arg and not arg.startswith("-"))


def prepare_resume(args: list[str]) -> list[str]:
    """``resume=true``: check that the directory holds what is resumed, before Hydra writes anything.

    A run (``hydra.run.dir=DIR``): DIR must hold a run of this project; its own overrides
    (DIR/run_overrides.json) are restored, then the ones given now, and the job is run as a single
    run in DIR whatever an experiment sets (hydra.mode=RUN), without rewriting DIR's Hydra record
    (hydra.output_subdir=null): a refused resume leaves DIR as it was. A sweep (``-m ...
    hydra.sweep.dir=DIR``): DIR must hold a sweep; each job resumes its own folder.
    """
    given = given_overrides(args)
    if given.get("resume", "").lower() != "true":
        return args
    if "hydra.run.dir" in given:
        return restore_run(args, given, Path(given["hydra.run.dir"]))
    if "hydra.sweep.dir" in given:
        sweep_dir = Path(given["hydra.sweep.dir"])
        if not (sweep_dir / "multirun.yaml").is_file():
            fail(f"resume=true but hydra.sweep.dir={sweep_dir} holds no sweep (no multirun.yaml): give a sweep's dir")
        return args
    fail("resume=true needs the directory to finish: hydra.run.dir=RUN_DIR (a run) or -m ... hydra.sweep.dir=SWEEP_DIR")
    return args


def restore_run(args: list[str], given: dict[str, str], run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        fail(f"resume=true but hydra.run.dir={run_dir} does not exist: give the directory of the run to finish")
    if (run_dir / "multirun.yaml").is_file():
        fail(
            f"resume=true but hydra.run.dir={run_dir} is a sweep's directory: resume the sweep with "
            f"python run.py -m ... resume=true hydra.sweep.dir={run_dir}, or one job with hydra.run.dir={run_dir}/N"
        )
    missing = [name for name in ("run_config.json", "run_overrides.json") if not (run_dir / name).is_file()]
    if missing:
        fail(f"resume=true but hydra.run.dir={run_dir} holds no run ({' and '.join(missing)} missing)")
    keys = {key.lstrip("+~") for key in given}
    saved = json.loads((run_dir / "run_overrides.json").read_text())
    restored = [o for o in saved if o.split("=", 1)[0].lstrip("+~") not in keys]
    if restored:
        print(f"resume: restored the run's overrides {' '.join(restored)}", file=sys.stderr, flush=True)
    fixed = [a for a in ("hydra.mode=RUN", "hydra.output_subdir=null") if a.split("=")[0] not in given]
    return [arg for arg in restored + args if arg not in ("-m", "--multirun")] + fixed


def single_values(args: list[str]) -> list[str]:
    """The overrides of the command line's first job: each sweep's first value, Hydra's own and
    flags left out (for a dry composition)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    single = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.lstrip("+~").startswith("hydra"):
            continue
        override = parser.parse_override(arg)
        if override.is_sweep_override() and override.is_discrete_sweep():
            arg = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
        single.append(arg)
    return single


def check_composes(conf_dir: Path, args: list[str]) -> None:
    """Compose the first job's config once before Hydra does, so that a key the config does not
    have (``gmm.n_component=4``) gets one line naming the keys it does have, and exit 2."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = single_values(args)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            try:
                compose("config", overrides=overrides)
            except HydraException as err:
                fail(composition_error(f"{err} {err.__cause__ or ''}", overrides))
    finally:
        GlobalHydra.instance().clear()


_NOT_IN_STRUCT = re.compile(r"Could not override '(?P<key>[^']+)'")


def composition_error(message: str, overrides: list[str]) -> str:
    """One line for a Hydra composition error: for a key the config lacks, the keys it has."""
    from hydra import compose
    from omegaconf import OmegaConf

    match = _NOT_IN_STRUCT.search(message)
    if match is None or "not in struct" not in message:
        return message.strip().splitlines()[0]
    key = match["key"]
    bad = next(o for o in overrides if o.split("=", 1)[0] == key)
    cfg = compose("config", overrides=[o for o in overrides if o != bad])
    parent, _, _ = key.rpartition(".")
    while parent and not OmegaConf.is_dict(OmegaConf.select(cfg, parent)):  # the nearest node that exists
        parent, _, _ = parent.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = ", ".join(sorted(str(k) for k in node)) if OmegaConf.is_dict(node) else "none"
    return f"{bad} is not a setting: {parent or 'the config'} has {keys}"


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


def job_output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def run_log_path() -> Path | None:
    output_dir = job_output_dir()
    return None if output_dir is None else output_dir / "run.log"


def remove_unstarted_run_dir(cfg: DictConfig) -> None:
    """A fresh run refused before it started leaves no folder: Hydra made the job dir and wrote
    its record (.hydra/, run.log) into it; if that is all the dir holds, it goes. A resumed
    run's dir is never touched."""
    output_dir = job_output_dir()
    if cfg.get("resume") or output_dir is None or not output_dir.is_dir():
        return
    if {p.name for p in output_dir.iterdir()} <= {".hydra", "run.log"}:
        shutil.rmtree(output_dir)


def run_task(cfg: DictConfig) -> float | None:
    """Run one job; returns the optimised metric for sweepers (Optuna) when one is named."""
    import lightning  # noqa: F401  (its loggers exist before quiet_console edits them)

    from ddim_gmm_exp.runner import run

    quiet_console()
    try:
        results = run(cfg)
    except ConfigError as err:
        remove_unstarted_run_dir(cfg)
        fail(str(err))
    except Exception:
        log.exception("the run failed; its log: %s", run_log_path())
        raise
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if metric not in results["metrics"]:
        fail(f"optimized_metric={metric!r} is not among this run's metrics: choose one of {sorted(results['metrics'])}")
    return results["metrics"][metric]
