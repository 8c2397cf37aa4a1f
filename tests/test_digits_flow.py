"""The shipped digits rectified-flow model: loads offline, samples digits with Euler, trains from the script."""

from __future__ import annotations

import json
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from helpers.runs import ROOT
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddim_gmm_exp.flow import sample_rfim
from ddim_gmm_exp.images import to_uint8
from ddim_gmm_exp.metrics import MetricSuite, load_reference
from ddim_gmm_exp.models.digits import DigitFeatures, classifier_scores_extra, shipped_dir
from ddim_gmm_exp.models.digits_flow import DigitsFlowAdapter, shipped_flow_dir
from ddim_gmm_exp.noise import randn, sample_generators


@pytest.fixture(scope="module")
def adapter():
    return DigitsFlowAdapter()


@pytest.fixture(scope="module")
def card():
    return json.loads((shipped_flow_dir() / "card.json").read_text())


def test_shipped_flow_model_loads_offline(adapter):
    assert adapter.family == "flow" and adapter.sample_shape == (1, 8, 8) and adapter.num_classes == 10
    assert sum(p.numel() for p in adapter.unet.parameters()) < 1_000_000
    out = adapter.model_output(torch.zeros(2, 1, 8, 8), torch.tensor([1000.0, 312.5]), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert adapter.flow_sigmas(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler_config)
    assert scheduler.config.shift == 1.0 and scheduler.config.num_train_timesteps == 1000
    # scored in the DDPM's features, against the DDPM's reference statistics
    assert adapter.reference_stats == shipped_dir() / "reference_stats.npz"
    size = sum(p.stat().st_size for p in shipped_flow_dir().rglob("*") if p.is_file())
    assert size <= 2 * 2**20, size


def test_the_card_records_training_and_scores(card):
    assert card["unet"]["training_seconds"] > 0 and card["unet"]["steps"] >= 1000
    assert "digits" in card["classifier"] and "reference_stats.npz" in card["reference_stats"]
    cells = {(r["steps"], r["conditional"], r["guidance_scale"]) for r in card["fd_table"]}
    assert cells == {(s, c, g) for s in (10, 50) for c, g in [(True, 1.0), (True, 2.5), (False, 1.0)]}
    assert all(r["samples"] == 1000 and r["sampler"] == "rfim" and r["eta"] == 0.0 for r in card["fd_table"])
    assert {r["steps"] for r in card["ddpm_same_protocol"]} == {50}


def euler_samples(adapter, n: int, steps: int, conditional: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images of samples 0..n-1 (own generators, label i % 10), RFIM at eta = 0 on the uniform grid."""
    generators = sample_generators(range(n))
    labels = torch.arange(n) % 10 if conditional else None
    x = randn((n, *adapter.sample_shape), generators)
    with torch.no_grad():
        samples = sample_rfim(
            lambda x, t: adapter.model_output(x, t, labels), x, adapter.flow_sigmas(steps), generator=generators
        )
    return to_uint8(adapter.decode(samples)), labels


def test_fifty_euler_steps_draw_the_asked_digits(adapter):
    images, labels = euler_samples(adapter, 200, 50)
    suite = MetricSuite(
        DigitFeatures(),
        load_reference(adapter.reference_stats),
        fid_name="fid_digits",
        extras={"classifier": classifier_scores_extra()},
    )
    suite.reset_and_load_reference(global_rank=0)
    suite.update(images, labels)
    metrics = suite.compute()
    assert metrics["classifier_accuracy"] > 0.9, metrics
    assert metrics["classifier_modes_covered"] == 10
    assert np.isfinite(metrics["fid_digits"]) and metrics["fid_digits"] < 30, metrics


def test_a_sample_is_the_same_alone_or_in_a_batch(adapter):
    batch, _ = euler_samples(adapter, 6, 10)
    generators = sample_generators([4])
    x = randn((1, *adapter.sample_shape), generators)
    with torch.no_grad():
        alone = sample_rfim(
            lambda x, t: adapter.model_output(x, t, torch.tensor([4])), x, adapter.flow_sigmas(10), generator=generators
        )
    assert (to_uint8(adapter.decode(alone))[0].int() - batch[4].int()).abs().max() <= 1


def test_model_config_builds_the_adapter_and_the_ddpm_features():
    cfg = OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / "digits_flow.yaml")})
    assert cfg.model.family == "flow" and cfg.model.fid_name == "fid_digits"
    assert isinstance(instantiate(cfg.model.adapter), DigitsFlowAdapter)
    features = instantiate(cfg.model.features)
    assert isinstance(features, DigitFeatures) and features.num_features == 128


def test_training_script_flow_path(tmp_path):
    out = tmp_path / "digits_flow"
    args = ["--flow", "--out", str(out), "--steps", "3", "--channels", "8", "16", "--eval-samples", "0"]
    args += ["--logger", "none", "--log-dir", str(tmp_path / "logs"), "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_digits.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "card.json").read_text())
    assert card["unet"]["steps"] == 3 and "fd_table" not in card
    assert not (out / "classifier.pt").exists()  # the DDPM's classifier is reused, not retrained
    adapter = DigitsFlowAdapter(str(out))
    assert adapter.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    images, _ = euler_samples(adapter, 4, 2)
    assert images.shape == (4, 1, 8, 8)


def test_training_script_refuses_a_classifier_dir_without_a_classifier(tmp_path):
    args = ["--flow", "--out", str(tmp_path / "o"), "--classifier-dir", str(tmp_path), "--steps", "1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_digits.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "has no classifier.pt" in proc.stderr
