"""Noise that keeps up: per-sample CPU streams drawn in parallel and ahead of need give the very
numbers of a plain list of generators; data.noise_device=device puts the streams on the device."""

from __future__ import annotations

import threading
from unittest.mock import MagicMock

import pytest
import torch
from helpers.runs import SMALL, compose_config, results_of

from ddim_gmm_exp import sampling
from ddim_gmm_exp.controls import IsotropicOffsetKernel
from ddim_gmm_exp.flow import sample_rfim, uniform_sigmas
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.noise import Draw, SampleStreams, draw, rand, randn, sample_generators
from ddim_gmm_exp.runner import run
from ddim_gmm_exp.sampling import sample_ddim

SHAPE = (5, 3, 8, 8)


def seeds():
    return [11, 3, 2**40, 7, 0]


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_streams_draw_the_numbers_of_one_generator_per_sample(threads):
    """Against the draw written out: sample b is torch.randn((1, ...)) from its generator, then its uniform."""
    expected_z, expected_u = [], []
    for g in sample_generators(seeds()):
        expected_z.append(torch.randn((1, *SHAPE[1:]), generator=g))
        expected_u.append(torch.rand((1,), generator=g, dtype=torch.float64))
    with SampleStreams(sample_generators(seeds()), threads=threads, min_parallel=0) as streams:
        z, u = draw([Draw("randn", SHAPE[1:]), Draw("rand", (), torch.float64)], SHAPE[0], streams)
    assert torch.equal(z, torch.cat(expected_z)) and torch.equal(u, torch.cat(expected_u))
    plain = sample_generators(seeds())
    assert torch.equal(randn(SHAPE, plain), torch.cat(expected_z))
    assert torch.equal(rand(SHAPE[0], plain), torch.cat(expected_u))


def test_streams_refuse_bad_settings():
    with pytest.raises(ValueError, match="threads=0 is not allowed"):
        SampleStreams(sample_generators([1]), threads=0)
    cuda_generator = MagicMock(spec=torch.Generator)
    cuda_generator.device = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="draws CPU generators"):
        SampleStreams([cuda_generator])


def kernels():
    return {
        "ddim": None,
        "paper": GMM().initialize(dim=192, n_components=4, n_steps=4),
        "matched_full": GMM().initialize(dim=192, n_components=4, n_steps=4, construction="matched_full"),
        "control": IsotropicOffsetKernel(0.5),
    }


@pytest.mark.parametrize("kind", ["ddim", "paper", "matched_full", "control"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_loops_give_the_same_samples_with_streams_drawn_ahead(kind, eta):
    alphas = torch.linspace(0.999, 0.01, 1000)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    gmm = kernels()[kind]

    def ddim(generator):
        return sample_ddim(
            lambda x, t: 0.1 * x, x, [800, 600, 400, 200], alphas, alphas[0], eta=eta, gmm=gmm, generator=generator
        )

    def rfim(generator):
        return sample_rfim(lambda x, t: 0.1 * x, x, uniform_sigmas(4), eta=eta / 2, gmm=gmm, generator=generator)

    for loop in (ddim, rfim):
        plain = loop(sample_generators(seeds()))
        with SampleStreams(sample_generators(seeds()), threads=2, min_parallel=0) as streams:
            ahead = loop(streams)
        assert torch.equal(plain, ahead)


def test_a_steps_draws_run_on_the_background_thread_while_the_model_runs(monkeypatch):
    """The loop submits step i's draws before calling the model at step i."""
    events = []
    real_draw = sampling.draw

    def recording_draw(*args, **kwargs):
        events.append(("draw", threading.current_thread().name))
        return real_draw(*args, **kwargs)

    def denoiser(x, t):
        events.append(("model", threading.current_thread().name))
        return 0.1 * x

    monkeypatch.setattr(sampling, "draw", recording_draw)
    alphas = torch.linspace(0.999, 0.01, 1000)
    with SampleStreams(sample_generators(seeds())) as streams:
        sample_ddim(denoiser, torch.randn(SHAPE), [800, 600, 400], alphas, alphas[0], eta=1.0, generator=streams)
    draws = [name for kind, name in events if kind == "draw"]
    assert len(draws) == 3 and all(name.startswith("draw-ahead") for name in draws)
    assert all(name == threading.current_thread().name for kind, name in events if kind == "model")


def test_noise_device_is_recorded_and_device_streams_run(tmp_path, cache_dir):
    """On a CPU machine 'device' streams are CPU streams: the same images, and results.json says which."""
    overrides = [*SMALL, "sampler=ddim_gmm", "sampler.eta=1.0"]
    run(compose_config(overrides, tmp_path / "cpu", cache_dir))
    run(compose_config([*overrides, "data.noise_device=device"], tmp_path / "device", cache_dir))
    cpu, device = results_of(tmp_path / "cpu"), results_of(tmp_path / "device")
    assert cpu["noise_device"] == "cpu" and device["noise_device"] == "device"
    assert cpu["metrics"] == device["metrics"]
    for a, b in zip(
        sorted((tmp_path / "cpu").rglob("*.png")), sorted((tmp_path / "device").rglob("*.png")), strict=True
    ):
        assert a.read_bytes() == b.read_bytes()


def test_large_draws_are_split_over_threads_and_small_ones_are_not(monkeypatch):
    import ddim_gmm_exp.noise as noise

    names = set()
    real_fill = noise._fill

    def recording_fill(out, d, generator):
        names.add(threading.current_thread().name)
        real_fill(out, d, generator)

    monkeypatch.setattr(noise, "_fill", recording_fill)
    with SampleStreams(sample_generators(seeds()), threads=2, min_parallel=1000) as streams:
        draw([Draw("randn", (3, 8, 8))], 5, streams)  # 960 numbers: in the calling thread
        assert names == {threading.current_thread().name}
        names.clear()
        draw([Draw("randn", (3, 16, 16))], 5, streams)
        assert names == {threading.current_thread().name, "draw_0"}
