"""What the sampling path costs the host: per-step noise time, and host reads per run.

    python scripts/bench_noise.py                 # both tables of docs/performance.md
    python scripts/bench_noise.py --small         # tiny sizes (the test suite runs this)

Table 1, the random draws of one step for a batch of per-sample CPU streams (64 x 3x256x256 by
default, the paper's pixel-space CelebA-HQ/LSUN/cat size), median over repeats:
    z as before: one sample at a time (torch.randn per sample, then torch.cat);
    z with noise.SampleStreams: the same numbers, drawn in parallel over samples;
    the control's offset u (float64) and a GMM step at eta = 0, before and after (at eta = 0 the
    z was multiplied by zero; now only the component's uniform is drawn);
    a 10-step DDIM eta = 1 loop around a model that keeps the host idle for --model-ms (as a GPU
    does while it computes), with the draws after the model call (as before) and ahead of it.
Table 2, host reads (ddim_gmm_exp.host_reads: item/float/int/bool/indexing reads, tolist, numpy)
per run of the schedulers' step, the loops and the LDM sampler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ddim_gmm_exp import DDIMSampler
from ddim_gmm_exp.diffusers import DDIMScheduler, RFIMScheduler
from ddim_gmm_exp.flow import sample_rfim, uniform_sigmas
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.host_reads import HostReads
from ddim_gmm_exp.noise import Draw, SampleStreams, draw, sample_generators
from ddim_gmm_exp.sampling import sample_ddim


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def serial_draw(generators: list[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The draw as it was: each sample's (1, ...) tensor from its generator, one after another, then cat."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators])


def serial_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """The component draw as it was: one float64 uniform per sample, after its z."""
    return torch.cat([torch.rand((1,), generator=g, dtype=torch.float64) for g in generators])


def noise_rows(batch: int, shape: tuple[int, ...], repeats: int, model_ms: float, threads: int) -> list[tuple]:
    generators = sample_generators(range(batch))
    streams = SampleStreams(sample_generators(range(batch)), threads=threads)
    z_before = median_ms(lambda: serial_draw(generators, shape, torch.float32), repeats)
    z_after = median_ms(lambda: draw([Draw("randn", shape)], batch, streams), repeats)
    u_before = median_ms(lambda: serial_draw(generators, shape, torch.float64), repeats)
    u_after = median_ms(lambda: draw([Draw("randn", shape, torch.float64)], batch, streams), repeats)
    uniform = Draw("rand", (), torch.float64)
    gmm_before = median_ms(
        lambda: (serial_draw(generators, shape, torch.float32), serial_uniforms(generators)), repeats
    )
    gmm_after = median_ms(lambda: draw([uniform], batch, streams), repeats)
    loop_before, loop_after = loop_ms(batch, shape, model_ms, threads, repeats)
    streams.close()
    return [
        ("z of one step (float32)", z_before, z_after),
        ("control offset u of one step (float64)", u_before, u_after),
        ("GMM step at eta = 0 (z + uniform -> uniform)", gmm_before, gmm_after),
        (f"10-step DDIM eta=1 loop, host-idle model {model_ms:g} ms/step", loop_before, loop_after),
    ]


def loop_ms(batch: int, shape: tuple[int, ...], model_ms: float, threads: int, repeats: int) -> tuple[float, float]:
    """A loop whose model leaves the host idle (sleep) for model_ms: draws after it vs ahead of it."""
    alphas = torch.linspace(0.999, 0.01, 1000)
    x = torch.zeros((batch, *shape))
    timesteps = list(range(950, -1, -100))[:10]

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time.sleep(model_ms / 1000)
        return x

    def run(generator) -> torch.Tensor:
        return sample_ddim(model, x, timesteps, alphas, alphas[0], eta=1.0, generator=generator)

    before = median_ms(lambda: run(sample_generators(range(batch))), repeats)
    with SampleStreams(sample_generators(range(batch)), threads=threads) as streams:
        after = median_ms(lambda: run(streams), repeats)
    return before, after


def count_reads(fn: Callable[[HostReads], object]) -> int:
    reads = HostReads(active=False)
    with reads:
        fn(reads)
    return reads.count


def read_rows(steps: int) -> list[tuple[str, int]]:
    shape, dim = (2, 3, 8, 8), 192
    generators = sample_generators([1, 2])

    def gmm() -> GMM:
        return GMM().initialize(dim=dim, n_components=4, n_steps=steps)

    def scheduler_run(cls, with_gmm: bool, **step_kwargs) -> Callable[[HostReads], object]:
        def run(reads: HostReads) -> None:
            scheduler = cls() if cls is not RFIMScheduler else cls(eta=step_kwargs.pop("rfim_eta", 0.0))
            scheduler.set_timesteps(steps, device="cpu")
            if with_gmm:
                scheduler.set_gmm_params(gmm())
            x = torch.randn(shape)
            reads.active = True
            for t in scheduler.timesteps:
                x = scheduler.step(0.1 * x, t, x, generator=generators, **step_kwargs).prev_sample

        return run

    def denoiser(reads: HostReads):
        def model(x, t):
            reads.active = True
            return 0.1 * x

        return model

    alphas = torch.linspace(0.999, 0.01, 1000)
    timesteps = list(range(900, 0, -900 // steps))[:steps]
    return [
        (f"DDIMScheduler.step, GMM, eta = 0 ({steps} steps)", count_reads(scheduler_run(DDIMScheduler, True, eta=0.0))),
        (f"DDIMScheduler.step, GMM, eta = 1 ({steps} steps)", count_reads(scheduler_run(DDIMScheduler, True, eta=1.0))),
        (f"DDIMScheduler.step, no GMM ({steps} steps)", count_reads(scheduler_run(DDIMScheduler, False))),
        (
            f"RFIMScheduler.step, GMM, eta = 0.5 ({steps} steps)",
            count_reads(scheduler_run(RFIMScheduler, True, rfim_eta=0.5)),
        ),
        (f"RFIMScheduler.step, eta = 0 ({steps} steps)", count_reads(scheduler_run(RFIMScheduler, False))),
        (
            f"sample_ddim, GMM, eta = 0 ({steps} steps)",
            count_reads(
                lambda r: sample_ddim(
                    denoiser(r), torch.randn(shape), timesteps, alphas, alphas[0], gmm=gmm(), generator=generators
                )
            ),
        ),
        (
            f"sample_rfim, GMM, eta = 0.5 ({steps} steps)",
            count_reads(
                lambda r: sample_rfim(
                    denoiser(r), torch.randn(shape), uniform_sigmas(steps), eta=0.5, gmm=gmm(), generator=generators
                )
            ),
        ),
        (f"LDM DDIMSampler.sample, GMM, eta = 0 ({steps} steps)", count_reads(lambda r: ldm_run(r, gmm(), steps))),
    ]


class _Model(torch.nn.Module):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads, self.num_timesteps = reads, 1000
        self.register_buffer("alphas_cumprod", torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))

    def apply_model(self, x, t, c):
        self.reads.active = True
        return 0.1 * x


def ldm_run(reads: HostReads, gmm: GMM, steps: int) -> None:
    sampler = DDIMSampler(_Model(reads), gmm=True, gmm_params=gmm)
    sampler.sample(S=steps, batch_size=2, shape=(3, 8, 8), eta=0.0, verbose=False, generator=sample_generators([1, 2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-ms", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=None, help="SampleStreams threads (default: its own)")
    args = parser.parse_args(argv)
    batch, size, repeats = (4, 16, 1) if args.small else (args.batch, args.size, args.repeats)
    threads = args.threads or SampleStreams(sample_generators(range(batch))).threads
    shape = (3, size, size)
    print(f"## Noise of one step: {batch} x {shape}, {threads} draw threads, median of {repeats}\n")
    print("| draw | before (ms) | after (ms) | after / before |\n|---|---|---|---|")
    for name, before, after in noise_rows(batch, shape, repeats, 2.0 if args.small else args.model_ms, threads):
        print(f"| {name} | {before:.1f} | {after:.1f} | {after / before:.2f} |", flush=True)
    print("\n## Host reads per run\n\n| path | host reads |\n|---|---|")
    for name, count in read_rows(4 if args.small else 10):
        print(f"| {name} | {count} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
