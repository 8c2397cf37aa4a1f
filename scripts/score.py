"""Score a run (or every job of a sweep) again without sampling, from its saved features and PNGs.

python scripts/score.py outputs/sample/2026-12-06_04-00-00
python scripts/score.py outputs/sample/2026-12-06_04-00-00 metrics.prdc.k=3
python scripts/score.py multirun/sample/2026-12-06_04-00-00        # every job, then the summary again

It rewrites each results.json with the new metrics and prints what changed; only metrics.*,
summary.* and paths.cache_dir overrides are taken (the samples on disk decide the rest).
"""

import argparse
import logging
import sys
from pathlib import Path

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.score import changes, check_overrides, is_run, job_dirs, score_run
from ddim_gmm_exp.sweep import write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a run's directory (holds results.json) or a sweep's (one folder per job)")
    parser.add_argument("overrides", nargs="*", help="metrics.*=VALUE, summary.*=VALUE or paths.cache_dir=DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    directory = Path(args.directory)
    try:
        check_overrides(args.overrides)
        runs = [directory] if is_run(directory) else job_dirs(directory) if directory.is_dir() else []
        if not runs:
            raise ConfigError(f"{directory} holds no run of this project (no results.json with run_overrides.json)")
        for run_dir in runs:
            scored = score_run(run_dir, args.overrides)
            print(f"{run_dir} (features from {scored['source']}):")
            print("\n".join(changes(scored["before"], scored["after"])), flush=True)
        if runs != [directory]:  # a sweep: its summary, tables and plots again
            summary = dict(o.split("=", 1) for o in args.overrides if o.startswith("summary."))
            for path in write_summary(directory, metric=summary.get("summary.metric"), x=summary.get("summary.x")):
                print(path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
