"""Helpers of the runner tests: compose the real config, shrink it, run it in tmp_path; run run.py
as a user would; read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[2]
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


def pngs(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "samples").glob("*.png"))}


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def adapter_of(cfg: DictConfig):
    """The model adapter a composed config builds."""
    from ddim_gmm_exp.config import resolve_run
    from ddim_gmm_exp.runner import build_adapter

    return build_adapter(resolve_run(cfg, [], None).model)


def wandb_records(run_file: Path):
    """The protobuf records of an offline .wandb file (LevelDB log format, W&B header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = run_file.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def run_records(run_dir: Path) -> list[list]:
    """Records of every finished offline W&B run under run_dir/wandb (the file completes after finish())."""
    for _ in range(300):
        files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
        records = [list(wandb_records(f)) for f in files]
        if files and all(any(r.WhichOneof("record_type") == "exit" for r in rs) for rs in records):
            return records
        time.sleep(0.1)
    raise AssertionError(f"no finished W&B run under {run_dir}")
