"""Bad input: one clear line, exit 2, before any sampling, each refused for its own reason."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.runs import SMALL, compose_config, run_cli

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.runner import run


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.batch_size=0"], "data.batch_size=0 is not allowed"),
        (["sampler.steps=0"], "sampler.steps=0 is not allowed"),
        (["sampler.steps=1001"], r"sampler.steps=1001 is not allowed: the model was trained with 1000 timesteps"),
        (["sampler.eta=-0.5"], "sampler.eta=-0.5 is not allowed"),
        (["sampler.guidance_scale=-1"], "sampler.guidance_scale=-1 is not allowed"),
        (["sampler.timestep_spacing=cubic"], "sampler.timestep_spacing='cubic' is not allowed"),
        (["sampler=ddim_gmm", "gmm.n_components=0"], "gmm: n_components=0 is not allowed"),
        (["sampler=ddim_gmm", "gmm.scale=-1"], "gmm: scale=-1 is not allowed: it must be a finite number >= 0"),
        (
            ["variant=matched_full", "gmm.scale=1.5"],
            r"gmm: scale=1.5 is not allowed with construction='matched_full': it must be a number in \[0, 1\]",
        ),
        (["sampler=ddim_gmm", "gmm.construction=exact"], "gmm: construction='exact' is not allowed: choose one of"),
        (["sampler=ddim_gmm", "gmm.n_components=200"], r"gmm: n_components=200 is not allowed for dim=192"),
        (
            ["data.num_samples=1", "trainer=ddp_sim", "metrics.fid.enabled=false"],
            "data.num_samples=1 is fewer than the 2 ranks",
        ),
        (["data.prompts_file=/nonexistent/prompts.txt"], "data.prompts_file='/nonexistent/prompts.txt' cannot be read"),
        (["data.labels=[3,12]"], r"class ids must lie in \[0, 9\]"),
        (["model.path=/nonexistent/model"], "model.path='/nonexistent/model' does not exist"),
        (["metrics.fid.reference=/nonexistent/ref.npz"], "metrics.fid.reference='/nonexistent/ref.npz' does not exist"),
        (
            ["metrics.fid.features=inception", "metrics.fid.weights_path=/nonexistent/w.pth"],
            "metrics.fid.weights_path='/nonexistent/w.pth' does not exist",
        ),
        (["logger.mode=sometimes"], "logger.mode='sometimes' is not allowed"),
        (["+sampler.temperature=0.9"], "sampler.temperature=0.9 is not an option of sampler=ddim: its options are eta"),
        (["sampler=ddim_gmm", "+sampler.gmm=1"], "sampler.gmm=1 is not an option of sampler=ddim_gmm"),
        (["model=digits_flow"], "sampler=ddim walks a diffusion schedule but model=digits_flow is a flow model"),
        (
            ["model=digits_flow", "sampler=rfim", "sampler.timestep_spacing=trailing"],
            "sampler.timestep_spacing='trailing' is not used by sampler=rfim",
        ),
    ],
)
def test_bad_input_is_refused_before_sampling(overrides, message, tmp_path, cache_dir):
    cfg = compose_config([*SMALL, "logger=wandb", *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())


def test_reference_with_the_wrong_feature_dimension(tmp_path, cache_dir):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(10), sigma=np.eye(10))
    cfg = compose_config([*SMALL, f"metrics.fid.reference={tmp_path / 'ref.npz'}"], tmp_path / "out", cache_dir)
    with pytest.raises(ConfigError, match="have feature dimension 10 but the FID feature extractor gives 192"):
        run(cfg)


def test_inception_without_local_weights_says_which_file(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = compose_config([*SMALL, "metrics.fid.features=inception"], tmp_path / "out", cache_dir)
    with pytest.raises(ConfigError, match="weights-inception-2015-12-05-6726825d.pth and no download is made"):
        run(cfg)


@pytest.mark.parametrize(
    "args,message",
    [
        (["sampler=fancy"], "sampler=fancy is not a config option: choose one of ddim, ddim_gmm"),
        (["gmm.scale=2"], "gmm.scale=2 is set but sampler=ddim uses no GMM: add sampler=ddim_gmm"),
        (["gmm.n_components=0"], "gmm.n_components=0 is set but sampler=ddim uses no GMM"),
        (["sampler=ddim_noise", "gmm.n_components=4"], "gmm.n_components=4 is set but sampler=ddim_noise uses no GMM"),
        (["-m", "model=toy,nope"], "model=nope is not a config option"),
        (["sampler.eta=-1"], "sampler.eta=-1 is not allowed"),
        (["data.batch_size=0"], "data.batch_size=0 is not allowed"),
    ],
)
def test_command_line_errors_are_one_line_and_exit_2(args, message, tmp_path):
    proc = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "samples").exists()


def test_clip_score_without_prompts_is_refused_before_sampling(tmp_path, cache_dir, tiny_clip_dir):
    cfg = compose_config(
        [*SMALL, "metrics=clip", f"metrics.extra.clip.factory.model={tiny_clip_dir}"], tmp_path, cache_dir
    )
    with pytest.raises(ConfigError, match="a metric needs prompts"):
        run(cfg)
    assert not (tmp_path / "samples").exists()
