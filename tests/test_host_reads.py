"""No host reads on the sampling path: the loops, both schedulers, the LDM sampler and the
control keep their per-step scalars on the host or on the device, never read back
(ddim_gmm_exp.host_reads counts; on a GPU, torch.cuda.set_sync_debug_mode("error") checks)."""

from __future__ import annotations

import pytest
import torch

from ddim_gmm_exp import DDIMSampler
from ddim_gmm_exp.controls import IsotropicOffsetKernel, VarianceAccount
from ddim_gmm_exp.diffusers import DDIMScheduler, RFIMScheduler
from ddim_gmm_exp.flow import sample_rfim, uniform_sigmas
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.host_reads import HostReads
from ddim_gmm_exp.noise import SampleStreams, sample_generators
from ddim_gmm_exp.sampling import sample_ddim

SHAPE = (3, 3, 8, 8)
DIM = 192
STEPS = 5


def kernel(kind: str, device: str = "cpu"):
    if kind == "none":
        return None
    if kind == "control":
        return IsotropicOffsetKernel(0.5)
    return GMM(device=device).initialize(dim=DIM, n_components=4, n_steps=STEPS, construction=kind)


def streams(kind: str, device: str = "cpu"):
    seeds = range(SHAPE[0])
    if kind == "device":
        return sample_generators(seeds, device=device)
    generators = sample_generators(seeds)
    return SampleStreams(generators) if kind == "streams" else generators


def test_the_counter_sees_every_kind_of_read():
    """item, float, int, bool, indexing by a 0-d tensor, tolist, numpy: each counted once."""
    t = torch.tensor(3)
    table = torch.arange(5)
    with HostReads() as reads:
        t.item(), float(t), int(t), bool(t), table[t], t.tolist(), t.numpy()
    assert reads.count == 7, reads.calls
    with HostReads(active=False) as reads:
        t.item()
    assert reads.count == 0


def loop_denoiser(reads: HostReads):
    """eps = 0.1 x, read-free; the count starts at the first model call (after the loop's setup)."""

    def denoiser(x, t):
        reads.active = True
        return 0.1 * x

    return denoiser


@pytest.mark.parametrize("kind", ["none", "paper", "matched_diagonal", "matched_full", "control"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("noise", ["list", "streams"])
def test_the_ddim_loop_reads_nothing_back(kind, eta, noise):
    alphas = torch.linspace(0.999, 0.01, 1000)
    with HostReads(active=False) as reads:
        sample_ddim(
            loop_denoiser(reads),
            torch.randn(SHAPE),
            [900, 700, 500, 300, 100],
            alphas,
            alphas[0],
            eta=eta,
            gmm=kernel(kind),
            generator=streams(noise),
            callback=VarianceAccount(DIM),
        )
    assert reads.active and reads.count == 0, reads.calls


@pytest.mark.parametrize("kind", ["none", "paper", "control"])
def test_the_rfim_loop_reads_nothing_back(kind):
    with HostReads(active=False) as reads:
        sample_rfim(
            loop_denoiser(reads),
            torch.randn(SHAPE),
            uniform_sigmas(STEPS),
            eta=0.5,
            gmm=kernel(kind),
            generator=streams("streams"),
            callback=VarianceAccount(DIM),
        )
    assert reads.active and reads.count == 0, reads.calls


def ddim_scheduler(kind: str, device: str = "cpu") -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS, device=device)
    gmm = kernel(kind, device)
    if gmm is not None:
        scheduler.set_gmm_params(gmm)
    return scheduler


@pytest.mark.parametrize("kind", ["none", "paper", "matched_full"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_ddim_scheduler_reads_nothing_back(kind, eta):
    """After set_timesteps(device=...) and add_noise (which moves alphas_cumprod to the samples' device)."""
    scheduler = ddim_scheduler(kind)
    x = scheduler.add_noise(torch.randn(SHAPE), torch.randn(SHAPE), scheduler.timesteps[:1])
    generators = streams("list")
    with HostReads() as reads:
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x, eta=eta, generator=generators).prev_sample
    assert reads.count == 0, reads.calls
    assert scheduler.clipped_fraction is None or 0 <= scheduler.clipped_fraction <= 1  # read after the run


def test_a_foreign_timestep_tensor_is_read_once_per_step():
    """A timestep that is not an element of scheduler.timesteps (a copy) is looked up by value."""
    scheduler = ddim_scheduler("paper")
    x = torch.randn(SHAPE)
    with HostReads() as reads:
        for t in scheduler.timesteps.clone():
            x = scheduler.step(0.1 * x, t, x, generator=streams("list")).prev_sample
    assert reads.count == STEPS


@pytest.mark.parametrize("kind", ["none", "paper"])
def test_the_rfim_scheduler_reads_nothing_back(kind):
    scheduler = RFIMScheduler(eta=0.5)
    scheduler.set_timesteps(STEPS, device="cpu")
    if kind != "none":
        scheduler.set_gmm_params(kernel(kind))
    x = scheduler.scale_noise(torch.randn(SHAPE), scheduler.timesteps[:1], torch.randn(SHAPE))
    generators = streams("list")
    with HostReads() as reads:
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x, generator=generators).prev_sample
    assert reads.count == 0, reads.calls


class ReadFreeModel(torch.nn.Module):
    """What DDIMSampler needs of a CompVis model: apply_model, alphas_cumprod, num_timesteps."""

    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads
        self.num_timesteps = 1000
        self.register_buffer("alphas_cumprod", torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))

    def apply_model(self, x, t, c):
        self.reads.active = True
        return 0.1 * x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_ldm_sampler_reads_nothing_back(eta):
    reads = HostReads(active=False)
    gmm = kernel("paper")
    sampler = DDIMSampler(ReadFreeModel(reads), gmm=True, gmm_params=gmm)
    with reads:
        sampler.sample(
            S=STEPS, batch_size=SHAPE[0], shape=SHAPE[1:], eta=eta, verbose=False, generator=streams("streams")
        )
    assert reads.active and reads.count == 0, reads.calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["none", "paper", "matched_full", "control"])
@pytest.mark.parametrize("noise", ["streams", "device"])
def test_no_synchronisation_on_a_gpu(kind, noise):
    """The loops and the scheduler under torch.cuda.set_sync_debug_mode("error"): a sync raises."""
    device = "cuda"
    alphas = torch.linspace(0.999, 0.01, 1000)
    x = torch.randn(SHAPE, device=device)
    scheduler = ddim_scheduler(kind if kind != "control" else "none", device)
    step_generators = streams(noise, device)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for eta in (0.0, 1.0):
            out = sample_ddim(
                lambda x, t: 0.1 * x,
                x,
                [900, 700, 500, 300, 100],
                alphas,
                alphas[0],
                eta=eta,
                gmm=kernel(kind, device),
                generator=streams(noise, device),
            )
            y = x
            for t in scheduler.timesteps:
                y = scheduler.step(0.1 * y, t, y, eta=eta, generator=step_generators).prev_sample
            flow = sample_rfim(
                lambda x, t: 0.1 * x,
                x,
                uniform_sigmas(STEPS),
                eta=0.5 * eta,
                gmm=kernel(kind, device),
                generator=streams(noise, device),
            )
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(out).all() and torch.isfinite(y).all() and torch.isfinite(flow).all()
