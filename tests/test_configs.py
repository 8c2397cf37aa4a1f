"""Every config option composes, and every config file says how to use it."""

from __future__ import annotations

import pytest
from helpers.runs import CONF_DIR, compose_config


def group_options() -> list[tuple[str, str]]:
    groups = [p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"]
    return [(g.name, o.stem) for g in sorted(groups) for o in sorted(g.glob("*.yaml"))]


@pytest.mark.parametrize("group,option", group_options())
def test_every_config_option_composes(group, option, tmp_path, cache_dir):
    cfg = compose_config([f"{group}={option}"], tmp_path, cache_dir)
    assert cfg.hydra.runtime.choices[group] == option
    assert cfg.model.adapter._target_.startswith("ddim_gmm_exp.models.")


def test_optuna_search_and_slurm_launcher_compose(tmp_path, cache_dir):
    search = compose_config(["hparams_search=gmm_optuna"], tmp_path, cache_dir)
    assert search.optimized_metric == "fid_digits" and search.sampler.function.endswith(".ddim_gmm")
    assert "gmm.n_components" in search.hydra.sweeper.params
    slurm = compose_config(["hydra/launcher=slurm"], tmp_path, cache_dir)
    assert slurm.hydra.launcher.gpus_per_node == 8


def test_every_config_file_starts_with_its_command():
    for path in CONF_DIR.rglob("*.yaml"):
        head = "\n".join(path.read_text().splitlines()[:3])
        assert "python run.py" in head or "https://" in head, path
