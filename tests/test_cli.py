"""Bad input: one clear line, exit 2, before any sampling, each refused for its own reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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
        # the control's offset size, checked before the model loads (it failed after, with a traceback)
        (["sampler=ddim_noise", "gmm.scale=-1"], r"gmm.scale: scale=-1 is not allowed: it must be a finite number"),
        (["sampler=ddim_noise", "gmm.last_step=1"], "gmm.last_step=1 is not allowed: it must be true or false"),
        # a variant and a sampler that contradict each other, in either order
        (["variant=rand", "sampler=ddim"], "variant=rand runs sampler=ddim_gmm but sampler=ddim was also given"),
        (["sampler=ddim", "variant=rand"], "variant=rand runs sampler=ddim_gmm but sampler=ddim was also given"),
        (["variant=ortho_vub", "sampler=ddim_noise"], "variant=ortho_vub runs sampler=ddim_gmm but sampler=ddim_noise"),
        # diffusers' trailing spacing lists 62 timesteps ending at -1 for S = 61
        (
            ["sampler.timestep_spacing=trailing", "sampler.steps=61"],
            r"sampler.steps=61 is not allowed with sampler.timestep_spacing='trailing'.*use sampler.steps=60 or 62",
        ),
        (["metrics.fid.reference_samples=1"], "metrics.fid.reference_samples=1 is not allowed: it must be an integer"),
        (["sampler=ddim_gmm", "+gmm.n_component=4"], "gmm.n_component=4 is not a GMM setting: the settings are n_comp"),
        # precision/recall/density/coverage and KID: their numbers, and settings a run would not use
        (["metrics.prdc.k=0"], "metrics.prdc.k=0 is not allowed: it must be an integer >= 1"),
        (["metrics.prdc.max_samples=1"], "metrics.prdc.max_samples=1 is not allowed: it must be an integer >= 2"),
        (["metrics.kid.subsets=0"], "metrics.kid.subsets=0 is not allowed: it must be an integer >= 1"),
        (["metrics.kid.subset_size=1"], "metrics.kid.subset_size=1 is not allowed: it must be an integer >= 2"),
        (["metrics.fid.enabled=false", "metrics.prdc.k=3"], "metrics.prdc.k=3 is set but metrics.fid.enabled=false"),
        (["metrics.kid.enabled=false", "metrics.kid.subsets=3"], "metrics.kid.subsets=3 is set but metrics.kid"),
        (["metrics.kid.subset_size=101"], "metrics.kid.subset_size=101 is more than the 100 generated"),
        (["metrics.prdc.k=100"], "metrics.prdc.k=100 needs more than k samples on each side.*use k <= 99"),
        # summary settings are read when a sweep ends: refused before its jobs sample
        (["summary.select_on=[zero]"], r'summary.select_on=\["zero"\] is not allowed: a list of data.seed values'),
        (["summary.reference=''"], "summary.reference='' is not allowed: a variant or series name"),
        (["data.noise_device=gpu"], "data.noise_device='gpu' is not allowed: choose one of cpu, device"),
    ],
)
def test_bad_input_is_refused_before_sampling(overrides, message, tmp_path, cache_dir):
    cfg = compose_config([*SMALL, "logger=wandb", *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())
    assert not (tmp_path / "run_config.json").exists()


@pytest.mark.parametrize("spacing,steps", [("trailing", 60), ("trailing", 62), ("leading", 61), ("linspace", 61)])
def test_step_counts_whose_grid_is_sound_run_the_steps_they_say(spacing, steps, tmp_path, cache_dir):
    """results.json's steps are the steps that ran: S distinct timesteps in [0, T - 1]."""
    cfg = compose_config(
        [*SMALL, f"sampler.timestep_spacing={spacing}", f"sampler.steps={steps}", "data.num_samples=2",
         "metrics.fid.enabled=false", "logger=none"],
        tmp_path,
        cache_dir,
    )  # fmt: skip
    results = run(cfg)
    assert results["steps"] == steps and results["settings"]["sampler.steps"] == steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_trainer_without_a_gpu_is_refused(tmp_path, cache_dir):
    cfg = compose_config([*SMALL, "trainer=gpu"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match="trainer.accelerator='gpu' but no GPU was found: use trainer=cpu"):
        run(cfg)


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
        # keys the config does not have: the keys it has, not Hydra's "not in struct"
        (["gmm.n_component=4"], "gmm.n_component=4 is not a setting: gmm has construction, last_step, n_components"),
        (["sampler.order=2"], "sampler.order=2 is not a setting: sampler has eta, family, function"),
        (["-m", "sampler.order=2,3"], "sampler.order=2 is not a setting: sampler has eta"),
        (["sampler=ddim_gmm", "+gmm.n_component=4"], "gmm.n_component=4 is not a GMM setting"),
        (["sampler=ddim_noise", "gmm.scale=-1"], "gmm.scale: scale=-1 is not allowed"),
        (["model=toy", "sampler.timestep_spacing=trailing", "sampler.steps=61"], "use sampler.steps=60 or 62"),
    ],
)
def test_command_line_errors_are_one_line_and_exit_2(args, message, tmp_path):
    """...and a run refused before it started leaves no folder (Hydra had made one, with .hydra/)."""
    proc = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_clip_score_without_prompts_is_refused_before_sampling(tmp_path, cache_dir, tiny_clip_dir):
    cfg = compose_config(
        [*SMALL, "metrics=clip", f"metrics.extra.clip.factory.model={tiny_clip_dir}"], tmp_path, cache_dir
    )
    with pytest.raises(ConfigError, match="a metric needs prompts"):
        run(cfg)
    assert not (tmp_path / "samples").exists()
