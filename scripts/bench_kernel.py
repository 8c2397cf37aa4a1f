"""What the GMM kernel costs: the DDIM-GMM update against the DDIM update and a UNet forward.

    python scripts/bench_kernel.py                 # CUDA when available, else CPU
    python scripts/bench_kernel.py --device cpu --repeats 20 --out bench.md

Times, in one run and on one device, one DDIM update (variance noise z + step) and one DDIM-GMM
update (z + component draw + the construction's perturbation + step), both with per-sample
generators as the runner uses them, for every D x K x construction, at batch 16; and one forward of a UNet2DModel with
google/ddpm-cifar10-32's architecture (random weights) at the same batch. Prints a table of
ratios (GMM update / DDIM update, GMM update / UNet forward) and the kernel memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ddim_gmm_exp.gmm import CONSTRUCTIONS, GMM
from ddim_gmm_exp.models.pretrained import ddpm_cifar10_unet
from ddim_gmm_exp.noise import sample_generators
from ddim_gmm_exp.sampling import ddim_step, kernel_noise

DIMS = {"3x32x32": (3, 32, 32), "4x64x64": (4, 64, 64), "3x256x256": (3, 256, 256)}


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of fn over ``repeats`` runs after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def update_fn(shape: tuple[int, ...], device: torch.device, gmm: GMM | None) -> Callable[[], torch.Tensor]:
    """One sampling update at a mid-schedule step, with fresh per-sample generators."""
    x = torch.randn(shape, device=device)
    eps = torch.randn(shape, device=device)
    abar_t, abar_prev = torch.tensor(0.5), torch.tensor(0.6)
    generators = sample_generators(range(shape[0]), device=device)

    def update() -> torch.Tensor:
        noise, components = kernel_noise(
            shape, generators, device=device, dtype=x.dtype, gmm=gmm, step_index=0, num_steps=2, eta=1.0
        )
        return ddim_step(eps, x, abar_t, abar_prev, 1.0, noise, gmm=gmm, components=components)[0]

    return update


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dims", nargs="+", default=list(DIMS), choices=list(DIMS))
    parser.add_argument("--ks", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--constructions", nargs="+", default=list(CONSTRUCTIONS), choices=list(CONSTRUCTIONS))
    parser.add_argument("--steps", type=int, default=50, help="sampling steps for the cached-memory column")
    parser.add_argument("--no-unet", action="store_true", help="skip the UNet forward")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    unet_s = float("nan")
    if not args.no_unet:
        unet = ddpm_cifar10_unet().to(device).eval()
        x = torch.randn(args.batch, 3, 32, 32, device=device)
        t = torch.full((args.batch,), 500, device=device)
        with torch.no_grad():
            unet_s = median_seconds(lambda: unet(x, t), max(3, args.repeats // 3), device)
        del unet

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"device: {name}; batch {args.batch}; median of {args.repeats}; "
        f"UNet2DModel (ddpm-cifar10-32 architecture) forward: {unet_s * 1e3:.1f} ms",
        "",
        "| D | K | construction | DDIM update ms | GMM update ms | GMM / DDIM | GMM / UNet fwd | "
        f"kernel MB per step | kernel MB x {args.steps} steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with torch.no_grad():
        for dim_name in args.dims:
            shape = (args.batch, *DIMS[dim_name])
            dim = shape[1] * shape[2] * shape[3]
            ddim_s = median_seconds(update_fn(shape, device, None), args.repeats, device)
            for construction in args.constructions:
                for k in args.ks:
                    gmm = GMM(device=device).initialize(
                        dim=dim, n_components=k, n_steps=1, construction=construction, share_across_steps=True
                    )
                    gmm_s = median_seconds(update_fn(shape, device, gmm), args.repeats, device)
                    mb = gmm.memory_bytes / 2**20
                    lines.append(
                        f"| {dim_name} | {k} | {construction} | {ddim_s * 1e3:.3f} | {gmm_s * 1e3:.3f} | "
                        f"{gmm_s / ddim_s:.2f} | {gmm_s / unet_s:.4f} | {mb:.2f} | {mb * args.steps:.1f} |"
                    )
                    print(lines[-1], file=sys.stderr, flush=True)
                    del gmm
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
