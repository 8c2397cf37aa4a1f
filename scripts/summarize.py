"""Rebuild a sweep's summary.csv, summary.md, summary.png and compare.png (and paper.md, paper.png) from its
jobs' results.json, and where the jobs logged to W&B, a new W&B summary run in their group.

python scripts/summarize.py multirun/sample/2026-11-27_09-00-00
python scripts/summarize.py multirun/sample/2026-11-27_09-00-00 --metric classifier_confidence
python scripts/summarize.py multirun/sample/2026-11-27_09-00-00 --x steps
python scripts/summarize.py multirun/sample/2026-11-27_09-00-00 --reference ORTHO --select-on 0
python scripts/summarize.py multirun/sample/2026-11-27_09-00-00 --wandb online   # the summary run straight to W&B
"""

import argparse
import sys

from ddim_gmm_exp.dashboard import WANDB_MODES
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.sweep import X_AXES, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (holds one folder per job)")
    parser.add_argument(
        "--metric",
        default=None,
        metavar="NAME",
        help="the primary metric of paper.md and paper.png (default: the first FID-like metric, else the first)",
    )
    parser.add_argument(
        "--x",
        default=None,
        choices=X_AXES,
        help="the x axis (default: NFE where the jobs had an NFE budget or differ in calls per step, else steps)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        metavar="NAME",
        help="the variant or series every other is compared with, paired by seed (default: DDIM, or RFIM for flows)",
    )
    parser.add_argument(
        "--select-on",
        default=None,
        nargs="+",
        type=int,
        metavar="SEED",
        help="choose paper.md's scale s on these data.seed values and report the other seeds only",
    )
    parser.add_argument(
        "--wandb",
        default=None,
        choices=WANDB_MODES,
        help="the W&B summary run's mode (default: the jobs' logger.mode; only for a sweep whose jobs logged to W&B)",
    )
    args = parser.parse_args(argv)
    try:
        written = write_summary(
            args.sweep_dir,
            metric=args.metric,
            x=args.x,
            reference=args.reference,
            select_on=args.select_on,
            wandb_mode=args.wandb,
        )
    except ConfigError as err:  # an unknown --metric, --reference or seed: one line naming the ones there are
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print(f"error: no results.json under {args.sweep_dir}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
