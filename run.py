"""Entry point: compose the config with Hydra and run it (ddim_gmm_exp.runner).

python run.py                                         # the default run
python run.py sampler=ddim_gmm gmm.n_components=8 -m  # a sweep
python run.py -m sampler=ddim,ddim_gmm sampler.steps=5,10,20
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ddim_gmm_exp.cli import check_composes, check_group_overrides, prepare_resume, run_task

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


if __name__ == "__main__":
    sys.argv[1:] = prepare_resume(sys.argv[1:])
    check_group_overrides(CONF_DIR, sys.argv[1:])
    check_composes(CONF_DIR, sys.argv[1:])
    main()
