"""Random streams: one generator per sample, and draws that match diffusers' ``randn_tensor``.

A sample's noise comes from its own generator, seeded by its global seed, as in NVlabs/edm's
``generate.py`` (StackedRandomGenerator). A sample is then the same whatever batch it is drawn
in, whatever the number of devices, and whatever the order of the work.

Drawing is kept off the device's critical path (docs/performance.md): :class:`SampleStreams`
draws a batch's per-sample CPU streams in parallel over samples (torch releases the GIL in its
random kernels), into pinned memory copied without blocking, and :func:`ahead` lets a sampling
loop draw a step's noise while the model runs. Every sample's stream is consumed in the same
order as by a plain list of generators, so the numbers are the same bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None
# where a run's per-sample generators live (data.noise_device): the CPU, or the sampling device
NOISE_DEVICES = ("cpu", "device")
# Threads drawing one batch's CPU streams: a few suffice to keep ahead of a GPU, more contend
# with the model's own CPU work.
MAX_DRAW_THREADS = 8
# Below this many numbers a step's draw is quicker in the calling thread than handed to threads
# (about 0.2 ms of dispatch, against ~5 ns a number).
MIN_PARALLEL_NUMBERS = 1 << 16

T = TypeVar("T")


@dataclass(frozen=True)
class Draw:
    """One draw from every sample's stream: ``kind`` "randn" (N(0, 1)) or "rand" (U[0, 1)), the
    per-sample ``shape`` (batch dimension excluded) and the dtype."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


class SampleStreams(list):
    """One CPU generator per sample (a list, so diffusers' ``randn_tensor`` takes it as one) that
    draws a batch in parallel over samples and, through :func:`ahead`, ahead of need.

        with SampleStreams(sample_generators(seeds)) as streams:
            x = randn(shape, streams, device="cuda")

    ``threads``: how many threads draw (default: min(MAX_DRAW_THREADS, CPUs, batch));
    ``min_parallel``: draws of fewer numbers stay in the calling thread. The numbers are those of
    the plain list of generators; only the time changes.
    """

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        threads: int | None = None,
        min_parallel: int = MIN_PARALLEL_NUMBERS,
    ) -> None:
        super().__init__(generators)
        if any(g.device.type != "cpu" for g in self):
            raise ValueError("SampleStreams draws CPU generators: device generators draw on their device")
        if threads is None:
            threads = min(MAX_DRAW_THREADS, os.cpu_count() or 1, max(1, len(self)))
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} is not allowed: it must be an integer >= 1")
        self.threads = threads
        self.min_parallel = min_parallel
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: ThreadPoolExecutor | None = None

    def map_chunks(self, fn: Callable[[range], None]) -> None:
        """fn(samples) over contiguous chunks of the batch in parallel: the calling thread takes
        the first chunk, the streams' threads the others."""
        chunks = _chunks(len(self), self.threads)
        if len(chunks) > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="draw")
        in_mode = _in_callers_mode(fn)
        futures = [self._pool.submit(in_mode, chunk) for chunk in chunks[1:]]
        if chunks:
            fn(chunks[0])
        for future in futures:
            future.result()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """fn() on the streams' own background thread (one: draws stay in the order submitted)."""
        if self._ahead is None:
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="draw-ahead")
        return self._ahead.submit(_in_callers_mode(fn))

    def close(self) -> None:
        """Stop the threads (after the draws already submitted)."""
        for pool in (self._ahead, self._pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._ahead = None

    def __enter__(self) -> SampleStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_callers_mode(fn: Callable[..., T]) -> Callable[..., T]:
    """fn, run under the calling thread's inference / grad mode (both are per thread: a worker
    outside inference mode may not fill the tensors that Lightning's predict loop allocates)."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def wrapped(*args: object) -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*args)

    return wrapped


def _chunks(n: int, parts: int) -> list[range]:
    """range(n) cut into at most ``parts`` contiguous, nearly equal chunks."""
    parts = max(1, min(parts, n))
    bounds = [n * p // parts for p in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class Deferred(Generic[T]):
    """A value computed when it is asked for: :func:`ahead`'s stand-in where nothing draws ahead."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn

    def result(self) -> T:
        return self._fn()


def ahead(generator: Generators, fn: Callable[[], T]) -> Future[T] | Deferred[T]:
    """fn() started now in the background where ``generator`` is :class:`SampleStreams` (a loop
    submits a step's draws before its model call, and takes ``.result()`` after it); else
    computed at ``.result()``, in the order of today's draws. fn must only draw from generator."""
    if isinstance(generator, SampleStreams):
        return generator.submit(fn)
    return Deferred(fn)


def sample_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded by that sample's global seed (EDM's StackedRandomGenerator)."""
    return [torch.Generator(device=device).manual_seed(int(seed) % (1 << 63)) for seed in seeds]


def _as_generator_list(generator: Generators, batch_size: int) -> list[torch.Generator] | None:
    """A list of per-sample generators, or None for a single (or no) generator.

    diffusers treats a list of one generator as that generator; so do we.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return None
    generators = list(generator)
    if len(generators) == 1:
        return None
    if len(generators) != batch_size:
        raise ValueError(
            f"got {len(generators)} generators for a batch of {batch_size}: "
            "pass one generator, or exactly one per sample"
        )
    return generators


def _single(generator: Generators) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return next(iter(generator))


def _draw_device(generator: Generators, device: torch.device) -> torch.device:
    """Where to draw: on the generator's own device (a generator draws nowhere else), then move;
    without a generator, on the target device. For CPU generators this is diffusers' rule."""
    first = _single(generator)
    return first.device if first is not None else device


def _fill(out: torch.Tensor, draw: Draw, generator: torch.Generator | None) -> None:
    """out's entries from one stream: torch.randn / torch.rand are empty() then these, so the
    numbers are theirs."""
    if draw.kind == "randn":
        out.normal_(generator=generator)
    elif draw.kind == "rand":
        out.uniform_(generator=generator)
    else:
        raise ValueError(f"Draw kind={draw.kind!r} is not allowed: choose 'randn' or 'rand'")


def draw(
    draws: Sequence[Draw],
    batch_size: int,
    generator: Generators = None,
    device: str | torch.device = "cpu",
    move: bool = True,
) -> list[torch.Tensor]:
    """One tensor (batch_size, *d.shape) per draw d, on ``device``: a step's random numbers.

    With one generator (or none), each draw is one call for the whole batch, as diffusers draws.
    With one generator per sample, sample b takes its draws from generator b in the order given
    (its z, then its mixture draw), where the generators live; CPU draws for another device go
    through pinned memory and are copied without blocking (``move=False``: left there, for the
    caller's thread to copy, as a loop that draws on a background thread does). ``SampleStreams`` draws the samples in
    parallel; the numbers do not change.
    """
    device = torch.device(device)
    draw_device = _draw_device(generator, device)
    generators = _as_generator_list(generator, batch_size)
    if generators is None:
        outs = [torch.empty((batch_size, *d.shape), dtype=d.dtype, device=draw_device) for d in draws]
        for out, d in zip(outs, draws, strict=True):
            _fill(out, d, _single(generator))
        return [out.to(device) for out in outs]
    pin = draw_device.type == "cpu" and device.type == "cuda"
    outs = [torch.empty((batch_size, *d.shape), dtype=d.dtype, device=draw_device, pin_memory=pin) for d in draws]

    def fill_samples(samples: range) -> None:
        for b in samples:
            for out, d in zip(outs, draws, strict=True):
                _fill(out[b : b + 1], d, generators[b])

    numbers = sum(out.numel() for out in outs)
    if isinstance(generator, SampleStreams) and numbers >= generator.min_parallel:
        generator.map_chunks(fill_samples)
    else:
        fill_samples(range(batch_size))
    return [out.to(device, non_blocking=pin) for out in outs] if move else outs


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise, drawn exactly as ``diffusers.utils.torch_utils.randn_tensor`` draws it.

    With a list of generators, sample ``b`` is drawn alone (shape ``(1, ...)``) from generator ``b``.
    """
    shape = tuple(int(s) for s in shape)
    return draw([Draw("randn", shape[1:], dtype)], shape[0], generator, device)[0]


def rand(
    batch_size: int,
    generator: Generators = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One uniform draw in [0, 1) per sample, in float64, from that sample's generator."""
    return draw([Draw("rand", (), torch.float64)], batch_size, generator, device)[0]
