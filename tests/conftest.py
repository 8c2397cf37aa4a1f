"""Shared test helpers: compose the real config, shrink it, run it in tmp_path; run run.py as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# A run small enough for tests: 100 toy samples (FID's default minimum), 5 steps, no W&B.
SMALL = ["model=toy", "data.num_samples=100", "data.batch_size=50", "sampler.steps=5", "logger=csv"]


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The composed config as run.py would see it, writing to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache of reference statistics for the whole session."""
    return tmp_path_factory.mktemp("cache")


def run_cli(args: list[str], cwd: Path = ROOT, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in a subprocess, offline, as a user would type it."""
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
