"""Random streams: one generator per sample, and draws that match diffusers' ``randn_tensor``.

A sample's noise comes from its own generator, seeded by its global seed, as in NVlabs/edm's
``generate.py`` (StackedRandomGenerator). A sample is then the same whatever batch it is drawn
in, whatever the number of devices, and whatever the order of the work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


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


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise, drawn exactly as ``diffusers.utils.torch_utils.randn_tensor`` draws it.

    With a list of generators, sample ``b`` is drawn alone (shape ``(1, ...)``) from generator ``b``.
    """
    device = torch.device(device)
    shape = tuple(int(s) for s in shape)
    draw_device = _draw_device(generator, device)
    generators = _as_generator_list(generator, shape[0])
    if generators is None:
        out = torch.randn(shape, generator=_single(generator), device=draw_device, dtype=dtype)
    else:
        one = (1,) + shape[1:]
        out = torch.cat([torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in generators])
    return out.to(device)


def rand(
    batch_size: int,
    generator: Generators = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One uniform draw in [0, 1) per sample, in float64, from that sample's generator."""
    device = torch.device(device)
    draw_device = _draw_device(generator, device)
    generators = _as_generator_list(generator, batch_size)
    if generators is None:
        out = torch.rand((batch_size,), generator=_single(generator), device=draw_device, dtype=torch.float64)
    else:
        out = torch.cat([torch.rand((1,), generator=g, device=draw_device, dtype=torch.float64) for g in generators])
    return out.to(device)
